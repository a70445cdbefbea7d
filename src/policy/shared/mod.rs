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
//!
//! A decision reads and bumps all its counters in one round trip and settles in a
//! second (counter_ops.rs); both travel on a few connections shared by every decision
//! (`store::postgres::pipeline`), so that concurrent decisions pipeline instead of
//! queueing for connections of their own.

mod approximate;
mod counter_ops;
mod jobs;
mod sharing;

use std::{
    future::Future,
    sync::{Arc, Mutex, PoisonError, Weak},
    time::Duration,
};

use approximate::ApproximateCounters;
use chrono::{DateTime, TimeZone, Utc};
use deadpool_postgres::{Object, Pool};
use futures_util::future::LocalBoxFuture;
use secrecy::ExposeSecret;

pub(crate) use counter_ops::Planner;
use counter_ops::{
    counter_store_by_ops, worth_prefetching, AnswersOps, CounterOp, OpKind, OpResult, Replay,
};
use jobs::{CounterJob, CounterWorker, JobDone};
use tokio_postgres::{types::ToSql, Row};

use super::{
    adaptive::{
        count_outcome, Block, BlockSpec, Evidence, Quarantine, QuarantineState, Resolution, Tracked,
    },
    counters::{CounterKey, CounterStore},
    PolicyError, ReplicaReport,
};
use crate::{
    store::{
        postgres::{
            batch::{self, BatchQueue},
            claims::{self, ClaimQueue, Claimer},
            pipeline::{self, Pipeline, SharedConnection},
            pool, Cached, PostgresOptions,
        },
        OutcomeBookChange,
    },
    telemetry::OncePer,
};

/// How often each replica reloads the quarantines and reports its policy version.
pub const SYNC_EVERY: Duration = Duration::from_millis(500);
/// How often a replica looks for verifications whose time to complete has passed.
const EXPIRE_EVERY: Duration = Duration::from_secs(1);
const EVIDENCE_PER_KEY: i64 = 10;
/// Overdue verifications counted per round, so one round stays short after an outage.
const EXPIRE_BATCH: i64 = 1000;
/// Connections for the policy's occasional statements (expiry sweeps, evidence,
/// heartbeats; decisions go through the counter worker): two, so that one slow
/// statement does not hold up the others.
const SIDE_CONNECTIONS: usize = 2;
/// Batches of counter jobs in flight at once per replica, and jobs per batch.
/// One: batches of several replicas lock the same hot counters (a country's, a spend
/// cap's), so more batches in flight wait on each other more than they gain. Measured on
/// two cores: three replicas do 2,066 callbacks/s with one worker each, 1,839 with three.
const COUNTER_WORKERS: usize = 1;
const JOBS_PER_BATCH: usize = 64;

pub struct SharedState {
    /// The claims that ride with the counter batches, kept for the stores that open on
    /// this database (they find it by its URL).
    _claims: Arc<ClaimQueue>,
    /// Connections with asynchronous commit (counters, outcome book), shared by every
    /// decision at once.
    fast: Arc<Pipeline>,
    /// Counter work of decisions and outcomes, done in batches on `fast`.
    counters: BatchQueue<CounterJob, Result<JobDone, PolicyError>>,
    /// Counter work of outcomes, in batches of their own on a connection of their own:
    /// an outcome steps the sequential levels that every decision of a country reads,
    /// and a decision's batch must not wait for those row locks (another replica's
    /// outcomes hold them too).
    outcomes: BatchQueue<CounterJob, Result<JobDone, PolicyError>>,
    /// Connections with synchronous commit (quarantines).
    safe: Pool,
    replica: String,
    version: Mutex<String>,
    expiry: OncePer,
    outage_log: OncePer,
    /// Counters of the rules counted approximately, in memory.
    approximate: ApproximateCounters,
    /// Where this replica stands in exchanging them with the others (sharing.rs).
    exchange: Mutex<sharing::Exchange>,
    /// Shares go on a connection of their own, so that a share never holds up a decision.
    share_connection: Arc<Pipeline>,
}

pub(super) fn failed<E: std::fmt::Display + 'static>(err: E) -> PolicyError {
    // The server's own words when it said something ("db error" says nothing).
    let said = (&err as &dyn std::any::Any)
        .downcast_ref::<tokio_postgres::Error>()
        .map(crate::store::postgres::explain);
    PolicyError(format!(
        "shared policy state (PostgreSQL): {}",
        said.unwrap_or_else(|| err.to_string())
    ))
}

/// One statement on one of the shared connections.
async fn shared_query(
    fast: &Pipeline,
    sql: &'static str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, PolicyError> {
    let connection = fast.get().await.map_err(failed)?;
    connection.query(sql, params).await.map_err(failed)
}

/// Rows of `id, tracked` taken out of the outcome book.
pub(super) fn tracked_rows(rows: Vec<Row>) -> Result<Vec<(String, Tracked)>, PolicyError> {
    rows.into_iter()
        .map(|r| {
            let id: String = r.try_get(0).map_err(failed)?;
            let tracked: serde_json::Value = r.try_get(1).map_err(failed)?;
            Ok((id, serde_json::from_value(tracked).map_err(failed)?))
        })
        .collect()
}

fn at(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

impl SharedState {
    /// Connections are made on first use: the database may not be up yet.
    pub fn new(options: &PostgresOptions, replica: String) -> Result<Arc<Self>, PolicyError> {
        let timeout = Duration::from_secs(2);
        let config = crate::store::postgres::config(options).map_err(PolicyError)?;
        let fast = Arc::new(Pipeline::new(
            config,
            Some(pipeline::INDEXED_ASYNC_COMMIT),
            SIDE_CONNECTIONS,
            timeout,
        ));
        let safe = {
            let _entered = pipeline::runtime().enter();
            pool(options, None, timeout).map_err(failed)?
        };
        // A connection of the workers' own, apart from the decisions': a batch never queues
        // behind a single-row read in a pipeline.
        let counter_connection = Arc::new(Pipeline::new(
            crate::store::postgres::config(options).map_err(PolicyError)?,
            Some(pipeline::INDEXED_ASYNC_COMMIT),
            COUNTER_WORKERS,
            timeout,
        ));
        let worker = CounterWorker {
            connections: Arc::clone(&counter_connection),
        };
        // Claims of request events go out with the decisions' counters: a request event
        // is claimed in one round trip and decided in the next, and each round trip
        // carries both stages of the callbacks in flight (store/postgres/claims.rs).
        let claimer = Claimer {
            connections: Arc::clone(&counter_connection),
        };
        let (claims, counters) =
            batch::start_paired(claimer, worker, JOBS_PER_BATCH, claims::QUEUE);
        let claims = Arc::new(claims);
        claims::ride_with_counters(options.url.expose_secret(), &claims);
        let outcome_worker = CounterWorker {
            connections: Arc::new(Pipeline::new(
                crate::store::postgres::config(options).map_err(PolicyError)?,
                Some(pipeline::INDEXED_ASYNC_COMMIT),
                1,
                timeout,
            )),
        };
        let outcomes = BatchQueue::start(vec![outcome_worker], JOBS_PER_BATCH, 4096, None);
        let exchange = Mutex::new(sharing::Exchange::new(&replica));
        Ok(Arc::new(Self {
            _claims: claims,
            fast,
            counters,
            outcomes,
            safe,
            replica,
            version: Mutex::new(String::new()),
            expiry: OncePer::new(EXPIRE_EVERY),
            outage_log: OncePer::new(Duration::from_secs(10)),
            approximate: ApproximateCounters::default(),
            exchange,
            share_connection: Arc::new(Pipeline::new(
                crate::store::postgres::config(options).map_err(PolicyError)?,
                Some(pipeline::INDEXED_ASYNC_COMMIT),
                1,
                timeout,
            )),
        }))
    }

    /// Runs database work on the database runtime and waits for it. Works from any
    /// thread, async or not: the caller only blocks on a channel.
    fn run<T, F>(&self, work: F) -> Result<T, PolicyError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, PolicyError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        pipeline::runtime().spawn(async move {
            let _ = tx.send(work.await);
        });
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

    /// The shared connections, for work that runs on the database runtime.
    fn fast_handle(&self) -> Arc<Pipeline> {
        Arc::clone(&self.fast)
    }

    fn share_handle(&self) -> Arc<Pipeline> {
        Arc::clone(&self.share_connection)
    }

    // -----------------------------------------------------------------------------------
    // Counters

    /// Does `job` in the next batch and waits for it.
    fn submit(&self, job: CounterJob) -> Result<JobDone, PolicyError> {
        pipeline::block_on(self.submit_waiting(job))
    }

    /// [`submit`](Self::submit) without holding a thread while the database works.
    async fn submit_waiting(&self, job: CounterJob) -> Result<JobDone, PolicyError> {
        let queue = if job.teaches {
            &self.outcomes
        } else {
            &self.counters
        };
        let done = queue
            .submit(job)
            .await
            .unwrap_or_else(|| Err(PolicyError("shared policy state: shut down".into())));
        if let Err(err) = &done {
            self.log_outage(err);
        }
        done
    }

    /// The rules whose counters this replica keeps approximately. Those not counted so
    /// before are loaded at once (a replica starting, a policy reloaded); when the
    /// database does not answer, the exchange loads them as soon as it does.
    pub fn set_approximate(&self, rules: std::collections::HashSet<String>) {
        self.approximate.set_rules(rules);
        self.exchange_counts();
    }

    /// One round of exchanging approximate counts with the other replicas: called every
    /// [`approximate::SHARE_EVERY`] from one thread (and once when the rules change), so
    /// rounds never overlap.
    fn exchange_counts(&self) {
        let mut exchange = self.exchange.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(err) = sharing::round(self, &mut exchange, Utc::now().timestamp_millis()) {
            self.log_outage(&err);
        }
    }

    /// Counts what the approximate counters cover of `ops` in memory; returns the rest.
    fn count_approximately(&self, ops: Vec<CounterOp>) -> Vec<CounterOp> {
        ops.into_iter()
            .filter(|op| {
                let covered = self.approximate.covers(op);
                if covered {
                    self.approximate.count(op);
                }
                !covered
            })
            .collect()
    }

    /// Performs a decision's planned operations (its share of one round trip) and
    /// answers its counter questions from them.
    pub(crate) async fn prefetch(
        &self,
        plan: Vec<CounterOp>,
        now_ms: i64,
    ) -> Result<Replay<'_>, PolicyError> {
        let (worth, job) = self.prefetch_job(&plan);
        let results = match job {
            Some(job) => self.submit_waiting(job).await?.results,
            None => Vec::new(),
        };
        Ok(self.replay_of(plan, worth, results, now_ms))
    }

    /// Which of a plan's operations go into its round trip, and the round trip (`None`:
    /// the approximate counters answer everything from memory).
    fn prefetch_job(&self, plan: &[CounterOp]) -> (Vec<bool>, Option<CounterJob>) {
        // What approximate counters answer is answered in memory, in the replay.
        let worth: Vec<bool> = worth_prefetching(plan)
            .into_iter()
            .zip(plan)
            .map(|(worth, op)| worth && !self.approximate.covers(op))
            .collect();
        let ops: Vec<CounterOp> = plan
            .iter()
            .zip(&worth)
            .filter(|(_, w)| **w)
            .map(|(op, _)| op.clone())
            .collect();
        let job = (!ops.is_empty()).then(|| CounterJob {
            ops,
            answers: true,
            ..CounterJob::default()
        });
        (worth, job)
    }

    fn replay_of(
        &self,
        plan: Vec<CounterOp>,
        worth: Vec<bool>,
        results: Vec<Option<OpResult>>,
        now_ms: i64,
    ) -> Replay<'_> {
        let mut results = results.into_iter();
        let planned = plan
            .into_iter()
            .zip(worth)
            .map(|(op, worth)| {
                (
                    op,
                    if worth {
                        results.next().flatten()
                    } else {
                        None
                    },
                )
            })
            .collect();
        Replay::new(self, now_ms, planned)
    }

    /// Ends a decision: undoes what its plan counted that it did not need and gives back
    /// the spend of a denied request (`refunds`: counter, window, amount). Returns the
    /// round trip that does it (`None`: nothing to write, the common case of an allowed
    /// request), which the caller awaits.
    pub(crate) fn settle<'a>(
        &'a self,
        replay: Replay<'_>,
        refunds: &[(CounterKey, i64, f64)],
    ) -> Result<Option<LocalBoxFuture<'a, Result<(), PolicyError>>>, PolicyError> {
        let now_ms = replay.now_ms();
        let mut ops = replay.leftovers();
        ops.extend(refunds.iter().map(|(key, window_ms, amount)| {
            CounterOp::new(OpKind::Refund, key, now_ms, *window_ms, -amount)
        }));
        let ops = self.count_approximately(ops);
        Ok(
            (!ops.is_empty()).then(|| -> LocalBoxFuture<'a, Result<(), PolicyError>> {
                let job = CounterJob {
                    ops,
                    ..CounterJob::default()
                };
                Box::pin(async move { self.submit_waiting(job).await.map(drop) })
            }),
        )
    }

    /// An allowed verification's entry in the outcome book, for the store to write with
    /// the request's record (`OutcomeBookChange::Put`).
    pub(crate) fn book_entry(tracked: &Tracked) -> Result<OutcomeBookChange, PolicyError> {
        Ok(OutcomeBookChange::Put {
            due_ms: tracked.allowed_ms + tracked.complete_after_ms,
            tracked: serde_json::to_string(tracked).map_err(failed)?,
        })
    }

    /// Writes an outcome book entry on its own, for a decision no record goes with.
    pub(crate) async fn put_in_book(
        &self,
        id: &str,
        entry: OutcomeBookChange,
    ) -> Result<(), PolicyError> {
        let OutcomeBookChange::Put { due_ms, tracked } = entry else {
            return Ok(());
        };
        self.submit_waiting(CounterJob {
            track: Some((id.to_owned(), due_ms, tracked)),
            ..CounterJob::default()
        })
        .await
        .map(drop)
    }

    // -----------------------------------------------------------------------------------
    // The outcome book

    /// Takes a tracked verification out of the book: only one replica gets it, so its
    /// outcome is counted once whichever replica receives the result.
    pub async fn resolve(&self, id: &str) -> Result<Option<Tracked>, PolicyError> {
        let done = self
            .submit_waiting(CounterJob {
                resolve: Some(id.to_owned()),
                ..CounterJob::default()
            })
            .await?;
        Ok(done.resolved)
    }

    /// Counts how tracked verifications ended, under each of their keys, and keeps the
    /// failures as evidence.
    pub async fn count_outcomes(
        &self,
        outcomes: &[(String, Tracked, Resolution)],
        now_ms: i64,
    ) -> Result<(), PolicyError> {
        let planner = Planner::default();
        let mut evidence = EvidenceRows::default();
        for (id, tracked, resolution) in outcomes {
            for ((rule, key), failure) in count_outcome(&planner, id, tracked, *resolution, now_ms)?
            {
                evidence.push(rule, key, now_ms, &failure)?;
            }
        }
        let ops = self.count_approximately(planner.into_ops());
        if ops.is_empty() && evidence.is_empty() {
            return Ok(());
        }
        self.submit_waiting(CounterJob {
            ops,
            teaches: true,
            evidence,
            ..CounterJob::default()
        })
        .await
        .map(drop)
    }

    /// Takes out the tracked verifications whose time to complete has passed and counts
    /// them as failed (at most once a second per replica; whichever replica takes one
    /// counts it).
    pub fn expire_overdue(&self, now_ms: i64) -> Result<(), PolicyError> {
        if self.expiry.due().is_none() {
            return Ok(());
        }
        let fast = self.fast_handle();
        let overdue: Vec<(String, Tracked)> = self.run(async move {
            let rows = shared_query(
                &fast,
                "DELETE FROM verigate_pending WHERE id IN (
                         SELECT id FROM verigate_pending WHERE due_ms <= $1
                         ORDER BY due_ms LIMIT $2 FOR UPDATE SKIP LOCKED
                     ) RETURNING id, tracked",
                &[&now_ms, &EXPIRE_BATCH],
            )
            .await?;
            tracked_rows(rows)
        })?;
        let outcomes: Vec<_> = overdue
            .into_iter()
            .map(|(id, tracked)| (id, tracked, Resolution::Failure))
            .collect();
        pipeline::block_on(self.count_outcomes(&outcomes, now_ms))
    }

    pub fn pending(&self) -> Result<usize, PolicyError> {
        let fast = self.fast_handle();
        self.run(async move {
            let rows = shared_query(&fast, "SELECT count(*) FROM verigate_pending", &[]).await?;
            let count: i64 = rows.first().map_or(0, |row| row.get(0));
            Ok(usize::try_from(count).unwrap_or(0))
        })
    }

    /// The latest failures under a key, oldest first.
    pub fn evidence(&self, rule: &str, key: &str) -> Result<Vec<Evidence>, PolicyError> {
        let (rule, key) = (rule.to_owned(), key.to_owned());
        let fast = self.fast_handle();
        self.run(async move {
            let rows = shared_query(
                &fast,
                "SELECT evidence FROM (
                         SELECT evidence, at_ms FROM verigate_evidence WHERE rule = $1 AND key = $2
                         ORDER BY at_ms DESC LIMIT $3
                     ) latest ORDER BY at_ms",
                &[&rule, &key, &EVIDENCE_PER_KEY],
            )
            .await?;
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
                if block.active_at(now_ms) {
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
        let replica = self.replica.clone();
        let fast = self.fast_handle();
        self.run(async move {
            shared_query(&fast, "INSERT INTO verigate_replicas (replica, policy_version, seen_at) VALUES ($1, $2, now())
                     ON CONFLICT (replica) DO UPDATE SET policy_version = excluded.policy_version, seen_at = now()",
                    &[&replica, &version],).await?;
            Ok(())
        })
    }

    /// Every replica seen in the last minute: name, policy version, last report.
    pub fn replicas(&self) -> Result<Vec<ReplicaReport>, PolicyError> {
        let me = self.replica.clone();
        let fast = self.fast_handle();
        self.run(async move {
            let rows = shared_query(
                &fast,
                "SELECT replica, policy_version, seen_at FROM verigate_replicas
                     WHERE seen_at > now() - interval '1 minute' ORDER BY replica",
                &[],
            )
            .await?;
            Ok(rows
                .into_iter()
                .map(|r| {
                    let replica: String = r.get(0);
                    ReplicaReport {
                        this: replica == me,
                        replica,
                        policy_version: r.get(1),
                        seen_at: r.get(2),
                    }
                })
                .collect())
        })
    }

    /// Deletes counts, seen members and evidence that have left every window.
    fn sweep_expired(&self, now_ms: i64) -> Result<(), PolicyError> {
        let pool = self.safe.clone();
        self.run(async move {
            Self::client(&pool)
                .await?
                .batch_execute(&format!(
                    "SET synchronous_commit = off;
                     DELETE FROM verigate_counts WHERE expires_ms < {now_ms};
                     DELETE FROM verigate_seen WHERE expires_ms < {now_ms};
                     DELETE FROM verigate_evidence WHERE at_ms < {} ;
                     DELETE FROM verigate_replicas WHERE seen_at < now() - interval '1 day';
                     DELETE FROM verigate_share_log l USING verigate_share_marks m
                         WHERE l.sharer = m.sharer AND l.share <= m.flushed
                           AND l.written_at < now() - interval '1 minute';
                     DELETE FROM verigate_share_log WHERE written_at < now() - interval '1 day';
                     DELETE FROM verigate_share_marks WHERE flushed_at < now() - interval '1 day';
                     RESET synchronous_commit;",
                    now_ms - 7 * 86_400_000
                ))
                .await
                .map_err(failed)?;
            Ok(())
        })
    }

    /// Forgets every counter of `rule` under key value `value` (a lifted block starts
    /// from fresh evidence).
    pub fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError> {
        self.approximate.forget(rule, value);
        let (rule, value) = (rule.to_owned(), value.to_owned());
        let fast = self.fast_handle();
        self.run(async move {
            let connection = fast.get().await.map_err(failed)?;
            connection
                .execute(
                    "DELETE FROM verigate_counts WHERE rule = $1 AND value = $2",
                    &[&rule, &value],
                )
                .await
                .map_err(failed)?;
            connection
                .execute(
                    "DELETE FROM verigate_seen WHERE rule = $1 AND value = $2",
                    &[&rule, &value],
                )
                .await
                .map_err(failed)?;
            Ok(())
        })
    }

    /// Mirrors the shared quarantines into `quarantine`, reports the policy version and
    /// counts overdue verifications as failed, every [`SYNC_EVERY`], until the state is
    /// dropped.
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
                    // Here rather than in a decision: a decision must not wait for it.
                    let _ = state.expire_overdue(now_ms);
                    round += 1;
                    if round % 120 == 0 {
                        let _ = state.sweep_expired(now_ms);
                    }
                }
            });
        if let Err(err) = spawned {
            tracing::error!(error.message = %err, "cannot start the shared state sync");
        }
        let state = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("verigate-share".into())
            .spawn(move || loop {
                std::thread::sleep(approximate::SHARE_EVERY);
                let Some(state) = state.upgrade() else {
                    return;
                };
                state.exchange_counts();
            });
        if let Err(err) = spawned {
            tracing::error!(error.message = %err, "cannot start sharing approximate counts");
        }
    }
}

/// Failures to keep as evidence, as the columns of one insert.
#[derive(Default)]
pub(crate) struct EvidenceRows {
    rule: Vec<String>,
    key: Vec<String>,
    at_ms: Vec<i64>,
    evidence: Vec<serde_json::Value>,
}

impl EvidenceRows {
    fn push(
        &mut self,
        rule: String,
        key: String,
        at_ms: i64,
        evidence: &Evidence,
    ) -> Result<(), PolicyError> {
        self.evidence
            .push(serde_json::to_value(evidence).map_err(failed)?);
        self.rule.push(rule);
        self.key.push(key);
        self.at_ms.push(at_ms);
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.rule.is_empty()
    }

    fn extend(&mut self, other: &EvidenceRows) {
        self.rule.extend_from_slice(&other.rule);
        self.key.extend_from_slice(&other.key);
        self.at_ms.extend_from_slice(&other.at_ms);
        self.evidence.extend_from_slice(&other.evidence);
    }

    async fn insert(&self, connection: &SharedConnection) -> Result<(), PolicyError> {
        if self.is_empty() {
            return Ok(());
        }
        connection
            .execute(
                "INSERT INTO verigate_evidence (rule, key, at_ms, evidence)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::jsonb[])",
                &[&self.rule, &self.key, &self.at_ms, &self.evidence],
            )
            .await
            .map(drop)
            .map_err(failed)
    }
}

impl AnswersOps for SharedState {
    /// One operation in a job of its own: what anything but a decision (tools, tests,
    /// a question a decision's plan did not foresee) asks of the shared counters.
    fn answer(&self, op: CounterOp) -> Result<OpResult, PolicyError> {
        if self.approximate.covers(&op) {
            return Ok(self.approximate.answer(&op));
        }
        let done = self.submit(CounterJob {
            ops: vec![op],
            answers: true,
            ..CounterJob::default()
        })?;
        done.results
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| PolicyError("shared counters: no answer to an operation".into()))
    }

    fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError> {
        SharedState::forget(self, rule, value)
    }

    /// The keys of the rules counted approximately: every replica holds all of them.
    fn keys(&self) -> usize {
        self.approximate.len()
    }
}

counter_store_by_ops!(SharedState);
