//! The scorer's metrics: counters, latency histograms, consumer lag and the
//! model in service.
//!
//! Every event is one method here, and each records twice: into atomics
//! rendered as Prometheus text on `/metrics`, and into OpenTelemetry
//! instruments of the global meter (exported over OTLP when
//! `telemetry.otlp_endpoint` is set, a no-op otherwise). Names are defined in
//! this file only: `leadscore_scorer_*` in Prometheus, `leadscore.scorer.*`
//! in OpenTelemetry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use leadscore_runtime::Liveness;
use leadscore_runtime::prom::{Kind, Page};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram as OtelHistogram, Meter};

/// Upper bounds (ms) of the latency histograms.
const BUCKETS_MS: [f64; 16] = [
    0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
    30000.0, 60000.0,
];

/// A stage of one batch, timed separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for and collecting the batch's records.
    Fetch,
    /// Decoding the records (Avro through the registry, or JSON).
    Decode,
    /// Features and model inference for every model.
    Score,
    /// Encoding and handing the outputs to the producer.
    Produce,
    /// Sending the offsets and committing the transaction.
    Commit,
}

impl Stage {
    const ALL: [Stage; 5] = [
        Stage::Fetch,
        Stage::Decode,
        Stage::Score,
        Stage::Produce,
        Stage::Commit,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Fetch => "fetch",
            Stage::Decode => "decode",
            Stage::Score => "score",
            Stage::Produce => "produce",
            Stage::Commit => "commit",
        }
    }
}

/// A cumulative histogram of milliseconds.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_MS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, ms: f64) {
        if let Some(i) = BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((ms.max(0.0) * 1000.0) as u64, Ordering::Relaxed);
    }

    fn write(&self, page: &mut Page, name: &str, labels: &[(&str, &str)]) {
        page.histogram(
            name,
            labels,
            BUCKETS_MS
                .iter()
                .zip(&self.buckets)
                .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed))),
            self.count.load(Ordering::Relaxed),
            self.sum_us.load(Ordering::Relaxed) as f64 / 1000.0,
        );
    }
}

/// OpenTelemetry instruments mirroring the atomics.
struct Otel {
    inputs: Counter<u64>,
    outputs: Counter<u64>,
    dead: Counter<u64>,
    transactions: Counter<u64>,
    cache: Counter<u64>,
    event_to_score: OtelHistogram<f64>,
    stage: OtelHistogram<f64>,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Otel")
    }
}

/// Scorer metrics. Shared behind an `Arc` made by [`Metrics::new`].
#[derive(Debug)]
pub struct Metrics {
    inputs: AtomicU64,
    scored: AtomicU64,
    shadow: AtomicU64,
    candidate_errors: AtomicU64,
    tombstones: AtomicU64,
    outcomes: AtomicU64,
    ignored: AtomicU64,
    batches: AtomicU64,
    aborted: AtomicU64,
    cache_writes: AtomicU64,
    cache_errors: AtomicU64,
    cache_dropped: AtomicU64,
    dead: Mutex<BTreeMap<&'static str, u64>>,
    event_to_score: Histogram,
    stages: [Histogram; Stage::ALL.len()],
    lag: Mutex<BTreeMap<(String, i32), i64>>,
    skipped: AtomicU64,
    liveness: Arc<Liveness>,
    /// The champion's label and whether its scores carry reasons.
    model: Mutex<(String, bool)>,
    otel: Otel,
}

impl Metrics {
    /// Creates the metrics with the default stuck rule (5 aborts in a row, 60 s without progress).
    pub fn new() -> Arc<Self> {
        Self::with_liveness(Liveness::new(5, Duration::from_secs(60)))
    }

    /// Creates the metrics, whose readiness is `liveness`, and registers the OpenTelemetry
    /// instruments on the global meter.
    pub fn with_liveness(liveness: Arc<Liveness>) -> Arc<Self> {
        let meter = opentelemetry::global::meter("leadscore-scorer");
        Arc::new_cyclic(|weak: &Weak<Metrics>| {
            register_gauges(&meter, weak.clone());
            Metrics {
                inputs: AtomicU64::new(0),
                scored: AtomicU64::new(0),
                shadow: AtomicU64::new(0),
                candidate_errors: AtomicU64::new(0),
                tombstones: AtomicU64::new(0),
                outcomes: AtomicU64::new(0),
                ignored: AtomicU64::new(0),
                batches: AtomicU64::new(0),
                aborted: AtomicU64::new(0),
                cache_writes: AtomicU64::new(0),
                cache_errors: AtomicU64::new(0),
                cache_dropped: AtomicU64::new(0),
                dead: Mutex::default(),
                event_to_score: Histogram::default(),
                stages: Default::default(),
                lag: Mutex::default(),
                skipped: AtomicU64::new(0),
                liveness,
                model: Mutex::default(),
                otel: instruments(&meter),
            }
        })
    }

    /// Counts a committed batch and what it produced.
    pub fn batch_committed(&self, inputs: usize, outputs: &[crate::process::Output]) {
        use crate::process::Output;
        self.liveness.progressed();
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.otel
            .transactions
            .add(1, &[KeyValue::new("outcome", "committed")]);
        self.inputs.fetch_add(inputs as u64, Ordering::Relaxed);
        self.otel.inputs.add(inputs as u64, &[]);
        let (mut scored, mut shadow, mut tombstones, mut outcomes, mut ignored) = (0, 0, 0, 0, 0);
        let mut candidate_errors = 0;
        for o in outputs {
            match o {
                Output::Score { latency_ms, .. } => {
                    scored += 1;
                    self.event_to_score.observe(*latency_ms);
                    self.otel.event_to_score.record(*latency_ms, &[]);
                }
                Output::Shadow { record, .. } if record.error.is_some() => candidate_errors += 1,
                Output::Shadow { .. } => shadow += 1,
                Output::Tombstone { .. } => tombstones += 1,
                Output::Outcome => outcomes += 1,
                Output::Ignored => ignored += 1,
                Output::Skipped { .. } => {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                    self.otel
                        .outputs
                        .add(1, &[KeyValue::new("kind", "skipped")]);
                }
                Output::Dead { kind, .. } => {
                    self.otel.dead.add(1, &[KeyValue::new("kind", *kind)]);
                    if let Ok(mut d) = self.dead.lock() {
                        *d.entry(kind).or_default() += 1;
                    }
                }
            }
        }
        for (atomic, n, kind) in [
            (&self.scored, scored, "score"),
            (&self.shadow, shadow, "shadow"),
            (&self.candidate_errors, candidate_errors, "candidate_error"),
            (&self.tombstones, tombstones, "tombstone"),
            (&self.outcomes, outcomes, "outcome"),
            (&self.ignored, ignored, "ignored"),
        ] {
            atomic.fetch_add(n, Ordering::Relaxed);
            if n > 0 {
                self.otel.outputs.add(n, &[KeyValue::new("kind", kind)]);
            }
        }
    }

    /// Counts an aborted transaction (its batch is re-read); returns the aborts in a row.
    pub fn batch_aborted(&self) -> u32 {
        self.aborted.fetch_add(1, Ordering::Relaxed);
        let in_a_row = self.liveness.aborted();
        self.otel
            .transactions
            .add(1, &[KeyValue::new("outcome", "aborted")]);
        in_a_row
    }

    /// Records how long one stage of a batch took.
    pub fn stage(&self, stage: Stage, took: Duration) {
        let ms = took.as_secs_f64() * 1000.0;
        self.stages[stage as usize].observe(ms);
        self.otel
            .stage
            .record(ms, &[KeyValue::new("stage", stage.as_str())]);
    }

    /// Records the consumer lag of one partition: records behind its high watermark.
    pub fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        if let Ok(mut l) = self.lag.lock() {
            l.insert((topic.to_string(), partition), lag.max(0));
        }
    }

    /// Forgets the lag of partitions no longer assigned here.
    pub fn retain_lag(&self, keep: impl Fn(&str, i32) -> bool) {
        if let Ok(mut l) = self.lag.lock() {
            l.retain(|(t, p), _| keep(t, *p));
            self.liveness.set_backlog(l.values().sum());
        }
    }

    /// Total consumer lag over the partitions assigned here.
    pub fn total_lag(&self) -> i64 {
        self.lag.lock().map(|l| l.values().sum()).unwrap_or(0)
    }

    /// Counts a cache write of `n` entries that succeeded.
    pub fn cache_written(&self, n: usize) {
        self.cache_writes.fetch_add(n as u64, Ordering::Relaxed);
        self.otel
            .cache
            .add(n as u64, &[KeyValue::new("outcome", "written")]);
    }

    /// Counts a failed cache write (Redis down or slow); scoring goes on.
    pub fn cache_failed(&self) {
        self.cache_errors.fetch_add(1, Ordering::Relaxed);
        self.otel
            .cache
            .add(1, &[KeyValue::new("outcome", "failed")]);
    }

    /// Counts a batch whose cache update was dropped because the writer was behind.
    pub fn cache_dropped(&self) {
        self.cache_dropped.fetch_add(1, Ordering::Relaxed);
        self.otel
            .cache
            .add(1, &[KeyValue::new("outcome", "dropped")]);
    }

    /// Failed cache writes so far.
    pub fn cache_errors(&self) -> u64 {
        self.cache_errors.load(Ordering::Relaxed)
    }

    /// Marks the scorer started (models loaded, consuming) or stopped for good.
    pub fn set_ready(&self, ready: bool) {
        if ready {
            self.liveness.started();
        } else {
            self.liveness.stopped();
        }
    }

    /// Whether the scorer is ready: started, not stopped, not stuck.
    pub fn is_ready(&self) -> bool {
        self.liveness.readiness().is_ok()
    }

    /// The readiness rule this scorer reports to.
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    /// Outputs skipped because nothing could carry them.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Records the champion in service (`name vversion`) and whether it is explained.
    pub fn set_model(&self, model: &leadscore_model::Model) {
        if let Ok(mut m) = self.model.lock() {
            *m = (model.metadata().label(), model.explained());
        }
    }

    fn model(&self) -> (String, bool) {
        self.model.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Scored leads so far.
    pub fn scored(&self) -> u64 {
        self.scored.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut page = Page::new();
        for (name, help, v) in [
            (
                "leadscore_scorer_inputs_total",
                "Input records consumed and committed.",
                &self.inputs,
            ),
            (
                "leadscore_scorer_skipped_total",
                "Outputs no record could carry (not even a capped dead letter): logged without payload and skipped.",
                &self.skipped,
            ),
            (
                "leadscore_scorer_scored_total",
                "Live scores published.",
                &self.scored,
            ),
            (
                "leadscore_scorer_shadow_total",
                "Shadow scores published.",
                &self.shadow,
            ),
            (
                "leadscore_scorer_candidate_errors_total",
                "Leads a challenger or canary failed on (published to the shadow topic as errors; the champion served them).",
                &self.candidate_errors,
            ),
            (
                "leadscore_scorer_tombstones_total",
                "Tombstones published for deleted leads.",
                &self.tombstones,
            ),
            (
                "leadscore_scorer_outcomes_total",
                "Outcome events seen (converted or lost).",
                &self.outcomes,
            ),
            (
                "leadscore_scorer_ignored_total",
                "Events needing no output.",
                &self.ignored,
            ),
            (
                "leadscore_scorer_transactions_total",
                "Committed transactions.",
                &self.batches,
            ),
            (
                "leadscore_scorer_aborted_total",
                "Aborted transactions (batch re-read).",
                &self.aborted,
            ),
            (
                "leadscore_scorer_cache_writes_total",
                "Scores and deletions written to Redis.",
                &self.cache_writes,
            ),
            (
                "leadscore_scorer_cache_errors_total",
                "Failed Redis writes (cache degraded, scoring continues).",
                &self.cache_errors,
            ),
            (
                "leadscore_scorer_cache_dropped_total",
                "Batches not cached because the cache writer was behind.",
                &self.cache_dropped,
            ),
        ] {
            page.counter(name, help, v.load(Ordering::Relaxed));
        }
        page.family(
            "leadscore_scorer_dead_letters_total",
            Kind::Counter,
            "Inputs sent to the DLQ by error kind.",
        );
        if let Ok(d) = self.dead.lock() {
            for (kind, n) in d.iter() {
                page.sample("leadscore_scorer_dead_letters_total", &[("kind", kind)], n);
            }
        }
        page.family(
            "leadscore_scorer_event_to_score_ms",
            Kind::Histogram,
            "Event time to score time.",
        );
        self.event_to_score
            .write(&mut page, "leadscore_scorer_event_to_score_ms", &[]);
        page.family(
            "leadscore_scorer_stage_ms",
            Kind::Histogram,
            "Time per batch stage.",
        );
        for s in Stage::ALL {
            self.stages[s as usize].write(
                &mut page,
                "leadscore_scorer_stage_ms",
                &[("stage", s.as_str())],
            );
        }
        page.family(
            "leadscore_scorer_consumer_lag",
            Kind::Gauge,
            "Records behind the high watermark, per assigned partition.",
        );
        if let Ok(l) = self.lag.lock() {
            for ((topic, partition), lag) in l.iter() {
                page.sample(
                    "leadscore_scorer_consumer_lag",
                    &[("topic", topic), ("partition", &partition.to_string())],
                    lag,
                );
            }
        }
        let (model, explained) = self.model();
        page.family(
            "leadscore_scorer_model_info",
            Kind::Gauge,
            "Champion model in service; explained=false: its scores carry no reasons (not an explained tree ensemble).",
        )
        .sample(
            "leadscore_scorer_model_info",
            &[("model", &model), ("explained", if explained { "true" } else { "false" })],
            1,
        );
        self.liveness.write(&mut page, "scorer");
        page.finish()
    }
}

fn instruments(meter: &Meter) -> Otel {
    let ms_buckets = BUCKETS_MS.to_vec();
    Otel {
        inputs: meter
            .u64_counter("leadscore.scorer.inputs")
            .with_description("Input records consumed and committed")
            .build(),
        outputs: meter
            .u64_counter("leadscore.scorer.outputs")
            .with_description("Records published, by kind (score, shadow, tombstone, ...)")
            .build(),
        dead: meter
            .u64_counter("leadscore.scorer.dead_letters")
            .with_description("Inputs sent to the DLQ, by error kind")
            .build(),
        transactions: meter
            .u64_counter("leadscore.scorer.transactions")
            .with_description("Kafka transactions, by outcome")
            .build(),
        cache: meter
            .u64_counter("leadscore.scorer.cache")
            .with_description("Score cache writes, by outcome")
            .build(),
        event_to_score: meter
            .f64_histogram("leadscore.scorer.event_to_score")
            .with_unit("ms")
            .with_description("Event time to score time")
            .with_boundaries(ms_buckets.clone())
            .build(),
        stage: meter
            .f64_histogram("leadscore.scorer.stage")
            .with_unit("ms")
            .with_description("Time per batch stage")
            .with_boundaries(ms_buckets)
            .build(),
    }
}

fn register_gauges(meter: &Meter, weak: Weak<Metrics>) {
    let lag = weak.clone();
    meter
        .i64_observable_gauge("leadscore.scorer.consumer_lag")
        .with_description("Records behind the high watermark, per assigned partition")
        .with_callback(move |obs| {
            if let Some(m) = lag.upgrade()
                && let Ok(l) = m.lag.lock()
            {
                for ((topic, partition), v) in l.iter() {
                    obs.observe(
                        *v,
                        &[
                            KeyValue::new("topic", topic.clone()),
                            KeyValue::new("partition", i64::from(*partition)),
                        ],
                    );
                }
            }
        })
        .build();
    let model = weak.clone();
    meter
        .u64_observable_gauge("leadscore.scorer.model_info")
        .with_description("Champion model in service (value 1, the model as attribute)")
        .with_callback(move |obs| {
            if let Some(m) = model.upgrade() {
                let (label, explained) = m.model();
                obs.observe(
                    1,
                    &[
                        KeyValue::new("model", label),
                        KeyValue::new("explained", explained),
                    ],
                );
            }
        })
        .build();
    meter
        .u64_observable_gauge("leadscore.scorer.ready")
        .with_description("Whether the scorer is ready")
        .with_callback(move |obs| {
            if let Some(m) = weak.upgrade() {
                obs.observe(u64::from(m.is_ready()), &[]);
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_cumulative_buckets() {
        let m = Metrics::new();
        m.stage(Stage::Commit, Duration::from_millis(3));
        m.stage(Stage::Commit, Duration::from_millis(40));
        let text = m.render();
        assert!(
            text.contains("leadscore_scorer_stage_ms_bucket{stage=\"commit\",le=\"5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("leadscore_scorer_stage_ms_bucket{stage=\"commit\",le=\"50\"} 2"),
            "{text}"
        );
        assert!(text.contains("leadscore_scorer_stage_ms_count{stage=\"commit\"} 2"));
        assert!(text.contains("leadscore_scorer_stage_ms_count{stage=\"fetch\"} 0"));
    }

    #[test]
    fn lag_is_per_partition_and_forgotten_on_revocation() {
        let m = Metrics::new();
        m.set_lag("in", 0, 10);
        m.set_lag("in", 1, 5);
        m.set_lag("in", 1, -3);
        assert_eq!(m.total_lag(), 10);
        m.retain_lag(|_, p| p == 1);
        assert_eq!(m.total_lag(), 0);
        assert!(
            m.render()
                .contains("leadscore_scorer_consumer_lag{topic=\"in\",partition=\"1\"} 0")
        );
    }
}
