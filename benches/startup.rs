//! How long a restart keeps Sinch waiting: the release binary started on a store of
//! 1,000,000 verifications (`VERIGATE_BENCH_RECORDS` to change) spread over the last ten
//! days (`VERIGATE_BENCH_SPAN_HOURS`), with the sample policy, which relearns the last
//! six hours. Measured from spawn to the first 200 from /readyz (store open, policy
//! loaded, saved quarantines back), next to the same binary on an empty store in the same
//! run, after a clean stop and after kill -9; and to the end of relearning, which
//! adaptive rules do in the background once ready.
//!
//! `cargo bench --bench startup`. Loads a fresh store each run into
//! `target/bench-startup-<N>/` (the records must be recent for relearning to count).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::Utc;
use verigate::{
    client::{signed_headers, sinch_timestamp},
    signature::AppCredentials,
    store::{Store, StoreOptions, Unobserved},
};

#[path = "common/corpus.rs"]
mod corpus;

const RUNS: usize = 5;
/// Events posted before each kill -9: about one checkpoint's worth.
const KILLED_WITH: u64 = 8_000;
const SECRET: &str = "BeIukql3pTKJ8RGL5zo0DA==";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(store: &Path, port: u16) -> Child {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Command::new(env!("CARGO_BIN_EXE_verigate"))
        .env("VERIGATE__SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("VERIGATE__STORE__PATH", store)
        .env("VERIGATE__POLICY__PATH", root.join("config/policy.toml"))
        .env("VERIGATE_APP_KEY", "bench")
        .env("VERIGATE_APP_SECRET", SECRET)
        .env("VERIGATE__LOG__LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Status and body of GET `path`, or None while nothing listens.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).ok()?;
    let status = reply.get(9..12)?.parse().ok()?;
    Some((status, reply))
}

/// Seconds from spawn to listening (/readyz answers), to ready (/readyz 200), and to
/// relearned (adaptive rules done replaying the store's history, in the background).
fn time_start(store: &Path) -> ([f64; 3], Child, u16) {
    let port = free_port();
    let started = Instant::now();
    let child = spawn(store, port);
    (time_readiness(port, started), child, port)
}

fn time_readiness(port: u16, started: Instant) -> [f64; 3] {
    let (mut listening, mut ready) = (None, None);
    loop {
        let at = started.elapsed().as_secs_f64();
        match get(port, "/readyz") {
            Some((200, body)) => {
                let ready = *ready.get_or_insert(at);
                if body.contains("\"relearning\":false") {
                    return [listening.unwrap_or(ready), ready, at];
                }
            }
            Some(_) if listening.is_none() => listening = Some(at),
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never ready");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn stop(mut child: Child, kill: bool) {
    let signal = if kill { "-KILL" } else { "-TERM" };
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
}

/// Posts `n` signed request events, 32 at a time, so that a kill leaves them in the
/// write-ahead log for the next start to replay.
async fn post_events(port: u16, n: u64, round: u64) {
    let app = AppCredentials::new("bench", SECRET, false).unwrap();
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/sinch/verification");
    let tasks: Vec<_> = (0..32)
        .map(|t| {
            let (app, client, url) = (app.clone(), client.clone(), url.clone());
            tokio::spawn(async move {
                for i in (t..n).step_by(32) {
                    let body = corpus::request(10_000_000 * (round + 1) + i).replace("v-", "k-");
                    let ts = sinch_timestamp(Utc::now());
                    let headers = signed_headers(
                        &app,
                        "/sinch/verification",
                        body.as_bytes(),
                        "application/json",
                        &ts,
                    );
                    let mut request = client.post(&url).body(body);
                    for (name, value) in headers {
                        request = request.header(name, value);
                    }
                    assert_eq!(request.send().await.unwrap().status(), 200);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Median and worst of RUNS starts (listening, ready, relearned), each after a clean
/// stop, or after a kill -9 that left KILLED_WITH events to replay.
async fn measure(store: &Path, kill: bool) -> [[f64; 2]; 3] {
    let mut times: [Vec<f64>; 3] = Default::default();
    for round in 0..=RUNS as u64 {
        let (took, child, port) = time_start(store);
        // The first start follows the load (or the previous case), not a kill.
        if round > 0 || !kill {
            for (all, t) in times.iter_mut().zip(took) {
                all.push(t * 1e3);
            }
        }
        if kill {
            post_events(port, KILLED_WITH, round).await;
        }
        stop(child, kill);
        if !kill && times[0].len() == RUNS {
            break;
        }
    }
    times.map(|mut all| {
        all.sort_by(f64::total_cmp);
        [all[RUNS / 2], all[RUNS - 1]]
    })
}

fn report(label: &str, [listening, ready, relearned]: [[f64; 2]; 3], baseline: f64) {
    println!(
        "{label:<38} listening {:>4.0} ms (max {:>4.0})  ready {:>4.0} ms (max {:>4.0}, {:.2}x the empty store)  relearned {:>4.0} ms (max {:>4.0})",
        listening[0], listening[1], ready[0], ready[1], ready[0] / baseline, relearned[0], relearned[1],
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = corpus::knob("VERIGATE_BENCH_RECORDS", 1_000_000);
    let span_hours: i64 = corpus::knob("VERIGATE_BENCH_SPAN_HOURS", 240);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-startup-{n}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (empty, full) = (dir.join("empty"), dir.join("full"));

    let span = chrono::Duration::hours(span_hours);
    let store = Store::open(&StoreOptions::at(full.clone()), Arc::new(Unobserved)).unwrap();
    corpus::load(&store, n, Utc::now() - span, span).await;
    store.shutdown().await.unwrap();
    drop(store);
    let in_lookback = n as f64 * (6.05 / span_hours as f64).min(1.0);
    println!(
        "{n} verifications over the last {span_hours} h (~{in_lookback:.0} within the sample policy's 6 h lookback)"
    );

    let baseline = measure(&empty, false).await;
    let empty_ready = baseline[1][0];
    report("empty store, clean stop", baseline, empty_ready);
    report(
        "full store, clean stop",
        measure(&full, false).await,
        empty_ready,
    );
    report(
        &format!("full store, kill -9 after {KILLED_WITH} events"),
        measure(&full, true).await,
        empty_ready,
    );
}
