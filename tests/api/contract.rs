//! Every answer the tests get from `/v1` is checked against docs/openapi.json: its
//! status must be documented for that route and method, its content type too, and a JSON
//! body must match the documented schema. So the document is true of what the service
//! does, not only valid.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, OnceLock},
};

use serde_json::{json, Value};

fn document() -> &'static Value {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    DOCUMENT.get_or_init(|| {
        serde_json::from_str(include_str!("../../docs/openapi.json")).expect("docs/openapi.json")
    })
}

type Validators = Mutex<HashMap<String, Arc<jsonschema::Validator>>>;

/// A validator for `schema` (a schema object of the document), resolving its
/// references against the document's components. Formats (date-time) are checked.
fn validator(schema: &Value) -> Arc<jsonschema::Validator> {
    static VALIDATORS: OnceLock<Validators> = OnceLock::new();
    let key = schema.to_string();
    let mut held = VALIDATORS.get_or_init(Validators::default).lock().unwrap();
    Arc::clone(held.entry(key).or_insert_with(|| {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": document()["components"],
            "allOf": [schema],
        });
        Arc::new(
            jsonschema::options()
                .should_validate_formats(true)
                .build(&root)
                .unwrap_or_else(|e| panic!("the document's schema does not compile: {e}")),
        )
    }))
}

/// The document's path template that `path` (without query) falls under.
fn template_of(path: &str) -> Option<&'static str> {
    let segments: Vec<&str> = path.split('/').collect();
    document()["paths"]
        .as_object()?
        .keys()
        .find(|template| {
            let parts: Vec<&str> = template.split('/').collect();
            parts.len() == segments.len()
                && parts.iter().zip(&segments).all(|(t, s)| {
                    t == s || (t.starts_with('{') && t.ends_with('}') && !s.is_empty())
                })
        })
        .map(String::as_str)
}

fn resolve(value: &Value) -> &Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => document()
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("{reference} does not resolve")),
        None => value,
    }
}

/// Checks one answer to `method url` against the document; anything outside `/v1` passes.
pub fn check(method: &str, url: &str, status: u16, content_type: &str, body: &str) {
    let path = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest.find('/').map_or("/", |i| &rest[i..]));
    let path = path.split(['?', '#']).next().unwrap_or(path);
    if !path.starts_with("/v1/") {
        return;
    }
    let what = format!("{method} {path} answered {status}");
    let Some(template) = template_of(path) else {
        // Not a route: the one error shape, 404.
        assert_eq!(status, 404, "{what}: not in docs/openapi.json");
        return check_body(&what, &document()["components"]["schemas"]["Error"], body);
    };
    let Some(operation) = document()["paths"][template].get(method.to_ascii_lowercase()) else {
        assert_eq!(
            status, 405,
            "{what}: the method is not in docs/openapi.json"
        );
        return check_body(&what, &document()["components"]["schemas"]["Error"], body);
    };
    let response = operation["responses"]
        .get(status.to_string())
        .map(resolve)
        .unwrap_or_else(|| panic!("{what}: status not in docs/openapi.json ({template})"));
    let media = content_type.split(';').next().unwrap_or("").trim();
    let Some(content) = response["content"].get(media) else {
        panic!("{what}: content type `{content_type}` not in docs/openapi.json");
    };
    if media == "application/json" {
        check_body(&what, &content["schema"], body);
    }
}

fn check_body(what: &str, schema: &Value, body: &str) {
    let value: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    let validator = validator(schema);
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what}: the body does not match docs/openapi.json:\n  {}\n{body}",
        errors.join("\n  ")
    );
}
