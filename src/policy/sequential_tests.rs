//! The sequential `conversion` test, pooling and `surge`, driven through the policy as
//! verigate drives it: decide, then the result when Sinch would send it.

use super::rules::RulesPolicy;
use super::{Learning, NumberHistory, Outcome, Policy, PolicyDecision};
use crate::events::{Action, Identity, Price, VerificationMethod, VerificationRequestEvent};
use chrono::{DateTime, Utc};

const MIN: i64 = 60_000;
const START: i64 = 1_795_392_000_000;

fn policy(text: &str) -> RulesPolicy {
    RulesPolicy::parse(&format!("default = \"allow\"\n{text}"), "p.toml").unwrap()
}

fn time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

/// A verification of `number` at `at_ms`: decided, and if allowed ended a minute later
/// (`converted` or not).
fn verify(p: &RulesPolicy, id: &str, number: &str, at_ms: i64, converted: bool) -> PolicyDecision {
    verify_with(p, id, number, NumberHistory::New, at_ms, converted)
}

/// [`verify`] of a number with `history`.
fn verify_with(
    p: &RulesPolicy,
    id: &str,
    number: &str,
    history: NumberHistory,
    at_ms: i64,
    converted: bool,
) -> PolicyDecision {
    let request = VerificationRequestEvent {
        id: id.into(),
        method: VerificationMethod::Sms,
        identity: Identity {
            kind: Some("number".into()),
            endpoint: number.into(),
        },
        price: Some(Price {
            currency_id: Some("EUR".into()),
            amount: Some(0.1),
        }),
        rate: None,
        reference: None,
        custom: None,
        accept_language: None,
    };
    let d = p.decide(&request, history, time(at_ms)).unwrap();
    if d.action == Action::Allow {
        p.observe_outcome(Outcome {
            id,
            rule: d.rule.as_deref(),
            shadow: &d.explanation.shadow,
            status: if converted { "SUCCESSFUL" } else { "FAIL" },
            reason: None,
            at: time(at_ms + MIN),
            book: crate::policy::BookTaking::NotAsked,
        });
    }
    d
}

const RANGE: &str = "[[rule]]\nname = \"range\"\naction = \"deny\"\n\
    conversion = { per = \"range:4\", window = \"6h\", below = 0.3, normal = 0.8, false_alarm = 1e-5, complete_after = \"3m\" }\n";

/// The decision's first reading, once it is `action`.
fn expect(d: &PolicyDecision, action: Action) -> &crate::decision::CounterReading {
    assert_eq!(d.action, action, "{:?}", d.explanation.counters);
    &d.explanation.counters[0]
}

/// [`RANGE`] with its operator block (`prefix:5`) as its pool.
const POOLED_RANGE: &str = "[[rule]]\nname = \"range\"\naction = \"deny\"\n\
    conversion = { per = \"range:4\", window = \"6h\", below = 0.3, normal = 0.8, false_alarm = 1e-5, pool = \"prefix:5\", pooled_false_alarm = 0.2, complete_after = \"3m\" }\n";

#[test]
fn a_key_where_every_attempt_fails_trips_after_a_handful() {
    let p = policy(RANGE);
    let mut allowed = 0;
    for i in 0..20 {
        let d = verify(
            &p,
            &format!("a{i}"),
            &format!("+2250512{i:04}"),
            START + i * 2 * MIN,
            false,
        );
        if d.action == Action::Deny {
            let reading = &d.explanation.counters[0];
            assert!(reading.condition.contains("vs normal 80 %"), "{reading:?}");
            assert!(reading.value >= reading.max, "{reading:?}");
            break;
        }
        allowed += 1;
    }
    // ln(1e5) / ln((1 - p1) / 0.2) with p1 balanced at 0.3: 7 or 8 failures.
    assert!(
        (6..=9).contains(&allowed),
        "{allowed} allowed before the first denial"
    );
}

#[test]
fn a_key_converting_normally_never_trips_however_long_it_is_watched() {
    let p = policy(RANGE);
    let mut rng = crate::rng::Rng::seeded(5);
    for i in 0..5_000 {
        let converted = rng.unit() < 0.8;
        let d = verify(
            &p,
            &format!("h{i}"),
            &format!("+4670123{:04}", i % 10_000),
            START + i * 20_000,
            converted,
        );
        assert_eq!(
            d.action,
            Action::Allow,
            "honest verification {i} denied: {:?}",
            d.explanation.counters
        );
    }
}

#[test]
fn a_busy_key_whose_window_rate_is_above_the_rule_is_not_tripped_by_a_streak() {
    let p = policy(RANGE);
    // Mostly converting, then ten failures in a row: the evidence crosses, the window's
    // rate (40 of 50) does not.
    for i in 0..40 {
        verify(
            &p,
            &format!("ok{i}"),
            &format!("+4670123{i:04}"),
            START + i * MIN,
            true,
        );
    }
    let mut last = None;
    for i in 0..10 {
        last = Some(verify(
            &p,
            &format!("f{i}"),
            &format!("+4670123{:04}", 100 + i),
            START + (40 + i) * MIN,
            false,
        ));
    }
    assert_eq!(last.unwrap().action, Action::Allow);
}

#[test]
fn fresh_keys_failing_together_trip_sooner_with_a_pool() {
    // Twelve fresh ranges of one block, one attempt each in turn: no range alone sees
    // enough failures for a while.
    let first_denial = |text: &str| {
        let p = policy(text);
        (0..200).find(|i| {
            let number = format!("+22505{:03}{:04}", i % 12, i);
            verify(&p, &format!("s{i}"), &number, START + i * MIN, false).action == Action::Deny
        })
    };
    let alone = first_denial(RANGE).unwrap();
    let together = first_denial(POOLED_RANGE).unwrap();
    assert!(
        together * 2 < alone,
        "pooled first denial {together}, alone {alone}"
    );
}

/// Forty minutes of failures across twelve fresh ranges of `+22505`: its pool trips.
fn trip_the_pool(p: &RulesPolicy) {
    for i in 0..40 {
        verify(
            p,
            &format!("s{i}"),
            &format!("+22505{:03}{:04}", i % 12, i),
            START + i * MIN,
            false,
        );
    }
}

#[test]
fn a_pool_never_lowers_the_bar_for_a_key_that_converted() {
    let p = policy(POOLED_RANGE);
    trip_the_pool(&p);
    // A range of the same block that converted once, then fails twice: not denied.
    let t = START + 50 * MIN;
    verify(&p, "c0", "+225059990001", t, true);
    verify(&p, "c1", "+225059990002", t + MIN, false);
    verify(&p, "c2", "+225059990003", t + 2 * MIN, false);
    assert_eq!(
        verify(&p, "c3", "+225059990004", t + 3 * MIN, false).action,
        Action::Allow
    );
}

#[test]
fn a_key_whose_one_success_is_drowned_in_failures_is_judged_with_its_pool() {
    // A range where one real user converted, then an attack fails on and on: alone, the
    // evidence would need 18 failures. Pooled per country, the pool's bar applies once
    // the window's rate is surely (one-sided 95 %) under the rule's: 1 of 13. In an
    // operator block's pool, once the failures since the success have built the pool's
    // bar (two) and the window's rate is under the rule's (1 of 4).
    for (pool, expected) in [("prefix:5", 3), ("country", 12)] {
        let p = policy(&format!(
            "[[rule]]\nname = \"range\"\naction = \"deny\"\n\
             conversion = {{ per = \"range:4\", window = \"6h\", below = 0.3, normal = 0.8, false_alarm = 1e-12, pool = \"{pool}\", pooled_false_alarm = 0.2, complete_after = \"3m\" }}\n"
        ));
        trip_the_pool(&p);
        let t = START + 50 * MIN;
        verify(&p, "c0", "+225059990001", t, true);
        let (failures, denial) = (1..=20)
            .find_map(|i| {
                let d = verify(
                    &p,
                    &format!("c{i}"),
                    &format!("+22505999{i:04}"),
                    t + i * MIN,
                    false,
                );
                (d.action == Action::Deny).then_some((i - 1, d))
            })
            .unwrap();
        assert_eq!(
            failures, expected,
            "pool {pool}: {:?}",
            denial.explanation.counters
        );
        assert!(
            denial.explanation.counters[0].condition.contains("pooled"),
            "{:?}",
            denial.explanation.counters
        );
    }
}

#[test]
fn a_range_meeting_no_more_failures_than_a_spray_over_its_block_gives_is_judged_alone() {
    let p = policy(POOLED_RANGE);
    trip_the_pool(&p);
    // Then an attack with random numbers over the whole block: one failure in each of
    // 400 of its 1,000 ranges, a few seconds apart.
    let mut t = START + 41 * MIN;
    for i in 0..400 {
        let number = format!("+22505{:03}{:04}", 100 + i, i);
        verify(&p, &format!("r{i}"), &number, t, false);
        t += 5_000;
    }
    // A range of the block whose second failure is in: what such a spray gives some
    // ranges by chance. At the pool's bar it would be denied now; it is judged alone.
    let range = |digits: &str, n: i64, t: i64| -> Vec<PolicyDecision> {
        (0..n)
            .map(|i| {
                let number = format!("+22505{digits}{i:04}");
                verify(&p, &format!("{digits}-{i}"), &number, t + i * MIN, false)
            })
            .collect()
    };
    let sprayed = range("700", 3, t);
    let reading = expect(&sprayed[2], Action::Allow);
    assert!(
        reading.condition.contains("not above its block's spread")
            && reading.condition.contains("of its 1000 ranges"),
        "{reading:?}"
    );
    // A range the attack concentrates on stands out of the spray, and meets the pool's
    // bar a few failures in.
    let concentrated = range("800", 8, t + 10 * MIN);
    let denied = concentrated
        .iter()
        .position(|d| d.action == Action::Deny)
        .unwrap_or_else(|| panic!("{:?}", concentrated[7].explanation.counters));
    assert!((3..=5).contains(&denied), "denied after {denied} failures");
    assert!(
        concentrated[denied].explanation.counters[0]
            .condition
            .contains("pooled"),
        "{:?}",
        concentrated[denied].explanation.counters
    );
}

#[test]
fn a_range_that_stood_out_keeps_its_pools_bar_after_its_block_while_the_spray_widens() {
    let p = policy(&format!("{POOLED_RANGE}block_for = \"20m\"\n"));
    trip_the_pool(&p);
    let spray = |from: i64, to: i64, mut t: i64| {
        for i in from..to {
            let number = format!("+22505{:03}{i:04}", 100 + i);
            verify(&p, &format!("r{i}"), &number, t, false);
            t += 2_000;
        }
    };
    let t = START + 41 * MIN;
    spray(0, 400, t);
    // The range the attack works stands out and is blocked.
    let t = t + 15 * MIN;
    let tripped = (0..8)
        .map(|i| {
            verify(
                &p,
                &format!("a{i}"),
                &format!("+22505050{i:04}"),
                t + i * MIN,
                false,
            )
        })
        .position(|d| d.action == Action::Deny);
    assert_eq!(tripped, Some(4));
    // Meanwhile the spray goes on to two thirds of the block's ranges: a range now
    // needs more failing numbers than this one has to stand out. When its block ends it
    // is judged at the pool's bar again all the same.
    let t = t + 10 * MIN;
    spray(400, 800, t);
    let back = t + 30 * MIN;
    let d = verify(&p, "again", "+225050509999", back, false);
    let reading = expect(&d, Action::Deny);
    assert!(
        reading
            .condition
            .contains("tripped at its pool's bar before"),
        "{reading:?}"
    );
}

#[test]
fn a_range_far_beyond_its_blocks_spread_meets_the_pools_bar_before_the_pool_trips() {
    let p = policy(POOLED_RANGE);
    // A busy block's real users over 300 of its ranges: nine in ten convert, so its pool
    // stays calm, and its failures are spread thin.
    let mut t = START;
    for i in 0..300 {
        let number = format!("+44791{i:03}{i:04}");
        verify(&p, &format!("u{i}"), &number, t, i % 10 != 0);
        t += 20_000;
    }
    // An attack works one range with fresh numbers: its third failing number is far
    // beyond what the block's spread gives a range, and the next request is denied at
    // the pool's bar (alone, the key would need ten failures).
    let attacked: Vec<PolicyDecision> = (0..6)
        .map(|i| {
            let number = format!("+44791900{i:04}");
            verify(&p, &format!("a{i}"), &number, t + i * MIN, false)
        })
        .collect();
    let denied = attacked
        .iter()
        .position(|d| d.action == Action::Deny)
        .unwrap_or_else(|| panic!("{:?}", attacked[5].explanation.counters));
    assert_eq!(denied, 3, "{:?}", attacked[denied].explanation.counters);
    let reading = &attacked[denied].explanation.counters[0];
    assert!(
        reading
            .condition
            .contains("stands out of its block's spread (3 failing numbers"),
        "{reading:?}"
    );
    // One person trying again and again in another range is one failing number: judged
    // alone, not denied.
    for i in 0..6 {
        let d = verify(
            &p,
            &format!("r{i}"),
            "+447919500001",
            t + (10 + i) * MIN,
            false,
        );
        assert_eq!(d.action, Action::Allow, "{:?}", d.explanation.counters);
    }
}

#[test]
fn a_sparse_key_never_trips_on_evidence_older_than_its_window() {
    let p = policy(RANGE);
    // A failure every five hours: the evidence lasts (each comes within the 6h window
    // of the one before) and would pass the bar after eight, but the window never holds
    // more than two of them, far from what the bar needs.
    for i in 0..20 {
        let d = verify(
            &p,
            &format!("s{i}"),
            &format!("+2250512{i:04}"),
            START + i * 300 * MIN,
            false,
        );
        assert_eq!(
            d.action,
            Action::Allow,
            "failure {i} denied: {:?}",
            d.explanation.counters
        );
    }
}

#[test]
fn an_operator_block_failing_most_of_its_country_does_not_lower_its_ranges_bar() {
    let p = policy(
        "[[rule]]\nname = \"range\"\naction = \"deny\"\n\
         conversion = { per = \"range:4\", window = \"4h\", below_baseline = 0.5, false_alarm = 1e-5, pool = \"prefix:5\", complete_after = \"3m\" }\n",
    );
    // Twenty hours of a country's traffic: one block (+44792) converts 87 % of the time,
    // another (+44791) takes a quarter of the country's attempts and none converts, each
    // on a range of its own so that every outcome teaches the country's rate.
    let mut at = START;
    for i in 0..2_400 {
        let number = if i % 4 == 0 {
            format!("+44791{:03}{:04}", i / 4, i)
        } else {
            format!("+44792{:03}{:04}", i % 1_000, i)
        };
        let converted = i % 4 != 0 && i % 10 != 1;
        verify(&p, &format!("v{i}"), &number, at, converted);
        at += 30_000;
    }
    // A range of the failing block is judged against the country without that block
    // (87 %), not against a rate the block itself dragged down to 65 %.
    let d = verify(&p, "probe", "+447919990001", at, false);
    let reading = &d.explanation.counters[0];
    let normal: u32 = reading
        .condition
        .split("vs normal ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no normal rate in {reading:?}"));
    assert!((85..=95).contains(&normal), "{reading:?}");
}

#[test]
fn a_key_blocked_at_its_pools_bar_is_judged_at_it_again_when_its_block_ends() {
    let p = policy(
        "[[rule]]\nname = \"range\"\naction = \"deny\"\n\
         conversion = { per = \"range:4\", window = \"6h\", below = 0.3, normal = 0.8, false_alarm = 1e-5, pool = \"prefix:5\", pooled_false_alarm = 0.2, pool_alert_for = \"30m\", complete_after = \"3m\" }\n\
         block_for = \"20m\"\n",
    );
    // Fresh ranges of one block failing in turn: the pool trips, and a range is blocked
    // on the pooled bar after a few failures of its own.
    let (tripped, number) = (0..200)
        .find_map(|i| {
            let number = format!("+22505{:03}{:04}", i % 12, i);
            let d = verify(&p, &format!("s{i}"), &number, START + i * MIN, false);
            (d.action == Action::Deny).then_some((i, number))
        })
        .unwrap();
    // Real users then convert across the block's other ranges: the pool calms down and
    // its alert ends; the blocked range's block ends too.
    let calm = START + (tripped + 1) * MIN;
    for i in 0..80 {
        let d = verify(
            &p,
            &format!("u{i}"),
            &format!("+22505{:03}{:04}", 100 + i, i),
            calm + i * MIN,
            true,
        );
        assert_eq!(d.action, Action::Allow, "{:?}", d.explanation.counters);
    }
    // The range comes back still failing: judged at the bar it was blocked at, not at
    // the full one it would need 10 more failures for.
    let back = calm + 120 * MIN;
    let d = verify(&p, "back", &number, back, false);
    assert_eq!(d.action, Action::Deny, "{:?}", d.explanation.counters);
    assert!(
        d.explanation.counters[0]
            .condition
            .contains("tripped at its pool's bar before"),
        "{:?}",
        d.explanation.counters
    );
    // A fresh range of the same block failing once is not denied: the pool is calm.
    let fresh = verify(&p, "fresh", "+225059990001", back + MIN, false);
    assert_eq!(
        fresh.action,
        Action::Allow,
        "{:?}",
        fresh.explanation.counters
    );
}

/// How a surge went: allowed before it was first denied, allowed in all, denied, and
/// the last denial.
struct Surged {
    before: u32,
    allowed: u32,
    denied: u32,
    last: PolicyDecision,
}

/// A block with steady traffic that converts at 0.8 for eight hours, then three times
/// the volume at 0.3 for an hour.
fn surging(throttle: &str) -> Surged {
    let p = policy(&format!(
        "[[rule]]\nname = \"surge\"\naction = \"deny\"\n\
         surge = {{ per = \"prefix:5\", window = \"1h\", baseline = \"8h\", volume_above = 1.5, conversion_below = 0.6, complete_after = \"3m\"{throttle} }}\n"
    ));
    let mut rng = crate::rng::Rng::seeded(9);
    let mut id = 0;
    let mut number = || {
        id += 1;
        (format!("v{id}"), format!("+4479{id:07}"))
    };
    // Calm: one a minute.
    for m in 0..8 * 60 {
        let (id, n) = number();
        let d = verify(&p, &id, &n, START + m * MIN, rng.unit() < 0.8);
        assert_eq!(d.action, Action::Allow, "calm minute {m}");
    }
    let (mut before, mut allowed, mut denied) = (0, 0, 0);
    let mut last = None;
    for m in 0..60 {
        for k in 0..3 {
            let (id, n) = number();
            let d = verify(
                &p,
                &id,
                &n,
                START + (8 * 60 + m) * MIN + k * 1000,
                rng.unit() < 0.3,
            );
            if d.action == Action::Deny {
                denied += 1;
                last = Some(d);
            } else {
                allowed += 1;
                if last.is_none() {
                    before += 1;
                }
            }
        }
    }
    Surged {
        before,
        allowed,
        denied,
        last: last.expect("the surge was never denied"),
    }
}

#[test]
fn a_surge_against_the_keys_own_normal_is_denied_and_explained() {
    let s = surging("");
    let reading = &s.last.explanation.counters[0];
    assert!(
        reading.condition.starts_with("surge: volume "),
        "{reading:?}"
    );
    assert!(
        reading.condition.contains("x normal, conversion"),
        "{reading:?}"
    );
    // Seen within the first half hour, then every request denied.
    assert!(
        s.before < 90,
        "{} allowed before the surge was seen",
        s.before
    );
    assert_eq!(s.allowed, s.before);
}

#[test]
fn a_throttled_surge_lets_the_normal_volume_through_and_denies_the_excess() {
    // The same traffic, denied outright once the surge is seen and throttled.
    let denied = surging("");
    let s = surging(", throttle = 1.2");
    // Once the surge is seen, 1.2 x the normal 60 an hour pass, then the excess is denied.
    let passed = s.allowed - denied.before;
    assert!(
        (60..=80).contains(&passed),
        "{passed} passed while throttled"
    );
    assert!(s.denied >= 30, "{} denied", s.denied);
    assert_eq!(
        s.last.explanation.counters[0].rule, "surge",
        "{:?}",
        s.last.explanation
    );
}

#[test]
fn the_new_knobs_are_checked_where_they_are_written() {
    let err = |text: &str| {
        RulesPolicy::parse(&format!("default = \"allow\"\n{text}"), "p.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let narrower = err("[[rule]]\nname = \"r\"\naction = \"deny\"\nconversion = { per = \"prefix:5\", window = \"6h\", below = 0.3, false_alarm = 1e-5, pool = \"range:4\" }\n");
    assert!(
        narrower.contains("wider key than `per`") && narrower.contains("p.toml:5:"),
        "{narrower}"
    );
    let no_test = err("[[rule]]\nname = \"r\"\naction = \"deny\"\nconversion = { per = \"range:4\", window = \"6h\", below = 0.3, pool = \"prefix:5\" }\n");
    assert!(no_test.contains("set `false_alarm` too"), "{no_test}");
    let alarm = err("[[rule]]\nname = \"r\"\naction = \"deny\"\nconversion = { per = \"range:4\", window = \"6h\", below = 0.3, false_alarm = 0.7 }\n");
    assert!(alarm.contains("between 0 and 0.5"), "{alarm}");
    let blocked_throttle = err("[[rule]]\nname = \"r\"\naction = \"deny\"\nsurge = { per = \"prefix:5\", window = \"1h\", conversion_below = 0.6, throttle = 1.2 }\nblock_for = \"1h\"\n");
    assert!(
        blocked_throttle.contains("use one or the other"),
        "{blocked_throttle}"
    );
    let per_number = err("[[rule]]\nname = \"r\"\naction = \"deny\"\nsurge = { per = \"number\", window = \"1h\", conversion_below = 0.6 }\n");
    assert!(per_number.contains("no normal to learn"), "{per_number}");
    let short = err("[[rule]]\nname = \"r\"\naction = \"deny\"\nsurge = { per = \"prefix:5\", window = \"1h\", baseline = \"2h\", conversion_below = 0.6 }\n");
    assert!(short.contains("at least four windows"), "{short}");
    // A conversion rule per block with these knobs.
    let conversion = |knobs: &str| {
        err(&format!("[[rule]]\nname = \"r\"\naction = \"deny\"\nconversion = {{ per = \"prefix:5\", window = \"6h\", {knobs} }}\n"))
    };
    let none = conversion("below_baseline = 0.5, false_alarm = 1e-5, established = 0");
    assert!(none.contains("at least 1"), "{none}");
    let wilson = conversion("below = 0.3, established = 30");
    assert!(wilson.contains("set `false_alarm` too"), "{wilson}");
    let hours = |knobs: &str| conversion(&format!("below = 0.3, false_alarm = 1e-5{knobs}"));
    let wilson_hours = conversion("below = 0.3, established_hours = 4");
    assert!(
        wilson_hours.contains("set `false_alarm` too"),
        "{wilson_hours}"
    );
    let alone = hours(", established_hours = 4");
    assert!(alone.contains("needs `established`"), "{alone}");
    let zero = hours(", established = 15, established_hours = 0");
    assert!(zero.contains("at least 1"), "{zero}");
    let unmet = hours(", established = 15, established_hours = 19");
    assert!(unmet.contains("holds 18 whole hours"), "{unmet}");
    // The default asks for no more hours than a short baseline holds.
    assert_eq!(hours(", established = 15, baseline = \"8h\""), "");
    assert_eq!(hours(", established = 15, established_hours = 18"), "");
    // Under a 6h window an hour is a sixth of it: a 1h window over 2h of baseline holds
    // six of ten minutes before it.
    let short = |knobs: &str| {
        err(&format!("[[rule]]\nname = \"r\"\naction = \"deny\"\nconversion = {{ per = \"prefix:5\", window = \"1h\", baseline = \"2h\", below = 0.3, false_alarm = 1e-5, established = 15{knobs} }}\n"))
    };
    assert_eq!(short(", established_hours = 6"), "");
    let unmet = short(", established_hours = 7");
    assert!(
        unmet.contains("holds 6 whole hours of 10m (a sixth of the window)"),
        "{unmet}"
    );
}

#[test]
fn policy_check_shows_every_new_knob() {
    let p = policy(
        "[[rule]]\nname = \"range\"\naction = \"deny\"\n\
         conversion = { per = \"range:4\", window = \"6h\", below_baseline = 0.5, false_alarm = 1e-5, pool = \"prefix:5\", pooled_false_alarm = 0.2, pool_alert_for = \"3h\", baseline = \"2d\", complete_after = \"3m\", established = 40, established_hours = 6 }\n\
         [[rule]]\nname = \"surge\"\naction = \"deny\"\nmode = \"shadow\"\n\
         surge = { per = \"prefix:5\", window = \"1h\", baseline = \"24h\", volume_above = 2.0, conversion_below = 0.6, false_alarm = 1e-6, throttle = 2.5, complete_after = \"3m\" }\n",
    );
    let summary = p.summary();
    for knob in [
        "below 0.5 x the normal rate",
        "false alarm 0.00001",
        "the country's rate over 2d without the key's prefix:5",
        "pooled per prefix:5 at false alarm 0.2 for 3h",
        "complete after 3m",
        "established after 40 clean successes in 6 hours",
        "volume at least 2x",
        "conversion below 0.6x",
        "false alarm 0.000001",
        "throttled to 2.5x normal volume",
    ] {
        assert!(summary.contains(knob), "`{knob}` missing from:\n{summary}");
    }
}

/// A rule judged against its country's learned normal, per operator block.
const BLOCKS: &str = "[[rule]]\nname = \"blocks\"\naction = \"deny\"\n\
    conversion = { per = \"prefix:5\", window = \"6h\", below_baseline = 0.45, false_alarm = 1e-5, complete_after = \"3m\" }\n";

/// `n` verifications of numbers `prefix` + 7 digits from `first`, every `every_ms`, of
/// which those with `converts(i)` convert; how many were denied, and when the last ended.
fn traffic(
    p: &RulesPolicy,
    prefix: &str,
    n: i64,
    start_ms: i64,
    every_ms: i64,
    converts: impl Fn(i64) -> bool,
) -> (usize, i64) {
    let denied = (0..n)
        .filter(|&i| {
            let number = format!("{prefix}{:07}", i * 7919 % 10_000_000);
            let id = format!("{prefix}-{i}");
            verify(p, &id, &number, start_ms + i * every_ms, converts(i)).action == Action::Deny
        })
        .count();
    (denied, start_ms + n * every_ms)
}

/// Swedish users converting at 80 %, spread over many blocks: every country's normal.
fn history(p: &RulesPolicy, outcomes: i64) -> i64 {
    history_in_blocks(p, outcomes, |i| i % 90)
}

/// [`history`] with outcome `i` in Swedish block `block(i)` (0 to 89).
fn history_in_blocks(p: &RulesPolicy, outcomes: i64, block: impl Fn(i64) -> i64) -> i64 {
    (0..outcomes)
        .map(|i| {
            let number = format!("+467{:02}{:06}", block(i) + 10, i);
            verify(
                p,
                &format!("se-{i}"),
                &number,
                START + i * 2_000,
                i % 5 != 0,
            );
        })
        .count() as i64
        * 2_000
        + START
}

#[test]
fn a_new_deployment_does_not_judge_an_honest_low_converting_country_by_every_country() {
    let p = policy(BLOCKS);
    let now = history(&p, 300);
    // Kenya, one operator block, honest at 35 %: with every country at 80 % and no
    // history of its own, it would look like an attack.
    let (denied, _) = traffic(&p, "+254711", 200, now, 30_000, |i| i % 20 < 7);
    assert_eq!(denied, 0);
}

#[test]
fn once_every_country_has_history_a_new_country_converting_like_an_attack_trips() {
    let p = policy(BLOCKS);
    let now = history(&p, 2_100);
    let (denied, _) = traffic(&p, "+998971", 120, now, 30_000, |i| i % 10 < 2);
    assert!(denied > 50, "{denied}");
}

/// An attacker grooms a block to convert well in a country where the business's users
/// convert poorly: the groom's successes are clean, and the country's other blocks are
/// judged against it. Never above every country's rate: at 95 % (its bar 43 %) the real
/// users' block, converting 40 %, trips; at every country's 80 % (its bar 36 %) it does
/// not.
#[test]
fn a_block_groomed_to_convert_well_does_not_raise_its_countrys_bar_over_every_countrys() {
    let p = policy(BLOCKS);
    // Every country's normal: 3,000 Swedish outcomes over 90 blocks, each block
    // converting 80 % with its failures apart (`history` gives some blocks only failures,
    // which are not clean, and so every country 99 %).
    let now = history_in_blocks(&p, 3_000, |i| (i / 5) % 90);
    // A hundred verifications in a fresh Nigerian block, 95 % converting.
    let (denied, now) = traffic(&p, "+234701", 100, now, 60_000, |i| i % 20 != 0);
    assert_eq!(denied, 0);
    // Then the business's Nigerian users, in another block, converting at 40 %.
    let (denied, _) = traffic(&p, "+234801", 300, now, 60_000, |i| i % 5 < 2);
    assert_eq!(denied, 0);
}

/// Attacks opening fresh blocks in countries with no history of their own: the first
/// outcome of each fresh key counts as clean, so they fill every country's rate.
#[test]
fn attacks_in_countries_without_history_do_not_lower_every_countrys_rate() {
    let p = policy(BLOCKS);
    let mut now = history(&p, 2_100);
    // 1,500 fresh blocks in five countries, one failed attempt each: every country's
    // rate falls from 80 % to 47 %. Once each of them has a normal of its own, it is one
    // no honest country has, and teaches nobody else's.
    for code in ["20", "27", "30", "31", "32"] {
        for block in 0..300 {
            let number = format!("+{code}{block:03}1234567");
            verify(&p, &format!("{code}-{block}"), &number, now, false);
            now += 2_000;
        }
    }
    // Then a block of a country new to the business that converts at 25 %: under the
    // settled countries' bar (0.45 x 80 %), above the one the attacks would set.
    let (denied, _) = traffic(&p, "+998971", 120, now, 30_000, |i| i % 4 == 0);
    assert!(denied > 30, "{denied}");
}

#[test]
fn a_country_whose_traffic_is_mostly_an_attack_cannot_lower_its_own_bar() {
    let p = policy(BLOCKS);
    let now = history(&p, 2_100);
    // Two attempts in each of fifty blocks of one country, 5 % converting: the
    // country's normal is learned from them, and no block is watched long enough to trip.
    let (denied, now) = (10..60).fold((0, now), |(denied, now), block| {
        let (d, next) = traffic(&p, &format!("+225{block}"), 2, now, 30_000, |i| {
            i == 0 && block % 10 == 0
        });
        (denied + d, next)
    });
    assert_eq!(denied, 0);
    // Then one block of it, converting as rarely: the floor, not the poisoned normal.
    let (denied, _) = traffic(&p, "+2257799", 60, now, 30_000, |i| i % 20 == 0);
    assert!(denied >= 10, "{denied}");
}

/// A key is judged against its country without its own outcomes over the whole
/// baseline, not only its window's: an attack that comes back the next day (`mimicry`
/// in the simulator) would otherwise be judged against the rate it taught its country
/// the day before.
#[test]
fn a_key_is_not_judged_against_what_it_taught_its_country_the_day_before() {
    let p = policy(BLOCKS);
    let now = history(&p, 3_000);
    // A block of a country new to the business, every other attempt converting, one
    // every two minutes: never tripped, and its clean outcomes (those allowed while it
    // was not under suspicion: after a success, so mostly failures) teach its country a
    // rate under the floor.
    let (denied, now) = traffic(&p, "+99897", 200, now, 2 * MIN, |i| i % 2 == 0);
    assert_eq!(denied, 0);
    // Eight hours later (past the window, inside the baseline) it converts at 20 %:
    // under every country's bar (0.45 x 80 %), above the one it would have set itself.
    let later = now + 8 * 60 * MIN;
    let (denied, _) = traffic(&p, "+998971", 80, later, 30_000, |i| i % 5 == 0);
    assert!(denied > 10, "{denied}");
}

/// Other attacks' fresh keys in a country convert as no people do: their outcomes (the
/// first of each fresh key count as clean) do not set the bar of the next key there.
/// (Too few to be the country's normal, they could only cap every country's rate
/// at what they plausibly convert, which is the floor.)
#[test]
fn failing_fresh_keys_of_a_country_do_not_lower_the_bar_of_its_next_key() {
    let p = policy(BLOCKS);
    let mut now = history(&p, 3_000);
    // Forty fresh blocks of a country new to the business, one failed attempt each.
    for block in 10..50 {
        let number = format!("+998{block}1234567");
        verify(&p, &format!("uz-{block}"), &number, now, false);
        now += 30_000;
    }
    // The next block there is judged by every country's rate, as if they were not
    // there: the same bar as a first block of the country gets.
    let d = verify(&p, "uz-next", "+998971234567", now + 30_000, false);
    let after_failures = d.explanation.counters[0].condition.clone();
    let p = policy(BLOCKS);
    let now = history(&p, 3_000);
    let d = verify(&p, "uz-first", "+998971234567", now, false);
    assert_eq!(after_failures, d.explanation.counters[0].condition);
}

/// One operator block's traffic under a plain `surge` rule (an hour's window, 1.5 x
/// volume, conversion under 0.6 x), each request a new number.
struct SurgeBlock {
    policy: RulesPolicy,
    rng: crate::rng::Rng,
    asked: u32,
}

impl SurgeBlock {
    fn new(seed: u64) -> Self {
        Self {
            policy: policy(
                "[[rule]]\nname = \"surge\"\naction = \"deny\"\n\
                 surge = { per = \"prefix:5\", window = \"1h\", volume_above = 1.5, conversion_below = 0.6, complete_after = \"3m\" }\n",
            ),
            rng: crate::rng::Rng::seeded(seed),
            asked: 0,
        }
    }

    /// Plays real users (80 % convert) and attempts that never convert, in time order;
    /// how many of the users and how many of those attempts were denied.
    fn play(
        &mut self,
        users: impl IntoIterator<Item = i64>,
        attack: impl IntoIterator<Item = i64>,
    ) -> (usize, usize) {
        let mut times: Vec<(i64, bool)> = users.into_iter().map(|at| (at, true)).collect();
        times.extend(attack.into_iter().map(|at| (at, false)));
        times.sort_unstable();
        let mut denied = (0, 0);
        for (at, user) in times {
            self.asked += 1;
            let converts = user && self.rng.unit() < 0.8;
            let number = format!("+4479{:07}", self.asked);
            let d = verify(
                &self.policy,
                &format!("v{}", self.asked),
                &number,
                at,
                converts,
            );
            if d.action == Action::Deny {
                match user {
                    true => denied.0 += 1,
                    false => denied.1 += 1,
                }
            }
        }
        denied
    }
}

/// `per_hour(hour)` requests evenly spread over each of `hours` (from `START`).
fn evenly(hours: std::ops::Range<i64>, per_hour: fn(i64) -> i64) -> impl Iterator<Item = i64> {
    hours.flat_map(move |hour| {
        let n = per_hour(hour);
        (0..n).map(move |k| START + hour * 60 * MIN + k * (60 * MIN / n))
    })
}

/// Traffic follows the day: a key is judged against the same hours of the days before,
/// so a surge in its quiet hours is seen although it stays under the day's mean.
#[test]
fn a_surge_in_a_quiet_hour_is_judged_against_that_hour_of_the_day_before() {
    // A day and the next night: 60 an hour, but 10 an hour from 02:00 to 05:00.
    let per_hour = |hour: i64| {
        if (2..5).contains(&(hour % 24)) {
            10
        } else {
            60
        }
    };
    let mut block = SurgeBlock::new(3);
    assert_eq!(block.play(evenly(0..26, per_hour), []), (0, 0));
    // From 02:00 of the next night, beside its users, 40 an hour more that never
    // convert, for two hours: 50 an hour, under the day's mean of 54 an hour, four to
    // five times the night's normal.
    let night = START + (24 + 2) * 60 * MIN;
    let attack = (0..80).map(|k| night + k * (60 * MIN / 40));
    let (_, denied) = block.play(evenly(26..28, per_hour), attack);
    assert!(denied >= 10, "{denied} of the night's surge denied");
}

/// A window is compared with the same stretch of the day before, not with the clock
/// hour it ends in: where traffic climbs at 10:00, the last hour at 10:10 is mostly the
/// quiet 09:00-10:00, and an attack of that first half hour must not hide under the
/// busy hour's volume.
#[test]
fn a_surge_as_traffic_climbs_is_judged_against_the_same_stretch_of_the_day_before() {
    // A day and the next morning: 10 an hour until 10:00, 100 an hour after.
    let per_hour = |hour: i64| if hour % 24 < 10 { 10 } else { 100 };
    let mut block = SurgeBlock::new(5);
    assert_eq!(block.play(evenly(0..34, per_hour), []), (0, 0));
    // From 10:00 of the second day the real users keep coming, and 150 an hour more that
    // never convert, for half an hour. Against the hour of 10:00 the day before (100),
    // the last hour stays under 1.5 x (at 10:30, 55 real and 75 of the attack); against
    // the same stretch of the day before (25 at 10:10, 55 at 10:30) it is twice that.
    let from = START + 34 * 60 * MIN;
    let users = evenly(34..35, per_hour).filter(|at| *at < from + 30 * MIN);
    let attack = (0..75).map(|k| from + k * (60 * MIN / 150));
    let (_, denied) = block.play(users, attack);
    assert!(denied >= 10, "{denied} of the attack's 75 denied");
}

/// Real users and an attack sharing one operator block: 1 user a minute converting at
/// 80 %, 3 attempts a minute that never do (the block converts at 20 %, under the bar
/// of 0.45 x 80 %); how many of the users were denied.
fn shared_block(p: &RulesPolicy, prefix: &str, start_ms: i64) -> usize {
    (0..240)
        .filter(|&i| {
            let at = start_ms + i * 15_000;
            let user = i % 4 == 0;
            let number = format!("{prefix}{}{:06}", u8::from(user), i * 7919 % 1_000_000);
            let converts = user && (i / 4) % 5 != 0;
            let denied =
                verify(p, &format!("{prefix}-{i}"), &number, at, converts).action == Action::Deny;
            user && denied
        })
        .count()
}

#[test]
fn an_established_block_is_not_blocked_for_an_attack_among_its_users_and_a_fresh_one_is() {
    let established = BLOCKS.replace(
        "complete_after = \"3m\" }",
        "complete_after = \"3m\", established = 30 }",
    );
    let history_of_gb = |p: &RulesPolicy| {
        let now = history(p, 2_100);
        // The block's own users, converting at 80 %, hours before.
        let (denied, now) = traffic(p, "+447911", 200, now, 60_000, |i| i % 5 != 0);
        assert_eq!(denied, 0);
        now + 7 * 60 * MIN
    };
    let p = policy(&established);
    let now = history_of_gb(&p);
    assert_eq!(
        shared_block(&p, "+447911", now),
        0,
        "the established block's users"
    );
    // The same mix in a block of the same country with no users of its own trips.
    assert!(shared_block(&p, "+447922", now) > 5, "a fresh block");
    // Without `established`, the established block trips too, and its users are turned
    // away: what the option spares them.
    let p = policy(BLOCKS);
    let now = history_of_gb(&p);
    assert!(shared_block(&p, "+447911", now) > 5);
}

/// Established means clean successes before the window: a fresh block that looks like
/// users for a while (an attacker who read the docs) and then pumps is judged as fresh.
#[test]
fn a_block_that_converts_well_within_the_window_is_not_established() {
    let p = policy(&BLOCKS.replace(
        "complete_after = \"3m\" }",
        "complete_after = \"3m\", established = 30 }",
    ));
    let now = history(&p, 2_100);
    // Eighty clean successes in 100 minutes, then the attack: 5 % converting. Its
    // window's rate falls under the bar after about 140 attempts.
    let (denied, now) = traffic(&p, "+447933", 100, now, 60_000, |i| i % 5 != 0);
    assert_eq!(denied, 0);
    let (denied, _) = traffic(&p, "+447934", 300, now, 30_000, |i| i % 20 == 0);
    assert!(denied > 15, "{denied}");
}

/// An attack that stays in an established block for longer than the baseline does not
/// wear its establishment away while the people who come back to the block go on
/// converting: their successes count as the block's own although the attack keeps the
/// block under suspicion. New numbers' successes in a suspicious block do not (an
/// attack could make those), so a block whose users are all new does lose it.
#[test]
fn an_established_block_stays_established_while_its_returning_users_convert() {
    let rule = BLOCKS.replace(
        "complete_after = \"3m\" }",
        "complete_after = \"3m\", established = 30 }",
    );
    let users_denied_late = |users: NumberHistory| {
        let p = policy(&rule);
        let now = history(&p, 2_100);
        let (denied, now) = traffic(&p, "+447911", 200, now, 60_000, |i| i % 5 != 0);
        assert_eq!(denied, 0);
        // 32 hours of the attack among the block's users (as in `shared_block`), with
        // Swedish users going on elsewhere so that every country keeps its normal.
        let ticks = 32 * 60 * 4;
        (0..ticks)
            .filter(|&i| {
                let at = now + i * 15_000;
                let swede = format!("+467{:02}{:06}", i % 90 + 10, 500_000 + i);
                verify(&p, &format!("se-late-{i}"), &swede, at, i % 5 != 0);
                let user = i % 4 == 0;
                let number = format!("+447911{}{:06}", u8::from(user), i * 7919 % 1_000_000);
                let converts = user && (i / 4) % 5 != 0;
                let history = if user { users } else { NumberHistory::New };
                let d = verify_with(&p, &format!("gb-{i}"), &number, history, at, converts);
                // The last two hours, when what established the block is long gone.
                user && i >= ticks - 2 * 60 * 4 && d.action == Action::Deny
            })
            .count()
    };
    assert_eq!(users_denied_late(NumberHistory::Returning), 0);
    assert!(users_denied_late(NumberHistory::New) > 20);
}

/// An attacker who has read the docs grooms a fresh block to look established: enters
/// the codes of a few dozen verifications in one sitting, waits past the window, then
/// pumps across the whole block. Real users' successes come through the day; the groom's
/// come in two hours, so it does not establish the block.
#[test]
fn a_block_groomed_in_one_sitting_is_not_established() {
    let pumped_and_denied = |hours: &str| {
        let p = policy(&BLOCKS.replace(
            "complete_after = \"3m\" }",
            &format!("complete_after = \"3m\", established = 15{hours} }}"),
        ));
        let now = history(&p, 3_000);
        // Sixty verifications over two hours, 80 % converting: 48 clean successes.
        let (denied, now) = traffic(&p, "+447944", 60, now, 2 * MIN, |i| i % 5 != 0);
        assert_eq!(denied, 0);
        // Seven hours later, three attempts a minute for six hours, 5 % converting.
        let later = now + 7 * 60 * MIN;
        let (denied, _) = traffic(&p, "+447944", 1_080, later, 20_000, |i| i % 20 == 0);
        denied
    };
    let denied = pumped_and_denied("");
    assert!(denied > 900, "{denied} of 1,080 denied");
    // What the hours stop: with one hour enough, the groom establishes the block.
    assert_eq!(pumped_and_denied(", established_hours = 1"), 0);
}

/// The hours a block's clean successes came in count when they are before the window
/// (as the successes do): a groomed block does not become established by an hour of
/// converting well inside the window, just before it pumps.
#[test]
fn hours_inside_the_window_do_not_establish_a_block() {
    let p = policy(&BLOCKS.replace(
        "complete_after = \"3m\" }",
        "complete_after = \"3m\", established = 15 }",
    ));
    let now = history(&p, 3_000);
    // Two hours of grooming (48 clean successes in three clock hours), then, seven hours
    // later, an hour converting as well (a fourth hour, inside the window), then the pump.
    let (_, now) = traffic(&p, "+447955", 60, now, 2 * MIN, |i| i % 5 != 0);
    let (denied, now) = traffic(&p, "+447955", 30, now + 7 * 60 * MIN, 2 * MIN, |i| {
        i % 5 != 0
    });
    assert_eq!(denied, 0);
    let (denied, _) = traffic(&p, "+447955", 600, now, 20_000, |i| i % 20 == 0);
    assert!(denied > 400, "{denied} of 600 denied");
}
