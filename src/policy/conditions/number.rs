//! `number`: the number is one of these.

use std::collections::HashSet;

use super::{e164_entries, Anchor, Check, CompileContext, Compiled, Condition, OneOrMany};
use crate::policy::facts::Facts;

pub(in crate::policy) struct Number;

impl Condition for Number {
    const HOLDS_WHEN: &'static str = "the number is one of these";
    const EXAMPLE: &'static str = r#"number = "@vip""#;
    type File = OneOrMany;

    fn compile(file: &OneOrMany, cx: &CompileContext<'_>) -> Result<Compiled, String> {
        let numbers = e164_entries(cx.entries(file, "number")?, 3, "number")?;
        Ok(Compiled::Check(Box::new(NumberIn {
            set: numbers.iter().cloned().collect(),
            numbers,
        })))
    }
}

#[derive(Debug)]
struct NumberIn {
    set: HashSet<String>,
    numbers: Vec<String>,
}

impl Check for NumberIn {
    fn holds(&self, f: &Facts<'_>) -> bool {
        self.set.contains(&f.number)
    }

    fn describe(&self) -> String {
        format!("number in {} numbers", self.numbers.len())
    }

    fn anchor(&self) -> Option<Anchor> {
        Some(Anchor::Numbers(self.numbers.clone()))
    }
}
