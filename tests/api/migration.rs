//! A store written by verigate 0.1 (tests/fixtures/store-v1): refused until migrated,
//! migrated in place by the real binary, and then answering exactly as 0.1 did.

use std::{collections::HashMap, path::Path, process::Command};

use serde_json::Value;

use crate::helpers::*;

/// Unpacks the 0.1 store into `dir/db`, where `test_env` points the store.
fn unpack_v1_store(dir: &Path) {
    let db = dir.join("db");
    std::fs::create_dir_all(&db).unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1/store-v1.tar.gz");
    let unpacked = Command::new("tar")
        .arg("xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(&db)
        .status()
        .unwrap();
    assert!(unpacked.success());
}

fn migrate(dir: &tempfile::TempDir) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_verigate"))
        .args(["store", "migrate"])
        .envs(test_env(dir))
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn export(app: &TestApp) -> Vec<Value> {
    app.get("/v1/export", Some(API_TOKEN))
        .await
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_written_by_0_1_is_refused_until_migrated_and_then_answers_as_before() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    unpack_v1_store(dir.path());

    // Refused, with the command that fixes it; Sinch still gets answers meanwhile.
    let settings = test_settings(&dir, &[]);
    let app =
        verigate::startup::Application::build(&settings, verigate::clock::Clock::system()).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let running = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let mut why = String::new();
    for _ in 0..50 {
        let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
        assert_eq!(ready.status(), 503);
        why = ready.json::<Value>().await.unwrap()["checks"]["store"]
            .as_str()
            .unwrap()
            .to_owned();
        if why.contains("verigate store migrate") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(why.contains("verigate store migrate"), "{why}");
    let signer = verigate::signature::AppCredentials::new(APP_KEY, APP_SECRET, false).unwrap();
    let post = |body: String| {
        let ts = timestamp(chrono::Utc::now());
        let mut req = client.post(format!("{base}/sinch/verification"));
        for (n, v) in signed_headers_at(&signer, body.as_bytes(), "/sinch/verification", &ts) {
            req = req.header(n, v);
        }
        req.body(body).send()
    };
    let request = post(request_event("early", "sms", "+46700000001"))
        .await
        .unwrap();
    assert_eq!(request.status(), 200);
    assert_eq!(request.json::<Value>().await.unwrap()["action"], "deny");
    let result = post(result_event("early", "FAIL")).await.unwrap();
    assert_eq!(result.status(), 503);
    handle.stop(true).await;
    running.await.unwrap().unwrap();

    let (ok, progress) = migrate(&dir);
    assert!(ok, "{progress}");
    assert!(progress.contains("verifications: 28 of 28"), "{progress}");
    assert!(progress.contains("raw events: 51 of 51"), "{progress}");
    assert!(
        !dir.path().join("db/conf").exists(),
        "the old files stay: {progress}"
    );
    let (ok, again) = migrate(&dir);
    assert!(ok && again.contains("nothing to do"), "{again}");

    let app = spawn_configured_app(settings, std::sync::Arc::clone(&dir)).await;
    // Every record and every raw event reads back as 0.1 wrote it.
    let before: Vec<Value> = fixture("store-v1/export-v1.ndjson")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(export(&app).await, before);
    let events_before: Value = serde_json::from_str(&fixture("store-v1/events-v1.json")).unwrap();
    let events_now = app
        .get("/v1/events?limit=1000", Some(API_TOKEN))
        .await
        .json();
    assert_eq!(events_now["items"], events_before["items"]);

    // Duplicates are still recognised, with the answer given then.
    let seen = app
        .post_callback(&request_event(
            "v1-fixture-001",
            "flashcall",
            "+46701007919",
        ))
        .await;
    assert_eq!(
        seen.json(),
        serde_json::json!({"action": "allow", "flashCall": {"dialTimeout": 10}})
    );
    let by_id: HashMap<String, Value> = before
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_owned(), r.clone()))
        .collect();
    assert_eq!(
        app.record("v1-fixture-001").await.unwrap(),
        by_id["v1-fixture-001"]
    );
    // New verifications come after the old ones.
    let fresh = app
        .post_callback(&request_event("after-migration", "sms", "+46700000042"))
        .await;
    assert_eq!(fresh.status, 200);
    let newest = app.record("after-migration").await.unwrap();
    let oldest_max = before
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    assert!(newest["seq"].as_u64().unwrap() > oldest_max);
    let numbered = app
        .get("/v1/verifications?number=%2B46701039595", Some(API_TOKEN))
        .await
        .json();
    assert_eq!(numbered["items"][0]["id"], "v1-fixture-005");
}
