//! Retention in the index: deletes records created before the cutoff with their id
//! entries and patches, their number and reference entries (runs.rs), and raw events
//! received before it.
//! A block that straddles the cutoff is written again with what stays. Works in small
//! batches with pauses, so the commit thread and readers are never held up for long.
//!
//! Memory needs nothing here: the caller checkpoints everything first, later checkpoints
//! skip anything older than the cutoff, and reads hide it.

use std::time::Duration;

use super::{
    codec::{self, StoredVerification},
    index::{failed, Index},
    keys::{self, Stamp},
    Shared,
};
use crate::store::{Deleted, StoreError};

/// Blocks handled per sled batch.
const BLOCKS_PER_BATCH: usize = 4;
const PAUSE: Duration = Duration::from_millis(5);

fn corrupt(err: codec::CodecError) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

pub fn delete_before(shared: &Shared, cutoff: Stamp) -> Result<Deleted, StoreError> {
    let index = shared.index()?;
    let mut deleted = Deleted::default();
    shared.runs.expire(&index, cutoff)?;
    loop {
        let records = expire_records(shared, &index, cutoff)?;
        let events = expire_events(&index, cutoff)?;
        deleted.verifications += records;
        deleted.events += events;
        if records == 0 && events == 0 {
            break;
        }
        std::thread::sleep(PAUSE);
    }
    if deleted.verifications + deleted.events > 0 {
        index.flush()?;
    }
    Ok(deleted)
}

/// One batch of record blocks; returns how many records went.
fn expire_records(shared: &Shared, index: &Index, cutoff: Stamp) -> Result<usize, StoreError> {
    let mut batch = sled::Batch::default();
    let mut gone = 0;
    let blocks = index
        .tree
        .range(keys::record_blocks().start..keys::record_block(cutoff))
        .take(BLOCKS_PER_BATCH);
    for block in blocks {
        let (key, block) = block.map_err(failed)?;
        let mut kept = Vec::new();
        for bytes in codec::decode_block(&block).map_err(corrupt)?.iter() {
            let stamp = codec::record_stamp(bytes).map_err(corrupt)?;
            if stamp >= cutoff {
                kept.push(bytes.to_vec());
                continue;
            }
            let symbols = shared.read_symbols();
            let mut versions = vec![codec::decode_record(bytes, Some(&symbols)).map_err(corrupt)?];
            if let Some(patch) = index.tree.get(keys::patch(stamp)).map_err(failed)? {
                versions.push(codec::decode_record(&patch, Some(&symbols)).map_err(corrupt)?);
                batch.remove(keys::patch(stamp));
            }
            drop(symbols);
            forget(&mut batch, &versions);
            gone += 1;
        }
        batch.remove(key);
        if let Some(first) = kept.first() {
            let first = codec::record_stamp(first).map_err(corrupt)?;
            batch.insert(
                keys::record_block(first),
                codec::encode_block(kept.iter().map(Vec::as_slice)),
            );
        }
    }
    if gone > 0 {
        index.tree.apply_batch(batch).map_err(failed)?;
    }
    Ok(gone)
}

/// Removes a record's id entry (the number and reference entries are in runs, which
/// expire on their own).
fn forget(batch: &mut sled::Batch, versions: &[StoredVerification]) {
    for v in versions {
        batch.remove(keys::id(&v.record.id));
    }
}

/// One batch of event blocks; returns how many events went.
fn expire_events(index: &Index, cutoff: Stamp) -> Result<usize, StoreError> {
    let mut batch = sled::Batch::default();
    let mut gone = 0;
    let blocks = index
        .tree
        .range(keys::event_blocks().start..keys::event_block(cutoff))
        .take(BLOCKS_PER_BATCH);
    for block in blocks {
        let (key, block) = block.map_err(failed)?;
        let mut kept = Vec::new();
        for bytes in codec::decode_block(&block).map_err(corrupt)?.iter() {
            let event = codec::decode_event(bytes).map_err(corrupt)?;
            if event.stamp >= cutoff {
                kept.push((event.stamp, bytes.to_vec()));
            } else {
                gone += 1;
            }
        }
        batch.remove(key);
        if let Some((first, _)) = kept.first() {
            batch.insert(
                keys::event_block(*first),
                codec::encode_block(kept.iter().map(|(_, b)| b.as_slice())),
            );
        }
    }
    if gone > 0 {
        index.tree.apply_batch(batch).map_err(failed)?;
    }
    Ok(gone)
}
