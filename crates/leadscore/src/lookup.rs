//! `leadscore lookup`: loads the models the stream uses, follows lifecycle events, and
//! serves gRPC and REST until SIGTERM, then drains.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use leadscore_config::Config;
use leadscore_model::BandThresholds;
use leadscore_model::source::ModelSource;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let cfg = config.lookup.clone();
    leadscore_model::init_runtime(None).context("ONNX Runtime")?;
    let champion_url = cfg
        .champion_model
        .clone()
        .unwrap_or_else(|| config.scorer.champion_model.clone());
    let challenger_url = cfg
        .challenger_model
        .clone()
        .or_else(|| config.scorer.challenger_model.clone());
    let challenger_stand_in = Arc::new(AtomicBool::new(false));
    let champion = crate::scorer::load(&champion_url, "champion").await?;
    let challenger = match &challenger_url {
        Some(u) => Some(
            crate::scorer::stand_in(u, "challenger", &champion_url, &challenger_stand_in).await?,
        ),
        None => None,
    };
    let models = Arc::new(leadscore_lookup::models::Served {
        champion: champion.clone(),
        challenger: challenger.clone(),
        challenger_stand_in: challenger_stand_in.clone(),
        canary_percent: Arc::new(leadscore_scorer::CanaryPercent::new(0.0)),
        bands: BandThresholds {
            high: config.scorer.band_high,
            medium: config.scorer.band_medium,
        },
        reasons: config.scorer.reasons,
    });
    let metrics = Arc::new(leadscore_lookup::metrics::Metrics::default());
    let shutdown = CancellationToken::new();
    leadscore_runtime::cancel_on_signal(shutdown.clone());

    // Follow MLflow aliases (lifecycle events, and a timer as a fallback), as the scorer does.
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut followed = vec![leadscore_scorer::watch::Followed {
        role: "champion",
        handle: champion,
        source: ModelSource::parse(&champion_url)?,
        stand_in: None,
    }];
    if let (Some(h), Some(u)) = (challenger, &challenger_url) {
        followed.push(leadscore_scorer::watch::Followed {
            role: "challenger",
            handle: h,
            source: ModelSource::parse(u)?,
            stand_in: Some(challenger_stand_in),
        });
    }
    let every = (cfg.model_poll_secs > 0).then(|| Duration::from_secs(cfg.model_poll_secs));
    tokio::spawn(leadscore_scorer::watch::follow(
        followed,
        every,
        wake.clone(),
        |model| tracing::info!(model = %model.metadata().label(), explained = model.explained(), "champion changed"),
        shutdown.clone(),
    ));
    if !cfg.lifecycle_topic.is_empty() {
        let lc: rdkafka::consumer::StreamConsumer = leadscore_kafka::follower_config(
            &config.kafka,
            "leadscore-lookup-lifecycle",
            leadscore_kafka::Start::Earliest,
        )
        .create()
        .context("creating the lifecycle consumer")?;
        let registry = leadscore_registry::Registry::new(&config.registry)?;
        tokio::spawn(leadscore_scorer::watch::lifecycle(
            lc,
            cfg.lifecycle_topic.clone(),
            wake,
            Some(leadscore_scorer::watch::LifecycleFollow {
                model_name: models.champion.get().metadata().model_name.clone(),
                canary_percent: models.canary_percent.clone(),
                decoder: leadscore_registry::Decoder::new(registry),
            }),
            shutdown.clone(),
        ));
    }

    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let serve = leadscore_lookup::serve(&config, models, metrics, shutdown.clone());
    tokio::pin!(serve);
    let result = tokio::select! {
        r = &mut serve => r,
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::error!(grace_ms = grace.as_millis() as u64, "calls or streams still open after the shutdown grace; exiting");
            return Ok(ExitCode::FAILURE);
        }
    };
    result.context("lookup service")?;
    tracing::info!("lookup service stopped");
    Ok(ExitCode::SUCCESS)
}
