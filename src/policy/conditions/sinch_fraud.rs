//! `sinch_fraud` (adaptive): more than `max` of the verifications allowed under a key
//! ended `DENIED` by Sinch as fraud within a sliding window.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::policy::PolicyError;
use super::{CompileContext, Compiled, Condition, CounterContext, Limit};
use crate::policy::{
    adaptive::TrackedKey,
    counters::{CounterSpec, CounterStore},
    facts::Facts,
};

pub(in crate::policy) struct SinchFraud;

/// A count of Sinch fraud verdicts under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct SinchFraudFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    per: String,
    /// How many verdicts within the window; one more matches.
    max: u32,
    /// Sliding window, e.g. 1h.
    window: String,
}

impl Condition for SinchFraud {
    const HOLDS_WHEN: &'static str = "more than `max` of the verifications allowed under the key ended `DENIED` by Sinch with reason `Fraud` or `Blocked` in the window";
    const EXAMPLE: &'static str = r#"sinch_fraud = { per = "range:4", max = 2, window = "1h" }"#;
    type File = SinchFraudFile;

    fn compile(file: &SinchFraudFile, _: &CompileContext<'_>) -> Result<Compiled, String> {
        Ok(Compiled::Limit(Box::new(FraudVerdicts {
            spec: CounterSpec::parse(&file.per, &file.window)?,
            max: file.max,
            window: file.window.clone(),
        })))
    }
}

#[derive(Debug)]
struct FraudVerdicts {
    spec: CounterSpec,
    max: u32,
    window: String,
}

impl Limit for FraudVerdicts {
    fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    fn describe(&self) -> String {
        format!(
            "sinch_fraud per {} > {} per {}",
            self.spec.text, self.max, self.window
        )
    }

    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        let k = self.spec.counter(cx.rule, "sinch_fraud", cx.facts);
        let value = cx.counters.total(&k, self.spec.window_ms, cx.now_ms)?;
        if let Some(tracked) = self.track(cx.rule, cx.facts, cx.counters, cx.now_ms)? {
            cx.pending.tracked.push(tracked);
        }
        Ok(cx.reading("sinch_fraud".into(), k.value, value, f64::from(self.max)))
    }

    fn is_adaptive(&self) -> bool {
        true
    }

    /// A verdict arrives with the result; there is nothing to wait for.
    fn track(
        &self,
        rule: &str,
        f: &Facts<'_>,
        _: &dyn CounterStore,
        _: i64,
    ) -> Result<Option<(TrackedKey, i64)>, PolicyError> {
        let key = TrackedKey::SinchFraud {
            count: self.spec.counter(rule, "sinch_fraud", f),
            window_ms: self.spec.window_ms,
        };
        Ok(Some((key, 0)))
    }
}
