use super::*;
use crate::events::{Identity, VerificationMethod};

fn request(number: &str, method: VerificationMethod) -> VerificationRequestEvent {
    VerificationRequestEvent {
        id: "v1".into(),
        method,
        identity: Identity {
            kind: Some("number".into()),
            endpoint: number.into(),
        },
        price: None,
        rate: None,
        reference: None,
        custom: None,
        accept_language: None,
    }
}

fn sample() -> RulesPolicy {
    RulesPolicy::parse(
        include_str!("../../config/policy.toml"),
        "config/policy.toml",
    )
    .unwrap()
}

#[test]
fn the_sample_policy_loads() {
    let policy = sample();
    assert_eq!(policy.on_error(), Action::Deny);
    assert_eq!(policy.version().len(), 12);
    assert_eq!(policy.rule_names().count(), 3);
}

#[test]
fn first_matching_rule_decides_else_default() {
    let policy = sample();
    let decide = |n: &str| policy.decide(&request(n, VerificationMethod::Sms)).unwrap();
    let d = decide("+8825551234");
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Deny, Some("high-risk-international-networks"))
    );
    assert_eq!(d.reason, "prefix +882");
    let d = decide("+15555550123");
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Deny, Some("blocked-numbers"))
    );
    let d = decide("+46700000000");
    assert_eq!(
        (d.action, d.rule.as_deref()),
        (Action::Allow, Some("trusted-test-numbers"))
    );
    let d = decide("+46700000001");
    assert_eq!((d.action, d.rule), (Action::Allow, None));
    // Bare digits are read as E.164.
    assert_eq!(decide("8825551234").action, Action::Deny);
}

#[test]
fn allow_answers_carry_the_method_fields_and_denies_none() {
    let policy = sample();
    let allow = policy
        .decide(&request("+46700000001", VerificationMethod::FlashCall))
        .unwrap();
    assert_eq!(
        serde_json::to_value(&allow.response).unwrap(),
        serde_json::json!({"flashCall": {"dialTimeout": 10}})
    );
    let deny = policy
        .decide(&request("+8825551234", VerificationMethod::Sms))
        .unwrap();
    assert_eq!(deny.response, ResponseFields::default());
}

#[test]
fn a_rule_with_number_and_prefix_needs_both() {
    let policy = RulesPolicy::parse(
        r#"
default = "deny"
[[rule]]
name = "both"
action = "allow"
number = ["+4612345"]
prefix = ["+46"]
[rule.response.sms]
code = "1234"
"#,
        "t.toml",
    )
    .unwrap();
    let d = policy
        .decide(&request("+4612345", VerificationMethod::Sms))
        .unwrap();
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.response.sms.unwrap().code.as_deref(), Some("1234"));
    assert_eq!(
        policy
            .decide(&request("+4612346", VerificationMethod::Sms))
            .unwrap()
            .action,
        Action::Deny
    );
}

#[test]
fn numbers_that_are_not_e164_cannot_be_decided() {
    let policy = sample();
    for bad in [
        "",
        "+",
        "hello",
        "+46 70",
        "0046700000000",
        "+1234567890123456",
    ] {
        assert!(
            policy
                .decide(&request(bad, VerificationMethod::Sms))
                .is_err(),
            "{bad:?}"
        );
    }
}

#[test]
fn load_errors_point_at_file_line_and_column() {
    let cases = [
        ("default = \"maybe\"\n", "t.toml:1:11", "unknown variant"),
        ("default = \"allow\"\nprefixx = 1\n", "t.toml:2:1", "unknown field"),
        (
            "default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\nprefix = [\"+12a\"]\n",
            "t.toml:5:11",
            "E.164",
        ),
        (
            "default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\n",
            "t.toml:5:1",
            "duplicate rule name",
        ),
        (
            "default = \"allow\"\n[response.flashCall]\ndialTimeout = 5000\n",
            "t.toml:1:1",
            "outside 5..=120",
        ),
        ("on_error = \"deny\"\n", "t.toml:1:1", "missing field `default`"),
    ];
    for (text, location, needle) in cases {
        let err = RulesPolicy::parse(text, "t.toml").unwrap_err().to_string();
        assert!(err.starts_with(location), "{text:?} gave {err}");
        assert!(err.contains(needle), "{text:?} gave {err}");
    }
}

#[test]
fn version_changes_with_content() {
    let a = RulesPolicy::parse("default = \"allow\"\n", "a").unwrap();
    let b = RulesPolicy::parse("default = \"deny\"\n", "b").unwrap();
    assert_ne!(a.version(), b.version());
}

proptest::proptest! {
    /// Prefix matching agrees with a naive scan over every listed prefix.
    #[test]
    fn prefix_match_agrees_with_naive_scan(
        prefixes in proptest::collection::vec("\\+[1-9][0-9]{0,5}", 1..20),
        number in "\\+[1-9][0-9]{3,13}",
    ) {
        let list = prefixes.iter().map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join(",");
        let policy = RulesPolicy::parse(
            &format!("default = \"allow\"\n[[rule]]\nname = \"p\"\naction = \"deny\"\nprefix = [{list}]\n"),
            "p.toml",
        ).unwrap();
        let naive = prefixes.iter().any(|p| number.starts_with(p.as_str()));
        let ours = policy.decide(&request(&number, VerificationMethod::Sms)).unwrap().action == Action::Deny;
        proptest::prop_assert_eq!(ours, naive);
    }
}
