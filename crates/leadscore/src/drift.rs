//! `leadscore drift`: wires config, reference profiles, health endpoints and signals around the aggregator.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use leadscore_aggregator::{Aggregator, Metrics};
use leadscore_config::Config;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let cfg = config.drift.clone();
    let (profiles, _names) = leadscore_aggregator::load_profiles(&cfg.models)
        .await
        .context("drift.models")?;
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let metrics = Metrics::new();
    let shutdown = CancellationToken::new();
    crate::scorer::on_signal(shutdown.clone());
    let http_stop = CancellationToken::new();
    let addr = cfg.http_listen.parse().context("drift.http_listen")?;
    let http = tokio::spawn(leadscore_aggregator::metrics::serve(
        addr,
        metrics.clone(),
        http_stop.clone(),
    ));
    if config.alerting.enabled {
        tokio::spawn(leadscore_aggregator::route::run(
            config.alerting.clone(),
            config.kafka.clone(),
            cfg.alerts_topic.clone(),
            registry.clone(),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        instance = %cfg.instance_id,
        window_ms = cfg.window_ms,
        lateness_ms = cfg.lateness_ms,
        partitions = ?cfg.partitions,
        merge = cfg.merge,
        "drift aggregator starting"
    );
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let aggregator = Aggregator::start(
        cfg,
        &config.kafka,
        registry,
        profiles,
        (config.drift.outcomes_after_ms > 0).then(|| config.postgres.url.clone()),
        metrics,
    )
    .await
    .context("starting the drift aggregator")?;
    let token = shutdown.clone();
    let work = tokio::task::spawn_blocking(move || aggregator.run(&token));
    tokio::pin!(work);
    let result = tokio::select! {
        r = &mut work => r,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::error!(grace_ms = grace.as_millis() as u64, "the last checkpoint did not finish within the shutdown grace; exiting (the previous checkpoint stands)");
            http_stop.cancel();
            return Ok(ExitCode::FAILURE);
        }
    };
    http_stop.cancel();
    let _ = http.await;
    result
        .context("aggregator task")?
        .context("drift aggregator")?;
    Ok(ExitCode::SUCCESS)
}
