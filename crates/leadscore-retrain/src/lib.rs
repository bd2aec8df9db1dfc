//! The retrain trigger (`leadscore retrain`).
//!
//! Reads hourly window reports (`leadscore.metrics.v1`), alerts
//! (`leadscore.alerts.v1`) and retrain requests
//! (`leadscore.retrain.requests.v1`, its own and manual ones, which restart
//! the cooldown); checks the schedule every `tick_ms`. Each candidate the
//! policies raise ([`leadscore_lifecycle::retrain`]) goes through the gates:
//! cooldown, then the labelled rows of the data window counted in the CRM
//! database. A request is produced in one Kafka transaction with the
//! trigger's checkpoint (per-model state and input positions, in the
//! compacted state topic) and the consumer offsets, so a crash never sends a
//! request twice or forgets a streak. Every decision is logged and counted
//! (`leadscore_retrain_decisions_total{trigger, outcome}`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::types::Value;
use leadscore_config::{KafkaConfig, RetrainConfig};
use leadscore_kafka::processor::{self, Cadence, CommitError, Hooks, Out, Positions, Processor};
use leadscore_kafka::txn::TxnError;
use leadscore_lifecycle::retrain::{
    Candidate, DataWindow, Decision, Evidence, ModelState, Policy, ReportView, Request, Trigger,
    request_time,
};
use leadscore_registry::{Decoder, Encoder, Registry};
use leadscore_runtime::prom::{Kind, Page};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub mod controller;
pub mod rescore;
pub mod worker;

/// Errors that stop the trigger (it restarts from its last checkpoint).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kafka call failed.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What was being done.
        context: String,
        /// The error.
        source: KafkaError,
    },
    /// The schema registry failed.
    #[error("schema registry: {0}")]
    Registry(#[from] leadscore_registry::Error),
    /// Reading checkpoints or topics failed.
    #[error(transparent)]
    Topics(#[from] leadscore_kafka::Error),
    /// The checkpoint could not be read or written.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// The CRM database could not be asked.
    #[error("CRM database: {0}")]
    Crm(String),
    /// Another instance with the same transactional id has started: this one must stop.
    #[error(
        "fenced: another instance with transactional id `{0}` took over ({1}); this one stops without acting. Run one instance per transactional id"
    )]
    Fenced(String, String),
    /// A transaction failed; its class says whether the service may go on.
    #[error(transparent)]
    Txn(#[from] TxnError),
}

impl From<CommitError> for Error {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::Txn(t) => Error::Txn(t),
            CommitError::Kafka(k) => Error::Topics(k),
            other => Error::Checkpoint(other.to_string()),
        }
    }
}

impl From<processor::StartError> for Error {
    fn from(e: processor::StartError) -> Self {
        match e {
            processor::StartError::Txn(t) => Error::Txn(t),
            processor::StartError::Kafka(k) => Error::Topics(k),
            other => Error::Checkpoint(other.to_string()),
        }
    }
}

impl Error {
    /// Whether restarting from the last committed checkpoint can recover (abortable or
    /// retriable); fenced, fatal and everything else stop the service.
    pub fn rewinds(&self) -> bool {
        matches!(self, Error::Txn(e) if !e.class.stops())
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn kerr(context: impl Into<String>) -> impl FnOnce(KafkaError) -> Error {
    let context = context.into();
    move |source| Error::Kafka { context, source }
}

/// The policy of the config.
pub fn policy(cfg: &RetrainConfig) -> Policy {
    Policy {
        psi_sustained: cfg.psi_sustained,
        sustained_windows: cfg.sustained_windows,
        psi_immediate: cfg.psi_immediate,
        young_every_ms: cfg.young_every_ms,
        mature_every_ms: cfg.mature_every_ms,
        young_for_ms: cfg.young_for_ms,
        cooldown_ms: cfg.cooldown_ms,
        min_labelled_rows: cfg.min_labelled_rows,
        min_valued_wins: cfg.min_valued_wins,
    }
}

/// Labelled leads (converted or lost) created in the data window (the `months` before the
/// newest lead, as the training job selects them), and of those the won deals with a value.
pub const LABELLED_SQL: &str = "SELECT count(*), \
     count(*) FILTER (WHERE status = 'converted' AND deal_value IS NOT NULL) FROM public.leads \
     WHERE status IN ('converted', 'lost') \
       AND created_at >= (SELECT max(created_at) FROM public.leads) - make_interval(months => $1)";

/// Counts the labelled rows and valued wins of the data window in the CRM.
pub async fn labelled_rows(client: &leadscore_postgres::Client, months: i32) -> Result<DataWindow> {
    let row = tokio::time::timeout(
        Duration::from_secs(10),
        client.query_one(LABELLED_SQL, &[&months]),
    )
    .await
    .map_err(|_| Error::Crm("the labelled-rows count timed out".into()))?
    .map_err(|e| Error::Crm(e.to_string()))?;
    let count = |i: usize| -> Result<u64> {
        let n: i64 = row.try_get(i).map_err(|e| Error::Crm(e.to_string()))?;
        Ok(n.max(0) as u64)
    };
    Ok(DataWindow {
        labelled: count(0)?,
        valued_wins: count(1)?,
    })
}

/// Counters of decisions and inputs.
#[derive(Default)]
pub struct Metrics {
    decisions: Mutex<BTreeMap<(String, String), u64>>,
    reports: std::sync::atomic::AtomicU64,
    /// The trigger's readiness rule.
    pub liveness: Arc<leadscore_runtime::Liveness>,
}

impl Metrics {
    /// New metrics.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn decision(&self, trigger: Trigger, outcome: &str) {
        if let Ok(mut d) = self.decisions.lock() {
            *d.entry((trigger.as_str().into(), outcome.into()))
                .or_default() += 1;
        }
        opentelemetry::global::meter("leadscore-retrain")
            .u64_counter("leadscore.retrain.decisions")
            .build()
            .add(
                1,
                &[
                    opentelemetry::KeyValue::new("trigger", trigger.as_str()),
                    opentelemetry::KeyValue::new("outcome", outcome.to_string()),
                ],
            );
    }

    /// Decisions of a trigger and outcome so far.
    pub fn decisions(&self, trigger: &str, outcome: &str) -> u64 {
        self.decisions
            .lock()
            .ok()
            .and_then(|d| d.get(&(trigger.to_string(), outcome.to_string())).copied())
            .unwrap_or(0)
    }

    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut page = Page::new();
        page.family(
            "leadscore_retrain_decisions_total",
            Kind::Counter,
            "Retrain decisions by trigger and outcome.",
        );
        if let Ok(d) = self.decisions.lock() {
            for ((t, o), n) in d.iter() {
                page.sample(
                    "leadscore_retrain_decisions_total",
                    &[("trigger", t), ("outcome", o)],
                    n,
                );
            }
        }
        page.counter(
            "leadscore_retrain_reports_total",
            "Hourly window reports read.",
            self.reports.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.liveness.write(&mut page, "retrain");
        page.finish()
    }
}

impl leadscore_runtime::Status for Metrics {
    fn readiness(&self) -> Result<(), leadscore_runtime::NotReady> {
        self.liveness.readiness()
    }

    fn metrics(&self) -> String {
        self.render()
    }
}

/// The checkpoint: every model's state and the next offset of every input partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Checkpoint {
    format: u32,
    models: BTreeMap<String, ModelState>,
    positions: Positions,
}

impl processor::Checkpoint for Checkpoint {
    fn positions(&self) -> &Positions {
        &self.positions
    }

    fn positions_mut(&mut self) -> &mut Positions {
        &mut self.positions
    }
}

/// A candidate from a firing critical PSI alert.
fn alert_candidate(value: &Value) -> Option<Candidate> {
    let Value::Record(fields) = value else {
        return None;
    };
    let get = |name: &str| leadscore_schemas::Fields::new(fields).get(name);
    let string = |name: &str| match get(name)? {
        Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
        _ => None,
    };
    let double = |name: &str| match get(name)? {
        Value::Double(d) => Some(*d),
        _ => None,
    };
    let kind = string("kind")?;
    if string("status")? != "firing"
        || string("severity")? != "critical"
        || !(kind == "psi" || kind == "score_psi")
    {
        return None;
    }
    let feature = string("feature");
    let value = double("value")?;
    Some(Candidate {
        model_name: string("model_name")?,
        trigger: Trigger::Drift,
        reason: format!(
            "critical alert: {}",
            string("message").unwrap_or_else(|| format!("{kind} {value:.3}"))
        ),
        evidence: vec![Evidence {
            kind,
            feature,
            value,
            threshold: double("threshold")?,
            window_start_ms: match get("window_start") {
                Some(Value::TimestampMillis(t)) => Some(*t),
                _ => None,
            },
        }],
        requested_by: None,
    })
}

/// The running trigger: the shared processor and the trigger's own logic.
pub struct RetrainTrigger {
    processor: Processor,
    logic: Logic,
}

/// What the trigger does with each record and tick ([`Hooks`] of the processor).
struct Logic {
    cfg: RetrainConfig,
    policy: Policy,
    decoder: Decoder,
    encoder: Encoder,
    crm_url: String,
    crm: Option<leadscore_postgres::Client>,
    state: Checkpoint,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Handle,
    shutdown: CancellationToken,
}

impl RetrainTrigger {
    /// Restores the checkpoint, assigns the inputs at its positions, readies the producer.
    pub async fn start(
        cfg: RetrainConfig,
        kafka: &KafkaConfig,
        registry: Registry,
        crm_url: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let timeout = Duration::from_millis(kafka.request_timeout_ms.max(5_000));
        let encoder = Encoder::for_subject(
            &registry,
            &leadscore_schemas::value_subject(&cfg.requests_topic),
            leadscore_schemas::find("RetrainRequest.avsc")
                .map_err(leadscore_registry::Error::from)?
                .text,
        )
        .await?;
        let (kc, c2) = (kafka.clone(), cfg.clone());
        let (processor, mut state) = tokio::task::spawn_blocking(move || {
            let key = format!("{}/state", c2.group_id);
            Processor::start::<Checkpoint>(
                &kc,
                &processor::Start {
                    group: &c2.group_id,
                    transactional_id: &c2.transactional_id,
                    client_id: "leadscore-retrain",
                    state_topic: &c2.state_topic,
                    state_key: &key,
                    inputs: &[&c2.metrics_topic, &c2.alerts_topic, &c2.requests_topic],
                    timeout,
                },
            )
        })
        .await
        .map_err(|e| Error::Checkpoint(format!("startup task: {e}")))??;
        state.format = 1;
        tracing::info!(models = ?state.models.keys().collect::<Vec<_>>(), "retrain trigger state restored");
        metrics.liveness.started();
        Ok(Self {
            processor,
            logic: Logic {
                policy: policy(&cfg),
                cfg,
                decoder: Decoder::new(registry),
                encoder,
                crm_url,
                crm: None,
                state,
                metrics,
                rt: tokio::runtime::Handle::current(),
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
        let liveness = self.logic.metrics.liveness.clone();
        self.processor
            .run(&mut self.logic, cadence, shutdown, || liveness.progressed())?;
        tracing::info!("retrain trigger stopped");
        Ok(())
    }
}

impl Hooks for Logic {
    type State = Checkpoint;
    type Error = Error;

    fn state(&mut self) -> &mut Checkpoint {
        &mut self.state
    }

    fn on_record(&mut self, p: &Processor, at: Position<'_>, payload: &[u8]) -> Result<()> {
        let topic = at.0;
        let value = match self.rt.block_on(decode_waiting(
            &self.decoder,
            payload,
            at,
            &self.metrics.liveness,
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
        if topic == self.cfg.requests_topic {
            if let Some((model, at)) = request_time(&value) {
                self.state.models.entry(model).or_default().requested(at);
            }
        } else if topic == self.cfg.metrics_topic {
            if let Some(r) = ReportView::from_value(&value) {
                self.metrics
                    .reports
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let state = self.state.models.entry(r.model_name.clone()).or_default();
                if let Some(c) = state.on_report(&r, &self.policy) {
                    self.decide(p, c)?;
                }
            }
        } else if let Some(c) = alert_candidate(&value) {
            self.decide(p, c)?;
        }
        Ok(())
    }

    fn on_tick(&mut self, p: &Processor) -> Result<bool> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut changed = false;
        for model in self.cfg.models.clone() {
            let state = self.state.models.entry(model.clone()).or_default();
            let before = state.clone();
            let candidate = state.on_tick(&model, now, &self.policy);
            changed |= *state != before;
            if let Some(c) = candidate {
                self.decide(p, c)?;
            }
        }
        Ok(changed)
    }
}

impl Logic {
    fn labelled(&mut self) -> Result<DataWindow> {
        let months = self.cfg.data_window_months;
        let url = self.crm_url.clone();
        let client = &mut self.crm;
        self.rt.block_on(async {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                let c = tokio::time::timeout(
                    Duration::from_secs(10),
                    leadscore_postgres::connect(&url),
                )
                .await
                .map_err(|_| Error::Crm("connecting timed out".into()))?
                .map_err(|e| Error::Crm(e.to_string()))?;
                *client = Some(c);
            }
            match client.as_ref() {
                Some(c) => labelled_rows(c, months).await,
                None => Err(Error::Crm("no connection".into())),
            }
        })
    }

    fn decide(&mut self, p: &Processor, c: Candidate) -> Result<()> {
        let now = chrono::Utc::now().timestamp_millis();
        let labelled = match self.labelled() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(model = %c.model_name, trigger = c.trigger.as_str(), reason = %c.reason, error = %e, "not now: the CRM cannot say how much labelled data there is");
                self.metrics.decision(c.trigger, "crm_unavailable");
                return Ok(());
            }
        };
        let state = self.state.models.entry(c.model_name.clone()).or_default();
        match state.gate(c, now, labelled, &self.policy) {
            Decision::NotNow(c, why) => {
                tracing::info!(model = %c.model_name, trigger = c.trigger.as_str(), reason = %c.reason, refusal = %why, "retrain: not now");
                self.metrics.decision(c.trigger, why.as_str());
                Ok(())
            }
            Decision::Request(c) => {
                let request = Request {
                    request_id: uuid::Uuid::new_v4().to_string(),
                    candidate: c,
                    requested_at_ms: now,
                };
                self.state
                    .models
                    .entry(request.candidate.model_name.clone())
                    .or_default()
                    .requested(now);
                let value = self.encoder.encode(request.to_value())?;
                let out = Out {
                    topic: self.cfg.requests_topic.clone(),
                    key: request.candidate.model_name.clone(),
                    value,
                };
                p.commit(&self.state, &[out], || true)?;
                self.metrics.liveness.progressed();
                tracing::warn!(model = %request.candidate.model_name, trigger = request.candidate.trigger.as_str(), request_id = %request.request_id, labelled = labelled.labelled, valued_wins = labelled.valued_wins, reason = %request.candidate.reason, "retrain requested");
                self.metrics
                    .decision(request.candidate.trigger, "requested");
                Ok(())
            }
        }
    }
}

/// Where a record was read: topic, partition, offset.
pub use leadscore_kafka::processor::Position;

/// Decodes a control-topic record, waiting while the registry is unreachable (each failed
/// try counts towards a stuck loop in `liveness`) until it answers or `shutdown`.
pub async fn decode_waiting(
    decoder: &Decoder,
    payload: &[u8],
    at: Position<'_>,
    liveness: &leadscore_runtime::Liveness,
    shutdown: &CancellationToken,
) -> std::result::Result<Value, leadscore_registry::Error> {
    decoder
        .decode_waiting(payload, |e, attempt| {
            let in_a_row = liveness.aborted();
            tracing::warn!(topic = at.0, partition = at.1, offset = at.2, attempt, in_a_row, error = %e, "schema registry unreachable; waiting to read the record (it is not skipped)");
            !shutdown.is_cancelled()
        })
        .await
}

/// An operator's request.
#[derive(Debug, Clone, Copy)]
pub struct Manual<'a> {
    /// Model to retrain.
    pub model: &'a str,
    /// Why.
    pub reason: &'a str,
    /// Operator id (never an email).
    pub by: Option<&'a str>,
    /// Send even with too little labelled data.
    pub force: bool,
}

/// Publishes a manual request (not transactional: an operator's command), after checking the data.
/// `Ok(Err(why))` when the data gate refuses it.
pub async fn request_manually(
    cfg: &RetrainConfig,
    kafka: &KafkaConfig,
    registry: &Registry,
    crm: &leadscore_postgres::Client,
    m: Manual<'_>,
) -> Result<Result<Request, String>> {
    let Manual {
        model,
        reason,
        by,
        force,
    } = m;
    let labelled = labelled_rows(crm, cfg.data_window_months).await?;
    let p = policy(cfg);
    let candidate = Candidate {
        model_name: model.to_string(),
        trigger: Trigger::Manual,
        reason: reason.to_string(),
        evidence: Vec::new(),
        requested_by: by.map(str::to_string),
    };
    let now = chrono::Utc::now().timestamp_millis();
    let candidate = match ModelState::default().gate(candidate, now, labelled, &p) {
        Decision::Request(c) => c,
        Decision::NotNow(c, why) if force => {
            tracing::warn!(refusal = %why, "forced past the gate");
            c
        }
        Decision::NotNow(_, why) => return Ok(Err(why.to_string())),
    };
    let request = Request {
        request_id: uuid::Uuid::new_v4().to_string(),
        candidate,
        requested_at_ms: now,
    };
    let encoder = Encoder::for_subject(
        registry,
        &leadscore_schemas::value_subject(&cfg.requests_topic),
        leadscore_schemas::find("RetrainRequest.avsc")
            .map_err(leadscore_registry::Error::from)?
            .text,
    )
    .await?;
    let bytes = encoder.encode(request.to_value())?;
    let producer: rdkafka::producer::FutureProducer = leadscore_kafka::client_config(kafka)
        .set("enable.idempotence", "true")
        .create()
        .map_err(kerr("creating the producer"))?;
    producer
        .send(
            FutureRecord::to(&cfg.requests_topic)
                .key(model)
                .payload(bytes.as_slice()),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| kerr(format!("producing to {}", cfg.requests_topic))(e))?;
    Ok(Ok(request))
}
