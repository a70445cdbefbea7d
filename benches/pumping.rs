//! The pumping scorecard: `verigate simulate` on the shipped sample policy
//! (config/policy.toml) over several seeds, and on the same policy without its adaptive
//! rules, so the difference they make shows.
//!
//! A thin caller of `verigate::simulate` (the generator and the scoring live there, and
//! the `verigate simulate` command runs the same). Knobs (environment): PUMPING_SEEDS
//! (default 7,11,23), PUMPING_LEGIT_PER_MINUTE (peak, default 24).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use verigate::simulate::{self, Knobs};

/// The sample policy without its adaptive rules, in a folder with its lists.
fn static_only(dir: &Path) -> PathBuf {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let text = std::fs::read_to_string(config.join("policy.toml")).unwrap();
    let mut policy: toml::Table = toml::from_str(&text).unwrap();
    let adaptive = ["conversion", "sinch_fraud", "surge"];
    if let Some(toml::Value::Array(rules)) = policy.get_mut("rule") {
        rules.retain(|rule| !adaptive.iter().any(|a| rule.get(a).is_some()));
    }
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    for entry in std::fs::read_dir(config.join("lists")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("lists").join(entry.file_name())).unwrap();
    }
    let path = dir.join("policy.toml");
    std::fs::write(&path, toml::to_string(&policy).unwrap()).unwrap();
    path
}

/// A comma-separated list of numbers from the environment.
fn list<T: std::str::FromStr>(name: &str, default: &str) -> Vec<T> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn main() {
    let seeds: Vec<u64> = list("PUMPING_SEEDS", "7,11,23");
    let warmups: Vec<u32> = list("PUMPING_WARMUP_DAYS", "1,0");
    let peak = std::env::var("PUMPING_LEGIT_PER_MINUTE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24.0);
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    let scratch = tempfile::tempdir().unwrap();
    let without = static_only(scratch.path());
    for (name, policy) in [
        ("sample policy", &sample),
        ("sample policy without its adaptive rules", &without),
    ] {
        for &warmup_days in &warmups {
            for &seed in &seeds {
                let knobs = Knobs {
                    seed,
                    warmup_days,
                    legit_per_minute: peak,
                    ..Knobs::default()
                };
                let started = std::time::Instant::now();
                let card = simulate::run_synthetic(policy, &knobs).unwrap();
                println!(
                    "\n{name}, seed {seed}, warm-up {warmup_days} day(s) ({:.1} s):",
                    started.elapsed().as_secs_f64()
                );
                print!("{card}");
                for miss in card.misses() {
                    println!("  target missed: {miss}");
                }
            }
        }
    }
}
