//! Byte layouts of every sled key. Nothing outside this file builds or parses a key.
//!
//! Numbers are big-endian so that byte order is numeric order (sled iterates in byte
//! order), and variable-length parts are followed by a 0x00 separator, which cannot
//! occur in ids, numbers or references that are valid UTF-8 text without NULs.

use chrono::{DateTime, Utc};

const SEPARATOR: u8 = 0;

/// Raw event log: the event's sequence number.
pub fn event(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// Index by number or by reference: `<value> 0x00 <verification id>`.
pub fn index(value: &str, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(value.len() + 1 + id.len());
    key.extend_from_slice(value.as_bytes());
    key.push(SEPARATOR);
    key.extend_from_slice(id.as_bytes());
    key
}

/// Index by first-seen time: `<millis since epoch, big-endian> <verification id>`.
pub fn time_index(at: DateTime<Utc>, id: &str) -> Vec<u8> {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    let mut key = Vec::with_capacity(8 + id.len());
    key.extend_from_slice(&millis.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
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
    fn time_keys_sort_in_time_order() {
        let early = time_index(Utc.timestamp_opt(1_000, 0).unwrap(), "zzz");
        let late = time_index(Utc.timestamp_opt(1_000_000, 0).unwrap(), "aaa");
        assert!(early < late);
    }

    #[test]
    fn index_keys_of_one_value_share_a_prefix_others_do_not() {
        assert!(index("+4670", "id1").starts_with(&index("+4670", "")));
        assert!(!index("+46701", "id1").starts_with(&index("+4670", "")));
    }
}
