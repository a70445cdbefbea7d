//! Load benchmark: verigate against a bare actix-web server, driven by one client in one
//! run.
//!
//! `cargo bench --bench load` starts the real verigate binary on loopback (temp store,
//! durable acks, the shipped sample policy, default logging) and a bare actix-web server
//! that answers the same POST with 200 and does nothing else. The same keep-alive client
//! sends both the same freshly signed, unique callbacks: request events for every method,
//! SMS-delivered events and result events. It prints requests/s, latency percentiles, the
//! ratio verigate / bare, verigate's peak RSS and its store size per million events, and
//! where request events spent their time (the mean of each stage of
//! `verigate_request_event_stage_seconds`: admit, decide, record).
//!
//! Knobs (environment): LOAD_CALLBACKS (default 60000), LOAD_CONCURRENCY (comma-separated
//! list, default "32,64"), LOAD_SERVER_WORKERS (default 0: each server's own default),
//! LOAD_LOG_LEVEL (verigate's log level, default info), LOAD_LOG_FORMAT (pretty, the
//! service's default, or json), LOAD_ONLY=verigate (skip the bare
//! server, e.g. while profiling), LOAD_KEEP_STORE=DIR (keep each run's store there),
//! LOAD_POLICY=FILE (another policy than the sample, e.g. to see what its rules cost),
//! LOAD_BINARY=FILE (another build of verigate, e.g. to compare two builds in turns),
//! LOAD_REPLICAS=1,2,3 (also run that many verigate replicas on one PostgreSQL database,
//! started by tests/support/postgres.sh, with the connections spread over them). For
//! those it also prints the `on_error` answers the replicas gave (and how many of them
//! for the decision deadline), and what a callback cost: CPU in verigate and in the
//! PostgreSQL server, WAL bytes and WAL syncs (from `pg_stat_wal`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::BufRead,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use chrono::Utc;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use verigate::{
    client::{sample_body, signed_headers, sinch_timestamp, Sample, SampleKind, CONTENT_TYPE},
    signature::AppCredentials,
};

const ROLE: &str = "VERIGATE_LOAD_ROLE";
const APP_KEY: &str = "5F5C418A-0F8D-4E8B-8B3C-1F5E6B7A9C10";
const APP_SECRET: &str = "JL5OnlS2GkS7Jm8HKB4mLw==";
const PATH: &str = "/sinch/verification";
const METHODS: [&str; 5] = ["sms", "flashcall", "callout", "seamless", "whatsapp"];
/// Countries with plausible mobile number shapes: (prefix, digits after it).
const NUMBERING: [(&str, u32); 8] = [
    ("+4670", 7),
    ("+4915", 8),
    ("+447", 9),
    ("+3361", 7),
    ("+1415", 7),
    ("+3934", 7),
    ("+91981", 5),
    ("+55119", 8),
];

fn main() {
    if std::env::var(ROLE).as_deref() == Ok("bare") {
        return bare_server();
    }
    let callbacks: usize = knob("LOAD_CALLBACKS", 60_000);
    let workers: usize = knob("LOAD_SERVER_WORKERS", 0);
    let levels: Vec<usize> = std::env::var("LOAD_CONCURRENCY")
        .unwrap_or_else(|_| "32,64".into())
        .split(',')
        .map(|c| c.trim().parse().expect("LOAD_CONCURRENCY: numbers"))
        .collect();
    let log_level = std::env::var("LOAD_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let replica_counts: Vec<usize> = std::env::var("LOAD_REPLICAS")
        .map(|list| {
            list.split(',')
                .map(|n| n.trim().parse().expect("LOAD_REPLICAS: numbers"))
                .collect()
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "load: {callbacks} callbacks per server and level, {cores} cores, server workers {}",
        if workers == 0 {
            "as each server defaults (verigate on PostgreSQL: half the cores)".to_string()
        } else {
            workers.to_string()
        }
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (round, &concurrency) in levels.iter().enumerate() {
        // A fresh set per level: verigate must never see a callback twice.
        let requests = Workload::generate(callbacks, round);
        let bare_run = if std::env::var("LOAD_ONLY").as_deref() == Ok("verigate") {
            None
        } else {
            let bare = Server::bare(workers);
            Some(runtime.block_on(drive(&[bare.port], &requests, concurrency)))
        };
        let dir = tempfile::tempdir().unwrap();
        let verigate = Server::verigate(dir.path(), workers, &log_level, &[]);
        let answered = Arc::new(AtomicUsize::new(0));
        let sampler = StoreSampler::start(dir.path(), Arc::clone(&answered), requests.len());
        let ours = runtime.block_on(drive_counted(
            &[verigate.port],
            &requests,
            concurrency,
            answered,
        ));
        let while_running = sampler.finish();
        let sled_cpu = cpu_seconds(verigate.child.id(), false);
        let peak_rss = verigate.peak_rss_kib();
        let commits = verigate.commit_figures();
        let stages = stage_figures(std::slice::from_ref(&verigate));
        drop(verigate);
        let store_bytes = verigate::store::sled::dir_size(dir.path());
        if let Ok(keep) = std::env::var("LOAD_KEEP_STORE") {
            let kept = Path::new(&keep).join(format!("c{concurrency}"));
            let _ = std::fs::remove_dir_all(&kept);
            std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
            std::fs::rename(dir.path().join("db"), &kept).unwrap();
        }
        println!(
            "\nconcurrency {concurrency}, verigate logs at {log_level} ({} format)",
            log_format()
        );
        if let Some(bare_run) = &bare_run {
            bare_run.print("bare actix-web");
        }
        ours.print("verigate");
        if let Some(bare_run) = &bare_run {
            println!(
                "  ratio verigate / bare: {:.2}  (throughput)",
                ours.rate() / bare_run.rate()
            );
        }
        println!(
            "  verigate peak RSS {:.1} MiB; store {:.0} bytes per stored event after a clean stop, \
             at most {:.0} while running (growth over the empty store)",
            peak_rss as f64 / 1024.0,
            store_bytes as f64 / requests.len() as f64,
            while_running
        );
        println!("  {commits}");
        println!("  {stages}");
        println!(
            "  per callback: verigate {:.0} us CPU",
            sled_cpu * 1e6 / requests.len() as f64
        );
        for &n in &replica_counts {
            let database = postgres_database(&runtime, &format!("verigate_load_{round}_{n}"));
            let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
            let env = [
                ("VERIGATE__STORE__BACKEND", "postgres"),
                ("VERIGATE__STORE__POSTGRES_URL", database.as_str()),
            ];
            let replicas: Vec<Server> = dirs
                .iter()
                .map(|d| Server::verigate(d.path(), workers, &log_level, &env))
                .collect();
            let ports: Vec<u16> = replicas.iter().map(|r| r.port).collect();
            let before = database_cost(&runtime);
            let run = runtime.block_on(drive(&ports, &requests, concurrency));
            run.print(&format!("pg x{n} replicas"));
            let (on_error, late) = replicas
                .iter()
                .map(Server::on_error_answers)
                .fold((0.0, 0.0), |(a, b), (c, d)| (a + c, b + d));
            println!(
                "  on_error answers {on_error:.0} ({late:.0} of them for the decision deadline)"
            );
            println!("  {}", stage_figures(&replicas));
            let ours_cpu: f64 = replicas
                .iter()
                .map(|r| cpu_seconds(r.child.id(), false))
                .sum();
            drop(replicas);
            // The database's processes for the replicas' connections end meanwhile.
            std::thread::sleep(Duration::from_millis(500));
            let after = database_cost(&runtime);
            let per = requests.len() as f64;
            println!(
                "  per callback: verigate {:.0} us CPU; PostgreSQL {:.0} us CPU, {:.0} bytes of WAL, {:.3} WAL syncs",
                ours_cpu * 1e6 / per,
                (after[0] - before[0]) * 1e6 / per,
                (after[1] - before[1]) / per,
                (after[2] - before[2]) / per
            );
            println!(
                "  ratio pg x{n} / sled: {:.2}  (throughput); request events (decisions on shared counters) {:.0}/s",
                run.rate() / ours.rate(),
                run.request_rate()
            );
        }
    }
}

/// Where request events spent their time, over `servers` (the mean per stage, from
/// `verigate_request_event_stage_seconds`).
fn stage_figures(servers: &[Server]) -> String {
    let scraped: Vec<String> = servers.iter().map(Server::scrape).collect();
    let means: Vec<String> = ["admit", "decide", "record"]
        .iter()
        .map(|stage| {
            let total = |what: &str| -> f64 {
                let name =
                    format!("verigate_request_event_stage_seconds_{what}{{stage=\"{stage}\"}}");
                scraped.iter().map(|text| metric_sample(text, &name)).sum()
            };
            format!(
                "{stage} {:.2}",
                total("sum") * 1e3 / total("count").max(1.0)
            )
        })
        .collect();
    format!("request events by stage, mean ms: {}", means.join(", "))
}

/// The value of the first sample in /metrics `text` whose line starts with `name`
/// (name and labels), or 0.
fn metric_sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// The test PostgreSQL server's URL (its `postgres` database), started if need be.
fn test_server() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/postgres.sh");
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "PostgreSQL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A fresh, empty database on the test PostgreSQL server; its URL.
fn postgres_database(runtime: &tokio::runtime::Runtime, name: &str) -> String {
    let server = test_server();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        for statement in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ] {
            client.batch_execute(&statement).await.unwrap();
        }
        drop(client);
        let _ = connection.await;
    });
    let (base, _) = server.rsplit_once('/').unwrap();
    format!("{base}/{name}")
}

/// CPU seconds a process has used (Linux, 100 ticks a second), with those of its
/// children that ended if `ended_children`.
fn cpu_seconds(pid: u32, ended_children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces); utime is field 14.
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0.0))
                .collect()
        })
        .unwrap_or_default();
    let take = if ended_children { 4 } else { 2 };
    fields.iter().skip(11).take(take).sum::<f64>() / 100.0
}

/// What the test PostgreSQL server has spent so far: CPU seconds (the postmaster, its
/// live processes and those that ended), WAL bytes and WAL syncs.
fn database_cost(runtime: &tokio::runtime::Runtime) -> [f64; 3] {
    let dir = std::env::var("VERIGATE_PG_DIR")
        .unwrap_or_else(|_| format!("{}/target/test-postgres", env!("CARGO_MANIFEST_DIR")));
    let postmaster: u32 = std::fs::read_to_string(Path::new(&dir).join("postmaster.pid"))
        .ok()
        .and_then(|pid| pid.lines().next()?.trim().parse().ok())
        .unwrap_or(0);
    let mut cpu = cpu_seconds(postmaster, true);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(postmaster) {
            cpu += cpu_seconds(pid, false);
        }
    }
    let server = test_server();
    let [wal_bytes, wal_syncs] = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&server, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT wal_bytes::float8, wal_sync::float8 FROM pg_stat_wal",
                &[],
            )
            .await
            .unwrap();
        [row.get(0), row.get(1)]
    });
    [cpu, wal_bytes, wal_syncs]
}

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name}: a number")))
        .unwrap_or(default)
}

/// The server that does nothing but answer: the ceiling for any actix-web service on
/// this machine with this client.
fn bare_server() {
    use actix_web::{web, App, HttpResponse, HttpServer};
    let workers: usize = knob("LOAD_SERVER_WORKERS", 0);
    actix_web::rt::System::new().block_on(async move {
        let mut server = HttpServer::new(|| {
            App::new().route(
                PATH,
                web::post().to(|_body: web::Bytes| async {
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(r#"{"action":"allow"}"#)
                }),
            )
        })
        .bind(("127.0.0.1", 0))
        .unwrap();
        if workers > 0 {
            server = server.workers(workers);
        }
        println!("port {}", server.addrs()[0].port());
        server.run().await.unwrap();
    });
}

/// Samples the store's size on disk while a run goes on, every 100 ms.
struct StoreSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<f64>,
}

impl StoreSampler {
    fn start(dir: &Path, answered: Arc<AtomicUsize>, total: usize) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (dir, stopped) = (dir.to_path_buf(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            // What the empty store occupies (files the index preallocates) is not a cost
            // per event: growth beyond it is.
            let empty = verigate::store::sled::dir_size(&dir) as f64;
            let mut worst: f64 = 0.0;
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let events = answered.load(Ordering::Relaxed);
                if events >= total / 10 && events > 0 {
                    let size = verigate::store::sled::dir_size(&dir) as f64;
                    worst = worst.max((size - empty) / events as f64);
                }
            }
            worst
        });
        Self { stop, thread }
    }

    /// The largest size per answered callback seen.
    fn finish(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

/// verigate's log format: LOAD_LOG_FORMAT, by default the service's own default (pretty).
fn log_format() -> String {
    std::env::var("LOAD_LOG_FORMAT").unwrap_or_else(|_| "pretty".into())
}

/// A server process under load; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn bare(workers: usize) -> Self {
        let child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, "bare")
            .env("LOAD_SERVER_WORKERS", workers.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        Self::wait_for_port(child, |line| {
            line.strip_prefix("port ").map(|p| p.parse().unwrap())
        })
    }

    fn verigate(dir: &Path, workers: usize, log_level: &str, env: &[(&str, &str)]) -> Self {
        let policy = std::env::var_os("LOAD_POLICY").map_or_else(
            || Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml"),
            std::path::PathBuf::from,
        );
        // LOAD_BINARY: another build of verigate, to compare two builds in turns.
        let binary = std::env::var_os("LOAD_BINARY").map_or_else(
            || std::path::PathBuf::from(env!("CARGO_BIN_EXE_verigate")),
            std::path::PathBuf::from,
        );
        let child = Command::new(binary)
            .env("VERIGATE__SERVER__LISTEN", "127.0.0.1:0")
            .env("VERIGATE__SERVER__WORKERS", workers.to_string())
            .env("VERIGATE__STORE__PATH", dir.join("db"))
            .env("VERIGATE__POLICY__PATH", policy)
            .env("VERIGATE__LOG__FORMAT", log_format())
            // The bench reads the port from the `verigate listening` line (info).
            .env(
                "VERIGATE__LOG__LEVEL",
                format!("{log_level},verigate::cli=info"),
            )
            .env("VERIGATE_APP_KEY", APP_KEY)
            .env("VERIGATE_APP_SECRET", APP_SECRET)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let server = Self::wait_for_port(child, |line| {
            line.contains("verigate listening").then(|| {
                // `"port":N` in JSON, `port=N` in the pretty format.
                let at = line.find("port").unwrap() + "port".len();
                let digits: String = line[at..]
                    .trim_start_matches(['"', ':', '='])
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse().unwrap()
            })
        });
        // Ready = store open and policy (with its country table) loaded.
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", server.port))
                .and_then(|mut s| {
                    use std::io::{Read, Write};
                    s.write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
                    let mut answer = String::new();
                    s.read_to_string(&mut answer)?;
                    Ok(answer.starts_with("HTTP/1.1 200"))
                })
                .unwrap_or(false)
            {
                return server;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("verigate did not become ready");
    }

    /// Reads the child's stdout until `port` finds the port, then drains it in the
    /// background so the child never blocks on a full pipe.
    fn wait_for_port(mut child: Child, port: impl Fn(&str) -> Option<u16>) -> Self {
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(port) = port(&line) {
                break port;
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, port }
    }

    /// The server's /metrics text (empty if it cannot be fetched).
    fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut text = String::new();
        let fetched = std::net::TcpStream::connect(("127.0.0.1", self.port)).and_then(|mut s| {
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
            s.read_to_string(&mut text)
        });
        if fetched.is_err() {
            text.clear();
        }
        text
    }

    /// Request events answered `on_error` (any cause), and those of them answered so
    /// because the policy missed the decision deadline.
    fn on_error_answers(&self) -> (f64, f64) {
        let text = self.scrape();
        let sum = |keep: &dyn Fn(&str) -> bool| -> f64 {
            text.lines()
                .filter(|l| !l.starts_with('#') && keep(l))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        (
            sum(&|l| l.starts_with("verigate_decisions_total") && l.contains("rule=\"on_error\"")),
            sum(&|l| l.starts_with("verigate_decision_deadline_exceeded_total")),
        )
    }

    /// Group commits: how many, events per commit and sync time, from /metrics.
    fn commit_figures(&self) -> String {
        let text = self.scrape();
        if text.is_empty() {
            return "commit figures unavailable".into();
        }
        let sample = |name: &str| metric_sample(&text, name);
        let commits = sample("verigate_store_commit_events_count");
        let events = sample("verigate_store_commit_events_sum");
        let sync_s = sample("verigate_store_flush_seconds_sum");
        let checkpoints = sample("verigate_store_checkpoint_seconds_count");
        let checkpoint_s = sample("verigate_store_checkpoint_seconds_sum");
        let counter_keys = sample("verigate_rate_limit_keys");
        let under_2ms = sample("verigate_store_flush_seconds_bucket{le=\"0.002\"}");
        format!(
            "{commits:.0} group commits, {:.1} events each, {:.2} ms per log sync ({:.1} % over 2 ms); {checkpoints:.0} checkpoints, {:.0} ms each; policy counter keys {counter_keys:.0}",
            events / commits.max(1.0),
            sync_s * 1e3 / commits.max(1.0),
            100.0 * (commits - under_2ms) / commits.max(1.0),
            checkpoint_s * 1e3 / checkpoints.max(1.0)
        )
    }

    /// Peak resident set size so far (Linux), in KiB.
    fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM, so verigate flushes and closes its store before the size is read.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Which kind of callback a request carries, for per-kind latency.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Delivered,
    Result,
}

/// Ready-to-send HTTP requests, each a unique, signed callback.
struct Workload {
    requests: Vec<(Kind, Vec<u8>)>,
}

impl Workload {
    /// `callbacks` callbacks for about `callbacks / 2.2` verifications: every one gets a
    /// request event and (later, as in life) a result; SMS ones also a delivery report.
    fn generate(callbacks: usize, round: usize) -> Self {
        let signer = AppCredentials::new(APP_KEY, APP_SECRET, false).unwrap();
        let timestamp = sinch_timestamp(Utc::now());
        let mut random = 0x2545_f491_4f6c_dd1d_u64 ^ (round as u64).wrapping_mul(0x9e37_79b9);
        let mut next = move || {
            random ^= random << 13;
            random ^= random >> 7;
            random ^= random << 17;
            random
        };
        let lag = 40;
        let mut pending: std::collections::VecDeque<(String, String, &str)> = Default::default();
        let mut requests = Vec::with_capacity(callbacks);
        let mut push = |kind: Kind, body: String| {
            let headers = signed_headers(&signer, PATH, body.as_bytes(), CONTENT_TYPE, &timestamp);
            let mut http = format!(
                "POST {PATH} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n",
                body.len()
            );
            for (name, value) in headers {
                http.push_str(&format!("{name}: {value}\r\n"));
            }
            http.push_str("\r\n");
            http.push_str(&body);
            requests.push((kind, http.into_bytes()));
        };
        let mut verification = 0usize;
        let mut emitted = 0usize;
        while emitted < callbacks {
            let id = format!("load-{round}-{verification:08}");
            let (prefix, digits) = NUMBERING[(next() % NUMBERING.len() as u64) as usize];
            let number = format!(
                "{prefix}{:0width$}",
                next() % 10u64.pow(digits),
                width = digits as usize
            );
            let method = METHODS[verification % METHODS.len()];
            let sample = |kind, status| Sample {
                kind,
                id: &id,
                number: &number,
                method,
                status,
            };
            push(Kind::Request, sample_body(&sample(SampleKind::Request, "")));
            emitted += 1;
            if method == "sms" {
                push(
                    Kind::Delivered,
                    sample_body(&sample(SampleKind::SmsDelivered, "")),
                );
                emitted += 1;
            }
            pending.push_back((id.clone(), number.clone(), method));
            if pending.len() > lag || emitted >= callbacks {
                if let Some((id, number, method)) = pending.pop_front() {
                    let status = if next() % 10 < 8 {
                        "SUCCESSFUL"
                    } else {
                        "FAIL"
                    };
                    push(
                        Kind::Result,
                        sample_body(&Sample {
                            kind: SampleKind::Result,
                            id: &id,
                            number: &number,
                            method,
                            status,
                        }),
                    );
                    emitted += 1;
                }
            }
            verification += 1;
        }
        requests.truncate(callbacks);
        Self { requests }
    }

    fn len(&self) -> usize {
        self.requests.len()
    }
}

/// What one server did under one load.
struct Run {
    elapsed: Duration,
    /// (kind, latency) of every answered callback.
    latencies: Vec<(Kind, Duration)>,
    failures: usize,
}

impl Run {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.elapsed.as_secs_f64()
    }

    fn request_rate(&self) -> f64 {
        let requests = self
            .latencies
            .iter()
            .filter(|(k, _)| *k == Kind::Request)
            .count();
        requests as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self, name: &str) {
        let all: Vec<Duration> = self.latencies.iter().map(|(_, d)| *d).collect();
        let requests: Vec<Duration> = self
            .latencies
            .iter()
            .filter(|(k, _)| *k == Kind::Request)
            .map(|(_, d)| *d)
            .collect();
        let [p50, p99, p999] = percentiles(all);
        let [r50, r99, r999] = percentiles(requests);
        println!(
            "  {name:<15} {:>8.0} req/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  p999 {p999:>6.2} ms  \
             | request events p50 {r50:.2} p99 {r99:.2} p999 {r999:.2} ms  | non-2xx {}",
            self.rate(),
            self.failures
        );
    }
}

fn percentiles(mut samples: Vec<Duration>) -> [f64; 3] {
    samples.sort_unstable();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len().max(1)) - 1;
        samples.get(i).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    [at(0.50), at(0.99), at(0.999)]
}

/// Sends every request of `workload` over `concurrency` keep-alive connections, spread
/// over `ports` (replicas) in turn.
async fn drive(ports: &[u16], workload: &Workload, concurrency: usize) -> Run {
    drive_counted(ports, workload, concurrency, Arc::default()).await
}

/// [`drive`], counting answered callbacks in `answered` as they come.
async fn drive_counted(
    ports: &[u16],
    workload: &Workload,
    concurrency: usize,
    answered: Arc<AtomicUsize>,
) -> Run {
    let next = Arc::new(AtomicUsize::new(0));
    let workload = Arc::new(
        workload
            .requests
            .iter()
            .map(|(k, r)| (*k, Arc::<[u8]>::from(r.as_slice())))
            .collect::<Vec<_>>(),
    );
    let started = Instant::now();
    let local = tokio::task::LocalSet::new();
    let handles: Vec<_> = (0..concurrency)
        .map(|connection| {
            let port = ports[connection % ports.len()];
            let next = Arc::clone(&next);
            let workload = Arc::clone(&workload);
            let answered = Arc::clone(&answered);
            local.spawn_local(async move {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                stream.set_nodelay(true).unwrap();
                let mut buffer = Vec::with_capacity(4096);
                let mut latencies = Vec::new();
                let mut failures = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((kind, request)) = workload.get(i) else {
                        break;
                    };
                    let sent = Instant::now();
                    stream.write_all(request).await.unwrap();
                    let status = read_response(&mut stream, &mut buffer).await;
                    latencies.push((*kind, sent.elapsed()));
                    answered.fetch_add(1, Ordering::Relaxed);
                    if !(200..300).contains(&status) {
                        failures += 1;
                    }
                }
                (latencies, failures)
            })
        })
        .collect();
    let mut run = Run {
        elapsed: Duration::ZERO,
        latencies: Vec::with_capacity(workload.len()),
        failures: 0,
    };
    local
        .run_until(async {
            for handle in handles {
                let (latencies, failures) = handle.await.unwrap();
                run.latencies.extend(latencies);
                run.failures += failures;
            }
        })
        .await;
    run.elapsed = started.elapsed();
    run
}

/// Reads one HTTP/1.1 response with a content-length; returns its status.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> u16 {
    buffer.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = find(buffer, b"\r\n\r\n") {
            let head = std::str::from_utf8(&buffer[..end])
                .unwrap()
                .to_ascii_lowercase();
            let status: u16 = head[9..12].parse().unwrap();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while buffer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0, "server closed the connection");
                buffer.extend_from_slice(&chunk[..n]);
            }
            return status;
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "server closed the connection");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
