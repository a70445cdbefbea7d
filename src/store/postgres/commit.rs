//! Group commit: the callbacks that arrive while a transaction is being written share the
//! next one.
//!
//! A callback hands its event to a queue and waits (batch.rs). A few writers, each on a
//! connection of its own, take everything queued (up to [`MAX_BATCH`]) and write it in
//! one transaction of two round trips, whatever its size:
//!
//! 1. `BEGIN`; the batch's events in one insert (after the write gate, see the module
//!    above; a delivery already stored is skipped), with a row for each new verification
//!    (whole when it starts with a request event here, else empty); then the other
//!    verifications' rows locked and read;
//! 2. the merged records in one update, then `COMMIT` with synchronous commit.
//!
//! Only then is each callback answered (a result with its verification's decision, read
//! for the merge anyway), so nothing is acknowledged that is not durable, and a batch
//! that fails fails every callback in it. While one writer waits for its commit the
//! others fill and write the next batches, so a batch is as large as the load makes it:
//! one event when idle, dozens under load; a small batch under load waits a moment to
//! fill ([`LINGER`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio_postgres::{Client, Row, Statement};

use super::{
    batch::{per_item, BatchQueue, BatchWorker, Linger},
    pipeline, seq_of, StoreError, StoreHealth, VerificationRecord, WRITE_GATE,
};
use crate::{
    decision::DecisionRecord,
    events::VerificationEvent,
    store::{
        EventIdentity, FirstDelivery, NewEvent, OutcomeBookChange, RecordOutcome, RecordStamp,
    },
};

/// At most this many events share a transaction: larger batches add latency to the
/// first callback in them and gain little.
pub(super) const MAX_BATCH: usize = 256;
/// Events waiting for a writer beyond which callbacks wait to join the queue.
const QUEUE: usize = 4096;
/// Writers, each with a connection and at most one transaction in flight. One: events
/// that arrive while it commits wait for the next transaction, so batches are as large
/// as the load makes them; two writers split them in halves, each paying its own
/// commit (`cargo bench --bench load`, one replica: 3,356 callbacks/s with two writers,
/// 3,466 with one; three replicas 2,174 and 2,409).
const WRITERS: usize = 1;
/// A batch under eight events, when the last one showed load, waits a millisecond for
/// more: with several replicas on one database each one's batches are a fraction of the
/// load, and every transaction pays its statements and its commit's sync. Measured with
/// `cargo bench --bench load` (32 connections; means of three runs without and four
/// with, interleaved): three replicas 2,378 -> 2,479 callbacks/s, p99 29.3 -> 25.8 ms,
/// WAL syncs per callback 0.32 -> 0.19; one replica unchanged (3,642 / 3,628); an idle
/// service never waits. Lingering in the decisions' queues as well cost one replica 7 %
/// for nothing more at three.
const LINGER: Linger = Linger {
    below: 8,
    wait: Duration::from_millis(1),
};

/// The queue callbacks hand their events to.
pub(super) struct GroupCommit {
    queue: BatchQueue<NewEvent, Result<RecordOutcome, StoreError>>,
}

impl GroupCommit {
    /// Starts the writers on the database runtime; they connect on first use and stop
    /// once this is dropped and the queue is empty.
    pub(super) fn start(config: tokio_postgres::Config, health: Arc<Mutex<StoreHealth>>) -> Self {
        let writers = (0..WRITERS)
            .map(|_| Writer {
                config: config.clone(),
                connection: None,
                health: Arc::clone(&health),
            })
            .collect();
        Self {
            queue: BatchQueue::start(writers, MAX_BATCH, QUEUE, Some(LINGER)),
        }
    }

    /// Stores `event` in the next group commit; resolves once that has committed.
    pub(super) async fn record(&self, event: NewEvent) -> Result<RecordOutcome, StoreError> {
        self.queue
            .submit(event)
            .await
            .unwrap_or_else(|| Err(StoreError::Unavailable("the store is shutting down".into())))
    }
}

/// A connection of a writer's own, with its statements prepared.
struct WriterConnection {
    client: Client,
    insert_events: Statement,
    lock_verifications: Statement,
    update_verifications: Statement,
    first_deliveries: Statement,
}

struct Writer {
    config: tokio_postgres::Config,
    connection: Option<WriterConnection>,
    health: Arc<Mutex<StoreHealth>>,
}

impl BatchWorker for Writer {
    type Item = NewEvent;
    type Output = Result<RecordOutcome, StoreError>;

    async fn run(&mut self, events: Vec<NewEvent>) -> Vec<Self::Output> {
        match self.write(&events).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            // One event the database refuses (a character text cannot hold, say) must not
            // fail the callbacks that happened to share its transaction: each is
            // written again on its own, so only that one fails.
            Err(BatchError::Database(err)) if events.len() > 1 && refuses_the_data(&err) => {
                let mut outcomes = Vec::with_capacity(events.len());
                for event in &events {
                    let alone = self.write(std::slice::from_ref(event)).await;
                    outcomes.push(alone.map_err(StoreError::from).and_then(|mut one| {
                        one.pop().ok_or_else(|| {
                            StoreError::Failed("PostgreSQL: the event got no outcome".into())
                        })
                    }));
                }
                outcomes
            }
            Err(err) => per_item(Err(StoreError::from(err)), events.len()),
        }
    }
}

/// The database refused what it was given (SQLSTATE class 22, data exception, or 54,
/// a limit such as the size of an index entry), as opposed to being unreachable or busy.
fn refuses_the_data(err: &tokio_postgres::Error) -> bool {
    err.code()
        .is_some_and(|code| matches!(code.code().get(..2), Some("22" | "54")))
}

impl Writer {
    /// Readiness follows the last batch, except that an event the database refuses
    /// says nothing about whether it takes the others.
    fn note(&self, outcome: &Result<Vec<RecordOutcome>, BatchError>) {
        let degraded = match outcome {
            Ok(_) => None,
            Err(BatchError::Database(err)) if refuses_the_data(err) => return,
            Err(BatchError::Database(err)) => Some(super::failed_ref(err).to_string()),
            Err(BatchError::Store(err)) => Some(err.to_string()),
        };
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        *health = degraded.map_or(StoreHealth::Ready, StoreHealth::Degraded);
    }

    /// Writes one batch; on any failure the transaction is abandoned whole (and the
    /// connection with it, whose state is then unknown).
    async fn write(&mut self, events: &[NewEvent]) -> Result<Vec<RecordOutcome>, BatchError> {
        if self
            .connection
            .as_ref()
            .is_none_or(|c| c.client.is_closed())
        {
            match self.connect().await {
                Ok(connection) => self.connection = Some(connection),
                Err(err) => {
                    let failed = Err(BatchError::Store(err));
                    self.note(&failed);
                    return failed;
                }
            }
        }
        let Some(connection) = self.connection.as_ref() else {
            return Err(StoreError::Unavailable("PostgreSQL: not connected".into()).into());
        };
        let written = write_batch(connection, events).await;
        if written.is_err() {
            // The transaction may be open or broken: a fresh connection is simpler than
            // telling which.
            self.connection = None;
        }
        self.note(&written);
        written
    }

    async fn connect(&self) -> Result<WriterConnection, StoreError> {
        let mut config = self.config.clone();
        config.options(pipeline::INDEXED);
        let client = pipeline::connect(&config, Duration::from_secs(5))
            .await
            .map_err(|e| StoreError::Failed(format!("PostgreSQL: {e}")))?;
        let prepare = |sql: &'static str| client.prepare(sql);
        let (a, b, c, d) = futures_util::future::join4(
            prepare(INSERT_EVENTS),
            prepare(LOCK_VERIFICATIONS),
            prepare(UPDATE_VERIFICATIONS),
            prepare(FIRST_DELIVERIES),
        )
        .await;
        let prepared = (|| Ok::<_, tokio_postgres::Error>((a?, b?, c?, d?)))();
        let (insert_events, lock_verifications, update_verifications, first_deliveries) =
            prepared.map_err(super::failed)?;
        Ok(WriterConnection {
            client,
            insert_events,
            lock_verifications,
            update_verifications,
            first_deliveries,
        })
    }
}

enum BatchError {
    Database(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for BatchError {
    fn from(err: tokio_postgres::Error) -> Self {
        BatchError::Database(err)
    }
}

impl From<StoreError> for BatchError {
    fn from(err: StoreError) -> Self {
        BatchError::Store(err)
    }
}

impl From<BatchError> for StoreError {
    fn from(err: BatchError) -> Self {
        match err {
            BatchError::Database(err) => super::failed(err),
            BatchError::Store(err) => err,
        }
    }
}

/// Inserts the batch's events after taking the write gate, sorted by identity (so that
/// two batches sharing events take their locks in one order), and a row for each
/// verification that is new, placed at its first new event; returns each new event's
/// identity and sequence number, then (with no event) each verification written whole.
///
/// A verification that starts in this batch is written whole when the batch offers its
/// record (`$9..`, merged in advance from the batch's events as if it were new) and
/// every event the record was merged from turned out new. The record's sequence number
/// is only known here, so it comes split around it. Anything else gets an empty row that
/// the batch then locks, merges into and updates, as an existing verification is. A
/// request event, the common case, so costs one row version instead of two (an update
/// that fills the indexed columns writes every index again).
///
/// The outcome book changes the batch's new events carry (`$24..$26`, one per event) are
/// made here too: an allowed request's verification put in the book, a final result's
/// taken out of it (and returned, with no event and no sequence number).
const INSERT_EVENTS: &str = "WITH gate AS (SELECT pg_advisory_xact_lock_shared($8)),
    events AS (
        INSERT INTO verigate_events (id, event, discriminator, received_at, app_key, body, answer)
        SELECT u.id, u.event, u.discriminator, u.received_at, u.app_key, u.body, u.answer
        FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[],
                    $7::jsonb[]) AS u(id, event, discriminator, received_at, app_key, body, answer)
        CROSS JOIN gate
        ORDER BY 1, 2, 3
        ON CONFLICT (id, event, discriminator) DO NOTHING
        RETURNING id, event, discriminator, seq, received_at
    ), placed AS (
        INSERT INTO verigate_verifications (id, seq, first_seen, number, reference, record,
            country, method, requested, action, decision_rule, on_error, status,
            price_currency, price_amount)
        SELECT e.id, e.seq, e.first_seen, f.number, f.reference, f.head || e.seq || f.tail,
            f.country, f.method, coalesce(f.requested, false), f.action, f.decision_rule,
            coalesce(f.on_error, false), f.status, f.price_currency, f.price_amount
        FROM (SELECT id, min(seq) AS seq, min(received_at) AS first_seen, count(*) AS n
              FROM events GROUP BY id) e
        LEFT JOIN unnest($9::text[], $10::int8[], $11::text[], $12::text[], $13::text[],
                $14::text[], $15::text[], $16::text[], $17::bool[], $18::text[], $19::text[],
                $20::bool[], $21::text[], $22::text[], $23::float8[])
            AS f(id, events, number, reference, head, tail, country, method, requested, action,
                 decision_rule, on_error, status, price_currency, price_amount)
          ON f.id = e.id AND f.events = e.n
        ORDER BY e.id
        ON CONFLICT (id) DO NOTHING
        RETURNING id, record IS NOT NULL AS whole
    ), book AS (
        SELECT b.id, b.due_ms, b.tracked, b.take
        FROM unnest($1::text[], $2::text[], $3::text[], $24::int8[], $25::text[], $26::bool[])
            AS b(id, event, discriminator, due_ms, tracked, take)
        JOIN events e ON e.id = b.id AND e.event = b.event AND e.discriminator = b.discriminator
        WHERE b.tracked IS NOT NULL OR b.take
    ), booked AS (
        INSERT INTO verigate_pending (id, due_ms, tracked)
        SELECT id, due_ms, tracked::jsonb FROM book WHERE tracked IS NOT NULL
        ORDER BY 1
        ON CONFLICT (id) DO UPDATE SET due_ms = excluded.due_ms, tracked = excluded.tracked
    ), taken AS (
        DELETE FROM verigate_pending p USING (SELECT DISTINCT id FROM book WHERE take) t
        WHERE p.id = t.id
        RETURNING p.id, p.tracked::text AS tracked
    )
    SELECT id, event, discriminator, seq, NULL::text FROM events
    UNION ALL
    SELECT id, NULL, NULL, NULL, NULL FROM placed WHERE whole
    UNION ALL
    SELECT id, NULL, NULL, NULL, tracked FROM taken";

/// Locks the batch's verifications (in id order) and reads them, except those the
/// batch has just written whole.
const LOCK_VERIFICATIONS: &str = "SELECT id, seq, first_seen, record FROM verigate_verifications
    WHERE id = ANY($1::text[])
      AND NOT (record IS NOT NULL AND xmin = pg_current_xact_id()::xid)
    ORDER BY id FOR UPDATE";

/// Writes merged records and their stats columns.
const UPDATE_VERIFICATIONS: &str = "UPDATE verigate_verifications v SET
        number = u.number, reference = u.reference, record = u.record, country = u.country,
        method = u.method, requested = u.requested, action = u.action,
        decision_rule = u.decision_rule, on_error = u.on_error, status = u.status,
        price_currency = u.price_currency, price_amount = u.price_amount
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::bool[], $8::text[], $9::text[], $10::bool[], $11::text[], $12::text[], $13::float8[])
        AS u(id, number, reference, record, country, method, requested, action,
             decision_rule, on_error, status, price_currency, price_amount)
    WHERE v.id = u.id";

/// What the first delivery of each of these events was answered with.
const FIRST_DELIVERIES: &str =
    "SELECT e.id, e.event, e.discriminator, e.seq, e.answer FROM verigate_events e
    JOIN unnest($1::text[], $2::text[], $3::text[]) AS u(id, event, discriminator)
      ON e.id = u.id AND e.event = u.event AND e.discriminator = u.discriminator";

type Identity = (String, String, String);

fn identity_of(e: &EventIdentity) -> Identity {
    (e.id.clone(), e.event.clone(), e.discriminator.clone())
}

/// The transaction of one batch; see the module's comment.
async fn write_batch(
    c: &WriterConnection,
    events: &[NewEvent],
) -> Result<Vec<RecordOutcome>, BatchError> {
    // A delivery repeated within the batch is written once and answered as a duplicate.
    let mut firsts: Vec<usize> = Vec::with_capacity(events.len());
    let mut seen: HashSet<&EventIdentity> = HashSet::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        if seen.insert(&event.identity) {
            firsts.push(i);
        }
    }
    let columns = EventColumns::of(events, &firsts);
    let mut ids: Vec<&str> = firsts
        .iter()
        .map(|&i| events[i].identity.id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();

    let whole = WholeColumns::of(events, &firsts)?;
    let book = BookColumns::of(events, &firsts);
    let event_params: [&(dyn tokio_postgres::types::ToSql + Sync); 26] = [
        &columns.id,
        &columns.event,
        &columns.discriminator,
        &columns.received_at,
        &columns.app_key,
        &columns.body,
        &columns.answer,
        &WRITE_GATE,
        &whole.records.id,
        &whole.events,
        &whole.records.number,
        &whole.records.reference,
        &whole.head,
        &whole.tail,
        &whole.records.country,
        &whole.records.method,
        &whole.records.requested,
        &whole.records.action,
        &whole.records.decision_rule,
        &whole.records.on_error,
        &whole.records.status,
        &whole.records.price_currency,
        &whole.records.price_amount,
        &book.due_ms,
        &book.tracked,
        &book.take,
    ];
    let id_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
    // Sent together (pipelined): one round trip.
    let begin = c.client.batch_execute("BEGIN");
    let inserted = c.client.query(&c.insert_events, &event_params);
    let locked = c.client.query(&c.lock_verifications, &id_params);
    let (begun, inserted, locked) = futures_util::future::join3(begin, inserted, locked).await;
    begun?;
    let (inserted, locked) = (inserted?, locked?);

    let mut seqs: HashMap<Identity, i64> = HashMap::with_capacity(inserted.len());
    let mut written_whole: HashSet<String> = HashSet::new();
    let mut taken: HashMap<String, String> = HashMap::new();
    for row in &inserted {
        let id: String = row.try_get(0)?;
        match (
            row.try_get::<_, Option<String>>(1)?,
            row.try_get::<_, Option<String>>(4)?,
        ) {
            (Some(event), _) => {
                seqs.insert((id, event, row.try_get(2)?), row.try_get(3)?);
            }
            (None, Some(tracked)) => {
                taken.insert(id, tracked);
            }
            (None, None) => {
                written_whole.insert(id);
            }
        }
    }
    // Every other verification with a new event has a row now (maybe just placed), locked.
    let mut existing: HashMap<String, Existing> = HashMap::with_capacity(locked.len());
    for row in &locked {
        existing.insert(row.try_get(0)?, Existing::of(row)?);
    }

    // Merge each verification's new events, in arrival order, into what is stored (a
    // delivery stored before has nothing to merge).
    let rest: Vec<usize> = firsts
        .iter()
        .copied()
        .filter(|&i| !written_whole.contains(&events[i].identity.id))
        .filter(|&i| seqs.contains_key(&identity_of(&events[i].identity)))
        .collect();
    let merged = merge(events, &rest, &mut existing)?;
    let records = RecordColumns::of(merged.values())?;
    let update = async {
        if records.id.is_empty() {
            return Ok(0);
        }
        c.client
            .execute(&c.update_verifications, &records.params())
            .await
    };
    let duplicates: Vec<&NewEvent> = firsts
        .iter()
        .map(|&i| &events[i])
        .filter(|e| !seqs.contains_key(&identity_of(&e.identity)))
        .collect();
    let first_answers = first_deliveries(c, &duplicates);
    // Sent together again: the second and last round trip.
    let commit = c.client.batch_execute("COMMIT");
    let (updated, first_answers, committed) =
        futures_util::future::join3(update, first_answers, commit).await;
    updated?;
    let first_answers = first_answers?;
    committed?;

    // Every event answered: stored under its sequence number, or as the first delivery.
    let mut is_first = vec![false; events.len()];
    firsts.iter().for_each(|&i| is_first[i] = true);
    let mut outcomes = Vec::with_capacity(events.len());
    for (event, first_here) in events.iter().zip(is_first) {
        let identity = identity_of(&event.identity);
        let outcome = match seqs.get(&identity) {
            Some(&seq) if first_here => RecordOutcome::Stored {
                seq: seq_of(seq),
                decision: decision_for(event, &merged),
                taken: match event.book {
                    Some(OutcomeBookChange::Take) => taken.remove(&event.identity.id),
                    _ => None,
                },
            },
            Some(&seq) => RecordOutcome::Duplicate(FirstDelivery {
                seq: seq_of(seq),
                answer: first_of_batch(events, &firsts, &event.identity),
            }),
            None => match first_answers.get(&identity) {
                Some(first) => RecordOutcome::Duplicate(first.clone()),
                None => {
                    return Err(StoreError::Unavailable(
                        "a concurrent delivery of this event did not commit; retry".into(),
                    )
                    .into())
                }
            },
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// For a result event, its verification's decision as merged here: what the callback
/// would otherwise read back right after the commit.
fn decision_for(event: &NewEvent, merged: &HashMap<String, Merged>) -> Option<Box<DecisionRecord>> {
    if !matches!(event.event, VerificationEvent::Result(_)) {
        return None;
    }
    let record = merged.get(&event.identity.id)?.record.as_ref()?;
    record.decision.clone().map(Box::new)
}

/// The answer the first delivery of `identity` in this batch got.
fn first_of_batch(
    events: &[NewEvent],
    firsts: &[usize],
    identity: &EventIdentity,
) -> Option<serde_json::Value> {
    firsts
        .iter()
        .map(|&i| &events[i])
        .find(|e| e.identity == *identity)
        .and_then(|e| e.decision.as_ref().map(|d| d.answer.clone()))
}

/// The first deliveries of events the batch found stored already.
async fn first_deliveries(
    c: &WriterConnection,
    duplicates: &[&NewEvent],
) -> Result<HashMap<Identity, FirstDelivery>, tokio_postgres::Error> {
    if duplicates.is_empty() {
        return Ok(HashMap::new());
    }
    let column = |f: fn(&EventIdentity) -> &String| -> Vec<&str> {
        duplicates.iter().map(|e| f(&e.identity).as_str()).collect()
    };
    let rows = c
        .client
        .query(
            &c.first_deliveries,
            &[
                &column(|i| &i.id),
                &column(|i| &i.event),
                &column(|i| &i.discriminator),
            ],
        )
        .await?;
    let mut out = HashMap::with_capacity(rows.len());
    for row in rows {
        out.insert(
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?),
            FirstDelivery {
                seq: seq_of(row.try_get(3)?),
                answer: row.try_get(4)?,
            },
        );
    }
    Ok(out)
}

/// A verification's row as the batch found it (locked).
struct Existing {
    seq: i64,
    first_seen: DateTime<Utc>,
    record: Option<VerificationRecord>,
}

impl Existing {
    fn of(row: &Row) -> Result<Self, BatchError> {
        let record: Option<String> = row.try_get(3)?;
        Ok(Self {
            seq: row.try_get(1)?,
            first_seen: row.try_get(2)?,
            record: record
                .map(|r| serde_json::from_str(&r))
                .transpose()
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        })
    }
}

/// A verification's record after the batch.
struct Merged {
    seq: i64,
    first_seen: DateTime<Utc>,
    record: Option<VerificationRecord>,
}

/// Merges the events `which` (indexes into `events`, in arrival order) into their
/// verifications' rows, `existing`.
fn merge(
    events: &[NewEvent],
    which: &[usize],
    existing: &mut HashMap<String, Existing>,
) -> Result<HashMap<String, Merged>, StoreError> {
    let mut merged: HashMap<String, Merged> = HashMap::new();
    for &i in which {
        let event = &events[i];
        let id = &event.identity.id;
        let current = match merged.remove(id) {
            Some(current) => current,
            None => {
                let row = existing.remove(id).ok_or_else(|| {
                    StoreError::Failed(format!("verification `{id}` has no row to merge into"))
                })?;
                Merged {
                    seq: row.seq,
                    first_seen: row.first_seen,
                    record: row.record,
                }
            }
        };
        let lacks_number = current.record.as_ref().is_none_or(|r| r.number.is_none());
        let number = event
            .number
            .as_ref()
            .filter(|_| lacks_number)
            .map(|n| (n.stored.clone(), n.facts()));
        let record = VerificationRecord::apply(
            current.record,
            &event.event,
            RecordStamp {
                app_key: &event.app_key,
                seq: seq_of(current.seq),
                ordered_at: current.first_seen,
                received_at: event.received_at,
            },
            number
                .as_ref()
                .map(|(stored, facts)| (stored.as_str(), facts)),
            event.decision.as_ref(),
        );
        merged.insert(
            id.clone(),
            Merged {
                record: Some(record),
                ..current
            },
        );
    }
    Ok(merged)
}

/// The sequence number a record offered whole is merged with; the insert puts the
/// verification's own in its place.
const SEQ_TO_FILL: i64 = i64::MAX;

/// The records of the verifications that start with a request event in this batch,
/// merged from the batch's events as if nothing were stored, each split around its
/// sequence number, with how many events it was merged from (see [`INSERT_EVENTS`]).
struct WholeColumns {
    records: RecordColumns,
    events: Vec<i64>,
    head: Vec<String>,
    tail: Vec<String>,
}

impl WholeColumns {
    fn of(events: &[NewEvent], firsts: &[usize]) -> Result<Self, StoreError> {
        let mut starts: HashMap<&str, (i64, DateTime<Utc>)> = HashMap::new();
        for &i in firsts {
            if let VerificationEvent::Request(_) = events[i].event {
                starts.insert(&events[i].identity.id, (0, events[i].received_at));
            }
        }
        let mut which = Vec::with_capacity(starts.len());
        for &i in firsts {
            let event = &events[i];
            if let Some((count, first_seen)) = starts.get_mut(event.identity.id.as_str()) {
                *count += 1;
                *first_seen = (*first_seen).min(event.received_at);
                which.push(i);
            }
        }
        let mut as_new: HashMap<String, Existing> = starts
            .iter()
            .map(|(&id, &(_, first_seen))| {
                let row = Existing {
                    seq: SEQ_TO_FILL,
                    first_seen,
                    record: None,
                };
                (id.to_owned(), row)
            })
            .collect();
        let merged = merge(events, &which, &mut as_new)?;
        let mut records = RecordColumns::of(merged.values())?;
        let events = records
            .id
            .iter()
            .map(|id| starts.get(id.as_str()).map_or(0, |&(count, _)| count))
            .collect();
        let (mut head, mut tail) = (Vec::new(), Vec::new());
        for record in std::mem::take(&mut records.record) {
            let (h, t) = split_at_seq(&record)?;
            head.push(h.to_owned());
            tail.push(t.to_owned());
        }
        Ok(Self {
            records,
            events,
            head,
            tail,
        })
    }
}

/// A serialized record's text before and after its sequence number [`SEQ_TO_FILL`].
/// The first `"seq":` is the field: inside a JSON string every quote is escaped, so
/// `q"` cannot appear there.
fn split_at_seq(record: &str) -> Result<(&str, &str), StoreError> {
    const FIELD: &str = "\"seq\":";
    const TO_FILL: &str = "9223372036854775807";
    record
        .find(FIELD)
        .map(|at| record.split_at(at + FIELD.len()))
        .and_then(|(head, rest)| Some((head, rest.strip_prefix(TO_FILL)?)))
        .ok_or_else(|| StoreError::Failed("a record without its sequence number".into()))
}

/// The batch's events as the columns of their insert.
struct EventColumns<'a> {
    id: Vec<&'a str>,
    event: Vec<&'a str>,
    discriminator: Vec<&'a str>,
    received_at: Vec<DateTime<Utc>>,
    app_key: Vec<&'a str>,
    body: Vec<std::borrow::Cow<'a, str>>,
    answer: Vec<Option<&'a serde_json::Value>>,
}

impl<'a> EventColumns<'a> {
    fn of(events: &'a [NewEvent], which: &[usize]) -> Self {
        let pick = || which.iter().map(|&i| &events[i]);
        Self {
            id: pick().map(|e| e.identity.id.as_str()).collect(),
            event: pick().map(|e| e.identity.event.as_str()).collect(),
            discriminator: pick().map(|e| e.identity.discriminator.as_str()).collect(),
            received_at: pick().map(|e| e.received_at).collect(),
            app_key: pick().map(|e| e.app_key.as_str()).collect(),
            body: pick().map(|e| String::from_utf8_lossy(&e.body)).collect(),
            answer: pick()
                .map(|e| e.decision.as_ref().map(|d| &d.answer))
                .collect(),
        }
    }
}

/// The outcome book changes of the batch's events, one per event: when a put's entry is
/// due and what it tracks (both `NULL` for no put), and whether to take.
struct BookColumns<'a> {
    due_ms: Vec<Option<i64>>,
    tracked: Vec<Option<&'a str>>,
    take: Vec<bool>,
}

impl<'a> BookColumns<'a> {
    fn of(events: &'a [NewEvent], which: &[usize]) -> Self {
        let mut c = BookColumns {
            due_ms: Vec::with_capacity(which.len()),
            tracked: Vec::with_capacity(which.len()),
            take: Vec::with_capacity(which.len()),
        };
        for &i in which {
            let (due_ms, tracked, take) = match &events[i].book {
                Some(OutcomeBookChange::Put { due_ms, tracked }) => {
                    (Some(*due_ms), Some(tracked.as_str()), false)
                }
                Some(OutcomeBookChange::Take) => (None, None, true),
                None => (None, None, false),
            };
            c.due_ms.push(due_ms);
            c.tracked.push(tracked);
            c.take.push(take);
        }
        c
    }
}

/// Merged records as the columns of their insert or update.
struct RecordColumns {
    id: Vec<String>,
    number: Vec<Option<String>>,
    reference: Vec<Option<String>>,
    record: Vec<String>,
    country: Vec<Option<String>>,
    method: Vec<Option<String>>,
    requested: Vec<bool>,
    action: Vec<Option<&'static str>>,
    decision_rule: Vec<Option<String>>,
    on_error: Vec<bool>,
    status: Vec<Option<String>>,
    price_currency: Vec<Option<String>>,
    price_amount: Vec<Option<f64>>,
}

impl RecordColumns {
    fn of<'a>(merged: impl Iterator<Item = &'a Merged>) -> Result<Self, StoreError> {
        let mut c = RecordColumns {
            id: Vec::new(),
            number: Vec::new(),
            reference: Vec::new(),
            record: Vec::new(),
            country: Vec::new(),
            method: Vec::new(),
            requested: Vec::new(),
            action: Vec::new(),
            decision_rule: Vec::new(),
            on_error: Vec::new(),
            status: Vec::new(),
            price_currency: Vec::new(),
            price_amount: Vec::new(),
        };
        for m in merged {
            let Some(r) = &m.record else { continue };
            let row = r.stats_row();
            c.id.push(r.id.clone());
            c.number.push(r.number.clone());
            c.reference.push(r.reference.clone());
            c.record
                .push(serde_json::to_string(r).map_err(|e| StoreError::Corrupt(e.to_string()))?);
            c.country.push(r.country.clone());
            c.method.push(r.method.clone());
            c.requested.push(row.requested);
            c.action
                .push(row.decision.map(|(action, _, _)| action.as_str()));
            c.decision_rule.push(
                row.decision
                    .and_then(|(_, rule, _)| rule.map(str::to_owned)),
            );
            c.on_error
                .push(row.decision.is_some_and(|(_, _, on_error)| on_error));
            c.status.push(row.status.map(str::to_owned));
            c.price_currency
                .push(row.price.map(|(currency, _)| currency.to_owned()));
            c.price_amount.push(row.price.map(|(_, amount)| amount));
        }
        Ok(c)
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 13] {
        [
            &self.id,
            &self.number,
            &self.reference,
            &self.record,
            &self.country,
            &self.method,
            &self.requested,
            &self.action,
            &self.decision_rule,
            &self.on_error,
            &self.status,
            &self.price_currency,
            &self.price_amount,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VerificationRecord;

    #[test]
    fn a_record_splits_around_its_own_sequence_number_only() {
        // Both the id and the reference spell the field and the number to fill.
        let body = serde_json::json!({
            "id": "a\",\"seq\":9223372036854775807,\"x\":\"",
            "event": "VerificationRequestEvent",
            "method": "sms",
            "identity": {"type": "number", "endpoint": "+46700000000"},
            "reference": "\"seq\":9223372036854775807",
        });
        let event = VerificationEvent::parse(body.to_string().as_bytes()).expect("an event");
        let at = chrono::DateTime::<Utc>::UNIX_EPOCH;
        let stamp = RecordStamp {
            app_key: "app",
            seq: seq_of(SEQ_TO_FILL),
            ordered_at: at,
            received_at: at,
        };
        let record = VerificationRecord::apply(None, &event, stamp, None, None);
        let text = serde_json::to_string(&record).expect("serializes");
        let (head, tail) = split_at_seq(&text).expect("splits");
        let filled: VerificationRecord =
            serde_json::from_str(&format!("{head}42{tail}")).expect("parses");
        assert_eq!(filled.seq, 42);
        assert_eq!(filled.id, record.id);
        assert_eq!(filled.reference, record.reference);
        assert!(split_at_seq(&text.replace("9223372036854775807", "7")).is_err());
    }
}
