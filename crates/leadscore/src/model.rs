//! `leadscore model`: the lifecycle controller, and operators' promote, rollback and status.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use leadscore_config::Config;
use leadscore_lifecycle::events::{LifecycleEvent, Stage};
use leadscore_lifecycle::rollout::Phase;
use leadscore_retrain::controller::{Command, Controller, ControllerState, state_key};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};

#[derive(Debug, Subcommand)]
pub(crate) enum ModelCommand {
    /// Run the lifecycle controller (shadow, canary, promotion, automatic rollback).
    Controller,
    /// Promote the candidate now.
    Promote(Target),
    /// Roll back: the candidate if one is under way, else the last promotion.
    Rollback(Target),
    /// Where each model's rollout stands.
    Status,
    /// Re-score every open lead (new, contacted, qualified) through the scorer, rate-limited.
    Rescore {
        /// Leads per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct Target {
    /// Model.
    #[arg(long, default_value = "lead-scoring")]
    model: String,
    /// Operator id (not an email address).
    #[arg(long)]
    by: String,
    /// How long to wait for the controller to confirm, seconds.
    #[arg(long, default_value_t = 30)]
    wait_secs: u64,
}

impl ModelCommand {
    /// The service this runs, if it is one.
    pub(crate) fn service(&self) -> Option<&'static str> {
        matches!(self, ModelCommand::Controller).then_some("leadscore-lifecycle")
    }
}

pub(crate) async fn run(cmd: ModelCommand, config: Config) -> anyhow::Result<ExitCode> {
    let cfg = config.lifecycle.clone();
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    match cmd {
        ModelCommand::Controller => {
            let liveness = Arc::new(leadscore_runtime::Liveness::default());
            let addr: std::net::SocketAddr =
                cfg.http_listen.parse().context("lifecycle.http_listen")?;
            let status = Arc::new(leadscore_runtime::Report {
                name: "lifecycle",
                liveness: liveness.clone(),
                render: Box::new(String::new),
            });
            tracing::info!(models = ?cfg.models, steps = ?cfg.steps, "lifecycle controller starting");
            let l = liveness.clone();
            let ended = leadscore_runtime::host(
                "lifecycle",
                addr,
                status,
                crate::retrain::GRACE,
                |shutdown| async move {
                    // An aborted transaction restores the last committed checkpoint and goes on.
                    leadscore_runtime::rewinding(
                        "lifecycle",
                        &l,
                        &shutdown,
                        leadscore_retrain::Error::rewinds,
                        || {
                            let (cfg, kafka, registry, liveness, token) = (
                                cfg.clone(),
                                config.kafka.clone(),
                                registry.clone(),
                                l.clone(),
                                shutdown.clone(),
                            );
                            let rescore = leadscore_retrain::controller::RescoreWith {
                                kafka: config.kafka.clone(),
                                registry: registry.clone(),
                                crm_url: config.postgres.url.clone(),
                            };
                            async move {
                                let controller = Controller::start(
                                    cfg,
                                    &kafka,
                                    registry,
                                    liveness,
                                    Some(rescore),
                                )
                                .await?;
                                tokio::task::spawn_blocking(move || controller.run(&token))
                                    .await
                                    .map_err(|e| {
                                        leadscore_retrain::Error::Checkpoint(format!(
                                            "controller task: {e}"
                                        ))
                                    })?
                            }
                        },
                    )
                    .await
                },
            )
            .await
            .context("lifecycle.http_listen")?;
            liveness.stopped();
            crate::retrain::finished(ended, "lifecycle controller")
        }
        ModelCommand::Status => {
            let key = state_key(&cfg.group_id);
            let (kafka, topic) = (config.kafka.clone(), cfg.state_topic.clone());
            let stored = tokio::task::spawn_blocking(move || {
                leadscore_kafka::latest::read_latest(&kafka, &topic, &key, Duration::from_secs(10))
            })
            .await??;
            let state: ControllerState = match stored.values().next() {
                Some(s) => {
                    serde_json::from_slice(&s.value).context("the controller's checkpoint")?
                }
                None => {
                    println!("no rollout state yet (is `leadscore model controller` running?)");
                    return Ok(ExitCode::SUCCESS);
                }
            };
            let policy = leadscore_retrain::controller::policy(&cfg);
            println!(
                "{:<20} {:<10} {:<10} {:<10} {:>7}",
                "model", "champion", "phase", "candidate", "canary%"
            );
            for (model, r) in &state.rollouts {
                let phase = match &r.phase {
                    Phase::Steady => "steady",
                    Phase::Shadow { .. } => "shadow",
                    Phase::Canary { .. } => "canary",
                };
                println!(
                    "{:<20} {:<10} {:<10} {:<10} {:>7}",
                    model,
                    r.champion.as_deref().unwrap_or("-"),
                    phase,
                    r.candidate().unwrap_or("-"),
                    r.canary_percent(&policy)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Rescore { rate } => {
            let crm = leadscore_postgres::connect(&config.postgres.url).await?;
            let p = leadscore_retrain::rescore::rescore_open_leads(
                &config.kafka,
                &registry,
                &crm,
                &cfg.rescore_topic,
                rate,
                |p| eprintln!("re-scoring: {} of {} open leads sent", p.sent, p.total),
            )
            .await?;
            println!(
                "{} open leads sent to {} for re-scoring",
                p.sent, cfg.rescore_topic
            );
            Ok(ExitCode::SUCCESS)
        }
        ModelCommand::Promote(t) | ModelCommand::Rollback(t) if t.by.contains('@') => {
            anyhow::bail!(
                "--by takes an operator id, not an email address ({})",
                t.model
            )
        }
        ModelCommand::Promote(t) => {
            command(&config, "promote", t, &[Stage::Promoted], registry).await
        }
        ModelCommand::Rollback(t) => {
            command(&config, "rollback", t, &[Stage::RolledBack], registry).await
        }
    }
}

/// Sends a command and waits for the controller's lifecycle event that carries it out.
async fn command(
    config: &Config,
    verb: &str,
    t: Target,
    stages: &[Stage],
    registry: leadscore_registry::Registry,
) -> anyhow::Result<ExitCode> {
    let cfg = &config.lifecycle;
    // Watch the lifecycle topic from its end before sending, so the answer is not missed.
    let watcher: StreamConsumer = leadscore_kafka::follower_config(
        &config.kafka,
        "leadscore-model-cli",
        leadscore_kafka::Start::Latest,
    )
    .create()?;
    watcher.subscribe(&[&cfg.lifecycle_topic])?;
    // Wait for the assignment so "latest" is resolved before the command goes out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while watcher.assignment().map(|a| a.count()).unwrap_or(0) == 0
        && tokio::time::Instant::now() < deadline
    {
        let _ = tokio::time::timeout(Duration::from_millis(200), watcher.recv()).await;
    }
    let producer: FutureProducer = leadscore_kafka::client_config(&config.kafka)
        .set("enable.idempotence", "true")
        .create()?;
    let body = serde_json::to_vec(&Command {
        command: verb.into(),
        model: t.model.clone(),
        by: t.by.clone(),
    })?;
    producer
        .send(
            FutureRecord::to(&cfg.commands_topic)
                .key(t.model.as_str())
                .payload(&body),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .with_context(|| format!("sending {verb} to {}", cfg.commands_topic))?;
    let decoder = leadscore_registry::Decoder::new(registry);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(t.wait_secs);
    while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, watcher.recv()).await {
        let Some(p) = m.payload() else { continue };
        let Ok(v) = decoder.decode(p).await else {
            continue;
        };
        if let Some(e) = LifecycleEvent::from_value(&v)
            && e.model_name == t.model
            && stages.contains(&e.stage)
            && e.reason.contains(&t.by)
        {
            println!(
                "{} v{}: {} ({})",
                e.model_name,
                e.version,
                e.stage.as_str(),
                e.reason
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    eprintln!(
        "error: no confirmation within {} s: is `leadscore model controller` running, and does {} have something to {verb}? (`leadscore model status`)",
        t.wait_secs, t.model
    );
    Ok(ExitCode::FAILURE)
}
