//! Every Prometheus metric verigate exports, in one place. Label values come from small
//! fixed sets (event types, error codes, route patterns, policy rule names), never from
//! request data, so cardinality stays bounded. docs/operations.md explains each metric.

use std::sync::Arc;

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    events::{REQUEST_EVENT, RESULT_EVENT, SMS_DELIVERED_EVENT},
    policy::adaptive::BlockChange,
    store::StoreObserver,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallbackLabels {
    pub event: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub action: &'static str,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The matched route pattern (e.g. `/v1/verifications/{id}`), or `unmatched`.
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub version: String,
}

/// What [`Metrics::render`] writes: OpenMetrics text (`# EOF`, counter families named
/// without `_total`), which classic-format parsers misread as untyped samples.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Outcome labels of `verigate_callbacks_total`.
pub mod outcome {
    pub const ACCEPTED: &str = "accepted";
    pub const DUPLICATE: &str = "duplicate";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const STORE_ERROR: &str = "store_error";
}

/// Seconds; Sinch waits for request-event answers, so the interesting range is sub-second.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    callbacks: Family<CallbackLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    deadline_exceeded: Counter,
    requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    flush_seconds: Histogram,
    commit_events: Histogram,
    checkpoint_seconds: Histogram,
    write_failures: Family<StageLabels, Counter>,
    store_size_bytes: Gauge,
    store_free_bytes: Gauge,
    store_open: Gauge,
    store_ready: Gauge,
    log_lines_dropped: Counter,
    /// Dropped log lines already counted (the writer keeps a total).
    log_lines_dropped_seen: std::sync::atomic::AtomicU64,
    policy_loads: Family<OutcomeLabels, Counter>,
    policy_info: Family<VersionLabels, Gauge>,
    counter_keys: Gauge,
    blocks: Gauge,
    block_changes: Family<ChangeLabels, Counter>,
    /// Block changes already counted: the policy keeps totals, the counter gets deltas.
    block_changes_seen: std::sync::Mutex<[u64; 4]>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut r = Registry::with_prefix("verigate");
        let callbacks = Family::<CallbackLabels, Counter>::default();
        r.register(
            "callbacks",
            "Callbacks received, by event type and outcome (a duplicate is not accepted twice)",
            callbacks.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        r.register(
            "auth_failures",
            "Callbacks refused with 401, by reason code",
            auth_failures.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        r.register(
            "decisions",
            "Request-event answers, by action and deciding rule",
            decisions.clone(),
        );
        let deadline_exceeded = Counter::default();
        r.register(
            "decision_deadline_exceeded",
            "Request events answered on_error because the policy missed the decision deadline",
            deadline_exceeded.clone(),
        );
        let requests = Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        r.register(
            "http_request_duration_seconds",
            "Time from request received to response ready, by route and status",
            requests.clone(),
        );
        let flush_seconds = latency_histogram();
        r.register(
            "store_flush_seconds",
            "Duration of one group commit: writing and syncing a batch of events to the write-ahead log",
            flush_seconds.clone(),
        );
        let commit_events = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]);
        r.register(
            "store_commit_events",
            "Events made durable by one group commit (one write-ahead-log sync)",
            commit_events.clone(),
        );
        let checkpoint_seconds = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        r.register(
            "store_checkpoint_seconds",
            "Duration of one checkpoint: moving committed events from memory into the index",
            checkpoint_seconds.clone(),
        );
        let write_failures = Family::<StageLabels, Counter>::default();
        r.register(
            "store_write_failures",
            "Store writes that failed, by stage (wal, checkpoint); the store recovers by itself once the cause is gone",
            write_failures.clone(),
        );
        // Shown as 0 from the start, so that a dashboard draws a line, not "no data".
        for stage in ["wal", "checkpoint"] {
            drop(write_failures.get_or_create(&StageLabels { stage }));
        }
        let store_ready = Gauge::default();
        r.register(
            "store_ready",
            "1 while the store takes writes, 0 while it is not open or writes fail",
            store_ready.clone(),
        );
        let log_lines_dropped = Counter::default();
        r.register(
            "log_lines_dropped",
            "Log lines dropped because the log output could not keep up",
            log_lines_dropped.clone(),
        );
        let store_size_bytes = Gauge::default();
        r.register(
            "store_size_bytes",
            "Bytes the store occupies on disk",
            store_size_bytes.clone(),
        );
        let store_free_bytes = Gauge::default();
        r.register(
            "store_disk_free_bytes",
            "Bytes free on the store's volume for an unprivileged writer, sampled at scrape",
            store_free_bytes.clone(),
        );
        let store_open = Gauge::default();
        r.register(
            "store_open",
            "1 once the store is open, else 0",
            store_open.clone(),
        );
        let policy_loads = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "policy_loads",
            "Policy loads and reloads, by outcome (ok/failed)",
            policy_loads.clone(),
        );
        let policy_info = Family::<VersionLabels, Gauge>::default();
        r.register(
            "policy_info",
            "1 for the version of the policy in force",
            policy_info.clone(),
        );
        let counter_keys = Gauge::default();
        r.register(
            "rate_limit_keys",
            "Keys held by the policy's rate_limit, distinct_numbers and spend counters",
            counter_keys.clone(),
        );
        let blocks = Gauge::default();
        r.register(
            "policy_blocks",
            "Keys in automatic quarantine now (adaptive rules)",
            blocks.clone(),
        );
        let block_changes = Family::<ChangeLabels, Counter>::default();
        r.register(
            "policy_block_changes",
            "Quarantine changes: blocked, expired, lifted, pinned",
            block_changes.clone(),
        );
        Arc::new(Self {
            counter_keys,
            blocks,
            block_changes,
            block_changes_seen: std::sync::Mutex::new([0; 4]),
            registry: r,
            callbacks,
            auth_failures,
            decisions,
            deadline_exceeded,
            requests,
            flush_seconds,
            commit_events,
            checkpoint_seconds,
            write_failures,
            store_size_bytes,
            store_free_bytes,
            store_open,
            store_ready,
            log_lines_dropped,
            log_lines_dropped_seen: std::sync::atomic::AtomicU64::new(0),
            policy_loads,
            policy_info,
        })
    }

    pub fn callback(&self, event_type: Option<&str>, outcome: &'static str) {
        let event = match event_type {
            Some(REQUEST_EVENT) => REQUEST_EVENT,
            Some(RESULT_EVENT) => RESULT_EVENT,
            Some(SMS_DELIVERED_EVENT) => SMS_DELIVERED_EVENT,
            Some(_) => "other",
            None => "unparsed",
        };
        self.callbacks
            .get_or_create(&CallbackLabels { event, outcome })
            .inc();
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.callback(None, outcome::UNAUTHORIZED);
    }

    pub fn decision(&self, action: &'static str, rule: &str) {
        self.decisions
            .get_or_create(&DecisionLabels {
                action,
                rule: rule.to_owned(),
            })
            .inc();
    }

    pub fn deadline_exceeded(&self) {
        self.deadline_exceeded.inc();
    }

    pub fn observe_request(&self, route: &str, status: u16, elapsed: std::time::Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status: status.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn policy_loaded(&self, version: &str) {
        self.policy_loads
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .inc();
        self.policy_info.clear();
        self.policy_info
            .get_or_create(&VersionLabels {
                version: version.to_owned(),
            })
            .set(1);
    }

    pub fn policy_load_failed(&self) {
        self.policy_loads
            .get_or_create(&OutcomeLabels { outcome: "failed" })
            .inc();
    }

    /// The OpenMetrics text exposition (served as [`CONTENT_TYPE`]), with the values
    /// sampled at scrape time.
    pub fn render(&self, sampled: &Sampled) -> String {
        let Sampled {
            store_size,
            store_free,
            store_ready,
            counter_keys,
            blocks: (blocks, changes),
            log_lines_dropped,
        } = *sampled;
        let seen = self
            .log_lines_dropped_seen
            .fetch_max(log_lines_dropped, std::sync::atomic::Ordering::SeqCst);
        self.log_lines_dropped
            .inc_by(log_lines_dropped.saturating_sub(seen));
        self.store_ready.set(i64::from(store_ready));
        self.blocks.set(i64::try_from(blocks).unwrap_or(i64::MAX));
        if let Ok(mut seen) = self.block_changes_seen.lock() {
            for (i, change) in BlockChange::ALL.into_iter().enumerate() {
                let delta = changes[i].saturating_sub(seen[i]);
                self.block_changes
                    .get_or_create(&ChangeLabels {
                        change: change.as_str(),
                    })
                    .inc_by(delta);
                seen[i] = seen[i].max(changes[i]);
            }
        }
        self.counter_keys
            .set(i64::try_from(counter_keys).unwrap_or(i64::MAX));
        self.store_open.set(i64::from(store_size.is_some()));
        if let Some(size) = store_size {
            self.store_size_bytes
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
        if let Some(free) = store_free {
            self.store_free_bytes
                .set(i64::try_from(free).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Values read from other parts of verigate when /metrics is scraped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sampled {
    /// `None` while the store is not open.
    pub store_size: Option<u64>,
    /// `None` while the store is not open or is not on a local disk.
    pub store_free: Option<u64>,
    pub store_ready: bool,
    pub counter_keys: usize,
    /// Active blocks, and blocks/expiries/lifts/pins since start.
    pub blocks: (usize, [u64; 4]),
    pub log_lines_dropped: u64,
}

impl StoreObserver for Metrics {
    fn committed(&self, elapsed: std::time::Duration, events: usize) {
        self.flush_seconds.observe(elapsed.as_secs_f64());
        self.commit_events.observe(events as f64);
    }

    fn write_failed(&self, stage: &'static str) {
        self.write_failures
            .get_or_create(&StageLabels { stage })
            .inc();
    }

    fn checkpointed(&self, elapsed: std::time::Duration) {
        self.checkpoint_seconds.observe(elapsed.as_secs_f64());
    }
}

impl crate::policy::reload::ReloadObserver for Metrics {
    fn loaded(&self, version: &str) {
        self.policy_loaded(version);
    }

    fn load_failed(&self) {
        self.policy_load_failed();
    }
}
