//! `conversion` (adaptive): the verifications verigate allowed under a key convert
//! below a rate, or below a share of their country's rate.
//!
//! Two tests. With `false_alarm` set, a sequential test (see [`evidence`]): the key
//! trips as soon as its outcomes are `1 / false_alarm` times likelier under the low rate
//! than under the normal one, so an attack where every attempt fails trips after a
//! handful, a borderline key needs many, and repeated looks do not add false alarms.
//! The normal rate is learned per country (the country's rate over `baseline`, from
//! verifications whose own key was not under suspicion), and a `pool` lets keys of one
//! wider key that fail together (fresh ranges of one operator, fresh blocks of one
//! country) trip on less evidence each. Without it, the older test: at least
//! `min_samples` finished, and the upper bound of the Wilson interval under the
//! threshold.

use schemars::JsonSchema;
use serde::Deserialize;

use super::{
    default_baseline, default_complete_after, duration_ms, pair_totals, written_ms, CompileContext,
    Compiled, Condition, CounterContext, Limit,
};
use crate::policy::{
    adaptive::{
        baseline_counters, conversion_counters, evidence_level, failing_keys, failing_numbers,
        failures_to_stand_out, keys_in_block, low_rates, pool_level, steps_at, OUTLIER_CHANCE,
        SPRAY_CHANCE,
        establishment_hour_ms, wilson_upper, z_for, OwnCleanSuccesses, TrackedKey, HOUR_MS,
    },
    counters::{joined, CounterSpec, CounterStore, KeyDef, SlowReadings},
    facts::Facts,
    PolicyError,
};

pub(in crate::policy) struct Conversion;

/// Conversion of allowed verifications under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct ConversionFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    per: String,
    /// Sliding window, e.g. 6h.
    window: String,
    /// No judgement below this many finished verifications.
    #[serde(default = "default_min_samples")]
    min_samples: u32,
    /// Trip below this success rate (0 to 1). Exactly one of below / below_baseline.
    below: Option<f64>,
    /// Trip below this share of the country's own rate (0 to 1).
    below_baseline: Option<f64>,
    /// Confidence that the true rate is below the threshold (0.5 to below 1).
    #[serde(default = "default_confidence")]
    confidence: f64,
    /// How long after being allowed a verification without a result counts as failed.
    #[serde(default = "default_complete_after")]
    complete_after: String,
    /// Use the sequential test, tripping a key whose outcomes are this many times
    /// likelier under a normal rate than under the low one, inverted (e.g. 1e-5): the
    /// chance that a key converting normally ever trips.
    false_alarm: Option<f64>,
    /// The normal rate (0 to 1) for the sequential test; default: learned per country.
    normal: Option<f64>,
    /// How far back the normal rate is learned, e.g. 24h.
    #[serde(default = "default_baseline")]
    baseline: String,
    /// A wider key (prefix:k, country or global) whose keys that never converted are
    /// judged together: once their pooled outcomes trip, each trips at `pooled_false_alarm`
    /// (as does a key whose window's rate is surely under the threshold).
    pool: Option<String>,
    /// The false-alarm rate for a key while its pool has tripped, e.g. 0.05.
    #[serde(default = "default_pooled_false_alarm")]
    pooled_false_alarm: f64,
    /// How long a pool that tripped keeps its keys on `pooled_false_alarm`, e.g. 1h.
    #[serde(default = "default_pool_alert_for")]
    pool_alert_for: String,
    /// A key with at least this many clean successes of its own over `baseline` before
    /// the window is established (a block real users have long used) and never trips:
    /// blocking it would turn them away. A success is clean when the key was not under
    /// suspicion, or when its number had converted before (a returning user), so an
    /// attack that stays in the block does not wear its users' record away. A `surge`
    /// rule surfaces an attack hidden in it, and a narrower key still blocks one that
    /// concentrates.
    established: Option<u32>,
    /// How many distinct clock hours (UTC) those clean successes must have come in
    /// (default 4, or the whole hours of `baseline` before the window if fewer): real
    /// users convert through the day, an attacker grooming a fresh block to look
    /// established enters its codes in one sitting. With a window under 6h an hour is a
    /// sixth of the window, so a policy with every duration scaled down asks for the
    /// same spread.
    established_hours: Option<u32>,
}

/// What makes a key established: clean successes of its own before its window, in
/// enough distinct hours.
#[derive(Debug, Clone, Copy)]
struct Established {
    successes: f64,
    hours: u64,
}

/// The distinct hours an establishment needs unless the policy says otherwise. Two
/// hours' worth of codes (the groomed block in docs/fraud-defence.md) falls short; six
/// already quarantines busy blocks on a first day, before their users have spread over
/// the hours.
const ESTABLISHED_HOURS: u32 = 4;

fn default_pool_alert_for() -> String {
    "1h".into()
}

fn default_pooled_false_alarm() -> f64 {
    0.05
}

/// A normal rate is learned from at least this many outcomes; with fewer the country
/// falls back to every country's rate, and that to no judgement.
const BASELINE_SAMPLES: f64 = 50.0;
/// However low the normal it learned, a `below_baseline` rule trips keys converting
/// under this: no honest country converts so rarely, and an attack that is most of its
/// country's traffic must not lower its own bar beneath it.
const FLOOR: f64 = 0.15;
/// While every country together has fewer outcomes than this in the baseline (a new
/// deployment's first hours), a key is only judged below `YOUNG_CAP`: with no history,
/// an honest country that converts poorly looks like an attack on every country's
/// rate. Past it, such a country is judged by its own blocks' outcomes as soon as it has
/// a few (`THIN_SAMPLES`). At 2,000 a business with a quarter of the simulator's traffic
/// was still young at noon of its first day, and an attack entering 30 % of its codes
/// then passed under the cap (docs/fraud-defence.md).
const YOUNG_OUTCOMES: f64 = 1000.0;
/// From this many outcomes of its own, a country's normal is at most the upper bound of
/// its own rate (at `CONFIDENT_Z`) until it has `BASELINE_SAMPLES`.
const THIN_SAMPLES: f64 = 10.0;
/// A rate's bound at one-sided 95 %: where a few outcomes must say something for sure.
const CONFIDENT_Z: f64 = 1.645;
/// The bound (one-sided 84 %) that judges a range of an operator block with its pool
/// although it converted: one user's success among an attack's failures, where a range
/// holds a handful of users. Keys pooled per country are whole blocks: `CONFIDENT_Z`.
const BLOCK_Z: f64 = 1.0;
const YOUNG_CAP: f64 = 0.25;

/// The normal rate a key is judged against, and whether its country has a normal of its
/// own that an honest country could have (its outcomes then teach every country's).
#[derive(Debug, Clone, Copy)]
struct NormalRate {
    rate: f64,
    settled: bool,
}

fn default_min_samples() -> u32 {
    20
}

fn default_confidence() -> f64 {
    0.95
}

impl Condition for Conversion {
    const HOLDS_WHEN: &'static str = "the verifications verigate **allowed** under the key convert too rarely. With `false_alarm`, a sequential test: the key's evidence (each failure adds to it, each success takes away, balanced so that a key converting at exactly `below`, or `below_baseline` × the normal rate, neither gains nor loses) reaches ln(1/`false_alarm`), counting no more than the window's own failures could have built, and its rate over the window is under that threshold. The normal rate is `normal`, or the country's over `baseline` (24h) without the key's own outcomes over it (without its whole operator block when `pool` is one, `prefix:` or `range:`, and the rest of the country has enough; judged without itself alone, never above every country's rate); with `below_baseline` a learned one always trips keys under 15 %, and while every country has fewer than 1,000 outcomes (a new deployment) only keys under 25 %. With a `pool`, a key that never converted in the window, or whose window's rate is surely (one-sided 95 %; 84 % when the pool is an operator block) under the threshold, or (when the pool is an operator block) whose evidence has reached the pool's bar, needs only ln(1/`pooled_false_alarm`) (0.05) while the pool's unconverted keys have tripped together within `pool_alert_for` (1h); in an operator block's pool only when its distinct failing numbers of the window are more than an even spray over the block's ranges gives one range in a hundred (the spray's width read from how many ranges failed), and even before the pool trips when they are more than it gives one in ten thousand; a key that tripped so keeps that bar while its evidence lasts, so its block ending does not reset it. With `established`, a key that has at least that many clean successes of its own over the baseline before its window, in at least `established_hours` (4) distinct clock hours, or sixths of the window when it is under 6h (a block real users have long used, not one groomed in a sitting; a success is clean when the key was not under suspicion, or when its number had converted before), never trips: a `surge` rule surfaces an attack hidden among its users. Without `false_alarm`: at least `min_samples` (20) finished and the upper bound of their Wilson interval at `confidence` (0.95) is under the threshold. A verification with no result `complete_after` (10m) after it was allowed counts as failed";
    const EXAMPLE: &'static str = r#"conversion = { per = "prefix:5", window = "6h", below_baseline = 0.45, false_alarm = 1e-5, pool = "country", complete_after = "3m" }"#;
    type File = ConversionFile;

    fn compile(f: &ConversionFile, _: &CompileContext<'_>) -> Result<Compiled, String> {
        let threshold = match (f.below, f.below_baseline) {
            (Some(v), None) if v > 0.0 && v <= 1.0 => Threshold::Below(v),
            (None, Some(v)) if v > 0.0 && v <= 1.0 => Threshold::BelowBaseline(v),
            _ => return Err("conversion needs exactly one of below (a rate, e.g. 0.2) or below_baseline (a share of the country's rate, e.g. 0.5), between 0 and 1".into()),
        };
        if !(0.5..1.0).contains(&f.confidence) || f.min_samples == 0 {
            return Err("conversion.confidence must be from 0.5 to below 1 (e.g. 0.95) and min_samples at least 1".into());
        }
        let complete_after_ms = duration_ms(&f.complete_after).ok_or_else(|| {
            format!(
                "complete_after `{}` is not a duration like 10m",
                f.complete_after
            )
        })?;
        let spec = CounterSpec::parse(&f.per, &f.window)?;
        let test = match f.false_alarm {
            None => {
                if f.pool.is_some()
                    || f.normal.is_some()
                    || f.established.is_some()
                    || f.established_hours.is_some()
                {
                    return Err("conversion: `pool`, `normal`, `established` and `established_hours` belong to the sequential test: set `false_alarm` too (e.g. 1e-5)".into());
                }
                Test::Wilson {
                    min_samples: f.min_samples,
                    z: z_for(f.confidence),
                }
            }
            Some(alarm) => {
                let rate = |v: f64| v > 0.0 && v < 0.5;
                if !rate(alarm) || !rate(f.pooled_false_alarm) {
                    return Err("conversion.false_alarm and pooled_false_alarm must be between 0 and 0.5 (e.g. 1e-5 and 0.05)".into());
                }
                if f.normal.is_some_and(|n| !(n > 0.0 && n < 1.0)) {
                    return Err("conversion.normal must be a rate between 0 and 1".into());
                }
                if f.established == Some(0) {
                    return Err("conversion.established is a number of successes: at least 1 (e.g. 30)".into());
                }
                let baseline_ms = duration_ms(&f.baseline).ok_or_else(|| {
                    format!("baseline `{}` is not a duration like 24h", f.baseline)
                })?;
                let established = established(f, baseline_ms, spec.window_ms)?;
                let pool = f
                    .pool
                    .as_deref()
                    .map(|text| pool_of(&spec.key, text))
                    .transpose()?;
                let alternatives = low_rates(|normal| threshold.rate(normal));
                Test::Sequential {
                    alternatives,
                    threshold: (1.0 / alarm).ln(),
                    pooled_threshold: (1.0 / f.pooled_false_alarm).ln(),
                    alert_ms: duration_ms(&f.pool_alert_for).ok_or_else(|| {
                        format!("pool_alert_for `{}` is not a duration like 1h", f.pool_alert_for)
                    })?,
                    normal: f.normal,
                    baseline_ms,
                    pool,
                    established,
                }
            }
        };
        let written = format!(
            "conversion per {} over {} {} ({}), complete after {}",
            f.per,
            f.window,
            match threshold {
                Threshold::Below(v) => format!("below {v}"),
                Threshold::BelowBaseline(v) => format!("below {v} x the normal rate"),
            },
            match &test {
                Test::Wilson { .. } => format!(
                    "min {} samples, {} confidence",
                    f.min_samples, f.confidence
                ),
                Test::Sequential {
                    normal,
                    pool,
                    established,
                    ..
                } => format!(
                    "sequential, false alarm {}, normal {}{}{}",
                    f.false_alarm.unwrap_or_default(),
                    normal.map_or_else(
                        || {
                            let block = pool
                                .as_ref()
                                .filter(|p| is_operator_block(p))
                                .map_or_else(String::new, |p| format!(" without the key's {}", p.text));
                            format!("the country's rate over {}{block}", f.baseline)
                        },
                        |n| n.to_string()
                    ),
                    pool.as_ref().map_or_else(String::new, |p| format!(
                        ", pooled per {} at false alarm {} for {} after it trips",
                        p.text, f.pooled_false_alarm, f.pool_alert_for
                    )),
                    established.map_or_else(String::new, |e| format!(
                        ", established after {} clean successes in {} hours",
                        e.successes, e.hours
                    ))
                ),
            },
            f.complete_after
        );
        Ok(Compiled::Limit(Box::new(ConversionLimit {
            spec,
            threshold,
            test,
            complete_after_ms,
            written,
            normals: Default::default(),
            apart: Default::default(),
        })))
    }
}

/// The establishment `f` asks for: `established_hours` defaults to
/// [`ESTABLISHED_HOURS`], or to as many whole hours (`establishment_hour_ms`) as the
/// baseline holds before the window if fewer, and may not ask for more than that.
fn established(
    f: &ConversionFile,
    baseline_ms: i64,
    window_ms: i64,
) -> Result<Option<Established>, String> {
    let Some(successes) = f.established else {
        return match f.established_hours {
            Some(_) => Err("conversion.established_hours needs `established` (e.g. established = 15)".into()),
            None => Ok(None),
        };
    };
    let hour_ms = establishment_hour_ms(window_ms);
    let room = u32::try_from((baseline_ms - window_ms).max(0) / hour_ms).unwrap_or(u32::MAX);
    let hours = match f.established_hours {
        None => ESTABLISHED_HOURS.min(room),
        Some(0) => return Err("conversion.established_hours is a number of hours: at least 1 (e.g. 4)".into()),
        Some(h) if h > room => {
            // With a window under 6h an "hour" is a sixth of it: say how long.
            let hour = match hour_ms < HOUR_MS {
                true => format!(" of {} (a sixth of the window)", written_ms(hour_ms)),
                false => String::new(),
            };
            return Err(format!(
                "conversion.established_hours = {h} cannot be met: the baseline ({}) holds {room} whole hours{hour} before the window ({})",
                f.baseline, f.window
            ));
        }
        Some(h) => h,
    };
    Ok(Some(Established {
        successes: f64::from(successes),
        hours: u64::from(hours),
    }))
}

impl Threshold {
    /// The rate it stands for, given the normal rate.
    fn rate(self, normal: f64) -> f64 {
        match self {
            Threshold::Below(rate) => rate,
            Threshold::BelowBaseline(share) => share * normal,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Threshold {
    /// Below this rate.
    Below(f64),
    /// Below this share of the number's country rate.
    BelowBaseline(f64),
}

/// Whether a pool is an operator block (narrower than a country): its keys are ranges of
/// one block.
fn is_operator_block(pool: &CounterSpec) -> bool {
    matches!(pool.key, KeyDef::Prefix(_) | KeyDef::Range(_))
}

/// A pool's key: wider than the rule's own (fewer digits of the number, or the country).
fn pool_of(own: &KeyDef, text: &str) -> Result<CounterSpec, String> {
    let pool = CounterSpec::parse(text, "1h")?;
    let wider = match (own, &pool.key) {
        (_, KeyDef::Global) => true,
        (KeyDef::Number | KeyDef::Range(_) | KeyDef::Prefix(_), KeyDef::Country) => true,
        (KeyDef::Prefix(own), KeyDef::Prefix(pool)) => pool < own,
        (KeyDef::Number | KeyDef::Range(_), KeyDef::Prefix(_)) => true,
        (KeyDef::Number, KeyDef::Range(_)) => true,
        (KeyDef::Range(own), KeyDef::Range(pool)) => pool > own,
        _ => false,
    };
    if wider {
        Ok(pool)
    } else {
        Err(format!(
            "conversion.pool `{text}` must be a wider key than `per` (e.g. prefix:5 for range:4, country for prefix:5)"
        ))
    }
}

#[derive(Debug)]
enum Test {
    Wilson {
        min_samples: u32,
        z: f64,
    },
    Sequential {
        /// The low rate tested against each normal rate (index: normal × NORMAL_STEPS).
        alternatives: Vec<Option<f64>>,
        /// ln(1 / false_alarm).
        threshold: f64,
        /// The threshold while the key's pool has tripped.
        pooled_threshold: f64,
        /// How long a pool stays alerted after it last tripped.
        alert_ms: i64,
        /// A fixed normal rate; `None`: learned over `baseline_ms`.
        normal: Option<f64>,
        baseline_ms: i64,
        pool: Option<CounterSpec>,
        /// What makes a key established.
        established: Option<Established>,
    },
}

#[derive(Debug)]
struct ConversionLimit {
    spec: CounterSpec,
    threshold: Threshold,
    test: Test,
    complete_after_ms: i64,
    written: String,
    /// Baseline outcomes (successes, attempts) of each country, of the settled countries
    /// and of every country, by country, read once a minute.
    normals: SlowReadings<[(f64, f64); 3]>,
    /// Baseline outcomes of what each key is judged without (its operator block,
    /// [`Self::block_pool`], or else the key itself), read once a minute.
    apart: SlowReadings<(f64, f64)>,
}

impl ConversionLimit {
    /// The normal rate a request's key is judged against, when known: its country's
    /// rate over the baseline without the key's own outcomes (`own`) or, where that
    /// leaves too few, every country's; as [`Self::judged`] bounds it.
    fn normal_rate(
        &self,
        rule: &str,
        f: &Facts<'_>,
        counters: &dyn CounterStore,
        now_ms: i64,
        own: (f64, f64),
    ) -> Result<Option<NormalRate>, PolicyError> {
        let Test::Sequential {
            normal, baseline_ms, ..
        } = &self.test
        else {
            return Ok(None);
        };
        if let Some(rate) = *normal {
            return Ok(Some(NormalRate {
                rate,
                settled: false,
            }));
        }
        // The key's operator block, read apart: a block that is most of its country's
        // traffic, or an attack in a busy block, must not set the bar of its own ranges.
        // A key with no block pool is read apart itself, over the whole baseline and
        // not only its window: an attack that came yesterday (`mimicry` again at the
        // same hour) would otherwise have taught its country its own rate. (Its clean
        // outcomes over the baseline, or all of its window's, whichever are more.)
        let block_pool = self.block_pool();
        let apart = block_pool.unwrap_or(&self.spec);
        let apart_value = apart.value(f);
        let apart_totals = self.apart.get(&apart_value, now_ms, counters, || {
            let pair = baseline_counters(rule, &apart.text, &apart_value);
            pair_totals(counters, &pair, *baseline_ms, now_ms)
        })?;
        let (block, own) = match block_pool {
            Some(_) => (Some(apart_totals), own),
            None => (None, (own.0.max(apart_totals.0), own.1.max(apart_totals.1))),
        };
        let scopes = self.normals.get(f.country, now_ms, counters, || {
            let mut totals = [(0.0, 0.0); 3];
            let scopes = [("country", f.country), ("settled", "*"), ("global", "*")];
            for (total, (key, value)) in totals.iter_mut().zip(scopes) {
                let pair = baseline_counters(rule, key, value);
                *total = pair_totals(counters, &pair, *baseline_ms, now_ms)?;
            }
            Ok(totals)
        })?;
        let [(country_ok, country_all), (settled_ok, settled_all), (global_ok, global_all)] =
            scopes;
        let young = global_all < YOUNG_OUTCOMES;
        // A key is judged against its country without itself: the key's own outcomes
        // (over the baseline, and at least its window's) are left out, or an attack that is
        // most of a country's traffic (one operator block of a country with few users)
        // would set its own bar, however well it converts (`mimicry` at 30 %, three
        // times as fast: 0-16 % of its cost blocked while it was counted in). Without
        // its whole block first, when the rest of the country has enough.
        let without = |(ok, all): (f64, f64)| {
            ((country_ok - ok).max(0.0), (country_all - all).max(0.0))
        };
        let (others_ok, others_all) = without(own);
        let enough = |&(_, all): &(f64, f64)| all >= BASELINE_SAMPLES;
        // Every country's rate is the settled countries' once they have enough: the
        // first outcomes of each fresh key an attack opens count as clean, and attacks
        // in several countries with no history of their own (where pumping goes) would
        // otherwise drag every country's rate down, and with it the bar of the next one.
        let every = [(settled_ok, settled_all), (global_ok, global_all)]
            .into_iter()
            .find(enough)
            .map(|(ok, all)| (ok / all).min(1.0));
        if let Some((ok, all)) = block
            .map(without)
            .filter(enough)
            .or(Some((others_ok, others_all)).filter(enough))
        {
            let rate = (ok / all).min(1.0);
            // A key judged against its country without itself (no operator-block pool:
            // the sample's prefix rule, whose keys are whole blocks) is never judged above
            // what every country converts at: a block an attacker grooms to convert well
            // (its groom's successes are clean) would otherwise raise the bar of the
            // country's other blocks over what their honest users convert at (Nigeria's
            // users turned away on first days of a business converting poorly,
            // docs/fraud-defence.md). Keys judged without their operator block keep
            // their country's rate: capped, the busy UK block's ranges (its country's
            // other blocks convert above every country's rate) let an attack among them
            // through.
            let judged_on = match (block, every) {
                (None, Some(every)) => rate.min(every),
                _ => rate,
            };
            return Ok(Some(NormalRate {
                rate: self.judged(judged_on, young),
                settled: rate >= FLOOR,
            }));
        }
        let Some(every) = every else {
            return Ok(None);
        };
        // A country whose other keys' history is still thin borrows every country's
        // rate, but never above what those outcomes say it plausibly converts: an honest
        // country that converts poorly must not be judged by the others' rate.
        let mut normal = every;
        // Only outcomes that convert as people do can say so: other attacks' fresh keys
        // in the country (their first outcomes count as clean too) convert under
        // `FLOOR`, and would set the bar of the next attack there to the floor.
        if others_all >= THIN_SAMPLES && others_ok >= FLOOR * others_all {
            normal = normal.min(wilson_upper(others_ok, others_all, CONFIDENT_Z));
        }
        Ok(Some(NormalRate {
            rate: self.judged(normal, young),
            settled: false,
        }))
    }

    /// How the key's failing numbers in the window compare with what an even spray over
    /// its operator block gives a key by chance, at `chance` ([`failures_to_stand_out`]):
    /// whether it stands out, and the explanation's remark. `None` when the rule's pool
    /// is not an operator block.
    fn spread(
        &self,
        cx: &mut CounterContext<'_>,
        value: &str,
        pool_value: &str,
        chance: f64,
    ) -> Result<Option<(bool, String)>, PolicyError> {
        let Some(block) = self.block_pool() else {
            return Ok(None);
        };
        let Some(keys) = keys_in_block(value, pool_value) else {
            return Ok(None);
        };
        let window_ms = self.spec.window_ms;
        let failing = failing_keys(cx.rule, &block.text, pool_value);
        let failing = cx.counters.members(&failing, window_ms, cx.now_ms)?;
        let numbers = failing_numbers(cx.rule, &self.spec.text, value);
        let numbers = cx.counters.members(&numbers, window_ms, cx.now_ms)?;
        let needed = failures_to_stand_out(failing, keys, chance);
        let stands_out = numbers >= needed;
        let remark = joined(&[
            if stands_out {
                ", stands out of its block's spread ("
            } else {
                ", not above its block's spread ("
            },
            &(numbers as u64).to_string(),
            " failing numbers, ",
            &(needed as u64).to_string(),
            " needed; failures in ",
            &(failing as u64).to_string(),
            " of its ",
            &(keys as u64).to_string(),
            " ranges)",
        ]);
        Ok(Some((stands_out, remark)))
    }

    /// The rule's pool when it is an operator block (narrower than a country): its keys
    /// are ranges of one block, judged against their country without that block.
    fn block_pool(&self) -> Option<&CounterSpec> {
        let Test::Sequential {
            pool: Some(pool), ..
        } = &self.test
        else {
            return None;
        };
        is_operator_block(pool).then_some(pool)
    }

    /// The learned normal as a key is judged against it: never so low that the rule
    /// trips under `FLOOR` only, and while every country's history is thin (`young`),
    /// never so high that it trips above `YOUNG_CAP`.
    fn judged(&self, learned: f64, young: bool) -> f64 {
        let Threshold::BelowBaseline(share) = self.threshold else {
            return learned;
        };
        let mut normal = learned.max(FLOOR / share);
        if young {
            normal = normal.min(YOUNG_CAP / share);
        }
        normal.min(1.0)
    }

    /// The test's steps (a success's, a failure's) for a key whose normal rate is
    /// `normal`; `None` when the rule's rate is not under it.
    fn steps(&self, normal: f64) -> Option<(f64, f64)> {
        let Test::Sequential { alternatives, .. } = &self.test else {
            return None;
        };
        steps_at(alternatives, normal)
    }

    /// The sequential level of the request's key (`value`).
    fn key_level(
        &self,
        rule: &str,
        value: &str,
        counters: &dyn CounterStore,
        now_ms: i64,
    ) -> Result<f64, PolicyError> {
        let level = evidence_level(rule, &self.spec.text, value);
        counters.level(&level, self.spec.window_ms, now_ms)
    }

    /// What to track of an allowed request under its key (`value`), given the key's
    /// normal rate, level and successes in the window when it was decided.
    fn tracked(
        &self,
        rule: &str,
        f: &Facts<'_>,
        value: String,
        normal: Option<NormalRate>,
        level: f64,
        ok: f64,
    ) -> TrackedKey {
        let mut baseline_ms = 0;
        let mut pool = None;
        let mut block = None;
        let mut established = false;
        let mut returning_ms = 0;
        if let Test::Sequential {
            baseline_ms: learn_ms,
            pool: pool_spec,
            established: counted,
            normal: fixed,
            ..
        } = &self.test
        {
            established = counted.is_some();
            if established && f.returning {
                returning_ms = *learn_ms;
            }
            // An operator block also counts its failing keys, whatever the normal.
            block = match self.block_pool() {
                Some(pool) => Some((pool.text.clone(), pool.value(f))),
                None if fixed.is_none() => Some((self.spec.text.clone(), value.clone())),
                None => None,
            };
            // A key already under suspicion (more than a failure's worth of evidence)
            // would teach the normal rate what the attack looks like.
            if level < std::f64::consts::LN_2 {
                baseline_ms = *learn_ms;
            }
            if ok == 0.0 {
                pool = pool_spec.as_ref().map(|p| (p.text.clone(), p.value(f)));
            }
        }
        TrackedKey::Conversion {
            rule: rule.to_owned(),
            spec: self.spec.text.clone(),
            value,
            country: f.country.to_owned(),
            window_ms: self.spec.window_ms,
            baseline_ms,
            steps: normal.and_then(|n| self.steps(n.rate)),
            pool,
            block,
            settled: normal.is_some_and(|n| n.settled),
            established,
            returning_ms,
        }
    }

    fn wilson(
        &self,
        cx: &mut CounterContext<'_>,
        min_samples: u32,
        z: f64,
    ) -> Result<bool, PolicyError> {
        let window_ms = self.spec.window_ms;
        let value = self.spec.value(cx.facts);
        let pair = conversion_counters(cx.rule, &self.spec.text, &value);
        let (ok, all) = pair_totals(cx.counters, &pair, window_ms, cx.now_ms)?;
        let enough = all >= f64::from(min_samples);
        let limit = match self.threshold {
            Threshold::Below(rate) => Some(rate),
            Threshold::BelowBaseline(share) => {
                let country = conversion_counters(cx.rule, "country", cx.facts.country);
                let (base_ok, base_all) = pair_totals(cx.counters, &country, window_ms, cx.now_ms)?;
                (base_all >= f64::from(min_samples)).then(|| share * base_ok / base_all)
            }
        };
        let tracked = self.tracked(cx.rule, cx.facts, value.clone(), None, 0.0, ok);
        cx.pending.tracked.push((tracked, self.complete_after_ms));
        let upper = wilson_upper(ok, all, z);
        cx.reading(
            format!("conversion ({ok}/{all})"),
            value,
            upper,
            limit.unwrap_or(0.0),
        );
        // Low only when the sample is large enough and even its optimistic bound is
        // under the limit.
        Ok(enough && limit.is_some_and(|l| upper < l))
    }

    fn sequential(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        let Test::Sequential {
            threshold,
            pooled_threshold,
            pool,
            alert_ms,
            baseline_ms,
            established,
            ..
        } = &self.test
        else {
            return Ok(false);
        };
        let value = self.spec.value(cx.facts);
        let pair = conversion_counters(cx.rule, &self.spec.text, &value);
        let (ok, all) = pair_totals(cx.counters, &pair, self.spec.window_ms, cx.now_ms)?;
        let normal = self.normal_rate(cx.rule, cx.facts, cx.counters, cx.now_ms, (ok, all))?;
        let key = self.key_level(cx.rule, &value, cx.counters, cx.now_ms)?;
        let tracked = self.tracked(cx.rule, cx.facts, value.clone(), normal, key, ok);
        cx.pending.tracked.push((tracked, self.complete_after_ms));
        let Some(NormalRate { rate: normal, .. }) = normal else {
            cx.reading("conversion (no normal rate learned yet)".into(), value, 0.0, *threshold);
            return Ok(false);
        };
        let low = self.threshold.rate(normal);
        // The level lasts while failures come within a window of each other, so a sparse
        // key (a range of a busy block, with a failure now and then) can carry evidence
        // from long before its window: only what the window's own failures could have
        // built counts toward a trip.
        let key = match self.steps(normal) {
            Some((_, on_failure)) => key.min((all - ok).max(0.0) * on_failure),
            None => key,
        };
        let mut limit = *threshold;
        // Whether `limit` is the pool's bar.
        let mut at_pool_bar = false;
        // Whether the key was judged against its block's spread at the pool's bar.
        let mut spread_judged = false;
        // What the explanation adds after the evidence: the pool's state, an establishment.
        let mut remarks = String::new();
        // A key is judged with its pool when it is one of the keys failing together: it
        // never converted in the window, or its window's rate is surely under the rule's
        // (one real user's success among an attack's failures must not spare a range
        // the attack goes on in: `BLOCK_Z`). A sparse key that converted a few times is
        // not. In an operator block's pool, a key whose evidence has reached the pool's
        // bar is one of them too: a range where a real user converted hours before an
        // attack reached it would otherwise wait for the failures that make one success
        // surely rare (six or more, at five an hour). Its window's rate must still be
        // under the rule's, as for every trip.
        let (sure, evidence_at_pool_bar) = match self.block_pool() {
            Some(_) => (BLOCK_Z, key >= *pooled_threshold),
            None => (CONFIDENT_Z, false),
        };
        let pooled_key = ok == 0.0 || evidence_at_pool_bar || wilson_upper(ok, all, sure) < low;
        if let Some(pool) = pool.as_ref().filter(|_| pooled_key) {
            let pool_value = pool.value(cx.facts);
            let level = pool_level(cx.rule, &pool.text, &pool_value);
            let pool_level = cx.counters.level(&level, self.spec.window_ms, cx.now_ms)?;
            // A pool that tripped stays alerted for a while: as its keys get blocked their
            // failures stop coming in, but the attack on its other keys goes on.
            let alert = evidence_level(cx.rule, &joined(&["alert:", &pool.text]), &pool_value);
            let alerted = if pool_level >= *threshold {
                cx.counters.accumulate(&alert, *alert_ms, cx.now_ms, 1.0)?;
                true
            } else {
                cx.counters.level(&alert, *alert_ms, cx.now_ms)? > 0.0
            };
            if alerted {
                spread_judged = true;
                remarks = format!(", pooled: {pool_value}'s unconverted keys at {pool_level:.1}");
                // A key that no more than shares a spray over its block is judged alone.
                match self.spread(cx, &value, &pool_value, SPRAY_CHANCE)? {
                    Some((false, within)) => remarks.push_str(&within),
                    _ => {
                        limit = *pooled_threshold;
                        at_pool_bar = true;
                    }
                }
            }
        }
        // The evidence says the recent outcomes lean low; the window's rate must be low
        // too, or a streak of failures inside a busy, converting key would trip it.
        let low_window = low < normal && ok < low * all;
        let mut tripped = low_window && key >= limit;
        // A key that tripped at its pool's bar stays judged at it while the evidence it
        // tripped on lasts (the window): its block ending is a trial, not a fresh start.
        // Otherwise a key blocked on pooled evidence comes back needing the full bar once
        // its pool (whose failing keys are blocked now) has calmed down, and an attack on
        // many ranges of a busy block gets that difference free after every block. It
        // stood out of its block's spread when it tripped; blocked, its failures stop
        // while a spray over the block widens, so that is not asked again.
        let key_alert = || evidence_level(cx.rule, &joined(&["alert:", &self.spec.text]), &value);
        if !tripped
            && pool.is_some()
            && pooled_key
            && low_window
            && key >= *pooled_threshold
            && cx.counters.level(&key_alert(), self.spec.window_ms, cx.now_ms)? > 0.0
        {
            limit = *pooled_threshold;
            at_pool_bar = true;
            tripped = true;
            remarks = ", tripped at its pool's bar before".to_owned();
        }
        // A key whose failing numbers are far beyond what its block's spread gives any key
        // is attacked itself, although its pool has not tripped: the real users of a busy
        // block keep the pool's evidence from building while an attack works a few of its
        // ranges (`busy-prefix` in docs/fraud-defence.md).
        // (Where the pool's bar was refused for the spread, it cannot stand out further.)
        if !tripped && !spread_judged && low_window && key >= *pooled_threshold {
            if let Some(pool) = pool.as_ref() {
                let pool_value = pool.value(cx.facts);
                if let Some((true, outlier)) =
                    self.spread(cx, &value, &pool_value, OUTLIER_CHANCE)?
                {
                    limit = *pooled_threshold;
                    at_pool_bar = true;
                    tripped = true;
                    remarks = outlier;
                }
            }
        }
        if let Some(enough) = established.filter(|_| tripped) {
            // Only now, when it would trip: most decisions never read it.
            let own = OwnCleanSuccesses::of(cx.rule, &self.spec.text, &value);
            let (baseline_ms, window_ms) = (*baseline_ms, self.spec.window_ms);
            let clean_ok = cx.counters.total(&own.baseline, baseline_ms, cx.now_ms)?;
            let recent_ok = cx.counters.total(&own.recent, window_ms, cx.now_ms)?;
            let before_window = (clean_ok - recent_ok).max(0.0);
            if before_window >= enough.successes {
                let hours = cx.counters.members(&own.hours, baseline_ms, cx.now_ms)?
                    - cx.counters.members(&own.hours, window_ms, cx.now_ms)?;
                let (successes, hours) = (before_window as u64, hours.max(0.0) as u64);
                let counted = joined(&[
                    &successes.to_string(),
                    " clean successes before the window, in ",
                    &hours.to_string(),
                    " hours",
                ]);
                if hours >= enough.hours {
                    tripped = false;
                    remarks = joined(&[&remarks, ", established: ", &counted]);
                } else {
                    let needed = enough.hours.to_string();
                    let why = joined(&[", not established: ", &counted, " (", &needed, " needed)"]);
                    remarks = joined(&[&remarks, &why]);
                }
            }
        }
        if tripped && at_pool_bar {
            cx.counters.accumulate(&key_alert(), self.spec.window_ms, cx.now_ms, 1.0)?;
        }
        // Integers format several times quicker than floats, on every decision.
        let percent = |rate: f64| ((rate * 100.0).round() as u32).to_string();
        let condition = joined(&[
            "conversion ",
            &(ok as u64).to_string(),
            "/",
            &(all as u64).to_string(),
            " vs normal ",
            &percent(normal),
            " %, trips below ",
            &percent(low),
            " %: evidence",
            &remarks,
        ]);
        cx.reading(
            condition,
            value,
            key,
            limit,
        );
        Ok(tripped)
    }
}

impl Limit for ConversionLimit {
    fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    fn describe(&self) -> String {
        self.written.clone()
    }

    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        match self.test {
            Test::Wilson { min_samples, z } => self.wilson(cx, min_samples, z),
            Test::Sequential { .. } => self.sequential(cx),
        }
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
        let (normal, level, ok) = match self.test {
            Test::Sequential { .. } => {
                let pair = conversion_counters(rule, &self.spec.text, &value);
                let own = pair_totals(counters, &pair, self.spec.window_ms, now_ms)?;
                (
                    self.normal_rate(rule, f, counters, now_ms, own)?,
                    self.key_level(rule, &value, counters, now_ms)?,
                    own.0,
                )
            }
            Test::Wilson { .. } => (None, 0.0, 0.0),
        };
        let tracked = self.tracked(rule, f, value, normal, level, ok);
        Ok(Some((tracked, self.complete_after_ms)))
    }

    /// The window (or the baseline), and the wait before an unanswered verification
    /// counts as failed.
    fn lookback_ms(&self) -> i64 {
        let learned = match &self.test {
            Test::Sequential { baseline_ms, .. } => *baseline_ms,
            Test::Wilson { .. } => 0,
        };
        self.spec.window_ms.max(learned) + self.complete_after_ms
    }
}
