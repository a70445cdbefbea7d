//! The compact, versioned binary forms the sled engine writes: records, write-ahead-log
//! entries and raw-event blocks.
//!
//! Records are postcard (serde) behind a format byte. Strings drawn from a small set (rule
//! names, policy versions, answers, countries, statuses, the app key) are written once in
//! a symbol table and referred to by number; a counter key that is a prefix of the
//! number is written as its length. The fields stats read come first, so a stats scan
//! decodes only them ([`decode_stats`]). Write-ahead-log entries use the same forms with
//! every string inline, so a log segment can be read without the symbol table.
//!
//! Decoding never trusts its input: anything malformed is a [`CodecError`], never a panic
//! (fuzz/fuzz_targets/record_decode.rs checks that).

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::keys::Stamp;
use crate::{
    decision::{CounterReading, DecisionRecord, Explanation, QuarantineNote, ShadowMatch},
    events::{Action, Price, REQUEST_EVENT},
    phone::NumberFacts,
    store::{
        privacy::HASH_PREFIX, EventIdentity, FirstDelivery, RequestPart, ResultPart,
        SmsDeliveryPart, StatsRow, VerificationRecord,
    },
};

/// The first byte of every encoded record. A new layout gets a new number and a decoder
/// for the old one stays, so stores written by earlier versions keep reading.
const RECORD_FORMAT: u8 = 1;
/// The first byte of every write-ahead-log batch and event block.
const ENTRY_FORMAT: u8 = 1;
/// zstd level for event and record blocks: fast, and most of the ratio.
const ZSTD_LEVEL: i32 = 3;
/// Symbols are for strings from small sets; longer or rarer ones are written inline.
const MAX_SYMBOLS: usize = 1 << 20;
const MAX_SYMBOL_BYTES: usize = 200;
/// Largest decompressed block accepted (blocks are written far below this).
const MAX_BLOCK_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

impl From<postcard::Error> for CodecError {
    fn from(err: postcard::Error) -> Self {
        Self(format!("malformed value: {err}"))
    }
}

fn corrupt(what: impl Into<String>) -> CodecError {
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

// ---------------------------------------------------------------------------------------
// Symbols

/// Strings that encoded records refer to by number. Append-only: a number, once given,
/// always means the same string. `persisted` counts those already in the index.
#[derive(Debug, Default)]
pub struct Symbols {
    numbers: HashMap<Arc<str>, u32>,
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

    fn intern(&mut self, text: &str) -> Option<u32> {
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
struct TextSource<'s>(Option<&'s Symbols>);

impl<'s> TextSource<'s> {
    fn text<'a>(self, t: &'a Text<'a>) -> Result<&'a str, CodecError>
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

    fn string(self, t: &Text<'_>) -> Result<String, CodecError> {
        match t {
            Text::Inline(s) => Ok(s.to_string()),
            Text::Symbol(n) => self
                .0
                .and_then(|s| s.text(*n))
                .map(str::to_owned)
                .ok_or_else(|| corrupt(format!("unknown symbol {n}"))),
        }
    }

    fn opt(self, t: &Option<Text<'_>>) -> Result<Option<String>, CodecError> {
        t.as_ref().map(|t| self.string(t)).transpose()
    }
}

fn opt_str<'a>(
    src: TextSource<'a>,
    t: &'a Option<Text<'a>>,
) -> Result<Option<&'a str>, CodecError> {
    t.as_ref().map(|t| src.text(t)).transpose()
}

fn opt_text<'a>(sink: &mut impl TextSink, s: &'a Option<String>) -> Option<Text<'a>> {
    s.as_deref().map(|s| sink.text(s))
}

// ---------------------------------------------------------------------------------------
// Numbers and times

/// Counts are small integers: written as varints, anything else as the exact float.
#[derive(Debug, Serialize, Deserialize)]
enum Num {
    Int(i64),
    Float(f64),
}

impl Num {
    fn of(v: f64) -> Self {
        const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
        if v.fract() == 0.0 && v.abs() < EXACT && !(v == 0.0 && v.is_sign_negative()) {
            Self::Int(v as i64)
        } else {
            Self::Float(v)
        }
    }

    fn get(&self) -> f64 {
        match *self {
            Self::Int(i) => i as f64,
            Self::Float(f) => f,
        }
    }
}

fn nanos(at: DateTime<Utc>) -> i64 {
    at.timestamp_nanos_opt().unwrap_or(if at.timestamp() < 0 {
        i64::MIN
    } else {
        i64::MAX
    })
}

fn time(nanos: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos)
}

/// Times are written relative to a base (the record's creation): a few bytes each
/// instead of nine.
fn since(base: i64, at: DateTime<Utc>) -> i64 {
    nanos(at).saturating_sub(base)
}

fn after(base: i64, delta: i64) -> DateTime<Utc> {
    time(base.saturating_add(delta))
}

fn millis_time(ms: u64) -> Result<DateTime<Utc>, CodecError> {
    i64::try_from(ms)
        .ok()
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| corrupt("time out of range"))
}

// ---------------------------------------------------------------------------------------
// Decisions (shared by records and the write-ahead log)

#[derive(Debug, Serialize, Deserialize)]
struct CompactPrice<'a> {
    #[serde(borrow)]
    currency: Option<Text<'a>>,
    amount: Option<f64>,
}

impl<'a> CompactPrice<'a> {
    fn of(p: &'a Price, sink: &mut impl TextSink) -> Self {
        Self {
            currency: opt_text(sink, &p.currency_id),
            amount: p.amount,
        }
    }

    fn price(&self, src: TextSource<'_>) -> Result<Price, CodecError> {
        Ok(Price {
            currency_id: src.opt(&self.currency)?,
            amount: self.amount,
        })
    }
}

/// A counter key relative to the record: most keys are a prefix of the number (a range)
/// or the number itself.
#[derive(Debug, Serialize, Deserialize)]
enum CounterKey<'a> {
    NumberPrefix(u8),
    Text(#[serde(borrow)] Text<'a>),
}

impl<'a> CounterKey<'a> {
    fn of(key: &'a str, number: Option<&str>, sink: &mut impl TextSink) -> Self {
        match number {
            Some(n)
                if key.len() <= usize::from(u8::MAX) && !key.is_empty() && n.starts_with(key) =>
            {
                Self::NumberPrefix(key.len() as u8)
            }
            _ => Self::Text(sink.text(key)),
        }
    }

    fn key(&self, number: Option<&str>, src: TextSource<'_>) -> Result<String, CodecError> {
        match self {
            Self::NumberPrefix(len) => number
                .and_then(|n| n.get(..usize::from(*len)))
                .map(str::to_owned)
                .ok_or_else(|| corrupt("a counter key refers to a number the record lacks")),
            Self::Text(t) => src.string(t),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CompactCounter<'a> {
    #[serde(borrow)]
    rule: Text<'a>,
    #[serde(borrow)]
    condition: Text<'a>,
    #[serde(borrow)]
    key: CounterKey<'a>,
    value: Num,
    max: Num,
}

#[derive(Debug, Serialize, Deserialize)]
struct CompactQuarantine<'a> {
    #[serde(borrow)]
    rule: Text<'a>,
    #[serde(borrow)]
    key: CounterKey<'a>,
    until: Option<i64>,
    #[serde(borrow)]
    state: Text<'a>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CompactDecision<'a> {
    allow: bool,
    #[serde(borrow)]
    rule: Option<Text<'a>>,
    on_error: bool,
    #[serde(borrow)]
    reason: Text<'a>,
    #[serde(borrow)]
    policy_version: Text<'a>,
    decided_at: i64,
    /// The answer's JSON text.
    #[serde(borrow)]
    answer: Text<'a>,
    #[serde(borrow)]
    shadow: Vec<(Text<'a>, bool)>,
    #[serde(borrow)]
    country: Option<Text<'a>>,
    #[serde(borrow)]
    matched_prefix: Option<Text<'a>>,
    #[serde(borrow)]
    counters: Vec<CompactCounter<'a>>,
    #[serde(borrow)]
    quarantine: Option<CompactQuarantine<'a>>,
    #[serde(borrow)]
    explained_version: Text<'a>,
    eval_ns: u64,
}

fn action(allow: bool) -> Action {
    if allow {
        Action::Allow
    } else {
        Action::Deny
    }
}

impl<'a> CompactDecision<'a> {
    fn of(
        d: &'a DecisionRecord,
        answer: &'a str,
        number: Option<&str>,
        base: i64,
        sink: &mut impl TextSink,
    ) -> Self {
        let e = &d.explanation;
        Self {
            allow: d.action == Action::Allow,
            rule: opt_text(sink, &d.rule),
            on_error: d.on_error,
            reason: sink.text(&d.reason),
            policy_version: sink.text(&d.policy_version),
            decided_at: since(base, d.decided_at),
            answer: sink.text(answer),
            shadow: e
                .shadow
                .iter()
                .map(|m| (sink.text(&m.rule), m.would == Action::Allow))
                .collect(),
            country: opt_text(sink, &e.country),
            matched_prefix: opt_text(sink, &e.matched_prefix),
            counters: e
                .counters
                .iter()
                .map(|c| CompactCounter {
                    rule: sink.text(&c.rule),
                    condition: sink.text(&c.condition),
                    key: CounterKey::of(&c.key, number, sink),
                    value: Num::of(c.value),
                    max: Num::of(c.max),
                })
                .collect(),
            quarantine: e.quarantine.as_ref().map(|q| CompactQuarantine {
                rule: sink.text(&q.rule),
                key: CounterKey::of(&q.key, number, sink),
                until: q.until.map(|u| since(base, u)),
                state: sink.text(&q.state),
            }),
            explained_version: sink.text(&e.policy_version),
            eval_ns: e.eval_ns,
        }
    }

    fn decision(
        &self,
        number: Option<&str>,
        base: i64,
        src: TextSource<'_>,
    ) -> Result<DecisionRecord, CodecError> {
        let answer = serde_json::from_str(src.text(&self.answer)?)
            .map_err(|e| corrupt(format!("a stored answer is not JSON: {e}")))?;
        Ok(DecisionRecord {
            action: action(self.allow),
            rule: src.opt(&self.rule)?,
            reason: src.string(&self.reason)?,
            on_error: self.on_error,
            policy_version: src.string(&self.policy_version)?,
            decided_at: after(base, self.decided_at),
            answer,
            explanation: Explanation {
                shadow: self
                    .shadow
                    .iter()
                    .map(|(rule, allow)| {
                        Ok(ShadowMatch {
                            rule: src.string(rule)?,
                            would: action(*allow),
                        })
                    })
                    .collect::<Result<_, CodecError>>()?,
                country: src.opt(&self.country)?,
                matched_prefix: src.opt(&self.matched_prefix)?,
                counters: self
                    .counters
                    .iter()
                    .map(|c| {
                        Ok(CounterReading {
                            rule: src.string(&c.rule)?,
                            condition: src.string(&c.condition)?,
                            key: c.key.key(number, src)?,
                            value: c.value.get(),
                            max: c.max.get(),
                        })
                    })
                    .collect::<Result<_, CodecError>>()?,
                quarantine: self
                    .quarantine
                    .as_ref()
                    .map(|q| {
                        Ok::<_, CodecError>(QuarantineNote {
                            rule: src.string(&q.rule)?,
                            key: q.key.key(number, src)?,
                            until: q.until.map(|u| after(base, u)),
                            state: src.string(&q.state)?,
                        })
                    })
                    .transpose()?,
                policy_version: src.string(&self.explained_version)?,
                eval_ns: self.eval_ns,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------
// Records

/// What stats read, first in every record.
#[derive(Debug, Serialize, Deserialize)]
struct Head<'a> {
    first_seen_ms: u64,
    seq: u64,
    #[serde(borrow)]
    country: Option<Text<'a>>,
    #[serde(borrow)]
    method: Option<Text<'a>>,
    #[serde(borrow)]
    status: Option<Text<'a>>,
    requested: bool,
    /// (allow, rule, on_error)
    #[serde(borrow)]
    decision: Option<(bool, Option<Text<'a>>, bool)>,
    #[serde(borrow)]
    price: Option<CompactPrice<'a>>,
}

/// A prefix of a number: its first `n` bytes, or a string of its own (hashed numbers).
#[derive(Debug, Serialize, Deserialize)]
enum Prefix<'a> {
    OfNumber(u8),
    Text(#[serde(borrow)] Text<'a>),
}

#[derive(Debug, Serialize, Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    app_key: Text<'a>,
    #[serde(borrow)]
    number: Option<Cow<'a, str>>,
    #[serde(borrow)]
    prefix: Option<Prefix<'a>>,
    #[serde(borrow)]
    reference: Option<Cow<'a, str>>,
    #[serde(borrow)]
    custom: Option<Cow<'a, str>>,
    updated_at: i64,
    /// (received_at, rate, accept_language); the price is in the head.
    #[serde(borrow)]
    request: Option<(i64, Option<CompactPrice<'a>>, Option<Vec<Text<'a>>>)>,
    #[serde(borrow)]
    decision: Option<CompactDecision<'a>>,
    /// (result, received_at)
    #[serde(borrow)]
    sms_delivery: Option<(Text<'a>, i64)>,
    /// (reason, source, received_at); the status is in the head.
    #[serde(borrow)]
    result: Option<(Option<Text<'a>>, Option<Text<'a>>, i64)>,
    event_count: u32,
    /// (event type, discriminator, seq)
    #[serde(borrow)]
    accepted: Vec<(Text<'a>, Text<'a>, u64)>,
}

/// Appends the encoded record to `out`.
pub fn encode_record(v: &StoredVerification, sink: &mut impl TextSink, out: &mut Vec<u8>) {
    let r = &v.record;
    let answers: Option<String> = r.decision.as_ref().map(|d| d.answer.to_string());
    let number = r.number.as_deref();
    let base = nanos(r.first_seen);
    let head = Head {
        first_seen_ms: Stamp::new(r.first_seen, r.seq).ms,
        seq: r.seq,
        country: opt_text(sink, &r.country),
        method: opt_text(sink, &r.method),
        status: r.result.as_ref().map(|x| sink.text(&x.status)),
        requested: r.request.is_some(),
        decision: r.decision.as_ref().map(|d| {
            (
                d.action == Action::Allow,
                opt_text(sink, &d.rule),
                d.on_error,
            )
        }),
        price: r
            .request
            .as_ref()
            .and_then(|q| q.price.as_ref())
            .map(|p| CompactPrice::of(p, sink)),
    };
    let prefix = r.prefix.as_deref().map(|p| match number {
        Some(n) if p.len() <= usize::from(u8::MAX) && n.starts_with(p) => {
            Prefix::OfNumber(p.len() as u8)
        }
        _ => Prefix::Text(sink.text(p)),
    });
    let body = Body {
        id: Cow::Borrowed(&r.id),
        app_key: sink.text(&r.app_key),
        number: number.map(Cow::Borrowed),
        prefix,
        reference: r.reference.as_deref().map(Cow::Borrowed),
        custom: r.custom.as_deref().map(Cow::Borrowed),
        updated_at: since(base, r.updated_at),
        request: r.request.as_ref().map(|q| {
            (
                since(base, q.received_at),
                q.rate.as_ref().map(|p| CompactPrice::of(p, sink)),
                q.accept_language
                    .as_ref()
                    .map(|langs| langs.iter().map(|l| sink.text(l)).collect()),
            )
        }),
        decision: r
            .decision
            .as_ref()
            .zip(answers.as_deref())
            .map(|(d, answer)| CompactDecision::of(d, answer, number, base, sink)),
        sms_delivery: r
            .sms_delivery
            .as_ref()
            .map(|s| (sink.text(&s.result), since(base, s.received_at))),
        result: r.result.as_ref().map(|x| {
            (
                opt_text(sink, &x.reason),
                opt_text(sink, &x.source),
                since(base, x.received_at),
            )
        }),
        event_count: r.event_count,
        accepted: v
            .accepted
            .iter()
            .map(|a| (sink.text(&a.event), sink.text(&a.discriminator), a.seq))
            .collect(),
    };
    out.push(RECORD_FORMAT);
    // Serialising plain structs into a Vec cannot fail.
    let _ = postcard::to_io(&head, &mut *out);
    let _ = postcard::to_io(&body, &mut *out);
}

fn record_parts(bytes: &[u8]) -> Result<(Head<'_>, &[u8]), CodecError> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT, rest)) => Ok(postcard::take_from_bytes::<Head<'_>>(rest)?),
        Some((format, _)) => Err(corrupt(format!("unknown record format {format}"))),
        None => Err(corrupt("an empty record")),
    }
}

/// The stamp of an encoded record, read from its first fields.
pub fn record_stamp(bytes: &[u8]) -> Result<Stamp, CodecError> {
    let (head, _) = record_parts(bytes)?;
    Ok(Stamp {
        ms: head.first_seen_ms,
        seq: head.seq,
    })
}

pub fn decode_record(
    bytes: &[u8],
    symbols: Option<&Symbols>,
) -> Result<StoredVerification, CodecError> {
    let src = TextSource(symbols);
    let (head, rest) = record_parts(bytes)?;
    let body: Body<'_> = postcard::from_bytes(rest)?;
    let number = body.number.as_deref();
    let first_seen = millis_time(head.first_seen_ms)?;
    let base = nanos(first_seen);
    let prefix = match &body.prefix {
        None => None,
        Some(Prefix::OfNumber(len)) => Some(
            number
                .and_then(|n| n.get(..usize::from(*len)))
                .ok_or_else(|| corrupt("a prefix refers to a number the record lacks"))?
                .to_owned(),
        ),
        Some(Prefix::Text(t)) => Some(src.string(t)?),
    };
    let request = match &body.request {
        None => None,
        Some((received, rate, langs)) => Some(RequestPart {
            received_at: after(base, *received),
            price: head.price.as_ref().map(|p| p.price(src)).transpose()?,
            rate: rate.as_ref().map(|p| p.price(src)).transpose()?,
            accept_language: langs
                .as_ref()
                .map(|l| l.iter().map(|t| src.string(t)).collect::<Result<_, _>>())
                .transpose()?,
        }),
    };
    let result = match (&head.status, &body.result) {
        (Some(status), Some((reason, source, received))) => Some(ResultPart {
            status: src.string(status)?,
            reason: src.opt(reason)?,
            source: src.opt(source)?,
            received_at: after(base, *received),
        }),
        (None, None) => None,
        _ => return Err(corrupt("a result without its status")),
    };
    let record = VerificationRecord {
        id: body.id.to_string(),
        seq: head.seq,
        app_key: src.string(&body.app_key)?,
        number: number.map(str::to_owned),
        country: src.opt(&head.country)?,
        prefix,
        method: src.opt(&head.method)?,
        reference: body.reference.as_deref().map(str::to_owned),
        custom: body.custom.as_deref().map(str::to_owned),
        first_seen,
        updated_at: after(base, body.updated_at),
        request,
        decision: body
            .decision
            .as_ref()
            .map(|d| d.decision(number, base, src))
            .transpose()?,
        sms_delivery: body
            .sms_delivery
            .as_ref()
            .map(|(result, at)| {
                Ok::<_, CodecError>(SmsDeliveryPart {
                    result: src.string(result)?,
                    received_at: after(base, *at),
                })
            })
            .transpose()?,
        result,
        event_count: body.event_count,
    };
    let accepted = body
        .accepted
        .iter()
        .map(|(event, discriminator, seq)| {
            Ok(Accepted {
                event: src.string(event)?,
                discriminator: src.string(discriminator)?,
                seq: *seq,
            })
        })
        .collect::<Result<_, CodecError>>()?;
    Ok(StoredVerification { record, accepted })
}

/// Feeds the fields stats read of an encoded record to `f`, without decoding the rest.
pub fn with_stats_row<T>(
    bytes: &[u8],
    symbols: &Symbols,
    f: impl FnOnce(&StatsRow<'_>) -> T,
) -> Result<T, CodecError> {
    let src = TextSource(Some(symbols));
    let (head, _) = record_parts(bytes)?;
    let text = |t| opt_str(src, t);
    let rule = match &head.decision {
        Some((_, rule, _)) => text(rule)?,
        None => None,
    };
    let price = match &head.price {
        Some(p) => text(&p.currency)?.zip(p.amount),
        None => None,
    };
    let row = StatsRow {
        first_seen: millis_time(head.first_seen_ms)?,
        country: text(&head.country)?,
        method: text(&head.method)?,
        requested: head.requested,
        decision: head
            .decision
            .as_ref()
            .map(|(allow, _, on_error)| (action(*allow), rule, *on_error)),
        price,
        status: text(&head.status)?,
    };
    Ok(f(&row))
}

// ---------------------------------------------------------------------------------------
// Blocks

/// Compresses encoded items (records or events) into one block.
pub fn encode_block<'a>(items: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut raw = Vec::new();
    for item in items {
        let _ = postcard::to_io(&item.len(), &mut raw);
        raw.extend_from_slice(item);
    }
    let mut out = vec![ENTRY_FORMAT];
    // Compressing an in-memory buffer into a Vec only fails on allocation failure.
    out.extend(zstd::bulk::compress(&raw, ZSTD_LEVEL).unwrap_or_default());
    out
}

/// The items of a block, in the order they were written.
pub fn decode_block(block: &[u8]) -> Result<Vec<Vec<u8>>, CodecError> {
    let Some((&ENTRY_FORMAT, compressed)) = block.split_first() else {
        return Err(corrupt("unknown block format"));
    };
    let raw = zstd::bulk::decompress(compressed, MAX_BLOCK_BYTES)
        .map_err(|e| corrupt(format!("a block does not decompress: {e}")))?;
    let mut items = Vec::new();
    let mut rest = raw.as_slice();
    while !rest.is_empty() {
        let (len, after): (usize, &[u8]) = postcard::take_from_bytes(rest)?;
        let item = after
            .get(..len)
            .ok_or_else(|| corrupt("a block item runs past its block"))?;
        items.push(item.to_vec());
        rest = &after[len..];
    }
    Ok(items)
}

// ---------------------------------------------------------------------------------------
// Raw events

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
struct CompactEvent<'a> {
    ms: u64,
    seq: u64,
    received_at: i64,
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
    fn of(e: &'a LoggedEvent) -> Self {
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

    fn logged(self) -> LoggedEvent {
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

// ---------------------------------------------------------------------------------------
// Write-ahead log

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
    let mut out = vec![ENTRY_FORMAT];
    let _ = postcard::to_io(&compact, &mut out);
    out
}

pub fn decode_wal_batch(payload: &[u8]) -> Result<Vec<WalEntry>, CodecError> {
    let Some((&ENTRY_FORMAT, rest)) = payload.split_first() else {
        return Err(corrupt("unknown log entry format"));
    };
    let compact: Vec<CompactWalEntry<'_>> = postcard::from_bytes(rest)?;
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

#[cfg(test)]
mod tests;
