//! Counters of the lookup service, on `/metrics` and through OpenTelemetry.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use leadscore_runtime::prom::{Kind, Page};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

use crate::store::StoreCounts;

/// Call counts by method and status code, latency, stream state.
pub struct Metrics {
    calls: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    watchers: AtomicI64,
    watch_dropped: AtomicU64,
    ready: AtomicBool,
    otel_calls: Counter<u64>,
    otel_latency: Histogram<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let meter = opentelemetry::global::meter("leadscore-lookup");
        Self {
            calls: Mutex::default(),
            watchers: AtomicI64::new(0),
            watch_dropped: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            otel_calls: meter
                .u64_counter("leadscore_lookup_calls")
                .with_description("Lookup calls by method and status code")
                .build(),
            otel_latency: meter
                .f64_histogram("leadscore_lookup_latency_ms")
                .with_description("Lookup call latency by method, ms")
                .with_unit("ms")
                .build(),
        }
    }
}

/// A status code's name, for labels.
pub fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::Internal => "INTERNAL",
        _ => "OTHER",
    }
}

impl Metrics {
    /// Counts one finished call.
    pub fn call<T>(&self, method: &'static str, out: &Result<T, tonic::Status>, started: Instant) {
        let code = match out {
            Ok(_) => "OK",
            Err(s) => code_name(s.code()),
        };
        self.record(method, code, started);
    }

    /// Counts one finished call with its code.
    pub fn record(&self, method: &'static str, code: &'static str, started: Instant) {
        if let Ok(mut c) = self.calls.lock() {
            *c.entry((method, code)).or_default() += 1;
        }
        let labels = [KeyValue::new("method", method), KeyValue::new("code", code)];
        self.otel_calls.add(1, &labels);
        self.otel_latency
            .record(started.elapsed().as_secs_f64() * 1000.0, &labels[..1]);
        if code == "INTERNAL" || code == "UNAVAILABLE" {
            tracing::warn!(method, code, "lookup call failed");
        }
    }

    /// Open WatchScores streams go up or down by `delta`.
    pub fn watchers(&self, delta: i64) {
        self.watchers.fetch_add(delta, Ordering::Relaxed);
    }

    /// Scores a slow WatchScores client missed.
    pub fn watch_dropped(&self, n: u64) {
        self.watch_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Marks the service ready (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the service is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Prometheus text.
    pub fn render(&self, store: &StoreCounts, memory_entries: Option<usize>) -> String {
        let mut page = Page::new();
        page.family(
            "leadscore_lookup_calls_total",
            Kind::Counter,
            "Calls by method and status code.",
        );
        if let Ok(c) = self.calls.lock() {
            for ((method, code), n) in c.iter() {
                page.sample(
                    "leadscore_lookup_calls_total",
                    &[("method", method), ("code", code)],
                    n,
                );
            }
        }
        for (name, help, v) in [
            (
                "leadscore_lookup_memory_hits_total",
                "Scores (and deleted leads) answered from the service's memory.",
                &store.memory_hits,
            ),
            (
                "leadscore_lookup_cache_hits_total",
                "Scores answered from Redis.",
                &store.cache_hits,
            ),
            (
                "leadscore_lookup_cache_misses_total",
                "Redis misses (read from Postgres).",
                &store.cache_misses,
            ),
            (
                "leadscore_lookup_cache_errors_total",
                "Redis errors (read from Postgres).",
                &store.cache_errors,
            ),
            (
                "leadscore_lookup_db_errors_total",
                "Postgres errors.",
                &store.db_errors,
            ),
            (
                "leadscore_lookup_watch_dropped_total",
                "Scores slow WatchScores clients missed.",
                &self.watch_dropped,
            ),
        ] {
            page.counter(name, help, v.load(Ordering::Relaxed));
        }
        page.gauge(
            "leadscore_lookup_watchers",
            "Open WatchScores streams.",
            self.watchers.load(Ordering::Relaxed),
        );
        if let Some(n) = memory_entries {
            page.gauge(
                "leadscore_lookup_memory_entries",
                "Leads held in the service's memory.",
                n,
            );
        }
        page.gauge(
            "leadscore_lookup_ready",
            "Whether the service is ready.",
            u8::from(self.is_ready()),
        );
        page.finish()
    }
}
