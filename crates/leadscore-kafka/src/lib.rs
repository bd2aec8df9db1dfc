//! Kafka adapter: client configuration from [`KafkaConfig`] and topic administration.
//!
//! Owns: turning configuration into librdkafka settings, describing the
//! declared topics as they exist on a cluster, and executing a
//! [`leadscore_topics::Plan`]. The decision of what to change is made by the
//! pure `leadscore-topics` crate; this crate only talks to the brokers.

pub mod latest;
pub mod processor;
pub mod txn;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use leadscore_config::KafkaConfig;
use leadscore_topics::{ConfigOrigin, Creation, Declarations, ObservedTopic, Plan, TopicDrift};
use rdkafka::ClientConfig;
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, ConfigSource, NewPartitions, NewTopic,
    ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

/// Errors raised by the Kafka adapter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A client could not be created from the configuration.
    #[error("cannot create a Kafka client for {bootstrap}: {source}")]
    Client {
        /// Bootstrap servers used.
        bootstrap: String,
        /// librdkafka error.
        source: KafkaError,
    },
    /// Cluster metadata could not be fetched.
    #[error(
        "cannot read cluster metadata from {bootstrap} (is Kafka up? try deploy/local/stack status): {source}"
    )]
    Metadata {
        /// Bootstrap servers used.
        bootstrap: String,
        /// librdkafka error.
        source: KafkaError,
    },
    /// An admin request failed as a whole.
    #[error("{action} failed: {source}")]
    Admin {
        /// What was attempted.
        action: String,
        /// librdkafka error.
        source: KafkaError,
    },
    /// An admin request failed for one topic.
    #[error("{action} failed for topic {topic}: {code}")]
    Topic {
        /// What was attempted.
        action: &'static str,
        /// Topic concerned.
        topic: String,
        /// Broker error code.
        code: RDKafkaErrorCode,
    },
    /// A blocking metadata task panicked or was cancelled, or a read did not finish in time.
    #[error("metadata task did not complete: {0}")]
    Join(String),
    /// A topic the caller needs does not exist.
    #[error("topic {0} does not exist; run `leadscore topics apply`")]
    Missing(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The partition ids of `topic`; [`Error::Missing`] when it does not exist. Blocking.
pub fn partitions<C: rdkafka::consumer::ConsumerContext, T: rdkafka::consumer::Consumer<C>>(
    consumer: &T,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| Error::Admin {
            action: format!("metadata of {topic}"),
            source,
        })?;
    let ids: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if ids.is_empty() {
        return Err(Error::Missing(topic.to_string()));
    }
    Ok(ids)
}

/// librdkafka settings common to every client built from `config`.
pub fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.bootstrap_servers)
        .set("security.protocol", config.security_protocol.to_lowercase())
        .set("socket.timeout.ms", config.request_timeout_ms.to_string());
    if let Some(m) = &config.sasl_mechanism {
        c.set("sasl.mechanism", m);
    }
    if let Some(u) = &config.sasl_username {
        c.set("sasl.username", u);
    }
    if let Some(p) = &config.sasl_password {
        c.set("sasl.password", p);
    }
    for (key, value) in [
        ("ssl.ca.location", &config.ssl_ca_location),
        ("ssl.certificate.location", &config.ssl_certificate_location),
        ("ssl.key.location", &config.ssl_key_location),
        ("ssl.key.password", &config.ssl_key_password),
        ("debug", &config.debug),
    ] {
        if let Some(v) = value {
            c.set(key, v);
        }
    }
    c
}

/// Where a [`follower_config`] consumer starts when its group has no offsets (always: it never commits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The topic's beginning (replay, e.g. a compacted state topic).
    Earliest,
    /// New records only.
    Latest,
}

/// A consumer that follows topics without ever committing: read_committed,
/// a group of its own `group-<random id>` (so every replica and every restart
/// reads everything; a process id would be 1 in every container), starting at `start`.
pub fn follower_config(config: &KafkaConfig, group: &str, start: Start) -> ClientConfig {
    let mut c = client_config(config);
    c.set(
        "group.id",
        format!("{group}-{}", uuid::Uuid::new_v4().simple()),
    )
    .set("enable.auto.commit", "false")
    .set(
        "auto.offset.reset",
        match start {
            Start::Earliest => "earliest",
            Start::Latest => "latest",
        },
    )
    .set("isolation.level", "read_committed");
    c
}

/// Topic administration against one cluster.
pub struct TopicAdmin {
    admin: Arc<AdminClient<DefaultClientContext>>,
    bootstrap: String,
    timeout: Duration,
}

/// What executing a plan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Topics created.
    pub created: Vec<String>,
    /// Topics whose drift was repaired.
    pub fixed: Vec<String>,
    /// Topics found already there when creating (another apply raced us).
    pub already_existed: Vec<String>,
}

impl TopicAdmin {
    /// Builds an admin client; connects lazily.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        let admin = client_config(config)
            .create()
            .map_err(|source| Error::Client {
                bootstrap: config.bootstrap_servers.clone(),
                source,
            })?;
        Ok(Self {
            admin: Arc::new(admin),
            bootstrap: config.bootstrap_servers.clone(),
            timeout: Duration::from_millis(config.request_timeout_ms),
        })
    }

    fn opts(&self) -> AdminOptions {
        AdminOptions::new().request_timeout(Some(self.timeout))
    }

    /// Number of brokers and the partition/replica layout of every topic.
    pub async fn cluster(&self) -> Result<(i32, BTreeMap<String, (i32, i32)>)> {
        let admin = Arc::clone(&self.admin);
        let timeout = self.timeout;
        // fetch_metadata blocks; keep it off the async worker threads.
        let metadata =
            tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, timeout))
                .await
                .map_err(|e| Error::Join(e.to_string()))?
                .map_err(|source| Error::Metadata {
                    bootstrap: self.bootstrap.clone(),
                    source,
                })?;
        let brokers = i32::try_from(metadata.brokers().len()).unwrap_or(i32::MAX);
        let topics = metadata
            .topics()
            .iter()
            .map(|t| {
                let partitions = i32::try_from(t.partitions().len()).unwrap_or(i32::MAX);
                let rf = t
                    .partitions()
                    .first()
                    .map(|p| i32::try_from(p.replicas().len()).unwrap_or(i32::MAX))
                    .unwrap_or(0);
                (t.name().to_string(), (partitions, rf))
            })
            .collect();
        Ok((brokers, topics))
    }

    /// Describes the declared topics that exist, and the broker count.
    pub async fn observe(&self, declared: &Declarations) -> Result<(i32, Vec<ObservedTopic>)> {
        let (brokers, layout) = self.cluster().await?;
        let present: Vec<&str> = declared
            .topics
            .iter()
            .map(|t| t.name.as_str())
            .filter(|n| layout.contains_key(*n))
            .collect();
        if present.is_empty() {
            return Ok((brokers, Vec::new()));
        }
        let specs: Vec<ResourceSpecifier<'_>> = present
            .iter()
            .map(|n| ResourceSpecifier::Topic(n))
            .collect();
        let results = self
            .admin
            .describe_configs(specs.iter(), &self.opts())
            .await
            .map_err(|source| Error::Admin {
                action: "describe topic configs".into(),
                source,
            })?;
        let mut observed = Vec::with_capacity(present.len());
        for (name, result) in present.iter().zip(results) {
            let resource = result.map_err(|code| Error::Topic {
                action: "describe configs",
                topic: (*name).to_string(),
                code,
            })?;
            let configs = resource
                .entries
                .into_iter()
                .filter_map(|e| {
                    let origin = if e.source == ConfigSource::DynamicTopic {
                        ConfigOrigin::Topic
                    } else {
                        ConfigOrigin::Inherited
                    };
                    e.value.map(|v| (e.name, (v, origin)))
                })
                .collect();
            let (partitions, replication_factor) = layout.get(*name).copied().unwrap_or((0, 0));
            observed.push(ObservedTopic {
                name: (*name).to_string(),
                partitions,
                replication_factor,
                configs,
            });
        }
        Ok((brokers, observed))
    }

    /// The smallest `max.message.bytes` of `topics` as the cluster has them: the largest record
    /// a producer writing to all of them may send. A topic that does not exist is an error.
    pub async fn max_message_bytes(&self, topics: &[&str]) -> Result<usize> {
        let specs: Vec<ResourceSpecifier<'_>> =
            topics.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
        let results = self
            .admin
            .describe_configs(specs.iter(), &self.opts())
            .await
            .map_err(|source| Error::Admin {
                action: "describe topic configs".into(),
                source,
            })?;
        let mut smallest = usize::MAX;
        for (name, result) in topics.iter().zip(results) {
            let resource = result.map_err(|code| Error::Topic {
                action: "describe configs",
                topic: (*name).to_string(),
                code,
            })?;
            let value = resource
                .entries
                .into_iter()
                .find(|e| e.name == "max.message.bytes")
                .and_then(|e| e.value)
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| Error::Missing((*name).to_string()))?;
            smallest = smallest.min(value);
        }
        Ok(smallest)
    }

    /// Creates the plan's missing topics and, if `fix`, repairs fixable drift.
    pub async fn apply(&self, plan: &Plan, fix: bool) -> Result<ApplyReport> {
        let mut report = ApplyReport::default();
        if !plan.create.is_empty() {
            let new: Vec<NewTopic<'_>> = plan.create.iter().map(new_topic).collect();
            let results = self
                .admin
                .create_topics(new.iter(), &self.opts())
                .await
                .map_err(|source| Error::Admin {
                    action: "create topics".into(),
                    source,
                })?;
            for r in results {
                match r {
                    Ok(name) => report.created.push(name),
                    Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                        report.already_existed.push(name)
                    }
                    Err((topic, code)) => {
                        return Err(Error::Topic {
                            action: "create",
                            topic,
                            code,
                        });
                    }
                }
            }
        }
        if fix {
            for drift in &plan.drifted {
                if self.fix(drift).await? {
                    report.fixed.push(drift.name.clone());
                }
            }
        }
        Ok(report)
    }

    async fn fix(&self, drift: &TopicDrift) -> Result<bool> {
        use leadscore_topics::Drift;
        let mut changed = false;
        if drift
            .drifts
            .iter()
            .any(|d| matches!(d, Drift::Config { .. } | Drift::Undeclared { .. }))
        {
            // Exactly the declared set, which also removes undeclared overrides.
            self.replace_topic_configs(&drift.name, &drift.desired.configs)
                .await?;
            changed = true;
        }
        if drift
            .drifts
            .iter()
            .any(|d| matches!(d, Drift::TooFewPartitions { .. }))
        {
            let count = usize::try_from(drift.desired.partitions).unwrap_or(1);
            let np = NewPartitions::new(&drift.name, count);
            let results = self
                .admin
                .create_partitions([&np], &self.opts())
                .await
                .map_err(|source| Error::Admin {
                    action: format!("add partitions to {}", drift.name),
                    source,
                })?;
            for r in results {
                r.map_err(|(topic, code)| Error::Topic {
                    action: "add partitions",
                    topic,
                    code,
                })?;
            }
            changed = true;
        }
        Ok(changed)
    }

    /// Replaces the topic's dynamic configs with `configs` (AlterConfigs is not
    /// incremental: overrides not named here return to the broker default).
    pub async fn replace_topic_configs(
        &self,
        topic: &str,
        configs: &BTreeMap<String, String>,
    ) -> Result<()> {
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(topic));
        for (k, v) in configs {
            alter = alter.set(k, v);
        }
        let results = self
            .admin
            .alter_configs([&alter], &self.opts())
            .await
            .map_err(|source| Error::Admin {
                action: format!("alter configs of {topic}"),
                source,
            })?;
        for r in results {
            r.map_err(|(_, code)| Error::Topic {
                action: "alter configs",
                topic: topic.to_string(),
                code,
            })?;
        }
        Ok(())
    }

    /// Deletes topics (tests and teardown only).
    pub async fn delete_topics(&self, names: &[&str]) -> Result<()> {
        let results = self
            .admin
            .delete_topics(names, &self.opts())
            .await
            .map_err(|source| Error::Admin {
                action: "delete topics".into(),
                source,
            })?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => {
                    return Err(Error::Topic {
                        action: "delete",
                        topic,
                        code,
                    });
                }
            }
        }
        Ok(())
    }
}

fn new_topic(c: &Creation) -> NewTopic<'_> {
    let mut t = NewTopic::new(
        &c.name,
        c.partitions,
        TopicReplication::Fixed(c.replication_factor),
    );
    for (k, v) in &c.configs {
        t = t.set(k, v);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_never_commit_read_committed_data_in_their_own_group() {
        let config = KafkaConfig {
            security_protocol: "SASL_SSL".into(),
            ..KafkaConfig::default()
        };
        let c = follower_config(&config, "watch", Start::Latest);
        let group = c.get("group.id").unwrap_or_default().to_string();
        assert!(
            group.starts_with("watch-") && group.len() > "watch-".len() + 16,
            "{group}"
        );
        // Two replicas (same process id in their containers) never share a group.
        let other = follower_config(&config, "watch", Start::Latest);
        assert_ne!(other.get("group.id"), Some(group.as_str()));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("isolation.level"), Some("read_committed"));
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        let c = follower_config(&config, "replay", Start::Earliest);
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
    }

    #[test]
    fn sasl_settings_reach_librdkafka() {
        let config = KafkaConfig {
            security_protocol: "SASL_SSL".into(),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("svc".into()),
            sasl_password: Some("secret".into()),
            ssl_ca_location: Some("/etc/kafka/ca.pem".into()),
            ..KafkaConfig::default()
        };
        let c = client_config(&config);
        assert_eq!(c.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(c.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(c.get("sasl.username"), Some("svc"));
        assert_eq!(c.get("bootstrap.servers"), Some("localhost:9092"));
        assert_eq!(c.get("ssl.ca.location"), Some("/etc/kafka/ca.pem"));
        assert_eq!(c.get("ssl.key.location"), None);
    }
}
