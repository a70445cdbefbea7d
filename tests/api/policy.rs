//! The policy while the service runs: reloads that never fail a request, broken edits
//! that keep the old policy, per-rule outcomes, and the operator commands.

use std::{process::Command, sync::Arc, time::Duration};

use serde_json::json;

use crate::helpers::*;

fn policy_path(app: &TestApp) -> std::path::PathBuf {
    app.settings.policy.path.clone()
}

async fn post_admin(app: &TestApp, path: &str, token: Option<&str>) -> Reply {
    let mut req = app.client.post(format!("{}{path}", app.address));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    reply(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_traffic_fail_no_request_and_a_broken_edit_keeps_the_old_policy() {
    let app = Arc::new(spawn_app().await);
    let path = policy_path(&app);
    let original = std::fs::read_to_string(&path).unwrap();
    let v1 = app.get("/v1/policy", Some(API_TOKEN)).await.json()["version"]
        .as_str()
        .unwrap()
        .to_owned();

    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let traffic = {
        let (app, answered) = (Arc::clone(&app), Arc::clone(&answered));
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..300 {
                let reply = app
                    .post_callback(&request_event(
                        &format!("t-{i}"),
                        "sms",
                        &format!("+4915112{i:05}"),
                    ))
                    .await;
                answers.push((reply.status, reply.text));
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            answers
        })
    };
    // The edits land while traffic flows.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 10 {
        assert!(std::time::Instant::now() < deadline, "no traffic answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A good edit: deny Germany.
    std::fs::write(
        &path,
        format!(
            "{original}\n[[rule]]\nname = \"no-germany\"\naction = \"deny\"\ncountry = \"DE\"\n"
        ),
    )
    .unwrap();
    let good = post_admin(&app, "/v1/policy/reload", Some(API_TOKEN)).await;
    assert_eq!(good.status, 200, "{}", good.text);
    let v2 = good.json()["version"].as_str().unwrap().to_owned();
    assert_ne!(v1, v2);
    // A broken edit: refused, with where.
    std::fs::write(
        &path,
        format!("{original}\n[[rule]]\nname = \"oops\"\naction = \"deny\"\nprefix = [\"+49x\"]\n"),
    )
    .unwrap();
    let broken = post_admin(&app, "/v1/policy/reload", Some(API_TOKEN)).await;
    assert_eq!(broken.status, 422);
    assert_eq!(broken.error_code(), "invalid_policy");
    let message = broken.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        message.contains("policy.toml:") && message.contains("E.164"),
        "{message}"
    );

    let answers = traffic.await.unwrap();
    assert!(answers
        .iter()
        .all(|(status, text)| *status == 200 && (text.contains("allow") || text.contains("deny"))));
    assert!(
        answers.iter().any(|(_, text)| text.contains("deny")),
        "the good reload never took effect"
    );
    let described = app.get("/v1/policy", Some(API_TOKEN)).await.json();
    assert_eq!(
        described["version"],
        v2.as_str(),
        "the broken edit replaced the policy"
    );
    assert!(described["last_reload_error"]
        .as_str()
        .unwrap()
        .contains("E.164"));
    // The endpoint's reload failed; the file watcher may also have tried the broken file.
    assert!(
        app.metric("verigate_policy_loads_total{outcome=\"failed\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        app.metric(&format!("verigate_policy_info{{version=\"{v2}\"}}"))
            .await,
        1.0
    );
    let denied = app
        .post_callback(&request_event("after", "sms", "+4915199999999"))
        .await;
    assert_eq!(denied.json(), json!({"action": "deny"}));
}

#[tokio::test]
async fn a_file_saved_by_rename_is_picked_up_without_being_asked() {
    let app = spawn_app().await;
    let path = policy_path(&app);
    let before = app.get("/v1/policy", Some(API_TOKEN)).await.json()["version"].clone();
    // Editors write a new file and rename it over the old one.
    let tmp = path.with_extension("toml.swp");
    let text = std::fs::read_to_string(&path).unwrap()
        + "\n[[rule]]\nname = \"no-norway\"\naction = \"deny\"\ncountry = \"NO\"\n";
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let mut changed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if app.get("/v1/policy", Some(API_TOKEN)).await.json()["version"] != before {
            changed = true;
            break;
        }
    }
    assert!(changed, "the policy file change was not picked up");
    let reply = app
        .post_callback(&request_event("no-1", "sms", "+4741234567"))
        .await;
    assert_eq!(reply.json(), json!({"action": "deny"}));
}

#[tokio::test]
async fn reloading_needs_the_admin_token() {
    let read_token = "read-only-token-0123456789";
    let app = spawn_app_with(|s| s.api.read_token = Some(read_token.to_owned().into())).await;
    assert_eq!(
        post_admin(&app, "/v1/policy/reload", None)
            .await
            .error_code(),
        "missing_token"
    );
    let reply = post_admin(&app, "/v1/policy/reload", Some(read_token)).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (403, "forbidden")
    );
    assert_eq!(app.get("/v1/policy", Some(read_token)).await.status, 200);
    assert_eq!(
        app.get("/v1/policy", None).await.error_code(),
        "missing_token"
    );
}

#[tokio::test]
async fn rules_report_hits_and_the_outcomes_of_what_they_touched() {
    let app = spawn_app().await;
    let path = policy_path(&app);
    let text = std::fs::read_to_string(&path).unwrap()
        + "\n[[rule]]\nname = \"shadow-sweden\"\naction = \"deny\"\nmode = \"shadow\"\ncountry = \"SE\"\n";
    std::fs::write(&path, text).unwrap();
    assert_eq!(
        post_admin(&app, "/v1/policy/reload", Some(API_TOKEN))
            .await
            .status,
        200
    );

    for (id, status) in [
        ("o-1", "SUCCESSFUL"),
        ("o-2", "SUCCESSFUL"),
        ("o-3", "FAIL"),
    ] {
        let reply = app
            .post_callback(&request_event(
                id,
                "sms",
                &format!("+4670123456{}", &id[2..]),
            ))
            .await;
        assert_eq!(reply.json()["action"], "allow", "shadow rules never decide");
        app.post_callback(&result_event(id, status)).await;
    }
    let record = app.record("o-1").await.unwrap();
    assert_eq!(
        record["decision"]["explanation"]["shadow"],
        json!([{"rule": "shadow-sweden", "would": "deny"}])
    );
    let described = app.get("/v1/policy", Some(API_TOKEN)).await.json();
    let rule = described["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "shadow-sweden")
        .unwrap()
        .clone();
    assert_eq!(rule["mode"], "shadow");
    assert_eq!(rule["hits"], 3);
    // Two measured false positives: a shadow deny of verifications that succeeded.
    assert_eq!(rule["outcomes"], json!({"SUCCESSFUL": 2, "FAIL": 1}));
    // And in the metrics, for alerting on a shadow rule's rise.
    assert_eq!(
        app.metric("verigate_shadow_matches_total{action=\"deny\",rule=\"shadow-sweden\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn sighup_reloads_the_real_binary() {
    let dir = tempfile::tempdir().unwrap();
    let mut binary = RunningBinary::start(&dir, &[]).await;
    let pid = binary.pid().to_string();
    Command::new("kill").args(["-HUP", &pid]).status().unwrap();
    let line = binary.wait_for_line("policy reloaded", Duration::from_secs(10));
    assert!(
        line.as_deref().is_some_and(|l| l.contains("SIGHUP")),
        "no SIGHUP reload in the log: {line:?}"
    );
    binary.terminate();
}

pub fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_verigate"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn policy_schema_prints_the_committed_schema() {
    let (ok, text) = cli(&["policy", "schema"], &[]);
    assert!(ok, "{text}");
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/policy.schema.json"
    ))
    .unwrap();
    assert_eq!(text, committed);
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(schema["title"], "verigate policy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_check_test_and_replay_work_end_to_end() {
    let root = env!("CARGO_MANIFEST_DIR");
    let sample = format!("{root}/config/policy.toml");
    let (ok, out) = tokio::task::block_in_place(|| cli(&["policy", "check", &sample], &[]));
    assert!(
        ok && out.contains("14 rules") && out.contains("0 warnings"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "default = \"allow\"\n[[rule]]\nname = \"x\"\naction = \"deny\"\ncountry = \"Sweden\"\n",
    )
    .unwrap();
    let (ok, out) =
        tokio::task::block_in_place(|| cli(&["policy", "check", broken.to_str().unwrap()], &[]));
    assert!(!ok && out.contains("broken.toml:5:11"), "{out}");

    let cases = format!("{root}/config/policy-cases.toml");
    let (ok, out) = tokio::task::block_in_place(|| cli(&["policy", "test", &sample, &cases], &[]));
    assert!(ok && out.contains("7 passed, 0 failed"), "{out}");
    let failing = dir.path().join("cases.toml");
    std::fs::write(
        &failing,
        "[[case]]\nname = \"wrong on purpose\"\nnumber = \"+88212345678\"\nexpect = \"allow\"\n",
    )
    .unwrap();
    let (ok, out) = tokio::task::block_in_place(|| {
        cli(&["policy", "test", &sample, failing.to_str().unwrap()], &[])
    });
    assert!(
        !ok && out.contains("FAIL wrong on purpose") && out.contains("0 passed, 1 failed"),
        "{out}"
    );

    // Replay a stricter candidate over real traffic, online and then offline.
    let app = spawn_app().await;
    for (i, status) in ["SUCCESSFUL", "FAIL", "SUCCESSFUL"].iter().enumerate() {
        let id = format!("r-{i}");
        app.post_callback(&request_event(&id, "sms", &format!("+4915112345{i:03}")))
            .await;
        app.post_callback(&result_event(&id, status)).await;
    }
    app.post_callback(&request_event("r-se", "sms", "+46701234567"))
        .await;
    let candidate = dir.path().join("candidate.toml");
    std::fs::write(&candidate, "default = \"allow\"\n[[rule]]\nname = \"no-germany\"\naction = \"deny\"\ncountry = \"DE\"\n").unwrap();
    let (ok, online) = replay_online(&app, &candidate);
    assert!(ok, "{online}");
    assert!(
        online.contains("replayed 4 request events: 1 unchanged"),
        "{online}"
    );
    assert!(
        online.contains("no-germany: 3 [FAIL 1, SUCCESSFUL 2]"),
        "{online}"
    );
    assert!(
        online.contains("2 newly denied verifications had succeeded"),
        "{online}"
    );

    let (settings, _dir, _) = app.stop().await;
    let store = settings.store.path.display().to_string();
    let (ok, offline) = tokio::task::block_in_place(|| {
        cli(
            &[
                "policy",
                "replay",
                candidate.to_str().unwrap(),
                "--since",
                "1h",
                "--json",
            ],
            &[("VERIGATE__STORE__PATH", &store)],
        )
    });
    assert!(ok, "{offline}");
    let report: serde_json::Value = serde_json::from_str(&offline).unwrap();
    assert_eq!(
        report["newly_denied"]["no-germany"],
        json!({"FAIL": 1, "SUCCESSFUL": 2})
    );
}

/// `policy replay` of `candidate` against the running service's last hour.
fn replay_online(app: &TestApp, candidate: &std::path::Path) -> (bool, String) {
    let candidate = candidate.to_str().unwrap();
    tokio::task::block_in_place(|| {
        cli(
            &[
                "policy",
                "replay",
                candidate,
                "--since",
                "1h",
                "--url",
                &app.address,
                "--token",
                API_TOKEN,
            ],
            &[],
        )
    })
}

/// A rule that denies a busy range but spares returning numbers, on a running service.
const SPARING_POLICY: &str = r#"
default = "allow"

[[rule]]
name = "busy-range"
action = "deny"
rate_limit = { key = "range:3", max = 1, window = "1h" }
spare_returning = true
"#;

/// A number whose latest verification succeeded is let through where a new one is
/// denied, and loses that at its next failure: the same with numbers kept hashed.
async fn returning_numbers_are_spared(app: TestApp) {
    std::fs::write(policy_path(&app), SPARING_POLICY).unwrap();
    let reloaded = post_admin(&app, "/v1/policy/reload", Some(API_TOKEN)).await;
    assert_eq!(reloaded.status, 200, "{}", reloaded.text);
    let ask = |id: &'static str, number: &'static str| {
        let app = &app;
        async move {
            let reply = app.post_callback(&request_event(id, "sms", number)).await;
            assert_eq!(reply.status, 200, "{}", reply.text);
            reply.json()["action"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    };
    let (person, stranger) = ("+46701234001", "+46701234002");
    assert_eq!(ask("ret-1", person).await, "allow");
    app.post_callback(&result_event("ret-1", "SUCCESSFUL"))
        .await;
    // The range is over its limit now: a new number is denied ...
    assert_eq!(ask("ret-2", stranger).await, "deny");
    // ... the person who just verified is let through, and the record says why.
    assert_eq!(ask("ret-3", person).await, "allow");
    let record = app.record("ret-3").await.unwrap();
    let reason = record["decision"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("`busy-range` spared a returning number"),
        "{record}"
    );
    let described = app.get("/v1/policy", Some(API_TOKEN)).await.json();
    assert_eq!(described["rules"][0]["spared"], 1, "{described}");
    let spared = app
        .metric("verigate_returning_spared_total{rule=\"busy-range\"}")
        .await;
    assert_eq!(spared, 1.0);
    // A failure takes it away.
    app.post_callback(&result_event("ret-3", "FAIL")).await;
    assert_eq!(ask("ret-4", person).await, "deny");
}

#[tokio::test]
async fn a_returning_number_is_spared_where_a_new_one_is_denied() {
    returning_numbers_are_spared(spawn_app().await).await;
}

#[tokio::test]
async fn a_returning_number_is_recognised_when_numbers_are_kept_hashed() {
    let app = spawn_app_with(|s| {
        s.store.hash_numbers = true;
        s.store.number_hash_key = Some("a-secret-key-for-hmac-of-numbers".to_owned().into());
    })
    .await;
    returning_numbers_are_spared(app).await;
}

/// `policy replay` gives a candidate that spares returning numbers each number's history
/// as it stood when the request came: a success spares the next request, a failure ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_reads_each_numbers_history_as_it_was_then() {
    let app = spawn_app().await;
    let number = "+46701230001";
    for (i, status) in ["SUCCESSFUL", "FAIL", "SUCCESSFUL"].iter().enumerate() {
        let id = format!("rp-{i}");
        app.set_now(app.now() + chrono::Duration::seconds(30));
        let reply = app.post_callback(&request_event(&id, "sms", number)).await;
        assert_eq!(reply.json()["action"], "allow");
        app.set_now(app.now() + chrono::Duration::seconds(30));
        app.post_callback(&result_event(&id, status)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("candidate.toml");
    std::fs::write(
        &candidate,
        "default = \"allow\"\n[[rule]]\nname = \"no-range\"\naction = \"deny\"\nprefix = [\"+4670123\"]\nspare_returning = true\n",
    )
    .unwrap();
    let (ok, out) = replay_online(&app, &candidate);
    assert!(ok, "{out}");
    // The first is new and the third follows a failure: denied; the second follows a
    // success: spared, so unchanged.
    assert!(
        out.contains("replayed 3 request events: 1 unchanged"),
        "{out}"
    );
    assert!(out.contains("no-range: 2"), "{out}");
}
