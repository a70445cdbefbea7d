//! What a decision is, shared by the policy that makes it, the store that keeps it and the
//! HTTP layer that answers with it. Nothing here decides or stores anything: these are the
//! values passed between those parts, so none of them needs to import another.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::events::{Action, ResponseFields};

/// The outcome for one request event, with enough context to explain it later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecision {
    pub action: Action,
    /// The rule that decided; `None` when the policy default applied.
    pub rule: Option<String>,
    /// Why, in words an operator reads in a log line or record.
    pub reason: String,
    /// Answer fields for the request's method (empty for a deny).
    #[serde(default)]
    pub response: ResponseFields,
    #[serde(default)]
    pub explanation: Explanation,
    /// Rules that would have denied and let the request go on because its number is
    /// returning (`spare_returning`): counted in metrics, said in `reason`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spared: Vec<String>,
}

impl PolicyDecision {
    /// A decision by `rule` (`None`: a default), answered with Sinch's defaults and no
    /// explanation beyond `reason`: what a simple policy needs.
    pub fn new(action: Action, rule: Option<&str>, reason: impl Into<String>) -> Self {
        Self {
            action,
            rule: rule.map(str::to_owned),
            reason: reason.into(),
            response: ResponseFields::default(),
            explanation: Explanation::default(),
            spared: Vec::new(),
        }
    }
}

/// Everything that went into a decision; stored with the record and logged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Explanation {
    /// Shadow rules that matched: what they would have done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowMatch>,
    /// The number's territory (`unknown` when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    /// The prefix that matched, for a prefix rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched_prefix: Option<String>,
    /// Counter readings of the rules evaluated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counters: Vec<CounterReading>,
    /// A quarantine that decided this request, let it through as a probe, or started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine: Option<QuarantineNote>,
    #[serde(default)]
    pub policy_version: String,
    #[serde(default)]
    pub eval_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct QuarantineNote {
    pub rule: String,
    pub key: String,
    /// `None`: pinned.
    pub until: Option<DateTime<Utc>>,
    /// `blocked` (already in quarantine), `tripped` (this request started it) or `probe`
    /// (in quarantine, let through so recovery can be seen).
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ShadowMatch {
    pub rule: String,
    pub would: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CounterReading {
    pub rule: String,
    /// `rate_limit`, `distinct_numbers` or `spend`.
    pub condition: String,
    pub key: String,
    pub value: f64,
    pub max: f64,
}

/// The answer verigate gave, and why: the decision as it is stored with a verification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DecisionRecord {
    pub action: Action,
    pub rule: Option<String>,
    pub reason: String,
    /// True when `action` is the policy's `on_error` answer, not a rule's or the default's.
    pub on_error: bool,
    pub policy_version: String,
    pub decided_at: DateTime<Utc>,
    /// The exact JSON body answered to Sinch.
    pub answer: serde_json::Value,
    /// Shadow matches, facts and counters behind the decision.
    #[serde(default)]
    pub explanation: Explanation,
}

impl DecisionRecord {
    pub fn new(
        decision: &PolicyDecision,
        on_error: bool,
        policy_version: &str,
        decided_at: DateTime<Utc>,
        answer: serde_json::Value,
    ) -> Self {
        Self {
            action: decision.action,
            rule: decision.rule.clone(),
            reason: decision.reason.clone(),
            on_error,
            policy_version: policy_version.to_owned(),
            decided_at,
            answer,
            explanation: decision.explanation.clone(),
        }
    }

    /// The deciding rule as metrics and stats name it: a rule, `default` or `on_error`.
    pub fn rule_label(&self) -> &str {
        match (&self.rule, self.on_error) {
            (_, true) => "on_error",
            (Some(rule), false) => rule,
            (None, false) => "default",
        }
    }
}
