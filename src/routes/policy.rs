//! The policy in force: what it is, how its rules have fared, and reloading it.

use actix_web::{web, HttpResponse};

use super::{AdminCaller, ApiCaller, CallbackState};
use crate::{
    error::{ApiError, ErrorCode},
    policy::{
        adaptive::Block, flagged::FlaggedKey, off_async_workers, persist, reload, PolicyError,
        Quarantines,
    },
};

/// `GET /v1/policy`: version, load time, rules with hits and the outcomes of the
/// verifications each rule decided or shadow-matched, and the last reload error.
pub async fn describe(_: ApiCaller, state: web::Data<CallbackState>) -> HttpResponse {
    let described = off_async_workers(&state.policy, |policy| policy.describe()).await;
    HttpResponse::Ok().json(described.unwrap_or(serde_json::Value::Null))
}

/// `POST /v1/policy/reload` (admin token): re-read the policy file now.
pub async fn reload_now(
    _: AdminCaller,
    state: web::Data<CallbackState>,
) -> Result<HttpResponse, ApiError> {
    let (policy, metrics) = (state.policy.clone(), state.metrics.clone());
    let outcome = web::block(move || reload::reload(policy.as_ref(), metrics.as_ref(), "API"))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    match outcome {
        Ok(version) => Ok(HttpResponse::Ok().json(Reloaded {
            reloaded: true,
            version,
        })),
        Err(err) => Err(ApiError::new(
            ErrorCode::InvalidPolicy,
            format!("{err}; the previous policy stays in force"),
        )),
    }
}

/// `GET /v1/policy/blocks`: keys in automatic quarantine, why, until when, and the
/// verifications that tripped them.
pub async fn blocks(_: ApiCaller, state: web::Data<CallbackState>) -> HttpResponse {
    let blocks = from_quarantines(&state, |q, now| q.blocks(now)).await;
    HttpResponse::Ok().json(BlockList { blocks })
}

/// `GET /v1/policy/flagged`: keys shadow rules would have denied in the last hour (on
/// this replica), most recent first.
pub async fn flagged(_: ApiCaller, state: web::Data<CallbackState>) -> HttpResponse {
    let flagged = from_quarantines(&state, |q, now| q.flagged(now)).await;
    HttpResponse::Ok().json(FlaggedList { flagged })
}

/// What `read` finds in the policy's quarantines now (empty for a policy without any).
async fn from_quarantines<T: Default + Send + 'static>(
    state: &CallbackState,
    read: impl FnOnce(&dyn Quarantines, chrono::DateTime<chrono::Utc>) -> T + Send + 'static,
) -> T {
    let now = state.clock.now();
    off_async_workers(&state.policy, move |p| {
        p.quarantines().map(|q| read(q, now))
    })
    .await
    .flatten()
    .unwrap_or_default()
}

/// `GET /v1/policy/flagged`'s answer.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct FlaggedList {
    pub flagged: Vec<FlaggedKey>,
}

/// `POST /v1/policy/reload`'s answer.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Reloaded {
    pub reloaded: bool,
    /// The version now in force.
    pub version: String,
}

/// `GET /v1/policy/blocks`'s answer.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct BlockList {
    pub blocks: Vec<Block>,
}

/// `DELETE /v1/policy/blocks/{key}`'s answer: the blocks it ended, one per rule.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Lifted {
    pub lifted: Vec<Block>,
}

/// `POST /v1/policy/blocks/{key}/pin`'s answer: the blocks made permanent.
#[derive(serde::Serialize, schemars::JsonSchema)]
pub struct Pinned {
    pub pinned: Vec<Block>,
}

/// `DELETE /v1/policy/blocks/{key}` (admin token): lifts every block on the key.
pub async fn lift(
    _: AdminCaller,
    state: web::Data<CallbackState>,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (now, which) = (state.clock.now(), key.clone());
    let lifted = off_async_workers(&state.policy, move |p| {
        p.quarantines().map(|q| q.lift_block(&which, now))
    })
    .await
    .flatten()
    .transpose()
    .map_err(|err| not_shared("lift", err))?
    .unwrap_or_default();
    changed(&state, "lifted", &lifted, &key).await?;
    Ok(HttpResponse::Ok().json(Lifted { lifted }))
}

/// `POST /v1/policy/blocks/{key}/pin` (admin token): makes every block on the key
/// permanent, until lifted.
pub async fn pin(
    _: AdminCaller,
    state: web::Data<CallbackState>,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (now, which) = (state.clock.now(), key.clone());
    let pinned = off_async_workers(&state.policy, move |p| {
        p.quarantines().map(|q| q.pin_block(&which, now))
    })
    .await
    .flatten()
    .transpose()
    .map_err(|err| not_shared("pin", err))?
    .unwrap_or_default();
    changed(&state, "pinned", &pinned, &key).await?;
    Ok(HttpResponse::Ok().json(Pinned { pinned }))
}

/// A lift or pin that the replicas' shared state did not take: nothing changed.
fn not_shared(change: &str, err: PolicyError) -> ApiError {
    ApiError::new(
        ErrorCode::StoreUnavailable,
        format!("the {change} was not made, on this replica or any other: {err}"),
    )
}

/// Saves a lift or pin, or says there was nothing to change.
async fn changed(
    state: &CallbackState,
    what: &str,
    blocks: &[Block],
    key: &str,
) -> Result<(), ApiError> {
    if blocks.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NotFound,
            format!("no active block on `{key}`"),
        ));
    }
    tracing::info!(
        key,
        change = what,
        rules = blocks.len(),
        "operator changed a quarantine"
    );
    if let Some(store) = state.store.get() {
        persist::save_if_changed(store, state.policy.as_ref(), &mut None)
            .await
            .map_err(|e| ApiError::new(ErrorCode::StoreUnavailable, e.to_string()))?;
    }
    Ok(())
}
