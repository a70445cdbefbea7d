//! Liveness, readiness and metrics (unauthenticated: they carry no personal data).

use actix_web::{web, HttpResponse};

use super::CallbackState;

/// The process is up and answering HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Ready for Sinch: the store is open and a policy is in force. 503 until then.
pub async fn readyz(state: web::Data<CallbackState>) -> HttpResponse {
    let store = match (state.store.get(), state.store.waiting_on()) {
        (Some(_), _) => "ok".to_owned(),
        (None, Some(why)) => format!("not open: {why}"),
        (None, None) => "opening".to_owned(),
    };
    let ready = state.store.get().is_some();
    let body = serde_json::json!({
        "ready": ready,
        "checks": { "store": store, "policy": format!("ok, version {}", state.policy.version()) },
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: web::Data<CallbackState>) -> HttpResponse {
    let size = state.store.get().and_then(|s| s.size_on_disk().ok());
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render(
            size,
            state.policy.counter_keys(),
            state.policy.block_stats(),
        ))
}
