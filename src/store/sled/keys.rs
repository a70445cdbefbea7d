//! Byte layouts of every key in the index tree. Nothing outside this file builds or
//! parses a key.
//!
//! One tree holds everything, each keyspace under a one-byte tag. Stamps are big-endian, so byte order is time order
//! (sled iterates in byte order); variable-length parts end with a 0x00 separator.

use chrono::{DateTime, TimeZone, Utc};

/// `B <stamp>` → a block of records created one after the other; the stamp is the first's.
const RECORD_BLOCK: u8 = b'B';
/// `P <stamp>` → a record changed after its block was written (it wins over the block).
const PATCH: u8 = b'P';
/// `I <id>` → the stamp of the verification with that id.
const ID: u8 = b'I';
/// `N <number> 0x00 <stamp>`: an entry of the number index (stored form), in runs.
pub const NUMBER: u8 = b'N';
/// `F <reference> 0x00 <stamp>`: an entry of the reference index, in runs.
pub const REFERENCE: u8 = b'F';
/// `H <run id>` → the header of an index run (runs.rs).
const RUN_HEADER: u8 = b'H';
/// `R <run id> <chunk>` → a compressed chunk of an index run's entries.
const RUN_CHUNK: u8 = b'R';
/// `E <stamp>` → a block of raw events; the stamp is the first event's.
const EVENT_BLOCK: u8 = b'E';
/// `S <u32>` → a string that encoded records refer to by number.
const SYMBOL: u8 = b'S';
/// `M <name>` → small named values (checkpoint position, format, saved policy state).
const META: u8 = b'M';

const SEPARATOR: u8 = 0;

/// Where a verification or an event sits in the store's one order: the write time in
/// milliseconds (never going back), then the write's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stamp {
    pub ms: u64,
    pub seq: u64,
}

impl Stamp {
    pub fn new(at: DateTime<Utc>, seq: u64) -> Self {
        Self {
            ms: millis(at),
            seq,
        }
    }

    /// The smallest stamp of anything at or after `at`.
    pub fn floor(at: DateTime<Utc>) -> Self {
        Self::new(at, 0)
    }

    pub fn at(self) -> DateTime<Utc> {
        i64::try_from(self.ms)
            .ok()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    pub fn bytes(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.ms.to_be_bytes());
        out[8..].copy_from_slice(&self.seq.to_be_bytes());
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 16] = bytes.try_into().ok()?;
        let (ms, seq) = bytes.split_at(8);
        Some(Self {
            ms: u64::from_be_bytes(ms.try_into().ok()?),
            seq: u64::from_be_bytes(seq.try_into().ok()?),
        })
    }

    /// The next stamp in byte order.
    pub fn successor(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => Self { ms: self.ms, seq },
            None => Self {
                ms: self.ms.saturating_add(1),
                seq: 0,
            },
        }
    }
}

fn millis(at: DateTime<Utc>) -> u64 {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
}

fn tagged(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len());
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

pub fn record_block(stamp: Stamp) -> Vec<u8> {
    tagged(RECORD_BLOCK, &stamp.bytes())
}

pub fn patch(stamp: Stamp) -> Vec<u8> {
    tagged(PATCH, &stamp.bytes())
}

pub fn event_block(stamp: Stamp) -> Vec<u8> {
    tagged(EVENT_BLOCK, &stamp.bytes())
}

/// The stamp in a block or patch key.
pub fn stamp_of(key: &[u8]) -> Option<Stamp> {
    Stamp::from_bytes(key.get(1..)?)
}

pub fn record_blocks() -> std::ops::Range<Vec<u8>> {
    vec![RECORD_BLOCK]..vec![RECORD_BLOCK + 1]
}

pub fn event_blocks() -> std::ops::Range<Vec<u8>> {
    vec![EVENT_BLOCK]..vec![EVENT_BLOCK + 1]
}

pub fn symbols() -> std::ops::Range<Vec<u8>> {
    vec![SYMBOL]..vec![SYMBOL + 1]
}

pub fn run_headers() -> std::ops::Range<Vec<u8>> {
    vec![RUN_HEADER]..vec![RUN_HEADER + 1]
}

pub fn run_chunks() -> std::ops::Range<Vec<u8>> {
    vec![RUN_CHUNK]..vec![RUN_CHUNK + 1]
}

pub fn run_header(run: u64) -> Vec<u8> {
    tagged(RUN_HEADER, &run.to_be_bytes())
}

/// Part `k` of `total` of a run header too large for one value.
pub fn run_header_part(run: u64, total: u16, k: u16) -> Vec<u8> {
    let mut key = run_header(run);
    key.extend_from_slice(&total.to_be_bytes());
    key.extend_from_slice(&k.to_be_bytes());
    key
}

/// The run a header key belongs to, and for a part of a header, its (total, k).
pub fn run_of_header(key: &[u8]) -> Option<(u64, Option<(u16, u16)>)> {
    let run = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
    match key.len() {
        9 => Some((run, None)),
        13 => {
            let total = u16::from_be_bytes(key.get(9..11)?.try_into().ok()?);
            let k = u16::from_be_bytes(key.get(11..13)?.try_into().ok()?);
            Some((run, Some((total, k))))
        }
        _ => None,
    }
}

pub fn run_chunk(run: u64, n: u32) -> Vec<u8> {
    let mut key = tagged(RUN_CHUNK, &run.to_be_bytes());
    key.extend_from_slice(&n.to_be_bytes());
    key
}

pub fn run_of_chunk(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(1..9)?.try_into().ok()?))
}

pub fn id(id: &str) -> Vec<u8> {
    tagged(ID, id.as_bytes())
}

/// An index entry: `<tag> <value> 0x00 <stamp>`.
pub fn indexed(tag: u8, value: &str, stamp: Stamp) -> Vec<u8> {
    let mut key = indexed_prefix(tag, value);
    key.extend_from_slice(&stamp.bytes());
    key
}

/// What every index entry for `value` starts with.
pub fn indexed_prefix(tag: u8, value: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + value.len() + 16);
    key.push(tag);
    key.extend_from_slice(value.as_bytes());
    key.push(SEPARATOR);
    key
}

/// The stamp at the end of an index entry.
pub fn stamp_of_indexed(key: &[u8]) -> Option<Stamp> {
    Stamp::from_bytes(key.get(key.len().checked_sub(16)?..)?)
}

pub fn symbol(n: u32) -> Vec<u8> {
    tagged(SYMBOL, &n.to_be_bytes())
}

pub fn symbol_number(key: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(key.get(1..5)?.try_into().ok()?))
}

pub fn meta(name: &str) -> Vec<u8> {
    tagged(META, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_sort_in_time_then_sequence_order_as_bytes() {
        let early = Stamp { ms: 1_000, seq: 9 };
        let late = Stamp {
            ms: 1_000_000,
            seq: 1,
        };
        let same_ms_later = Stamp {
            ms: 1_000_000,
            seq: 2,
        };
        assert!(early.bytes() < late.bytes() && late.bytes() < same_ms_later.bytes());
        assert_eq!(Stamp::from_bytes(&late.bytes()), Some(late));
        assert!(late.successor() > late && late.successor() <= same_ms_later);
    }

    #[test]
    fn index_entries_of_one_value_share_a_prefix_and_end_in_their_stamp() {
        let stamp = Stamp { ms: 5, seq: 6 };
        let key = indexed(NUMBER, "+4670", stamp);
        assert!(key.starts_with(&indexed_prefix(NUMBER, "+4670")));
        assert!(!indexed(NUMBER, "+46701", stamp).starts_with(&indexed_prefix(NUMBER, "+4670")));
        assert_eq!(stamp_of_indexed(&key), Some(stamp));
    }
}
