//! Byte layouts of every sled key. Nothing outside this file builds or parses a key.
//!
//! Numbers are big-endian so that byte order is numeric order (sled iterates in byte
//! order), and variable-length parts are followed by a 0x00 separator, which cannot
//! occur in ids, numbers or references that are valid UTF-8 text without NULs.

use chrono::{DateTime, Utc};

const SEPARATOR: u8 = 0;

/// Raw event log: `<order millis, big-endian> <seq, big-endian>`, so the log reads in
/// time order and a time range is a key range.
pub fn event(at: DateTime<Utc>, seq: u64) -> [u8; 16] {
    let mut key = [0; 16];
    key[..8].copy_from_slice(&millis(at).to_be_bytes());
    key[8..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// The smallest key of anything ordered at or after `at` (events and the time index).
pub fn time_floor(at: DateTime<Utc>) -> [u8; 8] {
    millis(at).to_be_bytes()
}

fn millis(at: DateTime<Utc>) -> u64 {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
}

/// Index by number or by reference: `<value> 0x00 <verification id>`.
pub fn index(value: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(value.len() + 1 + id.len());
    key.extend_from_slice(value.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(id.as_bytes());
    key
}

/// Index by creation: `<first-seen millis> <creation seq> <verification id>`, all
/// big-endian, so it sorts by time and, within a millisecond, by creation order.
pub fn time_index(at: DateTime<Utc>, seq: u64, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(16 + id.len());
    key.extend_from_slice(&event(at, seq));
    key.extend_from_slice(id.as_bytes());
    key
}

/// The verification id at the end of a time-index key.
pub fn id_of_time_index(key: &[u8]) -> String {
    String::from_utf8_lossy(key.get(16..).unwrap_or_default()).into_owned()
}

/// The dedup keys of one verification all start with this.
pub fn dedup_prefix(id: &str) -> Vec<u8> {
    index(id, "")
}

/// Identity of an event for duplicate detection. A result event's status is part of it,
/// because Sinch may report PENDING and then a final status for one verification. An
/// event type we do not know is identified by its whole body, so nothing is dropped.
pub fn dedup(id: &str, event_type: &str, discriminator: &str) -> Vec<u8> {
    let mut key = index(id, event_type);
    key.push(SEPARATOR);
    key.extend_from_slice(discriminator.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn time_keys_sort_in_time_then_creation_order() {
        let early = time_index(Utc.timestamp_opt(1_000, 0).unwrap(), 9, "zzz");
        let late = time_index(Utc.timestamp_opt(1_000_000, 0).unwrap(), 1, "aaa");
        let same_ms_later = time_index(Utc.timestamp_opt(1_000_000, 0).unwrap(), 2, "000");
        assert!(early < late && late < same_ms_later);
        assert_eq!(id_of_time_index(&late), "aaa");
        assert!(time_floor(Utc.timestamp_opt(1_000_000, 0).unwrap()).as_slice() <= late.as_slice());
    }

    #[test]
    fn index_keys_of_one_value_share_a_prefix_others_do_not() {
        assert!(index("+4670", "id1").starts_with(&index("+4670", "")));
        assert!(!index("+46701", "id1").starts_with(&index("+4670", "")));
    }
}
