//! The command line: `serve` (default), `sign`, `trigger`, `healthcheck`.

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
    routes::analytics::ExportFormat,
    signature::AppCredentials,
    startup::Application,
    store::Store,
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
    Sign {
        /// The body, exactly as it will be sent ("-" reads standard input).
        #[arg(default_value = "-")]
        body: PathBuf,
        /// App key to sign with (default: the first configured app).
        #[arg(long)]
        key: Option<String>,
        /// The path to sign (default: the configured signed callback path).
        #[arg(long)]
        path: Option<String>,
        #[arg(long, default_value = client::CONTENT_TYPE)]
        content_type: String,
        /// x-timestamp to sign (default: now).
        #[arg(long)]
        timestamp: Option<String>,
        /// Print a complete curl command posting to this URL instead of header lines.
        #[arg(long, value_name = "URL")]
        curl: Option<String>,
    },
    /// Sign and send a realistic sample callback, as Sinch would.
    Trigger {
        #[arg(value_enum)]
        kind: SampleKind,
        #[arg(long, default_value = "+46700000001")]
        number: String,
        /// sms, flashcall, callout, whatsapp, seamless.
        #[arg(long, default_value = "sms")]
        method: String,
        /// Result events: SUCCESSFUL, FAIL, DENIED, ABORTED, ERROR, PENDING.
        #[arg(long, default_value = "SUCCESSFUL")]
        status: String,
        /// Verification id (default: a new one; reuse one to join events).
        #[arg(long)]
        id: Option<String>,
        /// Where to send it (default: this configuration's listen address and callback path).
        #[arg(long)]
        url: Option<String>,
        /// App key to sign with (default: the first configured app).
        #[arg(long)]
        key: Option<String>,
    },
    /// Write stored verifications to standard output (or a file) while the service is
    /// stopped; a running service serves the same through GET /v1/export.
    Export {
        /// Start of the range: an RFC 3339 time, or a duration back from now ("7d").
        #[arg(long)]
        since: String,
        /// End of the range (exclusive), same forms; default: now.
        #[arg(long)]
        until: Option<String>,
        #[arg(long, value_enum, default_value = "ndjson")]
        format: ExportFormatArg,
        /// Write here instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Exit 0 if verigate answers ready, 1 otherwise (container health checks).
    Healthcheck {
        /// Default: /readyz on this configuration's listen address.
        #[arg(long)]
        url: Option<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormatArg {
    Ndjson,
    Csv,
}

pub async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Export {
            since,
            until,
            format,
            output,
        } => {
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
            let store = Store::open_with(&settings.store.path, settings.store_options(), |_| {})
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{e}\n(is verigate running on this store? then use GET /v1/export)"
                    )
                })?;
            let mut out: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            out.write_all(&format.header())?;
            let mut after = None;
            let mut bytes = 0;
            loop {
                let (chunk, next) = format.chunk(&store, since, until, after.as_ref(), 1000)?;
                bytes += chunk.len();
                out.write_all(&chunk)?;
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            out.flush()?;
            eprintln!("exported {bytes} bytes of verifications first seen in [{since}, {until})");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => {
            let app = Application::build(&settings, Clock::system())?;
            tracing::info!(port = app.port(), path = %settings.server.callback_path, "verigate listening");
            app.run_until_stopped().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sign {
            body,
            key,
            path,
            content_type,
            timestamp,
            curl,
        } => {
            let app = signing_app(&settings, key.as_deref())?;
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
        Command::Trigger {
            kind,
            number,
            method,
            status,
            id,
            url,
            key,
        } => {
            let app = signing_app(&settings, key.as_deref())?;
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
                        local_base_url(&settings)?,
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
        Command::Healthcheck { url } => {
            let url = match url {
                Some(url) => url,
                None => format!("{}/readyz", local_base_url(&settings)?),
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
    }
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
