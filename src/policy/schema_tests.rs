//! The policy's JSON Schema against the committed copy, the sample policy, and broken
//! policies that the schema (in an editor) and verigate (at load) must both refuse.

use super::*;
use crate::policy::{schema_errors, RulesPolicy};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policy.schema.json");
const SAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/policy.toml");

fn rendered() -> String {
    format!("{:#}\n", policy_schema())
}

#[test]
fn the_committed_schema_is_the_one_verigate_generates() {
    if std::env::var("VERIGATE_WRITE_POLICY_SCHEMA").is_ok_and(|v| v == "1") {
        std::fs::write(COMMITTED, rendered()).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap();
    assert!(
        committed == rendered(),
        "config/policy.schema.json is stale: rewrite it with \
         `VERIGATE_WRITE_POLICY_SCHEMA=1 cargo test committed_schema` (or \
         `verigate policy schema > config/policy.schema.json`) and commit it"
    );
}

#[test]
fn the_sample_policy_names_the_schema_and_satisfies_it() {
    let text = std::fs::read_to_string(SAMPLE).unwrap();
    assert!(
        text.starts_with("#:schema ./policy.schema.json\n"),
        "editors find the schema through the first line"
    );
    assert_eq!(schema_errors(&text), Vec::<String>::new());
}

#[test]
fn every_field_verigate_reads_is_in_the_schema() {
    let schema = policy_schema();
    let rule = &schema["$defs"]["RuleFile"];
    assert_eq!(rule["additionalProperties"], false);
    for field in [
        "name",
        "action",
        "mode",
        "method",
        "country",
        "country_not_in",
        "prefix",
        "number",
        "price_above",
        "reference",
        "custom",
        "accept_language",
        "time",
        "rate_limit",
        "distinct_numbers",
        "spend",
        "conversion",
        "sinch_fraud",
        "block_for",
        "max_block",
        "probe",
    ] {
        assert!(
            rule["properties"][field].is_object(),
            "{field} missing from the schema"
        );
        assert!(
            rule["properties"][field]["description"].is_string(),
            "{field} has no description for the editor to show"
        );
    }
    assert_eq!(rule["required"], serde_json::json!(["name", "action"]));
}

#[test]
fn broken_policies_are_refused_by_the_schema_and_by_verigate_alike() {
    let rule = |body: &str| format!("default = \"allow\"\n[[rule]]\n{body}\n");
    // Each broken policy, and the word both complaints must name.
    let cases = [
        (rule("name = \"r\"\nactoin = \"deny\""), "actoin"),
        (rule("name = \"r\"\naction = \"maybe\""), "maybe"),
        (rule("action = \"deny\""), "name"),
        (rule("name = \"r\"\naction = \"deny\"\nmode = \"dry\""), "dry"),
        (
            rule("name = \"r\"\naction = \"deny\"\nrate_limit = { key = \"number\", max = \"five\", window = \"1m\" }"),
            "five",
        ),
        (
            rule("name = \"r\"\naction = \"deny\"\nrate_limit = { key = \"number\", max = 5 }"),
            "window",
        ),
        (
            rule("name = \"r\"\naction = \"deny\"\ntime = { tz = \"UTC\", between = [\"09:00\"] }"),
            "between",
        ),
        ("defualt = \"allow\"\n".to_owned(), "defualt"),
        ("default = \"allow\"\nversion = \"one\"\n".to_owned(), "one"),
    ];
    for (text, word) in &cases {
        let by_schema = schema_errors(text);
        assert!(!by_schema.is_empty(), "the schema accepts:\n{text}");
        assert!(
            by_schema.iter().any(|e| e.contains(word)),
            "the schema's complaint does not name `{word}`: {by_schema:?}\n{text}"
        );
        let by_verigate = RulesPolicy::parse(text, "t.toml")
            .err()
            .unwrap_or_else(|| panic!("verigate accepts:\n{text}"))
            .to_string();
        assert!(
            by_verigate.contains(word),
            "verigate's complaint does not name `{word}`: {by_verigate}\n{text}"
        );
        assert!(
            by_verigate.starts_with("t.toml:"),
            "no location: {by_verigate}"
        );
    }
}

/// Each condition's own example is checked in conditions/tests.rs, and the docs show
/// those examples.
#[test]
fn the_whole_file_example_in_the_docs_has_the_schemas_shape() {
    let docs = include_str!("../../docs/policy.md");
    // The whole-file example at the top of docs/policy.md has the shape the schema wants.
    let start = docs.find("```toml\nversion").unwrap() + "```toml\n".len();
    let block = &docs[start..start + docs[start..].find("```").unwrap()];
    assert_eq!(schema_errors(block), Vec::<String>::new());
}
