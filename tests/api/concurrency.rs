//! Many clients at once, every event of a verification racing the others: each record
//! must end up with all of its parts, counted once.

use std::sync::Arc;

use futures_util::{stream, StreamExt};
use verigate::client::{sample_body, Sample, SampleKind};

use crate::helpers::*;

const VERIFICATIONS: usize = 40;
const CLIENTS: usize = 24;

#[tokio::test]
async fn racing_events_for_the_same_ids_join_into_complete_records() {
    let app = Arc::new(spawn_app().await);
    // Every event twice (a retry racing its original), in a scrambled order.
    let mut callbacks = Vec::new();
    for i in 0..VERIFICATIONS {
        let id = format!("race-{i}");
        // One number per 1,000-number range, so the sample policy's range rules stay quiet.
        let number = format!("+4670{:04}123", 1000 + i);
        for kind in [
            SampleKind::Request,
            SampleKind::SmsDelivered,
            SampleKind::Result,
        ] {
            let body = sample_body(&Sample {
                kind,
                id: &id,
                number: &number,
                method: "sms",
                status: "SUCCESSFUL",
            });
            callbacks.push(body.clone());
            callbacks.push(body);
        }
    }
    let n = callbacks.len();
    let scrambled: Vec<String> = (0..n).map(|k| callbacks[(k * 37) % n].clone()).collect();
    assert_ne!(n % 37, 0, "37 must be coprime with {n}");

    let statuses: Vec<u16> = stream::iter(scrambled)
        .map(|body| {
            let app = Arc::clone(&app);
            async move { app.post_callback(&body).await.status }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    for i in 0..VERIFICATIONS {
        let id = format!("race-{i}");
        let record = app.record(&id).await.unwrap();
        assert_eq!(record["event_count"], 3, "{id}: {record}");
        assert_eq!(record["number"], format!("+4670{:04}123", 1000 + i), "{id}");
        assert!(record["request"].is_object(), "{id}: request lost");
        assert_eq!(record["decision"]["action"], "allow", "{id}");
        assert_eq!(record["sms_delivery"]["result"], "Successful", "{id}");
        assert_eq!(record["result"]["status"], "SUCCESSFUL", "{id}");
    }
    for event in [
        "VerificationRequestEvent",
        "VerificationSmsDeliveredEvent",
        "VerificationResultEvent",
    ] {
        let accepted =
            format!("verigate_callbacks_total{{event=\"{event}\",outcome=\"accepted\"}}");
        assert_eq!(app.metric(&accepted).await, VERIFICATIONS as f64, "{event}");
    }
    let stats = app.get("/v1/stats", Some(API_TOKEN)).await.json();
    let total = &stats["groups"][0];
    assert_eq!(total["verifications"], VERIFICATIONS);
    assert_eq!(total["requests"], VERIFICATIONS);
    assert_eq!(total["successful_allowed"], VERIFICATIONS);
}

/// A retry that overtakes the first attempt must not be decided again: with a limit of
/// two requests per number, a request delivered eight times at once counts once, so a
/// second verification for the number is still allowed and only a third is denied.
/// Without single flight the concurrent copies each counted (a retry storm used a
/// number's whole allowance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_delivered_many_times_at_once_is_decided_and_counted_once() {
    let app = Arc::new(
        spawn_app_with(|s| {
            std::fs::write(
                &s.policy.path,
                r#"
version = 1
default = "allow"
on_error = "deny"

[[rule]]
name = "two-per-number"
action = "deny"
rate_limit = { key = "number", max = 2, window = "1h" }
"#,
            )
            .unwrap();
        })
        .await,
    );
    for trial in 0..8 {
        let number = format!("+467011{trial:05}");
        let first = request_event(&format!("storm-{trial}"), "sms", &number);
        let answers = futures_util::future::join_all((0..8).map(|_| {
            let (app, body) = (Arc::clone(&app), first.clone());
            async move { app.post_callback(&body).await }
        }))
        .await;
        for answer in &answers {
            assert_eq!(answer.status, 200, "trial {trial}");
            assert_eq!(
                answer.json()["action"],
                "allow",
                "trial {trial}: {}",
                answer.text
            );
        }
        let record = app.record(&format!("storm-{trial}")).await.unwrap();
        assert_eq!(record["event_count"], 1, "trial {trial}");
        let second = app
            .post_callback(&request_event(&format!("second-{trial}"), "sms", &number))
            .await;
        assert_eq!(
            second.json()["action"],
            "allow",
            "trial {trial}: the duplicates were counted toward the limit"
        );
        let third = app
            .post_callback(&request_event(&format!("third-{trial}"), "sms", &number))
            .await;
        assert_eq!(third.json()["action"], "deny", "trial {trial}");
    }
}
