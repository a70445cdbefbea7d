//! `custom`: the request's custom field matches a regular expression.

use super::{case_text, pattern, CaseFields, Check, CompileContext, Compiled, Condition};
use crate::events::VerificationRequestEvent;
use crate::policy::facts::Facts;

pub(in crate::policy) struct Custom;

impl Condition for Custom {
    const HOLDS_WHEN: &'static str = "the event's `custom` matches this regular expression";
    const EXAMPLE: &'static str = r#"custom = "(?i)campaign""#;
    const CASE_FIELDS: &'static [&'static str] = &["custom"];
    type File = String;

    fn compile(file: &String, _: &CompileContext<'_>) -> Result<Compiled, String> {
        Ok(Compiled::Check(Box::new(CustomMatches(pattern(
            file, "custom",
        )?))))
    }

    fn apply_case(case: &CaseFields, request: &mut VerificationRequestEvent) -> Result<(), String> {
        request.custom = case_text(case, "custom")?.map(str::to_owned);
        Ok(())
    }
}

#[derive(Debug)]
struct CustomMatches(regex::Regex);

impl Check for CustomMatches {
    fn holds(&self, f: &Facts<'_>) -> bool {
        f.request
            .custom
            .as_deref()
            .is_some_and(|c| self.0.is_match(c))
    }

    fn describe(&self) -> String {
        format!("custom ~ /{}/", self.0.as_str())
    }
}
