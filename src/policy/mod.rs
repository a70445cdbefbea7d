//! Deciding allow/deny for a verification request.
//!
//! [`Policy`] is the seam: verigate calls `decide` for every request event and answers
//! `on_error()` whenever a decision cannot be made. [`RulesPolicy`] is the default
//! implementation: ordered rules from a TOML file (docs/policy.md), first enforced match
//! decides, shadow rules are evaluated and recorded but never decide, and the file can be
//! reloaded while requests are being answered.

pub mod adaptive;
mod compiled;
mod conditions;
pub mod counters;
mod description;
mod facts;
mod file;
pub mod flagged;
pub mod persist;
pub mod reload;
mod returning;
mod rules;
pub mod shared;
pub mod tools;

#[cfg(test)]
mod sequential_tests;

use chrono::{DateTime, Utc};

pub use conditions::reference as conditions_reference;
pub use description::{PolicyDescription, ReplicaReport, RuleDescription};
pub use facts::normalise_number;
pub use file::{policy_schema, PolicyLoadError};
pub use returning::{history_of, NumberHistory, MOST_VERIFICATIONS};
pub use rules::RulesPolicy;

pub use crate::decision::{
    CounterReading, Explanation, PolicyDecision, QuarantineNote, ShadowMatch,
};
use crate::events::{Action, VerificationRequestEvent};

/// The schema's complaints about a policy text (empty: valid), for tests of the file
/// format and of every policy tests use.
#[cfg(test)]
pub(crate) fn schema_errors(text: &str) -> Vec<String> {
    let schema = policy_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let value: toml::Value = toml::from_str(text).expect("TOML");
    let instance = serde_json::to_value(value).expect("TOML values are JSON values");
    validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Runs `work` on `policy` where it may wait: at once when the policy is bounded (it
/// answers from memory), else on the blocking pool, so that a policy waiting on its
/// database never holds up the other callbacks of an async worker. `None`: `work`
/// panicked.
pub async fn off_async_workers<T: Send + 'static>(
    policy: &std::sync::Arc<dyn Policy>,
    work: impl FnOnce(&dyn Policy) -> T + Send + 'static,
) -> Option<T> {
    if policy.bounded() {
        return Some(work(policy.as_ref()));
    }
    let policy = std::sync::Arc::clone(policy);
    tokio::task::spawn_blocking(move || work(policy.as_ref()))
        .await
        .ok()
}

/// Whether a rule decides or only records what it would have decided.
#[derive(
    Debug,
    Default,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// The rule decides.
    #[default]
    Enforce,
    /// The rule is evaluated and recorded (what it would have done) but never decides.
    Shadow,
}

/// How replicas sharing PostgreSQL keep a rule's counters. On one machine (sled) every
/// counter is exact and this changes nothing.
#[derive(
    Debug,
    Default,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Counting {
    /// Every count is read and written in the database as the decision is made: a limit
    /// holds exactly across replicas.
    #[default]
    Exact,
    /// Each replica counts in memory and shares its counts every 25 ms: decisions need
    /// no database work for this rule, and a limit may be passed by what the other
    /// replicas counted in the last fraction of a second (docs/replicas.md).
    Approximate,
}

/// A decision made by [`Policy::decide_waiting`], and what the policy still has to write
/// for it (`settling`): verigate awaits that together with recording the event, before
/// the answer leaves, so the two writes cost one wait instead of two.
///
/// `booked` is what the shared outcome book gains with the decision: verigate hands it to
/// the store with the event, which writes it in the record's transaction.
pub struct WaitingDecision<'a> {
    pub decision: PolicyDecision,
    pub settling: Option<futures_util::future::LocalBoxFuture<'a, Result<(), PolicyError>>>,
    pub booked: Option<crate::store::OutcomeBookChange>,
}

/// A verification from the store, as adaptive rules relearn from it at start.
#[derive(Debug, Clone)]
pub struct PastVerification {
    pub id: String,
    /// The request as Sinch sent it, when the number is stored in clear.
    pub request: Option<VerificationRequestEvent>,
    /// When verigate allowed it (`None`: denied, or never asked).
    pub allowed_at: Option<DateTime<Utc>>,
    /// Final status, reason, and when it arrived.
    pub result: Option<(String, Option<String>, DateTime<Utc>)>,
}

/// A decision that could not be made; the caller answers `on_error` instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// How a verification that a rule touched ended, reported back to the policy.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    pub id: &'a str,
    /// The deciding rule (`None`: the default).
    pub rule: Option<&'a str>,
    /// Shadow rules that matched.
    pub shadow: &'a [ShadowMatch],
    /// The verification's final status (`SUCCESSFUL`, `FAIL`, …) and its reason.
    pub status: &'a str,
    pub reason: Option<&'a str>,
    pub at: DateTime<Utc>,
    /// What the store took out of the shared outcome book with the result's record.
    pub book: BookTaking<'a>,
}

/// Whether the store took a result's verification out of the policy's shared outcome
/// book (see [`Learning::takes_from_book`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookTaking<'a> {
    /// The policy did not ask: it takes the verification out of its book itself.
    NotAsked,
    /// The store took it with the result's record: what it was tracked with (JSON), or
    /// `None` when it was not in the book.
    Taken(Option<&'a str>),
}

/// Anything that can decide allow/deny: `decide`, `on_error` and `version` are all a
/// policy must have (see examples/custom_policy.rs). The rest are defaults a policy may
/// override; what adaptive policies add is in [`Learning`] and [`Quarantines`].
pub trait Policy: Send + Sync + 'static {
    /// Decides one request event. Must be quick and must not block for long: Sinch waits
    /// for the answer (verigate enforces `policy.decision_deadline`).
    /// `history` is what the store knows of the number, looked up only for a policy
    /// that asks for it ([`number_history_window`](Self::number_history_window)).
    fn decide(
        &self,
        request: &VerificationRequestEvent,
        history: NumberHistory,
        now: DateTime<Utc>,
    ) -> Result<PolicyDecision, PolicyError>;

    /// What to answer when `decide` fails or the decision cannot be recorded.
    fn on_error(&self) -> Action;

    /// Identifies the policy content in records and logs (e.g. a content hash).
    fn version(&self) -> String;

    /// A description for `GET /v1/policy`.
    fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "version": self.version() })
    }

    /// Re-reads the policy's source; returns the new version. The old policy stays in
    /// force when this fails.
    fn reload(&self) -> Result<String, PolicyError> {
        Err(PolicyError("this policy cannot be reloaded".into()))
    }

    /// The files `reload` reads (watched for changes); empty when there are none.
    fn sources(&self) -> Vec<std::path::PathBuf> {
        Vec::new()
    }

    /// True for a policy that decides in microseconds without blocking (no I/O, no
    /// waiting on locks held for long): verigate then calls `decide` on the HTTP worker
    /// itself. Otherwise (the default) `decide` runs on the blocking pool, so a slow policy
    /// cannot hold up other callbacks past the decision deadline.
    fn bounded(&self) -> bool {
        false
    }

    /// For a policy whose decisions wait on a database: the decision as a future that
    /// waits without holding a thread, awaited on the HTTP worker under the decision
    /// deadline. `None` (the default): `decide` is called as [`bounded`](Self::bounded)
    /// says.
    fn decide_waiting<'a>(
        &'a self,
        _request: &'a VerificationRequestEvent,
        _history: NumberHistory,
        _now: DateTime<Utc>,
    ) -> Option<futures_util::future::LocalBoxFuture<'a, Result<WaitingDecision<'a>, PolicyError>>>
    {
        None
    }

    /// How far back the store should look at a request's number before `decide`, for a
    /// policy that spares returning users (`None`, the default: it reads no history, and
    /// nothing is looked up).
    fn number_history_window(&self) -> Option<std::time::Duration> {
        None
    }
    /// What the policy learns from outcomes and keeps across restarts, if anything.
    fn learning(&self) -> Option<&dyn Learning> {
        None
    }

    /// The keys the policy blocks by itself, if it does.
    fn quarantines(&self) -> Option<&dyn Quarantines> {
        None
    }
}

/// A policy that learns from how verifications ended (adaptive rules).
pub trait Learning: Send + Sync {
    /// Learns how a verification it decided on ended.
    fn observe_outcome(&self, outcome: Outcome<'_>);

    /// For a policy that learns in a database: the same, as a future that waits without
    /// holding a thread, awaited on the HTTP worker. `None` (the default):
    /// `observe_outcome` runs on the blocking pool.
    fn observe_outcome_waiting<'a>(
        &'a self,
        _outcome: Outcome<'a>,
    ) -> Option<futures_util::future::LocalBoxFuture<'a, ()>> {
        None
    }

    /// Whether the store is to take a result with this final `status` out of the
    /// policy's shared outcome book as it records the result (in the same transaction);
    /// the outcome then tells what it took. `false` (the default): the policy keeps its
    /// book itself.
    fn takes_from_book(&self, _status: &str, _reason: Option<&str>) -> bool {
        false
    }

    /// Rate-limit and similar keys held in memory, for metrics.
    fn counter_keys(&self) -> usize {
        0
    }

    /// State to keep across restarts, with a number that changes whenever it does.
    fn saved_state(&self) -> Option<(u64, serde_json::Value)> {
        None
    }

    /// How far back the store's history is needed at start (`None`: not at all).
    fn lookback(&self) -> Option<std::time::Duration> {
        None
    }

    /// At start, before the first decision: takes back the saved state. With a
    /// [`lookback`](Self::lookback), [`relearn`](Self::relearn) follows, and until it
    /// comes the policy decides with what it has, holding back what it observes.
    fn restore(&self, _saved: Option<serde_json::Value>, _now: DateTime<Utc>) {}

    /// Relearns from the stored verifications of the lookback (any order), while
    /// decisions go on; returns how many observations had waited for it.
    fn relearn(&self, _history: Vec<PastVerification>, _now: DateTime<Utc>) -> usize {
        0
    }

    /// True between `restore` and the end of `relearn`.
    fn relearning(&self) -> bool {
        false
    }
}

/// A policy that puts keys in quarantine by itself, which operators review.
pub trait Quarantines: Send + Sync {
    /// Keys in quarantine now, oldest first.
    fn blocks(&self, now: DateTime<Utc>) -> Vec<adaptive::Block>;

    /// Lifts every block on `key`; returns what was lifted. Fails, changing nothing,
    /// when the shared state that replicas mirror cannot be reached.
    fn lift_block(
        &self,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<Vec<adaptive::Block>, PolicyError>;

    /// Makes every block on `key` permanent; returns what was pinned. Fails, changing
    /// nothing, when the shared state that replicas mirror cannot be reached.
    fn pin_block(&self, key: &str, now: DateTime<Utc>)
        -> Result<Vec<adaptive::Block>, PolicyError>;

    /// Active blocks and the number of blocks, expiries, lifts and pins since start.
    fn block_stats(&self) -> (usize, [u64; 4]);

    /// Keys that shadow rules would have denied lately (on this replica), most recent
    /// first: what no rule acts on but an operator should see.
    fn flagged(&self, _now: DateTime<Utc>) -> Vec<flagged::FlaggedKey> {
        Vec::new()
    }
}
