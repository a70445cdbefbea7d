//! The command line: `serve` (default), `sign`, `trigger`, `policy`, `export`, `store`,
//! `healthcheck`.

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::{
    client::{self, Sample, SampleKind},
    clock::Clock,
    config::Settings,
    policy::{tools, RulesPolicy},
    routes::analytics::{export_stream, ExportFormat},
    signature::AppCredentials,
    simulate::{self, AttackKind, Knobs},
    startup::Application,
    store::{self, Store, StoreError, Unobserved, VerificationQuery},
};

/// Receives Sinch Verification callbacks: authenticates, decides allow/deny, records.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// Settings file layered over the built-in defaults (see config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the callback receiver (the default).
    Serve,
    /// Print the headers Sinch would send with a body, signed with a configured app.
    Sign(SignArgs),
    /// Sign and send a realistic sample callback, as Sinch would.
    Trigger(TriggerArgs),
    /// Check, test and replay policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Write stored verifications to standard output (or a file) while the service is
    /// stopped; a running service serves the same through GET /v1/export.
    Export(ExportArgs),
    /// Maintain the store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Play a synthetic day of verifications with SMS-pumping attacks of every kind the
    /// scorecard holds against a policy, in compressed time, and print how much it
    /// blocked of each and how many real users it turned away (docs/fraud-defence.md).
    Simulate(SimulateArgs),
    /// Print the OpenAPI 3.1 document of the /v1 API (what GET /v1/openapi.json serves).
    Openapi,
    /// Exit 0 if verigate answers ready, 1 otherwise (container health checks).
    Healthcheck {
        /// Default: /readyz on this configuration's listen address.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct SignArgs {
    /// The body, exactly as it will be sent ("-" reads standard input).
    #[arg(default_value = "-")]
    pub body: PathBuf,
    /// App key to sign with (default: the first configured app).
    #[arg(long)]
    pub key: Option<String>,
    /// The path to sign (default: the configured signed callback path).
    #[arg(long)]
    pub path: Option<String>,
    #[arg(long, default_value = client::CONTENT_TYPE)]
    pub content_type: String,
    /// x-timestamp to sign (default: now).
    #[arg(long)]
    pub timestamp: Option<String>,
    /// Print a complete curl command posting to this URL instead of header lines.
    #[arg(long, value_name = "URL")]
    pub curl: Option<String>,
}

#[derive(clap::Args)]
pub struct TriggerArgs {
    #[arg(value_enum)]
    pub kind: SampleKind,
    #[arg(long, default_value = "+46700000001")]
    pub number: String,
    /// sms, flashcall, callout, whatsapp, seamless.
    #[arg(long, default_value = "sms")]
    pub method: String,
    /// Result events: SUCCESSFUL, FAIL, DENIED, ABORTED, ERROR, PENDING.
    #[arg(long, default_value = "SUCCESSFUL")]
    pub status: String,
    /// Verification id (default: a new one; reuse one to join events).
    #[arg(long)]
    pub id: Option<String>,
    /// Where to send it (default: this configuration's listen address and callback path).
    #[arg(long)]
    pub url: Option<String>,
    /// App key to sign with (default: the first configured app).
    #[arg(long)]
    pub key: Option<String>,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// Start of the range: an RFC 3339 time, or a duration back from now ("7d").
    #[arg(long)]
    pub since: String,
    /// End of the range (exclusive), same forms; default: now.
    #[arg(long)]
    pub until: Option<String>,
    #[arg(long, value_enum, default_value = "ndjson")]
    pub format: ExportFormatArg,
    /// Write here instead of standard output.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct SimulateArgs {
    /// The policy file; default: the configured one.
    pub policy: Option<PathBuf>,
    /// Seeds of the generator, comma-separated: one run each.
    #[arg(long, value_delimiter = ',', default_value = "7")]
    pub seeds: Vec<u64>,
    /// Legitimate verifications a minute at the evening peak.
    #[arg(long, default_value_t = 24.0)]
    pub legit_per_minute: f64,
    /// Multiplies every country's conversion of legitimate users (0.6: a business
    /// whose users enter the code half the time).
    #[arg(long, default_value_t = 1.0)]
    pub legit_conversion: f64,
    /// Days of legitimate traffic before the attacked day (learned from, not scored),
    /// comma-separated: one run each. 0 is a new deployment's first day.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub warmup_days: Vec<u32>,
    /// Days the attacks run, at the same hours each day: the scored day and the warm-up
    /// days just before it (at most one more than the warm-up). 1: the scored day alone.
    #[arg(long, default_value_t = 1)]
    pub attack_days: u32,
    /// Attack kinds, comma-separated (burst, slow-wide, rotating, busy-prefix,
    /// spread, mimicry, dominant, hidden, low-and-slow, groomed), all, or none;
    /// default: all.
    #[arg(long, value_delimiter = ',')]
    pub attacks: Option<Vec<String>>,
    /// Multiplies every attack's rate.
    #[arg(long, default_value_t = 1.0)]
    pub attack_scale: f64,
    /// Leave out the marketing spike (five times the French traffic for an hour).
    #[arg(long)]
    pub no_spike: bool,
    /// Multiplies every duration, the policy's and the traffic's timeline, comma-separated:
    /// one run each (0.1: a day passes in 2.4 hours and a 1h window lasts 6 minutes).
    /// A defence that holds at 1 and not at 0.1 depends on the clock, not on the
    /// policy's own durations.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub time_scale: Vec<f64>,
    /// Instead of synthetic users, replay the store's own verifications since this
    /// time ("7d" or RFC 3339), with the attacks mixed into their last day. The
    /// service must be stopped.
    #[arg(long, value_name = "SINCE")]
    pub replay_store: Option<String>,
    /// Print the scorecards as JSON.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 when a scorecard misses a target.
    #[arg(long)]
    pub check: bool,
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy, summarise it, and warn about rules that can never match.
    Check { file: PathBuf },
    /// Run table-driven cases (a TOML file of [[case]]s) against a policy; exit 1 on a failure.
    Test { file: PathBuf, cases: PathBuf },
    /// Print the policy file's JSON Schema (config/policy.schema.json), for editors that
    /// complete and check TOML against it.
    Schema,
    /// List the rule conditions: when each holds, an example, and the `policy test`
    /// case fields that feed it.
    Conditions,
    /// Evaluate a candidate policy against stored request events and report what would
    /// change, with each verification's real outcome.
    Replay {
        file: PathBuf,
        /// How far back: a duration ("7d") or an RFC 3339 time.
        #[arg(long)]
        since: String,
        /// A running verigate to read from (GET /v1/export); default: open the store
        /// directly (the service must be stopped).
        #[arg(long)]
        url: Option<String>,
        /// API token for --url.
        #[arg(long, env = "VERIGATE_API_TOKEN")]
        token: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Convert a store written by an earlier verigate to the current layout, in place.
    /// Stop verigate first. Safe to interrupt and run again: it resumes, and the old files
    /// are deleted only once the new store is complete.
    Migrate,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormatArg {
    Ndjson,
    Csv,
}

pub async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Policy(command) => run_policy(command, &settings).await,
        Command::Export(args) => export(&settings, args).await,
        Command::Store(StoreCommand::Migrate) => migrate(&settings).await,
        Command::Serve => serve(&settings).await,
        Command::Sign(args) => sign(&settings, args),
        Command::Trigger(args) => trigger(&settings, args).await,
        Command::Simulate(args) => simulate(&settings, args).await,
        Command::Healthcheck { url } => healthcheck(&settings, url).await,
        Command::Openapi => {
            print!(
                "{}",
                crate::routes::openapi::pretty(&crate::routes::openapi::document())
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `export`: writes the stored verifications in a range, read from the store offline.
async fn export(settings: &Settings, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let ExportArgs {
        since,
        until,
        format,
        output,
    } = args;
    let now = chrono::Utc::now();
    let since = time_arg("--since", &since, now)?;
    let until = until
        .map(|u| time_arg("--until", &u, now))
        .transpose()?
        .unwrap_or(now);
    let format = match format {
        ExportFormatArg::Ndjson => ExportFormat::Ndjson,
        ExportFormatArg::Csv => ExportFormat::Csv,
    };
    let store = open_offline(settings, "use GET /v1/export").await?;
    let mut out: Box<dyn Write> = match &output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut bytes = 0;
    let mut chunks = std::pin::pin!(export_stream(store.clone(), since, until, format));
    while let Some(chunk) = futures_util::StreamExt::next(&mut chunks).await {
        let chunk = chunk?;
        bytes += chunk.len();
        out.write_all(&chunk)?;
    }
    out.flush()?;
    store.shutdown().await?;
    eprintln!("exported {bytes} bytes of verifications first seen in [{since}, {until})");
    Ok(ExitCode::SUCCESS)
}

/// `store migrate`: brings the store's schema or layout up to date.
async fn migrate(settings: &Settings) -> anyhow::Result<ExitCode> {
    let options = settings.store_options();
    if let Some(pg) = &options.postgres {
        let applied = store::postgres::PostgresStore::migrate(pg).await?;
        eprintln!(
            "{}: {}",
            options.location(),
            if applied.is_empty() {
                format!(
                    "schema already at version {}, nothing to do",
                    store::postgres::schema_version()
                )
            } else {
                format!("applied schema migrations {applied:?}")
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    let path = options.path.clone();
    let report = tokio::task::spawn_blocking(move || {
        store::sled::legacy::migrate(&options.path, options.cache_bytes, |line| {
            eprintln!("verigate store migrate: {line}");
        })
    })
    .await??;
    if report.already_current {
        eprintln!(
            "{}: already in the current layout, nothing to do",
            path.display()
        );
    } else {
        eprintln!(
            "{}: migrated {} verifications, {} raw events and {} saved states",
            path.display(),
            report.verifications,
            report.events,
            report.states
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `serve`: runs the receiver until stopped.
async fn serve(settings: &Settings) -> anyhow::Result<ExitCode> {
    let app = Application::build(settings, Clock::system())?;
    tracing::info!(port = app.port(), path = %settings.server.callback_path, "verigate listening");
    app.run_until_stopped().await?;
    Ok(ExitCode::SUCCESS)
}

/// `sign`: prints the headers (or a curl command) Sinch would send with a body.
fn sign(settings: &Settings, args: SignArgs) -> anyhow::Result<ExitCode> {
    let SignArgs {
        body,
        key,
        path,
        content_type,
        timestamp,
        curl,
    } = args;
    let app = signing_app(settings, key.as_deref())?;
    let body = read_body(&body)?;
    let path = path.unwrap_or_else(|| settings.signed_path().to_owned());
    let ts = timestamp.unwrap_or_else(|| client::sinch_timestamp(chrono::Utc::now()));
    let headers = client::signed_headers(&app, &path, &body, &content_type, &ts);
    match curl {
        Some(url) => {
            let mut line = format!("curl -i {}", shell_quote(&url));
            for (name, value) in &headers {
                line.push_str(&format!(" -H {}", shell_quote(&format!("{name}: {value}"))));
            }
            line.push_str(&format!(
                " --data-binary {}",
                shell_quote(&String::from_utf8_lossy(&body))
            ));
            println!("{line}");
        }
        None => headers
            .iter()
            .for_each(|(name, value)| println!("{name}: {value}")),
    }
    Ok(ExitCode::SUCCESS)
}

/// `trigger`: signs and sends a sample callback.
async fn trigger(settings: &Settings, args: TriggerArgs) -> anyhow::Result<ExitCode> {
    let TriggerArgs {
        kind,
        number,
        method,
        status,
        id,
        url,
        key,
    } = args;
    let app = signing_app(settings, key.as_deref())?;
    let id = id.unwrap_or_else(new_id);
    let body = client::sample_body(&Sample {
        kind,
        id: &id,
        number: &number,
        method: &method,
        status: &status,
    });
    let (url, signed_path) = match url {
        Some(url) => {
            let path = url
                .parse::<awc::http::Uri>()
                .with_context(|| format!("`{url}` is not a URL"))?
                .path()
                .to_owned();
            (url, path)
        }
        None => (
            format!(
                "{}{}",
                local_base_url(settings)?,
                settings.server.callback_path
            ),
            settings.signed_path().to_owned(),
        ),
    };
    let ts = client::sinch_timestamp(chrono::Utc::now());
    let headers = client::signed_headers(
        &app,
        &signed_path,
        body.as_bytes(),
        client::CONTENT_TYPE,
        &ts,
    );
    println!("POST {url}\n{body}");
    let (status, answer) = client::post(&url, &headers, body.into_bytes()).await?;
    println!("→ {status} {answer}");
    Ok(if (200..300).contains(&status) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `simulate`: plays a day of traffic with attacks against a policy and prints
/// the scorecards.
async fn simulate(settings: &Settings, args: SimulateArgs) -> anyhow::Result<ExitCode> {
    let attacks = attack_kinds(args.attacks.as_deref())?;
    let policy = args
        .policy
        .clone()
        .unwrap_or_else(|| settings.policy.path.clone());
    let stored = match &args.replay_store {
        Some(since) => Some(replayable_records(settings, since).await?),
        None => None,
    };
    let mut cards = Vec::new();
    // With the store's own traffic the warm-up is what it holds: one run per seed.
    let warmups = match stored {
        Some(_) => vec![0],
        None => args.warmup_days.clone(),
    };
    check_attack_days(args.attack_days, &warmups, stored.is_some())?;
    let scales = time_scales(&args.time_scale, stored.is_some())?;
    for &time_scale in &scales {
        for &warmup_days in &warmups {
            for &seed in &args.seeds {
                let knobs = Knobs {
                    seed,
                    legit_per_minute: args.legit_per_minute,
                    legit_conversion: args.legit_conversion,
                    warmup_days,
                    attack_days: args.attack_days,
                    attacks: attacks.clone(),
                    attack_scale: args.attack_scale,
                    spike: !args.no_spike,
                    time_scale,
                };
                let card = scorecard(&policy, &knobs, stored.as_deref())?;
                cards.push((
                    SimulatedRun {
                        seed,
                        warmup_days,
                        attack_days: args.attack_days,
                        time_scale,
                    },
                    card,
                ));
            }
        }
    }
    print_scorecards(&policy, &cards, args.json, stored.is_some())?;
    let missed = cards.iter().any(|(_, c)| !c.misses().is_empty());
    Ok(if args.check && missed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `--attack-days` fits every run: at least the scored day, at most it and every warm-up
/// day; with the store's own traffic the attacks run on its last day only.
fn check_attack_days(days: u32, warmups: &[u32], stored: bool) -> anyhow::Result<()> {
    if days == 0 {
        anyhow::bail!("--attack-days: at least 1 (the scored day)");
    }
    if stored && days > 1 {
        anyhow::bail!("--attack-days: with --replay-store the attacks run on the last day only");
    }
    if let Some(short) = warmups.iter().find(|w| days > **w + 1) {
        anyhow::bail!(
            "--attack-days {days}: a run with --warmup-days {short} has {} day(s) to attack",
            short + 1
        );
    }
    Ok(())
}

/// The scales `--time-scale` asks for: each above zero; the store's own traffic plays
/// on its own clock.
fn time_scales(scales: &[f64], stored: bool) -> anyhow::Result<Vec<f64>> {
    if let Some(bad) = scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        anyhow::bail!("--time-scale: above zero (0.1 runs a day in 2.4 hours), not {bad}");
    }
    if stored && scales.iter().any(|s| *s != 1.0) {
        anyhow::bail!("--time-scale: with --replay-store the traffic keeps its own clock");
    }
    Ok(scales.to_vec())
}

/// The attack kinds `--attacks` names: every kind by default and for `all`, none for
/// `none`.
fn attack_kinds(names: Option<&[String]>) -> anyhow::Result<Vec<AttackKind>> {
    match names {
        None => Ok(AttackKind::ALL.to_vec()),
        Some(names) if names.iter().all(|n| n == "all") => Ok(AttackKind::ALL.to_vec()),
        Some(names) if names.iter().all(|n| n == "none") => Ok(Vec::new()),
        Some(names) => names
            .iter()
            .map(|n| {
                AttackKind::parse(n).ok_or_else(|| {
                    let kinds: Vec<&str> = AttackKind::ALL.iter().map(|k| k.name()).collect();
                    anyhow::anyhow!(
                        "--attacks: `{n}` is not an attack kind ({}, all, none)",
                        kinds.join(", ")
                    )
                })
            })
            .collect(),
    }
}

/// The store's verifications since `since` (`--replay-store`), read offline.
async fn replayable_records(
    settings: &Settings,
    since: &str,
) -> anyhow::Result<Vec<crate::store::VerificationRecord>> {
    let now = chrono::Utc::now();
    let since = time_arg("--replay-store", since, now)?;
    let store = open_offline(settings, "stop it first").await?;
    let records = all_records(&store, since, now).await?;
    store.shutdown().await?;
    Ok(records)
}

/// One seed's scorecard, on synthetic users or on the stored ones.
fn scorecard(
    policy: &std::path::Path,
    knobs: &Knobs,
    stored: Option<&[crate::store::VerificationRecord]>,
) -> anyhow::Result<simulate::Scorecard> {
    Ok(match stored {
        Some(records) => simulate::run_with_stored(policy, knobs, records)?.ok_or_else(|| {
            anyhow::anyhow!(
                "the store has no replayable verifications in that period \
                 (numbers hashed, or none stored)"
            )
        })?,
        None => simulate::run_synthetic(policy, knobs)?,
    })
}

/// Which run a scorecard is of.
#[derive(Clone, Copy)]
struct SimulatedRun {
    seed: u64,
    warmup_days: u32,
    attack_days: u32,
    time_scale: f64,
}

fn print_scorecards(
    policy: &std::path::Path,
    cards: &[(SimulatedRun, simulate::Scorecard)],
    json: bool,
    stored: bool,
) -> anyhow::Result<()> {
    if json {
        let out: Vec<_> = cards
            .iter()
            .map(|(run, card)| {
                let warmup = (!stored).then_some(run.warmup_days);
                serde_json::json!({
                    "seed": run.seed,
                    "warmup_days": warmup,
                    "attack_days": run.attack_days,
                    "time_scale": run.time_scale,
                    "scorecard": card,
                    "missed_targets": card.misses(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for (run, card) in cards {
        let seed = run.seed;
        match stored {
            true => println!("{}, seed {seed}:", policy.display()),
            false => {
                let attacked = match run.attack_days {
                    1 => String::new(),
                    days => format!(", attacked {days} days running"),
                };
                let clock = match run.time_scale {
                    1.0 => String::new(),
                    scale => format!(", every duration x {scale}"),
                };
                println!(
                    "{}, seed {seed}, warm-up {} day(s){attacked}{clock}:",
                    policy.display(),
                    run.warmup_days
                );
            }
        }
        print!("{card}");
        for miss in card.misses() {
            println!("  target missed: {miss}");
        }
    }
    Ok(())
}

/// `healthcheck`: exit 0 when the service answers ready.
async fn healthcheck(settings: &Settings, url: Option<String>) -> anyhow::Result<ExitCode> {
    let url = match url {
        Some(url) => url,
        None => format!("{}/readyz", local_base_url(settings)?),
    };
    Ok(match client::get_status(&url).await {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("{url}: {status}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    })
}

async fn run_policy(command: PolicyCommand, settings: &Settings) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Schema => {
            println!("{:#}", crate::policy::policy_schema());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Conditions => {
            print!("{}", crate::policy::conditions_reference());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check { file } => match RulesPolicy::load(&file) {
            Ok(policy) => {
                print!("{}", policy.summary());
                let warnings = policy.warnings();
                for warning in &warnings {
                    println!("warning: {warning}");
                }
                println!("{}: ok ({} warnings)", file.display(), warnings.len());
                Ok(ExitCode::SUCCESS)
            }
            Err(err) => {
                eprintln!("{err}");
                Ok(ExitCode::FAILURE)
            }
        },
        PolicyCommand::Test { file, cases } => {
            let text = std::fs::read_to_string(&cases)
                .with_context(|| format!("cannot read {}", cases.display()))?;
            let results =
                tools::run_cases(&file, &text, chrono::Utc::now()).map_err(anyhow::Error::msg)?;
            let failed = results.iter().filter(|r| !r.passed).count();
            for r in &results {
                println!(
                    "{} {}: {}",
                    if r.passed { "ok  " } else { "FAIL" },
                    r.name,
                    r.detail
                );
            }
            println!("{} passed, {failed} failed", results.len() - failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        PolicyCommand::Replay {
            file,
            since,
            url,
            token,
            json,
        } => {
            let candidate = RulesPolicy::load(&file)?;
            let now = chrono::Utc::now();
            let since = time_arg("--since", &since, now)?;
            let records = match url {
                Some(url) => fetch_records(&url, token.as_deref(), since).await?,
                None => {
                    let store = open_offline(settings, "pass --url").await?;
                    let records = all_records(&store, since, now).await?;
                    store.shutdown().await?;
                    records
                }
            };
            let report = tools::replay(&candidate, records);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The store of a stopped service, for offline commands.
async fn open_offline(settings: &Settings, otherwise: &str) -> anyhow::Result<Store> {
    let options = settings.store_options();
    Store::connect(&options, std::sync::Arc::new(Unobserved))
        .await
        .map_err(|e| match e {
            StoreError::NeedsMigration(_) => anyhow::anyhow!("{e}"),
            _ => anyhow::anyhow!("{e}\n(is verigate running on this store? then {otherwise})"),
        })
}

/// Every stored record first seen in [since, until).
async fn all_records(
    store: &Store,
    since: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Vec<crate::store::VerificationRecord>> {
    let mut records = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .verifications(VerificationQuery::between(since, until, 1000).after(after))
            .await?;
        records.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(records),
        }
    }
}

/// Every record first seen since `since`, from a running service's export.
async fn fetch_records(
    base: &str,
    token: Option<&str>,
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<Vec<crate::store::VerificationRecord>> {
    let url = format!(
        "{}/v1/export?format=ndjson&since={}",
        base.trim_end_matches('/'),
        since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    let mut request = awc::Client::default().get(&url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let mut response = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("GET {url} failed: {e}"))?;
    let body = response
        .body()
        .limit(usize::MAX)
        .await
        .map_err(|e| anyhow::anyhow!("reading {url} failed: {e}"))?;
    if !response.status().is_success() {
        anyhow::bail!(
            "GET {url}: {} {}",
            response.status(),
            String::from_utf8_lossy(&body)
        );
    }
    body.split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_slice(line).context("a line of the export is not a record"))
        .collect()
}

/// The app to sign with: the one named, else the first configured.
fn signing_app(settings: &Settings, key: Option<&str>) -> anyhow::Result<AppCredentials> {
    let (keyring, _) = settings.keyring()?;
    let key = match key {
        Some(key) => key.to_owned(),
        None => settings.apps.first().map(|a| a.key.clone()).context(
            "no app configured: set VERIGATE_APP_KEY and VERIGATE_APP_SECRET, or pass --config",
        )?,
    };
    keyring
        .get(&key)
        .cloned()
        .with_context(|| format!("app key `{key}` is not configured"))
}

/// `http://host:port` for reaching this configuration's server from the same machine.
fn local_base_url(settings: &Settings) -> anyhow::Result<String> {
    let mut addr = settings.listen_addr()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    Ok(format!("http://{addr}"))
}

fn read_body(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        Ok(body)
    } else {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    }
}

/// An RFC 3339 time, or a duration back from `now` ("7d", "36h").
fn time_arg(
    flag: &str,
    value: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(value) {
        return Ok(at.with_timezone(&chrono::Utc));
    }
    let ago = humantime::parse_duration(value).map_err(|_| {
        anyhow::anyhow!("{flag} `{value}` is neither an RFC 3339 time nor a duration like 7d")
    })?;
    Ok(now - chrono::Duration::from_std(ago)?)
}

fn new_id() -> String {
    let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    format!("trigger-{nanos:x}")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
