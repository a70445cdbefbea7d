//! The embedded verification store (sled).
//!
//! Contract: [`Store::record`] resolves `Ok` only once the event, the merged
//! [`VerificationRecord`] and its index entries are on disk; the HTTP layer acknowledges
//! an event only after that. Writes are idempotent on event identity, so a duplicate
//! delivery changes nothing and gets the answer given the first time.
//!
//! Keyspaces (one sled tree each): `records` (id → record JSON), `events` (seq → raw
//! event), `dedup` (event identity → first answer), and the indexes `by_number`,
//! `by_reference`, `by_time`. This is the whole interface the rest of verigate uses; a
//! shared backend for replicated deployments would implement the same methods.

mod durability;
mod keys;
mod record;

use std::{path::Path, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use sled::{
    transaction::{ConflictableTransactionError, TransactionError},
    Transactional, Tree,
};

pub use durability::FlushError;
pub use record::{DecisionRecord, RequestPart, ResultPart, SmsDeliveryPart, VerificationRecord};

use crate::events::VerificationEvent;
use durability::GroupCommit;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
    #[error("a stored value could not be decoded: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error(transparent)]
    Flush(#[from] FlushError),
}

/// One accepted event as it is appended to the raw event log.
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    pub seq: u64,
    pub received_at: DateTime<Utc>,
    pub app_key: String,
    pub event: String,
    pub id: String,
    /// The callback body exactly as received (it is valid JSON, so it is kept as JSON).
    pub body: Box<RawValue>,
}

/// An event to record, with the context verigate received it in.
#[derive(Debug, Clone, Copy)]
pub struct IncomingEvent<'a> {
    pub event: &'a VerificationEvent,
    pub raw: &'a [u8],
    pub app_key: &'a str,
    pub received_at: DateTime<Utc>,
    pub decision: Option<&'a DecisionRecord>,
}

impl IncomingEvent<'_> {
    fn identity(&self) -> Vec<u8> {
        let discriminator = match self.event {
            VerificationEvent::Result(r) => r.status.clone(),
            VerificationEvent::Unknown { .. } => hex(&Sha256::digest(self.raw)),
            VerificationEvent::Request(_) | VerificationEvent::SmsDelivered(_) => String::new(),
        };
        keys::dedup(self.event.id(), self.event.event_type(), &discriminator)
    }
}

/// What the first delivery of an event was answered with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstDelivery {
    pub seq: u64,
    /// The JSON answered to a request event; `None` for events answered with an empty 200.
    pub answer: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutcome {
    /// Newly stored, under this sequence number in the event log.
    Stored { seq: u64 },
    /// Seen before: nothing was written.
    Duplicate(FirstDelivery),
}

struct Trees {
    records: Tree,
    events: Tree,
    dedup: Tree,
    by_number: Tree,
    by_reference: Tree,
    by_time: Tree,
}

/// How a write is made durable before `record` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one flush (production).
    #[default]
    GroupCommit,
    /// Each writer flushes on its own: the baseline group commit is measured against.
    FlushPerWrite,
}

struct Inner {
    db: sled::Db,
    trees: Trees,
    durability: Durability,
    commit: GroupCommit,
}

/// Cheap to clone; all clones share one database and one flusher.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (or creates) the store; `on_flush` observes each group flush's duration.
    pub fn open(
        path: &Path,
        on_flush: impl Fn(Duration) + Send + 'static,
    ) -> Result<Self, StoreError> {
        Self::open_with(path, Durability::GroupCommit, on_flush)
    }

    pub fn open_with(
        path: &Path,
        durability: Durability,
        on_flush: impl Fn(Duration) + Send + 'static,
    ) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let tree = |name: &str| db.open_tree(name);
        let trees = Trees {
            records: tree("records")?,
            events: tree("events")?,
            dedup: tree("dedup")?,
            by_number: tree("by_number")?,
            by_reference: tree("by_reference")?,
            by_time: tree("by_time")?,
        };
        let flusher_db = db.clone();
        let commit = GroupCommit::start(
            move || flusher_db.flush().map(|_| ()).map_err(|e| e.to_string()),
            on_flush,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                trees,
                durability,
                commit,
            }),
        })
    }

    /// Records an event durably; see the module docs for the guarantees.
    pub async fn record(&self, incoming: IncomingEvent<'_>) -> Result<RecordOutcome, StoreError> {
        let outcome = self.write(incoming)?;
        match (&outcome, self.inner.durability) {
            (RecordOutcome::Stored { .. }, Durability::GroupCommit) => {
                self.inner.commit.durable().await?
            }
            // The first delivery may still be in flight in another request: make sure it
            // is durable before answering as if it were.
            (RecordOutcome::Duplicate(_), Durability::GroupCommit) => {
                self.inner.commit.barrier().await?
            }
            (_, Durability::FlushPerWrite) => {
                let db = self.inner.db.clone();
                tokio::task::spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| FlushError(e.to_string()))??;
            }
        }
        Ok(outcome)
    }

    /// The answer given to an earlier delivery of this event, if any (durable on return).
    pub async fn first_delivery(
        &self,
        incoming: IncomingEvent<'_>,
    ) -> Result<Option<FirstDelivery>, StoreError> {
        let Some(bytes) = self.inner.trees.dedup.get(incoming.identity())? else {
            return Ok(None);
        };
        self.inner.commit.barrier().await?;
        Ok(Some(serde_json::from_slice(&bytes)?))
    }

    fn write(&self, incoming: IncomingEvent<'_>) -> Result<RecordOutcome, StoreError> {
        let t = &self.inner.trees;
        let identity = incoming.identity();
        let seq = self.inner.db.generate_id()?;
        let stored_event = serde_json::to_vec(&StoredEvent {
            seq,
            received_at: incoming.received_at,
            app_key: incoming.app_key.to_owned(),
            event: incoming.event.event_type().to_owned(),
            id: incoming.event.id().to_owned(),
            body: RawValue::from_string(String::from_utf8_lossy(incoming.raw).into_owned())?,
        })?;
        let first = serde_json::to_vec(&FirstDelivery {
            seq,
            answer: incoming.decision.map(|d| d.answer.clone()),
        })?;
        let id = incoming.event.id();

        // Pure closure: sled may run it more than once on conflict.
        let result = (
            &t.records,
            &t.events,
            &t.dedup,
            &t.by_number,
            &t.by_reference,
            &t.by_time,
        )
            .transaction(
                |(records, events, dedup, by_number, by_reference, by_time)| {
                    if let Some(existing) = dedup.get(&identity)? {
                        let first: FirstDelivery = serde_json::from_slice(&existing)
                            .map_err(ConflictableTransactionError::Abort)?;
                        return Ok(RecordOutcome::Duplicate(first));
                    }
                    let before = match records.get(id.as_bytes())? {
                        Some(bytes) => Some(
                            serde_json::from_slice::<VerificationRecord>(&bytes)
                                .map_err(ConflictableTransactionError::Abort)?,
                        ),
                        None => None,
                    };
                    let after = VerificationRecord::apply(
                        before.clone(),
                        incoming.event,
                        incoming.app_key,
                        incoming.received_at,
                        incoming.decision,
                    );
                    if before.is_none() {
                        by_time.insert(keys::time_index(after.first_seen, id), &[])?;
                    }
                    let had = |f: fn(&VerificationRecord) -> &Option<String>| {
                        before.as_ref().and_then(|b| f(b).as_ref()).is_some()
                    };
                    if let (false, Some(number)) = (had(|r| &r.number), &after.number) {
                        by_number.insert(keys::index(number, id), &[])?;
                    }
                    if let (false, Some(reference)) = (had(|r| &r.reference), &after.reference) {
                        by_reference.insert(keys::index(reference, id), &[])?;
                    }
                    let encoded =
                        serde_json::to_vec(&after).map_err(ConflictableTransactionError::Abort)?;
                    records.insert(id.as_bytes(), encoded)?;
                    events.insert(&keys::event(seq), stored_event.as_slice())?;
                    dedup.insert(identity.as_slice(), first.as_slice())?;
                    Ok(RecordOutcome::Stored { seq })
                },
            );
        match result {
            Ok(outcome) => Ok(outcome),
            Err(TransactionError::Abort(e)) => Err(StoreError::Corrupt(e)),
            Err(TransactionError::Storage(e)) => Err(StoreError::Io(e)),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        self.inner
            .trees
            .records
            .get(id.as_bytes())?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(StoreError::from))
            .transpose()
    }

    /// Ids of the verifications for a number, oldest index entry first.
    pub fn ids_by_number(&self, number: &str) -> Result<Vec<String>, StoreError> {
        ids_with_prefix(&self.inner.trees.by_number, number)
    }

    /// Ids of the verifications carrying a reference.
    pub fn ids_by_reference(&self, reference: &str) -> Result<Vec<String>, StoreError> {
        ids_with_prefix(&self.inner.trees.by_reference, reference)
    }

    /// Ids first seen in `[since, until)`, in time order.
    pub fn ids_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let start = keys::time_index(since, "");
        let end = keys::time_index(until, "");
        self.inner
            .trees
            .by_time
            .range(start..end)
            .map(|entry| {
                let (key, _) = entry?;
                Ok(String::from_utf8_lossy(key.get(8..).unwrap_or_default()).into_owned())
            })
            .collect()
    }

    /// Raw events with sequence number ≥ `from_seq`, oldest first, at most `limit`.
    pub fn events_from(&self, from_seq: u64, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner
            .trees
            .events
            .range(keys::event(from_seq)..)
            .take(limit)
            .map(|entry| Ok(serde_json::from_slice(&entry?.1)?))
            .collect()
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// Flushes everything and stops the flusher; the database closes when the last clone
    /// is dropped.
    pub fn shutdown(&self) -> Result<(), StoreError> {
        self.inner.commit.shutdown();
        self.inner.db.flush()?;
        Ok(())
    }
}

/// The store once it has opened. verigate answers HTTP before that (liveness, readiness,
/// `on_error` answers), because opening can wait on a lock a previous process still holds.
#[derive(Clone, Default)]
pub struct StoreSlot {
    store: Arc<std::sync::OnceLock<Store>>,
    /// Why the store is not open yet, for the readiness check.
    waiting_on: Arc<std::sync::Mutex<Option<String>>>,
}

impl StoreSlot {
    pub fn get(&self) -> Option<&Store> {
        self.store.get()
    }

    /// Why the store is not open yet (`None` once open or before the first attempt).
    pub fn waiting_on(&self) -> Option<String> {
        self.waiting_on.lock().ok().and_then(|w| w.clone())
    }

    /// Opens the store on a background thread, retrying until it opens or `stop` is set.
    pub fn open_in_background(
        &self,
        path: std::path::PathBuf,
        stop: Arc<std::sync::atomic::AtomicBool>,
        on_flush: impl Fn(Duration) + Clone + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let slot = self.clone();
        std::thread::Builder::new()
            .name("verigate-store-open".into())
            .spawn(move || {
                let mut attempt: u32 = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match Store::open(&path, on_flush.clone()) {
                        Ok(store) => {
                            tracing::info!(path = %path.display(), "store open");
                            let _ = slot.store.set(store);
                            if let Ok(mut w) = slot.waiting_on.lock() {
                                *w = None;
                            }
                            return;
                        }
                        Err(err) => {
                            // Log the first failure and then every ~30 s, not every retry.
                            if attempt % 60 == 0 {
                                tracing::error!(error.message = %err, "store not open yet; retrying");
                            }
                            if let Ok(mut w) = slot.waiting_on.lock() {
                                *w = Some(err.to_string());
                            }
                            attempt = attempt.wrapping_add(1);
                            std::thread::sleep(STORE_OPEN_RETRY);
                        }
                    }
                }
            })
    }
}

const STORE_OPEN_RETRY: Duration = Duration::from_millis(500);

fn ids_with_prefix(tree: &Tree, value: &str) -> Result<Vec<String>, StoreError> {
    let prefix = keys::index(value, "");
    tree.scan_prefix(&prefix)
        .map(|entry| {
            let (key, _) = entry?;
            Ok(String::from_utf8_lossy(&key[prefix.len()..]).into_owned())
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    async fn put(store: &Store, json: &str, secs: i64) -> RecordOutcome {
        let event = VerificationEvent::parse(json.as_bytes()).unwrap();
        store
            .record(IncomingEvent {
                event: &event,
                raw: json.as_bytes(),
                app_key: "app",
                received_at: at(secs),
                decision: None,
            })
            .await
            .unwrap()
    }

    fn request(id: &str, number: &str, reference: &str) -> String {
        format!(
            r#"{{"id":"{id}","event":"VerificationRequestEvent","method":"sms","identity":{{"type":"number","endpoint":"{number}"}},"reference":"{reference}"}}"#
        )
    }

    #[tokio::test]
    async fn indexes_find_records_by_number_reference_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), |_| {}).unwrap();
        put(&store, &request("a", "+46700000001", "r1"), 0).await;
        put(&store, &request("b", "+46700000001", "r2"), 10).await;
        put(&store, &request("c", "+467000000011", "r1"), 20).await;
        // A later result for `a` must not add index entries again.
        put(&store, r#"{"id":"a","event":"VerificationResultEvent","status":"SUCCESSFUL","reference":"r1"}"#, 30).await;

        assert_eq!(store.ids_by_number("+46700000001").unwrap(), ["a", "b"]);
        assert_eq!(store.ids_by_number("+467000000011").unwrap(), ["c"]);
        assert_eq!(store.ids_by_reference("r1").unwrap(), ["a", "c"]);
        assert_eq!(store.ids_between(at(5), at(25)).unwrap(), ["b", "c"]);
        assert_eq!(store.ids_between(at(0), at(100)).unwrap(), ["a", "b", "c"]);
    }

    #[tokio::test]
    async fn the_event_log_keeps_every_accepted_body_in_order_and_no_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), |_| {}).unwrap();
        let first = request("a", "+46700000001", "r1");
        let RecordOutcome::Stored { seq } = put(&store, &first, 0).await else {
            panic!("first delivery must be stored")
        };
        assert!(
            matches!(put(&store, &first, 1).await, RecordOutcome::Duplicate(d) if d.seq == seq)
        );
        put(&store, r#"{"id":"z","event":"Mystery","x":[1,2]}"#, 2).await;
        let events = store.events_from(0, 10).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].body.get(), first);
        assert_eq!(events[1].event, "Mystery");
        assert!(events[0].seq < events[1].seq);
        assert_eq!(store.events_from(events[1].seq, 10).unwrap().len(), 1);
    }
}
