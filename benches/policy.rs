//! Policy decisions with 10,000 prefixes in 1,000 rules and active counters, and the
//! shipped sample policy's decide + observe on a simulated day's traffic.
//!
//! `cargo bench --bench policy` runs criterion on one core (ns per decision), then
//! measures decisions/s on one thread and on every core in the same run, to show that
//! throughput scales (no lock shared by all decisions).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Instant};

use chrono::{Duration, TimeZone, Utc};
use criterion::{black_box, Criterion};
use verigate::{
    events::Action,
    events::{Identity, Price, VerificationMethod, VerificationRequestEvent},
    policy::{Learning, Outcome, Policy, RulesPolicy},
    rng::Rng,
    simulate::{self, Knobs},
};

const CODES: [&str; 10] = ["1", "44", "46", "49", "33", "225", "234", "63", "91", "880"];

/// 1,000 rules of 10 prefixes each (4 to 8 digits), every tenth with a per-number rate
/// limit, plus per-range, range-walking and spend rules that every request meets.
fn policy_text() -> String {
    let mut rng = Rng(42);
    let mut text = String::from("default = \"allow\"\non_error = \"deny\"\n");
    text.push_str("[[rule]]\nname = \"per-range\"\naction = \"deny\"\nrate_limit = { key = \"range:4\", max = 50, window = \"1h\" }\n");
    text.push_str("[[rule]]\nname = \"walk\"\naction = \"deny\"\nmode = \"shadow\"\ndistinct_numbers = { per = \"range:3\", max = 20, window = \"1h\" }\n");
    text.push_str("[[rule]]\nname = \"spend\"\naction = \"deny\"\nspend = { per = \"country\", max = { EUR = 1000000 }, window = \"1h\" }\n");
    for i in 0..1000 {
        let prefixes: Vec<String> = (0..10)
            .map(|_| {
                let code = CODES[(rng.bits() % 10) as usize];
                let len = 4 + (rng.bits() % 5) as usize;
                format!(
                    "\"+{code}{}\"",
                    rng.digits(len.saturating_sub(code.len()).max(1))
                )
            })
            .collect();
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\naction = \"deny\"\nprefix = [{}]\n",
            prefixes.join(", ")
        ));
        if i % 10 == 0 {
            text.push_str("rate_limit = { key = \"number\", max = 5, window = \"10m\" }\n");
        }
    }
    text
}

fn requests(n: usize) -> Vec<VerificationRequestEvent> {
    let mut rng = Rng(7);
    (0..n)
        .map(|i| {
            let code = CODES[(rng.bits() % 10) as usize];
            VerificationRequestEvent {
                id: format!("b-{i}"),
                method: VerificationMethod::Sms,
                identity: Identity {
                    kind: Some("number".into()),
                    endpoint: format!("+{code}{}", rng.digits(9)),
                },
                price: Some(Price {
                    currency_id: Some("EUR".into()),
                    amount: Some(0.03),
                }),
                rate: None,
                reference: None,
                custom: None,
                accept_language: None,
            }
        })
        .collect()
}

fn main() {
    let policy = Arc::new(RulesPolicy::parse(&policy_text(), "bench.toml").unwrap());
    let reqs = Arc::new(requests(10_000));
    let start = Utc.with_ymd_and_hms(2026, 11, 22, 12, 0, 0).unwrap();
    // Warm the counters and the country table.
    for (i, r) in reqs.iter().enumerate() {
        policy
            .decide(
                r,
                verigate::policy::NumberHistory::New,
                start + Duration::milliseconds(i as i64),
            )
            .unwrap();
    }
    let mut criterion = Criterion::default().configure_from_args().sample_size(50);
    let mut i = 0usize;
    criterion.bench_function("decide: 10k prefixes, 1k rules, counters", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(
                policy
                    .decide(
                        &reqs[i],
                        verigate::policy::NumberHistory::New,
                        start + Duration::milliseconds(i as i64),
                    )
                    .unwrap(),
            )
        })
    });
    sample_policy(&mut criterion);
    criterion.final_summary();

    let run = |threads: usize| {
        let per_thread = 200_000;
        let started = Instant::now();
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (policy, reqs) = (Arc::clone(&policy), Arc::clone(&reqs));
                std::thread::spawn(move || {
                    for i in 0..per_thread {
                        let r = &reqs[(i * 7 + t * 13) % reqs.len()];
                        black_box(
                            policy
                                .decide(
                                    r,
                                    verigate::policy::NumberHistory::New,
                                    start + Duration::milliseconds(i as i64),
                                )
                                .unwrap(),
                        );
                    }
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
        (threads * per_thread) as f64 / started.elapsed().as_secs_f64()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one = run(1);
    let all = run(cores);
    println!(
        "throughput: 1 thread {one:.0} decisions/s ({:.0} ns each); {cores} threads {all:.0}/s; scaling {:.2}x",
        1e9 / one,
        all / one
    );
}

/// The sample policy (static and adaptive rules) on a synthetic day of traffic, warm
/// after a first pass: each iteration decides one verification and reports the outcome
/// of an allowed one, as verigate does for a request and its result.
fn sample_policy(criterion: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    let policy = RulesPolicy::load(&path).unwrap();
    let knobs = Knobs {
        warmup_days: 0,
        ..Knobs::default()
    };
    let traffic = simulate::synthetic(&knobs, simulate::SYNTHETIC_START_MS);
    let day_ms = 24 * 3_600_000;
    let mut round = 0i64;
    let mut i = 0usize;
    let mut step = |policy: &RulesPolicy| {
        let v = &traffic[i];
        let at_ms = v.at_ms + round * day_ms;
        let at = chrono::DateTime::from_timestamp_millis(at_ms).unwrap();
        let d = policy
            .decide(&v.request, verigate::policy::NumberHistory::New, at)
            .unwrap();
        if d.action == Action::Allow {
            if let Some((status, reason, after)) = &v.result {
                policy.observe_outcome(Outcome {
                    id: &v.request.id,
                    rule: d.rule.as_deref(),
                    shadow: &d.explanation.shadow,
                    status,
                    reason: reason.as_deref(),
                    at: at + Duration::milliseconds(*after),
                    book: verigate::policy::BookTaking::NotAsked,
                });
            }
        }
        i += 1;
        if i == traffic.len() {
            i = 0;
            round += 1;
        }
        black_box(d)
    };
    for _ in 0..traffic.len() {
        step(&policy);
    }
    criterion.bench_function("sample policy: decide + observe, a simulated day", |b| {
        b.iter(|| step(&policy))
    });
}
