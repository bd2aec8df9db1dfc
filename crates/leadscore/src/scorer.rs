//! `leadscore scorer`: wires config, clients, models, health endpoints and signals around the scorer library.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use leadscore_config::Config;
use leadscore_model::ModelHandle;
use leadscore_model::source::ModelSource;
use leadscore_scorer::{Metrics, Models};

pub(crate) async fn load(url: &str, role: &str) -> anyhow::Result<Arc<ModelHandle>> {
    let source = ModelSource::parse(url).with_context(|| format!("scorer.{role}_model"))?;
    let model = source
        .fetch()
        .await
        .with_context(|| format!("loading the {role} model from {source}"))?;
    tracing::info!(role, model = %model.metadata().label(), %source, "model loaded");
    Ok(Arc::new(ModelHandle::new(model)))
}

/// The challenger or canary model. An MLflow alias that does not exist yet
/// (no rollout under way) is not an error: the champion stands in, and a
/// stand-in is never scored (the scorer skips a role whose version is the
/// champion's) until the lifecycle controller sets the alias.
pub(crate) async fn stand_in(
    url: &str,
    role: &str,
    champion: &str,
    flag: &AtomicBool,
) -> anyhow::Result<Arc<ModelHandle>> {
    match load(url, role).await {
        Ok(h) => Ok(h),
        Err(e) if url.starts_with("mlflow+") && url.contains('@') => {
            tracing::warn!(
                role,
                error = format!("{e:#}"),
                "no version for this alias yet; the champion stands in (unscored) until a rollout sets one"
            );
            flag.store(true, Ordering::Relaxed);
            load(champion, role).await
        }
        Err(e) => Err(e),
    }
}

/// Cancels `token` on SIGTERM or Ctrl-C.
pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let cfg = config.scorer.clone();
    leadscore_model::init_runtime(None).context("ONNX Runtime")?;
    let challenger_stand_in = Arc::new(AtomicBool::new(false));
    let canary_stand_in = Arc::new(AtomicBool::new(false));
    let models = Models {
        champion: load(&cfg.champion_model, "champion").await?,
        challenger: match &cfg.challenger_model {
            Some(u) => {
                Some(stand_in(u, "challenger", &cfg.champion_model, &challenger_stand_in).await?)
            }
            None => None,
        },
        canary: match &cfg.canary_model {
            Some(u) => Some(stand_in(u, "canary", &cfg.champion_model, &canary_stand_in).await?),
            None => None,
        },
        canary_percent: Arc::new(leadscore_scorer::CanaryPercent::new(cfg.canary_percent)),
        challenger_stand_in: challenger_stand_in.clone(),
        canary_stand_in: canary_stand_in.clone(),
        reasons: cfg.reasons,
    };
    let champion = models.champion.get();
    if cfg.reasons > 0 && !champion.explained() {
        tracing::warn!(model = %champion.metadata().label(), "the champion is not an explained tree ensemble (no exported covers, or not a tree graph): its scores carry no reasons");
    }
    tracing::info!(
        reasons = cfg.reasons,
        explained = champion.explained(),
        "reasons per score"
    );
    drop(champion);
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let metrics = Metrics::with_liveness(leadscore_runtime::Liveness::new(
        cfg.stuck_after_aborts,
        Duration::from_millis(cfg.stuck_after_ms),
    ));
    let consumer: leadscore_scorer::ScorerConsumer =
        leadscore_scorer::consumer_config(&config.kafka, &cfg)
            .create_with_context(leadscore_scorer::ScorerContext::new(metrics.clone()))
            .context("creating the Kafka consumer")?;
    // Records the broker would refuse are refused by the producer at once, record by record,
    // and a capped dead letter always fits.
    let max_message_bytes = leadscore_kafka::TopicAdmin::new(&config.kafka)?
        .max_message_bytes(&[&cfg.scores_topic, &cfg.shadow_topic, &cfg.dlq_topic])
        .await
        .context("reading max.message.bytes of the output topics")?;
    anyhow::ensure!(
        cfg.dlq_max_payload_bytes + leadscore_scorer::DEAD_LETTER_OVERHEAD <= max_message_bytes,
        "scorer.dlq_max_payload_bytes ({}) plus {} bytes of headers exceeds max.message.bytes of the output topics ({max_message_bytes}); lower it",
        cfg.dlq_max_payload_bytes,
        leadscore_scorer::DEAD_LETTER_OVERHEAD
    );
    let producers = (0..cfg.lanes)
        .map(|lane| {
            leadscore_kafka::txn::Transactional::create(
                &leadscore_scorer::producer_config(&config.kafka, &cfg, lane, max_message_bytes),
                Duration::from_millis(cfg.transaction_timeout_ms),
            )
            .with_context(|| format!("creating the Kafka producer of lane {lane}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let addr: std::net::SocketAddr = cfg.http_listen.parse().context("scorer.http_listen")?;

    // Follow MLflow aliases: on lifecycle events, and on a timer as a fallback.
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut followed = vec![leadscore_scorer::watch::Followed {
        role: "champion",
        handle: models.champion.clone(),
        source: ModelSource::parse(&cfg.champion_model)?,
        stand_in: None,
    }];
    for (role, handle, url, flag) in [
        (
            "challenger",
            &models.challenger,
            &cfg.challenger_model,
            &models.challenger_stand_in,
        ),
        (
            "canary",
            &models.canary,
            &cfg.canary_model,
            &models.canary_stand_in,
        ),
    ] {
        if let (Some(h), Some(u)) = (handle, url) {
            followed.push(leadscore_scorer::watch::Followed {
                role,
                handle: h.clone(),
                source: ModelSource::parse(u)?,
                stand_in: Some(flag.clone()),
            });
        }
    }
    let every = (cfg.model_poll_secs > 0).then(|| Duration::from_secs(cfg.model_poll_secs));
    let lifecycle = if cfg.lifecycle_topic.is_empty() {
        None
    } else {
        let lc: rdkafka::consumer::StreamConsumer =
            leadscore_scorer::lifecycle_consumer_config(&config.kafka, &cfg)
                .create()
                .context("creating the lifecycle consumer")?;
        // The canary share follows the controller's steps for the champion's registered model.
        let follow = models
            .canary
            .as_ref()
            .map(|_| leadscore_scorer::watch::LifecycleFollow {
                model_name: models.champion.get().metadata().model_name.clone(),
                canary_percent: models.canary_percent.clone(),
                decoder: leadscore_registry::Decoder::new(registry.clone()),
            });
        Some((lc, follow))
    };
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let m = metrics.clone();
    let ended = leadscore_runtime::host(
        "scorer",
        addr,
        metrics.clone(),
        grace,
        |shutdown| async move {
            tokio::spawn(leadscore_scorer::watch::follow(
                followed,
                every,
                wake.clone(),
                move |model| m.set_model(model),
                shutdown.clone(),
            ));
            if let Some((lc, follow)) = lifecycle {
                tokio::spawn(leadscore_scorer::watch::lifecycle(
                    lc,
                    cfg.lifecycle_topic.clone(),
                    wake,
                    follow,
                    shutdown.clone(),
                ));
            }
            leadscore_scorer::run(
                cfg, consumer, producers, registry, models, metrics, shutdown,
            )
            .await
        },
    )
    .await
    .context("scorer.http_listen")?;
    crate::retrain::finished(ended, "scorer")
}
