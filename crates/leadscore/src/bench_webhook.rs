//! `leadscore bench webhook`: the webhook service delivering to a local receiver.
//!
//! (a) Pre-fills a fresh score topic and measures deliveries per second flat out, from the
//! service's start to the receiver's last 2xx. (b) Feeds scores at a fixed rate and reports
//! the delivery latency: the score's commit (its `scored_at`, set when it is produced) to the
//! receiver's handler. The receiver verifies every signature. Creates and deletes its topics.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use leadscore_config::Config;
use leadscore_model::Band;
use leadscore_scorer::records::{self, LeadScore, ModelScore, Role};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Mutex;

const SECRET: &str = "whsec_bench_0123456789";

#[derive(Debug, Args)]
pub(crate) struct WebhookBenchArgs {
    /// Scores pre-filled for the flat-out run.
    #[arg(long, default_value_t = 50_000)]
    scores: usize,
    /// Scores per second of the latency run.
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The endpoint's concurrency (lanes).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Partitions of the bench topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
}

#[derive(Default)]
struct Seen {
    count: AtomicU64,
    bad: AtomicU64,
    latencies: Mutex<Vec<f64>>,
}

async fn receive(
    axum::extract::State(seen): axum::extract::State<Arc<Seen>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> axum::http::StatusCode {
    let now = chrono::Utc::now();
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or("");
    let ok = leadscore_webhook::event::verify(
        SECRET.as_bytes(),
        header("leadscore-signature"),
        header("leadscore-timestamp").parse().unwrap_or(0),
        &body,
        now.timestamp(),
        300,
    );
    if !ok {
        seen.bad.fetch_add(1, Ordering::Relaxed);
        return axum::http::StatusCode::UNAUTHORIZED;
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
        && let Some(at) = v["scored_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    {
        let ms = (now - at.with_timezone(&chrono::Utc))
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e3;
        seen.latencies.lock().await.push(ms);
    }
    seen.count.fetch_add(1, Ordering::Relaxed);
    axum::http::StatusCode::OK
}

fn record(i: usize, scored_at_ms: i64) -> LeadScore {
    let score = (i % 100) as f64 / 100.0;
    LeadScore {
        lead_id: format!("bench-{i:08}"),
        model: ModelScore {
            model_name: "lead-scoring".into(),
            model_version: "1".into(),
            score,
            band: if score >= 0.5 { Band::High } else { Band::Low },
            reasons: Some(
                vec![
                    "page_views=42 +0.31".to_string(),
                    "industry=Technology +0.12".into(),
                    "country=UAE -0.05".into(),
                ]
                .into(),
            ),
        },
        role: Role::Champion,
        features: Vec::new(),
        event_time_ms: scored_at_ms - 30,
        scored_at_ms,
        latency_ms: 30.0,
        source: None,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) async fn run(args: WebhookBenchArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let id = std::process::id();
    let (topic, live, dlq) = (
        format!("bench.{id}.wh.scores"),
        format!("bench.{id}.wh.live"),
        format!("bench.{id}.wh.dlq"),
    );
    crate::bench::create_topics(config, &[&topic, &live, &dlq], args.partitions).await?;
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let text = leadscore_schemas::find("LeadScore.avsc")?.text;
    let schema_id = registry
        .register(&leadscore_schemas::value_subject(&topic), text)
        .await?;
    let live_id = registry
        .register(&leadscore_schemas::value_subject(&live), text)
        .await?;
    let producer: FutureProducer = leadscore_kafka::client_config(&config.kafka)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()?;

    let seen = Arc::new(Seen::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move { axum::serve(listener, app).await });

    eprintln!("pre-filling {} scores ...", args.scores);
    let now = chrono::Utc::now().timestamp_millis();
    let mut pending = Vec::new();
    for i in 0..args.scores {
        let r = record(i, now);
        let bytes = records::framed(schema_id, |b| r.encode(b));
        pending.push(
            producer
                .send_result(FutureRecord::to(&topic).key(&r.lead_id).payload(&bytes))
                .map_err(|(e, _)| e)?,
        );
        if pending.len() >= 20_000 {
            for f in pending.drain(..) {
                f.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
            }
        }
    }
    for f in pending.drain(..) {
        f.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
    }

    let dir = std::env::temp_dir().join(format!("leadscore-bench-webhook-{id}"));
    std::fs::create_dir_all(&dir)?;
    let start = |input: &str, group: &str| -> anyhow::Result<std::process::Child> {
        let path = dir.join(format!("{group}.toml"));
        std::fs::write(
            &path,
            format!(
                "[[webhook.endpoints]]\nname = \"bench\"\nurl = \"http://127.0.0.1:{port}/hook\"\nsecret_env = \"LEADSCORE_BENCH_WEBHOOK_SECRET\"\nallow_http = true\nconcurrency = {}\n",
                args.concurrency
            ),
        )?;
        Ok(std::process::Command::new(std::env::current_exe()?)
            .arg("webhook")
            .env("LEADSCORE_CONFIG", &path)
            .env("LEADSCORE_BENCH_WEBHOOK_SECRET", SECRET)
            .env("LEADSCORE__WEBHOOK__SCORES_TOPIC", input)
            .env("LEADSCORE__WEBHOOK__DLQ_TOPIC", &dlq)
            .env("LEADSCORE__WEBHOOK__GROUP_ID", group)
            .env(
                "LEADSCORE__WEBHOOK__HTTP_LISTEN",
                format!("127.0.0.1:{}", crate::bench::free_port()?),
            )
            .env("LEADSCORE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?)
    };

    eprintln!("(a) flat out ...");
    let started = Instant::now();
    let mut child = start(&topic, &format!("bench-wh-{id}"))?;
    let deadline = started + Duration::from_secs(600);
    while seen.count.load(Ordering::Relaxed) < args.scores as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flat = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let delivered = seen.count.load(Ordering::Relaxed);
    anyhow::ensure!(
        delivered >= args.scores as u64,
        "delivered {delivered} of {}",
        args.scores
    );

    eprintln!("(b) {} scores/s for {} s ...", args.rate, args.seconds);
    seen.latencies.lock().await.clear();
    let before = seen.count.load(Ordering::Relaxed);
    let mut child = start(&live, &format!("bench-wh-live-{id}"))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let total = (args.rate * args.seconds) as usize;
    let tick = Duration::from_secs_f64(1.0 / args.rate as f64);
    let t0 = Instant::now();
    let mut sent = Vec::with_capacity(total);
    for i in 0..total {
        let due = t0 + tick.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let r = record(i, chrono::Utc::now().timestamp_millis());
        let bytes = records::framed(live_id, |b| r.encode(b));
        sent.push(
            producer
                .send_result(FutureRecord::to(&live).key(&r.lead_id).payload(&bytes))
                .map_err(|(e, _)| e)?,
        );
    }
    for f in sent {
        f.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.count.load(Ordering::Relaxed) < before + total as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut lat = seen.latencies.lock().await.clone();
    lat.sort_by(f64::total_cmp);

    println!("| run | deliveries | time | deliveries/s |");
    println!("|---|---|---|---|");
    println!(
        "| (a) flat out, concurrency {} | {} | {:.1} s | {:.0} |",
        args.concurrency,
        args.scores,
        flat.as_secs_f64(),
        args.scores as f64 / flat.as_secs_f64()
    );
    println!();
    println!(
        "(b) at {}/s for {} s: {} of {} delivered; score committed -> receiver p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; bad signatures {}",
        args.rate,
        args.seconds,
        lat.len(),
        total,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(f64::NAN),
        seen.bad.load(Ordering::Relaxed)
    );
    let admin = leadscore_kafka::TopicAdmin::new(&config.kafka)?;
    admin.delete_topics(&[&topic, &live, &dlq]).await?;
    for t in [&topic, &live] {
        let _ = registry
            .delete_subject(&leadscore_schemas::value_subject(t))
            .await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
