//! `leadscore topics ...`: reconcile the cluster with topics/.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use leadscore_config::Config;
use leadscore_kafka::TopicAdmin;
use leadscore_topics::{Declarations, Drift, plan};

/// The declarations compiled into the binary, used when no `--file` is given.
const BUILTIN: &str = include_str!("../../../topics/topics.yaml");

#[derive(Debug, Subcommand)]
pub(crate) enum TopicsCommand {
    /// Create missing topics and report drift of existing ones.
    Apply {
        /// Declaration file (default: the topics/topics.yaml built into this binary).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Also repair drift that can be repaired in place (configs, added partitions).
        #[arg(long)]
        fix: bool,
        /// Only print the plan.
        #[arg(long)]
        dry_run: bool,
        /// Exit with status 2 if anything had to change or drift remains.
        #[arg(long)]
        check: bool,
    },
    /// Set a topic's configs by hand (as an operator would), e.g. `retention.ms=60000`; overrides not named return to the broker default.
    SetConfig {
        /// Topic name.
        topic: String,
        /// `key=value` pairs.
        #[arg(required = true)]
        configs: Vec<String>,
    },
    /// Delete topics (asks for --yes).
    Delete {
        /// Really delete.
        #[arg(long)]
        yes: bool,
        /// Topic names.
        #[arg(required = true)]
        topics: Vec<String>,
    },
    /// Print the declarations with defaults applied, as JSON (no cluster needed); what
    /// `apply` creates and what the Helm chart's Strimzi KafkaTopics hold.
    Show {
        /// Declaration file (default: built in).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Print each declared topic and its state on the cluster.
    List {
        /// Declaration file (default: built in).
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

pub(crate) fn load(file: Option<&PathBuf>) -> anyhow::Result<Declarations> {
    match file {
        Some(path) => Ok(Declarations::load(path)?),
        None => Declarations::parse(BUILTIN).context("built-in topics/topics.yaml"),
    }
}

pub(crate) async fn run(cmd: TopicsCommand, config: &Config) -> anyhow::Result<ExitCode> {
    match cmd {
        TopicsCommand::Apply {
            file,
            fix,
            dry_run,
            check,
        } => apply(file.as_ref(), fix, dry_run, check, config).await,
        TopicsCommand::List { file } => list(file.as_ref(), config).await,
        TopicsCommand::Show { file } => {
            let declared = load(file.as_ref())?;
            println!("{}", serde_json::to_string_pretty(&declared.topics)?);
            Ok(ExitCode::SUCCESS)
        }
        TopicsCommand::SetConfig { topic, configs } => {
            let mut map = std::collections::BTreeMap::new();
            for pair in &configs {
                let (k, v) = pair
                    .split_once('=')
                    .with_context(|| format!("`{pair}` is not key=value"))?;
                map.insert(k.to_string(), v.to_string());
            }
            TopicAdmin::new(&config.kafka)?
                .replace_topic_configs(&topic, &map)
                .await?;
            println!("set {} config(s) on {topic}", map.len());
            Ok(ExitCode::SUCCESS)
        }
        TopicsCommand::Delete { yes, topics } => {
            if !yes {
                anyhow::bail!("refusing to delete {} without --yes", topics.join(", "));
            }
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            TopicAdmin::new(&config.kafka)?
                .delete_topics(&names)
                .await?;
            println!("deleted {}", topics.join(", "));
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn apply(
    file: Option<&PathBuf>,
    fix: bool,
    dry_run: bool,
    check: bool,
    config: &Config,
) -> anyhow::Result<ExitCode> {
    let declared = load(file)?;
    let admin = TopicAdmin::new(&config.kafka)?;
    let (brokers, observed) = admin.observe(&declared).await?;
    let plan = plan(&declared, &observed, brokers);
    for note in &plan.notes {
        println!("note: {note}");
    }
    for name in &plan.unchanged {
        println!("ok      {name}");
    }
    for c in &plan.create {
        println!(
            "create  {} (partitions={}, replication={})",
            c.name, c.partitions, c.replication_factor
        );
    }
    for d in &plan.drifted {
        for drift in &d.drifts {
            println!("drift   {}: {drift}", d.name);
        }
    }
    if dry_run {
        println!("dry run: nothing changed");
        return Ok(exit(check && !plan.is_noop()));
    }
    let report = admin.apply(&plan, fix).await?;
    for name in &report.already_existed {
        println!("note: {name} was created concurrently by someone else");
    }
    for name in &report.fixed {
        println!("fixed   {name}");
    }
    let unfixed: Vec<&str> = plan
        .drifted
        .iter()
        .filter(|d| !fix || d.drifts.iter().any(|x| !Drift::fixable(x)))
        .map(|d| d.name.as_str())
        .collect();
    println!(
        "topics: {} ok, {} created, {} drifted{}",
        plan.unchanged.len(),
        report.created.len(),
        plan.drifted.len(),
        if fix {
            format!(", {} fixed", report.fixed.len())
        } else if plan.drifted.is_empty() {
            String::new()
        } else {
            " (rerun with --fix to repair)".to_string()
        }
    );
    if plan.is_noop() {
        println!("nothing to change");
    }
    Ok(exit(check && (!plan.is_noop() || !unfixed.is_empty())))
}

fn exit(changed: bool) -> ExitCode {
    if changed {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

async fn list(file: Option<&PathBuf>, config: &Config) -> anyhow::Result<ExitCode> {
    let declared = load(file)?;
    let admin = TopicAdmin::new(&config.kafka)?;
    let (brokers, observed) = admin.observe(&declared).await?;
    println!("{brokers} broker(s) at {}", config.kafka.bootstrap_servers);
    for spec in &declared.topics {
        match observed.iter().find(|o| o.name == spec.name) {
            Some(o) => {
                let cleanup = o
                    .configs
                    .get("cleanup.policy")
                    .map(|(v, _)| v.as_str())
                    .unwrap_or("?");
                println!(
                    "{:<32} partitions={:<3} replication={} cleanup={}",
                    spec.name, o.partitions, o.replication_factor, cleanup
                );
            }
            None => println!("{:<32} MISSING (run `leadscore topics apply`)", spec.name),
        }
    }
    Ok(ExitCode::SUCCESS)
}
