use super::*;
use crate::events::{Identity, Price, VerificationMethod};

fn request(number: &str, method: &str) -> VerificationRequestEvent {
    VerificationRequestEvent {
        id: "v1".into(),
        method: VerificationMethod::parse(method),
        identity: Identity {
            kind: Some("number".into()),
            endpoint: number.into(),
        },
        price: Some(Price {
            currency_id: Some("EUR".into()),
            amount: Some(0.05),
        }),
        rate: None,
        reference: Some("order-1234".into()),
        custom: Some("web signup".into()),
        accept_language: None,
    }
}

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

const NOON: &str = "2026-11-23T12:00:00Z"; // a Monday

/// A valid policy of `rules`; the editor's schema must accept it as verigate does.
fn policy(rules: &str) -> RulesPolicy {
    let text = format!("default = \"allow\"\n{rules}");
    let complaints = crate::policy::schema_errors(&text);
    assert!(complaints.is_empty(), "{complaints:?}\n{text}");
    RulesPolicy::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
}

/// The deciding rule's name, or `default`.
fn decide(p: &RulesPolicy, r: &VerificationRequestEvent, now: &str) -> String {
    let d = p.decide(r, NumberHistory::New, at(now)).unwrap();
    d.rule.unwrap_or_else(|| "default".into())
}

fn sample() -> RulesPolicy {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    RulesPolicy::load(&dir).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_sample_policy_loads_and_has_no_warnings() {
    let p = sample();
    assert_eq!(p.on_error(), Action::Deny);
    assert_eq!(p.version().len(), 12);
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

#[test]
fn method_condition() {
    let p = policy("[[rule]]\nname = \"no-callout\"\naction = \"deny\"\nmethod = [\"callout\", \"flashCall\"]\n");
    assert_eq!(
        decide(&p, &request("+46700000001", "callout"), NOON),
        "no-callout"
    );
    assert_eq!(
        decide(&p, &request("+46700000001", "flashcall"), NOON),
        "no-callout"
    );
    assert_eq!(decide(&p, &request("+46700000001", "sms"), NOON), "default");
}

#[test]
fn country_and_country_not_in_resolve_shared_codes_and_unknown() {
    let p = policy(
        "[lists]\nserved = [\"SE\", \"US\"]\n[[rule]]\nname = \"jamaica\"\naction = \"deny\"\ncountry = \"JM\"\n\
         [[rule]]\nname = \"unserved\"\naction = \"deny\"\ncountry_not_in = \"@served\"\n",
    );
    assert_eq!(decide(&p, &request("+18765550123", "sms"), NOON), "jamaica"); // +1, not US
    assert_eq!(decide(&p, &request("+14155552671", "sms"), NOON), "default");
    assert_eq!(decide(&p, &request("+46700000001", "sms"), NOON), "default");
    assert_eq!(
        decide(&p, &request("+4915112345678", "sms"), NOON),
        "unserved"
    );
    assert_eq!(
        decide(&p, &request("+88212345678", "sms"), NOON),
        "unserved"
    ); // unknown is not served
    let d = p
        .decide(
            &request("+88212345678", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert_eq!(d.explanation.country.as_deref(), Some("unknown"));
}

#[test]
fn prefix_and_number_conditions_with_list_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lists")).unwrap();
    std::fs::write(
        dir.path().join("lists/irsf.txt"),
        "# premium ranges\n+882\n+8831  # trailing comment\n\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("policy.toml"),
        "default = \"allow\"\n[lists]\nirsf = { file = \"lists/irsf.txt\" }\nvip = [\"+8825550000\"]\n\
         [[rule]]\nname = \"vip\"\naction = \"allow\"\nnumber = \"@vip\"\n\
         [[rule]]\nname = \"irsf\"\naction = \"deny\"\nprefix = [\"@irsf\", \"+979\"]\n",
    )
    .unwrap();
    let p = RulesPolicy::load(&dir.path().join("policy.toml")).unwrap();
    assert_eq!(decide(&p, &request("+8825550000", "sms"), NOON), "vip");
    assert_eq!(decide(&p, &request("+8825550001", "sms"), NOON), "irsf");
    let d = p
        .decide(
            &request("+88312345678", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert_eq!(d.explanation.matched_prefix.as_deref(), Some("+8831"));
    assert_eq!(decide(&p, &request("+97912345678", "sms"), NOON), "irsf");
    assert_eq!(decide(&p, &request("+88412345678", "sms"), NOON), "default");
}

#[test]
fn price_above_compares_in_the_events_currency() {
    let p = policy(
        "[[rule]]\nname = \"pricey\"\naction = \"deny\"\nprice_above = { EUR = 0.04, USD = 1.0 }\n",
    );
    assert_eq!(decide(&p, &request("+46700000001", "sms"), NOON), "pricey"); // 0.05 EUR
    let mut usd = request("+46700000001", "sms");
    usd.price = Some(Price {
        currency_id: Some("USD".into()),
        amount: Some(0.5),
    });
    assert_eq!(decide(&p, &usd, NOON), "default");
    let mut gbp = usd.clone();
    gbp.price = Some(Price {
        currency_id: Some("GBP".into()),
        amount: Some(9.0),
    });
    assert_eq!(decide(&p, &gbp, NOON), "default"); // currency not listed: no match
    gbp.price = None;
    assert_eq!(decide(&p, &gbp, NOON), "default");
}

#[test]
fn reference_custom_and_accept_language_patterns() {
    let p = policy(
        "[[rule]]\nname = \"test-orders\"\naction = \"allow\"\nreference = \"^test-\"\n\
         [[rule]]\nname = \"api\"\naction = \"deny\"\ncustom = \"(?i)API\"\n\
         [[rule]]\nname = \"spanish\"\naction = \"deny\"\naccept_language = [\"es-ES\"]\n",
    );
    let mut r = request("+46700000001", "sms");
    assert_eq!(decide(&p, &r, NOON), "default");
    r.reference = Some("test-1".into());
    assert_eq!(decide(&p, &r, NOON), "test-orders");
    r.reference = None;
    r.custom = Some("via api".into());
    assert_eq!(decide(&p, &r, NOON), "api");
    r.custom = None;
    r.accept_language = Some(vec!["ES-es".into()]);
    assert_eq!(decide(&p, &r, NOON), "spanish");
}

#[test]
fn time_windows_use_the_zone_days_and_wrap_midnight() {
    let p = policy(
        "[[rule]]\nname = \"night\"\naction = \"deny\"\n\
         time = { tz = \"Europe/Berlin\", days = [\"mon-fri\"], between = [\"22:00\", \"06:00\"] }\n",
    );
    let r = request("+46700000001", "sms");
    // Berlin is UTC+1 in November.
    assert_eq!(decide(&p, &r, "2026-11-23T21:30:00Z"), "night"); // Mon 22:30
    assert_eq!(decide(&p, &r, "2026-11-24T04:59:00Z"), "night"); // Tue 05:59
    assert_eq!(decide(&p, &r, "2026-11-24T05:00:00Z"), "default"); // Tue 06:00
    assert_eq!(decide(&p, &r, "2026-11-23T20:59:00Z"), "default"); // Mon 21:59
    assert_eq!(decide(&p, &r, "2026-11-28T23:00:00Z"), "default"); // Sun 00:00: not a weekday
    let weekend = policy("[[rule]]\nname = \"weekend\"\naction = \"deny\"\ntime = { tz = \"UTC\", days = [\"sat\", \"sun\"] }\n");
    assert_eq!(decide(&weekend, &r, "2026-11-28T12:00:00Z"), "weekend");
    assert_eq!(decide(&weekend, &r, NOON), "default");
}

#[test]
fn rate_limits_count_per_key_within_a_sliding_window() {
    let p = policy(
        "[[rule]]\nname = \"per-number\"\naction = \"deny\"\nrate_limit = { key = \"number\", max = 3, window = \"10m\" }\n\
         [[rule]]\nname = \"per-range\"\naction = \"deny\"\nrate_limit = { key = \"range:3\", max = 5, window = \"1h\" }\n",
    );
    let start = at(NOON);
    let go = |n: &str, mins: i64| {
        p.decide(
            &request(n, "sms"),
            NumberHistory::New,
            start + chrono::Duration::minutes(mins),
        )
        .unwrap()
        .rule
        .unwrap_or_else(|| "default".into())
    };
    assert_eq!(go("+46700000001", 0), "default");
    assert_eq!(go("+46700000001", 1), "default");
    assert_eq!(go("+46700000001", 2), "default");
    // 4th in 10 min. per-range is not evaluated once an earlier rule decided, so this
    // request does not count toward it.
    assert_eq!(go("+46700000001", 3), "per-number");
    assert_eq!(go("+46700000002", 4), "default"); // range +46700000: 4th
    assert_eq!(go("+46700000003", 5), "default"); // 5th
    assert_eq!(go("+46700000004", 5), "per-range"); // 6th in the 1k range
    assert_eq!(go("+46700001001", 5), "default"); // another range
                                                  // Past the window the number is free again (the range counter still holds).
    assert_eq!(go("+46700000001", 14), "per-range");
    let d = p
        .decide(
            &request("+46700000001", "sms"),
            NumberHistory::New,
            start + chrono::Duration::minutes(75),
        )
        .unwrap();
    assert_eq!(d.rule, None, "{:?}", d.explanation.counters);
    assert!(d
        .explanation
        .counters
        .iter()
        .any(|c| c.condition == "rate_limit" && c.max == 3.0));
}

#[test]
fn distinct_numbers_catch_range_walking() {
    let p = policy("[[rule]]\nname = \"walk\"\naction = \"deny\"\ndistinct_numbers = { per = \"range:2\", max = 3, window = \"1h\" }\n");
    let r = |n: &str| decide(&p, &request(n, "sms"), NOON);
    assert_eq!(r("+46700000011"), "default");
    assert_eq!(r("+46700000011"), "default"); // same number again: still 1
    assert_eq!(r("+46700000012"), "default");
    assert_eq!(r("+46700000013"), "default");
    assert_eq!(r("+46700000014"), "walk"); // 4 distinct in +467000000xx
}

#[test]
fn spend_caps_count_only_allowed_attempts() {
    let p = policy(
        "[[rule]]\nname = \"blocked\"\naction = \"deny\"\nnumber = [\"+46700000099\"]\n\
         [[rule]]\nname = \"cap\"\naction = \"deny\"\nspend = { per = \"country\", max = { EUR = 0.12 }, window = \"1h\" }\n",
    );
    let r = |n: &str| decide(&p, &request(n, "sms"), NOON);
    assert_eq!(r("+46700000001"), "default"); // 0.05
    for _ in 0..5 {
        assert_eq!(r("+46700000099"), "blocked"); // denied: not charged
    }
    assert_eq!(r("+46700000002"), "default"); // 0.10
    assert_eq!(r("+46700000003"), "cap"); // 0.15 > 0.12
    assert_eq!(r("+4915112345678"), "default"); // other country
}

#[test]
fn shadow_rules_are_recorded_but_never_decide_and_keep_their_own_counters() {
    let p = policy(
        "[[rule]]\nname = \"would-block\"\naction = \"deny\"\nmode = \"shadow\"\nrate_limit = { key = \"global\", max = 1, window = \"1h\" }\n\
         [[rule]]\nname = \"swedish\"\naction = \"allow\"\ncountry = \"SE\"\n",
    );
    let first = p
        .decide(
            &request("+46700000001", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert!(first.explanation.shadow.is_empty());
    let second = p
        .decide(
            &request("+46700000001", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert_eq!(second.rule.as_deref(), Some("swedish"));
    assert_eq!(second.action, Action::Allow);
    assert_eq!(
        second.explanation.shadow,
        vec![ShadowMatch {
            rule: "would-block".into(),
            would: Action::Deny
        }]
    );
}

#[test]
fn a_shadow_rule_after_the_deciding_rule_is_still_evaluated() {
    let p = policy(
        "[[rule]]\nname = \"first\"\naction = \"allow\"\n\
         [[rule]]\nname = \"late-shadow\"\naction = \"deny\"\nmode = \"shadow\"\nmethod = \"sms\"\n",
    );
    let d = p
        .decide(
            &request("+46700000001", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert_eq!(d.rule.as_deref(), Some("first"));
    assert_eq!(d.explanation.shadow.len(), 1);
}

#[test]
fn explanations_carry_facts_version_and_time() {
    let p = sample();
    let d = p
        .decide(
            &request("+88212345678", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.explanation.policy_version, p.version());
    assert_eq!(d.explanation.country.as_deref(), Some("unknown"));
    assert!(d.explanation.eval_ns > 0);
}

#[test]
fn allow_answers_carry_the_rule_or_policy_fields_for_the_method() {
    let p = RulesPolicy::parse(
        "default = \"allow\"\n[response.flashCall]\ndialTimeout = 10\n\
         [[rule]]\nname = \"de\"\naction = \"allow\"\ncountry = \"DE\"\n[rule.response.sms]\nexpiry = \"00:05:00\"\n",
        "t.toml",
    )
    .unwrap();
    let flash = p
        .decide(
            &request("+46700000001", "flashcall"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert_eq!(
        serde_json::to_value(&flash.response).unwrap(),
        serde_json::json!({"flashCall": {"dialTimeout": 10}})
    );
    let de = p
        .decide(
            &request("+4915112345678", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    assert_eq!(
        serde_json::to_value(&de.response).unwrap(),
        serde_json::json!({"sms": {"expiry": "00:05:00"}})
    );
}

#[test]
fn numbers_that_are_not_e164_cannot_be_decided() {
    let p = sample();
    for bad in [
        "",
        "+",
        "hello",
        "+46 70",
        "0046700000000",
        "+1234567890123456",
    ] {
        assert!(
            p.decide(&request(bad, "sms"), NumberHistory::New, at(NOON))
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
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\nprefix = [\"+12a\"]\n", "t.toml:5:10", "E.164"),
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\n", "t.toml:5:1", "duplicate rule name"),
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\ncountry = \"UK1\"\n", "t.toml:5:11", "ISO 3166"),
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\nprefix = \"@nope\"\n", "t.toml:5:10", "no list named"),
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\nrate_limit = { key = \"street\", max = 1, window = \"1m\" }\n", "t.toml:5:14", "not a key"),
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\nrate_limit = { key = \"number\", max = 1, window = \"soon\" }\n", "t.toml:5:14", "window"),
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\ntime = { tz = \"Mars/Olympus\" }\n", "t.toml:5:8", "IANA"),
        ("default = \"allow\"\n[[rule]]\nname = \"a\"\naction = \"deny\"\nreference = \"(\"\n", "t.toml:5:13", "does not compile"),
        ("default = \"allow\"\n[response.flashCall]\ndialTimeout = 5000\n", "t.toml:1:1", "outside 5..=120"),
        ("version = 2\ndefault = \"allow\"\n", "t.toml:1:11", "not supported"),
    ];
    for (text, location, needle) in cases {
        let err = RulesPolicy::parse(text, "t.toml")
            .err()
            .unwrap_or_else(|| panic!("{text:?} loaded"))
            .to_string();
        assert!(err.starts_with(location), "{text:?} gave {err}");
        assert!(err.contains(needle), "{text:?} gave {err}");
    }
}

#[test]
fn list_file_errors_point_at_the_list_file_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("l.txt"), "+882\n+883 +884\n").unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        "default = \"allow\"\n[lists]\nl = { file = \"l.txt\" }\n",
    )
    .unwrap();
    let err = RulesPolicy::load(&dir.path().join("p.toml"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("l.txt:2:1"), "{err}");
}

#[test]
fn the_version_covers_list_files_too() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("l.txt"), "+882\n").unwrap();
    std::fs::write(
        dir.path().join("p.toml"),
        "default = \"allow\"\n[lists]\nl = { file = \"l.txt\" }\n",
    )
    .unwrap();
    let p = RulesPolicy::load(&dir.path().join("p.toml")).unwrap();
    let before = p.version();
    std::fs::write(dir.path().join("l.txt"), "+883\n").unwrap();
    assert_ne!(p.reload().unwrap(), before);
}

#[test]
fn a_broken_reload_keeps_the_old_policy_and_counters_survive_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    let text = "default = \"allow\"\n[[rule]]\nname = \"rl\"\naction = \"deny\"\nrate_limit = { key = \"number\", max = 1, window = \"1h\" }\n";
    std::fs::write(&path, text).unwrap();
    let p = RulesPolicy::load(&path).unwrap();
    let r = request("+46700000001", "sms");
    assert_eq!(decide(&p, &r, NOON), "default");
    let v1 = p.version();
    std::fs::write(&path, "default = \"allow\"\n[[rule]]\nname = ").unwrap();
    let err = p.reload().unwrap_err().to_string();
    assert!(err.contains("p.toml:3:"), "{err}");
    assert_eq!(p.version(), v1);
    assert_eq!(
        p.describe()["last_reload_error"]
            .as_str()
            .map(|e| e.contains("p.toml:3:")),
        Some(true)
    );
    // Same rule, new note: the counter (1 request so far) carries over.
    std::fs::write(&path, format!("{text}note = \"edited\"\n")).unwrap();
    assert_ne!(p.reload().unwrap(), v1);
    assert_eq!(decide(&p, &r, NOON), "rl");
    assert!(p.describe()["last_reload_error"].is_null());
}

#[test]
fn per_rule_hits_and_outcomes_are_kept() {
    let p = policy("[[rule]]\nname = \"se\"\naction = \"allow\"\ncountry = \"SE\"\n");
    let d = p
        .decide(
            &request("+46700000001", "sms"),
            NumberHistory::New,
            at(NOON),
        )
        .unwrap();
    p.observe_outcome(Outcome {
        id: "v1",
        rule: d.rule.as_deref(),
        shadow: &d.explanation.shadow,
        status: "SUCCESSFUL",
        reason: None,
        at: at(NOON),
        book: crate::policy::BookTaking::NotAsked,
    });
    let described = p.describe();
    assert_eq!(described["rules"][0]["hits"], 1);
    assert_eq!(described["rules"][0]["outcomes"]["SUCCESSFUL"], 1);
}

#[test]
fn check_warns_about_rules_that_can_never_decide() {
    let p = policy(
        "[[rule]]\nname = \"sat\"\naction = \"deny\"\nprefix = [\"+882\"]\n\
         [[rule]]\nname = \"sat-narrow\"\naction = \"allow\"\nprefix = [\"+88212\"]\n\
         [[rule]]\nname = \"odd\"\naction = \"deny\"\ncountry = \"SE\"\ncountry_not_in = [\"SE\", \"NO\"]\n\
         [[rule]]\nname = \"everything\"\naction = \"allow\"\n\
         [[rule]]\nname = \"after\"\naction = \"deny\"\nmethod = \"sms\"\n",
    );
    let w = p.warnings().join("\n");
    assert!(w.contains("`sat-narrow` can never decide"), "{w}");
    assert!(w.contains("`odd` can never match"), "{w}");
    assert!(w.contains("`after` can never decide"), "{w}");
}

#[test]
fn candidate_indexing_gives_the_same_decisions_as_evaluating_every_rule() {
    // Many prefix rules, a number rule, a country rule and unanchored ones, in an order
    // where an early unanchored rule and late anchored ones interleave.
    let mut text =
        String::from("[[rule]]\nname = \"callout-off\"\naction = \"deny\"\nmethod = \"callout\"\n");
    for i in 0..50 {
        text.push_str(&format!(
            "[[rule]]\nname = \"p{i}\"\naction = \"deny\"\nprefix = [\"+467{i:02}\"]\n"
        ));
    }
    text.push_str("[[rule]]\nname = \"vip\"\naction = \"allow\"\nnumber = [\"+46710000001\"]\n");
    text.push_str("[[rule]]\nname = \"de\"\naction = \"deny\"\ncountry = \"DE\"\n");
    text.push_str("[[rule]]\nname = \"flash-se\"\naction = \"deny\"\nmethod = \"flashcall\"\ncountry = \"SE\"\n");
    let p = policy(&text);
    // The reference: every rule in file order, no index.
    let every_rule = |r: &VerificationRequestEvent| {
        let s = p.current.load();
        let facts = Facts::of(r, NumberHistory::New, at(NOON)).unwrap();
        s.rules
            .iter()
            .find(|rule| rule.mode == Mode::Enforce && rule.conditions.holds(&facts))
            .map_or_else(|| "default".to_owned(), |rule| rule.name.clone())
    };
    let mut numbers: Vec<String> = (0..100)
        .flat_map(|i| [format!("+467{i:02}000001"), format!("+467{i:02}999999")])
        .collect();
    numbers.extend(
        [
            "+46710000001",
            "+4915112345678",
            "+4930123456",
            "+14155550100",
        ]
        .map(String::from),
    );
    let mut pruned = 0;
    for number in &numbers {
        for method in ["sms", "callout", "flashcall"] {
            let r = request(number, method);
            assert_eq!(decide(&p, &r, NOON), every_rule(&r), "{number} {method}");
            let s = p.current.load();
            let facts = Facts::of(&r, NumberHistory::New, at(NOON)).unwrap();
            if RulesPolicy::candidates(&s, &facts.number, facts.country).len() < s.rules.len() / 2 {
                pruned += 1;
            }
        }
    }
    // The index is in use (most requests see a few candidates, not every rule).
    assert!(
        pruned > numbers.len(),
        "{pruned} of {} pruned",
        numbers.len() * 3
    );
    // And the outcomes are the ones the file order says.
    for (n, m, expected) in [
        ("+46710000001", "sms", "p10"),
        ("+46799000001", "sms", "default"),
        ("+46712345678", "callout", "callout-off"),
        ("+4915112345678", "sms", "de"),
        ("+46749000000", "sms", "p49"),
        ("+46799000001", "flashcall", "flash-se"),
    ] {
        assert_eq!(decide(&p, &request(n, m), NOON), expected, "{n}");
    }
}

// ---------------------------------------------------------------------------------------
// Adaptive rules: conversion, Sinch's fraud verdicts, quarantine

const LOW_CONVERSION: &str = r#"
[[rule]]
name = "low-conversion"
action = "deny"
conversion = { per = "range:3", window = "6h", min_samples = 20, below = 0.3 }
block_for = "1h"
max_block = "4h"
probe = 0.1
"#;

fn request_id(id: &str, number: &str) -> VerificationRequestEvent {
    VerificationRequestEvent {
        id: id.into(),
        ..request(number, "sms")
    }
}

/// Asks for a verification at `t` seconds after noon and, if allowed, reports `status`
/// for it a minute later. Returns the decision.
fn attempt(p: &RulesPolicy, id: &str, number: &str, t: i64, status: &str) -> PolicyDecision {
    let now = at(NOON) + chrono::Duration::seconds(t);
    let d = p
        .decide(&request_id(id, number), NumberHistory::New, now)
        .unwrap();
    if d.action == Action::Allow {
        p.observe_outcome(Outcome {
            id,
            rule: d.rule.as_deref(),
            shadow: &d.explanation.shadow,
            status,
            reason: (status == "DENIED").then_some("Fraud"),
            at: now + chrono::Duration::seconds(60),
            book: crate::policy::BookTaking::NotAsked,
        });
    }
    d
}

fn quarantine_state(d: &PolicyDecision) -> Option<&str> {
    d.explanation.quarantine.as_ref().map(|q| q.state.as_str())
}

#[test]
fn a_range_that_never_converts_is_quarantined_only_once_the_sample_is_large_enough() {
    let p = policy(LOW_CONVERSION);
    // 19 failures: too few to judge, however bad they look.
    for k in 0..19 {
        let d = attempt(
            &p,
            &format!("a{k}"),
            &format!("+22507123{k:03}"),
            k * 100,
            "FAIL",
        );
        assert_eq!(
            d.action,
            Action::Allow,
            "attempt {k} denied on a small sample"
        );
    }
    attempt(&p, "a19", "+22507123019", 1900, "FAIL");
    let d = attempt(&p, "a20", "+22507123020", 2000, "FAIL");
    assert_eq!(d.rule.as_deref(), Some("low-conversion"));
    assert_eq!(quarantine_state(&d), Some("tripped"));
    let reading = d
        .explanation
        .counters
        .iter()
        .find(|r| r.rule == "low-conversion")
        .unwrap();
    assert!(
        reading.value < 0.3 && reading.condition.contains("0/20"),
        "{reading:?}"
    );
    // The range stays blocked; the block names the verifications behind it.
    let d = attempt(&p, "a21", "+22507123500", 2100, "FAIL");
    assert_eq!(quarantine_state(&d), Some("blocked"));
    let blocks = p.blocks(at(NOON) + chrono::Duration::seconds(2100));
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].key, "+22507123");
    assert_eq!(blocks[0].evidence.len(), 10);
    // A neighbouring range is not.
    assert_eq!(
        attempt(&p, "b0", "+22507124000", 2200, "SUCCESSFUL").action,
        Action::Allow
    );
}

#[test]
fn a_quarantine_lets_probes_through_escalates_when_it_trips_again_and_ends_when_the_range_converts()
{
    let p = policy(LOW_CONVERSION);
    for k in 0..21 {
        attempt(&p, &format!("a{k}"), &format!("+22507123{k:03}"), k, "FAIL");
    }
    // One in ten blocked requests is let through, and its outcome is counted.
    let states: Vec<_> = (0..20)
        .map(|k| {
            let d = attempt(&p, &format!("p{k}"), "+22507123999", 100 + k, "FAIL");
            quarantine_state(&d).map(str::to_owned)
        })
        .collect();
    assert_eq!(
        states
            .iter()
            .filter(|s| s.as_deref() == Some("probe"))
            .count(),
        2
    );
    // An hour later the block ends, the range is still failing: blocked again, twice as
    // long.
    let d = attempt(&p, "again", "+22507123998", 3700, "FAIL");
    assert_eq!(quarantine_state(&d), Some("tripped"));
    let blocks = p.blocks(at(NOON) + chrono::Duration::seconds(3700));
    assert_eq!(blocks[0].strikes, 2);
    let length = blocks[0].until.unwrap() - blocks[0].since;
    assert_eq!(length, chrono::Duration::hours(2));
    // Once the failures have left the window and the range converts, it is free.
    let later = 3700 + 7 * 3600;
    for k in 0..30 {
        let d = attempt(
            &p,
            &format!("ok{k}"),
            &format!("+22507123{k:03}"),
            later + k,
            "SUCCESSFUL",
        );
        assert_eq!(d.action, Action::Allow, "{k}");
    }
}

#[test]
fn unanswered_verifications_count_as_failed_once_they_had_time_to_complete() {
    let p = policy(LOW_CONVERSION);
    for k in 0..20 {
        let now = at(NOON) + chrono::Duration::seconds(k);
        let d = p.decide(
            &request_id(&format!("s{k}"), &format!("+22507123{k:03}")),
            NumberHistory::New,
            now,
        );
        assert_eq!(d.unwrap().action, Action::Allow);
    }
    // Five minutes on, they may still be entered: no judgement yet.
    let d = attempt(&p, "x1", "+22507123900", 300, "SUCCESSFUL");
    assert_eq!(d.action, Action::Allow);
    // Past ten minutes (the default complete_after) they are failures: 1 of 21.
    let d = attempt(&p, "x2", "+22507123901", 700, "FAIL");
    assert_eq!(d.rule.as_deref(), Some("low-conversion"));
}

#[test]
fn below_baseline_compares_a_range_with_its_own_countrys_rate() {
    let rule = r#"
[[rule]]
name = "below-country"
action = "deny"
conversion = { per = "range:3", window = "6h", min_samples = 20, below_baseline = 0.5 }
"#;
    // Verifications of one country: 100 spread over it, then 30 in one range, where
    // one in ten ends as `rare` and the rest as the other status.
    let traffic = |country_rare: &str, country_other: &str| {
        let p = policy(rule);
        for k in 0..100 {
            let status = if k % 10 == 0 {
                country_rare
            } else {
                country_other
            };
            attempt(&p, &format!("g{k}"), &format!("+46701{k:03}000"), k, status);
        }
        for k in 0..30 {
            let status = if k % 10 == 0 { "SUCCESSFUL" } else { "FAIL" };
            let number = format!("+46709999{k:03}");
            attempt(&p, &format!("b{k}"), &number, 200 + k, status);
        }
        attempt(&p, "bad", "+46709999500", 300, "FAIL")
    };
    // A good country (90 %) with one bad range (10 %): the range is denied.
    let d = traffic("FAIL", "SUCCESSFUL");
    assert_eq!(d.rule.as_deref(), Some("below-country"));
    // A country where everyone converts poorly: the same range is not singled out.
    let d = traffic("SUCCESSFUL", "FAIL");
    assert_eq!(d.action, Action::Allow);
}

#[test]
fn sinch_fraud_verdicts_count_per_key() {
    let p = policy(
        r#"
[[rule]]
name = "sinch-says-fraud"
action = "deny"
sinch_fraud = { per = "range:3", max = 2, window = "1h" }
block_for = "30m"
"#,
    );
    for k in 0..3 {
        let d = attempt(
            &p,
            &format!("f{k}"),
            &format!("+88234567{k:03}"),
            k,
            "DENIED",
        );
        assert_eq!(d.action, Action::Allow);
    }
    let d = attempt(&p, "f3", "+88234567100", 10, "DENIED");
    assert_eq!(d.rule.as_deref(), Some("sinch-says-fraud"));
    assert_eq!(quarantine_state(&d), Some("tripped"));
}

#[test]
fn lifting_a_block_forgets_its_evidence_and_pinning_keeps_it() {
    let p = policy(LOW_CONVERSION);
    for k in 0..21 {
        attempt(&p, &format!("a{k}"), &format!("+22507123{k:03}"), k, "FAIL");
    }
    let now = at(NOON) + chrono::Duration::seconds(100);
    assert_eq!(p.pin_block("+22507123", now).unwrap().len(), 1);
    assert_eq!(p.blocks(now + chrono::Duration::days(30))[0].until, None);
    assert_eq!(p.lift_block("+22507123", now).unwrap().len(), 1);
    assert!(p.blocks(now).is_empty());
    // Fresh evidence is needed to block it again.
    let d = attempt(&p, "after", "+22507123777", 200, "FAIL");
    assert_eq!(d.action, Action::Allow);
    assert!(p.lift_block("+22507123", now).unwrap().is_empty());
}

/// The low-conversion rule's reading (condition, value) for a probe in the range
/// +22507121 (the one that converts in these tests).
fn converting_range_reading(p: &RulesPolicy, now: DateTime<Utc>) -> Option<(String, f64)> {
    let d = p
        .decide(
            &request_id("probe", "+22507121999"),
            NumberHistory::New,
            now,
        )
        .unwrap();
    d.explanation
        .counters
        .iter()
        .find(|r| r.rule == "low-conversion")
        .map(|r| (r.condition.clone(), r.value))
}

#[test]
fn restoring_saved_blocks_and_replaying_history_gives_the_same_state() {
    let live = policy(LOW_CONVERSION);
    let mut history = Vec::new();
    for k in 0..42 {
        let id = format!("h{k}");
        let number = format!("+2250712{:01}{k:03}", k % 2);
        let status = if k % 2 == 0 { "FAIL" } else { "SUCCESSFUL" };
        let now = at(NOON) + chrono::Duration::seconds(k * 10);
        let d = attempt(&live, &id, &number, k * 10, status);
        history.push(PastVerification {
            id,
            request: Some(request_id(&format!("h{k}"), &number)),
            allowed_at: (d.action == Action::Allow).then_some(now),
            result: (d.action == Action::Allow)
                .then(|| (status.to_owned(), None, now + chrono::Duration::seconds(60))),
        });
    }
    let now = at(NOON) + chrono::Duration::seconds(1000);
    assert_eq!(live.blocks(now).len(), 1, "the failing range is blocked");
    assert_eq!(live.blocks(now)[0].key, "+22507120");
    let (_, saved) = live.saved_state().unwrap();

    let restarted = policy(LOW_CONVERSION);
    restarted.restore(Some(saved), now);
    restarted.relearn(history, now);
    assert_eq!(restarted.blocks(now), live.blocks(now));
    // The relearned counters give the same reading for the range that converts.
    let reading = |p: &RulesPolicy| converting_range_reading(p, now);
    assert_eq!(reading(&restarted), reading(&live));
    assert!(
        reading(&live).unwrap().0.contains("(21/21)"),
        "{:?}",
        reading(&live)
    );
}

#[test]
fn what_is_decided_while_history_is_relearned_counts_as_if_in_time_order() {
    let live = policy(LOW_CONVERSION);
    let mut history = Vec::new();
    let past = |p: &RulesPolicy, k: i64, status: &str| {
        let id = format!("h{k}");
        let number = format!("+2250712{:01}{k:03}", k % 2);
        let d = attempt(p, &id, &number, k * 10, status);
        let when = at(NOON) + chrono::Duration::seconds(k * 10);
        (id, number, d, when)
    };
    for k in 0..42 {
        let status = if k % 2 == 0 { "FAIL" } else { "SUCCESSFUL" };
        let (id, number, d, when) = past(&live, k, status);
        history.push(PastVerification {
            request: Some(request_id(&id, &number)),
            id,
            allowed_at: (d.action == Action::Allow).then_some(when),
            result: (d.action == Action::Allow).then(|| {
                (
                    status.to_owned(),
                    None,
                    when + chrono::Duration::seconds(60),
                )
            }),
        });
    }
    let restart = at(NOON) + chrono::Duration::seconds(420);
    let (_, saved) = live.saved_state().unwrap();
    let restarted = policy(LOW_CONVERSION);
    restarted.restore(Some(saved), restart);
    assert!(restarted.relearning());
    // Ten more in the range that converts, on both: live, and while the restarted
    // policy has not replayed its history yet.
    for k in (43..63).step_by(2) {
        let (_, _, d, _) = past(&live, k, "SUCCESSFUL");
        assert_eq!(d.action, Action::Allow);
        let (_, _, d, _) = past(&restarted, k, "SUCCESSFUL");
        assert_eq!(d.action, Action::Allow);
    }
    assert_eq!(
        restarted.relearn(history, restart),
        20,
        "10 allowed, 10 results"
    );
    assert!(!restarted.relearning());

    let now = at(NOON) + chrono::Duration::seconds(1000);
    assert_eq!(restarted.blocks(now), live.blocks(now));
    let reading = |p: &RulesPolicy| converting_range_reading(p, now);
    assert_eq!(reading(&restarted), reading(&live));
    assert!(
        reading(&live).unwrap().0.contains("(31/31)"),
        "{:?}",
        reading(&live)
    );
}

#[test]
fn adaptive_settings_are_validated_at_load() {
    for (rules, message) in [
        (
            "conversion = { per = \"range:3\", window = \"1h\", below = 0.2, below_baseline = 0.5 }",
            "exactly one of below",
        ),
        (
            "conversion = { per = \"range:3\", window = \"1h\", below = 1.5 }",
            "exactly one of below",
        ),
        (
            "conversion = { per = \"range:3\", window = \"1h\", below = 0.2, confidence = 1.0 }",
            "confidence",
        ),
        ("rate_limit = { key = \"number\", max = 1, window = \"1m\" }\nprobe = 0.1", "need block_for"),
        ("block_for = \"1h\"", "block_for quarantines"),
        (
            "rate_limit = { key = \"number\", max = 1, window = \"1m\" }\nblock_for = \"1h\"\nprobe = 0.9",
            "probe is the share",
        ),
        (
            "rate_limit = { key = \"number\", max = 1, window = \"1m\" }\nblock_for = \"2h\"\nmax_block = \"1h\"",
            "max_block",
        ),
        ("method = [\"sms\"]\ncounting = \"approximate\"", "counting applies to a rule with"),
    ] {
        let text = format!("default = \"allow\"\n[[rule]]\nname = \"r\"\naction = \"deny\"\n{rules}\n");
        let err = RulesPolicy::parse(&text, "t.toml").err().unwrap_or_else(|| panic!("{rules} loaded"));
        assert!(err.to_string().contains(message), "{rules}: {err}");
    }
}

#[test]
fn a_summary_reads_as_the_rule_was_written() {
    let p = RulesPolicy::parse(
        "default = \"allow\"\n[[rule]]\nname = \"night\"\naction = \"deny\"\n\
         time = { tz = \"Europe/Berlin\", days = [\"mon-fri\"], between = [\"22:00\", \"06:00\"] }\n\
         [[rule]]\nname = \"ranges\"\naction = \"deny\"\n\
         rate_limit = { key = \"range:3\", max = 30, window = \"1h\" }\ncounting = \"approximate\"\n",
        "t.toml",
    )
    .unwrap();
    let summary = p.summary();
    assert!(
        summary.contains("night: time Europe/Berlin mon-fri 22:00-06:00\n"),
        "{summary}"
    );
    assert!(
        summary.contains("counted approximately by replicas"),
        "{summary}"
    );
}

// ---------------------------------------------------------------------------------------
// Returning numbers

#[test]
fn a_quarantine_spares_a_returning_number_and_blocks_a_new_one() {
    let p = policy(&format!("{LOW_CONVERSION}spare_returning = true\n"));
    // A range that never converts trips.
    let tripped = (0..40)
        .map(|k| {
            attempt(
                &p,
                &format!("a{k}"),
                &format!("+22507123{k:03}"),
                k * 60,
                "FAIL",
            )
        })
        .any(|d| quarantine_state(&d) == Some("tripped"));
    assert!(tripped);
    let later = at(NOON) + chrono::Duration::seconds(2_500);
    let new = p
        .decide(&request_id("n", "+22507123999"), NumberHistory::New, later)
        .unwrap();
    assert_eq!(new.action, Action::Deny, "{new:?}");
    assert_eq!(quarantine_state(&new), Some("blocked"));
    let hits = |p: &RulesPolicy| p.describe()["rules"][0]["hits"].as_u64();
    let before = hits(&p);
    let returning = p
        .decide(
            &request_id("r", "+22507123998"),
            NumberHistory::Returning,
            later,
        )
        .unwrap();
    assert_eq!(returning.action, Action::Allow, "{returning:?}");
    assert_eq!(quarantine_state(&returning), Some("spared"));
    assert!(returning
        .reason
        .contains("`low-conversion` spared a returning number"));
    // Counted as spared, not as a hit.
    assert_eq!(hits(&p), before);
    assert_eq!(p.describe()["rules"][0]["spared"], 1);
}

#[test]
fn a_spared_number_goes_on_to_the_next_rule() {
    let p = policy(
        r#"
[[rule]]
name = "burst"
action = "deny"
rate_limit = { key = "range:3", max = 1, window = "1h" }
spare_returning = true

[[rule]]
name = "per-number"
action = "deny"
rate_limit = { key = "number", max = 1, window = "1h" }
"#,
    );
    let ask = |number: &str, history| {
        let d = p
            .decide(&request(number, "sms"), history, at(NOON))
            .unwrap();
        d.rule.unwrap_or_else(|| "default".into())
    };
    assert_eq!(ask("+46700000001", NumberHistory::New), "default");
    // Over the range's limit: a new number is denied, a returning one goes on ...
    assert_eq!(ask("+46700000002", NumberHistory::New), "burst");
    assert_eq!(ask("+46700000003", NumberHistory::Returning), "default");
    // ... to rules that do not spare it.
    assert_eq!(ask("+46700000003", NumberHistory::Returning), "per-number");
}

#[test]
fn only_a_deny_rule_spares_and_the_window_is_a_duration() {
    for (text, message) in [
        (
            "[[rule]]\nname = \"r\"\naction = \"allow\"\nmethod = [\"sms\"]\nspare_returning = true\n",
            "spare_returning lets a returning number past a deny rule",
        ),
        (
            "returning_within = \"soon\"\n[[rule]]\nname = \"r\"\naction = \"deny\"\nmethod = [\"sms\"]\nspare_returning = true\n",
            "returning_within `soon`",
        ),
    ] {
        let text = format!("default = \"allow\"\n{text}");
        let err = RulesPolicy::parse(&text, "t.toml").err().unwrap_or_else(|| panic!("{text} loaded"));
        assert!(err.to_string().contains(message), "{text}: {err}");
    }
    // The history is read only when a rule spares, over the window written.
    let none = policy("[[rule]]\nname = \"r\"\naction = \"deny\"\nmethod = [\"callout\"]\n");
    assert_eq!(none.number_history_window(), None);
    let some = RulesPolicy::parse(
        "default = \"allow\"\nreturning_within = \"30d\"\n[[rule]]\nname = \"r\"\naction = \"deny\"\nmethod = [\"callout\"]\nspare_returning = true\n",
        "t.toml",
    )
    .unwrap();
    assert_eq!(
        some.number_history_window(),
        Some(std::time::Duration::from_secs(30 * 86_400))
    );
}
