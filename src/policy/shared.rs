//! Policy state kept in PostgreSQL, so that N replicas decide as one: counters (rate
//! limits, distinct numbers, spend), the book of allowed verifications awaiting their
//! outcome, quarantines with their escalation, and which policy version each replica
//! runs. On sled all of this stays in memory (counters.rs, adaptive.rs).
//!
//! Counters and the outcome book are written with asynchronous commit: a database crash
//! may lose the last fraction of a second of counts (a few requests counted as unseen),
//! never a stored callback, and decisions do not wait for a disk flush per request.
//! Quarantines are written with synchronous commit: an operator's lift or pin is not
//! lost. Checks that must not race across replicas happen in the database: a rate count
//! is an atomic increment, and a spend cap is checked and added under a lock per key.

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::ToSql;

use super::{
    adaptive::{Block, BlockSpec, Evidence, Quarantine, QuarantineState, Tracked},
    counters::{CounterKey, CounterStore},
    PolicyError,
};
use crate::{
    store::postgres::{pool, Cached, PostgresOptions},
    telemetry::OncePer,
};

/// How often each replica reloads the quarantines and reports its policy version.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);
/// How often a replica looks for verifications whose time to complete has passed.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
const EVIDENCE_PER_KEY: i64 = 10;

pub struct SharedState {
    /// Its own runtime: decisions call in from threads that are not async. Only `None`
    /// while being dropped.
    runtime: Option<tokio::runtime::Runtime>,
    /// Connections with asynchronous commit (counters, outcome book).
    fast: Pool,
    /// Connections with synchronous commit (quarantines).
    safe: Pool,
    replica: String,
    version: Mutex<String>,
    expiry: OncePer,
    outage_log: OncePer,
}

fn failed<E: std::fmt::Display + 'static>(err: E) -> PolicyError {
    // The server's own words when it said something ("db error" says nothing).
    let said = (&err as &dyn std::any::Any)
        .downcast_ref::<tokio_postgres::Error>()
        .map(crate::store::postgres::explain);
    PolicyError(format!(
        "shared policy state (PostgreSQL): {}",
        said.unwrap_or_else(|| err.to_string())
    ))
}

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// The bucket a count goes into: windows are kept in tenths.
fn bucket(window_ms: i64, now_ms: i64) -> i64 {
    let width = (window_ms / 10).max(1);
    now_ms.div_euclid(width) * width
}

impl SharedState {
    /// Connections are made on first use: the database may not be up yet.
    pub fn new(options: &PostgresOptions, replica: String) -> Result<Arc<Self>, PolicyError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("verigate-shared-state")
            .enable_all()
            .build()
            .map_err(failed)?;
        let (fast, safe) = {
            let _entered = runtime.enter();
            let timeout = Duration::from_secs(2);
            (
                pool(options, Some("-c synchronous_commit=off"), timeout).map_err(failed)?,
                pool(options, None, timeout).map_err(failed)?,
            )
        };
        Ok(Arc::new(Self {
            runtime: Some(runtime),
            fast,
            safe,
            replica,
            version: Mutex::new(String::new()),
            expiry: OncePer::new(EXPIRE_EVERY),
            outage_log: OncePer::new(Duration::from_secs(10)),
        }))
    }

    /// Runs database work on the state's runtime and waits for it. Works from any
    /// thread, async or not: the caller only blocks on a channel.
    fn run<T, F>(&self, work: F) -> Result<T, PolicyError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, PolicyError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                let _ = tx.send(work.await);
            });
        }
        let outcome = rx
            .recv()
            .unwrap_or_else(|_| Err(PolicyError("shared policy state: shut down".into())));
        if let Err(err) = &outcome {
            self.log_outage(err);
        }
        outcome
    }

    /// One log line per ten seconds of outage, not one per request.
    fn log_outage(&self, err: &PolicyError) {
        if let Some(held_back) = self.outage_log.due() {
            tracing::error!(error.message = %err.0, held_back, "shared policy state unreachable");
        }
    }

    async fn client(pool: &Pool) -> Result<Object, PolicyError> {
        pool.get().await.map_err(failed)
    }

    pub fn set_version(&self, version: &str) {
        *self.version.lock().unwrap_or_else(PoisonError::into_inner) = version.to_owned();
    }

    // -----------------------------------------------------------------------------------
    // The outcome book

    /// Starts tracking an allowed verification until its outcome or its expiry.
    pub fn track(&self, id: &str, tracked: &Tracked) -> Result<(), PolicyError> {
        let (pool, id) = (self.fast.clone(), id.to_owned());
        let due_ms = tracked.allowed_ms + tracked.complete_after_ms;
        let json = serde_json::to_value(tracked).map_err(failed)?;
        self.run(async move {
            Self::client(&pool)
                .await?
                .cached_execute(
                    "INSERT INTO verigate_pending (id, due_ms, tracked) VALUES ($1, $2, $3)
                     ON CONFLICT (id) DO UPDATE SET due_ms = excluded.due_ms, tracked = excluded.tracked",
                    &[&id, &due_ms, &json],
                )
                .await
                .map_err(failed)?;
            Ok(())
        })
    }

    /// Takes a tracked verification out of the book: only one replica gets it, so its
    /// outcome is counted once whichever replica receives the result.
    pub fn resolve(&self, id: &str) -> Result<Option<Tracked>, PolicyError> {
        let (pool, id) = (self.fast.clone(), id.to_owned());
        self.run(async move {
            let row = Self::client(&pool)
                .await?
                .cached_opt(
                    "DELETE FROM verigate_pending WHERE id = $1 RETURNING tracked",
                    &[&id],
                )
                .await
                .map_err(failed)?;
            row.map(|r| serde_json::from_value(r.get(0)).map_err(failed))
                .transpose()
        })
    }

    /// Takes out the tracked verifications whose time to complete has passed (at most
    /// once a second per replica; whichever replica takes one counts it).
    pub fn due(&self, now_ms: i64) -> Result<Vec<(String, Tracked)>, PolicyError> {
        if self.expiry.due().is_none() {
            return Ok(Vec::new());
        }
        let pool = self.fast.clone();
        self.run(async move {
            let rows = Self::client(&pool)
                .await?
                .cached_query(
                    "DELETE FROM verigate_pending WHERE due_ms <= $1 RETURNING id, tracked",
                    &[&now_ms],
                )
                .await
                .map_err(failed)?;
            rows.into_iter()
                .map(|r| Ok((r.get(0), serde_json::from_value(r.get(1)).map_err(failed)?)))
                .collect()
        })
    }

    pub fn pending(&self) -> Result<usize, PolicyError> {
        let pool = self.fast.clone();
        self.run(async move {
            let row = Self::client(&pool)
                .await?
                .cached_one("SELECT count(*) FROM verigate_pending", &[])
                .await
                .map_err(failed)?;
            Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    /// Keeps a failure under a block key, for the operator reviewing a block.
    pub fn remember(
        &self,
        rule: &str,
        key: &str,
        evidence: &Evidence,
        now_ms: i64,
    ) -> Result<(), PolicyError> {
        let (pool, rule, key) = (self.fast.clone(), rule.to_owned(), key.to_owned());
        let json = serde_json::to_value(evidence).map_err(failed)?;
        self.run(async move {
            Self::client(&pool)
                .await?
                .cached_execute(
                    "INSERT INTO verigate_evidence (rule, key, at_ms, evidence) VALUES ($1, $2, $3, $4)",
                    &[&rule, &key, &now_ms, &json],
                )
                .await
                .map_err(failed)?;
            Ok(())
        })
    }

    /// The latest failures under a key, oldest first.
    pub fn evidence(&self, rule: &str, key: &str) -> Result<Vec<Evidence>, PolicyError> {
        let (pool, rule, key) = (self.fast.clone(), rule.to_owned(), key.to_owned());
        self.run(async move {
            let rows = Self::client(&pool)
                .await?
                .cached_query(
                    "SELECT evidence FROM (
                         SELECT evidence, at_ms FROM verigate_evidence WHERE rule = $1 AND key = $2
                         ORDER BY at_ms DESC LIMIT $3
                     ) latest ORDER BY at_ms",
                    &[&rule, &key, &EVIDENCE_PER_KEY],
                )
                .await
                .map_err(failed)?;
            rows.into_iter()
                .map(|r| serde_json::from_value(r.get(0)).map_err(failed))
                .collect()
        })
    }

    // -----------------------------------------------------------------------------------
    // Quarantines

    /// Blocks `key` for `rule` unless it is blocked already, escalating from the key's
    /// history: one step for all replicas, under a lock per key.
    pub fn trip(
        &self,
        rule: &str,
        key: &str,
        now_ms: i64,
        spec: &BlockSpec,
        reason: String,
        evidence: Vec<Evidence>,
    ) -> Result<Block, PolicyError> {
        let (pool, rule, key, spec) = (
            self.safe.clone(),
            rule.to_owned(),
            key.to_owned(),
            spec.clone(),
        );
        self.run(async move {
            let mut client = Self::client(&pool).await?;
            let tx = client.transaction().await.map_err(failed)?;
            tx.cached_execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1::text || chr(31) || $2::text, 0))",
                &[&rule, &key],
            )
            .await
            .map_err(failed)?;
            let existing = tx
                .cached_opt(
                    "SELECT block FROM verigate_blocks WHERE rule = $1 AND key = $2",
                    &[&rule, &key],
                )
                .await
                .map_err(failed)?;
            if let Some(row) = existing {
                let block: Block = serde_json::from_value(row.get(0)).map_err(failed)?;
                if block.until.is_none_or(|u| u.timestamp_millis() > now_ms) {
                    return Ok(block);
                }
            }
            let history = tx
                .cached_opt(
                    "SELECT strikes, ended_ms FROM verigate_block_history WHERE rule = $1 AND key = $2",
                    &[&rule, &key],
                )
                .await
                .map_err(failed)?;
            let last = history.map(|r| {
                (
                    u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
                    r.get::<_, i64>(1),
                )
            });
            let block = spec.block(&rule, &key, last, now_ms, reason, evidence);
            let until_ms = block.until.map(|u| u.timestamp_millis());
            let json = serde_json::to_value(&block).map_err(failed)?;
            tx.cached_execute(
                "INSERT INTO verigate_blocks (rule, key, block, until_ms) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (rule, key) DO UPDATE SET block = excluded.block, until_ms = excluded.until_ms",
                &[&rule, &key, &json, &until_ms],
            )
            .await
            .map_err(failed)?;
            tx.commit().await.map_err(failed)?;
            tracing::warn!(
                rule = %block.rule, key = %block.key, strikes = block.strikes,
                "policy quarantined a key: {}", block.reason
            );
            Ok(block)
        })
    }

    /// Lifts every block on `key`, for every replica; the next trip starts afresh.
    pub fn lift(&self, key: &str) -> Result<Vec<Block>, PolicyError> {
        let (pool, key) = (self.safe.clone(), key.to_owned());
        self.run(async move {
            let client = Self::client(&pool).await?;
            let rows = client
                .cached_query(
                    "WITH lifted AS (DELETE FROM verigate_blocks WHERE key = $1 RETURNING rule, block),
                          forgotten AS (DELETE FROM verigate_block_history h USING lifted
                                        WHERE h.key = $1 AND h.rule = lifted.rule),
                          cleared AS (DELETE FROM verigate_evidence e USING lifted
                                      WHERE e.key = $1 AND e.rule = lifted.rule)
                     SELECT block FROM lifted",
                    &[&key],
                )
                .await
                .map_err(failed)?;
            rows.into_iter()
                .map(|r| serde_json::from_value(r.get(0)).map_err(failed))
                .collect()
        })
    }

    /// Makes every block on `key` permanent, for every replica.
    pub fn pin(&self, key: &str) -> Result<Vec<Block>, PolicyError> {
        let (pool, key) = (self.safe.clone(), key.to_owned());
        self.run(async move {
            let client = Self::client(&pool).await?;
            let rows = client
                .cached_query(
                    "UPDATE verigate_blocks SET until_ms = NULL,
                         block = jsonb_set(block, '{until}', 'null'::jsonb)
                     WHERE key = $1 RETURNING block",
                    &[&key],
                )
                .await
                .map_err(failed)?;
            rows.into_iter()
                .map(|r| serde_json::from_value(r.get(0)).map_err(failed))
                .collect()
        })
    }

    /// Ends the blocks whose time is up (keeping their escalation history), then reads
    /// every active block and the history: what each replica's quarantine mirrors.
    pub fn quarantines(&self, now_ms: i64) -> Result<QuarantineState, PolicyError> {
        let pool = self.safe.clone();
        self.run(async move {
            let client = Self::client(&pool).await?;
            client
                .cached_execute(
                    "WITH ended AS (
                         DELETE FROM verigate_blocks WHERE until_ms IS NOT NULL AND until_ms <= $1
                         RETURNING rule, key, (block->>'strikes')::integer AS strikes, until_ms
                     )
                     INSERT INTO verigate_block_history (rule, key, strikes, ended_ms)
                     SELECT rule, key, strikes, until_ms FROM ended
                     ON CONFLICT (rule, key) DO UPDATE
                         SET strikes = excluded.strikes, ended_ms = excluded.ended_ms",
                    &[&now_ms],
                )
                .await
                .map_err(failed)?;
            let blocks = client
                .cached_query("SELECT block FROM verigate_blocks", &[])
                .await
                .map_err(failed)?
                .into_iter()
                .map(|r| serde_json::from_value(r.get(0)).map_err(failed))
                .collect::<Result<Vec<Block>, _>>()?;
            let history = client
                .cached_query(
                    "SELECT rule, key, strikes, ended_ms FROM verigate_block_history",
                    &[],
                )
                .await
                .map_err(failed)?
                .into_iter()
                .map(|r| {
                    (
                        r.get(0),
                        r.get(1),
                        u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
                        at(r.get(3)),
                    )
                })
                .collect();
            Ok(QuarantineState { blocks, history })
        })
    }

    // -----------------------------------------------------------------------------------
    // Replicas

    /// Reports this replica's policy version (each replica loads its own policy file).
    fn heartbeat(&self) -> Result<(), PolicyError> {
        let version = self
            .version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (pool, replica) = (self.fast.clone(), self.replica.clone());
        self.run(async move {
            Self::client(&pool)
                .await?
                .cached_execute(
                    "INSERT INTO verigate_replicas (replica, policy_version, seen_at) VALUES ($1, $2, now())
                     ON CONFLICT (replica) DO UPDATE SET policy_version = excluded.policy_version, seen_at = now()",
                    &[&replica, &version],
                )
                .await
                .map_err(failed)?;
            Ok(())
        })
    }

    /// Every replica seen in the last minute: name, policy version, last report.
    pub fn replicas(&self) -> Result<Vec<serde_json::Value>, PolicyError> {
        let (pool, me) = (self.fast.clone(), self.replica.clone());
        self.run(async move {
            let rows = Self::client(&pool)
                .await?
                .cached_query(
                    "SELECT replica, policy_version, seen_at FROM verigate_replicas
                     WHERE seen_at > now() - interval '1 minute' ORDER BY replica",
                    &[],
                )
                .await
                .map_err(failed)?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let name: String = r.get(0);
                    serde_json::json!({
                        "replica": name,
                        "this": name == me,
                        "policy_version": r.get::<_, String>(1),
                        "seen_at": r.get::<_, DateTime<Utc>>(2),
                    })
                })
                .collect())
        })
    }

    /// Deletes counts, seen members and evidence that have left every window.
    fn sweep_expired(&self, now_ms: i64) -> Result<(), PolicyError> {
        let pool = self.fast.clone();
        self.run(async move {
            Self::client(&pool)
                .await?
                .batch_execute(&format!(
                    "DELETE FROM verigate_counts WHERE expires_ms < {now_ms};
                     DELETE FROM verigate_seen WHERE expires_ms < {now_ms};
                     DELETE FROM verigate_evidence WHERE at_ms < {} ;
                     DELETE FROM verigate_replicas WHERE seen_at < now() - interval '1 day';",
                    now_ms - 7 * 86_400_000
                ))
                .await
                .map_err(failed)?;
            Ok(())
        })
    }

    /// Mirrors the shared quarantines into `quarantine` and reports the policy version,
    /// every [`SYNC_EVERY`], until the state is dropped.
    pub fn start_sync(self: &Arc<Self>, quarantine: &Arc<Quarantine>) {
        let (state, quarantine): (Weak<Self>, Weak<Quarantine>) =
            (Arc::downgrade(self), Arc::downgrade(quarantine));
        let spawned = std::thread::Builder::new()
            .name("verigate-state-sync".into())
            .spawn(move || {
                let mut round: u64 = 0;
                loop {
                    std::thread::sleep(SYNC_EVERY);
                    let (Some(state), Some(quarantine)) = (state.upgrade(), quarantine.upgrade())
                    else {
                        return;
                    };
                    let now_ms = Utc::now().timestamp_millis();
                    if let Ok(shared) = state.quarantines(now_ms) {
                        quarantine.mirror(shared, now_ms);
                    }
                    let _ = state.heartbeat();
                    round += 1;
                    if round % 120 == 0 {
                        let _ = state.sweep_expired(now_ms);
                    }
                }
            });
        if let Err(err) = spawned {
            tracing::error!(error.message = %err, "cannot start the shared state sync");
        }
    }
}

impl Drop for SharedState {
    /// Dropping a runtime waits for its threads, which is not allowed inside another
    /// runtime (where the service drops its policy): let them wind down on their own.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A statement's parameters after the counter key's three.
type Params = Vec<Box<dyn ToSql + Send + Sync>>;

impl SharedState {
    /// The one number a statement on one counter returns: $1 to $3 are the key's rule,
    /// condition and value, then `params`.
    fn counter_number(
        &self,
        sql: &'static str,
        key: &CounterKey,
        params: Params,
    ) -> Result<f64, PolicyError> {
        let (pool, key) = (self.fast.clone(), key.clone());
        self.run(async move {
            let mut all: Vec<&(dyn ToSql + Sync)> = vec![&key.rule, &key.condition, &key.value];
            all.extend(params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
            let row = Self::client(&pool)
                .await?
                .cached_one(sql, &all)
                .await
                .map_err(failed)?;
            Ok(row.get(0))
        })
    }
}

impl CounterStore for SharedState {
    fn add(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        amount: f64,
    ) -> Result<f64, PolicyError> {
        self.counter_number(
            "WITH added AS (
                 INSERT INTO verigate_counts (rule, condition, value, bucket, amount, expires_ms)
                 VALUES ($1, $2, $3, $4::bigint, $5::float8, $4::bigint + $6::bigint)
                 ON CONFLICT (rule, condition, value, bucket)
                 DO UPDATE SET amount = verigate_counts.amount + excluded.amount
                 RETURNING amount
             )
             SELECT (SELECT amount FROM added) + coalesce((
                 SELECT sum(amount) FROM verigate_counts
                 WHERE rule = $1 AND condition = $2 AND value = $3
                   AND bucket > $7::bigint AND bucket < $4::bigint
             ), 0)",
            key,
            vec![
                Box::new(bucket(window_ms, now_ms)),
                Box::new(amount),
                Box::new(window_ms),
                Box::new(now_ms - window_ms),
            ],
        )
    }

    fn total(&self, key: &CounterKey, window_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
        self.counter_number(
            "SELECT coalesce(sum(amount), 0) FROM verigate_counts
             WHERE rule = $1 AND condition = $2 AND value = $3 AND bucket > $4",
            key,
            vec![Box::new(now_ms - window_ms)],
        )
    }

    /// Kept in the counts table under bucket -1, with `expires_ms` as the time it goes
    /// idle: the sweep drops idle levels as it drops old buckets.
    fn accumulate(
        &self,
        key: &CounterKey,
        idle_ms: i64,
        now_ms: i64,
        step: f64,
    ) -> Result<f64, PolicyError> {
        self.counter_number(
            "INSERT INTO verigate_counts (rule, condition, value, bucket, amount, expires_ms)
             VALUES ($1, $2, $3, -1, greatest(0, $4::float8), $5::bigint + $6::bigint)
             ON CONFLICT (rule, condition, value, bucket) DO UPDATE SET
                 amount = greatest(0, CASE WHEN verigate_counts.expires_ms < $5::bigint
                                          THEN 0 ELSE verigate_counts.amount END + $4::float8),
                 expires_ms = $5::bigint + $6::bigint
             RETURNING amount",
            key,
            vec![Box::new(step), Box::new(now_ms), Box::new(idle_ms)],
        )
    }

    fn level(&self, key: &CounterKey, _idle_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
        self.counter_number(
            "SELECT coalesce(max(amount), 0) FROM verigate_counts
             WHERE rule = $1 AND condition = $2 AND value = $3
               AND bucket = -1 AND expires_ms >= $4",
            key,
            vec![Box::new(now_ms)],
        )
    }

    fn see(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        member: &str,
    ) -> Result<usize, PolicyError> {
        let (pool, key, member) = (self.fast.clone(), key.clone(), member.to_owned());
        self.run(async move {
            let row = Self::client(&pool)
                .await?
                .cached_one(
                    "WITH seen AS (
                         INSERT INTO verigate_seen (rule, condition, value, member, seen_ms, expires_ms)
                         VALUES ($1, $2, $3, $4, $5::bigint, $5::bigint + $6::bigint)
                         ON CONFLICT (rule, condition, value, member)
                         DO UPDATE SET seen_ms = excluded.seen_ms, expires_ms = excluded.expires_ms
                         RETURNING member
                     )
                     SELECT 1 + (
                         SELECT count(*) FROM verigate_seen
                         WHERE rule = $1 AND condition = $2 AND value = $3
                           AND seen_ms > $5::bigint - $6::bigint AND member <> (SELECT member FROM seen)
                     )",
                    &[
                        &key.rule,
                        &key.condition,
                        &key.value,
                        &member,
                        &now_ms,
                        &window_ms,
                    ],
                )
                .await
                .map_err(failed)?;
            Ok(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    fn add_within(
        &self,
        key: &CounterKey,
        window_ms: i64,
        now_ms: i64,
        amount: f64,
        cap: f64,
    ) -> Result<(f64, bool), PolicyError> {
        let (pool, key) = (self.fast.clone(), key.clone());
        self.run(async move {
            let mut client = Self::client(&pool).await?;
            let tx = client.transaction().await.map_err(failed)?;
            tx.cached_execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1::text || chr(31) || $2::text || chr(31) || $3::text, 0))",
                &[&key.rule, &key.condition, &key.value],
            )
            .await
            .map_err(failed)?;
            let row = tx
                .cached_one(
                    "SELECT coalesce(sum(amount), 0) FROM verigate_counts
                     WHERE rule = $1 AND condition = $2 AND value = $3 AND bucket > $4",
                    &[&key.rule, &key.condition, &key.value, &(now_ms - window_ms)],
                )
                .await
                .map_err(failed)?;
            let with = row.get::<_, f64>(0) + amount;
            let fits = with <= cap;
            if fits {
                tx.cached_execute(
                    "INSERT INTO verigate_counts (rule, condition, value, bucket, amount, expires_ms)
                     VALUES ($1, $2, $3, $4::bigint, $5::float8, $4::bigint + $6::bigint)
                     ON CONFLICT (rule, condition, value, bucket)
                     DO UPDATE SET amount = verigate_counts.amount + excluded.amount",
                    &[
                        &key.rule,
                        &key.condition,
                        &key.value,
                        &bucket(window_ms, now_ms),
                        &amount,
                        &window_ms,
                    ],
                )
                .await
                .map_err(failed)?;
            }
            tx.commit().await.map_err(failed)?;
            Ok((with, fits))
        })
    }

    fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError> {
        let (pool, rule, value) = (self.fast.clone(), rule.to_owned(), value.to_owned());
        self.run(async move {
            let client = Self::client(&pool).await?;
            for table in ["verigate_counts", "verigate_seen"] {
                client
                    .cached_execute(
                        &format!("DELETE FROM {table} WHERE rule = $1 AND value = $2"),
                        &[&rule, &value],
                    )
                    .await
                    .map_err(failed)?;
            }
            Ok(())
        })
    }

    /// Done by the sync thread for every replica.
    fn sweep(&self, _round: usize, _now_ms: i64) {}

    /// Not counted: it would cost a scan of the shared tables.
    fn keys(&self) -> usize {
        0
    }
}
