//! Every Prometheus metric verigate exports, in one place. Label values come from small
//! fixed sets (event types, error codes, policy rule names), never from request data,
//! so cardinality stays bounded.

use std::sync::Arc;

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

use crate::events::{REQUEST_EVENT, RESULT_EVENT, SMS_DELIVERED_EVENT};

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

/// Outcome labels of `verigate_callbacks_total`.
pub mod outcome {
    pub const ACCEPTED: &str = "accepted";
    pub const DUPLICATE: &str = "duplicate";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const BAD_REQUEST: &str = "bad_request";
    pub const STORE_ERROR: &str = "store_error";
}

pub struct Metrics {
    registry: Registry,
    callbacks: Family<CallbackLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    flush_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("verigate");
        let callbacks = Family::<CallbackLabels, Counter>::default();
        registry.register(
            "callbacks",
            "Callbacks received, by event type and outcome (duplicates are not accepted twice)",
            callbacks.clone(),
        );
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "auth_failures",
            "Callbacks refused with 401, by reason code",
            auth_failures.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Request-event answers, by action and deciding rule",
            decisions.clone(),
        );
        let flush_seconds =
            Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0]);
        registry.register(
            "store_flush_seconds",
            "Duration of one group flush of the store",
            flush_seconds.clone(),
        );
        Arc::new(Self {
            registry,
            callbacks,
            auth_failures,
            decisions,
            flush_seconds,
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

    pub fn observe_flush(&self, elapsed: std::time::Duration) {
        self.flush_seconds.observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
