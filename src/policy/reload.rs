//! Reloading the policy while requests are answered: on a file change (debounced, and
//! robust to editors that save by writing a new file and renaming it), on SIGHUP, and on
//! `POST /v1/policy/reload`. All three call [`reload`], which validates fully and swaps
//! atomically; a broken edit leaves the old policy in force and says where it is broken.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use notify::{RecursiveMode, Watcher};

use super::{Policy, PolicyError};

/// Told how every reload went (metrics count them); the policy knows nothing of metrics.
pub trait ReloadObserver: Send + Sync + 'static {
    fn loaded(&self, version: &str);
    fn load_failed(&self);
}

/// Quiet time after the last file event before reloading: editors write in bursts.
const DEBOUNCE: Duration = Duration::from_millis(300);
/// Longest wait from the first event of a burst to the reload.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Reloads `policy`, logging and counting the outcome. `trigger` says what asked.
pub fn reload(
    policy: &dyn Policy,
    observer: &dyn ReloadObserver,
    trigger: &str,
) -> Result<String, PolicyError> {
    match policy.reload() {
        Ok(version) => {
            observer.loaded(&version);
            tracing::info!(trigger, version = %version, "policy reloaded");
            Ok(version)
        }
        Err(err) => {
            observer.load_failed();
            tracing::error!(trigger, error.message = %err, "policy reload failed; the previous policy stays in force");
            Err(err)
        }
    }
}

/// Keeps the policy's files watched; dropping it stops watching.
pub struct PolicyWatcher {
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
}

/// Reloads the policy when one of its files changes (`Policy::sources`: the policy file
/// and the list files it names), and only then: a busy store or log next to the policy
/// is none of its business. The folders holding them are watched, not the files, so a
/// save by rename (a new file under the old name) is seen. A burst of events is awaited
/// until it has been quiet for `DEBOUNCE`, but never more than `MAX_DELAY` after its first
/// event, so a steady stream of events cannot put a reload off.
pub fn watch(
    policy: Arc<dyn Policy>,
    observer: Arc<dyn ReloadObserver>,
) -> notify::Result<PolicyWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sources = Arc::new(Mutex::new(Sources::default()));
    let seen = Arc::clone(&sources);
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        let ours = seen
            .lock()
            .map(|s| event.paths.iter().any(|p| s.contains(p)))
            .unwrap_or(false);
        if ours {
            let _ = tx.send(());
        }
    })?;
    let watcher = Arc::new(Mutex::new(watcher));
    refresh(&sources, &watcher, &policy.sources());
    let kept = Arc::clone(&watcher);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            let first = tokio::time::Instant::now();
            loop {
                let left = MAX_DELAY.saturating_sub(first.elapsed());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(DEBOUNCE.min(left), rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let _ = reload(policy.as_ref(), observer.as_ref(), "file change");
            // An edit may name new list files.
            refresh(&sources, &kept, &policy.sources());
        }
    });
    Ok(PolicyWatcher { _watcher: watcher })
}

/// The files watched, as (canonical folder, file name).
#[derive(Default)]
struct Sources {
    files: HashSet<(PathBuf, std::ffi::OsString)>,
    folders: HashSet<PathBuf>,
}

impl Sources {
    fn key(path: &Path) -> Option<(PathBuf, std::ffi::OsString)> {
        let folder = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Some((folder.canonicalize().ok()?, path.file_name()?.to_owned()))
    }

    fn contains(&self, path: &Path) -> bool {
        Self::key(path).is_some_and(|k| self.files.contains(&k))
    }
}

/// Watches the folders of `files` (not recursively) and remembers which files count.
fn refresh(
    sources: &Mutex<Sources>,
    watcher: &Mutex<notify::RecommendedWatcher>,
    files: &[PathBuf],
) {
    let new_folders: Vec<PathBuf> = {
        let Ok(mut sources) = sources.lock() else {
            return;
        };
        let mut new_folders = Vec::new();
        for key in files.iter().filter_map(|f| Sources::key(f)) {
            if sources.folders.insert(key.0.clone()) {
                new_folders.push(key.0.clone());
            }
            sources.files.insert(key);
        }
        new_folders
    };
    // Not under the `sources` lock: `watch` waits for notify's event thread, which may be
    // delivering an event to the handler that takes that lock.
    let Ok(mut watcher) = watcher.lock() else {
        return;
    };
    for folder in new_folders {
        if let Err(err) = watcher.watch(&folder, RecursiveMode::NonRecursive) {
            tracing::warn!(folder = %folder.display(), error.message = %err, "cannot watch a policy folder; edits there need SIGHUP or POST /v1/policy/reload");
        }
    }
}

/// Reloads on every SIGHUP until the process ends.
pub fn on_sighup(
    policy: Arc<dyn Policy>,
    observer: Arc<dyn ReloadObserver>,
) -> std::io::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let _ = reload(policy.as_ref(), observer.as_ref(), "SIGHUP");
        }
    });
    Ok(())
}
