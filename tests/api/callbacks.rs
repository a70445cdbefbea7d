//! Signed callbacks of every kind: answers, records, duplicates.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn request_events_for_every_method_are_allowed_with_that_methods_fields_only() {
    let app = spawn_app().await;
    let cases = [
        (
            "sms",
            json!({"action":"allow","sms":{"codeType":"Numeric","expiry":"00:10:00"}}),
        ),
        (
            "flashcall",
            json!({"action":"allow","flashCall":{"dialTimeout":10}}),
        ),
        (
            "flashCall",
            json!({"action":"allow","flashCall":{"dialTimeout":10}}),
        ),
        ("callout", json!({"action":"allow"})),
        ("whatsapp", json!({"action":"allow"})),
        ("seamless", json!({"action":"allow"})),
    ];
    for (i, (method, expected)) in cases.iter().enumerate() {
        let id = format!("req-{i}");
        let number = format!("+4670000001{i}");
        let reply = app
            .post_callback(&request_event(&id, method, &number))
            .await;
        assert_eq!(reply.status, 200, "{method}: {}", reply.text);
        assert!(reply.content_type.starts_with("application/json"));
        assert_eq!(
            reply.json(),
            *expected,
            "{method}: {:?}",
            app.record(&id).await
        );
        let record = app.record(&id).await.expect("record stored");
        assert_eq!(record["decision"]["action"], "allow");
        assert_eq!(record["decision"]["answer"], *expected);
        assert_eq!(record["method"], method.to_lowercase());
    }
}

#[tokio::test]
async fn a_high_risk_prefix_is_denied_and_the_record_says_which_rule() {
    let app = spawn_app().await;
    let reply = app
        .post_callback(&request_event("pump-1", "sms", "+88212345678"))
        .await;
    assert_eq!(reply.json(), json!({"action":"deny"}));
    let record = app.record("pump-1").await.unwrap();
    assert_eq!(
        record["decision"]["rule"],
        "high-risk-international-networks"
    );
    assert_eq!(
        record["decision"]["reason"],
        "rule `high-risk-international-networks` matched prefix +882"
    );
    assert_eq!(record["decision"]["explanation"]["matched_prefix"], "+882");
    assert_eq!(record["decision"]["explanation"]["country"], "unknown");
    assert_eq!(record["decision"]["on_error"], false);
    assert_eq!(
        record["decision"]["policy_version"].as_str().unwrap().len(),
        12
    );
    assert_eq!(
        app.metric(
            "verigate_decisions_total{action=\"deny\",rule=\"high-risk-international-networks\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_request_the_policy_cannot_decide_gets_the_on_error_answer() {
    let app = spawn_app().await;
    let reply = app
        .post_callback(&request_event("odd-1", "sms", "not-a-number"))
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json(), json!({"action":"deny"}));
    let record = app.record("odd-1").await.unwrap();
    assert_eq!(record["decision"]["on_error"], true);
    assert!(record["decision"]["reason"]
        .as_str()
        .unwrap()
        .starts_with("on_error"));
}

#[tokio::test]
async fn result_and_sms_delivered_events_get_an_empty_200_and_join_the_request() {
    let app = spawn_app().await;
    app.post_callback(&request_event("v-1", "sms", "+46700000001"))
        .await;
    for body in [
        sms_delivered_event("v-1"),
        result_event("v-1", "SUCCESSFUL"),
    ] {
        let reply = app.post_callback(&body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert!(reply.text.is_empty(), "{:?}", reply.text);
    }
    let record = app.record("v-1").await.unwrap();
    assert_eq!(record["number"], "+46700000001");
    assert_eq!(record["reference"], "ref-v-1");
    assert_eq!(record["custom"], "order 42");
    assert_eq!(
        record["request"]["price"],
        json!({"currencyId":"USD","amount":0.0127})
    );
    assert_eq!(record["sms_delivery"]["result"], "Successful");
    assert_eq!(record["result"]["status"], "SUCCESSFUL");
    assert_eq!(record["result"]["source"], "manual");
    assert_eq!(record["event_count"], 3);
}

#[tokio::test]
async fn a_result_that_arrives_before_its_request_is_joined_all_the_same() {
    let app = spawn_app().await;
    assert_eq!(
        app.post_callback(&result_event("late-1", "FAIL"))
            .await
            .status,
        200
    );
    let reply = app
        .post_callback(&request_event("late-1", "sms", "+46700000001"))
        .await;
    assert_eq!(reply.json()["action"], "allow");
    let record = app.record("late-1").await.unwrap();
    assert_eq!(record["result"]["status"], "FAIL");
    assert_eq!(record["result"]["reason"], "Expired");
    assert_eq!(record["decision"]["action"], "allow");
}

#[tokio::test]
async fn a_duplicate_delivery_gets_the_same_answer_and_is_counted_once() {
    let app = spawn_app().await;
    let body = request_event("dup-1", "sms", "+46700000001");
    let first = app.post_callback(&body).await;
    // Even a policy change between deliveries must not change the answer given.
    let second = app.post_callback(&body).await;
    assert_eq!(first.json(), second.json());
    let result = result_event("dup-1", "SUCCESSFUL");
    app.post_callback(&result).await;
    assert_eq!(app.post_callback(&result).await.status, 200);

    let record = app.record("dup-1").await.unwrap();
    assert_eq!(record["event_count"], 2);
    let accepted =
        "verigate_callbacks_total{event=\"VerificationRequestEvent\",outcome=\"accepted\"}";
    let duplicate =
        "verigate_callbacks_total{event=\"VerificationRequestEvent\",outcome=\"duplicate\"}";
    assert_eq!(app.metric(accepted).await, 1.0);
    assert_eq!(app.metric(duplicate).await, 1.0);
    assert_eq!(
        app.metric("verigate_decisions_total{action=\"allow\",rule=\"default\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn concurrent_duplicates_all_get_the_first_answer() {
    let app = spawn_app().await;
    let body = request_event("race-1", "flashcall", "+46700000009");
    let replies = futures_util::future::join_all((0..8).map(|_| app.post_callback(&body))).await;
    for reply in &replies {
        assert_eq!(reply.json(), replies[0].json());
    }
    assert_eq!(app.record("race-1").await.unwrap()["event_count"], 1);
}

#[tokio::test]
async fn pending_then_final_status_are_two_events_and_final_wins() {
    let app = spawn_app().await;
    app.post_callback(&result_event("p-1", "PENDING")).await;
    app.post_callback(&result_event("p-1", "SUCCESSFUL")).await;
    app.post_callback(&result_event("p-1", "PENDING")).await; // duplicate PENDING
    let record = app.record("p-1").await.unwrap();
    assert_eq!(record["event_count"], 2);
    assert_eq!(record["result"]["status"], "SUCCESSFUL");
}

#[tokio::test]
async fn an_unknown_event_type_is_acknowledged_stored_and_counted() {
    let app = spawn_app().await;
    let body = r#"{"id":"future-1","event":"VerificationFutureEvent","shiny":true}"#;
    let reply = app.post_callback(body).await;
    assert_eq!(reply.status, 200);
    assert!(reply.text.is_empty());
    assert_eq!(
        app.metric("verigate_callbacks_total{event=\"other\",outcome=\"accepted\"}")
            .await,
        1.0
    );
    assert_eq!(app.record("future-1").await.unwrap()["event_count"], 1);
}

#[tokio::test]
async fn every_sinch_sample_event_is_accepted() {
    let app = spawn_app().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/events");
    let mut accepted = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let body = fixture(&format!("events/{name}"));
        let reply = app.post_callback(&body).await;
        if name.contains("authorization.helper") {
            assert_eq!(reply.error_code(), "invalid_event", "{name}");
        } else {
            assert_eq!(reply.status, 200, "{name}: {}", reply.text);
            accepted += 1;
        }
    }
    assert_eq!(accepted, 14);
}

#[tokio::test]
async fn a_callback_captured_from_sinchs_java_sdk_tests_is_accepted_byte_for_byte() {
    // Vector `java-sinchevents-valid`: key 789, secret 9876543210, path
    // /VerificationRequestEvent, signed 2023-12-01T15:01:20.0406449Z.
    let app = spawn_app_with(|s| {
        s.server.callback_path = "/VerificationRequestEvent".into();
        s.apps.push(extra_app("789", "9876543210"));
    })
    .await;
    app.set_now("2023-12-01T15:03:00Z".parse().unwrap());
    let body = fixture("events/sinch-sdk-java__SinchEventsServiceTest-signed-result-event.json");
    let headers = vec![
        (
            "authorization".to_string(),
            "application 789:xfKhO0XvlRNJraahUBEJzzi1f3Fn3pYO41/ZzwOHPaQ=".to_string(),
        ),
        (
            "content-type".to_string(),
            "application/json; charset=utf-8".to_string(),
        ),
        (
            "x-timestamp".to_string(),
            "2023-12-01T15:01:20.0406449Z".to_string(),
        ),
    ];
    let reply = app
        .post_raw(&app.callback_url(), &headers, body.into_bytes())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let record = app
        .record("018c25e1-7163-5677-b8fb-467d7b1cffa5")
        .await
        .unwrap();
    assert_eq!(record["result"]["status"], "FAIL");
    assert_eq!(record["app_key"], "789");
}
