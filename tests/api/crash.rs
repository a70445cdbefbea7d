//! A 2xx means "on disk": the real binary is killed with SIGKILL right after answering,
//! with no chance to flush on the way out, and every acknowledged event must be there.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::Arc,
};

use crate::helpers::*;

#[tokio::test]
async fn events_acknowledged_before_a_kill_9_are_all_on_disk() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_verigate"))
        .envs(test_env(&dir))
        .env("VERIGATE__LOG__FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("verigate exited before listening")
            .unwrap();
        if line.contains("verigate listening") {
            let log: serde_json::Value = serde_json::from_str(&line).unwrap();
            break log["fields"]["port"].as_u64().unwrap();
        }
    };
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));

    let app = RemoteSender::new(port);
    let ids: Vec<String> = (0..200).map(|i| format!("crash-{i}")).collect();
    let mut acknowledged = Vec::new();
    for chunk in ids.chunks(20) {
        let replies = futures_util::future::join_all(chunk.iter().map(|id| {
            let body = if id.ends_with('0') {
                request_event(id, "sms", "+46700000001")
            } else {
                result_event(id, "SUCCESSFUL")
            };
            app.post(body)
        }))
        .await;
        for (id, status) in chunk.iter().zip(replies) {
            if status == 200 {
                acknowledged.push(id.clone());
            }
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(acknowledged.len(), ids.len());

    let app = spawn_app_on(dir).await;
    for id in &acknowledged {
        assert!(
            app.record(id).await.is_some(),
            "{id} was acknowledged but lost"
        );
    }
}

/// Signs and posts callbacks to a server this test did not start in-process.
struct RemoteSender {
    url: String,
    client: reqwest::Client,
    signer: verigate::signature::AppCredentials,
}

impl RemoteSender {
    fn new(port: u64) -> Self {
        Self {
            url: format!("http://127.0.0.1:{port}/sinch/verification"),
            client: reqwest::Client::new(),
            signer: verigate::signature::AppCredentials::new(APP_KEY, APP_SECRET, false).unwrap(),
        }
    }

    async fn post(&self, body: String) -> u16 {
        let mut request = self.client.post(&self.url);
        let ts = timestamp(chrono::Utc::now());
        for (name, value) in
            signed_headers_at(&self.signer, body.as_bytes(), "/sinch/verification", &ts)
        {
            request = request.header(name, value);
        }
        request.body(body).send().await.unwrap().status().as_u16()
    }
}
