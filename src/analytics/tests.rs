use super::*;
use crate::{
    decision::DecisionRecord,
    events::{Action, Price},
    store::{RequestPart, ResultPart, StatsBuilder},
};
use chrono::TimeZone;

fn t(day: u32, hour: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
}

fn record(
    id: &str,
    country: &str,
    method: &str,
    action: Option<Action>,
    status: Option<&str>,
    price: f64,
    at: DateTime<Utc>,
) -> VerificationRecord {
    VerificationRecord {
        id: id.into(),
        seq: 0,
        app_key: "app".into(),
        number: Some("+46700000001".into()),
        country: Some(country.into()),
        prefix: Some("+46700".into()),
        method: Some(method.into()),
        reference: Some(format!("ref-{id}")),
        custom: None,
        first_seen: at,
        updated_at: at,
        request: action.map(|_| RequestPart {
            received_at: at,
            price: Some(Price {
                currency_id: Some("EUR".into()),
                amount: Some(price),
            }),
            rate: None,
            accept_language: None,
        }),
        decision: action.map(|action| DecisionRecord {
            action,
            rule: (action == Action::Deny).then(|| "premium".into()),
            reason: "r".into(),
            on_error: false,
            policy_version: "v1".into(),
            decided_at: at,
            answer: serde_json::json!({"action": action.as_str()}),
            explanation: Default::default(),
        }),
        sms_delivery: None,
        result: status.map(|s| ResultPart {
            status: s.into(),
            reason: None,
            source: None,
            received_at: at,
        }),
        event_count: 1,
    }
}

fn data_set() -> Vec<VerificationRecord> {
    vec![
        record(
            "a",
            "SE",
            "sms",
            Some(Action::Allow),
            Some("SUCCESSFUL"),
            0.05,
            t(1, 10),
        ),
        record(
            "b",
            "SE",
            "sms",
            Some(Action::Allow),
            Some("FAIL"),
            0.05,
            t(1, 11),
        ),
        record(
            "c",
            "SE",
            "flashcall",
            Some(Action::Allow),
            Some("SUCCESSFUL"),
            0.01,
            t(2, 9),
        ),
        record(
            "d",
            "GB",
            "sms",
            Some(Action::Deny),
            Some("DENIED"),
            0.07,
            t(2, 10),
        ),
        record("e", "GB", "sms", Some(Action::Allow), None, 0.07, t(2, 11)),
        record("f", "GB", "sms", None, Some("SUCCESSFUL"), 0.0, t(2, 12)),
    ]
}

fn add_all(stats: &mut StatsBuilder) {
    for record in data_set() {
        stats.add(&record.stats_row());
    }
}

#[test]
fn stats_add_up_on_a_known_data_set() {
    let mut all = StatsBuilder::new(vec![]);
    add_all(&mut all);
    let total = &all.finish()[0];
    assert_eq!(
        (
            total.verifications,
            total.requests,
            total.allowed,
            total.denied
        ),
        (6, 5, 4, 1)
    );
    assert_eq!(total.successful_allowed, 2);
    assert_eq!(total.conversion_rate, Some(0.5));
    assert!(
        (total.price["EUR"] - 0.18).abs() < 1e-9,
        "{:?}",
        total.price
    );
    assert_eq!(total.results["SUCCESSFUL"], 3);
    assert_eq!(total.results["NONE"], 1);

    let mut by = StatsBuilder::new(vec![GroupBy::Country, GroupBy::Day]);
    add_all(&mut by);
    let groups = by.finish();
    let keys: Vec<_> = groups
        .iter()
        .map(|g| (g.group["country"].as_str(), g.group["day"].as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("GB", "2026-11-02"),
            ("SE", "2026-11-01"),
            ("SE", "2026-11-02")
        ]
    );
    assert_eq!(
        (
            groups[0].allowed,
            groups[0].denied,
            groups[0].conversion_rate
        ),
        (1, 1, Some(0.0))
    );
    assert_eq!(
        (groups[1].allowed, groups[1].conversion_rate),
        (2, Some(0.5))
    );
    assert_eq!(groups[2].conversion_rate, Some(1.0));
}

#[test]
fn a_group_with_nothing_allowed_has_no_conversion_rate() {
    let mut by = StatsBuilder::new(vec![GroupBy::Rule]);
    add_all(&mut by);
    let groups = by.finish();
    let premium = groups
        .iter()
        .find(|g| g.group["rule"] == "premium")
        .unwrap();
    assert_eq!(premium.conversion_rate, None);
    assert!(groups.iter().any(|g| g.group["rule"] == "none"));
}

fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn filters_keep_exactly_the_matching_records() {
    let data = data_set();
    let run = |pairs: &[(&str, &str)]| -> Vec<String> {
        let values = params(pairs);
        let p = Params::new(&values, LIST_PARAMS).unwrap();
        let f = filter_from_params(&p).unwrap();
        data.iter()
            .filter(|r| f.matches(r))
            .map(|r| r.id.clone())
            .collect()
    };
    assert_eq!(run(&[("country", "gb")]), ["d", "e", "f"]);
    assert_eq!(run(&[("status", "successful")]), ["a", "c", "f"]);
    assert_eq!(run(&[("method", "FlashCall")]), ["c"]);
    assert_eq!(run(&[("action", "deny")]), ["d"]);
    assert_eq!(run(&[("rule", "default")]), ["a", "b", "c", "e"]);
    assert_eq!(run(&[("status", "none")]), ["e"]);
    assert_eq!(
        run(&[
            ("country", "SE"),
            ("status", "SUCCESSFUL"),
            ("method", "sms")
        ]),
        ["a"]
    );
    assert_eq!(run(&[("reference", "ref-b")]), ["b"]);
    assert_eq!(
        run(&[("number", "+46700000001"), ("action", "allow")]),
        ["a", "b", "c", "e"]
    );
    assert!(run(&[("number", "+46700000002")]).is_empty());
}

#[test]
fn bad_parameters_name_themselves() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("status", "WON")], "`status`"),
        (&[("method", "pigeon")], "`method`"),
        (&[("country", "Sweden")], "`country`"),
        (&[("action", "maybe")], "`action`"),
        (&[("number", "0700")], "`number`"),
        (&[("since", "yesterday")], "`since`"),
        (&[("limit", "0")], "`limit`"),
        (&[("limit", "5000")], "`limit`"),
        (
            &[
                ("since", "2026-11-02T00:00:00Z"),
                ("until", "2026-11-01T00:00:00Z"),
            ],
            "`until`",
        ),
        (&[("colour", "red")], "`colour`"),
        (&[("rule", "")], "`rule`"),
    ];
    for (pairs, name) in cases {
        let values = params(pairs);
        let err = Params::new(&values, LIST_PARAMS)
            .and_then(|p| filter_from_params(&p).and(p.range()).and(p.limit()))
            .unwrap_err();
        assert!(err.to_string().contains(name), "{pairs:?}: {err}");
    }
}

#[test]
fn csv_rows_have_one_value_per_column() {
    for r in data_set() {
        assert_eq!(csv_row(&r).len(), CSV_COLUMNS.len());
    }
}

#[test]
fn minute_and_hour_buckets_are_times_in_order_and_add_up_to_the_total() {
    for (dimension, name) in [(GroupBy::Minute, "minute"), (GroupBy::Hour, "hour")] {
        let mut by = StatsBuilder::new(vec![dimension]);
        add_all(&mut by);
        let groups = by.finish();
        let labels: Vec<&str> = groups.iter().map(|g| g.group[name].as_str()).collect();
        let mut sorted = labels.clone();
        sorted.sort_by_key(|l| chrono::DateTime::parse_from_rfc3339(l).expect(l));
        assert_eq!(labels, sorted, "{name}: labels sort as the times they name");
        let verifications: u64 = groups.iter().map(|g| g.verifications).sum();
        assert_eq!(verifications, 6, "{name}");
    }
    let mut by = StatsBuilder::new(vec![GroupBy::Minute]);
    add_all(&mut by);
    let first = &by.finish()[0];
    assert!(first.group["minute"].ends_with(":00Z"), "{:?}", first.group);
}

/// A verification allowed by the default, with `shadow` rules that would have denied it,
/// ending `status`.
fn shadowed(id: &str, shadow: &[&str], status: Option<&str>) -> VerificationRecord {
    let mut r = record(id, "GB", "sms", Some(Action::Allow), status, 0.05, t(1, 10));
    if let Some(d) = r.decision.as_mut() {
        d.explanation.shadow = shadow
            .iter()
            .map(|rule| crate::decision::ShadowMatch {
                rule: (*rule).to_owned(),
                would: Action::Deny,
            })
            .collect();
    }
    r
}

#[test]
fn a_shadow_rules_precision_counts_only_what_it_would_have_denied_and_is_finished() {
    let mut outcomes = RuleOutcomes::default();
    for r in [
        shadowed("1", &["watch"], Some("SUCCESSFUL")),
        shadowed("2", &["watch"], Some("FAIL")),
        shadowed("3", &["watch", "other"], Some("ABORTED")),
        shadowed("4", &["watch"], Some("PENDING")),
        shadowed("5", &["watch"], None),
        shadowed("6", &[], Some("SUCCESSFUL")),
    ] {
        outcomes.add(&r);
    }
    // Not asked: no decision, so no rule to credit.
    outcomes.add(&record("7", "GB", "sms", None, Some("FAIL"), 0.0, t(1, 11)));
    let rules = outcomes.finish();
    let names: Vec<&str> = rules.iter().map(|r| r.rule.as_str()).collect();
    assert_eq!(names, ["default", "other", "watch"]);
    let watch = &rules[2].shadow;
    assert_eq!((watch.verifications, watch.would_deny), (5, 5));
    assert_eq!(
        (watch.would_deny_finished, watch.would_deny_successful),
        (3, 1)
    );
    assert_eq!(watch.precision, Some(1.0 - 1.0 / 3.0));
    assert_eq!(watch.results["NONE"], 1);
    assert_eq!(rules[2].decided.verifications, 0);
    assert_eq!(rules[1].shadow.precision, Some(1.0));
    let default = &rules[0].decided;
    assert_eq!((default.verifications, default.allowed), (6, 6));
    assert_eq!(rules[0].shadow.precision, None);
}

#[test]
fn an_open_range_ends_at_a_time_rfc_3339_can_write() {
    let values = params(&[]);
    let (_, until) = Params::new(&values, LIST_PARAMS).unwrap().range().unwrap();
    let written = serde_json::to_value(until).unwrap();
    let text = written.as_str().unwrap();
    assert_eq!(text, "9999-12-31T23:59:59.999999999Z");
    assert_eq!(DateTime::parse_from_rfc3339(text).unwrap(), until);
}

#[test]
fn a_parameter_of_256_characters_is_taken_whatever_their_encoding() {
    let long = "é".repeat(256);
    let values = params(&[("rule", long.as_str())]);
    let filter = filter_from_params(&Params::new(&values, LIST_PARAMS).unwrap()).unwrap();
    assert_eq!(filter.rule.as_deref(), Some(long.as_str()));
    let longer = "é".repeat(257);
    let values = params(&[("rule", longer.as_str())]);
    assert!(filter_from_params(&Params::new(&values, LIST_PARAMS).unwrap()).is_err());
}
