//! The store once it has opened. verigate answers HTTP before that (liveness, readiness,
//! `on_error` answers), because opening can wait on a lock a previous process still holds
//! and replays what that process left in its write-ahead log.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, OnceLock, PoisonError,
    },
    time::Duration,
};

use super::{Store, StoreError, StoreHealth, StoreObserver, StoreOptions};

const OPEN_RETRY: Duration = Duration::from_millis(500);

#[derive(Clone, Default)]
pub struct StoreSlot {
    store: Arc<OnceLock<Store>>,
    /// Why the store is not open yet, for the readiness check.
    waiting_on: Arc<Mutex<Option<String>>>,
    /// Wakes callbacks waiting for the store (see [`StoreSlot::ready_within`]).
    opened: Arc<tokio::sync::Notify>,
    /// Set when opening stopped for good (a store that needs migrating): nobody waits.
    given_up: Arc<AtomicBool>,
}

impl StoreSlot {
    pub fn get(&self) -> Option<&Store> {
        self.store.get()
    }

    /// The open store, or why there is none.
    pub fn ready(&self) -> Result<&Store, StoreError> {
        self.get().ok_or_else(|| {
            StoreError::Unavailable(
                self.waiting_on()
                    .unwrap_or_else(|| "the store is not open yet".to_owned()),
            )
        })
    }

    /// The open store, waiting up to `bound` for it while it opens. Right after a start
    /// this turns a callback that would be denied at once into one answered a little late.
    pub async fn ready_within(&self, bound: Duration) -> Result<&Store, StoreError> {
        if let Some(store) = self.get() {
            return Ok(store);
        }
        if bound.is_zero() || self.given_up.load(Ordering::SeqCst) {
            return self.ready();
        }
        let opened = self.opened.notified();
        tokio::pin!(opened);
        // Registered before the second look, so an open in between is not missed.
        opened.as_mut().enable();
        if self.get().is_none() && !self.given_up.load(Ordering::SeqCst) {
            let _ = tokio::time::timeout(bound, opened).await;
        }
        self.ready()
    }

    /// Why the store cannot take writes now (`None`: it can).
    pub fn not_ready(&self) -> Option<String> {
        match self.get().map(Store::health) {
            Some(StoreHealth::Ready) => None,
            Some(StoreHealth::Degraded(why)) => Some(why),
            None => Some(match self.waiting_on() {
                Some(why) => format!("not open: {why}"),
                None => "opening".to_owned(),
            }),
        }
    }

    /// Why the store is not open yet (`None` once open or before the first attempt).
    pub fn waiting_on(&self) -> Option<String> {
        self.waiting_on
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_waiting_on(&self, why: Option<String>) {
        *self
            .waiting_on
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = why;
    }

    /// Opens the store in the background, retrying until it opens or `stop` is set. A
    /// store that needs migrating is not retried: the reason stays in the readiness check.
    /// `on_open` runs before anyone can use the store (e.g. the policy relearns from it).
    pub fn open_in_background<F, Fut>(
        &self,
        options: StoreOptions,
        observer: Arc<dyn StoreObserver>,
        stop: Arc<AtomicBool>,
        on_open: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnOnce(Store) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let slot = self.clone();
        tokio::spawn(async move {
            let mut attempt: u32 = 0;
            while !stop.load(Ordering::SeqCst) {
                let (opening, observer) = (options.clone(), Arc::clone(&observer));
                let started = std::time::Instant::now();
                let opened = Store::connect(&opening, observer).await;
                match opened {
                    Ok(store) => {
                        on_open(store.clone()).await;
                        tracing::info!(
                            store = %options.location(),
                            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                            "store open"
                        );
                        let _ = slot.store.set(store);
                        slot.set_waiting_on(None);
                        slot.opened.notify_waiters();
                        return;
                    }
                    Err(err @ StoreError::NeedsMigration(_)) => {
                        tracing::error!(error.message = %err, "the store cannot be opened");
                        slot.set_waiting_on(Some(err.to_string()));
                        slot.given_up.store(true, Ordering::SeqCst);
                        slot.opened.notify_waiters();
                        return;
                    }
                    Err(err) => {
                        // Log the first failure and then every ~30 s, not every retry.
                        if attempt % 60 == 0 {
                            tracing::error!(error.message = %err, "store not open yet; retrying");
                        }
                        slot.set_waiting_on(Some(err.to_string()));
                        attempt = attempt.wrapping_add(1);
                        tokio::time::sleep(OPEN_RETRY).await;
                    }
                }
            }
        })
    }
}
