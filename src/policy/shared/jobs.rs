//! The counter work of concurrent decisions and outcomes, done together: every job in a
//! batch goes to the database in one round trip (`store::postgres::batch`).
//!
//! A job is a list of counter operations, and what goes with them: an allowed request
//! to put in the outcome book, a result's verification to take out of it, failures to
//! keep as evidence. A batch runs its jobs' operations in job order through one call of
//! `verigate_counter_ops`, and the rest as one statement each, all sent at once on one
//! connection. Outcomes read no answer, so their counts under one key are summed into
//! one operation: the global and per-country baselines that every outcome feeds are
//! written once per batch, not once per result.

use std::{collections::HashMap, sync::Arc};

use super::{
    counter_ops::{CounterOp, OpArrays, OpKind, OpResult, APPLY_OPS},
    failed, tracked_rows, EvidenceRows,
};
use crate::{
    policy::{adaptive::Tracked, counters::CounterKey, PolicyError},
    store::postgres::{
        batch::{per_item, BatchWorker},
        pipeline::Pipeline,
    },
};

/// Counter work of one decision or outcome.
#[derive(Default)]
pub(crate) struct CounterJob {
    pub(crate) ops: Vec<CounterOp>,
    /// Whether the caller reads the operations' results.
    pub(crate) answers: bool,
    /// Whether it counts outcomes: adds and steps under keys no decision writes, whose
    /// results nobody reads (see `OpKind::TaughtAdd`).
    pub(crate) teaches: bool,
    /// An allowed verification for the outcome book: id, when it is overdue, what to
    /// count of it.
    pub(crate) track: Option<(String, i64, String)>,
    pub(crate) evidence: EvidenceRows,
    /// A verification to take out of the outcome book (its result arrived).
    pub(crate) resolve: Option<String>,
}

/// What a job got back.
pub(crate) struct JobDone {
    /// One per operation of the job (`None` where the operation answers nothing).
    pub(crate) results: Vec<Option<OpResult>>,
    /// The tracked verification taken out of the book, if it was in it.
    pub(crate) resolved: Option<Tracked>,
}

/// Does batches of jobs on the shared connections.
pub(crate) struct CounterWorker {
    pub(crate) connections: Arc<Pipeline>,
}

impl BatchWorker for CounterWorker {
    type Item = CounterJob;
    type Output = Result<JobDone, PolicyError>;

    async fn run(&mut self, jobs: Vec<CounterJob>) -> Vec<Self::Output> {
        per_item(self.batch(&jobs).await, jobs.len())
    }
}

/// Where each job's operations went in the batch's one list.
struct Placed {
    ops: Vec<CounterOp>,
    /// For each job, for each of its operations, its position in `ops`.
    at: Vec<Vec<usize>>,
}

/// Lays the jobs' operations out in one list: first those of the jobs that read no
/// answer (outcomes, settlements), then the decisions', each group in job order. The
/// jobs of a batch arrived together, so any order is one they could have come in; this
/// one keeps writes to the keys that decisions read (conversion counts, levels) out of
/// the decisions' stage. Among jobs that read no answer, adds to one counter and bucket
/// are summed into one operation (dropped when they add nothing), and steps of one level
/// folded into one (such an operation's position is where it went, or `usize::MAX`).
fn place(jobs: &[CounterJob]) -> Placed {
    let mut ops: Vec<CounterOp> = Vec::new();
    let mut merged: HashMap<(&CounterKey, OpKind, i64, i64), usize> = HashMap::new();
    let mut at = vec![Vec::new(); jobs.len()];
    let writes_first = (0..jobs.len())
        .filter(|&j| !jobs[j].answers)
        .chain((0..jobs.len()).filter(|&j| jobs[j].answers));
    for j in writes_first {
        let job = &jobs[j];
        let mut positions = Vec::with_capacity(job.ops.len());
        for op in &job.ops {
            let merge_key = match op.kind {
                _ if job.answers => None,
                OpKind::Add if op.amount == 0.0 => {
                    // An outcome's failure adds nothing to its successes' count.
                    positions.push(usize::MAX);
                    continue;
                }
                OpKind::Add => {
                    let width = (op.span_ms / 10).max(1);
                    Some((&op.key, op.kind, op.span_ms, op.now_ms.div_euclid(width)))
                }
                OpKind::Accumulate => Some((&op.key, op.kind, op.span_ms, 0)),
                _ => None,
            };
            if let Some(merge_key) = merge_key {
                if let Some(&i) = merged.get(&merge_key) {
                    match op.kind {
                        OpKind::Accumulate => ops[i].then_step(op.amount),
                        _ => ops[i].amount += op.amount,
                    }
                    positions.push(i);
                    continue;
                }
                merged.insert(merge_key, ops.len());
            }
            positions.push(ops.len());
            let mut op = op.clone();
            if job.teaches {
                op.kind = match op.kind {
                    OpKind::Add => OpKind::TaughtAdd,
                    OpKind::Accumulate => OpKind::TaughtStep,
                    other => other,
                };
            }
            ops.push(op);
        }
        at[j] = positions;
    }
    Placed { ops, at }
}

/// Whether the server gave up on a statement to break a deadlock (everything it did was
/// undone, so it can run again).
fn deadlocked(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
}

impl CounterWorker {
    pub(crate) async fn batch(&self, jobs: &[CounterJob]) -> Result<Vec<JobDone>, PolicyError> {
        let connection = self.connections.get().await.map_err(failed)?;
        let placed = place(jobs);
        let arrays = OpArrays::of(&placed.ops);
        let counted = async {
            if placed.ops.is_empty() {
                return Ok(Vec::new());
            }
            let mut retried = false;
            loop {
                match connection.query(APPLY_OPS, &arrays.params()).await {
                    Ok(rows) => return arrays.results(&rows),
                    // Keys are locked in one order, so only a rare outsider (a sweep, a
                    // lift) can cause this.
                    Err(err) if deadlocked(&err) && !retried => retried = true,
                    Err(err) => return Err(failed(err)),
                }
            }
        };
        let booked = async {
            // The last of a verification's entries wins, as one upsert each would.
            let mut book: HashMap<&str, (i64, &str)> = HashMap::new();
            for (id, due_ms, tracked) in jobs.iter().filter_map(|j| j.track.as_ref()) {
                book.insert(id, (*due_ms, tracked.as_str()));
            }
            if book.is_empty() {
                return Ok(());
            }
            let ids: Vec<&str> = book.keys().copied().collect();
            let due: Vec<i64> = ids.iter().map(|id| book[id].0).collect();
            let tracked: Vec<&str> = ids.iter().map(|id| book[id].1).collect();
            connection
                .execute(
                    "INSERT INTO verigate_pending (id, due_ms, tracked)
                     SELECT id, due_ms, tracked::jsonb
                     FROM unnest($1::text[], $2::bigint[], $3::text[]) AS b(id, due_ms, tracked)
                     ON CONFLICT (id) DO UPDATE SET due_ms = excluded.due_ms, tracked = excluded.tracked",
                    &[&ids, &due, &tracked],
                )
                .await
                .map(drop)
                .map_err(failed)
        };
        let kept = async {
            let mut all = EvidenceRows::default();
            jobs.iter().for_each(|j| all.extend(&j.evidence));
            all.insert(&connection).await
        };
        let resolved = async {
            let ids: Vec<&str> = jobs.iter().filter_map(|j| j.resolve.as_deref()).collect();
            if ids.is_empty() {
                return Ok(HashMap::new());
            }
            let rows = connection
                .query(
                    "DELETE FROM verigate_pending WHERE id = ANY($1::text[]) RETURNING id, tracked",
                    &[&ids],
                )
                .await
                .map_err(failed)?;
            tracked_rows(rows).map(|rows| rows.into_iter().collect::<HashMap<_, _>>())
        };
        // All go out at once on the one connection, in this order: one round trip.
        use futures_util::future::join;
        let ((counted, booked), (kept, resolved)) =
            join(join(counted, booked), join(kept, resolved)).await;
        let (results, mut resolved) = (counted?, resolved?);
        booked?;
        kept?;
        Ok(jobs
            .iter()
            .zip(placed.at)
            .map(|(job, at)| JobDone {
                results: if job.answers {
                    at.iter()
                        .map(|&i| results.get(i).copied().flatten())
                        .collect()
                } else {
                    Vec::new()
                },
                resolved: job.resolve.as_ref().and_then(|id| resolved.remove(id)),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add(value: &str, now_ms: i64, amount: f64) -> CounterOp {
        let key = CounterKey {
            rule: "r".into(),
            condition: "c".into(),
            value: value.into(),
        };
        CounterOp::new(OpKind::Add, &key, now_ms, 1000, amount)
    }

    #[test]
    fn outcomes_go_first_with_their_adds_summed_or_dropped_and_answered_adds_never() {
        let outcome = |ops| CounterJob {
            ops,
            ..CounterJob::default()
        };
        let decision = CounterJob {
            ops: vec![add("a", 0, 1.0)],
            answers: true,
            ..CounterJob::default()
        };
        let jobs = [
            outcome(vec![add("a", 10, 1.0), add("b", 10, 1.0)]),
            decision,
            outcome(vec![
                add("a", 20, 2.0),
                add("a", 150, 1.0),
                add("c", 0, 0.0),
            ]),
        ];
        let placed = place(&jobs);
        let amounts: Vec<(String, f64)> = placed
            .ops
            .iter()
            .map(|o| (o.key.value.clone(), o.amount))
            .collect();
        assert_eq!(
            amounts,
            vec![
                ("a".into(), 3.0),
                ("b".into(), 1.0),
                ("a".into(), 1.0),
                ("a".into(), 1.0)
            ]
        );
        assert_eq!(placed.at, vec![vec![0, 1], vec![3], vec![0, 2, usize::MAX]]);
    }

    #[test]
    fn steps_of_one_level_fold_into_one_that_ends_where_they_would_have() {
        let key = CounterKey {
            rule: "r".into(),
            condition: "evidence".into(),
            value: "v".into(),
        };
        let steps = [2.0, -5.0, 1.5, -0.5, 3.0, -1.0];
        let jobs: Vec<CounterJob> = steps
            .iter()
            .map(|&s| CounterJob {
                ops: vec![CounterOp::new(OpKind::Accumulate, &key, 0, 1000, s)],
                ..CounterJob::default()
            })
            .collect();
        let placed = place(&jobs);
        assert_eq!(placed.ops.len(), 1);
        let folded = &placed.ops[0];
        // One by one from any level, never below zero; folded: max(level + sum, floor).
        for start in [0.0, 0.7, 4.0, 10.0] {
            let one_by_one = steps
                .iter()
                .fold(start, |level: f64, s| (level + s).max(0.0));
            let at_once = (start + folded.amount).max(folded.floor);
            assert!(
                (one_by_one - at_once).abs() < 1e-12,
                "{start}: {one_by_one} vs {at_once}"
            );
        }
    }
}
