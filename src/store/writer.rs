//! The single writer: every accepted event reaches sled through one thread, in batches.
//!
//! sled makes a multi-tree transaction atomic by sealing its I/O buffer, which costs about
//! as much as the transaction's own work; concurrent transactions also contend and retry.
//! One thread that applies whatever has queued up as one transaction pays that cost once
//! per batch, never retries against itself, and keeps the HTTP workers free while it
//! works. Under load batches grow by themselves; a lone event is a batch of one.
//!
//! A batch is atomic: after a crash either all of it is there or none. If one event in a
//! batch cannot be applied (a stored record that no longer decodes), the batch is retried
//! event by event so that only that event fails.

use std::sync::{mpsc, Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::value::RawValue;
use sled::{
    transaction::{ConflictableTransactionError, TransactionError, TransactionalTree},
    Transactional,
};
use tokio::sync::oneshot;

use super::{
    keys, DecisionRecord, FirstDelivery, FlushError, RecordOutcome, RecordStamp, StoreError,
    StoredEvent, Trees, VerificationRecord, WriteOrder,
};
use crate::events::VerificationEvent;

/// Largest number of events applied in one transaction.
pub(super) const MAX_BATCH: usize = 256;

/// An event on its way to the writer, owned because it crosses threads. Numbers in `body`
/// and `decision` are already in their stored form.
pub(super) struct WriteJob {
    pub event: VerificationEvent,
    pub identity: Vec<u8>,
    pub body: Vec<u8>,
    pub app_key: String,
    pub received_at: DateTime<Utc>,
    pub decision: Option<DecisionRecord>,
    /// (stored form, as received): the received form is only used to look up the
    /// number's country and prefix, and never leaves memory.
    pub number: Option<(String, String)>,
    pub reply: oneshot::Sender<Result<RecordOutcome, StoreError>>,
}

/// What the writer thread owns.
pub(super) struct WriterContext {
    pub db: sled::Db,
    pub trees: Trees,
    pub order: Arc<Mutex<WriteOrder>>,
    /// 1 = every event is its own transaction (the flush-per-write baseline).
    pub max_batch: usize,
}

/// The sending side; dropping it stops the thread after it has written what was queued.
pub(super) struct Writer {
    sender: Option<mpsc::Sender<WriteJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    pub fn start(context: WriterContext) -> Self {
        let (sender, jobs) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("verigate-writer".into())
            .spawn(move || context.run(&jobs))
            .ok();
        Self {
            sender: Some(sender),
            thread,
        }
    }

    /// Queues `job`; its reply says how it ended.
    pub fn submit(&self, job: WriteJob) -> Result<(), StoreError> {
        self.sender
            .as_ref()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())
    }

    /// Writes what is queued and stops the thread. Idempotent.
    pub fn stop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn store_error(err: TransactionError<serde_json::Error>) -> StoreError {
    match err {
        TransactionError::Abort(e) => StoreError::Corrupt(e),
        TransactionError::Storage(e) => StoreError::Io(e),
    }
}

fn stopped() -> StoreError {
    StoreError::Flush(FlushError("the store is shutting down".into()))
}

/// A job with its place in the write order.
struct Placed {
    job: WriteJob,
    seq: u64,
    ordered_at: DateTime<Utc>,
    order_key: (i64, u64),
}

type Tx<'a> = (
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
);

impl WriterContext {
    fn run(self, jobs: &mpsc::Receiver<WriteJob>) {
        while let Ok(first) = jobs.recv() {
            let mut batch = vec![first];
            while batch.len() < self.max_batch.max(1) {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.write_batch(batch);
        }
    }

    fn write_batch(&self, batch: Vec<WriteJob>) {
        let placed = self.place(batch);
        let outcomes: Vec<Result<RecordOutcome, StoreError>> = match self.apply(&placed) {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(TransactionError::Abort(_)) if placed.len() > 1 => placed
                .iter()
                .map(|one| match self.apply(std::slice::from_ref(one)) {
                    Ok(outcome) => outcome.into_iter().next().ok_or_else(stopped),
                    Err(err) => Err(store_error(err)),
                })
                .collect(),
            Err(err) => {
                let err = store_error(err);
                placed
                    .iter()
                    .map(|_| Err(StoreError::Flush(FlushError(err.to_string()))))
                    .collect()
            }
        };
        self.release(&placed);
        for (placed, outcome) in placed.into_iter().zip(outcomes) {
            let _ = placed.job.reply.send(outcome);
        }
    }

    /// Gives each job a strictly increasing (time, seq) and registers it as in flight, so
    /// readers stop before it until it is committed.
    fn place(&self, batch: Vec<WriteJob>) -> Vec<Placed> {
        // The order holds no invariant a panic elsewhere could break halfway.
        let mut order = self
            .order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        batch
            .into_iter()
            .filter_map(|job| {
                let seq = match self.db.generate_id() {
                    Ok(seq) => seq,
                    Err(err) => {
                        let _ = job.reply.send(Err(StoreError::Io(err)));
                        return None;
                    }
                };
                let millis = job.received_at.timestamp_millis().max(order.last_millis);
                order.last_millis = millis;
                order.in_flight.insert((millis, seq));
                let ordered_at = Utc
                    .timestamp_millis_opt(millis)
                    .single()
                    .unwrap_or(job.received_at);
                Some(Placed {
                    job,
                    seq,
                    ordered_at,
                    order_key: (millis, seq),
                })
            })
            .collect()
    }

    fn release(&self, placed: &[Placed]) {
        let mut order = self
            .order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for p in placed {
            order.in_flight.remove(&p.order_key);
        }
    }

    /// One transaction for all of `placed`, in order; events later in the batch see the
    /// writes of earlier ones (a request and its result can share a batch).
    fn apply(
        &self,
        placed: &[Placed],
    ) -> Result<Vec<RecordOutcome>, TransactionError<serde_json::Error>> {
        let t = &self.trees;
        // Pure closure: sled may run it more than once on conflict.
        (
            &t.records,
            &t.events,
            &t.dedup,
            &t.by_number,
            &t.by_reference,
            &t.by_time,
        )
            .transaction(
                |(records, events, dedup, by_number, by_reference, by_time)| {
                    let tx = (records, events, dedup, by_number, by_reference, by_time);
                    placed.iter().map(|p| apply_one(tx, p)).collect()
                },
            )
    }
}

fn apply_one(
    (records, events, dedup, by_number, by_reference, by_time): Tx<'_>,
    placed: &Placed,
) -> Result<RecordOutcome, ConflictableTransactionError<serde_json::Error>> {
    let job = &placed.job;
    let abort = ConflictableTransactionError::Abort;
    if let Some(existing) = dedup.get(&job.identity)? {
        let first: FirstDelivery = serde_json::from_slice(&existing).map_err(abort)?;
        return Ok(RecordOutcome::Duplicate(first));
    }
    let id = job.event.id();
    let before = match records.get(id.as_bytes())? {
        Some(bytes) => Some(serde_json::from_slice::<VerificationRecord>(&bytes).map_err(abort)?),
        None => None,
    };
    let had = |f: fn(&VerificationRecord) -> &Option<String>| {
        before.as_ref().and_then(|b| f(b).as_ref()).is_some()
    };
    // Parsing a number costs microseconds: only when the record lacks it.
    let number = match (had(|r| &r.number), &job.number) {
        (false, Some((stored, received))) => Some((stored, crate::phone::facts(received))),
        _ => None,
    };
    let stamp = RecordStamp {
        app_key: &job.app_key,
        seq: placed.seq,
        ordered_at: placed.ordered_at,
        received_at: job.received_at,
    };
    let after = VerificationRecord::apply(
        before.clone(),
        &job.event,
        stamp,
        number
            .as_ref()
            .map(|(stored, facts)| (stored.as_str(), facts)),
        job.decision.as_ref(),
    );
    if before.is_none() {
        by_time.insert(keys::time_index(after.first_seen, after.seq, id), &[])?;
    }
    if let (false, Some(number)) = (had(|r| &r.number), &after.number) {
        by_number.insert(keys::index(number, id), &[])?;
    }
    if let (false, Some(reference)) = (had(|r| &r.reference), &after.reference) {
        by_reference.insert(keys::index(reference, id), &[])?;
    }
    let stored_event = serde_json::to_vec(&StoredEvent {
        seq: placed.seq,
        received_at: job.received_at,
        app_key: job.app_key.clone(),
        event: job.event.event_type().to_owned(),
        id: id.to_owned(),
        body: RawValue::from_string(String::from_utf8_lossy(&job.body).into_owned())
            .map_err(abort)?,
    })
    .map_err(abort)?;
    let first = serde_json::to_vec(&FirstDelivery {
        seq: placed.seq,
        answer: job.decision.as_ref().map(|d| d.answer.clone()),
    })
    .map_err(abort)?;
    records.insert(id.as_bytes(), serde_json::to_vec(&after).map_err(abort)?)?;
    events.insert(&keys::event(placed.ordered_at, placed.seq), stored_event)?;
    dedup.insert(job.identity.as_slice(), first)?;
    Ok(RecordOutcome::Stored { seq: placed.seq })
}
