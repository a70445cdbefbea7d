//! Reading a policy: the TOML schema (with spans, so every error has a file, line and
//! column), list files, and validation and compilation into an immutable [`Snapshot`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use chrono::{NaiveTime, Utc, Weekday};
use schemars::JsonSchema;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::{
    adaptive::{z_for, BlockSpec},
    compiled::{
        Conditions, CounterSpec, Limiter, Mode, Rule, RuleError, RuleStats, Snapshot, Threshold,
        TimeWindow,
    },
};
use crate::events::{Action, ResponseFields, VerificationMethod};
use crate::phone::trie::DigitTrie;

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

/// A verigate policy file: ordered rules, the first enforced match decides.
/// Reference: docs/policy.md.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "verigate policy")]
pub(super) struct PolicyFile {
    /// Format version; only 1 exists.
    #[serde(default)]
    #[schemars(with = "Option<u32>", range(min = 1, max = 1))]
    pub(super) version: Option<Spanned<u32>>,
    /// What to answer when no rule matches.
    pub(super) default: Action,
    /// What to answer when no decision can be made (a request without an E.164 number,
    /// a store that cannot record the decision). Sinch treats an unanswered request as
    /// denied, so deny is the default.
    #[serde(default = "deny")]
    pub(super) on_error: Action,
    /// Answer fields sent with allow, per method (rules can override them).
    #[serde(default)]
    pub(super) response: ResponseFields,
    /// Named lists of numbers, prefixes or countries, used in rules as `@name`: inline,
    /// or `{ file = "lists/x.txt" }` (one entry per line, `#` comments), relative to this
    /// file.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, ListFile>")]
    pub(super) lists: BTreeMap<String, Spanned<ListFile>>,
    /// The rules, in order.
    #[serde(default, rename = "rule")]
    #[schemars(with = "Vec<RuleFile>")]
    pub(super) rules: Vec<Spanned<RuleFile>>,
}

pub(super) fn deny() -> Action {
    Action::Deny
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(super) enum ListFile {
    /// The entries themselves.
    Inline(Vec<String>),
    /// A file of entries, one per line, relative to the policy file.
    File { file: String },
}

/// One value or a list of them; `@name` stands for a list from [lists].
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn items(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A rule: its conditions must all hold for it to match.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RuleFile {
    /// Unique name: in decisions, logs, metrics and GET /v1/policy.
    pub(super) name: String,
    /// What to answer when the rule matches.
    pub(super) action: Action,
    /// `shadow` records what the rule would do without letting it decide.
    #[serde(default)]
    pub(super) mode: Mode,
    /// Answer fields for allow, replacing the policy's [response].
    #[serde(default)]
    pub(super) response: Option<ResponseFields>,
    /// Free text for operators.
    #[serde(default)]
    pub(super) note: Option<String>,
    /// Verification methods: sms, flashcall, callout, whatsapp, seamless.
    #[schemars(with = "Option<OneOrMany>")]
    pub(super) method: Option<Spanned<OneOrMany>>,
    /// ISO 3166 alpha-2 codes of the number's country (or `unknown`).
    #[schemars(with = "Option<OneOrMany>")]
    pub(super) country: Option<Spanned<OneOrMany>>,
    /// Matches numbers from any country except these.
    #[schemars(with = "Option<OneOrMany>")]
    pub(super) country_not_in: Option<Spanned<OneOrMany>>,
    /// E.164 prefixes (`+` and digits); the longest matching one is recorded.
    #[schemars(with = "Option<OneOrMany>")]
    pub(super) prefix: Option<Spanned<OneOrMany>>,
    /// Whole E.164 numbers.
    #[schemars(with = "Option<OneOrMany>")]
    pub(super) number: Option<Spanned<OneOrMany>>,
    /// Matches when Sinch's price for the attempt is above the amount in its currency,
    /// e.g. { EUR = 0.50 }.
    #[schemars(with = "Option<BTreeMap<String, f64>>")]
    pub(super) price_above: Option<Spanned<BTreeMap<String, f64>>>,
    /// A regular expression the request's reference must match.
    #[schemars(with = "Option<String>")]
    pub(super) reference: Option<Spanned<String>>,
    /// A regular expression the request's custom field must match.
    #[schemars(with = "Option<String>")]
    pub(super) custom: Option<Spanned<String>>,
    /// Accept-Language values (any of them).
    #[schemars(with = "Option<OneOrMany>")]
    pub(super) accept_language: Option<Spanned<OneOrMany>>,
    /// A time window in a time zone: days and/or a between range.
    #[schemars(with = "Option<TimeFile>")]
    pub(super) time: Option<Spanned<TimeFile>>,
    /// Matches once more than `max` requests came under the key within the window.
    #[schemars(with = "Option<RateLimitFile>")]
    pub(super) rate_limit: Option<Spanned<RateLimitFile>>,
    /// Matches once more than `max` distinct numbers came under the key within the window
    /// (range walking).
    #[schemars(with = "Option<DistinctFile>")]
    pub(super) distinct_numbers: Option<Spanned<DistinctFile>>,
    /// Matches once the allowed attempts' price under the key would exceed `max` within
    /// the window.
    #[schemars(with = "Option<SpendFile>")]
    pub(super) spend: Option<Spanned<SpendFile>>,
    /// Adaptive: matches when the verifications allowed under the key convert below a
    /// rate (or a share of their country's rate).
    #[schemars(with = "Option<ConversionFile>")]
    pub(super) conversion: Option<Spanned<ConversionFile>>,
    /// Adaptive: matches once Sinch denied more than `max` verifications under the key as
    /// fraud within the window.
    #[schemars(with = "Option<DistinctFile>")]
    pub(super) sinch_fraud: Option<Spanned<DistinctFile>>,
    /// Quarantine the key for this long when the rule trips (doubling on repeat), e.g. 1h.
    #[schemars(with = "Option<String>")]
    pub(super) block_for: Option<Spanned<String>>,
    /// The longest quarantine after doubling, e.g. 24h.
    #[schemars(with = "Option<String>")]
    pub(super) max_block: Option<Spanned<String>>,
    /// Share of requests let through a quarantine to see whether it still holds (0 to 0.5).
    #[schemars(with = "Option<f64>")]
    pub(super) probe: Option<Spanned<f64>>,
}

/// Conversion of allowed verifications under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ConversionFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    pub(super) per: String,
    /// Sliding window, e.g. 6h.
    pub(super) window: String,
    /// No judgement below this many finished verifications.
    #[serde(default = "default_min_samples")]
    pub(super) min_samples: u32,
    /// Trip below this success rate (0 to 1). Exactly one of below / below_baseline.
    pub(super) below: Option<f64>,
    /// Trip below this share of the country's own rate (0 to 1).
    pub(super) below_baseline: Option<f64>,
    /// Confidence that the true rate is below the threshold (0.5 to below 1).
    #[serde(default = "default_confidence")]
    pub(super) confidence: f64,
    /// How long after being allowed a verification without a result counts as failed.
    #[serde(default = "default_complete_after")]
    pub(super) complete_after: String,
}

fn default_min_samples() -> u32 {
    20
}

fn default_confidence() -> f64 {
    0.95
}

fn default_complete_after() -> String {
    "10m".into()
}

/// A time window.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TimeFile {
    /// IANA time zone, e.g. Europe/Stockholm or UTC.
    pub(super) tz: String,
    /// Days of the week (mon, tue, …); all days when empty.
    #[serde(default)]
    pub(super) days: Vec<String>,
    /// ["HH:MM", "HH:MM"], start inclusive, end exclusive; may wrap midnight.
    #[serde(default)]
    #[schemars(length(min = 2, max = 2))]
    pub(super) between: Option<Vec<String>>,
}

/// A request count under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RateLimitFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    pub(super) key: String,
    /// Requests allowed within the window; the next one matches.
    pub(super) max: u32,
    /// Sliding window, e.g. 10m.
    pub(super) window: String,
}

/// A count of distinct numbers (or Sinch fraud verdicts) under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DistinctFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    pub(super) per: String,
    /// How many within the window; one more matches.
    pub(super) max: u32,
    /// Sliding window, e.g. 1h.
    pub(super) window: String,
}

/// Spend under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SpendFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    pub(super) per: String,
    /// Most spend per currency within the window, e.g. { EUR = 200 }.
    pub(super) max: BTreeMap<String, f64>,
    /// Sliding window, e.g. 1h.
    pub(super) window: String,
}

/// The JSON Schema of the policy file, from the same types verigate reads it with.
pub fn policy_schema() -> serde_json::Value {
    schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| {
            s.transforms
                .push(Box::new(schemars::transform::RecursiveTransform(
                    without_null,
                )));
        })
        .into_generator()
        .into_root_schema_for::<PolicyFile>()
        .to_value()
}

/// TOML has no null: an optional field is one that may be left out, not one that may be
/// null. Without this an editor would offer `null` and report a wrong optional table as
/// "not valid under any of the schemas" instead of naming the missing key.
fn without_null(schema: &mut schemars::Schema) {
    use serde_json::Value;
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if object.get("default") == Some(&Value::Null) {
        object.remove("default");
    }
    if let Some(Value::Array(types)) = object.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.remove(0);
            object.insert("type".into(), only);
        }
    }
    let not_null = |s: &&Value| s.get("type") != Some(&Value::from("null"));
    if let Some(Value::Array(any)) = object.get("anyOf") {
        let rest: Vec<Value> = any.iter().filter(not_null).cloned().collect();
        if let [Value::Object(only)] = rest.as_slice() {
            object.remove("anyOf");
            for (key, value) in only {
                object.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Loading

/// The files a policy is read from: the policy file and every list file it names, whether
/// or not they exist or the policy is valid (a list file that is missing now is the one an
/// operator is about to create).
pub fn source_files(path: &Path) -> Vec<PathBuf> {
    #[derive(Deserialize)]
    struct ListsOnly {
        #[serde(default)]
        lists: BTreeMap<String, toml::Value>,
    }
    let mut files = vec![path.to_path_buf()];
    let base = path.parent().unwrap_or(Path::new(""));
    let named = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<ListsOnly>(&text).ok());
    if let Some(named) = named {
        for list in named.lists.values() {
            if let Some(file) = list.get("file").and_then(toml::Value::as_str) {
                files.push(base.join(file));
            }
        }
    }
    files
}

/// Reads the policy and its list files and compiles them.
pub(super) fn load(
    path: &Path,
    stats: &HashMap<String, Arc<RuleStats>>,
) -> Result<Snapshot, PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyLoadError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    compile(&text, &path.display().to_string(), Some(&base), stats)
}

pub(super) struct Located<'a> {
    pub(super) text: &'a str,
    pub(super) origin: &'a str,
}

impl Located<'_> {
    pub(super) fn error(
        &self,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) -> PolicyLoadError {
        let (line, column) = line_column(self.text, span.map_or(0, |s| s.start));
        PolicyLoadError::Invalid {
            path: self.origin.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

pub(super) fn compile(
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
        rules.push(compile_rule(rule, &lists).map_err(|(s, m)| {
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
    let adaptive = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.limiters.iter().any(Limiter::is_adaptive))
        .map(|(i, _)| i)
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
        adaptive,
        version,
        loaded_at: Utc::now(),
        lists: lists.iter().map(|(k, v)| (k.clone(), v.len())).collect(),
    })
}

/// Entries of a condition, with `@list` references expanded.
pub(super) fn resolve(
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

pub(super) fn compile_rule(
    rule: &RuleFile,
    lists: &BTreeMap<String, Vec<String>>,
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
                if crate::phone::e164_digits(&v).is_some_and(|d| d.len() >= min) {
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

    // Adaptive conditions first: a rule's quarantine is kept per its first limiter's key.
    let mut limiters = Vec::new();
    if let Some(cv) = &rule.conversion {
        let f = cv.get_ref();
        let threshold = match (f.below, f.below_baseline) {
            (Some(v), None) if v > 0.0 && v <= 1.0 => Threshold::Below(v),
            (None, Some(v)) if v > 0.0 && v <= 1.0 => Threshold::BelowBaseline(v),
            _ => {
                return Err((
                    Some(cv.span()),
                    "conversion needs exactly one of below (a rate, e.g. 0.2) or below_baseline (a share of the country's rate, e.g. 0.5), between 0 and 1".into(),
                ))
            }
        };
        if !(0.5..1.0).contains(&f.confidence) || f.min_samples == 0 {
            return Err((
                Some(cv.span()),
                "conversion.confidence must be from 0.5 to below 1 (e.g. 0.95) and min_samples at least 1".into(),
            ));
        }
        let complete_after_ms = duration_ms(&f.complete_after).ok_or((
            Some(cv.span()),
            format!(
                "complete_after `{}` is not a duration like 10m",
                f.complete_after
            ),
        ))?;
        summary.push(format!(
            "conversion per {} over {} {} (min {} samples, {} confidence)",
            f.per,
            f.window,
            match threshold {
                Threshold::Below(v) => format!("below {v}"),
                Threshold::BelowBaseline(v) => format!("below {v} x the country's rate"),
            },
            f.min_samples,
            f.confidence
        ));
        let spec = CounterSpec::parse(&f.per, &f.window, cv.span())?;
        limiters.push(Limiter::Conversion {
            spec,
            min_samples: f.min_samples,
            threshold,
            z: z_for(f.confidence),
            complete_after_ms,
        });
    }
    if let Some(sf) = &rule.sinch_fraud {
        let f = sf.get_ref();
        summary.push(format!(
            "sinch_fraud per {} > {} per {}",
            f.per, f.max, f.window
        ));
        let spec = CounterSpec::parse(&f.per, &f.window, sf.span())?;
        limiters.push(Limiter::SinchFraud { spec, max: f.max });
    }
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
    let block = compile_block(rule, !limiters.is_empty())?;
    if let Some(b) = &block {
        summary.push(format!(
            "quarantine {} (doubling, at most {}){}",
            humantime::format_duration(std::time::Duration::from_millis(b.for_ms.unsigned_abs())),
            humantime::format_duration(std::time::Duration::from_millis(b.max_ms.unsigned_abs())),
            b.probe_every
                .map_or_else(String::new, |n| format!(", probe 1 in {n}"))
        ));
    }
    Ok(Rule {
        name: rule.name.clone(),
        action: rule.action,
        mode: rule.mode,
        response: rule.response.clone(),
        note: rule.note.clone(),
        conditions: c,
        limiters,
        block,
        summary,
    })
}

fn duration_ms(text: &str) -> Option<i64> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// `block_for`, `max_block` and `probe`: only on enforced deny rules with a counter.
fn compile_block(rule: &RuleFile, has_limiter: bool) -> Result<Option<BlockSpec>, RuleError> {
    let Some(block_for) = &rule.block_for else {
        if let Some(extra) = rule
            .max_block
            .as_ref()
            .map(Spanned::span)
            .or(rule.probe.as_ref().map(Spanned::span))
        {
            return Err((Some(extra), "max_block and probe need block_for".into()));
        }
        return Ok(None);
    };
    let at = Some(block_for.span());
    if rule.action != Action::Deny || rule.mode != Mode::Enforce || !has_limiter {
        return Err((
            at,
            "block_for quarantines the key of an enforced deny rule with conversion, sinch_fraud, rate_limit, distinct_numbers or spend".into(),
        ));
    }
    let for_ms = duration_ms(block_for.get_ref()).ok_or((
        at.clone(),
        format!(
            "block_for `{}` is not a duration like 1h",
            block_for.get_ref()
        ),
    ))?;
    let max_ms = match &rule.max_block {
        Some(m) => duration_ms(m.get_ref()).filter(|ms| *ms >= for_ms).ok_or((
            Some(m.span()),
            format!(
                "max_block `{}` must be a duration of at least block_for",
                m.get_ref()
            ),
        ))?,
        None => for_ms.max(24 * 3_600_000),
    };
    let probe_every = match &rule.probe {
        Some(p) if *p.get_ref() > 0.0 && *p.get_ref() <= 0.5 => {
            Some((1.0 / p.get_ref()).round() as u64)
        }
        Some(p) => {
            return Err((
                Some(p.span()),
                "probe is the share of a blocked key's requests let through, from above 0 to 0.5 (e.g. 0.05)".into(),
            ))
        }
        None => None,
    };
    Ok(Some(BlockSpec {
        for_ms,
        max_ms,
        probe_every,
    }))
}

pub(super) fn compile_time(t: &TimeFile) -> Result<TimeWindow, String> {
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
        .map(|times| {
            let [a, b] = times.as_slice() else {
                return Err(format!(
                    "time.between needs two times, [\"HH:MM\", \"HH:MM\"], not {}",
                    times.len()
                ));
            };
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
pub(super) fn validate_response(fields: &ResponseFields) -> Result<(), String> {
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

pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
#[path = "schema_tests.rs"]
pub(crate) mod schema_tests;
