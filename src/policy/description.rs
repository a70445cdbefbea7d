//! What `GET /v1/policy` shows of a rules policy: the policy in force, each rule with
//! its hits and outcomes, and the replicas that share its state.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Mode;
use crate::events::Action;

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct PolicyDescription {
    /// The loaded file's version: `version` as written, then a hash of the content.
    pub(super) version: String,
    pub(super) loaded_at: DateTime<Utc>,
    /// The policy file; null for a policy built in code.
    pub(super) path: Option<String>,
    /// The answer when no rule decides.
    pub(super) default: Action,
    /// The answer when no decision can be made in time.
    pub(super) on_error: Action,
    /// Named lists, with the number of entries in each.
    pub(super) lists: BTreeMap<String, usize>,
    /// In the order they are checked.
    pub(super) rules: Vec<RuleDescription>,
    /// Why the last reload was refused (the previous policy stayed); null after a good one.
    pub(super) last_reload_error: Option<String>,
    /// Counter keys held in memory (0 when they live in PostgreSQL).
    pub(super) counter_keys: usize,
    /// With PostgreSQL: every replica seen in the last minute. Null on the embedded store.
    pub(super) replicas: Option<Vec<ReplicaReport>>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct RuleDescription {
    pub(super) name: String,
    pub(super) action: Action,
    pub(super) mode: Mode,
    /// The conditions as written in the file.
    pub(super) conditions: Vec<String>,
    pub(super) note: Option<String>,
    /// Requests it decided (enforced) or would have decided (shadow) since it was loaded.
    pub(super) hits: u64,
    /// Returning numbers it let go on where it would have denied them (`spare_returning`).
    pub(super) spared: u64,
    /// Final statuses of the verifications it decided or shadow-matched.
    pub(super) outcomes: BTreeMap<String, u64>,
}

/// One replica as the shared state last heard from it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ReplicaReport {
    pub replica: String,
    /// Whether it is the replica that answered this request.
    pub this: bool,
    pub policy_version: String,
    pub seen_at: DateTime<Utc>,
}
