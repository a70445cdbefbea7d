//! The callbacks Sinch posts, as typed values, and the answer to a request event.
//!
//! Parsing is lenient where Sinch's own sources are (unknown fields, unknown enum
//! strings, optional `method` on SMS-delivered events) and strict where we cannot go on
//! without a value (`id`, `event`, the request's number). The raw body is what gets
//! stored, so nothing Sinch sent is lost by this typed view.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{ApiError, ErrorCode};

/// A verification method. Read case-insensitively (`flashcall` and `flashCall` both occur).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub enum VerificationMethod {
    Sms,
    FlashCall,
    Callout,
    WhatsApp,
    Seamless,
    /// A method Sinch adds later; kept as sent, lower-cased.
    Other(String),
}

impl VerificationMethod {
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "sms" => Self::Sms,
            "flashcall" => Self::FlashCall,
            "callout" => Self::Callout,
            "whatsapp" => Self::WhatsApp,
            "seamless" => Self::Seamless,
            other => Self::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Sms => "sms",
            Self::FlashCall => "flashcall",
            Self::Callout => "callout",
            Self::WhatsApp => "whatsapp",
            Self::Seamless => "seamless",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for VerificationMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<VerificationMethod> for String {
    fn from(m: VerificationMethod) -> Self {
        m.as_str().to_owned()
    }
}

impl<'de> Deserialize<'de> for VerificationMethod {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// Who is being verified. `endpoint` is an E.164 number for `type = "number"`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Identity {
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    pub endpoint: String,
}

/// What Sinch will charge (`price`) or its rate for the attempt.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Price {
    #[serde(default)]
    pub currency_id: Option<String>,
    #[serde(default)]
    pub amount: Option<f64>,
}

/// Sent when a verification starts; Sinch waits for our allow/deny.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationRequestEvent {
    pub id: String,
    pub method: VerificationMethod,
    pub identity: Identity,
    #[serde(default)]
    pub price: Option<Price>,
    #[serde(default)]
    pub rate: Option<Price>,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub custom: Option<String>,
    /// Deprecated by Sinch but still sent by some integrations.
    #[serde(default)]
    pub accept_language: Option<Vec<String>>,
}

/// Sent when a verification ends (or reports progress, `PENDING`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationResultEvent {
    pub id: String,
    #[serde(default)]
    pub method: Option<VerificationMethod>,
    #[serde(default)]
    pub identity: Option<Identity>,
    /// `PENDING`, `SUCCESSFUL`, `FAIL`, `DENIED`, `ABORTED`, `ERROR`, or a newer value.
    pub status: String,
    /// e.g. `Fraud`, `Expired`, `Invalid code`, `Denied by callback` (values contain spaces).
    #[serde(default)]
    pub reason: Option<String>,
    /// `intercepted` or `manual`.
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub custom: Option<String>,
}

/// Sent when the verification SMS's delivery receipt arrives.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerificationSmsDeliveredEvent {
    pub id: String,
    #[serde(default)]
    pub method: Option<VerificationMethod>,
    #[serde(default)]
    pub identity: Option<Identity>,
    /// `Successful` or `Failed` ("can be extended in the future").
    pub sms_result: String,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub custom: Option<String>,
}

/// Any callback verigate accepts, dispatched on its `event` field.
#[derive(Debug, Clone, PartialEq)]
pub enum VerificationEvent {
    Request(VerificationRequestEvent),
    Result(VerificationResultEvent),
    SmsDelivered(VerificationSmsDeliveredEvent),
    /// An event type this version does not know: acknowledged and stored raw.
    Unknown {
        id: String,
        event: String,
    },
}

pub const REQUEST_EVENT: &str = "VerificationRequestEvent";
pub const RESULT_EVENT: &str = "VerificationResultEvent";
pub const SMS_DELIVERED_EVENT: &str = "VerificationSmsDeliveredEvent";

/// Longest `id` and `event` we accept; real ones are under 64 characters.
const MAX_ID_LEN: usize = 256;
/// Longest number and method we accept. A real number has at most 16 characters (E.164);
/// the bound keeps what verigate counts and indexes by within what any store can index
/// (PostgreSQL refuses an index entry over about 2.7 kB).
const MAX_KEY_LEN: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<EventError> for ApiError {
    fn from(err: EventError) -> Self {
        let code = match err {
            EventError::MalformedJson(_) => ErrorCode::MalformedJson,
            EventError::Invalid(_) => ErrorCode::InvalidEvent,
        };
        ApiError::new(code, err.to_string())
    }
}

/// Just enough to dispatch: a body without these is not a callback.
#[derive(Deserialize)]
struct Envelope {
    id: Option<serde_json::Value>,
    event: Option<serde_json::Value>,
}

impl VerificationEvent {
    /// Parses the raw callback body.
    pub fn parse(body: &[u8]) -> Result<Self, EventError> {
        let not_an_object =
            || EventError::Invalid("the body must be a JSON object with `id` and `event`".into());
        // serde would read a JSON array positionally into the envelope; refuse it first.
        if body.trim_ascii_start().first() != Some(&b'{') {
            return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => Err(not_an_object()),
                Err(e) => Err(EventError::MalformedJson(e.to_string())),
            };
        }
        let envelope: Envelope = match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) if e.is_data() => return Err(not_an_object()),
            Err(e) => return Err(EventError::MalformedJson(e.to_string())),
        };
        let id = required_string(envelope.id, "id")?;
        let event = required_string(envelope.event, "event")?;
        if holds_nul(body) {
            // Text columns and keys cannot hold it, and no real callback carries one.
            return Err(EventError::Invalid(
                "the body holds a NUL character (\\u0000), which no callback field may contain"
                    .into(),
            ));
        }
        let typed = |e: serde_json::Error| EventError::Invalid(format!("invalid {event}: {e}"));
        let parsed = match event.as_str() {
            REQUEST_EVENT => Self::Request(serde_json::from_slice(body).map_err(typed)?),
            RESULT_EVENT => Self::Result(serde_json::from_slice(body).map_err(typed)?),
            SMS_DELIVERED_EVENT => Self::SmsDelivered(serde_json::from_slice(body).map_err(typed)?),
            _ => Self::Unknown { id, event },
        };
        parsed.check_lengths()?;
        Ok(parsed)
    }

    /// The fields verigate counts by stay within what stores can index. (A reference
    /// can be as long as the body allows: stores index a prefix of it.)
    fn check_lengths(&self) -> Result<(), EventError> {
        let within = |field: &str, value: Option<&str>, max: usize| match value {
            Some(v) if v.len() > max => Err(EventError::Invalid(format!(
                "`{field}` is {} bytes long; at most {max} are accepted",
                v.len()
            ))),
            _ => Ok(()),
        };
        within("identity.endpoint", self.number(), MAX_KEY_LEN)?;
        within("method", self.method().map(|m| m.as_str()), MAX_KEY_LEN)
    }

    pub fn id(&self) -> &str {
        match self {
            Self::Request(e) => &e.id,
            Self::Result(e) => &e.id,
            Self::SmsDelivered(e) => &e.id,
            Self::Unknown { id, .. } => id,
        }
    }

    pub fn event_type(&self) -> &str {
        match self {
            Self::Request(_) => REQUEST_EVENT,
            Self::Result(_) => RESULT_EVENT,
            Self::SmsDelivered(_) => SMS_DELIVERED_EVENT,
            Self::Unknown { event, .. } => event,
        }
    }

    pub fn method(&self) -> Option<&VerificationMethod> {
        match self {
            Self::Request(e) => Some(&e.method),
            Self::Result(e) => e.method.as_ref(),
            Self::SmsDelivered(e) => e.method.as_ref(),
            Self::Unknown { .. } => None,
        }
    }

    pub fn number(&self) -> Option<&str> {
        match self {
            Self::Request(e) => Some(&e.identity.endpoint),
            Self::Result(e) => e.identity.as_ref().map(|i| i.endpoint.as_str()),
            Self::SmsDelivered(e) => e.identity.as_ref().map(|i| i.endpoint.as_str()),
            Self::Unknown { .. } => None,
        }
    }

    pub fn reference(&self) -> Option<&str> {
        match self {
            Self::Request(e) => e.reference.as_deref(),
            Self::Result(e) => e.reference.as_deref(),
            Self::SmsDelivered(e) => e.reference.as_deref(),
            Self::Unknown { .. } => None,
        }
    }
}

/// Whether a JSON text holds the escape `\\u0000` (a raw NUL byte is not valid JSON).
fn holds_nul(json: &[u8]) -> bool {
    let mut i = 0;
    while i < json.len() {
        if json[i] == b'\\' {
            if json.get(i + 1) == Some(&b'u') && json.get(i + 2..i + 6) == Some(b"0000") {
                return true;
            }
            // Whatever is escaped (a backslash, too) is not the start of another escape.
            i += 2;
        } else {
            i += 1;
        }
    }
    false
}

fn required_string(value: Option<serde_json::Value>, field: &str) -> Result<String, EventError> {
    match value {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_LEN => Ok(s),
        Some(serde_json::Value::String(_)) => Err(EventError::Invalid(format!(
            "`{field}` must be a non-empty string of at most {MAX_ID_LEN} bytes"
        ))),
        Some(_) => Err(EventError::Invalid(format!("`{field}` must be a string"))),
        None => Err(EventError::Invalid(format!("`{field}` is missing"))),
    }
}

/// allow or deny: the whole of what Sinch needs from a request-event answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sms` answer fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SmsResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `Numeric`, `Alpha` or `Alphanumeric`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_type: Option<String>,
    /// `HH:MM:SS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_language: Option<Vec<String>>,
}

/// `flashCall` answer fields; timeouts are seconds, 5..=120.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlashCallResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cli: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dial_timeout: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interception_timeout: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Speech {
    pub locale: String,
}

/// `callout` (phone call) answer fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CalloutResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speech: Option<Speech>,
}

/// `whatsapp` answer fields.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WhatsAppResponse {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_language: Option<Vec<String>>,
}

/// Method-specific answer fields an operator may configure; only the one matching the
/// request's method is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResponseFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms: Option<SmsResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flash_call: Option<FlashCallResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callout: Option<CalloutResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whatsapp: Option<WhatsAppResponse>,
}

impl ResponseFields {
    /// Keeps only the fields for `method`, so Sinch never sees a key it did not expect.
    pub fn for_method(&self, method: &VerificationMethod) -> ResponseFields {
        let mut out = ResponseFields::default();
        match method {
            VerificationMethod::Sms => out.sms.clone_from(&self.sms),
            VerificationMethod::FlashCall => out.flash_call.clone_from(&self.flash_call),
            VerificationMethod::Callout => out.callout.clone_from(&self.callout),
            VerificationMethod::WhatsApp => out.whatsapp.clone_from(&self.whatsapp),
            VerificationMethod::Seamless | VerificationMethod::Other(_) => {}
        }
        out
    }
}

/// The JSON body answered to a request event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallbackResponse {
    pub action: Action,
    #[serde(flatten)]
    pub fields: ResponseFields,
}

impl CallbackResponse {
    pub fn bare(action: Action) -> Self {
        Self {
            action,
            fields: ResponseFields::default(),
        }
    }
}

#[cfg(test)]
mod tests;
