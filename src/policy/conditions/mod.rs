//! Rule conditions. Each is one module here (`method.rs`, `rate_limit.rs`, …) that owns
//! everything about it: its TOML shape, its validation, its compiled form and evaluation,
//! its description for GET /v1/policy, what `policy check` warns about it, the
//! `policy test` case fields that feed it, and its line in docs/policy.md.
//!
//! The list at the bottom (`registry!`) names each condition once. From it come the
//! `[[rule]]` table verigate reads (and so the JSON Schema editors use), the order in
//! which a rule's conditions are compiled and described, the conditions table in
//! docs/policy.md and the case fields `policy test` accepts.
//!
//! A condition is either a check on the request alone ([`Check`]: method, country, …),
//! or a counter over earlier requests or outcomes ([`Limit`]: rate_limit, conversion,
//! …), which verigate keeps per key and which may quarantine that key.

use std::{
    any::Any,
    borrow::Cow,
    collections::{BTreeMap, HashSet},
    fmt,
    ops::Range,
};

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{de::DeserializeOwned, Deserialize, Deserializer};
use toml::Spanned;

use super::{
    adaptive::TrackedKey,
    counters::{CounterKey, CounterSpec, CounterStore},
    facts::Facts,
    CounterReading, Counting, Mode, PolicyError,
};
use crate::events::{Action, ResponseFields, VerificationRequestEvent};

/// One kind of condition, as the registry knows it.
pub(super) trait Condition {
    /// When it holds, in words (lowercase, no full stop): the description editors show
    /// from the JSON Schema and the middle column of the table in docs/policy.md.
    const HOLDS_WHEN: &'static str;
    /// The condition as written in a rule: shown in docs/policy.md and checked by tests.
    const EXAMPLE: &'static str;
    /// The `policy test` case fields that set what it reads from a request.
    const CASE_FIELDS: &'static [&'static str] = &[];

    /// How it is written in a `[[rule]]`.
    type File: DeserializeOwned + JsonSchema + fmt::Debug;

    /// Checks what was written and compiles it; the error names what is wrong (the
    /// registry adds the rule and the location).
    fn compile(file: &Self::File, cx: &CompileContext<'_>) -> Result<Compiled, String>;

    /// Sets the request fields it reads from a test case's `CASE_FIELDS`.
    fn apply_case(
        _case: &CaseFields,
        _request: &mut VerificationRequestEvent,
    ) -> Result<(), String> {
        Ok(())
    }
}

/// A compiled condition.
pub(super) enum Compiled {
    Check(Box<dyn Check>),
    Limit(Box<dyn Limit>),
}

/// A condition on the request alone.
pub(super) trait Check: fmt::Debug + Send + Sync + AsAny {
    fn holds(&self, f: &Facts<'_>) -> bool;
    /// One line for GET /v1/policy and `policy check`.
    fn describe(&self) -> String;
    /// The entries under which the rule index finds the rule, if this condition can
    /// anchor it (a rule with no anchor is a candidate for every request).
    fn anchor(&self) -> Option<Anchor> {
        None
    }
    /// The listed prefix the request matched, recorded with the decision.
    fn matched_prefix(&self, _f: &Facts<'_>) -> Option<String> {
        None
    }
    /// A warning for `policy check` (after "rule `name` "), e.g. that the rule can
    /// never match.
    fn lint(&self, _scope: &LintScope<'_>) -> Option<String> {
        None
    }
}

/// A condition that counts: it holds once its key is over the limit.
pub(super) trait Limit: fmt::Debug + Send + Sync {
    fn spec(&self) -> &CounterSpec;
    /// One line for GET /v1/policy and `policy check`.
    fn describe(&self) -> String;
    /// Counts this request where the condition counts requests, records its reading,
    /// and says whether the key is over the limit (an error: the counters cannot be
    /// reached, and the request gets `on_error`).
    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError>;
    /// Whether it learns from outcomes, so every allowed request must be tracked.
    fn is_adaptive(&self) -> bool {
        false
    }
    /// What to count of an allowed request's outcome, and how long to wait for it
    /// (`counters` as they are when it is allowed, for conditions that learn only from
    /// part of it). An adaptive condition whose `over` ran pushes the same to
    /// `cx.pending.tracked` from what it read there; this is for a request allowed
    /// before its rule was reached.
    fn track(
        &self,
        _rule: &str,
        _f: &Facts<'_>,
        _counters: &dyn CounterStore,
        _now_ms: i64,
    ) -> Result<Option<(TrackedKey, i64)>, PolicyError> {
        Ok(None)
    }
    /// How much history it needs to be relearned from the store at start.
    fn lookback_ms(&self) -> i64 {
        self.spec().window_ms
    }
}

/// What a counting condition works with for one request.
pub(super) struct CounterContext<'a> {
    pub(super) rule: &'a str,
    pub(super) facts: &'a Facts<'a>,
    pub(super) now_ms: i64,
    /// The request's price: upper-case currency and amount.
    pub(super) price: Option<&'a (String, f64)>,
    pub(super) counters: &'a dyn CounterStore,
    pub(super) readings: &'a mut Vec<CounterReading>,
    /// What this decision keeps for later: spend reserved, what to track if allowed.
    pub(super) pending: &'a mut Pending,
}

/// What a decision's counting leaves for its end.
#[derive(Default)]
pub(super) struct Pending {
    /// Spend reserved for this request: counter, window, amount. Taken back when the
    /// request is denied after all, since Sinch charges only allowed attempts.
    pub(super) spend: Vec<(CounterKey, i64, f64)>,
    /// What adaptive conditions track of the request if it is allowed (and how long to
    /// wait for its result), from the counters they just read: see [`Limit::track`].
    pub(super) tracked: Vec<(TrackedKey, i64)>,
    /// The rules whose counters ran, so whose tracking is in `tracked`.
    pub(super) counted: Vec<usize>,
}

impl CounterContext<'_> {
    /// Records a reading for the decision's explanation; true when it is over `max`.
    pub(super) fn reading(&mut self, condition: String, key: String, value: f64, max: f64) -> bool {
        self.readings.push(CounterReading {
            rule: self.rule.to_owned(),
            condition,
            key,
            value,
            max,
        });
        value > max
    }
}

/// Entries the rule index files a rule under. When several conditions of a rule can
/// anchor it, the most selective wins: numbers, then prefixes, then countries.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Anchor {
    Numbers(Vec<String>),
    Prefixes(Vec<String>),
    Countries(Vec<String>),
}

/// What a condition's `policy check` warning sees.
pub(super) struct LintScope<'a> {
    /// Every condition of its own rule.
    pub(super) rule: &'a Conditions,
    pub(super) enforced: bool,
    /// The earlier enforced rules that decide on their checks alone (no counters).
    pub(super) earlier: &'a [(&'a str, &'a Conditions)],
}

/// A rule's checks, all of which must hold.
#[derive(Debug, Default)]
pub(super) struct Conditions {
    checks: Vec<Box<dyn Check>>,
}

impl Conditions {
    pub(super) fn holds(&self, f: &Facts<'_>) -> bool {
        self.checks.iter().all(|c| c.holds(f))
    }

    pub(super) fn matched_prefix(&self, f: &Facts<'_>) -> Option<String> {
        self.checks.iter().find_map(|c| c.matched_prefix(f))
    }

    pub(super) fn anchor(&self) -> Option<Anchor> {
        self.checks.iter().filter_map(|c| c.anchor()).min()
    }

    /// The check of type `T`, when the rule has one.
    pub(super) fn get<T: Check + 'static>(&self) -> Option<&T> {
        self.checks
            .iter()
            // `as_ref` first: a `Box<dyn Check>` is itself `Any`.
            .find_map(|c| c.as_ref().as_any().downcast_ref::<T>())
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &dyn Check> {
        self.checks.iter().map(AsRef::as_ref)
    }

    pub(super) fn len(&self) -> usize {
        self.checks.len()
    }
}

/// Lets [`Conditions::get`] find a check by type (trait upcasting needs Rust 1.86).
pub(super) trait AsAny: Any {
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A rule's compiled conditions, in registry order, and their descriptions.
#[derive(Debug, Default)]
pub(super) struct CompiledConditions {
    pub(super) checks: Conditions,
    pub(super) limits: Vec<Box<dyn Limit>>,
    pub(super) summary: Vec<String>,
}

impl CompiledConditions {
    fn push(&mut self, compiled: Compiled) {
        match compiled {
            Compiled::Check(check) => {
                self.summary.push(check.describe());
                self.checks.checks.push(check);
            }
            Compiled::Limit(limit) => {
                self.summary.push(limit.describe());
                self.limits.push(limit);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Helpers the conditions share

/// The policy's named lists, for `@name` entries.
pub(super) struct CompileContext<'a> {
    pub(super) lists: &'a BTreeMap<String, Vec<String>>,
}

impl CompileContext<'_> {
    /// The entries of a list-valued condition, `@name` references expanded; an unknown
    /// list or an empty result is an error.
    pub(super) fn entries(&self, field: &OneOrMany, what: &str) -> Result<Vec<String>, String> {
        let mut out = Vec::new();
        for item in field.items() {
            match item.strip_prefix('@') {
                Some(name) => match self.lists.get(name) {
                    Some(list) => out.extend(list.iter().cloned()),
                    None => return Err(format!("{what}: no list named `{name}` in [lists]")),
                },
                None => out.push(item.to_owned()),
            }
        }
        if out.is_empty() {
            return Err(format!("{what}: the list is empty"));
        }
        Ok(out)
    }
}

/// One value or a list of them; `@name` stands for a list from [lists].
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn items(&self) -> &[String] {
        match self {
            OneOrMany::One(s) => std::slice::from_ref(s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// E.164 entries (`+`, then at least `min` digits, no leading 0).
pub(super) fn e164_entries(
    items: Vec<String>,
    min: usize,
    what: &str,
) -> Result<Vec<String>, String> {
    match items
        .iter()
        .find(|v| crate::phone::e164_digits(v).is_none_or(|d| d.len() < min))
    {
        Some(v) => Err(format!(
            "{what} `{v}` must be `+` followed by digits (E.164, no leading 0)"
        )),
        None => Ok(items),
    }
}

/// A check that a text field of the request matches a regular expression from the
/// policy file (compiled with a bound on its size); a request without the field fails it.
pub(super) fn field_pattern(
    text: &str,
    name: &'static str,
    field: fn(&VerificationRequestEvent) -> Option<&str>,
) -> Result<Compiled, String> {
    let pattern = regex::RegexBuilder::new(text)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("{name} pattern does not compile: {e}"))?;
    Ok(Compiled::Check(Box::new(FieldMatches {
        name,
        field,
        pattern,
    })))
}

struct FieldMatches {
    name: &'static str,
    field: fn(&VerificationRequestEvent) -> Option<&str>,
    pattern: regex::Regex,
}

impl fmt::Debug for FieldMatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ~ /{}/", self.name, self.pattern.as_str())
    }
}

impl Check for FieldMatches {
    fn holds(&self, f: &Facts<'_>) -> bool {
        (self.field)(f.request).is_some_and(|v| self.pattern.is_match(v))
    }

    fn describe(&self) -> String {
        format!("{self:?}")
    }
}

/// How long after being allowed a verification without a result counts as failed,
/// unless the rule says otherwise.
pub(super) fn default_complete_after() -> String {
    "10m".into()
}

/// How far back adaptive conditions learn what is normal, unless the rule says otherwise.
pub(super) fn default_baseline() -> String {
    "24h".into()
}

/// The totals of a (successes, finished) counter pair over a window.
pub(super) fn pair_totals(
    counters: &dyn CounterStore,
    (ok, all): &(CounterKey, CounterKey),
    window_ms: i64,
    now_ms: i64,
) -> Result<(f64, f64), PolicyError> {
    Ok((
        counters.total(ok, window_ms, now_ms)?,
        counters.total(all, window_ms, now_ms)?,
    ))
}

/// A duration like `10m` (not zero), in milliseconds.
pub(super) fn duration_ms(text: &str) -> Option<i64> {
    humantime::parse_duration(text)
        .ok()
        .filter(|d| !d.is_zero())
        .and_then(|d| i64::try_from(d.as_millis()).ok())
}

/// A duration in milliseconds as a policy writes it (`1h 30m`): the reverse of
/// [`duration_ms`], for summaries and messages.
pub(super) fn written_ms(ms: i64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms.unsigned_abs())).to_string()
}

/// A `policy test` case's fields beyond name, number, time and expectation.
pub(super) type CaseFields = BTreeMap<String, toml::Value>;

/// The case field `key` as a string, if given.
pub(super) fn case_text<'a>(case: &'a CaseFields, key: &str) -> Result<Option<&'a str>, String> {
    case.get(key)
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("`{key}` must be a string"))
        })
        .transpose()
}

/// A condition's value as written, with where it was written.
pub(super) struct At<C: Condition>(Spanned<C::File>);

impl<C: Condition> At<C> {
    pub(super) fn get_ref(&self) -> &C::File {
        self.0.get_ref()
    }

    pub(super) fn span(&self) -> Range<usize> {
        self.0.span()
    }
}

impl<C: Condition> fmt::Debug for At<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.get_ref().fmt(f)
    }
}

impl<'de, C: Condition> Deserialize<'de> for At<C> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Spanned::<C::File>::deserialize(d).map(At)
    }
}

impl<C: Condition> JsonSchema for At<C> {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        C::File::schema_name()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut schema = generator.subschema_for::<C::File>();
        schema.insert(
            "description".into(),
            format!("Holds when {}.", C::HOLDS_WHEN).into(),
        );
        schema
    }
}

/// A condition's entry in the catalogue: for docs/policy.md, tests and `policy test`.
pub(super) struct ConditionInfo {
    pub(super) key: &'static str,
    pub(super) holds_when: &'static str,
    pub(super) example: &'static str,
    pub(super) case_fields: &'static [&'static str],
    pub(super) apply_case: fn(&CaseFields, &mut VerificationRequestEvent) -> Result<(), String>,
}

/// The `policy test` case fields the conditions read.
pub(super) fn case_fields() -> Vec<&'static str> {
    catalogue()
        .iter()
        .flat_map(|c| c.case_fields.iter().copied())
        .collect()
}

/// Sets a test case's request fields, each through the condition that reads it.
pub(super) fn apply_case(
    case: &CaseFields,
    request: &mut VerificationRequestEvent,
) -> Result<(), String> {
    catalogue()
        .iter()
        .try_for_each(|c| (c.apply_case)(case, request))
}

/// Every condition in words, for `verigate policy conditions`.
pub fn reference() -> String {
    let mut out = String::new();
    for c in catalogue() {
        out.push_str(&format!(
            "{}\n  holds when {}\n  e.g. {}\n",
            c.key, c.holds_when, c.example
        ));
        if !c.case_fields.is_empty() {
            out.push_str(&format!(
                "  policy test case fields: {}\n",
                c.case_fields.join(", ")
            ));
        }
    }
    out
}

/// The conditions table of docs/policy.md.
#[cfg(test)]
pub(super) fn docs_table() -> String {
    let mut out = String::from("| condition | holds when | example |\n| --- | --- | --- |\n");
    for c in catalogue() {
        out.push_str(&format!(
            "| `{}` | {} | `{}` |\n",
            c.key, c.holds_when, c.example
        ));
    }
    out
}

/// Every condition verigate knows, in the order rules compile them: checks on the
/// request first, then counters. Among counters the adaptive ones come first, because a
/// rule's quarantine is kept under its first counter's key. A new condition is a module
/// in this folder and one line here.
macro_rules! registry {
    ($($key:ident => $module:ident :: $kind:ident),* $(,)?) => {
        $(mod $module;)*

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
            /// With replicas on PostgreSQL: `exact` (the default) or `approximate`, counted
            /// by each replica and shared every 25 ms (docs/replicas.md).
            #[serde(default)]
            #[schemars(with = "Option<Counting>")]
            pub(super) counting: Option<Spanned<Counting>>,
            $(pub(super) $key: Option<At<$module::$kind>>,)*
            /// Quarantine the key for this long when the rule trips (doubling on repeat), e.g. 1h.
            #[schemars(with = "Option<String>")]
            pub(super) block_for: Option<Spanned<String>>,
            /// The longest quarantine after doubling, e.g. 24h.
            #[schemars(with = "Option<String>")]
            pub(super) max_block: Option<Spanned<String>>,
            /// Share of requests let through a quarantine to see whether it still holds (0 to 0.5),
            /// divided by the block's strikes: a key blocked for the third time in a row is
            /// probed a third as often.
            #[schemars(with = "Option<f64>")]
            pub(super) probe: Option<Spanned<f64>>,
            /// A deny rule that lets a returning number (its latest finished verification
            /// succeeded) go on to the next rule instead of denying it.
            #[schemars(with = "Option<bool>")]
            pub(super) spare_returning: Option<Spanned<bool>>,
        }

        impl RuleFile {
            /// Compiles the rule's conditions; an error carries the condition's location.
            pub(super) fn conditions(
                &self,
                cx: &CompileContext<'_>,
            ) -> Result<CompiledConditions, (Option<Range<usize>>, String)> {
                let mut out = CompiledConditions::default();
                $(
                    if let Some(at) = &self.$key {
                        let compiled = <$module::$kind as Condition>::compile(at.get_ref(), cx)
                            .map_err(|m| (Some(at.span()), m))?;
                        out.push(compiled);
                    }
                )*
                Ok(out)
            }
        }

        /// Every condition, in registry order.
        pub(super) fn catalogue() -> Vec<ConditionInfo> {
            vec![$(ConditionInfo {
                key: stringify!($key),
                holds_when: <$module::$kind as Condition>::HOLDS_WHEN,
                example: <$module::$kind as Condition>::EXAMPLE,
                case_fields: <$module::$kind as Condition>::CASE_FIELDS,
                apply_case: <$module::$kind as Condition>::apply_case,
            }),*]
        }
    };
}

registry! {
    method => method::Method,
    country => country::Country,
    country_not_in => country_not_in::CountryNotIn,
    prefix => prefix::Prefix,
    number => number::Number,
    price_above => price_above::PriceAbove,
    reference => reference::Reference,
    custom => custom::Custom,
    accept_language => accept_language::AcceptLanguage,
    time => time::Time,
    conversion => conversion::Conversion,
    sinch_fraud => sinch_fraud::SinchFraud,
    surge => surge::Surge,
    rate_limit => rate_limit::RateLimit,
    distinct_numbers => distinct_numbers::DistinctNumbers,
    spend => spend::Spend,
}

/// Country codes as a rule lists them: ISO 3166 alpha-2 in upper case, or `unknown`.
pub(super) fn territories(items: Vec<String>) -> Result<HashSet<String>, String> {
    items
        .into_iter()
        .map(|c| {
            let upper = c.to_ascii_uppercase();
            if upper == "UNKNOWN" {
                Ok("unknown".to_owned())
            } else if upper.len() == 2 && upper.bytes().all(|b| b.is_ascii_uppercase()) {
                Ok(upper)
            } else {
                Err(format!(
                    "`{c}` is not an ISO 3166 alpha-2 country code (or `unknown`)"
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests;
