//! The scorer service: CRM change events in; scores, shadow scores, tombstones
//! and dead letters out; exactly once.
//!
//! Each batch is one Kafka transaction: consume up to `max_batch` records,
//! decode them (Confluent Avro through the registry, or Debezium JSON),
//! decide what each means ([`leadscore_cdc::decide`]), score every lead of
//! the batch in one ONNX call per model, produce the outputs and send the
//! consumer offsets in the same transaction, commit. A failed commit aborts
//! and rewinds to the batch's first offsets, so a crash or a rebalance never
//! loses or duplicates a committed score; zombies are fenced by the group
//! generation (KIP-447) and the transactional id.
//!
//! Two batches overlap: while batch n's transaction is produced and
//! committed on a blocking thread, batch n+1 is read, decoded and scored
//! (which has no side effects). Batch n+1's transaction begins only after
//! batch n's has settled; if n's aborts, both are re-read from n's first
//! offsets. At most two batches are in memory.
//!
//! `run` takes its config, clients, models and a shutdown token; it reads no
//! environment. Bad input never stops it: it goes to the dead-letter topic
//! with the reason in headers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use leadscore_cdc::dead::{self, DeadPayload};
use leadscore_cdc::{CdcError, ErrorKind};
use leadscore_config::ScorerConfig;
use leadscore_kafka::txn::{Class, Transactional, Txn, TxnError};
use leadscore_model::{BandThresholds, ModelHandle};
use leadscore_registry::{Decoder, Encoder, Registry};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub mod http;
pub mod metrics;
pub mod process;
pub mod records;
pub mod watch;

pub use metrics::{Metrics, Stage};
use process::{BatchModels, Decoded, Output, Position};

/// Errors that stop the scorer (everything else is retried or dead-lettered).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kafka client could not be built or a fatal Kafka error happened.
    #[error("kafka: {context}: {source}")]
    Kafka {
        /// What was being done.
        context: &'static str,
        /// The error.
        source: KafkaError,
    },
    /// The producer was fenced: another instance with the same transactional id took over.
    #[error("fenced: another scorer uses transactional id {0}; this instance stops")]
    Fenced(String),
    /// The transactional producer cannot go on.
    #[error(transparent)]
    Transaction(TxnError),
    /// Output schemas could not be registered.
    #[error("schema registry: {0}")]
    Registry(#[from] leadscore_registry::Error),
    /// The cache is misconfigured (an outage is not an error).
    #[error("score cache: {0}")]
    Cache(String),
    /// A model failed to score (not an input problem).
    #[error(transparent)]
    Model(#[from] leadscore_model::Error),
    /// An output topic's partitions could not be read.
    #[error("output topic {topic}: {reason}; create it with `leadscore topics apply`")]
    Topic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// A lane's transaction ended in a panic: whether it committed is unknown, so the scorer
    /// stops and a restart resumes from what was committed.
    #[error("a transaction thread panicked: {0}")]
    Panicked(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The models the scorer serves; each can be swapped while it runs.
pub struct Models {
    /// Live model.
    pub champion: Arc<ModelHandle>,
    /// Shadow model.
    pub challenger: Option<Arc<ModelHandle>>,
    /// Canary candidate.
    pub canary: Option<Arc<ModelHandle>>,
    /// Share of leads the canary serves, percent; changed by lifecycle events while running.
    pub canary_percent: Arc<CanaryPercent>,
    /// The challenger slot holds the champion until its alias exists: not scored.
    pub challenger_stand_in: Arc<std::sync::atomic::AtomicBool>,
    /// The canary slot holds the champion until its alias exists: not scored.
    pub canary_stand_in: Arc<std::sync::atomic::AtomicBool>,
    /// Reasons per score (`scorer.reasons`).
    pub reasons: usize,
}

/// The canary share, readable by every batch and set by lifecycle events.
#[derive(Debug, Default)]
pub struct CanaryPercent(std::sync::atomic::AtomicU64);

impl CanaryPercent {
    /// A share of `percent`.
    pub fn new(percent: f64) -> Self {
        Self(std::sync::atomic::AtomicU64::new(percent.to_bits()))
    }

    /// The share now, percent.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Sets the share (clamped to 0..=100); the next batch uses it.
    pub fn set(&self, percent: f64) {
        self.0.store(
            percent.clamp(0.0, 100.0).to_bits(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// Client context of the scorer's consumer: turns librdkafka statistics into the consumer-lag
/// gauge, and counts rebalances.
pub struct ScorerContext {
    metrics: Arc<Metrics>,
    rebalances: std::sync::atomic::AtomicU64,
}

impl ScorerContext {
    /// A context reporting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            rebalances: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Assignments and revocations applied so far.
    pub fn rebalances(&self) -> u64 {
        self.rebalances.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl rdkafka::ClientContext for ScorerContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        let mut assigned = Vec::new();
        for (name, topic) in &stats.topics {
            for p in topic.partitions.values() {
                if p.partition < 0 || !p.desired {
                    continue;
                }
                assigned.push((name.clone(), p.partition));
                if let Some(lag) = partition_lag(p) {
                    self.metrics.set_lag(name, p.partition, lag);
                }
            }
        }
        self.metrics
            .retain_lag(|t, p| assigned.iter().any(|(n, q)| n == t && *q == p));
    }
}

impl rdkafka::consumer::ConsumerContext for ScorerContext {
    fn post_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        _: &rdkafka::consumer::Rebalance<'_>,
    ) {
        self.rebalances
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The consumer's group generation now, if no rebalance can have come between taking it and
/// finding `first`'s partition in the assignment: a generation this batch may commit under.
fn current_group(
    consumer: &ScorerConsumer,
    first: &rdkafka::message::BorrowedMessage<'_>,
) -> Option<rdkafka::consumer::ConsumerGroupMetadata> {
    let before = consumer.context().rebalances();
    let group = consumer.group_metadata()?;
    let owned = consumer
        .assignment()
        .ok()?
        .find_partition(first.topic(), first.partition())
        .is_some();
    (owned && consumer.context().rebalances() == before).then_some(group)
}

/// Records behind the end of a partition a read_committed consumer can read (the last stable offset).
pub fn partition_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    let position = p.app_offset.max(p.committed_offset);
    (end >= 0 && position >= 0).then(|| (end - position).max(0))
}

/// The scorer's consumer type.
pub type ScorerConsumer = StreamConsumer<ScorerContext>;

/// Consumer settings the scorer needs on top of the common client config.
pub fn consumer_config(
    kafka: &leadscore_config::KafkaConfig,
    cfg: &ScorerConfig,
) -> rdkafka::ClientConfig {
    let mut c = leadscore_kafka::client_config(kafka);
    c.set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("max.poll.interval.ms", "120000")
        // Bound what librdkafka prefetches, whatever the backlog: 32 MiB per consumer.
        .set("queued.max.messages.kbytes", "32768")
        .set("fetch.max.bytes", "16777216")
        .set("client.id", format!("leadscore-scorer-{}", cfg.instance_id))
        // Feeds the consumer-lag gauge (see ScorerContext).
        .set("statistics.interval.ms", "5000");
    c
}

/// Settings of the lifecycle-topic consumer: a group of its own per process
/// that commits nothing and starts at the beginning, so every start replays
/// the compacted topic (the latest event per model) and comes up with the
/// current canary share before following new events.
pub fn lifecycle_consumer_config(
    kafka: &leadscore_config::KafkaConfig,
    cfg: &ScorerConfig,
) -> rdkafka::ClientConfig {
    leadscore_kafka::follower_config(
        kafka,
        &format!("{}-lifecycle-{}", cfg.group_id, cfg.instance_id),
        leadscore_kafka::Start::Earliest,
    )
}

/// Transactional producer settings of `lane`: the shared transactional settings, a deep
/// queue, and `message.max.bytes` at `max_message_bytes` (the smallest `max.message.bytes` of
/// the output topics), so a record the broker would refuse is refused at once, record by record.
pub fn producer_config(
    kafka: &leadscore_config::KafkaConfig,
    cfg: &ScorerConfig,
    lane: u32,
    max_message_bytes: usize,
) -> rdkafka::ClientConfig {
    let mut c = leadscore_kafka::txn::transactional_config(
        kafka,
        &cfg.lane_transactional_id(lane),
        cfg.transaction_timeout_ms,
        &format!("leadscore-scorer-{}-{lane}", cfg.instance_id),
    );
    c.set("queue.buffering.max.messages", "200000")
        .set("message.max.bytes", max_message_bytes.to_string());
    c
}

/// Room kept for a dead letter's key and headers beside its capped payload, bytes.
pub const DEAD_LETTER_OVERHEAD: usize = 8 * 1024;

/// Longest error message in a dead letter's headers, bytes.
const MAX_MESSAGE_BYTES: usize = 1024;

struct Codecs {
    decoder: Decoder,
    /// Direct decoders of the Debezium envelope by writer schema id (`None`: the schema is
    /// not compiled and the generic decoder reads it).
    plans: std::sync::RwLock<HashMap<u32, Option<Arc<leadscore_cdc::direct::Plan>>>>,
    registry: Registry,
    scores: Encoder,
    shadow: Encoder,
    /// Extra PII columns removed from dead letters.
    pii: Vec<String>,
    /// Dead-letter payload cap, bytes.
    dead_cap: usize,
}

fn map_decode_error(
    e: leadscore_registry::Error,
) -> std::result::Result<CdcError, leadscore_registry::Error> {
    use leadscore_registry::Error as R;
    use leadscore_schemas::Error as S;
    match e {
        R::Schema(S::TooShort(n)) => Ok(CdcError::new(
            ErrorKind::Undecodable,
            format!("{n} bytes is too short for Confluent Avro"),
        )),
        R::Schema(S::BadMagic(b)) => Ok(CdcError::new(
            ErrorKind::BadMagic,
            format!("magic byte {b:#04x}"),
        )),
        R::Schema(other) => Ok(CdcError::new(ErrorKind::AvroDecode, other.to_string())),
        R::NotFound(m) => Ok(CdcError::new(ErrorKind::UnknownSchema, m)),
        R::Avro {
            source, schema_id, ..
        } => Ok(CdcError::new(
            ErrorKind::AvroDecode,
            format!("does not decode with writer schema {schema_id}: {source}"),
        )),
        e @ R::TrailingBytes { .. } => Ok(CdcError::new(ErrorKind::TrailingBytes, e.to_string())),
        e if e.is_retryable() => Err(e),
        other => Ok(CdcError::new(ErrorKind::UnknownSchema, other.to_string())),
    }
}

impl Codecs {
    /// The direct decoder of writer schema `id`, compiled on first use.
    async fn plan(&self, id: u32) -> Option<Arc<leadscore_cdc::direct::Plan>> {
        if let Some(p) = self.plans.read().ok().and_then(|m| m.get(&id).cloned()) {
            return p;
        }
        // A registry that cannot answer now: the generic path reports it (and is retried).
        let schema = self.registry.schema_by_id(id).await.ok()?;
        let plan = match leadscore_cdc::direct::Plan::compile(&schema) {
            Ok(p) => Some(Arc::new(p)),
            Err(why) => {
                tracing::info!(schema_id = id, reason = %why, "writer schema read by the generic decoder");
                None
            }
        };
        if let Ok(mut m) = self.plans.write() {
            m.insert(id, plan.clone());
        }
        plan
    }

    /// The action of a Confluent Avro record read directly, when that path accepts it
    /// (anything else goes through the generic decoder, which names the error).
    async fn direct(&self, bytes: &[u8]) -> Option<(leadscore_cdc::Action, Option<i64>)> {
        let (id, datum) = leadscore_schemas::unframe(bytes).ok()?;
        let event = self.plan(id).await?.decode(datum)?;
        let ts = event.source_ts_ms;
        leadscore_cdc::decide(event).ok().map(|a| (a, ts))
    }
}

async fn decode<'m>(
    codecs: &Codecs,
    m: &'m BorrowedMessage<'_>,
) -> Result<Decoded<'m>, leadscore_registry::Error> {
    let kafka_ts = m
        .timestamp()
        .to_millis()
        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
    let mut event_time_ms = kafka_ts;
    // On the error path only: what the dead letter carries (the record without PII when it decoded).
    let mut redacted: Option<Vec<u8>> = None;
    let payload = m.payload();
    let action = match payload {
        // Debezium follows a delete with a Kafka tombstone for compaction: nothing to do.
        None => Ok(leadscore_cdc::Action::Ignore("kafka tombstone")),
        Some([]) => Err(CdcError::new(ErrorKind::Undecodable, "empty value")),
        Some(bytes) if matches!(bytes[0], b'{' | b'[') => leadscore_cdc::from_json(bytes)
            .and_then(|e| {
                event_time_ms = e.source_ts_ms.unwrap_or(kafka_ts);
                leadscore_cdc::decide(e)
            })
            .inspect_err(|_| redacted = dead::redact_json(bytes, &codecs.pii)),
        Some(bytes)
            if bytes[0] == 0
                && let Some((action, ts)) = codecs.direct(bytes).await =>
        {
            event_time_ms = ts.unwrap_or(kafka_ts);
            Ok(action)
        }
        Some(bytes) if bytes[0] == 0 => match codecs.decoder.decode(bytes).await {
            Ok(value) => leadscore_cdc::from_avro(&value)
                .and_then(|e| {
                    event_time_ms = e.source_ts_ms.unwrap_or(kafka_ts);
                    leadscore_cdc::decide(e)
                })
                .inspect_err(|_| redacted = Some(dead::redact_avro(&value, &codecs.pii))),
            Err(e) => Err(map_decode_error(e)?),
        },
        Some(bytes) => Err(CdcError::new(
            ErrorKind::BadMagic,
            format!(
                "first byte {:#04x} is neither Confluent Avro (0x00) nor JSON",
                bytes[0]
            ),
        )),
    };
    let dead = action
        .is_err()
        .then(|| DeadPayload::new(payload.unwrap_or_default(), redacted, codecs.dead_cap));
    Ok(Decoded {
        position: Position {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
        },
        key: m.key().map(<[u8]>::to_vec),
        payload,
        dead,
        event_time_ms,
        action,
    })
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Runs the scorer until `shutdown` is cancelled, then finishes the in-flight batch and returns.
pub async fn run(
    cfg: ScorerConfig,
    consumer: ScorerConsumer,
    producers: Vec<Transactional>,
    registry: Registry,
    models: Models,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let schema = |f: &str| {
        leadscore_schemas::find(f)
            .map(|s| s.text)
            .map_err(leadscore_registry::Error::from)
    };
    let codecs = Codecs {
        decoder: Decoder::new(registry.clone()),
        plans: std::sync::RwLock::default(),
        registry: registry.clone(),
        scores: Encoder::for_subject(
            &registry,
            &leadscore_schemas::value_subject(&cfg.scores_topic),
            schema("LeadScore.avsc")?,
        )
        .await?,
        shadow: Encoder::for_subject(
            &registry,
            &leadscore_schemas::value_subject(&cfg.shadow_topic),
            schema("ShadowScore.avsc")?,
        )
        .await?,
        pii: cfg.pii_columns.clone(),
        dead_cap: cfg.dlq_max_payload_bytes,
    };
    if producers.is_empty() {
        return Err(Error::Panicked(
            "no transactional producer (scorer.lanes is 0)".into(),
        ));
    }
    for producer in &producers {
        blocking(|| producer.init()).map_err(Error::Transaction)?;
    }
    let partitions_of = |topic: &str| -> Result<i32> {
        blocking(|| leadscore_kafka::partitions(&consumer, topic, Duration::from_secs(10)))
            .map(|p| p.len() as i32)
            .map_err(|e| Error::Topic {
                topic: topic.to_string(),
                reason: e.to_string(),
            })
    };
    consumer
        .subscribe(&[&cfg.input_topic])
        .map_err(|source| Error::Kafka {
            context: "subscribe",
            source,
        })?;
    let bands = BandThresholds {
        high: cfg.band_high,
        medium: cfg.band_medium,
    };
    metrics.set_model(&models.champion.get());
    metrics.set_ready(true);
    tracing::info!(
        input = %cfg.input_topic,
        instance = %cfg.instance_id,
        model = %models.champion.get().metadata().label(),
        "scorer started"
    );
    let cache_tx = match &cfg.redis_url {
        Some(url) => {
            let cache = leadscore_cache::Cache::new(
                url,
                Duration::from_secs(cfg.cache_ttl_secs),
                Duration::from_millis(500),
            )
            .map_err(|e| Error::Cache(e.to_string()))?;
            // Bounded: when Redis is slow the cache falls behind and drops, scoring never waits.
            let (tx, rx) = tokio::sync::mpsc::channel::<CacheUpdate>(32);
            tokio::spawn(cache_writer(cache, rx, metrics.clone()));
            Some(tx)
        }
        None => None,
    };
    let linger = Duration::from_millis(cfg.batch_linger_ms);
    let mut backoff = Backoff::default();
    let target = Arc::new(PublishTarget {
        scores_topic: cfg.scores_topic.clone(),
        shadow_topic: cfg.shadow_topic.clone(),
        dlq_topic: cfg.dlq_topic.clone(),
        scores_schema: codecs.scores.schema_id(),
        shadow_schema: codecs.shadow.schema_id(),
        scores_partitions: partitions_of(&cfg.scores_topic)?,
        shadow_partitions: partitions_of(&cfg.shadow_topic)?,
        dlq_partitions: partitions_of(&cfg.dlq_topic)?,
    });
    let producers = Arc::new(producers);
    let lanes = producers.len() as i32;
    // The batch being committed on a blocking thread while the next one is read and scored.
    let mut in_flight: Option<InFlight> = None;
    loop {
        // The group generation the batch is read under, taken before its first record: if a
        // rebalance moves its partitions meanwhile, the broker refuses this generation's
        // offsets and the transaction aborts, instead of committing records the new owner
        // is scoring too (KIP-447). Taken after the read, it could be the new generation.
        let rebalances_at_read = consumer.context().rebalances();
        let group_at_read = consumer.group_metadata();
        // Wait for the first record of a batch, the in-flight commit, or shutdown.
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            done = wait_in_flight(&mut in_flight), if in_flight.is_some() =>
            {
                let Some(prev) = in_flight.take() else { continue };
                match settle(prev, done, &metrics, cache_tx.as_ref()) {
                    Ok(failed) if failed.is_empty() => backoff.reset(),
                    Ok(failed) => {
                        rewind(&consumer, &failed);
                        backoff.wait().await;
                    }
                    Err(e) => {
                        metrics.set_ready(false);
                        return Err(e);
                    }
                }
                continue;
            }
            m = consumer.recv() => m,
        };
        let first = match first {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                tokio::time::sleep(backoff.current()).await;
                continue;
            }
        };
        // A rebalance while waiting for this record (above all the first assignment after a
        // start) made the generation taken before it stale: the broker would refuse its
        // offsets (ILLEGAL_GENERATION) and the batch would be re-read. Take it again when no
        // later rebalance can have slipped in and the record's partition is still ours.
        let group_at_read = if consumer.context().rebalances() == rebalances_at_read {
            group_at_read
        } else {
            current_group(&consumer, &first).or(group_at_read)
        };
        let fetch_started = std::time::Instant::now();
        let mut batch = vec![first];
        // The batch closes at the linger deadline or at `max_batch`; while the previous
        // transaction is still committing it keeps growing instead, since it could not begin
        // before that commit anyway: a lead that arrives meanwhile rides this transaction
        // rather than waiting for the next one.
        let deadline = tokio::time::Instant::now() + linger;
        let mut settled: Option<Published> = None;
        while batch.len() < cfg.max_batch {
            let committing = in_flight.is_some() && settled.is_none();
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                done = wait_in_flight(&mut in_flight), if committing => {
                    settled = Some(done);
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
                m = recv_until(&consumer, (!committing).then_some(deadline)) => match m {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        break;
                    }
                    None => break,
                },
            }
        }
        metrics.stage(Stage::Fetch, fetch_started.elapsed());
        // First and next offset per partition of this batch, and its records per partition.
        let mut ranges: Ranges = BTreeMap::new();
        let mut counts: BTreeMap<i32, usize> = BTreeMap::new();
        for m in &batch {
            let e = ranges
                .entry((m.topic().to_string(), m.partition()))
                .or_insert((m.offset(), m.offset() + 1));
            e.0 = e.0.min(m.offset());
            e.1 = e.1.max(m.offset() + 1);
            *counts.entry(m.partition()).or_default() += 1;
        }
        let inputs = batch.len();
        let span = tracing::info_span!(
            "scorer.batch",
            inputs,
            partitions = ranges.len(),
            outcome = tracing::field::Empty,
        );
        let prepared = prepare(&codecs, &models, &bands, &batch, &metrics)
            .instrument(span.clone())
            .await;
        drop(batch);
        // This batch's transaction may only begin once the previous one is settled.
        if let Some(mut prev) = in_flight.take() {
            let done = match settled.take() {
                Some(done) => done,
                None => (&mut prev.handle).await,
            };
            match settle(prev, done, &metrics, cache_tx.as_ref()) {
                Ok(failed) if failed.is_empty() => backoff.reset(),
                Ok(mut failed) => {
                    // The failed lanes' records and this whole batch are re-read: the failed
                    // lanes' records come first.
                    span.record("outcome", "discarded");
                    failed.push(ranges);
                    rewind(&consumer, &failed);
                    backoff.wait().await;
                    continue;
                }
                Err(e) => {
                    metrics.set_ready(false);
                    return Err(e);
                }
            }
        }
        let outputs = match prepared {
            Ok(o) => o,
            Err(TxError::Fatal(e)) => {
                metrics.set_ready(false);
                return Err(e);
            }
            Err(TxError::Retry(why)) => {
                let in_a_row = metrics.batch_aborted();
                span.record("outcome", "aborted");
                tracing::warn!(reason = %why, in_a_row, "batch not scored; re-reading it");
                rewind(&consumer, std::slice::from_ref(&ranges));
                backoff.wait().await;
                continue;
            }
        };
        let Some(group) = group_at_read else {
            tracing::warn!("no consumer group metadata yet; re-reading the batch");
            rewind(&consumer, &[ranges]);
            tokio::time::sleep(backoff.current()).await;
            continue;
        };
        let work = match lane_work(lanes, outputs, &ranges, &counts) {
            Ok(w) => w,
            Err(e) => {
                return Err(Error::Kafka {
                    context: "building the offsets to commit",
                    source: e,
                });
            }
        };
        let shares = work.iter().map(|w| (w.inputs, w.ranges.clone())).collect();
        let (producers, target, metrics_c) = (producers.clone(), target.clone(), metrics.clone());
        let publish_span = span.clone();
        let handle = tokio::task::spawn_blocking(move || {
            publish_lanes(&producers, &target, work, &group, &metrics_c, &publish_span)
        });
        in_flight = Some(InFlight {
            handle,
            lanes: shares,
            span,
        });
    }
    // Shutdown: the in-flight transaction finishes; a batch read but not yet published is re-read later.
    if let Some(mut prev) = in_flight.take() {
        let done = (&mut prev.handle).await;
        if let Err(e) = settle(prev, done, &metrics, cache_tx.as_ref()) {
            metrics.set_ready(false);
            return Err(e);
        }
    }
    metrics.set_ready(false);
    tracing::info!(
        scored = metrics.scored(),
        "scorer stopped: in-flight batch committed"
    );
    Ok(())
}

type Ranges = BTreeMap<(String, i32), (i64, i64)>;

/// Wait before retrying a failed batch: 100 ms, doubling up to 10 s, reset by a success.
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    fn current(&self) -> Duration {
        self.0
    }

    /// Sleeps, then doubles the next wait.
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
    }

    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Where and how a batch's outputs are published.
struct PublishTarget {
    scores_topic: String,
    shadow_topic: String,
    dlq_topic: String,
    scores_schema: u32,
    shadow_schema: u32,
    scores_partitions: i32,
    shadow_partitions: i32,
    dlq_partitions: i32,
}

impl PublishTarget {
    /// The partition of `topic` the outputs of input partition `input` go to.
    fn partition(&self, topic: &str, input: i32) -> i32 {
        let n = if topic == self.scores_topic {
            self.scores_partitions
        } else if topic == self.shadow_topic {
            self.shadow_partitions
        } else {
            self.dlq_partitions
        };
        input.rem_euclid(n.max(1))
    }
}

/// A batch whose lanes' transactions are running on a blocking thread.
struct InFlight {
    handle: tokio::task::JoinHandle<Vec<Result<Vec<Output>, TxError>>>,
    /// Records and ranges of each lane, in the order of the handle's results.
    lanes: Vec<(usize, Ranges)>,
    span: tracing::Span,
}

type Published = Result<Vec<Result<Vec<Output>, TxError>>, tokio::task::JoinError>;

/// One lane's share of a batch: the outputs of its input partitions and their offsets.
struct LaneWork {
    lane: usize,
    inputs: usize,
    ranges: Ranges,
    offsets: TopicPartitionList,
    groups: Vec<(i32, Vec<Output>)>,
}

/// Splits a prepared batch by lane (input partition % lanes), each lane with the offsets of
/// its partitions.
fn lane_work(
    lanes: i32,
    outputs: Vec<(i32, Vec<Output>)>,
    ranges: &Ranges,
    counts: &BTreeMap<i32, usize>,
) -> std::result::Result<Vec<LaneWork>, KafkaError> {
    let mut work: BTreeMap<usize, LaneWork> = BTreeMap::new();
    let lane_of = |p: i32| p.rem_euclid(lanes.max(1)) as usize;
    for ((topic, partition), (start, next)) in ranges {
        let w = work.entry(lane_of(*partition)).or_insert_with(|| LaneWork {
            lane: lane_of(*partition),
            inputs: 0,
            ranges: BTreeMap::new(),
            offsets: TopicPartitionList::new(),
            groups: Vec::new(),
        });
        w.ranges
            .insert((topic.clone(), *partition), (*start, *next));
        w.offsets
            .add_partition_offset(topic, *partition, Offset::Offset(*next))?;
        w.inputs += counts.get(partition).copied().unwrap_or(0);
    }
    for (partition, outs) in outputs {
        if let Some(w) = work.get_mut(&lane_of(partition)) {
            w.groups.push((partition, outs));
        }
    }
    Ok(work.into_values().collect())
}

/// Commits each lane's share in its own transaction, the lanes in parallel; one result per
/// lane, in order. Runs on a blocking thread.
fn publish_lanes(
    producers: &[Transactional],
    target: &PublishTarget,
    work: Vec<LaneWork>,
    group: &rdkafka::consumer::ConsumerGroupMetadata,
    metrics: &Metrics,
    span: &tracing::Span,
) -> Vec<Result<Vec<Output>, TxError>> {
    let one = |w: LaneWork| -> Result<Vec<Output>, TxError> {
        let producer = &producers[w.lane % producers.len()];
        span.in_scope(|| publish(producer, target, w.groups, &w.offsets, group, metrics))
    };
    if work.len() == 1 {
        return work.into_iter().map(one).collect();
    }
    std::thread::scope(|s| {
        let running: Vec<_> = work.into_iter().map(|w| s.spawn(|| one(w))).collect();
        running
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|p| {
                    let what = p
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(TxError::Fatal(Error::Panicked(what)))
                })
            })
            .collect()
    })
}

/// The next record, or `None` once `until` has passed (no deadline: wait for one).
async fn recv_until<'c>(
    consumer: &'c ScorerConsumer,
    until: Option<tokio::time::Instant>,
) -> Option<rdkafka::error::KafkaResult<BorrowedMessage<'c>>> {
    match until {
        Some(d) => tokio::time::timeout_at(d, consumer.recv()).await.ok(),
        None => Some(consumer.recv().await),
    }
}

/// The in-flight transaction's result; never resolves without one.
async fn wait_in_flight(in_flight: &mut Option<InFlight>) -> Published {
    match in_flight {
        Some(f) => (&mut f.handle).await,
        None => std::future::pending().await,
    }
}

/// Counts a finished batch's committed lanes and hands their scores to the cache. Returns the
/// ranges of the lanes that aborted (to re-read), or the error that stops the scorer.
fn settle(
    prev: InFlight,
    done: Published,
    metrics: &Metrics,
    cache_tx: Option<&tokio::sync::mpsc::Sender<CacheUpdate>>,
) -> Result<Vec<Ranges>> {
    // Whether the lanes committed is unknown when their task failed: stop, and let the
    // restart resume from what was committed.
    let results = done.map_err(|e| Error::Panicked(format!("publishing task: {e}")))?;
    let mut failed = Vec::new();
    let mut fatal = None;
    for ((inputs, ranges), outcome) in prev.lanes.into_iter().zip(results) {
        match outcome {
            Ok(outputs) => {
                metrics.batch_committed(inputs, &outputs);
                if let Some(tx) = cache_tx {
                    let mut update = CacheUpdate::default();
                    let now_ms = chrono::Utc::now().timestamp_millis();
                    for o in outputs {
                        match o {
                            Output::Score { cached, .. } => update.scores.push(cached),
                            Output::Tombstone { key } => update.deleted.push((key, now_ms)),
                            _ => {}
                        }
                    }
                    if (!update.scores.is_empty() || !update.deleted.is_empty())
                        && tx.try_send(update).is_err()
                    {
                        metrics.cache_dropped();
                    }
                }
            }
            Err(TxError::Retry(why)) => {
                let in_a_row = metrics.batch_aborted();
                tracing::warn!(reason = %why, in_a_row, partitions = ranges.len(), "transaction aborted; re-reading its records");
                failed.push(ranges);
            }
            Err(TxError::Fatal(e)) => fatal = fatal.or(Some(e)),
        }
    }
    if let Some(e) = fatal {
        prev.span.record("outcome", "failed");
        return Err(e);
    }
    prev.span.record(
        "outcome",
        if failed.is_empty() {
            "committed"
        } else {
            "aborted"
        },
    );
    Ok(failed)
}

/// Seeks every partition of `batches` back to its earliest first offset.
fn rewind(consumer: &ScorerConsumer, batches: &[Ranges]) {
    let mut starts: BTreeMap<&(String, i32), i64> = BTreeMap::new();
    for ranges in batches {
        for (tp, (start, _)) in ranges {
            let e = starts.entry(tp).or_insert(*start);
            *e = (*e).min(*start);
        }
    }
    for ((topic, partition), start) in starts {
        // Partitions revoked meanwhile fail to seek: their new owner re-reads them.
        if let Err(e) = consumer.seek(
            topic,
            *partition,
            Offset::Offset(start),
            Duration::from_secs(5),
        ) {
            tracing::warn!(topic, partition, offset = start, error = %e, "seek after abort failed");
        }
    }
}

#[derive(Default)]
struct CacheUpdate {
    scores: Vec<leadscore_cache::CachedScore>,
    /// Deleted leads and when the deletion was committed, ms (newer wins in the cache).
    deleted: Vec<(String, i64)>,
}

/// Tries of one cache write before it is dropped and counted (Redis down or slow).
const CACHE_TRIES: u32 = 3;

async fn cache_writer(
    cache: leadscore_cache::Cache,
    mut rx: tokio::sync::mpsc::Receiver<CacheUpdate>,
    metrics: Arc<Metrics>,
) {
    let mut warned = false;
    while let Some(update) = rx.recv().await {
        let mut result = cache.write(&update.scores, &update.deleted).await;
        for attempt in 1..CACHE_TRIES {
            if result.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            result = cache.write(&update.scores, &update.deleted).await;
        }
        match result {
            Ok(()) => {
                metrics.cache_written(update.scores.len() + update.deleted.len());
                if warned {
                    tracing::info!("score cache writes succeed again");
                    warned = false;
                }
            }
            Err(e) => {
                metrics.cache_failed();
                if !warned {
                    tracing::warn!(error = %e, "score cache unavailable; scoring continues, lookups fall back to Postgres");
                    warned = true;
                }
            }
        }
    }
}

enum TxError {
    Retry(String),
    Fatal(Error),
}

/// Routes a transactional failure: fenced and fatal stop the scorer, the rest re-read the batch.
fn route(e: TxnError) -> TxError {
    match e.class {
        Class::Fenced => TxError::Fatal(Error::Fenced(e.transactional_id)),
        Class::Fatal => TxError::Fatal(Error::Transaction(e)),
        _ => TxError::Retry(e.to_string()),
    }
}

/// Decodes and scores a batch: no side effects, so a failed transaction can simply re-read it.
/// The outputs come grouped by input partition (where they will be written).
async fn prepare(
    codecs: &Codecs,
    models: &Models,
    bands: &BandThresholds,
    batch: &[BorrowedMessage<'_>],
    metrics: &Metrics,
) -> Result<Vec<(i32, Vec<Output>)>, TxError> {
    let started = std::time::Instant::now();
    let mut decoded = Vec::with_capacity(batch.len());
    for m in batch {
        match decode(codecs, m).await {
            Ok(d) => decoded.push(d),
            Err(e) => return Err(TxError::Retry(format!("schema registry unavailable: {e}"))),
        }
    }
    // One model of each role for the whole batch: a swap lands between batches.
    let champion = models.champion.get();
    let challenger = models.challenger.as_ref().map(|h| h.get());
    let canary = models.canary.as_ref().map(|h| h.get());
    let batch_models = BatchModels {
        champion: &champion,
        challenger: challenger.as_deref().filter(|_| {
            !models
                .challenger_stand_in
                .load(std::sync::atomic::Ordering::Relaxed)
        }),
        canary: canary
            .as_deref()
            .filter(|_| {
                !models
                    .canary_stand_in
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .map(|m| (m, models.canary_percent.get())),
        reasons: models.reasons,
    };
    metrics.stage(Stage::Decode, started.elapsed());
    let started = std::time::Instant::now();
    let leads = decoded.len();
    let mut by_partition: BTreeMap<i32, Vec<process::Decoded<'_>>> = BTreeMap::new();
    for d in decoded {
        by_partition
            .entry(d.position.partition)
            .or_default()
            .push(d);
    }
    let outputs = tracing::info_span!("scorer.score", leads)
        .in_scope(|| {
            tokio::task::block_in_place(|| {
                by_partition
                    .into_iter()
                    .map(|(partition, inputs)| {
                        process::process(inputs, &batch_models, bands, codecs.dead_cap, || {
                            chrono::Utc::now().timestamp_millis()
                        })
                        .map(|outputs| (partition, outputs))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .map_err(|e| TxError::Fatal(Error::Model(e)))?;
    metrics.stage(Stage::Score, started.elapsed());
    Ok(outputs)
}

/// Publishes a batch's outputs and its offsets in one Kafka transaction. Runs on a blocking thread.
///
/// A failure after the transaction began aborts it (in [`Txn`]), so the producer is ready
/// for the next one. Returns the outputs as published: one that could not be written is
/// replaced by its dead letter or, if even that cannot be written, by [`Output::Skipped`].
fn publish(
    producer: &Transactional,
    target: &PublishTarget,
    mut groups: Vec<(i32, Vec<Output>)>,
    offsets: &TopicPartitionList,
    group: &rdkafka::consumer::ConsumerGroupMetadata,
    metrics: &Metrics,
) -> Result<Vec<Output>, TxError> {
    let started = std::time::Instant::now();
    let mut txn = producer.begin().map_err(route)?;
    for (partition, outputs) in &mut groups {
        produce_all(&mut txn, target, *partition, outputs)?;
    }
    metrics.stage(Stage::Produce, started.elapsed());
    let started = std::time::Instant::now();
    tracing::info_span!("scorer.commit")
        .in_scope(|| txn.commit(Some((offsets, group))))
        .map_err(route)?;
    metrics.stage(Stage::Commit, started.elapsed());
    Ok(groups.into_iter().flat_map(|(_, o)| o).collect())
}

/// Sends the outputs of input partition `input`.
fn produce_all(
    txn: &mut Txn<'_>,
    target: &PublishTarget,
    input: i32,
    outputs: &mut [Output],
) -> Result<(), TxError> {
    for out in outputs.iter_mut() {
        match send_output(txn, target, input, out) {
            Ok(()) => {}
            // Dead letters are capped to fit, so this is a record nothing can carry: skip it.
            Err(e) if e.class == Class::Poison => *out = unwritable(out, &e),
            Err(e) => return Err(route(e)),
        }
    }
    Ok(())
}

/// What replaces an output the producer refused for good (larger than the topic allows,
/// invalid): a skip, logged without payload and counted, so the batch commits. Never retried.
fn unwritable(out: &Output, e: &TxnError) -> Output {
    let reason = dead::bounded(&e.source.to_string(), MAX_MESSAGE_BYTES).to_string();
    let what = match out {
        Output::Dead { position, kind, .. } => {
            format!(
                "dead letter ({kind}) of {}/{}@{}",
                position.topic, position.partition, position.offset
            )
        }
        Output::Score { key, .. } => format!("score of lead {key}"),
        Output::Shadow { key, .. } => format!("shadow score of lead {key}"),
        Output::Tombstone { key } => format!("tombstone of lead {key}"),
        Output::Skipped { what, .. } => what.clone(),
        Output::Outcome | Output::Ignored => "nothing".into(),
    };
    // No payload in the log: only what it was and why it could not be written.
    tracing::error!(record = %what, error = %reason, "output cannot be written; skipped and counted (leadscore_scorer_skipped_total)");
    Output::Skipped { what, reason }
}

/// Sends one output of input partition `input`, to that partition's partition of its topic.
fn send_output(
    txn: &mut Txn<'_>,
    target: &PublishTarget,
    input: i32,
    out: &Output,
) -> Result<(), TxnError> {
    match out {
        Output::Score { key, record, .. } => {
            let bytes = records::framed(target.scores_schema, |out| record.encode(out));
            txn.send(
                FutureRecord::to(&target.scores_topic)
                    .partition(target.partition(&target.scores_topic, input))
                    .key(key.as_str())
                    .payload(&bytes),
            )
        }
        Output::Shadow { key, record } => {
            let bytes = records::framed(target.shadow_schema, |out| record.encode(out));
            txn.send(
                FutureRecord::to(&target.shadow_topic)
                    .partition(target.partition(&target.shadow_topic, input))
                    .key(key.as_str())
                    .payload(&bytes),
            )
        }
        Output::Tombstone { key } => txn.send(
            FutureRecord::<str, [u8]>::to(&target.scores_topic)
                .partition(target.partition(&target.scores_topic, input))
                .key(key.as_str()),
        ),
        Output::Dead {
            key,
            dead,
            kind,
            message,
            position,
        } => {
            let mut rec = FutureRecord::<[u8], [u8]>::to(&target.dlq_topic)
                .partition(target.partition(&target.dlq_topic, input))
                .headers(dead_letter_headers(dead, kind, message, position));
            if let Some(k) = key {
                rec = rec.key(k.as_slice());
            }
            if dead.form != dead::Form::Omitted {
                rec = rec.payload(dead.bytes.as_slice());
            }
            txn.send(rec)
        }
        Output::Skipped { .. } | Output::Outcome | Output::Ignored => Ok(()),
    }
}

/// The headers of a dead letter: why, where from, what the payload is and what the original was.
fn dead_letter_headers(
    dead: &DeadPayload,
    kind: &str,
    message: &str,
    position: &Position,
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    let mut add = |key: &str, value: &str| {
        headers = std::mem::take(&mut headers).insert(Header {
            key,
            value: Some(value),
        });
    };
    add("leadscore.error.kind", kind);
    add(
        "leadscore.error.message",
        dead::bounded(message, MAX_MESSAGE_BYTES),
    );
    add("leadscore.source.topic", &position.topic);
    add(
        "leadscore.source.partition",
        &position.partition.to_string(),
    );
    add("leadscore.source.offset", &position.offset.to_string());
    add("leadscore.payload.form", dead.form.as_str());
    add(
        "leadscore.payload.truncated",
        if dead.truncated { "true" } else { "false" },
    );
    add("leadscore.original.size", &dead.original_size.to_string());
    add("leadscore.original.sha256", &dead.original_sha256);
    headers
}

/// Reads the dead-letter headers of a message (tests and operators' tools).
pub fn dead_letter_kind(headers: Option<&rdkafka::message::BorrowedHeaders>) -> Option<String> {
    headers?
        .iter()
        .find(|h| h.key == "leadscore.error.kind")
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Partition;

    fn tombstone(key: &str) -> Output {
        Output::Tombstone { key: key.into() }
    }

    #[test]
    fn a_batch_splits_by_lane_with_each_lanes_offsets_and_outputs() {
        let mut ranges: Ranges = BTreeMap::new();
        for (p, start, next) in [(0, 10, 15), (1, 3, 4), (2, 7, 9), (5, 0, 2)] {
            ranges.insert(("in".to_string(), p), (start, next));
        }
        let counts = BTreeMap::from([(0, 5), (1, 1), (2, 2), (5, 2)]);
        let outputs = vec![
            (0, vec![tombstone("a")]),
            (1, vec![tombstone("b")]),
            (2, vec![tombstone("c"), tombstone("d")]),
            (5, vec![tombstone("e")]),
        ];
        let work = lane_work(2, outputs, &ranges, &counts).unwrap();
        assert_eq!(work.len(), 2);
        let (even, odd) = (&work[0], &work[1]);
        assert_eq!((even.lane, even.inputs), (0, 7));
        assert_eq!((odd.lane, odd.inputs), (1, 3));
        let parts = |w: &LaneWork| w.groups.iter().map(|(p, _)| *p).collect::<Vec<_>>();
        assert_eq!(parts(even), [0, 2]);
        assert_eq!(parts(odd), [1, 5]);
        let offsets = |w: &LaneWork| {
            w.offsets
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            offsets(odd),
            [(1, Offset::Offset(4)), (5, Offset::Offset(2))]
        );
        assert_eq!(
            odd.ranges.keys().map(|(_, p)| *p).collect::<Vec<_>>(),
            [1, 5]
        );
        // One lane: the whole batch.
        let all = lane_work(1, vec![(5, vec![tombstone("e")])], &ranges, &counts).unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].inputs, all[0].offsets.count()), (10, 4));
    }

    #[test]
    fn outputs_go_to_the_input_partition_modulo_each_topics_partitions() {
        let t = PublishTarget {
            scores_topic: "s".into(),
            shadow_topic: "sh".into(),
            dlq_topic: "d".into(),
            scores_schema: 1,
            shadow_schema: 2,
            scores_partitions: 12,
            shadow_partitions: 4,
            dlq_partitions: 1,
        };
        assert_eq!(t.partition("s", 7), 7);
        assert_eq!(t.partition("sh", 7), 3);
        assert_eq!(t.partition("d", 7), 0);
        assert_eq!(t.partition("s", 13), 1);
    }

    #[test]
    fn lag_counts_from_the_consumed_position_to_the_last_stable_offset() {
        let p = Partition {
            hi_offset: 120,
            ls_offset: 100,
            app_offset: 60,
            committed_offset: 40,
            ..Partition::default()
        };
        assert_eq!(partition_lag(&p), Some(40));
        // Nothing consumed yet: from the committed offset.
        let p = Partition {
            app_offset: -1001,
            ..p
        };
        assert_eq!(partition_lag(&p), Some(60));
        // No offsets known yet: no value rather than a wrong one.
        let p = Partition {
            committed_offset: -1001,
            ..p
        };
        assert_eq!(partition_lag(&p), None);
        // Without a stable offset (not read_committed): the high watermark.
        let p = Partition {
            ls_offset: -1,
            app_offset: 100,
            ..p
        };
        assert_eq!(partition_lag(&p), Some(20));
    }
}
