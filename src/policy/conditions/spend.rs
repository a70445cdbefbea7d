//! `spend`: the allowed attempts' summed price under a key, plus this one, would
//! exceed a cap for its currency within a sliding window.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::policy::PolicyError;
use super::{CompileContext, Compiled, Condition, CounterContext, Limit};
use crate::policy::counters::CounterSpec;

pub(in crate::policy) struct Spend;

/// Spend under a key.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct SpendFile {
    /// The key: number, prefix:k, range:n, country, method or global.
    per: String,
    /// Most spend per currency within the window, e.g. { EUR = 200 }.
    max: BTreeMap<String, f64>,
    /// Sliding window, e.g. 1h.
    window: String,
}

impl Condition for Spend {
    const HOLDS_WHEN: &'static str = "the allowed attempts' summed `price` per key, plus this one, exceeds `max` for its currency";
    const EXAMPLE: &'static str =
        r#"spend = { per = "country", max = { EUR = 200 }, window = "1h" }"#;
    type File = SpendFile;

    fn compile(file: &SpendFile, _: &CompileContext<'_>) -> Result<Compiled, String> {
        if file.max.is_empty() || file.max.values().any(|v| !v.is_finite() || *v <= 0.0) {
            return Err("spend.max needs positive amounts per currency, e.g. { EUR = 50 }".into());
        }
        Ok(Compiled::Limit(Box::new(SpendCap {
            spec: CounterSpec::parse(&file.per, &file.window)?,
            max: file
                .max
                .iter()
                .map(|(k, v)| (k.to_ascii_uppercase(), *v))
                .collect(),
            written: format!("spend per {} > {:?} per {}", file.per, file.max, file.window),
        })))
    }
}

#[derive(Debug)]
struct SpendCap {
    spec: CounterSpec,
    /// Upper-case currency → cap.
    max: BTreeMap<String, f64>,
    written: String,
}

impl Limit for SpendCap {
    fn spec(&self) -> &CounterSpec {
        &self.spec
    }

    fn describe(&self) -> String {
        self.written.clone()
    }

    fn over(&self, cx: &mut CounterContext<'_>) -> Result<bool, PolicyError> {
        // No price, or a currency without a cap: this spend rule cannot hold.
        let Some((cap, currency, amount)) = cx
            .price
            .and_then(|(c, a)| Some((*self.max.get(c)?, c, *a)))
        else {
            return Ok(false);
        };
        let k = self
            .spec
            .counter(cx.rule, &format!("spend:{currency}"), cx.facts);
        // Check and add in one step, so that two decisions (on any replicas) cannot
        // both spend the last euro; taken back if the request is denied after all.
        let (value, added) =
            cx.counters
                .add_within(&k, self.spec.window_ms, cx.now_ms, amount, cap)?;
        if added {
            cx.pending.spend.push((k.clone(), self.spec.window_ms, amount));
        }
        Ok(cx.reading("spend".into(), k.value, value, cap))
    }
}
