//! What was acknowledged survives a restart.

use crate::helpers::*;

#[tokio::test]
async fn every_acknowledged_event_is_found_after_a_restart() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..60).map(|i| format!("durable-{i}")).collect();
    let replies = futures_util::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let body = if i % 3 == 0 {
            request_event(id, "sms", "+46700000001")
        } else if i % 3 == 1 {
            result_event(id, "SUCCESSFUL")
        } else {
            sms_delivered_event(id)
        };
        let app = &app;
        async move { app.post_callback(&body).await }
    }))
    .await;
    assert!(replies.iter().all(|r| r.status == 200));

    let app = app.restart().await;
    for id in &ids {
        let record = app.record(id).await.unwrap_or_else(|| panic!("{id} lost"));
        assert_eq!(record["event_count"], 1, "{id}");
    }
    // Duplicate detection survives too.
    let again = app
        .post_callback(&request_event("durable-0", "sms", "+46700000001"))
        .await;
    assert_eq!(again.status, 200);
    assert_eq!(app.record("durable-0").await.unwrap()["event_count"], 1);
}
