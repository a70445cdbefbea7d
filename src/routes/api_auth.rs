//! Bearer-token authentication of the query API. Records hold phone numbers, so the API
//! is closed unless an operator sets `api.token`.

use std::future::{ready, Ready};

use actix_web::{dev::Payload, http::header, web, FromRequest, HttpRequest};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};

/// The configured API token, shared with handlers as app data.
#[derive(Clone)]
pub struct ApiToken(pub Option<SecretString>);

/// Proof that a request carried the API token; take it as a handler argument.
pub struct ApiCaller;

impl FromRequest for ApiCaller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(req))
    }
}

fn authenticate(req: &HttpRequest) -> Result<ApiCaller, ApiError> {
    let expected = req
        .app_data::<web::Data<ApiToken>>()
        .and_then(|t| t.0.clone())
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::ApiDisabled,
                "the query API is disabled: set api.token",
            )
        })?;
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
    if bool::from(
        given
            .trim()
            .as_bytes()
            .ct_eq(expected.expose_secret().as_bytes()),
    ) {
        Ok(ApiCaller)
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidToken,
            "the API token is not valid",
        ))
    }
}
