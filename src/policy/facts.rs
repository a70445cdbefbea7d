//! The facts about one request that rule conditions read: its normalised number, the
//! number's territory and the time of the decision.

use chrono::{DateTime, Utc};

use super::NumberHistory;
use crate::events::VerificationRequestEvent;

/// `+` followed by 1..=15 digits; leading `+` added when a bare digit string arrives.
pub fn normalise_number(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let digits = raw.strip_prefix('+').unwrap_or(raw);
    let number = format!("+{digits}");
    crate::phone::e164_digits(&number)
        .is_some()
        .then_some(number)
}

/// The facts about one request that conditions read.
pub(super) struct Facts<'a> {
    pub(super) request: &'a VerificationRequestEvent,
    pub(super) number: String,
    pub(super) country: &'static str,
    pub(super) now: DateTime<Utc>,
    /// Its latest finished verification succeeded (only when the policy looked).
    pub(super) returning: bool,
}

impl<'a> Facts<'a> {
    /// The facts of `request` at `now`; `None` when its number is not E.164.
    pub(super) fn of(
        request: &'a VerificationRequestEvent,
        history: NumberHistory,
        now: DateTime<Utc>,
    ) -> Option<Self> {
        let number = normalise_number(&request.identity.endpoint)?;
        let country = crate::phone::country::CountryTable::get()
            .country_of(&number)
            .unwrap_or("unknown");
        Some(Self {
            request,
            number,
            country,
            now,
            returning: history == NumberHistory::Returning,
        })
    }
}
