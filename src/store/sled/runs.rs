//! The number and reference indexes, as runs: immutable sorted lists of index entries,
//! each stored as compressed chunks with a header holding the chunks' first keys and a
//! Bloom filter of the values in the run.
//!
//! Why not one sled key per entry: sled's log costs a few hundred bytes on disk per key
//! inserted, more than a whole verification is worth, while large values cost it little.
//! A checkpoint writes its new entries as one run; the newest runs of the hour are merged
//! as they pile up ([`tail_to_merge`]) and an hour's runs into one once it is over, so a
//! lookup checks a Bloom filter per run (under twenty or so) and reads a chunk only from
//! the runs that may hold the value. Retention drops runs written before the cutoff and
//! rewrites the one that straddles it.
//!
//! An entry is `<tag> <value> 0x00 <stamp>` (keys.rs), so a run is sorted by value and
//! then by the verification's creation.

use std::{
    collections::BTreeSet,
    sync::{Arc, PoisonError, RwLock},
};

use serde::{Deserialize, Serialize};

use super::{
    codec,
    index::{failed, Index, MAX_VALUE_BYTES},
    keys::{self, Stamp},
};
use crate::store::StoreError;

/// Raw bytes per chunk: reading one entry decompresses this much.
const CHUNK_BYTES: usize = 8 << 10;
/// Bloom filter size and probes: about 1 % false positives.
const BLOOM_BITS_PER_ENTRY: usize = 10;
const BLOOM_PROBES: u32 = 7;
/// Runs written within one such period are merged together.
pub const GRANULE_MS: u64 = 3_600_000;
/// The current period's newest runs are merged once this many of them are balanced
/// (none holds more entries than the others together; see [`tail_to_merge`]).
const MERGE_AT: usize = 8;
/// Past this many runs in the current period, all of them are merged whatever their
/// sizes: a lookup checks a Bloom filter per run.
const MOST_RUNS: usize = 4 * MERGE_AT;
/// Index writes per sled batch: sled holds a global write lock while it applies a batch.
const WRITES_PER_BATCH: usize = 64;

fn corrupt(what: impl Into<String>) -> StoreError {
    StoreError::Corrupt(what.into())
}

/// A Bloom filter over `<tag> <value>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Bloom {
    bits: Vec<u64>,
}

impl Bloom {
    fn with_capacity(entries: usize) -> Self {
        let words = (entries.max(1) * BLOOM_BITS_PER_ENTRY).div_ceil(64);
        Self {
            bits: vec![0; words],
        }
    }

    fn probes(key: &[u8], len: u64) -> impl Iterator<Item = u64> {
        // FNV-1a, then a splitmix64 step for the second hash: stable across builds, which
        // the filters need since they are stored.
        let mut h1: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key {
            h1 ^= u64::from(*b);
            h1 = h1.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut h2 = h1.wrapping_add(0x9e37_79b9_7f4a_7c15);
        h2 = (h2 ^ (h2 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h2 = (h2 ^ (h2 >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h2 = (h2 ^ (h2 >> 31)) | 1;
        (0..u64::from(BLOOM_PROBES)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % len)
    }

    fn insert(&mut self, key: &[u8]) {
        let len = self.bits.len() as u64 * 64;
        for bit in Self::probes(key, len) {
            self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        }
    }

    fn may_contain(&self, key: &[u8]) -> bool {
        let len = self.bits.len() as u64 * 64;
        len > 0
            && Self::probes(key, len)
                .all(|bit| self.bits[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }
}

/// A part of a run header stored in parts: its key and bytes.
type HeaderPart = (Vec<u8>, sled::IVec);

/// What is kept of a run in memory (and stored as its header).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub id: u64,
    /// When the entries were written (ms): first and last checkpoint merged into it.
    pub written_from: u64,
    pub written_to: u64,
    pub entries: u64,
    /// First entry of each chunk.
    pub chunk_firsts: Vec<Vec<u8>>,
    pub bloom: Bloom,
}

impl Run {
    fn granule(&self) -> u64 {
        self.written_from / GRANULE_MS
    }
}

/// The runs of the index, oldest first.
#[derive(Debug, Default)]
pub struct Runs {
    list: RwLock<Vec<Arc<Run>>>,
}

/// The part of an entry a Bloom filter is keyed on: `<tag> <value>`.
fn bloom_key(entry: &[u8]) -> &[u8] {
    &entry[..entry.len().saturating_sub(17)]
}

impl Runs {
    /// The runs stored in `index`; chunks left by a run that was never finished are
    /// deleted.
    pub fn load(index: &Index) -> Result<Self, StoreError> {
        let mut list = Vec::new();
        let decode = |header: &[u8]| {
            postcard::from_bytes::<Run>(header)
                .map_err(|e| corrupt(format!("a run header does not decode: {e}")))
        };
        // Headers stored in parts: run -> (parts expected, the parts' keys and bytes).
        let mut split: std::collections::BTreeMap<u64, (u16, Vec<HeaderPart>)> = Default::default();
        for entry in index.tree.range(keys::run_headers()) {
            let (key, header) = entry.map_err(failed)?;
            match keys::run_of_header(&key) {
                Some((_, None)) => list.push(Arc::new(decode(&header)?)),
                Some((run, Some((total, _)))) => {
                    split
                        .entry(run)
                        .or_insert((total, Vec::new()))
                        .1
                        .push((key.to_vec(), header));
                }
                None => return Err(corrupt("a run header key has an unknown shape")),
            }
        }
        let mut orphans = Vec::new();
        for (total, parts) in split.into_values() {
            // Parts come in key order, which is part order. A header whose parts are not
            // all there was cut short by a crash: its run was never finished.
            if parts.len() == usize::from(total) {
                let header: Vec<u8> = parts.iter().flat_map(|(_, p)| p.iter().copied()).collect();
                list.push(Arc::new(decode(&header)?));
            } else {
                orphans.extend(parts.into_iter().map(|(key, _)| key));
            }
        }
        list.sort_by_key(|r| (r.written_from, r.id));
        let known: BTreeSet<u64> = list.iter().map(|r| r.id).collect();
        for key in index.tree.range(keys::run_chunks()).keys() {
            let key = key.map_err(failed)?;
            if keys::run_of_chunk(&key).is_some_and(|id| !known.contains(&id)) {
                orphans.push(key.to_vec());
            }
        }
        apply(index, orphans.into_iter().map(|k| (k, None)).collect())?;
        Ok(Self {
            list: RwLock::new(list),
        })
    }

    /// Forgets the runs in memory and reads them again: after the index was reopened,
    /// runs written since its last flush are gone (their checkpoint is redone).
    pub fn reload(&self, index: &Index) -> Result<(), StoreError> {
        let fresh = Self::load(index)?;
        let runs = fresh
            .list
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        *self.list.write().unwrap_or_else(PoisonError::into_inner) = runs;
        Ok(())
    }

    fn snapshot(&self) -> Vec<Arc<Run>> {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stamps of the entries for `value` under `tag`.
    pub fn lookup(&self, index: &Index, tag: u8, value: &str) -> Result<Vec<Stamp>, StoreError> {
        let prefix = keys::indexed_prefix(tag, value);
        let bloom = &prefix[..prefix.len() - 1];
        let mut out = Vec::new();
        for run in self.snapshot() {
            if !run.bloom.may_contain(bloom) {
                continue;
            }
            let first = run
                .chunk_firsts
                .partition_point(|f| f.as_slice() <= prefix.as_slice())
                .saturating_sub(1);
            for (n, chunk_first) in run.chunk_firsts.iter().enumerate().skip(first) {
                if n > first && !chunk_first.starts_with(&prefix) {
                    break;
                }
                let chunk = chunk_block(index, run.id, n as u32)?;
                for entry in chunk.iter().filter(|e| e.starts_with(&prefix)) {
                    out.extend(keys::stamp_of_indexed(entry));
                }
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Up to `limit` of the newest stamps in `[start, end)` indexed under `value`, from
    /// each run (newest first within a run): reads only the chunks that hold them, so a
    /// value with many entries costs no more than one with a few.
    pub fn lookup_newest(
        &self,
        index: &Index,
        tag: u8,
        value: &str,
        (start, end): (Stamp, Stamp),
        limit: usize,
    ) -> Result<Vec<Stamp>, StoreError> {
        let prefix = keys::indexed_prefix(tag, value);
        let bloom = &prefix[..prefix.len() - 1];
        let (low, high) = (
            keys::indexed(tag, value, start),
            keys::indexed(tag, value, end),
        );
        let mut out = Vec::new();
        for run in self.snapshot() {
            if !run.bloom.may_contain(bloom) {
                continue;
            }
            // Chunk n holds the entries from its first up to the next chunk's first.
            let holding = run
                .chunk_firsts
                .partition_point(|f| f.as_slice() < high.as_slice());
            let mut taken = 0;
            for n in (0..holding).rev() {
                let chunk = chunk_block(index, run.id, n as u32)?;
                let mut found: Vec<Stamp> = chunk
                    .iter()
                    .filter(|e| *e >= low.as_slice() && *e < high.as_slice())
                    .filter_map(keys::stamp_of_indexed)
                    .collect();
                found.reverse();
                found.truncate(limit - taken);
                taken += found.len();
                out.extend(found);
                if taken == limit || run.chunk_firsts[n].as_slice() <= low.as_slice() {
                    break;
                }
            }
        }
        out.sort_unstable_by(|a, b| b.cmp(a));
        out.dedup();
        out.truncate(limit);
        Ok(out)
    }

    /// Writes `entries` (any order, duplicates allowed) as a new run, written at `at_ms`.
    pub fn add(&self, index: &Index, entries: Vec<Vec<u8>>, at_ms: u64) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut entries = entries;
        entries.sort();
        entries.dedup();
        let run = write_run(index, entries, at_ms, at_ms)?;
        self.list
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(run);
        Ok(())
    }

    /// Merges the runs of each past period into one, and the newest runs of the current
    /// period when they are due ([`tail_to_merge`]). Returns whether anything was merged.
    pub fn merge(&self, index: &Index, now_ms: u64) -> Result<bool, StoreError> {
        let current = now_ms / GRANULE_MS;
        let mut merged = false;
        // A merge of the newest runs can make a merge of larger ones due: each merge
        // leaves fewer runs, so this ends.
        loop {
            let runs = self.snapshot();
            let Some((start, end)) = group_to_merge(&runs, current) else {
                return Ok(merged);
            };
            self.replace(index, &runs[start..end], |_| true)?;
            merged = true;
        }
    }

    /// Drops every entry of a verification created before `cutoff`: whole runs written
    /// before it, and filtered copies of the runs that straddle it.
    pub fn expire(&self, index: &Index, cutoff: Stamp) -> Result<usize, StoreError> {
        let mut removed = 0;
        for run in self.snapshot() {
            if run.written_to < cutoff.ms {
                removed += run.entries as usize;
                self.replace(index, std::slice::from_ref(&run), |_| false)?;
            } else if run.written_from < cutoff.ms {
                let before = run.entries as usize;
                let kept = self.replace(index, std::slice::from_ref(&run), |entry| {
                    keys::stamp_of_indexed(entry).is_some_and(|s| s >= cutoff)
                })?;
                removed += before - kept;
            }
        }
        Ok(removed)
    }

    /// Replaces `group` (adjacent runs) by one run of their entries that `keep` keeps;
    /// returns how many entries it has. The new run is complete before the old ones go.
    fn replace(
        &self,
        index: &Index,
        group: &[Arc<Run>],
        keep: impl Fn(&[u8]) -> bool,
    ) -> Result<usize, StoreError> {
        let mut entries = Vec::new();
        for run in group {
            for n in 0..run.chunk_firsts.len() {
                entries.extend(
                    read_chunk(index, run.id, n as u32)?
                        .into_iter()
                        .filter(|e| keep(e)),
                );
            }
        }
        entries.sort();
        entries.dedup();
        let kept = entries.len();
        let from = group.iter().map(|r| r.written_from).min().unwrap_or(0);
        let to = group.iter().map(|r| r.written_to).max().unwrap_or(0);
        let replacement = if entries.is_empty() {
            None
        } else {
            Some(write_run(index, entries, from, to)?)
        };
        // The old runs' headers go first, so a crash leaves orphan chunks (deleted at the
        // next start) rather than runs with missing chunks.
        let old: Vec<u64> = group.iter().map(|r| r.id).collect();
        let mut headers = Vec::new();
        for id in &old {
            for key in index.tree.scan_prefix(keys::run_header(*id)).keys() {
                headers.push((key.map_err(failed)?.to_vec(), None));
            }
        }
        apply(index, headers)?;
        {
            let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
            list.retain(|r| !old.contains(&r.id));
            if let Some(run) = replacement {
                list.push(run);
            }
            list.sort_by_key(|r| (r.written_from, r.id));
        }
        let mut chunks = Vec::new();
        for run in group {
            for n in 0..run.chunk_firsts.len() {
                chunks.push((keys::run_chunk(run.id, n as u32), None));
            }
        }
        apply(index, chunks)?;
        Ok(kept)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// The runs (`runs[start..end]`, adjacent, of one period) to merge next, if any: every
/// run of a past period, or the newest runs of the current one.
fn group_to_merge(runs: &[Arc<Run>], current: u64) -> Option<(usize, usize)> {
    let mut start = 0;
    while start < runs.len() {
        let granule = runs[start].granule();
        let end = start
            + runs[start..]
                .iter()
                .take_while(|r| r.granule() == granule)
                .count();
        if granule < current {
            if end - start > 1 {
                return Some((start, end));
            }
        } else {
            let sizes: Vec<u64> = runs[start..end].iter().map(|r| r.entries).collect();
            if let Some(from) = tail_to_merge(&sizes) {
                return Some((start + from, end));
            }
        }
        start = end;
    }
    None
}

/// Where the newest runs to merge start, given the current period's runs' sizes (oldest
/// first): the longest stretch of newest runs, at least [`MERGE_AT`] of them, in which no
/// run holds more entries than the others together; or all of them past [`MOST_RUNS`].
///
/// So a merge at least doubles the largest run it rewrites, and an entry is rewritten
/// about log2(entries of the period / entries of a checkpoint) times. Merging all of the
/// period's runs every [`MERGE_AT`] checkpoints instead rewrote everything written in
/// the hour so far each time: at a few thousand verifications a second, more work per
/// checkpoint as the hour went on than the checkpoint itself.
fn tail_to_merge(sizes: &[u64]) -> Option<usize> {
    let n = sizes.len();
    if n >= MOST_RUNS {
        return Some(0);
    }
    if n < MERGE_AT {
        return None;
    }
    let balanced = |from: usize| {
        let part = &sizes[from..];
        let largest = part.iter().copied().max().unwrap_or(0);
        let total: u64 = part.iter().sum();
        largest <= total - largest
    };
    let mut from = n - MERGE_AT;
    if !balanced(from) {
        return None;
    }
    while from > 0 && balanced(from - 1) {
        from -= 1;
    }
    Some(from)
}

/// Writes sorted, deduplicated entries as a run: chunks first, then the header that makes
/// it part of the index.
fn write_run(
    index: &Index,
    entries: Vec<Vec<u8>>,
    written_from: u64,
    written_to: u64,
) -> Result<Arc<Run>, StoreError> {
    let id = index.db.generate_id().map_err(failed)?;
    let mut bloom = Bloom::with_capacity(entries.len());
    let mut chunk_firsts = Vec::new();
    let mut writes = Vec::new();
    let mut start = 0;
    while start < entries.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < entries.len() && (end == start || bytes + entries[end].len() <= CHUNK_BYTES) {
            bytes += entries[end].len();
            end += 1;
        }
        let chunk = &entries[start..end];
        for entry in chunk {
            bloom.insert(bloom_key(entry));
        }
        chunk_firsts.push(chunk[0].clone());
        writes.push((
            keys::run_chunk(id, (chunk_firsts.len() - 1) as u32),
            Some(codec::encode_block(chunk.iter().map(Vec::as_slice))),
        ));
        start = end;
    }
    let run = Run {
        id,
        written_from,
        written_to,
        entries: entries.len() as u64,
        chunk_firsts,
        bloom,
    };
    let header = postcard::to_stdvec(&run).map_err(|e| corrupt(e.to_string()))?;
    writes.extend(header_writes(id, header));
    apply(index, writes)?;
    Ok(Arc::new(run))
}

fn chunk_block(index: &Index, run: u64, n: u32) -> Result<codec::Block, StoreError> {
    let chunk = index
        .tree
        .get(keys::run_chunk(run, n))
        .map_err(failed)?
        .ok_or_else(|| corrupt(format!("chunk {n} of index run {run} is missing")))?;
    codec::decode_block(&chunk).map_err(|e| corrupt(e.to_string()))
}

fn read_chunk(index: &Index, run: u64, n: u32) -> Result<Vec<Vec<u8>>, StoreError> {
    Ok(chunk_block(index, run, n)?.to_vecs())
}

/// Applies writes (`None` removes) in small batches, in order.
/// A run's header as index writes: one value, or parts of at most [`MAX_VALUE_BYTES`].
fn header_writes(id: u64, header: Vec<u8>) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    if header.len() <= MAX_VALUE_BYTES {
        return vec![(keys::run_header(id), Some(header))];
    }
    let parts: Vec<&[u8]> = header.chunks(MAX_VALUE_BYTES).collect();
    // 65,535 parts of 96 KiB hold a header of 6 GiB: far more than any run has.
    let total = u16::try_from(parts.len()).unwrap_or(u16::MAX);
    parts
        .into_iter()
        .zip(0..total)
        .map(|(part, k)| (keys::run_header_part(id, total, k), Some(part.to_vec())))
        .collect()
}

pub fn apply(index: &Index, writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Result<(), StoreError> {
    for part in writes.chunks(WRITES_PER_BATCH) {
        let mut batch = sled::Batch::default();
        for (key, value) in part {
            match value {
                Some(value) => batch.insert(key.as_slice(), value.as_slice()),
                None => batch.remove(key.as_slice()),
            }
        }
        index.tree.apply_batch(batch).map_err(failed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bloom_filter_has_no_false_negatives_and_few_false_positives() {
        let mut bloom = Bloom::with_capacity(10_000);
        for i in 0..10_000 {
            bloom.insert(format!("N+4670{i:07}").as_bytes());
        }
        assert!((0..10_000).all(|i| bloom.may_contain(format!("N+4670{i:07}").as_bytes())));
        let false_positives = (0..10_000)
            .filter(|i| bloom.may_contain(format!("N+4471{i:07}").as_bytes()))
            .count();
        assert!(
            false_positives < 300,
            "{false_positives} false positives in 10,000"
        );
    }

    fn index() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), 8 << 20).unwrap();
        (dir, index)
    }

    /// Every value in the index, and its size.
    fn value_sizes(index: &Index) -> Vec<usize> {
        index
            .tree
            .iter()
            .values()
            .map(|v| v.unwrap().len())
            .collect()
    }

    #[test]
    fn a_run_too_large_for_one_value_is_stored_in_parts_and_read_back_whole() {
        let (_dir, index) = index();
        let runs = Runs::default();
        // Long references: a chunk holds a few, so the header lists many first entries.
        let long = |i: u64| format!("{i:08}-{}", "x".repeat(2000));
        let entries: Vec<Vec<u8>> = (0..2000)
            .map(|i| keys::indexed(keys::REFERENCE, &long(i), Stamp { ms: i, seq: i }))
            .collect();
        runs.add(&index, entries, 0).unwrap();
        assert!(value_sizes(&index).iter().all(|&n| n <= MAX_VALUE_BYTES));
        let parts = index.tree.range(keys::run_headers()).count();
        assert!(parts > 1, "{parts} header values");

        let reloaded = Runs::load(&index).unwrap();
        for i in [0, 777, 1999] {
            assert_eq!(
                reloaded.lookup(&index, keys::REFERENCE, &long(i)).unwrap(),
                [Stamp { ms: i, seq: i }]
            );
        }
        // Merged away, every part goes.
        runs.add(&index, vec![entry("+46700000001", 5)], 10)
            .unwrap();
        assert!(runs.merge(&index, 10 * GRANULE_MS).unwrap());
        let left = Runs::load(&index).unwrap();
        assert_eq!(left.snapshot().len(), 1);
        assert_eq!(
            left.lookup(&index, keys::REFERENCE, &long(777)).unwrap(),
            [Stamp { ms: 777, seq: 777 }]
        );
    }

    #[test]
    fn a_header_cut_short_by_a_crash_is_an_unfinished_run_and_is_cleared() {
        let (_dir, index) = index();
        let long = |i: u64| format!("{i:08}-{}", "y".repeat(2000));
        let entries: Vec<Vec<u8>> = (0..2000)
            .map(|i| keys::indexed(keys::REFERENCE, &long(i), Stamp { ms: i, seq: i }))
            .collect();
        Runs::default().add(&index, entries, 0).unwrap();
        // The crash: the last part never written.
        let last = index
            .tree
            .range(keys::run_headers())
            .keys()
            .last()
            .unwrap()
            .unwrap();
        index.tree.remove(last).unwrap();
        let loaded = Runs::load(&index).unwrap();
        assert!(loaded.snapshot().is_empty());
        assert_eq!(index.tree.range(keys::run_headers()).count(), 0);
        assert_eq!(index.tree.range(keys::run_chunks()).count(), 0);
    }

    fn entry(value: &str, seq: u64) -> Vec<u8> {
        keys::indexed(keys::NUMBER, value, Stamp { ms: seq, seq })
    }

    /// A checkpoint's `count` entries over `numbers` numbers (+4670 and four digits).
    fn spread_entries(checkpoint: u64, count: u64, numbers: u64) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| {
                entry(
                    &format!("+4670{:04}", (i * 7 + checkpoint) % numbers),
                    checkpoint * 1000 + i,
                )
            })
            .collect()
    }

    #[test]
    fn lookups_find_every_entry_across_runs_merges_and_restarts() {
        let (_dir, index) = index();
        let runs = Runs::default();
        for checkpoint in 0..20u64 {
            let entries = spread_entries(checkpoint, 300, 500);
            runs.add(&index, entries, checkpoint * 60_000).unwrap();
        }
        let expected = runs.lookup(&index, keys::NUMBER, "+46700042").unwrap();
        assert!(!expected.is_empty());
        // All 20 runs were written in the first hour; merging them keeps every entry.
        assert!(runs.merge(&index, 2 * GRANULE_MS).unwrap());
        assert_eq!(runs.len(), 1);
        assert_eq!(
            runs.lookup(&index, keys::NUMBER, "+46700042").unwrap(),
            expected
        );
        let reloaded = Runs::load(&index).unwrap();
        assert_eq!(
            reloaded.lookup(&index, keys::NUMBER, "+46700042").unwrap(),
            expected
        );
        assert!(reloaded
            .lookup(&index, keys::NUMBER, "+4670004")
            .unwrap()
            .is_empty());
        // Nothing is left of the merged runs.
        let stored_runs = index.tree.range(keys::run_headers()).count();
        assert_eq!(stored_runs, 1);
    }

    #[test]
    fn expiring_drops_old_runs_and_filters_the_one_that_straddles_the_cutoff() {
        let (_dir, index) = index();
        let runs = Runs::default();
        let h = GRANULE_MS;
        let numbered = |from: u64, to: u64| (from..to).map(|ms| entry("+46701", ms)).collect();
        // Entries are written at or after their verification's creation.
        runs.add(&index, numbered(0, 100), h / 2).unwrap();
        runs.add(&index, numbered(h + 50, h + 100), h + 100)
            .unwrap();
        runs.add(&index, numbered(h + 100, h + 200), h + 200)
            .unwrap();
        runs.merge(&index, 3 * h).unwrap();
        assert_eq!(runs.len(), 2);
        let removed = runs
            .expire(
                &index,
                Stamp {
                    ms: h + 150,
                    seq: 0,
                },
            )
            .unwrap();
        assert_eq!(removed, 200);
        let left = runs.lookup(&index, keys::NUMBER, "+46701").unwrap();
        assert_eq!(left.len(), 50);
        assert_eq!(left.first().map(|s| s.ms), Some(h + 150));
        assert_eq!(Runs::load(&index).unwrap().len(), 1);
    }

    /// Entries rewritten by merges of the current period over checkpoints of these sizes,
    /// and the most runs it held after a checkpoint's merges.
    fn merged_over(checkpoints: &[u64]) -> (u64, usize) {
        let (mut sizes, mut rewritten, mut most) = (Vec::new(), 0, 0);
        for &size in checkpoints {
            sizes.push(size);
            while let Some(from) = tail_to_merge(&sizes) {
                let merged: u64 = sizes.drain(from..).sum();
                rewritten += merged;
                sizes.push(merged);
            }
            most = most.max(sizes.len());
        }
        (rewritten, most)
    }

    #[test]
    fn an_hour_of_checkpoints_rewrites_each_entry_a_few_times_not_once_per_merge() {
        // An hour at about 1,000 verifications a second: 1,000 checkpoints of 7,400
        // entries. Merging all of the hour's runs once there were eight (the merged one
        // and seven new) rewrote the hour so far 142 times: 71 times what was written.
        let checkpoints = vec![7_400u64; 1_000];
        let written: u64 = checkpoints.iter().sum();
        let (rewritten, most) = merged_over(&checkpoints);
        assert!(
            rewritten <= 10 * written,
            "{rewritten} rewritten of {written}"
        );
        assert!(most < MOST_RUNS, "{most} runs");
    }

    proptest::proptest! {
        #[test]
        fn merges_stay_logarithmic_whatever_the_checkpoint_sizes(
            checkpoints in proptest::collection::vec(1u64..20_000, 1..600),
        ) {
            let written: u64 = checkpoints.iter().sum();
            let smallest = checkpoints.iter().copied().min().unwrap_or(1);
            let (rewritten, most) = merged_over(&checkpoints);
            // Each merge at least doubles the largest run it rewrites.
            let bound = (written as f64) * ((written as f64 / smallest as f64).log2() + 1.0);
            proptest::prop_assert!((rewritten as f64) <= bound, "{} > {}", rewritten, bound);
            proptest::prop_assert!(most <= MOST_RUNS, "{} runs", most);
        }
    }

    #[test]
    fn the_current_hour_merges_its_newest_runs_and_lookups_still_find_everything() {
        let (_dir, index) = index();
        let runs = Runs::default();
        let mut most = 0;
        for checkpoint in 0..40u64 {
            let entries = spread_entries(checkpoint, 50, 90);
            runs.add(&index, entries, checkpoint * 1_000).unwrap();
            runs.merge(&index, checkpoint * 1_000).unwrap();
            most = most.max(runs.len());
        }
        assert!(runs.len() < MERGE_AT + 4, "{} runs", runs.len());
        assert!(most < 2 * MERGE_AT, "{most} runs");
        // 40 × 50 entries over 90 numbers: each number's every entry, from every run.
        let found = runs.lookup(&index, keys::NUMBER, "+46700042").unwrap();
        let mut found_ms: Vec<u64> = found.iter().map(|stamp| stamp.ms).collect();
        found_ms.sort_unstable();
        let expected: Vec<u64> = (0..40u64)
            .flat_map(|c| {
                (0..50u64)
                    .filter(move |i| (i * 7 + c) % 90 == 42)
                    .map(move |i| c * 1000 + i)
            })
            .collect();
        assert_eq!(found_ms, expected);
        assert_eq!(
            Runs::load(&index)
                .unwrap()
                .lookup(&index, keys::NUMBER, "+46700042")
                .unwrap(),
            found
        );
    }
}
