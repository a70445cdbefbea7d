//! A 2xx means "on disk": the real binary is killed with SIGKILL in the middle of a
//! stream of concurrent callbacks, with no chance to flush on the way out, and every
//! event that got a 2xx must be there after a restart on the same folder (replayed from
//! the write-ahead log, or in the index if a checkpoint got there first).

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use serde_json::Value;

use crate::helpers::*;

/// Concurrent clients, each sending one callback at a time.
const CLIENTS: usize = 16;

/// The callback with sequence number `n`: mostly results, every fifth a request event
/// (which goes through the policy), so both write paths are interrupted.
fn callback(round: usize, n: usize) -> (String, String) {
    let id = format!("crash-{round}-{n}");
    let body = if n % 5 == 0 {
        request_event(&id, "sms", &format!("+4670{n:07}"))
    } else {
        result_event(&id, "SUCCESSFUL")
    };
    (id, body)
}

/// Sends callbacks from `CLIENTS` tasks until the server goes away; returns the ids that
/// were answered 200. The binary is killed once `kill_after` callbacks have been answered.
async fn stream_until_killed(
    binary: RunningBinary,
    round: usize,
    kill_after: usize,
) -> Vec<String> {
    let sender = binary.sender();
    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stopped = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (sender, next, acked, stopped) = (
                sender.clone(),
                Arc::clone(&next),
                Arc::clone(&acked),
                Arc::clone(&stopped),
            );
            tokio::spawn(async move {
                while !stopped.load(Ordering::SeqCst) {
                    let (id, body) = callback(round, next.fetch_add(1, Ordering::SeqCst));
                    match sender.try_post(body).await {
                        Ok(200) => acked.lock().unwrap().push(id),
                        Ok(status) => panic!("{id}: unexpected {status}"),
                        // The kill: connection refused or reset.
                        Err(_) => break,
                    }
                }
            })
        })
        .collect();
    while acked.lock().unwrap().len() < kill_after {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    // Requests are in flight on every other connection at this moment.
    std::process::Command::new("kill")
        .args(["-KILL", &binary.pid().to_string()])
        .status()
        .unwrap();
    stopped.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    binary.kill(); // reaps it
    let acked = acked.lock().unwrap().clone();
    acked
}

/// Every verification id in the store, read back through the export.
async fn stored_ids(binary: &RunningBinary) -> HashSet<String> {
    let reply = binary
        .client
        .get(format!("{}/v1/export?format=ndjson", binary.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    reply
        .text()
        .await
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn events_acknowledged_before_a_kill_9_survive_at_every_kill_point() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut acknowledged = Vec::new();
    // Each round restarts on what the previous kill left behind. Checkpoints every 64
    // events, so that kills also land in the middle of one.
    let small_checkpoints = [("VERIGATE__STORE__CHECKPOINT_EVENTS", "64")];
    for (round, kill_after) in [150, 700, 1500].into_iter().enumerate() {
        let binary = RunningBinary::start(&dir, &small_checkpoints).await;
        let acked = stream_until_killed(binary, round, kill_after).await;
        assert!(acked.len() >= kill_after);
        acknowledged.extend(acked);
    }

    let binary = RunningBinary::start(&dir, &[]).await;
    let stored = stored_ids(&binary).await;
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !stored.contains(*id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged events lost, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );
    // The restarted service takes new events as usual.
    assert_eq!(
        binary
            .post_callback(result_event("after-crashes", "FAIL"))
            .await,
        200
    );
}
