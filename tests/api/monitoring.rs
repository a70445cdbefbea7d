//! The dashboard and the alert rules under ops/ against what verigate really serves:
//! every metric they name exists with the type its suffix implies, promtool accepts the
//! rules, and a real Prometheus scrapes the real binary, types its counters and evaluates
//! every alert and every panel without error.
//!
//! promtool and prometheus come from Debian's `prometheus` package (.ci/run installs
//! it). When they are missing these tests fail; set VERIGATE_SKIP_PROMETHEUS=1 to skip
//! them on a machine without it (never under CI=true).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::helpers::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn alerts_path() -> PathBuf {
    Path::new(ROOT).join("ops/prometheus/alerts.yml")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(Path::new(ROOT).join("ops/grafana/verigate.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every PromQL expression of the dashboard's panels.
fn panel_queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                panel["title"].as_str().unwrap().to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

/// A dashboard query as Prometheus itself would get it from Grafana.
fn as_grafana_sends(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$__rate_interval", "1m")
}

/// `verigate_*` names in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("verigate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The full path of `tool`, or None when it is missing and skipping was asked for.
fn required(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        skip_or_fail(
            &format!("{tool} is required (apt-get install prometheus; .ci/run does it)"),
            "VERIGATE_SKIP_PROMETHEUS",
        );
    }
    found
}

#[tokio::test]
async fn metrics_are_openmetrics_and_every_name_the_dashboard_and_alerts_use_exists() {
    let app = spawn_app().await;
    // At noon, whatever the time of day the test runs at: the night below comes after it.
    let day = app
        .now()
        .date_naive()
        .and_hms_opt(12, 0, 0)
        .unwrap()
        .and_utc();
    app.set_now(day);
    // Families with labels show samples once something happened: a little of everything.
    app.post_callback(&request_event("mon-1", "sms", "+46700000001"))
        .await;
    app.post_callback(&result_event("mon-1", "SUCCESSFUL"))
        .await;
    // A night-time flash call: the sample policy's shadow rule `night-voice` matches it.
    let night = day + chrono::Duration::hours(14);
    app.set_now(night);
    app.post_callback(&request_event("mon-3", "flashcall", "+46700000003"))
        .await;
    assert_eq!(
        app.metric("verigate_shadow_matches_total{action=\"deny\",rule=\"night-voice\"}")
            .await,
        1.0
    );
    let unsigned = app
        .client
        .post(app.callback_url())
        .header("content-type", "application/json")
        .body(request_event("mon-2", "sms", "+46700000001"))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401);
    // A returning number spared by a rule that denies its busy range (the next day: a
    // store keeps time moving forward).
    app.set_now(night + chrono::Duration::hours(10));
    let policy = &app.settings.policy.path;
    let sparing = "\n[[rule]]\nname = \"busy-range\"\naction = \"deny\"\nprefix = [\"+4670999\"]\nrate_limit = { key = \"range:3\", max = 1, window = \"1h\" }\nspare_returning = true\n";
    let text = std::fs::read_to_string(policy).unwrap() + sparing;
    std::fs::write(policy, text).unwrap();
    let reloaded = app
        .client
        .post(format!("{}/v1/policy/reload", app.address))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    app.post_callback(&request_event("mon-4", "sms", "+46709990001"))
        .await;
    app.post_callback(&result_event("mon-4", "SUCCESSFUL"))
        .await;
    app.post_callback(&request_event("mon-5", "sms", "+46709990002"))
        .await;
    let spared = app
        .post_callback(&request_event("mon-6", "sms", "+46709990001"))
        .await;
    assert_eq!(spared.json()["action"], "allow");
    let reply = app.get("/metrics", None).await;
    assert_eq!(
        reply.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(reply.text.ends_with("# EOF\n"), "{}", reply.text);
    let types: BTreeMap<&str, &str> = reply
        .text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    assert!(types.len() > 15, "{types:?}");

    let alerts = std::fs::read_to_string(alerts_path()).unwrap();
    let queries: String = panel_queries().into_iter().map(|(_, q)| q + "\n").collect();
    let mut used = metric_names(&alerts);
    used.extend(metric_names(&queries));
    assert!(used.len() > 15, "{used:?}");
    let mut missing = Vec::new();
    for name in &used {
        let (family, want) = [
            ("_total", "counter"),
            ("_bucket", "histogram"),
            ("_count", "histogram"),
            ("_sum", "histogram"),
        ]
        .iter()
        .find_map(|(suffix, kind)| Some((name.strip_suffix(suffix)?, *kind)))
        .unwrap_or((name.as_str(), "gauge"));
        // A family named as such (in a description, say) has any type.
        if types.get(family).copied() != Some(want) && !types.contains_key(name.as_str()) {
            missing.push(format!("{name} (no {want} family {family})"));
        }
    }
    assert!(
        missing.is_empty(),
        "used under ops/ but not in /metrics: {missing:?}"
    );
    // And every family verigate serves is on the dashboard.
    let on_dashboard = metric_names(&queries);
    for family in types.keys() {
        let shown = on_dashboard.iter().any(|n| {
            n == family
                || ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| n.strip_suffix(suffix) == Some(family))
        });
        assert!(shown, "{family} is not on the dashboard");
    }
}

#[tokio::test]
async fn a_request_events_answer_is_timed_by_stage_and_a_repeat_is_only_admitted() {
    let app = spawn_app().await;
    let count =
        |stage: &str| format!("verigate_request_event_stage_seconds_count{{stage=\"{stage}\"}}");
    // Every stage is served from the start, so that a dashboard draws each one.
    let served = app.get("/metrics", None).await.text;
    for stage in ["admit", "decide", "record"] {
        assert!(
            served.contains(&format!("{} 0\n", count(stage))),
            "{stage}: {served}"
        );
    }
    let request = request_event("stages-1", "sms", "+46700000011");
    assert_eq!(app.post_callback(&request).await.status, 200);
    // A result event is no request: it adds to no stage.
    assert_eq!(
        app.post_callback(&result_event("stages-1", "SUCCESSFUL"))
            .await
            .status,
        200
    );
    for stage in ["admit", "decide", "record"] {
        assert_eq!(app.metric(&count(stage)).await, 1.0, "{stage}");
    }
    // Sinch delivering the request again: found among the stored events and answered as
    // the first delivery was, without deciding or writing it again.
    let again = app.post_callback(&request).await;
    assert_eq!(again.status, 200);
    assert_eq!(app.metric(&count("admit")).await, 2.0);
    assert_eq!(app.metric(&count("decide")).await, 1.0);
    assert_eq!(app.metric(&count("record")).await, 1.0);
    // The time is in seconds, and a whole answer took more than nothing.
    let sum =
        |stage: &str| format!("verigate_request_event_stage_seconds_sum{{stage=\"{stage}\"}}");
    let record = app.metric(&sum("record")).await;
    assert!(record > 0.0 && record < 5.0, "{record}");
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let Some(promtool) = required("promtool") else {
        return;
    };
    let out = Command::new(promtool)
        .args(["check", "rules"])
        .arg(alerts_path())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

struct Prometheus {
    child: Child,
    base: String,
    client: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second, with the alert rules loaded.
    fn start(binary: &Path, dir: &Path, target: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: verigate\n    static_configs:\n      - targets: ['{target}']\n",
                alerts_path().display()
            ),
        )
        .unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        }
    }

    /// `data` of an API answer, or None while Prometheus is not up yet.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let reply = self
            .client
            .get(format!("{}{path}", self.base))
            .query(query)
            .send()
            .await
            .ok()?;
        let body: Value = reply.json().await.ok()?;
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        Some(body["data"].clone())
    }

    /// Polls `check` on `path` until it gives a value, for up to 60 s.
    async fn until<T>(&self, path: &str, check: impl FnMut(&Value) -> Option<T>) -> T {
        self.until_query(path, &[], check).await
    }

    /// [`Self::until`] with query parameters.
    async fn until_query<T>(
        &self,
        path: &str,
        query: &[(&str, &str)],
        mut check: impl FnMut(&Value) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(data) = self.api(path, query).await {
                if let Some(found) = check(&data) {
                    return found;
                }
                last = Some(data);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{path} never got there: {last:?}");
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_verigate_and_evaluates_every_alert_and_panel() {
    let Some(prometheus) = required("prometheus") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let binary = RunningBinary::start(&dir, &[]).await;
    binary
        .post_callback(request_event("prom-1", "sms", "+46700000001"))
        .await;
    binary.post_callback(result_event("prom-1", "FAIL")).await;
    let target = binary.base.trim_start_matches("http://").to_owned();
    let scraped = tempfile::tempdir().unwrap();
    let prom = Prometheus::start(&prometheus, scraped.path(), &target);

    prom.until("/api/v1/targets", |data| {
        let target = &data["activeTargets"][0];
        (target["health"] == "up").then_some(())
    })
    .await;
    // Counters typed as counters: what a classic-format reading of OpenMetrics loses.
    let metadata = prom
        .until("/api/v1/metadata", |data| {
            data.get("verigate_callbacks").map(|_| data.clone())
        })
        .await;
    for (family, kind) in [
        ("verigate_callbacks", "counter"),
        ("verigate_decisions", "counter"),
        ("verigate_http_request_duration_seconds", "histogram"),
        ("verigate_store_size_bytes", "gauge"),
    ] {
        assert_eq!(metadata[family][0]["type"], kind, "{family}: {metadata}");
    }
    // The scrape's metadata can show before its samples are queryable: wait for them.
    prom.until_query(
        "/api/v1/query",
        &[("query", "verigate_callbacks_total")],
        |data| {
            data["result"]
                .as_array()
                .filter(|r| !r.is_empty())
                .map(drop)
        },
    )
    .await;

    // Every alert rule evaluated at least once, without error.
    let rules = prom
        .until("/api/v1/rules", |data| {
            let rules: Vec<Value> = data["groups"]
                .as_array()?
                .iter()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let evaluated = !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown");
            evaluated.then_some(rules)
        })
        .await;
    assert_eq!(rules.len(), 17);
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule}");
    }
    // Every panel's query runs.
    for (title, expr) in panel_queries() {
        let query = as_grafana_sends(&expr);
        let reply: Value = prom
            .client
            .get(format!("{}/api/v1/query", prom.base))
            .query(&[("query", query.as_str())])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(reply["status"], "success", "{title}: {query}: {reply}");
    }
    binary.terminate();
}
