//! A policy as verigate evaluates it: compiled rules, conditions and counter specs, and
//! the facts of one request that conditions read.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::Range,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use chrono::{DateTime, Datelike, NaiveTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{adaptive::BlockSpec, counters::CounterKey};
use crate::events::{Action, ResponseFields, VerificationMethod, VerificationRequestEvent};
use crate::phone::trie::DigitTrie;

// ---------------------------------------------------------------------------------------
// Compiled form

/// Why a rule does not compile: where in the file (when known) and what is wrong.
pub(super) type RuleError = (Option<Range<usize>>, String);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum Mode {
    /// The rule decides.
    #[default]
    Enforce,
    /// The rule is evaluated and recorded (what it would have done) but never decides.
    Shadow,
}

/// What a counter is kept per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyDef {
    Number,
    /// `prefix:k`: the first k digits after `+`.
    Prefix(usize),
    /// `range:n`: the number without its last n digits.
    Range(usize),
    Country,
    Method,
    Global,
}

impl KeyDef {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let digits = |s: &str, what: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|n| (1..=14).contains(n))
                .ok_or_else(|| format!("`{what}:{s}` needs a digit count from 1 to 14"))
        };
        match text.split_once(':') {
            None => match text {
                "number" => Ok(KeyDef::Number),
                "country" => Ok(KeyDef::Country),
                "method" => Ok(KeyDef::Method),
                "global" => Ok(KeyDef::Global),
                other => Err(format!(
                    "`{other}` is not a key: use number, prefix:k, range:n, country, method or global"
                )),
            },
            Some(("prefix", k)) => digits(k, "prefix").map(KeyDef::Prefix),
            Some(("range", n)) => digits(n, "range").map(KeyDef::Range),
            Some((other, _)) => Err(format!("`{other}` is not a key kind: use prefix:k or range:n")),
        }
    }

    pub(super) fn value(&self, number: &str, country: &str, method: &VerificationMethod) -> String {
        let digits = number.trim_start_matches('+');
        match self {
            KeyDef::Number => number.to_owned(),
            KeyDef::Prefix(k) => format!("+{}", &digits[..(*k).min(digits.len())]),
            KeyDef::Range(n) => format!("+{}", &digits[..digits.len().saturating_sub(*n)]),
            KeyDef::Country => country.to_owned(),
            KeyDef::Method => method.as_str().to_owned(),
            KeyDef::Global => "*".to_owned(),
        }
    }
}

/// What a counter counts over: its key, as written and parsed, and its window.
#[derive(Debug, Clone)]
pub(super) struct CounterSpec {
    pub(super) key: KeyDef,
    pub(super) text: String,
    pub(super) window_ms: i64,
}

impl CounterSpec {
    pub(super) fn parse(key: &str, window: &str, span: Range<usize>) -> Result<Self, RuleError> {
        let window_ms = humantime::parse_duration(window)
            .ok()
            .filter(|d| !d.is_zero())
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .ok_or((
                Some(span.clone()),
                format!("window `{window}` is not a duration like 10m or 1h"),
            ))?;
        Ok(Self {
            key: KeyDef::parse(key).map_err(|m| (Some(span), m))?,
            text: key.to_owned(),
            window_ms,
        })
    }

    /// This request's key value (its range, prefix, country, …).
    pub(super) fn value(&self, f: &Facts<'_>) -> String {
        self.key.value(&f.number, f.country, &f.request.method)
    }

    /// The counter of `rule` for this request, under condition `kind`.
    pub(super) fn counter(&self, rule: &str, kind: &str, f: &Facts<'_>) -> CounterKey {
        CounterKey {
            rule: rule.to_owned(),
            condition: format!("{kind}:{}", self.text),
            value: self.value(f),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) enum Limiter {
    Rate {
        spec: CounterSpec,
        max: u32,
    },
    Distinct {
        spec: CounterSpec,
        max: u32,
    },
    Spend {
        spec: CounterSpec,
        max: BTreeMap<String, f64>,
    },
    /// Success ratio of the allowed verifications under the key, judged by the upper
    /// bound of its Wilson interval.
    Conversion {
        spec: CounterSpec,
        min_samples: u32,
        threshold: Threshold,
        z: f64,
        complete_after_ms: i64,
    },
    /// Sinch-side `DENIED` results with reason Fraud or Blocked under the key.
    SinchFraud {
        spec: CounterSpec,
        max: u32,
    },
}

impl Limiter {
    pub(super) fn spec(&self) -> &CounterSpec {
        match self {
            Limiter::Rate { spec, .. }
            | Limiter::Distinct { spec, .. }
            | Limiter::Spend { spec, .. }
            | Limiter::Conversion { spec, .. }
            | Limiter::SinchFraud { spec, .. } => spec,
        }
    }

    /// Whether it learns from outcomes (and so needs allowed requests tracked).
    pub(super) fn is_adaptive(&self) -> bool {
        matches!(
            self,
            Limiter::Conversion { .. } | Limiter::SinchFraud { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Threshold {
    /// Below this rate.
    Below(f64),
    /// Below this share of the number's country rate.
    BelowBaseline(f64),
}

#[derive(Debug, Clone)]
pub(super) struct TimeWindow {
    pub(super) tz: chrono_tz::Tz,
    /// Monday first; all true when no days were given.
    pub(super) days: [bool; 7],
    pub(super) between: Option<(NaiveTime, NaiveTime)>,
}

impl TimeWindow {
    pub(super) fn contains(&self, now: DateTime<Utc>) -> bool {
        let local = now.with_timezone(&self.tz);
        let day_ok = self.days[local.weekday().num_days_from_monday() as usize];
        let time = local.time();
        let time_ok = match self.between {
            None => true,
            Some((start, end)) if start <= end => time >= start && time < end,
            Some((start, end)) => time >= start || time < end, // wraps midnight
        };
        day_ok && time_ok
    }
}

#[derive(Debug, Clone, Default)]
pub(super) struct Conditions {
    pub(super) methods: Option<Vec<VerificationMethod>>,
    pub(super) countries: Option<HashSet<String>>,
    pub(super) countries_not_in: Option<HashSet<String>>,
    pub(super) prefixes: Option<DigitTrie<()>>,
    pub(super) numbers: Option<HashSet<String>>,
    pub(super) price_above: Option<BTreeMap<String, f64>>,
    pub(super) reference: Option<regex::Regex>,
    pub(super) custom: Option<regex::Regex>,
    pub(super) accept_language: Option<Vec<String>>,
    pub(super) time: Option<TimeWindow>,
}

#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) name: String,
    pub(super) action: Action,
    pub(super) mode: Mode,
    pub(super) response: Option<ResponseFields>,
    pub(super) note: Option<String>,
    pub(super) conditions: Conditions,
    pub(super) limiters: Vec<Limiter>,
    /// Quarantine of the key of the first limiter when the rule trips.
    pub(super) block: Option<BlockSpec>,
    /// The conditions as written, for `GET /v1/policy` and `policy check`.
    pub(super) summary: Vec<String>,
}

/// Per-rule counts, kept across reloads by rule name.
#[derive(Debug, Default)]
pub(super) struct RuleStats {
    /// Decisions this rule made (enforced) or would have made (shadow).
    pub(super) hits: AtomicU64,
    /// Final statuses of the verifications it decided or shadow-matched.
    pub(super) outcomes: Mutex<BTreeMap<String, u64>>,
}

/// One immutable, validated policy.
pub(super) struct Snapshot {
    pub(super) default: Action,
    pub(super) on_error: Action,
    pub(super) response: ResponseFields,
    pub(super) rules: Vec<Rule>,
    pub(super) stats: Vec<Arc<RuleStats>>,
    pub(super) by_name: HashMap<String, usize>,
    /// Candidate indexes: rules whose anchoring condition the request meets.
    pub(super) prefix_index: DigitTrie<Vec<u32>>,
    pub(super) number_index: HashMap<String, Vec<u32>>,
    pub(super) country_index: HashMap<String, Vec<u32>>,
    /// Rules with no indexed condition: always candidates.
    pub(super) unanchored: Vec<u32>,
    /// Rules that learn from outcomes: every allowed request is tracked for them.
    pub(super) adaptive: Vec<usize>,
    pub(super) version: String,
    pub(super) loaded_at: DateTime<Utc>,
    pub(super) lists: BTreeMap<String, usize>,
}

// ---------------------------------------------------------------------------------------
// Evaluation

/// `+` followed by 1..=15 digits; leading `+` added when a bare digit string arrives.
pub fn normalise_number(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let digits = raw.strip_prefix('+').unwrap_or(raw);
    let number = format!("+{digits}");
    crate::phone::e164_digits(&number)
        .is_some()
        .then_some(number)
}

/// The facts about one request that conditions read.
pub(super) struct Facts<'a> {
    pub(super) request: &'a VerificationRequestEvent,
    pub(super) number: String,
    pub(super) country: &'static str,
    pub(super) now: DateTime<Utc>,
}

impl<'a> Facts<'a> {
    /// The facts of `request` at `now`; `None` when its number is not E.164.
    pub(super) fn of(request: &'a VerificationRequestEvent, now: DateTime<Utc>) -> Option<Self> {
        let number = normalise_number(&request.identity.endpoint)?;
        let country = crate::phone::country::CountryTable::get()
            .country_of(&number)
            .unwrap_or("unknown");
        Some(Self {
            request,
            number,
            country,
            now,
        })
    }
}

impl Conditions {
    /// The static conditions (no counters); returns the matched prefix, if any.
    pub(super) fn matches(&self, f: &Facts<'_>) -> Option<Option<String>> {
        let r = f.request;
        if let Some(methods) = &self.methods {
            if !methods.contains(&r.method) {
                return None;
            }
        }
        if let Some(set) = &self.countries {
            if !set.contains(f.country) {
                return None;
            }
        }
        if let Some(set) = &self.countries_not_in {
            if set.contains(f.country) {
                return None;
            }
        }
        if let Some(numbers) = &self.numbers {
            if !numbers.contains(&f.number) {
                return None;
            }
        }
        let mut matched_prefix = None;
        if let Some(trie) = &self.prefixes {
            let (len, _) = trie.longest_match(&f.number)?;
            matched_prefix = Some(f.number[..len + 1].to_owned());
        }
        if let Some(limits) = &self.price_above {
            let price = r.price.as_ref()?;
            let currency = price.currency_id.as_deref()?.to_ascii_uppercase();
            if price.amount? <= *limits.get(&currency)? {
                return None;
            }
        }
        if let Some(re) = &self.reference {
            if !re.is_match(r.reference.as_deref()?) {
                return None;
            }
        }
        if let Some(re) = &self.custom {
            if !re.is_match(r.custom.as_deref()?) {
                return None;
            }
        }
        if let Some(wanted) = &self.accept_language {
            let given = r.accept_language.as_ref()?;
            if !given
                .iter()
                .any(|g| wanted.contains(&g.to_ascii_lowercase()))
            {
                return None;
            }
        }
        if let Some(time) = &self.time {
            if !time.contains(f.now) {
                return None;
            }
        }
        Some(matched_prefix)
    }
}
