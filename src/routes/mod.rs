//! The route table, in one place.

pub mod analytics;
mod api_auth;
mod callback_outcome;
mod callbacks;
mod health;
pub mod openapi;
mod policy;
mod status;
mod verifications;

use actix_web::{
    http::{header, Method},
    web, HttpRequest, HttpResponse,
};

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
        .service(api("/v1/verifications", Method::GET, analytics::list))
        .service(api(
            "/v1/verifications/{id}",
            Method::GET,
            verifications::get,
        ))
        .service(api(
            "/v1/verifications/{id}/events",
            Method::GET,
            verifications::events,
        ))
        .service(api("/v1/export", Method::GET, analytics::export))
        .service(api("/v1/stats", Method::GET, analytics::stats))
        .service(api(
            "/v1/stats/rules",
            Method::GET,
            analytics::rule_outcomes,
        ))
        .service(api("/v1/events", Method::GET, analytics::events))
        .service(api("/v1/status", Method::GET, status::status))
        .service(api("/v1/policy", Method::GET, policy::describe))
        .service(api("/v1/policy/reload", Method::POST, policy::reload_now))
        .service(api("/v1/policy/blocks", Method::GET, policy::blocks))
        .service(api("/v1/policy/flagged", Method::GET, policy::flagged))
        .service(api("/v1/policy/blocks/{key}", Method::DELETE, policy::lift))
        .service(api(
            "/v1/policy/blocks/{key}/pin",
            Method::POST,
            policy::pin,
        ))
        .service(api("/v1/openapi.json", Method::GET, openapi::serve))
        .route("/console", web::get().to(crate::console::page))
        .route("/console/", web::get().to(crate::console::page))
        .route("/console/{file}", web::get().to(crate::console::asset))
        .route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/metrics", web::get().to(health::metrics))
        .default_service(web::to(not_found));
    }
}

/// An API route that answers 405 `method_not_allowed` (with `Allow`) to any other
/// method, as docs/openapi.json promises, rather than 404 as if the path did not exist.
fn api<F, Args>(path: &str, method: Method, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    let allow = method.to_string();
    web::resource(path)
        .route(web::method(method).to(handler))
        .default_service(web::to(move |request: HttpRequest| {
            let error = ApiError::new(
                ErrorCode::MethodNotAllowed,
                format!("{} is not a method of {}", request.method(), request.path()),
            );
            let mut response = error.error_response_json();
            if let Ok(allow) = header::HeaderValue::from_str(&allow) {
                response.headers_mut().insert(header::ALLOW, allow);
            }
            std::future::ready(response)
        }))
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
