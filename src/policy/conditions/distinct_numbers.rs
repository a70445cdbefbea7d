//! `distinct_numbers`: more than `max` different numbers under the same key in a
//! sliding window: range walking.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::policy::PolicyError;
use super::{CompileContext, Compiled, Condition, CounterContext, Limit};
use crate::policy::counters::CounterSpec;

pub(in crate::policy) struct DistinctNumbers;

/// A count of distinct numbers under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct DistinctFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    per: String,
    /// How many distinct numbers within the window; one more matches.
    max: u32,
    /// Sliding window, e.g. 1h.
    window: String,
}

impl Condition for DistinctNumbers {
    const HOLDS_WHEN: &'static str =
        "more than `max` different numbers under the same key in the window (range walking)";
    const EXAMPLE: &'static str =
        r#"distinct_numbers = { per = "range:3", max = 15, window = "1h" }"#;
    type File = DistinctFile;

    fn compile(file: &DistinctFile, _: &CompileContext<'_>) -> Result<Compiled, String> {
        Ok(Compiled::Limit(Box::new(DistinctLimit {
            spec: CounterSpec::parse(&file.per, &file.window)?,
            max: file.max,
            window: file.window.clone(),
        })))
    }
}

#[derive(Debug)]
struct DistinctLimit {
    spec: CounterSpec,
    max: u32,
    window: String,
}

impl Limit for DistinctLimit {
    fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    fn describe(&self) -> String {
        format!(
            "distinct_numbers per {} > {} per {}",
            self.spec.text, self.max, self.window
        )
    }

    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        let k = self.spec.counter(cx.rule, "distinct_numbers", cx.facts);
        let seen = cx
            .counters
            .see(&k, self.spec.window_ms, cx.now_ms, &cx.facts.number)?;
        Ok(cx.reading(
            "distinct_numbers".into(),
            k.value,
            seen as f64,
            f64::from(self.max),
        ))
    }
}
