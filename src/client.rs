//! Acting as Sinch: realistic sample callbacks, signed exactly as Sinch signs them, and a
//! small HTTP client to send them. Used by `verigate trigger`, `verigate sign`,
//! `verigate healthcheck` and the tests.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::json;

use crate::signature::{AppCredentials, SignedRequest};

/// The content type Sinch sends callbacks with.
pub const CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// Which callback to imitate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SampleKind {
    Request,
    Result,
    SmsDelivered,
}

/// What varies between sample callbacks.
#[derive(Debug, Clone)]
pub struct Sample<'a> {
    pub kind: SampleKind,
    pub id: &'a str,
    pub number: &'a str,
    pub method: &'a str,
    /// Result events only: `SUCCESSFUL`, `FAIL`, `DENIED`, …
    pub status: &'a str,
}

/// A callback body with the fields and values Sinch sends for `sample.kind`.
pub fn sample_body(sample: &Sample<'_>) -> String {
    let identity = json!({ "type": "number", "endpoint": sample.number });
    let reference = format!("ref-{}", sample.id);
    let body = match sample.kind {
        SampleKind::Request => json!({
            "id": sample.id,
            "event": "VerificationRequestEvent",
            "method": sample.method,
            "identity": identity,
            "price": { "amount": 0.0308, "currencyId": "EUR" },
            "rate": { "amount": 0.0, "currencyId": "EUR" },
            "reference": reference,
            "custom": "sent by verigate trigger",
        }),
        SampleKind::Result => {
            let mut body = json!({
                "id": sample.id,
                "event": "VerificationResultEvent",
                "method": sample.method,
                "identity": identity,
                "status": sample.status,
                "source": if sample.method == "flashcall" { "intercepted" } else { "manual" },
                "reference": reference,
                "custom": "sent by verigate trigger",
            });
            if sample.status != "SUCCESSFUL" {
                body["reason"] = json!("Expired");
            }
            body
        }
        SampleKind::SmsDelivered => json!({
            "id": sample.id,
            "event": "VerificationSmsDeliveredEvent",
            "method": "sms",
            "identity": identity,
            "smsResult": "Successful",
            "reference": reference,
            "custom": "sent by verigate trigger",
        }),
    };
    body.to_string()
}

/// An x-timestamp value as Sinch formats it (UTC, 7 fractional digits).
pub fn sinch_timestamp(at: DateTime<Utc>) -> String {
    let nanos = at.to_rfc3339_opts(SecondsFormat::Nanos, true);
    // `…SS.nnnnnnnnnZ` → `…SS.nnnnnnnZ`
    match nanos.len().checked_sub(3) {
        Some(cut) => format!("{}Z", &nanos[..cut]),
        None => nanos,
    }
}

/// The three headers Sinch sends with `body` posted to `path`.
pub fn signed_headers(
    app: &AppCredentials,
    path: &str,
    body: &[u8],
    content_type: &str,
    timestamp: &str,
) -> Vec<(&'static str, String)> {
    let authorization = app.authorization(&SignedRequest {
        method: "POST",
        path,
        content_type: Some(content_type.as_bytes()),
        timestamp: Some(timestamp.as_bytes()),
        authorization: None,
        body,
    });
    vec![
        ("authorization", authorization),
        ("content-type", content_type.to_owned()),
        ("x-timestamp", timestamp.to_owned()),
    ]
}

/// POSTs a body with the given headers; returns the status and the response body.
pub async fn post(
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> anyhow::Result<(u16, String)> {
    let mut request = awc::Client::default().post(url);
    for (name, value) in headers {
        request = request.insert_header((*name, value.as_str()));
    }
    let mut response = request
        .send_body(body)
        .await
        .map_err(|e| anyhow::anyhow!("POST {url} failed: {e}"))?;
    let text = response
        .body()
        .await
        .map_err(|e| anyhow::anyhow!("reading the answer from {url} failed: {e}"))?;
    Ok((
        response.status().as_u16(),
        String::from_utf8_lossy(&text).into_owned(),
    ))
}

/// GETs a URL; returns its status.
pub async fn get_status(url: &str) -> anyhow::Result<u16> {
    let response = awc::Client::default()
        .get(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {url} failed: {e}"))?;
    Ok(response.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::VerificationEvent;

    #[test]
    fn samples_parse_as_the_events_they_imitate() {
        for (kind, event) in [
            (SampleKind::Request, "VerificationRequestEvent"),
            (SampleKind::Result, "VerificationResultEvent"),
            (SampleKind::SmsDelivered, "VerificationSmsDeliveredEvent"),
        ] {
            let body = sample_body(&Sample {
                kind,
                id: "s-1",
                number: "+46700000001",
                method: "sms",
                status: "FAIL",
            });
            let parsed = VerificationEvent::parse(body.as_bytes()).unwrap();
            assert_eq!(parsed.event_type(), event);
            assert_eq!(parsed.number(), Some("+46700000001"));
        }
    }

    #[test]
    fn timestamps_look_like_sinchs() {
        let at = DateTime::parse_from_rfc3339("2023-12-01T15:01:20.040644912Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(sinch_timestamp(at), "2023-12-01T15:01:20.0406449Z");
    }
}
