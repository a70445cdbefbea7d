//! `verigate simulate`, as an operator runs it: the synthetic day against the sample
//! policy, its JSON, refusing what it cannot do, and replaying the store's own traffic
//! with attacks mixed in.

use serde_json::Value;

use crate::helpers::*;
use crate::policy::cli;

fn sample() -> String {
    format!("{}/config/policy.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_sample_policy_blocks_the_attacks_of_a_simulated_day_and_spares_real_users() {
    let (ok, out) = cli(&["simulate", &sample(), "--seeds", "7", "--json"], &[]);
    assert!(ok, "{out}");
    let runs: Value = serde_json::from_str(&out).unwrap();
    let card = &runs[0]["scorecard"];
    assert_eq!(runs[0]["seed"], 7);
    let kinds = card["by_attack"].as_object().unwrap();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
    let share =
        |t: &Value| t["cost_denied_eur"].as_f64().unwrap() / t["cost_eur"].as_f64().unwrap();
    assert!(share(&card["attacks"]) >= 0.9, "{}", card["attacks"]);
    for (kind, tally) in kinds {
        assert!(share(tally) >= 0.75, "{kind}: {tally}");
    }
    let legit = &card["legit"];
    let denied = legit["denied"].as_f64().unwrap() / legit["attempts"].as_f64().unwrap();
    assert!(denied <= 0.005, "{legit}");
    assert_eq!(card["spike"]["denied"], 0);
    assert!(runs[0]["missed_targets"].is_array());
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
