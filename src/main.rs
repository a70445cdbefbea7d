use std::{io::IsTerminal, path::PathBuf};

use clap::{Parser, Subcommand};
use verigate::{clock::Clock, config::Settings, startup::Application, telemetry};

/// Receives Sinch Verification callbacks: authenticates, decides allow/deny, records.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Settings file layered over the built-in defaults (see config/default.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the callback receiver (the default).
    Serve,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("verigate: {err}");
            std::process::exit(2);
        }
    };
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    telemetry::init(telemetry::subscriber(
        &settings.log.level,
        settings.log.format,
        colour,
        std::io::stdout,
    ))?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(&settings, Clock::system())?;
            tracing::info!(port = app.port(), path = %settings.server.callback_path, "verigate listening");
            app.run_until_stopped().await
        }
    }
}
