//! Adaptive defence: what verigate learns from how the verifications it allowed ended,
//! and the quarantines it puts keys (a number range, a prefix, a country) in when a rule
//! built on that knowledge trips.
//!
//! Static lists catch known ranges; pumping moves to fresh ones within hours. verigate
//! sees both the request and the result of every verification, so it can notice that a
//! range keeps asking for codes nobody enters. [`OutcomeBook`] joins them: every allowed
//! request is tracked by id until its result arrives (or until it has had time to
//! complete, when it counts as failed), and each outcome is counted per key in sliding
//! windows. [`Quarantine`] holds the blocks that tripped rules put in place, with
//! escalation on repeat, a probe trickle, lifting and pinning. Both are pure given the
//! time they are told, so tests drive them on a controlled clock.

use std::collections::{HashMap, VecDeque};
use std::sync::{
    atomic::{AtomicBool, Ordering},
    Mutex,
};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use super::{
    counters::{joined, CounterKey, CounterStore, Counters},
    PolicyError,
};
use crate::telemetry::MaskedNumber;

/// Upper bound of the Wilson score interval for `ok` successes in `n` trials, at the
/// normal quantile `z`. With few samples it stays high, so a small sample never looks
/// like a low rate: 0 of 3 gives 0.56 at z = 1.645, 0 of 30 gives 0.08.
pub fn wilson_upper(ok: f64, n: f64, z: f64) -> f64 {
    if n <= 0.0 {
        return 1.0;
    }
    let p = (ok / n).clamp(0.0, 1.0);
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let margin = z * ((p * (1.0 - p) + z2 / (4.0 * n)) / n).sqrt();
    ((centre + margin) / (1.0 + z2 / n)).clamp(0.0, 1.0)
}

/// The one-sided normal quantile for a confidence level in (0.5, 1): 0.95 → 1.645.
/// Abramowitz and Stegun 26.2.23, accurate to 4.5e-4, enough for a threshold.
pub fn z_for(confidence: f64) -> f64 {
    let p = (1.0 - confidence).clamp(1e-9, 0.5);
    let t = (-2.0 * p.ln()).sqrt();
    t - (2.515_517 + 0.802_853 * t + 0.010_328 * t * t)
        / (1.0 + 1.432_788 * t + 0.189_269 * t * t + 0.001_308 * t * t * t)
}

/// The evidence that a key's verifications convert at the low rate `p1` rather than at
/// its normal rate `p0`: the log-likelihood ratio of `ok` successes among `all`. Each
/// failure adds ln((1 - p1) / (1 - p0)), each success ln(p1 / p0) (negative).
///
/// Keys keep it as a CUSUM (Page's test): a level that adds each outcome's step and
/// never drops below zero, so a long honest history cannot hide an attack that starts
/// now. A key that trips at level ln(1 / α) while converting at its normal rate (or
/// better) does so at most once per 1 / α outcomes on average (Lorden's bound), however
/// often it is looked at: repeated looks add no false alarms. A key where every attempt
/// fails crosses after a handful of failures; one near its normal rate never.
pub fn evidence(ok: f64, all: f64, p0: f64, p1: f64) -> f64 {
    let (on_success, on_failure) = evidence_steps(p0, p1);
    ok.max(0.0) * on_success + (all - ok).max(0.0) * on_failure
}

/// The low rate `p1` whose test against `p0` is balanced at `boundary`: a key
/// converting at exactly `boundary` gains no evidence on average, one above it loses
/// evidence, one below gains it (`boundary` must lie between 0 and `p0`). So the rate a
/// rule is written with (`below`) is where its test starts to lean towards tripping.
pub fn balanced_low_rate(p0: f64, boundary: f64) -> f64 {
    let p0 = p0.clamp(1e-3, 1.0 - 1e-3);
    let boundary = boundary.clamp(1e-4, p0 - 1e-4);
    // Zero at p1 = p0 and at the root below `boundary`; positive in between.
    let drift =
        |p1: f64| boundary * (p1 / p0).ln() + (1.0 - boundary) * ((1.0 - p1) / (1.0 - p0)).ln();
    let (mut lo, mut hi) = (1e-6_f64, boundary);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if drift(mid) > 0.0 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    (lo + hi) / 2.0
}

/// Normal rates are rounded to 1 / NORMAL_STEPS where a test's low rate is looked up.
pub const NORMAL_STEPS: u32 = 200;

/// A sequential test's low rate for every normal rate on the grid, where
/// `boundary(normal)` is the rate at which a key neither gains nor loses evidence
/// (`None` where that is not under the normal): a root to find, too slow to find on
/// every decision.
pub fn low_rates(boundary: impl Fn(f64) -> f64) -> Vec<Option<f64>> {
    (0..=NORMAL_STEPS)
        .map(|i| {
            let normal = f64::from(i) / f64::from(NORMAL_STEPS);
            let boundary = boundary(normal);
            (boundary < normal).then(|| balanced_low_rate(normal, boundary))
        })
        .collect()
}

/// The steps (a success's, a failure's) of the test at the grid point nearest `normal`
/// (`lows` from [`low_rates`]).
pub fn steps_at(lows: &[Option<f64>], normal: f64) -> Option<(f64, f64)> {
    let i = (normal.clamp(0.0, 1.0) * f64::from(NORMAL_STEPS)).round();
    let low = lows.get(i as usize).copied().flatten()?;
    Some(evidence_steps(i / f64::from(NORMAL_STEPS), low))
}

/// What one success and one failure add to [`evidence`].
pub fn evidence_steps(p0: f64, p1: f64) -> (f64, f64) {
    let p0 = p0.clamp(1e-6, 1.0 - 1e-3);
    let p1 = p1.clamp(1e-6, 1.0 - 1e-3);
    ((p1 / p0).ln(), ((1.0 - p1) / (1.0 - p0)).ln())
}

/// How a final result counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// The code was entered.
    Success,
    /// Failed, aborted, or never completed: the attempt cost money and nobody converted.
    Failure,
    /// Sinch itself denied it as fraud or blocked: a signal of its own.
    SinchFraud,
    /// Denied for another reason, or an error: neither the user's doing nor charged.
    Excluded,
}

impl Resolution {
    /// `None` for a status that is not final (`PENDING`).
    pub fn of(status: &str, reason: Option<&str>) -> Option<Self> {
        let reason = reason.unwrap_or_default();
        Some(match status.to_ascii_uppercase().as_str() {
            "PENDING" => return None,
            "SUCCESSFUL" => Self::Success,
            "FAIL" | "ABORTED" => Self::Failure,
            "DENIED"
                if reason.eq_ignore_ascii_case("fraud")
                    || reason.eq_ignore_ascii_case("blocked") =>
            {
                Self::SinchFraud
            }
            _ => Self::Excluded,
        })
    }
}

/// Which counters one tracked verification feeds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum TrackedKey {
    /// Counts successes and finished attempts under the rule's key (`spec` is the key
    /// as written, `value` the request's) and under the number's country (the baseline).
    Conversion {
        rule: String,
        spec: String,
        value: String,
        country: String,
        window_ms: i64,
        /// The sequential test's normal rates learn from it (over this long): its key
        /// was not under suspicion when it was allowed. Zero: the rule keeps no baseline.
        #[serde(default)]
        baseline_ms: i64,
        /// The sequential test's steps for a success and a failure (the log-likelihood
        /// ratios at the rates in force when it was allowed).
        #[serde(default)]
        steps: Option<(f64, f64)>,
        /// The pool it adds to (`spec`, value): its key had no success in the window
        /// when it was allowed.
        #[serde(default)]
        pool: Option<(String, String)>,
        /// What its key is judged without (`spec`, value): its operator block (the
        /// rule's pool when narrower than a country), or else the key itself. Its
        /// baseline outcomes also count under it, so that keys are judged against their
        /// country without their block, or without themselves over the whole baseline.
        /// A rule pooled per operator block always has its block here (another spec
        /// than the key's own), and a failure counts the key among the block's failing
        /// keys ([`failing_keys`]).
        #[serde(default)]
        block: Option<(String, String)>,
        /// Its country had a normal of its own, at a rate an honest country converts
        /// at, when it was allowed: its outcome also teaches every country's rate.
        #[serde(default)]
        settled: bool,
        /// Its rule tells established keys apart: a clean success also counts under the
        /// key's own ([`OwnCleanSuccesses`]).
        #[serde(default)]
        established: bool,
        /// Its number was returning (it converted before): its success counts as the
        /// key's own clean success (over this long, the rule's baseline) even when the
        /// key was under suspicion. A block that an attack keeps under suspicion for
        /// longer than the baseline would otherwise lose what established it, although
        /// the people who return to it go on converting. Zero: it was new, or the rule
        /// tells no established keys apart.
        #[serde(default)]
        returning_ms: i64,
    },
    SinchFraud {
        count: CounterKey,
        window_ms: i64,
    },
    /// Counts under a `surge` key: its recent outcomes and sequential level, and (when
    /// `baseline_ms` is not zero: the key was calm) its normal rate.
    Surge {
        rule: String,
        spec: String,
        value: String,
        window_ms: i64,
        baseline_ms: i64,
        steps: Option<(f64, f64)>,
    },
}

/// The outcome counters of a `surge` key: recent (`kind` = surge) or normal
/// (surge_normal).
pub fn surge_counters(rule: &str, kind: &str, spec: &str, value: &str) -> (CounterKey, CounterKey) {
    conversion_counters(rule, &joined(&[kind, ":", spec]), value)
}

/// The counters of a conversion key: (successes, finished attempts).
pub fn conversion_counters(rule: &str, spec: &str, value: &str) -> (CounterKey, CounterKey) {
    let key = |kind: &str| CounterKey {
        rule: rule.to_owned(),
        condition: joined(&[kind, ":", spec]),
        value: value.to_owned(),
    };
    (key("conversion_ok"), key("conversion_all"))
}

/// The level of a key's sequential test: its evidence of a low rate since the last
/// time it looked normal (a CUSUM of [`evidence`] steps). A pool's is under
/// `pool:{spec}`: the outcomes of the verifications under it whose own key had not
/// converted once in the window. Under `alert:{spec}`: that a pool tripped, or that a key
/// tripped at its pool's bar, lately.
pub fn evidence_level(rule: &str, spec: &str, value: &str) -> CounterKey {
    CounterKey {
        rule: rule.to_owned(),
        condition: joined(&["evidence:", spec]),
        value: value.to_owned(),
    }
}

/// The sequential level of a pool: `pool_spec` = `pool_value`'s keys that never
/// converted in the window.
pub fn pool_level(rule: &str, pool_spec: &str, pool_value: &str) -> CounterKey {
    evidence_level(rule, &joined(&["pool:", pool_spec]), pool_value)
}

/// The keys of an operator block that failed in the window, as distinct members: how
/// widely the block's failures are spread (see [`failures_to_stand_out`]).
pub fn failing_keys(rule: &str, pool_spec: &str, pool_value: &str) -> CounterKey {
    evidence_level(rule, &joined(&["failing:", pool_spec]), pool_value)
}

/// The numbers that failed under a key in the window, as distinct members: a person who
/// tries again and again is one of them, an attack's random numbers are many.
pub fn failing_numbers(rule: &str, spec: &str, value: &str) -> CounterKey {
    evidence_level(rule, &joined(&["failing-numbers:", spec]), value)
}

/// How many keys of its length an operator block holds: `10^d`, where `d` is how many
/// more digits the key has than the block (a `range:4` of a 12-digit number under a
/// `prefix:5` block: 1,000). `None` when the key is not longer than the block.
pub fn keys_in_block(key: &str, block: &str) -> Option<f64> {
    let digits = |s: &str| s.bytes().filter(u8::is_ascii_digit).count();
    let extra = digits(key).checked_sub(digits(block)).filter(|d| *d > 0)?;
    Some(10f64.powi(i32::try_from(extra).ok()?))
}

/// The chance that a key which only gets its share of failures sprayed evenly over its
/// block has this many or more: below it, a key's failures are what a spray gives some
/// keys by chance, not an attack on the key.
pub const SPRAY_CHANCE: f64 = 0.01;

/// The same chance for a key to be judged at its pool's bar while the pool has not
/// tripped: a key whose failing numbers a block's spread would give one key in ten
/// thousand is attacked itself (an attack on a few ranges of a busy block, whose real
/// users keep the pool's own evidence from building).
pub const OUTLIER_CHANCE: f64 = 1e-4;

/// The failing numbers a key needs in its window to stand out from failures spread
/// evenly over its operator block, when `failing` of the block's `keys` had a failure in
/// the window, at `chance` ([`SPRAY_CHANCE`], [`OUTLIER_CHANCE`]).
///
/// Under an even spray each key's failures are Poisson with mean λ, and a share
/// 1 - e^-λ of the keys has at least one: so λ = -ln(1 - failing / keys), read from how
/// widely the failures are spread rather than from their number, which an attack on a
/// few keys would inflate. The answer is the least k with P(X >= k) under `chance`; at
/// [`SPRAY_CHANCE`]: 1 while under a hundredth of the keys fail, 2 up to about a
/// seventh (a block with real failures here and there, or attacked on a few ranges), 3
/// up to about a third, 5 at three fifths. An attack hidden among a busy
/// block's users with random numbers fails a little everywhere: judging each range that
/// met two of its failures at the pool's bar turned the block's real users away, range
/// by range, while blocking almost none of the attack (docs/fraud-defence.md).
pub fn failures_to_stand_out(failing: f64, keys: f64, chance: f64) -> f64 {
    if keys <= 0.0 || failing <= 0.0 {
        return 1.0;
    }
    let spread = (failing / keys).min(0.999);
    let mean = -(1.0 - spread).ln();
    // P(X >= k) = 1 - P(X < k), summing the terms of P(X < k) as k grows.
    let mut term = (-mean).exp();
    let mut below = 0.0;
    let mut k = 0u32;
    loop {
        below += term;
        k += 1;
        if 1.0 - below < chance || k >= 64 {
            return f64::from(k);
        }
        term *= mean / f64::from(k);
    }
}

/// The sequential level of a `surge` key.
pub fn surge_level(rule: &str, spec: &str, value: &str) -> CounterKey {
    evidence_level(rule, &joined(&["surge:", spec]), value)
}

/// A key's own clean successes: those of the baseline before the window are how a rule
/// with `established` tells a block with real users of its own from a fresh one, so that
/// an attack must look clean for longer than a window before it can pass for one; the
/// clock hours they came in tell people, who convert through the day, from an attacker
/// who entered a few dozen codes in one sitting to groom a block.
pub struct OwnCleanSuccesses {
    /// Counted over the baseline.
    pub baseline: CounterKey,
    /// Counted over the window.
    pub recent: CounterKey,
    /// The hours (since the epoch, UTC) they came in, seen as distinct members over the
    /// baseline.
    pub hours: CounterKey,
}

impl OwnCleanSuccesses {
    pub fn of(rule: &str, spec: &str, value: &str) -> Self {
        Self {
            baseline: baseline_counters(rule, &joined(&["own:", spec]), value).0,
            recent: conversion_counters(rule, &joined(&["recent:own:", spec]), value).0,
            hours: baseline_counters(rule, &joined(&["hours:own:", spec]), value).0,
        }
    }

    /// The member of [`Self::hours`] for a success at `at_ms` under a rule whose window
    /// is `window_ms`.
    pub fn hour(at_ms: i64, window_ms: i64) -> String {
        at_ms
            .div_euclid(establishment_hour_ms(window_ms))
            .to_string()
    }
}

/// The "hour" of `established_hours` for a rule whose window is `window_ms`: a clock
/// hour, or a sixth of the window when the window is under six hours. A policy whose
/// durations are all scaled down (a window of 36 minutes where the sample has 6 hours)
/// then asks for the same spread relative to its window, instead of clock hours its
/// shorter days may not hold: on a tenth of the sample's durations, a busy block with
/// 1,141 clean successes was quarantined for want of a fourth clock hour.
pub fn establishment_hour_ms(window_ms: i64) -> i64 {
    HOUR_MS.min(window_ms / 6).max(1)
}

/// An hour in ms: the clock hours of clean successes, and of surge's hours of the day.
pub(crate) const HOUR_MS: i64 = 3_600_000;

/// The counters a sequential test learns its normal rate from: a country's, or every
/// country's (`global`, `*`), over the rule's baseline.
pub fn baseline_counters(rule: &str, key: &str, value: &str) -> (CounterKey, CounterKey) {
    conversion_counters(rule, &joined(&["baseline:", key]), value)
}

impl TrackedKey {
    fn block_key(&self) -> (&str, &str) {
        match self {
            Self::Conversion { rule, value, .. } => (rule, value),
            Self::SinchFraud { count, .. } => (&count.rule, &count.value),
            Self::Surge { rule, value, .. } => (rule, value),
        }
    }
}

/// An allowed verification waiting for its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tracked {
    pub keys: Vec<TrackedKey>,
    pub allowed_ms: i64,
    /// After this long without a final result it counts as a failure.
    pub complete_after_ms: i64,
    pub number: String,
}

/// One verification behind a block, for the operator reviewing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Evidence {
    pub id: String,
    /// Calling code and last two digits only: the full record is one query away.
    pub number: String,
    pub outcome: String,
}

const EVIDENCE_PER_KEY: usize = 10;
/// Bounds memory under a flood of fresh ids: beyond it the oldest half is dropped.
const MAX_PENDING: usize = 1_000_000;

/// Allowed verifications without a result, by id and in the order they were allowed
/// (so expiring the overdue ones costs only those).
#[derive(Default)]
struct Pending {
    by_id: HashMap<String, Tracked>,
    order: VecDeque<(i64, String)>,
}

/// Something live the book was told while it was held (see [`OutcomeBook::hold`]).
enum Observation {
    Allowed(String, Tracked),
    Resolved(String, Resolution, i64),
}

/// Live observations waiting for the replay of history to finish. `held` is checked
/// without the lock on every decision; it only turns false under the lock, so nothing
/// can be queued after the queue was drained.
#[derive(Default)]
struct HeldBack {
    held: AtomicBool,
    queue: Mutex<Vec<Observation>>,
}

#[derive(Default)]
pub struct OutcomeBook {
    pending: Mutex<Pending>,
    evidence: Mutex<HashMap<(String, String), VecDeque<Evidence>>>,
    held_back: HeldBack,
}

impl OutcomeBook {
    /// From now on, live observations wait until [`release`](Self::release): history
    /// is replayed meanwhile (`track`, `resolve`, `expire` with past times), and the book
    /// must see every verification in time order, the replayed ones first.
    pub fn hold(&self) {
        self.held_back.held.store(true, Ordering::SeqCst);
    }

    /// True while live observations wait for the replay.
    pub fn is_held(&self) -> bool {
        self.held_back.held.load(Ordering::Acquire)
    }

    /// Applies what waited, in the order it came, and stops holding.
    pub fn release(&self, counters: &Counters, now_ms: i64) -> usize {
        let mut queue = self
            .held_back
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let waited = queue.len();
        for observation in queue.drain(..) {
            match observation {
                Observation::Allowed(id, tracked) => {
                    self.expire(counters, tracked.allowed_ms);
                    self.track(&id, tracked);
                }
                Observation::Resolved(id, resolution, at_ms) => {
                    self.expire(counters, at_ms);
                    self.resolve(&id, resolution, counters, at_ms);
                }
            }
        }
        self.expire(counters, now_ms);
        self.held_back.held.store(false, Ordering::SeqCst);
        waited
    }

    /// The queue to add to while the book is held; `None` (the usual case, checked
    /// without the lock) when observations apply at once.
    fn held_queue(&self) -> Option<std::sync::MutexGuard<'_, Vec<Observation>>> {
        if !self.is_held() {
            return None;
        }
        let queue = self
            .held_back
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.is_held().then_some(queue)
    }

    /// A verification the policy allowed just now.
    pub fn observe_allowed(&self, id: &str, tracked: Tracked) {
        match self.held_queue() {
            Some(mut queue) => queue.push(Observation::Allowed(id.to_owned(), tracked)),
            None => self.track(id, tracked),
        }
    }

    /// A final result that just arrived.
    pub fn observe_result(
        &self,
        id: &str,
        resolution: Resolution,
        counters: &Counters,
        at_ms: i64,
    ) {
        match self.held_queue() {
            Some(mut queue) => queue.push(Observation::Resolved(id.to_owned(), resolution, at_ms)),
            None => {
                self.expire(counters, at_ms);
                self.resolve(id, resolution, counters, at_ms);
            }
        }
    }

    /// Counts as failed what had its time without a result, unless history is still
    /// being replayed (the release does it then).
    pub fn catch_up(&self, counters: &Counters, now_ms: i64) {
        if !self.is_held() {
            self.expire(counters, now_ms);
        }
    }

    /// Starts tracking an allowed verification.
    pub fn track(&self, id: &str, tracked: Tracked) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Under a flood of ids that never report, the oldest are dropped uncounted.
        while pending.order.len() >= MAX_PENDING {
            if let Some((_, old)) = pending.order.pop_front() {
                pending.by_id.remove(&old);
            }
        }
        pending.order.push_back((tracked.allowed_ms, id.to_owned()));
        pending.by_id.insert(id.to_owned(), tracked);
    }

    /// Counts the final result of a tracked verification; false when it was not tracked
    /// (denied by verigate, from before the start, or already resolved).
    pub fn resolve(
        &self,
        id: &str,
        resolution: Resolution,
        counters: &Counters,
        now_ms: i64,
    ) -> bool {
        let tracked = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .remove(id);
        match tracked {
            Some(tracked) => {
                self.count(id, &tracked, resolution, counters, now_ms);
                true
            }
            None => false,
        }
    }

    /// Counts every tracked verification that has had its time to complete as failed.
    pub fn expire(&self, counters: &Counters, now_ms: i64) {
        let mut due = Vec::new();
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let Pending { by_id, order } = &mut *pending;
            while let Some((allowed_ms, id)) = order.front() {
                match by_id.get(id) {
                    // Resolved already, or tracked again later under the same id.
                    None => {}
                    Some(t) if t.allowed_ms != *allowed_ms => {}
                    Some(t) if now_ms - t.allowed_ms < t.complete_after_ms => break,
                    Some(_) => {
                        if let Some(t) = by_id.remove(id) {
                            due.push((id.clone(), t));
                        }
                    }
                }
                order.pop_front();
            }
        }
        for (id, tracked) in due {
            self.count(&id, &tracked, Resolution::Failure, counters, now_ms);
        }
    }

    fn count(
        &self,
        id: &str,
        tracked: &Tracked,
        resolution: Resolution,
        counters: &Counters,
        now_ms: i64,
    ) {
        // Counters in memory cannot fail.
        if let Ok(failures) = count_outcome(counters, id, tracked, resolution, now_ms) {
            for ((rule, key), evidence) in failures {
                self.remember(&rule, &key, evidence);
            }
        }
    }

    fn remember(&self, rule: &str, key: &str, failure: Evidence) {
        let mut evidence = self.evidence.lock().unwrap_or_else(|e| e.into_inner());
        if evidence.len() > MAX_PENDING / 10 {
            evidence.clear();
        }
        let list = evidence
            .entry((rule.to_owned(), key.to_owned()))
            .or_default();
        if list.len() == EVIDENCE_PER_KEY {
            list.pop_front();
        }
        list.push_back(failure);
    }

    /// The latest failures under a key, oldest first.
    pub fn evidence(&self, rule: &str, key: &str) -> Vec<Evidence> {
        self.evidence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(rule.to_owned(), key.to_owned()))
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Forgets the failures under a key (a lifted block starts from fresh evidence).
    pub fn forget(&self, rule: &str, key: &str) {
        self.evidence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(rule.to_owned(), key.to_owned()));
    }

    pub fn pending(&self) -> usize {
        self.pending.lock().map(|p| p.by_id.len()).unwrap_or(0)
    }
}

/// A failure to keep as evidence under (rule, block key).
pub type Failure = ((String, String), Evidence);

/// Counts a tracked verification's outcome under each of its keys; returns the failures
/// to keep as evidence. The same for counters in memory and
/// counters shared by replicas.
pub fn count_outcome(
    counters: &dyn CounterStore,
    id: &str,
    tracked: &Tracked,
    resolution: Resolution,
    now_ms: i64,
) -> Result<Vec<Failure>, PolicyError> {
    let mut failures = Vec::new();
    for key in &tracked.keys {
        match (key, resolution) {
            (
                TrackedKey::Conversion {
                    rule,
                    spec,
                    value,
                    country,
                    window_ms,
                    baseline_ms,
                    steps,
                    pool,
                    block,
                    settled,
                    established,
                    returning_ms,
                },
                Resolution::Success | Resolution::Failure,
            ) => {
                let success = f64::from(u8::from(resolution == Resolution::Success));
                let add = |(ok, all): (CounterKey, CounterKey), window_ms: i64| {
                    counters.add(&ok, window_ms, now_ms, success)?;
                    counters.add(&all, window_ms, now_ms, 1.0).map(|_| ())
                };
                add(conversion_counters(rule, spec, value), *window_ms)?;
                if *baseline_ms == 0 && steps.is_none() {
                    // The Wilson test's `below_baseline` reads the country over the window.
                    add(conversion_counters(rule, "country", country), *window_ms)?;
                }
                if let Some((on_success, on_failure)) = steps {
                    let step = if success > 0.0 {
                        *on_success
                    } else {
                        *on_failure
                    };
                    let level = evidence_level(rule, spec, value);
                    counters.accumulate(&level, *window_ms, now_ms, step)?;
                    if let Some((pool_spec, pool_value)) = pool {
                        let level = pool_level(rule, pool_spec, pool_value);
                        counters.accumulate(&level, *window_ms, now_ms, step)?;
                    }
                }
                // The key's block is another spec than its own only when the rule pools
                // per operator block.
                let operator_block = block.as_ref().filter(|(b, _)| b != spec);
                if let Some((block_spec, block_value)) = operator_block.filter(|_| success == 0.0) {
                    let failing = failing_keys(rule, block_spec, block_value);
                    counters.see(&failing, *window_ms, now_ms, value)?;
                    let numbers = failing_numbers(rule, spec, value);
                    counters.see(&numbers, *window_ms, now_ms, &tracked.number)?;
                }
                if *baseline_ms > 0 {
                    for (key, value) in [("country", country.as_str()), ("global", "*")] {
                        add(baseline_counters(rule, key, value), *baseline_ms)?;
                    }
                    if let Some((block_spec, block_value)) = block {
                        add(
                            baseline_counters(rule, block_spec, block_value),
                            *baseline_ms,
                        )?;
                    }
                    if *settled {
                        add(baseline_counters(rule, "settled", "*"), *baseline_ms)?;
                    }
                }
                let own_ms = if *baseline_ms > 0 {
                    *baseline_ms
                } else {
                    *returning_ms
                };
                if *established && success > 0.0 && own_ms > 0 {
                    let own = OwnCleanSuccesses::of(rule, spec, value);
                    counters.add(&own.baseline, own_ms, now_ms, success)?;
                    counters.add(&own.recent, *window_ms, now_ms, success)?;
                    counters.see(
                        &own.hours,
                        own_ms,
                        now_ms,
                        &OwnCleanSuccesses::hour(now_ms, *window_ms),
                    )?;
                }
            }
            (
                TrackedKey::Surge {
                    rule,
                    spec,
                    value,
                    window_ms,
                    baseline_ms,
                    steps,
                },
                Resolution::Success | Resolution::Failure,
            ) => {
                let success = f64::from(u8::from(resolution == Resolution::Success));
                let mut windows = vec![(surge_counters(rule, "surge", spec, value), *window_ms)];
                if *baseline_ms > 0 {
                    windows.push((
                        surge_counters(rule, "surge_normal", spec, value),
                        *baseline_ms,
                    ));
                }
                for ((ok, all), window_ms) in windows {
                    counters.add(&ok, window_ms, now_ms, success)?;
                    counters.add(&all, window_ms, now_ms, 1.0)?;
                }
                if let Some((on_success, on_failure)) = steps {
                    let step = if success > 0.0 {
                        *on_success
                    } else {
                        *on_failure
                    };
                    let level = surge_level(rule, spec, value);
                    counters.accumulate(&level, *window_ms, now_ms, step)?;
                }
            }
            (TrackedKey::SinchFraud { count, window_ms }, Resolution::SinchFraud) => {
                counters.add(count, *window_ms, now_ms, 1.0)?;
            }
            _ => continue,
        }
        if resolution != Resolution::Success {
            let (rule, block_key) = key.block_key();
            let evidence = Evidence {
                id: id.to_owned(),
                number: MaskedNumber(&tracked.number).to_string(),
                outcome: match resolution {
                    Resolution::SinchFraud => "denied by Sinch as fraud",
                    _ => "not completed",
                }
                .to_owned(),
            };
            failures.push(((rule.to_owned(), block_key.to_owned()), evidence));
        }
    }
    Ok(failures)
}

/// How a rule quarantines the keys that trip it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockSpec {
    /// First block; each repeat doubles it.
    pub for_ms: i64,
    /// The longest a block gets; a key that trips again within this long after its last
    /// block ended counts as a repeat.
    pub max_ms: i64,
    /// Lets every n-th blocked request through, so recovery can be observed.
    pub probe_every: Option<u64>,
}

impl BlockSpec {
    /// The block for a key that trips now, given how its last block ended (strikes,
    /// when): a repeat within `max_ms` of the last one doubles it, up to `max_ms`.
    pub fn block(
        &self,
        rule: &str,
        key: &str,
        last: Option<(u32, i64)>,
        now_ms: i64,
        reason: String,
        evidence: Vec<Evidence>,
    ) -> Block {
        let strikes = match last {
            Some((strikes, ended)) if now_ms - ended <= self.max_ms => strikes + 1,
            _ => 1,
        };
        let doubled = self
            .for_ms
            .saturating_mul(1_i64 << strikes.saturating_sub(1).min(30));
        Block {
            rule: rule.to_owned(),
            key: key.to_owned(),
            since: at(now_ms),
            until: Some(at(now_ms.saturating_add(doubled.min(self.max_ms)))),
            strikes,
            reason,
            evidence,
            requests: 0,
            probes: 0,
        }
    }
}

/// A key in quarantine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Block {
    pub rule: String,
    pub key: String,
    pub since: DateTime<Utc>,
    /// `None`: pinned by an operator, never expires.
    pub until: Option<DateTime<Utc>>,
    /// How many times this key has been blocked in a row (1 = first time).
    pub strikes: u32,
    pub reason: String,
    pub evidence: Vec<Evidence>,
    /// Blocked requests seen, for probing.
    #[serde(default)]
    pub requests: u64,
    /// Requests let through as probes.
    #[serde(default)]
    pub probes: u64,
}

impl Block {
    /// Whether it still blocks at `now_ms` (a pinned block always does).
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.until.is_none_or(|u| u.timestamp_millis() > now_ms)
    }
}

/// What the quarantine says about one request.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockCheck {
    Free,
    Blocked(Block),
    /// Blocked, but let through as a probe.
    Probe(Block),
}

/// What changed, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockChange {
    Blocked,
    Expired,
    Lifted,
    Pinned,
}

impl BlockChange {
    pub const ALL: [BlockChange; 4] = [Self::Blocked, Self::Expired, Self::Lifted, Self::Pinned];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocked => "blocked",
            Self::Expired => "expired",
            Self::Lifted => "lifted",
            Self::Pinned => "pinned",
        }
    }
}

/// The persisted form: active blocks and the repeat history.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuarantineState {
    pub blocks: Vec<Block>,
    /// (rule, key, strikes, when the last block ended).
    pub history: Vec<(String, String, u32, DateTime<Utc>)>,
}

#[derive(Default)]
struct QuarantineInner {
    active: HashMap<(String, String), Block>,
    history: HashMap<(String, String), (u32, i64)>,
    generation: u64,
    changes: [u64; 4],
}

#[derive(Default)]
pub struct Quarantine {
    inner: Mutex<QuarantineInner>,
}

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

impl QuarantineInner {
    fn changed(&mut self, change: BlockChange, block: &Block) {
        self.generation += 1;
        self.changes[change as usize] += 1;
        let until = block
            .until
            .map_or_else(|| "never (pinned)".to_owned(), |u| u.to_rfc3339());
        match change {
            BlockChange::Blocked => tracing::warn!(
                rule = %block.rule, key = %block.key, strikes = block.strikes, %until,
                "policy quarantined a key: {}", block.reason
            ),
            _ => tracing::info!(
                rule = %block.rule, key = %block.key, change = change.as_str(), %until,
                "policy quarantine changed"
            ),
        }
    }

    /// The (rule, key) of every active block on `key`, after expiring what is due.
    fn blocks_on(&mut self, key: &str, now_ms: i64) -> Vec<(String, String)> {
        self.expire(now_ms);
        self.active
            .keys()
            .filter(|(_, k)| k == key)
            .cloned()
            .collect()
    }

    /// Ends blocks whose time is up, remembering them for escalation.
    fn expire(&mut self, now_ms: i64) {
        let due: Vec<(String, String)> = self
            .active
            .iter()
            .filter(|(_, b)| !b.active_at(now_ms))
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            if let Some(block) = self.active.remove(&k) {
                let ended = block.until.map_or(now_ms, |u| u.timestamp_millis());
                self.history.insert(k, (block.strikes, ended));
                self.changed(BlockChange::Expired, &block);
            }
        }
    }
}

impl Quarantine {
    fn lock(&self) -> std::sync::MutexGuard<'_, QuarantineInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` is blocked by `rule` now; counts the request toward probing.
    pub fn check(&self, rule: &str, key: &str, now_ms: i64, spec: &BlockSpec) -> BlockCheck {
        let mut q = self.lock();
        let k = (rule.to_owned(), key.to_owned());
        let due = q.active.get(&k).is_some_and(|b| !b.active_at(now_ms));
        if due {
            q.expire(now_ms);
        }
        let Some(block) = q.active.get_mut(&k) else {
            return BlockCheck::Free;
        };
        block.requests += 1;
        if spec
            .probe_every
            .map(|n| n.saturating_mul(u64::from(block.strikes.max(1))))
            .is_some_and(|n| n > 0 && block.requests % n == 0)
        {
            block.probes += 1;
            BlockCheck::Probe(block.clone())
        } else {
            BlockCheck::Blocked(block.clone())
        }
    }

    /// Whether `key` is blocked by `rule` now, without counting the request toward
    /// probing (for planning what a decision will read).
    pub fn peek(&self, rule: &str, key: &str, now_ms: i64) -> bool {
        let q = self.lock();
        q.active
            .get(&(rule.to_owned(), key.to_owned()))
            .is_some_and(|b| b.active_at(now_ms))
    }

    /// Blocks `key` for `rule`: for the spec's time, doubled for each repeat, capped.
    pub fn trip(
        &self,
        rule: &str,
        key: &str,
        now_ms: i64,
        spec: &BlockSpec,
        reason: String,
        evidence: Vec<Evidence>,
    ) -> Block {
        let mut q = self.lock();
        let k = (rule.to_owned(), key.to_owned());
        if let Some(existing) = q.active.get(&k) {
            return existing.clone();
        }
        let block = spec.block(
            rule,
            key,
            q.history.get(&k).copied(),
            now_ms,
            reason,
            evidence,
        );
        q.active.insert(k, block.clone());
        q.changed(BlockChange::Blocked, &block);
        block
    }

    /// Lifts every block on `key` (whatever rule set it); returns them.
    pub fn lift(&self, key: &str, now_ms: i64) -> Vec<Block> {
        let mut q = self.lock();
        let mut lifted = Vec::new();
        for k in q.blocks_on(key, now_ms) {
            if let Some(block) = q.active.remove(&k) {
                // An operator's decision: the next trip starts the escalation afresh.
                q.history.remove(&k);
                q.changed(BlockChange::Lifted, &block);
                lifted.push(block);
            }
        }
        lifted
    }

    /// Makes every block on `key` permanent; returns them.
    pub fn pin(&self, key: &str, now_ms: i64) -> Vec<Block> {
        let mut q = self.lock();
        let mut pinned = Vec::new();
        for k in q.blocks_on(key, now_ms) {
            let Some(block) = q.active.get_mut(&k) else {
                continue;
            };
            block.until = None;
            let block = block.clone();
            q.changed(BlockChange::Pinned, &block);
            pinned.push(block);
        }
        pinned
    }

    /// Active blocks, oldest first.
    pub fn list(&self, now_ms: i64) -> Vec<Block> {
        let mut q = self.lock();
        q.expire(now_ms);
        let mut blocks: Vec<Block> = q.active.values().cloned().collect();
        blocks.sort_by(|a, b| (a.since, &a.rule, &a.key).cmp(&(b.since, &b.rule, &b.key)));
        blocks
    }

    pub fn export(&self) -> QuarantineState {
        let q = self.lock();
        let mut blocks: Vec<Block> = q.active.values().cloned().collect();
        blocks.sort_by(|a, b| (a.since, &a.rule, &a.key).cmp(&(b.since, &b.rule, &b.key)));
        let mut history: Vec<_> = q
            .history
            .iter()
            .map(|((rule, key), (strikes, ended))| {
                (rule.clone(), key.clone(), *strikes, at(*ended))
            })
            .collect();
        history.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        QuarantineState { blocks, history }
    }

    /// Replaces the state with a persisted one; blocks that ended meanwhile expire.
    pub fn restore(&self, state: QuarantineState, now_ms: i64) {
        self.mirror(state, now_ms);
    }

    /// Takes in a block tripped through the shared state (by any replica).
    pub fn adopt(&self, block: &Block) {
        let mut q = self.lock();
        let k = (block.rule.clone(), block.key.clone());
        if let std::collections::hash_map::Entry::Vacant(slot) = q.active.entry(k) {
            slot.insert(block.clone());
            q.changed(BlockChange::Blocked, block);
        }
    }

    /// Mirrors the shared quarantines: blocks tripped, lifted or pinned on any replica
    /// show here. This replica's probe counts are kept.
    pub fn mirror(&self, state: QuarantineState, now_ms: i64) {
        let mut q = self.lock();
        let mut active: HashMap<(String, String), Block> = HashMap::new();
        for mut block in state.blocks {
            let k = (block.rule.clone(), block.key.clone());
            if let Some(mine) = q.active.get(&k) {
                block.requests = mine.requests;
                block.probes = mine.probes;
            }
            active.insert(k, block);
        }
        q.active = active;
        q.history = state
            .history
            .into_iter()
            .map(|(rule, key, strikes, ended)| ((rule, key), (strikes, ended.timestamp_millis())))
            .collect();
        q.expire(now_ms);
        q.generation += 1;
    }

    /// Changes so far: bumps on every block, expiry, lift and pin.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Active blocks and how many of each change happened since start.
    pub fn stats(&self) -> (usize, [u64; 4]) {
        let q = self.lock();
        (q.active.len(), q.changes)
    }
}

#[cfg(test)]
#[path = "adaptive_tests.rs"]
mod tests;
