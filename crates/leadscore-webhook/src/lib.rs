//! The webhook service (`leadscore webhook`): follows `leads.scores.v1` (read_committed)
//! and POSTs every score and every delete to each configured endpoint, signed
//! ([`event::signature`]), with an idempotency key stable across retries and restarts.
//!
//! Owns: the consume loop and its progress (the group's committed offsets advance only past
//! records every endpoint has delivered or given up, [`tracker`]); each endpoint's lanes
//! (per-lead order, rate limit, retries, dead letters, [`deliver`]); the event body and its
//! signature ([`event`]); the service's metrics.
//! Must not: decide scores, write the CRM, or log a secret or a request header.
//!
//! Partitions are assigned statically (`webhook.partitions`, all by default): instances on
//! disjoint sets scale out and never deliver the same record twice except after a crash
//! (at least once; the idempotency key makes it one effect at the receiver).

pub mod deliver;
pub mod event;
pub mod metrics;
pub mod tracker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use leadscore_config::Config;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::deliver::{Endpoint, Job, Shared};
use crate::event::Event;
use crate::metrics::Metrics;
use crate::tracker::Tracker;

/// Why the service cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting or the environment is wrong.
    #[error("{0}")]
    Config(String),
    /// Kafka refused a step.
    #[error("{action}: {source}")]
    Kafka {
        /// What was being done.
        action: String,
        /// The client's error.
        source: rdkafka::error::KafkaError,
    },
    /// The topic is missing.
    #[error(transparent)]
    Topic(#[from] leadscore_kafka::Error),
    /// The registry client cannot be built.
    #[error(transparent)]
    Registry(#[from] leadscore_registry::Error),
}

fn kafka(action: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    let action = action.into();
    move |source| Error::Kafka { action, source }
}

/// Each endpoint's signing secret, read from the variable its `secret_env` names.
pub fn secrets(config: &Config) -> Result<Vec<Vec<u8>>, Error> {
    config
        .webhook
        .endpoints
        .iter()
        .map(|e| match std::env::var(&e.secret_env) {
            Ok(s) if !s.is_empty() => Ok(s.into_bytes()),
            _ => Err(Error::Config(format!(
                "webhook endpoint `{}`: the environment variable `{}` (its signing secret) is not set",
                e.name, e.secret_env
            ))),
        })
        .collect()
}

/// Delivers until `shutdown`, then lets in-flight attempts finish and commits what is done.
pub async fn run(
    config: &Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let cfg = config.webhook.clone();
    if cfg.endpoints.is_empty() {
        return Err(Error::Config(
            "no webhook.endpoints configured: nothing to deliver to".into(),
        ));
    }
    let secrets = secrets(config)?;
    let consumer: StreamConsumer = leadscore_kafka::client_config(&config.kafka)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(kafka("creating the consumer"))?;
    let producer: rdkafka::producer::FutureProducer = leadscore_kafka::client_config(&config.kafka)
        .set("enable.idempotence", "true")
        .create()
        .map_err(kafka("creating the dead-letter producer"))?;
    let timeout = Duration::from_millis(config.kafka.request_timeout_ms.max(5_000));
    let topic = cfg.scores_topic.clone();
    let partitions: Vec<i32> =
        tokio::task::block_in_place(|| leadscore_kafka::partitions(&consumer, &topic, timeout))?
            .into_iter()
            .filter(|p| cfg.partitions.is_empty() || cfg.partitions.contains(p))
            .collect();
    if partitions.is_empty() {
        return Err(Error::Config(format!(
            "webhook.partitions {:?} names no partition of {topic}",
            cfg.partitions
        )));
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        tpl.add_partition(&topic, *p);
    }
    let committed = tokio::task::block_in_place(|| consumer.committed_offsets(tpl, timeout))
        .map_err(kafka("reading the committed offsets"))?;
    let mut start = TopicPartitionList::new();
    for e in committed.elements() {
        let at = match e.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        start
            .add_partition_offset(&topic, e.partition(), at)
            .map_err(kafka("building the assignment"))?;
    }
    consumer
        .assign(&start)
        .map_err(kafka("assigning the partitions"))?;
    tracing::info!(%topic, ?partitions, endpoints = ?cfg.endpoints.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), "webhook service delivering");

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .map_err(|e| Error::Config(format!("HTTP client: {e}")))?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let lanes_stop = CancellationToken::new();
    let shared = Shared {
        http,
        producer,
        dlq_topic: cfg.dlq_topic.clone(),
        metrics: metrics.clone(),
        done: done_tx,
        shutdown: lanes_stop.clone(),
    };
    let mut handles = Vec::new();
    let endpoints: Vec<Endpoint> = cfg
        .endpoints
        .iter()
        .zip(secrets)
        .map(|(e, s)| Endpoint::start(e.clone(), s, &shared, &mut handles))
        .collect();
    drop(shared);

    let reader = leadscore_schemas::find("LeadScore.avsc")
        .and_then(|s| s.parse())
        .map_err(|e| Error::Config(format!("LeadScore.avsc: {e}")))?;
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let decoder = leadscore_registry::Decoder::with_reader(registry, reader);

    let mut tracker = Tracker::default();
    let mut ticks = 0u64;
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.commit_interval_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    metrics.liveness.started();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some((p, o)) = done_rx.recv() => {
                tracker.done(p, o);
                while let Ok((p, o)) = done_rx.try_recv() {
                    tracker.done(p, o);
                }
                metrics.set_in_flight(tracker.in_flight());
            }
            _ = tick.tick() => {
                commit(&consumer, &topic, &tracker, &mut last, CommitMode::Async, &metrics);
                ticks += 1;
                if ticks % 5 == 1 {
                    measure_lag(&consumer, &topic, &tracker, &metrics);
                }
            }
            m = consumer.recv(), if tracker.in_flight() < cfg.max_in_flight => match m {
                Ok(m) => {
                    metrics.consumed();
                    let (p, o) = (m.partition(), m.offset());
                    let value = match m.payload() {
                        None => None,
                        Some(bytes) => {
                            let decoded = decoder
                                .decode_waiting(bytes, |e, attempt| {
                                    if attempt == 1 || attempt % 20 == 0 {
                                        tracing::warn!(error = %e, attempt, "schema registry unavailable; waiting (the record is not skipped)");
                                    }
                                    !shutdown.is_cancelled()
                                })
                                .await;
                            match decoded {
                                Ok(v) => Some(v),
                                Err(e) if e.is_retryable() => break,
                                Err(e) => {
                                    tracing::warn!(partition = p, offset = o, error = %e, "record skipped: not a readable LeadScore");
                                    metrics.unreadable();
                                    tracker.take(p, o, 0);
                                    continue;
                                }
                            }
                        }
                    };
                    let ts = m.timestamp().to_millis().unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
                    let event = match Event::from_record(m.key(), value.as_ref(), ts) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(partition = p, offset = o, error = %e, "record skipped");
                            metrics.unreadable();
                            tracker.take(p, o, 0);
                            continue;
                        }
                    };
                    let takers: Vec<&Endpoint> = endpoints
                        .iter()
                        .filter(|e| event.passes(&e.cfg.bands, &e.cfg.models))
                        .collect();
                    tracker.take(p, o, takers.len());
                    if !takers.is_empty() {
                        let key: Arc<str> = event.idempotency_key().into();
                        let body: Arc<[u8]> = event.body().into();
                        let event = Arc::new(event);
                        for e in takers {
                            e.queue(Job {
                                partition: p,
                                offset: o,
                                event: event.clone(),
                                body: body.clone(),
                                key: key.clone(),
                                committed_ms: ts,
                            });
                        }
                    }
                    metrics.set_in_flight(tracker.in_flight());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Attempts under way finish; queued work waits for the next run (it is not committed).
    tracing::info!(
        in_flight = tracker.in_flight(),
        "stopping: finishing the attempts under way"
    );
    lanes_stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    while let Ok((p, o)) = done_rx.try_recv() {
        tracker.done(p, o);
    }
    commit(
        &consumer,
        &topic,
        &tracker,
        &mut last,
        CommitMode::Sync,
        &metrics,
    );
    metrics.liveness.stopped();
    tracing::info!(
        left_for_next_run = tracker.in_flight(),
        "webhook service stopped"
    );
    Ok(())
}

/// Commits each partition's committable offset when it moved; reports progress and lag.
fn commit(
    consumer: &StreamConsumer,
    topic: &str,
    tracker: &Tracker,
    last: &mut BTreeMap<i32, i64>,
    mode: CommitMode,
    metrics: &Metrics,
) {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in tracker.committable() {
        if last.get(&p) != Some(&o)
            && tpl
                .add_partition_offset(topic, p, Offset::Offset(o))
                .is_ok()
        {
            last.insert(p, o);
        }
    }
    if tpl.count() > 0 {
        let committed = match mode {
            CommitMode::Sync => tokio::task::block_in_place(|| consumer.commit(&tpl, mode)),
            CommitMode::Async => consumer.commit(&tpl, mode),
        };
        match committed {
            Ok(()) => metrics.liveness.progressed(),
            Err(e) => {
                // The next tick commits again from the tracker.
                tracing::warn!(error = %e, "committing progress failed");
                for e in tpl.elements() {
                    last.remove(&e.partition());
                }
            }
        }
    } else if tracker.in_flight() == 0 {
        metrics.liveness.progressed();
    }
}

/// Records not yet delivered everywhere: each partition's end minus its committable offset
/// (which counts the records in flight). Asks the broker for the ends.
fn measure_lag(consumer: &StreamConsumer, topic: &str, tracker: &Tracker, metrics: &Metrics) {
    let mut behind = 0i64;
    for (p, o) in tracker.committable() {
        let ends = tokio::task::block_in_place(|| {
            consumer.fetch_watermarks(topic, p, Duration::from_secs(2))
        });
        if let Ok((_, high)) = ends {
            behind += (high - o).max(0);
        }
    }
    metrics.set_lag(behind);
}

/// `leadscore webhook ping URL`: one signed `ping` event; the status and how long it took.
pub async fn ping(url: &str, secret: &[u8], timeout: Duration) -> Result<(u16, Duration), String> {
    let id = format!("ls_ping_{}", chrono::Utc::now().timestamp_millis());
    let body = serde_json::json!({
        "type": "ping",
        "id": id,
        "sent_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    })
    .to_string();
    let timestamp = chrono::Utc::now().timestamp();
    let started = std::time::Instant::now();
    let resp = reqwest::Client::new()
        .post(url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("user-agent", "leadscore-webhook/1")
        .header("leadscore-idempotency-key", &id)
        .header("leadscore-timestamp", timestamp.to_string())
        .header(
            "leadscore-signature",
            event::signature(secret, timestamp, body.as_bytes()),
        )
        .body(body)
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                format!("no answer from {url} within {} ms", timeout.as_millis())
            } else {
                format!("POST {url} failed: {e}")
            }
        })?;
    Ok((resp.status().as_u16(), started.elapsed()))
}
