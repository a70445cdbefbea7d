//! Returning users: a number whose last verification ended with the code entered belongs
//! to a person far more often than not. Rules marked `spare_returning` let such a number
//! through where they would deny it, so that quarantining a busy range turns away the
//! newcomers in it rather than everybody.
//!
//! The store is the memory: verigate asks it for the number's recent verifications (by
//! its index, so hashed numbers work the same way) and [`history_of`] reads them. Only
//! the latest finished one counts, which is what keeps the exemption from being bought:
//! a number that one success made returning loses it at its next failure, so every
//! attempt it is spared costs an attacker a code entered.

use chrono::{DateTime, Duration, Utc};

use super::adaptive::Resolution;
use crate::{events::Action, store::VerificationRecord};

/// What the store knows of a request's number when the policy decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NumberHistory {
    /// Nothing that makes it returning: no finished verification in the window, the
    /// latest one failed, or the history was not looked up.
    #[default]
    New,
    /// Its latest finished verification that verigate allowed succeeded.
    Returning,
}

/// An allowed verification still without a result after this long never completed:
/// Sinch's codes expire after 10 minutes by default.
const COMPLETES_WITHIN: Duration = Duration::minutes(10);

/// A number asked for this often within the window is no returning user whatever its
/// history says: [`history_of`] is given at most this many of its verifications.
pub const MOST_VERIFICATIONS: usize = 32;

/// The number's history at `now` from its verifications (any order; those first seen
/// outside the `within` up to `now`, and results that came after it, are passed over).
/// Denied verifications, errors and those still under way say nothing about the person;
/// one allowed and never completed counts as failed, as the adaptive rules count it.
pub fn history_of<'a>(
    records: impl Iterator<Item = &'a VerificationRecord> + Clone,
    now: DateTime<Utc>,
    within: Duration,
) -> NumberHistory {
    let in_window = || {
        records
            .clone()
            .filter(move |r| r.first_seen <= now && now - r.first_seen <= within)
    };
    if in_window().count() >= MOST_VERIFICATIONS {
        return NumberHistory::New;
    }
    let finished = in_window()
        .filter(|r| {
            r.decision
                .as_ref()
                .is_some_and(|d| d.action == Action::Allow)
        })
        .filter_map(|r| {
            let resolution = r
                .result
                .as_ref()
                .filter(|result| result.received_at <= now)
                .and_then(|result| Resolution::of(&result.status, result.reason.as_deref()));
            match resolution {
                Some(Resolution::Excluded) => None,
                Some(resolution) => Some((r.first_seen, r.seq, resolution)),
                None if now - r.first_seen >= COMPLETES_WITHIN => {
                    Some((r.first_seen, r.seq, Resolution::Failure))
                }
                None => None,
            }
        })
        .max_by_key(|&(first_seen, seq, _)| (first_seen, seq));
    match finished {
        Some((_, _, Resolution::Success)) => NumberHistory::Returning,
        _ => NumberHistory::New,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decision::{DecisionRecord, PolicyDecision},
        events::VerificationEvent,
        store::RecordStamp,
    };

    const NOW: i64 = 1_800_000_000;

    fn t(minutes_ago: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(NOW - minutes_ago * 60, 0).unwrap()
    }

    /// A verification asked for `minutes_ago`, decided `action`, with `result` (status,
    /// minutes after the request) if any.
    fn verification(
        seq: u64,
        minutes_ago: i64,
        action: Action,
        result: Option<(&str, i64)>,
    ) -> VerificationRecord {
        let request = VerificationEvent::parse(
            br#"{"id":"v","event":"VerificationRequestEvent","method":"sms","identity":{"type":"number","endpoint":"+46700000001"}}"#,
        )
        .unwrap();
        let decision = DecisionRecord::new(
            &PolicyDecision::new(action, None, "test"),
            false,
            "v1",
            t(minutes_ago),
            serde_json::json!({}),
        );
        let stamp = |at| RecordStamp {
            app_key: "app",
            seq,
            ordered_at: t(minutes_ago),
            received_at: at,
        };
        let mut record =
            VerificationRecord::apply(None, &request, stamp(t(minutes_ago)), None, Some(&decision));
        if let Some((status, after)) = result {
            let body = format!(
                r#"{{"id":"v","event":"VerificationResultEvent","method":"sms","status":"{status}","reason":"Fraud"}}"#
            );
            let event = VerificationEvent::parse(body.as_bytes()).unwrap();
            let at = t(minutes_ago - after);
            record = VerificationRecord::apply(Some(record), &event, stamp(at), None, None);
        }
        record
    }

    fn history(records: &[VerificationRecord]) -> NumberHistory {
        history_of(records.iter(), t(0), Duration::days(90))
    }

    #[test]
    fn the_latest_finished_verification_decides() {
        use NumberHistory::{New, Returning};
        let ok = |seq, ago| verification(seq, ago, Action::Allow, Some(("SUCCESSFUL", 1)));
        let failed = |seq, ago| verification(seq, ago, Action::Allow, Some(("FAIL", 10)));
        assert_eq!(history(&[]), New);
        assert_eq!(history(&[ok(1, 600)]), Returning);
        // Any order: the latest counts, and a failure takes the status away.
        assert_eq!(history(&[failed(2, 60), ok(1, 600)]), New);
        assert_eq!(history(&[ok(2, 60), failed(1, 600)]), Returning);
        // Denied ones, errors and Sinch's own denials other than fraud say nothing.
        let denied = verification(2, 30, Action::Deny, None);
        let error = verification(3, 20, Action::Allow, Some(("ERROR", 1)));
        assert_eq!(history(&[ok(1, 600), denied, error]), Returning);
        // Sinch's fraud verdict is a failure.
        let fraud = verification(2, 30, Action::Allow, Some(("DENIED", 1)));
        assert_eq!(history(&[ok(1, 600), fraud]), New);
        // One still under way waits; one that never completed failed.
        let open = verification(2, 5, Action::Allow, None);
        assert_eq!(history(&[ok(1, 600), open]), Returning);
        let expired = verification(2, 15, Action::Allow, None);
        assert_eq!(history(&[ok(1, 600), expired]), New);
        // A result that came after the moment asked about is not known yet.
        let later = verification(1, 30, Action::Allow, Some(("SUCCESSFUL", 31)));
        assert_eq!(history(&[later]), New);
        // Outside the window: forgotten.
        assert_eq!(history(&[ok(1, 91 * 24 * 60)]), New);
    }

    #[test]
    fn a_number_asked_for_too_often_is_no_returning_user() {
        let many: Vec<VerificationRecord> = (0..MOST_VERIFICATIONS as u64)
            .map(|i| verification(i, 600 - i as i64, Action::Allow, Some(("SUCCESSFUL", 1))))
            .collect();
        assert_eq!(history(&many), NumberHistory::New);
        assert_eq!(history(&many[1..]), NumberHistory::Returning);
    }
}
