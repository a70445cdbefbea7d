//! `GET /v1/status`: the service as the caller sees it, for the console's first screen.

use actix_web::{web, HttpResponse};

use super::{ApiCaller, CallbackState};

/// Which token the caller holds (so a console shows actions only to admins), the store
/// and the policy in force. Any token may read it.
pub async fn status(caller: ApiCaller, state: web::Data<CallbackState>) -> HttpResponse {
    let (store, problem) = (state.store.get(), state.store.not_ready());
    HttpResponse::Ok().json(serde_json::json!({
        "role": caller.role,
        "service": { "version": env!("CARGO_PKG_VERSION"), "now": state.clock.now() },
        "store": {
            "ready": problem.is_none(),
            "problem": problem,
            // Null where the engine keeps its data elsewhere (PostgreSQL).
            "size_bytes": store.and_then(|s| s.size_on_disk()),
            "disk_free_bytes": store.and_then(|s| s.free_space()),
        },
        "policy": { "version": state.policy.version() },
    }))
}
