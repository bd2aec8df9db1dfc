//! The lookup service (`leadscore lookup`).
//!
//! - gRPC `leadscore.v1.LeadScores` (proto/leadscore/v1/lookup.proto): GetScore,
//!   BatchGetScores, ScoreLead, WatchScores, GetModelInfo; standard gRPC health
//!   checking and server reflection; Open Inference Protocol v2
//!   (proto/inference/grpc_predict_v2.proto) over the champion.
//! - REST on its own port: the seed's contract and `/leads/{id}/score`.
//! - Reads: Redis first, the CRM's `lead_scores` table on a miss or an outage.
//! - Bearer tokens on both (health exempt), TLS and optional mutual TLS on gRPC.

pub mod auth;
pub mod grpc;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod rest;
pub mod store;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use leadscore_config::Config;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Generated gRPC code.
pub mod proto {
    /// `leadscore.v1`.
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod v1 {
        tonic::include_proto!("leadscore.v1");
    }
    /// Open Inference Protocol v2 (`inference`).
    #[allow(missing_docs, unreachable_pub, clippy::all)]
    pub mod inference {
        tonic::include_proto!("inference");
    }
    /// Descriptors of both, for server reflection.
    pub const DESCRIPTOR: &[u8] = tonic::include_file_descriptor_set!("descriptor");
}

impl From<&leadscore_crm::Lead> for proto::v1::Lead {
    /// The request message of a CRM lead (its non-PII fields).
    fn from(l: &leadscore_crm::Lead) -> Self {
        Self {
            lead_id: l.lead_id.clone(),
            company_size: l.company_size.clone(),
            industry: l.industry.clone(),
            page_views: l.page_views,
            time_on_site: l.time_on_site,
            form_completion_time: l.form_completion_time,
            referral_source: l.referral_source.clone(),
            country: l.country.clone(),
            created_at: Some(l.created_at.to_rfc3339()),
        }
    }
}

/// Errors of the lookup service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is not acceptable.
    #[error("`{field}` is invalid: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
    /// Neither Redis nor Postgres could answer.
    #[error("score stores unavailable: {0}")]
    Unavailable(String),
    /// The model failed.
    #[error("model: {0}")]
    Model(String),
    /// Start-up failed (bad configuration, a port in use, a TLS file unreadable).
    #[error("{0}")]
    Startup(String),
}

/// A CRM lead from request fields, validated as the stream validates it.
#[allow(clippy::too_many_arguments)]
pub fn lead_from_fields(
    lead_id: String,
    company_size: Option<String>,
    industry: Option<String>,
    page_views: Option<i64>,
    time_on_site: Option<f64>,
    form_completion_time: Option<f64>,
    referral_source: Option<String>,
    country: Option<String>,
    created_at: Option<&str>,
) -> Result<leadscore_crm::Lead, Error> {
    let invalid = |field: &str, reason: String| Error::Invalid {
        field: field.into(),
        reason,
    };
    if lead_id.trim().is_empty() {
        return Err(invalid("lead_id", "empty".into()));
    }
    let page_views = page_views
        .map(|v| {
            i32::try_from(v).map_err(|_| invalid("page_views", format!("{v} is out of range")))
        })
        .transpose()?;
    let created_at = match created_at {
        None => chrono::Utc::now(),
        Some(s) => parse_time(s).ok_or_else(|| {
            invalid(
                "created_at",
                "not a date-time (RFC 3339 or YYYY-MM-DDTHH:MM:SS)".into(),
            )
        })?,
    };
    let lead = leadscore_crm::Lead {
        lead_id,
        company_size,
        industry,
        page_views,
        time_on_site,
        form_completion_time,
        referral_source,
        country,
        created_at,
        updated_at: created_at,
        status: leadscore_crm::Status::New,
        converted_at: None,
    };
    leadscore_features::FeatureBuilder::validate(&lead).map_err(|e| Error::Invalid {
        field: e.field.into(),
        reason: e.reason,
    })?;
    Ok(lead)
}

/// RFC 3339, or a naive ISO time (the seed's `2024-01-01T00:00:00`) taken as UTC.
fn parse_time(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

/// Follows the live scores topic into `tx` (for WatchScores) and `memory` until `shutdown`.
async fn follow_scores(
    consumer: StreamConsumer,
    topic: String,
    decoder: leadscore_registry::Decoder,
    tx: broadcast::Sender<proto::v1::Score>,
    memory: Option<Arc<memory::Memory>>,
    shutdown: CancellationToken,
) {
    if let Err(e) = consumer.subscribe(&[&topic]) {
        tracing::error!(%topic, error = %e, "cannot follow the scores topic; WatchScores streams stay empty");
        return;
    }
    loop {
        let m = tokio::select! {
            () = shutdown.cancelled() => return,
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "scores topic read failed (retried)");
                continue;
            }
        };
        let Some(payload) = m.payload() else {
            // A tombstone: the lead was deleted.
            if let (Some(memory), Some(key)) = (&memory, m.key())
                && let Ok(id) = std::str::from_utf8(key)
            {
                let at = m
                    .timestamp()
                    .to_millis()
                    .unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
                memory.deleted(id, at);
            }
            continue;
        };
        if memory.is_none() && tx.receiver_count() == 0 {
            continue;
        }
        let value = match decoder.decode(payload).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable score skipped");
                continue;
            }
        };
        let score = match leadscore_cache::CachedScore::from_lead_score(&value) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable score skipped");
                continue;
            }
        };
        let streamed = grpc::score_message(&score, proto::v1::ScoreSource::Stream);
        if let Some(memory) = &memory {
            memory.streamed(score);
        }
        if tx.receiver_count() > 0 {
            let _ = tx.send(streamed);
        }
    }
}

fn read(path: &str, key: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Startup(format!("{key} `{path}`: {e}")))
}

/// Serves gRPC and REST until `shutdown`, then drains in-flight calls and streams.
pub async fn serve(
    config: &Config,
    models: Arc<models::Served>,
    metrics: Arc<metrics::Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let cfg = &config.lookup;
    let tokens = auth::Tokens::required(cfg, "lookup")?;
    let cache = match &cfg.redis_url {
        Some(url) => Some(
            leadscore_cache::Cache::new(
                url,
                Duration::from_secs(1),
                Duration::from_millis(cfg.redis_timeout_ms),
            )
            .map_err(|e| Error::Startup(format!("lookup.redis_url: {e}")))?,
        ),
        None => None,
    };
    // The memory needs the stream to stay current: none without it.
    let memory = if cfg.scores_topic.is_empty() {
        None
    } else {
        memory::Memory::new(cfg.memory_entries, Duration::from_millis(cfg.memory_ttl_ms))
            .map(Arc::new)
    };
    let store = Arc::new(
        store::Store::new(
            cache,
            store::Pool::new(
                &config.postgres.url,
                cfg.pool_size,
                Duration::from_millis(cfg.db_timeout_ms),
            ),
        )
        .with_memory(memory.clone()),
    );
    let (live, _) = broadcast::channel(4096);
    if !cfg.scores_topic.is_empty() {
        let consumer: StreamConsumer = leadscore_kafka::follower_config(
            &config.kafka,
            "leadscore-lookup-watch",
            leadscore_kafka::Start::Latest,
        )
        .create()
        .map_err(|e| Error::Startup(format!("scores consumer: {e}")))?;
        let registry = leadscore_registry::Registry::new(&config.registry)
            .map_err(|e| Error::Startup(format!("registry: {e}")))?;
        tokio::spawn(follow_scores(
            consumer,
            cfg.scores_topic.clone(),
            leadscore_registry::Decoder::new(registry),
            live.clone(),
            memory,
            shutdown.clone(),
        ));
    }
    let lookup = Arc::new(grpc::Lookup {
        store,
        models: models.clone(),
        live,
        max_batch: cfg.max_batch,
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
    });

    // gRPC.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::v1::lead_scores_server::LeadScoresServer<Arc<grpc::Lookup>>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTOR)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Startup(format!("reflection: {e}")))?;
    // The API's shape is not for everyone either: reflection takes the same token.
    let reflection =
        tonic::service::interceptor::InterceptedService::new(reflection, tokens.clone());
    let scores = tonic::service::interceptor::InterceptedService::new(
        proto::v1::lead_scores_server::LeadScoresServer::new(lookup.clone())
            .max_decoding_message_size(cfg.max_request_bytes),
        tokens.clone(),
    );
    let inference = tonic::service::interceptor::InterceptedService::new(
        proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer::new(
            grpc::Inference {
                models: models.clone(),
                metrics: metrics.clone(),
            },
        )
        .max_decoding_message_size(cfg.max_request_bytes),
        tokens.clone(),
    );
    // A span per call (method and path, never the message), exported with the others.
    let mut builder = tonic::transport::Server::builder()
        .layer(tower_http::trace::TraceLayer::new_for_grpc().on_failure(()));
    // The certificate, its key and the client CA, read once for both ports.
    let pems = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some((
            read(cert, "lookup.tls_cert")?,
            read(key, "lookup.tls_key")?,
            cfg.tls_client_ca
                .as_deref()
                .map(|ca| read(ca, "lookup.tls_client_ca"))
                .transpose()?,
        )),
        _ => None,
    };
    if let Some((cert, key, ca)) = &pems {
        let mut tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key));
        if let Some(ca) = ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(tls)
            .map_err(|e| Error::Startup(format!("lookup TLS: {e}")))?;
    }
    let grpc_addr: std::net::SocketAddr = cfg
        .grpc_listen
        .parse()
        .map_err(|e| Error::Startup(format!("lookup.grpc_listen: {e}")))?;
    let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|e| Error::Startup(format!("lookup.grpc_listen {grpc_addr}: {e}")))?;
    let grpc_stop = shutdown.clone();
    let grpc = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(scores)
        .add_service(inference)
        .serve_with_incoming_shutdown(
            {
                use futures::StreamExt;
                // Small request/response pairs: never wait for Nagle.
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener).map(|s| {
                    if let Ok(s) = &s {
                        let _ = s.set_nodelay(true);
                    }
                    s
                })
            },
            async move { grpc_stop.cancelled().await },
        );

    // REST.
    let rest_addr: std::net::SocketAddr = cfg
        .rest_listen
        .parse()
        .map_err(|e| Error::Startup(format!("lookup.rest_listen: {e}")))?;
    let rest_listener = tokio::net::TcpListener::bind(rest_addr)
        .await
        .map_err(|e| Error::Startup(format!("lookup.rest_listen {rest_addr}: {e}")))?;
    let app = rest::router(
        lookup.clone(),
        tokens,
        &cfg.cors_origins,
        cfg.max_request_bytes,
    );
    let rest_stop = shutdown.clone();
    // TLS on REST as on gRPC, with the same certificate (and client CA).
    let rest: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> =
        match &pems {
            Some((cert, key, ca)) => {
                let tls = tls::server_config(cert, key, ca.as_deref())?;
                let listener = tls::TlsListener::new(rest_listener, tls, shutdown.clone())
                    .map_err(|e| Error::Startup(format!("lookup.rest_listen {rest_addr}: {e}")))?;
                Box::pin(
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async move { rest_stop.cancelled().await })
                        .into_future(),
                )
            }
            None => Box::pin(
                axum::serve(rest_listener, app)
                    .with_graceful_shutdown(async move { rest_stop.cancelled().await })
                    .into_future(),
            ),
        };

    metrics.set_ready(true);
    tracing::info!(grpc = %grpc_addr, rest = %rest_addr, tls = cfg.tls_cert.is_some(), mutual_tls = cfg.tls_client_ca.is_some(), auth = tokens_label(&cfg.auth_tokens, cfg.auth_tokens_file.is_some()), "lookup service listening");
    let (g, r) = tokio::join!(grpc, rest);
    metrics.set_ready(false);
    g.map_err(|e| Error::Startup(format!("gRPC server: {e}")))?;
    r.map_err(|e| Error::Startup(format!("REST server: {e}")))?;
    Ok(())
}

fn tokens_label(listed: &[String], file: bool) -> &'static str {
    if listed.is_empty() && !file {
        "off"
    } else {
        "bearer"
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn request_fields_are_validated_like_the_stream_and_name_the_field() {
        let ok = lead_from_fields(
            "lead_123".into(),
            Some("Medium".into()),
            Some("Technology".into()),
            Some(15),
            Some(300.5),
            Some(45.2),
            Some("Google".into()),
            None,
            Some("2024-01-01T00:00:00"),
        )
        .unwrap();
        assert_eq!(ok.created_at.to_rfc3339(), "2024-01-01T00:00:00+00:00");
        let field = |r: Result<leadscore_crm::Lead, Error>| match r {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let base = |views: Option<i64>, time: Option<f64>, created: Option<&str>| {
            lead_from_fields(
                "l".into(),
                None,
                None,
                views,
                time,
                None,
                None,
                None,
                created,
            )
        };
        assert_eq!(field(base(Some(-1), None, None)), "page_views");
        assert_eq!(field(base(Some(1 << 40), None, None)), "page_views");
        assert_eq!(field(base(None, Some(f64::NAN), None)), "time_on_site");
        assert_eq!(field(base(None, None, Some("yesterday"))), "created_at");
        assert_eq!(
            field(lead_from_fields(
                " ".into(),
                None,
                None,
                None,
                None,
                None,
                None,
                None,
                None
            )),
            "lead_id"
        );
    }
}
