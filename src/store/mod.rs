//! Where verifications are kept: one interface, [`VerificationStore`], that every storage
//! engine implements, and [`Store`], the handle the rest of verigate uses.
//!
//! The contract every engine keeps (tests/api/store_contract.rs checks it on each one):
//! - [`VerificationStore::record`] resolves `Ok` only once the event is durable; the HTTP
//!   layer acknowledges nothing before that.
//! - Writes are idempotent on [`EventIdentity`]: a duplicate changes nothing and gets the
//!   answer the first delivery got.
//! - Listings are ordered by (first seen, creation order) and never gain or lose a record
//!   behind a cursor handed out earlier, however many writes happen meanwhile.
//! - Retention deletes a verification with everything derived from it.
//!
//! [`Store`] adds what does not depend on the engine: number privacy (hashing happens here,
//! for writes and queries alike) and single flight, so that the same event delivered twice
//! at the same moment is decided once and both deliveries get one answer.

pub mod postgres;
mod privacy;
mod query;
mod record;
pub mod retention;
mod single_flight;
pub mod sled;
mod slot;
mod stats;

use std::{
    path::PathBuf,
    sync::{Arc, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub use privacy::NumberPrivacy;
pub use query::{Cursor, EventQuery, Page, StatsQuery, VerificationFilter, VerificationQuery};
pub use record::{RecordStamp, RequestPart, ResultPart, SmsDeliveryPart, VerificationRecord};
pub use single_flight::{Admission, Claim};
pub use slot::StoreSlot;
pub use stats::{GroupBy, GroupStats, StatsBuilder, StatsRow};

use crate::{decision::DecisionRecord, events::VerificationEvent, phone::NumberFacts};

/// Why a store operation failed, in terms every engine shares.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store is opening, recovering or shutting down: try again shortly.
    #[error("the store is not available: {0}")]
    Unavailable(String),
    /// Reading or writing failed (a full disk, an I/O error, a lost connection).
    #[error("the store failed: {0}")]
    Failed(String),
    /// A stored value could not be decoded.
    #[error("a stored value could not be decoded: {0}")]
    Corrupt(String),
    /// The data on disk was written by another version and must be migrated first.
    #[error("{0}")]
    NeedsMigration(String),
    #[error("the cursor is not one this service issued")]
    BadCursor,
}

/// Whether the store can take writes now; the readiness check reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Ready,
    /// Writes fail until the cause goes away; the store recovers by itself.
    Degraded(String),
}

/// What is the same for every delivery of one event: the verification id, the event type
/// and, where one verification can have several events of a type, what tells them apart.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventIdentity {
    pub id: String,
    pub event: String,
    /// A result's status (Sinch may report PENDING, then a final status), the hash of the
    /// whole body for an event type verigate does not know, else empty.
    pub discriminator: String,
}

impl EventIdentity {
    pub fn of(event: &VerificationEvent, raw: &[u8]) -> Self {
        let discriminator = match event {
            VerificationEvent::Result(r) => r.status.clone(),
            VerificationEvent::Unknown { .. } => hex(&Sha256::digest(raw)),
            VerificationEvent::Request(_) | VerificationEvent::SmsDelivered(_) => String::new(),
        };
        Self {
            id: event.id().to_owned(),
            event: event.event_type().to_owned(),
            discriminator,
        }
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
    /// Newly stored, under this sequence number in the event log. For a result event,
    /// `decision` is the decision its verification was given, when the engine had the
    /// record at hand while writing (PostgreSQL's group commit reads it to merge into);
    /// `None` says nothing: read the record to know.
    ///
    /// `taken` is what the event's record took out of the outcome book
    /// ([`OutcomeBookChange::Take`]): the JSON the verification was tracked with, `None`
    /// when it was not in the book (or nothing was asked).
    Stored {
        seq: u64,
        decision: Option<Box<DecisionRecord>>,
        taken: Option<String>,
    },
    /// Seen before: nothing was written.
    Duplicate(FirstDelivery),
}

/// What an event's record does to the outcome book of a policy whose state is shared
/// between replicas (allowed verifications awaiting their result): done by the engine in
/// the record's own transaction, so the book costs a decision no write of its own and a
/// result is taken out of the book by exactly one replica, the one that stores it. Only
/// an engine that holds shared policy state (PostgreSQL) is handed one; the embedded
/// engine's policy keeps its book in memory.
#[derive(Debug, Clone, PartialEq)]
pub enum OutcomeBookChange {
    /// A request allowed: track its verification until `due_ms` (after which it counts
    /// as failed), with what to count of it (JSON).
    Put { due_ms: i64, tracked: String },
    /// A final result: take its verification out of the book (see `RecordOutcome`).
    Take,
}

/// One accepted event as the raw event log keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StoredEvent {
    pub seq: u64,
    pub received_at: DateTime<Utc>,
    pub app_key: String,
    pub event: String,
    pub id: String,
    /// The callback body exactly as received (with the number hashed in hashed mode).
    #[schemars(with = "serde_json::Value")]
    pub body: Box<RawValue>,
}

/// The number of an event, as it is to be stored and as it was received. The received
/// form is only used in memory, to look up the country and prefix; it is never written.
#[derive(Debug, Clone)]
pub struct EventNumber {
    pub stored: String,
    pub received: String,
}

impl EventNumber {
    pub fn facts(&self) -> NumberFacts {
        crate::phone::facts(&self.received)
    }
}

/// An event on its way into an engine, owned (it may cross threads), with its body and
/// decision already in stored form.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub identity: EventIdentity,
    pub event: VerificationEvent,
    pub body: Vec<u8>,
    pub app_key: String,
    pub received_at: DateTime<Utc>,
    pub decision: Option<DecisionRecord>,
    pub number: Option<EventNumber>,
    pub book: Option<OutcomeBookChange>,
}

/// What a decision asks of a number's history: up to `limit` of its newest
/// verifications first seen in `[since, until)`. The number is as clients know it when
/// handed to [`Store`], in stored form when handed to an engine.
#[derive(Debug, Clone, Copy)]
pub struct HistoryAsk<'a> {
    pub number: &'a str,
    pub since: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub limit: usize,
}

/// An engine's answer to [`VerificationStore::first_delivery_with_history`]: the first
/// delivery (or the claim), and the number's history, each with its own outcome.
pub type DeliveryWithHistory = (
    Result<Option<FirstDelivery>, StoreError>,
    Result<Vec<VerificationRecord>, StoreError>,
);

/// How much retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub verifications: usize,
    pub events: usize,
}

/// A storage engine. Implementations are cheap to share (`Arc`) and safe to call from many
/// tasks at once.
#[async_trait::async_trait]
pub trait VerificationStore: Send + Sync + 'static {
    /// The first delivery of this event, if one is stored; only ever durable data. An
    /// engine may answer `None` for an event that is not a request (nothing is decided
    /// for it) when its `record` answers a repeat as a duplicate by itself.
    async fn first_delivery(
        &self,
        identity: &EventIdentity,
    ) -> Result<Option<FirstDelivery>, StoreError>;

    /// Stores an event and merges it into its verification; resolves once it is durable.
    async fn record(&self, event: NewEvent) -> Result<RecordOutcome, StoreError>;

    async fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError>;

    /// Verifications matching `query`, oldest first. `query.filter.number` is in stored form.
    async fn verifications(
        &self,
        query: VerificationQuery,
    ) -> Result<Page<VerificationRecord>, StoreError>;

    /// Up to `limit` of the verifications of `number` (in stored form) first seen in
    /// `[since, until)`, the newest: what a policy reads of a number's history on the
    /// way to a decision, so an engine answers from its number index without the
    /// ordering guarantees of a listing.
    async fn recent_of_number(
        &self,
        number: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<VerificationRecord>, StoreError>;

    /// `first_delivery` and `recent_of_number` for a request whose decision reads its
    /// number's history; an engine that can answer both in one round trip does.
    async fn first_delivery_with_history(
        &self,
        identity: &EventIdentity,
        history: &HistoryAsk<'_>,
    ) -> DeliveryWithHistory {
        futures_util::future::join(
            self.first_delivery(identity),
            self.recent_of_number(history.number, history.since, history.until, history.limit),
        )
        .await
    }

    async fn stats(&self, query: StatsQuery) -> Result<Vec<GroupStats>, StoreError>;

    /// The raw event log, oldest first.
    async fn events(&self, query: EventQuery) -> Result<Page<StoredEvent>, StoreError>;

    /// Deletes every verification first seen before `cutoff` (with its indexes and
    /// identities) and every raw event received before it.
    async fn delete_before(&self, cutoff: DateTime<Utc>) -> Result<Deleted, StoreError>;

    /// Small named state other parts of verigate keep across restarts.
    async fn load_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn save_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError>;

    fn health(&self) -> StoreHealth;

    /// Bytes the store occupies on disk, when the engine can tell.
    fn size_on_disk(&self) -> Option<u64>;

    /// Bytes free for the store to grow into on its volume (`None`: not a local disk).
    fn free_space(&self) -> Option<u64> {
        None
    }

    /// Makes everything durable and releases the engine's files or connections.
    async fn shutdown(&self) -> Result<(), StoreError>;
}

/// What a store reports about itself while it runs (metrics implement it).
pub trait StoreObserver: Send + Sync + 'static {
    /// One group commit made this many events durable in `elapsed`.
    fn committed(&self, elapsed: Duration, events: usize);
    /// A write could not be made durable; `stage` says where.
    fn write_failed(&self, stage: &'static str);
    /// Everything in memory up to here was moved into the indexes.
    fn checkpointed(&self, elapsed: Duration);
}

/// An observer that ignores everything (offline tools, tests).
pub struct Unobserved;

impl StoreObserver for Unobserved {
    fn committed(&self, _: Duration, _: usize) {}
    fn write_failed(&self, _: &'static str) {}
    fn checkpointed(&self, _: Duration) {}
}

/// Options fixed when the store opens.
#[derive(Clone)]
pub struct StoreOptions {
    pub path: PathBuf,
    pub numbers: NumberPrivacy,
    /// Memory the embedded engine may use to cache its indexes.
    pub cache_bytes: u64,
    /// Events the embedded engine holds in memory (and in its write-ahead log) before it
    /// moves them into its index: more means fewer, larger checkpoints and more memory.
    pub checkpoint_events: usize,
    /// Set: the PostgreSQL backend instead of the embedded one.
    pub postgres: Option<postgres::PostgresOptions>,
}

impl StoreOptions {
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            numbers: NumberPrivacy::Plain,
            cache_bytes: 32 << 20,
            checkpoint_events: 8_192,
            postgres: None,
        }
    }

    /// Where the store is, for logs: the folder, or the database URL without password.
    pub fn location(&self) -> String {
        match &self.postgres {
            Some(pg) => postgres::redacted(secrecy::ExposeSecret::expose_secret(&pg.url)),
            None => self.path.display().to_string(),
        }
    }
}

/// An event to record, with the context verigate received it in.
#[derive(Debug, Clone, Copy)]
pub struct IncomingEvent<'a> {
    pub event: &'a VerificationEvent,
    pub raw: &'a [u8],
    pub app_key: &'a str,
    pub received_at: DateTime<Utc>,
    pub decision: Option<&'a DecisionRecord>,
    /// What the record does to the shared outcome book, if anything.
    pub book: Option<&'a OutcomeBookChange>,
}

/// The store as verigate uses it. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn VerificationStore>,
    numbers: NumberPrivacy,
    flights: Arc<single_flight::SingleFlight>,
}

impl Store {
    pub fn new(engine: Arc<dyn VerificationStore>, numbers: NumberPrivacy) -> Self {
        Self {
            engine,
            numbers,
            flights: Arc::default(),
        }
    }

    /// Opens the embedded store at `options.path`.
    pub fn open(
        options: &StoreOptions,
        observer: Arc<dyn StoreObserver>,
    ) -> Result<Self, StoreError> {
        let engine = sled::SledStore::open(options, observer)?;
        Ok(Self::new(Arc::new(engine), options.numbers.clone()))
    }

    /// Opens the store `options` name: PostgreSQL (migrating its schema first) when
    /// set, else the embedded store (on a blocking thread: it reads files).
    pub async fn connect(
        options: &StoreOptions,
        observer: Arc<dyn StoreObserver>,
    ) -> Result<Self, StoreError> {
        match &options.postgres {
            Some(pg) => {
                let engine = postgres::PostgresStore::open(pg).await?;
                Ok(Self::new(Arc::new(engine), options.numbers.clone()))
            }
            None => {
                let options = options.clone();
                tokio::task::spawn_blocking(move || Self::open(&options, observer))
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Failed(e.to_string())))
            }
        }
    }

    /// Decides whether `incoming` is the first delivery of its event. A delivery that
    /// arrives while another of the same event is in flight waits for it and is then
    /// answered as a duplicate.
    pub async fn admit(&self, incoming: IncomingEvent<'_>) -> Result<Admission, StoreError> {
        let identity = EventIdentity::of(incoming.event, incoming.raw);
        self.flights
            .admit(identity, |identity| {
                let engine = Arc::clone(&self.engine);
                async move { engine.first_delivery(&identity).await }
            })
            .await
    }

    /// [`Store::admit`] for a request whose decision reads its number's history, with that
    /// history (`history.number` as clients know it): in one round trip where the engine
    /// can. Only a first delivery's history is read.
    pub async fn admit_with_history(
        &self,
        incoming: IncomingEvent<'_>,
        history: HistoryAsk<'_>,
    ) -> (
        Result<Admission, StoreError>,
        Result<Vec<VerificationRecord>, StoreError>,
    ) {
        let identity = EventIdentity::of(incoming.event, incoming.raw);
        let stored = self.numbers.protect(history.number);
        let history = HistoryAsk {
            number: &stored,
            ..history
        };
        let read = std::sync::Mutex::new(None);
        let admitted = self
            .flights
            .admit(identity, |identity| {
                let (engine, read) = (Arc::clone(&self.engine), &read);
                async move {
                    let (first, records) = engine
                        .first_delivery_with_history(&identity, &history)
                        .await;
                    *read.lock().unwrap_or_else(PoisonError::into_inner) = Some(records);
                    first
                }
            })
            .await;
        let records = read
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            // Admitted after waiting on another delivery of the event: a duplicate,
            // whose history nobody reads.
            .unwrap_or_else(|| Ok(Vec::new()));
        (admitted, records)
    }

    /// Records the event `claim` admitted; duplicates waiting on the claim get its answer.
    pub async fn record(
        &self,
        claim: Claim,
        incoming: IncomingEvent<'_>,
    ) -> Result<RecordOutcome, StoreError> {
        let event = self.prepare(claim.identity().clone(), incoming);
        let outcome = self.engine.record(event).await;
        claim.complete(&outcome, incoming.decision);
        outcome
    }

    /// Admits and records in one step, for events nothing has to be decided for.
    pub async fn record_once(
        &self,
        incoming: IncomingEvent<'_>,
    ) -> Result<RecordOutcome, StoreError> {
        match self.admit(incoming).await? {
            Admission::Duplicate(first) => Ok(RecordOutcome::Duplicate(first)),
            Admission::First(claim) => self.record(claim, incoming).await,
        }
    }

    fn prepare(&self, identity: EventIdentity, incoming: IncomingEvent<'_>) -> NewEvent {
        let numbers = &self.numbers;
        NewEvent {
            identity,
            event: incoming.event.clone(),
            body: numbers.protect_body(incoming.raw).into_owned(),
            app_key: incoming.app_key.to_owned(),
            received_at: incoming.received_at,
            decision: incoming
                .decision
                .map(|d| numbers.protect_decision(d).into_owned()),
            number: incoming.event.number().map(|received| EventNumber {
                stored: numbers.protect(received).into_owned(),
                received: received.to_owned(),
            }),
            book: incoming.book.cloned(),
        }
    }

    pub async fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        self.engine.verification(id).await
    }

    /// `query.filter.number` is a number as clients know it; the store looks it up in the
    /// form it keeps numbers in.
    pub async fn verifications(
        &self,
        mut query: VerificationQuery,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        if let Some(number) = &mut query.filter.number {
            *number = self.numbers.protect(number).into_owned();
        }
        self.engine.verifications(query).await
    }

    /// Up to `limit` of the newest verifications of `number` (as clients know it) first
    /// seen in `[since, until)`; see [`VerificationStore::recent_of_number`].
    pub async fn recent_of_number(
        &self,
        number: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<VerificationRecord>, StoreError> {
        let stored = self.numbers.protect(number);
        self.engine
            .recent_of_number(&stored, since, until, limit)
            .await
    }

    pub async fn stats(&self, query: StatsQuery) -> Result<Vec<GroupStats>, StoreError> {
        self.engine.stats(query).await
    }

    pub async fn events(&self, query: EventQuery) -> Result<Page<StoredEvent>, StoreError> {
        self.engine.events(query).await
    }

    /// The accepted callbacks of one verification, as received, oldest first, and whether
    /// that is all of them. They are found in the event log between the record's first
    /// and last event (with a margin for the write order lagging the receive time), so a
    /// verification whose events lie far apart reads the log between them; `scan_budget`
    /// bounds how many events that may read.
    pub async fn events_of(
        &self,
        record: &VerificationRecord,
        scan_budget: usize,
    ) -> Result<(Vec<StoredEvent>, bool), StoreError> {
        const MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(5);
        let wanted = usize::try_from(record.event_count).unwrap_or(usize::MAX);
        let mut query = EventQuery {
            since: record.first_seen - MARGIN,
            until: record.updated_at.max(record.first_seen) + MARGIN,
            after: None,
            limit: 1000,
        };
        let (mut found, mut read) = (Vec::new(), 0);
        loop {
            let page = self.engine.events(query.clone()).await?;
            read += page.items.len();
            found.extend(page.items.into_iter().filter(|e| e.id == record.id));
            match page.next {
                Some(next) if found.len() < wanted && read < scan_budget => {
                    query.after = Some(next);
                }
                _ => break,
            }
        }
        let complete = found.len() >= wanted;
        Ok((found, complete))
    }

    pub async fn delete_before(&self, cutoff: DateTime<Utc>) -> Result<Deleted, StoreError> {
        self.engine.delete_before(cutoff).await
    }

    pub async fn load_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.engine.load_state(name).await
    }

    pub async fn save_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.engine.save_state(name, value).await
    }

    pub fn health(&self) -> StoreHealth {
        self.engine.health()
    }

    pub fn size_on_disk(&self) -> Option<u64> {
        self.engine.size_on_disk()
    }

    pub fn free_space(&self) -> Option<u64> {
        self.engine.free_space()
    }

    pub fn numbers(&self) -> &NumberPrivacy {
        &self.numbers
    }

    pub async fn shutdown(&self) -> Result<(), StoreError> {
        self.engine.shutdown().await
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}
