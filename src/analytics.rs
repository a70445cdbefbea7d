//! The read path's pure logic: query parameters, which records a filter keeps, stats
//! aggregation and the export formats. The HTTP layer and `verigate export` call these;
//! none of it touches the store or the network.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::VerificationRecord;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// A query parameter that could not be used; the message names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("query parameter `{name}`: {message}")]
pub struct ParamError {
    pub name: String,
    pub message: String,
}

fn param_error(name: &str, message: impl Into<String>) -> ParamError {
    ParamError {
        name: name.to_owned(),
        message: message.into(),
    }
}

/// Query parameters, checked against the names an endpoint accepts.
pub struct Params<'a> {
    values: &'a HashMap<String, String>,
}

impl<'a> Params<'a> {
    pub fn new(values: &'a HashMap<String, String>, accepted: &[&str]) -> Result<Self, ParamError> {
        if let Some(unknown) = values.keys().find(|k| !accepted.contains(&k.as_str())) {
            return Err(param_error(
                unknown,
                format!("unknown parameter; accepted: {}", accepted.join(", ")),
            ));
        }
        Ok(Self { values })
    }

    pub fn text(&self, name: &str) -> Result<Option<&'a str>, ParamError> {
        match self.values.get(name).map(String::as_str) {
            Some("") => Err(param_error(name, "must not be empty")),
            Some(v) if v.len() > 256 => Err(param_error(name, "is longer than 256 characters")),
            other => Ok(other),
        }
    }

    pub fn time(&self, name: &str) -> Result<Option<DateTime<Utc>>, ParamError> {
        self.text(name)?
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(|_| {
                        param_error(
                            name,
                            format!("`{v}` is not an RFC 3339 time, e.g. 2026-11-22T10:00:00Z"),
                        )
                    })
            })
            .transpose()
    }

    /// `[since, until)`, defaulting to everything; `since` must precede `until`.
    pub fn range(&self) -> Result<(DateTime<Utc>, DateTime<Utc>), ParamError> {
        let since = self.time("since")?.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
        let until = self.time("until")?.unwrap_or(DateTime::<Utc>::MAX_UTC);
        if since >= until {
            return Err(param_error("until", "must be later than `since`"));
        }
        Ok((since, until))
    }

    pub fn limit(&self) -> Result<usize, ParamError> {
        match self.text("limit")? {
            None => Ok(DEFAULT_LIMIT),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
                _ => Err(param_error(
                    "limit",
                    format!("must be a number from 1 to {MAX_LIMIT}"),
                )),
            },
        }
    }

    /// One of `allowed`, case-insensitive, returned as written in `allowed`.
    pub fn choice(
        &self,
        name: &str,
        allowed: &[&'static str],
    ) -> Result<Option<&'static str>, ParamError> {
        self.text(name)?
            .map(|v| {
                allowed
                    .iter()
                    .find(|a| a.eq_ignore_ascii_case(v))
                    .copied()
                    .ok_or_else(|| {
                        param_error(name, format!("`{v}` is not one of {}", allowed.join(", ")))
                    })
            })
            .transpose()
    }
}

/// What `GET /v1/verifications` can filter on besides time. `number` and `reference` are
/// answered from their indexes; the rest are checked on each record.
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

pub const LIST_PARAMS: &[&str] = &[
    "number",
    "reference",
    "status",
    "method",
    "country",
    "action",
    "rule",
    "since",
    "until",
    "limit",
    "cursor",
];

const STATUSES: &[&str] = &[
    "PENDING",
    "SUCCESSFUL",
    "FAIL",
    "DENIED",
    "ABORTED",
    "ERROR",
    "NONE",
];
const METHODS: &[&str] = &["sms", "flashcall", "callout", "whatsapp", "seamless"];

impl VerificationFilter {
    pub fn from_params(params: &Params<'_>) -> Result<Self, ParamError> {
        // An unencoded `+` arrives as a space: read ` 4670…` as `+4670…`.
        let number = params.text("number")?.map(|n| match n.strip_prefix(' ') {
            Some(rest) => format!("+{rest}"),
            None => n.to_owned(),
        });
        if let Some(n) = number.as_deref().filter(|n| !crate::phone::is_e164(n)) {
            return Err(param_error(
                "number",
                format!("`{n}` is not an E.164 number like +46700000000 (send `+` as %2B)"),
            ));
        }
        let country = params.text("country")?;
        let is_country = |c: &str| {
            c.eq_ignore_ascii_case("unknown")
                || (c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()))
        };
        if let Some(c) = country.filter(|c| !is_country(c)) {
            return Err(param_error(
                "country",
                format!("`{c}` is not an ISO 3166 alpha-2 code (or `unknown`)"),
            ));
        }
        Ok(Self {
            number,
            reference: params.text("reference")?.map(str::to_owned),
            status: params.choice("status", STATUSES)?.map(str::to_owned),
            method: params.choice("method", METHODS)?.map(str::to_owned),
            country: country.map(str::to_ascii_uppercase),
            action: params.choice("action", &["allow", "deny"])?,
            rule: params.text("rule")?.map(str::to_owned),
        })
    }

    /// Whether a record passes every condition. `stored_number` is `number` in the form
    /// the store keeps numbers (hashed or not). Number and reference are also answered by
    /// index lookups; checking them here keeps the filter complete on its own.
    pub fn matches(&self, record: &VerificationRecord, stored_number: Option<&str>) -> bool {
        let eq = |want: &Option<String>, have: Option<&str>| {
            want.as_deref()
                .is_none_or(|w| have.is_some_and(|h| h.eq_ignore_ascii_case(w)))
        };
        stored_number.is_none_or(|n| record.number.as_deref() == Some(n))
            && eq(&self.reference, record.reference.as_deref())
            && eq(&self.status, Some(status_of(record)))
            && eq(&self.method, record.method.as_deref())
            && eq(&self.country, Some(country_of(record)))
            && self.action.is_none_or(|a| {
                record
                    .decision
                    .as_ref()
                    .is_some_and(|d| d.action.as_str() == a)
            })
            && eq(&self.rule, Some(rule_of(record)))
    }
}

/// The verification's final status, `PENDING`, or `NONE` before any result.
pub fn status_of(record: &VerificationRecord) -> &str {
    status_label(record.result.as_ref().map(|r| r.status.as_str()))
}

pub fn country_of(record: &VerificationRecord) -> &str {
    country_label(record.country.as_deref())
}

/// The deciding rule: a rule name, `default`, `on_error`, or `none` (no request seen).
pub fn rule_of(record: &VerificationRecord) -> &str {
    rule_label(
        record
            .decision
            .as_ref()
            .map(|d| (d.on_error, d.rule.as_deref())),
    )
}

fn status_label(status: Option<&str>) -> &str {
    status.unwrap_or("NONE")
}

fn country_label(country: Option<&str>) -> &str {
    country.unwrap_or("unknown")
}

fn rule_label(decision: Option<(bool, Option<&str>)>) -> &str {
    match decision {
        None => "none",
        Some((true, _)) => "on_error",
        Some((false, rule)) => rule.unwrap_or("default"),
    }
}

/// The fields stats read, decoded straight from a stored record: everything else
/// (explanation, answer, custom, …) is skipped, which makes a stats scan several times
/// cheaper than decoding whole records.
#[derive(Debug, Deserialize)]
pub struct StatsFacts<'a> {
    #[serde(borrow, default)]
    country: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    first_seen: DateTime<Utc>,
    #[serde(default)]
    request: Option<RequestFacts>,
    #[serde(borrow, default)]
    decision: Option<DecisionFacts<'a>>,
    #[serde(borrow, default)]
    result: Option<ResultFacts<'a>>,
}

#[derive(Debug, Deserialize)]
struct RequestFacts {
    #[serde(default)]
    price: Option<crate::events::Price>,
}

#[derive(Debug, Deserialize)]
struct DecisionFacts<'a> {
    action: crate::events::Action,
    #[serde(borrow, default)]
    rule: Option<Cow<'a, str>>,
    #[serde(default)]
    on_error: bool,
}

#[derive(Debug, Deserialize)]
struct ResultFacts<'a> {
    #[serde(borrow)]
    status: Cow<'a, str>,
}

impl StatsFacts<'_> {
    fn status(&self) -> &str {
        status_label(self.result.as_ref().map(|r| r.status.as_ref()))
    }

    fn rule(&self) -> &str {
        rule_label(
            self.decision
                .as_ref()
                .map(|d| (d.on_error, d.rule.as_deref())),
        )
    }
}

/// Dimensions `GET /v1/stats` can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Country,
    Method,
    Day,
    Rule,
}

impl GroupBy {
    pub fn parse_list(params: &Params<'_>) -> Result<Vec<GroupBy>, ParamError> {
        let Some(list) = params.text("group_by")? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for part in list.split(',').map(str::trim) {
            let g = match part {
                "country" => GroupBy::Country,
                "method" => GroupBy::Method,
                "day" => GroupBy::Day,
                "rule" => GroupBy::Rule,
                other => {
                    return Err(param_error(
                        "group_by",
                        format!("`{other}` is not one of country, method, day, rule"),
                    ))
                }
            };
            if !out.contains(&g) {
                out.push(g);
            }
        }
        Ok(out)
    }

    fn name(self) -> &'static str {
        match self {
            GroupBy::Country => "country",
            GroupBy::Method => "method",
            GroupBy::Day => "day",
            GroupBy::Rule => "rule",
        }
    }

    fn value(self, facts: &StatsFacts<'_>) -> String {
        match self {
            GroupBy::Country => country_label(facts.country.as_deref()).to_owned(),
            GroupBy::Method => facts.method.as_deref().unwrap_or("unknown").to_owned(),
            GroupBy::Day => facts.first_seen.format("%Y-%m-%d").to_string(),
            GroupBy::Rule => facts.rule().to_owned(),
        }
    }
}

/// Counts for one group of verifications.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GroupStats {
    /// The group's values, by dimension name.
    pub group: BTreeMap<&'static str, String>,
    /// Verifications in the group (with or without a request event).
    pub verifications: u64,
    /// Request events received.
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    /// Verifications by final status (`NONE` before any result).
    pub results: BTreeMap<String, u64>,
    /// Allowed verifications that ended SUCCESSFUL.
    pub successful_allowed: u64,
    /// `successful_allowed / allowed`; null when nothing was allowed.
    pub conversion_rate: Option<f64>,
    /// Summed `price` of allowed requests, per currency (what Sinch charges).
    pub price: BTreeMap<String, f64>,
}

/// Aggregates records into groups; the result is sorted by group values.
#[derive(Debug, Default)]
pub struct StatsBuilder {
    group_by: Vec<GroupBy>,
    groups: HashMap<Vec<String>, GroupStats>,
}

impl StatsBuilder {
    pub fn new(group_by: Vec<GroupBy>) -> Self {
        Self {
            group_by,
            groups: HashMap::new(),
        }
    }

    /// Adds one stored record (its JSON bytes, as the store keeps it).
    pub fn add_stored(&mut self, stored: &[u8]) -> Result<(), serde_json::Error> {
        self.add(&serde_json::from_slice(stored)?);
        Ok(())
    }

    pub fn add(&mut self, facts: &StatsFacts<'_>) {
        let key: Vec<String> = self.group_by.iter().map(|g| g.value(facts)).collect();
        let group_by = &self.group_by;
        let stats = self
            .groups
            .entry(key.clone())
            .or_insert_with(|| GroupStats {
                group: group_by.iter().map(|g| g.name()).zip(key).collect(),
                ..GroupStats::default()
            });
        stats.verifications += 1;
        if facts.request.is_some() {
            stats.requests += 1;
        }
        *stats.results.entry(facts.status().to_owned()).or_default() += 1;
        match facts.decision.as_ref().map(|d| d.action) {
            Some(crate::events::Action::Allow) => {
                stats.allowed += 1;
                if facts.status() == "SUCCESSFUL" {
                    stats.successful_allowed += 1;
                }
                let price = facts.request.as_ref().and_then(|r| r.price.as_ref());
                if let Some((currency, amount)) =
                    price.and_then(|p| p.currency_id.clone().zip(p.amount))
                {
                    *stats.price.entry(currency).or_default() += amount;
                }
            }
            Some(crate::events::Action::Deny) => stats.denied += 1,
            None => {}
        }
    }

    pub fn finish(self) -> Vec<GroupStats> {
        let mut groups: Vec<(Vec<String>, GroupStats)> = self.groups.into_iter().collect();
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        groups
            .into_iter()
            .map(|(_, mut g)| {
                g.conversion_rate =
                    (g.allowed > 0).then(|| g.successful_allowed as f64 / g.allowed as f64);
                g
            })
            .collect()
    }
}

/// Columns of the CSV export, in order.
pub const CSV_COLUMNS: &[&str] = &[
    "id",
    "first_seen",
    "updated_at",
    "app_key",
    "number",
    "country",
    "prefix",
    "method",
    "reference",
    "custom",
    "request_received_at",
    "price_amount",
    "price_currency",
    "action",
    "rule",
    "on_error",
    "reason",
    "policy_version",
    "sms_result",
    "status",
    "status_reason",
    "status_source",
    "result_received_at",
    "event_count",
];

/// One CSV row, in [`CSV_COLUMNS`] order.
pub fn csv_row(r: &VerificationRecord) -> Vec<String> {
    let opt = |v: Option<&str>| v.unwrap_or_default().to_owned();
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
    let price = r.request.as_ref().and_then(|q| q.price.as_ref());
    let decision = r.decision.as_ref();
    let result = r.result.as_ref();
    vec![
        r.id.clone(),
        r.first_seen.to_rfc3339(),
        r.updated_at.to_rfc3339(),
        r.app_key.clone(),
        opt(r.number.as_deref()),
        opt(r.country.as_deref()),
        opt(r.prefix.as_deref()),
        opt(r.method.as_deref()),
        opt(r.reference.as_deref()),
        opt(r.custom.as_deref()),
        time(r.request.as_ref().map(|q| q.received_at)),
        price
            .and_then(|p| p.amount)
            .map(|a| a.to_string())
            .unwrap_or_default(),
        opt(price.and_then(|p| p.currency_id.as_deref())),
        opt(decision.map(|d| d.action.as_str())),
        opt(decision.and(Some(rule_of(r)))),
        decision.map(|d| d.on_error.to_string()).unwrap_or_default(),
        opt(decision.map(|d| d.reason.as_str())),
        opt(decision.map(|d| d.policy_version.as_str())),
        opt(r.sms_delivery.as_ref().map(|s| s.result.as_str())),
        opt(result.map(|s| s.status.as_str())),
        opt(result.and_then(|s| s.reason.as_deref())),
        opt(result.and_then(|s| s.source.as_deref())),
        time(result.map(|s| s.received_at)),
        r.event_count.to_string(),
    ]
}

#[cfg(test)]
mod tests;
