//! The read path's pure logic: query parameters turned into store queries, and the
//! export formats. The HTTP layer and `verigate export` call these; none of it touches
//! the store or the network.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::store::{GroupBy, VerificationFilter, VerificationRecord};

mod rule_outcomes;
pub use rule_outcomes::{Decided, RuleOutcome, RuleOutcomes, Shadowed};

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
            Some(v) if v.chars().count() > 256 => {
                Err(param_error(name, "is longer than 256 characters"))
            }
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
        let until = self.time("until")?.unwrap_or_else(no_end);
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

/// The `until` of a range without one: the last instant RFC 3339 can write, so that an
/// answer echoing the range stays a valid time for any client.
pub fn no_end() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("9999-12-31T23:59:59.999999999Z")
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
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

pub const STATUSES: &[&str] = &[
    "PENDING",
    "SUCCESSFUL",
    "FAIL",
    "DENIED",
    "ABORTED",
    "ERROR",
    "NONE",
];
pub const METHODS: &[&str] = &["sms", "flashcall", "callout", "whatsapp", "seamless"];

/// What `GET /v1/verifications` filters on besides time. `number` is as the client
/// knows it; the store looks it up in the form it keeps numbers in.
pub fn filter_from_params(params: &Params<'_>) -> Result<VerificationFilter, ParamError> {
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
    Ok(VerificationFilter {
        number,
        reference: params.text("reference")?.map(str::to_owned),
        status: params.choice("status", STATUSES)?.map(str::to_owned),
        method: params.choice("method", METHODS)?.map(str::to_owned),
        country: country.map(str::to_ascii_uppercase),
        action: params.choice("action", &["allow", "deny"])?,
        rule: params.text("rule")?.map(str::to_owned),
    })
}

/// `group_by`: a comma-separated list of the dimensions in [`GroupBy::ALL`].
pub fn group_by_from_params(params: &Params<'_>) -> Result<Vec<GroupBy>, ParamError> {
    let Some(list) = params.text("group_by")? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for part in list.split(',').map(str::trim) {
        let g = GroupBy::parse(part).ok_or_else(|| {
            let names: Vec<&str> = GroupBy::ALL.iter().map(|g| g.name()).collect();
            param_error(
                "group_by",
                format!("`{part}` is not one of {}", names.join(", ")),
            )
        })?;
        if !out.contains(&g) {
            out.push(g);
        }
    }
    Ok(out)
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
        opt(decision.and(Some(r.rule_label()))),
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
