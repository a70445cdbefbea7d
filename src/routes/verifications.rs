//! Reading stored verifications.

use actix_web::{web, HttpResponse};

use super::{ApiCaller, CallbackState};
use crate::{
    error::{ApiError, ErrorCode},
    store::{StoredEvent, VerificationRecord},
};

/// Events of the log one request for a verification's events may read while looking for
/// them: bounds the cost when its events lie far apart on a busy store.
const EVENT_SCAN_BUDGET: usize = 100_000;

/// `GET /v1/verifications/{id}`: the joined record of one verification.
pub async fn get(
    _caller: ApiCaller,
    id: web::Path<String>,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(stored(&state, &id).await?))
}

/// `GET /v1/verifications/{id}/events`: its callbacks exactly as received, oldest first.
/// `complete` is false when the search stopped at its budget before finding all of them.
pub async fn events(
    _caller: ApiCaller,
    id: web::Path<String>,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let record = stored(&state, &id).await?;
    let store = state.store.ready()?;
    let (events, complete) = store.events_of(&record, EVENT_SCAN_BUDGET).await?;
    Ok(HttpResponse::Ok().json(VerificationEvents {
        id: record.id,
        event_count: record.event_count,
        complete,
        events,
    }))
}

/// `GET /v1/verifications/{id}/events`'s answer.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct VerificationEvents {
    pub id: String,
    /// Accepted events the record counts (duplicates excluded).
    pub event_count: u32,
    /// False when the search stopped at its budget before it found all of them.
    pub complete: bool,
    /// Oldest first.
    pub events: Vec<StoredEvent>,
}

async fn stored(state: &CallbackState, id: &str) -> Result<VerificationRecord, ApiError> {
    state.store.ready()?.verification(id).await?.ok_or_else(|| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("no verification with id `{id}`"),
        )
    })
}
