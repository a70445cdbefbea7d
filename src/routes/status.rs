//! `GET /v1/status`: the service as the caller sees it, for the console's first screen.

use actix_web::{web, HttpResponse};

use chrono::{DateTime, Utc};

use super::{ApiCaller, CallbackState, Role};

/// Which token the caller holds (so a console shows actions only to admins), the store
/// and the policy in force. Any token may read it.
pub async fn status(caller: ApiCaller, state: web::Data<CallbackState>) -> HttpResponse {
    let (store, problem) = (state.store.get(), state.store.not_ready());
    HttpResponse::Ok().json(ServiceStatus {
        role: caller.role,
        service: ServiceVersion {
            version: env!("CARGO_PKG_VERSION"),
            now: state.clock.now(),
        },
        store: StoreStatus {
            ready: problem.is_none(),
            problem,
            size_bytes: store.and_then(|s| s.size_on_disk()),
            disk_free_bytes: store.and_then(|s| s.free_space()),
        },
        policy: PolicyVersion {
            version: state.policy.version(),
        },
    })
}

#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct ServiceStatus {
    /// The caller's token: `admin` may reload the policy and lift or pin blocks.
    pub role: Role,
    pub service: ServiceVersion,
    pub store: StoreStatus,
    pub policy: PolicyVersion,
}

#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct ServiceVersion {
    pub version: &'static str,
    /// The service's clock.
    pub now: DateTime<Utc>,
}

#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct StoreStatus {
    pub ready: bool,
    /// Why the store is not ready; null when it is.
    pub problem: Option<String>,
    /// Null where the engine keeps its data elsewhere (PostgreSQL).
    pub size_bytes: Option<u64>,
    pub disk_free_bytes: Option<u64>,
}

#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct PolicyVersion {
    pub version: String,
}
