//! The embedded verification store (sled).
//!
//! Contract: [`Store::record`] resolves `Ok` only once the event, the merged
//! [`VerificationRecord`] and its index entries are on disk; the HTTP layer acknowledges
//! an event only after that. Writes are idempotent on event identity, so a duplicate
//! delivery changes nothing and gets the answer given the first time.
//!
//! Keyspaces (one sled tree each): `records` (id → record JSON), `events` (time, seq →
//! raw event), `dedup` (event identity → first answer), and the indexes `by_number`,
//! `by_reference`, `by_time`. This is the whole interface the rest of verigate uses; a
//! shared backend for replicated deployments would implement the same methods.
//!
//! Writes go through one writer thread (`writer.rs`) that applies whatever has queued up
//! as one atomic transaction; the group-commit flusher (`durability.rs`) then makes them
//! durable, many at a time.
//!
//! Reads see a stable order: every write takes a strictly increasing (time, seq) key
//! under a lock and is "in flight" until committed; range reads stop before the oldest
//! write in flight, so a page boundary never moves and pagination has no gaps.

mod durability;
mod keys;
mod record;
pub mod retention;
mod writer;

use std::{
    borrow::Cow,
    collections::BTreeSet,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use sled::Tree;

pub use durability::FlushError;
pub use record::{
    DecisionRecord, RecordStamp, RequestPart, ResultPart, SmsDeliveryPart, VerificationRecord,
};

use crate::events::VerificationEvent;
use durability::GroupCommit;
use writer::{WriteJob, Writer, WriterContext};

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
    #[error("the cursor is not one this service issued")]
    BadCursor,
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

#[derive(Clone)]
struct Trees {
    records: Tree,
    events: Tree,
    dedup: Tree,
    by_number: Tree,
    by_reference: Tree,
    by_time: Tree,
    /// Small named state other parts of verigate keep across restarts.
    meta: Tree,
}

/// How phone numbers are kept. Hashed: a keyed HMAC of the number replaces it in the
/// record, the indexes and the stored raw body; country and prefix are kept.
#[derive(Clone, Default)]
pub enum NumberPrivacy {
    #[default]
    Plain,
    Hashed(Hmac<sha2::Sha256>),
}

impl NumberPrivacy {
    pub fn hashed(key: &[u8]) -> Self {
        // HMAC accepts keys of any length.
        Hmac::new_from_slice(key).map_or(Self::Plain, Self::Hashed)
    }

    /// The form a number takes in the store (and in queries by number).
    pub fn protect<'a>(&self, number: &'a str) -> Cow<'a, str> {
        match self {
            Self::Plain => Cow::Borrowed(number),
            Self::Hashed(mac) => {
                let mut mac = mac.clone();
                mac.update(number.as_bytes());
                Cow::Owned(format!("hmac-sha256:{}", hex(&mac.finalize().into_bytes())))
            }
        }
    }

    /// The decision as stored: counter keys derived from the number are hashed too.
    fn protect_decision<'a>(&self, decision: &'a DecisionRecord) -> Cow<'a, DecisionRecord> {
        if matches!(self, Self::Plain) || decision.explanation.counters.is_empty() {
            return Cow::Borrowed(decision);
        }
        let mut owned = decision.clone();
        for reading in &mut owned.explanation.counters {
            if reading.key.starts_with('+') {
                reading.key = self.protect(&reading.key).into_owned();
            }
        }
        Cow::Owned(owned)
    }

    /// The raw body as stored: unchanged, or with `identity.endpoint` replaced by its hash.
    fn protect_body<'a>(&self, raw: &'a [u8]) -> Cow<'a, [u8]> {
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

/// How a write is made durable before `record` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Concurrent writers share one flush (production).
    #[default]
    GroupCommit,
    /// Each writer flushes on its own: the baseline group commit is measured against.
    FlushPerWrite,
    /// Applied but never flushed by `record`: what durability costs, for benchmarks only.
    /// No setting selects it; verigate never acknowledges an event this way.
    Unflushed,
}

/// Options fixed when the store opens.
#[derive(Clone, Default)]
pub struct StoreOptions {
    pub durability: Durability,
    pub numbers: NumberPrivacy,
}

/// Hands out the (time, seq) order of writes and tracks which are still in flight.
#[derive(Default)]
struct WriteOrder {
    last_millis: i64,
    in_flight: BTreeSet<(i64, u64)>,
}

struct Inner {
    /// First, so that dropping the store writes what is queued before anything closes.
    writer: Mutex<Writer>,
    db: sled::Db,
    trees: Trees,
    options: StoreOptions,
    order: Arc<Mutex<WriteOrder>>,
    commit: GroupCommit,
}

/// Cheap to clone; all clones share one database and one flusher.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// A position in a time-ordered listing, opaque to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(Vec<u8>);

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.0)
    }

    pub fn decode(text: &str) -> Result<Self, StoreError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| StoreError::BadCursor)?;
        if bytes.len() < 16 {
            return Err(StoreError::BadCursor);
        }
        Ok(Self(bytes))
    }

    /// The first key after this position.
    fn successor(&self) -> Vec<u8> {
        let mut key = self.0.clone();
        key.push(0);
        key
    }
}

/// One page of a listing; `next` is set when more may follow.
#[derive(Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

impl Store {
    /// Opens (or creates) the store; `on_flush` observes each group flush's duration.
    pub fn open(
        path: &Path,
        on_flush: impl Fn(Duration) + Send + 'static,
    ) -> Result<Self, StoreError> {
        Self::open_with(path, StoreOptions::default(), on_flush)
    }

    pub fn open_with(
        path: &Path,
        options: StoreOptions,
        on_flush: impl Fn(Duration) + Send + 'static,
    ) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            // verigate flushes when it acknowledges; sled's timer flush would only add I/O.
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
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
            meta: tree("meta")?,
        };
        // Continue the order after whatever is stored, even if the clock went back.
        let last_millis = [&trees.by_time, &trees.events]
            .iter()
            .filter_map(|t| t.last().ok().flatten())
            .filter_map(|(key, _)| key.get(..8).map(|b| b.to_vec()))
            .filter_map(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(|b| i64::try_from(u64::from_be_bytes(b)).unwrap_or(i64::MAX))
            .max()
            .unwrap_or(0);
        let flusher_db = db.clone();
        let commit = GroupCommit::start(
            move || flusher_db.flush().map(|_| ()).map_err(|e| e.to_string()),
            on_flush,
        );
        let order = Arc::new(Mutex::new(WriteOrder {
            last_millis,
            in_flight: BTreeSet::new(),
        }));
        let writer = Writer::start(WriterContext {
            db: db.clone(),
            trees: trees.clone(),
            order: Arc::clone(&order),
            max_batch: match options.durability {
                Durability::GroupCommit | Durability::Unflushed => writer::MAX_BATCH,
                Durability::FlushPerWrite => 1,
            },
        });
        Ok(Self {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                db,
                trees,
                options,
                order,
                commit,
            }),
        })
    }

    /// Records an event durably; see the module docs for the guarantees.
    pub async fn record(&self, incoming: IncomingEvent<'_>) -> Result<RecordOutcome, StoreError> {
        let outcome = self.write(incoming).await?;
        match (&outcome, self.inner.options.durability) {
            (RecordOutcome::Stored { .. }, Durability::GroupCommit) => {
                self.inner.commit.durable().await?
            }
            // The first delivery may still be in flight in another request: make sure it
            // is durable before answering as if it were.
            (RecordOutcome::Duplicate(_), Durability::GroupCommit) => {
                self.inner.commit.barrier().await?
            }
            (_, Durability::Unflushed) => {}
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

    /// Keys below this are committed: the (time, seq) of the oldest write in flight.
    fn visible_before(&self) -> Option<[u8; 16]> {
        let order = self.inner.order.lock().ok()?;
        let &(millis, seq) = order.in_flight.first()?;
        let at = Utc.timestamp_millis_opt(millis).single()?;
        Some(keys::event(at, seq))
    }

    /// Hands the event to the writer thread and waits until it is applied (not yet
    /// flushed).
    async fn write(&self, incoming: IncomingEvent<'_>) -> Result<RecordOutcome, StoreError> {
        let numbers = &self.inner.options.numbers;
        let (reply, outcome) = tokio::sync::oneshot::channel();
        let job = WriteJob {
            event: incoming.event.clone(),
            identity: incoming.identity(),
            body: numbers.protect_body(incoming.raw).into_owned(),
            app_key: incoming.app_key.to_owned(),
            received_at: incoming.received_at,
            decision: incoming
                .decision
                .map(|d| numbers.protect_decision(d).into_owned()),
            number: incoming
                .event
                .number()
                .map(|n| (numbers.protect(n).into_owned(), n.to_owned())),
            reply,
        };
        self.inner
            .writer
            .lock()
            .map_err(|_| FlushError("writer lock poisoned".into()))?
            .submit(job)?;
        outcome
            .await
            .map_err(|_| FlushError("the store writer stopped".into()))?
    }

    /// Keeps `value` under `name`, durably (e.g. the policy's quarantines).
    pub async fn save_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.inner.trees.meta.insert(name, value)?;
        self.inner.commit.durable().await?;
        Ok(())
    }

    pub fn load_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.inner.trees.meta.get(name)?.map(|v| v.to_vec()))
    }

    pub fn get(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        self.inner
            .trees
            .records
            .get(id.as_bytes())?
            .map(|bytes| serde_json::from_slice(&bytes).map_err(StoreError::from))
            .transpose()
    }

    /// How numbers are stored, so queries by number can be put in the same form.
    pub fn numbers(&self) -> &NumberPrivacy {
        &self.inner.options.numbers
    }

    /// Ids of the verifications for a number (as stored), in index order.
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
        self.inner
            .trees
            .by_time
            .range(keys::time_floor(since)..keys::time_floor(until))
            .map(|entry| Ok(keys::id_of_time_index(&entry?.0)))
            .collect()
    }

    /// The key range `[since, until)` after `cursor`, cut at the oldest write in flight.
    fn bounds(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        after: Option<&Cursor>,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut start = keys::time_floor(since).to_vec();
        if let Some(cursor) = after {
            start = start.max(cursor.successor());
        }
        let mut end = keys::time_floor(until).to_vec();
        if let Some(visible) = self.visible_before() {
            end = end.min(visible.to_vec());
        }
        (start, end)
    }

    /// Records first seen in `[since, until)` after `cursor`, in time order, at most
    /// `limit` of them matching `keep`, and a cursor when more may follow. Reads at most
    /// `scan_budget` records, so a sparse filter over a long range returns a short page
    /// with a cursor rather than a long wait.
    pub fn records_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        after: Option<&Cursor>,
        limit: usize,
        scan_budget: usize,
        keep: impl Fn(&VerificationRecord) -> bool,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let range = self.bounds(since, until, after);
        page(
            &self.inner.trees.by_time,
            range,
            limit,
            scan_budget,
            |key, _| Ok(self.get(&keys::id_of_time_index(key))?.filter(|r| keep(r))),
        )
    }

    /// Like [`Store::records_between`] without a filter, but returns each record's stored
    /// JSON as is: exports copy bytes instead of decoding and re-encoding every record.
    pub fn record_bytes_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<sled::IVec>, StoreError> {
        let range = self.bounds(since, until, after);
        let records = &self.inner.trees.records;
        page(
            &self.inner.trees.by_time,
            range,
            limit,
            usize::MAX,
            |key, _| Ok(records.get(keys::id_of_time_index(key))?),
        )
    }

    /// The records with these ids (missing ones skipped), in time order, after `cursor`.
    pub fn records_by_ids(
        &self,
        ids: &[String],
        after: Option<&Cursor>,
        limit: usize,
        keep: impl Fn(&VerificationRecord) -> bool,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let visible = self.visible_before();
        let mut keyed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(record) = self.get(id)? {
                let key = keys::time_index(record.first_seen, record.seq, &record.id);
                let after_cursor = after.is_none_or(|c| key.as_slice() > c.0.as_slice());
                let committed = visible.is_none_or(|v| key.as_slice() < v.as_slice());
                if after_cursor && committed && keep(&record) {
                    keyed.push((key, record));
                }
            }
        }
        keyed.sort_by(|a, b| a.0.cmp(&b.0));
        let more = keyed.len() > limit;
        keyed.truncate(limit);
        let next = more
            .then(|| keyed.last().map(|(k, _)| Cursor(k.clone())))
            .flatten();
        Ok(Page {
            items: keyed.into_iter().map(|(_, r)| r).collect(),
            next,
        })
    }

    /// Raw events received in `[since, until)` after `cursor`, oldest first.
    pub fn events_between(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page<StoredEvent>, StoreError> {
        let range = self.bounds(since, until, after);
        page(
            &self.inner.trees.events,
            range,
            limit,
            usize::MAX,
            |_, value| Ok(Some(serde_json::from_slice(value)?)),
        )
    }

    /// Deletes up to `batch` records first seen before `cutoff` (with their index and
    /// dedup entries) and up to `batch` raw events received before it. Returns how many
    /// of each went; call again until both are zero.
    pub fn delete_before(
        &self,
        cutoff: DateTime<Utc>,
        batch: usize,
    ) -> Result<(usize, usize), StoreError> {
        let t = &self.inner.trees;
        let end = keys::time_floor(cutoff);
        let mut records = 0;
        for entry in t.by_time.range(..end).take(batch) {
            let (key, _) = entry?;
            let id = keys::id_of_time_index(&key);
            if let Some(record) = self.get(&id)? {
                if let Some(number) = &record.number {
                    t.by_number.remove(keys::index(number, &id))?;
                }
                if let Some(reference) = &record.reference {
                    t.by_reference.remove(keys::index(reference, &id))?;
                }
            }
            for dedup in t.dedup.scan_prefix(keys::dedup_prefix(&id)).keys() {
                t.dedup.remove(dedup?)?;
            }
            t.records.remove(id.as_bytes())?;
            t.by_time.remove(key)?;
            records += 1;
        }
        let mut events = 0;
        for key in t.events.range(..end).keys().take(batch) {
            t.events.remove(key?)?;
            events += 1;
        }
        Ok((records, events))
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.inner.db.size_on_disk()?)
    }

    /// Flushes everything and stops the flusher; the database closes when the last clone
    /// is dropped.
    pub fn shutdown(&self) -> Result<(), StoreError> {
        if let Ok(mut writer) = self.inner.writer.lock() {
            writer.stop();
        }
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
        options: StoreOptions,
        stop: Arc<std::sync::atomic::AtomicBool>,
        on_flush: impl Fn(Duration) + Clone + Send + 'static,
        on_open: impl FnOnce(&Store) + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let slot = self.clone();
        let mut on_open = Some(on_open);
        std::thread::Builder::new()
            .name("verigate-store-open".into())
            .spawn(move || {
                let mut attempt: u32 = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match Store::open_with(&path, options.clone(), on_flush.clone()) {
                        Ok(store) => {
                            tracing::info!(path = %path.display(), "store open");
                            // Before anyone can use it: e.g. the policy relearns from it.
                            if let Some(on_open) = on_open.take() {
                                on_open(&store);
                            }
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

/// Walks `tree` over `range`, turning entries into items (`None` skips one), until
/// `limit` items or `budget` entries were read; the cursor then points at the last entry
/// read, so the next page starts right after it.
fn page<T>(
    tree: &Tree,
    (start, end): (Vec<u8>, Vec<u8>),
    limit: usize,
    budget: usize,
    mut item: impl FnMut(&[u8], &[u8]) -> Result<Option<T>, StoreError>,
) -> Result<Page<T>, StoreError> {
    let mut items = Vec::new();
    if start >= end {
        return Ok(Page { items, next: None });
    }
    for (read, entry) in tree.range(start..end).enumerate() {
        let (key, value) = entry?;
        items.extend(item(&key, &value)?);
        if items.len() == limit || read + 1 == budget {
            return Ok(Page {
                items,
                next: Some(Cursor(key.to_vec())),
            });
        }
    }
    Ok(Page { items, next: None })
}

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
        let all = store.events_between(at(-1), at(100), None, 10).unwrap();
        assert!(all.next.is_none());
        let events = all.items;
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].body.get(), first);
        assert_eq!(events[1].event, "Mystery");
        assert!(events[0].seq < events[1].seq);
        let page = store.events_between(at(-1), at(100), None, 1).unwrap();
        assert_eq!(page.items.len(), 1);
        let rest = store
            .events_between(at(-1), at(100), page.next.as_ref(), 10)
            .unwrap();
        assert_eq!(rest.items.len(), 1);
        assert_eq!(rest.items[0].event, "Mystery");
    }

    /// Sends every body at once, so the writer gets them as one or a few batches.
    async fn put_all(store: &Store, bodies: &[String]) -> Vec<Result<RecordOutcome, StoreError>> {
        let events: Vec<_> = bodies
            .iter()
            .map(|b| VerificationEvent::parse(b.as_bytes()).unwrap())
            .collect();
        let writes = bodies.iter().zip(&events).map(|(body, event)| {
            store.record(IncomingEvent {
                event,
                raw: body.as_bytes(),
                app_key: "app",
                received_at: at(0),
                decision: None,
            })
        });
        futures_util::future::join_all(writes).await
    }

    #[tokio::test]
    async fn one_undecodable_record_fails_only_its_own_event_in_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), |_| {}).unwrap();
        store
            .inner
            .trees
            .records
            .insert("broken", &b"not a record"[..])
            .unwrap();
        let mut bodies: Vec<String> = (0..40)
            .map(|i| request(&format!("ok-{i}"), "+46700000001", "r"))
            .collect();
        bodies.insert(20, request("broken", "+46700000001", "r"));
        let outcomes = put_all(&store, &bodies).await;
        for (body, outcome) in bodies.iter().zip(&outcomes) {
            if body.contains("\"broken\"") {
                assert!(
                    matches!(outcome, Err(StoreError::Corrupt(_))),
                    "{outcome:?}"
                );
            } else {
                assert!(
                    matches!(outcome, Ok(RecordOutcome::Stored { .. })),
                    "{outcome:?}"
                );
            }
        }
        assert_eq!(store.ids_by_number("+46700000001").unwrap().len(), 40);
    }

    #[tokio::test]
    async fn events_of_one_verification_in_the_same_batch_join_and_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), |_| {}).unwrap();
        let result = r#"{"id":"j","event":"VerificationResultEvent","status":"SUCCESSFUL"}"#;
        let bodies = vec![
            request("j", "+46700000001", "r"),
            result.to_owned(),
            result.to_owned(),
            request("j", "+46700000001", "r"),
        ];
        let outcomes = put_all(&store, &bodies).await;
        let stored = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(RecordOutcome::Stored { .. })))
            .count();
        assert_eq!(stored, 2, "{outcomes:?}");
        let record = store.get("j").unwrap().unwrap();
        assert_eq!(record.event_count, 2);
        assert!(record.request.is_some() && record.result.is_some());
        assert_eq!(store.ids_by_number("+46700000001").unwrap(), ["j"]);
    }
}
