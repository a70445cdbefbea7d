//! The OpenAPI document: served without a token, the committed copy, valid to an
//! independent validator, and true of the service when a property-based tester
//! (Schemathesis) drives every route from it. Both tools come from PyPI; `bash
//! scripts/test` installs them into target/tools/python.

use std::path::PathBuf;

use serde_json::Value;

use crate::helpers::*;

const READ_TOKEN: &str = "openapi-read-token-0123456789";
const SKIP: &str = "VERIGATE_SKIP_SCHEMATHESIS";

/// A tool of the Python environment scripts/test makes, or on PATH.
fn python_tool(name: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("VERIGATE_TEST_PYTHON_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/tools/python/bin")
        });
    let local = dir.join(name);
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn committed() -> Value {
    serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap()
}

#[tokio::test]
async fn the_document_is_served_without_a_token_and_is_the_committed_copy() {
    let app = spawn_app().await;
    let served = app.get("/v1/openapi.json", None).await;
    assert_eq!(served.status, 200, "{}", served.text);
    assert!(served.content_type.starts_with("application/json"));
    let document = served.json();
    assert_eq!(document, committed());
    assert_eq!(document["openapi"], "3.1.0");
    // Every other route needs the token, and says so.
    assert_eq!(document["security"][0]["bearer"], serde_json::json!([]));
    for (path, operations) in document["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            let open = operation.get("security") == Some(&serde_json::json!([]));
            assert_eq!(open, path == "/v1/openapi.json", "{method} {path}");
            if !open {
                assert!(
                    operation["responses"].get("401").is_some(),
                    "{method} {path}"
                );
            }
        }
    }
}

#[tokio::test]
async fn every_route_of_the_document_is_a_route_of_the_service_and_no_more() {
    let app = spawn_app().await;
    let document = committed();
    for (path, operations) in document["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "x").replace("{key}", "x");
        for method in operations.as_object().unwrap().keys() {
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let reply = api_call(&app.client, &app.address, method.clone(), &concrete, "").await;
            // Known routes ask for a token (or, for the document, need none): never 404/405.
            assert!(
                [200, 401].contains(&reply.status),
                "{method} {concrete}: {} {}",
                reply.status,
                reply.text
            );
        }
    }
    // A route the document does not list is not one.
    let reply = app.get("/v1/secrets", Some(API_TOKEN)).await;
    assert_eq!(reply.status, 404);
}

#[test]
fn an_independent_validator_accepts_the_document() {
    let Some(validator) = python_tool("openapi-spec-validator") else {
        return skip_or_fail(
            "openapi-spec-validator is not installed (bash scripts/test installs it)",
            SKIP,
        );
    };
    let document = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let output = std::process::Command::new(validator)
        .arg(&document)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Verifications of every kind, and a quarantined range, so that the tester reaches
/// stored records and blocks (it follows the document's links from lists to items).
async fn seed(app: &TestApp) {
    for k in 0..4 {
        let id = format!("seed-{k}");
        app.post_callback(&request_event(&id, "sms", &format!("+4670111222{k}")))
            .await;
        let status = if k % 2 == 0 { "SUCCESSFUL" } else { "FAIL" };
        app.post_callback(&result_event(&id, status)).await;
    }
    app.post_callback(&sms_delivered_event("seed-0")).await;
    let path = app.settings.policy.path.clone();
    std::fs::write(
        &path,
        format!(
            "default = \"allow\"\non_error = \"deny\"\n{}",
            crate::adaptive::RULE
        ),
    )
    .unwrap();
    let reload = api_call(
        &app.client,
        &app.address,
        reqwest::Method::POST,
        "/v1/policy/reload",
        API_TOKEN,
    )
    .await;
    assert_eq!(reload.status, 200, "{}", reload.text);
    for k in 0..6 {
        let id = format!("range-{k}");
        app.post_callback(&request_event(&id, "sms", &format!("+2250712300{k}")))
            .await;
        app.post_callback(&result_event(&id, "FAIL")).await;
    }
    let blocks = app.get("/v1/policy/blocks", Some(API_TOKEN)).await.json();
    assert!(!blocks["blocks"].as_array().unwrap().is_empty(), "{blocks}");
}

/// Runs Schemathesis against the app with `token`; its report when it found anything.
async fn schemathesis(st: PathBuf, app: &TestApp, token: &str) -> Result<(), String> {
    let url = format!("{}/v1/openapi.json", app.address);
    let args = vec![
        "run".to_owned(),
        url,
        "--header".to_owned(),
        format!("Authorization: Bearer {token}"),
        // No 5xx; every status, content type, header and body as documented; no route
        // that answers without the token when it should need one; 405 for methods a
        // route does not have.
        "--checks".to_owned(),
        "not_a_server_error,status_code_conformance,content_type_conformance,\
         response_headers_conformance,response_schema_conformance,ignored_auth,\
         unsupported_method,use_after_free,ensure_resource_availability"
            .to_owned(),
        "--max-examples".to_owned(),
        std::env::var("VERIGATE_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "40".into()),
        "--workers".to_owned(),
        "2".to_owned(),
        "--no-color".to_owned(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(st)
            .args(args)
            // Its reports and caches go to a temporary folder, not the repository.
            .current_dir(std::env::temp_dir())
            .output()
    })
    .await
    .unwrap()
    .map_err(|e| format!("schemathesis did not start: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_no_undocumented_answer_and_no_open_route() {
    let Some(st) = python_tool("st") else {
        return skip_or_fail(
            "Schemathesis is not installed (bash scripts/test installs it)",
            SKIP,
        );
    };
    let app = spawn_app_with(|s| s.api.read_token = Some(READ_TOKEN.to_owned().into())).await;
    seed(&app).await;
    // The read token first (admin routes answer 403), then the admin token, which may
    // lift and pin what the first run left.
    for token in [READ_TOKEN, API_TOKEN] {
        if let Err(report) = schemathesis(st.clone(), &app, token).await {
            panic!("Schemathesis with the {token} token:\n{report}");
        }
    }
}
