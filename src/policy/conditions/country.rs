//! `country`: the number's territory is one of these.

use std::collections::HashSet;

use super::{
    country_not_in::CountryNotInSet, territories, Anchor, Check, CompileContext, Compiled,
    Condition, LintScope, OneOrMany,
};
use crate::policy::facts::Facts;

pub(in crate::policy) struct Country;

impl Condition for Country {
    const HOLDS_WHEN: &'static str =
        "the number's territory is one of these (ISO 3166 alpha-2, or `unknown`)";
    const EXAMPLE: &'static str = r#"country = ["DE", "AT", "CH"]"#;
    type File = OneOrMany;

    fn compile(file: &OneOrMany, cx: &CompileContext<'_>) -> Result<Compiled, String> {
        let set = territories(cx.entries(file, "country")?)?;
        Ok(Compiled::Check(Box::new(CountryIn { set })))
    }
}

#[derive(Debug)]
pub(super) struct CountryIn {
    set: HashSet<String>,
}

impl Check for CountryIn {
    fn holds(&self, f: &Facts<'_>) -> bool {
        self.set.contains(f.country)
    }

    fn describe(&self) -> String {
        format!("country in {} codes", self.set.len())
    }

    fn anchor(&self) -> Option<Anchor> {
        let mut countries: Vec<String> = self.set.iter().cloned().collect();
        countries.sort();
        Some(Anchor::Countries(countries))
    }

    fn lint(&self, scope: &LintScope<'_>) -> Option<String> {
        let excluded = scope.rule.get::<CountryNotInSet>()?;
        self.set
            .iter()
            .all(|c| excluded.contains(c))
            .then(|| "can never match: every country it needs is excluded by country_not_in".into())
    }
}
