//! Sliding-window counters for `rate_limit`, `distinct_numbers` and `spend`, and the
//! levels of the sequential tests of `conversion` and `surge`.
//!
//! They live outside the policy snapshot, keyed by rule name, condition and key value, so
//! a reload keeps them (renaming a rule or changing its key starts afresh). The map is
//! split into shards, each behind its own lock, so concurrent decisions rarely meet.
//! A window is ten sub-buckets: counts are exact to a tenth of the window.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
    sync::Mutex,
};

use super::{facts::Facts, PolicyError};
use crate::events::VerificationMethod;

/// A fast hash for keys that are ours (rule names, numbers, prefixes): SipHash's
/// protection against chosen collisions costs more than it is worth here, and the
/// seed is random per process.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A counter key (or a distinct member) as held in memory: two 64-bit hashes of it under
/// independent seeds drawn per process. Random numbers make a key per request, held for
/// the rule's window, and its three strings (three allocations) were over a quarter of
/// what each key cost (peak RSS over a run with no rules: about 640 bytes a key with a
/// policy of one per-number rule, 460 now). Two different keys share an id with a chance
/// of about n^2 / 2^129 for n keys held (under 10^-26 at a million), and the seeds are
/// unknown outside the process, so no caller can aim at a collision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeldId(u64, u64);

/// An id is already a random hash: its maps use its second half as their hash instead
/// of hashing it again (the first half picks the shard).
impl Hash for HeldId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.1);
    }
}

/// The hasher of maps keyed by [`HeldId`]: the id's own hash, passed through.
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `HeldId` hashes with it, as one u64; any other input still hashes.
        self.0 = bytes
            .iter()
            .fold(self.0, |h, b| h.rotate_left(8) ^ u64::from(*b));
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id;
    }
}

/// A map keyed by [`HeldId`].
type IdMap<V> = HashMap<HeldId, V, std::hash::BuildHasherDefault<PassThrough>>;

/// The seeds of [`HeldId`]s, and of the tags that [`Counters::forget`] finds keys by.
#[derive(Default)]
struct Seeds {
    first: foldhash::quality::RandomState,
    second: foldhash::quality::RandomState,
}

impl Seeds {
    fn id<T: Hash + ?Sized>(&self, item: &T) -> HeldId {
        HeldId(self.first.hash_one(item), self.second.hash_one(item))
    }

    /// What `forget(rule, value)` matches: every condition of the rule under the value.
    fn tag(&self, rule: &str, value: &str) -> u64 {
        self.second.hash_one((rule, value))
    }
}

/// A window and the tag of its key's rule and value.
#[derive(Debug)]
struct Held {
    window: Window,
    tag: u64,
}

const SHARDS: usize = 64;
const BUCKETS: usize = 10;

/// Which counter: the rule, the condition (e.g. `rate_limit:range:4`), the key value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct CounterKey {
    pub rule: String,
    pub condition: String,
    pub value: String,
}

/// The pieces as one string. Keys are built on every decision: this is several times
/// quicker than `format!`, which grows its string piece by piece.
pub(super) fn joined(pieces: &[&str]) -> String {
    let mut out = String::with_capacity(pieces.iter().map(|p| p.len()).sum());
    pieces.iter().for_each(|p| out.push_str(p));
    out
}

/// Readings that move slowly (a key's normal rate over a day), kept per key for a
/// minute so that a decision does not read them every time: with shared state each read
/// is a database round trip.
pub(super) struct SlowReadings<V> {
    held: Mutex<FastMap<String, (i64, V)>>,
}

impl<V> Default for SlowReadings<V> {
    fn default() -> Self {
        Self {
            held: Mutex::new(FastMap::default()),
        }
    }
}

impl<V> std::fmt::Debug for SlowReadings<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SlowReadings")
    }
}

/// How long a slow reading is used before it is read again.
const SLOW_READING_MS: i64 = 60_000;
/// Beyond this many keys the readings start afresh (keys of one number range each).
const SLOW_READING_KEYS: usize = 100_000;

impl<V: Clone> SlowReadings<V> {
    /// The reading for `key`: held if read less than a minute before `now_ms`, else
    /// `read` from `counters` (and held, unless `counters` only plans).
    pub(super) fn get(
        &self,
        key: &str,
        now_ms: i64,
        counters: &dyn CounterStore,
        read: impl FnOnce() -> Result<V, PolicyError>,
    ) -> Result<V, PolicyError> {
        if let Some((at_ms, value)) = self.lock().get(key) {
            if (0..SLOW_READING_MS).contains(&(now_ms - at_ms)) {
                return Ok(value.clone());
            }
        }
        let value = read()?;
        if counters.planning() {
            return Ok(value);
        }
        let mut held = self.lock();
        if held.len() >= SLOW_READING_KEYS {
            held.clear();
        }
        held.insert(key.to_owned(), (now_ms, value.clone()));
        Ok(value)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FastMap<String, (i64, V)>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a counter is kept per.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum KeyDef {
    Number,
    /// `prefix:k`: the first k digits after `+`.
    Prefix(usize),
    /// `range:n`: the number without its last n digits.
    Range(usize),
    Country,
    Method,
    Global,
}

impl KeyDef {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let digits = |s: &str, what: &str| {
            s.parse::<usize>()
                .ok()
                .filter(|n| (1..=14).contains(n))
                .ok_or_else(|| format!("`{what}:{s}` needs a digit count from 1 to 14"))
        };
        match text.split_once(':') {
            None => match text {
                "number" => Ok(KeyDef::Number),
                "country" => Ok(KeyDef::Country),
                "method" => Ok(KeyDef::Method),
                "global" => Ok(KeyDef::Global),
                other => Err(format!(
                    "`{other}` is not a key: use number, prefix:k, range:n, country, method or global"
                )),
            },
            Some(("prefix", k)) => digits(k, "prefix").map(KeyDef::Prefix),
            Some(("range", n)) => digits(n, "range").map(KeyDef::Range),
            Some((other, _)) => Err(format!("`{other}` is not a key kind: use prefix:k or range:n")),
        }
    }

    pub(super) fn value(&self, number: &str, country: &str, method: &VerificationMethod) -> String {
        let digits = number.trim_start_matches('+');
        match self {
            KeyDef::Number => number.to_owned(),
            KeyDef::Prefix(k) => joined(&["+", &digits[..(*k).min(digits.len())]]),
            KeyDef::Range(n) => joined(&["+", &digits[..digits.len().saturating_sub(*n)]]),
            KeyDef::Country => country.to_owned(),
            KeyDef::Method => method.as_str().to_owned(),
            KeyDef::Global => "*".to_owned(),
        }
    }
}

/// What a counter counts over: its key, as written and parsed, and its window.
#[derive(Debug, Clone)]
pub(super) struct CounterSpec {
    pub(super) key: KeyDef,
    pub(super) text: String,
    pub(super) window_ms: i64,
}

impl CounterSpec {
    pub(super) fn parse(key: &str, window: &str) -> Result<Self, String> {
        let window_ms = humantime::parse_duration(window)
            .ok()
            .filter(|d| !d.is_zero())
            .and_then(|d| i64::try_from(d.as_millis()).ok())
            .ok_or_else(|| format!("window `{window}` is not a duration like 10m or 1h"))?;
        Ok(Self {
            key: KeyDef::parse(key)?,
            text: key.to_owned(),
            window_ms,
        })
    }

    /// This request's key value (its range, prefix, country, …).
    pub(super) fn value(&self, f: &Facts<'_>) -> String {
        self.key.value(&f.number, f.country, &f.request.method)
    }

    /// The counter of `rule` for this request, under condition `kind`.
    pub(super) fn counter(&self, rule: &str, kind: &str, f: &Facts<'_>) -> CounterKey {
        CounterKey {
            rule: rule.to_owned(),
            condition: joined(&[kind, ":", &self.text]),
            value: self.value(f),
        }
    }
}

#[derive(Debug)]
enum Window {
    /// Counts or sums (per currency: one window per currency key) in sub-buckets.
    Buckets {
        width_ms: i64,
        /// Start of the newest bucket, in ms.
        head_ms: i64,
        values: BucketValues,
    },
    /// A level that never drops below zero (the statistic of a CUSUM test), forgotten
    /// when it has not moved for `idle_ms`.
    Level {
        value: f64,
        updated_ms: i64,
        idle_ms: i64,
    },
    /// Distinct numbers (by id) and when each was last seen. Kept inline: boxed, every
    /// sighting reads one more cache line, and the simulator's decisions took longer.
    Distinct(Distinct),
}

#[derive(Debug)]
struct Distinct {
    window_ms: i64,
    seen: IdMap<i64>,
    /// No number was seen before this: until it leaves the window, nothing does.
    oldest_ms: i64,
}

/// The amounts of a window's sub-buckets. Most keys (a number's, a quiet range's) only
/// ever get amounts within one sub-bucket: they hold that one amount, and a key gets all
/// ten (boxed) once a second sub-bucket gets an amount. A held window takes 64 bytes
/// instead of 112 with ten amounts inline.
#[derive(Debug)]
enum BucketValues {
    /// One amount, `age` sub-buckets older than the newest (`BUCKETS`: out of the window).
    One { amount: f64, age: u8 },
    /// Every sub-bucket, a ring whose newest is at `head`.
    Ten {
        values: Box<[f64; BUCKETS]>,
        head: u8,
    },
}

impl BucketValues {
    const EMPTY: Self = BucketValues::One {
        amount: 0.0,
        age: 0,
    };

    /// The window moved on by `steps` sub-buckets: those that leave it are dropped.
    fn advance(&mut self, steps: i64) {
        let steps = u8::try_from(steps.clamp(0, BUCKETS as i64)).unwrap_or(BUCKETS as u8);
        match self {
            BucketValues::One { amount, age } => {
                *age = (*age + steps).min(BUCKETS as u8);
                if usize::from(*age) == BUCKETS {
                    *amount = 0.0;
                }
            }
            BucketValues::Ten { values, head } => {
                for _ in 0..steps {
                    *head = (*head + 1) % BUCKETS as u8;
                    values[usize::from(*head)] = 0.0;
                }
            }
        }
    }

    /// Adds `amount` to the newest sub-bucket.
    fn add(&mut self, amount: f64) {
        match self {
            BucketValues::One { amount: held, age } if *age == 0 || *held == 0.0 => {
                if *age != 0 {
                    (*held, *age) = (0.0, 0);
                }
                *held += amount;
            }
            BucketValues::One { amount: held, age } => {
                let mut values = Box::new([0.0; BUCKETS]);
                // The ring starts with its newest at 0: `age` back from it.
                values[(BUCKETS - usize::from(*age)) % BUCKETS] = *held;
                values[0] += amount;
                *self = BucketValues::Ten { values, head: 0 };
            }
            BucketValues::Ten { values, head } => values[usize::from(*head)] += amount,
        }
    }

    fn total(&self) -> f64 {
        match self {
            BucketValues::One { amount, .. } => *amount,
            BucketValues::Ten { values, .. } => values.iter().sum(),
        }
    }
}

impl Window {
    fn buckets(window_ms: i64, now_ms: i64) -> Self {
        let width_ms = (window_ms / BUCKETS as i64).max(1);
        Window::Buckets {
            width_ms,
            head_ms: now_ms - now_ms.rem_euclid(width_ms),
            values: BucketValues::EMPTY,
        }
    }

    /// Moves the window to `now`, dropping what fell out of it.
    fn advance(&mut self, now_ms: i64) {
        match self {
            Window::Buckets {
                width_ms,
                head_ms,
                values,
            } => {
                let steps = (now_ms - *head_ms).div_euclid(*width_ms);
                if steps <= 0 {
                    return;
                }
                values.advance(steps);
                *head_ms += steps * *width_ms;
            }
            Window::Level {
                value,
                updated_ms,
                idle_ms,
            } => {
                if now_ms - *updated_ms > *idle_ms {
                    *value = 0.0;
                }
            }
            Window::Distinct(d) => {
                let cutoff = now_ms - d.window_ms;
                if d.oldest_ms <= cutoff {
                    d.seen.retain(|_, at| *at > cutoff);
                    d.oldest_ms = d.seen.values().copied().min().unwrap_or(i64::MAX);
                }
            }
        }
    }

    fn total(&self) -> f64 {
        match self {
            Window::Buckets { values, .. } => values.total(),
            Window::Level { value, .. } => *value,
            Window::Distinct(d) => d.seen.len() as f64,
        }
    }

    fn idle_since(&self) -> i64 {
        match self {
            Window::Buckets { head_ms, .. } => *head_ms,
            Window::Level { updated_ms, .. } => *updated_ms,
            Window::Distinct(d) => d.seen.values().copied().max().unwrap_or(i64::MIN),
        }
    }

    fn span_ms(&self) -> i64 {
        match self {
            Window::Buckets { width_ms, .. } => width_ms * BUCKETS as i64,
            Window::Level { idle_ms, .. } => *idle_ms,
            Window::Distinct(d) => d.window_ms,
        }
    }
}

/// Where a policy's counters live: in this process ([`Counters`]), or in a database
/// every replica shares (`policy::shared`), so that N replicas count as one.
pub trait CounterStore: Send + Sync {
    /// Adds `amount` to a count or sum over `window_ms`; returns the new total.
    fn add(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        amount: f64,
    ) -> Result<f64, PolicyError>;
    /// The current total of a count or sum.
    fn total(&self, key: &CounterKey, window_ms: i64, now_ms: i64) -> Result<f64, PolicyError>;
    /// Adds `step` to a level that never drops below zero (a CUSUM statistic) and
    /// restarts from zero once it has not moved for `idle_ms`; returns the new level.
    fn accumulate(
        &self,
        key: &CounterKey,
        idle_ms: i64,
        now_ms: i64,
        step: f64,
    ) -> Result<f64, PolicyError>;
    /// The current level of an accumulated statistic (`0` when unknown or idle).
    fn level(&self, key: &CounterKey, idle_ms: i64, now_ms: i64) -> Result<f64, PolicyError>;
    /// Records `member` as seen; returns how many distinct members the window holds.
    fn see(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        member: &str,
    ) -> Result<usize, PolicyError>;
    /// How many distinct members `see` recorded under `key` were last seen within
    /// `span_ms` (at most the key's window) before `now_ms`; records none.
    fn members(&self, key: &CounterKey, span_ms: i64, now_ms: i64) -> Result<f64, PolicyError>;
    /// Adds `amount` only if the total stays within `cap`, as one step (no other
    /// decision, here or on another replica, can add in between); returns the total
    /// with `amount` and whether it was added.
    fn add_within(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        amount: f64,
        cap: f64,
    ) -> Result<(f64, bool), PolicyError>;
    /// Forgets every counter of `rule` under key value `value`.
    fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError>;
    /// Drops what has left its window; called every so many decisions.
    fn sweep(&self, round: usize, now_ms: i64);
    /// Keys held, for the `verigate_rate_limit_keys` gauge (`0` when not known here).
    fn keys(&self) -> usize;
    /// True for a dry run that only notes what is asked (answers are made up): nothing
    /// read from it may be kept.
    fn planning(&self) -> bool {
        false
    }
}

pub struct Counters {
    shards: Vec<Mutex<IdMap<Held>>>,
    seeds: Seeds,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(IdMap::default())).collect(),
            seeds: Seeds::default(),
        }
    }
}

impl Counters {
    /// The key's id and its shard, locked.
    fn locked(&self, key: &CounterKey) -> (HeldId, std::sync::MutexGuard<'_, IdMap<Held>>) {
        let id = self.seeds.id(key);
        let shard = &self.shards[(id.0 % SHARDS as u64) as usize];
        (id, shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn with<R>(
        &self,
        key: &CounterKey,
        fresh: impl FnOnce() -> Window,
        now_ms: i64,
        f: impl FnOnce(&mut Window) -> R,
    ) -> R {
        let (id, mut shard) = self.locked(key);
        let held = shard.entry(id).or_insert_with(|| Held {
            window: fresh(),
            tag: self.seeds.tag(&key.rule, &key.value),
        });
        held.window.advance(now_ms);
        f(&mut held.window)
    }

    /// Adds `amount` to a count or sum over `window_ms`; returns the new total.
    pub fn add(&self, key: &CounterKey, window_ms: i64, now_ms: i64, amount: f64) -> f64 {
        self.with(
            key,
            || Window::buckets(window_ms, now_ms),
            now_ms,
            |w| {
                if let Window::Buckets { values, .. } = w {
                    values.add(amount);
                }
                w.total()
            },
        )
    }

    /// The current total of a count or sum, without adding (nor keeping an empty window
    /// for a key nothing was added to).
    pub fn total(&self, key: &CounterKey, _window_ms: i64, now_ms: i64) -> f64 {
        let (id, mut shard) = self.locked(key);
        shard.get_mut(&id).map_or(0.0, |held| {
            held.window.advance(now_ms);
            held.window.total()
        })
    }

    /// Records `number` as seen; returns how many distinct numbers the window holds.
    pub fn see(&self, key: &CounterKey, window_ms: i64, now_ms: i64, number: &str) -> usize {
        let member = self.seeds.id(number);
        self.with(
            key,
            || {
                Window::Distinct(Distinct {
                    window_ms,
                    seen: IdMap::default(),
                    oldest_ms: i64::MAX,
                })
            },
            now_ms,
            |w| {
                if let Window::Distinct(d) = w {
                    d.oldest_ms = d.oldest_ms.min(now_ms);
                    d.seen.insert(member, now_ms);
                    d.seen.len()
                } else {
                    0
                }
            },
        )
    }

    /// How many distinct members were last seen within `span_ms` before `now_ms`.
    pub fn members(&self, key: &CounterKey, span_ms: i64, now_ms: i64) -> f64 {
        let (id, mut shard) = self.locked(key);
        shard.get_mut(&id).map_or(0.0, |held| {
            held.window.advance(now_ms);
            match &held.window {
                Window::Distinct(d) => {
                    d.seen.values().filter(|&&at| at > now_ms - span_ms).count() as f64
                }
                _ => 0.0,
            }
        })
    }

    /// Drops windows idle for longer than their span, from one shard (call often; each
    /// call moves on to the next shard).
    pub fn sweep(&self, shard: usize, now_ms: i64) {
        let mut map = self.shards[shard % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // A distinct window whose members have all left it is idle since ever
        // (`i64::MIN`): the difference saturates and the window goes.
        map.retain(|_, held| {
            now_ms.saturating_sub(held.window.idle_since()) <= held.window.span_ms()
        });
    }

    /// Forgets every counter of `rule` under key value `value` (a lifted quarantine starts
    /// from fresh evidence).
    pub fn forget(&self, rule: &str, value: &str) {
        let tag = self.seeds.tag(rule, value);
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, held| held.tag != tag);
        }
    }

    /// Keys held, for the `verigate_rate_limit_keys` gauge.
    pub fn keys(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

impl CounterStore for Counters {
    fn add(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        amount: f64,
    ) -> Result<f64, PolicyError> {
        Ok(Counters::add(self, key, window_ms, now_ms, amount))
    }

    fn total(&self, key: &CounterKey, window_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
        Ok(Counters::total(self, key, window_ms, now_ms))
    }

    fn accumulate(
        &self,
        key: &CounterKey,
        idle_ms: i64,
        now_ms: i64,
        step: f64,
    ) -> Result<f64, PolicyError> {
        Ok(self.with(
            key,
            || Window::Level {
                value: 0.0,
                updated_ms: now_ms,
                idle_ms,
            },
            now_ms,
            |w| {
                if let Window::Level {
                    value, updated_ms, ..
                } = w
                {
                    *value = (*value + step).max(0.0);
                    *updated_ms = now_ms;
                }
                w.total()
            },
        ))
    }

    fn level(&self, key: &CounterKey, idle_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
        Ok(Counters::total(self, key, idle_ms, now_ms))
    }

    fn see(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        member: &str,
    ) -> Result<usize, PolicyError> {
        Ok(Counters::see(self, key, window_ms, now_ms, member))
    }

    fn members(&self, key: &CounterKey, span_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
        Ok(Counters::members(self, key, span_ms, now_ms))
    }

    fn add_within(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        amount: f64,
        cap: f64,
    ) -> Result<(f64, bool), PolicyError> {
        Ok(self.with(
            key,
            || Window::buckets(window_ms, now_ms),
            now_ms,
            |w| {
                let with = w.total() + amount;
                let fits = with <= cap;
                if let (true, Window::Buckets { values, .. }) = (fits, &mut *w) {
                    values.add(amount);
                }
                (with, fits)
            },
        ))
    }

    fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError> {
        Counters::forget(self, rule, value);
        Ok(())
    }

    fn sweep(&self, round: usize, now_ms: i64) {
        Counters::sweep(self, round, now_ms);
    }

    fn keys(&self) -> usize {
        Counters::keys(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// A window's amounts held as one until a second sub-bucket gets one count what
        /// ten sub-buckets in a ring count, whatever the adds (refunds too) and moves.
        #[test]
        fn one_amount_then_ten_count_as_a_ring_of_ten(
            moves in proptest::collection::vec((0i64..14, -3i32..6), 0..80)
        ) {
            let mut compact = BucketValues::EMPTY;
            let (mut ring, mut head) = ([0.0_f64; BUCKETS], 0_usize);
            for (steps, amount) in moves {
                let amount = f64::from(amount) * 0.25;
                compact.advance(steps);
                for _ in 0..steps.min(BUCKETS as i64) {
                    head = (head + 1) % BUCKETS;
                    ring[head] = 0.0;
                }
                compact.add(amount);
                ring[head] += amount;
                proptest::prop_assert_eq!(compact.total(), ring.iter().sum::<f64>());
            }
        }
    }

    #[test]
    fn a_held_count_stays_small() {
        // Counters are held per number and per range, hundreds of thousands under load:
        // a wide variant inline would make every one of them pay for it.
        assert!(
            std::mem::size_of::<Held>() <= 64,
            "{}",
            std::mem::size_of::<Held>()
        );
    }

    fn key(v: &str) -> CounterKey {
        CounterKey {
            rule: "r".into(),
            condition: "rate_limit:number".into(),
            value: v.into(),
        }
    }

    #[test]
    fn counts_leave_the_window_after_it_passes() {
        let c = Counters::default();
        let minute = 60_000;
        for i in 0..5 {
            assert_eq!(
                c.add(&key("a"), 10 * minute, i * minute, 1.0),
                (i + 1) as f64
            );
        }
        assert_eq!(c.total(&key("a"), 10 * minute, 9 * minute), 5.0);
        // At 12 minutes the window is (2, 12] minutes, to the minute: t=3 and t=4 remain.
        assert_eq!(c.total(&key("a"), 10 * minute, 12 * minute), 2.0);
        assert_eq!(c.total(&key("a"), 10 * minute, 30 * minute), 0.0);
        assert_eq!(c.total(&key("b"), 10 * minute, 30 * minute), 0.0);
    }

    #[test]
    fn a_level_never_drops_below_zero_and_restarts_when_idle() {
        let c = Counters::default();
        let k = key("cusum");
        assert_eq!(c.accumulate(&k, 1000, 0, -2.0), Ok(0.0));
        assert_eq!(c.accumulate(&k, 1000, 10, 1.5), Ok(1.5));
        assert_eq!(c.accumulate(&k, 1000, 20, 1.5), Ok(3.0));
        assert_eq!(c.accumulate(&k, 1000, 30, -1.0), Ok(2.0));
        assert_eq!(c.level(&k, 1000, 900), Ok(2.0));
        assert_eq!(c.level(&k, 1000, 1031), Ok(0.0));
        assert_eq!(c.accumulate(&k, 1000, 2000, 1.0), Ok(1.0));
    }

    #[test]
    fn distinct_numbers_count_each_number_once() {
        let c = Counters::default();
        let k = key("range");
        assert_eq!(c.see(&k, 1000, 0, "+1"), 1);
        assert_eq!(c.see(&k, 1000, 10, "+1"), 1);
        assert_eq!(c.see(&k, 1000, 20, "+2"), 2);
        assert_eq!(c.see(&k, 1000, 1015, "+3"), 2); // +1 last seen at 10 has left
    }

    #[test]
    fn members_are_read_over_a_span_without_seeing_one() {
        let c = Counters::default();
        let k = key("range");
        assert_eq!(CounterStore::members(&c, &k, 1000, 0), Ok(0.0));
        c.see(&k, 1000, 0, "+1");
        c.see(&k, 1000, 400, "+2");
        c.see(&k, 1000, 800, "+3");
        assert_eq!(CounterStore::members(&c, &k, 1000, 900), Ok(3.0));
        // Seen within the last 300 ms: +3 only.
        assert_eq!(CounterStore::members(&c, &k, 300, 900), Ok(1.0));
        // A member seen again moves into the span; reading added none.
        c.see(&k, 1000, 850, "+1");
        assert_eq!(CounterStore::members(&c, &k, 300, 900), Ok(2.0));
        assert_eq!(
            CounterStore::members(&c, &k, 1000, 1450),
            Ok(2.0),
            "+2 left the window"
        );
        // Only distinct counts have members.
        c.add(&key("sum"), 1000, 0, 5.0);
        assert_eq!(CounterStore::members(&c, &key("sum"), 1000, 10), Ok(0.0));
    }

    #[test]
    fn a_distinct_window_whose_members_all_left_is_swept() {
        let c = Counters::default();
        let k = key("range");
        c.see(&k, 1000, 0, "+1");
        // Reading it after its window moves the member out and leaves it empty.
        assert_eq!(CounterStore::members(&c, &k, 1000, 5000), Ok(0.0));
        for shard in 0..SHARDS {
            c.sweep(shard, 5000);
        }
        assert_eq!(c.keys(), 0);
    }

    fn counter_key(rule: &str, condition: &str, value: &str) -> CounterKey {
        CounterKey {
            rule: rule.into(),
            condition: condition.into(),
            value: value.into(),
        }
    }

    #[test]
    fn keys_that_join_to_the_same_text_are_counted_apart() {
        let c = Counters::default();
        let split = counter_key;
        assert_eq!(c.add(&split("ab", "c", "d"), 1000, 0, 1.0), 1.0);
        assert_eq!(c.add(&split("a", "bc", "d"), 1000, 0, 2.0), 2.0);
        assert_eq!(c.add(&split("a", "b", "cd"), 1000, 0, 4.0), 4.0);
        assert_eq!(c.total(&split("ab", "c", "d"), 1000, 1), 1.0);
        assert_eq!(c.keys(), 3);
    }

    #[test]
    fn forgetting_a_rule_and_value_keeps_every_other_key() {
        let c = Counters::default();
        let at = counter_key;
        for (rule, condition, value) in [
            ("r", "evidence:range:4", "+4670"),
            ("r", "conversion:range:4", "+4670"),
            ("r", "evidence:range:4", "+4671"),
            ("s", "evidence:range:4", "+4670"),
        ] {
            c.add(&at(rule, condition, value), 1000, 0, 1.0);
        }
        c.forget("r", "+4670");
        assert_eq!(c.total(&at("r", "evidence:range:4", "+4670"), 1000, 1), 0.0);
        assert_eq!(
            c.total(&at("r", "conversion:range:4", "+4670"), 1000, 1),
            0.0
        );
        assert_eq!(c.total(&at("r", "evidence:range:4", "+4671"), 1000, 1), 1.0);
        assert_eq!(c.total(&at("s", "evidence:range:4", "+4670"), 1000, 1), 1.0);
        assert_eq!(c.keys(), 2);
    }

    #[test]
    fn sweeping_drops_idle_windows() {
        let c = Counters::default();
        for shard in 0..SHARDS {
            c.add(&key(&shard.to_string()), 1000, 0, 1.0);
        }
        let held = c.keys();
        assert!(held > 0);
        (0..SHARDS).for_each(|s| c.sweep(s, 5000));
        assert_eq!(c.keys(), 0);
    }
}
