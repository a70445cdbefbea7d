//! Durable writes: verigate's group commit against the obvious alternative, one flush
//! per write, through the same store and write path, measured in one run on one disk.
//!
//! `cargo bench --bench group_commit` prints events/s for each concurrency level and the
//! ratio group-commit / flush-per-write. Both make every event durable before counting it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use chrono::Utc;
use verigate::{
    events::VerificationEvent,
    store::{Durability, IncomingEvent, Store, StoreOptions},
};

const EVENTS: usize = 3_000;
const RUNS: usize = 3;

fn body(i: usize) -> Vec<u8> {
    format!(
        r#"{{"id":"bench-{i}","event":"VerificationResultEvent","method":"sms","identity":{{"type":"number","endpoint":"+4670{i:07}"}},"status":"SUCCESSFUL"}}"#
    )
    .into_bytes()
}

/// Events/s with `concurrency` writers, each awaiting durability of every event.
async fn durable_writes(durability: Durability, concurrency: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        durability,
        ..StoreOptions::default()
    };
    let store = Store::open_with(&dir.path().join("db"), options, |_| {}).unwrap();
    let started = Instant::now();
    let per_task = EVENTS / concurrency;
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in t * per_task..(t + 1) * per_task {
                    let raw = body(i);
                    let event = VerificationEvent::parse(&raw).unwrap();
                    store
                        .record(IncomingEvent {
                            event: &event,
                            raw: &raw,
                            app_key: "bench",
                            received_at: Utc::now(),
                            decision: None,
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (per_task * concurrency) as f64 / started.elapsed().as_secs_f64();
    store.shutdown().unwrap();
    rate
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "{EVENTS} durable result events per run, median of {RUNS}; events/s (higher is better)"
    );
    println!(
        "{:>11} {:>14} {:>15} {:>8}",
        "concurrency", "group commit", "flush per write", "ratio"
    );
    for concurrency in [1, 8, 32, 64, 128] {
        // Alternate the two sides and take medians: the disk's mood drifts between runs.
        let (mut ours, mut baseline) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            ours.push(durable_writes(Durability::GroupCommit, concurrency).await);
            baseline.push(durable_writes(Durability::FlushPerWrite, concurrency).await);
        }
        let (ours, baseline) = (median(ours), median(baseline));
        println!(
            "{concurrency:>11} {ours:>14.0} {baseline:>15.0} {:>7.2}x",
            ours / baseline
        );
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
