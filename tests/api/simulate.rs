//! `verigate simulate`, as an operator runs it: the synthetic day against the sample
//! policy, its JSON, refusing what it cannot do, and replaying the store's own traffic
//! with attacks mixed in.

use serde_json::Value;

use crate::helpers::*;
use crate::policy::cli;

fn sample() -> String {
    format!("{}/config/policy.toml", env!("CARGO_MANIFEST_DIR"))
}

/// `verigate simulate` of the sample policy with these seeds and warm-ups: its runs.
fn simulate_sample(seeds: &str, warmup_days: &str) -> Vec<Value> {
    let policy = sample();
    simulate_json(&policy, &["--seeds", seeds, "--warmup-days", warmup_days])
}

/// `verigate simulate POLICY ARGS --json`, which must succeed: its runs.
fn simulate_json(policy: &str, args: &[&str]) -> Vec<Value> {
    let args: Vec<&str> = ["simulate", policy]
        .into_iter()
        .chain(args.iter().copied())
        .chain(["--json"])
        .collect();
    let (ok, out) = cli(&args, &[]);
    assert!(ok, "{out}");
    let runs: Value = serde_json::from_str(&out).unwrap();
    runs.as_array().unwrap().clone()
}

#[test]
fn the_sample_policy_blocks_the_attacks_of_a_simulated_day_and_spares_real_users() {
    let runs = simulate_sample("7", "1,0");
    assert_eq!(runs.len(), 2);
    let share =
        |t: &Value| t["cost_denied_eur"].as_f64().unwrap() / t["cost_eur"].as_f64().unwrap();
    for (run, warmup) in runs.iter().zip([1, 0]) {
        assert_eq!(
            (run["seed"].as_u64(), run["warmup_days"].as_u64()),
            (Some(7), Some(warmup))
        );
        let card = &run["scorecard"];
        let kinds = card["by_attack"].as_object().unwrap();
        assert_eq!(kinds.len(), 10, "{kinds:?}");
        // Where the sample policy stands (docs/fraud-defence.md has every seed): 90 % of
        // the attack cost blocked and 85 % of every kind but the hidden one and
        // `busy-prefix` (83-88 % over the scorecard's seeds: its ranges must stand out
        // of the hidden attack's spray over the same block before they meet the pool's
        // bar), the spike never, returning users never, and the hidden kind scored apart.
        assert!(share(&card["blockable"]) >= 0.90, "{}", card["blockable"]);
        for kind in [
            "burst",
            "slow-wide",
            "rotating",
            "spread",
            "mimicry",
            "dominant",
            "low-and-slow",
            "groomed",
        ] {
            assert!(share(&kinds[kind]) >= 0.85, "{kind}: {}", kinds[kind]);
        }
        let busy = &kinds["busy-prefix"];
        assert!(share(busy) >= 0.80, "busy-prefix: {busy}");
        assert!(share(&kinds["hidden"]) < 0.5, "{}", kinds["hidden"]);
        assert_eq!(card["spike"]["denied"], 0);
        let returning = &card["returning"];
        assert!(returning["attempts"].as_u64() > Some(1_000), "{returning}");
        assert_eq!(returning["denied"], 0, "{returning}");
        assert!(run["missed_targets"].is_array());
    }
    // Real users are spared on both days, the UK's too although two attacks share its
    // busiest block with them (with `pooled_false_alarm = 0.2` this seed turned away
    // 0.43 and 0.32 % of real users, 2.8 and 2.1 % of the UK's).
    let denied = |t: &Value| t["denied"].as_f64().unwrap() / t["attempts"].as_f64().unwrap();
    for run in &runs {
        let card = &run["scorecard"];
        assert!(denied(&card["legit"]) <= 0.003, "{}", card["legit"]);
        let uk = &card["legit_by_country"]["GB"];
        assert!(denied(uk) <= 0.01, "{uk}");
    }
}

/// On a first day the honest country whose users rarely enter the code (Kenya, 35 %)
/// has too little history for a normal of its own: its blocks are judged by its other
/// blocks' outcomes, not by every country's rate (these two seeds once turned away 12
/// and 23 % of its users).
#[test]
fn an_attack_sprayed_over_the_busiest_block_at_three_times_its_users_spares_them() {
    // Random numbers over the whole busy UK block at three times its real users: every
    // range of the block fails a little. Judged at the pool's bar on two failures each
    // (before ranges had to stand out of the spray), 2.7 % of the UK's real users were
    // turned away on this seed's first day while 6 % of the attack was blocked; 0.5 %
    // since.
    let policy = sample();
    let runs = simulate_json(
        &policy,
        &[
            "--seeds",
            "3",
            "--warmup-days",
            "0",
            "--attacks",
            "hidden",
            "--attack-scale",
            "3",
        ],
    );
    let card = &runs[0]["scorecard"];
    let uk = &card["legit_by_country"]["GB"];
    let denied = uk["denied"].as_f64().unwrap() / uk["attempts"].as_f64().unwrap();
    assert!(denied <= 0.01, "{uk}");
    // Still surfaced for an operator within minutes.
    let hidden = &card["by_attack"]["hidden"];
    assert!(
        hidden["first_flagged_after_min"].as_f64() < Some(30.0),
        "{hidden}"
    );
}

#[test]
fn a_first_day_does_not_turn_away_an_honest_country_that_converts_poorly() {
    for run in simulate_sample("3,8", "0") {
        let kenya = &run["scorecard"]["legit_by_country"]["KE"];
        let denied = kenya["denied"].as_f64().unwrap() / kenya["attempts"].as_f64().unwrap();
        assert!(denied <= 0.01, "seed {}: {kenya}", run["seed"]);
    }
}

/// Every duration of the sample policy and of the day ten times shorter (a 6h window
/// lasts 36 minutes, a day 2.4 hours): what the policy does must follow its own
/// durations, not the clock. Counting a busy block's clean successes by clock hours,
/// this seed's first day quarantined the UK's busiest block (27.7 % of the UK's users
/// turned away, 4.41 % of all) for want of a fourth clock hour in 2.4 hours.
#[test]
fn the_sample_policy_holds_when_every_duration_runs_ten_times_faster() {
    let runs = simulate_json(
        &sample(),
        &["--seeds", "1", "--warmup-days", "0", "--time-scale", "0.1"],
    );
    assert_eq!(runs.len(), 1);
    let run = &runs[0];
    assert_eq!(run["time_scale"].as_f64(), Some(0.1), "{run}");
    let card = &run["scorecard"];
    let denied = |t: &Value| t["denied"].as_f64().unwrap() / t["attempts"].as_f64().unwrap();
    assert!(denied(&card["legit"]) <= 0.003, "{}", card["legit"]);
    for (country, tally) in card["legit_by_country"].as_object().unwrap() {
        assert!(denied(tally) <= 0.01, "{country}: {tally}");
    }
    let blocked =
        |t: &Value| t["cost_denied_eur"].as_f64().unwrap() / t["cost_eur"].as_f64().unwrap();
    assert!(blocked(&card["blockable"]) >= 0.90, "{}", card["blockable"]);
    // Minutes are the simulated day's: the hidden attack surfaces as it does at 1.
    let hidden = &card["by_attack"]["hidden"];
    assert!(
        hidden["first_flagged_after_min"]
            .as_f64()
            .is_some_and(|m| m <= 30.0),
        "{hidden}"
    );

    let (ok, out) = cli(&["simulate", &sample(), "--time-scale", "0"], &[]);
    assert!(!ok && out.contains("--time-scale: above zero"), "{out}");
}

#[test]
fn a_policy_that_blocks_nothing_misses_its_targets_and_check_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let allow_all = dir.path().join("allow.toml");
    std::fs::write(&allow_all, "default = \"allow\"\n").unwrap();
    let path = allow_all.to_str().unwrap();
    let (ok, out) = cli(
        &[
            "simulate",
            path,
            "--attacks",
            "burst,spread",
            "--warmup-days",
            "0",
            "--check",
        ],
        &[],
    );
    assert!(!ok, "{out}");
    assert!(out.contains("burst") && out.contains("spread"), "{out}");
    assert!(
        out.contains("target missed: attack cost blocked 0.0 %"),
        "{out}"
    );
    assert!(!out.contains("mimicry"), "{out}");

    let (ok, out) = cli(&["simulate", path, "--attacks", "sideways"], &[]);
    assert!(
        !ok && out.contains("`sideways` is not an attack kind"),
        "{out}"
    );
}

#[test]
fn attacks_run_for_as_many_days_as_asked_and_no_more_than_the_run_has() {
    let dir = tempfile::tempdir().unwrap();
    let deny_burst = dir.path().join("deny.toml");
    // A rule that learns nothing: the scored day's burst is denied whole either way.
    std::fs::write(
        &deny_burst,
        "default = \"allow\"\n[[rule]]\nname = \"burst-range\"\naction = \"deny\"\nprefix = [\"+23769912\"]\n",
    )
    .unwrap();
    let path = deny_burst.to_str().unwrap();
    let run = |days: &str| {
        let args = [
            "--attacks",
            "burst",
            "--warmup-days",
            "1",
            "--attack-days",
            days,
        ];
        simulate_json(path, &args)[0].clone()
    };
    let (one, two) = (run("1"), run("2"));
    assert_eq!(
        (one["attack_days"].as_u64(), two["attack_days"].as_u64()),
        (Some(1), Some(2))
    );
    for run in [&one, &two] {
        let burst = &run["scorecard"]["by_attack"]["burst"];
        assert!(burst["attempts"].as_u64() > Some(100), "{burst}");
        assert_eq!(burst["denied"], burst["attempts"]);
    }

    let (ok, out) = cli(
        &[
            "simulate",
            path,
            "--warmup-days",
            "1,0",
            "--attack-days",
            "2",
        ],
        &[],
    );
    assert!(
        !ok && out.contains("--attack-days 2: a run with --warmup-days 0 has 1 day(s) to attack"),
        "{out}"
    );
    let (ok, out) = cli(&["simulate", path, "--attack-days", "0"], &[]);
    assert!(!ok && out.contains("--attack-days: at least 1"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_own_traffic_is_replayed_with_attacks_mixed_in() {
    let app = spawn_app().await;
    for (i, status) in ["SUCCESSFUL", "SUCCESSFUL", "FAIL", "SUCCESSFUL"]
        .iter()
        .enumerate()
    {
        let id = format!("mine-{i}");
        app.post_callback(&request_event(&id, "sms", &format!("+4670123450{i}")))
            .await;
        app.post_callback(&result_event(&id, status)).await;
    }
    let (settings, _dir, _) = app.stop().await;
    let store = settings.store.path.display().to_string();
    let (ok, out) = tokio::task::block_in_place(|| {
        cli(
            &[
                "simulate",
                &sample(),
                "--replay-store",
                "1h",
                "--attacks",
                "burst",
                "--json",
            ],
            &[("VERIGATE__STORE__PATH", &store)],
        )
    });
    assert!(ok, "{out}");
    let runs: Value = serde_json::from_str(&out).unwrap();
    let card = &runs[0]["scorecard"];
    // The four stored verifications are the legitimate traffic, all in Sweden.
    assert_eq!(card["legit"]["attempts"], 4, "{card}");
    assert_eq!(card["legit"]["denied"], 0, "{card}");
    assert_eq!(card["legit_by_country"]["SE"]["attempts"], 4, "{card}");
    assert!(
        card["by_attack"]["burst"]["attempts"].as_u64().unwrap() > 700,
        "{card}"
    );

    // A period the store has nothing of is refused with the reason.
    let (ok, out) = tokio::task::block_in_place(|| {
        cli(
            &[
                "simulate",
                &sample(),
                "--replay-store",
                "2099-01-01T00:00:00Z",
            ],
            &[("VERIGATE__STORE__PATH", &store)],
        )
    });
    assert!(!ok && out.contains("no replayable verifications"), "{out}");
}
