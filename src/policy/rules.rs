//! The rules-file policy: parse and validate a TOML policy (with list files) into an
//! immutable snapshot, evaluate requests against it, and swap in a new snapshot on
//! reload without stopping or slowing decisions.
//!
//! Evaluation finds candidate rules through indexes (a digit trie of every prefix, a map
//! of every listed number and country), so a policy of 1,000 rules costs a request only
//! the rules that can match it, plus those with no indexed condition.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use chrono::{DateTime, Datelike, NaiveTime, Utc, Weekday};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::{
    counters::{CounterKey, Counters},
    country::CountryTable,
    trie::DigitTrie,
    CounterReading, Explanation, Outcome, Policy, PolicyDecision, PolicyError, ShadowMatch,
};
use crate::events::{Action, ResponseFields, VerificationMethod, VerificationRequestEvent};

/// Why a policy was refused, with its location.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

// ---------------------------------------------------------------------------------------
// File schema

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    /// Format version; only 1 exists.
    #[serde(default)]
    version: Option<Spanned<u32>>,
    default: Action,
    #[serde(default = "deny")]
    on_error: Action,
    #[serde(default)]
    response: ResponseFields,
    #[serde(default)]
    lists: BTreeMap<String, Spanned<ListFile>>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RuleFile>>,
}

fn deny() -> Action {
    Action::Deny
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ListFile {
    Inline(Vec<String>),
    File { file: String },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    #[default]
    Enforce,
    Shadow,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn items(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    action: Action,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    response: Option<ResponseFields>,
    #[serde(default)]
    note: Option<String>,
    method: Option<Spanned<OneOrMany>>,
    country: Option<Spanned<OneOrMany>>,
    country_not_in: Option<Spanned<OneOrMany>>,
    prefix: Option<Spanned<OneOrMany>>,
    number: Option<Spanned<OneOrMany>>,
    price_above: Option<Spanned<BTreeMap<String, f64>>>,
    reference: Option<Spanned<String>>,
    custom: Option<Spanned<String>>,
    accept_language: Option<Spanned<OneOrMany>>,
    time: Option<Spanned<TimeFile>>,
    rate_limit: Option<Spanned<RateLimitFile>>,
    distinct_numbers: Option<Spanned<DistinctFile>>,
    spend: Option<Spanned<SpendFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimeFile {
    tz: String,
    #[serde(default)]
    days: Vec<String>,
    #[serde(default)]
    between: Option<[String; 2]>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    key: String,
    max: u32,
    window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DistinctFile {
    per: String,
    max: u32,
    window: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpendFile {
    per: String,
    max: BTreeMap<String, f64>,
    window: String,
}

// ---------------------------------------------------------------------------------------
// Compiled form

/// What a counter is kept per.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyDef {
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
    fn parse(text: &str) -> Result<Self, String> {
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

    fn value(&self, number: &str, country: &str, method: &VerificationMethod) -> String {
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
struct CounterSpec {
    key: KeyDef,
    text: String,
    window_ms: i64,
}

impl CounterSpec {
    fn parse(key: &str, window: &str, span: Range<usize>) -> Result<Self, RuleError> {
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

    /// The counter of `rule` for this request, under condition `kind`.
    fn counter(&self, rule: &str, kind: &str, f: &Facts<'_>) -> CounterKey {
        CounterKey {
            rule: rule.to_owned(),
            condition: format!("{kind}:{}", self.text),
            value: self.key.value(&f.number, f.country, &f.request.method),
        }
    }
}

#[derive(Debug, Clone)]
enum Limiter {
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
}

#[derive(Debug, Clone)]
struct TimeWindow {
    tz: chrono_tz::Tz,
    /// Monday first; all true when no days were given.
    days: [bool; 7],
    between: Option<(NaiveTime, NaiveTime)>,
}

impl TimeWindow {
    fn contains(&self, now: DateTime<Utc>) -> bool {
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
struct Conditions {
    methods: Option<Vec<VerificationMethod>>,
    countries: Option<HashSet<String>>,
    countries_not_in: Option<HashSet<String>>,
    prefixes: Option<DigitTrie<()>>,
    numbers: Option<HashSet<String>>,
    price_above: Option<BTreeMap<String, f64>>,
    reference: Option<regex::Regex>,
    custom: Option<regex::Regex>,
    accept_language: Option<Vec<String>>,
    time: Option<TimeWindow>,
}

#[derive(Debug, Clone)]
struct Rule {
    name: String,
    action: Action,
    mode: Mode,
    response: Option<ResponseFields>,
    note: Option<String>,
    conditions: Conditions,
    limiters: Vec<Limiter>,
    /// The conditions as written, for `GET /v1/policy` and `policy check`.
    summary: Vec<String>,
}

/// Per-rule counts, kept across reloads by rule name.
#[derive(Debug, Default)]
struct RuleStats {
    /// Decisions this rule made (enforced) or would have made (shadow).
    hits: AtomicU64,
    /// Final statuses of the verifications it decided or shadow-matched.
    outcomes: Mutex<BTreeMap<String, u64>>,
}

/// One immutable, validated policy.
struct Snapshot {
    default: Action,
    on_error: Action,
    response: ResponseFields,
    rules: Vec<Rule>,
    stats: Vec<Arc<RuleStats>>,
    by_name: HashMap<String, usize>,
    /// Candidate indexes: rules whose anchoring condition the request meets.
    prefix_index: DigitTrie<Vec<u32>>,
    number_index: HashMap<String, Vec<u32>>,
    country_index: HashMap<String, Vec<u32>>,
    /// Rules with no indexed condition: always candidates.
    unanchored: Vec<u32>,
    version: String,
    loaded_at: DateTime<Utc>,
    lists: BTreeMap<String, usize>,
}

// ---------------------------------------------------------------------------------------
// Loading

/// Reads the policy and its list files and compiles them.
fn load(path: &Path, stats: &HashMap<String, Arc<RuleStats>>) -> Result<Snapshot, PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyLoadError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    compile(&text, &path.display().to_string(), Some(&base), stats)
}

struct Located<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Located<'_> {
    fn error(&self, span: Option<Range<usize>>, message: impl Into<String>) -> PolicyLoadError {
        let (line, column) = line_column(self.text, span.map_or(0, |s| s.start));
        PolicyLoadError::Invalid {
            path: self.origin.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

fn compile(
    text: &str,
    origin: &str,
    base: Option<&Path>,
    stats: &HashMap<String, Arc<RuleStats>>,
) -> Result<Snapshot, PolicyLoadError> {
    let at = Located { text, origin };
    let file: PolicyFile = toml::from_str(text).map_err(|e| at.error(e.span(), e.message()))?;
    if let Some(v) = &file.version {
        if *v.get_ref() != 1 {
            return Err(at.error(
                Some(v.span()),
                format!(
                    "policy format version {} is not supported (use 1)",
                    v.get_ref()
                ),
            ));
        }
    }
    validate_response(&file.response).map_err(|m| at.error(None, m))?;

    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    let mut lists: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, list) in &file.lists {
        let entries = match list.get_ref() {
            ListFile::Inline(items) => items.clone(),
            ListFile::File { file: rel } => {
                let path = base.unwrap_or(Path::new(".")).join(rel);
                let content = std::fs::read_to_string(&path).map_err(|e| {
                    at.error(
                        Some(list.span()),
                        format!("list `{name}`: cannot read {}: {e}", path.display()),
                    )
                })?;
                hasher.update(content.as_bytes());
                let mut items = Vec::new();
                for (i, line) in content.lines().enumerate() {
                    let entry = line.split('#').next().unwrap_or("").trim();
                    if entry.contains(char::is_whitespace) {
                        return Err(PolicyLoadError::Invalid {
                            path: path.display().to_string(),
                            line: i + 1,
                            column: 1,
                            message: format!("`{entry}`: one entry per line"),
                        });
                    }
                    if !entry.is_empty() {
                        items.push(entry.to_owned());
                    }
                }
                items
            }
        };
        lists.insert(name.clone(), entries);
    }
    let version: String = hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();

    let mut rules = Vec::with_capacity(file.rules.len());
    let mut by_name = HashMap::new();
    for spanned in &file.rules {
        let span = spanned.span();
        let rule = spanned.get_ref();
        if by_name.insert(rule.name.clone(), rules.len()).is_some() {
            return Err(at.error(Some(span), format!("duplicate rule name `{}`", rule.name)));
        }
        if rule.name.trim().is_empty() {
            return Err(at.error(Some(span), "a rule needs a name"));
        }
        rules.push(compile_rule(rule, &lists, &at).map_err(|(s, m)| {
            at.error(
                Some(s.unwrap_or(span.clone())),
                format!("rule `{}`: {m}", rule.name),
            )
        })?);
    }

    let mut prefix_index: DigitTrie<Vec<u32>> = DigitTrie::default();
    let mut prefix_lists: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut number_index: HashMap<String, Vec<u32>> = HashMap::new();
    let mut country_index: HashMap<String, Vec<u32>> = HashMap::new();
    let mut unanchored = Vec::new();
    for (i, (rule, spanned)) in rules.iter().zip(&file.rules).enumerate() {
        let i = i as u32;
        let c = &rule.conditions;
        if c.numbers.is_some() {
            for n in resolve(spanned.get_ref().number.as_ref(), &lists) {
                number_index.entry(n).or_default().push(i);
            }
        } else if c.prefixes.is_some() {
            for p in resolve(spanned.get_ref().prefix.as_ref(), &lists) {
                prefix_lists.entry(p).or_default().push(i);
            }
        } else if let Some(countries) = &c.countries {
            for country in countries {
                country_index.entry(country.clone()).or_default().push(i);
            }
        } else {
            unanchored.push(i);
        }
    }
    for (prefix, ids) in prefix_lists {
        prefix_index.insert(&prefix, ids);
    }
    let stats = rules
        .iter()
        .map(|r| stats.get(&r.name).cloned().unwrap_or_default())
        .collect();
    Ok(Snapshot {
        default: file.default,
        on_error: file.on_error,
        response: file.response,
        rules,
        stats,
        by_name,
        prefix_index,
        number_index,
        country_index,
        unanchored,
        version,
        loaded_at: Utc::now(),
        lists: lists.iter().map(|(k, v)| (k.clone(), v.len())).collect(),
    })
}

/// Entries of a condition, with `@list` references expanded.
fn resolve(
    field: Option<&Spanned<OneOrMany>>,
    lists: &BTreeMap<String, Vec<String>>,
) -> Vec<String> {
    let Some(field) = field else {
        return Vec::new();
    };
    field
        .get_ref()
        .items()
        .into_iter()
        .flat_map(|item| match item.strip_prefix('@') {
            Some(name) => lists.get(name).cloned().unwrap_or_default(),
            None => vec![item],
        })
        .collect()
}

type RuleError = (Option<Range<usize>>, String);

fn compile_rule(
    rule: &RuleFile,
    lists: &BTreeMap<String, Vec<String>>,
    _at: &Located<'_>,
) -> Result<Rule, RuleError> {
    let mut summary = Vec::new();
    let mut c = Conditions::default();
    let entries = |field: &Option<Spanned<OneOrMany>>,
                   what: &str|
     -> Result<Option<Vec<String>>, RuleError> {
        let Some(f) = field else { return Ok(None) };
        for item in f.get_ref().items() {
            if let Some(name) = item.strip_prefix('@') {
                if !lists.contains_key(name) {
                    return Err((
                        Some(f.span()),
                        format!("{what}: no list named `{name}` in [lists]"),
                    ));
                }
            }
        }
        let items = resolve(Some(f), lists);
        if items.is_empty() {
            return Err((Some(f.span()), format!("{what}: the list is empty")));
        }
        Ok(Some(items))
    };
    let spanned_err =
        |f: &Option<Spanned<OneOrMany>>, m: String| (f.as_ref().map(Spanned::span), m);

    if let Some(methods) = entries(&rule.method, "method")? {
        let parsed: Vec<VerificationMethod> = methods
            .iter()
            .map(|m| VerificationMethod::parse(m))
            .collect();
        if let Some(bad) = parsed
            .iter()
            .find(|m| matches!(m, VerificationMethod::Other(_)))
        {
            return Err(spanned_err(
                &rule.method,
                format!("method `{bad}` is not sms, flashcall, callout, whatsapp or seamless"),
            ));
        }
        summary.push(format!("method in {methods:?}"));
        c.methods = Some(parsed);
    }
    let country_set = |items: Vec<String>,
                       field: &Option<Spanned<OneOrMany>>|
     -> Result<HashSet<String>, RuleError> {
        items
            .into_iter()
            .map(|c| {
                let upper = c.to_ascii_uppercase();
                if upper == "UNKNOWN" {
                    Ok("unknown".to_owned())
                } else if upper.len() == 2 && upper.bytes().all(|b| b.is_ascii_uppercase()) {
                    Ok(upper)
                } else {
                    Err(spanned_err(
                        field,
                        format!("`{c}` is not an ISO 3166 alpha-2 country code (or `unknown`)"),
                    ))
                }
            })
            .collect()
    };
    if let Some(items) = entries(&rule.country, "country")? {
        summary.push(format!("country in {} codes", items.len()));
        c.countries = Some(country_set(items, &rule.country)?);
    }
    if let Some(items) = entries(&rule.country_not_in, "country_not_in")? {
        summary.push(format!("country not in {} codes", items.len()));
        c.countries_not_in = Some(country_set(items, &rule.country_not_in)?);
    }
    let e164 = |items: Vec<String>,
                field: &Option<Spanned<OneOrMany>>,
                min: usize,
                what: &str|
     -> Result<Vec<String>, RuleError> {
        items
            .into_iter()
            .map(|v| {
                let digits = v.strip_prefix('+').unwrap_or("");
                if digits.len() >= min
                    && digits.len() <= 15
                    && digits.bytes().all(|b| b.is_ascii_digit())
                    && !digits.starts_with('0')
                {
                    Ok(v)
                } else {
                    Err(spanned_err(
                        field,
                        format!(
                            "{what} `{v}` must be `+` followed by digits (E.164, no leading 0)"
                        ),
                    ))
                }
            })
            .collect()
    };
    if let Some(items) = entries(&rule.prefix, "prefix")? {
        let items = e164(items, &rule.prefix, 1, "prefix")?;
        summary.push(format!("prefix in {} prefixes", items.len()));
        let mut trie = DigitTrie::default();
        items.iter().for_each(|p| trie.insert(p, ()));
        c.prefixes = Some(trie);
    }
    if let Some(items) = entries(&rule.number, "number")? {
        let items = e164(items, &rule.number, 3, "number")?;
        summary.push(format!("number in {} numbers", items.len()));
        c.numbers = Some(items.into_iter().collect());
    }
    if let Some(price) = &rule.price_above {
        if price.get_ref().is_empty()
            || price.get_ref().values().any(|v| !v.is_finite() || *v < 0.0)
        {
            return Err((
                Some(price.span()),
                "price_above needs currencies with non-negative amounts, e.g. { EUR = 0.25 }"
                    .into(),
            ));
        }
        summary.push(format!("price above {:?}", price.get_ref()));
        c.price_above = Some(
            price
                .get_ref()
                .iter()
                .map(|(k, v)| (k.to_ascii_uppercase(), *v))
                .collect(),
        );
    }
    let pattern =
        |field: &Option<Spanned<String>>, what: &str| -> Result<Option<regex::Regex>, RuleError> {
            field
                .as_ref()
                .map(|p| {
                    regex::RegexBuilder::new(p.get_ref())
                        .size_limit(1 << 20)
                        .build()
                        .map_err(|e| {
                            (
                                Some(p.span()),
                                format!("{what} pattern does not compile: {e}"),
                            )
                        })
                })
                .transpose()
        };
    c.reference = pattern(&rule.reference, "reference")?;
    c.custom = pattern(&rule.custom, "custom")?;
    if let Some(r) = &rule.reference {
        summary.push(format!("reference ~ /{}/", r.get_ref()));
    }
    if let Some(r) = &rule.custom {
        summary.push(format!("custom ~ /{}/", r.get_ref()));
    }
    if let Some(langs) = entries(&rule.accept_language, "accept_language")? {
        summary.push(format!("accept_language any of {langs:?}"));
        c.accept_language = Some(langs.iter().map(|l| l.to_ascii_lowercase()).collect());
    }
    if let Some(time) = &rule.time {
        c.time = Some(compile_time(time.get_ref()).map_err(|m| (Some(time.span()), m))?);
        summary.push(format!(
            "time {} {:?} {:?}",
            time.get_ref().tz,
            time.get_ref().days,
            time.get_ref().between
        ));
    }

    let mut limiters = Vec::new();
    if let Some(r) = &rule.rate_limit {
        let f = r.get_ref();
        summary.push(format!("rate_limit {} > {} per {}", f.key, f.max, f.window));
        let spec = CounterSpec::parse(&f.key, &f.window, r.span())?;
        limiters.push(Limiter::Rate { spec, max: f.max });
    }
    if let Some(d) = &rule.distinct_numbers {
        let f = d.get_ref();
        summary.push(format!(
            "distinct_numbers per {} > {} per {}",
            f.per, f.max, f.window
        ));
        let spec = CounterSpec::parse(&f.per, &f.window, d.span())?;
        limiters.push(Limiter::Distinct { spec, max: f.max });
    }
    if let Some(s) = &rule.spend {
        let f = s.get_ref();
        if f.max.is_empty() || f.max.values().any(|v| !v.is_finite() || *v <= 0.0) {
            return Err((
                Some(s.span()),
                "spend.max needs positive amounts per currency, e.g. { EUR = 50 }".into(),
            ));
        }
        summary.push(format!(
            "spend per {} > {:?} per {}",
            f.per, f.max, f.window
        ));
        let spec = CounterSpec::parse(&f.per, &f.window, s.span())?;
        let max = f
            .max
            .iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), *v))
            .collect();
        limiters.push(Limiter::Spend { spec, max });
    }
    if let Some(response) = &rule.response {
        validate_response(response).map_err(|m| (None, m))?;
    }
    Ok(Rule {
        name: rule.name.clone(),
        action: rule.action,
        mode: rule.mode,
        response: rule.response.clone(),
        note: rule.note.clone(),
        conditions: c,
        limiters,
        summary,
    })
}

fn compile_time(t: &TimeFile) -> Result<TimeWindow, String> {
    let tz: chrono_tz::Tz =
        t.tz.parse()
            .map_err(|_| format!("`{}` is not an IANA time zone like Europe/Berlin", t.tz))?;
    let mut days = [t.days.is_empty(); 7];
    for spec in &t.days {
        let day = |s: &str| -> Result<usize, String> {
            s.parse::<Weekday>()
                .map(|d| d.num_days_from_monday() as usize)
                .map_err(|_| format!("`{s}` is not a day (mon … sun)"))
        };
        match spec.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (day(from)?, day(to)?);
                let mut d = from;
                loop {
                    days[d] = true;
                    if d == to {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => days[day(spec)?] = true,
        }
    }
    let between = t
        .between
        .as_ref()
        .map(|[a, b]| {
            let parse = |s: &str| {
                NaiveTime::parse_from_str(s, "%H:%M")
                    .map_err(|_| format!("`{s}` is not a time like 22:00"))
            };
            Ok::<_, String>((parse(a)?, parse(b)?))
        })
        .transpose()?;
    Ok(TimeWindow { tz, days, between })
}

/// Sinch accepts flash-call timeouts of 5..=120 s only; refuse anything else at load time
/// rather than have Sinch reject the answer (which denies the verification).
fn validate_response(fields: &ResponseFields) -> Result<(), String> {
    if let Some(flash) = &fields.flash_call {
        for (name, value) in [
            ("dialTimeout", flash.dial_timeout),
            ("interceptionTimeout", flash.interception_timeout),
        ] {
            if let Some(v) = value.filter(|v| !(5..=120).contains(v)) {
                return Err(format!("flashCall.{name} = {v} is outside 5..=120 seconds"));
            }
        }
    }
    Ok(())
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

// ---------------------------------------------------------------------------------------
// Evaluation

/// `+` followed by 1..=15 digits; leading `+` added when a bare digit string arrives.
pub fn normalise_number(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let digits = raw.strip_prefix('+').unwrap_or(raw);
    let valid = !digits.is_empty()
        && digits.len() <= 15
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    valid.then(|| format!("+{digits}"))
}

/// The facts about one request that conditions read.
struct Facts<'a> {
    request: &'a VerificationRequestEvent,
    number: String,
    country: &'static str,
    now: DateTime<Utc>,
}

impl Conditions {
    /// The static conditions (no counters); returns the matched prefix, if any.
    fn matches(&self, f: &Facts<'_>) -> Option<Option<String>> {
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

/// The rules-file policy: hot-reloadable, with counters that outlive reloads.
pub struct RulesPolicy {
    path: Option<PathBuf>,
    current: ArcSwap<Snapshot>,
    counters: Counters,
    /// Stats by rule name, carried into each new snapshot.
    stats: Mutex<HashMap<String, Arc<RuleStats>>>,
    last_error: Mutex<Option<String>>,
    decisions: AtomicUsize,
}

impl fmt::Display for RulesPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.current.load();
        write!(
            f,
            "{} rules, default {}, on_error {}, version {}",
            s.rules.len(),
            s.default,
            s.on_error,
            s.version
        )
    }
}

impl RulesPolicy {
    /// Loads the policy at `path` (and its list files), which `reload` will re-read.
    pub fn load(path: &Path) -> Result<Self, PolicyLoadError> {
        let snapshot = load(path, &HashMap::new())?;
        Ok(Self::new(Some(path.to_path_buf()), snapshot))
    }

    /// A policy from text; `origin` names it in error messages. Cannot be reloaded.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyLoadError> {
        Ok(Self::new(
            None,
            compile(text, origin, None, &HashMap::new())?,
        ))
    }

    fn new(path: Option<PathBuf>, snapshot: Snapshot) -> Self {
        // Built here, at load, so no request waits for it.
        CountryTable::get();
        let stats = snapshot
            .rules
            .iter()
            .map(|r| r.name.clone())
            .zip(snapshot.stats.iter().cloned())
            .collect();
        Self {
            path,
            current: ArcSwap::from_pointee(snapshot),
            counters: Counters::default(),
            stats: Mutex::new(stats),
            last_error: Mutex::new(None),
            decisions: AtomicUsize::new(0),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn rule_names(&self) -> Vec<String> {
        self.current
            .load()
            .rules
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// Warnings about rules that can never match or never decide.
    pub fn warnings(&self) -> Vec<String> {
        let s = self.current.load();
        let mut out = Vec::new();
        let mut catch_all: Option<&str> = None;
        let mut denied_prefixes: Vec<(&str, &DigitTrie<()>)> = Vec::new();
        for rule in &s.rules {
            let c = &rule.conditions;
            if let Some(earlier) = catch_all.filter(|_| rule.mode == Mode::Enforce) {
                out.push(format!("rule `{}` can never decide: the earlier rule `{earlier}` matches every request", rule.name));
            }
            if let (Some(a), Some(b)) = (&c.countries, &c.countries_not_in) {
                if a.iter().all(|x| b.contains(x)) {
                    out.push(format!("rule `{}` can never match: every country it needs is excluded by country_not_in", rule.name));
                }
            }
            if rule.mode == Mode::Shadow && rule.response.is_some() {
                out.push(format!(
                    "rule `{}` is shadow: its response is never sent",
                    rule.name
                ));
            }
            if rule.action == Action::Deny && rule.response.is_some() {
                out.push(format!(
                    "rule `{}` denies: its response is never sent",
                    rule.name
                ));
            }
            if let (Some(trie), Mode::Enforce) = (&c.prefixes, rule.mode) {
                if let Some((earlier, _)) = denied_prefixes.iter().find(|(_, t)| covers(t, trie)) {
                    out.push(format!("rule `{}` can never decide: every prefix it lists is under a prefix of the earlier rule `{earlier}`", rule.name));
                }
            }
            let only_prefix = c.prefixes.is_some()
                && c.methods.is_none()
                && c.countries.is_none()
                && c.countries_not_in.is_none()
                && c.numbers.is_none()
                && c.price_above.is_none()
                && c.reference.is_none()
                && c.custom.is_none()
                && c.accept_language.is_none()
                && c.time.is_none()
                && rule.limiters.is_empty();
            if rule.mode == Mode::Enforce && only_prefix {
                if let Some(trie) = &c.prefixes {
                    denied_prefixes.push((&rule.name, trie));
                }
            }
            let unconditional = rule.summary.is_empty();
            if rule.mode == Mode::Enforce && unconditional && catch_all.is_none() {
                catch_all = Some(&rule.name);
            }
        }
        out
    }

    /// A summary for `policy check`.
    pub fn summary(&self) -> String {
        let s = self.current.load();
        let mut out = format!(
            "version {}: {} rules, default {}, on_error {}\n",
            s.version,
            s.rules.len(),
            s.default,
            s.on_error
        );
        for (name, len) in &s.lists {
            out.push_str(&format!("  list {name}: {len} entries\n"));
        }
        for rule in &s.rules {
            let mode = if rule.mode == Mode::Shadow {
                " (shadow)"
            } else {
                ""
            };
            out.push_str(&format!(
                "  {} {}{mode}: {}\n",
                rule.action,
                rule.name,
                rule.summary.join("; ")
            ));
        }
        out
    }

    fn reload_from_disk(&self) -> Result<String, PolicyLoadError> {
        let path = self.path.as_ref().ok_or_else(|| PolicyLoadError::Read {
            path: "(inline policy)".into(),
            message: "this policy has no file to reload".into(),
        })?;
        let stats = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let snapshot = load(path, &stats)?;
        let version = snapshot.version.clone();
        if let Ok(mut all) = self.stats.lock() {
            for (rule, stat) in snapshot.rules.iter().zip(&snapshot.stats) {
                all.entry(rule.name.clone())
                    .or_insert_with(|| Arc::clone(stat));
            }
        }
        self.current.store(Arc::new(snapshot));
        Ok(version)
    }

    /// Candidate rules for a request, in rule order.
    fn candidates(s: &Snapshot, number: &str, country: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = s.unanchored.clone();
        if let Some(hit) = s.number_index.get(number) {
            ids.extend(hit);
        }
        if let Some(hit) = s.country_index.get(country) {
            ids.extend(hit);
        }
        s.prefix_index.for_each_match(number, |hit| ids.extend(hit));
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// Whether every prefix in `inner` lies under some prefix of `outer`.
fn covers(outer: &DigitTrie<()>, inner: &DigitTrie<()>) -> bool {
    inner
        .keys()
        .iter()
        .all(|k| outer.longest_match(k).is_some())
}

impl Policy for RulesPolicy {
    fn decide(
        &self,
        request: &VerificationRequestEvent,
        now: DateTime<Utc>,
    ) -> Result<PolicyDecision, PolicyError> {
        let started = Instant::now();
        let s = self.current.load();
        let number = normalise_number(&request.identity.endpoint).ok_or_else(|| {
            PolicyError(
                "identity.endpoint is not an E.164 number, so no rule can be checked".into(),
            )
        })?;
        let country = CountryTable::get().country_of(&number).unwrap_or("unknown");
        let facts = Facts {
            request,
            number,
            country,
            now,
        };
        let now_ms = now.timestamp_millis();
        let price = request
            .price
            .as_ref()
            .and_then(|p| Some((p.currency_id.as_deref()?.to_ascii_uppercase(), p.amount?)));

        let mut explanation = Explanation {
            country: Some(country.to_owned()),
            policy_version: s.version.clone(),
            ..Explanation::default()
        };
        let mut decided: Option<usize> = None;
        let mut matched_prefix = None;
        let mut spend_to_commit: Vec<(CounterKey, i64, f64)> = Vec::new();
        for i in Self::candidates(&s, &facts.number, country) {
            let i = i as usize;
            let rule = &s.rules[i];
            if rule.mode == Mode::Enforce && decided.is_some() {
                continue; // only shadow rules are still evaluated
            }
            let Some(prefix) = rule.conditions.matches(&facts) else {
                continue;
            };
            let over = self.limits_exceeded(
                rule,
                &facts,
                now_ms,
                price.as_ref(),
                &mut explanation.counters,
                &mut spend_to_commit,
            );
            if !over {
                continue;
            }
            s.stats[i].hits.fetch_add(1, Ordering::Relaxed);
            match rule.mode {
                Mode::Shadow => explanation.shadow.push(ShadowMatch {
                    rule: rule.name.clone(),
                    would: rule.action,
                }),
                Mode::Enforce => {
                    decided = Some(i);
                    matched_prefix = prefix;
                }
            }
        }
        let rule = decided.map(|i| &s.rules[i]);
        let action = rule.map_or(s.default, |r| r.action);
        // Spend caps sum what Sinch will charge: only allowed attempts count.
        if action == Action::Allow {
            for (key, window_ms, amount) in spend_to_commit {
                self.counters.add(&key, window_ms, now_ms, amount);
            }
        }
        let reason = match (rule, &matched_prefix) {
            (Some(r), Some(p)) => format!("rule `{}` matched prefix {p}", r.name),
            (Some(r), None) => format!("rule `{}` matched", r.name),
            (None, _) => "no rule matched; policy default".to_owned(),
        };
        let response = match action {
            Action::Allow => rule
                .and_then(|r| r.response.as_ref())
                .unwrap_or(&s.response)
                .for_method(&request.method),
            Action::Deny => ResponseFields::default(),
        };
        explanation.matched_prefix = matched_prefix;
        explanation.eval_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let n = self.decisions.fetch_add(1, Ordering::Relaxed);
        if n % 1024 == 0 {
            self.counters.sweep(n / 1024, now_ms);
        }
        Ok(PolicyDecision {
            action,
            rule: rule.map(|r| r.name.clone()),
            reason,
            response,
            explanation,
        })
    }

    fn on_error(&self) -> Action {
        self.current.load().on_error
    }

    fn version(&self) -> String {
        self.current.load().version.clone()
    }

    fn reload(&self) -> Result<String, PolicyError> {
        match self.reload_from_disk() {
            Ok(version) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                Ok(version)
            }
            Err(err) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(err.to_string());
                }
                Err(PolicyError(err.to_string()))
            }
        }
    }

    fn describe(&self) -> serde_json::Value {
        let s = self.current.load();
        let rules: Vec<_> = s
            .rules
            .iter()
            .zip(&s.stats)
            .map(|(rule, stat)| {
                let outcomes = stat.outcomes.lock().map(|o| o.clone()).unwrap_or_default();
                serde_json::json!({
                    "name": rule.name,
                    "action": rule.action,
                    "mode": rule.mode,
                    "conditions": rule.summary,
                    "note": rule.note,
                    "hits": stat.hits.load(Ordering::Relaxed),
                    "outcomes": outcomes,
                })
            })
            .collect();
        serde_json::json!({
            "version": s.version,
            "loaded_at": s.loaded_at,
            "path": self.path.as_ref().map(|p| p.display().to_string()),
            "default": s.default,
            "on_error": s.on_error,
            "lists": s.lists,
            "rules": rules,
            "last_reload_error": self.last_error.lock().ok().and_then(|e| e.clone()),
            "counter_keys": self.counters.keys(),
        })
    }

    fn observe_outcome(&self, outcome: Outcome<'_>) {
        let s = self.current.load();
        let names = outcome
            .rule
            .into_iter()
            .chain(outcome.shadow.iter().map(|m| m.rule.as_str()));
        for name in names {
            if let Some(&i) = s.by_name.get(name) {
                if let Ok(mut o) = s.stats[i].outcomes.lock() {
                    *o.entry(outcome.status.to_owned()).or_default() += 1;
                }
            }
        }
    }

    fn counter_keys(&self) -> usize {
        self.counters.keys()
    }
}

impl RulesPolicy {
    /// Updates and checks a rule's counters; true when every limiter is over its max
    /// (a rule without limiters is always "over": its static conditions decide).
    fn limits_exceeded(
        &self,
        rule: &Rule,
        f: &Facts<'_>,
        now_ms: i64,
        price: Option<&(String, f64)>,
        readings: &mut Vec<CounterReading>,
        spend: &mut Vec<(CounterKey, i64, f64)>,
    ) -> bool {
        let mut over = true;
        for limiter in &rule.limiters {
            let (condition, key, value, max) = match limiter {
                Limiter::Rate { spec, max } => {
                    let k = spec.counter(&rule.name, "rate_limit", f);
                    let value = self.counters.add(&k, spec.window_ms, now_ms, 1.0);
                    ("rate_limit", k.value, value, f64::from(*max))
                }
                Limiter::Distinct { spec, max } => {
                    let k = spec.counter(&rule.name, "distinct_numbers", f);
                    let value = self.counters.see(&k, spec.window_ms, now_ms, &f.number) as f64;
                    ("distinct_numbers", k.value, value, f64::from(*max))
                }
                Limiter::Spend { spec, max } => {
                    // No price, or a currency without a cap: this spend rule cannot hold.
                    let Some((cap, currency, amount)) =
                        price.and_then(|(c, a)| Some((*max.get(c)?, c, *a)))
                    else {
                        over = false;
                        continue;
                    };
                    let k = spec.counter(&rule.name, &format!("spend:{currency}"), f);
                    let value = self.counters.total(&k, spec.window_ms, now_ms) + amount;
                    spend.push((k.clone(), spec.window_ms, amount));
                    ("spend", k.value, value, cap)
                }
            };
            readings.push(CounterReading {
                rule: rule.name.clone(),
                condition: condition.into(),
                key,
                value,
                max,
            });
            if value <= max {
                over = false;
            }
        }
        over
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
