//! How phone numbers are kept. Hashed: a keyed HMAC of the number replaces it in the
//! record, the indexes, the raw event log and the counter keys of stored explanations;
//! country and prefix are kept. Queries by number hash the number the same way.

use std::borrow::Cow;

use hmac::{Hmac, Mac};

use crate::decision::DecisionRecord;

#[derive(Clone, Default)]
pub enum NumberPrivacy {
    #[default]
    Plain,
    Hashed(Hmac<sha2::Sha256>),
}

/// How a hashed number starts, so a reader of an export can tell it from a number.
pub const HASH_PREFIX: &str = "hmac-sha256:";

impl NumberPrivacy {
    pub fn hashed(key: &[u8]) -> Self {
        // HMAC accepts keys of any length.
        Hmac::new_from_slice(key).map_or(Self::Plain, Self::Hashed)
    }

    pub fn is_hashed(&self) -> bool {
        matches!(self, Self::Hashed(_))
    }

    /// The form a number takes in the store (and in queries by number).
    pub fn protect<'a>(&self, number: &'a str) -> Cow<'a, str> {
        match self {
            Self::Plain => Cow::Borrowed(number),
            Self::Hashed(mac) => {
                let mut mac = mac.clone();
                mac.update(number.as_bytes());
                Cow::Owned(format!(
                    "{HASH_PREFIX}{}",
                    super::hex(&mac.finalize().into_bytes())
                ))
            }
        }
    }

    /// The decision as stored: counter and quarantine keys derived from the number are
    /// hashed too.
    pub fn protect_decision<'a>(&self, decision: &'a DecisionRecord) -> Cow<'a, DecisionRecord> {
        let e = &decision.explanation;
        let numbered = e.counters.iter().any(|r| r.key.starts_with('+'))
            || e.quarantine
                .as_ref()
                .is_some_and(|q| q.key.starts_with('+'));
        if matches!(self, Self::Plain) || !numbered {
            return Cow::Borrowed(decision);
        }
        let mut owned = decision.clone();
        let keys = owned
            .explanation
            .counters
            .iter_mut()
            .map(|r| &mut r.key)
            .chain(owned.explanation.quarantine.iter_mut().map(|q| &mut q.key));
        for key in keys.filter(|k| k.starts_with('+')) {
            *key = self.protect(key).into_owned();
        }
        Cow::Owned(owned)
    }

    /// The raw body as stored: unchanged, or with `identity.endpoint` replaced by its hash.
    pub fn protect_body<'a>(&self, raw: &'a [u8]) -> Cow<'a, [u8]> {
        if matches!(self, Self::Plain) {
            return Cow::Borrowed(raw);
        }
        let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(raw) else {
            return Cow::Borrowed(raw);
        };
        if let Some(endpoint) = body.pointer_mut("/identity/endpoint") {
            if let Some(number) = endpoint.as_str() {
                *endpoint = self.protect(number).into_owned().into();
            }
        }
        Cow::Owned(serde_json::to_vec(&body).unwrap_or_else(|_| raw.to_vec()))
    }
}
