//! The aggregator's metrics, in Prometheus text on `/metrics` and as
//! OpenTelemetry instruments of the global meter (`leadscore_drift_*` and
//! `leadscore.drift.*`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use leadscore_runtime::Liveness;
use leadscore_runtime::prom::{Kind, Page};

use opentelemetry::KeyValue;
use opentelemetry::metrics::ObservableCounter;

/// A counted event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A score counted in its window.
    Counted,
    /// A shadow pair counted.
    Shadow,
    /// A candidate's failure on a lead counted (as an error of its version).
    CandidateError,
    /// A record for a window already released.
    Late,
    /// A score of a model version without a reference profile.
    Unprofiled,
    /// A record that could not be read.
    Malformed,
    /// A partial aggregate produced.
    Partial,
    /// A window report produced.
    Report,
    /// An alert event produced.
    Alert,
    /// A checkpoint committed.
    Checkpoint,
}

impl Event {
    const ALL: [Event; 10] = [
        Event::Counted,
        Event::Shadow,
        Event::CandidateError,
        Event::Late,
        Event::Unprofiled,
        Event::Malformed,
        Event::Partial,
        Event::Report,
        Event::Alert,
        Event::Checkpoint,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Event::Counted => "counted",
            Event::Shadow => "shadow",
            Event::CandidateError => "candidate_error",
            Event::Late => "late",
            Event::Unprofiled => "unprofiled",
            Event::Malformed => "malformed",
            Event::Partial => "partial",
            Event::Report => "report",
            Event::Alert => "alert",
            Event::Checkpoint => "checkpoint",
        }
    }
}

/// Counters and gauges of one aggregator.
pub struct Metrics {
    counts: [AtomicU64; 10],
    open_windows: AtomicU64,
    pending_windows: AtomicU64,
    last_checkpoint_ms: AtomicU64,
    liveness: Arc<Liveness>,
    otel: std::sync::OnceLock<ObservableCounter<u64>>,
}

impl Metrics {
    /// New metrics, registered with the global meter. The OpenTelemetry
    /// counter is observed from the same atomics at export time, so counting
    /// a record costs one relaxed atomic add.
    pub fn new() -> Arc<Self> {
        Self::with_liveness(Liveness::new(5, std::time::Duration::from_secs(60)))
    }

    /// New metrics whose readiness is `liveness`.
    pub fn with_liveness(liveness: Arc<Liveness>) -> Arc<Self> {
        let metrics = Arc::new(Self {
            counts: Default::default(),
            open_windows: AtomicU64::new(0),
            pending_windows: AtomicU64::new(0),
            last_checkpoint_ms: AtomicU64::new(0),
            liveness,
            otel: std::sync::OnceLock::new(),
        });
        let weak = Arc::downgrade(&metrics);
        let counter = opentelemetry::global::meter("leadscore-drift")
            .u64_observable_counter("leadscore.drift.events")
            .with_description("Records counted, partials, reports, alerts and checkpoints, by kind")
            .with_callback(move |observer| {
                if let Some(m) = weak.upgrade() {
                    for e in Event::ALL {
                        observer.observe(m.get(e), &[KeyValue::new("kind", e.as_str())]);
                    }
                }
            })
            .build();
        let _ = metrics.otel.set(counter);
        metrics
    }

    /// Counts `n` events of a kind.
    pub fn add(&self, event: Event, n: u64) {
        if n == 0 {
            return;
        }
        self.counts[event as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Events of a kind so far.
    pub fn get(&self, event: Event) -> u64 {
        self.counts[event as usize].load(Ordering::Relaxed)
    }

    /// Scores in open windows, and windows waiting for partitions at the merger.
    pub fn set_windows(&self, open_scores: u64, pending: u64) {
        self.open_windows.store(open_scores, Ordering::Relaxed);
        self.pending_windows.store(pending, Ordering::Relaxed);
    }

    /// Duration of the last checkpoint transaction.
    pub fn set_checkpoint_ms(&self, ms: u64) {
        self.last_checkpoint_ms.store(ms, Ordering::Relaxed);
    }

    /// Started once state is restored and input assigned; `false`: stopped for good.
    pub fn set_ready(&self, ready: bool) {
        if ready {
            self.liveness.started();
        } else {
            self.liveness.stopped();
        }
    }

    /// Whether the aggregator is ready: started, not stopped, not stuck.
    pub fn is_ready(&self) -> bool {
        self.liveness.readiness().is_ok()
    }

    /// The readiness rule this aggregator reports to.
    pub fn liveness(&self) -> &Arc<Liveness> {
        &self.liveness
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut page = Page::new();
        page.family(
            "leadscore_drift_events_total",
            Kind::Counter,
            "Records counted, partials, reports, alerts and checkpoints, by kind.",
        );
        for e in Event::ALL {
            page.sample(
                "leadscore_drift_events_total",
                &[("kind", e.as_str())],
                self.get(e),
            );
        }
        for (name, help, v) in [
            (
                "leadscore_drift_open_scores",
                "Scores counted in windows not yet released.",
                &self.open_windows,
            ),
            (
                "leadscore_drift_pending_windows",
                "Windows the merger waits on other partitions for.",
                &self.pending_windows,
            ),
            (
                "leadscore_drift_last_checkpoint_ms",
                "Duration of the last checkpoint transaction, ms.",
                &self.last_checkpoint_ms,
            ),
        ] {
            page.gauge(name, help, v.load(Ordering::Relaxed));
        }
        self.liveness.write(&mut page, "drift");
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
