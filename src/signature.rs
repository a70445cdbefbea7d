//! Sinch "Application" callback signing.
//!
//! A callback carries `Authorization: Application <key>:<base64 signature>` where the
//! signature is `Base64(HMAC-SHA256(Base64Decode(secret), StringToSign))` and
//!
//! ```text
//! StringToSign = "POST\n" + Base64(MD5(raw body)) + "\n" + Content-Type + "\n"
//!              + "x-timestamp:" + x-timestamp + "\n" + path
//! ```
//!
//! Every part is taken verbatim from the request as received (raw body bytes, header
//! values byte for byte), because Sinch signed those exact bytes. The Content-MD5 line is
//! empty for an empty body. Signatures are compared in constant time, and on top of what
//! Sinch's SDKs do we reject stale timestamps (replay protection).

use std::{collections::HashMap, fmt, time::Duration};

use base64::{
    alphabet,
    engine::{general_purpose::STANDARD, DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    Engine,
};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ErrorCode};

type HmacSha256 = Hmac<Sha256>;

/// Decodes what people actually paste as secrets: standard or URL-safe alphabet, padding
/// optional, non-zero trailing bits tolerated. Sinch's own SDKs accept such secrets, and
/// rejecting one would make a working dashboard secret fail here only.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Why a callback failed authentication. Each variant is a distinct 401 `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Authorization header is missing")]
    MissingAuthorization,
    #[error("the Authorization header is not of the form `Application <key>:<signature>`")]
    MalformedAuthorization,
    #[error("the Authorization scheme `{0}` is not accepted; use `Application`")]
    UnsupportedScheme(String),
    #[error("the application key is not configured here")]
    UnknownAppKey,
    #[error("the signature does not match the request")]
    InvalidSignature,
    #[error("the x-timestamp header is missing")]
    MissingTimestamp,
    #[error("the x-timestamp header is not an RFC 3339 time")]
    InvalidTimestamp,
    #[error("the x-timestamp is {skew_secs} s away from the server clock (allowed: {max_secs} s)")]
    StaleTimestamp { skew_secs: i64, max_secs: u64 },
}

impl SignatureError {
    pub fn code(&self) -> ErrorCode {
        match self {
            SignatureError::MissingAuthorization => ErrorCode::MissingAuthorization,
            SignatureError::MalformedAuthorization => ErrorCode::MalformedAuthorization,
            SignatureError::UnsupportedScheme(_) => ErrorCode::UnsupportedScheme,
            SignatureError::UnknownAppKey => ErrorCode::UnknownAppKey,
            SignatureError::InvalidSignature => ErrorCode::InvalidSignature,
            SignatureError::MissingTimestamp => ErrorCode::MissingTimestamp,
            SignatureError::InvalidTimestamp => ErrorCode::InvalidTimestamp,
            SignatureError::StaleTimestamp { .. } => ErrorCode::StaleTimestamp,
        }
    }
}

impl From<SignatureError> for ApiError {
    fn from(err: SignatureError) -> Self {
        ApiError::new(err.code(), err.to_string())
    }
}

/// A secret that could not be decoded at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the secret is not base64")]
pub struct SecretDecodeError;

/// The HMAC key bytes of an app secret, and whether the text was canonical base64.
pub struct DecodedSecret {
    pub bytes: Vec<u8>,
    /// False for secrets only a lenient decoder accepts (missing padding, URL-safe
    /// alphabet, trailing bits): worth a warning at start, since a typo looks the same.
    pub canonical: bool,
}

pub fn decode_secret(secret: &str) -> Result<DecodedSecret, SecretDecodeError> {
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(SecretDecodeError);
    }
    if let Ok(bytes) = STANDARD.decode(secret) {
        return Ok(DecodedSecret {
            bytes,
            canonical: true,
        });
    }
    let standardised: String = secret
        .chars()
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT
        .decode(standardised)
        .map(|bytes| DecodedSecret {
            bytes,
            canonical: false,
        })
        .map_err(|_| SecretDecodeError)
}

/// The request parts that Sinch signs, exactly as received.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The path Sinch called (no query string).
    pub path: &'a str,
    pub content_type: Option<&'a [u8]>,
    pub timestamp: Option<&'a [u8]>,
    pub authorization: Option<&'a [u8]>,
    pub body: &'a [u8],
}

/// Base64 of the MD5 of the body; empty for an empty body, as Sinch signs it.
pub fn content_md5(body: &[u8]) -> String {
    if body.is_empty() {
        String::new()
    } else {
        STANDARD.encode(Md5::digest(body))
    }
}

/// The five-line string Sinch signs: `\n`-joined, no trailing newline.
pub fn string_to_sign(
    method: &str,
    body: &[u8],
    content_type: &[u8],
    timestamp: &[u8],
    path: &str,
) -> Vec<u8> {
    let md5 = content_md5(body);
    let mut out = Vec::with_capacity(64 + content_type.len() + timestamp.len() + path.len());
    out.extend_from_slice(method.to_ascii_uppercase().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(md5.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(content_type);
    out.extend_from_slice(b"\nx-timestamp:");
    out.extend_from_slice(timestamp);
    out.push(b'\n');
    out.extend_from_slice(path.as_bytes());
    out
}

/// The parsed `Authorization` header of a callback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackSignature<'a> {
    /// `Application <key>:<signature>`: the scheme Sinch signs callbacks with.
    Application { key: &'a str, signature: &'a str },
    /// `Basic base64(<key>:<secret>)`: only for apps that opt in (`basic_auth = true`).
    Basic { key: String, secret: String },
}

impl<'a> CallbackSignature<'a> {
    pub fn parse(header: &'a [u8]) -> Result<Self, SignatureError> {
        let header =
            std::str::from_utf8(header).map_err(|_| SignatureError::MalformedAuthorization)?;
        if header.trim().is_empty() {
            return Err(SignatureError::MissingAuthorization);
        }
        let (scheme, credentials) = header
            .split_once(' ')
            .ok_or(SignatureError::MalformedAuthorization)?;
        if scheme.eq_ignore_ascii_case("application") {
            let (key, signature) = split_key_value(credentials)?;
            Ok(CallbackSignature::Application { key, signature })
        } else if scheme.eq_ignore_ascii_case("basic") {
            let decoded = STANDARD
                .decode(credentials)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or(SignatureError::MalformedAuthorization)?;
            let (key, secret) = decoded
                .split_once(':')
                .ok_or(SignatureError::MalformedAuthorization)?;
            Ok(CallbackSignature::Basic {
                key: key.to_owned(),
                secret: secret.to_owned(),
            })
        } else {
            Err(SignatureError::UnsupportedScheme(truncate(scheme, 32)))
        }
    }
}

/// `<key>:<signature>` with exactly one colon, no spaces, neither part empty.
fn split_key_value(credentials: &str) -> Result<(&str, &str), SignatureError> {
    let mut parts = credentials.split(':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(key), Some(sig), None)
            if !key.is_empty()
                && !sig.is_empty()
                && !credentials.contains(|c: char| c.is_ascii_whitespace()) =>
        {
            Ok((key, sig))
        }
        _ => Err(SignatureError::MalformedAuthorization),
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

/// One Sinch application verigate accepts callbacks from.
#[derive(Clone)]
pub struct AppCredentials {
    key: String,
    /// HMAC state already keyed with the decoded secret; cloned per request.
    mac: HmacSha256,
    /// The secret as configured, kept only when Basic authentication is enabled.
    basic_secret: Option<String>,
}

impl fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppCredentials")
            .field("key", &self.key)
            .field("secret", &"[redacted]")
            .field("basic_auth", &self.basic_secret.is_some())
            .finish()
    }
}

impl AppCredentials {
    pub fn new(key: &str, secret: &str, basic_auth: bool) -> Result<Self, SecretDecodeError> {
        let decoded = decode_secret(secret)?;
        let mac = HmacSha256::new_from_slice(&decoded.bytes).map_err(|_| SecretDecodeError)?;
        Ok(Self {
            key: key.to_owned(),
            mac,
            basic_secret: basic_auth.then(|| secret.to_owned()),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The `Authorization` header value Sinch would send for this request.
    pub fn authorization(&self, req: &SignedRequest<'_>) -> String {
        let mut mac = self.mac.clone();
        mac.update(&string_to_sign_of(req));
        let signature = STANDARD.encode(mac.finalize().into_bytes());
        format!("Application {}:{signature}", self.key)
    }

    fn verify_mac(&self, req: &SignedRequest<'_>, signature: &str) -> Result<(), SignatureError> {
        let expected = STANDARD
            .decode(signature)
            .map_err(|_| SignatureError::InvalidSignature)?;
        let mut mac = self.mac.clone();
        mac.update(&string_to_sign_of(req));
        // `verify_slice` compares in constant time.
        mac.verify_slice(&expected)
            .map_err(|_| SignatureError::InvalidSignature)
    }
}

fn string_to_sign_of(req: &SignedRequest<'_>) -> Vec<u8> {
    string_to_sign(
        req.method,
        req.body,
        req.content_type.unwrap_or_default(),
        req.timestamp.unwrap_or_default(),
        req.path,
    )
}

/// How far a callback's `x-timestamp` may be from the server clock.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    pub now: DateTime<Utc>,
    /// `None` disables the check (for replaying old captures, never in production).
    pub max_skew: Option<Duration>,
}

/// The configured applications, by key. Several at once is also how a secret is rotated:
/// add the new app, switch Sinch over, remove the old one.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    apps: HashMap<String, AppCredentials>,
}

impl Keyring {
    pub fn new(apps: impl IntoIterator<Item = AppCredentials>) -> Self {
        Self {
            apps: apps.into_iter().map(|a| (a.key.clone(), a)).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.apps.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&AppCredentials> {
        self.apps.get(key)
    }

    /// Authenticates a callback; returns the key of the app that signed it.
    pub fn verify(
        &self,
        req: &SignedRequest<'_>,
        freshness: Freshness,
    ) -> Result<&str, SignatureError> {
        let header = req
            .authorization
            .ok_or(SignatureError::MissingAuthorization)?;
        match CallbackSignature::parse(header)? {
            CallbackSignature::Application { key, signature } => {
                let app = self.apps.get(key).ok_or(SignatureError::UnknownAppKey)?;
                let timestamp = req.timestamp.ok_or(SignatureError::MissingTimestamp)?;
                app.verify_mac(req, signature)?;
                check_freshness(timestamp, freshness)?;
                Ok(&app.key)
            }
            CallbackSignature::Basic { key, secret } => {
                let app = self.apps.get(&key).ok_or(SignatureError::UnknownAppKey)?;
                let expected = app
                    .basic_secret
                    .as_deref()
                    .ok_or_else(|| SignatureError::UnsupportedScheme("Basic".into()))?;
                if bool::from(expected.as_bytes().ct_eq(secret.as_bytes())) {
                    Ok(&app.key)
                } else {
                    Err(SignatureError::InvalidSignature)
                }
            }
        }
    }
}

/// Rejects a timestamp outside the window, in either direction: a callback from the
/// future is as suspicious as an old one.
pub fn check_freshness(timestamp: &[u8], freshness: Freshness) -> Result<(), SignatureError> {
    let Some(max_skew) = freshness.max_skew else {
        return Ok(());
    };
    let sent = std::str::from_utf8(timestamp)
        .ok()
        .and_then(|s| DateTime::parse_from_rfc3339(s.trim()).ok())
        .ok_or(SignatureError::InvalidTimestamp)?;
    let skew_secs = freshness
        .now
        .signed_duration_since(sent)
        .num_seconds()
        .saturating_abs();
    let max_secs = max_skew.as_secs();
    if u64::try_from(skew_secs).map_or(true, |skew| skew > max_secs) {
        return Err(SignatureError::StaleTimestamp {
            skew_secs,
            max_secs,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
