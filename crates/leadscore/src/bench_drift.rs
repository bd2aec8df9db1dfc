//! `leadscore bench drift`: the drift aggregator's throughput on a pre-filled score topic.
//!
//! Fills a fresh 12-partition score topic with `LeadScore` records of
//! generated leads scored by the bundled model (event times spread over a
//! day of hourly windows), then measures, in one run: (a) a plain
//! read_committed read of the topic, no decoding, as the ceiling; (b) the
//! aggregator's decode-and-count path in memory, no Kafka; (c) the
//! aggregator itself, from start to every score counted, checkpoints and
//! reports included. Prints a Markdown table for BENCHMARKS.md. Creates and
//! deletes its own topics.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use leadscore_aggregator::{Aggregator, Event, Metrics};
use leadscore_config::Config;
use leadscore_crm::{Generator, GeneratorConfig};
use leadscore_model::BandThresholds;
use leadscore_scorer::records::{self, LeadScore, ModelScore, Role};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub(crate) struct DriftBenchArgs {
    /// Scores pre-filled.
    #[arg(long, default_value_t = 500_000)]
    scores: usize,
    /// Partitions of the score topic.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
}

/// Generated leads scored by the bundled model, as framed `LeadScore` records.
fn records(n: usize, schema_id: u32) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let model = leadscore_model::Model::load_dir(&leadscore_model::bundled_dir())?;
    let meta = model.metadata().clone();
    let bands = BandThresholds {
        high: 0.5,
        medium: 0.25,
    };
    let mut g = Generator::new(GeneratorConfig::default());
    let day = 86_400_000i64;
    let t0 = 1_767_571_200_000i64;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let leads: Vec<_> = (0..10_000.min(n - out.len()))
            .map(|_| g.next_lead().lead)
            .collect();
        for (lead, scored) in leads.iter().zip(model.score_batch_with_reasons(&leads, 3)?) {
            let Ok((score, reasons)) = scored else {
                continue;
            };
            let i = out.len() as i64;
            let event = t0 + i * day / n as i64;
            let record = LeadScore {
                lead_id: lead.lead_id.clone(),
                model: ModelScore {
                    model_name: meta.model_name.clone(),
                    model_version: meta.version.clone(),
                    score: score.probability,
                    band: bands.band(score.probability),
                    reasons: reasons.map(|r| r.iter().map(ToString::to_string).collect()),
                },
                role: Role::Champion,
                features: model.features().raw_values(lead),
                event_time_ms: event,
                scored_at_ms: event + 30,
                latency_ms: 30.0 + (i % 40) as f64,
                source: None,
            };
            out.push((
                lead.lead_id.clone(),
                records::framed(schema_id, |b| record.encode(b)),
            ));
        }
    }
    Ok(out)
}

fn plain_read(config: &Config, topic: &str, n: usize) -> anyhow::Result<Duration> {
    let c: BaseConsumer = leadscore_kafka::client_config(&config.kafka)
        .set(
            "group.id",
            format!("bench-drift-read-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("fetch.min.bytes", "65536")
        .set("queued.min.messages", "200000")
        .create()?;
    c.subscribe(&[topic])?;
    let mut seen = 0;
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < n && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100))
            && m?.payload().is_some()
        {
            started.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    anyhow::ensure!(seen == n, "read {seen} of {n} records");
    Ok(started.map(|s| s.elapsed()).unwrap_or_default())
}

fn in_memory(records: &[(String, Vec<u8>)]) -> anyhow::Result<Duration> {
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        leadscore_model::bundled_dir().join("metadata.json"),
    )?)?;
    let profile = Arc::new(leadscore_drift::Profile::from_metadata(&meta)?);
    let version = meta["version"].as_str().unwrap_or_default().to_string();
    let profiles = std::collections::BTreeMap::from([(version, profile)]);
    let mut state = leadscore_drift::state::SourceState::default();
    let mut features = std::collections::BTreeMap::new();
    let started = Instant::now();
    for (_, bytes) in records {
        let (_, datum) = leadscore_schemas::unframe(bytes)?;
        let s = leadscore_aggregator::decode::lead_score(datum, &mut features)?;
        state.observe_score(
            &profiles,
            3_600_000,
            &leadscore_drift::state::ScoreEvent {
                model_name: s.model_name,
                model_version: s.model_version,
                event_ms: s.event_time_ms,
                features: &features,
                score: s.score,
                latency_ms: s.latency_ms,
            },
        );
    }
    Ok(started.elapsed())
}

pub(crate) async fn run(args: DriftBenchArgs, config: &Config) -> anyhow::Result<ExitCode> {
    leadscore_model::init_runtime(None)
        .context("ONNX Runtime (eval \"$(deploy/local/stack env)\")")?;
    let id = std::process::id();
    let t = |s: &str| format!("bench.drift.{id}.{s}");
    let (scores, shadow, metrics_t, alerts_t, partials, state) = (
        t("scores"),
        t("shadow"),
        t("metrics"),
        t("alerts"),
        t("partials"),
        t("state"),
    );
    crate::bench::create_topics(config, &[&scores, &shadow], args.partitions).await?;
    crate::bench::create_topics(config, &[&metrics_t, &alerts_t, &partials, &state], 1).await?;
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let schema_id = registry
        .register(
            &leadscore_schemas::value_subject(&scores),
            leadscore_schemas::find("LeadScore.avsc")?.text,
        )
        .await?;
    eprintln!("generating and scoring {} leads", args.scores);
    let n = args.scores;
    let recs = tokio::task::spawn_blocking(move || records(n, schema_id)).await??;
    eprintln!("producing to {scores}");
    let producer: FutureProducer = leadscore_kafka::client_config(&config.kafka)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    for chunk in recs.chunks(50_000) {
        let mut sends = Vec::with_capacity(chunk.len());
        for (key, bytes) in chunk {
            let f = producer
                .send_result(FutureRecord::to(&scores).key(key.as_str()).payload(bytes))
                .map_err(|(e, _)| e)?;
            sends.push(f);
        }
        for f in sends {
            f.await?.map_err(|(e, _)| e)?;
        }
    }
    let mean_bytes = recs.iter().map(|(_, b)| b.len()).sum::<usize>() / recs.len().max(1);

    eprintln!("plain read");
    let cfg = config.clone();
    let topic = scores.clone();
    let read = tokio::task::spawn_blocking(move || plain_read(&cfg, &topic, n)).await??;
    eprintln!("in-memory decode and count");
    let memory = tokio::task::spawn_blocking(move || in_memory(&recs)).await??;

    eprintln!("aggregator");
    let mut drift = config.drift.clone();
    drift.scores_topic = scores.clone();
    drift.shadow_topic = shadow.clone();
    drift.metrics_topic = metrics_t.clone();
    drift.alerts_topic = alerts_t.clone();
    drift.partials_topic = partials.clone();
    drift.state_topic = state.clone();
    drift.group_id = format!("bench-drift-{id}");
    drift.instance_id = format!("bench-{id}");
    drift.models = vec![leadscore_model::bundled_dir().display().to_string()];
    drift.checkpoint_ms = 1000;
    let checkpoint_ms = drift.checkpoint_ms;
    let (profiles, _) = leadscore_aggregator::load_profiles(&drift.models).await?;
    let metrics = Metrics::new();
    let aggregator = Aggregator::start(
        drift,
        &config.kafka,
        registry,
        profiles,
        None,
        metrics.clone(),
    )
    .await
    .context("starting the aggregator")?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    let launched = Instant::now();
    let worker = tokio::task::spawn_blocking(move || aggregator.run(&token));
    // Timed from the first score counted, like the plain read.
    while metrics.get(Event::Counted) == 0 {
        anyhow::ensure!(
            launched.elapsed() < Duration::from_secs(60),
            "the aggregator counted nothing in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    while metrics.get(Event::Counted) < n as u64 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the aggregator counted {} of {n} in 600 s",
            metrics.get(Event::Counted)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let aggregated = started.elapsed();
    stop.cancel();
    worker.await??;
    let reports = metrics.get(Event::Report);
    let checkpoints = metrics.get(Event::Checkpoint);

    let rate = |d: Duration| n as f64 / d.as_secs_f64().max(1e-9);
    println!(
        "| path | time | scores/s | vs plain read |\n|---|---|---|---|\n| plain read_committed read, no decoding | {:.2} s | {:.0} | 100% |\n| aggregator: decode + count, in memory, one thread | {:.2} s | {:.0} | {:.0}% |\n| aggregator service: read, decode, count, checkpoint every {} ms | {:.2} s | {:.0} | {:.0}% |",
        read.as_secs_f64(),
        rate(read),
        memory.as_secs_f64(),
        rate(memory),
        100.0 * rate(memory) / rate(read),
        checkpoint_ms,
        aggregated.as_secs_f64(),
        rate(aggregated),
        100.0 * rate(aggregated) / rate(read),
    );
    println!(
        "\n{n} scores of {mean_bytes} bytes on {} partitions; {reports} reports, {checkpoints} checkpoints.",
        args.partitions
    );
    let admin = leadscore_kafka::TopicAdmin::new(&config.kafka)?;
    admin
        .delete_topics(&[&scores, &shadow, &metrics_t, &alerts_t, &partials, &state])
        .await?;
    Ok(ExitCode::SUCCESS)
}
