//! How the verifications each rule decided, or matched in shadow, have ended, read from
//! the store: what `GET /v1/stats/rules` answers. Unlike the counts in `GET /v1/policy`,
//! which start again when the policy is loaded, these come from the stored records, so
//! they survive restarts and reloads and cover any period the store still holds.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{events::Action, store::VerificationRecord};

/// Outcomes per rule name, built from one record at a time.
#[derive(Debug, Default)]
pub struct RuleOutcomes {
    rules: BTreeMap<String, RuleOutcome>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct RuleOutcome {
    pub rule: String,
    /// Verifications the rule decided (`default` and `on_error` are rules here too).
    pub decided: Decided,
    /// Verifications the rule matched as a shadow rule, and how they ended.
    pub shadow: Shadowed,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Decided {
    pub verifications: u64,
    pub allowed: u64,
    pub denied: u64,
    /// By final status (`NONE` before any result).
    pub results: BTreeMap<String, u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Shadowed {
    pub verifications: u64,
    pub would_allow: u64,
    pub would_deny: u64,
    /// By final status (`NONE` before any result).
    pub results: BTreeMap<String, u64>,
    /// Of the finished verifications it would have denied, those that succeeded: real
    /// users it would have turned away.
    pub would_deny_successful: u64,
    pub would_deny_finished: u64,
    /// `1 - would_deny_successful / would_deny_finished`: how often denying would have
    /// been right. Null until one of them has finished.
    pub precision: Option<f64>,
}

/// A status that will not change any more: anything but no result yet, or `PENDING`.
fn finished(status: &str) -> bool {
    !matches!(status, "NONE" | "PENDING")
}

impl RuleOutcomes {
    pub fn add(&mut self, record: &VerificationRecord) {
        let Some(decision) = &record.decision else {
            return;
        };
        let status = record.status_label();
        let decided = &mut self.entry(decision.rule_label()).decided;
        decided.verifications += 1;
        match decision.action {
            Action::Allow => decided.allowed += 1,
            Action::Deny => decided.denied += 1,
        }
        *decided.results.entry(status.to_owned()).or_default() += 1;
        for matched in &decision.explanation.shadow {
            let shadow = &mut self.entry(&matched.rule).shadow;
            shadow.verifications += 1;
            *shadow.results.entry(status.to_owned()).or_default() += 1;
            match matched.would {
                Action::Allow => shadow.would_allow += 1,
                Action::Deny => {
                    shadow.would_deny += 1;
                    if finished(status) {
                        shadow.would_deny_finished += 1;
                        shadow.would_deny_successful += u64::from(status == "SUCCESSFUL");
                    }
                }
            }
        }
    }

    fn entry(&mut self, rule: &str) -> &mut RuleOutcome {
        self.rules
            .entry(rule.to_owned())
            .or_insert_with(|| RuleOutcome {
                rule: rule.to_owned(),
                ..RuleOutcome::default()
            })
    }

    /// Every rule met, by name.
    pub fn finish(self) -> Vec<RuleOutcome> {
        self.rules
            .into_values()
            .map(|mut r| {
                let s = &mut r.shadow;
                s.precision = (s.would_deny_finished > 0)
                    .then(|| 1.0 - s.would_deny_successful as f64 / s.would_deny_finished as f64);
                r
            })
            .collect()
    }
}
