//! The one JSON error body every 4xx/5xx answer carries:
//! `{"error": {"code": "stale_timestamp", "message": "…"}}`.
//!
//! `code` values are stable snake_case strings listed in [`ErrorCode`]; clients and
//! alerting key on them, so variants are only ever added, never renamed. Module errors
//! (signature, events, store) convert into [`ApiError`] at the HTTP edge.

use actix_web::{
    body::MessageBody,
    dev::ServiceResponse,
    http::{header, StatusCode},
    middleware::ErrorHandlerResponse,
    HttpResponse, ResponseError,
};
use serde::Serialize;

/// Every error code verigate answers with, and the HTTP status that goes with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // 401: the callback did not prove it came from Sinch.
    MissingAuthorization,
    MalformedAuthorization,
    UnsupportedScheme,
    UnknownAppKey,
    InvalidSignature,
    MissingTimestamp,
    InvalidTimestamp,
    StaleTimestamp,
    // 401: query API.
    MissingToken,
    InvalidToken,
    ApiDisabled,
    // 400 / 404 / 405 / 413 / 415: the caller sent something we cannot use.
    MalformedJson,
    InvalidEvent,
    InvalidPolicy,
    Forbidden,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    // 5xx: our side failed; details go to the log, not to the caller.
    StoreUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> StatusCode {
        use ErrorCode::*;
        match self {
            MissingAuthorization
            | MalformedAuthorization
            | UnsupportedScheme
            | UnknownAppKey
            | InvalidSignature
            | MissingTimestamp
            | InvalidTimestamp
            | StaleTimestamp
            | MissingToken
            | InvalidToken
            | ApiDisabled => StatusCode::UNAUTHORIZED,
            MalformedJson | InvalidEvent | BadRequest => StatusCode::BAD_REQUEST,
            InvalidPolicy => StatusCode::UNPROCESSABLE_ENTITY,
            Forbidden => StatusCode::FORBIDDEN,
            NotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The snake_case name, as it appears in the JSON body and in metrics labels.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MissingAuthorization => "missing_authorization",
            MalformedAuthorization => "malformed_authorization",
            UnsupportedScheme => "unsupported_scheme",
            UnknownAppKey => "unknown_app_key",
            InvalidSignature => "invalid_signature",
            MissingTimestamp => "missing_timestamp",
            InvalidTimestamp => "invalid_timestamp",
            StaleTimestamp => "stale_timestamp",
            MissingToken => "missing_token",
            InvalidToken => "invalid_token",
            ApiDisabled => "api_disabled",
            MalformedJson => "malformed_json",
            InvalidEvent => "invalid_event",
            InvalidPolicy => "invalid_policy",
            Forbidden => "forbidden",
            BadRequest => "bad_request",
            NotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            PayloadTooLarge => "payload_too_large",
            UnsupportedMediaType => "unsupported_media_type",
            StoreUnavailable => "store_unavailable",
            Internal => "internal",
        }
    }

    /// The code used when all we know about a failure is its status (actix's own rejections).
    fn for_status(status: StatusCode) -> Self {
        match status {
            StatusCode::UNAUTHORIZED => ErrorCode::MissingToken,
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::SERVICE_UNAVAILABLE => ErrorCode::StoreUnavailable,
            s if s.is_client_error() => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorDetail<'a> {
    /// Stable: clients and alerting key on it.
    pub code: ErrorCode,
    /// What was wrong, in words that tell the caller what to fix.
    pub message: &'a str,
}

/// An error answer: a code plus a message that tells the caller what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: &self.message,
            },
        }
    }

    /// The HTTP answer for this error, for handlers that build responses directly.
    pub fn error_response_json(&self) -> HttpResponse {
        HttpResponse::build(self.code.status()).json(self.body())
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        self.error_response_json()
    }
}

/// Rewrites any error answer that is not already JSON (actix's own plain-text rejections:
/// unknown route, wrong method, bad path or query) into the shared JSON shape, keeping
/// the status. Installed as the default handler of `ErrorHandlers`.
pub fn json_error_fallback<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    let is_json = res
        .response()
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let status = res.status();
    let message = match res.response().error() {
        Some(err) => err.to_string(),
        None => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string(),
    };
    let error = ApiError::new(ErrorCode::for_status(status), message);
    let (req, _) = res.into_parts();
    let mut response = HttpResponse::build(status).json(error.body());
    // The status stays what actix chose; only the body changes.
    *response.status_mut() = status;
    let res = ServiceResponse::new(req, response.map_into_boxed_body()).map_into_right_body();
    Ok(ErrorHandlerResponse::Response(res))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{middleware::ErrorHandlers, test, web, App};

    #[actix_web::test]
    async fn plain_text_rejections_are_rewritten_into_the_json_shape() {
        let app = test::init_service(
            App::new()
                .wrap(ErrorHandlers::new().default_handler(json_error_fallback))
                .route(
                    "/plain",
                    web::get().to(|| async {
                        Err::<HttpResponse, _>(actix_web::error::ErrorUnsupportedMediaType(
                            "use JSON",
                        ))
                    }),
                )
                .route(
                    "/json",
                    web::get().to(|| async {
                        Err::<HttpResponse, _>(ApiError::new(ErrorCode::InvalidEvent, "bad"))
                    }),
                ),
        )
        .await;
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/plain").to_request()).await;
        assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(
            body,
            serde_json::json!({"error":{"code":"unsupported_media_type","message":"use JSON"}})
        );
        // Already JSON: left alone.
        let res =
            test::call_service(&app, test::TestRequest::get().uri("/json").to_request()).await;
        let body: serde_json::Value = test::read_body_json(res).await;
        assert_eq!(body["error"]["code"], "invalid_event");
    }
}
