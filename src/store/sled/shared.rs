//! What the commit thread, the checkpointer and readers share: the memtables, the index
//! (swapped out while it is reopened), the symbol table, the index runs, health, and the
//! signal by which the checkpointer is woken and reports back.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Condvar, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;

use super::{
    checkpoint,
    codec::{StoredVerification, Symbols},
    index::{self, Index},
    keys::Stamp,
    memtable::{Layers, Memtable},
    runs, wal,
};
use crate::store::{StoreError, StoreObserver};

/// What the commit thread, the checkpointer and readers share.
pub struct Shared {
    pub(super) root: PathBuf,
    pub(super) wal_dir: PathBuf,
    /// The index folder in use (another after a stuck index was left behind).
    pub(super) index_dir: Mutex<PathBuf>,
    /// Whether a failed index that could not be closed still holds that folder.
    pub(super) folder_held: AtomicBool,
    pub(super) cache_bytes: u64,
    pub(super) layers: RwLock<Layers>,
    pub(super) index: ArcSwapOption<Index>,
    pub(super) symbols: RwLock<Symbols>,
    /// The number and reference indexes.
    pub(super) runs: runs::Runs,
    pub(super) health: Mutex<Health>,
    /// Wakes the checkpointer; also signalled when a checkpoint completes.
    pub(super) signal: (Mutex<()>, Condvar),
    pub(super) stopping: AtomicBool,
    /// Nothing first seen before this (ms) is kept: retention's cutoff.
    pub(super) retention_cutoff_ms: AtomicU64,
    pub(super) observer: Arc<dyn StoreObserver>,
}

#[derive(Debug, Default)]
pub struct Health {
    wal: Option<String>,
    index: Option<String>,
}

impl Shared {
    pub(super) fn read_layers(&self) -> RwLockReadGuard<'_, Layers> {
        self.layers.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write_layers(&self) -> RwLockWriteGuard<'_, Layers> {
        self.layers.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn read_symbols(&self) -> RwLockReadGuard<'_, Symbols> {
        self.symbols.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn write_symbols(&self) -> RwLockWriteGuard<'_, Symbols> {
        self.symbols.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn index(&self) -> Result<Arc<Index>, StoreError> {
        self.index
            .load_full()
            .ok_or_else(|| StoreError::Unavailable("the index is being reopened".into()))
    }

    /// The latest version of a verification: in memory, else in the index.
    pub(super) fn lookup(&self, id: &str) -> Result<Option<Arc<StoredVerification>>, StoreError> {
        if let Some(v) = self.read_layers().lookup(id) {
            return Ok(Some(v));
        }
        self.lookup_index(id)
    }

    pub(super) fn lookup_index(
        &self,
        id: &str,
    ) -> Result<Option<Arc<StoredVerification>>, StoreError> {
        let index = self.index()?;
        let Some(stamp) = index.stamp_of_id(id)? else {
            return Ok(None);
        };
        let found = index.record_at(stamp, &self.read_symbols())?;
        Ok(found
            .filter(|v| v.stamp() >= self.retention_cutoff())
            .map(Arc::new))
    }

    pub(super) fn retention_cutoff(&self) -> Stamp {
        checkpoint::cutoff_of(self.retention_cutoff_ms.load(Ordering::SeqCst))
    }

    pub(super) fn health_reason(&self) -> Option<String> {
        let health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        match (&health.wal, &health.index) {
            (None, None) => None,
            (Some(w), None) => Some(w.clone()),
            (None, Some(i)) => Some(i.clone()),
            (Some(w), Some(i)) => Some(format!("{w}; {i}")),
        }
    }

    pub(super) fn set_wal_health(&self, why: Option<String>) {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .wal = why;
    }

    pub(super) fn set_index_health(&self, why: Option<String>) {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .index = why;
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(super) fn wake_checkpointer(&self) {
        let _guard = self.signal.0.lock().unwrap_or_else(PoisonError::into_inner);
        self.signal.1.notify_all();
    }

    /// The oldest frozen memtable, waiting for one; `None` once stopping with none left.
    pub(super) fn next_frozen(&self) -> Option<Arc<Memtable>> {
        let mut guard = self.signal.0.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(m) = self.read_layers().frozen.front() {
                return Some(Arc::clone(m));
            }
            if self.is_stopping() {
                return None;
            }
            guard = self
                .signal
                .1
                .wait_timeout(guard, Duration::from_secs(1))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// After a checkpoint: the memtable leaves memory and its log segments go.
    pub(super) fn checkpointed(&self, memtable: &Arc<Memtable>) {
        {
            let mut layers = self.write_layers();
            if layers
                .frozen
                .front()
                .is_some_and(|m| Arc::ptr_eq(m, memtable))
            {
                layers.frozen.pop_front();
            }
        }
        if let Err(err) = wal::delete_checkpointed(&self.wal_dir, memtable.covers_upto) {
            tracing::warn!(error.message = %err, "deleting checkpointed log segments failed; retried at the next checkpoint");
        }
        self.wake_checkpointer();
    }

    /// Sleeps until the checkpointer signals or `at_most` passes.
    pub(super) fn wait_for_change(&self, at_most: Duration) {
        let guard = self.signal.0.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = self.signal.1.wait_timeout(guard, at_most);
    }

    /// Waits until no frozen memtable is left (or `timeout`).
    pub(super) fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.signal.0.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.read_layers().frozen.is_empty() {
                return true;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            guard = self
                .signal
                .1
                .wait_timeout(guard, left.min(Duration::from_millis(100)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A failed index holds its folder (a lock) for as long as the process lives: the
    /// store carries on in a copy of it, which holds what a restart would have found.
    fn continue_in_copy(&self) -> Result<(), String> {
        let mut dir = self
            .index_dir
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let copy = index::continue_in_copy(&self.root, &dir).map_err(|err| {
            let why = format!("the failed index cannot be reopened in place, and {err}");
            self.set_index_health(Some(why.clone()));
            why
        })?;
        tracing::warn!(
            stuck = %dir.display(),
            copy = %copy.display(),
            "carrying on in a copy of the failed index's folder"
        );
        *dir = copy;
        self.folder_held.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Leaves the failed index behind and opens its data again: sled stays failed after
    /// an I/O error.
    pub(super) fn reopen_index(&self) -> Result<(), String> {
        if let Some(mut old) = self.index.swap(None) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(index) => {
                        // Never closed: closing a failed sled instance can hang for good
                        // (its flush waits for a write it will never make, holding a
                        // process-wide lock every sled write needs). It is left as it is
                        // (its memory and files are released at the next restart) and
                        // the store carries on in a copy of its folder.
                        std::mem::forget(index);
                        self.folder_held.store(true, Ordering::SeqCst);
                        break;
                    }
                    Err(still_used) if Instant::now() < deadline => {
                        old = still_used;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(still_used) => {
                        // A reader holds it; try again at the next attempt.
                        self.index.store(Some(still_used));
                        return Err("the failed index is still in use by a reader".into());
                    }
                }
            }
        }
        if self.folder_held.load(Ordering::SeqCst) {
            self.continue_in_copy()?;
        }
        let dir = self
            .index_dir
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let reopened = Index::open(&dir, self.cache_bytes)
            .and_then(|index| self.runs.reload(&index).map(|()| index));
        match reopened {
            Ok(index) => {
                self.index.store(Some(Arc::new(index)));
                Ok(())
            }
            Err(err) => {
                let why = format!("reopening the index failed: {err}");
                self.set_index_health(Some(why.clone()));
                Err(why)
            }
        }
    }
}
