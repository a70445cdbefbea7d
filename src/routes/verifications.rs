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
    let id = id.into_inner();
    match state.store.ready()?.verification(&id).await? {
        Some(record) => Ok(HttpResponse::Ok().json(record)),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no verification with id `{id}`"),
        )),
    }
}
