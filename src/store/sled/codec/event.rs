//! Raw events as the event log keeps them, and write-ahead-log batches.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    block::{compress_wal, decompress},
    corrupt,
    decision::CompactDecision,
    nanos, time, CodecError, Inline, Stamp, TextSource, COMPRESSED_WAL_FORMAT, ENTRY_FORMAT,
};
use crate::{decision::DecisionRecord, phone::NumberFacts};

/// One raw event as the event log keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub stamp: Stamp,
    pub received_at: DateTime<Utc>,
    pub app_key: String,
    pub event: String,
    pub id: String,
    /// The body as stored (valid UTF-8 JSON: it was parsed before it was accepted).
    pub body: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CompactEvent<'a> {
    ms: u64,
    seq: u64,
    pub(super) received_at: i64,
    #[serde(borrow)]
    app_key: Cow<'a, str>,
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    body: Cow<'a, str>,
}

impl<'a> CompactEvent<'a> {
    pub(super) fn of(e: &'a LoggedEvent) -> Self {
        Self {
            ms: e.stamp.ms,
            seq: e.stamp.seq,
            received_at: nanos(e.received_at),
            app_key: Cow::Borrowed(&e.app_key),
            event: Cow::Borrowed(&e.event),
            id: Cow::Borrowed(&e.id),
            body: Cow::Borrowed(&e.body),
        }
    }

    pub(super) fn logged(self) -> LoggedEvent {
        LoggedEvent {
            stamp: Stamp {
                ms: self.ms,
                seq: self.seq,
            },
            received_at: time(self.received_at),
            app_key: self.app_key.into_owned(),
            event: self.event.into_owned(),
            id: self.id.into_owned(),
            body: self.body.into_owned(),
        }
    }
}

pub fn encode_event(e: &LoggedEvent, out: &mut Vec<u8>) {
    let _ = postcard::to_io(&CompactEvent::of(e), &mut *out);
}

pub fn decode_event(bytes: &[u8]) -> Result<LoggedEvent, CodecError> {
    let e: CompactEvent<'_> = postcard::from_bytes(bytes)?;
    Ok(e.logged())
}

/// One accepted event as the write-ahead log keeps it: the raw event as the event log
/// will keep it, and everything else needed to apply it again after a crash (nothing that
/// is not stored anyway: no number in clear).
#[derive(Debug, Clone, PartialEq)]
pub struct WalEntry {
    pub event: LoggedEvent,
    pub discriminator: String,
    /// The number as stored, with its country and prefix.
    pub number: Option<(String, NumberFacts)>,
    pub decision: Option<DecisionRecord>,
}

type StoredNumberParts<'a> = (Cow<'a, str>, Option<Cow<'a, str>>, Option<Cow<'a, str>>);

#[derive(Debug, Serialize, Deserialize)]
struct CompactWalEntry<'a> {
    #[serde(borrow)]
    event: CompactEvent<'a>,
    #[serde(borrow)]
    discriminator: Cow<'a, str>,
    /// (stored number, country, prefix)
    #[serde(borrow)]
    number: Option<StoredNumberParts<'a>>,
    #[serde(borrow)]
    decision: Option<CompactDecision<'a>>,
}

/// Encodes a batch of entries as one write-ahead-log record payload.
pub fn encode_wal_batch(entries: &[WalEntry]) -> Vec<u8> {
    let answers: Vec<Option<String>> = entries
        .iter()
        .map(|e| e.decision.as_ref().map(|d| d.answer.to_string()))
        .collect();
    let compact: Vec<CompactWalEntry<'_>> = entries
        .iter()
        .zip(&answers)
        .map(|(e, answer)| {
            let number = e.number.as_ref().map(|(n, _)| n.as_str());
            let base = nanos(e.event.received_at);
            CompactWalEntry {
                event: CompactEvent::of(&e.event),
                discriminator: Cow::Borrowed(&e.discriminator),
                number: e.number.as_ref().map(|(n, facts)| {
                    (
                        Cow::Borrowed(n.as_str()),
                        facts.country.as_deref().map(Cow::Borrowed),
                        facts.prefix.as_deref().map(Cow::Borrowed),
                    )
                }),
                decision: e
                    .decision
                    .as_ref()
                    .zip(answer.as_deref())
                    .map(|(d, answer)| CompactDecision::of(d, answer, number, base, &mut Inline)),
            }
        })
        .collect();
    // A batch's events share most of their bytes (field names, app key, prices): zstd
    // writes a third of them, so the log between checkpoints takes that much less disk
    // and the commit thread that much less to write.
    let raw = postcard::to_allocvec(&compact).unwrap_or_default();
    let mut out = Vec::with_capacity(raw.len() / 2);
    out.push(COMPRESSED_WAL_FORMAT);
    compress_wal(&raw, &mut out);
    out
}

pub fn decode_wal_batch(payload: &[u8]) -> Result<Vec<WalEntry>, CodecError> {
    let decompressed;
    let raw = match payload.split_first() {
        // Written by verigate before log batches were compressed.
        Some((&ENTRY_FORMAT, rest)) => rest,
        Some((&COMPRESSED_WAL_FORMAT, rest)) => {
            decompressed = decompress(rest)?;
            decompressed.as_slice()
        }
        _ => return Err(corrupt("unknown log entry format")),
    };
    let compact: Vec<CompactWalEntry<'_>> = postcard::from_bytes(raw)?;
    let src = TextSource(None);
    compact
        .into_iter()
        .map(|e| {
            let number = e.number.as_ref().map(|(n, _, _)| n.as_ref());
            Ok(WalEntry {
                decision: e
                    .decision
                    .as_ref()
                    .map(|d| d.decision(number, e.event.received_at, src))
                    .transpose()?,
                event: e.event.logged(),
                discriminator: e.discriminator.into_owned(),
                number: e.number.map(|(n, country, prefix)| {
                    (
                        n.into_owned(),
                        NumberFacts {
                            country: country.map(Cow::into_owned),
                            prefix: prefix.map(Cow::into_owned),
                        },
                    )
                }),
            })
        })
        .collect()
}
