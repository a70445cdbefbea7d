//! Keeping what the policy learned across restarts: at start, the saved quarantines come
//! back and adaptive rules relearn from the store's recent verifications; afterwards the
//! state is saved whenever it changes.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};

use super::{tools::past_verification, Learning, PastVerification, Policy};
use crate::{
    clock::Clock,
    store::{Cursor, Store, StoreError, StoreSlot, VerificationQuery},
};

/// The store key of the policy's saved state.
const STATE: &str = "policy_state";
const PAGE: usize = 1_000;

/// Restores the policy's state from a store that has just opened, before it is used:
/// the saved quarantines at once (so no key that was blocked is let through after a
/// restart), then, in the background, what adaptive rules learned from the lookback's
/// verifications. Relearning does not hold up readiness: it takes about 1.7 s for
/// 250,000 verifications (`cargo bench --bench startup`), decisions meanwhile lack only the not-yet-replayed history
/// of conversion counts (every block is already back), and what they observe waits
/// for the replay so the counts come out as if verigate had never stopped.
pub async fn restore_on_open(store: &Store, policy: Arc<dyn Policy>, now: DateTime<Utc>) {
    let Some(learning) = policy.learning() else {
        return;
    };
    if let Err(err) = restore_saved(store, learning, now).await {
        tracing::error!(error.message = %err, "restoring the saved policy state failed");
        learning.restore(None, now);
    }
    let Some(back) = learning.lookback() else {
        return;
    };
    let store = store.clone();
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        // Up to a second ahead: the current millisecond's records belong in too (a
        // live decision counted twice is tracked once: by id).
        let history = match history(&store, now - back, now + chrono::Duration::seconds(1)).await {
            Ok(history) => history,
            Err(err) => {
                tracing::error!(error.message = %err, "reading the history to relearn from failed; adaptive rules start from what they see now");
                Vec::new()
            }
        };
        let relearned = history.len();
        let policy_for_replay = Arc::clone(&policy);
        let replayed = tokio::task::spawn_blocking(move || {
            policy_for_replay
                .learning()
                .map_or(0, |learning| learning.relearn(history, now))
        })
        .await;
        let waited = match replayed {
            Ok(waited) => waited,
            Err(err) => {
                // Observations must not stay held back for good: release them unreplayed.
                tracing::error!(error.message = %err, "relearning failed; adaptive rules start from what they see now");
                policy
                    .learning()
                    .map_or(0, |learning| learning.relearn(Vec::new(), now))
            }
        };
        tracing::info!(
            relearned,
            waited,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "policy relearned from the store"
        );
    });
}

/// Once the store is open, saves the policy's state whenever it changes (checked each
/// second). Each tick also ends quarantines whose time is up, so their log line and
/// metrics come when they expire, not when the key is next seen.
pub async fn run(slot: StoreSlot, policy: Arc<dyn Policy>, clock: Clock) {
    let Some(learning) = policy.learning() else {
        return;
    };
    let store = loop {
        if let Some(store) = slot.get() {
            break store.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut saved = learning.saved_state().map(|(generation, _)| generation);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = clock.now();
        super::off_async_workers(&policy, move |policy| {
            if let Some(quarantines) = policy.quarantines() {
                quarantines.blocks(now);
            }
        })
        .await;
        if let Err(err) = save_if_changed(&store, policy.as_ref(), &mut saved).await {
            tracing::error!(error.message = %err, "saving the policy state failed");
        }
    }
}

/// Puts back the saved state (quarantines).
pub async fn restore_saved(
    store: &Store,
    policy: &dyn Learning,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    let saved = match store.load_state(STATE).await? {
        Some(bytes) => match serde_json::from_slice(&bytes) {
            Ok(state) => Some(state),
            Err(err) => {
                tracing::warn!(error.message = %err, "the saved policy state is unreadable; starting without quarantines");
                None
            }
        },
        None => None,
    };
    policy.restore(saved, now);
    Ok(())
}

async fn history(
    store: &Store,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<PastVerification>, StoreError> {
    let mut out = Vec::new();
    let mut cursor: Option<Cursor> = None;
    loop {
        let page = store
            .verifications(VerificationQuery::between(since, until, PAGE).after(cursor.take()))
            .await?;
        out.extend(page.items.iter().map(past_verification));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(out),
        }
    }
}

/// Saves the state if it changed since `saved` (its generation then).
pub async fn save_if_changed(
    store: &Store,
    policy: &dyn Policy,
    saved: &mut Option<u64>,
) -> Result<(), StoreError> {
    let Some((generation, state)) = policy.learning().and_then(Learning::saved_state) else {
        return Ok(());
    };
    if *saved == Some(generation) {
        return Ok(());
    }
    store
        .save_state(STATE, state.to_string().into_bytes())
        .await?;
    *saved = Some(generation);
    Ok(())
}
