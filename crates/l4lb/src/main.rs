//! l4lb: a Layer-4 TCP/UDP load balancer. This binary only reads the config, wires the
//! crates together and handles process life (signals, drain).
#![forbid(unsafe_code)]

mod admin;
mod config;
mod ctl;
mod discovery;
mod log_format;
mod log_writer;
mod logging;
mod metrics;
mod runtime;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// A Layer-4 TCP/UDP load balancer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The YAML config file.
    #[arg(short, long, default_value = "config/l4lb.yaml")]
    config: PathBuf,
    /// Validate the config, print every error with its path, and exit (0 when valid).
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<Commands>,
}

#[derive(Debug, clap::Subcommand)]
enum Commands {
    /// Talk to a running l4lb through its admin endpoint.
    Ctl {
        /// The admin endpoint (default: `admin` in the config file).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// The bearer token (default: `admin_token` in the config file).
        #[arg(long, env = "L4LB_ADMIN_TOKEN")]
        token: Option<String>,
        #[command(subcommand)]
        command: ctl::Command,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Commands::Ctl {
        admin,
        token,
        command,
    }) = &cli.command
    {
        let outcome = ctl::Target::find(&cli.config, *admin, token.clone())
            .and_then(|target| ctl::run(&target, command));
        return match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("l4lb ctl: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let text = match std::fs::read_to_string(&cli.config) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: {e}", cli.config.display());
            return ExitCode::FAILURE;
        }
    };
    let config = match config::parse(&text) {
        Ok(config) => config,
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{}: {e}", cli.config.display());
            }
            eprintln!("{}: {} error(s)", cli.config.display(), errors.0.len());
            return ExitCode::FAILURE;
        }
    };
    if cli.check {
        println!(
            "{}: configuration ok ({} listener(s), {} pool(s))",
            cli.config.display(),
            config.listeners.len(),
            config.pools.len()
        );
        return ExitCode::SUCCESS;
    }
    let logging = match logging::init(&config.access_log) {
        Ok(logging) => logging,
        Err(e) => {
            eprintln!("{}: log.access: {e}", cli.config.display());
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime::run(
        cli.config.clone(),
        config,
        logging.dropped(),
        logging.reopen(),
    );
    let code = match outcome.context("l4lb failed") {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    logging.finish();
    code
}
