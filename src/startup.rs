//! Building and running the service: load the policy, bind the socket, start answering,
//! open the store in the background (readiness turns green when it is open), and on
//! shutdown let in-flight callbacks finish before the store's final flush.

use std::{
    net::TcpListener,
    sync::{atomic::AtomicBool, Arc},
    time::Instant,
};

use actix_web::{
    dev::{Server, ServerHandle, Service},
    middleware::ErrorHandlers,
    web, App, HttpServer,
};
use anyhow::Context;
use futures_util::FutureExt;
use tracing_actix_web::TracingLogger;

use crate::{
    clock::Clock,
    config::Settings,
    error::{json_error_fallback, ApiError, ErrorCode},
    metrics::Metrics,
    policy::{persist, reload, Policy, RulesPolicy},
    routes::{self, CallbackState},
    store::{retention, StoreObserver, StoreSlot},
    telemetry::{self, CallbackRootSpan},
};

/// How often dropped log lines are reported in the log itself.
const LOG_DROP_REPORT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Application {
    port: u16,
    server: Server,
    store: StoreSlot,
    stop_opening: Arc<AtomicBool>,
    opener: Option<tokio::task::JoinHandle<()>>,
    retention: Option<tokio::task::JoinHandle<()>>,
    log_reporter: tokio::task::JoinHandle<()>,
    /// Restores, then keeps saving, what the policy learned (quarantines).
    policy_state: tokio::task::JoinHandle<()>,
    policy: Arc<dyn Policy>,
    metrics: Arc<Metrics>,
    /// Kept alive while the service runs: dropping it stops watching the policy file.
    watcher: Option<reload::PolicyWatcher>,
}

impl Application {
    /// Builds the service from settings, with the rules policy from `policy.path`,
    /// reloaded when the file changes, on SIGHUP and on `POST /v1/policy/reload`.
    pub fn build(settings: &Settings, clock: Clock) -> anyhow::Result<Self> {
        let mut policy = RulesPolicy::load(&settings.policy.path)?;
        tracing::info!(path = %settings.policy.path.display(), "policy loaded: {policy}");
        if let Some(pg) = settings.store_options().postgres {
            // Replicas on one database decide as one: counters, outcomes, quarantines.
            let shared = crate::policy::shared::SharedState::new(&pg, replica_name())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            policy = policy.with_shared_state(shared);
        }
        for warning in policy.warnings() {
            tracing::warn!("policy: {warning}");
        }
        let policy: Arc<dyn Policy> = Arc::new(policy);
        let mut app = Self::build_with_policy(settings, clock, Arc::clone(&policy))?;
        let observer = Arc::clone(&app.metrics) as Arc<dyn reload::ReloadObserver>;
        app.watcher = Some(reload::watch(Arc::clone(&policy), Arc::clone(&observer))?);
        reload::on_sighup(policy, observer)?;
        Ok(app)
    }

    /// Builds the service around any [`Policy`] implementation.
    pub fn build_with_policy(
        settings: &Settings,
        clock: Clock,
        policy: Arc<dyn Policy>,
    ) -> anyhow::Result<Self> {
        let (keyring, warnings) = settings.keyring()?;
        for warning in warnings {
            tracing::warn!("{warning}");
        }
        if keyring.is_empty() {
            tracing::warn!("no Sinch app is configured: every callback will be refused (set VERIGATE_APP_KEY and VERIGATE_APP_SECRET)");
        }
        let metrics = Metrics::new();
        metrics.policy_loaded(&policy.version());
        let app_metrics = Arc::clone(&metrics);
        let listener = TcpListener::bind(settings.listen_addr()?)
            .with_context(|| format!("cannot listen on {}", settings.server.listen))?;
        let port = listener.local_addr()?.port();

        let store = StoreSlot::default();
        let stop_opening = Arc::new(AtomicBool::new(false));
        let (restoring, restore_clock) = (Arc::clone(&policy), clock.clone());
        let opener = store.open_in_background(
            settings.store_options(),
            Arc::clone(&metrics) as Arc<dyn StoreObserver>,
            Arc::clone(&stop_opening),
            move |opened| async move {
                persist::restore_on_open(&opened, restoring, restore_clock.now()).await;
            },
        );
        let log_reporter = tokio::spawn(telemetry::report_dropped_lines(LOG_DROP_REPORT));

        let retention = settings.retention().map(|keep| {
            tokio::spawn(retention::run(
                store.clone(),
                clock.clone(),
                keep,
                settings.store.retention_check_interval,
            ))
        });
        let policy_state = tokio::spawn(persist::run(
            store.clone(),
            Arc::clone(&policy),
            clock.clone(),
        ));
        let kept_policy = Arc::clone(&policy);
        let state = web::Data::new(CallbackState {
            keyring,
            public_callback_path: settings.server.public_callback_path.clone(),
            max_clock_skew: settings.max_clock_skew(),
            body_limit: settings.server.body_limit,
            decision_deadline: settings.policy.decision_deadline,
            startup_wait: settings.server.startup_wait,
            clock,
            policy,
            store: store.clone(),
            metrics: Arc::clone(&metrics),
        });
        let token = web::Data::new(routes::api_token(
            settings.api.token.clone(),
            settings.api.read_token.clone(),
        ));
        let callback_path = settings.server.callback_path.clone();
        let mut server = HttpServer::new(move || {
            let metrics = Arc::clone(&metrics);
            App::new()
                .wrap(ErrorHandlers::new().default_handler(json_error_fallback))
                .wrap_fn(move |req, srv| {
                    // Timed outside the error handlers, so rejected requests count too.
                    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
                    let started = Instant::now();
                    let metrics = Arc::clone(&metrics);
                    srv.call(req).map(move |res| {
                        if let Ok(res) = &res {
                            metrics.observe_request(
                                &route,
                                res.status().as_u16(),
                                started.elapsed(),
                            );
                        }
                        res
                    })
                })
                .wrap(TracingLogger::<CallbackRootSpan>::new())
                .app_data(state.clone())
                .app_data(token.clone())
                .app_data(web::PathConfig::default().error_handler(|e, _| bad_request(e)))
                .app_data(web::QueryConfig::default().error_handler(|e, _| bad_request(e)))
                .app_data(web::JsonConfig::default().error_handler(|e, _| bad_request(e)))
                .configure(routes::configure(callback_path.clone()))
        })
        .shutdown_timeout(settings.server.shutdown_timeout.as_secs().max(1))
        .listen(listener)?;
        server = server.workers(http_workers(
            settings.server.workers,
            settings.store_options().postgres.is_some(),
        ));
        Ok(Self {
            port,
            server: server.run(),
            store,
            stop_opening,
            opener: Some(opener),
            retention,
            log_reporter,
            policy_state,
            policy: kept_policy,
            metrics: app_metrics,
            watcher: None,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (gracefully) when asked; SIGTERM and SIGINT do the same.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// Serves until stopped, then flushes the store.
    pub async fn run_until_stopped(mut self) -> anyhow::Result<()> {
        let served = self.server.await;
        tracing::info!("server stopped; flushing the store");
        if let Some(retention) = self.retention.take() {
            retention.abort();
        }
        self.stop_opening
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(opener) = self.opener.take() {
            let _ = opener.await;
        }
        self.policy_state.abort();
        self.log_reporter.abort();
        if let Some(store) = self.store.get() {
            if let Err(err) = persist::save_if_changed(store, self.policy.as_ref(), &mut None).await
            {
                tracing::error!(error.message = %err, "saving the policy state failed");
            }
            store.shutdown().await?;
        }
        Ok(served?)
    }
}

fn bad_request(err: impl std::fmt::Display) -> actix_web::Error {
    ApiError::new(ErrorCode::BadRequest, err.to_string()).into()
}

/// How this replica names itself to the others: host and process.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "verigate".into());
    format!("{host}:{}", std::process::id())
}

/// HTTP worker threads: as configured, else one per core on the embedded store and one
/// per two cores on PostgreSQL. A replica's database work runs on threads of its own
/// (the database runtime, the exchange of approximate counts), where its HTTP workers
/// mostly wait for it; where replicas share cores with each other and the database, fewer
/// workers also mean fewer threads to switch between. Measured on two cores with
/// PostgreSQL on the same machine (`cargo bench --bench load`, two runs each, one worker
/// against two): one replica 4,201 / 4,301 against 3,984 / 4,402 callbacks/s, three
/// replicas 3,241 / 3,039 against 2,766 / 2,767 with p99 22.8 / 24.0 against 26.1 / 26.5 ms.
fn http_workers(configured: usize, on_postgres: bool) -> usize {
    if configured > 0 {
        return configured;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    if on_postgres {
        (cores / 2).max(1)
    } else {
        cores
    }
}

#[cfg(test)]
mod tests {
    use super::http_workers;

    #[test]
    fn configured_workers_win_and_replicas_on_postgres_default_to_half_the_cores() {
        assert_eq!(http_workers(3, true), 3);
        assert_eq!(http_workers(3, false), 3);
        let (embedded, replica) = (http_workers(0, false), http_workers(0, true));
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        assert_eq!(embedded, cores);
        assert_eq!(replica, (cores / 2).max(1));
    }
}
