use std::{io::IsTerminal, process::ExitCode};

// glibc's allocator spent a quarter of the HTTP workers' time under load (objects freed on
// another thread than the one that made them) and held on to memory; jemalloc does not.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
    // Held until the end of main: dropping it writes out buffered log lines.
    let mut _log_writer = None;
    if matches!(command, Command::Serve) {
        let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        let (writer, guard) = telemetry::background_stdout();
        _log_writer = Some(guard);
        let subscriber =
            telemetry::subscriber(&settings.log.level, settings.log.format, colour, writer);
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
