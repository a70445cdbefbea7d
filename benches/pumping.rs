//! A simulated day of verification traffic with SMS-pumping waves, played against
//! verigate over real HTTP with signed callbacks, scored against the ground truth only
//! the simulator knows.
//!
//! `cargo bench --bench pumping` runs the day twice on fresh stores: with the shipped
//! sample policy (config/policy.toml), and with the same policy minus its adaptive rules
//! (`conversion`, `sinch_fraud`). The service runs on a clock the simulator moves one
//! minute at a time, so a day takes about a minute. It prints, per run: the share of
//! attack cost blocked, the share of legitimate verifications blocked, and how long each
//! wave ran before verigate started denying it.
//!
//! Knobs (environment): PUMPING_SEED (default 7), PUMPING_LEGIT_PER_MINUTE (peak, 24).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
};

use chrono::{DateTime, Duration, TimeZone, Utc};
use futures_util::{stream, StreamExt};
use verigate::{
    client::{signed_headers, sinch_timestamp, CONTENT_TYPE},
    clock::Clock,
    config::Settings,
    signature::AppCredentials,
    startup::Application,
};

const APP_KEY: &str = "2E5B0D3A-7C41-4F0E-9B8A-5D6C7E8F9A0B";
const APP_SECRET: &str = "q8LJ3ZfWmK0pN5rT7vX9yA==";
const PATH: &str = "/sinch/verification";
const CONCURRENCY: usize = 16;

/// Where legitimate users are: (calling code + mobile prefix, digits after it, share,
/// price in EUR).
const COUNTRIES: [(&str, u32, f64, f64); 10] = [
    ("+4670", 7, 0.22, 0.045),
    ("+4915", 8, 0.18, 0.075),
    ("+447", 9, 0.16, 0.035),
    ("+336", 8, 0.12, 0.060),
    ("+1415", 7, 0.14, 0.008),
    ("+9198", 8, 0.08, 0.004),
    ("+55119", 8, 0.06, 0.030),
    ("+23480", 8, 0.02, 0.150),
    ("+880171", 7, 0.01, 0.210),
    ("+22507", 8, 0.01, 0.180),
];

/// A wave of attack traffic: (name, start minute, end minute, attempts per minute,
/// numbers it targets at a given minute, price per attempt in EUR).
struct Wave {
    name: &'static str,
    from: i64,
    to: i64,
    per_minute: f64,
    /// The range of numbers for a minute of the wave, as a prefix and free digits.
    target: fn(i64) -> (String, u32),
    price: f64,
}

fn waves() -> Vec<Wave> {
    vec![
        // A burst to one premium 1,000-number range.
        Wave {
            name: "burst to a premium range",
            from: 2 * 60,
            to: 2 * 60 + 20,
            per_minute: 40.0,
            target: |_| ("+23769912".into(), 4),
            price: 0.26,
        },
        // Slow pumping: two a minute for six hours, spread over a million numbers of
        // one operator, so no 1,000- or 10,000-number block sees more than a few.
        Wave {
            name: "slow pumping over a wide range",
            from: 6 * 60,
            to: 12 * 60,
            per_minute: 2.0,
            target: |_| ("+22505".into(), 8),
            price: 0.18,
        },
        // Rotates to a fresh 100,000-number range of the same country every 30 minutes.
        Wave {
            name: "rotating ranges",
            from: 14 * 60,
            to: 18 * 60,
            per_minute: 4.0,
            target: |minute| (format!("+88019{}", (minute / 30) % 10), 7),
            price: 0.21,
        },
    ]
}

/// A legitimate marketing spike: five times the usual traffic to France for an hour.
const SPIKE: (i64, i64, &str) = (19 * 60, 20 * 60, "+336");

#[path = "common/rng.rs"]
mod rng;
use rng::Rng;

/// Who is behind a verification: the ground truth verigate never sees.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Truth {
    Legit,
    Attack(usize),
}

struct Verification {
    id: String,
    number: String,
    method: &'static str,
    price: f64,
    truth: Truth,
    /// The result Sinch sends if verigate allows, and minutes after the request.
    result: (&'static str, Option<&'static str>, i64),
}

#[derive(Default)]
struct Tally {
    attempts: u64,
    denied: u64,
    cost: f64,
    cost_denied: f64,
    /// Minute of the first denial (attack waves).
    first_denied: Option<i64>,
}

struct Simulation {
    rng: Rng,
    legit_peak: f64,
    next_id: u64,
}

impl Simulation {
    fn legit_rate(&self, minute: i64) -> f64 {
        // Quiet at night, busiest in the early evening (UTC, for a European business).
        let hour = minute as f64 / 60.0;
        let daylight = (-(((hour - 17.0) / 5.0).powi(2))).exp();
        self.legit_peak * (0.15 + 0.85 * daylight)
    }

    fn legit(&mut self, country: usize) -> Verification {
        let (prefix, digits, _, price) = COUNTRIES[country];
        let roll = self.rng.unit();
        // Most enter the code within a couple of minutes; some never do.
        let result = if roll < 0.80 {
            ("SUCCESSFUL", None, 1 + (self.rng.next() % 2) as i64)
        } else if roll < 0.83 {
            ("SUCCESSFUL", None, 4 + (self.rng.next() % 4) as i64)
        } else {
            ("FAIL", Some("Expired"), 10)
        };
        let number = format!("{prefix}{}", self.rng.digits(digits as usize));
        self.verification(number, price, Truth::Legit, result)
    }

    fn attack(&mut self, minute: i64, wave: usize, w: &Wave) -> Verification {
        let (prefix, digits) = (w.target)(minute);
        // Nobody enters these codes; now and then Sinch flags one itself.
        let result = if self.rng.unit() < 0.05 {
            ("DENIED", Some("Fraud"), 1)
        } else {
            ("FAIL", Some("Expired"), 10)
        };
        let number = format!("{prefix}{}", self.rng.digits(digits as usize));
        self.verification(number, w.price, Truth::Attack(wave), result)
    }

    fn verification(
        &mut self,
        number: String,
        price: f64,
        truth: Truth,
        result: (&'static str, Option<&'static str>, i64),
    ) -> Verification {
        self.next_id += 1;
        Verification {
            id: format!("sim-{:07}", self.next_id),
            number,
            method: if self.rng.unit() < 0.9 {
                "sms"
            } else {
                "flashcall"
            },
            price,
            truth,
            result,
        }
    }

    /// Everything that starts in `minute`.
    fn minute(&mut self, minute: i64, waves: &[Wave]) -> Vec<Verification> {
        let mut out = Vec::new();
        for _ in 0..self.rng.count(self.legit_rate(minute)) {
            let pick = self.rng.unit();
            let mut acc = 0.0;
            let country = COUNTRIES
                .iter()
                .position(|c| {
                    acc += c.2;
                    pick < acc
                })
                .unwrap_or(0);
            out.push(self.legit(country));
        }
        if (SPIKE.0..SPIKE.1).contains(&minute) {
            let france = COUNTRIES.iter().position(|c| c.0 == SPIKE.2).unwrap();
            let extra = self.legit_rate(minute) * COUNTRIES[france].2 * 4.0;
            for _ in 0..self.rng.count(extra) {
                out.push(self.legit(france));
            }
        }
        for (i, w) in waves.iter().enumerate() {
            if (w.from..w.to).contains(&minute) {
                for _ in 0..self.rng.count(w.per_minute) {
                    out.push(self.attack(minute, i, w));
                }
            }
        }
        out
    }
}

fn request_body(v: &Verification) -> String {
    serde_json::json!({
        "id": v.id,
        "event": "VerificationRequestEvent",
        "method": v.method,
        "identity": { "type": "number", "endpoint": v.number },
        "price": { "amount": v.price, "currencyId": "EUR" },
        "reference": format!("signup-{}", v.id),
    })
    .to_string()
}

fn result_body(id: &str, number: &str, status: &str, reason: Option<&str>) -> String {
    let mut body = serde_json::json!({
        "id": id,
        "event": "VerificationResultEvent",
        "method": "sms",
        "identity": { "type": "number", "endpoint": number },
        "status": status,
        "source": "manual",
    });
    if let Some(reason) = reason {
        body["reason"] = reason.into();
    }
    body.to_string()
}

struct Service {
    base: String,
    clock_ms: Arc<AtomicI64>,
    handle: actix_web::dev::ServerHandle,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start(dir: &Path, policy: &Path, day: DateTime<Utc>) -> Service {
    let env: Vec<(String, String)> = [
        ("VERIGATE__SERVER__LISTEN", "127.0.0.1:0".to_string()),
        (
            "VERIGATE__STORE__PATH",
            dir.join("db").display().to_string(),
        ),
        ("VERIGATE__STORE__RETENTION", "0".to_string()),
        ("VERIGATE__POLICY__PATH", policy.display().to_string()),
        ("VERIGATE_APP_KEY", APP_KEY.to_string()),
        ("VERIGATE_APP_SECRET", APP_SECRET.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let settings = Settings::load_from(None, env.into_iter().collect()).unwrap();
    let clock_ms = Arc::new(AtomicI64::new(day.timestamp_millis()));
    let reading = Arc::clone(&clock_ms);
    let clock = Clock::from_fn(move || {
        Utc.timestamp_millis_opt(reading.load(Ordering::SeqCst))
            .single()
            .unwrap()
    });
    let app = Application::build(&settings, clock).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let running = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Service {
        base,
        clock_ms,
        handle,
        running,
    }
}

/// A result Sinch will send: (id, number, status, reason).
type DueResult = (String, String, &'static str, Option<&'static str>);

/// Plays the day; returns the tallies of legitimate traffic and of each wave.
async fn play(policy: &Path, seed: u64, legit_peak: f64) -> (Tally, Vec<Tally>) {
    let dir = tempfile::tempdir().unwrap();
    let day = Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap();
    let service = start(dir.path(), policy, day).await;
    let signer = Arc::new(AppCredentials::new(APP_KEY, APP_SECRET, false).unwrap());
    let client = reqwest::Client::new();
    let url = format!("{}{PATH}", service.base);
    let waves = waves();
    let mut sim = Simulation {
        rng: Rng(seed.max(1)),
        legit_peak,
        next_id: 0,
    };
    let mut legit = Tally::default();
    let mut attacks: Vec<Tally> = waves.iter().map(|_| Tally::default()).collect();
    let mut due: BTreeMap<i64, Vec<DueResult>> = BTreeMap::new();

    for minute in 0..24 * 60 + 15 {
        let now = day + Duration::minutes(minute);
        service
            .clock_ms
            .store(now.timestamp_millis(), Ordering::SeqCst);
        let timestamp = sinch_timestamp(now);
        let post = |body: String| {
            let (client, signer, url, timestamp) = (
                client.clone(),
                Arc::clone(&signer),
                url.clone(),
                timestamp.clone(),
            );
            async move {
                let mut request = client.post(&url);
                for (name, value) in
                    signed_headers(&signer, PATH, body.as_bytes(), CONTENT_TYPE, &timestamp)
                {
                    request = request.header(name, value);
                }
                let reply = request.body(body).send().await.unwrap();
                assert_eq!(reply.status(), 200);
                reply.text().await.unwrap()
            }
        };
        // Results first: they arrive as the minute begins.
        let results = due.remove(&minute).unwrap_or_default();
        stream::iter(results)
            .map(|(id, number, status, reason)| post(result_body(&id, &number, status, reason)))
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        let verifications = if minute < 24 * 60 {
            sim.minute(minute, &waves)
        } else {
            Vec::new()
        };
        let answers: Vec<String> = stream::iter(verifications.iter())
            .map(|v| post(request_body(v)))
            .buffered(CONCURRENCY)
            .collect()
            .await;
        for (v, answer) in verifications.iter().zip(answers) {
            let denied = answer.contains("\"deny\"");
            let tally = match v.truth {
                Truth::Legit => &mut legit,
                Truth::Attack(w) => &mut attacks[w],
            };
            tally.attempts += 1;
            tally.cost += v.price;
            if denied {
                tally.denied += 1;
                tally.cost_denied += v.price;
                tally.first_denied.get_or_insert(minute);
            } else {
                let (status, reason, after) = v.result;
                due.entry(minute + after).or_default().push((
                    v.id.clone(),
                    v.number.clone(),
                    status,
                    reason,
                ));
            }
        }
    }
    service.handle.stop(true).await;
    service.running.await.unwrap().unwrap();
    (legit, attacks)
}

/// The sample policy without its adaptive rules, in a folder with its lists.
fn static_only(dir: &Path) -> std::path::PathBuf {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let text = std::fs::read_to_string(config.join("policy.toml")).unwrap();
    let kept: Vec<&str> = text
        .split("[[rule]]")
        .filter(|rule| {
            !rule.contains("conversion")
                && !rule.contains("sinch_fraud ")
                && !rule.contains("sinch_fraud=")
        })
        .collect();
    std::fs::create_dir_all(dir.join("lists")).unwrap();
    for entry in std::fs::read_dir(config.join("lists")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("lists").join(entry.file_name())).unwrap();
    }
    let path = dir.join("policy.toml");
    std::fs::write(&path, kept.join("[[rule]]")).unwrap();
    path
}

fn scorecard(name: &str, legit: &Tally, attacks: &[Tally]) {
    let waves = waves();
    let cost: f64 = attacks.iter().map(|a| a.cost).sum();
    let blocked: f64 = attacks.iter().map(|a| a.cost_denied).sum();
    println!("\n{name}");
    println!(
        "  attack cost blocked:           {:>6.1} %  ({:.2} of {:.2} EUR, {} attempts)",
        100.0 * blocked / cost,
        blocked,
        cost,
        attacks.iter().map(|a| a.attempts).sum::<u64>()
    );
    println!(
        "  legitimate verifications blocked: {:>5.2} %  ({} of {})",
        100.0 * legit.denied as f64 / legit.attempts as f64,
        legit.denied,
        legit.attempts
    );
    for (wave, tally) in waves.iter().zip(attacks) {
        let detect = tally
            .first_denied
            .map_or_else(|| "never".to_owned(), |m| format!("{} min", m - wave.from));
        println!(
            "  {:<32} {:>5.1} % of its cost blocked, first denial after {detect}",
            wave.name,
            100.0 * tally.cost_denied / tally.cost
        );
    }
}

fn main() {
    let seed = std::env::var("PUMPING_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let peak = std::env::var("PUMPING_LEGIT_PER_MINUTE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/policy.toml");
    let scratch = tempfile::tempdir().unwrap();
    let without = static_only(scratch.path());
    println!("pumping: a simulated day, seed {seed}, legitimate peak {peak}/minute");
    let started = std::time::Instant::now();
    let (legit, attacks) = runtime.block_on(play(&sample, seed, peak));
    scorecard(
        "sample policy (static and adaptive rules)",
        &legit,
        &attacks,
    );
    let (legit, attacks) = runtime.block_on(play(&without, seed, peak));
    scorecard("sample policy without its adaptive rules", &legit, &attacks);
    println!("\n({:.0} s)", started.elapsed().as_secs_f64());
}
