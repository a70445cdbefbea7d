//! Deleting what is older than the retention period, in small batches with pauses, so
//! callbacks never wait behind a large delete.

use std::time::Duration;

use super::StoreSlot;
use crate::clock::Clock;

/// Records (and as many raw events) deleted per batch.
const BATCH: usize = 500;
/// Pause between batches, leaving the store to callbacks.
const PAUSE: Duration = Duration::from_millis(5);

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
        let (mut records, mut events) = (0, 0);
        loop {
            let batch = store.clone();
            match tokio::task::spawn_blocking(move || batch.delete_before(cutoff, BATCH)).await {
                Ok(Ok((0, 0))) => break,
                Ok(Ok((r, e))) => {
                    records += r;
                    events += e;
                    tokio::time::sleep(PAUSE).await;
                }
                Ok(Err(err)) => {
                    tracing::error!(error.message = %err, "retention: deleting expired data failed");
                    break;
                }
                Err(err) => {
                    tracing::error!(error.message = %err, "retention task failed");
                    break;
                }
            }
        }
        if records + events > 0 {
            tracing::info!(records, events, %cutoff, "retention: deleted expired data");
        }
    }
}
