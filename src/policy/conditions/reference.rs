//! `reference`: the request's reference matches a regular expression.

use super::{case_text, field_pattern, CaseFields, CompileContext, Compiled, Condition};
use crate::events::VerificationRequestEvent;

pub(in crate::policy) struct Reference;

impl Condition for Reference {
    const HOLDS_WHEN: &'static str =
        "the event's `reference` matches this regular expression (unanchored; use `^…$`)";
    const EXAMPLE: &'static str = r#"reference = "^test-""#;
    const CASE_FIELDS: &'static [&'static str] = &["reference"];
    type File = String;

    fn compile(file: &String, _: &CompileContext<'_>) -> Result<Compiled, String> {
        field_pattern(file, "reference", |r| r.reference.as_deref())
    }

    fn apply_case(case: &CaseFields, request: &mut VerificationRequestEvent) -> Result<(), String> {
        request.reference = case_text(case, "reference")?.map(str::to_owned);
        Ok(())
    }
}
