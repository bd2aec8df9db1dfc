//! `leadscore demo`: the CRM round trip, live. Applies the connectors, runs
//! the scorer, inserts synthetic leads into the CRM at a steady rate and
//! prints, every second, how many have come back as rows in `lead_scores`,
//! the band mix and the latency; then a summary.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use leadscore_config::Config;
use leadscore_crm::{Generator, GeneratorConfig};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Leads to insert into the CRM.
    #[arg(long, default_value_t = 3000)]
    leads: usize,
    /// Insert rate, leads per second.
    #[arg(long, default_value_t = 200)]
    rate: usize,
    /// Challenger model URL for shadow scoring (e.g. mlflow+http://127.0.0.1:5000/lead-scoring@challenger).
    #[arg(long)]
    challenger: Option<String>,
    /// How long to wait for the last score rows after the last insert, seconds.
    #[arg(long, default_value_t = 120)]
    drain_secs: u64,
    /// Keep the demo's leads in the CRM afterwards (default: deleted, which also removes their score rows).
    #[arg(long)]
    keep: bool,
}

struct Scorer(std::process::Child, u16);

impl Drop for Scorer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn start_scorer(challenger: Option<&str>) -> anyhow::Result<Scorer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("scorer")
        .env("LEADSCORE__SCORER__INSTANCE_ID", "demo-0")
        .env(
            "LEADSCORE__SCORER__HTTP_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("LEADSCORE_LOG", "warn")
        .stdout(Stdio::null());
    if let Some(c) = challenger {
        cmd.env("LEADSCORE__SCORER__CHALLENGER_MODEL", c);
    }
    Ok(Scorer(cmd.spawn().context("starting the scorer")?, port))
}

/// The scorer's /metrics text.
pub(crate) async fn scrape(port: u16) -> Option<String> {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Sum of the samples whose series (name and labels) starts with `series`.
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

pub(crate) async fn metric(port: u16, name: &str) -> Option<f64> {
    sample(&scrape(port).await?, name)
}

struct Snapshot {
    rows: i64,
    bands: BTreeMap<String, i64>,
    p50_ms: f64,
    p99_ms: f64,
    /// Insert into the CRM to the score row written (the database's `written_at`).
    row_p50_ms: f64,
    row_p99_ms: f64,
}

async fn snapshot(pg: &leadscore_postgres::Client, pattern: &str) -> anyhow::Result<Snapshot> {
    let rows = pg
        .query(
            "SELECT band, count(*) FROM public.lead_scores WHERE lead_id LIKE $1 GROUP BY band",
            &[&pattern],
        )
        .await?;
    let bands: BTreeMap<String, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // From insert (the CRM row's created_at, set at insert) to scored (the score row's
    // scored_at) and to the row written (written_at, set by the database on each write;
    // percentile_cont skips rows without one), in one pass over the join.
    let lat = pg
        .query_one(
            "SELECT coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY scored), 0), \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY scored), 0), \
                    coalesce(percentile_cont(0.5) WITHIN GROUP (ORDER BY written), 0), \
                    coalesce(percentile_cont(0.99) WITHIN GROUP (ORDER BY written), 0) \
             FROM (SELECT extract(epoch FROM s.scored_at - l.created_at) * 1000 AS scored, \
                          extract(epoch FROM s.written_at - l.created_at) * 1000 AS written \
                   FROM public.lead_scores s JOIN public.leads l USING (lead_id) \
                   WHERE s.lead_id LIKE $1) x",
            &[&pattern],
        )
        .await?;
    Ok(Snapshot {
        rows: bands.values().sum(),
        bands,
        p50_ms: lat.get(0),
        p99_ms: lat.get(1),
        row_p50_ms: lat.get(2),
        row_p99_ms: lat.get(3),
    })
}

fn band_line(bands: &BTreeMap<String, i64>) -> String {
    let total: i64 = bands.values().sum::<i64>().max(1);
    ["High", "Medium", "Low"]
        .iter()
        .map(|b| {
            let n = bands.get(*b).copied().unwrap_or(0);
            format!("{b} {n} ({:.0}%)", 100.0 * n as f64 / total as f64)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Shadow vs live over the demo's leads: (count, mean |shadow - live|, band agreement).
async fn shadow_comparison(config: &Config, prefix: &str) -> anyhow::Result<(usize, f64, f64)> {
    let registry = leadscore_registry::Registry::new(&config.registry)?;
    let decoder = leadscore_registry::Decoder::new(registry);
    let consumer: StreamConsumer = leadscore_kafka::follower_config(
        &config.kafka,
        "demo-shadow",
        leadscore_kafka::Start::Earliest,
    )
    .create()?;
    consumer.subscribe(&[&config.scorer.shadow_topic])?;
    let (mut n, mut diff, mut agree) = (0usize, 0.0, 0usize);
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_secs(3), consumer.recv()).await {
        if !m.key().is_some_and(|k| k.starts_with(prefix.as_bytes())) {
            continue;
        }
        let Some(bytes) = m.payload() else { continue };
        let value = decoder.decode(bytes).await?;
        let field = |record: &apache_avro::types::Value, name: &str| match record {
            apache_avro::types::Value::Record(fields) => fields
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone()),
            _ => None,
        };
        let score = |side: &str| {
            let ms = field(&value, side)?;
            let s = match field(&ms, "score")? {
                apache_avro::types::Value::Double(d) => d,
                _ => return None,
            };
            let b = match field(&ms, "band")? {
                apache_avro::types::Value::Enum(_, b) => b,
                _ => return None,
            };
            Some((s, b))
        };
        if let (Some((s, sb)), Some((l, lb))) = (score("shadow"), score("live")) {
            n += 1;
            diff += (s - l).abs();
            agree += usize::from(sb == lb);
        }
    }
    Ok((n, diff / n.max(1) as f64, agree as f64 / n.max(1) as f64))
}

pub(crate) async fn run(args: DemoArgs, config: &Config) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    println!("1. Connectors (Debezium CRM source, JDBC score sink):");
    let connect = leadscore_connect::Client::new(&config.connect)?;
    for def in leadscore_connect::load_dir(Path::new(&config.connect.dir))? {
        let applied = connect.apply(&def).await?;
        let status = connect
            .wait_running(&def.name, Duration::from_secs(120))
            .await?;
        anyhow::ensure!(
            status.is_running(),
            "connector {} is not running ({:?}); see `leadscore connectors status`",
            def.name,
            status.connector.state
        );
        println!("   {:<18} {applied:?}, running", def.name);
    }

    println!(
        "2. Scorer (champion {}{}):",
        config.scorer.champion_model,
        args.challenger
            .as_deref()
            .map(|c| format!(", challenger {c} in shadow"))
            .unwrap_or_default()
    );
    let scorer = start_scorer(args.challenger.as_deref())?;
    let ready = Instant::now();
    while metric(scorer.1, "leadscore_scorer_ready").await != Some(1.0) {
        anyhow::ensure!(
            ready.elapsed() < Duration::from_secs(60),
            "the scorer did not become ready in 60 s; run `leadscore scorer` to see why"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("   ready, metrics on http://127.0.0.1:{}/metrics", scorer.1);
    // The monitoring page, live while the demo runs.
    // Its data needs a bearer token: one for this demo, handed to the page in the URL's
    // fragment (never sent to a server) unless the configuration names its own.
    let token = config
        .lookup
        .auth_tokens
        .first()
        .cloned()
        .unwrap_or_else(|| format!("demo-{}", uuid::Uuid::new_v4().simple()));
    let _dashboard = match std::process::Command::new(std::env::current_exe()?)
        .arg("dashboard")
        .env(
            "LEADSCORE__DASHBOARD__SCRAPE_URLS",
            format!("[\"http://127.0.0.1:{}/metrics\"]", scorer.1),
        )
        .env("LEADSCORE__LOOKUP__AUTH_TOKENS", format!("[\"{token}\"]"))
        .env("LEADSCORE_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
    {
        Ok(child) => {
            println!(
                "   dashboard: http://{}/#token={token} (live while the demo runs; `leadscore dashboard` keeps it)",
                config.dashboard.http_listen
            );
            Some(Scorer(child, 0))
        }
        Err(e) => {
            println!("   dashboard not started: {e}");
            None
        }
    };

    let mut pg = leadscore_postgres::connect(&config.postgres.url).await?;
    let prefix = format!("demo-{}", chrono::Utc::now().format("%Y%m%d%H%M%S"));
    let pattern = format!("{prefix}%");
    let mut generator = Generator::new(GeneratorConfig {
        seed: 7,
        id_prefix: prefix.clone(),
        end: chrono::Utc::now(),
        days: 1,
        ..Default::default()
    });
    println!(
        "3. Inserting {} synthetic leads into the CRM (public.leads) at {}/s; watching public.lead_scores:",
        args.leads, args.rate
    );
    println!();
    println!(
        "   {:>5}  {:>8}  {:>10}  {:>8}  {:>9}  bands",
        "t(s)", "inserted", "score rows", "rows/s", "p50 ms"
    );
    let started = Instant::now();
    let mut inserted = 0usize;
    let mut last_rows = 0i64;
    let mut last_tick = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let per_tick = (args.rate / 10).max(1);
    let mut done_at: Option<Instant> = None;
    loop {
        tick.tick().await;
        if inserted < args.leads {
            let n = per_tick.min(args.leads - inserted);
            let now = chrono::Utc::now();
            let batch: Vec<_> = (&mut generator)
                .take(n)
                .map(|mut g| {
                    // Created now, as a new CRM lead is: the latency below counts from here.
                    g.lead.created_at = now;
                    g.lead.updated_at = now;
                    g.lead.status = leadscore_crm::Status::New;
                    g.lead.converted_at = None;
                    g
                })
                .collect();
            leadscore_postgres::upsert_leads(&mut pg, &batch).await?;
            inserted += n;
            if inserted == args.leads {
                done_at = Some(Instant::now());
            }
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            let s = snapshot(&pg, &pattern).await?;
            let rate = (s.rows - last_rows) as f64 / last_tick.elapsed().as_secs_f64();
            println!(
                "   {:>5.0}  {:>8}  {:>10}  {:>8.0}  {:>9.0}  {}",
                started.elapsed().as_secs_f64(),
                inserted,
                s.rows,
                rate,
                s.p50_ms,
                band_line(&s.bands)
            );
            last_rows = s.rows;
            last_tick = Instant::now();
            if s.rows as usize >= args.leads {
                break;
            }
            if done_at.is_some_and(|d| d.elapsed() > Duration::from_secs(args.drain_secs)) {
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let s = snapshot(&pg, &pattern).await?;
    println!("   * insert into the CRM to scored by the scorer, median so far");
    println!();
    println!("4. A few rows of public.lead_scores:");
    for r in pg
        .query(
            "SELECT lead_id, score, band, model_name, model_version, model_role, latency_ms, \
             reasons FROM public.lead_scores WHERE lead_id LIKE $1 ORDER BY score DESC LIMIT 5",
            &[&pattern],
        )
        .await?
    {
        let (id, score, band, name, version, role, lat): (
            String,
            f64,
            String,
            String,
            String,
            String,
            Option<f64>,
        ) = (
            r.get(0),
            r.get(1),
            r.get(2),
            r.get(3),
            r.get(4),
            r.get(5),
            r.get(6),
        );
        println!(
            "   {id}  score {score:.4}  {band:<6}  {name} v{version} ({role}), event-to-score {:.0} ms",
            lat.unwrap_or(f64::NAN)
        );
        let reasons: Option<Vec<String>> = r.get(7);
        match reasons {
            Some(reasons) if !reasons.is_empty() => {
                println!("      why: {}", reasons.join(", "));
            }
            _ => println!("      why: (no reasons: the model is not an explained tree ensemble)"),
        }
    }
    let dead = metric(scorer.1, "leadscore_scorer_dead_letters_total")
        .await
        .unwrap_or(0.0);
    let shadow = if args.challenger.is_some() {
        Some(shadow_comparison(config, &prefix).await?)
    } else {
        None
    };
    drop(scorer);

    println!();
    println!("Summary");
    println!(
        "   {} of {} leads inserted into the CRM came back as score rows in {:.1} s ({:.0} leads/s end to end)",
        s.rows,
        args.leads,
        elapsed.as_secs_f64(),
        s.rows as f64 / elapsed.as_secs_f64()
    );
    println!(
        "   insert into the CRM -> scored (Debezium + Kafka + scorer): p50 {:.0} ms, p99 {:.0} ms",
        s.p50_ms, s.p99_ms
    );
    println!(
        "   insert into the CRM -> row in lead_scores (+ the JDBC sink): p50 {:.0} ms, p99 {:.0} ms",
        s.row_p50_ms, s.row_p99_ms
    );
    println!("   bands: {}", band_line(&s.bands));
    println!("   dead letters: {dead:.0}");
    match shadow {
        Some((n, diff, agree)) => println!(
            "   shadow: {n} challenger scores; mean |challenger - champion| {diff:.4}, same band {:.1}%",
            agree * 100.0
        ),
        None => println!("   shadow: no challenger (pass --challenger URL to compare one)"),
    }
    if !args.keep {
        pg.execute(
            "DELETE FROM public.leads WHERE lead_id LIKE $1",
            &[&pattern],
        )
        .await?;
        println!(
            "   the demo's leads were deleted from the CRM (their score rows follow through the pipeline); --keep keeps them"
        );
    }
    Ok(if s.rows as usize == args.leads {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
