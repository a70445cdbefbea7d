//! The PostgreSQL backend: one database shared by any number of verigate replicas.
//!
//! - An event is one row in `verigate_events`, unique on its identity, so the same event
//!   delivered to two replicas at once is stored once: the second insert finds the first
//!   and answers what it answered.
//! - A verification is one row in `verigate_verifications`, merged under a row lock by
//!   whichever replica gets each event, so events join whatever replica receives them.
//! - Every write commits with synchronous commit before the caller acknowledges it.
//! - Listings are ordered by creation (the first event's sequence number). A page only
//!   goes up to a sequence number below which every write has committed: each write holds
//!   a shared advisory lock (the "write gate") for its transaction, and a page first takes
//!   the gate exclusively for an instant, which waits for the writes in flight (a few
//!   milliseconds) and so learns a point that no later commit can land behind. That is
//!   what keeps pagination gap-free with writers on several replicas.

mod schema;

use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Object, Pool};
use secrecy::{ExposeSecret, SecretString};
use serde_json::value::RawValue;
use tokio_postgres::{types::ToSql, NoTls, Row};

use super::{
    Cursor, Deleted, EventIdentity, EventQuery, FirstDelivery, GroupStats, NewEvent, Page,
    RecordOutcome, RecordStamp, StatsBuilder, StatsQuery, StoreError, StoreHealth, StoredEvent,
    VerificationQuery, VerificationRecord, VerificationStore,
};

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
    pool: Pool,
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

/// How often readiness re-checks the database.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn probe(pool: Pool, health: Arc<Mutex<StoreHealth>>) {
    for round in 0u64.. {
        tokio::time::sleep(PROBE_EVERY).await;
        if round % 60 == 59 {
            // Claims are only needed while an event is being decided.
            if let Ok(client) = pool.get().await {
                let _ = client
                    .simple_query(
                        "DELETE FROM verigate_claims WHERE claimed_at < now() - interval '1 minute'",
                    )
                    .await;
            }
        }
        let checked = match pool.get().await {
            Ok(client) => client
                .simple_query("SELECT 1")
                .await
                .map(drop)
                .map_err(failed),
            Err(err) => Err(pool_failed(err)),
        };
        *health.lock().unwrap_or_else(PoisonError::into_inner) = match checked {
            Ok(()) => StoreHealth::Ready,
            Err(err) => StoreHealth::Degraded(err.to_string()),
        };
    }
}

pub(super) fn failed(err: tokio_postgres::Error) -> StoreError {
    StoreError::Failed(format!("PostgreSQL: {}", explain(&err)))
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
fn config(options: &PostgresOptions) -> Result<tokio_postgres::Config, String> {
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
        let health = Arc::new(Mutex::new(StoreHealth::Ready));
        let probe = tokio::spawn(probe(pool.clone(), Arc::clone(&health)));
        Ok(Self {
            pool,
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

    async fn claim(&self, identity: &EventIdentity) -> Result<Option<FirstDelivery>, StoreError> {
        let client = self.client().await?;
        if let Some(first) = first_delivery(&client, identity).await? {
            return Ok(Some(first));
        }
        // A claim left by a replica that died deciding is taken over after a while.
        let claimed = client
            .cached_opt(
                "INSERT INTO verigate_claims (id, event, discriminator, claimed_at)
                 VALUES ($1, $2, $3, now())
                 ON CONFLICT (id, event, discriminator) DO UPDATE SET claimed_at = now()
                 WHERE verigate_claims.claimed_at < now() - interval '10 seconds'
                 RETURNING 1",
                &[&identity.id, &identity.event, &identity.discriminator],
            )
            .await
            .map_err(failed)?;
        if claimed.is_some() {
            return Ok(None);
        }
        for _ in 0..CLAIM_WAIT_POLLS {
            tokio::time::sleep(CLAIM_POLL).await;
            if let Some(first) = first_delivery(&client, identity).await? {
                return Ok(Some(first));
            }
        }
        Err(StoreError::Unavailable(
            "another replica is still deciding this event".into(),
        ))
    }

    async fn record_inner(&self, event: NewEvent) -> Result<RecordOutcome, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(failed)?;
        let identity = &event.identity;
        let answer = event.decision.as_ref().map(|d| d.answer.clone());
        let body = String::from_utf8_lossy(&event.body);
        let inserted = tx
            .cached_opt(
                // The write gate first (see the module's comment), in the same statement.
                "WITH gate AS (SELECT pg_advisory_xact_lock_shared($8))
                 INSERT INTO verigate_events (id, event, discriminator, received_at, app_key, body, answer)
                 SELECT $1, $2, $3, $4, $5, $6, $7 FROM gate
                 ON CONFLICT (id, event, discriminator) DO NOTHING
                 RETURNING seq",
                &[
                    &identity.id,
                    &identity.event,
                    &identity.discriminator,
                    &event.received_at,
                    &event.app_key,
                    &body.as_ref(),
                    &answer,
                    &WRITE_GATE,
                ],
            )
            .await
            .map_err(failed)?;
        let Some(inserted) = inserted else {
            // Stored before (by this replica or another): answer what the first got.
            drop(tx);
            return Ok(match first_delivery(&client, identity).await? {
                Some(first) => RecordOutcome::Duplicate(first),
                None => {
                    return Err(StoreError::Unavailable(
                        "a concurrent delivery of this event did not commit; retry".into(),
                    ))
                }
            });
        };
        let seq: i64 = inserted.get(0);
        // The first event of a verification creates its row; later ones lock it (the
        // no-op update) and merge.
        let row = tx
            .cached_one(
                "INSERT INTO verigate_verifications (id, seq, first_seen) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET id = excluded.id
                 RETURNING seq, first_seen, record",
                &[&identity.id, &seq, &event.received_at],
            )
            .await
            .map_err(failed)?;
        let (record_seq, first_seen): (i64, DateTime<Utc>) = (row.get(0), row.get(1));
        let existing: Option<serde_json::Value> = row.get(2);
        let existing: Option<VerificationRecord> = existing
            .map(serde_json::from_value)
            .transpose()
            .map_err(corrupt)?;
        let lacks_number = existing.as_ref().is_none_or(|r| r.number.is_none());
        let number = event
            .number
            .as_ref()
            .filter(|_| lacks_number)
            .map(|n| (n.stored.clone(), n.facts()));
        let record = VerificationRecord::apply(
            existing,
            &event.event,
            RecordStamp {
                app_key: &event.app_key,
                seq: seq_of(record_seq),
                ordered_at: first_seen,
                received_at: event.received_at,
            },
            number
                .as_ref()
                .map(|(stored, facts)| (stored.as_str(), facts)),
            event.decision.as_ref(),
        );
        let json = serde_json::to_value(&record).map_err(corrupt)?;
        tx.cached_execute(
            "UPDATE verigate_verifications SET record = $2, number = $3, reference = $4 WHERE id = $1",
            &[&identity.id, &json, &record.number, &record.reference],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(RecordOutcome::Stored { seq: seq_of(seq) })
    }

    async fn verifications_inner(
        &self,
        query: VerificationQuery,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let mut client = self.client().await?;
        let mut after = after_of(query.after.as_ref())?;
        let settled = self.settled(&mut client).await?;
        let batch = i64::try_from(query.limit.clamp(1, 1000) * 4).unwrap_or(4000);
        let mut items = Vec::new();
        let mut examined = 0usize;
        loop {
            let rows = client
                .cached_query(
                    "SELECT seq, record FROM verigate_verifications
                     WHERE seq > $1 AND seq <= $2 AND record IS NOT NULL
                       AND first_seen >= $3 AND first_seen < $4
                       AND ($5::text IS NULL OR number = $5)
                       AND ($6::text IS NULL OR lower(reference) = lower($6))
                     ORDER BY seq LIMIT $7",
                    &[
                        &after,
                        &settled,
                        &query.since,
                        &query.until,
                        &query.filter.number,
                        &query.filter.reference,
                        &batch,
                    ],
                )
                .await
                .map_err(failed)?;
            let exhausted = i64::try_from(rows.len()).unwrap_or(0) < batch;
            for row in rows {
                after = row.get(0);
                examined += 1;
                let record: VerificationRecord =
                    serde_json::from_value(row.get(1)).map_err(corrupt)?;
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
        let mut builder = StatsBuilder::new(query.group_by.clone());
        let mut after = 0i64;
        loop {
            let rows = client
                .cached_query(
                    "SELECT seq, record FROM verigate_verifications
                     WHERE seq > $1 AND record IS NOT NULL AND first_seen >= $2 AND first_seen < $3
                     ORDER BY seq LIMIT 5000",
                    &[&after, &query.since, &query.until],
                )
                .await
                .map_err(failed)?;
            if rows.is_empty() {
                return Ok(builder.finish());
            }
            for row in rows {
                after = row.get(0);
                let record: VerificationRecord =
                    serde_json::from_value(row.get(1)).map_err(corrupt)?;
                builder.add(&record.stats_row());
            }
        }
    }
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
    client: &Object,
    identity: &EventIdentity,
) -> Result<Option<FirstDelivery>, StoreError> {
    let row = client
        .cached_opt(
            "SELECT seq, answer FROM verigate_events WHERE id = $1 AND event = $2 AND discriminator = $3",
            &[&identity.id, &identity.event, &identity.discriminator],
        )
        .await
        .map_err(failed)?;
    Ok(row.map(|row| FirstDelivery {
        seq: seq_of(row.get(0)),
        answer: row.get(1),
    }))
}

#[async_trait::async_trait]
impl VerificationStore for PostgresStore {
    /// Across replicas too: the first replica to see an event claims it, and one that
    /// gets the same event meanwhile waits for the first one's answer instead of
    /// deciding (and counting) it again.
    async fn first_delivery(
        &self,
        identity: &EventIdentity,
    ) -> Result<Option<FirstDelivery>, StoreError> {
        let found = self.claim(identity).await;
        self.note(&found);
        found
    }

    async fn record(&self, event: NewEvent) -> Result<RecordOutcome, StoreError> {
        let outcome = self.record_inner(event).await;
        self.note(&outcome);
        outcome
    }

    async fn verification(&self, id: &str) -> Result<Option<VerificationRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .cached_opt(
                "SELECT record FROM verigate_verifications WHERE id = $1 AND record IS NOT NULL",
                &[&id],
            )
            .await
            .map_err(failed)?;
        row.map(|row| serde_json::from_value(row.get(0)).map_err(corrupt))
            .transpose()
    }

    async fn verifications(
        &self,
        query: VerificationQuery,
    ) -> Result<Page<VerificationRecord>, StoreError> {
        let page = self.verifications_inner(query).await;
        self.note(&page);
        page
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
