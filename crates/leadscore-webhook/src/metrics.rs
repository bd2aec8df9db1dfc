//! What the webhook service counts, for `/metrics` and OpenTelemetry.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use leadscore_runtime::prom::{Kind, Page};
use leadscore_runtime::{Liveness, NotReady, Status};

/// Upper bounds of the delivery latency buckets, ms.
const BUCKETS_MS: [f64; 14] = [
    5.0,
    10.0,
    25.0,
    50.0,
    100.0,
    250.0,
    500.0,
    1_000.0,
    2_500.0,
    5_000.0,
    10_000.0,
    60_000.0,
    600_000.0,
    3_600_000.0,
];

#[derive(Debug, Default, Clone)]
struct PerEndpoint {
    delivered: u64,
    given_up: u64,
    retries: u64,
    attempts: BTreeMap<String, u64>,
    latency: Vec<u64>,
    latency_count: u64,
    latency_sum: f64,
}

/// Counters of the service.
pub struct Metrics {
    /// The readiness rule.
    pub liveness: Arc<Liveness>,
    endpoints: Mutex<BTreeMap<String, PerEndpoint>>,
    consumed: AtomicU64,
    unreadable: AtomicU64,
    in_flight: AtomicI64,
    lag: AtomicI64,
    otel: Otel,
}

struct Otel {
    deliveries: opentelemetry::metrics::Counter<u64>,
    attempts: opentelemetry::metrics::Counter<u64>,
    latency: opentelemetry::metrics::Histogram<f64>,
}

impl Metrics {
    /// Counters reporting to `liveness`.
    pub fn new(liveness: Arc<Liveness>) -> Self {
        let meter = opentelemetry::global::meter("leadscore-webhook");
        Self {
            liveness,
            endpoints: Mutex::default(),
            consumed: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            lag: AtomicI64::new(0),
            otel: Otel {
                deliveries: meter
                    .u64_counter("leadscore.webhook.deliveries")
                    .with_description(
                        "Deliveries ended, by endpoint and outcome (delivered, given_up)",
                    )
                    .build(),
                attempts: meter
                    .u64_counter("leadscore.webhook.attempts")
                    .with_description("HTTP attempts, by endpoint and status")
                    .build(),
                latency: meter
                    .f64_histogram("leadscore.webhook.delivery_latency")
                    .with_unit("ms")
                    .with_description("Score committed to the receiver's 2xx")
                    .build(),
            },
        }
    }

    fn with(&self, endpoint: &str, f: impl FnOnce(&mut PerEndpoint)) {
        if let Ok(mut m) = self.endpoints.lock() {
            f(m.entry(endpoint.to_string()).or_default());
        }
    }

    /// One delivery done, `latency_ms` after its score was committed.
    pub fn delivered(&self, endpoint: &str, attempts: u32, latency_ms: f64) {
        let _ = attempts;
        self.with(endpoint, |e| {
            e.delivered += 1;
            if e.latency.is_empty() {
                e.latency = vec![0; BUCKETS_MS.len()];
            }
            if let Some(i) = BUCKETS_MS.iter().position(|b| latency_ms <= *b) {
                e.latency[i] += 1;
            }
            e.latency_count += 1;
            e.latency_sum += latency_ms;
        });
        let attrs = [
            opentelemetry::KeyValue::new("endpoint", endpoint.to_string()),
            opentelemetry::KeyValue::new("outcome", "delivered"),
        ];
        self.otel.deliveries.add(1, &attrs);
        self.otel.latency.record(latency_ms, &attrs[..1]);
    }

    /// One delivery given up (dead-lettered).
    pub fn given_up(&self, endpoint: &str, attempts: u32) {
        let _ = attempts;
        self.with(endpoint, |e| e.given_up += 1);
        self.otel.deliveries.add(
            1,
            &[
                opentelemetry::KeyValue::new("endpoint", endpoint.to_string()),
                opentelemetry::KeyValue::new("outcome", "given_up"),
            ],
        );
    }

    /// One HTTP attempt answered with `status` (`None`: no answer).
    pub fn attempt(&self, endpoint: &str, status: Option<u16>) {
        let status = status.map_or_else(|| "none".to_string(), |s| s.to_string());
        self.otel.attempts.add(
            1,
            &[
                opentelemetry::KeyValue::new("endpoint", endpoint.to_string()),
                opentelemetry::KeyValue::new("status", status.clone()),
            ],
        );
        self.with(endpoint, |e| *e.attempts.entry(status).or_default() += 1);
    }

    /// One retry scheduled.
    pub fn retry(&self, endpoint: &str) {
        self.with(endpoint, |e| e.retries += 1);
    }

    /// One record taken from the topic.
    pub fn consumed(&self) {
        self.consumed.fetch_add(1, Ordering::Relaxed);
    }

    /// One record that is not a readable score (skipped, logged).
    pub fn unreadable(&self) {
        self.unreadable.fetch_add(1, Ordering::Relaxed);
    }

    /// Records taken and not yet delivered everywhere.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as i64, Ordering::Relaxed);
    }

    /// Records behind the end of the topic (not yet taken) plus those in flight.
    pub fn set_lag(&self, n: i64) {
        self.lag.store(n, Ordering::Relaxed);
        self.liveness.set_backlog(n);
    }

    /// Deliveries done per endpoint (tests, the bench).
    pub fn delivered_total(&self) -> u64 {
        self.endpoints
            .lock()
            .map(|m| m.values().map(|e| e.delivered + e.given_up).sum())
            .unwrap_or(0)
    }
}

impl Status for Metrics {
    fn readiness(&self) -> Result<(), NotReady> {
        self.liveness.readiness()
    }

    fn metrics(&self) -> String {
        let mut page = Page::new();
        page.counter(
            "leadscore_webhook_consumed_total",
            "Score records taken from the topic.",
            self.consumed.load(Ordering::Relaxed),
        );
        page.counter(
            "leadscore_webhook_unreadable_total",
            "Records that are not readable scores (skipped).",
            self.unreadable.load(Ordering::Relaxed),
        );
        page.gauge(
            "leadscore_webhook_in_flight",
            "Records taken and not yet delivered to every endpoint.",
            self.in_flight.load(Ordering::Relaxed),
        );
        page.gauge(
            "leadscore_webhook_lag",
            "Records not yet delivered everywhere: behind the topic's end, plus in flight.",
            self.lag.load(Ordering::Relaxed),
        );
        let endpoints = self.endpoints.lock().map(|m| m.clone()).unwrap_or_default();
        page.family(
            "leadscore_webhook_deliveries_total",
            Kind::Counter,
            "Deliveries ended, by endpoint and outcome.",
        );
        for (name, e) in &endpoints {
            page.sample(
                "leadscore_webhook_deliveries_total",
                &[("endpoint", name), ("outcome", "delivered")],
                e.delivered,
            );
            page.sample(
                "leadscore_webhook_deliveries_total",
                &[("endpoint", name), ("outcome", "given_up")],
                e.given_up,
            );
        }
        page.family(
            "leadscore_webhook_attempts_total",
            Kind::Counter,
            "HTTP attempts, by endpoint and status (none: no answer).",
        );
        for (name, e) in &endpoints {
            for (status, n) in &e.attempts {
                page.sample(
                    "leadscore_webhook_attempts_total",
                    &[("endpoint", name), ("status", status)],
                    n,
                );
            }
        }
        page.family(
            "leadscore_webhook_retries_total",
            Kind::Counter,
            "Retries scheduled, by endpoint.",
        );
        for (name, e) in &endpoints {
            page.sample(
                "leadscore_webhook_retries_total",
                &[("endpoint", name)],
                e.retries,
            );
        }
        page.family(
            "leadscore_webhook_delivery_latency_ms",
            Kind::Histogram,
            "Score committed (record timestamp) to the receiver's 2xx, ms.",
        );
        for (name, e) in &endpoints {
            let counts = if e.latency.is_empty() {
                vec![0; BUCKETS_MS.len()]
            } else {
                e.latency.clone()
            };
            page.histogram(
                "leadscore_webhook_delivery_latency_ms",
                &[("endpoint", name)],
                BUCKETS_MS.iter().copied().zip(counts),
                e.latency_count,
                e.latency_sum,
            );
        }
        let mut out = page.finish();
        out.push_str(&self.liveness.render("webhook"));
        out
    }
}
