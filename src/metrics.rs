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
pub struct RuleLabels {
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

/// A stage of answering a request event, as `verigate_request_event_stage_seconds` labels
/// it: where the answer spends its time, so that a slow answer shows what to look at.
/// Each value is the index of its histogram (and its place in `ALL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStage {
    /// The check for a delivery already stored or in flight; with replicas, the claim on
    /// the event in the database.
    Admit = 0,
    /// The policy's decision; with replicas, its counters' round trips.
    Decide = 1,
    /// The durable write of the event and its decision, with what the policy writes for it.
    Record = 2,
}

impl RequestStage {
    const ALL: [Self; 3] = [Self::Admit, Self::Decide, Self::Record];

    fn label(self) -> &'static str {
        match self {
            Self::Admit => "admit",
            Self::Decide => "decide",
            Self::Record => "record",
        }
    }
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
    http: HttpMetrics,
    store: StoreMetrics,
    policy: PolicyMetrics,
    log_lines_dropped: Counter,
    /// Dropped log lines already counted (the writer keeps a total).
    log_lines_dropped_seen: std::sync::atomic::AtomicU64,
    /// Block changes already counted: the policy keeps totals, the counter gets deltas.
    block_changes_seen: std::sync::Mutex<[u64; 4]>,
}

/// Callbacks, their answers, and every HTTP request's latency.
struct HttpMetrics {
    callbacks: Family<CallbackLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    shadow_matches: Family<DecisionLabels, Counter>,
    returning_spared: Family<RuleLabels, Counter>,
    deadline_exceeded: Counter,
    requests: Family<RequestLabels, Histogram, fn() -> Histogram>,
    /// One histogram per stage, in [`RequestStage::ALL`] order (the family's, held here so
    /// that an observation looks nothing up).
    request_stages: [Histogram; 3],
}

/// The store's commits, checkpoints, failures, size and state.
struct StoreMetrics {
    flush_seconds: Histogram,
    commit_events: Histogram,
    checkpoint_seconds: Histogram,
    write_failures: Family<StageLabels, Counter>,
    store_size_bytes: Gauge,
    store_free_bytes: Gauge,
    store_open: Gauge,
    store_ready: Gauge,
}

/// The policy in force, its counters and its quarantines.
struct PolicyMetrics {
    policy_loads: Family<OutcomeLabels, Counter>,
    policy_info: Family<VersionLabels, Gauge>,
    counter_keys: Gauge,
    blocks: Gauge,
    block_changes: Family<ChangeLabels, Counter>,
}

/// Registers metrics under the `verigate` prefix, handing each back to be kept.
struct Registrar<'a>(&'a mut Registry);

impl Registrar<'_> {
    fn add<M: prometheus_client::registry::Metric + Clone>(
        &mut self,
        name: &str,
        help: &str,
        metric: M,
    ) -> M {
        self.0.register(name, help, metric.clone());
        metric
    }
}

impl HttpMetrics {
    fn register(add: &mut Registrar<'_>) -> Self {
        let request_stages: Family<StageLabels, Histogram, fn() -> Histogram> = add.add(
            "request_event_stage_seconds",
            "Time a request event's answer spends in each stage: admit (the duplicate check; \
             with replicas, the claim), decide (the policy), record (the durable write)",
            Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        );
        // Every stage from the start, so that a dashboard draws each one.
        let request_stages = RequestStage::ALL.map(|stage| {
            request_stages
                .get_or_create(&StageLabels {
                    stage: stage.label(),
                })
                .clone()
        });
        Self {
            request_stages,
            callbacks: add.add(
                "callbacks",
                "Callbacks received, by event type and outcome (a duplicate is not accepted twice)",
                Family::default(),
            ),
            auth_failures: add.add(
                "auth_failures",
                "Callbacks refused with 401, by reason code",
                Family::default(),
            ),
            decisions: add.add(
                "decisions",
                "Request-event answers, by action and deciding rule",
                Family::default(),
            ),
            shadow_matches: add.add(
                "shadow_matches",
                "Request events a shadow rule matched, by rule and what it would have answered \
                 (it decided nothing): a shadow surge rule's rise is an attack no rule may deny",
                Family::default(),
            ),
            returning_spared: add.add(
                "returning_spared",
                "Request events a deny rule let go on because the number's latest verification \
                 succeeded (spare_returning), by rule",
                Family::default(),
            ),
            deadline_exceeded: add.add(
                "decision_deadline_exceeded",
                "Request events answered on_error because the policy missed the decision deadline",
                Counter::default(),
            ),
            requests: add.add(
                "http_request_duration_seconds",
                "Time from request received to response ready, by route and status",
                Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ),
        }
    }
}

impl StoreMetrics {
    fn register(add: &mut Registrar<'_>) -> Self {
        let write_failures: Family<StageLabels, Counter> = add.add(
            "store_write_failures",
            "Store writes that failed, by stage (wal, checkpoint); the store recovers by itself once the cause is gone",
            Family::default(),
        );
        // Shown as 0 from the start, so that a dashboard draws a line, not "no data".
        for stage in ["wal", "checkpoint"] {
            drop(write_failures.get_or_create(&StageLabels { stage }));
        }
        Self {
            flush_seconds: add.add(
                "store_flush_seconds",
                "Duration of one group commit: writing and syncing a batch of events to the write-ahead log",
                latency_histogram(),
            ),
            commit_events: add.add(
                "store_commit_events",
                "Events made durable by one group commit (one write-ahead-log sync)",
                Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            ),
            checkpoint_seconds: add.add(
                "store_checkpoint_seconds",
                "Duration of one checkpoint: moving committed events from memory into the index",
                Histogram::new([0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            ),
            write_failures,
            store_ready: add.add(
                "store_ready",
                "1 while the store takes writes, 0 while it is not open or writes fail",
                Gauge::default(),
            ),
            store_size_bytes: add.add(
                "store_size_bytes",
                "Bytes the store occupies on disk",
                Gauge::default(),
            ),
            store_free_bytes: add.add(
                "store_disk_free_bytes",
                "Bytes free on the store's volume for an unprivileged writer, sampled at scrape",
                Gauge::default(),
            ),
            store_open: add.add(
                "store_open",
                "1 once the store is open, else 0",
                Gauge::default(),
            ),
        }
    }
}

impl PolicyMetrics {
    fn register(add: &mut Registrar<'_>) -> Self {
        Self {
            policy_loads: add.add(
                "policy_loads",
                "Policy loads and reloads, by outcome (ok/failed)",
                Family::default(),
            ),
            policy_info: add.add(
                "policy_info",
                "1 for the version of the policy in force",
                Family::default(),
            ),
            counter_keys: add.add(
                "rate_limit_keys",
                "Keys held by the policy's rate_limit, distinct_numbers and spend counters",
                Gauge::default(),
            ),
            blocks: add.add(
                "policy_blocks",
                "Keys in automatic quarantine now (adaptive rules)",
                Gauge::default(),
            ),
            block_changes: add.add(
                "policy_block_changes",
                "Quarantine changes: blocked, expired, lifted, pinned",
                Family::default(),
            ),
        }
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("verigate");
        let mut add = Registrar(&mut registry);
        let http = HttpMetrics::register(&mut add);
        let store = StoreMetrics::register(&mut add);
        let policy = PolicyMetrics::register(&mut add);
        let log_lines_dropped = add.add(
            "log_lines_dropped",
            "Log lines dropped because the log output could not keep up",
            Counter::default(),
        );
        Arc::new(Self {
            registry,
            http,
            store,
            policy,
            log_lines_dropped,
            log_lines_dropped_seen: std::sync::atomic::AtomicU64::new(0),
            block_changes_seen: std::sync::Mutex::new([0; 4]),
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
        self.http
            .callbacks
            .get_or_create(&CallbackLabels { event, outcome })
            .inc();
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.http
            .auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.callback(None, outcome::UNAUTHORIZED);
    }

    pub fn decision(&self, action: &'static str, rule: &str) {
        self.http
            .decisions
            .get_or_create(&DecisionLabels {
                action,
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// A shadow rule matched a request event: `would` is what it would have answered.
    pub fn shadow_match(&self, would: &'static str, rule: &str) {
        self.http
            .shadow_matches
            .get_or_create(&DecisionLabels {
                action: would,
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// A deny rule let a returning number go on (`spare_returning`).
    pub fn returning_spared(&self, rule: &str) {
        self.http
            .returning_spared
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc();
    }

    pub fn deadline_exceeded(&self) {
        self.http.deadline_exceeded.inc();
    }

    /// Time spent in one stage of answering a request event.
    pub fn observe_request_stage(&self, stage: RequestStage, elapsed: std::time::Duration) {
        self.http.request_stages[stage as usize].observe(elapsed.as_secs_f64());
    }

    pub fn observe_request(&self, route: &str, status: u16, elapsed: std::time::Duration) {
        self.http
            .requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                status: status.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn policy_loaded(&self, version: &str) {
        self.policy
            .policy_loads
            .get_or_create(&OutcomeLabels { outcome: "ok" })
            .inc();
        self.policy.policy_info.clear();
        self.policy
            .policy_info
            .get_or_create(&VersionLabels {
                version: version.to_owned(),
            })
            .set(1);
    }

    pub fn policy_load_failed(&self) {
        self.policy
            .policy_loads
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
        self.store.store_ready.set(i64::from(store_ready));
        self.policy
            .blocks
            .set(i64::try_from(blocks).unwrap_or(i64::MAX));
        if let Ok(mut seen) = self.block_changes_seen.lock() {
            for (i, change) in BlockChange::ALL.into_iter().enumerate() {
                let delta = changes[i].saturating_sub(seen[i]);
                self.policy
                    .block_changes
                    .get_or_create(&ChangeLabels {
                        change: change.as_str(),
                    })
                    .inc_by(delta);
                seen[i] = seen[i].max(changes[i]);
            }
        }
        self.policy
            .counter_keys
            .set(i64::try_from(counter_keys).unwrap_or(i64::MAX));
        self.store.store_open.set(i64::from(store_size.is_some()));
        if let Some(size) = store_size {
            self.store
                .store_size_bytes
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
        if let Some(free) = store_free {
            self.store
                .store_free_bytes
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
        self.store.flush_seconds.observe(elapsed.as_secs_f64());
        self.store.commit_events.observe(events as f64);
    }

    fn write_failed(&self, stage: &'static str) {
        self.store
            .write_failures
            .get_or_create(&StageLabels { stage })
            .inc();
    }

    fn checkpointed(&self, elapsed: std::time::Duration) {
        self.store.checkpoint_seconds.observe(elapsed.as_secs_f64());
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
