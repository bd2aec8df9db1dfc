//! `leadscore retrain`: the retrain trigger service, and `retrain request` for operators.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use leadscore_config::Config;
use leadscore_retrain::{Manual, Metrics, RetrainTrigger};
use tokio_util::sync::CancellationToken;

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
    let shutdown = CancellationToken::new();
    crate::scorer::on_signal(shutdown.clone());
    let http_stop = CancellationToken::new();
    let addr = cfg.http_listen.parse().context("retrain.http_listen")?;
    let http = tokio::spawn(leadscore_retrain::serve(
        addr,
        metrics.clone(),
        http_stop.clone(),
    ));
    tracing::info!(models = ?cfg.models, cooldown_ms = cfg.cooldown_ms, min_labelled_rows = cfg.min_labelled_rows, "retrain trigger starting");
    let trigger = RetrainTrigger::start(
        cfg,
        &config.kafka,
        registry,
        config.postgres.url.clone(),
        metrics,
    )
    .await
    .context("starting the retrain trigger")?;
    let token = shutdown.clone();
    let result = tokio::task::spawn_blocking(move || trigger.run(&token)).await;
    http_stop.cancel();
    let _ = http.await;
    result.context("retrain task")?.context("retrain trigger")?;
    Ok(ExitCode::SUCCESS)
}

async fn worker(
    config: Config,
    registry: leadscore_registry::Registry,
    opts: leadscore_retrain::worker::RunOptions,
) -> anyhow::Result<ExitCode> {
    let cfg = config.training.clone();
    let metrics = std::sync::Arc::new(leadscore_retrain::worker::WorkerMetrics::default());
    let shutdown = CancellationToken::new();
    crate::scorer::on_signal(shutdown.clone());
    let http_stop = CancellationToken::new();
    let addr: std::net::SocketAddr = cfg.http_listen.parse().context("training.http_listen")?;
    let m2 = metrics.clone();
    let stop2 = http_stop.clone();
    let http = tokio::spawn(async move {
        use axum::routing::get;
        let app = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ready" }))
            .route("/metrics", get(move || async move { m2.render() }));
        let listener = tokio::net::TcpListener::bind(addr).await?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop2.cancelled().await })
            .await
    });
    let worker = leadscore_retrain::worker::Worker::start(
        cfg,
        &config.kafka,
        registry,
        config.postgres.url.clone(),
        metrics,
    )
    .await
    .context("starting the training worker")?;
    let result = worker.run(shutdown, opts).await;
    http_stop.cancel();
    let _ = http.await;
    let exit = result.context("training worker")?;
    tracing::info!(?exit, "training worker stopped");
    Ok(ExitCode::SUCCESS)
}
