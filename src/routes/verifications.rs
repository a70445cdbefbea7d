//! Reading stored verifications.

use actix_web::{web, HttpResponse};

use super::{ApiCaller, CallbackState};
use crate::error::{ApiError, ErrorCode};

/// `GET /v1/verifications/{id}`: the joined record of one verification.
pub async fn get(
    _caller: ApiCaller,
    id: web::Path<String>,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let store =
        state.store.get().cloned().ok_or_else(|| {
            ApiError::new(ErrorCode::StoreUnavailable, "the store is not open yet")
        })?;
    let id = id.into_inner();
    let lookup_id = id.clone();
    let record = web::block(move || store.get(&lookup_id))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
        .map_err(|e| {
            tracing::error!(error.message = %e, "reading a record failed");
            ApiError::new(ErrorCode::StoreUnavailable, "the store could not be read")
        })?;
    match record {
        Some(record) => Ok(HttpResponse::Ok().json(record)),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no verification with id `{id}`"),
        )),
    }
}
