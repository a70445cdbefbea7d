//! Liveness and metrics endpoints (unauthenticated: they carry no personal data).

use actix_web::{web, HttpResponse};

use super::CallbackState;

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

pub async fn metrics(state: web::Data<CallbackState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
