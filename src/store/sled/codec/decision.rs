//! Decisions as records and the write-ahead log keep them: texts by symbol or inline,
//! counter keys relative to the number, times relative to a base.

use serde::{Deserialize, Serialize};

use super::{after, corrupt, opt_text, since, CodecError, Num, Text, TextSink, TextSource};
use crate::{
    decision::{CounterReading, DecisionRecord, Explanation, QuarantineNote, ShadowMatch},
    events::{Action, Price},
};

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CompactPrice<'a> {
    #[serde(borrow)]
    pub(super) currency: Option<Text<'a>>,
    pub(super) amount: Option<f64>,
}

impl<'a> CompactPrice<'a> {
    pub(super) fn of(p: &'a Price, sink: &mut impl TextSink) -> Self {
        Self {
            currency: opt_text(sink, &p.currency_id),
            amount: p.amount,
        }
    }

    pub(super) fn price(&self, src: TextSource<'_>) -> Result<Price, CodecError> {
        Ok(Price {
            currency_id: src.opt(&self.currency)?,
            amount: self.amount,
        })
    }
}

/// A counter key relative to the record: most keys are a prefix of the number (a range)
/// or the number itself.
#[derive(Debug, Serialize, Deserialize)]
pub(super) enum CounterKey<'a> {
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
pub(super) struct CompactCounter<'a> {
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
pub(super) struct CompactQuarantine<'a> {
    #[serde(borrow)]
    rule: Text<'a>,
    #[serde(borrow)]
    key: CounterKey<'a>,
    until: Option<i64>,
    #[serde(borrow)]
    state: Text<'a>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct CompactDecision<'a> {
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

pub(super) fn action(allow: bool) -> Action {
    if allow {
        Action::Allow
    } else {
        Action::Deny
    }
}

impl<'a> CompactDecision<'a> {
    pub(super) fn of(
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

    pub(super) fn decision(
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
