//! The rules-file policy: evaluates requests against the snapshot in force, keeps the
//! counters and per-rule statistics that outlive reloads, and swaps in a new snapshot
//! (read and validated by `file.rs`) without stopping or slowing decisions.
//!
//! Evaluation finds candidate rules through indexes (a digit trie of every prefix, a map
//! of every listed number and country), so a policy of 1,000 rules costs a request only
//! the rules that can match it, plus those with no indexed condition.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use futures_util::future::LocalBoxFuture;

use super::{
    adaptive::{
        Block, BlockCheck, BlockSpec, Evidence, OutcomeBook, Quarantine, QuarantineState,
        Resolution, Tracked, TrackedKey,
    },
    compiled::{Rule, RuleStats, Snapshot},
    conditions::{Conditions, CounterContext, LintScope, Pending},
    counters::{CounterKey, CounterStore, Counters},
    facts::Facts,
    file::{compile, load, PolicyLoadError},
    flagged::{FlaggedKey, FlaggedKeys},
    shared::{Planner, SharedState},
    BookTaking, CounterReading, Explanation, Learning, Mode, NumberHistory, Outcome,
    PastVerification, Policy, PolicyDecision, PolicyDescription, PolicyError, QuarantineNote,
    Quarantines, RuleDescription, ShadowMatch, WaitingDecision,
};
use crate::events::{Action, ResponseFields, VerificationRequestEvent};
use crate::phone::country::CountryTable;

/// The rules-file policy: hot-reloadable, with counters that outlive reloads.
pub struct RulesPolicy {
    path: Option<PathBuf>,
    current: ArcSwap<Snapshot>,
    counters: Counters,
    /// Stats by rule name, carried into each new snapshot.
    stats: Mutex<HashMap<String, Arc<RuleStats>>>,
    last_error: Mutex<Option<String>>,
    decisions: AtomicUsize,
    /// Allowed verifications awaiting their result, for adaptive rules.
    book: OutcomeBook,
    quarantine: Arc<Quarantine>,
    /// Set when several replicas share their state in PostgreSQL: counters, the
    /// outcome book and quarantines live there, and `counters`/`book` stay unused.
    shared: Option<Arc<SharedState>>,
    /// Keys shadow rules matched lately (this replica's).
    flagged: FlaggedKeys,
}

impl fmt::Display for RulesPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.current.load();
        write!(
            f,
            "{} rules, default {}, on_error {}, version {}",
            s.rules.len(),
            s.default,
            s.on_error,
            s.version
        )
    }
}

impl RulesPolicy {
    /// Loads the policy at `path` (and its list files), which `reload` will re-read.
    pub fn load(path: &Path) -> Result<Self, PolicyLoadError> {
        let snapshot = load(path, &HashMap::new())?;
        Ok(Self::new(Some(path.to_path_buf()), snapshot))
    }

    /// The policy at `path` with every duration multiplied by `factor` (the simulator's
    /// `--time-scale`). Cannot be reloaded.
    pub fn load_scaled(path: &Path, factor: f64) -> Result<Self, PolicyLoadError> {
        Ok(Self::new(None, super::file::load_scaled(path, factor)?))
    }

    /// A policy from text; `origin` names it in error messages. Cannot be reloaded.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyLoadError> {
        Ok(Self::new(
            None,
            compile(text, origin, None, &HashMap::new())?,
        ))
    }

    fn new(path: Option<PathBuf>, snapshot: Snapshot) -> Self {
        // Built here, at load, so no request waits for it.
        CountryTable::get();
        let stats = snapshot
            .rules
            .iter()
            .map(|r| r.name.clone())
            .zip(snapshot.stats.iter().cloned())
            .collect();
        Self {
            path,
            current: ArcSwap::from_pointee(snapshot),
            counters: Counters::default(),
            stats: Mutex::new(stats),
            last_error: Mutex::new(None),
            decisions: AtomicUsize::new(0),
            book: OutcomeBook::default(),
            quarantine: Arc::default(),
            shared: None,
            flagged: FlaggedKeys::default(),
        }
    }

    /// Keeps counters, the outcome book and quarantines in `shared`, so that every
    /// replica on it decides as one.
    pub fn with_shared_state(mut self, shared: Arc<SharedState>) -> Self {
        shared.set_version(&self.current.load().version);
        shared.set_approximate(self.current.load().approximate_rules());
        shared.start_sync(&self.quarantine);
        self.shared = Some(shared);
        self
    }

    fn counters(&self) -> &dyn CounterStore {
        match &self.shared {
            Some(shared) => shared.as_ref(),
            None => &self.counters,
        }
    }

    /// Counts as failed what had its time to complete without a result.
    fn catch_up(&self, now_ms: i64) -> Result<(), PolicyError> {
        match &self.shared {
            Some(shared) => shared.expire_overdue(now_ms),
            None => {
                self.book.catch_up(&self.counters, now_ms);
                Ok(())
            }
        }
    }

    fn evidence(&self, rule: &str, key: &str) -> Vec<Evidence> {
        match &self.shared {
            Some(shared) => shared.evidence(rule, key).unwrap_or_default(),
            None => self.book.evidence(rule, key),
        }
    }

    fn trip(
        &self,
        rule: &str,
        key: &str,
        now_ms: i64,
        spec: &BlockSpec,
        why: String,
        evidence: Vec<Evidence>,
    ) -> Result<Block, PolicyError> {
        match &self.shared {
            Some(shared) => {
                let block = shared.trip(rule, key, now_ms, spec, why, evidence)?;
                self.quarantine.adopt(&block);
                Ok(block)
            }
            None => Ok(self.quarantine.trip(rule, key, now_ms, spec, why, evidence)),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn rule_names(&self) -> Vec<String> {
        self.current
            .load()
            .rules
            .iter()
            .map(|r| r.name.clone())
            .collect()
    }

    /// Warnings about rules that can never match or never decide.
    pub fn warnings(&self) -> Vec<String> {
        let s = self.current.load();
        let mut out = Vec::new();
        let mut catch_all: Option<&str> = None;
        // Earlier enforced rules that decide on their checks alone.
        let mut earlier: Vec<(&str, &Conditions)> = Vec::new();
        for rule in &s.rules {
            let enforced = rule.mode == Mode::Enforce;
            if let Some(first) = catch_all.filter(|_| enforced) {
                out.push(format!(
                    "rule `{}` can never decide: the earlier rule `{first}` matches every request",
                    rule.name
                ));
            }
            let scope = LintScope {
                rule: &rule.conditions,
                enforced,
                earlier: &earlier,
            };
            for warning in rule.conditions.iter().filter_map(|c| c.lint(&scope)) {
                out.push(format!("rule `{}` {warning}", rule.name));
            }
            if rule.mode == Mode::Shadow && rule.response.is_some() {
                out.push(format!(
                    "rule `{}` is shadow: its response is never sent",
                    rule.name
                ));
            }
            if rule.action == Action::Deny && rule.response.is_some() {
                out.push(format!(
                    "rule `{}` denies: its response is never sent",
                    rule.name
                ));
            }
            if enforced && rule.limiters.is_empty() {
                earlier.push((&rule.name, &rule.conditions));
            }
            let unconditional = rule.summary.is_empty();
            if enforced && unconditional && catch_all.is_none() {
                catch_all = Some(&rule.name);
            }
        }
        out
    }

    /// A summary for `policy check`.
    pub fn summary(&self) -> String {
        let s = self.current.load();
        let mut out = format!(
            "version {}: {} rules, default {}, on_error {}\n",
            s.version,
            s.rules.len(),
            s.default,
            s.on_error
        );
        for (name, len) in &s.lists {
            out.push_str(&format!("  list {name}: {len} entries\n"));
        }
        for rule in &s.rules {
            let mode = if rule.mode == Mode::Shadow {
                " (shadow)"
            } else {
                ""
            };
            out.push_str(&format!(
                "  {} {}{mode}: {}\n",
                rule.action,
                rule.name,
                rule.summary.join("; ")
            ));
        }
        out
    }

    fn reload_from_disk(&self) -> Result<String, PolicyLoadError> {
        let path = self.path.as_ref().ok_or_else(|| PolicyLoadError::Read {
            path: "(inline policy)".into(),
            message: "this policy has no file to reload".into(),
        })?;
        let stats = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let snapshot = load(path, &stats)?;
        let version = snapshot.version.clone();
        let approximate = snapshot.approximate_rules();
        if let Ok(mut all) = self.stats.lock() {
            for (rule, stat) in snapshot.rules.iter().zip(&snapshot.stats) {
                all.entry(rule.name.clone())
                    .or_insert_with(|| Arc::clone(stat));
            }
        }
        self.current.store(Arc::new(snapshot));
        if let Some(shared) = &self.shared {
            shared.set_version(&version);
            shared.set_approximate(approximate);
        }
        Ok(version)
    }

    /// The decision an evaluation comes to, explained.
    fn conclude(
        &self,
        s: &Snapshot,
        facts: &Facts<'_>,
        evaluation: Evaluation,
        started: Instant,
    ) -> PolicyDecision {
        let Evaluation {
            decided,
            matched_prefix,
            mut explanation,
            spared,
            ..
        } = evaluation;
        let rule = decided.map(|i| &s.rules[i]);
        let action = rule.map_or(s.default, |r| r.action);
        let mut reason = match (rule, &matched_prefix) {
            (Some(r), Some(p)) => format!("rule `{}` matched prefix {p}", r.name),
            (Some(r), None) => format!("rule `{}` matched", r.name),
            (None, _) => "no rule matched; policy default".to_owned(),
        };
        let spared: Vec<String> = spared
            .into_iter()
            .map(|i| s.rules[i].name.clone())
            .collect();
        for name in &spared {
            reason.push_str(&format!("; rule `{name}` spared a returning number"));
        }
        let response = match action {
            Action::Allow => rule
                .and_then(|r| r.response.as_ref())
                .unwrap_or(&s.response)
                .for_method(&facts.request.method),
            Action::Deny => ResponseFields::default(),
        };
        explanation.country = Some(facts.country.to_owned());
        explanation.policy_version = s.version.clone();
        explanation.matched_prefix = matched_prefix;
        explanation.eval_ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let n = self.decisions.fetch_add(1, Ordering::Relaxed);
        // Each of the 64 shards is swept every 32,768 decisions: idle keys (most are
        // one number's) go before the maps grow far.
        if n % 512 == 0 {
            self.counters().sweep(n / 512, facts.now.timestamp_millis());
        }

        PolicyDecision {
            action,
            rule: rule.map(|r| r.name.clone()),
            reason,
            response,
            explanation,
            spared,
        }
    }

    /// A decision on counters shared in PostgreSQL. Shared counters would cost a round
    /// trip each: a dry run finds every one the decision will touch, one round trip
    /// reads and bumps them all, the decision runs on those answers, and a second round
    /// trip (returned, to be awaited with the event's record) settles what it left over.
    async fn decide_shared<'a>(
        &'a self,
        shared: &'a SharedState,
        request: &VerificationRequestEvent,
        history: NumberHistory,
        now: DateTime<Utc>,
    ) -> Result<WaitingDecision<'a>, PolicyError> {
        let started = Instant::now();
        // A snapshot of its own: a guard must not be held across the waits.
        let s = self.current.load_full();
        let facts = facts_of(request, history, now)?;
        let price = price_of(request);
        let now_ms = now.timestamp_millis();
        let request = Request {
            facts: &facts,
            now_ms,
            price: price.as_ref(),
        };
        let plan = Planner::default();
        self.evaluate(&s, &request, &plan, Pass::Plan)?;
        let replay = shared.prefetch(plan.into_ops(), now_ms).await?;
        let evaluation = self.evaluate(&s, &request, &replay, Pass::Decide)?;
        let booked = evaluation
            .tracked
            .as_ref()
            .map(SharedState::book_entry)
            .transpose()?;
        let settling = shared.settle(replay, &evaluation.refunds)?;
        Ok(WaitingDecision {
            decision: self.conclude(&s, &facts, evaluation, started),
            settling,
            booked,
        })
    }

    /// How an outcome counts for the adaptive rules (`None`: it does not, or there are
    /// none: what was tracked under rules removed since counts for no rule now).
    fn resolution(&self, status: &str, reason: Option<&str>) -> Option<Resolution> {
        let adaptive = !self.current.load().adaptive.is_empty();
        Resolution::of(status, reason).filter(|_| adaptive)
    }

    /// Counts an outcome in the shared outcome book: whichever replica takes the
    /// verification out of the book counts it (the one that stored the result, when the
    /// store took it with the result's record).
    async fn learn_shared(&self, shared: &SharedState, outcome: Outcome<'_>) {
        let Some(resolution) = self.resolution(outcome.status, outcome.reason) else {
            return;
        };
        let tracked = match outcome.book {
            BookTaking::Taken(taken) => taken.and_then(|json| {
                serde_json::from_str::<Tracked>(json)
                    .inspect_err(|err| {
                        tracing::warn!(error.message = %err, "an outcome book entry could not be read; its outcome is not counted");
                    })
                    .ok()
            }),
            BookTaking::NotAsked => shared.resolve(outcome.id).await.ok().flatten(),
        };
        if let Some(tracked) = tracked {
            let counted = (outcome.id.to_owned(), tracked, resolution);
            let _ = shared
                .count_outcomes(&[counted], outcome.at.timestamp_millis())
                .await;
        }
    }

    /// Counts the final status under the rule that decided and the shadow rules that
    /// matched.
    fn count_rule_outcome(&self, outcome: &Outcome<'_>) {
        let s = self.current.load();
        let names = outcome
            .rule
            .into_iter()
            .chain(outcome.shadow.iter().map(|m| m.rule.as_str()));
        for name in names {
            if let Some(&i) = s.by_name.get(name) {
                if let Ok(mut o) = s.stats[i].outcomes.lock() {
                    *o.entry(outcome.status.to_owned()).or_default() += 1;
                }
            }
        }
    }

    /// Lists the key of a shadow rule with counters that matched (`readings`: this
    /// decision's counter readings), for an operator to look at.
    fn flag(&self, rule: &Rule, facts: &Facts<'_>, readings: &[CounterReading]) {
        let Some(limiter) = rule.limiters.first() else {
            return; // a rule on the request alone flags no key
        };
        let key = limiter.spec().value(facts);
        let key = if key == facts.number {
            crate::telemetry::MaskedNumber(&key).to_string()
        } else {
            key
        };
        let reading = readings_of(&rule.name, readings);
        if self
            .flagged
            .note(&rule.name, &key, rule.action, facts.now, reading.clone())
        {
            tracing::info!(
                rule = %rule.name, key = %key, would = rule.action.as_str(),
                "a shadow rule would {} this key: {reading}", rule.action
            );
        }
    }

    /// Candidate rules for a request, in rule order.
    fn candidates(s: &Snapshot, number: &str, country: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = s.unanchored.clone();
        if let Some(hit) = s.number_index.get(number) {
            ids.extend(hit);
        }
        if let Some(hit) = s.country_index.get(country) {
            ids.extend(hit);
        }
        s.prefix_index.for_each_match(number, |hit| ids.extend(hit));
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

impl Policy for RulesPolicy {
    fn decide(
        &self,
        request: &VerificationRequestEvent,
        history: NumberHistory,
        now: DateTime<Utc>,
    ) -> Result<PolicyDecision, PolicyError> {
        if let Some(shared) = &self.shared {
            return crate::store::postgres::block_on(async {
                let WaitingDecision {
                    decision,
                    settling,
                    booked,
                } = self.decide_shared(shared, request, history, now).await?;
                if let Some(settling) = settling {
                    settling.await?;
                }
                // No record goes with this decision: the book is written on its own.
                if let Some(booked) = booked {
                    shared.put_in_book(&request.id, booked).await?;
                }
                Ok(decision)
            });
        }
        let started = Instant::now();
        let s = self.current.load();
        let facts = facts_of(request, history, now)?;
        let now_ms = now.timestamp_millis();
        let price = price_of(request);
        let request = Request {
            facts: &facts,
            now_ms,
            price: price.as_ref(),
        };
        if !s.adaptive.is_empty() {
            // Verifications that had their time without a result now count as failed.
            self.book.catch_up(&self.counters, now_ms);
        }
        let evaluation = self.evaluate(&s, &request, &self.counters, Pass::Decide)?;
        if let Some(tracked) = evaluation.tracked.clone() {
            self.book
                .observe_allowed(&request.facts.request.id, tracked);
        }
        // Spend caps sum what Sinch will charge: only allowed attempts count.
        for (key, window_ms, amount) in &evaluation.refunds {
            self.counters.add(key, *window_ms, now_ms, -amount);
        }
        Ok(self.conclude(&s, &facts, evaluation, started))
    }

    fn on_error(&self) -> Action {
        self.current.load().on_error
    }

    /// With shared state, the decision's round trips are awaited on the HTTP worker
    /// instead of blocking a thread of the pool. The rare steps that write at once (a
    /// quarantine tripped) still block the worker for their round trip.
    fn decide_waiting<'a>(
        &'a self,
        request: &'a VerificationRequestEvent,
        history: NumberHistory,
        now: DateTime<Utc>,
    ) -> Option<LocalBoxFuture<'a, Result<WaitingDecision<'a>, PolicyError>>> {
        let shared = self.shared.as_deref()?;
        Some(Box::pin(self.decide_shared(shared, request, history, now)))
    }

    fn number_history_window(&self) -> Option<std::time::Duration> {
        let ms = self.current.load().returning_within_ms?;
        Some(std::time::Duration::from_millis(ms.unsigned_abs()))
    }

    /// Rules are evaluated in memory, in microseconds (`cargo bench --bench policy`);
    /// with shared state each decision waits for the database.
    fn bounded(&self) -> bool {
        self.shared.is_none()
    }

    fn version(&self) -> String {
        self.current.load().version.clone()
    }

    fn reload(&self) -> Result<String, PolicyError> {
        match self.reload_from_disk() {
            Ok(version) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                Ok(version)
            }
            Err(err) => {
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(err.to_string());
                }
                Err(PolicyError(err.to_string()))
            }
        }
    }

    fn sources(&self) -> Vec<PathBuf> {
        self.path
            .as_deref()
            .map(super::file::source_files)
            .unwrap_or_default()
    }

    fn describe(&self) -> serde_json::Value {
        let s = self.current.load();
        let rules = s
            .rules
            .iter()
            .zip(&s.stats)
            .map(|(rule, stat)| RuleDescription {
                name: rule.name.clone(),
                action: rule.action,
                mode: rule.mode,
                conditions: rule.summary.clone(),
                note: rule.note.clone(),
                hits: stat.hits.load(Ordering::Relaxed),
                spared: stat.spared.load(Ordering::Relaxed),
                outcomes: stat.outcomes.lock().map(|o| o.clone()).unwrap_or_default(),
            })
            .collect();
        let description = PolicyDescription {
            version: s.version.clone(),
            loaded_at: s.loaded_at,
            path: self.path.as_ref().map(|p| p.display().to_string()),
            default: s.default,
            on_error: s.on_error,
            lists: s.lists.clone(),
            rules,
            last_reload_error: self.last_error.lock().ok().and_then(|e| e.clone()),
            counter_keys: self.counters().keys(),
            replicas: self
                .shared
                .as_ref()
                .map(|shared| shared.replicas().unwrap_or_default()),
        };
        serde_json::to_value(description).unwrap_or(serde_json::Value::Null)
    }

    fn learning(&self) -> Option<&dyn Learning> {
        Some(self)
    }

    fn quarantines(&self) -> Option<&dyn Quarantines> {
        Some(self)
    }
}

impl Learning for RulesPolicy {
    fn observe_outcome(&self, outcome: Outcome<'_>) {
        if let Some(shared) = &self.shared {
            crate::store::postgres::block_on(self.learn_shared(shared, outcome));
        } else if let Some(resolution) = self.resolution(outcome.status, outcome.reason) {
            let at_ms = outcome.at.timestamp_millis();
            self.book
                .observe_result(outcome.id, resolution, &self.counters, at_ms);
        }
        self.count_rule_outcome(&outcome);
    }

    /// With shared state, the outcome's round trips are awaited on the HTTP worker.
    fn observe_outcome_waiting<'a>(
        &'a self,
        outcome: Outcome<'a>,
    ) -> Option<LocalBoxFuture<'a, ()>> {
        let shared = self.shared.as_deref()?;
        Some(Box::pin(async move {
            self.learn_shared(shared, outcome).await;
            self.count_rule_outcome(&outcome);
        }))
    }

    /// With shared state, the store takes a result's verification out of the book in the
    /// result's own transaction.
    fn takes_from_book(&self, status: &str, reason: Option<&str>) -> bool {
        self.shared.is_some() && self.resolution(status, reason).is_some()
    }

    fn counter_keys(&self) -> usize {
        self.counters().keys()
    }

    /// With shared state, quarantines live in the database: nothing to save here.
    fn saved_state(&self) -> Option<(u64, serde_json::Value)> {
        if self.shared.is_some() {
            return None;
        }
        let state = serde_json::to_value(self.quarantine.export()).ok()?;
        Some((self.quarantine.generation(), state))
    }

    /// With shared state the counters outlive restarts: nothing to relearn.
    fn lookback(&self) -> Option<std::time::Duration> {
        if self.shared.is_some() {
            return None;
        }
        let s = self.current.load();
        s.adaptive
            .iter()
            .flat_map(|&i| &s.rules[i].limiters)
            .map(|l| l.lookback_ms())
            .max()
            .and_then(|ms| u64::try_from(ms).ok())
            .map(std::time::Duration::from_millis)
    }

    fn restore(&self, saved: Option<serde_json::Value>, now: DateTime<Utc>) {
        if let Some(state) = saved.and_then(|v| serde_json::from_value::<QuarantineState>(v).ok()) {
            self.quarantine.restore(state, now.timestamp_millis());
        }
        if self.lookback().is_some() {
            self.book.hold();
        }
    }

    fn relearning(&self) -> bool {
        self.book.is_held()
    }

    fn relearn(&self, history: Vec<PastVerification>, now: DateTime<Utc>) -> usize {
        // Replayed in time order, as they happened: allowed, then resolved; then what
        // was decided while this ran.
        let s = self.current.load();
        let mut steps: Vec<(i64, usize, bool)> = Vec::new();
        for (i, past) in history.iter().enumerate() {
            if let (Some(at), Some(_)) = (past.allowed_at, &past.request) {
                steps.push((at.timestamp_millis(), i, false));
                if let Some((_, _, done)) = &past.result {
                    steps.push((done.timestamp_millis(), i, true));
                }
            }
        }
        steps.sort_unstable();
        for (at_ms, i, resolved) in steps {
            let past = &history[i];
            self.book.expire(&self.counters, at_ms);
            let when = DateTime::from_timestamp_millis(at_ms).unwrap_or(now);
            if !resolved {
                let facts = past
                    .request
                    .as_ref()
                    .and_then(|r| Facts::of(r, NumberHistory::New, when));
                let tracked = facts.and_then(|f| {
                    self.tracked(&s, &f, &self.counters, at_ms, Vec::new(), &[])
                        .ok()
                        .flatten()
                });
                if let Some(tracked) = tracked {
                    self.book.track(&past.id, tracked);
                }
            } else if let Some((status, reason, _)) = &past.result {
                if let Some(resolution) = Resolution::of(status, reason.as_deref()) {
                    self.book
                        .resolve(&past.id, resolution, &self.counters, at_ms);
                }
            }
        }
        self.book.release(&self.counters, now.timestamp_millis())
    }
}

impl Quarantines for RulesPolicy {
    fn blocks(&self, now: DateTime<Utc>) -> Vec<Block> {
        let _ = self.catch_up(now.timestamp_millis());
        self.quarantine.list(now.timestamp_millis())
    }

    fn lift_block(&self, key: &str, now: DateTime<Utc>) -> Result<Vec<Block>, PolicyError> {
        let now_ms = now.timestamp_millis();
        let lifted = match &self.shared {
            // The shared state is what every replica mirrors: it is the lift that counts,
            // and when it cannot be made the local mirror stays as it is too.
            Some(shared) => {
                let lifted = shared.lift(key)?;
                self.quarantine.lift(key, now_ms);
                lifted
            }
            None => self.quarantine.lift(key, now_ms),
        };
        for block in &lifted {
            // What tripped it is forgotten too: only fresh evidence can block it again.
            let _ = self.counters().forget(&block.rule, &block.key);
            self.book.forget(&block.rule, &block.key);
        }
        Ok(lifted)
    }

    fn pin_block(&self, key: &str, now: DateTime<Utc>) -> Result<Vec<Block>, PolicyError> {
        let now_ms = now.timestamp_millis();
        match &self.shared {
            Some(shared) => {
                let pinned = shared.pin(key)?;
                self.quarantine.pin(key, now_ms);
                Ok(pinned)
            }
            None => Ok(self.quarantine.pin(key, now_ms)),
        }
    }

    fn block_stats(&self) -> (usize, [u64; 4]) {
        self.quarantine.stats()
    }

    fn flagged(&self, now: DateTime<Utc>) -> Vec<FlaggedKey> {
        self.flagged.listed(now)
    }
}

fn note(block: &Block, state: &str) -> QuarantineNote {
    QuarantineNote {
        rule: block.rule.clone(),
        key: block.key.clone(),
        until: block.until,
        state: state.to_owned(),
    }
}

/// One request as a pass over the rules sees it.
/// A rule's counter readings in words, e.g. `rate_limit range:3 +46701 = 31.000 (limit 30.000)`.
fn readings_of(rule: &str, readings: &[CounterReading]) -> String {
    readings
        .iter()
        .filter(|r| r.rule == rule)
        .map(|r| {
            format!(
                "{} {} = {:.3} (limit {:.3})",
                r.condition, r.key, r.value, r.max
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The facts rules are checked against; none without an E.164 number.
fn facts_of(
    request: &VerificationRequestEvent,
    history: NumberHistory,
    now: DateTime<Utc>,
) -> Result<Facts<'_>, PolicyError> {
    Facts::of(request, history, now).ok_or_else(|| {
        PolicyError("identity.endpoint is not an E.164 number, so no rule can be checked".into())
    })
}

/// The request's price: upper-case currency and amount.
fn price_of(request: &VerificationRequestEvent) -> Option<(String, f64)> {
    request
        .price
        .as_ref()
        .and_then(|p| Some((p.currency_id.as_deref()?.to_ascii_uppercase(), p.amount?)))
}

struct Request<'a> {
    facts: &'a Facts<'a>,
    now_ms: i64,
    /// Upper-case currency and amount.
    price: Option<&'a (String, f64)>,
}

/// What a pass over the rules is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Finds the counters a decision will touch and changes nothing: blocks are looked
    /// at without counting toward probes, nothing trips, no hit is counted, and every
    /// request is taken as allowed so that what tracking reads is found too.
    Plan,
    /// Decides: counts, trips, and counts hits.
    Decide,
}

/// What one pass over the rules found.
struct Evaluation {
    /// The enforced rule that decided (`None`: the default).
    decided: Option<usize>,
    matched_prefix: Option<String>,
    /// Shadow matches, counter readings and quarantine note.
    explanation: Explanation,
    /// Spend reserved by a request that is denied after all, to give back.
    refunds: Vec<(CounterKey, i64, f64)>,
    /// What to track of an allowed request for the adaptive rules.
    tracked: Option<Tracked>,
    /// Rules that would have denied and let the returning number go on.
    spared: Vec<usize>,
}

impl RulesPolicy {
    /// Runs the request through the candidate rules in order: the first enforced rule
    /// that matches decides, shadow rules are evaluated throughout.
    fn evaluate(
        &self,
        s: &Snapshot,
        r: &Request<'_>,
        counters: &dyn CounterStore,
        pass: Pass,
    ) -> Result<Evaluation, PolicyError> {
        let (facts, now_ms) = (r.facts, r.now_ms);
        let mut explanation = Explanation::default();
        let mut decided: Option<usize> = None;
        let mut matched_prefix = None;
        let mut pending = Pending::default();
        let mut spares = Vec::new();
        for i in Self::candidates(s, &facts.number, facts.country) {
            let i = i as usize;
            let rule = &s.rules[i];
            if rule.mode == Mode::Enforce && decided.is_some() {
                continue; // only shadow rules are still evaluated
            }
            if !rule.conditions.holds(facts) {
                continue;
            }
            // Where this rule would deny, a returning number goes on to the next rule.
            let spared = rule.spare_returning && facts.returning;
            let quarantine_key = rule
                .block
                .as_ref()
                .zip(rule.limiters.first())
                .filter(|_| rule.mode == Mode::Enforce)
                .map(|(spec, limiter)| (spec, limiter.spec().value(facts)));
            if let Some((spec, key)) = &quarantine_key {
                let check = match pass {
                    // A probe is the exception: plan for the block.
                    Pass::Plan if self.quarantine.peek(&rule.name, key, now_ms) => {
                        if !spared {
                            decided = Some(i);
                        }
                        continue;
                    }
                    Pass::Plan => BlockCheck::Free,
                    Pass::Decide => self.quarantine.check(&rule.name, key, now_ms, spec),
                };
                match check {
                    BlockCheck::Free => {}
                    BlockCheck::Blocked(block) if spared => {
                        explanation.quarantine = Some(note(&block, "spared"));
                        spares.push(i);
                        continue;
                    }
                    BlockCheck::Blocked(block) => {
                        s.stats[i].hits.fetch_add(1, Ordering::Relaxed);
                        explanation.quarantine = Some(note(&block, "blocked"));
                        decided = Some(i);
                        continue;
                    }
                    BlockCheck::Probe(block) => {
                        explanation.quarantine = Some(note(&block, "probe"));
                        continue;
                    }
                }
            }
            let over = Self::limits_exceeded(
                rule,
                facts,
                now_ms,
                r.price,
                counters,
                &mut explanation.counters,
                &mut pending,
            )?;
            pending.counted.push(i);
            let uncertain = pass == Pass::Plan && !rule.limiters.is_empty();
            if !over
                || uncertain && rule.mode == Mode::Enforce
                || spared && rule.mode == Mode::Shadow
            {
                // Planning cannot know whether a counter is over: it plans for the rules
                // after it too (a decision that stops here leaves them unused).
                continue;
            }
            if pass == Pass::Decide {
                s.stats[i].hits.fetch_add(1, Ordering::Relaxed);
            }
            match rule.mode {
                Mode::Shadow => {
                    if pass == Pass::Decide {
                        self.flag(rule, facts, &explanation.counters);
                    }
                    explanation.shadow.push(ShadowMatch {
                        rule: rule.name.clone(),
                        would: rule.action,
                    });
                }
                Mode::Enforce => {
                    if spared {
                        spares.push(i);
                    } else {
                        decided = Some(i);
                        matched_prefix = rule.conditions.matched_prefix(facts);
                    }
                    // The key trips whoever asked: the next request in it is blocked.
                    if let Some((spec, key)) = quarantine_key {
                        let why = readings_of(&rule.name, &explanation.counters);
                        let evidence = self.evidence(&rule.name, &key);
                        let block = self.trip(&rule.name, &key, now_ms, spec, why, evidence)?;
                        explanation.quarantine = Some(note(&block, "tripped"));
                    }
                }
            }
        }
        let action = decided.map_or(s.default, |i| s.rules[i].action);
        let (tracked, refunds) = if action == Action::Allow || pass == Pass::Plan {
            let tracked = self.tracked(
                s,
                facts,
                counters,
                now_ms,
                pending.tracked,
                &pending.counted,
            )?;
            (tracked, Vec::new())
        } else {
            (None, pending.spend)
        };
        if pass == Pass::Decide {
            for &i in &spares {
                s.stats[i].spared.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Evaluation {
            decided,
            matched_prefix,
            explanation,
            refunds,
            tracked,
            spared: spares,
        })
    }

    /// What to track of an allowed request for the adaptive rules that apply to it, so
    /// its result can be counted under each rule's key (`None`: no rule applies).
    /// `pending` is what the rules evaluated (`counted`) already found to track.
    fn tracked(
        &self,
        s: &Snapshot,
        f: &Facts<'_>,
        counters: &dyn CounterStore,
        now_ms: i64,
        pending: Vec<(TrackedKey, i64)>,
        counted: &[usize],
    ) -> Result<Option<Tracked>, PolicyError> {
        let mut complete_after_ms = pending.iter().map(|(_, after)| *after).max().unwrap_or(0);
        let mut keys: Vec<TrackedKey> = pending.into_iter().map(|(key, _)| key).collect();
        for &i in &s.adaptive {
            let rule = &s.rules[i];
            if counted.contains(&i) || !rule.conditions.holds(f) {
                continue;
            }
            for limiter in &rule.limiters {
                if let Some((key, after)) = limiter.track(&rule.name, f, counters, now_ms)? {
                    complete_after_ms = complete_after_ms.max(after);
                    keys.push(key);
                }
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tracked {
            keys,
            allowed_ms: now_ms,
            // Sinch's own default expiry is 10 minutes; sinch_fraud needs no wait.
            complete_after_ms: if complete_after_ms > 0 {
                complete_after_ms
            } else {
                600_000
            },
            number: f.number.clone(),
        }))
    }

    /// Updates and checks a rule's counters; true when every limiter is over its max
    /// (a rule without limiters is always "over": its static conditions decide).
    fn limits_exceeded(
        rule: &Rule,
        f: &Facts<'_>,
        now_ms: i64,
        price: Option<&(String, f64)>,
        counters: &dyn CounterStore,
        readings: &mut Vec<CounterReading>,
        pending: &mut Pending,
    ) -> Result<bool, PolicyError> {
        let mut cx = CounterContext {
            rule: &rule.name,
            facts: f,
            now_ms,
            price,
            counters,
            readings,
            pending,
        };
        // Every limiter counts, even once one is under its limit.
        let mut over = true;
        for limiter in &rule.limiters {
            over &= limiter.over(&mut cx)?;
        }
        Ok(over)
    }
}

#[cfg(test)]
#[path = "rules_tests.rs"]
mod tests;
