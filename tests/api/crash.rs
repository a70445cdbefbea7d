//! A 2xx means "on disk": the real binary is killed with SIGKILL right after answering,
//! with no chance to flush on the way out, and every acknowledged event must be there.

use std::sync::Arc;

use crate::helpers::*;

#[tokio::test]
async fn events_acknowledged_before_a_kill_9_are_all_on_disk() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let binary = RunningBinary::start(&dir, &[]).await;
    let ids: Vec<String> = (0..200).map(|i| format!("crash-{i}")).collect();
    let mut acknowledged = Vec::new();
    for chunk in ids.chunks(20) {
        let replies = futures_util::future::join_all(chunk.iter().map(|id| {
            let body = if id.ends_with('0') {
                request_event(id, "sms", "+46700000001")
            } else {
                result_event(id, "SUCCESSFUL")
            };
            binary.post_callback(body)
        }))
        .await;
        for (id, status) in chunk.iter().zip(replies) {
            if status == 200 {
                acknowledged.push(id.clone());
            }
        }
    }
    binary.kill();
    assert_eq!(acknowledged.len(), ids.len());

    let app = spawn_app_on(dir).await;
    for id in &acknowledged {
        assert!(
            app.record(id).await.is_some(),
            "{id} was acknowledged but lost"
        );
    }
}
