//! `method`: the request's verification method is one of these.

use super::{case_text, CaseFields, Check, CompileContext, Compiled, Condition, OneOrMany};
use crate::events::{VerificationMethod, VerificationRequestEvent};
use crate::policy::facts::Facts;

pub(in crate::policy) struct Method;

impl Condition for Method {
    const HOLDS_WHEN: &'static str = "the request's method is one of these (`sms`, `flashcall`, `callout`, `whatsapp`, `seamless`; any case)";
    const EXAMPLE: &'static str = r#"method = ["callout", "flashcall"]"#;
    const CASE_FIELDS: &'static [&'static str] = &["method"];
    type File = OneOrMany;

    fn compile(file: &OneOrMany, cx: &CompileContext<'_>) -> Result<Compiled, String> {
        let written = cx.entries(file, "method")?;
        let methods: Vec<VerificationMethod> = written
            .iter()
            .map(|m| VerificationMethod::parse(m))
            .collect();
        if let Some(bad) = methods
            .iter()
            .find(|m| matches!(m, VerificationMethod::Other(_)))
        {
            return Err(format!(
                "method `{bad}` is not sms, flashcall, callout, whatsapp or seamless"
            ));
        }
        Ok(Compiled::Check(Box::new(MethodIn { methods, written })))
    }

    fn apply_case(case: &CaseFields, request: &mut VerificationRequestEvent) -> Result<(), String> {
        if let Some(method) = case_text(case, "method")? {
            request.method = VerificationMethod::parse(method);
        }
        Ok(())
    }
}

#[derive(Debug)]
struct MethodIn {
    methods: Vec<VerificationMethod>,
    written: Vec<String>,
}

impl Check for MethodIn {
    fn holds(&self, f: &Facts<'_>) -> bool {
        self.methods.contains(&f.request.method)
    }

    fn describe(&self) -> String {
        format!("method in {:?}", self.written)
    }
}
