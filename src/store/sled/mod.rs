//! The embedded engine: a write-ahead log in front of a sled index.
//!
//! An event is acknowledged once the commit thread has written it to the write-ahead log
//! and synced it (one `fsync` per batch of however many events queued up) and published it
//! to the active memtable, where reads see it at once. The checkpointer moves full
//! memtables into the sled index in the background, one atomic batch each, and deletes the
//! log segments they covered. After a crash, the log is replayed from the last
//! checkpoint. Records are kept compactly (codec.rs) and written to sled once per
//! checkpoint rather than once per event, which is what makes this engine fast and small.
//!
//! On disk, under `store.path`: `index/` (sled) and `wal/` (log segments). A folder
//! written by verigate 0.1 (sled files directly in `store.path`) is refused with the
//! command that migrates it (legacy.rs).

mod checkpoint;
mod codec;
mod commit;
mod expire;
mod index;
mod keys;
pub mod legacy;
mod memtable;
mod merge;
mod reads;
mod runs;
mod shared;
mod wal;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex, PoisonError, RwLock,
    },
    thread::JoinHandle,
    time::Duration,
};

use arc_swap::ArcSwapOption;
use chrono::{DateTime, Utc};

use self::{
    commit::{Committer, Job},
    index::{Index, CHECKPOINT, FORMAT, FORMAT_VERSION, LAST_MS},
    keys::Stamp,
    memtable::Memtable,
    wal::WalWriter,
};
use super::{
    Deleted, EventIdentity, EventQuery, FirstDelivery, GroupStats, NewEvent, Page, RecordOutcome,
    StatsQuery, StoreError, StoreHealth, StoreObserver, StoreOptions, StoredEvent,
    VerificationQuery, VerificationRecord, VerificationStore,
};
use shared::Shared;

pub use codec::CodecError;

const INDEX_DIR: &str = "index";
const WAL_DIR: &str = "wal";
/// Named state lives under this prefix among the index's named values.
const STATE_PREFIX: &str = "state/";
/// How long retention and shutdown wait for pending checkpoints.
const DRAIN_WAIT: Duration = Duration::from_secs(60);

/// The embedded store. See the module docs.
pub struct SledStore {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl SledStore {
    /// Opens (or creates) the store at `options.path` and replays its log.
    pub fn open(
        options: &StoreOptions,
        observer: Arc<dyn StoreObserver>,
    ) -> Result<Self, StoreError> {
        let root = options.path.clone();
        legacy::refuse_unmigrated(&root)?;
        let index_dir = index::folder_in_use(&root, INDEX_DIR);
        let wal_dir = root.join(WAL_DIR);
        std::fs::create_dir_all(&wal_dir)
            .map_err(|e| StoreError::Failed(format!("cannot create {}: {e}", wal_dir.display())))?;
        let index = Index::open(&index_dir, options.cache_bytes)?;
        index::remove_other_folders(&root, INDEX_DIR, &index_dir);
        check_format(&index)?;
        let symbols = index.symbols()?;
        let runs = runs::Runs::load(&index)?;
        let checkpoint = index.meta_u64(CHECKPOINT)?;
        let last_ms = index.meta_u64(LAST_MS)?;
        let shared = Arc::new(Shared {
            root,
            wal_dir,
            index_dir: Mutex::new(index_dir),
            folder_held: AtomicBool::new(false),
            cache_bytes: options.cache_bytes,
            layers: RwLock::default(),
            index: ArcSwapOption::from_pointee(index),
            symbols: RwLock::new(symbols),
            runs,
            health: Mutex::default(),
            signal: (Mutex::new(()), Condvar::new()),
            stopping: AtomicBool::new(false),
            retention_cutoff_ms: AtomicU64::new(0),
            observer,
        });
        let (next_seq, last_ms) = replay(&shared, checkpoint, last_ms)?;
        let writer = WalWriter::create(&shared.wal_dir, next_seq)
            .map_err(|e| StoreError::Failed(format!("cannot start the write-ahead log: {e}")))?;
        let (jobs, queue) = mpsc::channel();
        let committer = Committer {
            shared: Arc::clone(&shared),
            freeze_events: options.checkpoint_events.max(1),
            wal: Some(writer),
            segments: wal::SegmentPreparer::start(&shared.wal_dir),
            next_seq,
            last_ms,
            last_probe: None,
        };
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| StoreError::Failed(format!("cannot start {name}: {e}")))
        };
        let checkpointing = Arc::clone(&shared);
        let threads = vec![
            spawn("verigate-commit", Box::new(move || committer.run(&queue)))?,
            spawn(
                "verigate-checkpoint",
                Box::new(move || checkpoint::run(&checkpointing)),
            )?,
        ];
        Ok(Self {
            shared,
            jobs,
            threads: Mutex::new(threads),
        })
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable("the store is shut down".into()))
    }

    /// Freezes what is in memory and waits until it is all in the index.
    async fn checkpoint_now(&self) -> Result<(), StoreError> {
        let (reply, frozen) = tokio::sync::oneshot::channel();
        self.send(Job::Freeze { reply })?;
        frozen
            .await
            .map_err(|_| StoreError::Unavailable("the store is shut down".into()))?;
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            if shared.wait_drained(DRAIN_WAIT) {
                Ok(())
            } else {
                Err(StoreError::Unavailable(format!(
                    "checkpoints did not complete: {}",
                    shared.health_reason().unwrap_or_default()
                )))
            }
        })
        .await
    }

    /// The store folder.
    pub fn path(&self) -> &Path {
        &self.shared.root
    }
}

/// A new index gets the current format; anything else must already have it.
fn check_format(index: &Index) -> Result<(), StoreError> {
    match index.meta(FORMAT)? {
        Some(format) if format.as_ref() == FORMAT_VERSION => Ok(()),
        Some(format) => Err(StoreError::NeedsMigration(format!(
            "the store has format {}, which this verigate does not know (written by a newer version?)",
            String::from_utf8_lossy(&format)
        ))),
        None if index.tree.is_empty() => {
            index
                .tree
                .insert(keys::meta(FORMAT), FORMAT_VERSION)
                .map_err(index::failed)?;
            index.flush()
        }
        None => Err(StoreError::NeedsMigration(
            "a migration of this store was interrupted; run `verigate store migrate` to finish it"
                .into(),
        )),
    }
}

/// Replays the log from the checkpoint into a frozen memtable (checkpointed soon after
/// start). Returns the next sequence number and the latest write time.
fn replay(shared: &Arc<Shared>, checkpoint: u64, last_ms: u64) -> Result<(u64, u64), StoreError> {
    let io = |e: std::io::Error| StoreError::Failed(format!("reading the write-ahead log: {e}"));
    let mut memtable = Memtable::default();
    let (mut max_seq, mut max_ms) = (checkpoint, last_ms);
    let segments = wal::segments(&shared.wal_dir).map_err(io)?;
    let newest = segments.last().map(|(first, _)| *first);
    for (first, path) in &segments {
        let mut batches = Vec::new();
        let end = wal::read_segment(path, |payload| batches.push(payload.to_vec())).map_err(io)?;
        for payload in batches {
            let entries = codec::decode_wal_batch(&payload)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
            let entries: Vec<_> = entries
                .into_iter()
                .filter(|e| e.event.stamp.seq > checkpoint)
                .collect();
            for e in &entries {
                max_seq = max_seq.max(e.event.stamp.seq);
                max_ms = max_ms.max(e.event.stamp.ms);
            }
            merge::replay(shared, &mut memtable, entries, checkpoint)?;
        }
        if let wal::SegmentEnd::Torn { at } = end {
            let what = if Some(*first) == newest {
                "a write that was never acknowledged"
            } else {
                "a write that failed and was never acknowledged"
            };
            tracing::warn!(segment = %path.display(), at, "the write-ahead log ends in {what}; ignored");
        }
    }
    if !memtable.is_empty() {
        tracing::info!(
            events = memtable.events.len(),
            "replayed the write-ahead log"
        );
        memtable.covers_upto = max_seq;
        shared.write_layers().frozen.push_back(Arc::new(memtable));
    } else if let Err(err) = wal::delete_checkpointed(&shared.wal_dir, checkpoint) {
        tracing::warn!(error.message = %err, "deleting checkpointed log segments failed");
    }
    Ok((max_seq + 1, max_ms))
}

/// Runs blocking index work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Failed(format!("a store task failed: {e}"))))
}

#[async_trait::async_trait]
impl VerificationStore for SledStore {
    async fn first_delivery(
        &self,
        identity: &EventIdentity,
    ) -> Result<Option<FirstDelivery>, StoreError> {
        // In memory or a cached index read: microseconds, so no hop to a blocking thread.
        Ok(self
            .shared
            .lookup(&identity.id)?
            .and_then(|v| v.first_delivery(identity)))
    }

    async fn record(&self, event: NewEvent) -> Result<RecordOutcome, StoreError> {
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.send(Job::Record {
            event: Box::new(event),
            reply,
        })?;
        outcome
            .await
            .map_err(|_| StoreError::Unavailable("the store is shut down".into()))?
    }

    async fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        // Recent verifications (a result just recorded, say) are in memory: no hop.
        if let Some(v) = self.shared.read_layers().lookup(id) {
            return Ok((v.stamp() >= self.shared.retention_cutoff()).then(|| v.record.clone()));
        }
        let (shared, id) = (Arc::clone(&self.shared), id.to_owned());
        blocking(move || shared.verification(&id)).await
    }

    async fn verifications(
        &self,
        query: VerificationQuery,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.list(&query)).await
    }

    /// A number's few records, from memory or cached index reads: no hop to a blocking
    /// thread, as for the first delivery.
    async fn recent_of_number(
        &self,
        number: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<VerificationRecord>, StoreError> {
        self.shared.recent_of_number(number, since, until, limit)
    }

    async fn stats(&self, query: StatsQuery) -> Result<Vec<GroupStats>, StoreError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.stats(&query)).await
    }

    async fn events(&self, query: EventQuery) -> Result<Page<StoredEvent>, StoreError> {
        let shared = Arc::clone(&self.shared);
        blocking(move || shared.events(&query)).await
    }

    async fn delete_before(&self, cutoff: DateTime<Utc>) -> Result<Deleted, StoreError> {
        let cutoff_ms = Stamp::floor(cutoff).ms;
        // Everything older than the cutoff is moved into the index to be deleted (and
        // counted) there; from the cutoff on, checkpoints skip what is older and reads
        // hide it.
        self.checkpoint_now().await?;
        self.shared
            .retention_cutoff_ms
            .fetch_max(cutoff_ms, Ordering::SeqCst);
        let shared = Arc::clone(&self.shared);
        blocking(move || expire::delete_before(&shared, checkpoint::cutoff_of(cutoff_ms))).await
    }

    async fn load_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let index = self.shared.index()?;
        let name = format!("{STATE_PREFIX}{name}");
        blocking(move || Ok(index.meta(&name)?.map(|v| v.to_vec()))).await
    }

    async fn save_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let index = self.shared.index()?;
        let name = format!("{STATE_PREFIX}{name}");
        blocking(move || {
            index
                .tree
                .insert(keys::meta(&name), value)
                .map_err(index::failed)?;
            index.flush()
        })
        .await
    }

    fn health(&self) -> StoreHealth {
        match self.shared.health_reason() {
            None => StoreHealth::Ready,
            Some(why) => StoreHealth::Degraded(why),
        }
    }

    fn size_on_disk(&self) -> Option<u64> {
        Some(dir_size(&self.shared.root))
    }

    fn free_space(&self) -> Option<u64> {
        // What an unprivileged writer may still use (not the root-reserved blocks).
        let stats = rustix::fs::statvfs(&self.shared.root).ok()?;
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        let (reply, stopped) = tokio::sync::oneshot::channel();
        if self.send(Job::Stop { reply }).is_ok() {
            let _ = stopped.await;
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake_checkpointer();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        let shared = Arc::clone(&self.shared);
        blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
            if shared.read_layers().frozen.is_empty() {
                // Everything is in the index: the log can go entirely.
                for (_, path) in wal::segments(&shared.wal_dir).unwrap_or_default() {
                    let _ = std::fs::remove_file(path);
                }
            }
            // Released, so another process (a restarted verigate) can open the store now.
            match shared.index.swap(None) {
                Some(index) => index.flush(),
                None => Ok(()),
            }
        })
        .await
    }
}

/// Dropping the store stops it as `shutdown` does (what is in memory is checkpointed) and
/// waits for that, so the folder can be opened again right after.
impl Drop for SledStore {
    fn drop(&mut self) {
        let (reply, _) = tokio::sync::oneshot::channel();
        let _ = self.jobs.send(Job::Stop { reply });
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake_checkpointer();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Runs every decoder of stored bytes on `bytes`, for the fuzz target
/// (fuzz/fuzz_targets/record_decode.rs): none may panic, and a record that decodes must
/// survive being encoded and decoded again unchanged (compared as bytes: garbage can
/// decode to NaN, which is not equal to itself).
#[doc(hidden)]
pub fn fuzz_decoders(bytes: &[u8]) {
    let symbols = codec::fuzzing_symbols();
    if let Ok(v) = codec::decode_record(bytes, Some(&symbols)) {
        let mut once = Vec::new();
        codec::encode_record(&v, &mut codec::Inline, &mut once);
        let back = codec::decode_record(&once, None).expect("a re-encoded record decodes");
        let mut twice = Vec::new();
        codec::encode_record(&back, &mut codec::Inline, &mut twice);
        assert_eq!(once, twice, "a record changed on its way through the codec");
    }
    let _ = codec::with_stats_row(bytes, &symbols, |_| ());
    let _ = codec::record_stamp(bytes);
    if let Ok(block) = codec::decode_block(bytes) {
        for item in block.iter() {
            let _ = codec::decode_event(item);
        }
    }
    if let Ok(entries) = codec::decode_wal_batch(bytes) {
        let once = codec::encode_wal_batch(&entries);
        let back = codec::decode_wal_batch(&once).expect("a re-encoded log batch decodes");
        assert_eq!(
            codec::encode_wal_batch(&back),
            once,
            "a log batch changed on its way"
        );
    }
}

/// Bytes under `path`, recursively.
pub fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}
