//! `leadscore retrain`: the retrain trigger service, and `retrain request` for operators.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use leadscore_config::Config;
use leadscore_retrain::{Manual, Metrics, RetrainTrigger};
use leadscore_runtime::Ended;

#[derive(Debug, Args)]
pub(crate) struct RetrainArgs {
    #[command(subcommand)]
    command: Option<RetrainCommand>,
}

impl RetrainArgs {
    /// The service this runs, if it is one (not a one-off command).
    pub(crate) fn service(&self) -> Option<&'static str> {
        match self.command {
            None => Some("leadscore-retrain"),
            Some(RetrainCommand::Worker { .. }) => Some("leadscore-training"),
            Some(RetrainCommand::Request { .. }) => None,
        }
    }
}

#[derive(Debug, Subcommand)]
enum RetrainCommand {
    /// Run the training worker: serve retrain requests with the training job, report lifecycle steps.
    Worker {
        /// Serve one request, then exit (as a Kubernetes Job).
        #[arg(long)]
        once: bool,
        /// Exit when no request arrives for this many seconds.
        #[arg(long, value_name = "SECS")]
        idle_exit_secs: Option<u64>,
    },
    /// Ask for a new model version now (skips the cooldown, not the data check unless --force).
    Request {
        /// Why, for the record.
        #[arg(long)]
        reason: String,
        /// Model to retrain.
        #[arg(long, default_value = "lead-scoring")]
        model: String,
        /// Operator id (not an email address).
        #[arg(long)]
        by: Option<String>,
        /// Send even with fewer labelled rows than retrain.min_labelled_rows.
        #[arg(long)]
        force: bool,
    },
}

pub(crate) async fn run(args: RetrainArgs, config: Config) -> anyhow::Result<ExitCode> {
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    if let Some(RetrainCommand::Worker {
        once,
        idle_exit_secs,
    }) = args.command
    {
        let opts = leadscore_retrain::worker::RunOptions {
            once,
            idle_exit: idle_exit_secs.map(std::time::Duration::from_secs),
        };
        return worker(config, registry, opts).await;
    }
    if let Some(RetrainCommand::Request {
        reason,
        model,
        by,
        force,
    }) = args.command
    {
        anyhow::ensure!(
            by.as_deref().is_none_or(|b| !b.contains('@')),
            "--by takes an operator id, not an email address"
        );
        let crm = leadscore_postgres::connect(&config.postgres.url).await?;
        let sent = leadscore_retrain::request_manually(
            &config.retrain,
            &config.kafka,
            &registry,
            &crm,
            Manual {
                model: &model,
                reason: &reason,
                by: by.as_deref(),
                force,
            },
        )
        .await?;
        return match sent {
            Ok(r) => {
                println!(
                    "retrain requested: {} (request {}) on {}",
                    model, r.request_id, config.retrain.requests_topic
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(why) => {
                eprintln!("error: retrain not requested: {why} (use --force to send anyway)");
                Ok(ExitCode::FAILURE)
            }
        };
    }
    let cfg = config.retrain.clone();
    let metrics = Metrics::new();
    let addr = cfg.http_listen.parse().context("retrain.http_listen")?;
    tracing::info!(models = ?cfg.models, cooldown_ms = cfg.cooldown_ms, min_labelled_rows = cfg.min_labelled_rows, "retrain trigger starting");
    let m = metrics.clone();
    let ended = leadscore_runtime::host(
        "retrain",
        addr,
        metrics.clone(),
        GRACE,
        |shutdown| async move {
            // An aborted transaction restores the last committed checkpoint and goes on.
            leadscore_runtime::rewinding(
                "retrain",
                &m.liveness,
                &shutdown,
                leadscore_retrain::Error::rewinds,
                || {
                    let (cfg, kafka, registry, crm, metrics, token) = (
                        cfg.clone(),
                        config.kafka.clone(),
                        registry.clone(),
                        config.postgres.url.clone(),
                        m.clone(),
                        shutdown.clone(),
                    );
                    async move {
                        let trigger =
                            RetrainTrigger::start(cfg, &kafka, registry, crm, metrics).await?;
                        tokio::task::spawn_blocking(move || trigger.run(&token))
                            .await
                            .map_err(|e| {
                                leadscore_retrain::Error::Checkpoint(format!("trigger task: {e}"))
                            })?
                    }
                },
            )
            .await
        },
    )
    .await
    .context("retrain.http_listen")?;
    metrics.liveness.stopped();
    finished(ended, "retrain trigger")
}

/// How long a service may take to stop after SIGTERM (below the chart's termination grace).
pub(crate) const GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// The exit code of a hosted service's end.
pub(crate) fn finished<T, E>(ended: Ended<Result<T, E>>, what: &str) -> anyhow::Result<ExitCode>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match ended {
        Ended::Finished(r) => {
            r.with_context(|| what.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Ended::GraceExceeded => Ok(ExitCode::FAILURE),
    }
}

async fn worker(
    config: Config,
    registry: leadscore_registry::Registry,
    opts: leadscore_retrain::worker::RunOptions,
) -> anyhow::Result<ExitCode> {
    let cfg = config.training.clone();
    let metrics = std::sync::Arc::new(leadscore_retrain::worker::WorkerMetrics::default());
    let addr: std::net::SocketAddr = cfg.http_listen.parse().context("training.http_listen")?;
    // A run in progress is killed at shutdown and re-run after a restart: no long grace.
    let m = metrics.clone();
    let ended = leadscore_runtime::host(
        "training",
        addr,
        metrics.clone(),
        GRACE,
        |shutdown| async move {
            let worker = leadscore_retrain::worker::Worker::start(
                cfg,
                &config.kafka,
                registry,
                config.postgres.url.clone(),
                m,
            )
            .await?;
            let exit = worker.run(shutdown, opts).await?;
            tracing::info!(?exit, "training worker stopped");
            Ok::<_, leadscore_retrain::Error>(exit)
        },
    )
    .await
    .context("training.http_listen")?;
    metrics.liveness.stopped();
    finished(ended, "training worker")
}
