//! The commit thread: the one writer. It takes whatever events have queued up, checks each
//! against what is stored (duplicates get the first answer), merges it into its
//! verification, writes the batch to the write-ahead log with one `fsync`, publishes it to
//! the active memtable and only then answers every waiting request. Under load batches grow
//! by themselves, so one `fsync` covers many callbacks; a lone event is a batch of one.
//!
//! One thread, so there is no locking between writers and no relay between threads: the
//! thread that writes is the one that flushes and answers.

use std::{
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::{
    codec::{self, LoggedEvent, StoredVerification, WalEntry},
    keys::Stamp,
    memtable::{Change, FastMap},
    merge::merge,
    wal::{self, SegmentPreparer, WalWriter},
    Shared,
};
use crate::store::{NewEvent, RecordOutcome, StoreError};

/// Most events in one commit.
const MAX_BATCH: usize = 512;
/// A memtable is frozen and checkpointed when it holds `checkpoint_events` events (a
/// setting), this many body bytes, or has been open this long: bounds memory and the
/// replay after a crash, while keeping most verifications whole (request and result)
/// before their first checkpoint.
pub const FREEZE_BYTES: usize = 4 << 20;
pub const FREEZE_AFTER: Duration = Duration::from_secs(600);
/// While writes fail, how often the disk is tried again.
const PROBE_EVERY: Duration = Duration::from_secs(1);
const PROBE_BYTES: usize = 1 << 20;
/// Frozen memtables allowed to wait for a checkpoint: past this, commits wait for the
/// checkpointer (back pressure) for up to `MAX_WAIT`, then are refused.
const MAX_FROZEN: usize = 2;
const MAX_WAIT: Duration = Duration::from_secs(5);

pub enum Job {
    Record {
        event: Box<NewEvent>,
        reply: oneshot::Sender<Result<RecordOutcome, StoreError>>,
    },
    /// Freezes the active memtable (retention wants everything checkpointed).
    Freeze { reply: oneshot::Sender<()> },
    /// Freezes what is left and stops.
    Stop { reply: oneshot::Sender<()> },
}

pub struct Committer {
    pub shared: Arc<Shared>,
    /// Events per memtable before it is checkpointed.
    pub freeze_events: usize,
    pub wal: Option<WalWriter>,
    /// Makes the next log segment while this one is written.
    pub segments: SegmentPreparer,
    pub next_seq: u64,
    pub last_ms: u64,
    pub last_probe: Option<Instant>,
}

/// A reply to send once the batch is durable.
struct Pending {
    reply: oneshot::Sender<Result<RecordOutcome, StoreError>>,
    outcome: Result<RecordOutcome, StoreError>,
    /// Only true if this batch reaches the disk (a new event, or a duplicate of one in it).
    needs_batch: bool,
}

impl Committer {
    pub fn run(mut self, jobs: &mpsc::Receiver<Job>) {
        loop {
            let first = match jobs.recv_timeout(PROBE_EVERY) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.idle();
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            if self.commit(batch) {
                return;
            }
            self.freeze_if_full();
        }
        self.freeze();
    }

    /// Between commits: try the disk again if writes are failing, and freeze a memtable
    /// that has been open long enough.
    fn idle(&mut self) {
        self.recover_if_due();
        self.freeze_if_full();
    }

    /// Commits a batch; true when a stop was asked for.
    fn commit(&mut self, batch: Vec<Job>) -> bool {
        self.recover_if_due();
        self.wait_for_checkpoints();
        let refused = self.refusal();
        let mut staged: FastMap<String, Arc<StoredVerification>> = FastMap::default();
        let mut entries = Vec::new();
        let mut changes = Vec::new();
        let mut pending = Vec::new();
        let mut freezes = Vec::new();
        let mut stop = None;
        for job in batch {
            let (event, reply) = match job {
                Job::Record { event, reply } => (event, reply),
                Job::Freeze { reply } => {
                    freezes.push(reply);
                    continue;
                }
                Job::Stop { reply } => {
                    stop = Some(reply);
                    continue;
                }
            };
            if let Some(why) = &refused {
                let _ = reply.send(Err(StoreError::Unavailable(why.clone())));
                continue;
            }
            match self.accept(*event, &mut staged) {
                Ok(Taken::Duplicate { first, in_batch }) => pending.push(Pending {
                    reply,
                    outcome: Ok(RecordOutcome::Duplicate(first)),
                    needs_batch: in_batch,
                }),
                Ok(Taken::New { entry, change }) => {
                    let seq = entry.event.stamp.seq;
                    entries.push(*entry);
                    changes.push(*change);
                    pending.push(Pending {
                        reply,
                        // Its record is in memory: nothing to hand back.
                        outcome: Ok(RecordOutcome::Stored {
                            seq,
                            decision: None,
                            taken: None,
                        }),
                        needs_batch: true,
                    });
                }
                Err(err) => {
                    let _ = reply.send(Err(err));
                }
            }
        }
        let written = self.write(&entries);
        if written.is_ok() && !changes.is_empty() {
            let mut layers = self.shared.write_layers();
            for change in changes {
                layers.active.apply(change);
            }
        }
        for p in pending {
            let outcome = match (&written, p.needs_batch) {
                (Err(err), true) => Err(err.clone()),
                _ => p.outcome,
            };
            let _ = p.reply.send(outcome);
        }
        if !freezes.is_empty() {
            self.freeze();
            for reply in freezes {
                let _ = reply.send(());
            }
        }
        if let Some(reply) = stop {
            self.freeze();
            let _ = reply.send(());
            return true;
        }
        false
    }

    /// When the checkpointer falls behind, commits slow down to its pace rather than let
    /// memory grow: callers wait a little longer, nothing is refused while it keeps up.
    fn wait_for_checkpoints(&self) {
        let deadline = Instant::now() + MAX_WAIT;
        while self.shared.read_layers().frozen.len() >= MAX_FROZEN
            && self.shared.health_reason().is_none()
            && Instant::now() < deadline
        {
            self.shared.wait_for_change(Duration::from_millis(5));
        }
    }

    /// Why writes are refused right now, if they are.
    fn refusal(&self) -> Option<String> {
        if self.wal.is_none() {
            return Some(
                self.shared
                    .health_reason()
                    .unwrap_or_else(|| "the write-ahead log is not writable".into()),
            );
        }
        let frozen = self.shared.read_layers().frozen.len();
        (frozen >= MAX_FROZEN).then(|| {
            format!(
                "{frozen} checkpoints are waiting: the index is not keeping up or failing ({})",
                self.shared.health_reason().unwrap_or_default()
            )
        })
    }

    fn accept(
        &mut self,
        event: NewEvent,
        staged: &mut FastMap<String, Arc<StoredVerification>>,
    ) -> Result<Taken, StoreError> {
        let id = &event.identity.id;
        let (current, in_batch) = match staged.get(id) {
            Some(v) => (Some(Arc::clone(v)), true),
            None => (self.shared.lookup(id)?, false),
        };
        if let Some(first) = current
            .as_ref()
            .and_then(|c| c.first_delivery(&event.identity))
        {
            return Ok(Taken::Duplicate { first, in_batch });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let received_ms = Stamp::new(event.received_at, 0).ms;
        self.last_ms = self.last_ms.max(received_ms);
        let stamp = Stamp {
            ms: self.last_ms,
            seq,
        };
        // Parsing a number costs microseconds: only when the record lacks one.
        let lacks_number = current.as_ref().is_none_or(|c| c.record.number.is_none());
        let number = event
            .number
            .as_ref()
            .filter(|_| lacks_number)
            .map(|n| (n.stored.clone(), n.facts()));
        let merged = merge(
            current.as_deref(),
            &event.event,
            &event.identity.discriminator,
            stamp,
            event.received_at,
            &event.app_key,
            number
                .as_ref()
                .map(|(stored, facts)| (stored.as_str(), facts)),
            event.decision.as_ref(),
        );
        let verification = Arc::new(merged.verification);
        staged.insert(id.clone(), Arc::clone(&verification));
        let logged = LoggedEvent {
            stamp,
            received_at: event.received_at,
            app_key: event.app_key,
            event: event.identity.event,
            id: id.clone(),
            body: String::from_utf8_lossy(&event.body).into_owned(),
        };
        let entry = WalEntry {
            event: logged.clone(),
            discriminator: event.identity.discriminator,
            number,
            decision: event.decision,
        };
        Ok(Taken::New {
            entry: Box::new(entry),
            change: Box::new(Change {
                verification,
                created: merged.created,
                new_number: merged.new_number,
                new_reference: merged.new_reference,
                event: logged,
            }),
        })
    }

    /// Writes the batch to the log and syncs it. A failure degrades the store until the
    /// disk takes writes again.
    fn write(&mut self, entries: &[WalEntry]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let Some(wal) = self.wal.as_mut() else {
            return Err(StoreError::Unavailable(
                "the write-ahead log is not writable".into(),
            ));
        };
        let payload = codec::encode_wal_batch(entries);
        let started = Instant::now();
        let mut rotated = Ok(());
        if wal.is_full_for(payload.len()) {
            // Only into a prepared segment: making one here would hold up this commit.
            if let Some(spare) = self.segments.take() {
                rotated = wal.rotate(entries[0].event.stamp.seq, Some(spare));
                self.segments.ask();
            }
        }
        match rotated.and_then(|()| wal.append(&payload)) {
            Ok(()) => {
                self.shared
                    .observer
                    .committed(started.elapsed(), entries.len());
                Ok(())
            }
            Err(err) => {
                let why = format!("writing the write-ahead log failed: {err}");
                tracing::error!(error.message = %why, "the store refuses writes until the disk takes them again");
                self.shared.observer.write_failed("wal");
                self.shared.set_wal_health(Some(why.clone()));
                // Never append after a failed write: the next write starts a new segment.
                self.wal = None;
                // A full disk wants every byte back.
                self.segments.discard();
                self.last_probe = Some(Instant::now());
                Err(StoreError::Failed(why))
            }
        }
    }

    /// While the log is not writable: once a second, checks the disk and starts a new
    /// segment when it takes writes again.
    fn recover_if_due(&mut self) {
        if self.wal.is_some() {
            return;
        }
        if self.last_probe.is_some_and(|at| at.elapsed() < PROBE_EVERY) {
            return;
        }
        self.last_probe = Some(Instant::now());
        let dir = self.shared.wal_dir.clone();
        let recovered =
            wal::probe(&dir, PROBE_BYTES).and_then(|()| WalWriter::create(&dir, self.next_seq));
        match recovered {
            Ok(writer) => {
                tracing::info!("the write-ahead log is writable again");
                self.wal = Some(writer);
                self.shared.set_wal_health(None);
            }
            Err(err) => {
                self.shared
                    .set_wal_health(Some(format!("the disk does not take writes: {err}")));
            }
        }
    }

    fn freeze_if_full(&mut self) {
        let full = {
            let layers = self.shared.read_layers();
            let active = &layers.active;
            active.events.len() >= self.freeze_events
                || active.event_bytes >= FREEZE_BYTES
                || (!active.is_empty() && active.opened.elapsed() >= FREEZE_AFTER)
        };
        if full {
            self.freeze();
        }
    }

    /// Queues the active memtable for the checkpointer and starts a new log segment, so
    /// the frozen memtable's events end where the new segment begins.
    fn freeze(&mut self) {
        if self.shared.read_layers().active.is_empty() {
            return;
        }
        if let Some(wal) = self.wal.as_mut() {
            let rotated = wal.rotate(self.next_seq, self.segments.take());
            self.segments.ask();
            if let Err(err) = rotated {
                let why = format!("starting a write-ahead log segment failed: {err}");
                self.shared.observer.write_failed("wal");
                self.shared.set_wal_health(Some(why));
                self.wal = None;
                self.last_probe = Some(Instant::now());
            }
        }
        {
            let mut layers = self.shared.write_layers();
            let mut frozen = std::mem::take(&mut layers.active);
            frozen.covers_upto = self.next_seq.saturating_sub(1);
            layers.frozen.push_back(Arc::new(frozen));
        }
        self.shared.wake_checkpointer();
    }
}

/// How one event was taken in.
enum Taken {
    Duplicate {
        first: crate::store::FirstDelivery,
        /// The first delivery is in this very batch (durable only once it is written).
        in_batch: bool,
    },
    New {
        entry: Box<WalEntry>,
        change: Box<Change>,
    },
}
