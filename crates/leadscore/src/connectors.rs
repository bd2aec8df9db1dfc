//! `leadscore connectors ...`: apply the definitions in connectors/ to Kafka Connect and operate them.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use leadscore_config::Config;
use leadscore_connect::{Applied, Client, Status};

#[derive(Debug, Subcommand)]
pub(crate) enum ConnectorsCommand {
    /// Create or update every connector in connect.dir (idempotent); optionally wait until running.
    Apply {
        /// Only these connectors (default: all definitions).
        names: Vec<String>,
        /// Wait up to this many seconds for each connector and its tasks to run; fail with the trace otherwise.
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
    },
    /// Connector and task states, with the stack trace of failed tasks. Exits 1 if any failed.
    Status {
        /// Only these connectors (default: all definitions).
        names: Vec<String>,
    },
    /// Pause connectors (default: all definitions).
    Pause {
        /// Connector names.
        names: Vec<String>,
    },
    /// Resume connectors (default: all definitions).
    Resume {
        /// Connector names.
        names: Vec<String>,
    },
    /// Restart connectors and their failed tasks (default: all definitions).
    Restart {
        /// Connector names.
        names: Vec<String>,
    },
    /// Keep connectors running: restart failed connectors and tasks with backoff until SIGTERM.
    ///
    /// Kafka Connect does not restart a failed task by itself (a Debezium task that
    /// starts while its database is down stays FAILED); this is the local
    /// equivalent of Strimzi's KafkaConnector autoRestart.
    Supervise {
        /// Connector names (default: all definitions).
        names: Vec<String>,
        /// Seconds between status checks.
        #[arg(long, default_value_t = 5)]
        interval_secs: u64,
        /// Longest wait between restarts of a connector that keeps failing, seconds.
        #[arg(long, default_value_t = 120)]
        max_backoff_secs: u64,
    },
}

fn selected(
    config: &Config,
    names: &[String],
) -> anyhow::Result<Vec<leadscore_connect::Definition>> {
    let defs = leadscore_connect::load_dir(Path::new(&config.connect.dir))?;
    if let Some(unknown) = names.iter().find(|n| !defs.iter().any(|d| &d.name == *n)) {
        anyhow::bail!(
            "no connector `{unknown}` in {} (known: {})",
            config.connect.dir,
            defs.iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(defs
        .into_iter()
        .filter(|d| names.is_empty() || names.contains(&d.name))
        .collect())
}

fn print_status(s: &Status) {
    println!("{:<22} connector {}", s.name, s.connector.state);
    if let Some(trace) = &s.connector.trace {
        println!("  connector trace:\n{}", indent(trace));
    }
    for t in &s.tasks {
        println!(
            "{:<22} task {:<3} {} on {}",
            s.name, t.id, t.state, t.worker_id
        );
        if let Some(trace) = &t.trace {
            println!("  task {} trace:\n{}", t.id, indent(trace));
        }
    }
}

fn indent(trace: &str) -> String {
    trace
        .lines()
        .take(30)
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) async fn run(cmd: ConnectorsCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let client = Client::new(&config.connect)?;
    match cmd {
        ConnectorsCommand::Apply { names, wait_secs } => {
            let defs = selected(config, &names)?;
            for def in &defs {
                let outcome = client
                    .apply(def)
                    .await
                    .with_context(|| format!("applying connector {}", def.name))?;
                let word = match outcome {
                    Applied::Created => "created",
                    Applied::Updated => "updated",
                    Applied::Unchanged => "unchanged",
                };
                println!("{word:<10} {}", def.name);
            }
            if wait_secs > 0 {
                let mut failed = false;
                for def in &defs {
                    let s = client
                        .wait_running(&def.name, Duration::from_secs(wait_secs))
                        .await?;
                    if !s.is_running() {
                        failed = true;
                        print_status(&s);
                    }
                }
                if failed {
                    eprintln!("connectors: not all running after {wait_secs} s");
                    return Ok(ExitCode::FAILURE);
                }
                println!("connectors: {} running", defs.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        ConnectorsCommand::Status { names } => {
            let mut failed = false;
            for def in selected(config, &names)? {
                match client.status(&def.name).await {
                    Ok(s) => {
                        failed |= s.has_failed();
                        print_status(&s);
                    }
                    Err(leadscore_connect::Error::NotFound(n)) => {
                        failed = true;
                        println!("{n:<22} not created (run `leadscore connectors apply`)");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        ConnectorsCommand::Pause { names } => {
            for def in selected(config, &names)? {
                client.pause(&def.name).await?;
                println!("paused     {}", def.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        ConnectorsCommand::Resume { names } => {
            for def in selected(config, &names)? {
                client.resume(&def.name).await?;
                println!("resumed    {}", def.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        ConnectorsCommand::Supervise {
            names,
            interval_secs,
            max_backoff_secs,
        } => {
            let defs = selected(config, &names)?;
            supervise(
                &client,
                &defs,
                Duration::from_secs(interval_secs.max(1)),
                Duration::from_secs(max_backoff_secs.max(1)),
            )
            .await
        }
        ConnectorsCommand::Restart { names } => {
            for def in selected(config, &names)? {
                client.restart_failed(&def.name).await?;
                println!("restarted  {}", def.name);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn supervise(
    client: &Client,
    defs: &[leadscore_connect::Definition],
    interval: Duration,
    max_backoff: Duration,
) -> anyhow::Result<ExitCode> {
    let stop = tokio_util::sync::CancellationToken::new();
    leadscore_runtime::cancel_on_signal(stop.clone());
    // Per connector: when it may be restarted next, and the wait after that.
    let mut backoff: std::collections::HashMap<String, (tokio::time::Instant, Duration)> =
        std::collections::HashMap::new();
    tracing::info!(
        connectors = defs.len(),
        interval_s = interval.as_secs(),
        "supervising connectors"
    );
    loop {
        for def in defs {
            let status = match client.status(&def.name).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(connector = %def.name, error = %e, "status unavailable");
                    continue;
                }
            };
            let now = tokio::time::Instant::now();
            if !status.has_failed() {
                if status.is_running() {
                    backoff.remove(&def.name);
                }
                continue;
            }
            let (next, wait) = backoff.get(&def.name).copied().unwrap_or((now, interval));
            if now < next {
                continue;
            }
            let cause = status
                .tasks
                .iter()
                .filter_map(|t| t.trace.as_deref())
                .chain(status.connector.trace.as_deref())
                .find_map(|t| {
                    t.lines()
                        .find(|l| l.starts_with("Caused by"))
                        .or(t.lines().next())
                })
                .unwrap_or("")
                .to_string();
            match client.restart_failed(&def.name).await {
                Ok(()) => tracing::warn!(
                    connector = %def.name,
                    cause = %cause,
                    next_wait_s = wait.as_secs(),
                    "restarted a failed connector or task"
                ),
                Err(e) => tracing::warn!(connector = %def.name, error = %e, "restart refused"),
            }
            backoff.insert(def.name.clone(), (now + wait, (wait * 2).min(max_backoff)));
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    tracing::info!("connector supervision stopped");
    Ok(ExitCode::SUCCESS)
}
