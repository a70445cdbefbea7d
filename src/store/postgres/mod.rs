//! The PostgreSQL backend: one database shared by any number of verigate replicas.
//!
//! - An event is one row in `verigate_events`, unique on its identity, so the same event
//!   delivered to two replicas at once is stored once: the second insert finds the first
//!   and answers what it answered.
//! - A verification is one row in `verigate_verifications`, merged under a row lock by
//!   whichever replica gets each event, so events join whatever replica receives them.
//! - Every write commits with synchronous commit before the caller acknowledges it, in
//!   a group commit shared with the callbacks that arrive meanwhile (commit.rs).
//! - Short statements (lookups, and claims unless they ride with the policy's counter
//!   batches: claims.rs) share a few pipelined connections (pipeline.rs);
//!   transactions (group commits, pages) have connections of their own.
//! - Listings are ordered by creation (the first event's sequence number). A page only
//!   goes up to a sequence number below which every write has committed: each write holds
//!   a shared advisory lock (the "write gate") for its transaction, and a page first takes
//!   the gate exclusively for an instant, which waits for the writes in flight (a few
//!   milliseconds) and so learns a point that no later commit can land behind. That is
//!   what keeps pagination gap-free with writers on several replicas.

pub(crate) mod batch;
pub(crate) mod claims;
mod commit;
pub(crate) mod pipeline;
mod schema;
mod stats;

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use secrecy::{ExposeSecret, SecretString};
use serde_json::value::RawValue;
use tokio_postgres::{types::ToSql, NoTls, Row};

use super::{
    Cursor, Deleted, DeliveryWithHistory, EventIdentity, EventQuery, FirstDelivery, GroupStats,
    HistoryAsk, NewEvent, Page, RecordOutcome, StatsQuery, StoreError, StoreHealth, StoredEvent,
    VerificationFilter, VerificationQuery, VerificationRecord, VerificationStore,
};

pub(crate) use pipeline::block_on;
pub use schema::current_version as schema_version;

/// Statements prepared once per connection and kept: preparing each time costs a round
/// trip and server work per statement, about half of what a callback costs.
pub(crate) trait Cached {
    async fn cached_query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error>;

    async fn cached_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error>;

    async fn cached_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error>;

    async fn cached_execute(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error>;
}

macro_rules! cached_for {
    ($($client:ty),*) => {$(
        impl Cached for $client {
            async fn cached_query(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Vec<Row>, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                self.query(&statement, params).await
            }

            async fn cached_one(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Row, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                self.query_one(&statement, params).await
            }

            async fn cached_opt(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<Option<Row>, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                self.query_opt(&statement, params).await
            }

            async fn cached_execute(
                &self,
                sql: &str,
                params: &[&(dyn ToSql + Sync)],
            ) -> Result<u64, tokio_postgres::Error> {
                let statement = self.prepare_cached(sql).await?;
                self.execute(&statement, params).await
            }
        }
    )*};
}

cached_for!(
    deadpool_postgres::ClientWrapper,
    deadpool_postgres::Transaction<'_>
);

/// The advisory lock writes hold shared and pages take exclusively ("verigate" + 1).
const WRITE_GATE: i64 = 0x7665_7269_6761_7466;

/// Where the database is and how many connections a replica keeps.
#[derive(Clone)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/db`; never logged (see [`redacted`]).
    pub url: SecretString,
    pub pool_size: usize,
}

/// The URL without its password, for logs and errors.
pub fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<not a postgres:// URL>".into();
    };
    match rest.rsplit_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

pub struct PostgresStore {
    /// Connections for transactions (pages, retention).
    pool: Pool,
    /// Shared connections for short statements, with asynchronous commit: what they
    /// write (claims) need not survive a crash.
    shared: Arc<pipeline::Pipeline>,
    /// Claims, batched on the store's own connections, or riding with the policy's
    /// counter batches where a policy on this database offered that (claims.rs).
    claims: Arc<claims::ClaimQueue>,
    commits: commit::GroupCommit,
    health: Arc<Mutex<StoreHealth>>,
    /// Checks the database every second, so readiness follows an outage and its end
    /// even when no callback arrives.
    probe: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

/// How long a replica waits for another one that claimed the same event: beyond the
/// policy's decision deadline and a commit.
const CLAIM_POLL: std::time::Duration = std::time::Duration::from_millis(20);
const CLAIM_WAIT_POLLS: u32 = 100;

/// Shared connections for claims and lookups.
const SHARED_CONNECTIONS: usize = 2;

/// How often readiness re-checks the database.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn probe(shared: Arc<pipeline::Pipeline>, health: Arc<Mutex<StoreHealth>>) {
    for round in 0u64.. {
        tokio::time::sleep(PROBE_EVERY).await;
        let connection = shared.get().await;
        if round % 60 == 59 {
            // Claims are only needed while an event is being decided.
            if let Ok(connection) = &connection {
                let _ = connection
                    .execute(
                        "DELETE FROM verigate_claims WHERE claimed_at < now() - interval '1 minute'",
                        &[],
                    )
                    .await;
            }
        }
        let checked = match connection {
            Ok(connection) => connection
                .query_one("SELECT 1", &[])
                .await
                .map(drop)
                .map_err(failed),
            Err(err) => Err(StoreError::Unavailable(format!("PostgreSQL: {err}"))),
        };
        *health.lock().unwrap_or_else(PoisonError::into_inner) = match checked {
            Ok(()) => StoreHealth::Ready,
            Err(err) => StoreHealth::Degraded(err.to_string()),
        };
    }
}

pub(super) fn failed(err: tokio_postgres::Error) -> StoreError {
    failed_ref(&err)
}

pub(super) fn failed_ref(err: &tokio_postgres::Error) -> StoreError {
    StoreError::Failed(format!("PostgreSQL: {}", explain(err)))
}

/// The server's own words when it said something, else what failed and why ("db
/// error" or "error connecting to server" alone say nothing).
pub fn explain(err: &tokio_postgres::Error) -> String {
    match (err.as_db_error(), std::error::Error::source(err)) {
        (Some(db), _) => db.message().to_owned(),
        (None, Some(cause)) => format!("{err}: {cause}"),
        (None, None) => err.to_string(),
    }
}

fn pool_failed(err: deadpool_postgres::PoolError) -> StoreError {
    match err {
        deadpool_postgres::PoolError::Backend(e) => failed(e),
        other => StoreError::Unavailable(format!("PostgreSQL: {other}")),
    }
}

fn corrupt(err: serde_json::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

/// A page of verifications in creation (`seq`) order, after a cursor. Each lookup has a
/// statement of its own rather than one with optional conditions, so that its plan,
/// prepared once, uses that lookup's index: by number, by reference, or by `seq`.
const LIST_IN_RANGE: &str = "SELECT seq, record FROM verigate_verifications
    WHERE seq > $1 AND seq <= $2 AND record IS NOT NULL AND first_seen >= $3 AND first_seen < $4
    ORDER BY seq LIMIT $5";
const LIST_BY_NUMBER: &str = "SELECT seq, record FROM verigate_verifications
    WHERE number = $6 AND seq > $1 AND seq <= $2 AND record IS NOT NULL
      AND first_seen >= $3 AND first_seen < $4
    ORDER BY seq LIMIT $5";
const LIST_BY_REFERENCE: &str = "SELECT seq, record FROM verigate_verifications
    WHERE reference IS NOT NULL AND left(lower(reference), 512) = left(lower($6), 512)
      AND lower(reference) = lower($6) AND seq > $1 AND seq <= $2
      AND record IS NOT NULL AND first_seen >= $3 AND first_seen < $4
    ORDER BY seq LIMIT $5";

fn seq_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn cursor_of(seq: i64) -> Cursor {
    Cursor(seq.to_be_bytes().to_vec())
}

fn after_of(cursor: Option<&Cursor>) -> Result<i64, StoreError> {
    match cursor {
        None => Ok(0),
        Some(c) => {
            c.0.as_slice()
                .try_into()
                .map(i64::from_be_bytes)
                .map_err(|_| StoreError::BadCursor)
        }
    }
}

/// The connection settings in `options.url`.
pub(crate) fn config(options: &PostgresOptions) -> Result<tokio_postgres::Config, String> {
    options
        .url
        .expose_secret()
        .parse()
        .map_err(|e| format!("store.postgres_url: {e}"))
}

/// A pool of connections to `options.url`, made on first use; `session` are server
/// settings for each connection (e.g. `-c synchronous_commit=off`).
pub(crate) fn pool(
    options: &PostgresOptions,
    session: Option<&str>,
    timeout: std::time::Duration,
) -> Result<Pool, String> {
    let mut config = config(options)?;
    if let Some(session) = session {
        config.options(session);
    }
    let manager = deadpool_postgres::Manager::from_config(
        config,
        NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(options.pool_size.max(2))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .build()
        .map_err(|e| format!("PostgreSQL pool: {e}"))
}

impl PostgresStore {
    /// Connects and brings the schema up to date (a newer one is refused).
    pub async fn open(options: &PostgresOptions) -> Result<Self, StoreError> {
        let pool =
            pool(options, None, std::time::Duration::from_secs(5)).map_err(StoreError::Failed)?;
        let mut client = pool.get().await.map_err(pool_failed)?;
        schema::migrate(&mut client).await?;
        drop(client);
        let config = config(options).map_err(StoreError::Failed)?;
        let shared = Arc::new(pipeline::Pipeline::new(
            config.clone(),
            Some(pipeline::INDEXED_ASYNC_COMMIT),
            SHARED_CONNECTIONS,
            std::time::Duration::from_secs(5),
        ));
        let health = Arc::new(Mutex::new(StoreHealth::Ready));
        let commits = commit::GroupCommit::start(config, Arc::clone(&health));
        // One claimer, for the same reason as one group-commit writer (commit.rs).
        let claims = claims::riding(options.url.expose_secret()).unwrap_or_else(|| {
            let claimer = claims::Claimer {
                connections: Arc::clone(&shared),
            };
            Arc::new(batch::BatchQueue::start(
                vec![claimer],
                256,
                claims::QUEUE,
                None,
            ))
        });
        let probe = pipeline::runtime().spawn(probe(Arc::clone(&shared), Arc::clone(&health)));
        Ok(Self {
            pool,
            shared,
            claims,
            commits,
            health,
            probe,
        })
    }

    /// Applies the missing migrations; returns the versions applied.
    pub async fn migrate(options: &PostgresOptions) -> Result<Vec<i32>, StoreError> {
        let (mut client, connection) = config(options)
            .map_err(StoreError::Failed)?
            .connect(NoTls)
            .await
            .map_err(failed)?;
        tokio::spawn(connection);
        schema::migrate(&mut client).await
    }

    async fn client(&self) -> Result<Object, StoreError> {
        let got = self.pool.get().await.map_err(pool_failed);
        self.note(&got);
        got
    }

    /// Keeps health in step with what the database last did.
    fn note<T>(&self, result: &Result<T, StoreError>) {
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        *health = match result {
            Ok(_) => StoreHealth::Ready,
            Err(StoreError::Failed(why) | StoreError::Unavailable(why)) => {
                StoreHealth::Degraded(why.clone())
            }
            Err(_) => return,
        };
    }

    /// Waits for the writes in flight and returns a sequence number below which every
    /// write has committed.
    async fn settled(&self, client: &mut Object) -> Result<i64, StoreError> {
        let tx = client.transaction().await.map_err(failed)?;
        tx.cached_execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_GATE])
            .await
            .map_err(failed)?;
        let row = tx
            .cached_one("SELECT coalesce(max(seq), 0) FROM verigate_events", &[])
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(row.get(0))
    }

    async fn shared(&self) -> Result<Arc<pipeline::SharedConnection>, StoreError> {
        self.shared
            .get()
            .await
            .map_err(|e| StoreError::Unavailable(format!("PostgreSQL: {e}")))
    }

    /// The first delivery of `identity` if stored, else a claim on deciding it (`None`)
    /// with the number's history when `history` asks for it; while another replica holds
    /// the claim, waits for its answer.
    async fn claim(
        &self,
        identity: &EventIdentity,
        history: Option<&HistoryAsk<'_>>,
    ) -> Result<(Option<FirstDelivery>, Vec<VerificationRecord>), StoreError> {
        let ask = claims::ClaimAsk {
            identity: identity.clone(),
            history: history.map(Into::into),
        };
        let (answer, records) =
            self.claims.submit(ask).await.unwrap_or_else(|| {
                Err(StoreError::Unavailable("the store is shutting down".into()))
            })?;
        match answer {
            claims::ClaimAnswer::Stored(first) => return Ok((Some(first), records)),
            claims::ClaimAnswer::Claimed => return Ok((None, records)),
            claims::ClaimAnswer::HeldElsewhere => {}
        }
        let connection = self.shared().await?;
        for _ in 0..CLAIM_WAIT_POLLS {
            tokio::time::sleep(CLAIM_POLL).await;
            if let Some(first) = first_delivery(&connection, identity).await? {
                return Ok((Some(first), records));
            }
        }
        Err(StoreError::Unavailable(
            "another replica is still deciding this event".into(),
        ))
    }

    async fn verifications_inner(
        &self,
        query: VerificationQuery,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let mut client = self.client().await?;
        let mut after = after_of(query.after.as_ref())?;
        let settled = self.settled(&mut client).await?;
        // Rows are read ahead only where conditions checked here may pass over some.
        let checked_here = VerificationFilter {
            number: None,
            reference: None,
            ..query.filter.clone()
        };
        let read_ahead = if checked_here.is_empty() { 1 } else { 4 };
        let batch = i64::try_from(query.limit.clamp(1, 1000) * read_ahead).unwrap_or(4000);
        let mut items = Vec::new();
        let mut examined = 0usize;
        // The number or reference looked up, if any, and the statement whose index finds
        // it; the rest of the filter is checked on each record below.
        let (statement, key) = match (&query.filter.number, &query.filter.reference) {
            (Some(number), _) => (LIST_BY_NUMBER, Some(number)),
            (None, Some(reference)) => (LIST_BY_REFERENCE, Some(reference)),
            (None, None) => (LIST_IN_RANGE, None),
        };
        loop {
            let rows = match key {
                Some(key) => {
                    client
                        .cached_query(
                            statement,
                            &[&after, &settled, &query.since, &query.until, &batch, key],
                        )
                        .await
                }
                None => {
                    client
                        .cached_query(
                            statement,
                            &[&after, &settled, &query.since, &query.until, &batch],
                        )
                        .await
                }
            }
            .map_err(failed)?;
            let exhausted = i64::try_from(rows.len()).unwrap_or(0) < batch;
            for row in rows {
                after = row.try_get(0).map_err(failed)?;
                examined += 1;
                let record = record_of(&row, 1)?;
                if query.filter.matches(&record) {
                    items.push(record);
                    if items.len() == query.limit {
                        return Ok(Page {
                            items,
                            next: Some(cursor_of(after)),
                        });
                    }
                }
                if examined >= query.scan_budget {
                    return Ok(Page {
                        items,
                        next: Some(cursor_of(after)),
                    });
                }
            }
            if exhausted {
                return Ok(Page { items, next: None });
            }
        }
    }

    async fn events_inner(&self, query: EventQuery) -> Result<Page<StoredEvent>, StoreError> {
        let mut client = self.client().await?;
        let after = after_of(query.after.as_ref())?;
        let settled = self.settled(&mut client).await?;
        let limit = i64::try_from(query.limit.max(1)).unwrap_or(i64::MAX);
        let rows = client
            .cached_query(
                "SELECT seq, received_at, app_key, event, id, body FROM verigate_events
                 WHERE seq > $1 AND seq <= $2 AND received_at >= $3 AND received_at < $4
                 ORDER BY seq LIMIT $5",
                &[&after, &settled, &query.since, &query.until, &limit],
            )
            .await
            .map_err(failed)?;
        let full = i64::try_from(rows.len()).unwrap_or(0) == limit;
        let mut items = Vec::with_capacity(rows.len());
        let mut last = after;
        for row in rows {
            last = row.get(0);
            items.push(stored_event(&row)?);
        }
        Ok(Page {
            items,
            next: full.then(|| cursor_of(last)),
        })
    }

    async fn stats_inner(&self, query: StatsQuery) -> Result<Vec<GroupStats>, StoreError> {
        let client = self.client().await?;
        stats::aggregate(&client, &query).await
    }
}

/// The record in column `at` of `row` (stored as JSON text).
fn record_of(row: &Row, at: usize) -> Result<VerificationRecord, StoreError> {
    let text: &str = row.try_get(at).map_err(failed)?;
    serde_json::from_str(text).map_err(corrupt)
}

fn stored_event(row: &Row) -> Result<StoredEvent, StoreError> {
    let body: String = row.get(5);
    Ok(StoredEvent {
        seq: seq_of(row.get(0)),
        received_at: row.get(1),
        app_key: row.get(2),
        event: row.get(3),
        id: row.get(4),
        body: RawValue::from_string(body).map_err(corrupt)?,
    })
}

async fn first_delivery(
    connection: &pipeline::SharedConnection,
    identity: &EventIdentity,
) -> Result<Option<FirstDelivery>, StoreError> {
    let row = connection
        .query_opt(
            "SELECT seq, answer FROM verigate_events WHERE id = $1 AND event = $2 AND discriminator = $3",
            &[&identity.id, &identity.event, &identity.discriminator],
        )
        .await
        .map_err(failed)?;
    row.map(|row| {
        Ok(FirstDelivery {
            seq: seq_of(row.try_get(0).map_err(failed)?),
            answer: row.try_get(1).map_err(failed)?,
        })
    })
    .transpose()
}

#[async_trait::async_trait]
impl VerificationStore for PostgresStore {
    /// Across replicas too: the first replica to see a request event claims it, and one
    /// that gets the same event meanwhile waits for the first one's answer instead of
    /// deciding (and counting) it again. Other events are decided by nothing: `record`
    /// tells a repeat apart by itself, at no extra round trip.
    async fn first_delivery(
        &self,
        identity: &EventIdentity,
    ) -> Result<Option<FirstDelivery>, StoreError> {
        if identity.event != crate::events::REQUEST_EVENT {
            return Ok(None);
        }
        let found = self.claim(identity, None).await;
        self.note(&found);
        found.map(|(first, _)| first)
    }

    /// In the claim's statement: no round trip of its own.
    async fn first_delivery_with_history(
        &self,
        identity: &EventIdentity,
        history: &HistoryAsk<'_>,
    ) -> DeliveryWithHistory {
        if identity.event != crate::events::REQUEST_EVENT {
            return (
                Ok(None),
                self.recent_of_number(history.number, history.since, history.until, history.limit)
                    .await,
            );
        }
        let found = self.claim(identity, Some(history)).await;
        self.note(&found);
        match found {
            Ok((first, records)) => (Ok(first), Ok(records)),
            Err(err) => (Err(err.clone()), Err(err)),
        }
    }

    async fn record(&self, event: NewEvent) -> Result<RecordOutcome, StoreError> {
        // The writers keep health in step with what their commits do.
        self.commits.record(event).await
    }

    async fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        let connection = self.shared().await?;
        let row = connection
            .query_opt(
                "SELECT record FROM verigate_verifications WHERE id = $1 AND record IS NOT NULL",
                &[&id],
            )
            .await
            .map_err(failed)?;
        row.map(|row| record_of(&row, 0)).transpose()
    }

    async fn verifications(
        &self,
        query: VerificationQuery,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let page = self.verifications_inner(query).await;
        self.note(&page);
        page
    }

    /// One probe of the number index on the shared connection (pipelined with the
    /// claims sent at the same moment): what is committed now, without the write gate
    /// that gives listings their order.
    async fn recent_of_number(
        &self,
        number: &str,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<VerificationRecord>, StoreError> {
        let connection = self.shared().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = connection
            .query(
                "SELECT record FROM verigate_verifications
                 WHERE number = $1 AND first_seen >= $2 AND first_seen < $3 AND record IS NOT NULL
                 ORDER BY number DESC, first_seen DESC, seq DESC LIMIT $4",
                &[&number, &since, &until, &limit],
            )
            .await
            .map_err(failed)?;
        rows.iter().map(|row| record_of(row, 0)).collect()
    }

    async fn stats(&self, query: StatsQuery) -> Result<Vec<GroupStats>, StoreError> {
        self.stats_inner(query).await
    }

    async fn events(&self, query: EventQuery) -> Result<Page<StoredEvent>, StoreError> {
        self.events_inner(query).await
    }

    async fn delete_before(&self, cutoff: DateTime<Utc>) -> Result<Deleted, StoreError> {
        let client = self.client().await?;
        // A deleted verification's events go too (they are its identities), and so does
        // every event received before the cutoff.
        let row = client
            .cached_one(
                "WITH gone AS (
                     DELETE FROM verigate_verifications WHERE first_seen < $1 RETURNING id
                 ), events AS (
                     DELETE FROM verigate_events
                     WHERE received_at < $1 OR id IN (SELECT id FROM gone) RETURNING 1
                 ), claims AS (
                     DELETE FROM verigate_claims WHERE id IN (SELECT id FROM gone)
                 )
                 SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM events)",
                &[&cutoff],
            )
            .await
            .map_err(failed)?;
        let (verifications, events): (i64, i64) = (row.get(0), row.get(1));
        Ok(Deleted {
            verifications: usize::try_from(verifications).unwrap_or(usize::MAX),
            events: usize::try_from(events).unwrap_or(usize::MAX),
        })
    }

    async fn load_state(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let client = self.client().await?;
        let row = client
            .cached_opt("SELECT value FROM verigate_state WHERE name = $1", &[&name])
            .await
            .map_err(failed)?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn save_state(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .cached_execute(
                "INSERT INTO verigate_state (name, value) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                &[&name, &value],
            )
            .await
            .map_err(failed)?;
        Ok(())
    }

    fn health(&self) -> StoreHealth {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn size_on_disk(&self) -> Option<u64> {
        None
    }

    async fn shutdown(&self) -> Result<(), StoreError> {
        self.probe.abort();
        self.pool.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            redacted("postgres://verigate:s3cret@db.internal:5432/verigate"),
            "postgres://verigate:***@db.internal:5432/verigate"
        );
        // A password containing `@` is hidden whole.
        assert_eq!(
            redacted("postgresql://u:p@ss@db/x"),
            "postgresql://u:***@db/x"
        );
        assert_eq!(redacted("postgres://db/x"), "postgres://db/x");
        assert!(!redacted("not a url s3cret").contains("s3cret"));
    }
}
