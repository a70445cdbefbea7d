//! What Sinch and an operator see around a restart of the real binary: callbacks that
//! arrive while the store is still opening wait for it (up to `server.startup_wait`),
//! and the policy watcher reloads on an edit, promptly under load, and only then.

use std::{sync::Arc, time::Duration};

use serde_json::json;
use verigate::store::{Store, Unobserved};

use crate::helpers::*;

/// Holds the store in this process, as an old instance does during a rolling restart.
fn hold_store(dir: &tempfile::TempDir) -> Store {
    let settings = test_settings(dir, &[]);
    Store::open(&settings.store_options(), Arc::new(Unobserved)).unwrap()
}

#[tokio::test]
async fn a_request_that_arrives_while_the_store_opens_waits_for_it_and_is_decided() {
    let dir = tempfile::tempdir().unwrap();
    let holder = hold_store(&dir);
    let mut binary = RunningBinary::launch(&dir, &[("VERIGATE__SERVER__STARTUP_WAIT", "30s")]);
    assert_eq!(binary.readiness().await.0, 503);

    let sender = binary.sender();
    let mut request = tokio::spawn(async move {
        sender
            .post(request_event("waiting-1", "sms", "+46701234567"))
            .await
    });
    // Not answered while the store is held: without the wait it would be denied at once.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut request)
            .await
            .is_err(),
        "answered before the store could open: {:?}",
        request.await
    );
    let result = binary.sender();
    let mut result = tokio::spawn(async move {
        result
            .try_post(result_event("waiting-1", "SUCCESSFUL"))
            .await
    });

    holder.shutdown().await.unwrap();
    drop(holder);
    let (status, body) = request.await.unwrap();
    assert_eq!((status, &body["action"]), (200, &json!("allow")), "{body}");
    // The result that arrived meanwhile is stored too (not refused with a 503).
    assert_eq!((&mut result).await.unwrap().unwrap(), 200);
    binary.wait_ready().await;
    assert!(binary
        .wait_for_line(
            "callback waited for the store to open",
            Duration::from_secs(5)
        )
        .is_some());

    let (status, record) = binary.record("waiting-1").await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["decision"]["action"], "allow", "{record}");
    assert_eq!(record["result"]["status"], "SUCCESSFUL", "{record}");
    binary.terminate();
}

#[tokio::test]
async fn past_the_startup_wait_requests_get_on_error_and_results_a_503() {
    let dir = tempfile::tempdir().unwrap();
    let holder = hold_store(&dir);
    let binary = RunningBinary::launch(&dir, &[("VERIGATE__SERVER__STARTUP_WAIT", "200ms")]);
    let sender = binary.sender();

    // The sample policy's on_error is deny.
    let (status, body) = sender
        .post(request_event("late-1", "sms", "+46701234567"))
        .await;
    assert_eq!((status, body), (200, json!({"action": "deny"})));
    let (status, body) = sender.post(result_event("late-1", "SUCCESSFUL")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "store_unavailable", "{body}");

    holder.shutdown().await.unwrap();
    drop(holder);
    binary.wait_ready().await;
    // Sinch's retry of the result is then taken.
    assert_eq!(
        sender
            .try_post(result_event("late-1", "SUCCESSFUL"))
            .await
            .unwrap(),
        200
    );
    binary.terminate();
}

/// Posts callbacks as fast as one connection allows until `stop` is set.
fn keep_posting(
    sender: CallbackSender,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut sent = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let id = format!("load-{sent}");
            let number = format!("+447700{:06}", sent % 1_000_000);
            assert_eq!(
                sender
                    .try_post(request_event(&id, "sms", &number))
                    .await
                    .unwrap(),
                200
            );
            sent += 1;
        }
        sent
    })
}

#[tokio::test]
async fn an_edit_is_applied_under_load_with_the_store_in_the_policy_folder_and_only_an_edit() {
    // test_env puts the store (db/) and the lists next to the policy file.
    let dir = tempfile::tempdir().unwrap();
    let mut binary = RunningBinary::start(&dir, &[]).await;
    assert!(dir.path().join("db").is_dir());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| keep_posting(binary.sender(), Arc::clone(&stop)))
        .collect();
    // The rule that decided a probe, as the store recorded it.
    async fn decide(binary: &RunningBinary, id: &str) -> serde_json::Value {
        let body = request_event(id, "sms", "+46709999999");
        assert_eq!(binary.sender().post(body).await.0, 200);
        binary.record(id).await.1["decision"]["rule"].clone()
    }
    assert_eq!(
        decide(&binary, "before-edit").await,
        serde_json::Value::Null
    );

    // A busy store writes next to the policy for a while: nothing reloads.
    let loads = |binary: &RunningBinary| {
        let (client, url) = (binary.client.clone(), format!("{}/metrics", binary.base));
        async move {
            let text = client.get(url).send().await.unwrap().text().await.unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("verigate_policy_loads_total{outcome=\"ok\"} "))
                .map(|v| v.trim().parse::<f64>().unwrap())
        }
    };
    assert!(binary
        .wait_for_line("policy reloaded", Duration::from_secs(3))
        .is_none());
    assert_eq!(loads(&binary).await, Some(1.0), "the start's load only");

    // Save by rename, as editors do: the new number joins the blocked list.
    let policy = dir.path().join("policy.toml");
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replace("[\"+15555550123\"]", "[\"+15555550123\", \"+46709999999\"]");
    assert!(text.contains("+46709999999"), "the sample policy changed");
    let saved = dir.path().join(".policy.toml.swp");
    std::fs::write(&saved, text).unwrap();
    std::fs::rename(&saved, &policy).unwrap();

    // Applied while the load goes on (a reload that waited for quiet would never come).
    let mut denied = false;
    for k in 0..100 {
        if decide(&binary, &format!("after-edit-{k}")).await == "blocked-numbers" {
            denied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(denied, "the edit was not applied under load");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for task in load {
        sent += task.await.unwrap();
    }
    assert!(sent > 100, "only {sent} callbacks of load");
    assert_eq!(loads(&binary).await, Some(2.0), "one reload for one edit");
    let reloads = binary
        .terminate()
        .into_iter()
        .filter(|l| l.contains("policy reloaded"))
        .count();
    assert_eq!(reloads, 1);
}
