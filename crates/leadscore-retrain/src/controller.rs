//! The lifecycle controller (`leadscore model controller`).
//!
//! Follows the lifecycle topic (a version registered as challenger starts a
//! rollout), the window reports (per-version figures) and operators'
//! commands, and drives each model's [`Rollout`]: shadow, canary steps,
//! promotion, automatic rollback. Each step sets the MLflow aliases first
//! (scorers follow them on the lifecycle event), then publishes its events
//! in one Kafka transaction with the controller's checkpoint and offsets. A
//! restarted controller resumes from the checkpoint at the same step; a
//! second controller with the same transactional id fences the first.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use leadscore_config::{KafkaConfig, LifecycleConfig};
use leadscore_kafka::processor::{self, Cadence, Hooks, Out, Positions, Processor};
use leadscore_lifecycle::events::LifecycleEvent;
use leadscore_lifecycle::rollout::{Action, Rollout, RolloutPolicy, VersionWindow};
use leadscore_model::source::Mlflow;
use leadscore_registry::{Decoder, Encoder, Registry};
use leadscore_runtime::Liveness;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// The policy of the config.
pub fn policy(cfg: &LifecycleConfig) -> RolloutPolicy {
    RolloutPolicy {
        shadow_min_ms: cfg.shadow_min_ms,
        shadow_min_pairs: cfg.shadow_min_pairs,
        steps: cfg.steps.clone(),
        step_min_ms: cfg.step_min_ms,
        step_min_scores: cfg.step_min_scores,
        max_error_rate: cfg.max_error_rate,
        max_latency_regression: cfg.max_latency_regression,
        max_kpi_drop: cfg.max_kpi_drop,
        max_revenue_drop: cfg.max_revenue_drop,
    }
}

/// An operator's command on the commands topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// `promote` or `rollback`.
    pub command: String,
    /// Model.
    pub model: String,
    /// Operator id.
    pub by: String,
}

/// The controller's checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControllerState {
    /// Format version.
    pub format: u32,
    /// Rollouts by model.
    pub rollouts: BTreeMap<String, Rollout>,
    /// Next offset per input partition (`topic/partition`).
    pub positions: Positions,
}

impl processor::Checkpoint for ControllerState {
    fn positions(&self) -> &Positions {
        &self.positions
    }

    fn positions_mut(&mut self) -> &mut Positions {
        &mut self.positions
    }
}

/// Checkpoint key of a controller group.
pub fn state_key(group: &str) -> String {
    format!("{group}/state")
}

/// The running controller: the shared processor and the controller's own logic.
pub struct Controller {
    processor: Processor,
    logic: Logic,
}

/// What the controller does with each record and tick ([`Hooks`] of the processor).
struct Logic {
    cfg: LifecycleConfig,
    policy: RolloutPolicy,
    decoder: Decoder,
    encoder: Encoder,
    mlflow: Mlflow,
    state: ControllerState,
    liveness: Arc<Liveness>,
    rt: tokio::runtime::Handle,
    rescore: Option<RescoreWith>,
    shutdown: CancellationToken,
}

/// What re-scoring after a promotion needs.
#[derive(Clone)]
pub struct RescoreWith {
    /// Kafka.
    pub kafka: KafkaConfig,
    /// The schema registry.
    pub registry: Registry,
    /// The CRM database URL.
    pub crm_url: String,
}

impl Controller {
    /// Restores the checkpoint, assigns the inputs at its positions, readies the producer.
    pub async fn start(
        cfg: LifecycleConfig,
        kafka: &KafkaConfig,
        registry: Registry,
        liveness: Arc<Liveness>,
        rescore: Option<RescoreWith>,
    ) -> Result<Self> {
        let timeout = Duration::from_millis(kafka.request_timeout_ms.max(5_000));
        let encoder = Encoder::for_subject(
            &registry,
            &leadscore_schemas::value_subject(&cfg.lifecycle_topic),
            leadscore_schemas::find("ModelLifecycleEvent.avsc")
                .map_err(leadscore_registry::Error::from)?
                .text,
        )
        .await?;
        let mlflow = Mlflow::new(&cfg.mlflow_url).map_err(|e| Error::Checkpoint(e.to_string()))?;
        let (kc, c2) = (kafka.clone(), cfg.clone());
        let (processor, mut state) = tokio::task::spawn_blocking(move || {
            let key = state_key(&c2.group_id);
            Processor::start::<ControllerState>(
                &kc,
                &processor::Start {
                    group: &c2.group_id,
                    transactional_id: &c2.transactional_id,
                    client_id: "leadscore-lifecycle",
                    state_topic: &c2.state_topic,
                    state_key: &key,
                    inputs: &[&c2.lifecycle_topic, &c2.metrics_topic, &c2.commands_topic],
                    timeout,
                },
            )
        })
        .await
        .map_err(|e| Error::Checkpoint(format!("startup task: {e}")))??;
        state.format = 1;
        for (m, r) in &state.rollouts {
            tracing::info!(model = %m, phase = ?r.phase, champion = ?r.champion, "rollout restored");
        }
        liveness.started();
        let cfg_rate_positive = cfg.rescore_rate > 0;
        Ok(Self {
            processor,
            logic: Logic {
                policy: policy(&cfg),
                cfg,
                decoder: Decoder::new(registry),
                encoder,
                mlflow,
                state,
                liveness,
                rt: tokio::runtime::Handle::current(),
                rescore: rescore.filter(|_| cfg_rate_positive),
                shutdown: CancellationToken::new(),
            },
        })
    }

    /// Runs until `shutdown`; blocking.
    pub fn run(mut self, shutdown: &CancellationToken) -> Result<()> {
        self.logic.shutdown = shutdown.clone();
        let cadence = Cadence {
            poll: Duration::from_millis(100),
            tick: Duration::from_millis(self.logic.cfg.tick_ms),
            checkpoint: Duration::from_secs(5),
        };
        let liveness = self.logic.liveness.clone();
        self.processor
            .run(&mut self.logic, cadence, shutdown, || liveness.progressed())?;
        liveness.stopped();
        tracing::info!("lifecycle controller stopped");
        Ok(())
    }
}

impl Hooks for Logic {
    type State = ControllerState;
    type Error = Error;

    fn state(&mut self) -> &mut ControllerState {
        &mut self.state
    }

    fn on_record(&mut self, p: &Processor, at: crate::Position<'_>, payload: &[u8]) -> Result<()> {
        self.handle(p, at, payload)
    }

    fn on_tick(&mut self, p: &Processor) -> Result<bool> {
        let now = chrono::Utc::now().timestamp_millis();
        let before = self.state.rollouts.clone();
        for model in self.cfg.models.clone() {
            let policy = self.policy.clone();
            self.step(p, &model, |r| Ok(r.on_tick(&policy, now)))?;
        }
        Ok(self.state.rollouts != before)
    }
}

impl Logic {
    fn rollout(&mut self, model: &str) -> Option<&mut Rollout> {
        if !self.cfg.models.iter().any(|m| m == model) {
            return None;
        }
        Some(
            self.state
                .rollouts
                .entry(model.to_string())
                .or_insert_with(|| Rollout::new(model)),
        )
    }

    /// A model first seen without a champion in the events (registered
    /// outside the worker): its champion is what the MLflow alias names.
    fn learn_champion(&mut self, model: &str) {
        if self
            .state
            .rollouts
            .get(model)
            .is_some_and(|r| r.champion.is_some())
        {
            return;
        }
        let selector = leadscore_model::source::Selector::Alias("champion".into());
        if let Ok(v) = self.rt.block_on(self.mlflow.version(model, &selector))
            && let Some(r) = self.state.rollouts.get_mut(model)
        {
            tracing::info!(model, version = %v.version, "champion taken from the MLflow alias");
            // Committed with the next checkpoint: a record or a tick that changes the
            // rollouts marks the state changed.
            r.champion = Some(v.version);
        }
    }

    fn handle(&mut self, p: &Processor, at: crate::Position<'_>, payload: &[u8]) -> Result<()> {
        let topic = at.0;
        let now = chrono::Utc::now().timestamp_millis();
        if topic == self.cfg.commands_topic {
            let cmd: Command = match serde_json::from_slice(payload) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable command skipped");
                    return Ok(());
                }
            };
            let policy = self.policy.clone();
            let by = cmd.by.clone();
            let outcome = match cmd.command.as_str() {
                "promote" => self.step(p, &cmd.model, |r| {
                    r.promote_now(&by, &policy, now).map_err(Some)
                }),
                "rollback" => self.step(p, &cmd.model, |r| {
                    r.rollback_now(&by, &policy, now).map_err(Some)
                }),
                other => {
                    tracing::warn!(command = other, "unknown command skipped");
                    Ok(())
                }
            };
            return outcome;
        }
        let value = match self.rt.block_on(crate::decode_waiting(
            &self.decoder,
            payload,
            at,
            &self.liveness,
            &self.shutdown,
        )) {
            Ok(v) => v,
            // Stopped while the registry was out: the record is re-read after the restart.
            Err(e) if e.is_retryable() => return Err(e.into()),
            Err(e) => {
                tracing::warn!(topic, partition = at.1, offset = at.2, error = %e, "unreadable record skipped");
                return Ok(());
            }
        };
        if topic == self.cfg.lifecycle_topic {
            if let Some(e) = LifecycleEvent::from_value(&value) {
                let policy = self.policy.clone();
                self.step(p, &e.model_name.clone(), |r| {
                    Ok(r.on_event(&e, &policy, now))
                })?;
            }
        } else if let Some((model, version, start, w)) = VersionWindow::from_report(&value)
            && let Some(r) = self.rollout(&model)
        {
            r.on_window(&version, start, w);
        }
        Ok(())
    }

    /// Applies a decision: on success the aliases are set and the events published; on an MLflow
    /// failure the rollout is left as it was and the step is retried at the next tick.
    fn step(
        &mut self,
        p: &Processor,
        model: &str,
        decide: impl FnOnce(&mut Rollout) -> std::result::Result<Vec<Action>, Option<String>>,
    ) -> Result<()> {
        if self.rollout(model).is_none() {
            return Ok(());
        }
        self.learn_champion(model);
        let Some(r) = self.rollout(model) else {
            return Ok(());
        };
        let before = r.clone();
        let actions = match decide(r) {
            Ok(a) => a,
            Err(why) => {
                if let Some(why) = why {
                    tracing::warn!(model, reason = %why, "command refused");
                }
                return Ok(());
            }
        };
        if actions.is_empty() {
            return Ok(());
        }
        let (aliases, events): (Vec<_>, Vec<_>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::Alias { .. }));
        let events: Vec<LifecycleEvent> = events
            .into_iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some(e),
                Action::Alias { .. } => None,
            })
            .collect();
        // The aliases change inside the open transaction, once the broker has accepted it:
        // a fenced controller stops before it touches MLflow.
        let outs = events
            .iter()
            .map(|e| {
                Ok(Out {
                    topic: self.cfg.lifecycle_topic.clone(),
                    key: e.model_name.clone(),
                    value: self.encoder.encode(e.to_value())?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (rt, mlflow) = (&self.rt, &self.mlflow);
        // The aliases change inside the open transaction, once the broker has accepted its
        // records: a fenced controller fails before it touches MLflow.
        let applied = p.commit(&self.state, &outs, || {
            for a in &aliases {
                let Action::Alias { alias, version } = a else {
                    continue;
                };
                let done = match version {
                    Some(v) => rt.block_on(mlflow.set_alias(model, alias, v)),
                    None => rt.block_on(mlflow.delete_alias(model, alias)),
                };
                if let Err(e) = done {
                    tracing::error!(model, alias, ?version, error = %e, "MLflow alias not changed; the step is retried");
                    return false;
                }
            }
            true
        })?;
        if applied {
            self.liveness.progressed();
        }
        if !applied {
            self.state.rollouts.insert(model.to_string(), before);
            return Ok(());
        }
        for e in &events {
            tracing::warn!(model, version = %e.version, stage = e.stage.as_str(), canary_percent = e.canary_percent, reason = %e.reason, "lifecycle step");
        }
        let promoted = events
            .iter()
            .any(|e| e.stage == leadscore_lifecycle::events::Stage::Promoted);
        if promoted && let Some(with) = self.rescore.clone() {
            let (topic, rate, model) = (
                self.cfg.rescore_topic.clone(),
                self.cfg.rescore_rate,
                model.to_string(),
            );
            self.rt
                .spawn(async move { rescore_after_promotion(with, topic, rate, model).await });
        }
        Ok(())
    }
}

/// Re-scores open leads with the new champion; progress and outcome go to the log.
async fn rescore_after_promotion(with: RescoreWith, topic: String, rate: u32, model: String) {
    let crm = match leadscore_postgres::connect(&with.crm_url).await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%model, error = %e, "re-scoring after promotion skipped: the CRM database is unreachable; run `leadscore model rescore`");
            return;
        }
    };
    tracing::info!(%model, %topic, rate, "re-scoring open leads with the new champion");
    let done =
        crate::rescore::rescore_open_leads(&with.kafka, &with.registry, &crm, &topic, rate, |p| {
            tracing::info!(%model, sent = p.sent, total = p.total, "re-scoring open leads");
        })
        .await;
    match done {
        Ok(p) => tracing::info!(%model, sent = p.sent, "re-scoring open leads done"),
        Err(e) => {
            tracing::error!(%model, error = %e, "re-scoring open leads failed; run `leadscore model rescore`")
        }
    }
}
