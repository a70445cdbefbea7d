//! Deciding allow/deny for a verification request.
//!
//! [`Policy`] is the seam: verigate calls `decide` for every request event and answers
//! `on_error()` whenever a decision cannot be made. [`RulesPolicy`] is the default
//! implementation: ordered rules from a TOML file (docs/policy.md), first enforced match
//! decides, shadow rules are evaluated and recorded but never decide, and the file can be
//! reloaded while requests are being answered.

mod compiled;
pub mod counters;
pub mod country;
mod file;
pub mod reload;
mod rules;
pub mod tools;
pub mod trie;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use compiled::normalise_number;
pub use file::PolicyLoadError;
pub use rules::RulesPolicy;

use crate::events::{Action, ResponseFields, VerificationRequestEvent};

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
}

/// Everything that went into a decision; stored with the record and logged.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub policy_version: String,
    #[serde(default)]
    pub eval_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowMatch {
    pub rule: String,
    pub would: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CounterReading {
    pub rule: String,
    /// `rate_limit`, `distinct_numbers` or `spend`.
    pub condition: String,
    pub key: String,
    pub value: f64,
    pub max: f64,
}

/// A decision that could not be made; the caller answers `on_error` instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// How a verification that a rule touched ended, reported back to the policy.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    /// The deciding rule (`None`: the default).
    pub rule: Option<&'a str>,
    /// Shadow rules that matched.
    pub shadow: &'a [ShadowMatch],
    /// The verification's final status (`SUCCESSFUL`, `FAIL`, …).
    pub status: &'a str,
}

/// Anything that can decide allow/deny. `decide` must be quick and must not block for
/// long: Sinch waits for the answer (verigate enforces `policy.decision_deadline`).
pub trait Policy: Send + Sync + 'static {
    fn decide(
        &self,
        request: &VerificationRequestEvent,
        now: DateTime<Utc>,
    ) -> Result<PolicyDecision, PolicyError>;

    /// What to answer when `decide` fails or the decision cannot be recorded.
    fn on_error(&self) -> Action;

    /// Identifies the policy content in records and logs (e.g. a content hash).
    fn version(&self) -> String;

    /// Re-reads the policy's source; returns the new version. The old policy stays in
    /// force when this fails.
    fn reload(&self) -> Result<String, PolicyError> {
        Err(PolicyError("this policy cannot be reloaded".into()))
    }

    /// A description for `GET /v1/policy`.
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "version": self.version() })
    }

    /// Learns how a verification it decided on ended (for per-rule outcome counts).
    fn observe_outcome(&self, _outcome: Outcome<'_>) {}

    /// Rate-limit and similar keys held in memory, for metrics.
    fn counter_keys(&self) -> usize {
        0
    }
}
