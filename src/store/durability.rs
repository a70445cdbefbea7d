//! Group commit: a write is acknowledged only once it is on disk, and concurrent writers
//! share one `fsync`.
//!
//! After its write, a writer takes a ticket (a sequence number) and waits until a flush
//! that *started after* the ticket was issued has finished. One background thread runs
//! those flushes back to back: every writer that arrives while a flush is running is
//! covered by the next one, so N concurrent callbacks cost about one flush, not N.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::Instant,
};

use tokio::sync::watch;

/// What the flusher has achieved so far.
#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every ticket up to this one is on disk.
    durable_upto: u64,
    /// The most recent failed flush: the tickets it covered, and why it failed.
    failed: Option<(u64, String)>,
}

#[derive(Default)]
struct Pending {
    wanted: bool,
    shutdown: bool,
}

struct Shared {
    issued: AtomicU64,
    pending: Mutex<Pending>,
    wake: Condvar,
    flushed: watch::Sender<Flushed>,
}

pub struct GroupCommit {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("flushing the store to disk failed: {0}")]
pub struct FlushError(pub String);

impl GroupCommit {
    /// Starts the flusher thread; `flush` makes everything written so far durable.
    pub fn start(
        flush: impl Fn() -> Result<(), String> + Send + 'static,
        observe: impl Fn(std::time::Duration) + Send + 'static,
    ) -> Self {
        let (flushed, _) = watch::channel(Flushed::default());
        let shared = Arc::new(Shared {
            issued: AtomicU64::new(0),
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            flushed,
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("verigate-flusher".into())
            .spawn(move || flusher_loop(&worker, flush, observe))
            .ok();
        Self {
            shared,
            thread: Mutex::new(thread),
        }
    }

    /// Call after a write has been applied; resolves once that write is on disk.
    pub async fn durable(&self) -> Result<(), FlushError> {
        let ticket = self.shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
        self.wait_for(ticket).await
    }

    /// Resolves once everything written before this call is on disk.
    pub async fn barrier(&self) -> Result<(), FlushError> {
        let ticket = self.shared.issued.load(Ordering::SeqCst);
        if ticket == 0 {
            return Ok(());
        }
        self.wait_for(ticket).await
    }

    async fn wait_for(&self, ticket: u64) -> Result<(), FlushError> {
        let mut rx = self.shared.flushed.subscribe();
        if rx.borrow().durable_upto >= ticket {
            return Ok(());
        }
        self.request_flush();
        let state = rx
            .wait_for(|f| {
                f.durable_upto >= ticket
                    || f.failed.as_ref().is_some_and(|(upto, _)| *upto >= ticket)
            })
            .await
            .map_err(|_| FlushError("the store is shutting down".into()))?;
        if state.durable_upto >= ticket {
            Ok(())
        } else {
            let reason = state
                .failed
                .as_ref()
                .map_or_else(String::new, |(_, why)| why.clone());
            Err(FlushError(reason))
        }
    }

    fn request_flush(&self) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.wanted = true;
            self.shared.wake.notify_one();
        }
    }

    /// Flushes what is outstanding and stops the thread. Idempotent.
    pub fn shutdown(&self) {
        if let Ok(mut pending) = self.shared.pending.lock() {
            pending.shutdown = true;
            self.shared.wake.notify_one();
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn flusher_loop(
    shared: &Shared,
    flush: impl Fn() -> Result<(), String>,
    observe: impl Fn(std::time::Duration),
) {
    loop {
        let stop = {
            let Ok(mut pending) = shared.pending.lock() else {
                return;
            };
            while !pending.wanted && !pending.shutdown {
                pending = match shared.wake.wait(pending) {
                    Ok(p) => p,
                    Err(_) => return,
                };
            }
            pending.wanted = false;
            pending.shutdown
        };
        // Every ticket issued before this load belongs to a write that has already been
        // applied, so the flush below covers it.
        let target = shared.issued.load(Ordering::SeqCst);
        let started = Instant::now();
        let outcome = flush();
        observe(started.elapsed());
        shared.flushed.send_modify(|f| match outcome {
            Ok(()) => f.durable_upto = f.durable_upto.max(target),
            Err(why) => f.failed = Some((target, why)),
        });
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_share_flushes_and_all_become_durable() {
        let flushes = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&flushes);
        let commit = Arc::new(GroupCommit::start(
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(5));
                Ok(())
            },
            |_| {},
        ));
        let writers: Vec<_> = (0..200)
            .map(|_| {
                let commit = Arc::clone(&commit);
                tokio::spawn(async move { commit.durable().await })
            })
            .collect();
        for w in writers {
            w.await.unwrap().unwrap();
        }
        let n = flushes.load(Ordering::SeqCst);
        assert!((1..200).contains(&n), "200 writers needed {n} flushes");
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_waiters() {
        let commit = GroupCommit::start(|| Err("disk full".into()), |_| {});
        let err = commit.durable().await.unwrap_err();
        assert!(err.to_string().contains("disk full"));
    }

    #[tokio::test]
    async fn barrier_with_nothing_written_returns_at_once() {
        let commit = GroupCommit::start(|| Ok(()), |_| {});
        commit.barrier().await.unwrap();
        commit.shutdown();
        commit.shutdown();
    }
}
