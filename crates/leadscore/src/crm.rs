//! `leadscore crm seed`: synthetic leads into the CRM table or a CSV file.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use leadscore_config::Config;
use leadscore_crm::{DriftSpec, Generator, GeneratorConfig};

#[derive(Debug, Subcommand)]
pub(crate) enum CrmCommand {
    /// Generate realistic leads, optionally with injected drift.
    Seed(Box<SeedArgs>),
}

#[derive(Debug, Args)]
pub(crate) struct SeedArgs {
    /// Number of leads.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Random seed; the same seed and options give the same leads.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write CSV to this file instead of the CRM database.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Lead id prefix (ids are `<prefix>_<9-digit index>`).
    #[arg(long, default_value = "lead")]
    id_prefix: String,
    /// End of the creation window: RFC 3339 time or `now` (default 2026-11-01T00:00:00Z, for reproducible files).
    #[arg(long)]
    end: Option<String>,
    /// Length of the creation window in days.
    #[arg(long, default_value_t = 180)]
    days: u32,
    /// Mean days from creation to outcome (converted or lost).
    #[arg(long, default_value_t = 10.0)]
    outcome_delay_days: f64,
    /// Base missing rate of each optional column.
    #[arg(long, default_value_t = 0.03)]
    missing_rate: f64,
    /// Drift: add to a numeric column, e.g. `page_views=5`.
    #[arg(long, value_name = "COLUMN=DELTA")]
    shift: Vec<String>,
    /// Drift: scale a numeric column, e.g. `time_on_site=1.5`.
    #[arg(long, value_name = "COLUMN=FACTOR")]
    scale: Vec<String>,
    /// Drift: reweight categories, e.g. `industry=Retail:3,Technology:0.5`.
    #[arg(long, value_name = "COLUMN=CAT:W,...")]
    mix: Vec<String>,
    /// Drift: a never-seen category at a rate, e.g. `referral_source=TikTok:0.2`.
    #[arg(long, value_name = "COLUMN=CAT:RATE")]
    new_category: Vec<String>,
    /// Drift: missing rate of a column, e.g. `form_completion_time=0.3`.
    #[arg(long, value_name = "COLUMN=RATE")]
    missing: Vec<String>,
    /// Drift applies to leads created at or after this RFC 3339 time (default: all).
    #[arg(long)]
    drift_from: Option<String>,
    /// Rows per database transaction.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
}

fn time(arg: &str, value: &str) -> anyhow::Result<DateTime<Utc>> {
    if value == "now" {
        return Ok(Utc::now());
    }
    Ok(DateTime::parse_from_rfc3339(value)
        .with_context(|| {
            format!(
                "--{arg} `{value}` is not an RFC 3339 time (e.g. 2026-11-01T00:00:00Z) or `now`"
            )
        })?
        .with_timezone(&Utc))
}

fn generator_config(a: &SeedArgs) -> anyhow::Result<GeneratorConfig> {
    let mut drift = DriftSpec::default();
    for k in &a.shift {
        drift.add_shift(k)?;
    }
    for k in &a.scale {
        drift.add_scale(k)?;
    }
    for k in &a.mix {
        drift.add_mix(k)?;
    }
    for k in &a.new_category {
        drift.add_new_category(k)?;
    }
    for k in &a.missing {
        drift.add_missing(k)?;
    }
    anyhow::ensure!(a.days > 0, "--days must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&a.missing_rate),
        "--missing-rate must be in [0, 1]"
    );
    anyhow::ensure!(
        a.outcome_delay_days > 0.0,
        "--outcome-delay-days must be > 0"
    );
    anyhow::ensure!(!a.id_prefix.is_empty(), "--id-prefix must not be empty");
    let mut config = GeneratorConfig {
        seed: a.seed,
        id_prefix: a.id_prefix.clone(),
        days: a.days,
        outcome_delay_days: a.outcome_delay_days,
        missing_rate: a.missing_rate,
        drift,
        drift_from: a
            .drift_from
            .as_deref()
            .map(|v| time("drift-from", v))
            .transpose()?,
        ..GeneratorConfig::default()
    };
    if let Some(end) = &a.end {
        config.end = time("end", end)?;
    }
    Ok(config)
}

fn progress(count: u64) -> ProgressBar {
    let bar = ProgressBar::new(count);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} leads ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub(crate) async fn run(cmd: CrmCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let CrmCommand::Seed(args) = cmd;
    let gen_config = generator_config(&args)?;
    let generator = Generator::new(gen_config.clone());
    let started = Instant::now();
    let bar = progress(args.count);
    let (mut converted, mut labelled) = (0u64, 0u64);
    let mut tally = |g: &leadscore_crm::Generated| {
        if g.lead.status.is_outcome() {
            labelled += 1;
            converted += u64::from(g.lead.status == leadscore_crm::Status::Converted);
        }
    };
    let target = match &args.out {
        Some(path) => {
            let file =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            leadscore_crm::csv::write_header(&mut out)?;
            for (i, g) in generator.take(usize::try_from(args.count)?).enumerate() {
                leadscore_crm::csv::write_row(&mut out, &g)
                    .with_context(|| format!("writing {}", path.display()))?;
                tally(&g);
                if i % 10_000 == 0 {
                    bar.set_position(i as u64);
                }
            }
            out.flush()
                .with_context(|| format!("writing {}", path.display()))?;
            path.display().to_string()
        }
        None => {
            let mut client = leadscore_postgres::connect(&config.postgres.url).await?;
            let mut batch = Vec::with_capacity(args.batch.max(1));
            let mut generator = generator.take(usize::try_from(args.count)?);
            loop {
                batch.clear();
                batch.extend(generator.by_ref().take(args.batch.max(1)));
                if batch.is_empty() {
                    break;
                }
                leadscore_postgres::upsert_leads(&mut client, &batch).await?;
                batch.iter().for_each(&mut tally);
                bar.inc(batch.len() as u64);
            }
            format!(
                "public.leads at {}",
                leadscore_postgres::redact(&config.postgres.url)
            )
        }
    };
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    println!(
        "seeded {} leads into {target} in {secs:.1}s ({:.0}/s); {labelled} with an outcome, conversion rate {:.1}%",
        args.count,
        args.count as f64 / secs.max(1e-9),
        100.0 * converted as f64 / labelled.max(1) as f64
    );
    if !gen_config.drift.is_empty() {
        println!("drift injected: {:?}", gen_config.drift);
    }
    Ok(ExitCode::SUCCESS)
}
