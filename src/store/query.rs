//! Queries as data: what a caller asks a store for, in plain values an engine can turn
//! into its own reads (a key range, an index lookup, a SQL `WHERE`).

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, Utc};

use super::{stats::GroupBy, StoreError, VerificationRecord};

/// A position in a listing, opaque to clients; each engine decides what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub Vec<u8>);

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.0)
    }

    pub fn decode(text: &str) -> Result<Self, StoreError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| StoreError::BadCursor)?;
        if bytes.is_empty() {
            return Err(StoreError::BadCursor);
        }
        Ok(Self(bytes))
    }
}

/// One page of a listing; `next` is set when more may follow.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

/// What verifications can be filtered on besides time. An engine answers `number` and
/// `reference` from indexes; the rest it checks on each record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerificationFilter {
    pub number: Option<String>,
    pub reference: Option<String>,
    pub status: Option<String>,
    pub method: Option<String>,
    pub country: Option<String>,
    pub action: Option<&'static str>,
    pub rule: Option<String>,
}

impl VerificationFilter {
    /// Whether a record passes every condition (`number` in the form the store keeps).
    pub fn matches(&self, record: &VerificationRecord) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref()
                .is_none_or(|w| have.is_some_and(|h| h.eq_ignore_ascii_case(w)))
        };
        self.number
            .as_deref()
            .is_none_or(|n| record.number.as_deref() == Some(n))
            && eq(&self.reference, record.reference.as_deref())
            && eq(&self.status, Some(record.status_label()))
            && eq(&self.method, record.method.as_deref())
            && eq(&self.country, Some(record.country_label()))
            && self.action.is_none_or(|a| {
                record
                    .decision
                    .as_ref()
                    .is_some_and(|d| d.action.as_str() == a)
            })
            && eq(&self.rule, Some(record.rule_label()))
    }

    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Verifications first seen in `[since, until)` that match `filter`, after `after`.
#[derive(Debug, Clone)]
pub struct VerificationQuery {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub filter: VerificationFilter,
    pub after: Option<Cursor>,
    /// At most this many items in the page.
    pub limit: usize,
    /// Records an engine may examine looking for matches before it returns a short page
    /// (with a cursor), so a sparse filter over a long range never means a long wait.
    pub scan_budget: usize,
}

impl VerificationQuery {
    /// Every verification first seen in `[since, until)`, `limit` at a time.
    pub fn between(since: DateTime<Utc>, until: DateTime<Utc>, limit: usize) -> Self {
        Self {
            since,
            until,
            filter: VerificationFilter::default(),
            after: None,
            limit,
            scan_budget: usize::MAX,
        }
    }

    pub fn after(mut self, cursor: Option<Cursor>) -> Self {
        self.after = cursor;
        self
    }

    /// Whether a record's time is in range (engines check it on records from indexes).
    pub fn in_range(&self, record: &VerificationRecord) -> bool {
        record.first_seen >= self.since && record.first_seen < self.until
    }
}

/// Raw events received in `[since, until)`, after `after`.
#[derive(Debug, Clone)]
pub struct EventQuery {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub after: Option<Cursor>,
    pub limit: usize,
}

/// Counts over verifications first seen in `[since, until)`, grouped.
#[derive(Debug, Clone)]
pub struct StatsQuery {
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub group_by: Vec<GroupBy>,
}
