//! What an on-call engineer relies on: metrics that move, honest readiness, a decision
//! deadline, the trigger/sign tools against a live server, and logs without secrets.

use std::{process::Command, sync::Arc, time::Duration};

use serde_json::json;
use verigate::{
    events::{Action, VerificationRequestEvent},
    policy::{Policy, PolicyDecision, PolicyError},
};

use crate::helpers::*;

#[tokio::test]
async fn metrics_follow_real_requests() {
    let app = spawn_app().await;
    let latency = "verigate_http_request_duration_seconds_count{route=\"/sinch/verification\",status=\"200\"}";
    assert_eq!(app.metric(latency).await, 0.0);
    app.post_callback(&request_event("m-1", "sms", "+46700000001"))
        .await;
    app.post_callback(&result_event("m-1", "SUCCESSFUL")).await;
    app.post_callback("{broken").await;
    assert_eq!(app.metric(latency).await, 2.0);
    let bad = "verigate_http_request_duration_seconds_count{route=\"/sinch/verification\",status=\"400\"}";
    assert_eq!(app.metric(bad).await, 1.0);
    assert_eq!(
        app.metric("verigate_callbacks_total{event=\"unparsed\",outcome=\"bad_request\"}")
            .await,
        1.0
    );
    assert_eq!(
        app.metric("verigate_policy_loads_total{outcome=\"ok\"}")
            .await,
        1.0
    );
    assert!(app.metric("verigate_store_flush_seconds_count").await >= 2.0);
    assert!(app.metric("verigate_store_size_bytes").await > 0.0);
    assert_eq!(app.metric("verigate_store_open").await, 1.0);
    let text = app.get("/metrics", None).await.text;
    assert!(text.contains("verigate_policy_info{version=\""), "{text}");
}

#[tokio::test]
async fn readiness_is_false_until_the_store_opens_and_callbacks_are_answered_meanwhile() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    // Another process (here: this test) still holds the store, as in a rolling restart.
    // Past a short startup wait, callbacks are answered without the store.
    let settings = test_settings(&dir, &[("VERIGATE__SERVER__STARTUP_WAIT", "100ms")]);
    let holder = verigate::store::Store::open(
        &settings.store_options(),
        Arc::new(verigate::store::Unobserved),
    )
    .unwrap();
    let (base, handle, running) = start_unready(&settings);
    let client = reqwest::Client::new();
    let get = |path: &'static str| client.get(format!("{base}{path}")).send();

    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    let not_ready = get("/readyz").await.unwrap();
    assert_eq!(not_ready.status(), 503);
    let body: serde_json::Value = not_ready.json().await.unwrap();
    assert_eq!(body["ready"], false);
    // The first open attempt may still be running; the reason shows once it failed.
    assert!(body["checks"]["store"].as_str().unwrap() != "ok", "{body}");

    // Sinch still gets an answer: on_error for requests, 503 (retry) for results.
    let signer = verigate::signature::AppCredentials::new(APP_KEY, APP_SECRET, false).unwrap();
    let post = |body: String| {
        let ts = timestamp(chrono::Utc::now());
        let headers = signed_headers_at(&signer, body.as_bytes(), "/sinch/verification", &ts);
        let mut req = client.post(format!("{base}/sinch/verification")).body(body);
        for (n, v) in headers {
            req = req.header(n, v);
        }
        req.send()
    };
    let answer = post(request_event("early-1", "sms", "+46700000001"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.json::<serde_json::Value>().await.unwrap(),
        json!({"action":"deny"})
    );
    let result = post(result_event("early-1", "SUCCESSFUL")).await.unwrap();
    assert_eq!(result.status(), 503);

    holder.shutdown().await.unwrap();
    drop(holder);
    let mut ready = false;
    for _ in 0..50 {
        if get("/readyz").await.unwrap().status() == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the store never opened after the lock was released");
    assert_eq!(
        post(result_event("late-1", "SUCCESSFUL"))
            .await
            .unwrap()
            .status(),
        200
    );
    handle.stop(true).await;
    running.await.unwrap().unwrap();
}

/// A policy that takes its time, as one calling a remote scoring service might.
struct SlowPolicy(Duration);

impl Policy for SlowPolicy {
    fn decide(
        &self,
        _: &VerificationRequestEvent,
        _history: verigate::policy::NumberHistory,
        _: chrono::DateTime<chrono::Utc>,
    ) -> Result<PolicyDecision, PolicyError> {
        std::thread::sleep(self.0);
        Ok(PolicyDecision {
            action: Action::Allow,
            rule: Some("slow-allow".into()),
            reason: "took its time".into(),
            response: Default::default(),
            explanation: Default::default(),
            spared: Vec::new(),
        })
    }
    fn on_error(&self) -> Action {
        Action::Deny
    }
    fn version(&self) -> String {
        "slow-1".into()
    }
}

struct PanickingPolicy;

impl Policy for PanickingPolicy {
    fn decide(
        &self,
        _: &VerificationRequestEvent,
        _history: verigate::policy::NumberHistory,
        _: chrono::DateTime<chrono::Utc>,
    ) -> Result<PolicyDecision, PolicyError> {
        panic!("a bug in a plugged-in policy")
    }
    fn on_error(&self) -> Action {
        Action::Deny
    }
    fn version(&self) -> String {
        "panics-1".into()
    }
}

#[tokio::test]
async fn a_policy_past_the_decision_deadline_gets_on_error_answered_and_recorded() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut settings = test_settings(&dir, &[("VERIGATE__POLICY__DECISION_DEADLINE", "50ms")]);
    settings.policy.decision_deadline = Duration::from_millis(50);
    let app = spawn_configured_app_with_policy(
        settings,
        dir,
        Arc::new(SlowPolicy(Duration::from_millis(400))),
    )
    .await;
    let reply = app
        .post_callback(&request_event("slow-1", "sms", "+46700000001"))
        .await;
    assert_eq!(reply.json(), json!({"action":"deny"}));
    let record = app.record("slow-1").await.unwrap();
    assert_eq!(record["decision"]["on_error"], true);
    assert!(
        record["decision"]["reason"]
            .as_str()
            .unwrap()
            .contains("50 ms deadline"),
        "{record}"
    );
    assert_eq!(
        app.metric("verigate_decision_deadline_exceeded_total")
            .await,
        1.0
    );
    assert_eq!(
        app.metric("verigate_decisions_total{action=\"deny\",rule=\"on_error\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_panicking_policy_gets_on_error_and_the_service_keeps_answering() {
    let app = spawn_app_with_policy(Arc::new(PanickingPolicy)).await;
    for id in ["boom-1", "boom-2"] {
        let reply = app
            .post_callback(&request_event(id, "sms", "+46700000001"))
            .await;
        assert_eq!(reply.json(), json!({"action":"deny"}));
    }
    assert_eq!(
        app.record("boom-2").await.unwrap()["decision"]["on_error"],
        true
    );
}

fn verigate_cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_verigate"))
        .args(args)
        .env("VERIGATE_APP_KEY", APP_KEY)
        .env("VERIGATE_APP_SECRET", APP_SECRET)
        .env(
            "VERIGATE__SERVER__LISTEN",
            app.address.trim_start_matches("http://"),
        )
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_sends_signed_samples_that_a_running_server_accepts_and_joins() {
    let app = spawn_app().await;
    let cli = |args: Vec<&str>| {
        let out = verigate_cli(&app, &args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let out = tokio::task::block_in_place(|| {
        cli(vec![
            "trigger",
            "request",
            "--id",
            "trig-1",
            "--method",
            "flashcall",
        ])
    });
    assert!(
        out.contains("→ 200 {\"action\":\"allow\",\"flashCall\":{\"dialTimeout\":10}}"),
        "{out}"
    );
    let url = app.callback_url();
    tokio::task::block_in_place(|| {
        cli(vec![
            "trigger",
            "sms-delivered",
            "--id",
            "trig-1",
            "--url",
            &url,
        ])
    });
    tokio::task::block_in_place(|| {
        cli(vec![
            "trigger", "result", "--id", "trig-1", "--status", "FAIL",
        ])
    });
    let record = app.record("trig-1").await.unwrap();
    assert_eq!(record["decision"]["action"], "allow");
    assert_eq!(record["sms_delivery"]["result"], "Successful");
    assert_eq!(record["result"]["status"], "FAIL");
    assert_eq!(record["event_count"], 3);

    let healthy = tokio::task::block_in_place(|| verigate_cli(&app, &["healthcheck"]));
    assert!(healthy.status.success());
    let wrong = tokio::task::block_in_place(|| {
        verigate_cli(
            &app,
            &["healthcheck", "--url", &format!("{}/nope", app.address)],
        )
    });
    assert!(!wrong.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_prints_headers_that_verify() {
    let app = spawn_app().await;
    let body = result_event("signed-1", "SUCCESSFUL");
    let file = app.data_dir.path().join("body.json");
    std::fs::write(&file, &body).unwrap();
    let out = tokio::task::block_in_place(|| verigate_cli(&app, &["sign", file.to_str().unwrap()]));
    assert!(out.status.success());
    let headers: Vec<(String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (n, v) = l.split_once(": ").unwrap();
            (n.to_owned(), v.to_owned())
        })
        .collect();
    assert_eq!(headers.len(), 3);
    let reply = app
        .post_raw(&app.callback_url(), &headers, body.into_bytes())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}

#[tokio::test]
async fn logs_are_json_and_never_carry_secrets_or_full_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let binary = RunningBinary::start(&dir, &[("RUST_LOG", "debug")]).await;
    let number = "+46701234567";
    let bodies = [
        request_event("log-1", "sms", number),
        result_event("log-1", "FAIL").replace("+46700000001", number),
        // Wrong type: the parser's message quotes the value.
        format!(
            r#"{{"id":"log-2","event":"VerificationRequestEvent","method":"sms","identity":{{"endpoint":{}}}}}"#,
            &number[1..]
        ),
    ];
    let callback_url = format!("{}/sinch/verification", binary.base);
    for body in bodies {
        binary.post_callback(body.clone()).await;
        // And once forged, with the secret itself as the "signature".
        binary
            .client
            .post(&callback_url)
            .header(
                "authorization",
                format!("Application {APP_KEY}:{APP_SECRET}"),
            )
            .header("x-timestamp", timestamp(chrono::Utc::now()))
            .body(body)
            .send()
            .await
            .unwrap();
    }
    for path in [
        "/v1/verifications/log-1",
        "/v1/verifications?number=%2B46701234567",
    ] {
        let reply = binary
            .client
            .get(format!("{}{path}", binary.base))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200, "{path}");
    }
    let lines = binary.terminate();

    let all = lines.join("\n");
    assert!(
        all.contains("+46*******67"),
        "the masked number should appear in:\n{all}"
    );
    let decision = lines
        .iter()
        .find(|l| l.contains("request event answered"))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .expect("a decision line");
    assert_eq!(decision["country"], "SE", "{decision}");
    assert_eq!(decision["rule"], "default");
    assert!(decision["eval_ns"].as_u64().unwrap() > 0);
    assert_eq!(decision["policy_version"].as_str().unwrap().len(), 12);
    for secret in [&number[1..], APP_SECRET, API_TOKEN] {
        assert!(!all.contains(secret), "`{secret}` leaked into the logs");
    }
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for field in ["timestamp", "level", "target", "message"] {
            assert!(entry.get(field).is_some(), "{field} missing: {line}");
        }
    }
}
