use super::*;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

fn key(condition: &str, value: &str) -> CounterKey {
    CounterKey {
        rule: "low-conversion".into(),
        condition: condition.into(),
        value: value.into(),
    }
}

fn conversion(range: &str, country: &str) -> TrackedKey {
    TrackedKey::Conversion {
        rule: "low-conversion".into(),
        spec: "range:3".into(),
        value: range.into(),
        country: country.into(),
        window_ms: 6 * HOUR,
        baseline_ms: 0,
        steps: None,
        pool: None,
        block: None,
        settled: false,
        established: false,
        returning_ms: 0,
    }
}

fn tracked(range: &str, at_ms: i64) -> Tracked {
    Tracked {
        keys: vec![conversion(range, "SE")],
        allowed_ms: at_ms,
        complete_after_ms: 10 * MIN,
        number: "+46700000001".into(),
    }
}

fn spec() -> BlockSpec {
    BlockSpec {
        for_ms: HOUR,
        max_ms: 8 * HOUR,
        probe_every: Some(10),
    }
}

#[test]
fn wilson_bound_keeps_small_samples_high_and_converges_on_large_ones() {
    let z = z_for(0.95);
    assert!((z - 1.645).abs() < 0.01, "{z}");
    assert!((z_for(0.99) - 2.326).abs() < 0.01);
    // 0 of 3 is no evidence of a low rate; 0 of 30 is.
    assert!(wilson_upper(0.0, 3.0, z) > 0.4);
    assert!(wilson_upper(0.0, 30.0, z) < 0.1);
    assert!((wilson_upper(800.0, 1000.0, z) - 0.8).abs() < 0.03);
    assert_eq!(wilson_upper(0.0, 0.0, z), 1.0);
}

proptest::proptest! {
    #[test]
    fn the_wilson_bound_is_a_probability_at_or_above_the_observed_rate(
        ok in 0u32..500, extra in 0u32..500, confidence in 0.8f64..0.999
    ) {
        let n = f64::from(ok + extra);
        let upper = wilson_upper(f64::from(ok), n, z_for(confidence));
        proptest::prop_assert!((0.0..=1.0).contains(&upper));
        if n > 0.0 {
            proptest::prop_assert!(upper + 1e-12 >= f64::from(ok) / n);
        }
    }
}

#[test]
fn results_are_classified_as_the_defence_needs() {
    assert_eq!(
        Resolution::of("SUCCESSFUL", None),
        Some(Resolution::Success)
    );
    assert_eq!(
        Resolution::of("FAIL", Some("Expired")),
        Some(Resolution::Failure)
    );
    assert_eq!(Resolution::of("ABORTED", None), Some(Resolution::Failure));
    assert_eq!(
        Resolution::of("DENIED", Some("Fraud")),
        Some(Resolution::SinchFraud)
    );
    assert_eq!(
        Resolution::of("DENIED", Some("blocked")),
        Some(Resolution::SinchFraud)
    );
    assert_eq!(
        Resolution::of("DENIED", Some("Denied by callback")),
        Some(Resolution::Excluded)
    );
    assert_eq!(Resolution::of("ERROR", None), Some(Resolution::Excluded));
    assert_eq!(Resolution::of("PENDING", None), None);
}

#[test]
fn outcomes_are_counted_once_per_tracked_verification_and_late_ones_fail() {
    let counters = Counters::default();
    let book = OutcomeBook::default();
    book.track("a", tracked("+46700000", 0));
    book.track("b", tracked("+46700000", 0));
    book.track("c", tracked("+46700000", 0));
    assert!(book.resolve("a", Resolution::Success, &counters, MIN));
    assert!(
        !book.resolve("a", Resolution::Success, &counters, MIN),
        "counted twice"
    );
    assert!(book.resolve("b", Resolution::Excluded, &counters, MIN));
    // `c` never reports: after complete_after it is a failure.
    book.expire(&counters, 5 * MIN);
    assert_eq!(book.pending(), 1);
    book.expire(&counters, 11 * MIN);
    assert_eq!(book.pending(), 0);
    let total = |k: &CounterKey| counters.total(k, 6 * HOUR, 11 * MIN);
    assert_eq!(total(&key("conversion_ok:range:3", "+46700000")), 1.0);
    assert_eq!(total(&key("conversion_all:range:3", "+46700000")), 2.0);
    assert_eq!(total(&key("conversion_all:country", "SE")), 2.0);
    let evidence = book.evidence("low-conversion", "+46700000");
    assert_eq!(evidence.len(), 1);
    assert_eq!(evidence[0].id, "c");
    assert_eq!(evidence[0].number, "+46*******01");
}

#[test]
fn a_block_escalates_on_repeat_up_to_its_cap_and_resets_after_a_quiet_spell() {
    let q = Quarantine::default();
    let spec = spec();
    let lengths: Vec<i64> = (0..6)
        .scan(0_i64, |now, _| {
            let block = q.trip("r", "+22507", *now, &spec, "low".into(), vec![]);
            let until = block.until.unwrap().timestamp_millis();
            // It holds until its end, then lets go.
            assert!(matches!(
                q.check(
                    "r",
                    "+22507",
                    until - 1,
                    &BlockSpec {
                        probe_every: None,
                        ..spec.clone()
                    }
                ),
                BlockCheck::Blocked(_)
            ));
            assert_eq!(q.check("r", "+22507", until, &spec), BlockCheck::Free);
            let length = until - *now;
            *now = until + MIN; // trips again a minute later
            Some(length)
        })
        .collect();
    assert_eq!(
        lengths,
        [HOUR, 2 * HOUR, 4 * HOUR, 8 * HOUR, 8 * HOUR, 8 * HOUR]
    );
    // Quiet for longer than the cap: the next block is a first one again.
    let last_end = q.export().history[0].3.timestamp_millis();
    let block = q.trip(
        "r",
        "+22507",
        last_end + 9 * HOUR,
        &spec,
        "low".into(),
        vec![],
    );
    assert_eq!(block.strikes, 1);
    let (active, changes) = q.stats();
    assert_eq!(active, 1);
    assert_eq!(changes[BlockChange::Blocked as usize], 7);
    assert_eq!(changes[BlockChange::Expired as usize], 6);
}

#[test]
fn a_blocked_key_lets_every_nth_request_through_as_a_probe() {
    let q = Quarantine::default();
    q.trip("r", "+22507", 0, &spec(), "low".into(), vec![]);
    let probes = (1..=100)
        .filter(|i| {
            matches!(
                q.check("r", "+22507", i * 1000, &spec()),
                BlockCheck::Probe(_)
            )
        })
        .count();
    assert_eq!(probes, 10);
    // Other keys and other rules are not affected.
    assert_eq!(q.check("r", "+22508", 1, &spec()), BlockCheck::Free);
    assert_eq!(q.check("other", "+22507", 1, &spec()), BlockCheck::Free);
}

/// A key whose probes keep failing is an attack that comes back: each strike makes its
/// probes rarer (one in 10, then one in 20, one in 30), as each makes its block longer.
#[test]
fn a_key_blocked_again_is_probed_more_rarely() {
    let q = Quarantine::default();
    let probes_of_next_block = |start_ms: i64| {
        // The block before is over: the key trips again.
        assert_eq!(q.check("r", "+22507", start_ms, &spec()), BlockCheck::Free);
        let block = q.trip("r", "+22507", start_ms, &spec(), "low".into(), vec![]);
        let probes = (1..=120)
            .filter(|i| {
                matches!(
                    q.check("r", "+22507", start_ms + i, &spec()),
                    BlockCheck::Probe(_)
                )
            })
            .count();
        let ended = block.until.map_or(0, |u| u.timestamp_millis());
        (block.strikes, probes, ended)
    };
    let (strikes, probes, ended) = probes_of_next_block(0);
    assert_eq!((strikes, probes), (1, 12));
    let (strikes, probes, ended) = probes_of_next_block(ended + 1);
    assert_eq!((strikes, probes), (2, 6));
    let (strikes, probes, _) = probes_of_next_block(ended + 1);
    assert_eq!((strikes, probes), (3, 4));
}

#[test]
fn lifting_ends_a_block_and_its_escalation_and_pinning_makes_it_permanent() {
    let q = Quarantine::default();
    let spec = spec();
    q.trip("r", "+1", 0, &spec, "low".into(), vec![]);
    q.trip("r", "+2", 0, &spec, "low".into(), vec![]);
    q.trip("other", "+2", 0, &spec, "fraud".into(), vec![]);
    assert_eq!(q.lift("+1", MIN).len(), 1);
    assert_eq!(q.check("r", "+1", MIN, &spec), BlockCheck::Free);
    assert_eq!(
        q.trip("r", "+1", 2 * MIN, &spec, "low".into(), vec![])
            .strikes,
        1
    );
    assert_eq!(q.pin("+2", MIN).len(), 2);
    assert!(matches!(
        q.check("r", "+2", 1000 * HOUR, &spec),
        BlockCheck::Blocked(b) | BlockCheck::Probe(b) if b.until.is_none()
    ));
    assert_eq!(q.lift("+nothing", MIN).len(), 0);
}

#[test]
fn a_restored_quarantine_is_the_same_quarantine() {
    let q = Quarantine::default();
    let spec = spec();
    let evidence = vec![Evidence {
        id: "v1".into(),
        number: "+225*******01".into(),
        outcome: "not completed".into(),
    }];
    q.trip("r", "+22507", 0, &spec, "low".into(), evidence);
    q.trip("r", "+22508", 0, &spec, "low".into(), vec![]);
    q.check("r", "+22508", 2 * HOUR, &spec); // expires: history only
    q.pin("+22507", 2 * HOUR);
    let saved = serde_json::to_string(&q.export()).unwrap();

    let restored = Quarantine::default();
    restored.restore(serde_json::from_str(&saved).unwrap(), 3 * HOUR);
    assert_eq!(restored.export(), q.export());
    // The remembered strike escalates the next block of the expired key.
    let next = restored.trip("r", "+22508", 3 * HOUR, &spec, "low".into(), vec![]);
    assert_eq!(next.strikes, 2);
}

#[test]
fn evidence_grows_with_failures_and_shrinks_with_successes() {
    let (on_success, on_failure) = evidence_steps(0.8, 0.2);
    assert!(on_success < 0.0 && on_failure > 0.0);
    assert!((evidence(0.0, 5.0, 0.8, 0.2) - 5.0 * on_failure).abs() < 1e-9);
    assert!(evidence(8.0, 10.0, 0.8, 0.2) < 0.0);
    // Every attempt failing: a handful crosses ln(1e5) = 11.5 against a normal of 0.83.
    let low = balanced_low_rate(0.83, 0.35);
    let (_, fail) = evidence_steps(0.83, low);
    let needed = ((1e5_f64).ln() / fail).ceil();
    assert!((6.0..=8.0).contains(&needed), "{needed} failures");
}

#[test]
fn the_balanced_low_rate_puts_no_drift_at_the_boundary() {
    for (p0, boundary) in [(0.83, 0.35), (0.35, 0.1), (0.6, 0.5), (0.9, 0.2)] {
        let p1 = balanced_low_rate(p0, boundary);
        assert!(p1 > 0.0 && p1 < boundary, "{p0} {boundary}: {p1}");
        let (s, f) = evidence_steps(p0, p1);
        let drift = |p: f64| p * s + (1.0 - p) * f;
        assert!(drift(boundary).abs() < 1e-6);
        assert!(drift(boundary + 0.02) < 0.0);
        assert!(drift(boundary - 0.02) > 0.0);
    }
}

/// A CUSUM at ln(1 / α) on a key converting at its normal rate: false alarms come at
/// most about once per 1 / α outcomes (Lorden). With α = 1e-3 that is checkable here:
/// over 200,000 outcomes, at most a few hundred, far fewer in practice.
#[test]
fn false_alarms_stay_under_the_designed_rate_over_many_looks() {
    let counters = Counters::default();
    let key = CounterKey {
        rule: "r".into(),
        condition: "evidence:range:4".into(),
        value: "+4670123".into(),
    };
    let alpha: f64 = 1e-3;
    let threshold = (1.0 / alpha).ln();
    let (p0, boundary) = (0.8, 0.4);
    let (s, f) = evidence_steps(p0, balanced_low_rate(p0, boundary));
    let mut rng = crate::rng::Rng::seeded(3);
    let (mut alarms, n) = (0u32, 200_000_u32);
    for i in 0..i64::from(n) {
        let step = if rng.unit() < p0 { s } else { f };
        if counters.accumulate(&key, i64::MAX / 4, i, step).unwrap() >= threshold {
            alarms += 1;
            counters
                .accumulate(&key, i64::MAX / 4, i, f64::NEG_INFINITY)
                .unwrap();
        }
    }
    let designed = alpha * f64::from(n);
    assert!(
        f64::from(alarms) <= designed,
        "{alarms} alarms, designed for at most {designed}"
    );
}

#[test]
fn an_establishment_hour_is_a_clock_hour_or_a_sixth_of_a_shorter_window() {
    assert_eq!(establishment_hour_ms(6 * HOUR_MS), HOUR_MS);
    assert_eq!(establishment_hour_ms(24 * HOUR_MS), HOUR_MS);
    assert_eq!(establishment_hour_ms(36 * 60_000), 6 * 60_000);
    assert_eq!(establishment_hour_ms(3), 1);
}

#[test]
fn a_block_holds_ten_to_the_digits_its_keys_add() {
    assert_eq!(keys_in_block("+44791867", "+44791"), Some(1000.0));
    assert_eq!(keys_in_block("+4670123", "+46701"), Some(100.0));
    assert_eq!(keys_in_block("+44791", "+44791"), None);
    assert_eq!(keys_in_block("GB", "+44791"), None);
}

#[test]
fn a_key_stands_out_from_a_spray_by_what_the_spray_gives_the_unluckiest_keys() {
    // A quiet block, or an attack on a few of its 1,000 ranges: one failure is enough.
    assert_eq!(failures_to_stand_out(0.0, 1000.0, SPRAY_CHANCE), 1.0);
    assert_eq!(failures_to_stand_out(5.0, 1000.0, SPRAY_CHANCE), 1.0);
    // Real users' failures here and there.
    assert_eq!(failures_to_stand_out(50.0, 1000.0, SPRAY_CHANCE), 2.0);
    // An attack hidden in the block with random numbers: a third of the ranges failed.
    assert_eq!(failures_to_stand_out(300.0, 1000.0, SPRAY_CHANCE), 3.0);
    assert_eq!(failures_to_stand_out(600.0, 1000.0, SPRAY_CHANCE), 5.0);
    // Every range failed: the estimate is capped, not infinite.
    let all = failures_to_stand_out(1000.0, 1000.0, SPRAY_CHANCE);
    assert!((5.0..64.0).contains(&all), "{all}");
    assert_eq!(failures_to_stand_out(10.0, 0.0, SPRAY_CHANCE), 1.0);
}

proptest::proptest! {
    /// Under an even spray of the measured width, a key reaches the answer with a chance
    /// under `SPRAY_CHANCE` (and one failure fewer would not do), and a wider spray never
    /// asks for fewer.
    #[test]
    fn the_failures_to_stand_out_are_the_spray_s_tail_and_grow_with_its_width(
        failing in 0.0f64..1000.0,
        more in 0.0f64..500.0,
    ) {
        let keys = 1000.0;
        let k = failures_to_stand_out(failing, keys, SPRAY_CHANCE);
        let mean = -(1.0 - (failing / keys).min(0.999)).ln();
        let at_least = |k: f64| {
            let below: f64 = (0..k as u32)
                .map(|i| (-mean).exp() * mean.powi(i as i32) / (1..=i).map(f64::from).product::<f64>())
                .sum();
            1.0 - below
        };
        proptest::prop_assert!(at_least(k) < SPRAY_CHANCE + 1e-12);
        proptest::prop_assert!(k == 1.0 || at_least(k - 1.0) >= SPRAY_CHANCE - 1e-12);
        proptest::prop_assert!(failures_to_stand_out(failing + more, keys, SPRAY_CHANCE) >= k);
    }
}
