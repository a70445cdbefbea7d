//! `custom`: the request's custom field matches a regular expression.

use super::{case_text, field_pattern, CaseFields, CompileContext, Compiled, Condition};
use crate::events::VerificationRequestEvent;

pub(in crate::policy) struct Custom;

impl Condition for Custom {
    const HOLDS_WHEN: &'static str = "the event's `custom` matches this regular expression";
    const EXAMPLE: &'static str = r#"custom = "(?i)campaign""#;
    const CASE_FIELDS: &'static [&'static str] = &["custom"];
    type File = String;

    fn compile(file: &String, _: &CompileContext<'_>) -> Result<Compiled, String> {
        field_pattern(file, "custom", |r| r.custom.as_deref())
    }

    fn apply_case(case: &CaseFields, request: &mut VerificationRequestEvent) -> Result<(), String> {
        request.custom = case_text(case, "custom")?.map(str::to_owned);
        Ok(())
    }
}
