//! The store over 1,000,000 verifications (`VERIGATE_BENCH_RECORDS` to change): loading
//! them through the durable write path, lookups by number and by reference (warm, and
//! again after dropping the page cache and reopening the store), a one-day stats query,
//! what one refresh of the console's overview and of its rule outcomes cost, and NDJSON
//! export throughput, each next to a baseline measured in the same run.
//!
//! `cargo bench --bench analytics`. The first run loads the records into
//! `target/bench-analytics-v2-<N>/` and reuses them. Dropping the page cache needs root;
//! without it the "cold" figures are labelled as warm.
//!
//! `VERIGATE_BENCH_STORE=postgres` runs the same on PostgreSQL: the database
//! `verigate_analytics_<N>` on the test server (tests/support/postgres.sh), loaded once
//! through the group commit and reused while it holds all N verifications. There the
//! "cold" figures only reopen the store: the server's own cache stays warm.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, sync::Arc, time::Instant};

use chrono::{DateTime, Duration, TimeZone, Utc};
use verigate::{
    routes::analytics::{export_stream, stored_rule_outcomes, ExportFormat},
    store::{
        GroupBy, StatsQuery, Store, StoreOptions, Unobserved, VerificationFilter, VerificationQuery,
    },
};

const DAYS: i64 = 10;

#[path = "common/corpus.rs"]
mod corpus;
use corpus::number;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap()
}

/// Where the records are: a sled folder, or a PostgreSQL database.
enum Backend {
    Sled,
    Postgres(String),
}

async fn open(dir: &std::path::Path, backend: &Backend) -> Store {
    match backend {
        Backend::Sled => {
            Store::open(&StoreOptions::at(dir.join("db")), Arc::new(Unobserved)).unwrap()
        }
        Backend::Postgres(url) => {
            let options = StoreOptions {
                postgres: Some(verigate::store::postgres::PostgresOptions {
                    url: url.clone().into(),
                    pool_size: 8,
                }),
                ..StoreOptions::at(dir.join("unused"))
            };
            Store::connect(&options, Arc::new(Unobserved))
                .await
                .unwrap()
        }
    }
}

/// The analytics database on the test server, made if missing; its URL and whether it
/// already holds `n` verifications.
async fn postgres_database(n: u64) -> (String, bool) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/postgres.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PostgreSQL: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let name = format!("verigate_analytics_{n}");
    let (base, _) = server.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");
    let query = |url: String, sql: String| async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        client.query_opt(&sql, &[]).await.ok().flatten()
    };
    let held: i64 = query(
        url.clone(),
        "SELECT count(*) FROM verigate_verifications".into(),
    )
    .await
    .map_or(0, |row| row.get(0));
    if held as u64 == n {
        return (url, true);
    }
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        let _ = query(server.clone(), sql).await;
    }
    (url, false)
}

fn by(filter: VerificationFilter) -> VerificationQuery {
    VerificationQuery {
        filter,
        ..VerificationQuery::between(DateTime::<Utc>::UNIX_EPOCH, DateTime::<Utc>::MAX_UTC, 100)
    }
}

/// p50 and p99 of lookups by number and by reference, in µs.
async fn lookups(store: &Store, n: u64, offset: u64) -> ([f64; 2], [f64; 2]) {
    let mut by_number = Vec::new();
    for i in 0..500 {
        let wanted = number(i * 37 + offset);
        let t = Instant::now();
        let page = store
            .verifications(by(VerificationFilter {
                number: Some(wanted),
                ..Default::default()
            }))
            .await
            .unwrap();
        by_number.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(!page.items.is_empty());
    }
    let mut by_reference = Vec::new();
    for i in 0..500u64 {
        let t = Instant::now();
        let page = store
            .verifications(by(VerificationFilter {
                reference: Some(format!("ref-{}", (i * 1999 + offset * 7) % n)),
                ..Default::default()
            }))
            .await
            .unwrap();
        by_reference.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(page.items.len(), 1);
    }
    let p = |xs: &Vec<f64>| [percentile(xs.clone(), 0.5), percentile(xs.clone(), 0.99)];
    (p(&by_number), p(&by_reference))
}

/// Empties the kernel's page cache (root only); true if it did.
fn drop_page_cache() -> bool {
    let synced = std::process::Command::new("sync").status().is_ok();
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p) as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = corpus::knob("VERIGATE_BENCH_RECORDS", 1_000_000);
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-analytics-v2-{n}"));
    let (backend, loaded) = match std::env::var("VERIGATE_BENCH_STORE").as_deref() {
        Ok("postgres") => {
            let (url, loaded) = postgres_database(n).await;
            (Backend::Postgres(url), loaded)
        }
        _ => (Backend::Sled, dir.join("loaded").exists()),
    };
    let store = open(&dir, &backend).await;
    if !loaded {
        corpus::load(&store, n, start(), Duration::days(DAYS)).await;
        store.shutdown().await.unwrap();
        if let Backend::Sled = backend {
            std::fs::write(dir.join("loaded"), b"").unwrap();
        }
        println!("peak RSS while loading: {:.0} MiB", peak_rss_mib());
    }
    drop(store);
    let store = open(&dir, &backend).await;
    match store.size_on_disk() {
        Some(size) => println!(
            "{n} verifications, {:.0} MB on disk, {:.0} bytes per stored event",
            size as f64 / 1e6,
            size as f64 / (n + n / 5) as f64
        ),
        None => println!("{n} verifications on PostgreSQL"),
    }

    // Lookups by number and reference (indexes), against a scan for one number.
    let (number_us, reference_us) = lookups(&store, n, 0).await;
    let wanted = number(37);
    let t = Instant::now();
    let mut after = None;
    let mut scanned = 0;
    loop {
        let page = store
            .verifications(
                VerificationQuery::between(
                    DateTime::<Utc>::UNIX_EPOCH,
                    DateTime::<Utc>::MAX_UTC,
                    1000,
                )
                .after(after),
            )
            .await
            .unwrap();
        scanned += page
            .items
            .iter()
            .filter(|r| r.number.as_deref() == Some(wanted.as_str()))
            .count();
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let scan_us = t.elapsed().as_secs_f64() * 1e6;
    println!(
        "by number (warm):    p50 {:>6.0} us  p99 {:>6.0} us   (full scan for one number: {:.0} us, {:.0}x slower; {scanned} found)",
        number_us[0], number_us[1], scan_us, scan_us / number_us[0]
    );
    println!(
        "by reference (warm): p50 {:>6.0} us  p99 {:>6.0} us",
        reference_us[0], reference_us[1]
    );

    // One day of stats, grouped by country and method.
    let day = (start() + Duration::days(4), start() + Duration::days(5));
    let t = Instant::now();
    let groups = store
        .stats(StatsQuery {
            since: day.0,
            until: day.1,
            group_by: vec![GroupBy::Country, GroupBy::Method],
        })
        .await
        .unwrap();
    let stats_s = t.elapsed().as_secs_f64();
    let day_records: u64 = groups.iter().map(|g| g.verifications).sum();
    println!(
        "1-day stats:  {stats_s:.3} s for {day_records} verifications in {} groups",
        groups.len()
    );

    // What one refresh of the console's overview asks: three hours by rule and minute
    // (every 10 s), and 24 hours by country (once a minute).
    let now = day.1;
    let t = Instant::now();
    let windowed = store
        .stats(StatsQuery {
            since: now - Duration::hours(3),
            until: now,
            group_by: vec![GroupBy::Rule, GroupBy::Minute],
        })
        .await
        .unwrap();
    let windowed_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    store
        .stats(StatsQuery {
            since: now - Duration::hours(24),
            until: now,
            group_by: vec![GroupBy::Country],
        })
        .await
        .unwrap();
    let countries_ms = t.elapsed().as_secs_f64() * 1e3;
    let windowed_records: u64 = windowed.iter().map(|g| g.verifications).sum();
    println!(
        "console overview: 3 h by rule and minute {windowed_ms:.1} ms ({windowed_records} verifications, {} groups); 24 h by country {countries_ms:.1} ms; {:.2}% of one core at a 10 s / 60 s refresh",
        windowed.len(),
        (windowed_ms / 10_000.0 + countries_ms / 60_000.0) * 100.0
    );

    // What the console's Rules view asks once a minute: every rule's stored outcomes
    // over a day, walked as `GET /v1/stats/rules` walks it.
    let t = Instant::now();
    let rules = stored_rule_outcomes(&store, day.0, day.1).await.unwrap();
    println!(
        "rule outcomes: {:.3} s for one day ({} rules), against {stats_s:.3} s for the day's stats",
        t.elapsed().as_secs_f64(),
        rules.len()
    );

    // Export one day as NDJSON, against encoding the same records already in memory.
    let t = Instant::now();
    let mut bytes = 0usize;
    let mut chunks = std::pin::pin!(export_stream(
        store.clone(),
        day.0,
        day.1,
        ExportFormat::Ndjson
    ));
    while let Some(chunk) = futures_util::StreamExt::next(&mut chunks).await {
        bytes += chunk.unwrap().len();
    }
    let ours = bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
    let page = store
        .verifications(VerificationQuery::between(day.0, day.1, 20_000))
        .await
        .unwrap();
    let t = Instant::now();
    let mut encoded = 0;
    for _ in 0..5 {
        encoded += ExportFormat::Ndjson.encode(&page.items).len();
    }
    let encode_only = encoded as f64 / 1e6 / t.elapsed().as_secs_f64();
    println!(
        "export:       {ours:.0} MB/s NDJSON ({:.1} MB); encoding alone (records in memory) {encode_only:.0} MB/s; ratio {:.2}",
        bytes as f64 / 1e6,
        ours / encode_only
    );
    store.shutdown().await.unwrap();
    drop(store);

    // Cold: the page cache dropped and the store reopened (its own cache empty too).
    let cold = drop_page_cache() && matches!(backend, Backend::Sled);
    let store = open(&dir, &backend).await;
    let (number_us, reference_us) = lookups(&store, n, 11).await;
    let label = match (&backend, cold) {
        (_, true) => "cold",
        (Backend::Sled, false) => "warm, no root",
        (Backend::Postgres(_), false) => "reopened",
    };
    println!(
        "by number ({label}):    p50 {:>6.0} us  p99 {:>6.0} us",
        number_us[0], number_us[1]
    );
    println!(
        "by reference ({label}): p50 {:>6.0} us  p99 {:>6.0} us",
        reference_us[0], reference_us[1]
    );
    store.shutdown().await.unwrap();
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
}
