//! What `verigate policy test` and `verigate policy replay` compute: table-driven cases
//! against a policy file, and a candidate policy replayed over stored verifications with
//! their real outcomes. Pure functions; the command line only reads files and prints.

use std::{collections::BTreeMap, fmt, path::Path};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{conditions, history_of, NumberHistory, PastVerification, Policy, RulesPolicy};
use crate::{
    events::{Action, Identity, VerificationMethod, VerificationRequestEvent},
    store::VerificationRecord,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(rename = "case")]
    cases: Vec<toml::Table>,
}

/// One expectation: this request, at this time, after this many earlier requests for
/// the same number, gets this action (from this rule).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub number: String,
    #[serde(default)]
    pub at: Option<DateTime<Utc>>,
    /// Requests for the same number in the minutes before (they feed rate limits).
    #[serde(default)]
    pub prior: u32,
    pub expect: Action,
    /// The deciding rule, or `default`.
    #[serde(default)]
    pub rule: Option<String>,
    /// The number's latest finished verification succeeded (for `spare_returning`).
    #[serde(default)]
    pub returning: bool,
    /// What the conditions read from the request (`method`, `price`, …), as each
    /// condition defines them.
    #[serde(skip)]
    pub fields: conditions::CaseFields,
}

impl Case {
    const FIELDS: [&'static str; 7] = [
        "name",
        "number",
        "at",
        "prior",
        "expect",
        "rule",
        "returning",
    ];

    /// A case from its table: the fields every case has, and the conditions' fields.
    fn parse(mut table: toml::Table) -> Result<Self, String> {
        let fields: conditions::CaseFields = table
            .keys()
            .filter(|k| !Self::FIELDS.contains(&k.as_str()))
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|k| table.remove_entry(&k))
            .collect();
        let mut case: Case = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.message().to_owned())?;
        let known = conditions::case_fields();
        if let Some(unknown) = fields.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!(
                "case `{}`: unknown field `{unknown}` (a case has {} and {})",
                case.name,
                Self::FIELDS.join(", "),
                known.join(", ")
            ));
        }
        case.fields = fields;
        Ok(case)
    }

    fn request(&self, id: String) -> Result<VerificationRequestEvent, String> {
        let mut request = VerificationRequestEvent {
            id,
            method: VerificationMethod::Sms,
            identity: Identity {
                kind: Some("number".into()),
                endpoint: self.number.clone(),
            },
            price: None,
            rate: None,
            reference: None,
            custom: None,
            accept_language: None,
        };
        conditions::apply_case(&self.fields, &mut request)
            .map_err(|e| format!("case `{}`: {e}", self.name))?;
        Ok(request)
    }
}

/// How one case went.
#[derive(Debug)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// Runs every case in `cases_toml` against a fresh load of the policy at `policy_path`
/// (fresh counters per case, so cases do not affect each other).
pub fn run_cases(
    policy_path: &Path,
    cases_toml: &str,
    now: DateTime<Utc>,
) -> Result<Vec<CaseResult>, String> {
    let file: CasesFile = toml::from_str(cases_toml).map_err(|e| format!("cases: {e}"))?;
    let mut results = Vec::new();
    for (i, table) in file.cases.into_iter().enumerate() {
        let case = Case::parse(table).map_err(|e| format!("cases: case {}: {e}", i + 1))?;
        let policy = RulesPolicy::load(policy_path).map_err(|e| e.to_string())?;
        let at = case.at.unwrap_or(now);
        let history = if case.returning {
            NumberHistory::Returning
        } else {
            NumberHistory::New
        };
        for i in 0..case.prior {
            let earlier = at - Duration::minutes(i64::from(case.prior - i));
            let _ = policy.decide(&case.request(format!("prior-{i}"))?, history, earlier);
        }
        let outcome = policy.decide(&case.request("case".into())?, history, at);
        let (passed, detail) = match outcome {
            Err(err) => (false, format!("no decision: {err}")),
            Ok(d) => {
                let rule = d.rule.unwrap_or_else(|| "default".into());
                let rule_ok = case.rule.as_ref().is_none_or(|r| *r == rule);
                let passed = d.action == case.expect && rule_ok;
                let wanted = match &case.rule {
                    Some(r) => format!("{} by {r}", case.expect),
                    None => case.expect.to_string(),
                };
                (
                    passed,
                    format!("got {} by {rule}, expected {wanted}", d.action),
                )
            }
        };
        results.push(CaseResult {
            name: case.name,
            passed,
            detail,
        });
    }
    Ok(results)
}

/// Verifications whose answer would change, grouped, with their real outcomes.
#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub replayed: usize,
    pub unchanged: usize,
    /// Records whose number is stored hashed: conditions on it cannot be replayed.
    pub skipped_hashed: usize,
    /// `allow → deny`, by the candidate's deciding rule: final statuses of those verifications.
    pub newly_denied: BTreeMap<String, BTreeMap<String, u64>>,
    /// `deny → allow`, by the rule that denied them before.
    pub newly_allowed: BTreeMap<String, BTreeMap<String, u64>>,
}

/// The request event a stored record was made from; `None` without a number in clear.
pub fn request_of(record: &VerificationRecord) -> Option<VerificationRequestEvent> {
    let number = record
        .number
        .as_deref()
        .filter(|n| !n.starts_with("hmac-"))?;
    Some(VerificationRequestEvent {
        id: record.id.clone(),
        method: VerificationMethod::parse(record.method.as_deref().unwrap_or("sms")),
        identity: Identity {
            kind: Some("number".into()),
            endpoint: number.to_owned(),
        },
        price: record.request.as_ref().and_then(|r| r.price.clone()),
        rate: record.request.as_ref().and_then(|r| r.rate.clone()),
        reference: record.reference.clone(),
        custom: record.custom.clone(),
        accept_language: record
            .request
            .as_ref()
            .and_then(|r| r.accept_language.clone()),
    })
}

/// A stored verification as adaptive rules relearn from it.
pub fn past_verification(record: &VerificationRecord) -> PastVerification {
    PastVerification {
        id: record.id.clone(),
        request: request_of(record),
        allowed_at: record
            .decision
            .as_ref()
            .filter(|d| d.action == Action::Allow)
            .map(|d| d.decided_at),
        result: record
            .result
            .as_ref()
            .map(|r| (r.status.clone(), r.reason.clone(), r.received_at)),
    }
}

/// Replays stored request events through `candidate` in the order they arrived, with its
/// counters starting empty, and compares with what was answered.
pub fn replay(
    candidate: &RulesPolicy,
    records: impl IntoIterator<Item = VerificationRecord>,
) -> ReplayReport {
    let mut requests: Vec<(DateTime<Utc>, VerificationRecord)> = records
        .into_iter()
        .filter_map(|r| Some((r.request.as_ref()?.received_at, r)))
        .filter(|(_, r)| r.decision.is_some())
        .collect();
    requests.sort_by_key(|(at, _)| *at);
    // Each number's verifications, for a candidate that spares returning numbers.
    let window = candidate
        .number_history_window()
        .and_then(|w| Duration::from_std(w).ok());
    let mut by_number: std::collections::HashMap<&str, Vec<&VerificationRecord>> =
        std::collections::HashMap::new();
    if window.is_some() {
        for (_, record) in &requests {
            if let Some(number) = &record.number {
                by_number.entry(number).or_default().push(record);
            }
        }
    }
    let mut report = ReplayReport::default();
    for &(at, ref record) in &requests {
        let (Some(number), Some(old)) = (record.number.as_deref(), record.decision.as_ref()) else {
            continue;
        };
        let Some(request) = request_of(record) else {
            report.skipped_hashed += 1;
            continue;
        };
        // What the store held when it was asked: not this verification itself.
        let history = match (window, by_number.get(number)) {
            (Some(within), Some(records)) => {
                let earlier = records.iter().copied().filter(|r| r.id != record.id);
                history_of(earlier, at, within)
            }
            _ => NumberHistory::New,
        };
        let Ok(new) = candidate.decide(&request, history, at) else {
            continue;
        };
        report.replayed += 1;
        let status = record
            .result
            .as_ref()
            .map_or("NONE", |r| r.status.as_str())
            .to_owned();
        let label = |rule: Option<&String>, on_error: bool| match (rule, on_error) {
            (_, true) => "on_error".to_owned(),
            (Some(r), _) => r.clone(),
            (None, _) => "default".to_owned(),
        };
        match (old.action, new.action) {
            (Action::Allow, Action::Deny) => {
                *report
                    .newly_denied
                    .entry(label(new.rule.as_ref(), false))
                    .or_default()
                    .entry(status)
                    .or_default() += 1
            }
            (Action::Deny, Action::Allow) => {
                *report
                    .newly_allowed
                    .entry(label(old.rule.as_ref(), old.on_error))
                    .or_default()
                    .entry(status)
                    .or_default() += 1
            }
            _ => report.unchanged += 1,
        }
    }
    report
}

impl fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = |m: &BTreeMap<String, BTreeMap<String, u64>>| {
            m.values().flat_map(|s| s.values()).sum::<u64>()
        };
        writeln!(
            f,
            "replayed {} request events: {} unchanged",
            self.replayed, self.unchanged
        )?;
        if self.skipped_hashed > 0 {
            writeln!(
                f,
                "skipped {} with hashed numbers (store.hash_numbers)",
                self.skipped_hashed
            )?;
        }
        for (title, groups, note) in [
            (
                "allow → deny",
                &self.newly_denied,
                "by the candidate's rule",
            ),
            (
                "deny → allow",
                &self.newly_allowed,
                "by the rule that denied them",
            ),
        ] {
            writeln!(f, "{title}: {} ({note})", total(groups))?;
            for (rule, statuses) in groups {
                let mix: Vec<String> = statuses.iter().map(|(s, n)| format!("{s} {n}")).collect();
                writeln!(
                    f,
                    "  {rule}: {} [{}]",
                    statuses.values().sum::<u64>(),
                    mix.join(", ")
                )?;
            }
        }
        if let Some(lost) = self
            .newly_denied
            .values()
            .filter_map(|s| s.get("SUCCESSFUL"))
            .copied()
            .reduce(|a, b| a + b)
        {
            writeln!(f, "{lost} newly denied verifications had succeeded: real users the candidate would turn away")?;
        }
        Ok(())
    }
}
