//! `leadscore dashboard`: the monitoring page. Follows the metrics, alerts and lifecycle
//! topics from their beginning and the live scores from their end, folds them into
//! [`leadscore_dashboard::Board`], and pushes a snapshot to every open page as server-sent
//! events. Read-only; the lookup service's bearer tokens guard the data (without any it
//! refuses to start unless `lookup.allow_unauthenticated` is set).

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use leadscore_config::Config;
use leadscore_dashboard::Board;
use leadscore_lookup::auth::Tokens;
use leadscore_runtime::{Liveness, Report};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Shared {
    snapshot: watch::Receiver<Arc<String>>,
}

async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        leadscore_dashboard::PAGE,
    )
        .into_response()
}

async fn state(State(s): State<Shared>) -> Response {
    let body = s.snapshot.borrow().as_ref().clone();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Server-sent events: the current snapshot at once, then each new one.
async fn events(State(s): State<Shared>) -> Response {
    let rx = s.snapshot.clone();
    let stream = futures::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && rx.changed().await.is_err() {
            return None;
        }
        let data = rx.borrow_and_update().as_ref().clone();
        let chunk = format!("data: {data}\n\n");
        Some((Ok::<_, std::convert::Infallible>(chunk), (rx, false)))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn require_token(State(tokens): State<Tokens>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if tokens.allows(given) {
        return next.run(req).await;
    }
    let mut r = (
        StatusCode::UNAUTHORIZED,
        "a bearer token is needed: open the page as /#token=<token>",
    )
        .into_response();
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

fn consumer(config: &Config, reset: &str, topics: &[&str]) -> anyhow::Result<StreamConsumer> {
    let group = format!(
        "leadscore-dashboard-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    );
    let c: StreamConsumer = leadscore_kafka::client_config(&config.kafka)
        .set("group.id", &group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", reset)
        .set("isolation.level", "read_committed")
        .create()
        .context("creating a dashboard consumer")?;
    c.subscribe(topics)
        .with_context(|| format!("subscribing to {topics:?}"))?;
    Ok(c)
}

/// Feeds `board` from `consumer` until `shutdown`.
async fn follow(
    consumer: StreamConsumer,
    config: Config,
    decoder: leadscore_registry::Decoder,
    board: Arc<Mutex<Board>>,
    shutdown: CancellationToken,
) {
    let d = &config.dashboard;
    loop {
        let m = tokio::select! {
            () = shutdown.cancelled() => return,
            m = consumer.recv() => m,
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "dashboard consumer error");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let topic = m.topic().to_string();
        let value = match m.payload() {
            None => None,
            Some(bytes) => match decoder.decode(bytes).await {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(%topic, partition = m.partition(), offset = m.offset(), error = %e, "record not shown: unreadable");
                    continue;
                }
            },
        };
        let Ok(mut b) = board.lock() else { return };
        match (topic.as_str(), value.as_ref()) {
            (t, Some(v)) if t == d.metrics_topic => b.report(v),
            (t, Some(v)) if t == d.alerts_topic => b.alert(v),
            (t, Some(v)) if t == d.lifecycle_topic => b.lifecycle(v),
            (t, v) if t == d.scores_topic => b.score(v),
            _ => {}
        }
    }
}

pub(crate) async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let d = config.dashboard.clone();
    let tokens = Tokens::required(&config.lookup, "dashboard")?;
    let t = &config.drift.thresholds;
    let board = Arc::new(Mutex::new(Board::with_psi_thresholds(
        t.psi_warning,
        t.psi_critical,
    )));
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let control = consumer(
        &config,
        "earliest",
        &[&d.metrics_topic, &d.alerts_topic, &d.lifecycle_topic],
    )?;
    let scores = consumer(&config, "latest", &[&d.scores_topic])?;
    let liveness = Liveness::new(u32::MAX, Duration::from_secs(3600));
    let (tx, rx) = watch::channel(Arc::new(String::from("{}")));
    let shutdown = CancellationToken::new();
    leadscore_runtime::cancel_on_signal(shutdown.clone());
    for c in [control, scores] {
        tokio::spawn(follow(
            c,
            config.clone(),
            leadscore_registry::Decoder::new(registry.clone()),
            board.clone(),
            shutdown.clone(),
        ));
    }
    {
        let (board, shutdown) = (board.clone(), shutdown.clone());
        let every = Duration::from_millis(d.push_interval_ms.max(100));
        let urls = d.scrape_urls.clone();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .context("HTTP client")?;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                // Every scorer's page, together; one that does not answer is left out.
                let mut samples = Vec::new();
                for url in &urls {
                    match http.get(url).send().await {
                        Ok(r) => {
                            if let Ok(text) = r.text().await {
                                samples.extend(leadscore_dashboard::parse_prometheus(&text));
                            }
                        }
                        Err(e) => tracing::debug!(%url, error = %e, "metrics page not scraped"),
                    }
                }
                let now = chrono::Utc::now().timestamp_millis();
                let snap = match board.lock() {
                    Ok(mut b) => {
                        if !urls.is_empty() {
                            b.scrape(now, &samples);
                        }
                        b.tick(now);
                        b.snapshot().to_string()
                    }
                    Err(_) => return,
                };
                let _ = tx.send(Arc::new(snap));
            }
        });
    }
    liveness.started();
    let status = Arc::new(Report {
        name: "dashboard",
        liveness: liveness.clone(),
        render: Box::new(String::new),
    });
    let data = axum::Router::new()
        .route("/api/state", get(state))
        .route("/events", get(events))
        .route_layer(axum::middleware::from_fn_with_state(tokens, require_token))
        .with_state(Shared { snapshot: rx });
    let app = axum::Router::new()
        .route("/", get(page))
        .merge(data)
        .merge(leadscore_runtime::routes(status));
    let addr: std::net::SocketAddr = d.http_listen.parse().context("dashboard.http_listen")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("dashboard.http_listen {addr}"))?;
    tracing::info!(url = %format!("http://{addr}/"), "dashboard serving");
    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .context("dashboard server")?;
    liveness.stopped();
    Ok(ExitCode::SUCCESS)
}
