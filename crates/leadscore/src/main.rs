//! The `leadscore` binary: one subcommand per service and admin task.
//!
//! Thin by design: parses arguments, loads configuration, sets up logging and
//! calls library code. Every subcommand's logic lives in a library crate.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use leadscore_config::Config;

mod bench;
mod crm;
mod schemas;
mod scorer;
mod topics;

/// Real-time lead scoring on Kafka.
#[derive(Debug, Parser)]
#[command(name = "leadscore", version, about)]
struct Cli {
    /// TOML configuration file; `LEADSCORE__SECTION__KEY` variables override it.
    #[arg(long, global = true, env = "LEADSCORE_CONFIG")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Kafka topics declared in topics/.
    #[command(subcommand)]
    Topics(topics::TopicsCommand),
    /// Benchmarks against the real stack.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The CRM: synthetic leads.
    #[command(subcommand)]
    Crm(crm::CrmCommand),
    /// Run the scorer service (CDC in, scores out, exactly once).
    Scorer,
    /// Avro schemas in schemas/ and the schema registry.
    #[command(subcommand)]
    Schemas(schemas::SchemasCommand),
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LEADSCORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref()).context("loading configuration")?;
    match cli.command {
        Command::Topics(cmd) => topics::run(cmd, &config).await,
        Command::Schemas(cmd) => schemas::run(cmd, &config).await,
        Command::Crm(cmd) => crm::run(cmd, &config).await,
        Command::Scorer => scorer::run(config).await,
        Command::Bench(cmd) => bench::run(cmd, &config).await,
    }
}
