//! A policy as verigate evaluates it: compiled rules, their statistics, and the
//! snapshot that holds them with the indexes that find a request's candidate rules.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Range,
    sync::{atomic::AtomicU64, Arc, Mutex},
};

use chrono::{DateTime, Utc};

use super::{
    adaptive::BlockSpec,
    conditions::{Conditions, Limit},
    Counting, Mode,
};
use crate::events::{Action, ResponseFields};
use crate::phone::trie::DigitTrie;

/// Why a rule does not compile: where in the file (when known) and what is wrong.
pub(super) type RuleError = (Option<Range<usize>>, String);

#[derive(Debug)]
pub(super) struct Rule {
    pub(super) name: String,
    pub(super) action: Action,
    pub(super) mode: Mode,
    pub(super) response: Option<ResponseFields>,
    pub(super) note: Option<String>,
    /// Checks on the request alone.
    pub(super) conditions: Conditions,
    /// Counting conditions, adaptive ones first.
    pub(super) limiters: Vec<Box<dyn Limit>>,
    /// Quarantine of the key of the first limiter when the rule trips.
    pub(super) block: Option<BlockSpec>,
    /// How replicas keep its counters.
    pub(super) counting: Counting,
    /// Never denies a returning number: the request goes on to the next rule.
    pub(super) spare_returning: bool,
    /// The conditions as written, for `GET /v1/policy` and `policy check`.
    pub(super) summary: Vec<String>,
}

/// Per-rule counts, kept across reloads by rule name.
#[derive(Debug, Default)]
pub(super) struct RuleStats {
    /// Decisions this rule made (enforced) or would have made (shadow).
    pub(super) hits: AtomicU64,
    /// Returning numbers it let go on where it would have denied them.
    pub(super) spared: AtomicU64,
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
    /// How far back a number's history is read, when a rule spares returning numbers.
    pub(super) returning_within_ms: Option<i64>,
    pub(super) version: String,
    pub(super) loaded_at: DateTime<Utc>,
    pub(super) lists: BTreeMap<String, usize>,
}

impl Snapshot {
    /// The rules whose counters replicas keep approximately.
    pub(super) fn approximate_rules(&self) -> std::collections::HashSet<String> {
        self.rules
            .iter()
            .filter(|r| r.counting == Counting::Approximate)
            .map(|r| r.name.clone())
            .collect()
    }
}
