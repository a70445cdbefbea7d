//! What happened to one callback, as a value: the handler works out a
//! [`CallbackOutcome`], and [`CallbackOutcome::finish`] is the one place that turns it
//! into the metrics, the span fields, the one log line and the HTTP answer.

use actix_web::HttpResponse;
use tracing_actix_web::RootSpan;

use crate::{
    decision::PolicyDecision,
    error::{ApiError, ErrorCode},
    events::{Action, CallbackResponse, REQUEST_EVENT},
    metrics::{outcome, Metrics},
    telemetry::redact_numbers,
};

/// How one callback ended.
// One short-lived value per callback, moved once: boxing the decision would only add an
// allocation to every request event.
#[allow(clippy::large_enum_variant)]
pub enum CallbackOutcome<'a> {
    /// Not signed as Sinch signs (401); nothing was stored.
    Unauthenticated {
        reason: &'static str,
        error: ApiError,
    },
    /// Unreadable or not a callback (4xx); nothing was stored.
    BadRequest {
        event_type: Option<&'a str>,
        error: ApiError,
    },
    /// A request event decided and recorded; `rule` as counted (`default`, `on_error`).
    Answered {
        decision: PolicyDecision,
        rule: String,
        answer: serde_json::Value,
    },
    /// Any other event, recorded.
    Recorded { event_type: &'a str, unknown: bool },
    /// A delivery of an event already recorded: given the first delivery's answer.
    Duplicate {
        event_type: &'a str,
        answer: Option<serde_json::Value>,
    },
    /// The store could not take a request event: the policy's `on_error`, unrecorded.
    RequestNotRecorded { on_error: Action, error: String },
    /// The store could not take any other event: 503, so that Sinch retries it.
    NotRecorded { event_type: &'a str, error: String },
}

/// Store failures are logged once per interval (each callback's own line still says
/// what it was answered): an outage fails every callback alike.
static STORE_FAILURES: crate::telemetry::OncePer =
    crate::telemetry::OncePer::new(std::time::Duration::from_secs(10));

impl CallbackOutcome<'_> {
    pub fn finish(self, metrics: &Metrics, span: &RootSpan) -> HttpResponse {
        match self {
            Self::Unauthenticated { reason, error } => {
                metrics.auth_failure(reason);
                span.record("error_code", reason);
                tracing::warn!(reason, "callback refused: {}", error.message);
                error.error_response_json()
            }
            Self::BadRequest { event_type, error } => {
                metrics.callback(event_type, outcome::BAD_REQUEST);
                span.record("error_code", error.code.as_str());
                // Parser messages can quote body values; a phone number must not reach the log.
                tracing::warn!(
                    code = error.code.as_str(),
                    "callback refused: {}",
                    redact_numbers(&error.message)
                );
                error.error_response_json()
            }
            Self::Answered {
                decision,
                rule,
                answer,
            } => {
                let action = decision.action.as_str();
                metrics.callback(Some(REQUEST_EVENT), outcome::ACCEPTED);
                metrics.decision(action, &rule);
                for matched in &decision.explanation.shadow {
                    metrics.shadow_match(matched.would.as_str(), &matched.rule);
                }
                for spared in &decision.spared {
                    metrics.returning_spared(spared);
                }
                span.record("decision", action);
                span.record("rule", rule.as_str());
                log_decision(&decision, &rule);
                HttpResponse::Ok().json(answer)
            }
            Self::Recorded {
                event_type,
                unknown,
            } => {
                metrics.callback(Some(event_type), outcome::ACCEPTED);
                if unknown {
                    tracing::warn!("unknown event type: stored raw and acknowledged");
                } else {
                    tracing::info!("event recorded");
                }
                HttpResponse::Ok().finish()
            }
            Self::Duplicate { event_type, answer } => {
                metrics.callback(Some(event_type), outcome::DUPLICATE);
                match answer {
                    Some(answer) => {
                        tracing::info!("duplicate request event: answered as the first time");
                        HttpResponse::Ok().json(answer)
                    }
                    None => {
                        tracing::info!("duplicate event: already recorded");
                        HttpResponse::Ok().finish()
                    }
                }
            }
            Self::RequestNotRecorded { on_error, error } => {
                metrics.callback(Some(REQUEST_EVENT), outcome::STORE_ERROR);
                metrics.decision(on_error.as_str(), "on_error");
                span.record("decision", on_error.as_str());
                span.record("rule", "on_error");
                if let Some(held_back) = STORE_FAILURES.due() {
                    tracing::error!(error.message = %error, held_back, "recording a request event failed; answering on_error");
                }
                HttpResponse::Ok().json(CallbackResponse::bare(on_error))
            }
            Self::NotRecorded { event_type, error } => {
                metrics.callback(Some(event_type), outcome::STORE_ERROR);
                span.record("error_code", ErrorCode::StoreUnavailable.as_str());
                if let Some(held_back) = STORE_FAILURES.due() {
                    tracing::error!(error.message = %error, held_back, "recording an event failed; not acknowledged");
                }
                ApiError::new(
                    ErrorCode::StoreUnavailable,
                    format!("the event could not be stored; retry later ({error})"),
                )
                .error_response_json()
            }
        }
    }
}

/// One line per decision with its explanation (the number itself stays out).
fn log_decision(decision: &PolicyDecision, rule: &str) {
    let e = &decision.explanation;
    let shadow: Vec<String> = e
        .shadow
        .iter()
        .map(|m| format!("{}:{}", m.rule, m.would))
        .collect();
    tracing::info!(
        decision = decision.action.as_str(),
        rule,
        reason = %decision.reason,
        shadow = %shadow.join(","),
        country = e.country.as_deref().unwrap_or(""),
        matched_prefix = e.matched_prefix.as_deref().unwrap_or(""),
        policy_version = %e.policy_version,
        eval_ns = e.eval_ns,
        "request event answered"
    );
}
