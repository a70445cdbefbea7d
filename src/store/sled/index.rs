//! The index: one sled tree holding checkpointed records (in compressed blocks, with
//! patches for records changed after their block was written), the id, number and
//! reference indexes, raw-event blocks, the symbol table and a few named values.
//! See keys.rs for the layout.

use std::{
    ops::ControlFlow,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    codec::{self, LoggedEvent, StoredVerification, Symbols},
    keys::{self, Stamp},
};
use crate::store::StoreError;

/// The name of the checkpoint position: every event up to this sequence number is in
/// the index.
pub const CHECKPOINT: &str = "checkpoint";
/// The latest write time (ms) in the index, so the write order never goes back.
pub const LAST_MS: &str = "last_ms";
/// The store's format; absent while a migration is under way.
pub const FORMAT: &str = "format";
pub const FORMAT_VERSION: &[u8] = b"2";

/// Names the index folder in use when it is not the first one (`index`).
const FOLDER_IN_USE: &str = "index.in-use";
/// The index folder in use under the store's `root`.
pub fn folder_in_use(root: &Path, first: &str) -> PathBuf {
    std::fs::read_to_string(root.join(FOLDER_IN_USE))
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty() && !name.contains(['/', '\\']) && name != "..")
        .map_or_else(|| root.join(first), |name| root.join(name))
}

/// Copies the index folder `from` to a new folder under `root` and makes it the one in
/// use: a failed index keeps its folder locked for as long as the process lives, and
/// its files hold what a restart would have found. Returns the new folder.
pub fn continue_in_copy(root: &Path, from: &Path) -> Result<PathBuf, StoreError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let name = format!("index-{stamp}");
    let to = root.join(&name);
    let copied = copy_folder(from, &to).and_then(|()| {
        let pointer = root.join(format!("{FOLDER_IN_USE}.tmp"));
        std::fs::write(&pointer, &name)?;
        std::fs::File::open(&pointer)?.sync_all()?;
        std::fs::rename(&pointer, root.join(FOLDER_IN_USE))?;
        std::fs::File::open(root)?.sync_all()
    });
    match copied {
        Ok(()) => Ok(to),
        Err(err) => {
            let _ = std::fs::remove_dir_all(&to);
            Err(StoreError::Failed(format!(
                "copying the index to {} failed: {err}",
                to.display()
            )))
        }
    }
}

fn copy_folder(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_folder(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
            std::fs::File::open(&target)?.sync_all()?;
        }
    }
    std::fs::File::open(to)?.sync_all()
}

/// Deletes index folders under `root` other than `in_use`, left by an earlier copy.
pub fn remove_other_folders(root: &Path, first: &str, in_use: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_index = name == first || name.starts_with(&format!("{first}-"));
        if is_index && entry.path() != in_use && entry.path().is_dir() {
            if let Err(err) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(folder = %entry.path().display(), error.message = %err, "cannot delete an index folder no longer in use");
            }
        }
    }
}

/// The largest value verigate writes to the index. sled writes a value over a quarter of
/// its 512 KiB segment to a file of its own (a blob), and a blob write that fails (a full
/// disk) leaves sled waiting forever on its next flush, even when the index is closed to
/// be reopened: the store could then never recover without a restart. So every value
/// stays under it: blocks are cut by size, large run headers are stored in parts.
pub const MAX_VALUE_BYTES: usize = 96 << 10;

pub struct Index {
    pub db: sled::Db,
    pub tree: sled::Tree,
}

pub fn failed(err: sled::Error) -> StoreError {
    StoreError::Failed(format!("index: {err}"))
}

fn corrupt(err: codec::CodecError) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

/// Opens a sled database, waiting out a lock this process let go of a moment ago: a
/// closed sled database stays locked while its background threads finish, so a store
/// reopened at once (a migration run again after it stopped, a restart in the same
/// process) would otherwise be refused as if another process held it. A lock still held
/// after a few seconds is reported.
pub fn open_sled(config: &sled::Config) -> Result<sled::Db, sled::Error> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match config.open() {
            // sled says so only in its message.
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            opened => return opened,
        }
    }
}

impl Index {
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = open_sled(
            &sled::Config::new()
                .path(path)
                .cache_capacity(cache_bytes)
                // The index is flushed at each checkpoint; the write-ahead log makes events
                // durable before that, so sled's timer flush would only add I/O.
                .flush_every_ms(None),
        )
        .map_err(|e| {
            StoreError::Unavailable(format!("cannot open the index at {}: {e}", path.display()))
        })?;
        let tree = db.open_tree("verigate").map_err(failed)?;
        Ok(Self { db, tree })
    }

    pub fn meta(&self, name: &str) -> Result<Option<sled::IVec>, StoreError> {
        self.tree.get(keys::meta(name)).map_err(failed)
    }

    pub fn meta_u64(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self
            .meta(name)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    pub fn symbols(&self) -> Result<Symbols, StoreError> {
        let mut entries = Vec::new();
        for entry in self.tree.range(keys::symbols()) {
            let (key, value) = entry.map_err(failed)?;
            let n = keys::symbol_number(&key)
                .ok_or_else(|| StoreError::Corrupt("a symbol key is malformed".into()))?;
            entries.push((n, String::from_utf8_lossy(&value).into_owned()));
        }
        Symbols::load(entries).map_err(corrupt)
    }

    pub fn stamp_of_id(&self, id: &str) -> Result<Option<Stamp>, StoreError> {
        Ok(self
            .tree
            .get(keys::id(id))
            .map_err(failed)?
            .and_then(|v| Stamp::from_bytes(&v)))
    }

    /// The encoded record created at `stamp`: its patch, or its entry in its block.
    pub fn record_bytes(&self, stamp: Stamp) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(patch) = self.tree.get(keys::patch(stamp)).map_err(failed)? {
            return Ok(Some(patch.to_vec()));
        }
        let key = self.block_holding(keys::record_block, stamp)?;
        let Some(block) = self.tree.get(key).map_err(failed)? else {
            return Ok(None);
        };
        for record in codec::decode_block(&block).map_err(corrupt)?.iter() {
            if codec::record_stamp(record).map_err(corrupt)? == stamp {
                return Ok(Some(record.to_vec()));
            }
        }
        Ok(None)
    }

    pub fn record_at(
        &self,
        stamp: Stamp,
        symbols: &Symbols,
    ) -> Result<Option<StoredVerification>, StoreError> {
        self.record_bytes(stamp)?
            .map(|bytes| codec::decode_record(&bytes, Some(symbols)).map_err(corrupt))
            .transpose()
    }

    /// Every checkpointed record created in `[start, end)`, oldest first, as its encoded
    /// bytes (the patch where there is one); `visit` may stop the walk.
    pub fn scan_records(
        &self,
        start: Stamp,
        end: Stamp,
        mut visit: impl FnMut(Stamp, &[u8]) -> Result<ControlFlow<()>, StoreError>,
    ) -> Result<(), StoreError> {
        if start >= end {
            return Ok(());
        }
        let first_block = self.block_holding(keys::record_block, start)?;
        let mut patches = self
            .tree
            .range(keys::patch(start)..keys::patch(end))
            .peekable();
        for block in self.tree.range(first_block..keys::record_block(end)) {
            let (_, block) = block.map_err(failed)?;
            let block = codec::decode_block(&block).map_err(corrupt)?;
            for record in block.iter() {
                let stamp = codec::record_stamp(record).map_err(corrupt)?;
                if stamp < start {
                    continue;
                }
                if stamp >= end {
                    return Ok(());
                }
                // Patches exist only for records in blocks, so they come up in order.
                while patches
                    .peek()
                    .and_then(|p| p.as_ref().ok())
                    .and_then(|(k, _)| keys::stamp_of(k))
                    .is_some_and(|s| s < stamp)
                {
                    patches.next();
                }
                let patched = match patches.peek() {
                    Some(Ok((key, value))) if keys::stamp_of(key) == Some(stamp) => {
                        Some(value.clone())
                    }
                    Some(Err(err)) => return Err(failed(err.clone())),
                    _ => None,
                };
                let flow = match &patched {
                    Some(patch) => visit(stamp, patch)?,
                    None => visit(stamp, record)?,
                };
                if flow.is_break() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Checkpointed raw events with stamps in `[start, end)`, oldest first; at most `limit`.
    pub fn events_between(
        &self,
        start: Stamp,
        end: Stamp,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        let mut out = Vec::new();
        if start >= end || limit == 0 {
            return Ok(out);
        }
        let first_block = self.block_holding(keys::event_block, start)?;
        for block in self.tree.range(first_block..keys::event_block(end)) {
            let (_, block) = block.map_err(failed)?;
            for item in codec::decode_block(&block).map_err(corrupt)?.iter() {
                let event = codec::decode_event(item).map_err(corrupt)?;
                if event.stamp < start {
                    continue;
                }
                if event.stamp >= end {
                    return Ok(out);
                }
                out.push(event);
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// The key of the block that holds `stamp` if any does: the last one starting at or
    /// before it (blocks are keyed by their first stamp and never overlap).
    fn block_holding(
        &self,
        key_of: fn(Stamp) -> Vec<u8>,
        stamp: Stamp,
    ) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .tree
            .range(key_of(Stamp::default())..=key_of(stamp))
            .next_back()
            .transpose()
            .map_err(failed)?
            .map_or_else(|| key_of(stamp), |(key, _)| key.to_vec()))
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(failed)
    }
}
