//! Counters that replicas keep approximately: the rules with `counting = "approximate"`.
//!
//! An exact shared counter costs every decision locked row updates in PostgreSQL, and a
//! busy key (a country's, a range's) is locked by every replica in turn. For a rule
//! whose limit may be passed by a little, each replica instead holds every key of the
//! rule in memory, as the embedded store does, and decides from memory alone: no round
//! trip, no lock. Replicas tell each other what they counted through PostgreSQL
//! (sharing.rs):
//!
//! - Every [`SHARE_EVERY`] a replica appends what it counted since its last share as one
//!   numbered row of a log, and takes in the rows the others appended since it last
//!   looked. So it sees its own counts at once and the others' within two share periods
//!   plus a round trip. What N replicas let through under a limit of `max` is at most
//!   `max` plus what the other replicas counted in that lag, and never more than
//!   N × `max`: each replica alone keeps its own view under `max`.
//! - Every [`FLUSH_EVERY`] it adds what it counted since its last flush to the per-key
//!   tables (`verigate_counts`, `verigate_seen`), and in the same transaction the number
//!   of its last share they include. A replica that starts (or starts counting a rule
//!   approximately) loads the tables and the log rows past each replica's flushed share,
//!   all read in one snapshot: nothing counted twice, nothing missed.
//!
//! Nothing counted is lost while the database answers: a share or a flush that fails is
//! sent again with the next. A replica that misses log rows (an outage longer than the
//! log keeps them) loads everything again.
//!
//! Levels (a sequential test's evidence, a surge's first sighting) stay exact: their
//! steps do not add up across replicas.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::counter_ops::{CounterOp, OpKind, OpResult};
use crate::policy::counters::CounterKey;

/// How often a replica shares what it counted and takes in what the others shared.
pub(crate) const SHARE_EVERY: Duration = Duration::from_millis(25);
/// How often a replica adds what it counted to the per-key tables a starting replica
/// loads. Rarely: a busy key's counts of many shares become one row update.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// How often counts that left their window are let go of.
const SWEEP_EVERY_MS: i64 = 1_000;

/// Keys are looked up on every decision: a quick hash (its seed is random per process).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The database's bucket for a time, as `verigate_counter_ops` computes it.
fn bucket_of(now_ms: i64, span_ms: i64) -> i64 {
    let width = (span_ms / 10).max(1);
    now_ms.div_euclid(width) * width
}

/// One key's counts, every replica's: an amount per bucket, and for a distinct count
/// each member's latest sighting (a member counts once, in the bucket of that sighting,
/// as `verigate_counter_ops` counts it).
#[derive(Debug, Default)]
struct Entry {
    span_ms: i64,
    /// (bucket start in ms, amount), in bucket order.
    buckets: Vec<(i64, f64)>,
    members: FastMap<String, i64>,
}

impl Entry {
    fn total(&self, now_ms: i64, span_ms: i64) -> f64 {
        let from = now_ms - span_ms;
        self.buckets
            .iter()
            .filter(|(bucket, _)| *bucket > from)
            .map(|(_, amount)| amount)
            .sum()
    }

    fn add(&mut self, bucket: i64, amount: f64) {
        match self.buckets.binary_search_by_key(&bucket, |(b, _)| *b) {
            Ok(i) => self.buckets[i].1 += amount,
            Err(i) => self.buckets.insert(i, (bucket, amount)),
        }
    }

    /// A sighting of `member` at `seen_ms`; one older than the member's latest changes
    /// nothing (another replica's, arriving late).
    fn see(&mut self, member: &str, seen_ms: i64) {
        let span = self.span_ms;
        let bucket = bucket_of(seen_ms, span);
        let last = match self.members.get_mut(member) {
            Some(last) if *last >= seen_ms => return,
            Some(last) => Some(std::mem::replace(last, seen_ms)),
            None => {
                self.members.insert(member.to_owned(), seen_ms);
                None
            }
        };
        match last.map(|last| bucket_of(last, span)) {
            Some(old) if old > seen_ms - span => {
                if old != bucket {
                    self.add(old, -1.0);
                    self.add(bucket, 1.0);
                }
            }
            _ => self.add(bucket, 1.0),
        }
    }

    /// Lets go of what left the window; whether anything is left.
    fn sweep(&mut self, now_ms: i64) -> bool {
        let from = now_ms - self.span_ms;
        self.buckets.retain(|(bucket, _)| *bucket > from);
        self.members.retain(|_, seen| *seen > from);
        !self.buckets.is_empty() || !self.members.is_empty()
    }
}

/// What this replica counted under one key and has not shared (or flushed) yet.
#[derive(Debug, Default, Clone)]
struct KeyTally {
    span_ms: i64,
    adds: Vec<(i64, f64)>,
    /// Member and its latest sighting.
    sightings: FastMap<String, i64>,
}

impl KeyTally {
    fn add(&mut self, bucket: i64, amount: f64) {
        match self.adds.iter_mut().find(|(b, _)| *b == bucket) {
            Some((_, sum)) => *sum += amount,
            None => self.adds.push((bucket, amount)),
        }
    }

    fn see(&mut self, member: &str, seen_ms: i64) {
        match self.sightings.get_mut(member) {
            Some(last) => *last = (*last).max(seen_ms),
            None => {
                self.sightings.insert(member.to_owned(), seen_ms);
            }
        }
    }
}

/// Changes this replica made, merged per key and bucket (a busy key's many adds become
/// one), with the keys it forgot.
#[derive(Debug, Default, Clone)]
pub(crate) struct Tally {
    forgets: Vec<(String, String)>,
    keys: FastMap<CounterKey, KeyTally>,
}

impl Tally {
    fn key(&mut self, key: &CounterKey, span_ms: i64) -> &mut KeyTally {
        let tally = slot(&mut self.keys, key);
        tally.span_ms = span_ms;
        tally
    }

    /// Drops what was counted under `rule` and `value` (counted before a forget).
    fn drop_key(&mut self, rule: &str, value: &str) {
        self.keys
            .retain(|key, _| !(key.rule == rule && key.value == value));
    }

    /// Takes in `older`: changes made before this tally's (a share that failed). What
    /// this tally forgot since is dropped from them.
    fn absorb(&mut self, mut older: Tally) {
        for (rule, value) in &self.forgets {
            older.drop_key(rule, value);
        }
        older.forgets.append(&mut self.forgets);
        self.forgets = older.forgets;
        self.add_counts(older.keys);
    }

    /// Adds `other`'s counts to this tally's, the smaller into the larger: for what waits
    /// to be flushed, where the order does not matter (a flush only adds).
    fn merge_counts(&mut self, mut other: Tally) {
        if other.keys.len() > self.keys.len() {
            std::mem::swap(self, &mut other);
        }
        self.add_counts(other.keys);
        self.forgets.clear();
    }

    fn add_counts(&mut self, keys: FastMap<CounterKey, KeyTally>) {
        for (key, tally) in keys {
            let mine = self.keys.entry(key).or_default();
            mine.span_ms = tally.span_ms;
            for (bucket, amount) in tally.adds {
                mine.add(bucket, amount);
            }
            for (member, seen_ms) in tally.sightings {
                mine.see(&member, seen_ms);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.forgets.is_empty() && self.keys.is_empty()
    }

    /// As a log row carries it.
    pub(crate) fn share(&self) -> Share {
        Share {
            forgets: self.forgets.clone(),
            keys: self
                .keys
                .iter()
                .map(|(key, tally)| SharedKey {
                    rule: key.rule.clone(),
                    condition: key.condition.clone(),
                    value: key.value.clone(),
                    span_ms: tally.span_ms,
                    adds: tally
                        .adds
                        .iter()
                        .filter(|(_, a)| *a != 0.0)
                        .copied()
                        .collect(),
                    sightings: tally
                        .sightings
                        .iter()
                        .map(|(m, s)| (m.clone(), *s))
                        .collect(),
                })
                .collect(),
        }
    }
}

/// What one log row carries: keys forgotten first, then counts.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Share {
    #[serde(rename = "f", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) forgets: Vec<(String, String)>,
    #[serde(rename = "k", default)]
    pub(crate) keys: Vec<SharedKey>,
}

/// One key's changes in a share.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct SharedKey {
    #[serde(rename = "r")]
    pub(crate) rule: String,
    #[serde(rename = "c")]
    pub(crate) condition: String,
    #[serde(rename = "v")]
    pub(crate) value: String,
    #[serde(rename = "w")]
    pub(crate) span_ms: i64,
    /// Bucket start (ms) and amount.
    #[serde(rename = "a", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) adds: Vec<(i64, f64)>,
    /// Member and when it was seen (ms).
    #[serde(rename = "s", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) sightings: Vec<(String, i64)>,
}

/// What a replica loads: every key of the rules counted approximately as the per-key
/// tables hold them, and the log rows past what those include.
#[derive(Debug, Default, Clone)]
pub(crate) struct Loaded {
    /// Key, bucket, amount, span (ms).
    pub(crate) counts: Vec<(CounterKey, i64, f64, i64)>,
    /// Key, member, seen (ms), span (ms).
    pub(crate) seen: Vec<(CounterKey, String, i64, i64)>,
    pub(crate) shares: Vec<Share>,
}

/// This replica's approximate counters.
#[derive(Debug, Default)]
pub(crate) struct ApproximateCounters {
    rules: RwLock<Arc<HashSet<String>>>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    entries: FastMap<CounterKey, Entry>,
    /// Own changes not shared yet.
    unsent: Tally,
    /// Own changes shared but not yet flushed into the per-key tables.
    unflushed: Tally,
    /// The rules whose keys were loaded: what the others counted before this replica
    /// started is in memory. Until then a rule counts what this replica sees and is
    /// shared.
    loaded: HashSet<String>,
    swept_ms: i64,
}

/// The value of `key`, made if it is new (looked up first: most keys are in memory
/// already, and those cost no copy of their strings).
fn slot<'a, V: Default>(map: &'a mut FastMap<CounterKey, V>, key: &CounterKey) -> &'a mut V {
    if !map.contains_key(key) {
        map.insert(key.clone(), V::default());
    }
    map.get_mut(key)
        .unwrap_or_else(|| unreachable!("inserted above"))
}

/// The entry of `key`, made if it is new, with the window its counter is asked about.
fn entry_in<'a>(
    entries: &'a mut FastMap<CounterKey, Entry>,
    key: &CounterKey,
    span_ms: i64,
) -> &'a mut Entry {
    let entry = slot(entries, key);
    entry.span_ms = span_ms;
    entry
}

impl State {
    fn entry(&mut self, key: &CounterKey, span_ms: i64) -> &mut Entry {
        entry_in(&mut self.entries, key, span_ms)
    }

    /// Takes in a share (another replica's, or a loaded one) for the rules in `rules`.
    fn apply(&mut self, share: Share, rules: &HashSet<String>) {
        for (rule, value) in &share.forgets {
            self.forget(rule, value);
        }
        for shared in share.keys.into_iter().filter(|k| rules.contains(&k.rule)) {
            let key = CounterKey {
                rule: shared.rule,
                condition: shared.condition,
                value: shared.value,
            };
            let entry = self.entries.entry(key).or_default();
            entry.span_ms = shared.span_ms;
            for (bucket, amount) in shared.adds {
                entry.add(bucket, amount);
            }
            for (member, seen_ms) in &shared.sightings {
                entry.see(member, *seen_ms);
            }
        }
    }

    fn forget(&mut self, rule: &str, value: &str) {
        self.entries
            .retain(|key, _| !(key.rule == rule && key.value == value));
    }

    /// Counts a change of this replica's own, in its view and in what it shares next;
    /// returns the key's entry.
    fn record(&mut self, op: &CounterOp) -> &mut Entry {
        let span_ms = op.span_ms;
        let State {
            entries, unsent, ..
        } = self;
        let entry = entry_in(entries, &op.key, span_ms);
        let tally = unsent.key(&op.key, span_ms);
        if op.kind == OpKind::See {
            let member = op.member.as_deref().unwrap_or_default();
            entry.see(member, op.now_ms);
            tally.see(member, op.now_ms);
        } else {
            let bucket = bucket_of(op.now_ms, span_ms);
            entry.add(bucket, op.amount);
            tally.add(bucket, op.amount);
        }
        entry
    }

    fn sweep(&mut self, now_ms: i64) {
        if now_ms - self.swept_ms < SWEEP_EVERY_MS {
            return;
        }
        self.swept_ms = now_ms;
        self.entries.retain(|_, entry| entry.sweep(now_ms));
    }
}

impl ApproximateCounters {
    /// The rules counted approximately (from the policy in force).
    pub(crate) fn set_rules(&self, rules: HashSet<String>) {
        // A rule that leaves approximate counting is loaded afresh if it comes back.
        self.state().loaded.retain(|rule| rules.contains(rule));
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(rules);
    }

    pub(crate) fn rules(&self) -> Arc<HashSet<String>> {
        Arc::clone(&self.rules.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether `op` is answered here rather than in the database.
    pub(crate) fn covers(&self, op: &CounterOp) -> bool {
        matches!(
            op.kind,
            OpKind::Add
                | OpKind::Total
                | OpKind::Members
                | OpKind::See
                | OpKind::AddWithin
                | OpKind::Refund
        ) && self
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&op.key.rule)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The rules counted approximately whose keys are not loaded yet.
    pub(crate) fn to_load(&self) -> Vec<String> {
        let loaded = &self.state().loaded;
        let mut missing: Vec<String> = self
            .rules()
            .iter()
            .filter(|rule| !loaded.contains(*rule))
            .cloned()
            .collect();
        missing.sort();
        missing
    }

    /// Answers `op` from memory, counting what it adds as this replica's own.
    pub(crate) fn answer(&self, op: &CounterOp) -> OpResult {
        let mut state = self.state();
        let (now_ms, span_ms) = (op.now_ms, op.span_ms);
        state.sweep(now_ms);
        let value = match op.kind {
            OpKind::AddWithin => {
                // Checked and added under one lock: this replica alone never passes the cap.
                let total = state.entry(&op.key, span_ms).total(now_ms, span_ms);
                let with = total + op.amount;
                let added = with <= op.cap;
                if added {
                    state.record(op);
                }
                return OpResult {
                    value: with,
                    added,
                    before_ms: None,
                };
            }
            OpKind::Add | OpKind::Refund | OpKind::See => state.record(op).total(now_ms, span_ms),
            _ => state
                .entries
                .get(&op.key)
                .map_or(0.0, |entry| entry.total(now_ms, span_ms)),
        };
        OpResult {
            value,
            ..OpResult::default()
        }
    }

    /// Counts a change whose result nobody reads (an outcome, a refund, an undo).
    pub(crate) fn count(&self, op: &CounterOp) {
        if op.kind != OpKind::See && op.amount == 0.0 {
            return;
        }
        self.state().record(op);
    }

    /// Takes what this replica counted and has not shared yet, for the next share.
    pub(crate) fn take_unsent(&self) -> Tally {
        std::mem::take(&mut self.state().unsent)
    }

    /// The share of `tally` was written (its changes wait for the next flush) or failed
    /// (they go with the next share).
    pub(crate) fn shared(&self, tally: Tally, written: bool) {
        let mut state = self.state();
        if written {
            state.unflushed.merge_counts(tally);
        } else {
            let mut newer = std::mem::take(&mut state.unsent);
            newer.absorb(tally);
            state.unsent = newer;
        }
    }

    /// Takes what this replica shared and has not flushed yet, for a flush.
    pub(crate) fn take_unflushed(&self) -> Tally {
        std::mem::take(&mut self.state().unflushed)
    }

    /// A flush of `tally` failed: it goes with the next.
    pub(crate) fn flush_failed(&self, tally: Tally) {
        self.state().unflushed.merge_counts(tally);
    }

    /// Takes in what other replicas shared.
    pub(crate) fn take_in(&self, shares: Vec<Share>) {
        self.take_in_for(shares, &self.rules());
    }

    /// Takes in what other replicas shared, for `rules` only.
    pub(crate) fn take_in_for(&self, shares: Vec<Share>, rules: &HashSet<String>) {
        let mut state = self.state();
        for share in shares {
            state.apply(share, rules);
        }
    }

    /// Rebuilds the keys of `rules` from what was loaded, with this replica's own changes
    /// not shared yet on top, and marks them loaded.
    pub(crate) fn load(&self, rules: &HashSet<String>, loaded: Loaded) {
        let mut state = self.state();
        state.entries.retain(|key, _| !rules.contains(&key.rule));
        for (key, bucket, amount, span_ms) in loaded.counts {
            state.entry(&key, span_ms).add(bucket, amount);
        }
        for (key, member, seen_ms, span_ms) in loaded.seen {
            state.entry(&key, span_ms).see(&member, seen_ms);
        }
        for share in loaded.shares {
            state.apply(share, rules);
        }
        let own = state.unsent.share();
        state.apply(own, rules);
        state.loaded.extend(rules.iter().cloned());
    }

    /// Forgets `rule`'s counts under `value` (a lifted block starts afresh), here and,
    /// with the next share, on the other replicas.
    pub(crate) fn forget(&self, rule: &str, value: &str) {
        let mut state = self.state();
        state.forget(rule, value);
        state.unsent.drop_key(rule, value);
        state
            .unsent
            .forgets
            .push((rule.to_owned(), value.to_owned()));
        state.unflushed.drop_key(rule, value);
    }

    /// Keys held in memory.
    pub(crate) fn len(&self) -> usize {
        self.state().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: i64 = 60_000;

    fn key(value: &str) -> CounterKey {
        CounterKey {
            rule: "r".into(),
            condition: "rate_limit:country".into(),
            value: value.into(),
        }
    }

    fn counters() -> ApproximateCounters {
        let c = ApproximateCounters::default();
        c.set_rules(HashSet::from(["r".to_owned()]));
        c
    }

    fn add(now_ms: i64) -> CounterOp {
        CounterOp::new(OpKind::Add, &key("SE"), now_ms, SPAN, 1.0)
    }

    fn see(now_ms: i64, member: &str) -> CounterOp {
        CounterOp {
            member: Some(member.into()),
            ..CounterOp::new(OpKind::See, &key("SE"), now_ms, SPAN, 0.0)
        }
    }

    fn total(c: &ApproximateCounters, now_ms: i64) -> f64 {
        c.answer(&CounterOp::new(
            OpKind::Total,
            &key("SE"),
            now_ms,
            SPAN,
            0.0,
        ))
        .value
    }

    /// What another replica shares after counting `ops`.
    fn shared_by_another(ops: &[CounterOp]) -> Share {
        let other = counters();
        ops.iter().for_each(|op| other.count(op));
        other.take_unsent().share()
    }

    #[test]
    fn only_rules_counted_approximately_and_kinds_that_add_up_are_covered() {
        let c = counters();
        assert!(c.covers(&add(0)));
        assert!(c.covers(&see(0, "+46")));
        let level = CounterOp::new(OpKind::Level, &key("SE"), 0, SPAN, 0.0);
        assert!(!c.covers(&level), "levels stay exact");
        let other = CounterOp::new(
            OpKind::Add,
            &CounterKey {
                rule: "exact".into(),
                ..key("SE")
            },
            0,
            SPAN,
            1.0,
        );
        assert!(!c.covers(&other));
    }

    #[test]
    fn own_counts_count_at_once_and_each_is_shared_once() {
        let c = counters();
        assert_eq!(c.answer(&add(1_000)).value, 1.0);
        assert_eq!(c.answer(&add(1_500)).value, 2.0);
        let first = c.take_unsent();
        assert_eq!(
            first.share().keys[0].adds,
            vec![(0, 2.0)],
            "merged per bucket"
        );
        c.shared(first, true);
        assert!(
            c.take_unsent().is_empty(),
            "a written share is not sent again"
        );
        assert_eq!(total(&c, 2_000), 2.0);
        let flush = c.take_unflushed();
        assert_eq!(flush.share().keys[0].adds, vec![(0, 2.0)]);
        assert!(c.take_unflushed().is_empty());
    }

    #[test]
    fn a_failed_share_or_flush_is_sent_again_with_what_came_since() {
        let c = counters();
        c.answer(&add(1_000));
        let failed = c.take_unsent();
        c.answer(&add(2_000));
        c.shared(failed, false);
        let again = c.take_unsent();
        assert_eq!(again.share().keys[0].adds, vec![(0, 2.0)]);
        c.shared(again, true);
        let flush = c.take_unflushed();
        c.answer(&add(3_000));
        c.shared(c.take_unsent(), true);
        c.flush_failed(flush);
        assert_eq!(c.take_unflushed().share().keys[0].adds, vec![(0, 3.0)]);
        assert_eq!(total(&c, 3_000), 3.0, "counted once meanwhile");
    }

    #[test]
    fn another_replicas_share_adds_up_and_a_member_counts_once_across_replicas() {
        let c = counters();
        c.answer(&add(1_000));
        c.take_in(vec![shared_by_another(&[add(1_000), add(7_000)])]);
        assert_eq!(total(&c, 8_000), 3.0);
        let seen = counters();
        assert_eq!(seen.answer(&see(1_000, "+461")).value, 1.0);
        seen.take_in(vec![shared_by_another(&[
            see(900, "+461"),
            see(2_000, "+462"),
        ])]);
        assert_eq!(
            seen.answer(&see(9_000, "+462")).value,
            2.0,
            "each member once"
        );
        // A later sighting moves the member to its bucket; it leaves the window from there.
        assert_eq!(seen.answer(&see(SPAN + 1_000, "+463")).value, 2.0);
        assert_eq!(seen.answer(&see(SPAN + 9_500, "+463")).value, 1.0);
    }

    #[test]
    fn members_are_read_over_a_span_to_a_bucket_without_seeing_one() {
        let c = counters();
        let members = |now_ms, span_ms| {
            let op = CounterOp::new(OpKind::Members, &key("SE"), now_ms, span_ms, 0.0);
            assert!(c.covers(&op));
            c.answer(&op).value
        };
        c.answer(&see(1_000, "+461"));
        c.take_in(vec![shared_by_another(&[see(30_000, "+462")])]);
        c.answer(&see(55_000, "+463"));
        assert_eq!(members(56_000, SPAN), 3.0);
        // Over the last 20 s, to a bucket (6 s): the buckets from 42 s on.
        assert_eq!(members(56_000, 20_000), 1.0);
        assert_eq!(members(56_000, SPAN), 3.0, "reading saw nobody");
    }

    #[test]
    fn counts_leave_the_window_bucket_by_bucket() {
        let c = counters();
        c.answer(&add(1_000));
        c.answer(&add(7_000));
        assert_eq!(total(&c, 7_000), 2.0);
        assert_eq!(total(&c, SPAN + 1_000), 1.0, "the first bucket left");
        assert_eq!(total(&c, SPAN + 7_000), 0.0);
        c.answer(&add(3 * SPAN));
        assert_eq!(
            c.len(),
            1,
            "swept keys that left their window are let go of"
        );
    }

    #[test]
    fn a_cap_holds_for_what_this_replica_knows() {
        let c = counters();
        let spend = |amount| CounterOp {
            cap: 10.0,
            ..CounterOp::new(OpKind::AddWithin, &key("SE"), 1_000, SPAN, amount)
        };
        assert!(c.answer(&spend(6.0)).added);
        c.take_in(vec![shared_by_another(&[CounterOp::new(
            OpKind::Add,
            &key("SE"),
            1_000,
            SPAN,
            3.0,
        )])]);
        let over = c.answer(&spend(2.0));
        assert!(!over.added, "6 + 3 shared + 2 passes 10");
        assert_eq!(over.value, 11.0);
        assert!(c.answer(&spend(1.0)).added);
        assert_eq!(total(&c, 1_000), 10.0);
    }

    #[test]
    fn a_load_rebuilds_from_the_tables_and_the_log_with_own_unshared_changes_on_top() {
        let c = counters();
        let seen_key = CounterKey {
            condition: "distinct".into(),
            ..key("SE")
        };
        let distinct = |now_ms, member: &str| CounterOp {
            member: Some(member.into()),
            ..CounterOp::new(OpKind::See, &seen_key, now_ms, SPAN, 0.0)
        };
        c.answer(&add(1_000));
        c.answer(&distinct(1_000, "+461"));
        assert_eq!(c.to_load(), vec!["r".to_owned()]);
        let loaded = Loaded {
            counts: vec![(key("SE"), 0, 5.0, SPAN)],
            seen: vec![(seen_key.clone(), "+460".into(), 500, SPAN)],
            shares: vec![shared_by_another(&[add(2_000)])],
        };
        c.load(&HashSet::from(["r".to_owned()]), loaded.clone());
        assert!(c.to_load().is_empty());
        assert_eq!(total(&c, 2_000), 5.0 + 1.0 + 1.0, "table, log, own");
        assert_eq!(c.answer(&distinct(3_000, "+461")).value, 2.0);
        // Loading again (a rule counted approximately anew) counts nothing twice.
        c.load(&HashSet::from(["r".to_owned()]), loaded);
        assert_eq!(total(&c, 2_000), 7.0);
        c.set_rules(HashSet::new());
        c.set_rules(HashSet::from(["r".to_owned()]));
        assert_eq!(
            c.to_load(),
            vec!["r".to_owned()],
            "loaded afresh when it comes back"
        );
    }

    #[test]
    fn a_forget_drops_a_key_here_and_on_the_replicas_that_take_in_the_share() {
        let c = counters();
        c.answer(&add(1_000));
        let in_flight = c.take_unsent();
        c.answer(&add(2_000));
        c.forget("r", "SE");
        assert_eq!(total(&c, 2_000), 0.0);
        c.answer(&add(3_000));
        c.shared(in_flight, false);
        let share = c.take_unsent().share();
        assert_eq!(share.forgets, vec![("r".to_owned(), "SE".to_owned())]);
        assert_eq!(
            share.keys[0].adds,
            vec![(0, 1.0)],
            "only what came after the forget"
        );
        let other = counters();
        other.answer(&add(500));
        other.take_in(vec![share]);
        assert_eq!(total(&other, 3_000), 1.0);
    }

    #[test]
    fn a_share_reads_back_as_written() {
        let c = counters();
        c.answer(&add(1_000));
        c.answer(&see(1_000, "+461"));
        c.forget("r", "NO");
        let share = c.take_unsent().share();
        let bytes = serde_json::to_vec(&share).expect("serializes");
        let back: Share = serde_json::from_slice(&bytes).expect("reads back");
        assert_eq!(back, share);
    }
}
