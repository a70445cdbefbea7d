//! Bearer-token authentication of the query API. Records hold phone numbers, so the API
//! is closed unless an operator sets `api.token`.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, http::header, web, FromRequest, HttpRequest};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};

/// The configured API tokens, shared with handlers as app data.
#[derive(Clone)]
pub struct ApiToken {
    /// May do anything.
    pub admin: Option<SecretString>,
    /// May only read (analytics jobs).
    pub read: Option<SecretString>,
}

/// Proof that a request carried an API token (either one: every endpoint so far only
/// reads); take it as a handler argument.
pub struct ApiCaller;

impl FromRequest for ApiCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

/// Proof that a request carried the admin token (`api.token`): needed to change things.
pub struct AdminCaller;

impl FromRequest for AdminCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req).and_then(|_| {
            let admin = req
                .app_data::<web::Data<ApiToken>>()
                .and_then(|t| t.admin.as_ref())
                .map(|t| t.expose_secret().as_bytes().to_vec());
            let given = bearer(req).unwrap_or_default();
            match admin {
                Some(admin) if bool::from(given.as_bytes().ct_eq(&admin)) => Ok(AdminCaller),
                _ => Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "this needs the admin token (api.token)",
                )),
            }
        }))
    }
}

fn bearer(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|v| v.trim().to_owned())
}

fn authenticate(req: &HttpRequest) -> Result<ApiCaller, ApiError> {
    let tokens = req.app_data::<web::Data<ApiToken>>();
    let configured: Vec<&SecretString> = tokens
        .iter()
        .flat_map(|t| [t.admin.as_ref(), t.read.as_ref()])
        .flatten()
        .collect();
    if configured.is_empty() {
        return Err(ApiError::new(
            ErrorCode::ApiDisabled,
            "the query API is disabled: set api.token",
        ));
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::MissingToken,
                "send `Authorization: Bearer <api token>`",
            )
        })?;
    // Compare with every token, so timing does not tell which one nearly matched.
    let matched = configured
        .iter()
        .fold(subtle::Choice::from(0), |acc, token| {
            acc | given
                .trim()
                .as_bytes()
                .ct_eq(token.expose_secret().as_bytes())
        });
    if bool::from(matched) {
        Ok(ApiCaller)
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidToken,
            "the API token is not valid",
        ))
    }
}
