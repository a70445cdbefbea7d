//! `rate_limit`: more than `max` requests under the same key in a sliding window.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::policy::PolicyError;
use super::{CompileContext, Compiled, Condition, CounterContext, Limit};
use crate::policy::counters::CounterSpec;

pub(in crate::policy) struct RateLimit;

/// A request count under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct RateLimitFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    key: String,
    /// Requests allowed within the window; the next one matches.
    max: u32,
    /// Sliding window, e.g. 10m.
    window: String,
}

impl Condition for RateLimit {
    const HOLDS_WHEN: &'static str =
        "more than `max` requests for the same key in the sliding `window`";
    const EXAMPLE: &'static str = r#"rate_limit = { key = "number", max = 5, window = "10m" }"#;
    type File = RateLimitFile;

    fn compile(file: &RateLimitFile, _: &CompileContext<'_>) -> Result<Compiled, String> {
        Ok(Compiled::Limit(Box::new(RequestRate {
            spec: CounterSpec::parse(&file.key, &file.window)?,
            max: file.max,
            window: file.window.clone(),
        })))
    }
}

#[derive(Debug)]
struct RequestRate {
    spec: CounterSpec,
    max: u32,
    window: String,
}

impl Limit for RequestRate {
    fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    fn describe(&self) -> String {
        format!(
            "rate_limit {} > {} per {}",
            self.spec.text, self.max, self.window
        )
    }

    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        let k = self.spec.counter(cx.rule, "rate_limit", cx.facts);
        let value = cx.counters.add(&k, self.spec.window_ms, cx.now_ms, 1.0)?;
        Ok(cx.reading("rate_limit".into(), k.value, value, f64::from(self.max)))
    }
}
