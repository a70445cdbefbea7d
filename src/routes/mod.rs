//! The route table, in one place.

pub mod analytics;
mod api_auth;
mod callback_outcome;
mod callbacks;
mod health;
mod policy;
mod status;
mod verifications;

use actix_web::{web, HttpResponse};

pub use api_auth::{AdminCaller, ApiCaller, Role};
pub use callbacks::CallbackState;

use crate::error::{ApiError, ErrorCode};

/// Registers every route; `callback_path` is where Sinch posts callbacks.
pub fn configure(callback_path: String) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.service(
            web::resource(callback_path)
                .route(web::post().to(callbacks::receive))
                .default_service(web::to(method_not_allowed)),
        )
        .route("/v1/verifications", web::get().to(analytics::list))
        .route("/v1/verifications/{id}", web::get().to(verifications::get))
        .route(
            "/v1/verifications/{id}/events",
            web::get().to(verifications::events),
        )
        .route("/v1/export", web::get().to(analytics::export))
        .route("/v1/stats", web::get().to(analytics::stats))
        .route("/v1/stats/rules", web::get().to(analytics::rule_outcomes))
        .route("/v1/events", web::get().to(analytics::events))
        .route("/v1/status", web::get().to(status::status))
        .route("/v1/policy", web::get().to(policy::describe))
        .route("/v1/policy/reload", web::post().to(policy::reload_now))
        .route("/v1/policy/blocks", web::get().to(policy::blocks))
        .route("/v1/policy/blocks/{key}", web::delete().to(policy::lift))
        .route("/v1/policy/blocks/{key}/pin", web::post().to(policy::pin))
        .route("/console", web::get().to(crate::console::page))
        .route("/console/", web::get().to(crate::console::page))
        .route("/console/{file}", web::get().to(crate::console::asset))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics))
        .default_service(web::to(not_found));
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(ErrorCode::NotFound, "no such endpoint"))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        ErrorCode::MethodNotAllowed,
        "callbacks must be POSTed",
    ))
}

/// The API tokens as handlers see them.
pub fn api_token(
    admin: Option<secrecy::SecretString>,
    read: Option<secrecy::SecretString>,
) -> api_auth::ApiToken {
    api_auth::ApiToken { admin, read }
}
