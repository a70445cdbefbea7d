//! Per-callback costs, each on its own: signature verification, event parsing, the sample
//! policy's decision, and one durable record write with nothing else queued (one
//! write-ahead-log sync). (The policy decision has its own bench with a large rule set:
//! `cargo bench --bench policy`.)
//!
//! `cargo bench --bench micro`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use criterion::{black_box, BatchSize, Criterion};
use verigate::{
    client::{sample_body, signed_headers, sinch_timestamp, Sample, SampleKind, CONTENT_TYPE},
    events::VerificationEvent,
    signature::{AppCredentials, Freshness, Keyring, SignedRequest},
    store::{IncomingEvent, Store, StoreOptions, Unobserved},
};

const KEY: &str = "669E367E-6BBA-48AB-AF15-266871C28135";
const SECRET: &str = "BeIukql3pTKJ8RGL5zo0DA==";
const PATH: &str = "/sinch/verification";

fn body(kind: SampleKind, id: &str) -> String {
    sample_body(&Sample {
        kind,
        id,
        number: "+46700000001",
        method: "sms",
        status: "SUCCESSFUL",
    })
}

fn signature(c: &mut Criterion) {
    let app = AppCredentials::new(KEY, SECRET, false).unwrap();
    let keyring = Keyring::new([app.clone()]);
    let now: DateTime<Utc> = Utc::now();
    let timestamp = sinch_timestamp(now);
    let body = body(SampleKind::Request, "sig-1");
    let headers = signed_headers(&app, PATH, body.as_bytes(), CONTENT_TYPE, &timestamp);
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_bytes())
    };
    let request = SignedRequest {
        method: "POST",
        path: PATH,
        content_type: header("content-type"),
        timestamp: header("x-timestamp"),
        authorization: header("authorization"),
        body: body.as_bytes(),
    };
    let freshness = Freshness {
        now,
        max_skew: Some(std::time::Duration::from_secs(600)),
    };
    assert!(keyring.verify(&request, freshness).is_ok());
    c.bench_function("signature/verify a request event", |b| {
        b.iter(|| keyring.verify(black_box(&request), freshness).is_ok())
    });
}

fn parsing(c: &mut Criterion) {
    for (name, kind) in [
        ("request", SampleKind::Request),
        ("result", SampleKind::Result),
        ("sms-delivered", SampleKind::SmsDelivered),
    ] {
        let body = body(kind, "parse-1");
        c.bench_function(&format!("events/parse {name}"), |b| {
            b.iter(|| VerificationEvent::parse(black_box(body.as_bytes())).unwrap())
        });
    }
}

/// The shipped sample policy, adaptive rules included: every allowed request is tracked
/// for them, and a result is counted per key.
fn sample_policy(c: &mut Criterion) {
    use verigate::events::{Identity, Price, VerificationMethod, VerificationRequestEvent};
    use verigate::policy::{Learning, Outcome, Policy, RulesPolicy};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    let policy = RulesPolicy::load(&path).unwrap();
    let start = Utc::now();
    let mut n = 0u64;
    c.bench_function("policy/decide and observe the result, sample policy", |b| {
        b.iter(|| {
            n += 1;
            let id = format!("bench-{n}");
            let request = VerificationRequestEvent {
                id: id.clone(),
                method: VerificationMethod::parse("sms"),
                identity: Identity {
                    kind: Some("number".into()),
                    endpoint: format!("+4670{:07}", n % 10_000_000),
                },
                price: Some(Price {
                    currency_id: Some("EUR".into()),
                    amount: Some(0.05),
                }),
                rate: None,
                reference: None,
                custom: None,
                accept_language: None,
            };
            let now = start + chrono::Duration::milliseconds(n as i64);
            let d = policy
                .decide(
                    black_box(&request),
                    verigate::policy::NumberHistory::New,
                    now,
                )
                .unwrap();
            policy.observe_outcome(Outcome {
                id: &id,
                rule: d.rule.as_deref(),
                shadow: &d.explanation.shadow,
                status: "SUCCESSFUL",
                reason: None,
                at: now,
                book: verigate::policy::BookTaking::NotAsked,
            });
            d.action
        })
    });
}

/// One result event written by one writer, awaiting what `durability` promises.
fn record_writes(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("store/record");
    group.sample_size(30);
    let dir = tempfile::tempdir().unwrap();
    let store = runtime.block_on(async {
        Store::open(
            &StoreOptions::at(dir.path().join("db")),
            std::sync::Arc::new(Unobserved),
        )
        .unwrap()
    });
    let mut n = 0u64;
    group.bench_function("durable, one writer", |b| {
        b.iter_batched(
            || {
                n += 1;
                body(SampleKind::Result, &format!("write-{n}")).into_bytes()
            },
            |raw| {
                let event = VerificationEvent::parse(&raw).unwrap();
                runtime
                    .block_on(store.record_once(IncomingEvent {
                        event: &event,
                        raw: &raw,
                        app_key: KEY,
                        received_at: Utc::now(),
                        decision: None,
                        book: None,
                    }))
                    .unwrap()
            },
            BatchSize::SmallInput,
        )
    });
    runtime.block_on(store.shutdown()).unwrap();
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    signature(&mut criterion);
    parsing(&mut criterion);
    sample_policy(&mut criterion);
    record_writes(&mut criterion);
    criterion.final_summary();
}
