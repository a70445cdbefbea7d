//! Reading a policy: the TOML schema (with spans, so every error has a file, line and
//! column), list files, and validation and compilation into an immutable [`Snapshot`].

use std::{
    collections::{BTreeMap, HashMap},
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use chrono::Utc;
use schemars::JsonSchema;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use toml::Spanned;

use super::{
    adaptive::BlockSpec,
    compiled::{Rule, RuleError, RuleStats, Snapshot},
    conditions::{duration_ms, written_ms, Anchor, CompileContext, CompiledConditions, RuleFile},
    Counting, Mode,
};
use crate::events::{Action, ResponseFields};
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
    /// How far back a number's verifications are read for rules with
    /// `spare_returning` (default 90d).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub(super) returning_within: Option<Spanned<String>>,
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
    let (text, base) = read(path)?;
    compile(&text, &path.display().to_string(), Some(&base), stats)
}

/// The policy file's text, and the folder its list files are relative to.
fn read(path: &Path) -> Result<(String, PathBuf), PolicyLoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyLoadError::Read {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    Ok((
        text,
        path.parent().map(Path::to_path_buf).unwrap_or_default(),
    ))
}

/// The policy's fields that hold a duration, wherever they appear (a rule, its
/// condition, the file's top level).
const DURATION_FIELDS: [&str; 7] = [
    "window",
    "baseline",
    "complete_after",
    "pool_alert_for",
    "block_for",
    "max_block",
    "returning_within",
];

/// The policy text with every duration multiplied by `factor`, written in
/// milliseconds: the same policy on a faster (or slower) clock. `verigate simulate
/// --time-scale` plays it against traffic whose timeline is scaled alike, to show
/// whether a defence depends on the clock rather than on the policy's own durations.
pub fn scale_durations(text: &str, factor: f64) -> Result<String, String> {
    fn walk(value: &mut toml::Value, factor: f64) -> Result<(), String> {
        match value {
            toml::Value::Table(table) => {
                for (key, v) in table.iter_mut() {
                    match v {
                        toml::Value::String(text) if DURATION_FIELDS.contains(&key.as_str()) => {
                            let ms = duration_ms(text).ok_or_else(|| {
                                format!("{key} `{text}` is not a duration like 1h")
                            })?;
                            *text = format!("{}ms", ((ms as f64 * factor).round() as i64).max(1));
                        }
                        _ => walk(v, factor)?,
                    }
                }
            }
            toml::Value::Array(items) => {
                for item in items {
                    walk(item, factor)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    if !(factor.is_finite() && factor > 0.0) {
        return Err(format!("a time scale must be above zero, not {factor}"));
    }
    let mut value: toml::Value = toml::from_str(text).map_err(|e| e.to_string())?;
    walk(&mut value, factor)?;
    toml::to_string(&value).map_err(|e| e.to_string())
}

/// Reads the policy at `path` with every duration multiplied by `factor`
/// ([`scale_durations`]); its list files are read as they are.
pub(super) fn load_scaled(path: &Path, factor: f64) -> Result<Snapshot, PolicyLoadError> {
    let (text, base) = read(path)?;
    let origin = format!("{} (durations x {factor})", path.display());
    let scaled = scale_durations(&text, factor).map_err(|message| PolicyLoadError::Invalid {
        path: origin.clone(),
        line: 1,
        column: 1,
        message,
    })?;
    compile(&scaled, &origin, Some(&base), &HashMap::new())
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
    for (i, rule) in rules.iter().enumerate() {
        let i = i as u32;
        match rule.conditions.anchor() {
            Some(Anchor::Numbers(numbers)) => numbers
                .into_iter()
                .for_each(|n| number_index.entry(n).or_default().push(i)),
            Some(Anchor::Prefixes(prefixes)) => prefixes
                .into_iter()
                .for_each(|p| prefix_lists.entry(p).or_default().push(i)),
            Some(Anchor::Countries(countries)) => countries
                .into_iter()
                .for_each(|c| country_index.entry(c).or_default().push(i)),
            None => unanchored.push(i),
        }
    }
    for (prefix, ids) in prefix_lists {
        prefix_index.insert(&prefix, ids);
    }
    let stats = rules
        .iter()
        .map(|r| stats.get(&r.name).cloned().unwrap_or_default())
        .collect();
    let returning_within_ms = returning_within(&file, &rules).map_err(|(s, m)| at.error(s, m))?;
    let adaptive = rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.limiters.iter().any(|l| l.is_adaptive()))
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
        returning_within_ms,
        version,
        loaded_at: Utc::now(),
        lists: lists.iter().map(|(k, v)| (k.clone(), v.len())).collect(),
    })
}

pub(super) fn compile_rule(
    rule: &RuleFile,
    lists: &BTreeMap<String, Vec<String>>,
) -> Result<Rule, RuleError> {
    let CompiledConditions {
        checks,
        limits,
        mut summary,
    } = rule.conditions(&CompileContext { lists })?;
    if let Some(response) = &rule.response {
        validate_response(response).map_err(|m| (None, m))?;
    }
    let block = compile_block(rule, !limits.is_empty())?;
    let counting = compile_counting(rule, !limits.is_empty())?;
    if counting == Counting::Approximate {
        summary.push("counted approximately by replicas".into());
    }
    let spare_returning = compile_spare(rule)?;
    if spare_returning {
        summary.push("spares returning numbers".into());
    }
    if let Some(b) = &block {
        summary.push(format!(
            "quarantine {} (doubling, at most {}){}",
            written_ms(b.for_ms),
            written_ms(b.max_ms),
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
        conditions: checks,
        limiters: limits,
        block,
        counting,
        spare_returning,
        summary,
    })
}

/// How far back numbers' histories are read: `None` when no rule spares returning
/// numbers (nothing is looked up).
fn returning_within(file: &PolicyFile, rules: &[Rule]) -> Result<Option<i64>, RuleError> {
    const DEFAULT_MS: i64 = 90 * 24 * 3_600_000;
    let window = match &file.returning_within {
        Some(text) => duration_ms(text.get_ref()).filter(|ms| *ms > 0).ok_or((
            Some(text.span()),
            format!(
                "returning_within `{}` is not a duration like 90d",
                text.get_ref()
            ),
        ))?,
        None => DEFAULT_MS,
    };
    Ok(rules.iter().any(|r| r.spare_returning).then_some(window))
}

/// `spare_returning`: only on deny rules, where it lets a returning number go on.
fn compile_spare(rule: &RuleFile) -> Result<bool, RuleError> {
    match &rule.spare_returning {
        Some(spare) if *spare.get_ref() && rule.action != Action::Deny => Err((
            Some(spare.span()),
            "spare_returning lets a returning number past a deny rule: this rule allows".into(),
        )),
        Some(spare) => Ok(*spare.get_ref()),
        None => Ok(false),
    }
}

/// `counting`: only on a rule that counts.
fn compile_counting(rule: &RuleFile, has_limiter: bool) -> Result<Counting, RuleError> {
    match &rule.counting {
        None => Ok(Counting::Exact),
        Some(counting) if has_limiter => Ok(*counting.get_ref()),
        Some(counting) => Err((
            Some(counting.span()),
            "counting applies to a rule with conversion, sinch_fraud, surge, rate_limit, distinct_numbers or spend".into(),
        )),
    }
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
            "block_for quarantines the key of an enforced deny rule with conversion, sinch_fraud, surge, rate_limit, distinct_numbers or spend".into(),
        ));
    }
    if rule.surge.as_ref().is_some_and(|s| s.get_ref().throttles()) {
        return Err((
            at,
            "block_for would block the whole key that surge's throttle keeps open: use one or the other".into(),
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
mod schema_tests;

#[cfg(test)]
mod scale_tests {
    use super::scale_durations;

    #[test]
    fn every_duration_is_scaled_wherever_it_is_written_and_nothing_else() {
        let text = r#"
returning_within = "90d"
[[rule]]
name = "r"
action = "deny"
conversion = { per = "prefix:5", window = "6h", baseline = "24h", complete_after = "3m", pool_alert_for = "1h", below = 0.5 }
block_for = "2h"
max_block = "24h"
[[rule]]
name = "burst"
action = "deny"
rate_limit = { key = "number", max = 5, window = "10m" }
"#;
        let scaled: toml::Value = toml::from_str(&scale_durations(text, 0.1).unwrap()).unwrap();
        assert_eq!(scaled["returning_within"].as_str(), Some("777600000ms"));
        let rule = &scaled["rule"][0];
        let conversion = &rule["conversion"];
        assert_eq!(conversion["window"].as_str(), Some("2160000ms"));
        assert_eq!(conversion["baseline"].as_str(), Some("8640000ms"));
        assert_eq!(conversion["complete_after"].as_str(), Some("18000ms"));
        assert_eq!(conversion["pool_alert_for"].as_str(), Some("360000ms"));
        assert_eq!(rule["block_for"].as_str(), Some("720000ms"));
        assert_eq!(rule["max_block"].as_str(), Some("8640000ms"));
        assert_eq!(conversion["per"].as_str(), Some("prefix:5"));
        assert_eq!(conversion["below"].as_float(), Some(0.5));
        assert_eq!(
            scaled["rule"][1]["rate_limit"]["window"].as_str(),
            Some("60000ms")
        );
        assert_eq!(scaled["rule"][1]["rate_limit"]["max"].as_integer(), Some(5));
    }

    #[test]
    fn a_scale_must_be_above_zero_and_a_duration_field_must_hold_one() {
        assert!(scale_durations("", 0.0).is_err());
        assert!(scale_durations("", f64::NAN).is_err());
        let err = scale_durations("[[rule]]\nwindow = \"soon\"\n", 0.5).unwrap_err();
        assert!(err.contains("window `soon`"), "{err}");
    }
}
