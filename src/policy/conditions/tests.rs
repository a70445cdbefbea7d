//! The registry against what users read: every condition's example is accepted by the
//! schema and by verigate, docs/policy.md shows the table the registry makes, and each
//! `policy test` case field belongs to one condition.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::policy::{policy_schema, schema_errors, RulesPolicy};

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/policy.md");

fn policy_with(condition: &str) -> String {
    format!(
        "default = \"allow\"\n[lists]\nserved = [\"SE\"]\nirsf = [\"+881\"]\nvip = [\"+46700000001\"]\n\
         [[rule]]\nname = \"r\"\naction = \"deny\"\n{condition}\n"
    )
}

#[test]
fn every_example_is_accepted_by_the_schema_and_by_verigate() {
    for c in catalogue() {
        assert!(
            c.example.starts_with(&format!("{} = ", c.key)),
            "{}'s example sets another key: {}",
            c.key,
            c.example
        );
        let text = policy_with(c.example);
        assert_eq!(schema_errors(&text), Vec::<String>::new(), "{}", c.example);
        let policy = RulesPolicy::parse(&text, "example.toml")
            .unwrap_or_else(|e| panic!("{}'s example is refused: {e}", c.key));
        assert!(
            policy
                .summary()
                .lines()
                .any(|l| l.contains(" r: ") && !l.ends_with(": ")),
            "{}'s example is not described:\n{}",
            c.key,
            policy.summary()
        );
    }
}

#[test]
fn every_condition_is_in_the_schema_with_its_description() {
    let schema = policy_schema();
    let rule = &schema["$defs"]["RuleFile"]["properties"];
    for c in catalogue() {
        assert_eq!(
            rule[c.key]["description"],
            serde_json::Value::from(format!("Holds when {}.", c.holds_when)),
            "{}",
            c.key
        );
    }
}

#[test]
fn docs_show_the_conditions_table_the_registry_makes() {
    let docs = std::fs::read_to_string(DOCS).unwrap();
    let start = docs.find("| condition | holds when | example |").unwrap();
    let end = start
        + docs[start..]
            .find("\n\n")
            .map_or(docs.len() - start, |i| i + 1);
    let table = docs_table();
    if std::env::var("VERIGATE_WRITE_DOCS").is_ok_and(|v| v == "1") {
        let updated = format!("{}{table}{}", &docs[..start], &docs[end..]);
        std::fs::write(DOCS, updated).unwrap();
        return;
    }
    assert!(
        docs[start..end] == table,
        "the conditions table in docs/policy.md is not the registry's: rewrite it with \
         `VERIGATE_WRITE_DOCS=1 cargo test docs_show_the_conditions` and commit it"
    );
}

#[test]
fn each_case_field_belongs_to_one_condition() {
    let fields = case_fields();
    let mut unique = fields.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), fields.len(), "{fields:?}");
    for base in ["name", "number", "at", "prior", "expect", "rule"] {
        assert!(!fields.contains(&base), "{base} is a field of every case");
    }
}

#[test]
fn case_fields_reach_the_request() {
    let case: CaseFields = toml::from_str(
        "method = \"flashcall\"\nprice = 1\ncurrency = \"USD\"\nreference = \"r\"\n\
         custom = \"c\"\naccept_language = [\"sv-SE\"]",
    )
    .unwrap();
    let mut request: crate::events::VerificationRequestEvent =
        serde_json::from_value(serde_json::json!({
            "id": "1", "event": "VerificationRequestEvent", "method": "sms",
            "identity": {"type": "number", "endpoint": "+46700000001"}
        }))
        .unwrap();
    apply_case(&case, &mut request).unwrap();
    assert_eq!(request.method, crate::events::VerificationMethod::FlashCall);
    let price = request.price.clone().unwrap();
    assert_eq!(
        (price.currency_id.as_deref(), price.amount),
        (Some("USD"), Some(1.0))
    );
    assert_eq!(request.reference.as_deref(), Some("r"));
    assert_eq!(request.custom.as_deref(), Some("c"));
    assert_eq!(request.accept_language, Some(vec!["sv-SE".to_owned()]));

    let wrong: CaseFields = toml::from_str("price = \"cheap\"").unwrap();
    assert!(apply_case(&wrong, &mut request)
        .unwrap_err()
        .contains("price"));
}
