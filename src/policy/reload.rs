//! Reloading the policy while requests are answered: on a file change (debounced, and
//! robust to editors that save by writing a new file and renaming it), on SIGHUP, and on
//! `POST /v1/policy/reload`. All three call [`reload`], which validates fully and swaps
//! atomically; a broken edit leaves the old policy in force and says where it is broken.

use std::{path::Path, sync::Arc, time::Duration};

use notify::{RecursiveMode, Watcher};

use super::{Policy, PolicyError};
use crate::metrics::Metrics;

/// Quiet time after the last file event before reloading: editors write in bursts.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Reloads `policy`, logging and counting the outcome. `trigger` says what asked.
pub fn reload(
    policy: &dyn Policy,
    metrics: &Metrics,
    trigger: &str,
) -> Result<String, PolicyError> {
    match policy.reload() {
        Ok(version) => {
            metrics.policy_loaded(&version);
            tracing::info!(trigger, version = %version, "policy reloaded");
            Ok(version)
        }
        Err(err) => {
            metrics.policy_load_failed();
            tracing::error!(trigger, error.message = %err, "policy reload failed; the previous policy stays in force");
            Err(err)
        }
    }
}

/// Watches the policy file's folder (and list files below it) and reloads on change.
/// Returns the watcher, which must be kept alive; the reload loop runs on this runtime.
pub fn watch(
    path: &Path,
    policy: Arc<dyn Policy>,
    metrics: Arc<Metrics>,
) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Watching the folder, not the file, sees a save-by-rename (the file's inode changes).
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if !event.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })?;
    watcher.watch(&folder, RecursiveMode::Recursive)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait until the burst of events is over.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let _ = reload(policy.as_ref(), &metrics, "file change");
        }
    });
    Ok(watcher)
}

/// Reloads on every SIGHUP until the process ends.
pub fn on_sighup(policy: Arc<dyn Policy>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let _ = reload(policy.as_ref(), &metrics, "SIGHUP");
        }
    });
    Ok(())
}
