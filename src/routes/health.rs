//! Liveness, readiness and metrics (unauthenticated: they carry no personal data).

use actix_web::{web, HttpResponse};

use super::CallbackState;
use crate::metrics::Sampled;

/// The process is up and answering HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Ready for Sinch: the store is open and takes writes, and a policy is in force. 503
/// with the reason otherwise, so a load balancer sends callbacks elsewhere meanwhile.
pub async fn readyz(state: web::Data<CallbackState>) -> HttpResponse {
    let not_ready = state.store.not_ready();
    let body = serde_json::json!({
        "ready": not_ready.is_none(),
        "checks": {
            "store": not_ready.as_deref().unwrap_or("ok"),
            "policy": format!("ok, version {}", state.policy.version()),
        },
    });
    match not_ready {
        None => HttpResponse::Ok().json(body),
        Some(_) => HttpResponse::ServiceUnavailable().json(body),
    }
}

pub async fn metrics(state: web::Data<CallbackState>) -> HttpResponse {
    let store = state.store.get();
    let sampled = Sampled {
        store_size: store.map(|s| s.size_on_disk().unwrap_or(0)),
        store_ready: state.store.not_ready().is_none(),
        counter_keys: state.policy.counter_keys(),
        blocks: state.policy.block_stats(),
        log_lines_dropped: crate::telemetry::log_lines_dropped(),
    };
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(&sampled))
}
