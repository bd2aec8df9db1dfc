//! `leadscore bench scorer`: the scorer against a transactional passthrough, in one run.
//!
//! Pre-fills a fresh input topic with Debezium Avro create events, then
//! measures (a) a passthrough that consumes and produces the same bytes in
//! Kafka transactions with offsets, no decoding or scoring, and (b) the
//! scorer process (champion + shadow challenger) on the same input, first
//! without reasons (`scorer.reasons` 0), then with the default three. Then it
//! feeds the scorer at a fixed rate and reports event-to-score latency
//! (produce time to the score being readable by a read_committed consumer).
//! Prints a Markdown table for BENCHMARKS.md. Creates and deletes its own topics.

use std::collections::HashMap;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use apache_avro::types::Value;
use clap::{Args, Subcommand};
use leadscore_config::Config;
use leadscore_crm::{Generator, GeneratorConfig, Lead};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Passthrough vs scorer throughput, and scorer latency at a fixed rate.
    Scorer(BenchArgs),
    /// Webhook deliveries per second to a local receiver, and delivery latency at a fixed rate.
    Webhook(crate::bench_webhook::WebhookBenchArgs),
    /// Drift aggregator throughput on a pre-filled score topic, against a plain read of it.
    Drift(crate::bench_drift::DriftBenchArgs),
    /// Drift alert soundness: false alarms without drift and detection of known drifts by
    /// window size, and the live hourly case (in memory, no services).
    DriftSound(crate::bench_drift_sound::DriftSoundArgs),
    /// Lookup service: GetScore at a fixed rate and flat out, ScoreLead flat out (gRPC).
    Lookup(crate::bench_lookup::LookupBenchArgs),
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// Leads pre-filled for the throughput runs.
    #[arg(long, default_value_t = 200_000)]
    leads: usize,
    /// Fixed input rate for the latency run, leads per second.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Duration of the latency run, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Partitions of the bench topics.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// Records per transaction, for the passthrough and the scorer alike.
    #[arg(long, default_value_t = 5000)]
    max_batch: usize,
    /// Batch linger in ms, for both.
    #[arg(long, default_value_t = 50)]
    linger_ms: u64,
}

fn envelope(lead: &Lead, ts_ms: i64) -> Value {
    leadscore_cdc::envelope(lead, "c", ts_ms)
}

pub(crate) async fn create_topics(
    config: &Config,
    names: &[&str],
    partitions: i32,
) -> anyhow::Result<()> {
    let yaml = format!(
        "defaults:\n  partitions: {partitions}\n  replication_factor: 1\ntopics:\n{}",
        names
            .iter()
            .map(|n| format!("  - name: {n}\n"))
            .collect::<String>()
    );
    let declared = leadscore_topics::Declarations::parse(&yaml)?;
    let admin = leadscore_kafka::TopicAdmin::new(&config.kafka)?;
    let (brokers, observed) = admin.observe(&declared).await?;
    admin
        .apply(
            &leadscore_topics::plan(&declared, &observed, brokers),
            false,
        )
        .await?;
    Ok(())
}

/// What a reader saw of a run: records, and when the last arrived.
struct Drained {
    seen: usize,
    last: Duration,
}

impl Drained {
    /// Records per second from `began` (the processor's first fetched batch, so its start,
    /// model loads and group join are left out) to the last output.
    fn rate(&self, began: Duration) -> f64 {
        self.seen as f64 / (self.last.saturating_sub(began)).as_secs_f64()
    }
}

/// When (since `started`) the scorer serving metrics on `port` closed its first fetched
/// batch: polled every 2 ms, so late by at most that and the batch's linger.
async fn first_fetch(port: u16, started: Instant, within: Duration) -> Duration {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let fetched =
            crate::demo::metric(port, "leadscore_scorer_stage_ms_count{stage=\"fetch\"}").await;
        if fetched.is_some_and(|n| n >= 1.0) {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

/// Counts records readable (read_committed) on `consumer` until `want` or `within`, and when
/// (since `started`) the last one arrived.
async fn drain(
    consumer: &StreamConsumer,
    want: usize,
    within: Duration,
    started: Instant,
) -> Drained {
    let mut d = Drained {
        seen: 0,
        last: Duration::ZERO,
    };
    let deadline = tokio::time::Instant::now() + within;
    while d.seen < want {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(_)) => {
                d.last = started.elapsed();
                d.seen += 1;
            }
            _ => break,
        }
    }
    d
}

fn reader(config: &Config, topic: &str) -> anyhow::Result<StreamConsumer> {
    let c: StreamConsumer = leadscore_kafka::client_config(&config.kafka)
        .set(
            "group.id",
            format!("bench-reader-{}-{topic}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    // Assigned, not subscribed: a subscription joins the group only once the stream is first
    // polled, so the first scores of the latency run would wait for a rebalance (measured:
    // 880 ms for the first second's leads, against under 70 ms for every later second).
    let mut tpl = TopicPartitionList::new();
    for p in leadscore_kafka::partitions(&c, topic, Duration::from_secs(10))? {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(c)
}

async fn passthrough(
    config: &Config,
    input: &str,
    output: &str,
    want: usize,
    max_batch: usize,
    linger: Duration,
    started: Instant,
) -> anyhow::Result<Duration> {
    let consumer: StreamConsumer = leadscore_kafka::client_config(&config.kafka)
        .set(
            "group.id",
            format!("bench-passthrough-{}", std::process::id()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(&[input])?;
    let producer = leadscore_kafka::txn::Transactional::create(
        leadscore_kafka::txn::transactional_config(
            &config.kafka,
            &format!("bench-passthrough-{}", std::process::id()),
            60_000,
            "bench-passthrough",
        )
        .set("queue.buffering.max.messages", "200000"),
        Duration::from_secs(30),
    )?;
    tokio::task::block_in_place(|| producer.init())?;
    let mut done = 0usize;
    let mut began = None;
    while done < want {
        let first = consumer.recv().await?;
        began.get_or_insert_with(|| started.elapsed());
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => batch.push(m),
                _ => break,
            }
        }
        let group = consumer.group_metadata().context("group metadata")?;
        // The same commit path as the scorer: begin, send, await delivery, offsets, commit.
        tokio::task::block_in_place(|| -> anyhow::Result<()> {
            let mut txn = producer.begin()?;
            let mut next: HashMap<i32, i64> = HashMap::new();
            for m in &batch {
                let mut rec = FutureRecord::<[u8], [u8]>::to(output);
                if let Some(k) = m.key() {
                    rec = rec.key(k);
                }
                if let Some(p) = m.payload() {
                    rec = rec.payload(p);
                }
                txn.send(rec)?;
                let e = next.entry(m.partition()).or_insert(0);
                *e = (*e).max(m.offset() + 1);
            }
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &next {
                tpl.add_partition_offset(input, *p, Offset::Offset(*o))?;
            }
            txn.commit(Some((&tpl, &group)))?;
            Ok(())
        })?;
        done += batch.len();
    }
    Ok(began.unwrap_or_default())
}

/// The topics one scorer run reads and writes.
struct RunTopics<'a> {
    input: &'a str,
    scores: &'a str,
    shadow: &'a str,
    dlq: &'a str,
}

fn start_scorer(
    topics: RunTopics<'_>,
    group: &str,
    args: &BenchArgs,
    http_port: u16,
    reasons: usize,
) -> anyhow::Result<std::process::Child> {
    let exe = std::env::current_exe()?;
    let RunTopics {
        input,
        scores,
        shadow,
        dlq,
    } = topics;
    let models = std::env::var("LEADSCORE_BENCH_MODEL").unwrap_or_else(|_| "models/default".into());
    Ok(std::process::Command::new(exe)
        .arg("scorer")
        .env("LEADSCORE__SCORER__INPUT_TOPIC", input)
        .env("LEADSCORE__SCORER__SCORES_TOPIC", scores)
        .env("LEADSCORE__SCORER__SHADOW_TOPIC", shadow)
        .env("LEADSCORE__SCORER__DLQ_TOPIC", dlq)
        .env("LEADSCORE__SCORER__GROUP_ID", group)
        .env(
            "LEADSCORE__SCORER__INSTANCE_ID",
            format!("bench-{}", std::process::id()),
        )
        .env("LEADSCORE__SCORER__CHAMPION_MODEL", &models)
        .env("LEADSCORE__SCORER__CHALLENGER_MODEL", &models)
        .env(
            "LEADSCORE__SCORER__HTTP_LISTEN",
            format!("127.0.0.1:{http_port}"),
        )
        .env("LEADSCORE__SCORER__LIFECYCLE_TOPIC", "")
        .env("LEADSCORE__SCORER__MAX_BATCH", args.max_batch.to_string())
        .env("LEADSCORE__SCORER__REASONS", reasons.to_string())
        .env(
            "LEADSCORE__SCORER__BATCH_LINGER_MS",
            args.linger_ms.to_string(),
        )
        // LEADSCORE_BENCH_SCORER_LOG traces the scorer (e.g. `warn,leadscore_kafka::txn=trace`).
        .env(
            "LEADSCORE_LOG",
            std::env::var("LEADSCORE_BENCH_SCORER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()?)
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Mean time per batch stage, from the scorer's Prometheus histograms.
async fn stage_means(port: u16) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let text = crate::demo::scrape(port)
        .await
        .context("reading the scorer's /metrics")?;
    let value = |name: &str, stage: &str| {
        crate::demo::sample(&text, &format!("{name}{{stage=\"{stage}\"}}"))
    };
    Ok(["fetch", "decode", "score", "produce", "commit"]
        .iter()
        .filter_map(|stage| {
            let count = value("leadscore_scorer_stage_ms_count", stage)?;
            let sum = value("leadscore_scorer_stage_ms_sum", stage)?;
            Some((stage.to_string(), count, sum / count.max(1.0)))
        })
        .collect())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

pub(crate) async fn run(cmd: BenchCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let args = match cmd {
        BenchCommand::Scorer(args) => args,
        BenchCommand::Drift(args) => return crate::bench_drift::run(args, config).await,
        BenchCommand::DriftSound(args) => {
            return tokio::task::block_in_place(|| crate::bench_drift_sound::run(args));
        }
        BenchCommand::Lookup(args) => return crate::bench_lookup::run(args, config).await,
        BenchCommand::Webhook(args) => return crate::bench_webhook::run(args, config).await,
    };
    leadscore_model::init_runtime(None)
        .context("ONNX Runtime (eval \"$(deploy/local/stack env)\")")?;
    let id = std::process::id();
    let t = |s: &str| format!("bench.{id}.{s}");
    let (input, pass_out, scores, shadow, dlq, live_in, live_scores) = (
        t("in"),
        t("pass"),
        t("scores"),
        t("shadow"),
        t("dlq"),
        t("live.in"),
        t("live.scores"),
    );
    let (plain_scores, plain_shadow) = (t("plain.scores"), t("plain.shadow"));
    let all = [
        &input,
        &pass_out,
        &scores,
        &shadow,
        &dlq,
        &live_in,
        &live_scores,
        &plain_scores,
        &plain_shadow,
    ];
    create_topics(
        config,
        &all.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        args.partitions,
    )
    .await?;

    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let envelope_text = leadscore_schemas::find("crm.public.leads.Envelope.avsc")?.text;
    let encoder = leadscore_registry::Encoder::for_subject(
        &registry,
        &leadscore_schemas::value_subject(&input),
        envelope_text,
    )
    .await?;
    let live_encoder = leadscore_registry::Encoder::for_subject(
        &registry,
        &leadscore_schemas::value_subject(&live_in),
        envelope_text,
    )
    .await?;
    let producer: FutureProducer = leadscore_kafka::client_config(&config.kafka)
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .create()?;

    eprintln!("pre-filling {} Avro CDC events ...", args.leads);
    let now = chrono::Utc::now().timestamp_millis();
    let mut pending = Vec::with_capacity(10_000);
    for g in Generator::new(GeneratorConfig {
        seed: 99,
        id_prefix: "bench".into(),
        ..Default::default()
    })
    .take(args.leads)
    {
        let bytes = encoder.encode(envelope(&g.lead, now))?;
        let mut rec = FutureRecord::to(&input)
            .key(&g.lead.lead_id)
            .payload(&bytes);
        loop {
            match producer.send_result(rec) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((_, r)) => {
                    rec = r;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        if pending.len() >= 10_000 {
            for f in pending.drain(..) {
                f.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
            }
        }
    }
    for f in pending.drain(..) {
        f.await.context("delivery cancelled")?.map_err(|(e, _)| e)?;
    }

    eprintln!("(a) transactional passthrough ...");
    let pass_reader = reader(config, &pass_out)?;
    let started = Instant::now();
    let copy = passthrough(
        config,
        &input,
        &pass_out,
        args.leads,
        args.max_batch,
        Duration::from_millis(args.linger_ms),
        started,
    );
    let (copied, pass) = tokio::join!(
        copy,
        drain(&pass_reader, args.leads, Duration::from_secs(600), started)
    );
    let pass_began = copied?;
    anyhow::ensure!(
        pass.seen == args.leads,
        "passthrough delivered {} of {}",
        pass.seen,
        args.leads
    );

    eprintln!("(b0) scorer, champion + shadow, no reasons ...");
    let plain_reader = reader(config, &plain_scores)?;
    let port = free_port()?;
    let started = Instant::now();
    let mut child = start_scorer(
        RunTopics {
            input: &input,
            scores: &plain_scores,
            shadow: &plain_shadow,
            dlq: &dlq,
        },
        &format!("bench-plain-{id}"),
        &args,
        port,
        0,
    )?;
    let (plain, plain_began) = tokio::join!(
        drain(&plain_reader, args.leads, Duration::from_secs(900), started),
        first_fetch(port, started, Duration::from_secs(120))
    );
    let _ = child.kill();
    let _ = child.wait();
    anyhow::ensure!(
        plain.seen == args.leads,
        "scorer without reasons delivered {} of {}",
        plain.seen,
        args.leads
    );

    eprintln!("(b) scorer, champion + shadow, three reasons each ...");
    let score_reader = reader(config, &scores)?;
    let port = free_port()?;
    let started = Instant::now();
    let mut child = start_scorer(
        RunTopics {
            input: &input,
            scores: &scores,
            shadow: &shadow,
            dlq: &dlq,
        },
        &format!("bench-scorer-{id}"),
        &args,
        port,
        3,
    )?;
    let (scored, score_began) = tokio::join!(
        drain(&score_reader, args.leads, Duration::from_secs(900), started),
        first_fetch(port, started, Duration::from_secs(120))
    );
    let max_rate_stages = stage_means(port).await.unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    anyhow::ensure!(
        scored.seen == args.leads,
        "scorer delivered {} of {}",
        scored.seen,
        args.leads
    );

    eprintln!(
        "(c) latency at {} leads/s for {} s ...",
        args.rate, args.seconds
    );
    let live_reader = reader(config, &live_scores)?;
    let port = free_port()?;
    let mut child = start_scorer(
        RunTopics {
            input: &live_in,
            scores: &live_scores,
            shadow: &shadow,
            dlq: &dlq,
        },
        &format!("bench-live-{id}"),
        &args,
        port,
        3,
    )?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let total = (args.rate * args.seconds) as usize;
    let leads: Vec<Lead> = Generator::new(GeneratorConfig {
        seed: 100,
        id_prefix: "live".into(),
        ..Default::default()
    })
    .take(total)
    .map(|g| g.lead)
    .collect();
    let sent_at: HashMap<String, i64> = HashMap::with_capacity(total);
    let sent_at = std::sync::Arc::new(std::sync::Mutex::new(sent_at));
    // The live feed batches like a Kafka Connect source (Debezium) does by default (the Java
    // client's linger.ms, 5): the bulk pre-fill's 20 ms would add up to 20 ms before the
    // scorer sees a lead, and no linger at all loads this machine's broker with one request
    // per lead (measured: p50 116-190 ms instead of ~65).
    let live_producer: FutureProducer = leadscore_kafka::client_config(&config.kafka)
        .set("linger.ms", "5")
        .create()?;
    // A source's producer is long-lived: it knows the topic's partitions and leaders before
    // the first lead, instead of asking while the first ones wait.
    let _ = tokio::task::block_in_place(|| {
        live_producer
            .client()
            .fetch_metadata(Some(&live_in), Duration::from_secs(10))
    })?;
    let feeder = {
        let sent_at = sent_at.clone();
        let producer = live_producer.clone();
        let live_in = live_in.clone();
        async move {
            let start = Instant::now();
            for (i, lead) in leads.iter().enumerate() {
                let due = Duration::from_secs_f64(i as f64 / args.rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
                let ts = chrono::Utc::now().timestamp_millis();
                let bytes = live_encoder.encode(envelope(lead, ts))?;
                if let Ok(mut m) = sent_at.lock() {
                    m.insert(lead.lead_id.clone(), ts);
                }
                // Fire and forget: delivery is awaited by the reader seeing the score.
                let _ = producer.send_result(
                    FutureRecord::to(&live_in)
                        .key(&lead.lead_id)
                        .payload(&bytes),
                );
            }
            // Flushing blocks its thread; on this task it would hold up the collector
            // beside it and add its wait to the last second's latencies.
            tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(30))).await??;
            anyhow::Ok(())
        }
    };
    let feed_start = chrono::Utc::now().timestamp_millis();
    // For lining up with the scorer's own logs (LEADSCORE_BENCH_SCORER_LOG).
    eprintln!("feed starts at {}", chrono::Utc::now().to_rfc3339());
    let collector = async {
        let mut latencies = Vec::with_capacity(total);
        // The same for the leads sent after the first second: the first ~150 ms of a feed
        // are slow on both sides of the commit, a start-up transient (the run's topics are
        // new, every process wakes at once) that a long-running pipeline does not see.
        let mut settled = Vec::with_capacity(total);
        // Each latency in two: until the scorer sent the score (its record's CreateTime),
        // and from then until the score was readable (the transaction's commit, its markers
        // and the reader's fetch).
        let mut to_sent = Vec::with_capacity(total);
        let mut to_readable = Vec::with_capacity(total);
        // The slowest score of each second of the feed, by when its lead was sent.
        let mut by_second = vec![0.0f64; args.seconds as usize + 1];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(args.seconds + 60);
        while latencies.len() < total {
            match tokio::time::timeout_at(deadline, live_reader.recv()).await {
                Ok(Ok(m)) => {
                    let now = chrono::Utc::now().timestamp_millis();
                    let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                    if let Some(ts) = sent_at.lock().ok().and_then(|s| s.get(&key).copied()) {
                        let latency = (now - ts) as f64;
                        latencies.push(latency);
                        if ts - feed_start >= 1000 {
                            settled.push(latency);
                        }
                        if let Some(created) = m.timestamp().to_millis() {
                            to_sent.push((created - ts) as f64);
                            to_readable.push((now - created) as f64);
                        }
                        let second = ((ts - feed_start).max(0) / 1000) as usize;
                        if let Some(worst) = by_second.get_mut(second.min(args.seconds as usize)) {
                            *worst = worst.max(latency);
                        }
                    }
                }
                _ => break,
            }
        }
        (latencies, settled, by_second, to_sent, to_readable)
    };
    let (fed, (mut latencies, mut settled, by_second, mut to_sent, mut to_readable)) =
        tokio::join!(feeder, collector);
    fed?;
    let fixed_rate_stages = stage_means(port).await.unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    latencies.sort_by(f64::total_cmp);
    settled.sort_by(f64::total_cmp);
    to_sent.sort_by(f64::total_cmp);
    to_readable.sort_by(f64::total_cmp);

    let pass_rate = pass.rate(pass_began);
    let score_rate = scored.rate(score_began);
    let plain_rate = plain.rate(plain_began);
    println!("| run | leads | first batch fetched after | then to the last output | leads/s |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, d: &Drained, began: Duration, rate: String| {
        println!(
            "| {name} | {} | {:.2} s | {:.2} s | {rate} |",
            d.seen,
            began.as_secs_f64(),
            d.last.saturating_sub(began).as_secs_f64(),
        )
    };
    row(
        "(a) transactional passthrough",
        &pass,
        pass_began,
        format!("{pass_rate:.0}"),
    );
    row(
        "(b0) scorer, champion + shadow, no reasons",
        &plain,
        plain_began,
        format!(
            "{plain_rate:.0} ({:.0}% of passthrough)",
            100.0 * plain_rate / pass_rate
        ),
    );
    row(
        "(b) scorer, champion + shadow, 3 reasons each",
        &scored,
        score_began,
        format!(
            "{score_rate:.0} ({:.0}% of passthrough, {:.0}% of b0)",
            100.0 * score_rate / pass_rate,
            100.0 * score_rate / plain_rate
        ),
    );
    println!();
    println!(
        "(c) at {} leads/s for {} s: {} of {} scored; event-to-score (produce to readable score) p50 {:.0} ms, p99 {:.0} ms, p99.9 {:.0} ms, max {:.0} ms",
        args.rate,
        args.seconds,
        latencies.len(),
        total,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "After the first second ({} leads): p50 {:.0} ms, p99 {:.0} ms, p99.9 {:.0} ms, max {:.0} ms",
        settled.len(),
        percentile(&settled, 0.5),
        percentile(&settled, 0.99),
        percentile(&settled, 0.999),
        settled.last().copied().unwrap_or(f64::NAN)
    );
    println!();
    println!(
        "Split at the score record's CreateTime: produce to the scorer sending its score p50 {:.0} ms, p99 {:.0} ms; then to readable p50 {:.0} ms, p99 {:.0} ms",
        percentile(&to_sent, 0.5),
        percentile(&to_sent, 0.99),
        percentile(&to_readable, 0.5),
        percentile(&to_readable, 0.99),
    );
    println!();
    println!(
        "Slowest score of each second of the feed (ms): {}",
        by_second
            .iter()
            .map(|ms| format!("{ms:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    println!("Mean time per batch stage (ms), from the scorer's histograms:");
    println!();
    println!("| stage | (b) max rate: batches | mean ms | (c) fixed rate: batches | mean ms |");
    println!("|---|---|---|---|---|");
    for (b, c) in max_rate_stages.iter().zip(&fixed_rate_stages) {
        println!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.1} |",
            b.0, b.1, b.2, c.1, c.2
        );
    }
    // Readers are assigned their partitions: closed first, they do not report the topics'
    // deletion as lost partitions.
    drop((pass_reader, plain_reader, score_reader, live_reader));
    let admin = leadscore_kafka::TopicAdmin::new(&config.kafka)?;
    admin
        .delete_topics(&all.iter().map(|s| s.as_str()).collect::<Vec<_>>())
        .await?;
    for s in [&input, &live_in] {
        let _ = registry
            .delete_subject(&leadscore_schemas::value_subject(s))
            .await;
    }
    Ok(ExitCode::SUCCESS)
}
