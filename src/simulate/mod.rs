//! `verigate simulate`: plays verification traffic with SMS-pumping attacks against a
//! policy file in compressed time, and scores what the policy did against the ground
//! truth only the simulator knows.
//!
//! The policy is the real one (the same [`RulesPolicy`] that answers Sinch), driven
//! through `decide` and `observe_outcome` with the simulated time: results arrive when
//! Sinch would send them, only for what was allowed. Traffic is synthetic (`traffic.rs`:
//! warm-up days, then a day with every attack kind) or an operator's own stored
//! verifications with the synthetic attacks mixed in (`with_stored`).

mod traffic;

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    fmt,
    time::Instant,
};

use chrono::{DateTime, Utc};
use serde::Serialize;

pub use crate::rng::Rng;
pub use traffic::{attacks_only, synthetic, AttackKind, Knobs};

use crate::{
    events::{Action, VerificationRequestEvent},
    policy::{adaptive::Resolution, NumberHistory, Outcome, Policy, RulesPolicy},
    store::VerificationRecord,
};

/// One verification of the simulation.
#[derive(Debug, Clone)]
pub struct SimVerification {
    pub at_ms: i64,
    pub request: VerificationRequestEvent,
    pub truth: Truth,
    /// What Sinch reports if verigate allows it: status, reason, and how long after the
    /// request (`None`: no result ever arrives).
    pub result: Option<(String, Option<String>, i64)>,
}

/// Who is really behind a verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Truth {
    /// A real user; `spike` marks the marketing campaign's extra traffic.
    Legit {
        country: String,
        spike: bool,
    },
    Attack(AttackKind),
}

/// Stored verifications as simulation traffic: each request when it arrived, with the
/// result it really got, `shift_ms` later. What the store keeps without a clear number
/// cannot be replayed and is left out.
pub fn from_records(records: &[VerificationRecord], shift_ms: i64) -> Vec<SimVerification> {
    let mut out: Vec<SimVerification> = records
        .iter()
        .filter_map(|record| {
            let stored = record.request.as_ref()?;
            let request = crate::policy::tools::request_of(record)?;
            let at_ms = stored.received_at.timestamp_millis();
            let country = crate::phone::country::CountryTable::get()
                .country_of(&request.identity.endpoint)
                .unwrap_or("unknown")
                .to_owned();
            let result = record.result.as_ref().map(|r| {
                (
                    r.status.clone(),
                    r.reason.clone(),
                    (r.received_at.timestamp_millis() - at_ms).max(0),
                )
            });
            Some(SimVerification {
                at_ms: at_ms + shift_ms,
                request,
                truth: Truth::Legit {
                    country,
                    spike: false,
                },
                result,
            })
        })
        .collect();
    out.sort_by_key(|v| v.at_ms);
    out
}

/// Mixes two time-ordered traffics into one.
pub fn merge(a: Vec<SimVerification>, b: Vec<SimVerification>) -> Vec<SimVerification> {
    let mut out: Vec<SimVerification> = a.into_iter().chain(b).collect();
    out.sort_by_key(|v| v.at_ms);
    out
}

/// How one group of verifications fared.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub attempts: u64,
    pub denied: u64,
    /// Allowed, but a shadow rule would have denied it.
    pub flagged: u64,
    pub cost_eur: f64,
    pub cost_denied_eur: f64,
    /// Minutes from the group's start to its first denial (attacks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_denied_after_min: Option<f64>,
    /// Minutes from the group's start until a shadow rule first said it would deny one
    /// (attacks): when an operator watching the policy's shadow rules learns of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_flagged_after_min: Option<f64>,
    /// The key that shadow rule named then (`GET /v1/policy/flagged`): the block an
    /// operator is pointed to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_flagged_key: Option<String>,
}

impl Tally {
    fn add(&mut self, price: f64, denied: bool, flagged: bool) {
        self.attempts += 1;
        self.flagged += u64::from(flagged && !denied);
        self.cost_eur += price;
        if denied {
            self.denied += 1;
            self.cost_denied_eur += price;
        }
    }

    /// Share of attempts denied.
    pub fn denied_share(&self) -> f64 {
        ratio(self.denied as f64, self.attempts as f64)
    }

    /// Share of cost denied.
    pub fn cost_share(&self) -> f64 {
        ratio(self.cost_denied_eur, self.cost_eur)
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

/// What the policy did, against the truth.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scorecard {
    /// Every legitimate verification of the scored period.
    pub legit: Tally,
    /// Legitimate verifications by country.
    pub legit_by_country: BTreeMap<String, Tally>,
    /// The marketing spike's extra traffic.
    pub spike: Tally,
    /// Real users verifying again after an earlier success.
    pub returning: Tally,
    pub attacks: Tally,
    /// Every attack but the hidden one: what the policy must block.
    pub blockable: Tally,
    pub by_attack: BTreeMap<AttackKind, Tally>,
    /// Rules that denied legitimate verifications, and how many.
    pub legit_denied_by_rule: BTreeMap<String, u64>,
    /// Mean time of one decide plus one outcome report, in ns.
    pub decide_and_observe_ns: f64,
    /// Verifications played, warm-up included.
    pub played: u64,
}

/// A result waiting to be reported: when, then an order among equal times.
struct Due {
    at_ms: i64,
    order: u64,
    id: String,
    number: String,
    requested_ms: i64,
    rule: Option<String>,
    shadow: Vec<crate::decision::ShadowMatch>,
    status: String,
    reason: Option<String>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at_ms, self.order) == (other.at_ms, other.order)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_ms, self.order).cmp(&(other.at_ms, other.order))
    }
}

/// Plays `traffic` (time-ordered) against `policy`; verifications from `scored_from_ms`
/// on are scored. An attack kind's time to first denial counts from its first attempt
/// that pumps. `scale` is how fast the traffic's clock runs (`Knobs::time_scale`):
/// minutes are reported as the simulated day's.
pub fn play(
    policy: &RulesPolicy,
    traffic: &[SimVerification],
    scored_from_ms: i64,
    scale: f64,
) -> Scorecard {
    let mut card = Scorecard::default();
    let mut due: BinaryHeap<Reverse<Due>> = BinaryHeap::new();
    let mut first_attempt: BTreeMap<AttackKind, i64> = BTreeMap::new();
    let mut spent_ns: u128 = 0;
    let learning = policy.learning();
    // What the store would answer about each number: when its latest finished
    // verification was asked for, and whether it succeeded (verifications end within
    // ten minutes here, so none is still open once its result is due). A real user
    // whose latest verification succeeded is returning, whether the policy reads it
    // or not.
    let reads_history = policy.number_history_window().is_some();
    let mut latest: HashMap<String, (i64, bool)> = HashMap::new();
    let report = |d: Due, spent_ns: &mut u128| {
        let Some(learning) = learning else { return };
        let at = time(d.at_ms);
        let started = Instant::now();
        learning.observe_outcome(Outcome {
            id: &d.id,
            rule: d.rule.as_deref(),
            shadow: &d.shadow,
            status: &d.status,
            reason: d.reason.as_deref(),
            at,
            book: crate::policy::BookTaking::NotAsked,
        });
        *spent_ns += started.elapsed().as_nanos();
    };
    for (order, v) in traffic.iter().enumerate() {
        while due.peek().is_some_and(|Reverse(d)| d.at_ms <= v.at_ms) {
            if let Some(Reverse(d)) = due.pop() {
                note_result(&mut latest, &d);
                report(d, &mut spent_ns);
            }
        }
        let returning = matches!(latest.get(&v.request.identity.endpoint), Some((_, true)));
        let history = if returning && reads_history {
            NumberHistory::Returning
        } else {
            NumberHistory::New
        };
        let started = Instant::now();
        let decision = policy.decide(&v.request, history, time(v.at_ms));
        spent_ns += started.elapsed().as_nanos();
        card.played += 1;
        let (denied, rule, shadow) = match decision {
            Ok(d) => (d.action == Action::Deny, d.rule, d.explanation.shadow),
            Err(_) => (policy.on_error() == Action::Deny, None, Vec::new()),
        };
        let flagged = shadow.iter().any(|m| m.would == Action::Deny);
        let shadow_rules: Vec<String> = shadow
            .iter()
            .filter(|m| m.would == Action::Deny)
            .map(|m| m.rule.clone())
            .collect();
        if !denied {
            if let Some((status, reason, after)) = &v.result {
                due.push(Reverse(Due {
                    at_ms: v.at_ms + after,
                    order: order as u64,
                    id: v.request.id.clone(),
                    number: v.request.identity.endpoint.clone(),
                    requested_ms: v.at_ms,
                    rule: rule.clone(),
                    shadow,
                    status: status.clone(),
                    reason: reason.clone(),
                }));
            }
        }
        if v.at_ms < scored_from_ms {
            continue;
        }
        let price = v
            .request
            .price
            .as_ref()
            .and_then(|p| p.amount)
            .unwrap_or(0.0);
        match &v.truth {
            Truth::Legit { country, spike } => {
                if returning {
                    card.returning.add(price, denied, flagged);
                }
                card.legit.add(price, denied, flagged);
                card.legit_by_country
                    .entry(country.clone())
                    .or_default()
                    .add(price, denied, flagged);
                if *spike {
                    card.spike.add(price, denied, flagged);
                }
                if denied {
                    let rule = rule.unwrap_or_else(|| "(default or on_error)".to_owned());
                    *card.legit_denied_by_rule.entry(rule).or_default() += 1;
                }
            }
            Truth::Attack(kind) => {
                card.attacks.add(price, denied, flagged);
                if !kind.is_hidden() {
                    card.blockable.add(price, denied, flagged);
                }
                let tally = card.by_attack.entry(*kind).or_default();
                tally.add(price, denied, flagged);
                // Timed from its first attempt that pumps (a groom only prepares).
                let of_day_min = (v.at_ms - scored_from_ms) as f64 / scale / 60_000.0;
                if !kind.pumps_at(of_day_min.floor() as i64) {
                    continue;
                }
                let start = *first_attempt.entry(*kind).or_insert(v.at_ms);
                let after_min = (v.at_ms - start) as f64 / scale / 60_000.0;
                if denied && tally.first_denied_after_min.is_none() {
                    tally.first_denied_after_min = Some(after_min);
                }
                if flagged && tally.first_flagged_after_min.is_none() {
                    tally.first_flagged_after_min = Some(after_min);
                    tally.first_flagged_key = flagged_key(policy, &shadow_rules, time(v.at_ms));
                }
            }
        }
    }
    while let Some(Reverse(d)) = due.pop() {
        report(d, &mut spent_ns);
    }
    card.decide_and_observe_ns = ratio(spent_ns as f64, card.played as f64);
    card
}

/// Keeps a number's latest finished verification as the store would show it.
fn note_result(latest: &mut HashMap<String, (i64, bool)>, d: &Due) {
    match Resolution::of(&d.status, d.reason.as_deref()) {
        None | Some(Resolution::Excluded) => {}
        Some(resolution) => {
            let entry = latest.entry(d.number.clone()).or_insert((i64::MIN, false));
            if d.requested_ms >= entry.0 {
                *entry = (d.requested_ms, resolution == Resolution::Success);
            }
        }
    }
}

/// The key a shadow rule of `rules` flagged at `at`, as the policy lists it.
fn flagged_key(policy: &dyn Policy, rules: &[String], at: DateTime<Utc>) -> Option<String> {
    policy
        .quarantines()?
        .flagged(at)
        .into_iter()
        .find(|f| f.last == at && rules.contains(&f.rule))
        .map(|f| f.key)
}

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Where synthetic days begin (a Monday; any fixed time would do).
pub const SYNTHETIC_START_MS: i64 = 1_795_392_000_000;

/// Plays the knobs' synthetic days against a fresh policy from `policy`; the day with
/// the attacks is scored. With a `time_scale`, the policy's durations and the traffic's
/// timeline are scaled alike.
pub fn run_synthetic(
    policy: &std::path::Path,
    knobs: &Knobs,
) -> Result<Scorecard, crate::policy::PolicyLoadError> {
    let scale = knobs.time_scale;
    let policy = if scale == 1.0 {
        RulesPolicy::load(policy)?
    } else {
        RulesPolicy::load_scaled(policy, scale)?
    };
    let traffic = on_scaled_clock(
        synthetic(knobs, SYNTHETIC_START_MS),
        SYNTHETIC_START_MS,
        scale,
    );
    let scored_from = SYNTHETIC_START_MS + scaled(i64::from(knobs.warmup_days) * DAY_MS, scale);
    Ok(play(&policy, &traffic, scored_from, scale))
}

fn scaled(ms: i64, scale: f64) -> i64 {
    (ms as f64 * scale).round() as i64
}

/// `traffic` with every time since `start_ms` (and every result's delay) multiplied by
/// `scale`.
fn on_scaled_clock(
    traffic: Vec<SimVerification>,
    start_ms: i64,
    scale: f64,
) -> Vec<SimVerification> {
    traffic
        .into_iter()
        .map(|mut v| {
            v.at_ms = start_ms + scaled(v.at_ms - start_ms, scale);
            if let Some((_, _, after)) = &mut v.result {
                *after = scaled(*after, scale);
            }
            v
        })
        .collect()
}

/// Plays stored verifications with the knobs' attacks mixed into their last day against
/// a fresh policy from `policy`; that day is scored (the days before it are the
/// warm-up). `None` when no stored verification can be replayed.
pub fn run_with_stored(
    policy: &std::path::Path,
    knobs: &Knobs,
    records: &[VerificationRecord],
) -> Result<Option<Scorecard>, crate::policy::PolicyLoadError> {
    let policy = RulesPolicy::load(policy)?;
    let stored = from_records(records, 0);
    let (Some(first), Some(last)) = (stored.first(), stored.last()) else {
        return Ok(None);
    };
    let day_start = (last.at_ms - DAY_MS).max(first.at_ms);
    let traffic = merge(stored, attacks_only(knobs, day_start));
    Ok(Some(play(&policy, &traffic, day_start, 1.0)))
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// The targets verigate's sample policy is held to (docs/fraud-defence.md), with and
/// without a warm-up day. The hidden attack is scored apart: it cannot be blocked
/// without turning away the real users it hides among.
pub struct Targets;

impl Targets {
    /// Over every attack kind but the hidden one.
    pub const ATTACK_COST_BLOCKED: f64 = 0.90;
    /// Each kind but the hidden one.
    pub const EACH_KIND_BLOCKED: f64 = 0.85;
    pub const LEGIT_BLOCKED: f64 = 0.003;
    pub const LEGIT_BLOCKED_PER_COUNTRY: f64 = 0.01;
    /// Real users verifying again after an earlier success.
    pub const RETURNING_BLOCKED: f64 = 0.001;
    /// Median over the kinds at 3 or more attempts a minute.
    pub const MEDIAN_MINUTES_TO_BLOCK: f64 = 10.0;
    pub const DECIDE_AND_OBSERVE_NS: f64 = 15_000.0;
}

impl Scorecard {
    /// Median minutes to the first denial over the attack kinds at 3 or more attempts
    /// a minute (a kind never denied counts as never: infinitely late).
    pub fn median_minutes_to_block(&self) -> Option<f64> {
        let mut times: Vec<f64> = self
            .by_attack
            .iter()
            .filter(|(kind, _)| kind.is_fast())
            .map(|(_, t)| t.first_denied_after_min.unwrap_or(f64::INFINITY))
            .collect();
        if times.is_empty() {
            return None;
        }
        times.sort_by(f64::total_cmp);
        let mid = times.len() / 2;
        Some(if times.len() % 2 == 1 {
            times[mid]
        } else {
            (times[mid - 1] + times[mid]) / 2.0
        })
    }

    /// The targets this scorecard misses, in words (empty: all met).
    pub fn misses(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                out.push(what);
            }
        };
        if self.blockable.attempts > 0 {
            check(
                self.blockable.cost_share() >= Targets::ATTACK_COST_BLOCKED,
                format!(
                    "attack cost blocked {:.1} % < {:.0} %",
                    100.0 * self.blockable.cost_share(),
                    100.0 * Targets::ATTACK_COST_BLOCKED
                ),
            );
        }
        for (kind, t) in self.by_attack.iter().filter(|(k, _)| !k.is_hidden()) {
            check(
                t.cost_share() >= Targets::EACH_KIND_BLOCKED,
                format!(
                    "{kind}: {:.1} % of its cost blocked < {:.0} %",
                    100.0 * t.cost_share(),
                    100.0 * Targets::EACH_KIND_BLOCKED
                ),
            );
        }
        check(
            self.legit.denied_share() <= Targets::LEGIT_BLOCKED,
            format!(
                "legitimate blocked {:.2} % > {:.1} %",
                100.0 * self.legit.denied_share(),
                100.0 * Targets::LEGIT_BLOCKED
            ),
        );
        for (country, t) in &self.legit_by_country {
            check(
                t.denied_share() <= Targets::LEGIT_BLOCKED_PER_COUNTRY,
                format!(
                    "legitimate blocked in {country} {:.2} % > {:.0} %",
                    100.0 * t.denied_share(),
                    100.0 * Targets::LEGIT_BLOCKED_PER_COUNTRY
                ),
            );
        }
        check(
            self.returning.denied_share() <= Targets::RETURNING_BLOCKED,
            format!(
                "returning users blocked {:.2} % > {:.1} %",
                100.0 * self.returning.denied_share(),
                100.0 * Targets::RETURNING_BLOCKED
            ),
        );
        check(
            self.spike.denied == 0,
            format!("{} of the marketing spike blocked", self.spike.denied),
        );
        if let Some(median) = self.median_minutes_to_block() {
            check(
                median <= Targets::MEDIAN_MINUTES_TO_BLOCK,
                format!(
                    "median time to first block {median:.1} min > {:.0} min",
                    Targets::MEDIAN_MINUTES_TO_BLOCK
                ),
            );
        }
        check(
            self.decide_and_observe_ns < Targets::DECIDE_AND_OBSERVE_NS,
            format!(
                "decide + observe {:.0} ns >= {:.0} ns",
                self.decide_and_observe_ns,
                Targets::DECIDE_AND_OBSERVE_NS
            ),
        );
        out
    }
}

impl fmt::Display for Scorecard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  attack cost blocked:              {:>6.1} %  ({:.2} of {:.2} EUR, {} attempts; the hidden kind apart)",
            100.0 * self.blockable.cost_share(),
            self.blockable.cost_denied_eur,
            self.blockable.cost_eur,
            self.blockable.attempts
        )?;
        for (kind, t) in &self.by_attack {
            let first = t
                .first_denied_after_min
                .map_or_else(|| "never".to_owned(), |m| format!("{m:.0} min"));
            let flagged = t.first_flagged_after_min.map_or_else(String::new, |m| {
                let key = t
                    .first_flagged_key
                    .as_ref()
                    .map_or_else(String::new, |k| format!(" (key {k})"));
                format!(", flagged by a shadow rule after {m:.0} min{key}")
            });
            writeln!(
                f,
                "    {:<14} {:>6.1} % of its cost blocked, first denial after {first}{flagged}{}",
                kind.name(),
                100.0 * t.cost_share(),
                if kind.is_hidden() { " (hidden)" } else { "" }
            )?;
        }
        if let Some(median) = self.median_minutes_to_block() {
            writeln!(
                f,
                "    median time to first denial (attacks at 3 or more a minute): {median:.1} min"
            )?;
        }
        writeln!(
            f,
            "  legitimate verifications blocked: {:>6.2} %  ({} of {})",
            100.0 * self.legit.denied_share(),
            self.legit.denied,
            self.legit.attempts
        )?;
        let countries: Vec<String> = self
            .legit_by_country
            .iter()
            .map(|(c, t)| format!("{c} {:.2} %", 100.0 * t.denied_share()))
            .collect();
        writeln!(f, "    by country: {}", countries.join(", "))?;
        if self.returning.attempts > 0 {
            writeln!(
                f,
                "    returning users (an earlier verification succeeded): {:.2} % ({} of {})",
                100.0 * self.returning.denied_share(),
                self.returning.denied,
                self.returning.attempts
            )?;
        }
        if self.spike.attempts > 0 {
            writeln!(
                f,
                "    marketing spike: {} of {} blocked",
                self.spike.denied, self.spike.attempts
            )?;
        }
        for (rule, n) in &self.legit_denied_by_rule {
            writeln!(f, "    denied by {rule}: {n}")?;
        }
        writeln!(
            f,
            "  decide + observe: {:.2} µs a verification ({} played)",
            self.decide_and_observe_ns / 1000.0,
            self.played
        )
    }
}

#[cfg(test)]
mod tests;
