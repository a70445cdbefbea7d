//! Every way a callback can fail authentication, key rotation, proxies and replay.

use crate::helpers::*;
use chrono::Duration;
use verigate::signature::AppCredentials;

#[tokio::test]
async fn every_authentication_failure_is_a_401_naming_its_reason_and_stores_nothing() {
    let app = spawn_app().await;
    let body = request_event("forged-1", "sms", "+46700000001");
    let good = app.signed_headers(&app.signer, body.as_bytes(), "/sinch/verification");
    let with = |name: &str, value: Option<&str>| -> Vec<(String, String)> {
        let mut h: Vec<_> = good.iter().filter(|(n, _)| n != name).cloned().collect();
        if let Some(v) = value {
            h.push((name.to_string(), v.to_string()));
        }
        h
    };
    let auth = &good[0].1;
    let (_, credentials) = auth.split_once(' ').unwrap();
    let other = AppCredentials::new("someone-else", "c2VjcmV0", false).unwrap();
    let wrong_key_signature = app.signed_headers(&other, body.as_bytes(), "/sinch/verification")[0]
        .1
        .clone();
    let cases: Vec<(Vec<(String, String)>, &str)> = vec![
        (with("authorization", None), "missing_authorization"),
        (with("authorization", Some("")), "missing_authorization"),
        (
            with("authorization", Some("Application")),
            "malformed_authorization",
        ),
        (
            with(
                "authorization",
                Some(&format!("Application  {credentials}")),
            ),
            "malformed_authorization",
        ),
        (
            with("authorization", Some(&format!("Signature {credentials}"))),
            "unsupported_scheme",
        ),
        (
            with("authorization", Some(&wrong_key_signature)),
            "unknown_app_key",
        ),
        (
            with(
                "authorization",
                Some(&format!("Application {APP_KEY}:AAAA")),
            ),
            "invalid_signature",
        ),
        (with("x-timestamp", None), "missing_timestamp"),
        (
            with("content-type", Some("application/json")),
            "invalid_signature",
        ),
    ];
    for (headers, code) in cases {
        let reply = app
            .post_raw(&app.callback_url(), &headers, body.clone().into_bytes())
            .await;
        assert_eq!(reply.status, 401, "{code}: {}", reply.text);
        assert_eq!(reply.error_code(), code);
    }
    // A tampered body with the original signature.
    let tampered = body.replace("+46700000001", "+46700000002");
    let reply = app
        .post_raw(&app.callback_url(), &good, tampered.into_bytes())
        .await;
    assert_eq!(reply.error_code(), "invalid_signature");

    assert!(app.record("forged-1").await.is_none());
    assert_eq!(
        app.metric("verigate_auth_failures_total{reason=\"invalid_signature\"}")
            .await,
        3.0
    );
    assert_eq!(
        app.metric("verigate_auth_failures_total{reason=\"missing_authorization\"}")
            .await,
        2.0
    );
}

#[tokio::test]
async fn timestamps_outside_the_window_are_stale_in_both_directions() {
    let app = spawn_app().await;
    let now = app.now();
    for (offset_secs, expected) in [(-660, 401), (-540, 200), (540, 200), (660, 401)] {
        // Sign as Sinch would at `now + offset`, then deliver at `now`.
        app.set_now(now + Duration::seconds(offset_secs));
        let body = request_event(&format!("ts{offset_secs}"), "sms", "+46700000001");
        let headers = app.signed_headers(&app.signer, body.as_bytes(), "/sinch/verification");
        app.set_now(now);
        let reply = app
            .post_raw(&app.callback_url(), &headers, body.into_bytes())
            .await;
        assert_eq!(
            reply.status, expected,
            "offset {offset_secs}: {}",
            reply.text
        );
        if expected == 401 {
            assert_eq!(reply.error_code(), "stale_timestamp");
        }
    }
}

#[tokio::test]
async fn an_unparseable_timestamp_is_refused() {
    let app = spawn_app().await;
    let body = result_event("ts-bad", "FAIL");
    let headers = signed_headers_at(
        &app.signer,
        body.as_bytes(),
        "/sinch/verification",
        "last tuesday",
    );
    let reply = app
        .post_raw(&app.callback_url(), &headers, body.into_bytes())
        .await;
    assert_eq!(reply.error_code(), "invalid_timestamp");
}

#[tokio::test]
async fn a_replayed_callback_is_a_duplicate_inside_the_window_and_stale_after_it() {
    let app = spawn_app().await;
    let body = result_event("replay-1", "SUCCESSFUL");
    let captured = app.signed_headers(&app.signer, body.as_bytes(), "/sinch/verification");
    let url = app.callback_url();
    let send = || app.post_raw(&url, &captured, body.clone().into_bytes());
    assert_eq!(send().await.status, 200);
    assert_eq!(send().await.status, 200);
    app.set_now(app.now() + Duration::minutes(11));
    assert_eq!(send().await.error_code(), "stale_timestamp");
    assert_eq!(app.record("replay-1").await.unwrap()["event_count"], 1);
    let accepted =
        "verigate_callbacks_total{event=\"VerificationResultEvent\",outcome=\"accepted\"}";
    assert_eq!(app.metric(accepted).await, 1.0);
}

#[tokio::test]
async fn secrets_rotate_by_listing_old_and_new_apps_side_by_side() {
    let app = spawn_app_with(|s| {
        s.apps
            .push(extra_app("new-key", "bmV3LXNlY3JldC12YWx1ZQ=="))
    })
    .await;
    let new = AppCredentials::new("new-key", "bmV3LXNlY3JldC12YWx1ZQ==", false).unwrap();
    let post_as = |signer: &AppCredentials, id: &str| {
        let body = result_event(id, "SUCCESSFUL");
        let headers = app.signed_headers(signer, body.as_bytes(), "/sinch/verification");
        let url = app.callback_url();
        let app = &app;
        async move { app.post_raw(&url, &headers, body.into_bytes()).await }
    };
    assert_eq!(post_as(&app.signer, "rot-old").await.status, 200);
    assert_eq!(post_as(&new, "rot-new").await.status, 200);
    assert_eq!(app.record("rot-new").await.unwrap()["app_key"], "new-key");

    // The old app is retired.
    let app = app
        .restart_with(|s| s.apps.retain(|a| a.key == "new-key"))
        .await;
    let body = result_event("rot-old-2", "SUCCESSFUL");
    let headers = app.signed_headers(&app.signer, body.as_bytes(), "/sinch/verification");
    let reply = app
        .post_raw(&app.callback_url(), &headers, body.into_bytes())
        .await;
    assert_eq!(reply.error_code(), "unknown_app_key");
    let body = result_event("rot-new-2", "SUCCESSFUL");
    let headers = app.signed_headers(&new, body.as_bytes(), "/sinch/verification");
    assert_eq!(
        app.post_raw(&app.callback_url(), &headers, body.into_bytes())
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn behind_a_rewriting_proxy_the_public_path_is_what_is_verified() {
    let app = spawn_app_with(|s| s.server.public_callback_path = Some("/hooks/sinch".into())).await;
    let body = result_event("proxy-1", "SUCCESSFUL");
    let public = app.signed_headers(&app.signer, body.as_bytes(), "/hooks/sinch");
    assert_eq!(
        app.post_raw(&app.callback_url(), &public, body.clone().into_bytes())
            .await
            .status,
        200
    );
    let local = app.signed_headers(&app.signer, body.as_bytes(), "/sinch/verification");
    let reply = app
        .post_raw(&app.callback_url(), &local, body.into_bytes())
        .await;
    assert_eq!(reply.error_code(), "invalid_signature");
}

#[tokio::test]
async fn the_query_string_is_not_part_of_the_signed_path() {
    let app = spawn_app().await;
    let body = result_event("query-1", "SUCCESSFUL");
    let headers = app.signed_headers(&app.signer, body.as_bytes(), "/sinch/verification");
    let url = format!("{}?tenant=a&x=1", app.callback_url());
    assert_eq!(
        app.post_raw(&url, &headers, body.into_bytes()).await.status,
        200
    );
}

#[tokio::test]
async fn the_query_api_needs_the_bearer_token() {
    let app = spawn_app().await;
    app.post_callback(&result_event("tok-1", "SUCCESSFUL"))
        .await;
    let path = "/v1/verifications/tok-1";
    assert_eq!(app.get(path, None).await.error_code(), "missing_token");
    assert_eq!(
        app.get(path, Some("wrong-token-wrong-token"))
            .await
            .error_code(),
        "invalid_token"
    );
    assert_eq!(app.get(path, Some(API_TOKEN)).await.status, 200);
    assert_eq!(
        app.get("/v1/verifications/nope", Some(API_TOKEN))
            .await
            .error_code(),
        "not_found"
    );

    let closed = spawn_app_with(|s| s.api.token = None).await;
    let reply = closed.get(path, Some(API_TOKEN)).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (401, "api_disabled")
    );
}
