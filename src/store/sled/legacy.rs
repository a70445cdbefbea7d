//! Stores written by verigate 0.1: one sled database directly in `store.path`, with trees
//! of JSON records (`records`), raw events (`events`), duplicate-detection entries
//! (`dedup`), indexes and named state (`meta`).
//!
//! The service refuses to open such a folder and names the command that converts it,
//! `verigate store migrate`, which rewrites it into the current layout in place:
//! - the old database is only read until the new store is complete, counted and flushed;
//! - progress is saved with every batch, so an interrupted migration resumes where it
//!   stopped when the command runs again;
//! - only then are the old files deleted.

use std::path::Path;

use serde::Deserialize;

use super::{
    codec::{self, Accepted, LoggedEvent, StoredVerification, Symbols},
    index::{failed, open_sled, Index, CHECKPOINT, FORMAT, FORMAT_VERSION, LAST_MS},
    keys::{self, Stamp},
    runs::Runs,
    INDEX_DIR, STATE_PREFIX,
};
use crate::store::{StoreError, StoredEvent, VerificationRecord};

/// Files sled 0.34 keeps in its folder.
const LEGACY_CONF: &str = "conf";
const LEGACY_FILES: [&str; 2] = ["conf", "db"];
const LEGACY_DIRS: [&str; 1] = ["blobs"];
/// Verifications per migration batch (one atomic write with the resume position).
const BATCH: usize = 2_000;
const RECORDS_PER_BLOCK: usize = 32;
const EVENTS_PER_BLOCK: usize = 512;
/// A progress line every this many verifications or events.
pub const PROGRESS_EVERY: usize = 10_000;

const RESUME_RECORDS: &str = "migration/records";
const RESUME_EVENTS: &str = "migration/events";
const MIGRATED_RECORDS: &str = "migration/records_done";
const MIGRATED_EVENTS: &str = "migration/events_done";

/// Whether `path` holds a store in the 0.1 layout (or the remains of one).
pub fn is_legacy(path: &Path) -> bool {
    path.join(LEGACY_CONF).is_file()
}

/// Refuses a folder that must be migrated before this version can use it.
pub fn refuse_unmigrated(path: &Path) -> Result<(), StoreError> {
    if is_legacy(path) {
        return Err(StoreError::NeedsMigration(format!(
            "the store at {} was written by verigate 0.1 and must be converted first: stop verigate and run `verigate store migrate` (it converts the folder in place, resumes if interrupted, and deletes the old files only once the new store is complete)",
            path.display()
        )));
    }
    Ok(())
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub verifications: u64,
    pub events: u64,
    pub states: u64,
    /// There was nothing to migrate (already in the current layout).
    pub already_current: bool,
}

#[derive(Deserialize)]
struct LegacyFirstDelivery {
    seq: u64,
}

/// Converts the 0.1 store at `path` into the current layout. `progress` gets a line now
/// and then. Safe to run again after an interruption, or on a store already converted.
pub fn migrate(
    path: &Path,
    cache_bytes: u64,
    progress: impl FnMut(&str),
) -> Result<MigrationReport, StoreError> {
    migrate_with(path, cache_bytes, Pace::default(), progress)
}

/// How a migration proceeds: records per batch, and (for tests of resuming) a number of
/// batches after which it stops as if interrupted.
#[derive(Debug, Clone, Copy)]
struct Pace {
    batch: usize,
    batches_left: Option<usize>,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            batch: BATCH,
            batches_left: None,
        }
    }
}

impl Pace {
    fn next_batch(&mut self) -> Result<(), StoreError> {
        match &mut self.batches_left {
            Some(0) => Err(StoreError::Unavailable(
                "the migration was interrupted".into(),
            )),
            Some(left) => {
                *left -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// Opens the old store, only to read it.
fn open_old(path: &Path) -> Result<sled::Db, StoreError> {
    open_sled(&sled::Config::new().path(path).flush_every_ms(None)).map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot open the old store at {} (is verigate running on it?): {e}",
            path.display()
        ))
    })
}

fn migrate_with(
    path: &Path,
    cache_bytes: u64,
    mut pace: Pace,
    mut progress: impl FnMut(&str),
) -> Result<MigrationReport, StoreError> {
    if !is_legacy(path) {
        return Ok(MigrationReport {
            already_current: true,
            ..Default::default()
        });
    }
    let old = open_old(path)?;
    let index = Index::open(&path.join(INDEX_DIR), cache_bytes)?;
    let mut report = MigrationReport::default();
    if index.meta(FORMAT)?.is_none() {
        let mut symbols = index.symbols()?;
        let runs = Runs::load(&index)?;
        let mut max = (index.meta_u64(CHECKPOINT)?, index.meta_u64(LAST_MS)?);
        report.verifications = migrate_records(
            &old,
            &index,
            &runs,
            &mut symbols,
            &mut max,
            &mut pace,
            &mut progress,
        )?;
        runs.merge(&index, u64::MAX)?;
        report.events = migrate_events(&old, &index, &mut max, &mut pace, &mut progress)?;
        report.states = migrate_state(&old, &index)?;
        verify_counts(&old, &index)?;
        let mut done = sled::Batch::default();
        done.insert(keys::meta(CHECKPOINT), &max.0.to_be_bytes()[..]);
        done.insert(keys::meta(LAST_MS), &max.1.to_be_bytes()[..]);
        done.insert(keys::meta(FORMAT), FORMAT_VERSION);
        index.tree.apply_batch(done).map_err(failed)?;
        index.flush()?;
        progress(&format!(
            "converted {} verifications and {} raw events; removing the old files",
            report.verifications, report.events
        ));
    } else {
        progress("the new store is complete; removing the old files");
    }
    drop(old);
    drop(index);
    remove_legacy_files(path)?;
    Ok(report)
}

fn legacy_tree(old: &sled::Db, name: &str) -> Result<sled::Tree, StoreError> {
    old.open_tree(name).map_err(failed)
}

fn decode_json<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("an old {what} does not decode: {e}")))
}

/// Verifications, in the old time index's order (which is the new order too).
fn migrate_records(
    old: &sled::Db,
    index: &Index,
    runs: &Runs,
    symbols: &mut Symbols,
    max: &mut (u64, u64),
    pace: &mut Pace,
    progress: &mut impl FnMut(&str),
) -> Result<u64, StoreError> {
    let (by_time, records, dedup) = (
        legacy_tree(old, "by_time")?,
        legacy_tree(old, "records")?,
        legacy_tree(old, "dedup")?,
    );
    let total = records.len();
    let resume = index.meta(RESUME_RECORDS)?.map(|k| k.to_vec());
    let mut done = index.meta_u64(MIGRATED_RECORDS)?;
    let mut range = match &resume {
        Some(after) => by_time.range::<&[u8], _>((
            std::ops::Bound::Excluded(after.as_slice()),
            std::ops::Bound::Unbounded,
        )),
        None => by_time.iter(),
    };
    if resume.is_some() {
        progress(&format!("resuming after {done} of {total} verifications"));
    }
    loop {
        let mut chunk = Vec::with_capacity(pace.batch);
        let mut last_key = None;
        pace.next_batch()?;
        for entry in range.by_ref().take(pace.batch) {
            let (key, _) = entry.map_err(failed)?;
            let id = String::from_utf8_lossy(key.get(16..).unwrap_or_default()).into_owned();
            last_key = Some(key);
            let Some(json) = records.get(id.as_bytes()).map_err(failed)? else {
                continue;
            };
            let record: VerificationRecord = decode_json(&json, "record")?;
            let accepted = accepted_events(&dedup, &record.id)?;
            chunk.push(StoredVerification { record, accepted });
        }
        let Some(last_key) = last_key else {
            return Ok(done);
        };
        let mut batch = sled::Batch::default();
        let mut entries = Vec::new();
        for block in chunk.chunks(RECORDS_PER_BLOCK) {
            let encoded: Vec<Vec<u8>> = block
                .iter()
                .map(|v| {
                    let mut out = Vec::new();
                    codec::encode_record(v, symbols, &mut out);
                    out
                })
                .collect();
            batch.insert(
                keys::record_block(block[0].stamp()),
                codec::encode_block(encoded.iter().map(Vec::as_slice)),
            );
            for v in block {
                let stamp = v.stamp();
                max.0 = max.0.max(v.record.seq);
                max.1 = max.1.max(stamp.ms);
                batch.insert(keys::id(&v.record.id), &stamp.bytes()[..]);
                if let Some(number) = &v.record.number {
                    entries.push(keys::indexed(keys::NUMBER, number, stamp));
                }
                if let Some(reference) = &v.record.reference {
                    entries.push(keys::indexed(keys::REFERENCE, reference, stamp));
                }
            }
        }
        // Written before the resume position: a crash in between only repeats this batch.
        let written_at = chunk.iter().map(|v| v.stamp().ms).max().unwrap_or(0);
        runs.add(index, entries, written_at)?;
        for (n, text) in symbols.unpersisted() {
            batch.insert(keys::symbol(n), text.as_bytes());
        }
        let before = done;
        done += chunk.len() as u64;
        batch.insert(keys::meta(RESUME_RECORDS), last_key.to_vec());
        batch.insert(keys::meta(MIGRATED_RECORDS), &done.to_be_bytes()[..]);
        batch.insert(keys::meta(CHECKPOINT), &max.0.to_be_bytes()[..]);
        batch.insert(keys::meta(LAST_MS), &max.1.to_be_bytes()[..]);
        index.tree.apply_batch(batch).map_err(failed)?;
        index.flush()?;
        symbols.mark_persisted(symbols.len());
        if before / PROGRESS_EVERY as u64 != done / PROGRESS_EVERY as u64 || done == total as u64 {
            progress(&format!("verifications: {done} of {total}"));
        }
    }
}

/// The accepted events of one verification, from the old duplicate-detection entries
/// (`<id> 0x00 <event type> 0x00 <discriminator>` → first delivery).
fn accepted_events(dedup: &sled::Tree, id: &str) -> Result<Vec<Accepted>, StoreError> {
    let mut prefix = id.as_bytes().to_vec();
    prefix.push(0);
    let mut accepted = Vec::new();
    for entry in dedup.scan_prefix(&prefix) {
        let (key, value) = entry.map_err(failed)?;
        let rest = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        let (event, discriminator) = rest.split_once('\0').unwrap_or((rest.as_str(), ""));
        let first: LegacyFirstDelivery = decode_json(&value, "duplicate-detection entry")?;
        accepted.push(Accepted {
            event: event.to_owned(),
            discriminator: discriminator.to_owned(),
            seq: first.seq,
        });
    }
    accepted.sort_by_key(|a| a.seq);
    Ok(accepted)
}

fn migrate_events(
    old: &sled::Db,
    index: &Index,
    max: &mut (u64, u64),
    pace: &mut Pace,
    progress: &mut impl FnMut(&str),
) -> Result<u64, StoreError> {
    let events = legacy_tree(old, "events")?;
    let total = events.len();
    let resume = index.meta(RESUME_EVENTS)?.map(|k| k.to_vec());
    let mut done = index.meta_u64(MIGRATED_EVENTS)?;
    let mut range = match &resume {
        Some(after) => events.range::<&[u8], _>((
            std::ops::Bound::Excluded(after.as_slice()),
            std::ops::Bound::Unbounded,
        )),
        None => events.iter(),
    };
    loop {
        let mut chunk = Vec::with_capacity(pace.batch);
        let mut last_key = None;
        pace.next_batch()?;
        for entry in range.by_ref().take(pace.batch) {
            let (key, json) = entry.map_err(failed)?;
            let stamp = Stamp::from_bytes(&key)
                .ok_or_else(|| StoreError::Corrupt("an old event key is malformed".into()))?;
            let event: StoredEvent = decode_json(&json, "raw event")?;
            max.0 = max.0.max(stamp.seq);
            max.1 = max.1.max(stamp.ms);
            chunk.push(LoggedEvent {
                stamp,
                received_at: event.received_at,
                app_key: event.app_key,
                event: event.event,
                id: event.id,
                body: event.body.get().to_owned(),
            });
            last_key = Some(key);
        }
        let Some(last_key) = last_key else {
            return Ok(done);
        };
        let mut batch = sled::Batch::default();
        for block in chunk.chunks(EVENTS_PER_BLOCK) {
            let encoded: Vec<Vec<u8>> = block
                .iter()
                .map(|e| {
                    let mut out = Vec::new();
                    codec::encode_event(e, &mut out);
                    out
                })
                .collect();
            batch.insert(
                keys::event_block(block[0].stamp),
                codec::encode_block(encoded.iter().map(Vec::as_slice)),
            );
        }
        let before = done;
        done += chunk.len() as u64;
        batch.insert(keys::meta(RESUME_EVENTS), last_key.to_vec());
        batch.insert(keys::meta(MIGRATED_EVENTS), &done.to_be_bytes()[..]);
        batch.insert(keys::meta(CHECKPOINT), &max.0.to_be_bytes()[..]);
        batch.insert(keys::meta(LAST_MS), &max.1.to_be_bytes()[..]);
        index.tree.apply_batch(batch).map_err(failed)?;
        index.flush()?;
        if before / PROGRESS_EVERY as u64 != done / PROGRESS_EVERY as u64 || done == total as u64 {
            progress(&format!("raw events: {done} of {total}"));
        }
    }
}

/// Named state (the policy's quarantines), as is.
fn migrate_state(old: &sled::Db, index: &Index) -> Result<u64, StoreError> {
    let meta = legacy_tree(old, "meta")?;
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for entry in meta.iter() {
        let (name, value) = entry.map_err(failed)?;
        let name = String::from_utf8_lossy(&name);
        batch.insert(keys::meta(&format!("{STATE_PREFIX}{name}")), value);
        n += 1;
    }
    index.tree.apply_batch(batch).map_err(failed)?;
    Ok(n)
}

/// Nothing is deleted unless everything made it across.
fn verify_counts(old: &sled::Db, index: &Index) -> Result<(), StoreError> {
    let records = legacy_tree(old, "records")?.len() as u64;
    let events = legacy_tree(old, "events")?.len() as u64;
    let (migrated_records, migrated_events) = (
        index.meta_u64(MIGRATED_RECORDS)?,
        index.meta_u64(MIGRATED_EVENTS)?,
    );
    if migrated_records != records || migrated_events != events {
        return Err(StoreError::Corrupt(format!(
            "the migration counted {migrated_records} of {records} verifications and {migrated_events} of {events} raw events; the old store is kept"
        )));
    }
    Ok(())
}

fn remove_legacy_files(path: &Path) -> Result<(), StoreError> {
    let io = |e: std::io::Error| StoreError::Failed(format!("removing the old files: {e}"));
    for dir in LEGACY_DIRS {
        let dir = path.join(dir);
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
    }
    let entries = std::fs::read_dir(path).map_err(io)?;
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // sled's snapshot files are `snap.<hex>`; `conf` goes last, so a migration that
        // stops here is still seen as unfinished.
        if name.starts_with("snap.")
            || (LEGACY_FILES.contains(&name.as_str()) && name != LEGACY_CONF)
        {
            std::fs::remove_file(entry.path()).map_err(io)?;
        }
    }
    std::fs::remove_file(path.join(LEGACY_CONF)).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        EventQuery, Store, StoreOptions, Unobserved, VerificationFilter, VerificationQuery,
    };
    use chrono::{DateTime, Utc};

    fn unpack_v1(dir: &Path) {
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/store-v1/store-v1.tar.gz"
        );
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("tar")
            .args(["xzf", fixture, "-C"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Everything a migrated store answers, for comparing two of them.
    async fn contents(path: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
        let store = Store::open(&StoreOptions::at(path), std::sync::Arc::new(Unobserved)).unwrap();
        let all =
            VerificationQuery::between(DateTime::<Utc>::UNIX_EPOCH, DateTime::<Utc>::MAX_UTC, 1000);
        let records = store.verifications(all.clone()).await.unwrap().items;
        let events = store
            .events(EventQuery {
                since: DateTime::<Utc>::UNIX_EPOCH,
                until: DateTime::<Utc>::MAX_UTC,
                after: None,
                limit: 1000,
            })
            .await
            .unwrap()
            .items;
        let numbered = store
            .verifications(VerificationQuery {
                filter: VerificationFilter {
                    number: Some("+46701039595".into()),
                    ..Default::default()
                },
                ..all
            })
            .await
            .unwrap()
            .items;
        store.shutdown().await.unwrap();
        (
            records
                .iter()
                .map(|r| serde_json::to_string(r).unwrap())
                .collect(),
            events
                .iter()
                .map(|e| serde_json::to_string(e).unwrap())
                .collect(),
            numbered.iter().map(|r| r.id.clone()).collect(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupted_migration_resumes_to_the_same_store_as_an_uninterrupted_one() {
        let whole = tempfile::tempdir().unwrap();
        unpack_v1(whole.path());
        let report = migrate(whole.path(), 8 << 20, |_| {}).unwrap();
        assert_eq!((report.verifications, report.events), (28, 51));

        let resumed = tempfile::tempdir().unwrap();
        unpack_v1(resumed.path());
        // Stopped after 3 batches of 5 records, then again after 6 more (now among the
        // raw events): the old store is intact and still refused each time.
        for stop_after in [3, 6] {
            let pace = Pace {
                batch: 5,
                batches_left: Some(stop_after),
            };
            let stopped = migrate_with(resumed.path(), 8 << 20, pace, |_| {});
            assert!(stopped.is_err());
            assert!(is_legacy(resumed.path()));
            assert!(matches!(
                Store::open(
                    &StoreOptions::at(resumed.path()),
                    std::sync::Arc::new(Unobserved)
                ),
                Err(StoreError::NeedsMigration(_))
            ));
        }
        let mut lines = Vec::new();
        let finished = migrate_with(
            resumed.path(),
            8 << 20,
            Pace {
                batch: 5,
                batches_left: None,
            },
            |l| lines.push(l.to_owned()),
        )
        .unwrap();
        assert!(lines.iter().any(|l| l.starts_with("resuming")), "{lines:?}");
        assert!(!is_legacy(resumed.path()));
        assert_eq!(finished.events, 51);
        let expected = contents(whole.path()).await;
        assert_eq!(expected.0.len(), 28);
        assert_eq!(contents(resumed.path()).await, expected);
    }
}
