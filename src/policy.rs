//! Deciding allow/deny for a verification request.
//!
//! [`Policy`] is the seam: verigate calls `decide` for every request event and answers
//! `on_error()` whenever a decision cannot be made. [`RulesPolicy`] is the default
//! implementation, read from a TOML file of ordered rules matching numbers and E.164
//! prefixes; the first matching rule decides, else `default` does.

use std::{collections::HashSet, fmt, path::Path};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::{Action, ResponseFields, VerificationRequestEvent};

/// The outcome for one request event, with enough context to explain it later.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDecision {
    pub action: Action,
    /// The rule that decided; `None` when the policy default applied.
    pub rule: Option<String>,
    /// Why, in words an operator reads in a log line or record.
    pub reason: String,
    /// Answer fields for the request's method (empty for a deny).
    #[serde(default)]
    pub response: ResponseFields,
}

/// A decision that could not be made; the caller answers `on_error` instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PolicyError(pub String);

/// Anything that can decide allow/deny. Implementations must be cheap and must not block:
/// Sinch waits for the answer.
pub trait Policy: Send + Sync + 'static {
    fn decide(&self, request: &VerificationRequestEvent) -> Result<PolicyDecision, PolicyError>;

    /// What to answer when `decide` fails or the decision cannot be recorded.
    fn on_error(&self) -> Action;

    /// Identifies the policy content in records and logs (e.g. a content hash).
    fn version(&self) -> &str;
}

/// Why a policy file was refused, with its location when the parser knows it.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    default: Action,
    #[serde(default = "deny")]
    on_error: Action,
    /// Answer fields sent with every allow unless the deciding rule sets its own.
    #[serde(default)]
    response: ResponseFields,
    #[serde(default, rename = "rule")]
    rules: Vec<toml::Spanned<RuleFile>>,
}

fn deny() -> Action {
    Action::Deny
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    action: Action,
    #[serde(default)]
    number: Vec<toml::Spanned<String>>,
    #[serde(default)]
    prefix: Vec<toml::Spanned<String>>,
    #[serde(default)]
    response: Option<ResponseFields>,
}

/// One compiled rule: every condition given must hold.
#[derive(Debug, Clone)]
struct Rule {
    name: String,
    action: Action,
    numbers: HashSet<String>,
    prefixes: HashSet<String>,
    /// Longest prefix length, so matching looks at no more leading slices than needed.
    max_prefix_len: usize,
    response: Option<ResponseFields>,
}

impl Rule {
    /// The matched condition, described for the decision's `reason`.
    fn matches(&self, number: &str) -> Option<String> {
        let mut why = Vec::new();
        if !self.numbers.is_empty() {
            if !self.numbers.contains(number) {
                return None;
            }
            why.push("number is listed".to_owned());
        }
        if !self.prefixes.is_empty() {
            let prefix = (2..=self.max_prefix_len.min(number.len()))
                .map(|len| &number[..len])
                .find(|p| self.prefixes.contains(*p))?;
            why.push(format!("prefix {prefix}"));
        }
        if why.is_empty() {
            why.push("rule has no conditions".to_owned());
        }
        Some(why.join(", "))
    }
}

/// The default policy: ordered number/prefix rules from a TOML file.
#[derive(Debug, Clone)]
pub struct RulesPolicy {
    default: Action,
    on_error: Action,
    response: ResponseFields,
    rules: Vec<Rule>,
    version: String,
}

impl RulesPolicy {
    pub fn load(path: &Path) -> Result<Self, PolicyLoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyLoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a policy; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyLoadError> {
        let invalid = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = line_column(text, span.map_or(0, |s| s.start));
            PolicyLoadError::Invalid {
                path: origin.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| invalid(e.span(), e.message().to_owned()))?;
        validate_response(&file.response).map_err(|m| invalid(None, m))?;
        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(file.rules.len());
        for spanned in file.rules {
            let span = spanned.span();
            let rule = spanned.into_inner();
            if !names.insert(rule.name.clone()) {
                return Err(invalid(
                    Some(span),
                    format!("duplicate rule name `{}`", rule.name),
                ));
            }
            if let Some(response) = &rule.response {
                validate_response(response).map_err(|m| {
                    invalid(Some(span.clone()), format!("rule `{}`: {m}", rule.name))
                })?;
            }
            let numbers = e164_entries(&rule.number, |d| d.len() >= 3 && d.len() <= 15, "number")
                .map_err(|(s, m)| invalid(Some(s), m))?;
            let prefixes = e164_entries(&rule.prefix, |d| !d.is_empty() && d.len() <= 15, "prefix")
                .map_err(|(s, m)| invalid(Some(s), m))?;
            rules.push(Rule {
                max_prefix_len: prefixes.iter().map(String::len).max().unwrap_or(0),
                name: rule.name,
                action: rule.action,
                numbers,
                prefixes,
                response: rule.response,
            });
        }
        Ok(Self {
            default: file.default,
            on_error: file.on_error,
            response: file.response,
            rules,
            version: content_version(text),
        })
    }

    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }
}

impl Policy for RulesPolicy {
    fn decide(&self, request: &VerificationRequestEvent) -> Result<PolicyDecision, PolicyError> {
        let number = normalise_number(&request.identity.endpoint).ok_or_else(|| {
            PolicyError(
                "identity.endpoint is not an E.164 number, so no rule can be checked".into(),
            )
        })?;
        let (action, rule, reason, response) = self
            .rules
            .iter()
            .find_map(|rule| {
                rule.matches(&number).map(|why| {
                    (
                        rule.action,
                        Some(rule.name.clone()),
                        why,
                        rule.response.as_ref(),
                    )
                })
            })
            .unwrap_or((
                self.default,
                None,
                "no rule matched; policy default".into(),
                None,
            ));
        let response = match action {
            Action::Allow => response
                .unwrap_or(&self.response)
                .for_method(&request.method),
            Action::Deny => ResponseFields::default(),
        };
        Ok(PolicyDecision {
            action,
            rule,
            reason,
            response,
        })
    }

    fn on_error(&self) -> Action {
        self.on_error
    }

    fn version(&self) -> &str {
        &self.version
    }
}

/// `+` followed by 1..=15 digits; leading `+` added when a bare digit string arrives.
pub fn normalise_number(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let digits = raw.strip_prefix('+').unwrap_or(raw);
    let valid = !digits.is_empty()
        && digits.len() <= 15
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    valid.then(|| format!("+{digits}"))
}

fn e164_entries(
    entries: &[toml::Spanned<String>],
    length_ok: impl Fn(&str) -> bool,
    what: &str,
) -> Result<HashSet<String>, (std::ops::Range<usize>, String)> {
    entries
        .iter()
        .map(|e| {
            let value = e.get_ref();
            let digits = value.strip_prefix('+').unwrap_or("");
            if digits.bytes().all(|b| b.is_ascii_digit())
                && length_ok(digits)
                && !digits.starts_with('0')
            {
                Ok(value.clone())
            } else {
                Err((
                    e.span(),
                    format!(
                        "{what} `{value}` must be `+` followed by digits (E.164, no leading 0)"
                    ),
                ))
            }
        })
        .collect()
}

/// Sinch accepts flash-call timeouts of 5..=120 s only; refuse anything else at load time
/// rather than have Sinch reject the answer (which denies the verification).
fn validate_response(fields: &ResponseFields) -> Result<(), String> {
    if let Some(flash) = &fields.flash_call {
        for (name, value) in [
            ("dialTimeout", flash.dial_timeout),
            ("interceptionTimeout", flash.interception_timeout),
        ] {
            if let Some(v) = value.filter(|v| !(5..=120).contains(v)) {
                return Err(format!("flashCall.{name} = {v} is outside 5..=120 seconds"));
            }
        }
    }
    Ok(())
}

fn content_version(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl fmt::Display for RulesPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rules, default {}, on_error {}, version {}",
            self.rules.len(),
            self.default,
            self.on_error,
            self.version
        )
    }
}

#[cfg(test)]
mod tests;
