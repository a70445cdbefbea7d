use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use actix_web::dev::ServerHandle;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use tempfile::TempDir;
use verigate::{
    clock::Clock,
    config::{AppSettings, Settings},
    policy::Policy,
    signature::AppCredentials,
    startup::Application,
};

pub const APP_KEY: &str = "5F5C418A-0F91-4BBC-8234-A9BF5EDDAD97";
pub const APP_SECRET: &str = "JViE5vDor0Sw3WllZka15Q==";
pub const API_TOKEN: &str = "test-api-token-0123456789";
pub const JSON: &str = "application/json; charset=utf-8";

/// Polls `done` every 100 ms until it holds; fails after 15 s. For what happens in the
/// background (a sync, a recovery): the test asserts that it happens, not how fast.
pub async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !done().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Silent unless TEST_LOG is set, so failures are readable.
fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = verigate::telemetry::init(verigate::telemetry::subscriber(
                "info",
                verigate::config::LogFormat::Pretty,
                false,
                std::io::stdout,
            ));
        }
    });
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub signer: AppCredentials,
    now: Arc<Mutex<DateTime<Utc>>>,
    handle: ServerHandle,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
    // Kept last so the folder outlives the server.
    pub data_dir: Arc<TempDir>,
}

/// The environment an operator would set for a fresh folder (also used for the binary).
pub fn test_env(data_dir: &TempDir) -> Vec<(String, String)> {
    let policy = data_dir.path().join("policy.toml");
    if !policy.exists() {
        std::fs::create_dir_all(data_dir.path().join("lists")).unwrap();
        std::fs::write(
            data_dir.path().join("lists/high-risk-prefixes.txt"),
            include_str!("../../config/lists/high-risk-prefixes.txt"),
        )
        .unwrap();
        std::fs::write(&policy, include_str!("../../config/policy.toml")).unwrap();
    }
    [
        ("VERIGATE__SERVER__LISTEN", "127.0.0.1:0".to_string()),
        ("VERIGATE__SERVER__WORKERS", "2".to_string()),
        ("VERIGATE__SERVER__SHUTDOWN_TIMEOUT", "5".to_string()),
        (
            "VERIGATE__STORE__PATH",
            data_dir.path().join("db").display().to_string(),
        ),
        ("VERIGATE__POLICY__PATH", policy.display().to_string()),
        ("VERIGATE__API__TOKEN", API_TOKEN.to_string()),
        ("VERIGATE_APP_KEY", APP_KEY.to_string()),
        ("VERIGATE_APP_SECRET", APP_SECRET.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Settings from [`test_env`] plus `extra_env`.
pub fn test_settings(data_dir: &TempDir, extra_env: &[(&str, &str)]) -> Settings {
    let mut env: HashMap<String, String> = test_env(data_dir).into_iter().collect();
    for (k, v) in extra_env {
        env.insert(k.to_string(), v.to_string());
    }
    Settings::load_from(None, env).unwrap()
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(customise: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut settings = test_settings(&dir, &[]);
    customise(&mut settings);
    start(settings, dir, Arc::new(Mutex::new(Utc::now()))).await
}

/// The service started without waiting for it to be ready (its store may not open):
/// its base URL, a handle to stop it and its task.
pub fn start_unready(
    settings: &Settings,
) -> (
    String,
    ServerHandle,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let app = Application::build(settings, Clock::system()).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    (base, handle, tokio::spawn(app.run_until_stopped()))
}

/// The service with these settings on this folder (the rules policy).
pub async fn spawn_configured_app(settings: Settings, dir: Arc<TempDir>) -> TestApp {
    start(settings, dir, Arc::new(Mutex::new(Utc::now()))).await
}

/// The service with these settings and another decision engine.
pub async fn spawn_configured_app_with_policy(
    settings: Settings,
    dir: Arc<TempDir>,
    policy: Arc<dyn Policy>,
) -> TestApp {
    start_with(
        settings,
        dir,
        Arc::new(Mutex::new(Utc::now())),
        Some(policy),
    )
    .await
}

/// The service with another decision engine plugged in instead of the rules file.
pub async fn spawn_app_with_policy(policy: Arc<dyn Policy>) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let settings = test_settings(&dir, &[]);
    spawn_configured_app_with_policy(settings, dir, policy).await
}

async fn start(
    settings: Settings,
    data_dir: Arc<TempDir>,
    now: Arc<Mutex<DateTime<Utc>>>,
) -> TestApp {
    start_with(settings, data_dir, now, None).await
}

async fn start_with(
    settings: Settings,
    data_dir: Arc<TempDir>,
    now: Arc<Mutex<DateTime<Utc>>>,
    policy: Option<Arc<dyn Policy>>,
) -> TestApp {
    init_tracing();
    let clock_now = Arc::clone(&now);
    let clock = Clock::from_fn(move || *clock_now.lock().unwrap());
    let app = match &policy {
        Some(policy) => Application::build_with_policy(&settings, clock, Arc::clone(policy)),
        None => Application::build(&settings, clock),
    }
    .unwrap_or_else(|e| panic!("the app did not start: {e:?}"));
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let running = tokio::spawn(app.run_until_stopped());
    let signer = AppCredentials::new(APP_KEY, APP_SECRET, false).unwrap();
    let app = TestApp {
        address,
        client: reqwest::Client::new(),
        settings,
        signer,
        now,
        handle,
        running,
        data_dir,
    };
    app.wait_until_ready().await;
    app
}

pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?} (status {})", self.text, self.status))
    }

    /// The `code` of a JSON error body, checking the shape on the way.
    pub fn error_code(&self) -> String {
        assert!(
            self.content_type.starts_with("application/json"),
            "{}: {}",
            self.content_type,
            self.text
        );
        let body = self.json();
        assert!(body["error"]["message"].is_string(), "{body}");
        body["error"]["code"].as_str().unwrap().to_owned()
    }
}

pub async fn reply(response: reqwest::Response) -> Reply {
    Reply {
        status: response.status().as_u16(),
        content_type: response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default(),
        text: response.text().await.unwrap(),
    }
}

/// The reply to `method`, checked against docs/openapi.json when it is an API route's.
pub async fn checked_reply(method: &reqwest::Method, response: reqwest::Response) -> Reply {
    let url = response.url().to_string();
    let reply = reply(response).await;
    crate::contract::check(
        method.as_str(),
        &url,
        reply.status,
        &reply.content_type,
        &reply.text,
    );
    reply
}

/// `method path` on the service at `base`, with `token` as the bearer.
pub async fn api_call(
    client: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
) -> Reply {
    let request = client
        .request(method.clone(), format!("{base}{path}"))
        .bearer_auth(token);
    checked_reply(&method, request.send().await.unwrap()).await
}

pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

impl TestApp {
    /// Waits for the store to open (a restarted app may wait for the old one's lock)
    /// and for adaptive rules to have relearned from it.
    pub async fn wait_until_ready(&self) {
        for _ in 0..100 {
            let ready = self.get("/readyz", None).await;
            if ready.status == 200 && ready.json()["relearning"] == false {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "not ready after 10 s: {}",
            self.get("/readyz", None).await.text
        );
    }

    pub fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap()
    }

    pub fn set_now(&self, at: DateTime<Utc>) {
        *self.now.lock().unwrap() = at;
    }

    pub fn callback_url(&self) -> String {
        format!("{}{}", self.address, self.settings.server.callback_path)
    }

    /// The headers Sinch would send for `body`, signed over `path` at the app's clock.
    pub fn signed_headers(
        &self,
        signer: &AppCredentials,
        body: &[u8],
        path: &str,
    ) -> Vec<(String, String)> {
        signed_headers_at(signer, body, path, &timestamp(self.now()))
    }

    /// Posts a correctly signed callback.
    pub async fn post_callback(&self, body: &str) -> Reply {
        let headers = self.signed_headers(
            &self.signer,
            body.as_bytes(),
            &self.settings.server.callback_path,
        );
        self.post_raw(&self.callback_url(), &headers, body.as_bytes().to_vec())
            .await
    }

    /// Like `post_callback`, for callers that build bodies on the fly.
    pub async fn post_callback_owned(&self, body: String) -> Reply {
        self.post_callback(&body).await
    }

    /// Posts with exactly these headers and body bytes.
    pub async fn post_raw(&self, url: &str, headers: &[(String, String)], body: Vec<u8>) -> Reply {
        let mut request = self.client.post(url).body(body);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        reply(request.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut request = self.client.get(format!("{}{path}", self.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        checked_reply(&reqwest::Method::GET, request.send().await.unwrap()).await
    }

    /// The stored record of a verification, or `None` on 404.
    pub async fn record(&self, id: &str) -> Option<Value> {
        let reply = self
            .get(&format!("/v1/verifications/{id}"), Some(API_TOKEN))
            .await;
        match reply.status {
            200 => Some(reply.json()),
            404 => None,
            other => panic!("GET record answered {other}: {}", reply.text),
        }
    }

    /// The value of one Prometheus sample, 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let text = self.get("/metrics", None).await.text;
        text.lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    /// Stops the server gracefully and waits for the store to be flushed.
    pub async fn stop(self) -> (Settings, Arc<TempDir>, Arc<Mutex<DateTime<Utc>>>) {
        self.handle.stop(true).await;
        self.running.await.unwrap().unwrap();
        (self.settings, self.data_dir, self.now)
    }

    /// Stops and starts again on the same data folder, with the same settings.
    pub async fn restart(self) -> TestApp {
        let (settings, dir, now) = self.stop().await;
        start(settings, dir, now).await
    }

    /// Stops and starts again on the same folder with changed settings.
    pub async fn restart_with(self, customise: impl FnOnce(&mut Settings)) -> TestApp {
        let (mut settings, dir, now) = self.stop().await;
        customise(&mut settings);
        start(settings, dir, now).await
    }
}

/// Sinch's headers for `body` with any `x-timestamp` value, even one that is not a time.
pub fn signed_headers_at(
    signer: &AppCredentials,
    body: &[u8],
    path: &str,
    ts: &str,
) -> Vec<(String, String)> {
    verigate::client::signed_headers(signer, path, body, JSON, ts)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
}

pub fn extra_app(key: &str, secret: &str) -> AppSettings {
    serde_json::from_value(serde_json::json!({ "key": key, "secret": secret })).unwrap()
}

pub fn request_event(id: &str, method: &str, number: &str) -> String {
    serde_json::json!({
        "id": id,
        "event": "VerificationRequestEvent",
        "method": method,
        "identity": { "type": "number", "endpoint": number },
        "price": { "amount": 0.0127, "currencyId": "USD" },
        "reference": format!("ref-{id}"),
        "custom": "order 42"
    })
    .to_string()
}

pub fn result_event(id: &str, status: &str) -> String {
    serde_json::json!({
        "id": id,
        "event": "VerificationResultEvent",
        "method": "sms",
        "identity": { "type": "number", "endpoint": "+46700000001" },
        "status": status,
        "reason": if status == "SUCCESSFUL" { Value::Null } else { Value::from("Expired") },
        "source": "manual"
    })
    .to_string()
}

pub fn sms_delivered_event(id: &str) -> String {
    serde_json::json!({
        "id": id,
        "event": "VerificationSmsDeliveredEvent",
        "method": "sms",
        "identity": { "type": "number", "endpoint": "+46700000001" },
        "smsResult": "Successful"
    })
    .to_string()
}

pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// The real `verigate` binary as a child process, JSON logs captured.
/// Posts signed callbacks to a running binary; cheap to clone into tasks.
#[derive(Clone)]
pub struct CallbackSender {
    client: reqwest::Client,
    url: String,
    signer: AppCredentials,
}

impl CallbackSender {
    /// Returns the status; a connection failure (the process is gone) is an error.
    pub async fn try_post(&self, body: String) -> Result<u16, reqwest::Error> {
        Ok(self.signed(body).send().await?.status().as_u16())
    }

    /// A POST of `body` signed as Sinch signs it, now.
    fn signed(&self, body: String) -> reqwest::RequestBuilder {
        let ts = timestamp(Utc::now());
        let mut request = self.client.post(&self.url);
        for (name, value) in
            signed_headers_at(&self.signer, body.as_bytes(), "/sinch/verification", &ts)
        {
            request = request.header(name, value);
        }
        request.body(body)
    }

    /// Posts and returns the status and the JSON body.
    pub async fn post(&self, body: String) -> (u16, Value) {
        let reply = self.signed(body).send().await.unwrap();
        let status = reply.status().as_u16();
        (status, reply.json().await.unwrap())
    }
}

pub struct RunningBinary {
    child: std::process::Child,
    pub base: String,
    pub client: reqwest::Client,
    signer: AppCredentials,
    log: std::sync::mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    early_lines: Vec<String>,
}

impl RunningBinary {
    /// Starts the binary on `dir` and waits until it is ready.
    pub async fn start(dir: &TempDir, extra_env: &[(&str, &str)]) -> Self {
        let binary = Self::launch(dir, extra_env);
        binary.wait_ready().await;
        binary
    }

    /// Starts the binary on `dir` and returns once it listens (ready or not).
    pub fn launch(dir: &TempDir, extra_env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_verigate"))
            .envs(test_env(dir))
            .env("VERIGATE__LOG__FORMAT", "json")
            .envs(extra_env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, log) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .for_each(|line| drop(tx.send(line)))
        });
        let mut early_lines = Vec::new();
        let port = loop {
            let line = log
                .recv_timeout(Duration::from_secs(20))
                .expect("verigate never said it listens");
            early_lines.push(line.clone());
            if line.contains("verigate listening") {
                break serde_json::from_str::<Value>(&line).unwrap()["port"]
                    .as_u64()
                    .unwrap();
            }
        };
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            signer: AppCredentials::new(APP_KEY, APP_SECRET, false).unwrap(),
            log,
            reader: Some(reader),
            early_lines,
        }
    }

    /// GET /v1/verifications/{id} with the admin token: the status and the body.
    pub async fn record(&self, id: &str) -> (u16, Value) {
        let reply = self
            .client
            .get(format!("{}/v1/verifications/{id}", self.base))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        let reply = checked_reply(&reqwest::Method::GET, reply).await;
        (reply.status, reply.json())
    }

    /// GET /readyz: the status and the body.
    pub async fn readiness(&self) -> (u16, Value) {
        let reply = self
            .client
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .unwrap();
        let status = reply.status().as_u16();
        (status, reply.json().await.unwrap())
    }

    /// Waits (up to 10 s) until /readyz says ready and relearning is over.
    pub async fn wait_ready(&self) {
        for _ in 0..100 {
            let (status, body) = self.readiness().await;
            if status == 200 && body["relearning"] == false {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "verigate did not become ready: {:?}",
            self.readiness().await
        );
    }

    /// Posts a correctly signed callback; returns the status.
    pub async fn post_callback(&self, body: String) -> u16 {
        self.sender().try_post(body).await.unwrap()
    }

    /// A handle that posts signed callbacks to this process from any task.
    pub fn sender(&self) -> CallbackSender {
        CallbackSender {
            client: self.client.clone(),
            url: format!("{}/sinch/verification", self.base),
            signer: self.signer.clone(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to flush anything on the way out.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Waits up to `within` for a log line containing `needle` (kept for `terminate`).
    pub fn wait_for_line(&mut self, needle: &str, within: Duration) -> Option<String> {
        if let Some(line) = self.early_lines.iter().find(|l| l.contains(needle)) {
            return Some(line.clone());
        }
        let deadline = std::time::Instant::now() + within;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let Ok(line) = self.log.recv_timeout(left) else {
                break;
            };
            self.early_lines.push(line.clone());
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    }

    /// SIGTERM, wait for a clean exit, and return every log line it wrote.
    pub fn terminate(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "unclean exit after SIGTERM"
        );
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.early_lines.extend(self.log.try_iter());
        std::mem::take(&mut self.early_lines)
    }
}

impl Drop for RunningBinary {
    /// A test that failed half-way leaves no process behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// For a test that needs a part of the machine that is missing (root, a tool): returns
/// (and the test skips) only when `skip_var=1` asks for it outside CI; fails otherwise,
/// so a test never passes without having run.
pub fn skip_or_fail(missing: &str, skip_var: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !ci && std::env::var(skip_var).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED on request ({skip_var}=1): {missing}");
        return;
    }
    panic!("{missing}. Set {skip_var}=1 to skip this test on purpose (never under CI=true).");
}
