//! Reads: memory first (what is not checkpointed yet), then the index, merged in the
//! store's one order. Memory is read before the index, so a checkpoint that completes in
//! between shows a record twice at most (deduplicated by stamp), never not at all.
//!
//! Pagination needs no further care: stamps are handed out in increasing order by the one
//! commit thread and published in that order, so nothing can appear behind a cursor.

use std::{borrow::Cow, collections::BTreeSet, ops::ControlFlow, sync::Arc};

use serde_json::value::RawValue;

use super::{
    codec::{self, LoggedEvent, StoredVerification},
    keys::{self, Stamp},
    Shared,
};
use crate::store::{
    Cursor, EventQuery, GroupStats, Page, StatsBuilder, StatsQuery, StoreError, StoredEvent,
    VerificationQuery, VerificationRecord,
};

fn corrupt(err: codec::CodecError) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

fn cursor(stamp: Stamp) -> Cursor {
    Cursor(stamp.bytes().to_vec())
}

fn after_cursor(after: Option<&Cursor>) -> Result<Option<Stamp>, StoreError> {
    after
        .map(|c| Stamp::from_bytes(&c.0).ok_or(StoreError::BadCursor))
        .transpose()
}

impl Shared {
    /// `[start, end)` in stamps for a time range after a cursor, without what retention
    /// has cut off.
    fn bounds(
        &self,
        since: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
        after: Option<&Cursor>,
    ) -> Result<(Stamp, Stamp), StoreError> {
        let mut start = Stamp::floor(since).max(self.retention_cutoff());
        if let Some(after) = after_cursor(after)? {
            start = start.max(after.successor());
        }
        // A cursor or the retention cutoff past `until` leaves nothing: an empty range,
        // never one that ends before it starts.
        Ok((start, Stamp::floor(until).max(start)))
    }

    pub fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        Ok(self
            .lookup(id)?
            .filter(|v| v.stamp() >= self.retention_cutoff())
            .map(|v| v.record.clone()))
    }

    /// The newest version of the record created at `stamp`.
    fn record_at(&self, stamp: Stamp) -> Result<Option<Arc<StoredVerification>>, StoreError> {
        if let Some(v) = self.read_layers().record_at(stamp) {
            return Ok(Some(v));
        }
        let index = self.index()?;
        let found = index.record_at(stamp, &self.read_symbols())?;
        Ok(found.map(Arc::new))
    }

    pub fn list(&self, query: &VerificationQuery) -> Result<Page<VerificationRecord>, StoreError> {
        let (start, end) = self.bounds(query.since, query.until, query.after.as_ref())?;
        let indexed = match (&query.filter.number, &query.filter.reference) {
            (Some(number), _) => Some((keys::NUMBER, number.as_str())),
            (None, Some(reference)) => Some((keys::REFERENCE, reference.as_str())),
            (None, None) => None,
        };
        match indexed {
            Some((tag, value)) => self.list_indexed(query, tag, value, start, end),
            None => self.list_scanned(query, start, end),
        }
    }

    /// Number and reference queries: the index says which records, the filter checks them.
    fn list_indexed(
        &self,
        query: &VerificationQuery,
        tag: u8,
        value: &str,
        start: Stamp,
        end: Stamp,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let stamps = self.stamps_of(tag, value)?;
        let mut items = Vec::new();
        let mut last = None;
        for stamp in stamps.range(start..end) {
            let Some(v) = self.record_at(*stamp)? else {
                continue;
            };
            if query.filter.matches(&v.record) && query.in_range(&v.record) {
                if items.len() == query.limit {
                    return Ok(Page {
                        items,
                        next: last.map(cursor),
                    });
                }
                items.push(v.record.clone());
                last = Some(*stamp);
            }
        }
        Ok(Page { items, next: None })
    }

    /// Where the records with this number or reference are, in memory and in the index.
    fn stamps_of(&self, tag: u8, value: &str) -> Result<BTreeSet<Stamp>, StoreError> {
        let mut stamps: BTreeSet<Stamp> = self
            .read_layers()
            .indexed(value, tag == keys::NUMBER)
            .into_iter()
            .collect();
        stamps.extend(self.runs.lookup(&*self.index()?, tag, value)?);
        Ok(stamps)
    }

    /// Up to `limit` of the newest records of `number` (stored form) first seen in
    /// `[since, until)`.
    pub fn recent_of_number(
        &self,
        number: &str,
        since: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
        limit: usize,
    ) -> Result<Vec<VerificationRecord>, StoreError> {
        let (start, end) = self.bounds(since, until, None)?;
        // Bounded however many verifications the number has: a number asked for over and
        // over must not make each of its requests read all of them.
        let mut stamps: BTreeSet<Stamp> = self
            .read_layers()
            .indexed(number, true)
            .into_iter()
            .filter(|s| (start..end).contains(s))
            .collect();
        let index = self.index()?;
        let window = (start, end);
        stamps.extend(
            self.runs
                .lookup_newest(&index, keys::NUMBER, number, window, limit)?,
        );
        let mut items = Vec::new();
        for stamp in stamps.iter().rev() {
            if items.len() == limit {
                break;
            }
            if let Some(v) = self.record_at(*stamp)? {
                if v.record.number.as_deref() == Some(number) {
                    items.push(v.record.clone());
                }
            }
        }
        Ok(items)
    }

    /// Everything else: a walk in time order, merging memory with the index, that reads at
    /// most `scan_budget` records.
    fn list_scanned(
        &self,
        query: &VerificationQuery,
        start: Stamp,
        end: Stamp,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let mut items = Vec::new();
        let mut read = 0usize;
        let mut stopped_at = None;
        let mut visit = |stamp: Stamp, record: Cow<'_, VerificationRecord>| {
            read += 1;
            if query.filter.matches(&record) {
                items.push(record.into_owned());
            }
            if items.len() == query.limit || read == query.scan_budget {
                stopped_at = Some(stamp);
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        self.walk(start, end, query.scan_budget, |stamp, v| match v {
            Walked::Decoded(v) => Ok(visit(stamp, Cow::Borrowed(&v.record))),
            Walked::Encoded(bytes) => {
                let v = codec::decode_record(bytes, Some(&self.read_symbols())).map_err(corrupt)?;
                Ok(visit(stamp, Cow::Owned(v.record)))
            }
        })?;
        Ok(Page {
            items,
            next: stopped_at.map(cursor),
        })
    }

    /// Every record created in `[start, end)`, oldest first: memory (the newer version)
    /// merged with the index. `memory_limit` bounds how much is taken from memory.
    fn walk(
        &self,
        start: Stamp,
        end: Stamp,
        memory_limit: usize,
        mut each: impl FnMut(Stamp, Walked<'_>) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        let memory = self.read_layers().records_between(start, end, memory_limit);
        let mut memory = memory.into_iter().peekable();
        let mut stopped = false;
        let index = self.index()?;
        index.scan_records(start, end, |stamp, bytes| {
            while let Some((s, v)) = memory.next_if(|(s, _)| *s < stamp) {
                if each(s, Walked::Decoded(&v))?.is_break() {
                    stopped = true;
                    return Ok(ControlFlow::Break(()));
                }
            }
            let flow = match memory.next_if(|(s, _)| *s == stamp) {
                Some((_, v)) => each(stamp, Walked::Decoded(&v))?,
                None => each(stamp, Walked::Encoded(bytes))?,
            };
            stopped = flow.is_break();
            Ok(flow)
        })?;
        if !stopped {
            for (stamp, v) in memory {
                if each(stamp, Walked::Decoded(&v))?.is_break() {
                    break;
                }
            }
        }
        Ok(())
    }

    pub fn stats(&self, query: &StatsQuery) -> Result<Vec<GroupStats>, StoreError> {
        let (start, end) = self.bounds(query.since, query.until, None)?;
        let mut stats = StatsBuilder::new(query.group_by.clone());
        self.walk(start, end, usize::MAX, |_, v| {
            match v {
                Walked::Decoded(v) => stats.add(&v.record.stats_row()),
                Walked::Encoded(bytes) => {
                    codec::with_stats_row(bytes, &self.read_symbols(), |row| stats.add(row))
                        .map_err(corrupt)?;
                }
            }
            Ok(ControlFlow::Continue(()))
        })?;
        Ok(stats.finish())
    }

    pub fn events(&self, query: &EventQuery) -> Result<Page<StoredEvent>, StoreError> {
        let (start, end) = self.bounds(query.since, query.until, query.after.as_ref())?;
        // Memory first: see the module docs.
        let memory = self.read_layers().events_between(start, end, query.limit);
        let mut events = self.index()?.events_between(start, end, query.limit)?;
        let last = events.last().map(|e| e.stamp);
        events.extend(
            memory
                .into_iter()
                .filter(|e| last.is_none_or(|last| e.stamp > last)),
        );
        events.truncate(query.limit);
        let next = (events.len() == query.limit)
            .then(|| events.last().map(|e| cursor(e.stamp)))
            .flatten();
        let items = events
            .into_iter()
            .map(stored_event)
            .collect::<Result<_, _>>()?;
        Ok(Page { items, next })
    }
}

/// A record met on a walk: from memory, or still encoded in the index.
pub enum Walked<'a> {
    Decoded(&'a Arc<StoredVerification>),
    Encoded(&'a [u8]),
}

fn stored_event(e: LoggedEvent) -> Result<StoredEvent, StoreError> {
    let body = RawValue::from_string(e.body)
        .map_err(|err| StoreError::Corrupt(format!("a logged body is not JSON: {err}")))?;
    Ok(StoredEvent {
        seq: e.stamp.seq,
        received_at: e.received_at,
        app_key: e.app_key,
        event: e.event,
        id: e.id,
        body,
    })
}
