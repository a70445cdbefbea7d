//! Deleting what is older than the retention period. The store deletes in small batches
//! with pauses, so callbacks never wait behind a large delete.

use std::time::Duration;

use super::StoreSlot;
use crate::clock::Clock;

/// Every `interval`, deletes everything first seen more than `keep` ago.
pub async fn run(store: StoreSlot, clock: Clock, keep: Duration, interval: Duration) {
    let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
    loop {
        tokio::time::sleep(interval).await;
        let Some(store) = store.get().cloned() else {
            continue;
        };
        let Some(cutoff) = clock.now().checked_sub_signed(keep) else {
            continue;
        };
        match store.delete_before(cutoff).await {
            Ok(deleted) if deleted.verifications + deleted.events > 0 => tracing::info!(
                verifications = deleted.verifications,
                events = deleted.events,
                %cutoff,
                "retention: deleted expired data"
            ),
            Ok(_) => {}
            Err(err) => {
                tracing::error!(error.message = %err, "retention: deleting expired data failed");
            }
        }
    }
}
