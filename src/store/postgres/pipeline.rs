//! A few connections that any number of tasks use at once.
//!
//! A pool lends a connection to one task at a time, so a query waits for a free
//! connection and then for its own round trip. tokio-postgres instead pipelines the
//! queries issued concurrently on one connection: each is sent as soon as it is issued,
//! and the server answers them in order. A handful of shared connections therefore
//! carry the short, independent statements of many callbacks (claims, counter
//! operations, lookups) with less waiting and far fewer server processes than a pool of
//! one connection per concurrent callback.
//!
//! Only autocommit statements belong here: a transaction needs a connection of its own.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::Duration,
};

use tokio_postgres::{types::ToSql, Client, NoTls, Row, Statement};

/// Session settings for connections whose statements are all short and indexed:
/// - No sequential scans. On a fresh database the tables are empty, and a statement
///   planned then keeps its sequential-scan plan for the life of the connection (until
///   the first analyze, a minute or more away): under load from the start, that costs
///   more than all the rest.
/// - One plan per prepared statement. A statement over arrays (a batch) looks cheaper
///   planned for each call's arrays, so the server would plan it anew on every call.
pub(crate) const INDEXED: &str = "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan";

/// [`INDEXED`], with commits that do not wait for the disk: for what may be lost in a
/// database crash (counters, claims).
pub(crate) const INDEXED_ASYNC_COMMIT: &str =
    "-c enable_seqscan=off -c plan_cache_mode=force_generic_plan -c synchronous_commit=off";

/// The database runtime: the connections' I/O tasks and the group commits run here, off
/// the HTTP workers, whichever thread issued the query. A thread per two cores: its
/// work is short, and more threads mostly add wakeups across cores (two cores, one
/// thread against two: 2,694 against 2,535 callbacks/s on one replica, 2,134 against
/// 1,847 on three).
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(
                std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            )
            .thread_name("verigate-postgres")
            .enable_all()
            .build()
            // Only fails when the OS refuses threads, and verigate cannot run without them.
            .unwrap_or_else(|e| panic!("cannot start the PostgreSQL runtime: {e}"))
    })
}

/// Runs `future` to its end on this thread, which sleeps while the future waits: for
/// code that is not async (a policy's `decide`) waiting on work of the database
/// [`runtime`]. Never call it on a thread of that runtime, whose work it would wait for.
pub(crate) fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        std::thread::park();
    }
}

/// A new connection whose socket lives on the database [`runtime`] (a socket belongs to
/// the runtime that opened it, and the caller's may be a test's or a worker's that ends).
pub(crate) async fn connect(
    config: &tokio_postgres::Config,
    timeout: Duration,
) -> Result<Client, ConnectError> {
    let config = config.clone();
    let opened = runtime().spawn(async move {
        let (client, connection) = tokio::time::timeout(timeout, config.connect(NoTls))
            .await
            .map_err(|_| ConnectError::TimedOut(timeout))?
            .map_err(|e| ConnectError::Refused(super::explain(&e)))?;
        tokio::spawn(connection);
        Ok(client)
    });
    opened
        .await
        .unwrap_or_else(|e| Err(ConnectError::Refused(format!("connecting failed: {e}"))))
}

/// One shared connection and the statements prepared on it.
pub(crate) struct SharedConnection {
    client: Client,
    prepared: Mutex<HashMap<&'static str, Statement>>,
}

impl SharedConnection {
    /// `sql` prepared on this connection (once: preparing costs a round trip).
    async fn statement(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let known = self
            .prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sql)
            .cloned();
        if let Some(statement) = known {
            return Ok(statement);
        }
        let statement = self.client.prepare(sql).await?;
        self.prepared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sql, statement.clone());
        Ok(statement)
    }

    pub(crate) async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query(&statement, params).await
    }

    pub(crate) async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query_opt(&statement, params).await
    }

    pub(crate) async fn query_one(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query_one(&statement, params).await
    }

    pub(crate) async fn execute(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.execute(&statement, params).await
    }
}

/// Why no connection could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("{0}")]
    Refused(String),
    #[error("connecting to PostgreSQL timed out after {0:?}")]
    TimedOut(Duration),
}

/// A fixed set of shared connections, used in turn; a broken one is replaced on next use.
pub(crate) struct Pipeline {
    config: tokio_postgres::Config,
    slots: Vec<tokio::sync::Mutex<Option<Arc<SharedConnection>>>>,
    next: AtomicUsize,
    timeout: Duration,
}

impl Pipeline {
    /// `connections` connections to `config`, made on first use; `session` are server
    /// settings for each (e.g. `-c synchronous_commit=off`).
    pub(crate) fn new(
        mut config: tokio_postgres::Config,
        session: Option<&str>,
        connections: usize,
        timeout: Duration,
    ) -> Self {
        if let Some(session) = session {
            config.options(session);
        }
        config.connect_timeout(timeout);
        Self {
            config,
            slots: (0..connections.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            timeout,
        }
    }

    /// The next connection in turn, connecting (again) if it is not open.
    pub(crate) async fn get(&self) -> Result<Arc<SharedConnection>, ConnectError> {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[at].lock().await;
        if let Some(open) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(Arc::clone(open));
        }
        *slot = None;
        let client = connect(&self.config, self.timeout).await?;
        let shared = Arc::new(SharedConnection {
            client,
            prepared: Mutex::default(),
        });
        *slot = Some(Arc::clone(&shared));
        Ok(shared)
    }
}
