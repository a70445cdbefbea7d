//! `conversion` (adaptive): the verifications verigate allowed under a key convert
//! below a rate, or below a share of their country's rate. Judged by the upper bound
//! of the Wilson interval, so a small or borderline sample never trips it.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::policy::PolicyError;
use super::{duration_ms, CompileContext, Compiled, Condition, CounterContext, Limit};
use crate::policy::{
    adaptive::{conversion_counters, wilson_upper, z_for, TrackedKey},
    counters::CounterSpec,
    facts::Facts,
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
}

fn default_min_samples() -> u32 {
    20
}

fn default_confidence() -> f64 {
    0.95
}

fn default_complete_after() -> String {
    "10m".into()
}

impl Condition for Conversion {
    const HOLDS_WHEN: &'static str = "the success rate of the verifications verigate **allowed** under the key, over the window, is low: at least `min_samples` (20) finished, and even the upper bound of its Wilson interval at `confidence` (0.95) is under `below`, or under `below_baseline` × the rate of the number's country. A verification with no result `complete_after` (10m) after it was allowed counts as failed";
    const EXAMPLE: &'static str = r#"conversion = { per = "prefix:5", window = "6h", min_samples = 30, below = 0.3, complete_after = "3m" }"#;
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
        let written = format!(
            "conversion per {} over {} {} (min {} samples, {} confidence)",
            f.per,
            f.window,
            match threshold {
                Threshold::Below(v) => format!("below {v}"),
                Threshold::BelowBaseline(v) => format!("below {v} x the country's rate"),
            },
            f.min_samples,
            f.confidence
        );
        Ok(Compiled::Limit(Box::new(ConversionLimit {
            spec: CounterSpec::parse(&f.per, &f.window)?,
            min_samples: f.min_samples,
            threshold,
            z: z_for(f.confidence),
            complete_after_ms,
            written,
        })))
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Threshold {
    /// Below this rate.
    Below(f64),
    /// Below this share of the number's country rate.
    BelowBaseline(f64),
}

#[derive(Debug)]
struct ConversionLimit {
    spec: CounterSpec,
    min_samples: u32,
    threshold: Threshold,
    z: f64,
    complete_after_ms: i64,
    written: String,
}

impl Limit for ConversionLimit {
    fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    fn describe(&self) -> String {
        self.written.clone()
    }

    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        let window_ms = self.spec.window_ms;
        let read = |spec_text: &str, value: &str| -> Result<(f64, f64), PolicyError> {
            let (ok, all) = conversion_counters(cx.rule, spec_text, value);
            Ok((
                cx.counters.total(&ok, window_ms, cx.now_ms)?,
                cx.counters.total(&all, window_ms, cx.now_ms)?,
            ))
        };
        let value = self.spec.value(cx.facts);
        let (ok, all) = read(&self.spec.text, &value)?;
        let enough = all >= f64::from(self.min_samples);
        let limit = match self.threshold {
            Threshold::Below(rate) => Some(rate),
            Threshold::BelowBaseline(share) => {
                let (base_ok, base_all) = read("country", cx.facts.country)?;
                (base_all >= f64::from(self.min_samples)).then(|| share * base_ok / base_all)
            }
        };
        let upper = wilson_upper(ok, all, self.z);
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

    fn is_adaptive(&self) -> bool {
        true
    }

    fn track(&self, rule: &str, f: &Facts<'_>) -> Option<(TrackedKey, i64)> {
        let key = TrackedKey::Conversion {
            rule: rule.to_owned(),
            spec: self.spec.text.clone(),
            value: self.spec.value(f),
            country: f.country.to_owned(),
            window_ms: self.spec.window_ms,
        };
        Some((key, self.complete_after_ms))
    }

    /// The window, and the wait before an unanswered verification counts as failed.
    fn lookback_ms(&self) -> i64 {
        self.spec.window_ms + self.complete_after_ms
    }
}
