use super::*;

#[test]
fn the_same_seed_gives_the_same_traffic_and_another_seed_other_traffic() {
    let knobs = Knobs::default();
    let a = synthetic(&knobs, SYNTHETIC_START_MS);
    let b = synthetic(&knobs, SYNTHETIC_START_MS);
    let numbers = |t: &[SimVerification]| -> Vec<String> {
        t.iter()
            .map(|v| v.request.identity.endpoint.clone())
            .collect()
    };
    assert_eq!(numbers(&a), numbers(&b));
    let other = synthetic(&Knobs { seed: 8, ..knobs }, SYNTHETIC_START_MS);
    assert_ne!(numbers(&a), numbers(&other));
}

#[test]
fn every_attack_kind_runs_on_the_attacked_day_only() {
    let knobs = Knobs {
        attacks: AttackKind::ALL.to_vec(),
        ..Knobs::default()
    };
    let traffic = synthetic(&knobs, SYNTHETIC_START_MS);
    let attacked_from = SYNTHETIC_START_MS + DAY_MS;
    for kind in AttackKind::ALL {
        let times: Vec<i64> = traffic
            .iter()
            .filter(|v| v.truth == Truth::Attack(kind))
            .map(|v| v.at_ms)
            .collect();
        assert!(times.len() > 100, "{kind}: {} attempts", times.len());
        let (from, to) = kind.minutes();
        assert!(times
            .iter()
            .all(|t| (attacked_from + from * 60_000..attacked_from + to * 60_000).contains(t)));
    }
    assert!(traffic.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
}

#[test]
fn attacks_over_several_days_run_at_the_same_hours_each_day_and_never_before() {
    let knobs = Knobs {
        warmup_days: 2,
        attack_days: 2,
        attacks: vec![AttackKind::Burst, AttackKind::BusyPrefix],
        ..Knobs::default()
    };
    let traffic = synthetic(&knobs, SYNTHETIC_START_MS);
    for kind in [AttackKind::Burst, AttackKind::BusyPrefix] {
        let (from, to) = kind.minutes();
        let by_day: Vec<usize> = (0..3)
            .map(|day| {
                let start = SYNTHETIC_START_MS + day * DAY_MS;
                traffic
                    .iter()
                    .filter(|v| v.truth == Truth::Attack(kind))
                    .filter(|v| (start..start + DAY_MS).contains(&v.at_ms))
                    .inspect(|v| {
                        let at = start + from * 60_000..start + to * 60_000;
                        assert!(at.contains(&v.at_ms), "{kind} outside its hours");
                    })
                    .count()
            })
            .collect();
        // The first warm-up day is clean; the second and the scored day are attacked alike.
        assert_eq!(by_day[0], 0, "{kind}: {by_day:?}");
        assert!(by_day[1] > 50 && by_day[2] > 50, "{kind}: {by_day:?}");
        let (fewer, more) = (by_day[1].min(by_day[2]), by_day[1].max(by_day[2]));
        assert!(more < fewer * 2, "{kind}: {by_day:?}");
    }
}

#[test]
fn the_low_conversion_country_converts_about_a_third() {
    let traffic = synthetic(&Knobs::default(), SYNTHETIC_START_MS);
    let kenya: Vec<&SimVerification> = traffic
        .iter()
        .filter(|v| matches!(&v.truth, Truth::Legit { country, .. } if country == "KE"))
        .collect();
    let ok = kenya
        .iter()
        .filter(|v| v.result.as_ref().is_some_and(|r| r.0 == "SUCCESSFUL"))
        .count();
    let rate = ok as f64 / kenya.len() as f64;
    assert!((0.30..0.40).contains(&rate), "{rate} of {}", kenya.len());
}

#[test]
fn a_policy_that_allows_everything_blocks_nothing_and_one_that_denies_blocks_all() {
    let dir = tempfile::tempdir().unwrap();
    let knobs = Knobs {
        warmup_days: 0,
        legit_per_minute: 4.0,
        ..Knobs::default()
    };
    for (action, share) in [("allow", 0.0), ("deny", 1.0)] {
        let path = dir.path().join(format!("{action}.toml"));
        std::fs::write(&path, format!("default = \"{action}\"\n")).unwrap();
        let card = run_synthetic(&path, &knobs).unwrap();
        assert_eq!(card.legit.denied_share(), share);
        assert_eq!(card.attacks.cost_share(), share);
        assert_eq!(card.spike.denied_share(), share);
        let missed = card.misses();
        assert!(!missed.is_empty(), "{action}: {missed:?}");
    }
}

#[test]
fn the_conversion_knob_scales_every_countrys_users() {
    let rate = |scale: f64, iso: &str| {
        let knobs = Knobs {
            legit_conversion: scale,
            ..Knobs::default()
        };
        let users: Vec<SimVerification> = synthetic(&knobs, SYNTHETIC_START_MS)
            .into_iter()
            .filter(|v| matches!(&v.truth, Truth::Legit { country, .. } if country == iso))
            .collect();
        let ok = users
            .iter()
            .filter(|v| v.result.as_ref().is_some_and(|r| r.0 == "SUCCESSFUL"))
            .count();
        ok as f64 / users.len() as f64
    };
    assert!((0.80..0.86).contains(&rate(1.0, "SE")));
    assert!((0.38..0.45).contains(&rate(0.5, "SE")));
    assert!((0.14..0.21).contains(&rate(0.5, "KE")));
}

fn attacked_day(kind: AttackKind, seed: u64) -> Vec<SimVerification> {
    let knobs = Knobs {
        seed,
        warmup_days: 0,
        attacks: vec![kind],
        ..Knobs::default()
    };
    synthetic(&knobs, SYNTHETIC_START_MS)
}

/// The sample policy shipped in config/.
fn sample_policy() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml")
}

fn converted(traffic: &[&SimVerification]) -> f64 {
    let ok = traffic
        .iter()
        .filter(|v| v.result.as_ref().is_some_and(|r| r.0 == "SUCCESSFUL"))
        .count();
    ok as f64 / traffic.len() as f64
}

#[test]
fn the_dominant_attack_is_most_of_its_countrys_traffic_and_enters_few_codes() {
    let traffic = attacked_day(AttackKind::Dominant, 3);
    let (from, to) = AttackKind::Dominant.minutes();
    let during = |v: &&SimVerification| {
        (SYNTHETIC_START_MS + from * 60_000..SYNTHETIC_START_MS + to * 60_000).contains(&v.at_ms)
    };
    let ivorian: Vec<&SimVerification> = traffic
        .iter()
        .filter(|v| v.request.identity.endpoint.starts_with("+225"))
        .filter(during)
        .collect();
    let attack: Vec<&SimVerification> = ivorian
        .iter()
        .copied()
        .filter(|v| v.truth == Truth::Attack(AttackKind::Dominant))
        .collect();
    assert!(
        attack.len() * 3 > ivorian.len() * 2,
        "{} of {}",
        attack.len(),
        ivorian.len()
    );
    assert!(attack
        .iter()
        .all(|v| v.request.identity.endpoint.starts_with("+22501")));
    assert!(
        (0.02..0.09).contains(&converted(&attack)),
        "{}",
        converted(&attack)
    );
}

#[test]
fn the_hidden_attack_is_a_large_share_of_the_busiest_block_on_random_numbers() {
    let traffic = attacked_day(AttackKind::Hidden, 5);
    let (from, to) = AttackKind::Hidden.minutes();
    let block: Vec<&SimVerification> = traffic
        .iter()
        .filter(|v| v.request.identity.endpoint.starts_with("+44791"))
        .filter(|v| {
            (SYNTHETIC_START_MS + from * 60_000..SYNTHETIC_START_MS + to * 60_000)
                .contains(&v.at_ms)
        })
        .collect();
    let attack: Vec<&SimVerification> = block
        .iter()
        .copied()
        .filter(|v| v.truth == Truth::Attack(AttackKind::Hidden))
        .collect();
    let share = attack.len() as f64 / block.len() as f64;
    assert!((0.3..0.7).contains(&share), "{share}");
    assert_eq!(converted(&attack), 0.0);
    // Across the whole block: hardly two attempts in one 1,000-number range.
    let ranges: std::collections::HashSet<&str> = attack
        .iter()
        .map(|v| &v.request.identity.endpoint[..10])
        .collect();
    assert!(ranges.len() * 10 > attack.len() * 9, "{}", ranges.len());
}

/// An attacker who read docs/fraud-defence.md: two hours of codes entered in a fresh
/// block to look established, a quiet wait past the window, then six hours of pumping.
#[test]
fn the_groomed_attack_grooms_in_one_sitting_then_pumps() {
    let traffic = attacked_day(AttackKind::Groomed, 7);
    let minute = |v: &&SimVerification| (v.at_ms - SYNTHETIC_START_MS) / 60_000;
    let attack: Vec<&SimVerification> = traffic
        .iter()
        .filter(|v| v.truth == Truth::Attack(AttackKind::Groomed))
        .collect();
    let (groom, rest): (Vec<_>, Vec<_>) = attack.into_iter().partition(|v| minute(v) < 7 * 60);
    assert!((45..80).contains(&groom.len()), "{} groomed", groom.len());
    assert!(groom.iter().all(|v| minute(v) >= 5 * 60));
    assert!(converted(&groom) > 0.65, "{}", converted(&groom));
    assert!(rest.iter().all(|v| (14 * 60..20 * 60).contains(&minute(v))));
    assert!((950..1_200).contains(&rest.len()), "{} pumped", rest.len());
    assert!(converted(&rest) < 0.1, "{}", converted(&rest));
    // Across the block: no 10,000-number range sees many of them.
    let mut ranges: HashMap<&str, usize> = HashMap::new();
    for v in &rest {
        let number = v.request.identity.endpoint.as_str();
        *ranges.entry(&number[..number.len() - 4]).or_default() += 1;
    }
    assert!(ranges.values().all(|&n| n <= 3), "{ranges:?}");
    // The scorecard plays it by default.
    assert!(Knobs::default().attacks.contains(&AttackKind::Groomed));
    assert!(!AttackKind::Groomed.pumps_at(7 * 60 - 1) && AttackKind::Groomed.pumps_at(14 * 60));
}

/// The sample policy against the groomed block: its groom does not establish it (two
/// hours of codes are not a block's users), so the pump is blocked as any fresh
/// block's; with one hour enough it passed untouched.
#[test]
fn the_sample_policy_blocks_a_block_groomed_to_look_established() {
    let policy = sample_policy();
    let knobs = Knobs {
        seed: 3,
        warmup_days: 0,
        attacks: vec![AttackKind::Groomed],
        ..Knobs::default()
    };
    let card = run_synthetic(&policy, &knobs).unwrap();
    let groomed = &card.by_attack[&AttackKind::Groomed];
    assert!(groomed.cost_share() > 0.85, "{card}");
    assert!(
        groomed.first_denied_after_min.is_some_and(|m| m < 15.0),
        "{card}"
    );
}

#[test]
fn the_low_and_slow_attack_is_about_one_a_minute_all_day() {
    let traffic = attacked_day(AttackKind::LowSlow, 7);
    let attack: Vec<&SimVerification> = traffic
        .iter()
        .filter(|v| v.truth == Truth::Attack(AttackKind::LowSlow))
        .collect();
    let (from, to) = AttackKind::LowSlow.minutes();
    let per_minute = attack.len() as f64 / (to - from) as f64;
    assert!((0.85..1.15).contains(&per_minute), "{per_minute}");
    assert!(!AttackKind::LowSlow.is_fast() && AttackKind::Mimicry.is_fast());
    assert_eq!(AttackKind::parse("low-and-slow"), Some(AttackKind::LowSlow));
    assert_eq!(
        serde_json::to_value(AttackKind::LowSlow).unwrap(),
        "low-and-slow"
    );
}

#[test]
fn the_hidden_kind_is_reported_but_not_held_to_the_blocking_targets() {
    let tally = |attempts: u64, denied: u64| Tally {
        attempts,
        denied,
        cost_eur: attempts as f64,
        cost_denied_eur: denied as f64,
        first_denied_after_min: (denied > 0).then_some(1.0),
        ..Tally::default()
    };
    let mut card = Scorecard {
        blockable: tally(100, 95),
        attacks: tally(200, 95),
        legit: tally(1000, 0),
        ..Scorecard::default()
    };
    card.by_attack.insert(AttackKind::Burst, tally(100, 95));
    card.by_attack.insert(AttackKind::Hidden, tally(100, 0));
    assert!(card.misses().is_empty(), "{:?}", card.misses());
    // A blockable kind under its target is a miss.
    card.by_attack.insert(AttackKind::Spread, tally(100, 50));
    let misses = card.misses();
    assert!(
        misses.len() == 1 && misses[0].starts_with("spread"),
        "{misses:?}"
    );
}

#[test]
fn what_a_shadow_rule_would_deny_is_flagged_not_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watch.toml");
    std::fs::write(
        &path,
        "default = \"allow\"\n[[rule]]\nname = \"watch\"\naction = \"deny\"\nmode = \"shadow\"\nprefix = [\"+23769912\"]\n",
    )
    .unwrap();
    let knobs = Knobs {
        warmup_days: 0,
        legit_per_minute: 2.0,
        attacks: vec![AttackKind::Burst, AttackKind::Spread],
        ..Knobs::default()
    };
    let card = run_synthetic(&path, &knobs).unwrap();
    let burst = &card.by_attack[&AttackKind::Burst];
    assert_eq!(burst.denied, 0);
    assert_eq!(burst.flagged, burst.attempts);
    assert_eq!(burst.first_flagged_after_min, Some(0.0));
    let spread = &card.by_attack[&AttackKind::Spread];
    assert_eq!((spread.flagged, spread.first_flagged_after_min), (0, None));
    assert_eq!(card.legit.flagged, 0);
    assert!(card
        .to_string()
        .contains("flagged by a shadow rule after 0 min"));
}

#[test]
fn the_scorecard_names_the_key_a_shadow_rule_first_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("watch.toml");
    std::fs::write(
        &path,
        "default = \"allow\"\n[[rule]]\nname = \"watch-block\"\naction = \"deny\"\nmode = \"shadow\"\n\
         prefix = [\"+23769912\"]\nrate_limit = { key = \"prefix:8\", max = 1, window = \"1h\" }\n",
    )
    .unwrap();
    let knobs = Knobs {
        warmup_days: 0,
        legit_per_minute: 2.0,
        attacks: vec![AttackKind::Burst],
        ..Knobs::default()
    };
    let card = run_synthetic(&path, &knobs).unwrap();
    let burst = &card.by_attack[&AttackKind::Burst];
    assert_eq!(burst.first_flagged_key.as_deref(), Some("+23769912"));
    assert!(card.to_string().contains("(key +23769912)"), "{card}");
}

/// The sample policy against every attack at three times its rate: the `mimicry` attack
/// (one fresh operator block, all of its country's traffic, entering 30 % of its codes)
/// must not become its country's normal and pass under a bar it set itself. Judged
/// against a normal that included its own outcomes, it was blocked 0 % of its cost.
#[test]
fn an_attack_that_is_all_of_its_countrys_traffic_is_not_its_own_normal() {
    let mimicry = mimicry_blocked(&Knobs {
        seed: 1,
        attack_scale: 3.0,
        ..Knobs::default()
    });
    assert!(mimicry > 0.8, "mimicry: {mimicry}");
}

/// The share of `mimicry`'s cost the sample policy blocks on the run of `knobs`.
fn mimicry_blocked(knobs: &Knobs) -> f64 {
    let card = run_synthetic(&sample_policy(), knobs).unwrap();
    card.by_attack[&AttackKind::Mimicry].cost_share()
}

/// The sample policy against `mimicry` on a first day whose first outcomes convert
/// better than its 30 % (44 % of its first 78 on this seed): its block, with no history of
/// its own, is judged by every country's rate (0.77). With the bar at 0.5 of that (0.39)
/// the attack's window hovered around it after each block ended, and 75.6 % of its cost
/// was blocked.
#[test]
fn mimicry_that_draws_well_at_first_is_still_blocked_on_a_first_day() {
    let mimicry = mimicry_blocked(&Knobs {
        seed: 11,
        warmup_days: 0,
        ..Knobs::default()
    });
    assert!(mimicry > 0.85, "mimicry: {mimicry}");
}

/// A business with a quarter of the simulator's traffic, on its first day: it allows its
/// thousandth verification at 10:01 and its two thousandth at 13:09 (seed 1). While
/// every country together had fewer than 2,000 outcomes, keys were only judged under
/// 25 %, and `mimicry` (30 %, from noon) passed: 38.1 % of its cost blocked.
#[test]
fn a_small_business_is_past_its_first_hours_by_noon_of_its_first_day() {
    let mimicry = mimicry_blocked(&Knobs {
        seed: 1,
        warmup_days: 0,
        legit_per_minute: 6.0,
        ..Knobs::default()
    });
    assert!(mimicry > 0.85, "mimicry: {mimicry}");
}

/// The sample policy against attacks that come back at the same hours. The next day,
/// `mimicry` must not be judged against what it taught its country the day before (74.7 %
/// of its cost blocked on this seed when it was). By the third day, an attack that
/// stays in the busy block must not get the whole block quarantined: 3.4 % of real
/// users (22 % of the UK's) were turned away while its keys were judged with their own
/// earlier outcomes and only successes in a calm block made it established.
#[test]
fn the_sample_policy_holds_when_attacks_come_back_for_days() {
    let policy = sample_policy();
    let knobs = |warmup_days, attack_days| Knobs {
        seed: 8,
        warmup_days,
        attack_days,
        ..Knobs::default()
    };
    let mimicry = mimicry_blocked(&knobs(1, 2));
    assert!(mimicry > 0.8, "mimicry: {mimicry}");
    let card = run_synthetic(&policy, &knobs(2, 3)).unwrap();
    assert!(card.legit.denied_share() < 0.003, "{card}");
    let uk = card.legit_by_country["GB"].denied_share();
    assert!(uk < 0.015, "{card}");
}
