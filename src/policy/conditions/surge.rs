//! `surge` (adaptive): a key departs from its own normal: more requests than it usually
//! gets and, at the same time, fewer of them converting. Built for keys that real users
//! and an attack share (a busy operator block), where no fixed threshold separates them
//! but the change does.
//!
//! Each key learns its normal volume (requests per window) and conversion over
//! `baseline`, volume only while it is not surging and conversion only while its
//! evidence does not lean low, so an attack that lasts does not become the normal.
//! Volume is judged against the same stretch of the clock on the days before (up to a
//! week), since traffic follows the day; a key without a day behind it, against its
//! mean. Conversion is judged by the same sequential test as `conversion` (a CUSUM
//! against the key's own normal rate), volume by its ratio to normal. With `throttle`,
//! the key is not denied outright: requests pass up to `throttle` × its normal volume
//! in the window and only the excess is denied, so the usual traffic keeps going while
//! the attacker's surplus is cut.

use schemars::JsonSchema;
use serde::Deserialize;

use super::{
    default_baseline, default_complete_after, duration_ms, pair_totals, CompileContext,
    Compiled, Condition, CounterContext, Limit,
};
use crate::policy::{
    adaptive::{low_rates, steps_at, surge_counters, surge_level, TrackedKey, HOUR_MS},
    counters::{joined, CounterKey, CounterSpec, CounterStore, SlowReadings},
    facts::Facts,
    PolicyError,
};

pub(in crate::policy) struct Surge;

/// A key's change against its own normal volume and conversion.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct SurgeFile {
    /// The key: prefix:k, range:n, country, method or global.
    per: String,
    /// The recent window compared with normal, e.g. 1h.
    window: String,
    /// How far back normal is learned, e.g. 24h (at least 4 windows).
    #[serde(default = "default_baseline")]
    baseline: String,
    /// Volume must be at least this many times normal (1 = any volume).
    #[serde(default = "default_volume_above")]
    volume_above: f64,
    /// Conversion must lean below this share of the key's normal rate (0 to 1).
    conversion_below: f64,
    /// The chance that a key converting normally is judged surging, per outcome (e.g. 1e-5).
    #[serde(default = "default_false_alarm")]
    false_alarm: f64,
    /// Instead of denying every request while the key surges, let through up to this
    /// many times its normal volume per window and deny the excess (e.g. 1.2).
    throttle: Option<f64>,
    /// How long after being allowed a verification without a result counts as failed.
    #[serde(default = "default_complete_after")]
    complete_after: String,
}

impl SurgeFile {
    /// True when the rule lets the key's normal volume through instead of denying it.
    pub(in crate::policy) fn throttles(&self) -> bool {
        self.throttle.is_some()
    }
}

fn default_volume_above() -> f64 {
    1.5
}

fn default_false_alarm() -> f64 {
    1e-5
}

/// A key is judged only once its normal rests on this many outcomes.
const BASELINE_SAMPLES: f64 = 50.0;

const DAY_MS: i64 = 24 * HOUR_MS;
/// Earlier days whose same stretch of the clock teaches a key its normal volume then.
const HOURLY_DAYS: i64 = 7;
/// How long one day's hour is kept.
const HOURLY_MS: i64 = (HOURLY_DAYS + 1) * DAY_MS;

impl Condition for Surge {
    const HOLDS_WHEN: &'static str = "the key departs from its own normal, learned over `baseline` (24h) while it was not surging: at least `volume_above` (1.5) × its normal requests in the `window` (what came in the same stretch of the day, the window's, on up to seven days before, UTC; until a key has a day behind it, its mean over the baseline), and its conversion leaning below `conversion_below` × its normal rate by a sequential test at `false_alarm` (1e-5). With `throttle`, only the requests beyond `throttle` × its normal volume in the window match";
    const EXAMPLE: &'static str = r#"surge = { per = "prefix:5", window = "1h", volume_above = 1.5, conversion_below = 0.6, throttle = 1.2 }"#;
    type File = SurgeFile;

    fn compile(f: &SurgeFile, _: &CompileContext<'_>) -> Result<Compiled, String> {
        let spec = CounterSpec::parse(&f.per, &f.window)?;
        if spec.key == crate::policy::counters::KeyDef::Number {
            return Err("surge per number has no normal to learn: use prefix:k, range:n, country, method or global".into());
        }
        let baseline_ms = duration_ms(&f.baseline)
            .filter(|b| *b >= 4 * spec.window_ms)
            .ok_or_else(|| {
                format!(
                    "surge.baseline `{}` must be a duration of at least four windows",
                    f.baseline
                )
            })?;
        if !(f.conversion_below > 0.0 && f.conversion_below < 1.0) {
            return Err("surge.conversion_below must be a share between 0 and 1 (e.g. 0.6)".into());
        }
        if !(f64::MIN_POSITIVE..0.5).contains(&f.false_alarm) || !(1.0..).contains(&f.volume_above) {
            return Err(
                "surge.false_alarm must be between 0 and 0.5 (e.g. 1e-5) and volume_above at least 1"
                    .into(),
            );
        }
        if f.throttle.is_some_and(|t| !(1.0..).contains(&t)) {
            return Err("surge.throttle must be at least 1 (times the normal volume)".into());
        }
        let written = format!(
            "surge per {} over {} against its normal over {}: volume at least {}x, conversion below {}x (false alarm {}, complete after {}){}",
            f.per,
            f.window,
            f.baseline,
            f.volume_above,
            f.conversion_below,
            f.false_alarm,
            f.complete_after,
            f.throttle
                .map_or_else(String::new, |t| format!(", throttled to {t}x normal volume"))
        );
        Ok(Compiled::Limit(Box::new(SurgeLimit {
            spec,
            baseline_ms,
            volume_above: f.volume_above,
            lows: low_rates(|normal| f.conversion_below * normal),
            threshold: (1.0 / f.false_alarm).ln(),
            throttle: f.throttle,
            complete_after_ms: duration_ms(&f.complete_after).ok_or_else(|| {
                format!("complete_after `{}` is not a duration like 10m", f.complete_after)
            })?,
            written,
            calm: SlowReadings::default(),
            touched: SlowReadings::default(),
        })))
    }
}

#[derive(Debug)]
struct SurgeLimit {
    spec: CounterSpec,
    baseline_ms: i64,
    volume_above: f64,
    /// The sequential test's low rate for each normal rate (`conversion_below` x it).
    lows: Vec<Option<f64>>,
    /// ln(1 / false_alarm).
    threshold: f64,
    throttle: Option<f64>,
    complete_after_ms: i64,
    written: String,
    /// Each key's normal (volume per window, rate), read once a minute.
    calm: SlowReadings<Option<(f64, f64)>>,
    /// Keys whose first-sighting levels were kept alive in the last minute.
    touched: SlowReadings<()>,
}

/// A key's counters, by what they count.
struct SurgeKeys {
    /// Requests in the window.
    recent: CounterKey,
    /// Requests over the baseline, counted while not surging.
    normal: CounterKey,
    /// When the key was first seen (ms), forgotten after a baseline without requests.
    since: CounterKey,
    /// The same, forgotten after a week without requests: how long the hours of the
    /// day have been counted.
    since_hourly: CounterKey,
    /// Requests let through the throttle in the window.
    passed: CounterKey,
}

/// How a key stands against its normal.
struct Standing {
    /// Normal requests per window.
    volume: f64,
    /// Normal conversion.
    rate: f64,
    recent: f64,
    /// Recent (successes, finished).
    outcomes: (f64, f64),
    level: f64,
}

impl SurgeLimit {
    fn keys(&self, rule: &str, value: &str) -> SurgeKeys {
        let key = |kind: &str| CounterKey {
            rule: rule.to_owned(),
            condition: joined(&[kind, ":", &self.spec.text]),
            value: value.to_owned(),
        };
        SurgeKeys {
            recent: key("surge_recent"),
            normal: key("surge_normal"),
            since: key("surge_since"),
            since_hourly: key("surge_since_hourly"),
            passed: key("surge_passed"),
        }
    }

    /// The requests of one hour (UTC; hours since the epoch) while the key was not
    /// surging.
    fn hour_key(rule: &str, spec: &str, value: &str, hour: i64) -> CounterKey {
        CounterKey {
            rule: rule.to_owned(),
            condition: joined(&["surge_hour:", &hour.to_string(), ":", spec]),
            value: value.to_owned(),
        }
    }

    /// Normal requests per window at this time of day: the mean over the earlier days (up
    /// to a week) the key was counted through of what came in the same window of the
    /// day (`None` before a whole such window). A window is compared with the same
    /// stretch of the clock, not with the hour it ends in: at 10:05 the last hour is
    /// mostly 09:00-10:00, and where traffic climbs in the morning the hour of 10:00 held
    /// far more, which hid an attack's first half hour. Hours are counted whole, so each
    /// counts by the share of it the window covers. Today's own traffic never counts, so
    /// a surge cannot raise its bar.
    fn hourly_volume(
        &self,
        rule: &str,
        value: &str,
        keys: &SurgeKeys,
        counters: &dyn CounterStore,
        now_ms: i64,
    ) -> Result<Option<f64>, PolicyError> {
        let first = counters.level(&keys.since_hourly, HOURLY_MS, now_ms)? as i64;
        if first == 0 {
            return Ok(None);
        }
        let (mut requests, mut days) = (0.0, 0.0);
        for back in 1..=HOURLY_DAYS {
            let end = now_ms - back * DAY_MS;
            let start = end - self.spec.window_ms;
            let mut hour = start.div_euclid(HOUR_MS);
            if hour * HOUR_MS < first {
                break; // not counted through that window: the key was not seen yet
            }
            while hour * HOUR_MS < end {
                let covered = end.min((hour + 1) * HOUR_MS) - start.max(hour * HOUR_MS);
                let key = Self::hour_key(rule, &self.spec.text, value, hour);
                requests += counters.total(&key, HOURLY_MS, now_ms)? * covered as f64
                    / HOUR_MS as f64;
                hour += 1;
            }
            days += 1.0;
        }
        Ok((days > 0.0).then(|| requests / days))
    }

    /// The key's normal and recent state; `None` until it has a normal to judge by.
    fn standing(
        &self,
        rule: &str,
        value: &str,
        keys: &SurgeKeys,
        counters: &dyn CounterStore,
        now_ms: i64,
    ) -> Result<Option<Standing>, PolicyError> {
        let normal = self.calm.get(value, now_ms, counters, || {
            let (base_ok, base_all) = pair_totals(
                counters,
                &surge_counters(rule, "surge_normal", &self.spec.text, value),
                self.baseline_ms,
                now_ms,
            )?;
            if base_all < BASELINE_SAMPLES {
                return Ok(None);
            }
            // Requests per window over the part of the baseline the key has been seen.
            let since = counters.level(&keys.since, self.baseline_ms, now_ms)?;
            let span = (now_ms as f64 - since)
                .clamp(self.spec.window_ms as f64, self.baseline_ms as f64);
            let requests = counters.total(&keys.normal, self.baseline_ms, now_ms)?;
            // The same stretch of the days before where they are known: traffic follows
            // the day, and an attack in a quiet hour must not hide under the day's mean.
            let volume = match self.hourly_volume(rule, value, keys, counters, now_ms)? {
                Some(hourly) => hourly,
                None => requests * self.spec.window_ms as f64 / span,
            };
            Ok(Some((volume, base_ok / base_all)))
        })?;
        let Some((volume, rate)) = normal else {
            return Ok(None);
        };
        let outcomes = pair_totals(
            counters,
            &surge_counters(rule, "surge", &self.spec.text, value),
            self.spec.window_ms,
            now_ms,
        )?;
        Ok(Some(Standing {
            volume,
            rate,
            recent: counters.total(&keys.recent, self.spec.window_ms, now_ms)?,
            outcomes,
            level: counters.level(
                &surge_level(rule, &self.spec.text, value),
                self.spec.window_ms,
                now_ms,
            )?,
        }))
    }

    /// What to track of an allowed request, given how its key stood.
    fn tracked(&self, rule: &str, value: String, standing: Option<&Standing>) -> TrackedKey {
        TrackedKey::Surge {
            rule: rule.to_owned(),
            spec: self.spec.text.clone(),
            value,
            window_ms: self.spec.window_ms,
            baseline_ms: if Self::calm(standing) {
                self.baseline_ms
            } else {
                0
            },
            steps: standing.and_then(|s| steps_at(&self.lows, s.rate)),
        }
    }

    fn surging(&self, s: &Standing) -> bool {
        s.recent >= self.volume_above * s.volume.max(1.0) && s.level >= self.threshold
    }

    /// Whether the key's outcomes may teach its normal: not while it leans low (more
    /// than a failure's worth of evidence), or an attack would become the normal.
    fn calm(s: Option<&Standing>) -> bool {
        s.is_none_or(|s| s.level < std::f64::consts::LN_2)
    }
}

impl Limit for SurgeLimit {
    fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    fn describe(&self) -> String {
        self.written.clone()
    }

    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        let value = self.spec.value(cx.facts);
        let keys = self.keys(cx.rule, &value);
        let (window_ms, now_ms) = (self.spec.window_ms, cx.now_ms);
        cx.counters.add(&keys.recent, window_ms, now_ms, 1.0)?;
        // A level that holds the time the key was first seen while it keeps being seen.
        // The first-sighting levels only need keeping alive well within their idle spans
        // (a day, a week): once a minute per key, not a write per request.
        self.touched.get(&value, now_ms, cx.counters, || {
            for (since, idle_ms) in [
                (&keys.since, self.baseline_ms),
                (&keys.since_hourly, HOURLY_MS),
            ] {
                if cx.counters.accumulate(since, idle_ms, now_ms, 0.0)? == 0.0 {
                    cx.counters
                        .accumulate(since, idle_ms, now_ms, now_ms as f64)?;
                }
            }
            Ok(())
        })?;
        let standing = self.standing(cx.rule, &value, &keys, cx.counters, now_ms)?;
        let surging = standing.as_ref().is_some_and(|s| self.surging(s));
        let tracked = self.tracked(cx.rule, value.clone(), standing.as_ref());
        cx.pending.tracked.push((tracked, self.complete_after_ms));
        if !surging {
            // Only periods without a surge teach the key its normal volume.
            cx.counters.add(&keys.normal, self.baseline_ms, now_ms, 1.0)?;
            let hour = now_ms.div_euclid(HOUR_MS);
            let hourly = Self::hour_key(cx.rule, &self.spec.text, &value, hour);
            cx.counters.add(&hourly, HOURLY_MS, now_ms, 1.0)?;
        }
        let Some(s) = standing else {
            cx.reading("surge (no normal learned yet)".into(), value, 0.0, self.threshold);
            return Ok(false);
        };
        let (ok, all) = s.outcomes;
        let condition = format!(
            "surge: volume {:.1}x normal, conversion {:.2} vs {:.2}: evidence",
            s.recent / s.volume.max(1.0),
            if all > 0.0 { ok / all } else { s.rate },
            s.rate
        );
        cx.reading(condition, value, s.level, self.threshold);
        if !surging {
            return Ok(false);
        }
        let Some(throttle) = self.throttle else {
            return Ok(true);
        };
        // Throttled: the request passes while the key is within its allowance.
        let allowance = throttle * s.volume.max(1.0);
        let (_, passes) = cx
            .counters
            .add_within(&keys.passed, window_ms, now_ms, 1.0, allowance)?;
        Ok(!passes)
    }

    fn is_adaptive(&self) -> bool {
        true
    }

    fn track(
        &self,
        rule: &str,
        f: &Facts<'_>,
        counters: &dyn CounterStore,
        now_ms: i64,
    ) -> Result<Option<(TrackedKey, i64)>, PolicyError> {
        let value = self.spec.value(f);
        let keys = self.keys(rule, &value);
        let standing = self.standing(rule, &value, &keys, counters, now_ms)?;
        let key = self.tracked(rule, value, standing.as_ref());
        Ok(Some((key, self.complete_after_ms)))
    }

    fn lookback_ms(&self) -> i64 {
        self.baseline_ms + self.complete_after_ms
    }
}
