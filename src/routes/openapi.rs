//! The OpenAPI 3.1 document of the `/v1` API, served at `GET /v1/openapi.json` and
//! committed as docs/openapi.json (a test fails when that copy is stale; regenerate it
//! with `verigate openapi > docs/openapi.json`).
//!
//! Bodies are described by the types the handlers answer with: their JSON Schemas
//! are derived (schemars) from the same structs, so a field added to a record is in the
//! document at the next build. What a derive cannot know (routes, parameters, which
//! token a route needs, which errors it answers) is the table in [`routes`], next to
//! the route table in `routes/mod.rs`.

use std::sync::OnceLock;

use actix_web::HttpResponse;
use schemars::{generate::SchemaSettings, JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use super::{
    analytics::{ListPage, RuleOutcomesAnswer, StatsAnswer},
    policy::{BlockList, FlaggedList, Lifted, Pinned, Reloaded},
    status::ServiceStatus,
    verifications::VerificationEvents,
};
use crate::{
    analytics::{DEFAULT_LIMIT, LIST_PARAMS, MAX_LIMIT, METHODS, STATUSES},
    error::ErrorBody,
    policy::PolicyDescription,
    store::{GroupBy, StoredEvent, VerificationRecord},
};

/// `GET /v1/openapi.json`: no token, it holds no data.
pub async fn serve() -> HttpResponse {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let text = DOCUMENT.get_or_init(|| pretty(&document()));
    HttpResponse::Ok()
        .content_type("application/json")
        .body(text.as_str())
}

/// The document as it is committed: pretty-printed, with a final newline.
pub fn pretty(document: &Value) -> String {
    let mut text = serde_json::to_string_pretty(document).unwrap_or_default();
    text.push('\n');
    text
}

/// Who may call a route.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    /// Either token.
    Read,
    /// The admin token only.
    Admin,
    /// No token.
    Open,
}

/// One operation: what `routes/mod.rs` registers, as a client sees it.
struct Operation {
    method: &'static str,
    path: &'static str,
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
    description: &'static str,
    access: Access,
    /// Parameter objects, or `$ref`s to the shared ones.
    parameters: Vec<Value>,
    /// The 200 answer's content, by media type.
    ok: Value,
    /// Error statuses besides those of the access check.
    errors: &'static [u16],
    /// Operations the 200 answer leads to: link name, operation id, parameter name and
    /// where its value is in the answer.
    links: &'static [(&'static str, &'static str, &'static str, &'static str)],
}

/// The whole document.
pub fn document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.contract = schemars::generate::Contract::Serialize;
            s.meta_schema = None;
        })
        .into_generator();
    let operations = routes(&mut generator);
    let mut paths = Map::new();
    for operation in &operations {
        let entry = paths
            .entry(operation.path)
            .or_insert_with(|| json!({}))
            .as_object_mut();
        if let Some(entry) = entry {
            entry.insert(operation.method.to_owned(), operation_object(operation));
        }
    }
    let error = generator.subschema_for::<ErrorBody<'_>>();
    let schemas = generator.take_definitions(true);
    json!({
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "verigate",
            "version": env!("CARGO_PKG_VERSION"),
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
            "description": "The read and operations API of verigate, the receiver of Sinch \
                Verification callbacks: stored verifications and their raw events, exports, \
                statistics, and the policy in force with its quarantines.\n\n\
                Every route but this document needs a bearer token: the read token or the \
                admin token (`api.read_token`, `api.token`); changes need the admin \
                token. Every error answer has the one JSON shape `Error`, whose `code` is \
                stable. Times are RFC 3339 in UTC. Lists are paginated: pass a page's \
                `next_cursor` as `cursor` for the next one, until it is null.",
        },
        "servers": [{ "url": "/", "description": "the verigate instance serving this document" }],
        "security": [{ "bearer": [] }],
        "tags": [
            { "name": "verifications", "description": "Stored verifications and their events" },
            { "name": "analytics", "description": "Exports and statistics over a time range" },
            { "name": "policy", "description": "The policy in force and its quarantines" },
            { "name": "service", "description": "The service itself" },
        ],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <token>` with the read or the admin \
                        token from verigate's settings.",
                },
            },
            "schemas": Value::Object(with_error(schemas, error)),
            "parameters": shared_parameters(),
            "responses": error_responses(),
        },
    })
}

/// The schemas, with `Error` as the name the error responses use.
fn with_error(mut schemas: Map<String, Value>, error: schemars::Schema) -> Map<String, Value> {
    let error = error.to_value();
    if error.get("$ref").is_none() {
        schemas.insert("Error".into(), error);
    } else if let Some(body) = schemas.remove("ErrorBody") {
        schemas.insert("Error".into(), body);
    }
    schemas
}

fn operation_object(operation: &Operation) -> Value {
    let mut responses = Map::new();
    let mut ok = json!({ "description": "OK", "content": operation.ok });
    for (name, target, parameter, at) in operation.links {
        ok["links"][*name] = json!({
            "operationId": target,
            "parameters": { *parameter: format!("$response.body#{at}") },
        });
    }
    responses.insert("200".into(), ok);
    let access_errors: &[u16] = match operation.access {
        Access::Open => &[],
        Access::Read => &[401],
        Access::Admin => &[401, 403],
    };
    for status in access_errors.iter().chain(operation.errors) {
        responses.insert(
            status.to_string(),
            json!({ "$ref": format!("#/components/responses/{}", error_name(*status)) }),
        );
    }
    let mut object = json!({
        "operationId": operation.id,
        "tags": [operation.tag],
        "summary": operation.summary,
        "description": operation.description,
        "responses": responses,
    });
    if !operation.parameters.is_empty() {
        object["parameters"] = Value::Array(operation.parameters.clone());
    }
    match operation.access {
        Access::Open => object["security"] = json!([]),
        Access::Admin => {
            object["x-verigate-token"] = json!("admin");
        }
        Access::Read => {}
    }
    object
}

fn error_name(status: u16) -> &'static str {
    match status {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        422 => "InvalidPolicy",
        500 => "Internal",
        _ => "StoreUnavailable",
    }
}

/// The error answers, each with the shared `Error` body and an example.
fn error_responses() -> Value {
    let response = |description: &str, code: &str, message: &str| {
        json!({
            "description": description,
            "content": { "application/json": {
                "schema": { "$ref": "#/components/schemas/Error" },
                "example": { "error": { "code": code, "message": message } },
            }},
        })
    };
    json!({
        "BadRequest": response(
            "A query parameter could not be used (unknown, empty, malformed or out of range); \
             the message names it.",
            "bad_request",
            "query parameter `limit`: must be a number from 1 to 1000",
        ),
        "Unauthorized": response(
            "No token, a wrong token (`missing_token`, `invalid_token`), or the API is \
             disabled because no token is configured (`api_disabled`).",
            "invalid_token",
            "the bearer token is not valid",
        ),
        "Forbidden": response(
            "The read token may not change anything: this route needs the admin token.",
            "forbidden",
            "this endpoint needs the admin token",
        ),
        "NotFound": response(
            "Nothing with that id or key.",
            "not_found",
            "no verification with id `1234`",
        ),
        "InvalidPolicy": response(
            "The policy file does not load; the previous policy stays in force.",
            "invalid_policy",
            "rule `per-number-burst`: `max` must be at least 1; the previous policy stays in force",
        ),
        "Internal": response(
            "verigate failed; the log says why.",
            "internal",
            "the reload could not run",
        ),
        "StoreUnavailable": response(
            "The store (or, with replicas, the shared policy state) cannot be read or \
             written now; try again. `/readyz` says why.",
            "store_unavailable",
            "the store is not available: opening the store",
        ),
    })
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

fn shared(name: &str) -> Value {
    json!({ "$ref": format!("#/components/parameters/{name}") })
}

/// Text parameters are 1 to 256 characters.
fn text(extra: Value) -> Value {
    let mut schema = json!({ "type": "string", "minLength": 1, "maxLength": 256 });
    if let (Some(schema), Value::Object(extra)) = (schema.as_object_mut(), extra) {
        schema.extend(extra);
    }
    schema
}

fn shared_parameters() -> Value {
    let groups: Vec<&str> = GroupBy::ALL.iter().map(|g| g.name()).collect();
    let group = groups.join("|");
    json!({
        "since": query(
            "since",
            "Start of the range, inclusive: verifications first seen (or events received) at \
             or after it. Default: the beginning.",
            text(json!({ "format": "date-time", "examples": ["2026-11-22T00:00:00Z"] })),
        ),
        "until": query(
            "until",
            "End of the range, exclusive; later than `since`. Default: no end.",
            text(json!({ "format": "date-time", "examples": ["2026-11-23T00:00:00Z"] })),
        ),
        "limit": query(
            "limit",
            "Items per page.",
            json!({ "type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT }),
        ),
        "cursor": query(
            "cursor",
            "The `next_cursor` of the previous page, as it was given.",
            text(json!({ "pattern": "^[A-Za-z0-9_-]+$" })),
        ),
        "id": {
            "name": "id", "in": "path", "required": true,
            "description": "The verification's id, as Sinch gave it.",
            "schema": { "type": "string", "minLength": 1 },
            "example": "1234567890abcdef",
        },
        "key": {
            "name": "key", "in": "path", "required": true,
            "description": "The quarantined key, as `GET /v1/policy/blocks` lists it (a range, \
                prefix or country); every rule's block on it is changed.",
            "schema": { "type": "string", "minLength": 1 },
            "example": "+4670123",
        },
        "group_by": query(
            "group_by",
            &format!("Comma-separated dimensions to group by, any of {}.", groups.join(", ")),
            text(json!({
                "pattern": format!("^({group})(,({group}))*$"),
                "examples": ["country,day"],
            })),
        ),
    })
}

/// The filters of `GET /v1/verifications`, in [`LIST_PARAMS`] order.
fn list_parameters() -> Vec<Value> {
    let choice = |values: &[&str]| json!({ "type": "string", "enum": values });
    LIST_PARAMS
        .iter()
        .map(|name| match *name {
            "number" => query(
                "number",
                "E.164 number (send `+` as `%2B`). With hashed numbers, verigate hashes it to \
                 look it up.",
                json!({ "type": "string", "pattern": "^\\+[1-9][0-9]{1,14}$", "examples": ["+46700000001"] }),
            ),
            "reference" => query("reference", "Sinch's `reference`, exactly.", text(json!({}))),
            "status" => query(
                "status",
                "Final status (`NONE`: no result yet). Case-insensitive.",
                choice(STATUSES),
            ),
            "method" => query("method", "Verification method. Case-insensitive.", choice(METHODS)),
            "country" => query(
                "country",
                "ISO 3166-1 alpha-2 code of the number, or `unknown`. Case-insensitive.",
                json!({ "type": "string", "pattern": "^([A-Za-z]{2}|[Uu][Nn][Kk][Nn][Oo][Ww][Nn])$", "examples": ["SE"] }),
            ),
            "action" => query("action", "What verigate answered.", choice(&["allow", "deny"])),
            "rule" => query(
                "rule",
                "The rule that decided (`default` and `on_error` included).",
                text(json!({ "examples": ["per-number-burst"] })),
            ),
            other => shared(other),
        })
        .collect()
}

fn json_of(schema: schemars::Schema) -> Value {
    json!({ "application/json": { "schema": schema } })
}

fn schema<T: JsonSchema>(generator: &mut SchemaGenerator) -> Value {
    json_of(generator.subschema_for::<T>())
}

/// Every `/v1` route; `routes/mod.rs` registers the handlers.
fn routes(generator: &mut SchemaGenerator) -> Vec<Operation> {
    let range = || vec![shared("since"), shared("until")];
    let store = &[400, 503];
    vec![
        Operation {
            method: "get",
            path: "/v1/verifications",
            id: "listVerifications",
            tag: "verifications",
            summary: "List verifications",
            description: "Verifications first seen in the range, oldest first, filtered; \
                every filter must hold. A page may be shorter than `limit` (even empty) \
                while `next_cursor` is not null: the search stops after a bounded amount of \
                reading; follow the cursor.",
            access: Access::Read,
            parameters: list_parameters(),
            ok: schema::<ListPage<VerificationRecord>>(generator),
            errors: store,
            links: &[
                ("getVerification", "getVerification", "id", "/items/0/id"),
                (
                    "getVerificationEvents",
                    "getVerificationEvents",
                    "id",
                    "/items/0/id",
                ),
            ],
        },
        Operation {
            method: "get",
            path: "/v1/verifications/{id}",
            id: "getVerification",
            tag: "verifications",
            summary: "One verification",
            description: "Everything known about one verification, joined from its events.",
            access: Access::Read,
            parameters: vec![shared("id")],
            ok: schema::<VerificationRecord>(generator),
            errors: &[404, 503],
            links: &[(
                "getVerificationEvents",
                "getVerificationEvents",
                "id",
                "/id",
            )],
        },
        Operation {
            method: "get",
            path: "/v1/verifications/{id}/events",
            id: "getVerificationEvents",
            tag: "verifications",
            summary: "A verification's callbacks as received",
            description: "Its accepted callbacks exactly as Sinch sent them, oldest first.",
            access: Access::Read,
            parameters: vec![shared("id")],
            ok: schema::<VerificationEvents>(generator),
            errors: &[404, 503],
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/export",
            id: "exportVerifications",
            tag: "analytics",
            summary: "Export verifications",
            description: "Every verification first seen in the range, oldest first, streamed \
                in constant memory: NDJSON (one `VerificationRecord` per line) or CSV \
                (RFC 4180, a header row, one row per verification).",
            access: Access::Read,
            parameters: [
                range(),
                vec![query(
                    "format",
                    "Output format.",
                    json!({ "type": "string", "enum": ["ndjson", "csv"], "default": "ndjson" }),
                )],
            ]
            .concat(),
            ok: json!({
                "application/x-ndjson": {
                    "schema": { "type": "string", "description": "One VerificationRecord (JSON) per line." },
                },
                "text/csv": {
                    "schema": { "type": "string" },
                    "example": format!("{}\r\n", crate::analytics::CSV_COLUMNS.join(",")),
                },
            }),
            errors: store,
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/stats",
            id: "getStats",
            tag: "analytics",
            summary: "Counts, conversion and spend",
            description: "Over the verifications first seen in the range, per group.",
            access: Access::Read,
            parameters: [range(), vec![shared("group_by")]].concat(),
            ok: schema::<StatsAnswer>(generator),
            errors: store,
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/stats/rules",
            id: "getRuleOutcomes",
            tag: "analytics",
            summary: "How each rule's verifications ended",
            description: "Per rule, the verifications first seen in the range that it decided \
                or matched in shadow, and how they ended.",
            access: Access::Read,
            parameters: range(),
            ok: schema::<RuleOutcomesAnswer>(generator),
            errors: store,
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/events",
            id: "listEvents",
            tag: "analytics",
            summary: "The raw event log",
            description: "Every accepted callback received in the range, as received, in the \
                order stored, paginated.",
            access: Access::Read,
            parameters: [range(), vec![shared("limit"), shared("cursor")]].concat(),
            ok: schema::<ListPage<StoredEvent>>(generator),
            errors: store,
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/status",
            id: "getStatus",
            tag: "service",
            summary: "The service as the caller sees it",
            description: "The caller's role, the service's version and clock, the store's \
                readiness and size, and the policy version.",
            access: Access::Read,
            parameters: Vec::new(),
            ok: schema::<ServiceStatus>(generator),
            errors: &[],
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/policy",
            id: "getPolicy",
            tag: "policy",
            summary: "The policy in force",
            description: "Its version, rules with their hits and outcomes, the last reload \
                error and, with replicas, every replica's policy version. A policy built in \
                code (not from a file) may answer with only `version` and fields of its own.",
            access: Access::Read,
            parameters: Vec::new(),
            ok: json!({ "application/json": { "schema": { "anyOf": [
                generator.subschema_for::<PolicyDescription>(),
                {
                    "type": "object",
                    "required": ["version"],
                    "properties": { "version": { "type": "string" } },
                },
            ]}}}),
            errors: &[],
            links: &[],
        },
        Operation {
            method: "post",
            path: "/v1/policy/reload",
            id: "reloadPolicy",
            tag: "policy",
            summary: "Reload the policy file now",
            description: "Reads the policy file again (verigate also does on change and on \
                SIGHUP). A file that does not load is refused and the previous policy stays.",
            access: Access::Admin,
            parameters: Vec::new(),
            ok: schema::<Reloaded>(generator),
            errors: &[422, 500],
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/policy/blocks",
            id: "listBlocks",
            tag: "policy",
            summary: "Keys in quarantine",
            description: "Keys the adaptive rules quarantined: why, since and until when, and \
                the verifications that tripped them.",
            access: Access::Read,
            parameters: Vec::new(),
            ok: schema::<BlockList>(generator),
            errors: &[],
            links: &[
                ("liftBlock", "liftBlock", "key", "/blocks/0/key"),
                ("pinBlock", "pinBlock", "key", "/blocks/0/key"),
            ],
        },
        Operation {
            method: "get",
            path: "/v1/policy/flagged",
            id: "listFlagged",
            tag: "policy",
            summary: "Keys shadow rules would deny",
            description: "Keys that rules in shadow mode matched in the last hour, most \
                recent first: what no rule acts on but an operator should see (an attack \
                hidden in a busy operator block that a `surge` rule in shadow sees, say). \
                Each replica lists what it saw.",
            access: Access::Read,
            parameters: Vec::new(),
            ok: schema::<FlaggedList>(generator),
            errors: &[],
            links: &[],
        },
        Operation {
            method: "delete",
            path: "/v1/policy/blocks/{key}",
            id: "liftBlock",
            tag: "policy",
            summary: "Lift the blocks on a key",
            description: "Ends every rule's block on the key, on every replica; its next trip \
                starts from fresh evidence.",
            access: Access::Admin,
            parameters: vec![shared("key")],
            ok: schema::<Lifted>(generator),
            errors: &[404, 503],
            links: &[],
        },
        Operation {
            method: "post",
            path: "/v1/policy/blocks/{key}/pin",
            id: "pinBlock",
            tag: "policy",
            summary: "Make the blocks on a key permanent",
            description: "Every rule's block on the key stays until it is lifted.",
            access: Access::Admin,
            parameters: vec![shared("key")],
            ok: schema::<Pinned>(generator),
            errors: &[404, 503],
            links: &[],
        },
        Operation {
            method: "get",
            path: "/v1/openapi.json",
            id: "getOpenApi",
            tag: "service",
            summary: "This document",
            description: "The OpenAPI 3.1 document of this API. Needs no token.",
            access: Access::Open,
            parameters: Vec::new(),
            ok: json!({ "application/json": { "schema": { "type": "object" } } }),
            errors: &[],
            links: &[],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_copy_is_this_build_s_document() {
        let committed = include_str!("../../docs/openapi.json");
        let current = pretty(&document());
        assert!(
            committed == current,
            "docs/openapi.json is stale: run `cargo run -- openapi > docs/openapi.json`"
        );
    }

    #[test]
    fn every_reference_resolves() {
        let document = document();
        let mut refs = Vec::new();
        collect_refs(&document, &mut refs);
        assert!(refs.len() > 20, "{refs:?}");
        for reference in refs {
            let pointer = reference
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("not local: {reference}"));
            assert!(
                document.pointer(pointer).is_some(),
                "{reference} does not resolve"
            );
        }
    }

    fn collect_refs(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(r)) = map.get("$ref") {
                    out.push(r.clone());
                }
                map.values().for_each(|v| collect_refs(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }

    /// Every `example` (of a parameter or a body) against the `schema` beside it, and
    /// every schema's `examples` against that schema.
    #[test]
    fn every_example_matches_its_schema() {
        let document = document();
        let mut pairs = Vec::new();
        collect_examples(&document, &mut pairs);
        assert!(pairs.len() > 10, "{}", pairs.len());
        for (schema, example) in pairs {
            let root = json!({
                "components": document["components"],
                "allOf": [schema],
            });
            let validator = jsonschema::options()
                .with_draft(jsonschema::Draft::Draft202012)
                .should_validate_formats(true)
                .build(&root)
                .unwrap();
            let errors: Vec<String> = validator
                .iter_errors(&example)
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{example} against {schema}: {errors:?}");
        }
    }

    fn collect_examples(value: &Value, out: &mut Vec<(Value, Value)>) {
        match value {
            Value::Object(map) => {
                if let (Some(schema), Some(example)) = (map.get("schema"), map.get("example")) {
                    out.push((schema.clone(), example.clone()));
                }
                if let Some(Value::Array(examples)) = map.get("examples") {
                    out.extend(examples.iter().map(|e| (value.clone(), e.clone())));
                }
                map.values().for_each(|v| collect_examples(v, out));
            }
            Value::Array(items) => items.iter().for_each(|v| collect_examples(v, out)),
            _ => {}
        }
    }

    #[test]
    fn an_example_that_breaks_its_schema_is_caught() {
        let mut pairs = Vec::new();
        let broken = json!({ "schema": { "$ref": "#/components/schemas/Error" },
                             "example": { "error": { "code": "no_such_code", "message": "x" } } });
        collect_examples(&broken, &mut pairs);
        let root = json!({ "components": document()["components"], "allOf": [pairs[0].0] });
        let validator = jsonschema::validator_for(&root).unwrap();
        assert!(!validator.is_valid(&pairs[0].1));
    }
}
