//! What was committed since the last checkpoint: the records it changed, the index
//! entries it added and its raw events, in memory. The write-ahead log holds the same
//! events, so a crash loses none of it; a checkpoint moves a memtable into the index.
//!
//! Layers: the active memtable takes commits; when it is full it is frozen (read-only)
//! and queued for the checkpointer, and a new one takes over. Reads see the active
//! memtable, the frozen ones, then the index, newest first.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
    time::Instant,
};

use super::{
    codec::{LoggedEvent, StoredVerification},
    keys::Stamp,
};

/// Maps looked up on every event, keyed by ids, numbers and references: a quick hash,
/// seeded at random per process (as SipHash is) so that keys cannot be chosen to collide.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A record as a memtable holds it.
#[derive(Debug, Clone)]
pub struct Held {
    pub verification: Arc<StoredVerification>,
    /// First written in this memtable (its id and block entry are new at checkpoint).
    pub created_here: bool,
}

/// One committed event's effect.
pub struct Change {
    pub verification: Arc<StoredVerification>,
    pub created: bool,
    pub new_number: Option<String>,
    pub new_reference: Option<String>,
    pub event: LoggedEvent,
}

#[derive(Debug)]
pub struct Memtable {
    pub records: FastMap<Arc<str>, Held>,
    /// Creation stamp → id, for every record in `records`.
    pub by_stamp: BTreeMap<Stamp, Arc<str>>,
    /// Index entries first made here (numbers in stored form).
    pub numbers: FastMap<String, Vec<Stamp>>,
    pub references: FastMap<String, Vec<Stamp>>,
    /// Raw events in stamp order.
    pub events: Vec<LoggedEvent>,
    pub event_bytes: usize,
    /// The highest sequence number applied here (0: none).
    pub last_seq: u64,
    /// Set when frozen: every sequence number up to this one is here or in an earlier
    /// layer, so the checkpoint of this memtable covers the log up to it.
    pub covers_upto: u64,
    pub opened: Instant,
}

impl Default for Memtable {
    fn default() -> Self {
        Self {
            records: FastMap::default(),
            by_stamp: BTreeMap::new(),
            numbers: FastMap::default(),
            references: FastMap::default(),
            events: Vec::new(),
            event_bytes: 0,
            last_seq: 0,
            covers_upto: 0,
            opened: Instant::now(),
        }
    }
}

impl Memtable {
    pub fn apply(&mut self, change: Change) {
        let stamp = change.verification.stamp();
        let id: Arc<str> = Arc::from(change.verification.record.id.as_str());
        let created_here =
            change.created || self.records.get(&*id).is_some_and(|held| held.created_here);
        if let Some(number) = change.new_number {
            self.numbers.entry(number).or_default().push(stamp);
        }
        if let Some(reference) = change.new_reference {
            self.references.entry(reference).or_default().push(stamp);
        }
        self.last_seq = self.last_seq.max(change.event.stamp.seq);
        self.event_bytes += change.event.body.len();
        self.events.push(change.event);
        self.by_stamp.insert(stamp, Arc::clone(&id));
        self.records.insert(
            id,
            Held {
                verification: change.verification,
                created_here,
            },
        );
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Records changed here with creation stamps in `[start, end)`, oldest first.
    pub fn records_between(
        &self,
        start: Stamp,
        end: Stamp,
    ) -> impl Iterator<Item = (Stamp, &Arc<StoredVerification>)> + '_ {
        self.by_stamp
            .range(start..end)
            .filter_map(|(stamp, id)| Some((*stamp, &self.records.get(id)?.verification)))
    }

    /// The record created at `stamp`, if it changed here.
    pub fn record_at(&self, stamp: Stamp) -> Option<&Arc<StoredVerification>> {
        let id = self.by_stamp.get(&stamp)?;
        Some(&self.records.get(id)?.verification)
    }

    /// Raw events with stamps in `[start, end)`.
    pub fn events_between(&self, start: Stamp, end: Stamp) -> &[LoggedEvent] {
        let from = self.events.partition_point(|e| e.stamp < start);
        let to = self.events.partition_point(|e| e.stamp < end);
        &self.events[from..to.max(from)]
    }
}

/// The active memtable and the frozen ones waiting for the checkpointer (oldest first).
#[derive(Debug, Default)]
pub struct Layers {
    pub active: Memtable,
    pub frozen: VecDeque<Arc<Memtable>>,
}

impl Layers {
    /// Newest first.
    pub fn each(&self) -> impl Iterator<Item = &Memtable> {
        std::iter::once(&self.active).chain(self.frozen.iter().rev().map(|m| &**m))
    }

    /// The latest version of a record held in memory.
    pub fn lookup(&self, id: &str) -> Option<Arc<StoredVerification>> {
        self.each()
            .find_map(|m| m.records.get(id))
            .map(|held| Arc::clone(&held.verification))
    }

    /// Records with creation stamps in `[start, end)`, the newest version of each, oldest
    /// first; at most `limit`.
    pub fn records_between(
        &self,
        start: Stamp,
        end: Stamp,
        limit: usize,
    ) -> BTreeMap<Stamp, Arc<StoredVerification>> {
        let mut out = BTreeMap::new();
        for memtable in self.each() {
            for (stamp, v) in memtable.records_between(start, end).take(limit) {
                out.entry(stamp).or_insert_with(|| Arc::clone(v));
            }
        }
        while out.len() > limit {
            out.pop_last();
        }
        out
    }

    /// Stamps of index entries made in memory for `value` (`numbers` or `references`).
    pub fn indexed(&self, value: &str, numbers: bool) -> Vec<Stamp> {
        self.each()
            .filter_map(|m| {
                if numbers {
                    m.numbers.get(value)
                } else {
                    m.references.get(value)
                }
            })
            .flatten()
            .copied()
            .collect()
    }

    /// The newest version of the record created at `stamp`, if it is in memory.
    pub fn record_at(&self, stamp: Stamp) -> Option<Arc<StoredVerification>> {
        self.each().find_map(|m| m.record_at(stamp)).cloned()
    }

    /// Raw events with stamps in `[start, end)`, oldest first; at most `limit`.
    pub fn events_between(&self, start: Stamp, end: Stamp, limit: usize) -> Vec<LoggedEvent> {
        let mut out: Vec<LoggedEvent> = Vec::new();
        for memtable in self.frozen.iter().map(|m| &**m).chain([&self.active]) {
            let room = limit.saturating_sub(out.len());
            out.extend(
                memtable
                    .events_between(start, end)
                    .iter()
                    .take(room)
                    .cloned(),
            );
        }
        out
    }
}
