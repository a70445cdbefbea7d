//! The whole verifier on attacker-controlled headers and body, with the app from Sinch's
//! own signing vector. Input: authorization, content type, x-timestamp, path and body,
//! separated by NUL bytes (the body is the rest).
#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use verigate::signature::{AppCredentials, Freshness, Keyring, SignedRequest};

const KEY: &str = "669E367E-6BBA-48AB-AF15-266871C28135";
const SECRET: &str = "BeIukql3pTKJ8RGL5zo0DA==";

fuzz_target!(|data: &[u8]| {
    let mut fields = data.splitn(5, |b| *b == 0);
    let authorization = fields.next().unwrap_or_default();
    let content_type = fields.next();
    let timestamp = fields.next();
    let path = fields
        .next()
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("/sinch/verification");
    let body = fields.next().unwrap_or_default();
    let Ok(app) = AppCredentials::new(KEY, SECRET, false) else {
        return;
    };
    let keyring = Keyring::new([app.clone()]);
    let request = SignedRequest {
        method: "POST",
        path,
        content_type,
        timestamp,
        authorization: Some(authorization),
        body,
    };
    let now = DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_default();
    for max_skew in [None, Some(std::time::Duration::from_secs(600))] {
        if keyring.verify(&request, Freshness { now, max_skew }).is_ok() {
            // Accepted only with exactly the signature Sinch's scheme gives.
            let expected = app.authorization(&request);
            let sent = String::from_utf8_lossy(authorization);
            let signature = |h: &str| h.rsplit(':').next().map(str::to_owned);
            assert_eq!(signature(&expected), signature(&sent));
        }
    }
});
