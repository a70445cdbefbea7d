//! Shared counters in one round trip per decision.
//!
//! The rules ask their counters one question at a time (add this, what is that total),
//! and each answer may decide what is asked next. Against counters in memory that costs
//! nothing; against counters in PostgreSQL each question is a round trip, about twenty
//! per request with the sample policy. So a decision on shared counters runs twice:
//!
//! 1. A dry run against a [`Planner`], which answers as if every counter were empty,
//!    finds every operation the decision will ask for (rules that might not be reached
//!    included: planning cannot know whether a counter is over).
//! 2. One call of `verigate_counter_ops` (migration 4) performs them all, in order, with
//!    the same atomicity as one statement each: a count is incremented and read in one
//!    step, a cap is checked and added under a lock on its key.
//! 3. The real run gets its answers from a [`Replay`] of those results. A question the
//!    plan did not foresee (a branch that only real values take) is asked then and
//!    there, at the cost of one more round trip.
//! 4. What the plan did that the decision then did not ask for (the counters of rules
//!    after the one that decided) is undone in the round trip that settles the decision.
//!
//! Meanwhile other decisions may see those few extra counts: they can only make a
//! limit bite early for the instant before the undo, never let one be exceeded.

use std::{
    collections::HashSet,
    sync::{Mutex, PoisonError},
};

use tokio_postgres::Row;

use super::SharedState;
use crate::policy::{
    counters::{joined, CounterKey, CounterStore},
    PolicyError,
};

/// What one operation does; the numbers are what `verigate_counter_ops` knows them by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum OpKind {
    Add = 0,
    Total = 1,
    Accumulate = 2,
    Level = 3,
    See = 4,
    AddWithin = 5,
    /// Gives back what an `AddWithin` added, under the same lock.
    Refund = 6,
    /// Undoes a `See`.
    Unsee = 7,
    /// An `Add` or `Accumulate` that only teaches the policy (an outcome): its result is
    /// not read, and no decision writes its key, so it needs no lock of its own and runs
    /// last, holding its rows for the least time.
    TaughtAdd = 8,
    TaughtStep = 9,
    /// Reads how many distinct members a `See` key holds over a span, seeing none. The
    /// counter function keeps that number as counts under the key's condition +
    /// `:latest` (a member in the bucket of its latest sighting), so the database is
    /// asked for their `Total` ([`OpArrays::of`]).
    Members = 10,
}

impl OpKind {
    fn writes(self) -> bool {
        !matches!(self, OpKind::Total | OpKind::Level | OpKind::Members)
    }

    /// Whether it runs outside the stages: caps one by one after them, what is taught
    /// last of all.
    fn unstaged(self) -> bool {
        matches!(
            self,
            OpKind::AddWithin | OpKind::Refund | OpKind::TaughtAdd | OpKind::TaughtStep
        )
    }
}

/// One question to the counters, as a [`CounterStore`] call asks it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CounterOp {
    pub(crate) kind: OpKind,
    pub(crate) key: CounterKey,
    /// When it is asked (in ms): what its window is measured from.
    pub(crate) now_ms: i64,
    /// The window, or how long a level stays before it restarts, in ms.
    pub(crate) span_ms: i64,
    /// What is added (a count, a price, a step).
    pub(crate) amount: f64,
    /// The member a `See` records.
    pub(crate) member: Option<String>,
    pub(crate) cap: f64,
    /// For an `Accumulate`: the least the level ends at whatever it was (the largest sum
    /// of its last steps, and at least zero), so that steps merged into one (`amount`
    /// their sum) end where they would have one by one.
    pub(crate) floor: f64,
    /// For an `Unsee`: when the member was seen before (`None`: it was not).
    pub(crate) before_ms: Option<i64>,
}

impl CounterOp {
    pub(crate) fn new(
        kind: OpKind,
        key: &CounterKey,
        now_ms: i64,
        span_ms: i64,
        amount: f64,
    ) -> Self {
        Self {
            kind,
            key: key.clone(),
            now_ms,
            span_ms,
            amount,
            member: None,
            cap: 0.0,
            floor: if kind == OpKind::Accumulate {
                amount.max(0.0)
            } else {
                0.0
            },
            before_ms: None,
        }
    }

    /// Folds a later step of the same level into this one (see `floor`).
    pub(crate) fn then_step(&mut self, step: f64) {
        self.amount += step;
        self.floor = (self.floor + step).max(0.0);
    }

    /// What takes this operation back, when it changed anything.
    fn undo(&self, result: &OpResult) -> Option<CounterOp> {
        let undo = |kind, amount| {
            Some(CounterOp::new(
                kind,
                &self.key,
                self.now_ms,
                self.span_ms,
                amount,
            ))
        };
        match self.kind {
            OpKind::Add => undo(OpKind::Add, -self.amount),
            OpKind::Accumulate => undo(OpKind::Accumulate, -self.amount),
            OpKind::AddWithin if result.added => undo(OpKind::Refund, -self.amount),
            OpKind::See => Some(CounterOp {
                kind: OpKind::Unsee,
                member: self.member.clone(),
                before_ms: result.before_ms,
                ..CounterOp::new(OpKind::Unsee, &self.key, self.now_ms, self.span_ms, 0.0)
            }),
            _ => None,
        }
    }
}

/// What the database answered to one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct OpResult {
    pub(crate) value: f64,
    /// `AddWithin`: whether the amount fitted under the cap and was added.
    pub(crate) added: bool,
    /// `See`: when the member was seen before.
    pub(crate) before_ms: Option<i64>,
}

/// Something that answers counter operations one at a time; with
/// [`counter_store_by_ops!`] it is a [`CounterStore`].
pub(crate) trait AnswersOps: Send + Sync {
    fn answer(&self, op: CounterOp) -> Result<OpResult, PolicyError>;
    fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError>;
    fn planning(&self) -> bool {
        false
    }
    /// Keys held in memory (`0`: none here).
    fn keys(&self) -> usize {
        0
    }
}

/// Implements [`CounterStore`] for types that answer operations: each call is one
/// operation. Shared state sweeps elsewhere.
macro_rules! counter_store_by_ops {
    ($($ty:ty),*) => {$(
        impl CounterStore for $ty {
            fn add(&self, key: &CounterKey, window_ms: i64, now_ms: i64, amount: f64) -> Result<f64, PolicyError> {
                Ok(self.answer(CounterOp::new(OpKind::Add, key, now_ms, window_ms, amount))?.value)
            }

            fn total(&self, key: &CounterKey, window_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
                Ok(self.answer(CounterOp::new(OpKind::Total, key, now_ms, window_ms, 0.0))?.value)
            }

            fn accumulate(&self, key: &CounterKey, idle_ms: i64, now_ms: i64, step: f64) -> Result<f64, PolicyError> {
                Ok(self.answer(CounterOp::new(OpKind::Accumulate, key, now_ms, idle_ms, step))?.value)
            }

            fn level(&self, key: &CounterKey, idle_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
                Ok(self.answer(CounterOp::new(OpKind::Level, key, now_ms, idle_ms, 0.0))?.value)
            }

            fn see(&self, key: &CounterKey, window_ms: i64, now_ms: i64, member: &str) -> Result<usize, PolicyError> {
                let op = CounterOp {
                    member: Some(member.to_owned()),
                    ..CounterOp::new(OpKind::See, key, now_ms, window_ms, 0.0)
                };
                let seen = self.answer(op)?.value;
                Ok(if seen > 0.0 { seen as usize } else { 0 })
            }

            fn members(&self, key: &CounterKey, span_ms: i64, now_ms: i64) -> Result<f64, PolicyError> {
                Ok(self.answer(CounterOp::new(OpKind::Members, key, now_ms, span_ms, 0.0))?.value)
            }

            fn add_within(
                &self,
                key: &CounterKey,
                window_ms: i64,
                now_ms: i64,
                amount: f64,
                cap: f64,
            ) -> Result<(f64, bool), PolicyError> {
                let op = CounterOp {
                    cap,
                    ..CounterOp::new(OpKind::AddWithin, key, now_ms, window_ms, amount)
                };
                let result = self.answer(op)?;
                Ok((result.value, result.added))
            }

            fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError> {
                AnswersOps::forget(self, rule, value)
            }

            fn sweep(&self, _round: usize, _now_ms: i64) {}

            fn keys(&self) -> usize {
                AnswersOps::keys(self)
            }

            fn planning(&self) -> bool {
                AnswersOps::planning(self)
            }
        }
    )*};
}

pub(crate) use counter_store_by_ops;

/// Records the operations asked of it and answers as if every counter were empty: what
/// a decision's dry run plans, and what counting outcomes (which reads no answer) does.
#[derive(Debug, Default)]
pub(crate) struct Planner {
    ops: Mutex<Vec<CounterOp>>,
}

impl Planner {
    pub(crate) fn into_ops(self) -> Vec<CounterOp> {
        self.ops
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

counter_store_by_ops!(Planner, Replay<'_>);

impl AnswersOps for Planner {
    fn answer(&self, op: CounterOp) -> Result<OpResult, PolicyError> {
        let answer = OpResult {
            // A cap is free: planning goes on as if the amount fitted.
            added: op.kind == OpKind::AddWithin,
            ..OpResult::default()
        };
        self.ops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(op);
        Ok(answer)
    }

    fn forget(&self, _: &str, _: &str) -> Result<(), PolicyError> {
        Ok(())
    }

    fn planning(&self) -> bool {
        true
    }
}

/// Which of a plan's operations go into its round trip: all but a level bumped again
/// after it was written, whose second bump depends on what the first returned (the
/// decision asks for it if it needs it).
pub(crate) fn worth_prefetching(ops: &[CounterOp]) -> Vec<bool> {
    let mut written: HashSet<&CounterKey> = HashSet::new();
    ops.iter()
        .map(|op| {
            let worth = !(op.kind == OpKind::Accumulate && written.contains(&op.key));
            if op.kind.writes() {
                written.insert(&op.key);
            }
            worth
        })
        .collect()
}

/// Splits operations into stages, keeping their order, so that each kind of operation
/// in a stage can run as one set-based statement: a stage never writes a key an earlier
/// operation of the stage touched, nor reads one it wrote. Caps and what is taught run
/// after the stages (stage 0): no other kind of operation touches their keys.
pub(crate) fn stages<'a>(ops: impl IntoIterator<Item = &'a CounterOp>) -> Vec<i16> {
    let mut stage = 1i16;
    // Each key touched in the stage, and whether it was written.
    let mut touched: std::collections::HashMap<&CounterKey, bool> = Default::default();
    ops.into_iter()
        .map(|op| {
            if op.kind.unstaged() {
                return 0;
            }
            let clash = touched
                .get(&op.key)
                .is_some_and(|&wrote| wrote || op.kind.writes());
            if clash {
                stage += 1;
                touched.clear();
            }
            *touched.entry(&op.key).or_default() |= op.kind.writes();
            stage
        })
        .collect()
}

/// Answers a decision's counter questions from its plan's results; asks the database
/// for anything the plan did not foresee.
pub(crate) struct Replay<'a> {
    state: &'a SharedState,
    now_ms: i64,
    /// Each planned operation and its result (`None`: left out of the round trip).
    planned: Vec<(CounterOp, Option<OpResult>)>,
    used: Mutex<Vec<bool>>,
}

impl<'a> Replay<'a> {
    pub(crate) fn new(
        state: &'a SharedState,
        now_ms: i64,
        planned: Vec<(CounterOp, Option<OpResult>)>,
    ) -> Self {
        let used = Mutex::new(vec![false; planned.len()]);
        Self {
            state,
            now_ms,
            planned,
            used,
        }
    }

    pub(crate) fn now_ms(&self) -> i64 {
        self.now_ms
    }

    /// The operations performed for the plan that the decision did not ask for, undone.
    pub(crate) fn leftovers(&self) -> Vec<CounterOp> {
        let used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        self.planned
            .iter()
            .zip(used.iter())
            .filter(|(_, used)| !**used)
            .filter_map(|((op, result), _)| op.undo(result.as_ref()?))
            .collect()
    }
}

impl AnswersOps for Replay<'_> {
    fn answer(&self, op: CounterOp) -> Result<OpResult, PolicyError> {
        {
            let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
            let found = self
                .planned
                .iter()
                .enumerate()
                .find(|(i, (planned, result))| !used[*i] && result.is_some() && *planned == op);
            if let Some((i, (_, Some(result)))) = found {
                used[i] = true;
                return Ok(*result);
            }
        }
        self.state.answer(op)
    }

    fn forget(&self, rule: &str, value: &str) -> Result<(), PolicyError> {
        self.state.forget(rule, value)
    }
}

/// The SQL of the one call, and how its arguments are built.
pub(crate) const APPLY_OPS: &str = "SELECT op, result, added, before_ms FROM verigate_counter_ops(
    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// The call's arguments for a batch of operations, as parallel arrays.
#[derive(Default)]
pub(crate) struct OpArrays {
    pub(crate) now: Vec<i64>,
    pub(crate) stage: Vec<i16>,
    pub(crate) kind: Vec<i16>,
    pub(crate) rule: Vec<String>,
    pub(crate) condition: Vec<String>,
    pub(crate) value: Vec<String>,
    pub(crate) span: Vec<i64>,
    pub(crate) amount: Vec<f64>,
    pub(crate) member: Vec<Option<String>>,
    pub(crate) cap: Vec<f64>,
    pub(crate) before: Vec<Option<i64>>,
}

impl OpArrays {
    pub(crate) fn of<'a>(ops: impl IntoIterator<Item = &'a CounterOp> + Clone) -> Self {
        let mut a = OpArrays::default();
        for (op, stage) in ops.clone().into_iter().zip(stages(ops)) {
            a.now.push(op.now_ms);
            a.stage.push(stage);
            if op.kind == OpKind::Members {
                a.kind.push(OpKind::Total as i16);
                a.condition.push(joined(&[&op.key.condition, ":latest"]));
            } else {
                a.kind.push(op.kind as i16);
                a.condition.push(op.key.condition.clone());
            }
            a.rule.push(op.key.rule.clone());
            a.value.push(op.key.value.clone());
            a.span.push(op.span_ms);
            a.amount.push(op.amount);
            a.member.push(op.member.clone());
            // The function reads a level's floor where a cap's limit goes.
            a.cap.push(if op.kind == OpKind::Accumulate {
                op.floor
            } else {
                op.cap
            });
            a.before.push(op.before_ms);
        }
        a
    }

    pub(crate) fn len(&self) -> usize {
        self.kind.len()
    }

    pub(crate) fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 11] {
        [
            &self.now,
            &self.stage,
            &self.kind,
            &self.rule,
            &self.condition,
            &self.value,
            &self.span,
            &self.amount,
            &self.member,
            &self.cap,
            &self.before,
        ]
    }

    /// The results in the order of the operations (`None` for an undo, which answers
    /// nothing).
    pub(crate) fn results(&self, rows: &[Row]) -> Result<Vec<Option<OpResult>>, PolicyError> {
        let mut out = vec![None; self.len()];
        for row in rows {
            // The function numbers ops from 1, as SQL arrays do.
            let position: i32 = row.try_get(0).map_err(super::failed)?;
            let slot = usize::try_from(position - 1)
                .ok()
                .and_then(|i| out.get_mut(i))
                .ok_or_else(|| PolicyError("shared counters: an answer to no operation".into()))?;
            *slot = Some(OpResult {
                value: row
                    .try_get::<_, Option<f64>>(1)
                    .map_err(super::failed)?
                    .unwrap_or(0.0),
                added: row
                    .try_get::<_, Option<bool>>(2)
                    .map_err(super::failed)?
                    .unwrap_or(false),
                before_ms: row.try_get(3).map_err(super::failed)?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rule: &str) -> CounterKey {
        CounterKey {
            rule: rule.into(),
            condition: "c".into(),
            value: "v".into(),
        }
    }

    fn op(kind: OpKind, rule: &str) -> CounterOp {
        CounterOp::new(kind, &key(rule), 0, 10, 1.0)
    }

    #[test]
    fn a_key_written_and_then_touched_again_starts_a_new_stage_and_caps_run_after_them() {
        use OpKind::*;
        let ops = [
            op(Add, "a"),
            op(Total, "b"),
            op(Total, "b"),
            op(AddWithin, "s"),
            op(AddWithin, "s"),
            op(Refund, "s"),
            op(Total, "a"),
            op(Add, "b"),
            op(Level, "c"),
            op(See, "c"),
            op(TaughtAdd, "c"),
        ];
        assert_eq!(stages(&ops), vec![1, 1, 1, 0, 0, 0, 2, 2, 2, 3, 0]);
    }

    #[test]
    fn a_level_bumped_again_after_it_was_written_is_not_prefetched() {
        use OpKind::*;
        let ops = [
            op(Level, "c"),
            op(Accumulate, "c"),
            op(Accumulate, "c"),
            op(Accumulate, "d"),
        ];
        assert_eq!(worth_prefetching(&ops), vec![true, true, false, true]);
    }

    #[test]
    fn only_writes_are_undone_and_a_cap_only_when_it_was_added_to() {
        let result = OpResult::default();
        let add = CounterOp::new(OpKind::Add, &key("a"), 0, 10, 2.0);
        assert_eq!(
            add.undo(&result).map(|u| (u.kind, u.amount)),
            Some((OpKind::Add, -2.0))
        );
        assert!(CounterOp::new(OpKind::Total, &key("a"), 0, 10, 0.0)
            .undo(&result)
            .is_none());
        let within = CounterOp {
            cap: 5.0,
            ..CounterOp::new(OpKind::AddWithin, &key("a"), 0, 10, 1.5)
        };
        assert!(within.undo(&result).is_none());
        let added = OpResult {
            added: true,
            ..result
        };
        assert_eq!(
            within.undo(&added).map(|u| (u.kind, u.amount)),
            Some((OpKind::Refund, -1.5))
        );
        let see = CounterOp {
            member: Some("+46".into()),
            ..CounterOp::new(OpKind::See, &key("a"), 0, 10, 0.0)
        };
        let seen = OpResult {
            before_ms: Some(7),
            ..result
        };
        let unsee = see.undo(&seen).unwrap();
        assert_eq!(
            (unsee.kind, unsee.before_ms, unsee.member.as_deref()),
            (OpKind::Unsee, Some(7), Some("+46"))
        );
    }
}
