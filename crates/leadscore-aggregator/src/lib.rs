//! The drift aggregator service (`leadscore drift`).
//!
//! Reads live scores (`leads.scores.v1`) and shadow scores
//! (`leads.scores.shadow.v1`), counts them into event-time windows per input
//! partition ([`leadscore_drift::state::SourceState`]), and releases each
//! window as a partial aggregate to the internal partials topic once the
//! partition's watermark minus the allowed lateness has passed it. The merger
//! ([`leadscore_drift::state::Merger`], in the instance with `drift.merge`)
//! reads the partials, and when every partition has passed a window it
//! publishes one `WindowReport` per model version to `leadscore.metrics.v1`
//! (hourly windows and their daily and weekly roll-ups) and the alerts the
//! hourly report raises to `leadscore.alerts.v1`.
//!
//! Exactly once: every `checkpoint_ms`, one Kafka transaction carries the
//! outputs, a checkpoint of the state of every changed partition (to the
//! compacted state topic, with the next input offset inside) and the input
//! offsets. On start the latest checkpoints are read back and reading
//! resumes at their offsets, so a crash anywhere gives the same reports as
//! an uninterrupted run. Partitions are assigned statically
//! (`drift.partitions`), so instances on disjoint partitions never contend.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leadscore_config::{DriftConfig, KafkaConfig};
use leadscore_drift::alerts::{AlertEvent, Thresholds, evaluate};
use leadscore_drift::report::{WindowKind, WindowReport};
use leadscore_drift::state::{
    Completed, Merger, Observed, Partial, Profiles, ScoreEvent, ShadowEvent, SourceState,
};
use leadscore_drift::{Profile, Window};
use leadscore_features::RawValue;
use leadscore_kafka::txn::{Transactional, TxnError};
use leadscore_registry::{Encoder, Registry};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

pub mod decode;
pub mod metrics;
pub mod route;

pub use metrics::{Event, Metrics};

/// Errors that stop the aggregator. It restarts from its last checkpoint.
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
    /// A reference profile could not be loaded.
    #[error("reference profile of {model}: {reason}")]
    Profile {
        /// Model URL or version.
        model: String,
        /// Why.
        reason: String,
    },
    /// A checkpoint or partial could not be read.
    #[error("{what} at {topic}/{partition}@{offset} is unreadable: {reason}")]
    State {
        /// Checkpoint or partial.
        what: &'static str,
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// Offset.
        offset: i64,
        /// Parser message.
        reason: String,
    },
    /// Configuration does not fit the cluster.
    #[error("{0}")]
    Config(String),
    /// A checkpoint transaction failed (its class says whether the service may go on).
    #[error(transparent)]
    Txn(#[from] TxnError),
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

/// Loads the reference profile of each model URL, by model version.
pub async fn load_profiles(urls: &[String]) -> Result<(Profiles, BTreeMap<String, String>)> {
    let mut profiles = Profiles::new();
    let mut names = BTreeMap::new();
    for url in urls {
        let source =
            leadscore_model::source::ModelSource::parse(url).map_err(|e| Error::Profile {
                model: url.clone(),
                reason: e.to_string(),
            })?;
        let (version, name, reference, feature_spec) = match &source {
            leadscore_model::source::ModelSource::Dir(dir) => {
                let path = dir.join("metadata.json");
                let text = std::fs::read_to_string(&path).map_err(|e| Error::Profile {
                    model: url.clone(),
                    reason: format!("{}: {e}", path.display()),
                })?;
                let meta =
                    leadscore_model::Metadata::parse(url, &text).map_err(|e| Error::Profile {
                        model: url.clone(),
                        reason: e.to_string(),
                    })?;
                (
                    meta.version,
                    meta.model_name,
                    meta.reference,
                    meta.feature_spec,
                )
            }
            leadscore_model::source::ModelSource::Mlflow {
                base,
                name,
                selector,
            } => {
                let client =
                    leadscore_model::source::Mlflow::new(base).map_err(|e| Error::Profile {
                        model: url.clone(),
                        reason: e.to_string(),
                    })?;
                let (_, meta) =
                    client
                        .download(name, selector)
                        .await
                        .map_err(|e| Error::Profile {
                            model: url.clone(),
                            reason: e.to_string(),
                        })?;
                (
                    meta.version,
                    meta.model_name,
                    meta.reference,
                    meta.feature_spec,
                )
            }
        };
        // The feature spec says which features are calendar features.
        let profile = Profile::from_metadata(
            &serde_json::json!({ "reference": reference, "feature_spec": feature_spec }),
        )
        .map_err(|e| Error::Profile {
            model: url.clone(),
            reason: e.to_string(),
        })?;
        tracing::info!(model = %name, version = %version, features = profile.features.len(), %source, "reference profile loaded");
        names.insert(version.clone(), name);
        profiles.insert(version, Arc::new(profile));
    }
    Ok((profiles, names))
}

/// What one completed window is judged on for alerts.
#[derive(Debug, Default)]
struct Judged {
    /// The features it judges.
    features: Vec<leadscore_drift::FeatureDrift>,
    /// The score's PSI and sample, when it judges the score.
    score: Option<(f64, u64)>,
    /// The features (and `None`, the score) whose alerts it may fire or resolve.
    scope: Vec<Option<String>>,
}

/// Thresholds of the config in the drift crate's terms.
pub fn thresholds(cfg: &DriftConfig) -> Thresholds {
    let t = &cfg.thresholds;
    Thresholds {
        psi_warning: t.psi_warning,
        psi_critical: t.psi_critical,
        kl_warning: t.kl_warning,
        alpha: t.alpha,
        min_sample: t.min_sample,
        effect_psi: t.effect_psi,
        new_category_rate: t.new_category_rate,
        missing_rate_increase: t.missing_rate_increase,
        missing_rate_effect: t.missing_rate_effect,
    }
}

/// Consumer settings: manual offsets, read_committed, positions from checkpoints.
pub fn consumer_config(kafka: &KafkaConfig, cfg: &DriftConfig) -> rdkafka::ClientConfig {
    let mut c = leadscore_kafka::client_config(kafka);
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("fetch.min.bytes", "65536")
        .set("fetch.wait.max.ms", "100")
        .set("queued.min.messages", "200000")
        .set("client.id", format!("leadscore-drift-{}", cfg.instance_id));
    c
}

/// Transactional producer settings: the shared ones, and room for large window reports.
pub fn producer_config(kafka: &KafkaConfig, cfg: &DriftConfig) -> rdkafka::ClientConfig {
    let mut c = leadscore_kafka::txn::transactional_config(
        kafka,
        &cfg.transactional_id(),
        cfg.transaction_timeout_ms,
        &format!("leadscore-drift-{}", cfg.instance_id),
    );
    c.set("message.max.bytes", "10000000");
    c
}

/// Checkpoint key of an input partition.
fn source_key(group: &str, topic: &str, partition: i32) -> String {
    format!("{group}/{topic}/{partition}")
}

/// Checkpoint key of the merger.
fn merger_key(group: &str) -> String {
    format!("{group}/merger")
}

/// Which kind of input a topic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Input {
    Scores,
    Shadow,
    Partials,
}

/// Schema ids whose writer schema is the one the fast decoders read.
/// The writer schemas the direct decoders read: the ones in `schemas/` (with reasons) and
/// the same without the `reasons` fields (records of scorers from before reasons, read
/// through an upgrade).
struct Schemas {
    registry: Registry,
    scores: [String; 2],
    shadow: [String; 2],
    verdicts: HashMap<u32, Option<decode::Layout>>,
}

impl Schemas {
    fn new(registry: Registry) -> Result<Self> {
        Ok(Self {
            registry,
            scores: [
                canonical("LeadScore.avsc", false)?,
                canonical("LeadScore.avsc", true)?,
            ],
            shadow: [
                canonical("ShadowScore.avsc", false)?,
                canonical("ShadowScore.avsc", true)?,
            ],
            verdicts: HashMap::new(),
        })
    }

    /// How records of writer schema `id` are laid out, or `None` when they cannot be read.
    fn layout(
        &mut self,
        rt: &tokio::runtime::Handle,
        id: u32,
        input: Input,
    ) -> Result<Option<decode::Layout>> {
        if let Some(v) = self.verdicts.get(&id) {
            return Ok(*v);
        }
        let writer = rt
            .block_on(self.registry.schema_by_id(id))?
            .canonical_form();
        let known = if input == Input::Scores {
            &self.scores
        } else {
            &self.shadow
        };
        let layout = known
            .iter()
            .position(|k| *k == writer)
            .map(|i| decode::Layout { reasons: i == 0 });
        if layout.is_none() {
            tracing::error!(
                schema_id = id,
                ?input,
                "records of an unknown writer schema are skipped (the aggregator reads schemas/LeadScore.avsc and ShadowScore.avsc as written, with or without reasons)"
            );
        }
        self.verdicts.insert(id, layout);
        Ok(layout)
    }
}

/// The canonical form of a catalogue schema; `without_reasons` removes every field named
/// `reasons` first (the layout written before reasons existed).
fn canonical(file: &str, without_reasons: bool) -> Result<String> {
    let text = leadscore_schemas::find(file)
        .map_err(leadscore_registry::Error::from)?
        .text;
    let text = if without_reasons {
        let mut json: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("schema {file} is not JSON: {e}")))?;
        drop_reasons(&mut json);
        json.to_string()
    } else {
        text.to_string()
    };
    let schema = leadscore_schemas::parse(file, &text).map_err(leadscore_registry::Error::from)?;
    Ok(schema.canonical_form())
}

pub(crate) fn drop_reasons(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            if let Some(serde_json::Value::Array(fields)) = o.get_mut("fields") {
                fields.retain(|f| f.get("name").and_then(|n| n.as_str()) != Some("reasons"));
            }
            o.values_mut().for_each(drop_reasons);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_reasons),
        _ => {}
    }
}

struct Source {
    topic: String,
    partition: i32,
    name: String,
    state: SourceState,
    last_record: Instant,
    dirty: bool,
}

/// Whether a partition has nothing left to read: its position is at the
/// end, allowing for one transaction marker after the last record.
fn caught_up(consumer: &BaseConsumer, s: &Source, timeout: Duration) -> bool {
    let Ok((low, high)) = consumer.fetch_watermarks(&s.topic, s.partition, timeout) else {
        return false;
    };
    let position = s.state.next_offset.unwrap_or(low);
    high - position <= 1
}

/// The running aggregator.
pub struct Aggregator {
    consumer: BaseConsumer,
    producer: Transactional,
    timeout: Duration,
    core: Core,
}

/// Everything but the Kafka clients.
struct Core {
    cfg: DriftConfig,
    sizes: Vec<i64>,
    profiles: Profiles,
    sources: BTreeMap<(String, i32), Source>,
    expected: Vec<String>,
    merger: Option<(Merger, bool)>,
    thresholds: Thresholds,
    report_encoder: Encoder,
    alert_encoder: Encoder,
    schemas: Schemas,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Handle,
    features: BTreeMap<String, RawValue>,
    outcomes: Option<Outcomes>,
    profile_failures: HashMap<String, Instant>,
}

/// Where outcomes come from: the CRM database.
struct Outcomes {
    url: String,
    client: Option<leadscore_postgres::Client>,
}

/// The labelled leads of a window, by their latest score: converted or lost in `leads`, scored in `lead_scores`.
const OUTCOMES_SQL: &str = "SELECT s.score, s.band, l.status = 'converted', \
     l.deal_value::double precision \
     FROM public.lead_scores s JOIN public.leads l ON l.lead_id = s.lead_id \
     WHERE s.model_name = $1 AND s.model_version = $2 \
       AND s.event_time >= $3 AND s.event_time < $4 \
       AND l.status IN ('converted', 'lost')";

/// What one checkpoint produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Checkpointed {
    /// Partials produced.
    pub partials: usize,
    /// Reports produced.
    pub reports: usize,
    /// Alert events produced.
    pub alerts: usize,
}

impl Aggregator {
    /// Restores state from the checkpoints, assigns the input partitions and readies the producer.
    pub async fn start(
        cfg: DriftConfig,
        kafka_cfg: &KafkaConfig,
        registry: Registry,
        profiles: Profiles,
        postgres_url: Option<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let timeout = Duration::from_millis(kafka_cfg.request_timeout_ms.max(5_000));
        let schema_text = |f: &str| {
            leadscore_schemas::find(f)
                .map(|s| s.text)
                .map_err(leadscore_registry::Error::from)
        };
        let report_encoder = Encoder::for_subject(
            &registry,
            &leadscore_schemas::value_subject(&cfg.metrics_topic),
            schema_text("WindowReport.avsc")?,
        )
        .await?;
        let alert_encoder = Encoder::for_subject(
            &registry,
            &leadscore_schemas::value_subject(&cfg.alerts_topic),
            schema_text("Alert.avsc")?,
        )
        .await?;
        let schemas = Schemas::new(registry)?;
        let kc = kafka_cfg.clone();
        let c2 = cfg.clone();
        let (consumer, producer, checkpoints) = tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = consumer_config(&kc, &c2)
                .create()
                .map_err(kerr("creating the consumer"))?;
            let producer = Transactional::create(&producer_config(&kc, &c2), timeout)?;
            producer.init()?;
            // After init_transactions: an earlier incarnation's open transaction is aborted.
            let checkpoints = leadscore_kafka::latest::read_latest(
                &kc,
                &c2.state_topic,
                &format!("{}/", c2.group_id),
                timeout,
            )
            .map_err(|e| Error::Config(format!("restoring checkpoints: {e}")))?;
            Ok::<_, Error>((consumer, producer, checkpoints))
        })
        .await
        .map_err(|e| Error::Config(format!("startup task: {e}")))??;

        let mut sizes = vec![cfg.window_ms];
        sizes.extend(cfg.rollups_ms.iter().copied());
        let mut expected = Vec::new();
        let mut sources = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        let now = Instant::now();
        for topic in [&cfg.scores_topic, &cfg.shadow_topic] {
            let ids =
                leadscore_kafka::partitions(&consumer, topic, timeout).map_err(|e| match e {
                    leadscore_kafka::Error::Admin { action, source } => Error::Kafka {
                        context: action,
                        source,
                    },
                    // "topic … does not exist; run `leadscore topics apply`"
                    other => Error::Config(other.to_string()),
                })?;
            for p in ids {
                let name = format!("{topic}/{p}");
                expected.push(name.clone());
                if cfg
                    .partitions
                    .as_ref()
                    .is_some_and(|mine| !mine.contains(&p))
                {
                    continue;
                }
                let key = source_key(&cfg.group_id, topic, p);
                let state: SourceState = match checkpoints.get(&key) {
                    Some(st) => serde_json::from_slice(&st.value).map_err(|e| Error::State {
                        what: "checkpoint",
                        topic: cfg.state_topic.clone(),
                        partition: st.partition,
                        offset: st.offset,
                        reason: e.to_string(),
                    })?,
                    None => SourceState::default(),
                };
                let offset = state.next_offset.map_or(Offset::Beginning, Offset::Offset);
                tpl.add_partition_offset(topic, p, offset)
                    .map_err(kerr("assignment"))?;
                tracing::info!(source = %name, ?offset, restored = state.next_offset.is_some(), open_scores = state.open_scored(), "input partition assigned");
                sources.insert(
                    (topic.clone(), p),
                    Source {
                        topic: topic.clone(),
                        partition: p,
                        name,
                        state,
                        last_record: now,
                        dirty: false,
                    },
                );
            }
        }
        if let Some(mine) = &cfg.partitions
            && let Some(p) = mine.iter().find(|p| !sources.keys().any(|(_, q)| q == *p))
        {
            return Err(Error::Config(format!(
                "drift.partitions names partition {p}, which {} does not have",
                cfg.scores_topic
            )));
        }
        let merger = if cfg.merge {
            let key = merger_key(&cfg.group_id);
            let m: Merger = match checkpoints.get(&key) {
                Some(st) => serde_json::from_slice(&st.value).map_err(|e| Error::State {
                    what: "checkpoint",
                    topic: cfg.state_topic.clone(),
                    partition: st.partition,
                    offset: st.offset,
                    reason: e.to_string(),
                })?,
                None => Merger::default(),
            };
            let offset = m.next_offset.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(&cfg.partials_topic, 0, offset)
                .map_err(kerr("assignment"))?;
            tracing::info!(topic = %cfg.partials_topic, ?offset, pending = m.pending_windows(), "merger assigned");
            Some((m, false))
        } else {
            None
        };
        consumer
            .assign(&tpl)
            .map_err(kerr("assigning input partitions"))?;
        let thresholds = thresholds(&cfg);
        metrics.set_ready(true);
        Ok(Self {
            consumer,
            producer,
            timeout,
            core: Core {
                cfg,
                sizes,
                profiles,
                sources,
                expected,
                merger,
                thresholds,
                report_encoder,
                alert_encoder,
                schemas,
                metrics,
                rt: tokio::runtime::Handle::current(),
                features: BTreeMap::new(),
                outcomes: postgres_url.map(|url| Outcomes { url, client: None }),
                profile_failures: HashMap::new(),
            },
        })
    }

    /// Reads until `shutdown`, checkpointing every `checkpoint_ms`; a last checkpoint on the way out.
    pub fn run(mut self, shutdown: &CancellationToken) -> Result<()> {
        let every = Duration::from_millis(self.core.cfg.checkpoint_ms);
        let mut last = Instant::now();
        while !shutdown.is_cancelled() {
            if let Some(msg) = self.consumer.poll(Duration::from_millis(50)) {
                match msg {
                    Ok(m) => self.core.handle(&m)?,
                    Err(e) => tracing::warn!(error = %e, "consumer error (retried by librdkafka)"),
                }
            }
            if last.elapsed() >= every {
                self.checkpoint()?;
                last = Instant::now();
            }
        }
        let done = self.checkpoint()?;
        tracing::info!(
            partials = done.partials,
            reports = done.reports,
            "final checkpoint committed; stopping"
        );
        Ok(())
    }

    /// Releases windows, merges, and commits outputs, state and offsets in one transaction.
    pub fn checkpoint(&mut self) -> Result<Checkpointed> {
        let span = tracing::info_span!(
            "drift.checkpoint",
            partials = tracing::field::Empty,
            reports = tracing::field::Empty,
            alerts = tracing::field::Empty
        );
        let _entered = span.enter();
        let started = Instant::now();
        let idle = Duration::from_millis(self.core.cfg.idle_ms);
        let mut partials: Vec<Partial> = Vec::new();
        for s in self.core.sources.values_mut() {
            let mut p =
                s.state
                    .release(&s.name, self.core.cfg.window_ms, self.core.cfg.lateness_ms);
            if p.is_none()
                && !s.state.idle
                && s.last_record.elapsed() >= idle
                && caught_up(&self.consumer, s, self.timeout)
            {
                p = s.state.mark_idle(&s.name);
            }
            if let Some(p) = p {
                s.dirty = true;
                partials.push(p);
            }
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut reports = Vec::new();
        let mut alerts: Vec<AlertEvent> = Vec::new();
        let completed = match &mut self.core.merger {
            Some((m, dirty)) => {
                let done = m.complete(&self.core.expected, &self.core.sizes);
                *dirty |= !done.is_empty();
                done
            }
            None => Vec::new(),
        };
        for c in &completed {
            // The merger may see a version its partitions' instances profiled first.
            self.core.ensure_profile(&c.model_name, &c.model_version);
            let Some((report, judged)) = self.core.report(c, now_ms) else {
                continue;
            };
            if !judged.scope.is_empty()
                && report.scored > 0
                && let Some((m, _)) = &mut self.core.merger
            {
                let findings = evaluate(&judged.features, judged.score, &self.core.thresholds);
                alerts.extend(m.alerts.update_scoped(
                    &c.model_name,
                    &c.model_version,
                    (c.start_ms, c.end_ms),
                    findings,
                    |feature| judged.scope.contains(&feature.map(str::to_string)),
                ));
            }
            reports.push(report);
        }
        reports.extend(self.core.outcome_reports(&completed, now_ms));
        let dirty_sources = self.core.sources.values().filter(|s| s.dirty).count();
        let merger_dirty = self.core.merger.as_ref().is_some_and(|(_, d)| *d);
        if partials.is_empty() && reports.is_empty() && dirty_sources == 0 && !merger_dirty {
            return Ok(Checkpointed::default());
        }
        // Encode before the transaction begins: an encoding failure then leaves nothing open.
        let mut records: Vec<(&str, String, Vec<u8>)> = Vec::new();
        for p in &partials {
            let bytes = serde_json::to_vec(p)
                .map_err(|e| Error::Config(format!("encoding a partial: {e}")))?;
            records.push((&self.core.cfg.partials_topic, p.source.clone(), bytes));
        }
        for r in &reports {
            let key = format!(
                "{}/{}/{}/{}{}",
                r.model_name,
                r.model_version,
                r.end_ms - r.start_ms,
                r.start_ms,
                if r.outcomes.is_some() {
                    "/outcomes"
                } else {
                    ""
                }
            );
            records.push((
                &self.core.cfg.metrics_topic,
                key,
                self.core.report_encoder.encode(r.to_value())?,
            ));
        }
        for a in &alerts {
            records.push((
                &self.core.cfg.alerts_topic,
                a.fingerprint.clone(),
                self.core.alert_encoder.encode(a.to_value(now_ms))?,
            ));
            match a.severity {
                leadscore_drift::alerts::Severity::Info => {
                    tracing::info!(fingerprint = %a.fingerprint, status = ?a.status, "{}", a.message());
                }
                _ => {
                    tracing::warn!(fingerprint = %a.fingerprint, severity = ?a.severity, status = ?a.status, "{}", a.message());
                }
            }
        }
        let mut offsets = TopicPartitionList::new();
        for s in self.core.sources.values().filter(|s| s.dirty) {
            let bytes = serde_json::to_vec(&s.state)
                .map_err(|e| Error::Config(format!("encoding a checkpoint: {e}")))?;
            records.push((
                &self.core.cfg.state_topic,
                source_key(&self.core.cfg.group_id, &s.topic, s.partition),
                bytes,
            ));
            if let Some(o) = s.state.next_offset {
                offsets
                    .add_partition_offset(&s.topic, s.partition, Offset::Offset(o))
                    .map_err(kerr("offsets"))?;
            }
        }
        if let Some((m, true)) = &self.core.merger {
            let bytes = serde_json::to_vec(m)
                .map_err(|e| Error::Config(format!("encoding a checkpoint: {e}")))?;
            records.push((
                &self.core.cfg.state_topic,
                merger_key(&self.core.cfg.group_id),
                bytes,
            ));
            if let Some(o) = m.next_offset {
                offsets
                    .add_partition_offset(&self.core.cfg.partials_topic, 0, Offset::Offset(o))
                    .map_err(kerr("offsets"))?;
            }
        }
        // A failed commit stops the service: it restarts from the last committed checkpoint.
        let records: Vec<(&str, &str, &[u8])> = records
            .iter()
            .map(|(topic, key, bytes)| (*topic, key.as_str(), bytes.as_slice()))
            .collect();
        leadscore_kafka::processor::commit_records(
            &self.producer,
            &self.consumer,
            &records,
            &offsets,
            || true,
        )
        .map_err(|e| match e {
            leadscore_kafka::processor::CommitError::Txn(t) => Error::Txn(t),
            other => Error::Config(format!("checkpoint: {other}")),
        })?;
        self.core.metrics.liveness().progressed();
        for s in self.core.sources.values_mut() {
            s.dirty = false;
        }
        if let Some((_, d)) = &mut self.core.merger {
            *d = false;
        }
        let done = Checkpointed {
            partials: partials.len(),
            reports: reports.len(),
            alerts: alerts.len(),
        };
        span.record("partials", done.partials);
        span.record("reports", done.reports);
        span.record("alerts", done.alerts);
        self.core.metrics.add(Event::Partial, done.partials as u64);
        self.core.metrics.add(Event::Report, done.reports as u64);
        self.core.metrics.add(Event::Alert, done.alerts as u64);
        self.core.metrics.add(Event::Checkpoint, 1);
        self.core
            .metrics
            .set_checkpoint_ms(started.elapsed().as_millis() as u64);
        self.core.metrics.set_windows(
            self.core
                .sources
                .values()
                .map(|s| s.state.open_scored())
                .sum(),
            self.core
                .merger
                .as_ref()
                .map_or(0, |(m, _)| m.pending_windows() as u64),
        );
        for r in &reports {
            tracing::info!(
                model = %r.model_name, version = %r.model_version, kind = ?r.kind,
                start = r.start_ms, end = r.end_ms, scored = r.scored, late = r.late_events,
                score_psi = r.score_psi, "window report"
            );
        }
        Ok(done)
    }
}

impl Core {
    fn input(&self, topic: &str) -> Input {
        if topic == self.cfg.scores_topic {
            Input::Scores
        } else if topic == self.cfg.shadow_topic {
            Input::Shadow
        } else {
            Input::Partials
        }
    }

    fn handle(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) -> Result<()> {
        let topic = m.topic();
        let input = self.input(topic);
        if input == Input::Partials {
            let Some((merger, dirty)) = &mut self.merger else {
                return Ok(());
            };
            merger.next_offset = Some(m.offset() + 1);
            *dirty = true;
            if let Some(bytes) = m.payload() {
                let partial: Partial = serde_json::from_slice(bytes).map_err(|e| Error::State {
                    what: "partial",
                    topic: topic.to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    reason: e.to_string(),
                })?;
                merger
                    .add(partial, &self.sizes)
                    .map_err(|e| Error::Config(format!("merging a partial: {e}")))?;
            }
            return Ok(());
        }
        let key = (topic.to_string(), m.partition());
        let Some(source) = self.sources.get_mut(&key) else {
            return Ok(());
        };
        source.state.next_offset = Some(m.offset() + 1);
        source.last_record = Instant::now();
        source.dirty = true;
        let Some(payload) = m.payload() else {
            return Ok(()); // a tombstone: a deleted lead
        };
        let Ok((id, datum)) = leadscore_schemas::unframe(payload) else {
            self.metrics.add(Event::Malformed, 1);
            return Ok(());
        };
        let Some(layout) = self.schemas.layout(&self.rt, id, input)? else {
            self.metrics.add(Event::Malformed, 1);
            return Ok(());
        };
        let size = self.cfg.window_ms;
        let observed = match input {
            Input::Scores => match decode::lead_score(datum, &mut self.features) {
                Ok(s) => {
                    self.ensure_profile(s.model_name, s.model_version);
                    let Some(source) = self.sources.get_mut(&key) else {
                        return Ok(());
                    };
                    source.state.observe_score(
                        &self.profiles,
                        size,
                        &ScoreEvent {
                            model_name: s.model_name,
                            model_version: s.model_version,
                            event_ms: s.event_time_ms,
                            features: &self.features,
                            score: s.score,
                            latency_ms: s.latency_ms,
                        },
                    )
                }
                Err(e) => {
                    tracing::warn!(source = %topic, partition = m.partition(), offset = m.offset(), error = %e, "unreadable score skipped");
                    self.metrics.add(Event::Malformed, 1);
                    return Ok(());
                }
            },
            _ => match decode::shadow_score(datum, layout) {
                Ok(s) if s.failed => {
                    // A candidate's failure: an error of its own version.
                    self.ensure_profile(s.shadow_name, s.shadow_version);
                    let Some(source) = self.sources.get_mut(&key) else {
                        return Ok(());
                    };
                    let o = source.state.observe_error(
                        &self.profiles,
                        size,
                        s.shadow_name,
                        s.shadow_version,
                        s.event_time_ms,
                    );
                    if o == Observed::Counted {
                        self.metrics.add(Event::CandidateError, 1);
                        return Ok(());
                    }
                    o
                }
                Ok(s) => {
                    self.ensure_profile(s.live_name, s.live_version);
                    let Some(source) = self.sources.get_mut(&key) else {
                        return Ok(());
                    };
                    let o = source.state.observe_shadow(
                        &self.profiles,
                        size,
                        &ShadowEvent {
                            model_name: s.live_name,
                            model_version: s.live_version,
                            shadow_version: s.shadow_version,
                            event_ms: s.event_time_ms,
                            live: s.live,
                            shadow: s.shadow,
                            same_band: s.live_band == s.shadow_band,
                            same_top_reason: s
                                .live_top
                                .zip(s.shadow_top)
                                .map(|(live, shadow)| live == shadow),
                        },
                    );
                    if o == Observed::Counted {
                        self.metrics.add(Event::Shadow, 1);
                        return Ok(());
                    }
                    o
                }
                Err(e) => {
                    tracing::warn!(source = %topic, partition = m.partition(), offset = m.offset(), error = %e, "unreadable shadow score skipped");
                    self.metrics.add(Event::Malformed, 1);
                    return Ok(());
                }
            },
        };
        self.metrics.add(
            match observed {
                Observed::Counted => Event::Counted,
                Observed::Late => Event::Late,
                Observed::Unprofiled => Event::Unprofiled,
            },
            1,
        );
        Ok(())
    }

    /// Loads the reference profile of a version seen for the first time from
    /// MLflow (`drift.mlflow_url`), once; a failure is retried after a minute.
    fn ensure_profile(&mut self, model_name: &str, version: &str) {
        if self.profiles.contains_key(version) {
            return;
        }
        let Some(base) = self.cfg.mlflow_url.clone() else {
            return;
        };
        let now = Instant::now();
        if self
            .profile_failures
            .get(version)
            .is_some_and(|t| now.duration_since(*t) < Duration::from_secs(60))
        {
            return;
        }
        let url = format!("mlflow+{base}/{model_name}/{version}");
        match self.rt.block_on(load_profiles(std::slice::from_ref(&url))) {
            Ok((profiles, _)) if profiles.contains_key(version) => {
                self.profiles.extend(profiles);
                self.profile_failures.remove(version);
            }
            Ok(_) => {
                tracing::warn!(%url, "the registered version's metadata names another version; not profiled");
                self.profile_failures.insert(version.to_string(), now);
            }
            Err(e) => {
                tracing::warn!(%url, error = %e, "no reference profile for this version yet; its scores are not counted (retried in a minute)");
                self.profile_failures.insert(version.to_string(), now);
            }
        }
    }

    fn report(&self, c: &Completed, now_ms: i64) -> Option<(WindowReport, Judged)> {
        let profile = self.profiles.get(&c.model_version);
        let window = match (profile, &c.counts) {
            (Some(p), Some(counts)) => match Window::from_counts(p.clone(), counts.clone()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::error!(version = %c.model_version, error = %e, "counts do not fit this instance's profile; report skipped");
                    return None;
                }
            },
            (None, Some(_)) => {
                tracing::error!(version = %c.model_version, "the merger has no reference profile for this version; add it to drift.models");
                return None;
            }
            _ => None,
        };
        let mut features = window.as_ref().map(Window::report).unwrap_or_default();
        // What this window judges (`Profile::judges`): calendar features only in the smallest
        // window that holds their cycle, the score in the one that holds the hour of day when
        // the model takes it, everything else in the base window. The report says so, for
        // the retrain trigger.
        let mut judged = Judged::default();
        let mut score_judged = false;
        if let Some(p) = profile {
            for d in &mut features {
                d.judged = p.judges(Some(&d.feature), c.size_ms, &self.sizes);
                if d.judged {
                    judged.scope.push(Some(d.feature.clone()));
                    judged.features.push(d.clone());
                }
            }
            score_judged = p.judges(None, c.size_ms, &self.sizes);
            if score_judged {
                judged.scope.push(None);
                judged.score = window
                    .as_ref()
                    .and_then(|w| w.score_psi().map(|psi| (psi, w.score_sample())));
            }
        }
        let report = WindowReport {
            model_name: c.model_name.clone(),
            model_version: c.model_version.clone(),
            kind: WindowKind::of(c.size_ms),
            start_ms: c.start_ms,
            end_ms: c.end_ms,
            scored: window.as_ref().map_or(0, Window::scored),
            late_events: c.late,
            errors: c.counts.as_ref().map_or(0, |k| k.errors),
            features,
            score_psi: window.as_ref().and_then(Window::score_psi),
            score_judged,
            shadow: window.as_ref().and_then(Window::shadow),
            latency: c.counts.as_ref().and_then(|k| k.latency.summary()),
            outcomes: None,
            emitted_at_ms: now_ms,
        };
        Some((report, judged))
    }

    /// Queues the completed hourly windows for outcomes, and reports the
    /// outcomes of those that are due. A database error leaves them queued.
    fn outcome_reports(&mut self, completed: &[Completed], now_ms: i64) -> Vec<WindowReport> {
        let after = self.cfg.outcomes_after_ms;
        let (Some(outcomes), Some((merger, dirty))) = (&mut self.outcomes, &mut self.merger) else {
            return Vec::new();
        };
        if after <= 0 {
            return Vec::new();
        }
        for c in completed {
            if c.size_ms == self.cfg.window_ms && c.counts.as_ref().is_some_and(|k| k.scored > 0) {
                merger
                    .awaiting_outcomes
                    .push(leadscore_drift::state::AwaitingOutcomes {
                        model_name: c.model_name.clone(),
                        model_version: c.model_version.clone(),
                        start_ms: c.start_ms,
                        end_ms: c.end_ms,
                        due_ms: now_ms + after,
                    });
                *dirty = true;
            }
        }
        let due = merger.due_outcomes(now_ms);
        let mut out = Vec::new();
        for (i, a) in due.iter().enumerate() {
            match self.rt.block_on(outcomes.labelled(a)) {
                Ok(rows) => {
                    *dirty = true;
                    out.push(WindowReport {
                        model_name: a.model_name.clone(),
                        model_version: a.model_version.clone(),
                        kind: WindowKind::of(a.end_ms - a.start_ms),
                        start_ms: a.start_ms,
                        end_ms: a.end_ms,
                        scored: rows.len() as u64,
                        late_events: 0,
                        errors: 0,
                        features: Vec::new(),
                        score_psi: None,
                        score_judged: false,
                        shadow: None,
                        latency: None,
                        outcomes: Some(leadscore_drift::outcomes::summarize(&rows)),
                        emitted_at_ms: now_ms,
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, waiting = due.len() - i, "outcomes not read from the CRM database; retried at the next checkpoint");
                    merger.awaiting_outcomes.extend(due[i..].iter().cloned());
                    break;
                }
            }
        }
        out
    }
}

impl Outcomes {
    async fn labelled(
        &mut self,
        a: &leadscore_drift::state::AwaitingOutcomes,
    ) -> Result<Vec<leadscore_drift::outcomes::Labelled>, String> {
        let timeout = Duration::from_secs(10);
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let client = tokio::time::timeout(timeout, leadscore_postgres::connect(&self.url))
                .await
                .map_err(|_| "connecting timed out".to_string())?
                .map_err(|e| e.to_string())?;
            self.client = Some(client);
        }
        let client = self.client.as_ref().ok_or("no connection")?;
        let ts = |ms: i64| {
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).unwrap_or_default()
        };
        let (from, to) = (ts(a.start_ms), ts(a.end_ms));
        let rows = tokio::time::timeout(
            timeout,
            client.query(OUTCOMES_SQL, &[&a.model_name, &a.model_version, &from, &to]),
        )
        .await
        .map_err(|_| "outcome query timed out".to_string())?
        .map_err(|e| e.to_string())?;
        rows.iter()
            .map(|r| {
                Ok(leadscore_drift::outcomes::Labelled {
                    score: r.try_get(0).map_err(|e| e.to_string())?,
                    band: r.try_get(1).map_err(|e| e.to_string())?,
                    converted: r.try_get(2).map_err(|e| e.to_string())?,
                    deal_value: r.try_get(3).map_err(|e| e.to_string())?,
                })
            })
            .collect()
    }
}
