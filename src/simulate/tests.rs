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
    let knobs = Knobs::default();
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
