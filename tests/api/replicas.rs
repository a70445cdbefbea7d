//! Three real verigate processes on one PostgreSQL database, with callbacks spread over
//! them round-robin (no proxy): they must decide as one service would.

use std::{collections::HashSet, time::Duration};

use serde_json::Value;
use tempfile::TempDir;

use crate::helpers::{request_event, result_event, wait_for, RunningBinary, API_TOKEN};

/// N replicas, each with its own folder and copy of `policy`, on the database `name`.
struct Replicas {
    running: Vec<RunningBinary>,
    _dirs: Vec<TempDir>,
}

const POLICY_HEAD: &str = "default = \"allow\"\non_error = \"deny\"\n";

async fn replicas(name: &str, n: usize, policy: &str) -> Option<Replicas> {
    replicas_and_url(name, n, policy).await.map(|(r, _)| r)
}

/// [`replicas`], with their database's URL (to start another replica on it later).
async fn replicas_and_url(name: &str, n: usize, policy: &str) -> Option<(Replicas, String)> {
    if !crate::postgres::available() {
        return None;
    }
    let url = crate::postgres::database(&format!("replicas-{name}-{}", std::process::id()));
    Some((replicas_on(&url, n, policy).await, url))
}

/// One replica on `url` with its own folder and copy of `policy`, not yet ready.
fn launch_replica(url: &str, policy: &str) -> (RunningBinary, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        format!("{POLICY_HEAD}{policy}"),
    )
    .unwrap();
    let binary = RunningBinary::launch(
        &dir,
        &[
            ("VERIGATE__STORE__BACKEND", "postgres"),
            ("VERIGATE__STORE__POSTGRES_URL", url),
            ("VERIGATE__STORE__POSTGRES_POOL_SIZE", "8"),
        ],
    );
    (binary, dir)
}

async fn replicas_on(url: &str, n: usize, policy: &str) -> Replicas {
    let (running, dirs): (Vec<_>, Vec<_>) = (0..n).map(|_| launch_replica(url, policy)).unzip();
    for binary in &running {
        binary.wait_ready().await;
    }
    Replicas {
        running,
        _dirs: dirs,
    }
}

impl Replicas {
    /// Posts `body` to replica `i % n`; the status and the answer.
    async fn post(&self, i: usize, body: String) -> (u16, Value) {
        let r = &self.running[i % self.running.len()];
        r.sender().post(body).await
    }

    async fn get(&self, i: usize, path: &str) -> (u16, Value) {
        let r = &self.running[i % self.running.len()];
        let reply = r
            .client
            .get(format!("{}{path}", r.base))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        let status = reply.status().as_u16();
        (status, reply.json().await.unwrap_or(Value::Null))
    }
}

fn priced(id: &str, number: &str, eur: f64) -> String {
    let mut event: Value = serde_json::from_str(&request_event(id, "sms", number)).unwrap();
    event["price"] = serde_json::json!({ "amount": eur, "currencyId": "EUR" });
    event.to_string()
}

/// Sends every body at once, body i to replica i; the answers, in order.
async fn all_at_once(r: &Replicas, bodies: Vec<String>) -> Vec<(u16, Value)> {
    let senders: Vec<_> = r.running.iter().map(RunningBinary::sender).collect();
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| {
            let sender = senders[i % senders.len()].clone();
            tokio::spawn(async move { sender.post(body).await })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

fn allowed(answers: &[(u16, Value)]) -> usize {
    answers
        .iter()
        .filter(|(status, body)| *status == 200 && body["action"] == "allow")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_number_limit_holds_across_replicas() {
    let Some(r) = replicas(
        "limit",
        3,
        "[[rule]]\nname = \"per-number\"\naction = \"deny\"\n\
         rate_limit = { key = \"number\", max = 3, window = \"1h\" }\n",
    )
    .await
    else {
        return;
    };
    let bodies = (0..15)
        .map(|i| request_event(&format!("limit-{i}"), "sms", "+46700000101"))
        .collect();
    let answers = all_at_once(&r, bodies).await;
    assert_eq!(allowed(&answers), 3, "{answers:?}");
    let denied_by_rule = answers
        .iter()
        .filter(|(_, b)| b["action"] == "deny")
        .count();
    assert_eq!(denied_by_rule, 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spend_cap_is_never_exceeded_across_replicas() {
    let Some(r) = replicas(
        "spend",
        3,
        "[[rule]]\nname = \"budget\"\naction = \"deny\"\n\
         spend = { per = \"global\", max = { EUR = 10 }, window = \"1h\" }\n",
    )
    .await
    else {
        return;
    };
    let bodies = (0..45)
        .map(|i| priced(&format!("spend-{i}"), &format!("+467001{i:05}"), 1.0))
        .collect();
    let answers = all_at_once(&r, bodies).await;
    // Exactly the budget: never more, and no euro lost to a race either.
    assert_eq!(allowed(&answers), 10, "{answers:?}");
    // A deny gives its reservation back: a cheaper attempt still fits nothing more.
    let (_, late) = r.post(1, priced("spend-late", "+46700299999", 0.5)).await;
    assert_eq!(late["action"], "deny");
}

const QUARANTINE: &str = "[[rule]]\nname = \"pumping\"\naction = \"deny\"\n\
    conversion = { per = \"prefix:7\", window = \"1h\", min_samples = 6, below = 0.5, complete_after = \"1h\" }\n\
    block_for = \"1h\"\n";

/// Six verifications under +46701 allowed and failed, spread over replicas 0 and 1.
async fn failures_on_two_replicas(r: &Replicas) {
    for i in 0..6 {
        let id = format!("q-{i}");
        let (_, answer) = r
            .post(
                i % 2,
                request_event(&id, "sms", &format!("+46701000{i:03}")),
            )
            .await;
        assert_eq!(answer["action"], "allow", "{answer}");
        let status = r.running[(i + 1) % 2]
            .post_callback(result_event(&id, "FAIL"))
            .await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quarantine_tripped_on_two_replicas_blocks_on_the_third_and_a_lift_is_seen_by_all() {
    let Some(r) = replicas("quarantine", 3, QUARANTINE).await else {
        return;
    };
    failures_on_two_replicas(&r).await;
    // The third replica never saw any of it, and denies.
    let (_, answer) = r
        .post(2, request_event("q-third", "sms", "+46701000999"))
        .await;
    assert_eq!(answer["action"], "deny", "{answer}");
    let (_, record) = r.get(2, "/v1/verifications/q-third").await;
    assert_eq!(record["decision"]["rule"], "pumping", "{record}");
    // Every replica comes to list the block (they sync twice a second) and denies under it.
    for i in 0..3 {
        wait_for(&format!("replica {i} listing the block"), async || {
            let (_, blocks) = r.get(i, "/v1/policy/blocks").await;
            blocks["blocks"].as_array().map(Vec::len) == Some(1)
        })
        .await;
        let (_, blocks) = r.get(i, "/v1/policy/blocks").await;
        assert_eq!(
            blocks["blocks"][0]["key"], "+4670100",
            "replica {i}: {blocks}"
        );
    }
    let (_, blocked) = r
        .post(0, request_event("q-after", "sms", "+46701000998"))
        .await;
    assert_eq!(blocked["action"], "deny");

    // Lifted on replica 1: seen by all, and not undone by another.
    let lift = r.running[1]
        .client
        .delete(format!("{}/v1/policy/blocks/%2B4670100", r.running[1].base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(lift.status(), 200, "{:?}", lift.text().await);
    for i in 0..3 {
        wait_for(&format!("replica {i} seeing the lift"), async || {
            let (_, blocks) = r.get(i, "/v1/policy/blocks").await;
            blocks["blocks"] == serde_json::json!([])
        })
        .await;
    }
    // Another sync round later, no replica has written the block back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        let (_, blocks) = r.get(i, "/v1/policy/blocks").await;
        assert_eq!(blocks["blocks"], serde_json::json!([]), "replica {i}");
    }
    let (_, free) = r
        .post(2, request_event("q-lifted", "sms", "+46701000997"))
        .await;
    assert_eq!(free["action"], "allow", "{free}");
}

/// The sequential test keeps its evidence in the shared counters: failures spread over
/// two replicas trip the key on the third, after a handful, not a fixed sample.
/// The first counter reading of a verification's decision, as replica `i` shows it.
async fn first_reading(r: &Replicas, i: usize, id: &str) -> Value {
    let (_, record) = r.get(i, &format!("/v1/verifications/{id}")).await;
    record["decision"]["explanation"]["counters"][0].clone()
}

/// A request decided on replica 2, which must answer `action`: its first counter reading,
/// and that reading's condition.
async fn on_the_third(r: &Replicas, id: &str, number: &str, action: &str) -> (Value, String) {
    let (_, answer) = r.post(2, request_event(id, "sms", number)).await;
    assert_eq!(answer["action"], action, "{answer}");
    let reading = first_reading(r, 2, id).await;
    let condition = reading["condition"].as_str().unwrap_or_default().to_owned();
    (reading, condition)
}

/// A conversion rule per 7-digit prefix that trips on a few failures in a row.
const SEQUENTIAL: &str = "[[rule]]\nname = \"sequential\"\naction = \"deny\"\n\
    conversion = { per = \"prefix:7\", window = \"1h\", below = 0.3, normal = 0.8, false_alarm = 1e-5, pool = \"country\", complete_after = \"1h\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_evidence_gathered_on_two_replicas_trips_on_the_third() {
    let Some(r) = replicas("sequential", 3, SEQUENTIAL).await else {
        return;
    };
    let mut allowed = 0;
    for i in 0..20 {
        let id = format!("s-{i}");
        let (_, answer) = r
            .post(
                i % 2,
                request_event(&id, "sms", &format!("+46702000{i:03}")),
            )
            .await;
        if answer["action"] == "deny" {
            break;
        }
        allowed += 1;
        let status = r.running[(i + 1) % 2]
            .post_callback(result_event(&id, "FAIL"))
            .await;
        assert_eq!(status, 200);
    }
    assert!(
        (6..=9).contains(&allowed),
        "{allowed} allowed before the first denial"
    );
    let (reading, condition) = on_the_third(&r, "s-third", "+46702000999", "deny").await;
    assert!(condition.starts_with("conversion 0/"), "{reading}");
    assert!(
        reading["value"].as_f64() >= reading["max"].as_f64(),
        "{reading}"
    );
}

/// A block with clean successes of its own before the window is established: what makes
/// it so (its own baseline, its recent successes and the hours they came in) lives in the
/// shared counters. One hour is enough here: a test cannot wait for four.
const ESTABLISHED: &str = "[[rule]]\nname = \"blocks\"\naction = \"deny\"\n\
    conversion = { per = \"prefix:7\", window = \"3s\", below = 0.3, normal = 0.8, false_alarm = 1e-3, established = 20, established_hours = 1, complete_after = \"1h\" }\n";

/// Verifications `from..to` of numbers `block` + 4 digits, each decided on replica
/// `i % 2` and its result sent to the other of the two; the answers of the decisions.
async fn verified(
    r: &Replicas,
    block: &str,
    range: std::ops::Range<usize>,
    status: &str,
) -> Vec<String> {
    let mut actions = Vec::new();
    for i in range {
        let id = format!("{block}-{i}");
        let (_, answer) = r
            .post(i % 2, request_event(&id, "sms", &format!("{block}{i:04}")))
            .await;
        let action = answer["action"].as_str().unwrap_or_default().to_owned();
        if action == "allow" {
            let stored = r.running[(i + 1) % 2]
                .post_callback(result_event(&id, status))
                .await;
            assert_eq!(stored, 200);
        }
        actions.push(action);
    }
    actions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_established_on_two_replicas_is_spared_on_the_third_and_a_fresh_one_is_not() {
    let Some(r) = replicas("established", 3, ESTABLISHED).await else {
        return;
    };
    // Sixty clean successes of one Swedish block, then past the window.
    let history = verified(&r, "+4670300", 0..60, "SUCCESSFUL").await;
    assert!(history.iter().all(|a| a == "allow"), "{history:?}");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    // Failures in it and in a fresh block of the same country, side by side.
    let fresh = verified(&r, "+4670400", 0..12, "FAIL").await;
    assert!(
        fresh.iter().any(|a| a == "deny"),
        "the fresh block: {fresh:?}"
    );
    let spared = verified(&r, "+4670300", 100..108, "FAIL").await;
    assert!(
        spared.iter().all(|a| a == "allow"),
        "the established block: {spared:?}"
    );
    // The third replica, which decided none of it, spares the block and says why.
    let (reading, condition) = on_the_third(&r, "third", "+46703009999", "allow").await;
    assert!(
        condition.contains("established: 60 clean successes before the window"),
        "{reading}"
    );
}

/// The replica that stores a result takes its verification out of the shared outcome book
/// in the same transaction: a result delivered to every replica at once is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_delivered_to_every_replica_at_once_counts_once() {
    let Some(r) = replicas("outcome-once", 3, SEQUENTIAL).await else {
        return;
    };
    for (i, status) in ["SUCCESSFUL", "FAIL", "SUCCESSFUL", "SUCCESSFUL"]
        .into_iter()
        .enumerate()
    {
        let id = format!("once-{i}");
        let (_, answer) = r
            .post(i, request_event(&id, "sms", &format!("+46703000{i:03}")))
            .await;
        assert_eq!(answer["action"], "allow", "{answer}");
        let result = result_event(&id, status);
        let deliveries = r.running.iter().map(|replica| {
            let (sender, result) = (replica.sender(), result.clone());
            tokio::spawn(async move { sender.try_post(result).await })
        });
        for delivery in deliveries.collect::<Vec<_>>() {
            assert_eq!(delivery.await.unwrap().unwrap(), 200);
        }
    }
    let (_, answer) = r
        .post(0, request_event("once-next", "sms", "+46703000999"))
        .await;
    assert_eq!(answer["action"], "allow", "{answer}");
    for replica in 0..3 {
        let reading = first_reading(&r, replica, "once-next").await;
        let condition = reading["condition"].as_str().unwrap_or_default();
        assert!(condition.starts_with("conversion 3/4 "), "{reading}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_sent_to_different_replicas_get_one_answer_and_one_record() {
    let Some(r) = replicas(
        "duplicates",
        3,
        "[[rule]]\nname = \"once\"\naction = \"deny\"\n\
         rate_limit = { key = \"number\", max = 1, window = \"1h\" }\n",
    )
    .await
    else {
        return;
    };
    for round in 0..5 {
        let body = request_event(&format!("dup-{round}"), "sms", "+46700000301");
        let answers = all_at_once(&r, vec![body.clone(), body.clone(), body]).await;
        let actions: HashSet<String> = answers
            .iter()
            .map(|(status, b)| {
                assert_eq!(*status, 200);
                b["action"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(actions.len(), 1, "round {round}: {answers:?}");
        let (_, record) = r
            .get(round, &format!("/v1/verifications/dup-{round}"))
            .await;
        assert_eq!(record["event_count"], 1, "{record}");
    }
    // The policy counted each event once: only the first verification was allowed.
    let (_, first) = r.get(0, "/v1/verifications/dup-0").await;
    assert_eq!(first["decision"]["action"], "allow");
    let (_, second) = r.get(0, "/v1/verifications/dup-1").await;
    assert_eq!(second["decision"]["action"], "deny");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_one_replica_mid_load_loses_no_acknowledged_event() {
    let Some(mut r) = replicas("kill", 3, "").await else {
        return;
    };
    let senders: Vec<_> = r.running.iter().map(RunningBinary::sender).collect();
    let writers: Vec<_> = (0..6)
        .map(|task| {
            let senders = senders.clone();
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut failed_after_ack = 0;
                for i in 0..120 {
                    let id = format!("kill-{task}-{i}");
                    let body = request_event(&id, "sms", "+46700000401");
                    match senders[(task + i) % 3].try_post(body).await {
                        Ok(200) => acked.push(id),
                        Ok(_) | Err(_) => failed_after_ack += 1,
                    }
                }
                (acked, failed_after_ack)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.running.remove(1).kill();
    let mut acked = Vec::new();
    let mut refused = 0;
    for writer in writers {
        let (ids, failed) = writer.await.unwrap();
        acked.extend(ids);
        refused += failed;
    }
    // The survivors kept answering: only what went to the killed replica failed.
    assert!(acked.len() >= 6 * 120 * 2 / 3, "{} acked", acked.len());
    assert!(refused <= 6 * 120 / 3 + 6, "{refused} failed");
    for (n, id) in acked.iter().enumerate() {
        let (status, record) = r.running[n % 2].record(id).await;
        assert_eq!(status, 200, "{id} acknowledged but not stored: {record}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_gives_on_error_answers_and_then_recovery_without_restarts() {
    if !crate::postgres::available() {
        return;
    }
    // A server of its own: stopping the shared one would break the other tests.
    let own = crate::postgres::OwnServer::start("outage");
    let r = replicas_on(
        &own.url,
        2,
        "[[rule]]\nname = \"per-number\"\naction = \"deny\"\n\
         rate_limit = { key = \"number\", max = 100, window = \"1h\" }\n",
    )
    .await;
    let (_, before) = r
        .post(0, request_event("outage-before", "sms", "+46700000501"))
        .await;
    assert_eq!(before["action"], "allow");

    own.stop();
    let mut on_error = 0;
    for i in 0..10 {
        let (status, answer) = r
            .post(
                i,
                request_event(&format!("outage-{i}"), "sms", "+46700000502"),
            )
            .await;
        assert_eq!(status, 200, "Sinch always gets allow or deny: {answer}");
        if answer["action"] == "deny" {
            on_error += 1;
        }
    }
    assert_eq!(
        on_error, 10,
        "every request answered on_error while the database is down"
    );
    let (ready, why) = r.running[0].readiness().await;
    assert_eq!(ready, 503, "{why}");
    // An operator's lift or pin cannot reach the state every replica mirrors: they are
    // told so, not that there is nothing to lift.
    let blocks = format!("{}/v1/policy/blocks/%2B46700000502", r.running[1].base);
    for change in [
        r.running[1].client.delete(&blocks),
        r.running[1].client.post(format!("{blocks}/pin")),
    ] {
        let reply = change.bearer_auth(API_TOKEN).send().await.unwrap();
        let status = reply.status().as_u16();
        let body: Value = reply.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("PostgreSQL"), "{body}");
    }
    std::thread::sleep(Duration::from_secs(5));
    own.start_again();

    // Back without a restart: within a few seconds both replicas answer and store.
    let mut recovered = false;
    for attempt in 0..60 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let id = format!("outage-after-{attempt}");
        let (_, a) = r
            .post(attempt, request_event(&id, "sms", "+46700000503"))
            .await;
        if a["action"] == "allow" {
            let (status, _) = r.running[attempt % 2].record(&id).await;
            recovered = status == 200;
            if recovered {
                break;
            }
        }
    }
    assert!(recovered, "no recovery after the database came back");
    for binary in &r.running {
        binary.wait_ready().await;
    }
}

/// The database stops while results pour in to two replicas: every event acknowledged
/// with 2xx is in the database once it is back (a group commit that fails acknowledges
/// none of its callbacks), and every other one was told 503 and can be sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_stopped_mid_load_loses_no_acknowledged_event() {
    if !crate::postgres::available() {
        return;
    }
    let own = crate::postgres::OwnServer::start("mid-load");
    let r = replicas_on(&own.url, 2, "").await;
    let senders: Vec<_> = r.running.iter().map(RunningBinary::sender).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|task| {
            let (senders, stop) = (senders.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut refused, mut other) = (Vec::new(), 0, Vec::new());
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let id = format!("stopped-{task}-{i}");
                    match senders[(task + i) % 2]
                        .try_post(result_event(&id, "FAIL"))
                        .await
                    {
                        Ok(200) => acked.push(id),
                        Ok(503) => refused += 1,
                        status => other.push(format!("{id}: {status:?}")),
                    }
                    i += 1;
                }
                (acked, refused, other)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| own.stop());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut refused) = (Vec::new(), 0);
    for writer in writers {
        let (ids, no, other) = writer.await.unwrap();
        assert!(other.is_empty(), "neither stored nor refused: {other:?}");
        acked.extend(ids);
        refused += no;
    }
    assert!(
        !acked.is_empty() && refused > 0,
        "{} acked, {refused} refused",
        acked.len()
    );

    tokio::task::block_in_place(|| own.start_again());
    for binary in &r.running {
        binary.wait_ready().await;
    }
    for (n, id) in acked.iter().enumerate() {
        let (status, record) = r.running[n % 2].record(id).await;
        assert_eq!(status, 200, "{id} acknowledged but not stored: {record}");
    }
}

/// The action of a decision answered 200.
fn action((status, answer): (u16, Value)) -> String {
    assert_eq!(status, 200, "{answer}");
    answer["action"].as_str().unwrap_or_default().to_owned()
}

/// A limit counted approximately: each replica counts in memory and shares every 25 ms.
const APPROXIMATE: &str = "[[rule]]\nname = \"per-country\"\naction = \"deny\"\n\
    rate_limit = { key = \"country\", max = 10, window = \"1h\" }\ncounting = \"approximate\"\n\
    [[rule]]\nname = \"walking\"\naction = \"deny\"\n\
    distinct_numbers = { per = \"country\", max = 5, window = \"1h\" }\ncounting = \"approximate\"\n";

/// Far longer than a share and a reading's freshness (25 and 10 ms), for a slow CI.
const SHARED_BY_THEN: Duration = Duration::from_millis(800);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approximate_limit_passes_by_at_most_the_other_replicas_counts_and_then_holds() {
    let Some(r) = replicas("approximate-burst", 3, APPROXIMATE).await else {
        return;
    };
    // 30 at once on two replicas, 15 each (two numbers, so only the rate limit can
    // bite): no replica lets its own view pass 10, so at most 2 x 10 get through.
    let senders: Vec<_> = r.running[..2].iter().map(RunningBinary::sender).collect();
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let sender = senders[i % 2].clone();
            let body = request_event(
                &format!("burst-{i}"),
                "sms",
                &format!("+4670030{:04}", i % 2),
            );
            tokio::spawn(async move { sender.post(body).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    let through = allowed(&answers);
    assert!(
        (10..=20).contains(&through),
        "{through} allowed: {answers:?}"
    );
    // Once the counts are shared, every replica sees the limit passed, the third too,
    // which counted none of them itself.
    tokio::time::sleep(SHARED_BY_THEN).await;
    for i in [2, 0, 1] {
        let (_, answer) = r
            .post(
                i,
                request_event(&format!("after-{i}"), "sms", "+46700300000"),
            )
            .await;
        assert_eq!(answer["action"], "deny", "replica {i} after the share");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approximate_counts_shared_between_replicas_are_exact_once_shared() {
    let Some(r) = replicas("approximate-exact", 3, APPROXIMATE).await else {
        return;
    };
    let norway = |i: usize| request_event(&format!("no-{i}"), "sms", &format!("+4740000{i:03}"));
    let post = |replica: usize, i: usize| {
        let body = norway(i);
        let r = &r;
        async move { r.post(replica, body).await.1["action"].clone() }
    };
    // Four numbers on replica 0, one on replica 1, each seen once: 5 distinct, at the
    // distinct limit and under the rate limit.
    for i in 0..4 {
        assert_eq!(post(0, i).await, "allow", "number {i}");
    }
    tokio::time::sleep(SHARED_BY_THEN).await;
    assert_eq!(post(1, 4).await, "allow", "the fifth number");
    tokio::time::sleep(SHARED_BY_THEN).await;
    // A sixth number on the third replica: the other two replicas' sightings were
    // shared, none lost and none counted twice.
    assert_eq!(post(2, 5).await, "deny", "the sixth number");
    let (_, stats) = r.get(2, "/v1/policy").await;
    let walking = stats["rules"]
        .as_array()
        .and_then(|rules| rules.iter().find(|rule| rule["name"] == "walking"))
        .cloned()
        .unwrap_or_default();
    assert!(
        walking.to_string().contains("counted approximately"),
        "{walking}"
    );
    // Every replica holds the keys of the rules counted approximately, and says how many.
    let third = &r.running[2];
    let metrics = third
        .client
        .get(format!("{}/metrics", third.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let keys: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("verigate_rate_limit_keys "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_default();
    assert!(keys >= 2.0, "{keys} keys held: {metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approximate_limit_is_exact_for_requests_further_apart_than_the_sharing_lag() {
    let Some(r) = replicas("approximate-paced", 3, APPROXIMATE).await else {
        return;
    };
    // One request every 300 ms, round-robin: each replica has seen the others' counts
    // (shared every 25 ms, read again after 10 ms) before it decides.
    let mut answers = Vec::new();
    for i in 0..15 {
        let body = request_event(
            &format!("paced-{i}"),
            "sms",
            &format!("+4560000{:03}", i % 2),
        );
        answers.push(r.post(i, body).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let actions: Vec<&str> = answers
        .iter()
        .map(|(_, a)| a["action"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(allowed(&answers), 10, "{actions:?}");
    assert!(actions[10..].iter().all(|a| *a == "deny"), "{actions:?}");
}

/// A replica that starts while the others count loads what they counted: the part
/// already flushed into the per-key tables and the part still only in the log, each
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_later_loads_the_approximate_counts_once() {
    let Some((r, url)) = replicas_and_url("approximate-late", 2, APPROXIMATE).await else {
        return;
    };
    // Two numbers, so only the rate limit (10 per country) can bite.
    let denmark = |i: usize| {
        request_event(
            &format!("late-{i}"),
            "sms",
            &format!("+4570000{:03}", i % 2),
        )
    };
    for i in 0..6 {
        assert_eq!(action(r.post(0, denmark(i)).await), "allow", "request {i}");
    }
    // Past a flush (every 2 s): these six are in the per-key tables.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for i in 6..9 {
        assert_eq!(action(r.post(1, denmark(i)).await), "allow", "request {i}");
    }
    // Shared, and perhaps not flushed yet.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (late, _dir) = launch_replica(&url, APPROXIMATE);
    late.wait_ready().await;
    let late = Replicas {
        running: vec![late],
        _dirs: Vec::new(),
    };
    assert_eq!(
        action(late.post(0, denmark(9)).await),
        "allow",
        "the tenth: nothing counted twice"
    );
    assert_eq!(
        action(late.post(0, denmark(10)).await),
        "deny",
        "the eleventh: nothing missed"
    );
    tokio::time::sleep(SHARED_BY_THEN).await;
    assert_eq!(
        action(r.post(0, denmark(11)).await),
        "deny",
        "the first replica sees the late one's"
    );
}

/// A replica that misses another's shares (the log rows were trimmed while it could
/// not look, as in a long outage) loads the counts again rather than going on without
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_shares_loads_the_counts_again() {
    let Some((r, url)) = replicas_and_url("approximate-gap", 2, APPROXIMATE).await else {
        return;
    };
    let finland =
        |i: usize| request_event(&format!("gap-{i}"), "sms", &format!("+3584000{:03}", i % 2));
    let signal = |name: &str| {
        let sent = std::process::Command::new("kill")
            .args([format!("-{name}"), r.running[1].pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("STOP");
    for i in 0..9 {
        assert_eq!(action(r.post(0, finland(i)).await), "allow", "request {i}");
    }
    // Flushed into the per-key tables, and then gone from the log before the stopped
    // replica looked.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute("DELETE FROM verigate_share_log")
        .await
        .unwrap();
    assert_eq!(action(r.post(0, finland(9)).await), "allow", "the tenth");
    signal("CONT");
    tokio::time::sleep(SHARED_BY_THEN).await;
    assert_eq!(
        action(r.post(1, finland(10)).await),
        "deny",
        "the eleventh, on the replica that missed nine"
    );
}

/// What makes a number returning is in the database every replica reads: a success
/// recorded through one replica spares the number on another, a failure recorded
/// through a third takes that away everywhere.
#[tokio::test]
async fn a_number_that_succeeded_on_one_replica_is_returning_on_the_others() {
    let policy = "[[rule]]\nname = \"busy-range\"\naction = \"deny\"\nrate_limit = { key = \"range:3\", max = 1, window = \"1h\" }\nspare_returning = true\n";
    let Some(r) = replicas("returning", 3, policy).await else {
        return;
    };
    let (person, stranger) = ("+46701234001", "+46701234002");
    assert_eq!(
        action(r.post(0, request_event("rr-1", "sms", person)).await),
        "allow"
    );
    assert_eq!(
        r.running[0]
            .post_callback(result_event("rr-1", "SUCCESSFUL"))
            .await,
        200
    );
    assert_eq!(
        action(r.post(1, request_event("rr-2", "sms", stranger)).await),
        "deny"
    );
    assert_eq!(
        action(r.post(1, request_event("rr-3", "sms", person)).await),
        "allow"
    );
    assert_eq!(
        r.running[2]
            .post_callback(result_event("rr-3", "FAIL"))
            .await,
        200
    );
    for i in 0..3 {
        let id = format!("rr-{}", 4 + i);
        let answer = action(r.post(i, request_event(&id, "sms", person)).await);
        assert_eq!(answer, "deny", "replica {i}");
    }
}

/// Calls the counter function the replicas share with caps only (kind 5 adds within a
/// cap, kind 6 gives back), all under `cap`, as one batch; each op's (total, added).
async fn caps_in_one_call(
    client: &tokio_postgres::Client,
    ops: &[(i16, &str, f64)],
    cap: f64,
) -> Vec<(f64, bool)> {
    let n = ops.len();
    let now = vec![1_000_000_000i64; n];
    let stage = vec![0i16; n];
    let kind: Vec<i16> = ops.iter().map(|o| o.0).collect();
    let rule = vec!["budget".to_owned(); n];
    let condition = vec!["spend".to_owned(); n];
    let value: Vec<String> = ops.iter().map(|o| o.1.to_owned()).collect();
    let span = vec![3_600_000i64; n];
    let amount: Vec<f64> = ops.iter().map(|o| o.2).collect();
    let member: Vec<Option<String>> = vec![None; n];
    let caps = vec![cap; n];
    let before: Vec<Option<i64>> = vec![None; n];
    let rows = client
        .query(
            "SELECT op, result, added FROM verigate_counter_ops(
                 $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ORDER BY op",
            &[
                &now, &stage, &kind, &rule, &condition, &value, &span, &amount, &member, &caps,
                &before,
            ],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), n);
    rows.iter().map(|r| (r.get(1), r.get(2))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caps_in_one_batch_add_each_one_that_fits_in_order_and_refunds_whatever_the_cap() {
    if !crate::postgres::available() {
        return;
    }
    let url = crate::postgres::database(&format!("caps-batch-{}", std::process::id()));
    let dir = tempfile::tempdir().unwrap();
    let migrated = std::process::Command::new(env!("CARGO_BIN_EXE_verigate"))
        .args(["store", "migrate"])
        .envs(crate::helpers::test_env(&dir))
        .env("VERIGATE__STORE__BACKEND", "postgres")
        .env("VERIGATE__STORE__POSTGRES_URL", &url)
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);

    // All fit: each total counts the earlier ones of the batch, on its own key.
    let fits = caps_in_one_call(
        &client,
        &[(5, "SE", 2.0), (5, "NO", 4.0), (5, "SE", 3.0)],
        5.0,
    )
    .await;
    assert_eq!(fits, vec![(2.0, true), (4.0, true), (5.0, true)]);
    // SE is full: a denied add leaves nothing behind, so a later, cheaper one still
    // finds what is left, and a refund goes in whatever the cap.
    let one_by_one = caps_in_one_call(
        &client,
        &[
            (6, "SE", -3.0),
            (5, "SE", 4.0),
            (5, "SE", 2.0),
            (5, "NO", 1.0),
        ],
        5.0,
    )
    .await;
    assert_eq!(
        one_by_one,
        vec![(2.0, true), (6.0, false), (4.0, true), (5.0, true)]
    );
    let totals = client
        .query(
            "SELECT value, sum(amount) FROM verigate_counts WHERE rule = 'budget'
             GROUP BY value ORDER BY value",
            &[],
        )
        .await
        .unwrap();
    let totals: Vec<(String, f64)> = totals.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(totals, vec![("NO".to_owned(), 5.0), ("SE".to_owned(), 4.0)]);
}
