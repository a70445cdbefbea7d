//! The checkpointer: moves each frozen memtable into the index (records in compressed
//! blocks, patches, ids, raw-event blocks, new symbols, a run of number and reference
//! entries, and last the new checkpoint position), flushes the index, then drops the
//! memtable and deletes the log segments it covered. A checkpoint that fails is retried with a freshly opened
//! index, since sled stays failed after an I/O error; until then the data is safe in the
//! write-ahead log and reads see it in memory.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    codec::{self, LoggedEvent, StoredVerification},
    index::{CHECKPOINT, LAST_MS, MAX_VALUE_BYTES},
    keys::{self, Stamp},
    memtable::Memtable,
    runs, Shared,
};
use crate::store::StoreError;

/// Records per compressed block: small enough that reading one record decompresses little,
/// large enough that the index holds one entry per many records.
const RECORDS_PER_BLOCK: usize = 32;
/// Raw events per block.
const EVENTS_PER_BLOCK: usize = 512;
/// The most raw bytes in a block of records or events (compressed, a block must also
/// stay under the index's largest value).
const BLOCK_BYTES: usize = 256 << 10;
const RETRY_EVERY: Duration = Duration::from_secs(1);
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);
/// The checkpointer's nice value (0 is normal, 19 the lowest priority).
const CHECKPOINT_NICE: i32 = 10;
/// At shutdown, attempts before giving up (the log keeps the data for the next start).
const ATTEMPTS_AT_SHUTDOWN: u32 = 3;

pub fn run(shared: &Shared) {
    // A checkpoint can wait a little, callbacks cannot: on a busy machine this thread
    // yields to the HTTP workers and the commit thread (Linux gives each thread its own
    // nice value). It cannot fall behind for long: commits wait for it when it does.
    let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), CHECKPOINT_NICE);
    // Every failed retry is logged with its reason, at most once per interval.
    let mut failures = FailureLog::default();
    while let Some(memtable) = shared.next_frozen() {
        let mut attempts = 0;
        loop {
            match checkpoint(shared, &memtable) {
                Ok(()) => {
                    if attempts > 0 {
                        tracing::info!(attempts, "checkpointing into the index works again");
                    }
                    shared.set_index_health(None);
                    break;
                }
                Err(err) => {
                    attempts += 1;
                    let why = format!("checkpointing into the index failed: {err}");
                    if let Some(held_back) = failures.due() {
                        tracing::error!(error.message = %why, attempts, held_back, "reopening the index and retrying");
                    }
                    shared.observer.write_failed("checkpoint");
                    shared.set_index_health(Some(why));
                    if shared.is_stopping() && attempts >= ATTEMPTS_AT_SHUTDOWN {
                        tracing::error!("giving up at shutdown; the write-ahead log keeps the data for the next start");
                        return;
                    }
                    std::thread::sleep(RETRY_EVERY);
                    if let Err(why) = shared.reopen_index() {
                        if let Some(held_back) = failures.due() {
                            tracing::error!(error.message = %why, attempts, held_back, "retrying");
                        }
                    }
                }
            }
        }
        shared.checkpointed(&memtable);
    }
}

/// When a failure was last logged, and how many were held back since.
#[derive(Default)]
struct FailureLog {
    last: Option<Instant>,
    held_back: u64,
}

impl FailureLog {
    /// The number held back since the last one logged, if this one is to be logged.
    fn due(&mut self) -> Option<u64> {
        if self.last.is_some_and(|at| at.elapsed() < FAILURE_LOG_EVERY) {
            self.held_back += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.held_back))
    }
}

/// One checkpoint, written in small sled batches (sled blocks every read while it applies
/// a batch) in an order that keeps a crash harmless: symbols before the records that use
/// them, data before the checkpoint position that says it is there. A checkpoint cut short
/// is simply done again from the log after a restart (see `commit::replay`).
fn checkpoint(shared: &Shared, memtable: &Memtable) -> Result<(), StoreError> {
    let index = shared.index()?;
    let started = Instant::now();
    let cutoff = shared.retention_cutoff();
    let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
    let (symbols_upto, records) = {
        let mut symbols = shared.write_symbols();
        let mut created: Vec<&Arc<StoredVerification>> = Vec::new();
        let mut patched = Vec::new();
        for held in memtable.records.values() {
            if held.verification.stamp() < cutoff {
                continue;
            }
            if held.created_here {
                created.push(&held.verification);
            } else {
                patched.push(&held.verification);
            }
        }
        created.sort_by_key(|v| v.stamp());
        let encoded: Vec<Vec<u8>> = created
            .iter()
            .map(|v| {
                let mut out = Vec::with_capacity(256);
                codec::encode_record(v, &mut *symbols, &mut out);
                out
            })
            .collect();
        let mut records = Vec::new();
        for (start, end, block) in compressed_blocks(&encoded, RECORDS_PER_BLOCK) {
            records.push((keys::record_block(created[start].stamp()), Some(block)));
            for v in &created[start..end] {
                records.push((keys::id(&v.record.id), Some(v.stamp().bytes().to_vec())));
            }
        }
        for v in patched {
            let mut out = Vec::with_capacity(256);
            codec::encode_record(v, &mut *symbols, &mut out);
            records.push((keys::patch(v.stamp()), Some(out)));
        }
        for (n, text) in symbols.unpersisted() {
            writes.push((keys::symbol(n), Some(text.as_bytes().to_vec())));
        }
        (symbols.len(), records)
    };
    writes.extend(records);
    let events: Vec<&LoggedEvent> = memtable
        .events
        .iter()
        .filter(|e| e.stamp >= cutoff)
        .collect();
    let encoded: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let mut out = Vec::with_capacity(e.body.len() + 64);
            codec::encode_event(e, &mut out);
            out
        })
        .collect();
    for (start, _, block) in compressed_blocks(&encoded, EVENTS_PER_BLOCK) {
        writes.push((keys::event_block(events[start].stamp), Some(block)));
    }
    runs::apply(&index, writes)?;
    let mut entries = Vec::new();
    for (tag, values) in [
        (keys::NUMBER, &memtable.numbers),
        (keys::REFERENCE, &memtable.references),
    ] {
        for (value, stamps) in values {
            for stamp in stamps.iter().filter(|s| **s >= cutoff) {
                entries.push(keys::indexed(tag, value, *stamp));
            }
        }
    }
    let written_at = memtable.events.last().map_or(0, |e| e.stamp.ms);
    shared.runs.add(&index, entries, written_at)?;
    let mut position = vec![(
        keys::meta(CHECKPOINT),
        Some(memtable.covers_upto.to_be_bytes().to_vec()),
    )];
    if let Some(last) = memtable.events.last() {
        position.push((
            keys::meta(LAST_MS),
            Some(last.stamp.ms.to_be_bytes().to_vec()),
        ));
    }
    runs::apply(&index, position)?;
    index.flush()?;
    shared.write_symbols().mark_persisted(symbols_upto);
    shared.observer.checkpointed(started.elapsed());
    // Merging runs is not part of the checkpoint: a failure here leaves more runs, no less.
    if let Err(err) = shared.runs.merge(&index, written_at) {
        tracing::warn!(error.message = %err, "merging index runs failed; retried after the next checkpoint");
    }
    Ok(())
}

/// Encoded items in compressed blocks (start, end, block) of at most `count` items and
/// [`BLOCK_BYTES`] raw bytes each; a block that compresses to more than the index's
/// largest value is split in two until it fits (or holds one item).
fn compressed_blocks(items: &[Vec<u8>], count: usize) -> Vec<(usize, usize, Vec<u8>)> {
    let mut ranges = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        if i > start && (i - start >= count || bytes + item.len() > BLOCK_BYTES) {
            ranges.push((start, i));
            start = i;
            bytes = 0;
        }
        bytes += item.len();
    }
    if start < items.len() {
        ranges.push((start, items.len()));
    }
    let mut blocks = Vec::with_capacity(ranges.len());
    while let Some((start, end)) = ranges.pop() {
        let block = codec::encode_block(items[start..end].iter().map(Vec::as_slice));
        if block.len() > MAX_VALUE_BYTES && end - start > 1 {
            let middle = start + (end - start) / 2;
            ranges.push((middle, end));
            ranges.push((start, middle));
        } else {
            blocks.push((start, end, block));
        }
    }
    blocks.sort_by_key(|(start, _, _)| *start);
    blocks
}

/// The stamp below which nothing is kept (retention).
pub fn cutoff_of(ms: u64) -> Stamp {
    Stamp { ms, seq: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_item_in_order_and_stay_under_the_largest_value() {
        // Incompressible items: 200 of 2 KiB, 400 KiB raw.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let items: Vec<Vec<u8>> = (0..200)
            .map(|_| {
                (0..2048)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect();
        let blocks = compressed_blocks(&items, EVENTS_PER_BLOCK);
        assert!(blocks.len() > 4, "{} blocks", blocks.len());
        assert!(blocks.iter().all(|(_, _, b)| b.len() <= MAX_VALUE_BYTES));
        let mut next = 0;
        for (start, end, _) in &blocks {
            assert_eq!(*start, next);
            next = *end;
        }
        assert_eq!(next, items.len());
        // Compressible items keep whole blocks of the count.
        let small: Vec<Vec<u8>> = (0..1000)
            .map(|i| format!("event {i}").into_bytes())
            .collect();
        let counted = compressed_blocks(&small, EVENTS_PER_BLOCK);
        assert_eq!(counted.len(), 2);
    }
}
