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

/// Which token a caller holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `api.token`: reads and changes things.
    Admin,
    /// `api.read_token`: reads only.
    Read,
}

/// Proof that a request carried an API token (either one), and which; take it as a
/// handler argument.
pub struct ApiCaller {
    pub role: Role,
}

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
        ready(authenticate(req).and_then(|caller| match caller.role {
            Role::Admin => Ok(AdminCaller),
            Role::Read => Err(ApiError::new(
                ErrorCode::Forbidden,
                "this needs the admin token (api.token)",
            )),
        }))
    }
}

fn authenticate(req: &HttpRequest) -> Result<ApiCaller, ApiError> {
    let tokens = req.app_data::<web::Data<ApiToken>>();
    let (admin, read) = match tokens {
        Some(t) => (t.admin.as_ref(), t.read.as_ref()),
        None => (None, None),
    };
    if admin.is_none() && read.is_none() {
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
        .map(str::trim)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::MissingToken,
                "send `Authorization: Bearer <api token>`",
            )
        })?;
    // Compare with both tokens, so timing does not tell which one nearly matched.
    let matches = |token: Option<&SecretString>| {
        token.map_or(subtle::Choice::from(0), |t| {
            given.as_bytes().ct_eq(t.expose_secret().as_bytes())
        })
    };
    let (is_admin, is_read) = (matches(admin), matches(read));
    if bool::from(is_admin) {
        Ok(ApiCaller { role: Role::Admin })
    } else if bool::from(is_read) {
        Ok(ApiCaller { role: Role::Read })
    } else {
        Err(ApiError::new(
            ErrorCode::InvalidToken,
            "the API token is not valid",
        ))
    }
}
