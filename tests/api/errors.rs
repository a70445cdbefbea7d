//! Bad input: a clear JSON error, nothing stored, and the service keeps answering.

use crate::helpers::*;

#[tokio::test]
async fn authenticated_bodies_that_are_not_callbacks_are_400_with_a_reason() {
    let app = spawn_app().await;
    let cases = [
        ("", "malformed_json"),
        ("{\"id\":\"x\",", "malformed_json"),
        ("not json at all", "malformed_json"),
        ("[1,2,3]", "invalid_event"),
        (
            r#"{"event":"VerificationResultEvent","status":"FAIL"}"#,
            "invalid_event",
        ),
        (r#"{"id":"x"}"#, "invalid_event"),
        (
            r#"{"id":7,"event":"VerificationResultEvent"}"#,
            "invalid_event",
        ),
        (
            r#"{"id":"x","event":"VerificationRequestEvent","method":"sms"}"#,
            "invalid_event",
        ),
        (
            r#"{"id":"x","event":"VerificationRequestEvent","method":"sms","identity":{"endpoint":"+1"},"price":{"amount":"1"}}"#,
            "invalid_event",
        ),
        (
            r#"{"id":"x","event":"VerificationResultEvent","status":7}"#,
            "invalid_event",
        ),
    ];
    for (body, code) in cases {
        let reply = app.post_callback(body).await;
        assert_eq!(reply.status, 400, "{body}: {}", reply.text);
        assert_eq!(reply.error_code(), code, "{body}");
    }
    assert!(app.record("x").await.is_none());
    // Still answering.
    assert_eq!(
        app.post_callback(&result_event("after-1", "FAIL"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn invalid_utf8_and_nul_bytes_are_refused_cleanly() {
    let app = spawn_app().await;
    for body in [
        b"\xff\xfe{}".to_vec(),
        b"{\"id\":\"a\0b\",\"event\":\"\0\"}".to_vec(),
    ] {
        let headers = app.signed_headers(&app.signer, &body, "/sinch/verification");
        let reply = app.post_raw(&app.callback_url(), &headers, body).await;
        assert_eq!(reply.status, 400, "{}", reply.text);
    }
}

#[tokio::test]
async fn an_oversize_body_is_413_before_anything_else() {
    let app = spawn_app().await;
    let body = format!(
        r#"{{"id":"big","event":"VerificationResultEvent","custom":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let reply = app.post_callback(&body).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.error_code(), "payload_too_large");
    // Unsigned too: the limit protects the verifier itself.
    let reply = app
        .post_raw(&app.callback_url(), &[], vec![b'{'; 10 * 1024 * 1024])
        .await;
    assert_eq!(reply.status, 413);
    assert_eq!(
        app.post_callback(&result_event("after-big", "FAIL"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn actix_rejections_come_back_in_the_same_json_shape() {
    let app = spawn_app().await;
    let reply = app.get("/no/such/route", None).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (404, "not_found")
    );
    let reply = app.get("/sinch/verification", None).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (405, "method_not_allowed")
    );
    // A method an API route does not have: 405 with the one it has, not 404.
    let response = app
        .client
        .delete(format!("{}/v1/verifications/x", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["allow"], "GET");
    let refused = checked_reply(&reqwest::Method::DELETE, response).await;
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (405, "method_not_allowed")
    );
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("DELETE"));
}

#[tokio::test]
async fn health_and_metrics_answer_without_credentials() {
    let app = spawn_app().await;
    let reply = app.get("/healthz", None).await;
    assert_eq!(reply.json(), serde_json::json!({"status":"ok"}));
    let reply = app.get("/metrics", None).await;
    assert!(reply
        .content_type
        .starts_with("application/openmetrics-text; version=1.0.0"));
    assert!(reply.text.contains("verigate_store_flush_seconds"));
}
