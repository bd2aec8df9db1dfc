//! The `leadscore` binary: one subcommand per service and admin task.
//!
//! Thin by design: parses arguments, loads configuration, sets up logging and
//! calls library code. Every subcommand's logic lives in a library crate.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leadscore_config::Config;

/// mimalloc instead of glibc's malloc: the scorer allocates and frees per record (decoded
/// rows, outputs, delivery futures), and glibc spent a third of its CPU in malloc, free and
/// consolidation (`perf`, BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_drift;
mod bench_drift_sound;
mod bench_lookup;
mod bench_webhook;
mod connectors;
mod crm;
mod dashboard;
mod demo;
mod drift;
mod lookup;
mod model;
mod retrain;
mod schemas;
mod scorer;
mod topics;
mod webhook;

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
    /// Kafka Connect connectors defined in connectors/.
    #[command(subcommand)]
    Connectors(connectors::ConnectorsCommand),
    /// The CRM round trip, live: connectors, scorer, synthetic leads in, score rows back.
    Demo(demo::DemoArgs),
    /// The CRM: synthetic leads.
    #[command(subcommand)]
    Crm(crm::CrmCommand),
    /// Run the scorer service (CDC in, scores out, exactly once).
    Scorer,
    /// Run the drift aggregator (windowed drift reports and alerts from the scores).
    Drift,
    /// Run the lookup service: gRPC score lookups and on-demand scoring, the seed's REST contract, Open Inference Protocol v2.
    Lookup,
    /// Model lifecycle: run the controller, or promote, roll back and inspect rollouts.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Run the retrain trigger, or `retrain request` a new model version by hand.
    Retrain(retrain::RetrainArgs),
    /// Avro schemas in schemas/ and the schema registry.
    #[command(subcommand)]
    Schemas(schemas::SchemasCommand),
    /// Run the monitoring dashboard (pipeline, models, drift and alerts, live in a browser).
    Dashboard,
    /// Run the webhook service (every score POSTed to the CRM's endpoints, signed and
    /// retried), or `webhook ping URL` a receiver.
    Webhook(webhook::WebhookArgs),
}

impl Command {
    /// The OpenTelemetry service name, for the long-running services only.
    fn service(&self) -> Option<&'static str> {
        match self {
            Command::Scorer => Some("leadscore-scorer"),
            Command::Drift => Some("leadscore-drift"),
            Command::Lookup => Some("leadscore-lookup"),
            Command::Dashboard => Some("leadscore-dashboard"),
            Command::Retrain(a) => a.service(),
            Command::Model(m) => m.service(),
            Command::Webhook(w) => w.service(),
            _ => None,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: loading configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let format = if cli.log_format == "json" {
        leadscore_telemetry::LogFormat::Json
    } else {
        leadscore_telemetry::LogFormat::Text
    };
    // Before the runtime: the OTLP exporters run on their own threads.
    let service = cli.command.service();
    let telemetry = match leadscore_telemetry::init(
        service.unwrap_or("leadscore"),
        &config.telemetry,
        format,
        service.is_some(),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: telemetry: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli.command, config)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(runtime);
    telemetry.shutdown();
    code
}

async fn run(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Topics(cmd) => topics::run(cmd, &config).await,
        Command::Schemas(cmd) => schemas::run(cmd, &config).await,
        Command::Crm(cmd) => crm::run(cmd, &config).await,
        Command::Connectors(cmd) => connectors::run(cmd, &config).await,
        Command::Demo(args) => demo::run(args, &config).await,
        Command::Scorer => scorer::run(config).await,
        Command::Drift => drift::run(config).await,
        Command::Lookup => lookup::run(config).await,
        Command::Dashboard => dashboard::run(config).await,
        Command::Retrain(args) => retrain::run(args, config).await,
        Command::Model(cmd) => model::run(cmd, config).await,
        Command::Bench(cmd) => bench::run(cmd, &config).await,
        Command::Webhook(args) => webhook::run(args, config).await,
    }
}
