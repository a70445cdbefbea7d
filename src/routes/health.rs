//! Liveness, readiness and metrics (unauthenticated: they carry no personal data).

use actix_web::{web, HttpResponse};

use super::CallbackState;
use crate::{metrics::Sampled, store::Store};

/// The process is up and answering HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Ready for Sinch: the store is open and takes writes, a policy is in force and its
/// saved quarantines are back. 503 with the reason otherwise, so a load balancer sends
/// callbacks elsewhere meanwhile. `relearning` (adaptive rules still replaying the
/// store's history, in the background) does not make it unready.
pub async fn readyz(state: web::Data<CallbackState>) -> HttpResponse {
    let not_ready = state.store.not_ready();
    let body = serde_json::json!({
        "ready": not_ready.is_none(),
        "relearning": state.policy.learning().is_some_and(|l| l.relearning()),
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
        store_free: store.and_then(Store::free_space),
        store_ready: state.store.not_ready().is_none(),
        counter_keys: state.policy.learning().map_or(0, |l| l.counter_keys()),
        blocks: state
            .policy
            .quarantines()
            .map_or((0, [0; 4]), |q| q.block_stats()),
        log_lines_dropped: crate::telemetry::log_lines_dropped(),
    };
    HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .body(state.metrics.render(&sampled))
}
