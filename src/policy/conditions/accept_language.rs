//! `accept_language`: the request's Accept-Language values include one of these.

use super::{CaseFields, Check, CompileContext, Compiled, Condition, OneOrMany};
use crate::events::VerificationRequestEvent;
use crate::policy::facts::Facts;

pub(in crate::policy) struct AcceptLanguage;

impl Condition for AcceptLanguage {
    const HOLDS_WHEN: &'static str =
        "the event's `acceptLanguage` contains one of these (any case)";
    const EXAMPLE: &'static str = r#"accept_language = ["es-ES"]"#;
    const CASE_FIELDS: &'static [&'static str] = &["accept_language"];
    type File = OneOrMany;

    fn compile(file: &OneOrMany, cx: &CompileContext<'_>) -> Result<Compiled, String> {
        let written = cx.entries(file, "accept_language")?;
        Ok(Compiled::Check(Box::new(LanguageIn {
            wanted: written.iter().map(|l| l.to_ascii_lowercase()).collect(),
            written,
        })))
    }

    fn apply_case(case: &CaseFields, request: &mut VerificationRequestEvent) -> Result<(), String> {
        let Some(value) = case.get("accept_language") else {
            return Ok(());
        };
        let languages = value
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or("`accept_language` must be a list of strings")?;
        request.accept_language = Some(languages);
        Ok(())
    }
}

#[derive(Debug)]
struct LanguageIn {
    /// Lower case.
    wanted: Vec<String>,
    written: Vec<String>,
}

impl Check for LanguageIn {
    fn holds(&self, f: &Facts<'_>) -> bool {
        f.request.accept_language.as_ref().is_some_and(|given| {
            given
                .iter()
                .any(|g| self.wanted.contains(&g.to_ascii_lowercase()))
        })
    }

    fn describe(&self) -> String {
        format!("accept_language any of {:?}", self.written)
    }
}
