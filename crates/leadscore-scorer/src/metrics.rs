//! The scorer's counters and latency histogram, rendered in Prometheus text format.
//!
//! Each event is one method that counts it; names are defined here only.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Upper bounds (ms) of the event-to-score latency histogram.
const BUCKETS_MS: [f64; 12] = [
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0, 30000.0,
];

/// Scorer metrics. Shared behind an `Arc`.
#[derive(Debug, Default)]
pub struct Metrics {
    inputs: AtomicU64,
    scored: AtomicU64,
    shadow: AtomicU64,
    tombstones: AtomicU64,
    outcomes: AtomicU64,
    ignored: AtomicU64,
    batches: AtomicU64,
    aborted: AtomicU64,
    cache_writes: AtomicU64,
    cache_errors: AtomicU64,
    cache_dropped: AtomicU64,
    dead: Mutex<BTreeMap<&'static str, u64>>,
    latency_buckets: [AtomicU64; BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    ready: AtomicBool,
    model: Mutex<String>,
}

impl Metrics {
    /// Counts a committed batch and what it produced.
    pub fn batch_committed(&self, inputs: usize, outputs: &[crate::process::Output]) {
        use crate::process::Output;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.inputs.fetch_add(inputs as u64, Ordering::Relaxed);
        for o in outputs {
            match o {
                Output::Score { latency_ms, .. } => {
                    self.scored.fetch_add(1, Ordering::Relaxed);
                    self.observe_latency(*latency_ms);
                }
                Output::Shadow { .. } => {
                    self.shadow.fetch_add(1, Ordering::Relaxed);
                }
                Output::Tombstone { .. } => {
                    self.tombstones.fetch_add(1, Ordering::Relaxed);
                }
                Output::Outcome => {
                    self.outcomes.fetch_add(1, Ordering::Relaxed);
                }
                Output::Ignored => {
                    self.ignored.fetch_add(1, Ordering::Relaxed);
                }
                Output::Dead { kind, .. } => {
                    if let Ok(mut d) = self.dead.lock() {
                        *d.entry(kind).or_default() += 1;
                    }
                }
            }
        }
    }

    /// Counts an aborted transaction (its batch is re-read).
    pub fn batch_aborted(&self) {
        self.aborted.fetch_add(1, Ordering::Relaxed);
    }

    fn observe_latency(&self, ms: f64) {
        for (i, bound) in BUCKETS_MS.iter().enumerate() {
            if ms <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Counts a cache write of `n` entries that succeeded.
    pub fn cache_written(&self, n: usize) {
        self.cache_writes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts a failed cache write (Redis down or slow); scoring goes on.
    pub fn cache_failed(&self) {
        self.cache_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a batch whose cache update was dropped because the writer was behind.
    pub fn cache_dropped(&self) {
        self.cache_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed cache writes so far.
    pub fn cache_errors(&self) -> u64 {
        self.cache_errors.load(Ordering::Relaxed)
    }

    /// Marks the scorer ready (models loaded, consuming) or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the scorer is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Records the champion in service (`name vversion`).
    pub fn set_model(&self, label: String) {
        if let Ok(mut m) = self.model.lock() {
            *m = label;
        }
    }

    /// Scored leads so far.
    pub fn scored(&self) -> u64 {
        self.scored.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            &mut out,
            "leadscore_scorer_inputs_total",
            "Input records consumed and committed.",
            self.inputs.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_scored_total",
            "Live scores published.",
            self.scored.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_shadow_total",
            "Shadow scores published.",
            self.shadow.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_tombstones_total",
            "Tombstones published for deleted leads.",
            self.tombstones.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_outcomes_total",
            "Outcome events seen (converted or lost).",
            self.outcomes.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_ignored_total",
            "Events needing no output.",
            self.ignored.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_transactions_total",
            "Committed transactions.",
            self.batches.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_aborted_total",
            "Aborted transactions (batch re-read).",
            self.aborted.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_cache_writes_total",
            "Scores and deletions written to Redis.",
            self.cache_writes.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_cache_errors_total",
            "Failed Redis writes (cache degraded, scoring continues).",
            self.cache_errors.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "leadscore_scorer_cache_dropped_total",
            "Batches not cached because the cache writer was behind.",
            self.cache_dropped.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP leadscore_scorer_dead_letters_total Inputs sent to the DLQ by error kind.\n# TYPE leadscore_scorer_dead_letters_total counter"
        );
        if let Ok(d) = self.dead.lock() {
            for (kind, n) in d.iter() {
                let _ = writeln!(
                    out,
                    "leadscore_scorer_dead_letters_total{{kind=\"{kind}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP leadscore_scorer_event_to_score_ms Event time to score time.\n# TYPE leadscore_scorer_event_to_score_ms histogram"
        );
        for (i, bound) in BUCKETS_MS.iter().enumerate() {
            let _ = writeln!(
                out,
                "leadscore_scorer_event_to_score_ms_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "leadscore_scorer_event_to_score_ms_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(out, "leadscore_scorer_event_to_score_ms_count {count}");
        let _ = writeln!(
            out,
            "leadscore_scorer_event_to_score_ms_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1000.0
        );
        let model = self.model.lock().map(|m| m.clone()).unwrap_or_default();
        let _ = writeln!(
            out,
            "# HELP leadscore_scorer_model_info Champion model in service.\n# TYPE leadscore_scorer_model_info gauge\nleadscore_scorer_model_info{{model=\"{model}\"}} 1"
        );
        let _ = writeln!(
            out,
            "# HELP leadscore_scorer_ready Whether the scorer is ready.\n# TYPE leadscore_scorer_ready gauge\nleadscore_scorer_ready {}",
            u8::from(self.is_ready())
        );
        out
    }
}
