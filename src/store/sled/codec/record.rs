//! Records: the fields stats read first ([`with_stats_row`] decodes only those), then the
//! rest.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::Symbols;
use super::{
    after, corrupt,
    decision::{action, CompactDecision, CompactPrice},
    millis_time, nanos, opt_str, opt_text, since, Accepted, CodecError, Stamp, StoredVerification,
    Text, TextSink, TextSource, RECORD_FORMAT,
};
use crate::{
    events::Action,
    store::{RequestPart, ResultPart, SmsDeliveryPart, StatsRow, VerificationRecord},
};

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
