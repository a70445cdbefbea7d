//! `price_above`: Sinch's price for the attempt is above the amount given for its
//! currency.

use std::collections::BTreeMap;

use super::{case_text, CaseFields, Check, CompileContext, Compiled, Condition};
use crate::events::{Price, VerificationRequestEvent};
use crate::policy::facts::Facts;

pub(in crate::policy) struct PriceAbove;

impl Condition for PriceAbove {
    const HOLDS_WHEN: &'static str = "the event's `price` is above the amount given for its currency; a currency not listed, or no price, does not match";
    const EXAMPLE: &'static str = "price_above = { EUR = 0.25, USD = 0.30 }";
    const CASE_FIELDS: &'static [&'static str] = &["price", "currency"];
    type File = BTreeMap<String, f64>;

    fn compile(file: &BTreeMap<String, f64>, _: &CompileContext<'_>) -> Result<Compiled, String> {
        if file.is_empty() || file.values().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(
                "price_above needs currencies with non-negative amounts, e.g. { EUR = 0.25 }"
                    .into(),
            );
        }
        let limits = file
            .iter()
            .map(|(k, v)| (k.to_ascii_uppercase(), *v))
            .collect();
        Ok(Compiled::Check(Box::new(PriceOver { limits })))
    }

    fn apply_case(case: &CaseFields, request: &mut VerificationRequestEvent) -> Result<(), String> {
        let amount = case
            .get("price")
            .map(|v| {
                v.as_float()
                    .or_else(|| v.as_integer().map(|i| i as f64))
                    .ok_or("`price` must be a number")
            })
            .transpose()?;
        let currency = case_text(case, "currency")?.unwrap_or("EUR");
        request.price = amount.map(|amount| Price {
            currency_id: Some(currency.to_owned()),
            amount: Some(amount),
        });
        Ok(())
    }
}

#[derive(Debug)]
struct PriceOver {
    /// Upper-case currency → amount.
    limits: BTreeMap<String, f64>,
}

impl Check for PriceOver {
    fn holds(&self, f: &Facts<'_>) -> bool {
        let Some(price) = &f.request.price else {
            return false;
        };
        let (Some(currency), Some(amount)) = (price.currency_id.as_deref(), price.amount) else {
            return false;
        };
        self.limits
            .get(&currency.to_ascii_uppercase())
            .is_some_and(|limit| amount > *limit)
    }

    fn describe(&self) -> String {
        format!("price above {:?}", self.limits)
    }
}
