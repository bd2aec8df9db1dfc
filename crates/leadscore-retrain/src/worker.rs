//! The training worker (`leadscore retrain worker`).
//!
//! Serves `leadscore.retrain.requests.v1` one request at a time: announces
//! `training` on the lifecycle topic, runs the training job (the Python
//! `leadscore_training.train`, as a subprocess here and as a Kubernetes Job
//! from the Helm chart), and publishes its outcome (`registered` as
//! challenger, `promoted` for a first model, `rejected` by the evaluation
//! gate, or `failed`) in one Kafka transaction with the request's offset.
//! A request whose outcome is committed is never run again; a crash during
//! a run re-runs it (its `training` event repeats, with the same event id).
//!
//! As a long-running Deployment it serves requests until stopped. As a
//! Kubernetes Job (the Helm chart's KEDA ScaledJob on the requests' lag) it
//! runs with [`RunOptions::once`]: it serves one request and exits, or exits
//! when none comes within [`RunOptions::idle_exit`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use apache_avro::types::Value;
use leadscore_config::{KafkaConfig, TrainingConfig};
use leadscore_kafka::txn::Transactional;
use leadscore_lifecycle::events::{LifecycleEvent, Stage, training_outcome};
use leadscore_registry::{Decoder, Encoder, Registry};
use leadscore_runtime::prom::{Kind, Page};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::{Error, Result, kerr};

/// Counters of the worker.
#[derive(Default)]
pub struct WorkerMetrics {
    /// Runs by outcome: registered, promoted, rejected, failed.
    pub outcomes: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// A run is in progress.
    pub busy: AtomicBool,
    /// Seconds the last run took.
    pub last_run_secs: AtomicU64,
    /// The worker's readiness rule.
    pub liveness: Arc<leadscore_runtime::Liveness>,
}

impl WorkerMetrics {
    /// Prometheus text.
    pub fn render(&self) -> String {
        let mut page = Page::new();
        page.family(
            "leadscore_training_runs_total",
            Kind::Counter,
            "Training runs by outcome.",
        );
        if let Ok(m) = self.outcomes.lock() {
            for (k, v) in m.iter() {
                page.sample("leadscore_training_runs_total", &[("outcome", k)], v);
            }
        }
        page.gauge(
            "leadscore_training_busy",
            "A run is in progress.",
            u8::from(self.busy.load(Ordering::Relaxed)),
        )
        .gauge(
            "leadscore_training_last_run_seconds",
            "Duration of the last run.",
            self.last_run_secs.load(Ordering::Relaxed),
        );
        self.liveness.write(&mut page, "training");
        page.finish()
    }
}

impl leadscore_runtime::Status for WorkerMetrics {
    fn readiness(&self) -> Result<(), leadscore_runtime::NotReady> {
        self.liveness.readiness()
    }

    fn metrics(&self) -> String {
        self.render()
    }
}

/// A request as the worker reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Idempotency key.
    pub request_id: String,
    /// Model to train.
    pub model_name: String,
    /// drift, schedule or manual.
    pub trigger: String,
    /// Why.
    pub reason: String,
}

impl Job {
    /// Reads a `RetrainRequest` value.
    pub fn from_value(value: &Value) -> Option<Self> {
        let Value::Record(fields) = value else {
            return None;
        };
        let s = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| match v {
                    Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
                    _ => None,
                })
        };
        Some(Self {
            request_id: s("request_id")?,
            model_name: s("model_name")?,
            trigger: s("trigger")?,
            reason: s("reason")?,
        })
    }
}

/// Longest id or model name a request may carry.
const MAX_ID: usize = 128;

/// `value` is 1..=128 characters of `[A-Za-z0-9._:-]`, not starting with `.` or `-`.
fn plain_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_ID
        && !value.starts_with(['.', '-'])
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

impl Job {
    /// Checks the fields that reach the training job's command line: a request id and a
    /// model name of plain characters only (no path separators, no option-like values).
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (field, value) in [
            ("request_id", &self.request_id),
            ("model_name", &self.model_name),
        ] {
            if !plain_id(value) {
                return Err(format!(
                    "{field} must be 1..={MAX_ID} characters of [A-Za-z0-9._:-], not starting with `.` or `-`"
                ));
            }
        }
        Ok(())
    }
}

/// How long the worker serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Exit after one request has been served and its outcome committed.
    pub once: bool,
    /// Exit when no request arrives for this long.
    pub idle_exit: Option<Duration>,
}

/// Why [`Worker::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shutdown was requested.
    Shutdown,
    /// One request was served (with [`RunOptions::once`]).
    Served,
    /// No request came within [`RunOptions::idle_exit`].
    Idle,
}

/// The worker.
pub struct Worker {
    cfg: TrainingConfig,
    data: String,
    consumer: StreamConsumer,
    producer: Transactional,
    decoder: Decoder,
    encoder: Encoder,
    metrics: Arc<WorkerMetrics>,
}

impl Worker {
    /// Builds the clients; `default_data` is used when `training.data` is unset.
    pub async fn start(
        cfg: TrainingConfig,
        kafka: &KafkaConfig,
        registry: Registry,
        default_data: String,
        metrics: Arc<WorkerMetrics>,
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
        let consumer: StreamConsumer = leadscore_kafka::txn::consumer_config(kafka, &cfg.group_id)
            // A run holds its request for its whole duration.
            .set(
                "max.poll.interval.ms",
                ((cfg.timeout_secs + 120) * 1000)
                    .min(i32::MAX as u64)
                    .to_string(),
            )
            .create()
            .map_err(kerr("creating the consumer"))?;
        consumer
            .subscribe(&[&cfg.requests_topic])
            .map_err(kerr("subscribing"))?;
        let (kc, txid) = (kafka.clone(), cfg.transactional_id.clone());
        let producer = tokio::task::spawn_blocking(move || {
            Transactional::start(&kc, &txid, "leadscore-training", 60_000, timeout)
        })
        .await
        .map_err(|e| Error::Checkpoint(format!("init task: {e}")))??;
        let swept = sweep_scratch(&std::env::temp_dir());
        if swept > 0 {
            tracing::info!(
                swept,
                "removed scratch directories of training runs whose worker was killed"
            );
        }
        metrics.liveness.started();
        Ok(Self {
            data: cfg.data.clone().unwrap_or(default_data),
            cfg,
            consumer,
            producer,
            decoder: Decoder::new(registry),
            encoder,
            metrics,
        })
    }

    /// Serves requests until `shutdown`, or as `opts` says (a run in progress
    /// is killed and re-run after a restart).
    pub async fn run(self, shutdown: CancellationToken, opts: RunOptions) -> Result<Exit> {
        tracing::info!(topic = %self.cfg.requests_topic, once = opts.once, idle_exit_secs = opts.idle_exit.map(|d| d.as_secs()), "training worker waiting for requests");
        loop {
            let idle = async {
                match opts.idle_exit {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            };
            let msg = tokio::select! {
                () = shutdown.cancelled() => return Ok(Exit::Shutdown),
                () = idle => {
                    tracing::info!(idle_secs = opts.idle_exit.map(|d| d.as_secs()), "no retrain request pending; exiting");
                    return Ok(Exit::Idle);
                }
                m = self.consumer.recv() => m,
            };
            let msg = match msg {
                Ok(m) => m.detach(),
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error (retried)");
                    continue;
                }
            };
            let mut offsets = TopicPartitionList::new();
            offsets
                .add_partition_offset(
                    msg.topic(),
                    msg.partition(),
                    Offset::Offset(msg.offset() + 1),
                )
                .map_err(kerr("offsets"))?;
            let at = (msg.topic(), msg.partition(), msg.offset());
            let job = match msg.payload() {
                Some(p) => match crate::decode_waiting(
                    &self.decoder,
                    p,
                    at,
                    &self.metrics.liveness,
                    &shutdown,
                )
                .await
                {
                    Ok(v) => Job::from_value(&v).and_then(|j| match j.validate() {
                        Ok(()) => Some(j),
                        Err(why) => {
                            tracing::error!(partition = at.1, offset = at.2, %why, "invalid retrain request skipped (nothing is run for it)");
                            None
                        }
                    }),
                    // Stopped while the registry was out: the request is read again after a restart.
                    Err(e) if e.is_retryable() => return Err(e.into()),
                    Err(e) => {
                        tracing::error!(partition = at.1, offset = at.2, error = %e, "unreadable request skipped");
                        None
                    }
                },
                None => None,
            };
            let served = job.is_some();
            let events = match job {
                Some(job) => {
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            tracing::warn!(request = %job.request_id, "shutting down during a run; the request will be run again");
                            return Ok(Exit::Shutdown);
                        }
                        e = self.serve(&job) => vec![e?],
                    }
                }
                None => Vec::new(),
            };
            self.publish(events, Some(&offsets)).await?;
            if served && opts.once {
                tracing::info!("one request served; exiting (--once)");
                return Ok(Exit::Served);
            }
        }
    }

    async fn serve(&self, job: &Job) -> Result<LifecycleEvent> {
        let now = || chrono::Utc::now().timestamp_millis();
        tracing::info!(request = %job.request_id, model = %job.model_name, trigger = %job.trigger, "training started");
        self.publish(
            vec![LifecycleEvent {
                event_id: format!("{}/training", job.request_id),
                model_name: job.model_name.clone(),
                version: String::new(),
                stage: Stage::Training,
                canary_percent: 0,
                champion_version: None,
                challenger_version: None,
                reason: format!(
                    "request {} ({}): {}",
                    job.request_id, job.trigger, job.reason
                ),
                at_ms: now(),
            }],
            None,
        )
        .await?;
        self.metrics.busy.store(true, Ordering::Relaxed);
        let started = std::time::Instant::now();
        // A scratch directory of our own making, removed when it goes out of scope; named with
        // our pid, so a worker that starts after this one was killed removes it.
        let out_dir = tempfile::Builder::new()
            .prefix(&format!("{SCRATCH_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(|e| {
                Error::Checkpoint(format!("creating the training scratch directory: {e}"))
            })?;
        let mut cmd = tokio::process::Command::new(&self.cfg.python);
        cmd.current_dir(&self.cfg.dir)
            .args([
                "-m",
                "leadscore_training.train",
                "--data",
                &self.data,
                "--out",
            ])
            .arg(out_dir.path())
            .args([
                "--model-name",
                &job.model_name,
                "--mlflow",
                &self.cfg.mlflow_url,
            ])
            .args(["--trials", &self.cfg.trials.to_string()])
            // The job stops when this worker is gone (a SIGKILL leaves no chance to stop it),
            // so an orphaned run never registers a version the re-run request also registers.
            .args(["--parent-pid", &std::process::id().to_string()])
            .args(&self.cfg.extra_args)
            .kill_on_drop(true);
        let output =
            tokio::time::timeout(Duration::from_secs(self.cfg.timeout_secs), cmd.output()).await;
        self.metrics.busy.store(false, Ordering::Relaxed);
        self.metrics
            .last_run_secs
            .store(started.elapsed().as_secs(), Ordering::Relaxed);
        drop(out_dir);
        let event = match output {
            Ok(Ok(o)) => training_outcome(
                &job.request_id,
                &job.model_name,
                o.status.success(),
                &String::from_utf8_lossy(&o.stdout),
                &String::from_utf8_lossy(&o.stderr),
                now(),
            ),
            Ok(Err(e)) => training_outcome(
                &job.request_id,
                &job.model_name,
                false,
                "",
                &format!(
                    "ERROR cannot start {} in {}: {e}",
                    self.cfg.python, self.cfg.dir
                ),
                now(),
            ),
            Err(_) => training_outcome(
                &job.request_id,
                &job.model_name,
                false,
                "",
                &format!(
                    "ERROR killed after training.timeout_secs = {}",
                    self.cfg.timeout_secs
                ),
                now(),
            ),
        };
        if let Ok(mut m) = self.metrics.outcomes.lock() {
            *m.entry(event.stage.as_str().to_string()).or_default() += 1;
        }
        tracing::info!(request = %job.request_id, model = %job.model_name, stage = event.stage.as_str(), version = %event.version, reason = %event.reason, secs = started.elapsed().as_secs(), "training finished");
        Ok(event)
    }

    /// Publishes events, with the request's offsets when given, in one transaction.
    async fn publish(
        &self,
        events: Vec<LifecycleEvent>,
        offsets: Option<&TopicPartitionList>,
    ) -> Result<()> {
        let records: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| Ok((e.model_name.clone(), self.encoder.encode(e.to_value())?)))
            .collect::<Result<_>>()?;
        let producer = self.producer.clone();
        let topic = self.cfg.lifecycle_topic.clone();
        let offsets = offsets.cloned();
        let group = self.consumer.group_metadata();
        let liveness = self.metrics.liveness.clone();
        tokio::task::spawn_blocking(move || {
            let mut txn = producer.begin()?;
            for (key, bytes) in &records {
                txn.send(
                    FutureRecord::to(&topic)
                        .key(key.as_str())
                        .payload(bytes.as_slice()),
                )?;
            }
            txn.commit(offsets.as_ref().zip(group.as_ref()))?;
            liveness.progressed();
            Ok(())
        })
        .await
        .map_err(|e| Error::Checkpoint(format!("publish task: {e}")))?
    }
}

/// How a training run's scratch directory begins: then the worker's pid and a dash.
const SCRATCH_PREFIX: &str = "leadscore-train-";

/// Removes the scratch directories under `dir` whose worker process no longer exists (a
/// SIGKILL leaves them behind); returns how many. Without `/proc` it removes nothing.
fn sweep_scratch(dir: &std::path::Path) -> usize {
    if !std::path::Path::new("/proc/self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) => {
                tracing::warn!(dir = %entry.path().display(), error = %e, "could not remove a killed run's scratch directory")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_removes_scratch_of_dead_workers_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp
            .path()
            .join(format!("{SCRATCH_PREFIX}{}-abc", u32::MAX - 7));
        let alive = tmp
            .path()
            .join(format!("{SCRATCH_PREFIX}{}-def", std::process::id()));
        let other = tmp.path().join("leadscore-train-notapid-x");
        let unrelated = tmp.path().join("something-else");
        for d in [&dead, &alive, &other, &unrelated] {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("model.onnx"), b"x").unwrap();
        }
        assert_eq!(sweep_scratch(tmp.path()), 1);
        assert!(!dead.exists());
        assert!(alive.exists() && other.exists() && unrelated.exists());
    }

    fn job(request_id: &str, model_name: &str) -> Job {
        Job {
            request_id: request_id.into(),
            model_name: model_name.into(),
            trigger: "manual".into(),
            reason: "r".into(),
        }
    }

    #[test]
    fn plain_ids_pass_and_paths_or_options_do_not() {
        assert_eq!(job("5f0c-91:a.b_c", "lead-scoring").validate(), Ok(()));
        for (id, model) in [
            ("../../etc", "m"),
            ("a/b", "m"),
            ("", "m"),
            ("-rf", "m"),
            (".hidden", "m"),
            ("ok", "--data=/etc/passwd"),
            ("ok", "m m"),
            ("ok", &"x".repeat(129)),
        ] {
            let err = job(id, model).validate().unwrap_err();
            assert!(
                err.contains("request_id") || err.contains("model_name"),
                "{err}"
            );
        }
    }
}
