//! Aggregating verifications into counts, conversion and spend per group: what
//! `GET /v1/stats` answers. Engines feed [`StatsBuilder`] one [`StatsRow`] per
//! verification, read however is cheapest for them.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::events::Action;

/// The group labels of a verification: what stats and filters call a missing status,
/// country or rule.
pub(super) fn status_label(status: Option<&str>) -> &str {
    status.unwrap_or("NONE")
}

pub(super) fn country_label(country: Option<&str>) -> &str {
    country.unwrap_or("unknown")
}

pub(super) fn rule_label(decision: Option<(bool, Option<&str>)>) -> &str {
    match decision {
        None => "none",
        Some((true, _)) => "on_error",
        Some((false, rule)) => rule.unwrap_or("default"),
    }
}

/// Dimensions stats can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Country,
    Method,
    Day,
    Rule,
    /// The UTC hour of first sight, for time series.
    Hour,
    /// The UTC minute of first sight, for time series of the last hours.
    Minute,
}

impl GroupBy {
    pub const ALL: [GroupBy; 6] = [
        GroupBy::Country,
        GroupBy::Method,
        GroupBy::Day,
        GroupBy::Rule,
        GroupBy::Hour,
        GroupBy::Minute,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Country => "country",
            GroupBy::Method => "method",
            GroupBy::Day => "day",
            GroupBy::Rule => "rule",
            GroupBy::Hour => "hour",
            GroupBy::Minute => "minute",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.name() == name)
    }

    fn value(self, row: &StatsRow<'_>) -> String {
        match self {
            GroupBy::Country => country_label(row.country).to_owned(),
            GroupBy::Method => row.method.unwrap_or("unknown").to_owned(),
            GroupBy::Day => row.first_seen.format("%Y-%m-%d").to_string(),
            GroupBy::Rule => row.rule().to_owned(),
            // RFC 3339 at the bucket's start, so a client parses it as a time; sorting the
            // labels sorts the buckets.
            GroupBy::Hour => row.first_seen.format("%Y-%m-%dT%H:00:00Z").to_string(),
            GroupBy::Minute => row.first_seen.format("%Y-%m-%dT%H:%M:00Z").to_string(),
        }
    }
}

/// The fields of one verification that stats read.
#[derive(Debug, Clone, Copy)]
pub struct StatsRow<'a> {
    pub first_seen: DateTime<Utc>,
    pub country: Option<&'a str>,
    pub method: Option<&'a str>,
    /// The request was received (a verification may be known only from its result).
    pub requested: bool,
    /// (action, deciding rule, on_error) when a decision was taken.
    pub decision: Option<(Action, Option<&'a str>, bool)>,
    /// The request's price: (currency, amount).
    pub price: Option<(&'a str, f64)>,
    /// The latest status reported.
    pub status: Option<&'a str>,
}

impl StatsRow<'_> {
    fn status(&self) -> &str {
        status_label(self.status)
    }

    fn rule(&self) -> &str {
        rule_label(self.decision.map(|(_, rule, on_error)| (on_error, rule)))
    }
}

/// Counts for one group of verifications.
#[derive(Debug, Clone, Default, PartialEq, Serialize, schemars::JsonSchema)]
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

/// Aggregates rows into groups; the result is sorted by group values.
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

    pub fn add(&mut self, row: &StatsRow<'_>) {
        self.add_many(row, 1);
    }

    /// Adds `n` verifications alike in every field stats read, `row.price` being their
    /// price summed (what an engine that aggregates by itself hands over).
    pub fn add_many(&mut self, row: &StatsRow<'_>, n: u64) {
        let key: Vec<String> = self.group_by.iter().map(|g| g.value(row)).collect();
        let group_by = &self.group_by;
        let stats = self
            .groups
            .entry(key.clone())
            .or_insert_with(|| GroupStats {
                group: group_by.iter().map(|g| g.name()).zip(key).collect(),
                ..GroupStats::default()
            });
        stats.verifications += n;
        if row.requested {
            stats.requests += n;
        }
        *stats.results.entry(row.status().to_owned()).or_default() += n;
        match row.decision.map(|(action, _, _)| action) {
            Some(Action::Allow) => {
                stats.allowed += n;
                if row.status() == "SUCCESSFUL" {
                    stats.successful_allowed += n;
                }
                if let Some((currency, amount)) = row.price {
                    *stats.price.entry(currency.to_owned()).or_default() += amount;
                }
            }
            Some(Action::Deny) => stats.denied += n,
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
