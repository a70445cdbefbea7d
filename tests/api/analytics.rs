//! The analytics read path over real HTTP: filters, pagination under writes, export,
//! stats, raw events, retention, hashed numbers, offline export, and tokens.

use std::{collections::HashSet, time::Duration};

use chrono::Utc;
use serde_json::Value;

use crate::helpers::*;

/// Reads every page of a listing; returns the ids in order.
async fn all_ids(app: &TestApp, query: &str, limit: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/verifications?limit={limit}{query}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = app.get(&path, Some(API_TOKEN)).await;
        assert_eq!(page.status, 200, "{path}: {}", page.text);
        let body = page.json();
        ids.extend(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_owned()),
        );
        match body["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return ids,
        }
    }
}

/// Six verifications across countries, methods, rules and outcomes.
async fn seed(app: &TestApp) {
    let cases = [
        ("se-1", "sms", "+46700000001", Some("SUCCESSFUL")),
        ("se-2", "sms", "+46700000002", Some("FAIL")),
        ("se-3", "flashcall", "+46700000001", Some("SUCCESSFUL")),
        ("gb-1", "sms", "+447400123456", None),
        ("us-1", "callout", "+14155552671", Some("SUCCESSFUL")),
        ("pump-1", "sms", "+88212345678", Some("DENIED")),
    ];
    for (id, method, number, status) in cases {
        assert_eq!(
            app.post_callback(&request_event(id, method, number))
                .await
                .status,
            200
        );
        if let Some(status) = status {
            app.post_callback(&result_event(id, status)).await;
        }
    }
}

#[tokio::test]
async fn every_filter_and_their_combinations_select_exactly_the_matching_verifications() {
    let app = spawn_app().await;
    seed(&app).await;
    let cases: &[(&str, &[&str])] = &[
        ("", &["se-1", "se-2", "se-3", "gb-1", "us-1", "pump-1"]),
        ("&number=%2B46700000001", &["se-1", "se-3"]),
        ("&number=+46700000001", &["se-1", "se-3"]), // an unencoded + (a space) is read as +
        ("&reference=ref-gb-1", &["gb-1"]),
        ("&status=SUCCESSFUL", &["se-1", "se-3", "us-1"]),
        ("&status=none", &["gb-1"]),
        ("&method=flashcall", &["se-3"]),
        ("&country=se", &["se-1", "se-2", "se-3"]),
        ("&country=GB", &["gb-1"]),
        ("&country=unknown", &["pump-1"]),
        ("&action=deny", &["pump-1"]),
        ("&rule=high-risk-international-networks", &["pump-1"]),
        ("&rule=default", &["se-1", "se-2", "se-3", "gb-1", "us-1"]),
        ("&country=SE&status=SUCCESSFUL&method=sms", &["se-1"]),
        ("&number=%2B46700000001&method=flashcall", &["se-3"]),
        ("&reference=ref-se-2&status=SUCCESSFUL", &[]),
        ("&action=allow&method=sms&country=SE", &["se-1", "se-2"]),
    ];
    for (query, expected) in cases {
        assert_eq!(all_ids(&app, query, 2).await, *expected, "{query}");
    }
    // Time bounds: everything is after a minute ago and before a minute from now.
    let since = (app.now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let until = (app.now() + chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(
        all_ids(&app, &format!("&since={since}&until={until}"), 100)
            .await
            .len(),
        6
    );
    assert!(all_ids(&app, &format!("&until={since}"), 100)
        .await
        .is_empty());
    assert_eq!(
        all_ids(&app, &format!("&since={since}&country=SE"), 100)
            .await
            .len(),
        3
    );
}

#[tokio::test]
async fn a_cursor_past_the_end_of_the_range_gives_an_empty_page() {
    let app = spawn_app().await;
    seed(&app).await;
    // A cursor from a page of now, asked again with a range that ends before it: the
    // range left is empty, whichever read answers it (by number, a scan, raw events).
    let before = (app.now() - chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for listing in [
        "/v1/verifications?limit=1&number=%2B46700000001",
        "/v1/verifications?limit=1",
        "/v1/events?limit=1",
    ] {
        let first = app.get(listing, Some(API_TOKEN)).await.json();
        let cursor = first["next_cursor"]
            .as_str()
            .unwrap_or_else(|| panic!("{listing}: no cursor in {first}"));
        let path = format!("{listing}&cursor={cursor}&until={before}");
        let page = app.get(&path, Some(API_TOKEN)).await;
        assert_eq!(page.status, 200, "{path}: {}", page.text);
        let body = page.json();
        assert_eq!(body["items"], serde_json::json!([]), "{path}");
        assert!(body["next_cursor"].is_null(), "{path}: {body}");
    }
}

#[tokio::test]
async fn bad_filter_values_are_400_naming_the_parameter() {
    let app = spawn_app().await;
    for (query, name) in [
        ("status=WON", "status"),
        ("limit=1001", "limit"),
        ("since=last-week", "since"),
        ("number=0700", "number"),
        ("country=SWE", "country"),
        ("cursor=garbage", "cursor"),
        ("shoe_size=44", "shoe_size"),
    ] {
        let reply = app
            .get(&format!("/v1/verifications?{query}"), Some(API_TOKEN))
            .await;
        assert_eq!(reply.error_code(), "bad_request", "{query}");
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{name}`")),
            "{query}: {}",
            reply.text
        );
    }
    for (path, name) in [
        ("/v1/export?format=xml", "format"),
        ("/v1/stats?group_by=planet", "group_by"),
        ("/v1/events?limit=-1", "limit"),
    ] {
        let reply = app.get(path, Some(API_TOKEN)).await;
        assert!(
            reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(&format!("`{name}`")),
            "{path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_has_no_duplicates_or_gaps_while_new_events_arrive() {
    let app = spawn_app().await;
    for i in 0..40 {
        app.post_callback(&result_event(&format!("before-{i:02}"), "SUCCESSFUL"))
            .await;
    }
    let writer = {
        let url = app.callback_url();
        let signer = app.signer.clone();
        let client = app.client.clone();
        tokio::spawn(async move {
            for i in 0..60 {
                let body = result_event(&format!("during-{i:02}"), "FAIL");
                let ts = timestamp(Utc::now());
                let mut req = client.post(&url).body(body.clone());
                for (n, v) in
                    signed_headers_at(&signer, body.as_bytes(), "/sinch/verification", &ts)
                {
                    req = req.header(n, v);
                }
                assert_eq!(req.send().await.unwrap().status(), 200);
            }
        })
    };
    let ids = all_ids(&app, "", 3).await;
    writer.await.unwrap();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates across pages");
    for i in 0..40 {
        assert!(
            unique.contains(&format!("before-{i:02}")),
            "before-{i:02} skipped"
        );
    }
    // What arrived during paging comes after what was there, in arrival order.
    let during: Vec<_> = ids
        .iter()
        .filter(|id| id.starts_with("during"))
        .cloned()
        .collect();
    let mut sorted = during.clone();
    sorted.sort();
    assert_eq!(during, sorted);
    assert_eq!(all_ids(&app, "", 1000).await.len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_streams_a_range_larger_than_a_chunk_record_by_record() {
    let app = spawn_app().await;
    let ids: Vec<String> = (0..1100).map(|i| format!("exp-{i:04}")).collect();
    for chunk in ids.chunks(50) {
        futures_util::future::join_all(
            chunk
                .iter()
                .map(|id| app.post_callback_owned(result_event(id, "SUCCESSFUL"))),
        )
        .await;
    }
    let listed: Vec<Value> = {
        let mut all = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = app
                .get(
                    &format!("/v1/verifications?limit=1000{cursor}"),
                    Some(API_TOKEN),
                )
                .await
                .json();
            all.extend(page["items"].as_array().unwrap().iter().cloned());
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break all,
            }
        }
    };
    assert_eq!(listed.len(), 1100);

    let ndjson = app.get("/v1/export?format=ndjson", Some(API_TOKEN)).await;
    assert_eq!(ndjson.status, 200);
    assert!(ndjson.content_type.starts_with("application/x-ndjson"));
    let exported: Vec<Value> = ndjson
        .text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(exported, listed, "export and listing differ");

    let csv = app.get("/v1/export?format=csv", Some(API_TOKEN)).await;
    assert!(csv.content_type.starts_with("text/csv"));
    let mut reader = csv::Reader::from_reader(csv.text.as_bytes());
    let header = reader.headers().unwrap().clone();
    assert_eq!(
        header.iter().collect::<Vec<_>>(),
        verigate::analytics::CSV_COLUMNS
    );
    let rows: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1100);
    for (row, record) in rows.iter().zip(&listed) {
        assert_eq!(&row[0], record["id"].as_str().unwrap());
        assert_eq!(&row[19], record["result"]["status"].as_str().unwrap());
    }
    assert!(csv.text.contains("\r\n"), "RFC 4180 line ends");
}

#[tokio::test]
async fn csv_quotes_fields_that_need_it() {
    let app = spawn_app().await;
    let body =
        request_event("q-1", "sms", "+46700000001").replace("order 42", r#"a, \"quoted\"\nline"#);
    app.post_callback(&body).await;
    let csv = app.get("/v1/export?format=csv", Some(API_TOKEN)).await.text;
    assert!(csv.contains("\"a, \"\"quoted\"\"\nline\""), "{csv}");
    let mut reader = csv::Reader::from_reader(csv.as_bytes());
    assert_eq!(
        &reader.records().next().unwrap().unwrap()[9],
        "a, \"quoted\"\nline"
    );
}

#[tokio::test]
async fn stats_add_up_per_group() {
    let app = spawn_app().await;
    seed(&app).await;
    let all = app.get("/v1/stats", Some(API_TOKEN)).await.json();
    let total = &all["groups"][0];
    assert_eq!(total["verifications"], 6);
    assert_eq!(total["requests"], 6);
    assert_eq!(
        (total["allowed"].as_u64(), total["denied"].as_u64()),
        (Some(5), Some(1))
    );
    assert_eq!(total["successful_allowed"], 3);
    assert_eq!(total["conversion_rate"], 0.6);
    let eur = total["price"]["USD"].as_f64().unwrap();
    assert!((eur - 5.0 * 0.0127).abs() < 1e-9, "{eur}");
    assert_eq!(total["results"]["SUCCESSFUL"], 3);

    let by = app
        .get("/v1/stats?group_by=country,method", Some(API_TOKEN))
        .await
        .json();
    let groups = by["groups"].as_array().unwrap();
    let find = |country: &str, method: &str| {
        groups
            .iter()
            .find(|g| g["group"]["country"] == country && g["group"]["method"] == method)
            .unwrap()
            .clone()
    };
    assert_eq!(find("SE", "sms")["allowed"], 2);
    assert_eq!(find("SE", "sms")["conversion_rate"], 0.5);
    assert_eq!(find("SE", "flashcall")["conversion_rate"], 1.0);
    assert_eq!(find("unknown", "sms")["denied"], 1);
    assert_eq!(find("unknown", "sms")["conversion_rate"], Value::Null);
    assert_eq!(groups.len(), 5);
    let by_rule = app
        .get("/v1/stats?group_by=rule,day", Some(API_TOKEN))
        .await
        .json();
    assert_eq!(by_rule["groups"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_raw_event_log_reads_in_order_with_pagination() {
    let app = spawn_app().await;
    seed(&app).await;
    let first = app.get("/v1/events?limit=4", Some(API_TOKEN)).await.json();
    assert_eq!(first["items"].as_array().unwrap().len(), 4);
    assert_eq!(first["items"][0]["body"]["id"], "se-1");
    assert_eq!(first["items"][0]["event"], "VerificationRequestEvent");
    let cursor = first["next_cursor"].as_str().unwrap();
    let rest = app
        .get(
            &format!("/v1/events?limit=100&cursor={cursor}"),
            Some(API_TOKEN),
        )
        .await
        .json();
    assert_eq!(rest["items"].as_array().unwrap().len(), 11 - 4);
    assert!(rest["next_cursor"].is_null());
    let later = (app.now() + chrono::Duration::minutes(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let none = app
        .get(&format!("/v1/events?since={later}"), Some(API_TOKEN))
        .await
        .json();
    assert!(none["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn retention_deletes_exactly_what_is_due() {
    let app = spawn_app_with(|s| {
        s.store.retention = Duration::from_secs(3600);
        s.store.retention_check_interval = Duration::from_millis(100);
    })
    .await;
    let start = app.now();
    app.post_callback(&request_event("old-1", "sms", "+46700000001"))
        .await;
    app.post_callback(&result_event("old-1", "SUCCESSFUL"))
        .await;
    app.set_now(start + chrono::Duration::minutes(50));
    app.post_callback(&request_event("young-1", "sms", "+46700000001"))
        .await;
    // 70 minutes after the start: old-1 (70 min) is due, young-1 (20 min) is not.
    app.set_now(start + chrono::Duration::minutes(70));
    let mut gone = false;
    for _ in 0..50 {
        if app.record("old-1").await.is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "old-1 was not deleted");
    assert!(app.record("young-1").await.is_some());
    assert_eq!(
        all_ids(&app, "&number=%2B46700000001", 10).await,
        ["young-1"]
    );
    assert_eq!(
        all_ids(&app, "&reference=ref-old-1", 10).await,
        Vec::<String>::new()
    );
    let events = app.get("/v1/events", Some(API_TOKEN)).await.json();
    let ids: Vec<_> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["young-1"]);
    // Its dedup entry went too: a redelivery is a new event again.
    app.set_now(start + chrono::Duration::minutes(70));
    app.post_callback(&request_event("old-1", "sms", "+46700000001"))
        .await;
    assert_eq!(app.record("old-1").await.unwrap()["event_count"], 1);
}

#[tokio::test]
async fn hashed_number_mode_keeps_no_number_yet_finds_it() {
    let key = "a-secret-key-for-hmac-of-numbers";
    let app = spawn_app_with(|s| {
        s.store.hash_numbers = true;
        s.store.number_hash_key = Some(key.to_owned().into());
    })
    .await;
    app.post_callback(&request_event("h-1", "sms", "+46700000001"))
        .await;
    app.post_callback(&result_event("h-1", "SUCCESSFUL")).await;
    app.post_callback(&request_event("h-2", "sms", "+46700000002"))
        .await;

    let record = app.record("h-1").await.unwrap();
    let stored = record["number"].as_str().unwrap();
    assert!(stored.starts_with("hmac-sha256:"), "{stored}");
    assert_eq!(record["country"], "SE");
    assert_eq!(record["prefix"], "+46700");
    assert_eq!(all_ids(&app, "&number=%2B46700000001", 10).await, ["h-1"]);
    let events = app.get("/v1/events", Some(API_TOKEN)).await.text;
    let export = app.get("/v1/export?format=csv", Some(API_TOKEN)).await.text;
    for text in [&events, &export] {
        assert!(
            !text.contains("46700000001") && !text.contains("46700000002"),
            "{text}"
        );
    }
    assert!(events.contains(stored));

    // Nothing on disk holds the number either.
    let (_, dir, _) = app.stop().await;
    for file in walk(dir.path()) {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(11).any(|w| w == b"46700000001"),
            "{} holds the number",
            file.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

#[tokio::test]
async fn no_read_endpoint_answers_without_a_token_and_the_read_token_reads() {
    let read_token = "read-only-token-0123456789";
    let app = spawn_app_with(|s| s.api.read_token = Some(read_token.to_owned().into())).await;
    seed(&app).await;
    for path in [
        "/v1/verifications",
        "/v1/verifications/se-1",
        "/v1/export",
        "/v1/stats",
        "/v1/events",
    ] {
        assert_eq!(
            app.get(path, None).await.error_code(),
            "missing_token",
            "{path}"
        );
        assert_eq!(
            app.get(path, Some("not-the-token-at-all"))
                .await
                .error_code(),
            "invalid_token",
            "{path}"
        );
        assert_eq!(app.get(path, Some(read_token)).await.status, 200, "{path}");
        assert_eq!(app.get(path, Some(API_TOKEN)).await.status, 200, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_command_reads_a_stopped_store() {
    let app = spawn_app().await;
    seed(&app).await;
    let (settings, dir, _) = app.stop().await;
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_verigate"))
            .args(["export", "--since", "1h", "--format", "csv"])
            .env("VERIGATE__STORE__PATH", &settings.store.path)
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(csv.lines().count(), 7, "{csv}");
    assert!(csv.starts_with("id,first_seen"));
    drop(dir);
}

#[tokio::test]
async fn one_verifications_callbacks_are_served_as_received_in_order() {
    let app = spawn_app().await;
    let request = request_event("story-1", "sms", "+46701234567");
    assert_eq!(app.post_callback(&request).await.status, 200);
    app.post_callback(&request_event("story-2", "sms", "+46701234568"))
        .await;
    app.post_callback(&sms_delivered_event("story-1")).await;
    let result = result_event("story-1", "SUCCESSFUL");
    app.post_callback(&result).await;
    // Sinch retrying the result is not another callback of the verification.
    app.post_callback(&result).await;

    let reply = app
        .get("/v1/verifications/story-1/events", Some(API_TOKEN))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(
        (body["complete"].as_bool(), body["event_count"].as_u64()),
        (Some(true), Some(3))
    );
    let events = body["events"].as_array().unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "VerificationRequestEvent",
            "VerificationSmsDeliveredEvent",
            "VerificationResultEvent"
        ]
    );
    let sent: Value = serde_json::from_str(&request).unwrap();
    assert_eq!(events[0]["body"], sent);
    assert!(events.iter().all(|e| e["id"] == "story-1"));

    let missing = app
        .get("/v1/verifications/nobody/events", Some(API_TOKEN))
        .await;
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "not_found")
    );
    let anonymous = app.get("/v1/verifications/story-1/events", None).await;
    assert_eq!(anonymous.status, 401);
}
