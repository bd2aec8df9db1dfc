//! `leadscore schemas ...`: register schemas/ in the registry under TopicNameStrategy subjects.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use leadscore_config::Config;
use leadscore_registry::Registry;

/// Compatibility every value subject is held to.
const COMPATIBILITY: &str = "BACKWARD";

#[derive(Debug, Subcommand)]
pub(crate) enum SchemasCommand {
    /// Set BACKWARD compatibility and register each topic's value schema (idempotent).
    Register {
        /// Topic declaration file naming each topic's schema (default: built in).
        #[arg(long)]
        topics: Option<PathBuf>,
    },
    /// Check each topic's schema against the registry without registering.
    Check {
        /// Topic declaration file (default: built in).
        #[arg(long)]
        topics: Option<PathBuf>,
    },
}

pub(crate) async fn run(cmd: SchemasCommand, config: &Config) -> anyhow::Result<ExitCode> {
    let registry = Registry::new(&config.registry)?;
    match cmd {
        SchemasCommand::Register { topics } => register(&registry, topics.as_ref()).await,
        SchemasCommand::Check { topics } => check(&registry, topics.as_ref()).await,
    }
}

/// (subject, schema file) for every declared topic that has an Avro value.
fn subjects(
    topics: Option<&PathBuf>,
) -> anyhow::Result<Vec<(String, &'static leadscore_schemas::SchemaFile)>> {
    let declared = crate::topics::load(topics)?;
    let mut out = Vec::new();
    for t in &declared.topics {
        if let Some(file) = &t.value_schema {
            let schema = leadscore_schemas::find(file)
                .map_err(|e| anyhow::anyhow!("topic {}: {e}", t.name))?;
            schema.parse()?;
            out.push((leadscore_schemas::value_subject(&t.name), schema));
        }
    }
    Ok(out)
}

async fn register(registry: &Registry, topics: Option<&PathBuf>) -> anyhow::Result<ExitCode> {
    let mut failed = 0usize;
    let subjects = subjects(topics)?;
    for (subject, schema) in &subjects {
        let result = async {
            let existed = registry.lookup(subject, schema.text).await?;
            registry.set_compatibility(subject, COMPATIBILITY).await?;
            let id = registry.register(subject, schema.text).await?;
            Ok::<_, leadscore_registry::Error>((existed.is_some(), id))
        }
        .await;
        match result {
            Ok((true, id)) => println!("ok          {subject} (id {id}, {})", schema.file),
            Ok((false, id)) => println!("registered  {subject} (id {id}, {})", schema.file),
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    println!(
        "schemas: {} subjects, {} failed, compatibility {COMPATIBILITY} at {}",
        subjects.len(),
        failed,
        registry.url()
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn check(registry: &Registry, topics: Option<&PathBuf>) -> anyhow::Result<ExitCode> {
    let mut incompatible = 0usize;
    for (subject, schema) in subjects(topics)? {
        match registry.check(&subject, schema.text).await? {
            Ok(()) => println!("compatible    {subject}"),
            Err(why) => {
                incompatible += 1;
                println!("INCOMPATIBLE  {subject}: {why}");
            }
        }
    }
    Ok(if incompatible == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
