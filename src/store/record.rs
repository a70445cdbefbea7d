//! `VerificationRecord`: everything known about one verification, joined from its events.
//!
//! Events may arrive in any order (a result before its request, an SMS receipt after the
//! result) or alone, so [`VerificationRecord::apply`] is a merge that gives the same record
//! whatever the arrival order, except where a later final status supersedes an earlier one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::stats::{country_label, rule_label, status_label, StatsRow};
use crate::{
    decision::DecisionRecord,
    events::{Price, VerificationEvent},
    phone::NumberFacts,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VerificationRecord {
    pub id: String,
    /// Creation order; with `first_seen` it places the record in the time index.
    pub seq: u64,
    /// The Sinch application whose key signed the first event.
    pub app_key: String,
    /// E.164, or `hmac-sha256:<hex>` when the store keeps only keyed hashes of numbers.
    pub number: Option<String>,
    /// ISO 3166-1 alpha-2 of the number, when it belongs to a territory.
    pub country: Option<String>,
    /// `+`, calling code and three digits (kept even when the number is hashed).
    pub prefix: Option<String>,
    pub method: Option<String>,
    pub reference: Option<String>,
    pub custom: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub request: Option<RequestPart>,
    pub decision: Option<DecisionRecord>,
    pub sms_delivery: Option<SmsDeliveryPart>,
    pub result: Option<ResultPart>,
    /// Accepted events for this id (duplicates excluded).
    pub event_count: u32,
}

/// Where and when an event is recorded.
#[derive(Debug, Clone, Copy)]
pub struct RecordStamp<'a> {
    pub app_key: &'a str,
    /// The write's sequence number (a new record keeps it as its creation order).
    pub seq: u64,
    /// Non-decreasing write time: a new record's `first_seen`.
    pub ordered_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RequestPart {
    pub received_at: DateTime<Utc>,
    pub price: Option<Price>,
    pub rate: Option<Price>,
    pub accept_language: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SmsDeliveryPart {
    pub result: String,
    pub received_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResultPart {
    pub status: String,
    pub reason: Option<String>,
    pub source: Option<String>,
    pub received_at: DateTime<Utc>,
}

impl ResultPart {
    fn is_final(&self) -> bool {
        self.status != "PENDING"
    }
}

impl VerificationRecord {
    fn empty(id: &str, seq: u64, app_key: &str, at: DateTime<Utc>) -> Self {
        Self {
            id: id.to_owned(),
            seq,
            app_key: app_key.to_owned(),
            number: None,
            country: None,
            prefix: None,
            method: None,
            reference: None,
            custom: None,
            first_seen: at,
            updated_at: at,
            request: None,
            decision: None,
            sms_delivery: None,
            result: None,
            event_count: 0,
        }
    }

    /// Merges one accepted event (and the decision taken for it) into the record. A new
    /// record is placed at `(ordered_at, seq)`; `number` is the event's number as it is to
    /// be stored, with its facts.
    pub fn apply(
        existing: Option<Self>,
        event: &VerificationEvent,
        stamp: RecordStamp<'_>,
        number: Option<(&str, &NumberFacts)>,
        decision: Option<&DecisionRecord>,
    ) -> Self {
        let RecordStamp {
            app_key,
            seq,
            ordered_at,
            received_at,
        } = stamp;
        let mut record =
            existing.unwrap_or_else(|| Self::empty(event.id(), seq, app_key, ordered_at));
        record.event_count = record.event_count.saturating_add(1);
        record.updated_at = record.updated_at.max(received_at);
        if record.number.is_none() {
            if let Some((stored, facts)) = number {
                record.number = Some(stored.to_owned());
                record.country.clone_from(&facts.country);
                record.prefix.clone_from(&facts.prefix);
            }
        }
        fill(&mut record.method, event.method().map(|m| m.as_str()));
        fill(&mut record.reference, event.reference());
        match event {
            VerificationEvent::Request(e) => {
                fill(&mut record.custom, e.custom.as_deref());
                record.request = Some(RequestPart {
                    received_at,
                    price: e.price.clone(),
                    rate: e.rate.clone(),
                    accept_language: e.accept_language.clone(),
                });
                if let Some(d) = decision {
                    record.decision = Some(d.clone());
                }
            }
            VerificationEvent::Result(e) => {
                fill(&mut record.custom, e.custom.as_deref());
                let incoming = ResultPart {
                    status: e.status.clone(),
                    reason: e.reason.clone(),
                    source: e.source.clone(),
                    received_at,
                };
                // A late PENDING never hides a final status that already arrived.
                let keep_existing = record
                    .result
                    .as_ref()
                    .is_some_and(|r| r.is_final() && !incoming.is_final());
                if !keep_existing {
                    record.result = Some(incoming);
                }
            }
            VerificationEvent::SmsDelivered(e) => {
                fill(&mut record.custom, e.custom.as_deref());
                record.sms_delivery = Some(SmsDeliveryPart {
                    result: e.sms_result.clone(),
                    received_at,
                });
            }
            VerificationEvent::Unknown { .. } => {}
        }
        record
    }
}

impl VerificationRecord {
    /// The verification's latest status, `PENDING`, or `NONE` before any result.
    pub fn status_label(&self) -> &str {
        status_label(self.result.as_ref().map(|r| r.status.as_str()))
    }

    /// The number's country, or `unknown`.
    pub fn country_label(&self) -> &str {
        country_label(self.country.as_deref())
    }

    /// The deciding rule: a rule name, `default`, `on_error`, or `none` (no request seen).
    pub fn rule_label(&self) -> &str {
        rule_label(
            self.decision
                .as_ref()
                .map(|d| (d.on_error, d.rule.as_deref())),
        )
    }

    /// What stats count of this verification.
    pub fn stats_row(&self) -> StatsRow<'_> {
        let price = self.request.as_ref().and_then(|r| r.price.as_ref());
        StatsRow {
            first_seen: self.first_seen,
            country: self.country.as_deref(),
            method: self.method.as_deref(),
            requested: self.request.is_some(),
            decision: self
                .decision
                .as_ref()
                .map(|d| (d.action, d.rule.as_deref(), d.on_error)),
            price: price.and_then(|p| p.currency_id.as_deref().zip(p.amount)),
            status: self.result.as_ref().map(|r| r.status.as_str()),
        }
    }
}

/// Sets a field the first time a value for it is seen; later events do not rewrite it.
fn fill(slot: &mut Option<String>, value: Option<&str>) {
    if slot.is_none() {
        *slot = value.filter(|v| !v.is_empty()).map(str::to_owned);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event(json: &str) -> VerificationEvent {
        VerificationEvent::parse(json.as_bytes()).unwrap()
    }

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    const REQUEST: &str = r#"{"id":"v","event":"VerificationRequestEvent","method":"sms","identity":{"type":"number","endpoint":"+46700000001"},"reference":"ref-1","price":{"amount":0.05,"currencyId":"EUR"}}"#;
    const PENDING: &str =
        r#"{"id":"v","event":"VerificationResultEvent","method":"sms","status":"PENDING"}"#;
    const SUCCESS: &str = r#"{"id":"v","event":"VerificationResultEvent","method":"sms","identity":{"type":"number","endpoint":"+46700000001"},"status":"SUCCESSFUL","source":"manual"}"#;
    const DELIVERED: &str =
        r#"{"id":"v","event":"VerificationSmsDeliveredEvent","smsResult":"Successful"}"#;

    fn fold(events: &[(&str, i64)]) -> VerificationRecord {
        events
            .iter()
            .enumerate()
            .fold(None, |rec, (seq, (json, at))| {
                let event = event(json);
                let facts = event.number().map(crate::phone::facts);
                let number = event.number().zip(facts.as_ref());
                let stamp = RecordStamp {
                    app_key: "app",
                    seq: seq as u64,
                    ordered_at: t(*at),
                    received_at: t(*at),
                };
                Some(VerificationRecord::apply(rec, &event, stamp, number, None))
            })
            .unwrap()
    }

    #[test]
    fn request_result_and_delivery_join_into_one_record() {
        let r = fold(&[(REQUEST, 0), (DELIVERED, 2), (SUCCESS, 30)]);
        assert_eq!(r.number.as_deref(), Some("+46700000001"));
        assert_eq!(r.country.as_deref(), Some("SE"));
        assert_eq!(r.prefix.as_deref(), Some("+46700"));
        assert_eq!(r.reference.as_deref(), Some("ref-1"));
        assert_eq!(r.method.as_deref(), Some("sms"));
        assert_eq!(
            r.request.as_ref().unwrap().price.as_ref().unwrap().amount,
            Some(0.05)
        );
        assert_eq!(r.sms_delivery.as_ref().unwrap().result, "Successful");
        assert_eq!(r.result.as_ref().unwrap().status, "SUCCESSFUL");
        assert_eq!(
            (r.first_seen, r.updated_at, r.event_count),
            (t(0), t(30), 3)
        );
    }

    #[test]
    fn arrival_order_does_not_change_the_joined_facts() {
        let in_order = fold(&[(REQUEST, 0), (PENDING, 1), (SUCCESS, 2)]);
        let shuffled = fold(&[(SUCCESS, 0), (REQUEST, 1), (PENDING, 2)]);
        assert_eq!(
            in_order.result.unwrap().status,
            shuffled.result.unwrap().status
        );
        assert_eq!(in_order.number, shuffled.number);
        assert_eq!(in_order.reference, shuffled.reference);
    }

    #[test]
    fn a_result_without_request_still_makes_a_record() {
        let r = fold(&[(PENDING, 5)]);
        assert!(r.request.is_none() && r.number.is_none());
        assert_eq!(r.result.unwrap().status, "PENDING");
    }
}
