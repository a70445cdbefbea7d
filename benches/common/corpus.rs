//! A synthetic verification history for store benchmarks: 200,000 numbers in five
//! countries, two sms for each flashcall, one result for every fifth request (70 %
//! successful), loaded through the durable write path.
#![allow(dead_code)] // each bench uses part of it

use std::{sync::Arc, time::Instant};

use chrono::{DateTime, Duration, Utc};
use verigate::{
    decision::{DecisionRecord, PolicyDecision},
    events::{Action, VerificationEvent},
    store::{IncomingEvent, Store},
};

pub const NUMBERS: u64 = 200_000;

/// A numeric setting from the environment, or `default`.
pub fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
const COUNTRIES: [&str; 5] = ["+4670", "+4477", "+1415", "+4915", "+3361"];

pub fn number(i: u64) -> String {
    let n = (i * 7919) % NUMBERS;
    format!("{}{:07}", COUNTRIES[(n % 5) as usize], n)
}

pub fn request(i: u64) -> String {
    format!(
        r#"{{"id":"v-{i}","event":"VerificationRequestEvent","method":"{}","identity":{{"type":"number","endpoint":"{}"}},"price":{{"amount":0.0308,"currencyId":"EUR"}},"reference":"ref-{i}"}}"#,
        if i % 3 == 0 { "flashcall" } else { "sms" },
        number(i)
    )
}

pub fn result(i: u64) -> String {
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
        book: None,
    };
    store.record_once(incoming).await.unwrap();
}

/// Records `n` verifications spread evenly over `span` from `start`, from 128 concurrent
/// writers, and prints how long it took.
pub async fn load(store: &Store, n: u64, start: DateTime<Utc>, span: Duration) {
    let step_ms = span.num_milliseconds() / n as i64;
    let decision = DecisionRecord::new(
        &PolicyDecision {
            action: Action::Allow,
            rule: None,
            reason: "bench".into(),
            response: Default::default(),
            explanation: Default::default(),
            spared: Vec::new(),
        },
        false,
        "bench",
        start,
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
                    let at = start + Duration::milliseconds(step_ms * i as i64);
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
        "loaded {n} verifications ({} events) in {:.1} s",
        n + n / 5,
        started.elapsed().as_secs_f64()
    );
}
