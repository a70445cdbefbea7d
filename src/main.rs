use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use verigate::{
    cli::{self, Cli, Command},
    config::Settings,
    telemetry,
};

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("verigate: {err}");
            return ExitCode::from(2);
        }
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if matches!(command, Command::Serve) {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let subscriber = telemetry::subscriber(
            &settings.log.level,
            settings.log.format,
            colour,
            std::io::stdout,
        );
        if let Err(err) = telemetry::init(subscriber) {
            eprintln!("verigate: {err}");
            return ExitCode::FAILURE;
        }
    }
    match cli::run(command, settings).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("verigate: {err:#}");
            ExitCode::FAILURE
        }
    }
}
