//! Logs, traces and metrics for every `leadscore` service.
//!
//! [`init`] installs one `tracing` subscriber: structured logs on stderr
//! (text or JSON, filtered by `LEADSCORE_LOG`), and, when
//! `telemetry.otlp_endpoint` is set, an OpenTelemetry layer that exports
//! spans over OTLP. It also installs the global OpenTelemetry meter provider,
//! so instruments created through [`opentelemetry::global::meter`] are pushed
//! over OTLP every `telemetry.metrics_interval_ms`. Without an endpoint the
//! meter provider is a no-op and only the services' Prometheus endpoints
//! publish metrics.
//!
//! OTLP goes over HTTP/protobuf with a blocking client on the SDK's own
//! export threads, so export never needs (or blocks) the services' async
//! runtime. Call [`init`] before starting that runtime and
//! [`Telemetry::shutdown`] after it has stopped, to flush what is buffered.

use std::time::Duration;

use leadscore_config::TelemetryConfig;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Errors raised while installing telemetry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OTLP exporter could not be built.
    #[error("OTLP {signal} exporter for {endpoint}: {message}; check telemetry.otlp_endpoint")]
    Exporter {
        /// `traces` or `metrics`.
        signal: &'static str,
        /// The endpoint it was built for.
        endpoint: String,
        /// The exporter's error.
        message: String,
    },
    /// A global subscriber was already installed.
    #[error("logging is already initialised: {0}")]
    Subscriber(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Log line format on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installed providers; flush them with [`Telemetry::shutdown`].
#[derive(Debug)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Whether spans and metrics are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.tracer.is_some()
    }

    /// Flushes and stops the exporters. Call once, outside the async runtime.
    pub fn shutdown(self) {
        if let Some(t) = self.tracer
            && let Err(e) = t.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {e}");
        }
        if let Some(m) = self.meter
            && let Err(e) = m.shutdown()
        {
            eprintln!("telemetry: flushing metrics failed: {e}");
        }
    }
}

fn default_filter() -> EnvFilter {
    EnvFilter::try_from_env("LEADSCORE_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,rdkafka=warn,opentelemetry=warn,tokio_postgres=warn")
    })
}

fn resource(service: &'static str, cfg: &TelemetryConfig) -> Resource {
    let instance = cfg.instance.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    });
    Resource::builder()
        .with_service_name(service)
        .with_attributes([
            KeyValue::new("service.namespace", "leadscore"),
            KeyValue::new("service.instance.id", instance),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build()
}

/// The OTLP/HTTP URL of one signal under the collector's base endpoint.
pub fn signal_url(endpoint: &str, signal: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    // A gRPC port given by habit is mapped to the HTTP port of the same collector.
    let base = base
        .strip_suffix(":4317")
        .map_or_else(|| base.to_string(), |host| format!("{host}:4318"));
    format!("{base}/v1/{signal}")
}

/// Installs logging, and OTLP export of spans and metrics if `export` and an endpoint are set.
pub fn init(
    service: &'static str,
    cfg: &TelemetryConfig,
    format: LogFormat,
    export: bool,
) -> Result<Telemetry> {
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let endpoint = cfg.otlp_endpoint.as_deref().filter(|_| export);
    let Some(endpoint) = endpoint else {
        tracing_subscriber::registry()
            .with(fmt.with_filter(default_filter()))
            .try_init()
            .map_err(|e| Error::Subscriber(e.to_string()))?;
        return Ok(Telemetry {
            tracer: None,
            meter: None,
        });
    };
    let timeout = Duration::from_secs(5);
    let spans = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(signal_url(endpoint, "traces"))
        .with_timeout(timeout)
        .build()
        .map_err(|e| Error::Exporter {
            signal: "traces",
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
    let metrics = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_endpoint(signal_url(endpoint, "metrics"))
        .with_timeout(timeout)
        .build()
        .map_err(|e| Error::Exporter {
            signal: "metrics",
            endpoint: endpoint.to_string(),
            message: e.to_string(),
        })?;
    let resource = resource(service, cfg);
    let tracer = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.trace_sample_ratio,
        ))))
        .with_batch_exporter(spans)
        .build();
    let meter = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(
            PeriodicReader::builder(metrics)
                .with_interval(Duration::from_millis(cfg.metrics_interval_ms))
                .build(),
        )
        .build();
    opentelemetry::global::set_meter_provider(meter.clone());
    let otel = tracing_opentelemetry::layer().with_tracer(tracer.tracer(service));
    tracing_subscriber::registry()
        .with(fmt.with_filter(default_filter()))
        // Spans at info and above are exported; debug spans stay local.
        .with(otel.with_filter(EnvFilter::new("info,rdkafka=off,opentelemetry=off")))
        .try_init()
        .map_err(|e| Error::Subscriber(e.to_string()))?;
    tracing::info!(
        endpoint,
        service,
        "exporting traces and metrics over OTLP/HTTP"
    );
    Ok(Telemetry {
        tracer: Some(tracer),
        meter: Some(meter),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_urls_follow_the_otlp_http_layout() {
        assert_eq!(
            signal_url("http://otel:4318", "traces"),
            "http://otel:4318/v1/traces"
        );
        assert_eq!(
            signal_url("http://otel:4318/", "metrics"),
            "http://otel:4318/v1/metrics"
        );
        assert_eq!(
            signal_url("http://127.0.0.1:4317", "metrics"),
            "http://127.0.0.1:4318/v1/metrics"
        );
    }
}
