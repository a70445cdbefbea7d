//! The policy in force: what it is, how its rules have fared, and reloading it.

use actix_web::{web, HttpResponse};

use super::{AdminCaller, ApiCaller, CallbackState};
use crate::{
    error::{ApiError, ErrorCode},
    policy::reload,
};

/// `GET /v1/policy`: version, load time, rules with hits and the outcomes of the
/// verifications each rule decided or shadow-matched, and the last reload error.
pub async fn describe(_: ApiCaller, state: web::Data<CallbackState>) -> HttpResponse {
    HttpResponse::Ok().json(state.policy.describe())
}

/// `POST /v1/policy/reload` (admin token): re-read the policy file now.
pub async fn reload_now(
    _: AdminCaller,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let (policy, metrics) = (state.policy.clone(), state.metrics.clone());
    let outcome = web::block(move || reload::reload(policy.as_ref(), &metrics, "API"))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    match outcome {
        Ok(version) => Ok(
            HttpResponse::Ok().json(serde_json::json!({ "reloaded": true, "version": version }))
        ),
        Err(err) => Err(ApiError::new(
            ErrorCode::InvalidPolicy,
            format!("{err}; the previous policy stays in force"),
        )),
    }
}
