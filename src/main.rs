//! `pairdb`: parse the command line, load the config, start logging, run the roles.

use std::process::ExitCode;

use clap::Parser;
use pairdb::cli::{Cli, Command};
use pairdb::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

/// Exit code for bad configuration or flags.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a role that failed or could not start.
const EXIT_FAILURE: u8 = 1;

fn init_tracing(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pairdb: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if let Some(Command::Dev(args)) = cli.command {
        init_tracing(LogFormat::Human, "info");
        return match runtime.block_on(pairdb::roles::run_dev(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pairdb: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    if cli.server.print_config {
        return match Config::load(&cli.server).map(|c| toml::to_string(&c)) {
            Ok(Ok(text)) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Ok(Err(e)) => {
                eprintln!("pairdb: cannot print the config: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
            Err(e) => {
                eprintln!("pairdb: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let config = match Config::load(&cli.server).and_then(|c| c.validate().map(|()| c)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pairdb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if cli.server.check_config {
        println!("configuration ok: roles {:?}", config.node.roles);
        return ExitCode::SUCCESS;
    }
    init_tracing(config.node.log_format, &config.node.log_level);
    match runtime.block_on(pairdb::roles::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pairdb: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
