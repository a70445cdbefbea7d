//! The compact, versioned binary forms the sled engine writes: records, write-ahead-log
//! entries and raw-event blocks.
//!
//! Records are postcard (serde) behind a format byte. Strings drawn from a small set (rule
//! names, policy versions, answers, countries, statuses, the app key) are written once in
//! a symbol table and referred to by number; a counter key that is a prefix of the
//! number is written as its length. The fields stats read come first, so a stats scan
//! decodes only them ([`with_stats_row`]). Write-ahead-log entries use the same forms with
//! every string inline, so a log segment can be read without the symbol table.
//!
//! Decoding never trusts its input: anything malformed is a [`CodecError`], never a panic
//! (fuzz/fuzz_targets/record_decode.rs checks that).

mod block;
mod decision;
mod event;
mod record;

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use block::{decode_block, encode_block, Block};
pub use event::{
    decode_event, decode_wal_batch, encode_event, encode_wal_batch, LoggedEvent, WalEntry,
};
pub use record::{decode_record, encode_record, record_stamp, with_stats_row};

use super::keys::Stamp;
use crate::{
    events::REQUEST_EVENT,
    store::{privacy::HASH_PREFIX, EventIdentity, FirstDelivery, VerificationRecord},
};

/// The first byte of every encoded record. A new layout gets a new number and a decoder
/// for the old one stays, so stores written by earlier versions keep reading.
pub(super) const RECORD_FORMAT: u8 = 1;
/// The first byte of every event block (and of log batches written before they were
/// compressed).
pub(super) const ENTRY_FORMAT: u8 = 1;
/// The first byte of a write-ahead-log batch: a zstd frame of the batch's entries.
pub(super) const COMPRESSED_WAL_FORMAT: u8 = 2;
/// zstd level for event and record blocks: fast, and most of the ratio.
pub(super) const ZSTD_LEVEL: i32 = 3;
/// Symbols are for strings from small sets; longer or rarer ones are written inline.
const MAX_SYMBOLS: usize = 1 << 20;
const MAX_SYMBOL_BYTES: usize = 200;
/// Largest decompressed block accepted (blocks are written far below this).
pub(super) const MAX_BLOCK_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

impl From<postcard::Error> for CodecError {
    fn from(err: postcard::Error) -> Self {
        Self(format!("malformed value: {err}"))
    }
}

pub(super) fn corrupt(what: impl Into<String>) -> CodecError {
    CodecError(what.into())
}

/// A verification with the identities of the events it was built from (its duplicate
/// detection).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredVerification {
    pub record: VerificationRecord,
    pub accepted: Vec<Accepted>,
}

/// One accepted event of a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub event: String,
    pub discriminator: String,
    pub seq: u64,
}

impl StoredVerification {
    /// Where the record sits in the store's order: its creation.
    pub fn stamp(&self) -> Stamp {
        Stamp::new(self.record.first_seen, self.record.seq)
    }

    /// The answer the first delivery of `identity` got, if it was accepted.
    pub fn first_delivery(&self, identity: &EventIdentity) -> Option<FirstDelivery> {
        let accepted = self
            .accepted
            .iter()
            .find(|a| a.event == identity.event && a.discriminator == identity.discriminator)?;
        let answer = (accepted.event == REQUEST_EVENT)
            .then(|| self.record.decision.as_ref().map(|d| d.answer.clone()))
            .flatten();
        Some(FirstDelivery {
            seq: accepted.seq,
            answer,
        })
    }
}

/// Strings that encoded records refer to by number. Append-only: a number, once given,
/// always means the same string. `persisted` counts those already in the index.
#[derive(Debug, Default)]
pub struct Symbols {
    /// Looked up for every text of every record a checkpoint writes: a quick hash,
    /// seeded at random per process (as the memtable's maps are).
    numbers: HashMap<Arc<str>, u32, foldhash::fast::RandomState>,
    texts: Vec<Arc<str>>,
    persisted: usize,
}

impl Symbols {
    /// The table as stored: every number from 0 up, each once.
    pub fn load(entries: impl IntoIterator<Item = (u32, String)>) -> Result<Self, CodecError> {
        let mut symbols = Self::default();
        for (n, text) in entries {
            if n as usize != symbols.texts.len() {
                return Err(corrupt(format!("symbol {n} is out of sequence")));
            }
            let text: Arc<str> = text.into();
            symbols.numbers.insert(Arc::clone(&text), n);
            symbols.texts.push(text);
        }
        symbols.persisted = symbols.texts.len();
        Ok(symbols)
    }

    pub(super) fn intern(&mut self, text: &str) -> Option<u32> {
        if let Some(&n) = self.numbers.get(text) {
            return Some(n);
        }
        if text.len() > MAX_SYMBOL_BYTES
            || self.texts.len() >= MAX_SYMBOLS
            || text.starts_with(HASH_PREFIX)
        {
            return None;
        }
        let n = u32::try_from(self.texts.len()).ok()?;
        let text: Arc<str> = text.into();
        self.numbers.insert(Arc::clone(&text), n);
        self.texts.push(text);
        Some(n)
    }

    fn text(&self, n: u32) -> Option<&str> {
        self.texts.get(n as usize).map(|t| &**t)
    }

    /// Symbols given out since the last [`Symbols::mark_persisted`].
    pub fn unpersisted(&self) -> Vec<(u32, Arc<str>)> {
        (self.persisted..self.texts.len())
            .filter_map(|i| Some((u32::try_from(i).ok()?, Arc::clone(&self.texts[i]))))
            .collect()
    }

    pub fn mark_persisted(&mut self, upto: usize) {
        self.persisted = self.persisted.max(upto.min(self.texts.len()));
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }
}

/// A small table for fuzzing, so that symbol references sometimes resolve.
pub fn fuzzing_symbols() -> Symbols {
    Symbols::load(
        [
            "SE",
            "sms",
            "SUCCESSFUL",
            "EUR",
            "rule",
            "rate_limit",
            "{\"action\":\"allow\"}",
            "",
        ]
        .iter()
        .enumerate()
        .map(|(n, t)| (n as u32, (*t).to_owned())),
    )
    .unwrap_or_default()
}

/// How strings are written: by symbol where possible, or always inline.
pub trait TextSink {
    fn text<'a>(&mut self, s: &'a str) -> Text<'a>;
}

/// Every string inline (write-ahead log).
pub struct Inline;

impl TextSink for Inline {
    fn text<'a>(&mut self, s: &'a str) -> Text<'a> {
        Text::Inline(Cow::Borrowed(s))
    }
}

impl TextSink for Symbols {
    fn text<'a>(&mut self, s: &'a str) -> Text<'a> {
        match self.intern(s) {
            Some(n) => Text::Symbol(n),
            None => Text::Inline(Cow::Borrowed(s)),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Text<'a> {
    Symbol(u32),
    Inline(#[serde(borrow)] Cow<'a, str>),
}

/// Reads texts back; without a table, only inline texts can be read.
#[derive(Clone, Copy)]
pub(super) struct TextSource<'s>(pub(super) Option<&'s Symbols>);

impl<'s> TextSource<'s> {
    pub(super) fn text<'a>(self, t: &'a Text<'a>) -> Result<&'a str, CodecError>
    where
        's: 'a,
    {
        match t {
            Text::Inline(s) => Ok(s),
            Text::Symbol(n) => self
                .0
                .and_then(|s| s.text(*n))
                .ok_or_else(|| corrupt(format!("unknown symbol {n}"))),
        }
    }

    pub(super) fn string(self, t: &Text<'_>) -> Result<String, CodecError> {
        match t {
            Text::Inline(s) => Ok(s.to_string()),
            Text::Symbol(n) => self
                .0
                .and_then(|s| s.text(*n))
                .map(str::to_owned)
                .ok_or_else(|| corrupt(format!("unknown symbol {n}"))),
        }
    }

    pub(super) fn opt(self, t: &Option<Text<'_>>) -> Result<Option<String>, CodecError> {
        t.as_ref().map(|t| self.string(t)).transpose()
    }
}

pub(super) fn opt_str<'a>(
    src: TextSource<'a>,
    t: &'a Option<Text<'a>>,
) -> Result<Option<&'a str>, CodecError> {
    t.as_ref().map(|t| src.text(t)).transpose()
}

pub(super) fn opt_text<'a>(sink: &mut impl TextSink, s: &'a Option<String>) -> Option<Text<'a>> {
    s.as_deref().map(|s| sink.text(s))
}

/// Counts are small integers: written as varints, anything else as the exact float.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    pub(super) fn of(v: f64) -> Self {
        const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
        if v.fract() == 0.0 && v.abs() < EXACT && !(v == 0.0 && v.is_sign_negative()) {
            Self::Int(v as i64)
        } else {
            Self::Float(v)
        }
    }

    pub(super) fn get(&self) -> f64 {
        match *self {
            Self::Int(i) => i as f64,
            Self::Float(f) => f,
        }
    }
}

pub(super) fn nanos(at: DateTime<Utc>) -> i64 {
    at.timestamp_nanos_opt().unwrap_or(if at.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

pub(super) fn time(nanos: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos)
}

/// Times are written relative to a base (the record's creation): a few bytes each
/// instead of nine.
pub(super) fn since(base: i64, at: DateTime<Utc>) -> i64 {
    nanos(at).saturating_sub(base)
}

pub(super) fn after(base: i64, delta: i64) -> DateTime<Utc> {
    time(base.saturating_add(delta))
}

pub(super) fn millis_time(ms: u64) -> Result<DateTime<Utc>, CodecError> {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| corrupt("time out of range"))
}

#[cfg(test)]
mod tests;
