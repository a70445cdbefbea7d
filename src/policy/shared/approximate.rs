//! Counters that replicas keep approximately: the rules with `counting = "approximate"`.
//!
//! An exact shared counter costs every decision locked row updates in PostgreSQL, and a
//! busy key (a country's, a range's) is locked by every replica in turn. For a rule
//! whose limit may be passed by a little, each replica instead counts in memory and
//! shares what it counted every [`SHARE_EVERY`], in one call for all its keys:
//!
//! - A key's **shared counts** (what the database holds, every replica's shares
//!   included) are read when a decision first needs the key, in the round trip the
//!   decision makes anyway, and again once they are older than [`FRESH_FOR`].
//! - On top of them a replica adds what it counted itself that those counts do not yet
//!   include: what it has not shared, and what it shared after they were read.
//! - So a replica sees its own counts at once and the others' at most
//!   `SHARE_EVERY + FRESH_FOR` (plus a round trip) late. What N replicas let through
//!   under a limit of `max` is at most `max` plus what the other replicas counted in
//!   that lag, and never more than N × `max`: each replica alone keeps its own view
//!   under `max`. Nothing counted is lost while the database answers: a share that
//!   fails is sent again with the next.
//!
//! Shares are numbered and written one after another, on a connection of their own. A
//! reading queued after share `s` was written includes every share up to `s`; a counted
//! change is added on top of a reading unless the reading includes the share that
//! carried it, and forgotten once a reading includes it. A reading made while a share
//! is being written may include it already and count it twice until the next reading:
//! a brief overcount, never an undercount.
//!
//! Levels (a sequential test's evidence, a surge's first sighting) stay exact: their
//! steps do not add up across replicas.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, Instant},
};

use super::counter_ops::{CounterOp, OpKind, OpResult};
use crate::policy::counters::CounterKey;

/// How often a replica shares what it counted.
pub(crate) const SHARE_EVERY: Duration = Duration::from_millis(25);
/// How long a key's shared counts are used before a decision reads them again.
pub(crate) const FRESH_FOR: Duration = Duration::from_millis(10);
/// How long a key no decision used stays in memory once all it counted is shared.
const KEEP_IDLE: Duration = Duration::from_secs(2);
/// How often idle keys are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Keys are looked up on every decision: a quick hash (its seed is random per process).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Where a counted change stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carried {
    /// Not shared yet.
    Unsent,
    /// In share `n`, not yet known to be written.
    Sent(u64),
    /// Written by share `n`.
    Shared(u64),
}

impl Carried {
    /// Whether a reading that includes the shares up to `read` counts it already.
    fn read_in(self, read: u64) -> bool {
        match self {
            Carried::Unsent => false,
            Carried::Sent(n) | Carried::Shared(n) => n <= read,
        }
    }
}

#[derive(Debug, Clone)]
struct Change {
    carried: Carried,
    /// Start of its bucket (ms).
    bucket: i64,
    amount: f64,
    /// For a distinct count: the member seen, and when.
    member: Option<(String, i64)>,
}

/// The shared counts of a key as last read.
#[derive(Debug, Clone)]
struct Reading {
    /// Bucket start (ms) and amount, as the database held them.
    buckets: Vec<(i64, f64)>,
    /// The last share written before the read was queued.
    includes: u64,
    at: Instant,
}

#[derive(Debug)]
struct Entry {
    /// A distinct count: its shared counts are those of each member's latest sighting.
    distinct: bool,
    span_ms: i64,
    reading: Option<Reading>,
    changes: Vec<Change>,
    /// For a distinct count: the members this replica saw, and when last.
    members: FastMap<String, i64>,
    used: Instant,
    /// Whether the key is in the list of keys with changes to share.
    queued: bool,
}

impl Entry {
    fn new(op: &CounterOp, now: Instant) -> Self {
        Self {
            distinct: op.kind == OpKind::See,
            span_ms: op.span_ms,
            reading: None,
            changes: Vec::new(),
            members: FastMap::default(),
            used: now,
            queued: false,
        }
    }

    /// What counts in the window that ends at `now_ms`: the shared counts, and this
    /// replica's changes they do not include.
    fn total(&self, now_ms: i64, span_ms: i64) -> f64 {
        let from = now_ms - span_ms;
        let includes = self.reading.as_ref().map_or(0, |r| r.includes);
        let shared: f64 = self
            .reading
            .iter()
            .flat_map(|r| &r.buckets)
            .filter(|(bucket, _)| *bucket > from)
            .map(|(_, amount)| amount)
            .sum();
        let own: f64 = self
            .changes
            .iter()
            .filter(|c| c.bucket > from && !c.carried.read_in(includes))
            .map(|c| c.amount)
            .sum();
        shared + own
    }

    /// Adds `amount` to the bucket of `now_ms`, merged into an unshared change there.
    fn add(&mut self, now_ms: i64, amount: f64) {
        let bucket = bucket_of(now_ms, self.span_ms);
        match self
            .changes
            .iter_mut()
            .rev()
            .find(|c| c.carried == Carried::Unsent && c.bucket == bucket && c.member.is_none())
        {
            Some(change) => change.amount += amount,
            None => self.changes.push(Change {
                carried: Carried::Unsent,
                bucket,
                amount,
                member: None,
            }),
        }
    }

    /// Records a sighting of `member`: it counts once if this replica has not seen it
    /// in the window (one seen only by another replica counts here until shared).
    fn see(&mut self, now_ms: i64, member: &str) {
        let new = self
            .members
            .get(member)
            .is_none_or(|&last| last <= now_ms - self.span_ms);
        self.members.insert(member.to_owned(), now_ms);
        self.changes.push(Change {
            carried: Carried::Unsent,
            bucket: bucket_of(now_ms, self.span_ms),
            amount: if new { 1.0 } else { 0.0 },
            member: Some((member.to_owned(), now_ms)),
        });
    }

    /// Forgets the changes that the reading includes and whose share is written.
    fn settle(&mut self) {
        let includes = self.reading.as_ref().map_or(0, |r| r.includes);
        self.changes
            .retain(|c| !matches!(c.carried, Carried::Shared(n) if n <= includes));
    }

    fn unshared(&self) -> bool {
        self.changes
            .iter()
            .any(|c| matches!(c.carried, Carried::Unsent | Carried::Sent(_)))
    }
}

/// The database's bucket for a time, as `verigate_counter_ops` computes it.
fn bucket_of(now_ms: i64, span_ms: i64) -> i64 {
    let width = (span_ms / 10).max(1);
    now_ms.div_euclid(width) * width
}

/// A key whose shared counts a decision needs read: the counter it answers for, and
/// the key its counts are stored under (a distinct count's are its latest sightings).
#[derive(Debug, Clone)]
pub(crate) struct ToRead {
    pub(crate) key: CounterKey,
    pub(crate) stored: CounterKey,
}

/// What one share carries: adds (by key and bucket) and sightings.
#[derive(Debug, Default)]
pub(crate) struct Share {
    pub(crate) adds: Vec<CounterOp>,
    pub(crate) sightings: Vec<CounterOp>,
}

impl Share {
    pub(crate) fn is_empty(&self) -> bool {
        self.adds.is_empty() && self.sightings.is_empty()
    }
}

/// This replica's approximate counters.
#[derive(Debug, Default)]
pub(crate) struct ApproximateCounters {
    rules: RwLock<Arc<HashSet<String>>>,
    keys: Mutex<Keys>,
}

#[derive(Debug, Default)]
struct Keys {
    entries: FastMap<CounterKey, Entry>,
    /// Keys with changes not shared yet, each once: a share looks at these only.
    unsent: Vec<CounterKey>,
    /// Keys of the share being written.
    sending: Vec<CounterKey>,
    swept: Option<Instant>,
}

impl Keys {
    /// The entry of `op`'s key, made if it is new.
    fn entry(&mut self, op: &CounterOp, now: Instant) -> &mut Entry {
        // Looked up first: a key in memory already (most) costs no copy of its strings.
        if !self.entries.contains_key(&op.key) {
            self.entries.insert(op.key.clone(), Entry::new(op, now));
        }
        self.entries
            .get_mut(&op.key)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Puts `key` in the list of keys to share (once).
    fn queue(&mut self, key: &CounterKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            if !entry.queued {
                entry.queued = true;
                self.unsent.push(key.clone());
            }
        }
    }

    /// Lets go of keys idle for [`KEEP_IDLE`] with nothing left to share, and of members
    /// out of their window; at most once per [`SWEEP_EVERY`].
    fn sweep(&mut self, now: Instant, now_ms: i64) {
        if self
            .swept
            .is_some_and(|at| now.duration_since(at) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.entries
            .retain(|_, e| e.unshared() || now.duration_since(e.used) < KEEP_IDLE);
        for entry in self.entries.values_mut() {
            let span_ms = entry.span_ms;
            entry.members.retain(|_, &mut seen| seen > now_ms - span_ms);
        }
    }
}

impl ApproximateCounters {
    /// The rules counted approximately (from the policy in force).
    pub(crate) fn set_rules(&self, rules: HashSet<String>) {
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(rules);
    }

    /// Whether `op` is answered here rather than in the database.
    pub(crate) fn covers(&self, op: &CounterOp) -> bool {
        matches!(
            op.kind,
            OpKind::Add | OpKind::Total | OpKind::See | OpKind::AddWithin | OpKind::Refund
        ) && self
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&op.key.rule)
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The keys of `ops` whose shared counts must be read (again) before they are
    /// answered; marks every key used.
    pub(crate) fn to_read<'a>(&self, ops: impl IntoIterator<Item = &'a CounterOp>) -> Vec<ToRead> {
        let now = Instant::now();
        let mut keys = self.keys();
        let mut out: Vec<ToRead> = Vec::new();
        for op in ops {
            let entry = keys.entry(op, now);
            entry.used = now;
            let stale = entry
                .reading
                .as_ref()
                .is_none_or(|r| now.duration_since(r.at) >= FRESH_FOR);
            if stale && !out.iter().any(|r| r.key == op.key) {
                let mut stored = op.key.clone();
                if entry.distinct {
                    stored.condition.push_str(":latest");
                }
                out.push(ToRead {
                    key: op.key.clone(),
                    stored,
                });
            }
        }
        out
    }

    /// Takes in what was read for `read` (one list of buckets each), which includes the
    /// shares up to `includes`.
    pub(crate) fn read(&self, read: &[ToRead], buckets: Vec<Vec<(i64, f64)>>, includes: u64) {
        let now = Instant::now();
        let mut keys = self.keys();
        for (to_read, buckets) in read.iter().zip(buckets) {
            if let Some(entry) = keys.entries.get_mut(&to_read.key) {
                let newer = entry
                    .reading
                    .as_ref()
                    .is_none_or(|r| r.includes <= includes);
                if newer {
                    entry.reading = Some(Reading {
                        buckets,
                        includes,
                        at: now,
                    });
                    entry.settle();
                }
            }
        }
    }

    /// Answers `op` from memory; `None` when its key's shared counts were never read.
    pub(crate) fn answer(&self, op: &CounterOp) -> Option<OpResult> {
        let mut keys = self.keys();
        let entry = keys
            .entries
            .get_mut(&op.key)
            .filter(|e| e.reading.is_some())?;
        entry.used = Instant::now();
        let (now_ms, span_ms) = (op.now_ms, op.span_ms);
        let result = match op.kind {
            OpKind::Add | OpKind::Refund => {
                entry.add(now_ms, op.amount);
                OpResult {
                    value: entry.total(now_ms, span_ms),
                    ..OpResult::default()
                }
            }
            OpKind::See => {
                entry.see(now_ms, op.member.as_deref().unwrap_or_default());
                OpResult {
                    value: entry.total(now_ms, span_ms),
                    ..OpResult::default()
                }
            }
            OpKind::AddWithin => {
                let with = entry.total(now_ms, span_ms) + op.amount;
                let added = with <= op.cap;
                if added {
                    entry.add(now_ms, op.amount);
                }
                OpResult {
                    value: with,
                    added,
                    before_ms: None,
                }
            }
            _ => OpResult {
                value: entry.total(now_ms, span_ms),
                ..OpResult::default()
            },
        };
        if op.kind != OpKind::Total {
            keys.queue(&op.key);
        }
        Some(result)
    }

    /// Counts a change whose result nobody reads (an outcome, a refund): it needs no
    /// reading of the key.
    pub(crate) fn count(&self, op: &CounterOp) {
        if op.kind != OpKind::See && op.amount == 0.0 {
            return;
        }
        let mut keys = self.keys();
        let entry = keys.entry(op, Instant::now());
        match (&op.kind, &op.member) {
            (OpKind::See, Some(member)) => entry.see(op.now_ms, member),
            _ => entry.add(op.now_ms, op.amount),
        }
        keys.queue(&op.key);
    }

    /// Takes what is not shared yet into share `number` (`now_ms`: the time, to let go
    /// of members that left their window).
    pub(crate) fn take_share(&self, number: u64, now_ms: i64) -> Share {
        let mut keys = self.keys();
        keys.sweep(Instant::now(), now_ms);
        let Keys {
            entries,
            unsent,
            sending,
            ..
        } = &mut *keys;
        let mut share = Share::default();
        for key in unsent.drain(..) {
            let Some(entry) = entries.get_mut(&key) else {
                continue; // forgotten since
            };
            entry.queued = false;
            let span_ms = entry.span_ms;
            for change in entry
                .changes
                .iter_mut()
                .filter(|c| c.carried == Carried::Unsent)
            {
                change.carried = Carried::Sent(number);
                match &change.member {
                    Some((member, seen_ms)) => share.sightings.push(CounterOp {
                        member: Some(member.clone()),
                        ..CounterOp::new(OpKind::See, &key, *seen_ms, span_ms, 0.0)
                    }),
                    None if change.amount != 0.0 => share.adds.push(CounterOp::new(
                        OpKind::Add,
                        &key,
                        change.bucket,
                        span_ms,
                        change.amount,
                    )),
                    None => {}
                }
            }
            sending.push(key);
        }
        share
    }

    /// Share `number` was written (`true`) or failed, and is then sent again with the
    /// next.
    pub(crate) fn shared(&self, number: u64, written: bool) {
        let mut keys = self.keys();
        let sent = std::mem::take(&mut keys.sending);
        for key in sent {
            let Some(entry) = keys.entries.get_mut(&key) else {
                continue;
            };
            for change in entry
                .changes
                .iter_mut()
                .filter(|c| c.carried == Carried::Sent(number))
            {
                change.carried = if written {
                    Carried::Shared(number)
                } else {
                    Carried::Unsent
                };
            }
            entry.settle();
            if !written {
                keys.queue(&key);
            }
        }
    }

    /// Forgets `rule`'s counts under `value` (a lifted block starts afresh).
    pub(crate) fn forget(&self, rule: &str, value: &str) {
        self.keys()
            .entries
            .retain(|key, _| !(key.rule == rule && key.value == value));
    }

    /// Keys held in memory.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys().entries.len()
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

    /// Reads the key as the database would hold it, including the shares up to `includes`.
    fn read(c: &ApproximateCounters, op: &CounterOp, buckets: Vec<(i64, f64)>, includes: u64) {
        let mut to_read = c.to_read([op]);
        if to_read.is_empty() {
            // Fresh: read again anyway, as a decision after FRESH_FOR would.
            to_read.push(ToRead {
                key: op.key.clone(),
                stored: op.key.clone(),
            });
        }
        c.read(&to_read, vec![buckets], includes);
    }

    fn value(c: &ApproximateCounters, op: CounterOp) -> f64 {
        c.answer(&op).expect("read").value
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
    fn a_key_never_read_is_not_answered_and_is_read_once_per_decision() {
        let c = counters();
        assert!(c.answer(&add(0)).is_none());
        let to_read = c.to_read([&add(0), &add(0)]);
        assert_eq!(to_read.len(), 1);
        let read_at = Instant::now();
        c.read(&to_read, vec![vec![(0, 4.0)]], 0);
        let again = c.to_read([&add(0)]);
        // Fresh for FRESH_FOR (unless this thread was held up that long meanwhile).
        if read_at.elapsed() < FRESH_FOR {
            assert!(again.is_empty(), "fresh for a while");
        }
        std::thread::sleep(FRESH_FOR);
        assert_eq!(c.to_read([&add(0)]).len(), 1, "read again once stale");
        assert_eq!(value(&c, add(0)), 5.0);
    }

    #[test]
    fn own_counts_are_added_on_top_until_a_reading_includes_their_written_share() {
        let c = counters();
        read(&c, &add(0), vec![(0, 10.0)], 0);
        assert_eq!(value(&c, add(1)), 11.0);
        assert_eq!(value(&c, add(2)), 12.0);
        let share = c.take_share(1, 0);
        assert_eq!(share.adds.len(), 1, "merged per bucket");
        assert_eq!(share.adds[0].amount, 2.0);
        // Counted while the share is on its way: not in it.
        assert_eq!(value(&c, add(3)), 13.0);
        // A reading queued before the share was: the share's counts still add on top.
        read(&c, &add(3), vec![(0, 15.0)], 0);
        assert_eq!(
            value(&c, CounterOp::new(OpKind::Total, &key("SE"), 4, SPAN, 0.0)),
            18.0
        );
        c.shared(1, true);
        assert_eq!(
            value(&c, CounterOp::new(OpKind::Total, &key("SE"), 4, SPAN, 0.0)),
            18.0
        );
        // A reading that includes share 1 (others counted 5 meanwhile): 10 + 2 + 5, plus
        // the one counted after the share.
        read(&c, &add(3), vec![(0, 17.0)], 1);
        assert_eq!(
            value(&c, CounterOp::new(OpKind::Total, &key("SE"), 4, SPAN, 0.0)),
            18.0
        );
    }

    #[test]
    fn a_failed_share_is_sent_again_and_counted_meanwhile() {
        let c = counters();
        read(&c, &add(0), vec![], 0);
        value(&c, add(0));
        value(&c, add(0));
        assert_eq!(c.take_share(1, 0).adds[0].amount, 2.0);
        // A reading queued after the share, made when the share failed, does not hold it.
        read(&c, &add(0), vec![], 1);
        c.shared(1, false);
        assert_eq!(
            value(&c, CounterOp::new(OpKind::Total, &key("SE"), 1, SPAN, 0.0)),
            2.0
        );
        let again = c.take_share(2, 0);
        assert_eq!(again.adds.iter().map(|a| a.amount).sum::<f64>(), 2.0);
        c.shared(2, true);
        assert!(c.take_share(3, 0).is_empty());
    }

    #[test]
    fn counts_leave_the_window_bucket_by_bucket() {
        let c = counters();
        // Buckets of a tenth of the window.
        read(&c, &add(0), vec![(0, 3.0), (6_000, 2.0)], 0);
        assert_eq!(value(&c, add(6_500)), 6.0);
        let total = |now| CounterOp::new(OpKind::Total, &key("SE"), now, SPAN, 0.0);
        assert_eq!(value(&c, total(60_000)), 3.0, "bucket 0 left");
        assert_eq!(value(&c, total(66_000)), 0.0);
    }

    #[test]
    fn a_member_counts_once_per_replica_and_sightings_are_shared_each() {
        let c = counters();
        read(&c, &see(0, "a"), vec![(0, 5.0)], 0);
        assert_eq!(value(&c, see(1, "a")), 6.0);
        assert_eq!(value(&c, see(2, "a")), 6.0, "seen here already");
        assert_eq!(value(&c, see(3, "b")), 7.0);
        let share = c.take_share(1, 0);
        assert_eq!(share.sightings.len(), 3);
        assert!(share.adds.is_empty());
        c.shared(1, true);
        // The database counted a and b once (5 + 2); a seen again adds nothing.
        read(&c, &see(4, "a"), vec![(0, 7.0)], 1);
        assert_eq!(value(&c, see(5, "a")), 7.0);
        // Seen again after the window: new again.
        assert_eq!(value(&c, see(SPAN + 10, "b")), 1.0);
    }

    #[test]
    fn a_cap_holds_for_what_this_replica_knows() {
        let c = counters();
        let within = |amount| CounterOp {
            cap: 10.0,
            ..CounterOp::new(OpKind::AddWithin, &key("SE"), 0, SPAN, amount)
        };
        read(&c, &within(0.0), vec![(0, 6.0)], 0);
        assert!(c.answer(&within(3.0)).unwrap().added);
        let over = c.answer(&within(2.0)).unwrap();
        assert!(!over.added);
        assert_eq!(over.value, 11.0);
        c.count(&CounterOp::new(OpKind::Refund, &key("SE"), 0, SPAN, -3.0));
        assert!(c.answer(&within(4.0)).unwrap().added);
    }

    #[test]
    fn idle_keys_go_only_once_shared_and_forget_drops_a_key() {
        let c = counters();
        c.count(&add(0));
        assert_eq!(c.len(), 1);
        let share = c.take_share(1, 0);
        assert_eq!(share.adds.len(), 1);
        assert_eq!(c.len(), 1, "kept while its share is on its way");
        c.forget("r", "SE");
        assert_eq!(c.len(), 0);
    }
}
