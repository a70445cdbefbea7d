//! The read path over 1,000,000 stored verifications (`VERIGATE_BENCH_RECORDS` to change):
//! lookups by number and by reference, a one-day stats query, and NDJSON export
//! throughput, each next to a baseline measured in the same run.
//!
//! `cargo bench --bench analytics`. The first run loads the records through the normal
//! durable write path (a few minutes) into `target/bench-analytics-<N>/` and reuses it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{path::PathBuf, sync::Arc, time::Instant};

use chrono::{DateTime, Duration, TimeZone, Utc};
use verigate::{
    analytics::GroupBy,
    events::{Action, VerificationEvent},
    policy::PolicyDecision,
    routes::analytics::{compute_stats, ExportFormat},
    store::{DecisionRecord, IncomingEvent, Store},
};

const DAYS: i64 = 10;
const NUMBERS: u64 = 200_000;
const COUNTRIES: [&str; 5] = ["+4670", "+4477", "+1415", "+4915", "+3361"];

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap()
}

fn number(i: u64) -> String {
    let n = (i * 7919) % NUMBERS;
    format!("{}{:07}", COUNTRIES[(n % 5) as usize], n)
}

fn request(i: u64) -> String {
    format!(
        r#"{{"id":"v-{i}","event":"VerificationRequestEvent","method":"{}","identity":{{"type":"number","endpoint":"{}"}},"price":{{"amount":0.0308,"currencyId":"EUR"}},"reference":"ref-{i}"}}"#,
        if i % 3 == 0 { "flashcall" } else { "sms" },
        number(i)
    )
}

fn result(i: u64) -> String {
    format!(
        r#"{{"id":"v-{i}","event":"VerificationResultEvent","method":"sms","status":"{}"}}"#,
        if i % 10 < 7 { "SUCCESSFUL" } else { "FAIL" }
    )
}

async fn record(store: &Store, raw: &str, at: DateTime<Utc>, decision: Option<&DecisionRecord>) {
    let event = VerificationEvent::parse(raw.as_bytes()).unwrap();
    let incoming = IncomingEvent {
        event: &event,
        raw: raw.as_bytes(),
        app_key: "bench",
        received_at: at,
        decision,
    };
    store.record(incoming).await.unwrap();
}

async fn load(store: &Store, n: u64) {
    let step = Duration::milliseconds(DAYS * 86_400_000 / n as i64);
    let decision = DecisionRecord::new(
        &PolicyDecision {
            action: Action::Allow,
            rule: None,
            reason: "bench".into(),
            response: Default::default(),
            explanation: Default::default(),
        },
        false,
        "bench",
        start(),
        serde_json::json!({"action":"allow"}),
    );
    let decision = Arc::new(decision);
    let started = Instant::now();
    let tasks: Vec<_> = (0..128u64)
        .map(|t| {
            let store = store.clone();
            let decision = Arc::clone(&decision);
            tokio::spawn(async move {
                let mut i = t;
                while i < n {
                    let at = start() + step * i as i32;
                    record(&store, &request(i), at, Some(&decision)).await;
                    if i % 5 == 0 {
                        record(&store, &result(i), at, None).await;
                    }
                    i += 128;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "loaded {n} verifications in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[((xs.len() - 1) as f64 * p) as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: u64 = std::env::var("VERIGATE_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-analytics-{n}"));
    let done = dir.join("loaded");
    let store = Store::open(&dir.join("db"), |_| {}).unwrap();
    if !done.exists() {
        load(&store, n).await;
        std::fs::write(&done, b"").unwrap();
    }
    println!(
        "{n} verifications, {:.0} MB on disk",
        store.size_on_disk().unwrap() as f64 / 1e6
    );

    // Lookups by number (the index) against a scan of the records for the same number.
    let everything = (DateTime::<Utc>::UNIX_EPOCH, DateTime::<Utc>::MAX_UTC);
    let mut by_number = Vec::new();
    for i in 0..500 {
        let wanted = number(i * 37);
        let t = Instant::now();
        let ids = store.ids_by_number(&wanted).unwrap();
        let page = store.records_by_ids(&ids, None, 100, |_| true).unwrap();
        by_number.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(!page.items.is_empty());
    }
    let t = Instant::now();
    let wanted = number(37);
    let scanned = store
        .records_between(
            everything.0,
            everything.1,
            None,
            usize::MAX,
            usize::MAX,
            |r| r.number.as_deref() == Some(wanted.as_str()),
        )
        .unwrap();
    let scan_us = t.elapsed().as_secs_f64() * 1e6;
    println!(
        "by number:    p50 {:>7.0} us  p99 {:>7.0} us   (full scan for one number: {:.0} us, {:.0}x slower; {} found)",
        percentile(by_number.clone(), 0.5),
        percentile(by_number.clone(), 0.99),
        scan_us,
        scan_us / percentile(by_number, 0.5),
        scanned.items.len()
    );
    let mut by_reference = Vec::new();
    for i in 0..500u64 {
        let t = Instant::now();
        let ids = store
            .ids_by_reference(&format!("ref-{}", i * 1999 % n))
            .unwrap();
        let page = store.records_by_ids(&ids, None, 100, |_| true).unwrap();
        by_reference.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(page.items.len(), 1);
    }
    println!(
        "by reference: p50 {:>7.0} us  p99 {:>7.0} us",
        percentile(by_reference.clone(), 0.5),
        percentile(by_reference, 0.99)
    );

    // One day of stats, grouped by country and method.
    let day = (start() + Duration::days(4), start() + Duration::days(5));
    let t = Instant::now();
    let groups = compute_stats(
        &store,
        day.0,
        day.1,
        vec![GroupBy::Country, GroupBy::Method],
    )
    .unwrap();
    let stats_s = t.elapsed().as_secs_f64();
    let day_records: u64 = groups.iter().map(|g| g.verifications).sum();
    println!(
        "1-day stats:  {stats_s:.3} s for {day_records} verifications in {} groups",
        groups.len()
    );

    // Export one day as NDJSON, against the obvious way: decode each record, encode it.
    let t = Instant::now();
    let (mut bytes, mut after) = (0usize, None);
    loop {
        let (chunk, next) = ExportFormat::Ndjson
            .chunk(&store, day.0, day.1, after.as_ref(), 500)
            .unwrap();
        bytes += chunk.len();
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let ours = bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (mut naive_bytes, mut after) = (0usize, None);
    loop {
        let page = store
            .records_between(day.0, day.1, after.as_ref(), 500, 500, |_| true)
            .unwrap();
        for record in &page.items {
            naive_bytes += serde_json::to_vec(record).unwrap().len() + 1;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let naive = naive_bytes as f64 / 1e6 / t.elapsed().as_secs_f64();
    println!(
        "export:       {ours:.0} MB/s NDJSON ({:.1} MB); decode+encode baseline {naive:.0} MB/s; ratio {:.2}x",
        bytes as f64 / 1e6,
        ours / naive
    );
    store.shutdown().unwrap();
}
