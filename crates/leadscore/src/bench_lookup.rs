//! `leadscore bench lookup`: GetScore and ScoreLead latency and throughput under load.
//!
//! Starts the lookup service (this binary, `leadscore lookup`, on free local
//! ports, reading the local Redis and Postgres and following the live score
//! topic), puts `--leads` scores in Redis, warms up (every id read once, which
//! fills the service's memory as reads do), then drives it over gRPC from
//! `--concurrency` callers sharing `--connections` HTTP/2 connections:
//! (a) GetScore at a fixed `--rate`, each request sent at its scheduled time
//! by a pacer thread, latency measured from the send, with how far sends fell
//! behind the schedule; (b) GetScore as fast as the callers go; (c) ScoreLead
//! as fast as they go. Prints a Markdown table for BENCHMARKS.md.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use leadscore_config::Config;
use leadscore_crm::{Generator, GeneratorConfig};
use leadscore_lookup::proto::v1;
use leadscore_lookup::proto::v1::lead_scores_client::LeadScoresClient;
use tonic::transport::Channel;

#[derive(Debug, Args)]
pub(crate) struct LookupBenchArgs {
    /// Scores put in Redis (and looked up at random).
    #[arg(long, default_value_t = 100_000)]
    leads: usize,
    /// Fixed GetScore rate for the latency run, requests per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent callers.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the callers share (round robin; 0: one per caller).
    #[arg(long, default_value_t = 0)]
    connections: usize,
    /// `lookup.memory_entries` of the service (0: every GetScore reads Redis).
    #[arg(long, default_value_t = 200_000)]
    memory_entries: usize,
    /// `runtime.worker_threads` of the service (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    service_threads: usize,
    /// Worker threads of the load generator's own runtime (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    client_threads: usize,
}

#[derive(Default)]
struct Run {
    latencies_us: Vec<u64>,
    errors: u64,
    elapsed: Duration,
}

impl Run {
    fn merge(&mut self, other: Run) {
        self.latencies_us.extend(other.latencies_us);
        self.errors += other.errors;
    }

    fn row(&mut self, name: &str) -> String {
        self.latencies_us.sort_unstable();
        let n = self.latencies_us.len();
        let pct = |p: f64| {
            if n == 0 {
                return f64::NAN;
            }
            self.latencies_us[((n as f64 * p) as usize).min(n - 1)] as f64 / 1000.0
        };
        format!(
            "| {name} | {n} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
            self.errors,
            n as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(0.999),
        )
    }
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Channel::from_shared(format!("http://{addr}"))?
            .connect()
            .await
        {
            Ok(c) => {
                let mut probe = LeadScoresClient::new(c.clone());
                if probe
                    .get_model_info(v1::GetModelInfoRequest {})
                    .await
                    .is_ok()
                {
                    return Ok(c);
                }
            }
            Err(e) if Instant::now() > deadline => {
                return Err(e).context("the lookup service did not start");
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub(crate) async fn run(args: LookupBenchArgs, config: &Config) -> anyhow::Result<ExitCode> {
    let pid = std::process::id();
    let port = |l: std::net::TcpListener| l.local_addr().map(|a| a.port());
    let grpc = format!(
        "127.0.0.1:{}",
        port(std::net::TcpListener::bind("127.0.0.1:0")?)?
    );
    let rest = format!(
        "127.0.0.1:{}",
        port(std::net::TcpListener::bind("127.0.0.1:0")?)?
    );
    let redis_url = config
        .lookup
        .redis_url
        .clone()
        .context("bench lookup reads Redis: set lookup.redis_url")?;
    let cache = leadscore_cache::Cache::new(
        &redis_url,
        Duration::from_secs(3600),
        Duration::from_secs(5),
    )?;
    let ids: Vec<String> = (0..args.leads)
        .map(|i| format!("bench-{pid}-{i}"))
        .collect();
    for chunk in ids.chunks(5_000) {
        let scores: Vec<leadscore_cache::CachedScore> = chunk
            .iter()
            .enumerate()
            .map(|(i, id)| leadscore_cache::CachedScore {
                lead_id: id.clone(),
                score: (i % 100) as f64 / 100.0,
                band: "Low".into(),
                model_name: "lead-scoring".into(),
                model_version: "bench".into(),
                model_role: "champion".into(),
                scored_at_ms: 0,
                reasons: Default::default(),
            })
            .collect();
        cache.write(&scores, &[]).await.context("filling Redis")?;
    }
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("lookup")
        // Local ports only; the bench measures the service, not the token check.
        .env("LEADSCORE__LOOKUP__ALLOW_UNAUTHENTICATED", "true")
        .env("LEADSCORE__LOOKUP__GRPC_LISTEN", &grpc)
        .env("LEADSCORE__LOOKUP__REST_LISTEN", &rest)
        .env("LEADSCORE__LOOKUP__LIFECYCLE_TOPIC", "")
        .env(
            "LEADSCORE__LOOKUP__MEMORY_ENTRIES",
            args.memory_entries.to_string(),
        )
        .env(
            "LEADSCORE__RUNTIME__WORKER_THREADS",
            args.service_threads.to_string(),
        )
        .env("LEADSCORE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting `leadscore lookup`")?;
    // The load generator on its own runtime, sized apart from the service's.
    let result = tokio::task::block_in_place(|| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut rt = tokio::runtime::Builder::new_multi_thread();
                    if args.client_threads > 0 {
                        rt.worker_threads(args.client_threads);
                    }
                    rt.enable_all()
                        .build()
                        .context("the load generator's runtime")?
                        .block_on(drive(&args, &grpc, &ids))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the load generator panicked"))?
        })
    });
    let _ = child.kill();
    let _ = child.wait();
    cache.purge(&ids).await.ok();
    let table = result?;
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

async fn drive(args: &LookupBenchArgs, grpc: &str, ids: &[String]) -> anyhow::Result<String> {
    let connections = match args.connections {
        0 => args.concurrency,
        n => n.min(args.concurrency),
    };
    let mut opened = Vec::new();
    for _ in 0..connections {
        opened.push(connect(grpc).await?);
    }
    let channels: Vec<Channel> = (0..args.concurrency)
        .map(|i| opened[i % opened.len()].clone())
        .collect();
    let run_for = Duration::from_secs(args.seconds);
    let ids = std::sync::Arc::new(ids.to_vec());

    // Warm up, untimed: every id read once (which also fills the service's
    // memory, as reads do in steady state), then a second of GetScore.
    let mut warm = LeadScoresClient::new(channels[0].clone());
    for chunk in ids.chunks(1_000) {
        let got = warm
            .batch_get_scores(v1::BatchGetScoresRequest {
                lead_ids: chunk.to_vec(),
            })
            .await
            .context("warm-up BatchGetScores")?
            .into_inner();
        anyhow::ensure!(
            got.missing.is_empty(),
            "warm-up: {} ids not found",
            got.missing.len()
        );
    }
    let until = Instant::now() + Duration::from_secs(1);
    let mut i = 0;
    while Instant::now() < until {
        let _ = warm
            .get_score(v1::GetScoreRequest {
                lead_id: ids[i % ids.len()].clone(),
            })
            .await;
        i += 1;
    }

    // (a) GetScore at a fixed rate. A pacer on its own OS thread (the
    // runtime's timers are too coarse under load) starts each request at its
    // scheduled time as its own task, so a slow answer delays no other send,
    // round robin over the connections. Latency is measured from the send;
    // how late sends were against the schedule is reported beside it.
    let period = Duration::from_secs_f64(1.0 / args.rate.max(1) as f64);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<(u64, u64)>>();
    let started = Instant::now();
    let runtime = tokio::runtime::Handle::current();
    let pacer = {
        let (channels, ids, tx) = (channels.clone(), ids.clone(), tx.clone());
        std::thread::spawn(move || {
            let mut n: u64 = 0;
            loop {
                let due = started + period.mul_f64(n as f64);
                if due.duration_since(started) >= run_for {
                    return n;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let mut c = LeadScoresClient::new(channels[n as usize % channels.len()].clone());
                let id = ids[(n as usize * 7919) % ids.len()].clone();
                let tx = tx.clone();
                runtime.spawn(async move {
                    let sent = Instant::now();
                    let ok = c
                        .get_score(v1::GetScoreRequest { lead_id: id })
                        .await
                        .is_ok();
                    let lag = sent.duration_since(due).as_micros() as u64;
                    let _ = tx.send(ok.then(|| (sent.elapsed().as_micros() as u64, lag)));
                });
                n += 1;
            }
        })
    };
    let n = tokio::task::spawn_blocking(move || pacer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the pacer thread panicked"))?;
    drop(tx);
    let mut fixed = Run::default();
    let mut lags = Vec::with_capacity(n as usize);
    while let Some(r) = rx.recv().await {
        match r {
            Some((latency, lag)) => {
                fixed.latencies_us.push(latency);
                lags.push(lag);
            }
            None => fixed.errors += 1,
        }
    }
    fixed.elapsed = started.elapsed();
    lags.sort_unstable();
    let lag_p99_ms = lags
        .get(((lags.len() as f64 * 0.99) as usize).min(lags.len().saturating_sub(1)))
        .map_or(f64::NAN, |&us| us as f64 / 1000.0);

    // (b) GetScore and (c) ScoreLead, closed loop.
    let mut g = Generator::new(GeneratorConfig {
        seed: 3,
        id_prefix: "bench".into(),
        ..Default::default()
    });
    let leads = std::sync::Arc::new(
        (0..1000)
            .map(|_| v1::Lead::from(&g.next_lead().lead))
            .collect::<Vec<_>>(),
    );
    let mut rows = vec![fixed.row(&format!(
        "GetScore at {} req/s (open loop; sends p99 {lag_p99_ms:.2} ms behind schedule)",
        args.rate
    ))];
    for which in ["GetScore", "ScoreLead"] {
        let mut tasks = Vec::new();
        for (w, ch) in channels.iter().enumerate() {
            let (ch, ids, leads) = (ch.clone(), ids.clone(), leads.clone());
            tasks.push(tokio::spawn(async move {
                let mut c = LeadScoresClient::new(ch);
                let mut run = Run::default();
                let end = Instant::now() + run_for;
                let mut i = w;
                while Instant::now() < end {
                    let t = Instant::now();
                    let ok = if which == "GetScore" {
                        let id = ids[i % ids.len()].clone();
                        c.get_score(v1::GetScoreRequest { lead_id: id })
                            .await
                            .is_ok()
                    } else {
                        let lead = leads[i % leads.len()].clone();
                        c.score_lead(v1::ScoreLeadRequest { lead: Some(lead) })
                            .await
                            .is_ok()
                    };
                    i += 7919;
                    if ok {
                        run.latencies_us.push(t.elapsed().as_micros() as u64);
                    } else {
                        run.errors += 1;
                    }
                }
                run
            }));
        }
        let mut run = Run::default();
        let started = Instant::now();
        for t in tasks {
            run.merge(t.await?);
        }
        run.elapsed = started.elapsed();
        rows.push(run.row(&format!(
            "{which}, {} callers (closed loop)",
            args.concurrency
        )));
    }
    Ok(format!(
        "| run | requests | errors | req/s | p50 ms | p99 ms | p99.9 ms |\n|---|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    ))
}
