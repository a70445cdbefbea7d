//! `reference`: the request's reference matches a regular expression.

use super::{case_text, pattern, CaseFields, Check, CompileContext, Compiled, Condition};
use crate::events::VerificationRequestEvent;
use crate::policy::facts::Facts;

pub(in crate::policy) struct Reference;

impl Condition for Reference {
    const HOLDS_WHEN: &'static str =
        "the event's `reference` matches this regular expression (unanchored; use `^…$`)";
    const EXAMPLE: &'static str = r#"reference = "^test-""#;
    const CASE_FIELDS: &'static [&'static str] = &["reference"];
    type File = String;

    fn compile(file: &String, _: &CompileContext<'_>) -> Result<Compiled, String> {
        Ok(Compiled::Check(Box::new(ReferenceMatches(pattern(
            file,
            "reference",
        )?))))
    }

    fn apply_case(case: &CaseFields, request: &mut VerificationRequestEvent) -> Result<(), String> {
        request.reference = case_text(case, "reference")?.map(str::to_owned);
        Ok(())
    }
}

#[derive(Debug)]
struct ReferenceMatches(regex::Regex);

impl Check for ReferenceMatches {
    fn holds(&self, f: &Facts<'_>) -> bool {
        f.request
            .reference
            .as_deref()
            .is_some_and(|r| self.0.is_match(r))
    }

    fn describe(&self) -> String {
        format!("reference ~ /{}/", self.0.as_str())
    }
}
