//! `country_not_in`: the number's territory is not one of these.

use std::collections::HashSet;

use super::{territories, Check, CompileContext, Compiled, Condition, OneOrMany};
use crate::policy::facts::Facts;

pub(in crate::policy) struct CountryNotIn;

impl Condition for CountryNotIn {
    const HOLDS_WHEN: &'static str = "the territory is not one of these; `unknown` counts as not listed, so it is denied too";
    const EXAMPLE: &'static str = r#"country_not_in = "@served""#;
    type File = OneOrMany;

    fn compile(file: &OneOrMany, cx: &CompileContext<'_>) -> Result<Compiled, String> {
        let set = territories(cx.entries(file, "country_not_in")?)?;
        Ok(Compiled::Check(Box::new(CountryNotInSet { set })))
    }
}

#[derive(Debug)]
pub(super) struct CountryNotInSet {
    set: HashSet<String>,
}

impl CountryNotInSet {
    pub(super) fn contains(&self, country: &str) -> bool {
        self.set.contains(country)
    }
}

impl Check for CountryNotInSet {
    fn holds(&self, f: &Facts<'_>) -> bool {
        !self.set.contains(f.country)
    }

    fn describe(&self) -> String {
        format!("country not in {} codes", self.set.len())
    }
}
