//! `leadscore drift`: wires config, reference profiles, health endpoints and signals around the aggregator.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use leadscore_aggregator::{Aggregator, Metrics};
use leadscore_config::Config;
use leadscore_runtime::{Ended, Liveness};

pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let cfg = config.drift.clone();
    let (profiles, _names) = leadscore_aggregator::load_profiles(&cfg.models)
        .await
        .context("drift.models")?;
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let liveness = std::sync::Arc::new(Liveness::default());
    let metrics = Metrics::with_liveness(liveness.clone());
    let addr = cfg.http_listen.parse().context("drift.http_listen")?;
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    tracing::info!(
        instance = %cfg.instance_id,
        window_ms = cfg.window_ms,
        lateness_ms = cfg.lateness_ms,
        partitions = ?cfg.partitions,
        merge = cfg.merge,
        "drift aggregator starting"
    );
    let m = metrics.clone();
    let ended = leadscore_runtime::host(
        "drift",
        addr,
        metrics.clone(),
        grace,
        |shutdown| async move {
            if config.alerting.enabled {
                tokio::spawn(leadscore_aggregator::route::run(
                    config.alerting.clone(),
                    config.kafka.clone(),
                    cfg.alerts_topic.clone(),
                    registry.clone(),
                    shutdown.clone(),
                ));
            }
            let outcomes = (cfg.outcomes_after_ms > 0).then(|| config.postgres.url.clone());
            // An aborted checkpoint restores the last committed one and goes on.
            leadscore_runtime::rewinding(
                "drift",
                &liveness,
                &shutdown,
                leadscore_aggregator::Error::rewinds,
                || {
                    let (cfg, kafka, registry, profiles, outcomes, metrics, token) = (
                        cfg.clone(),
                        config.kafka.clone(),
                        registry.clone(),
                        profiles.clone(),
                        outcomes.clone(),
                        m.clone(),
                        shutdown.clone(),
                    );
                    async move {
                        let aggregator =
                            Aggregator::start(cfg, &kafka, registry, profiles, outcomes, metrics)
                                .await?;
                        tokio::task::spawn_blocking(move || aggregator.run(&token))
                            .await
                            .map_err(|e| {
                                leadscore_aggregator::Error::Config(format!("aggregator task: {e}"))
                            })?
                    }
                },
            )
            .await
        },
    )
    .await
    .context("drift.http_listen")?;
    metrics.set_ready(false);
    match ended {
        Ended::Finished(r) => r.context("drift aggregator")?,
        Ended::GraceExceeded => return Ok(ExitCode::FAILURE),
    }
    Ok(ExitCode::SUCCESS)
}
