//! Keys that shadow rules would deny: what an operator should look at although no rule
//! may act on it (an attack hidden in a busy operator block that a `surge` rule in shadow
//! sees, say). Kept in memory per replica, for `GET /v1/policy/flagged` and the console's
//! overview.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use chrono::{DateTime, Duration, Utc};

use crate::events::Action;

/// How long a key stays listed after a shadow rule last matched it.
pub const FLAGGED_FOR: Duration = Duration::hours(1);
/// Keys listed at most: under a flood of distinct keys the least recently matched go.
const MOST_KEYS: usize = 1000;

/// A key a shadow rule matched.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct FlaggedKey {
    pub rule: String,
    /// The rule's key (a prefix, range or country; a number is masked).
    pub key: String,
    /// What the rule would have answered.
    pub would: Action,
    /// The first match of this spell (matches less than [`FLAGGED_FOR`] apart).
    pub since: DateTime<Utc>,
    pub last: DateTime<Utc>,
    /// Requests the rule matched under the key in this spell.
    pub matches: u64,
    /// The rule's counters at the last match, e.g. `surge prefix:5 +44791 = 0.21 (limit 0.40)`.
    pub reading: String,
}

/// The keys shadow rules matched in the last [`FLAGGED_FOR`].
#[derive(Debug, Default)]
pub struct FlaggedKeys {
    keys: Mutex<HashMap<(String, String), FlaggedKey>>,
}

impl FlaggedKeys {
    /// Notes that `rule` matched `key` at `now`; true when this starts a spell (the key
    /// was not listed).
    pub fn note(
        &self,
        rule: &str,
        key: &str,
        would: Action,
        now: DateTime<Utc>,
        reading: String,
    ) -> bool {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let id = (rule.to_owned(), key.to_owned());
        match keys.get_mut(&id) {
            Some(flagged) if now - flagged.last < FLAGGED_FOR => {
                flagged.last = now.max(flagged.last);
                flagged.matches += 1;
                flagged.reading = reading;
                flagged.would = would;
                false
            }
            _ => {
                if keys.len() >= MOST_KEYS && !keys.contains_key(&id) {
                    keys.retain(|_, f| now - f.last < FLAGGED_FOR);
                    if keys.len() >= MOST_KEYS {
                        let oldest = keys
                            .iter()
                            .min_by_key(|(_, f)| f.last)
                            .map(|(k, _)| k.clone());
                        if let Some(oldest) = oldest {
                            keys.remove(&oldest);
                        }
                    }
                }
                keys.insert(
                    id,
                    FlaggedKey {
                        rule: rule.to_owned(),
                        key: key.to_owned(),
                        would,
                        since: now,
                        last: now,
                        matches: 1,
                        reading,
                    },
                );
                true
            }
        }
    }

    /// The keys matched in the last [`FLAGGED_FOR`], most recently matched first.
    pub fn listed(&self, now: DateTime<Utc>) -> Vec<FlaggedKey> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.retain(|_, f| now - f.last < FLAGGED_FOR);
        let mut listed: Vec<FlaggedKey> = keys.values().cloned().collect();
        listed.sort_by(|a, b| b.last.cmp(&a.last).then_with(|| a.key.cmp(&b.key)));
        listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(minutes: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + Duration::minutes(minutes)
    }

    #[test]
    fn a_spell_of_matches_is_one_entry_until_an_hour_passes_without_one() {
        let flagged = FlaggedKeys::default();
        let spells: Vec<bool> = [0, 10, 30]
            .iter()
            .map(|&m| flagged.note("surge", "+44791", Action::Deny, at(m), format!("at {m}")))
            .collect();
        assert_eq!(spells, [true, false, false]);
        let listed = flagged.listed(at(31));
        assert_eq!(listed.len(), 1);
        let one = &listed[0];
        assert_eq!((one.since, one.last, one.matches), (at(0), at(30), 3));
        assert_eq!(one.reading, "at 30");
        assert!(
            flagged.listed(at(91)).is_empty(),
            "an hour after the last match"
        );
        assert!(flagged.note("surge", "+44791", Action::Deny, at(200), "again".into()));
        assert_eq!(flagged.listed(at(200))[0].since, at(200), "a new spell");
    }

    #[test]
    fn the_most_recent_come_first_and_a_flood_of_keys_stays_bounded() {
        let flagged = FlaggedKeys::default();
        for i in 0..(MOST_KEYS as i64 + 50) {
            flagged.note(
                "walk",
                &format!("+4670{i:04}"),
                Action::Deny,
                at(i / 100),
                String::new(),
            );
        }
        let listed = flagged.listed(at(11));
        assert_eq!(listed.len(), MOST_KEYS);
        assert!(listed.windows(2).all(|w| w[0].last >= w[1].last));
        assert_eq!(listed[0].last, at(10));
    }
}
