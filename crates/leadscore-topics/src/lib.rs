//! Topic declarations and reconciliation plans.
//!
//! Owns the format of `topics/topics.yaml` and the pure decision of what to
//! do about a cluster: which topics to create, with what effective
//! replication, and which existing topics have drifted from their
//! declaration. It performs no I/O on Kafka: the caller describes the cluster
//! as [`ObservedTopic`]s and executes the returned [`Plan`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors raised while reading declarations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The declaration file could not be read.
    #[error("cannot read topic declarations {path}: {source}")]
    Read {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The declaration file is not valid YAML of the expected shape.
    #[error("topic declarations {path} are malformed: {source}")]
    Parse {
        /// File that failed.
        path: String,
        /// Underlying error, with line and column.
        source: yaml_serde::Error,
    },
    /// A declaration parsed but cannot be applied.
    #[error("topic `{topic}` is declared wrongly: {reason}")]
    Invalid {
        /// Topic name as declared.
        topic: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    defaults: Defaults,
    topics: Vec<RawTopic>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    #[serde(default = "default_partitions")]
    partitions: i32,
    #[serde(default = "default_replication")]
    replication_factor: i32,
    #[serde(default)]
    configs: BTreeMap<String, String>,
}

impl Default for Defaults {
    fn default() -> Self {
        Self {
            partitions: default_partitions(),
            replication_factor: default_replication(),
            configs: BTreeMap::new(),
        }
    }
}

fn default_partitions() -> i32 {
    12
}

fn default_replication() -> i32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    value_schema: Option<String>,
    partitions: Option<i32>,
    replication_factor: Option<i32>,
    #[serde(default)]
    configs: BTreeMap<String, String>,
}

/// One declared topic, defaults applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicSpec {
    /// Topic name.
    pub name: String,
    /// What the topic carries, for people.
    pub description: String,
    /// File under `schemas/` registered as `<name>-value`, if the value is Avro.
    pub value_schema: Option<String>,
    /// Partition count.
    pub partitions: i32,
    /// Production replication factor (capped at the broker count when applied).
    pub replication_factor: i32,
    /// Topic configs (`cleanup.policy`, `retention.ms`, ...).
    pub configs: BTreeMap<String, String>,
}

/// All declared topics, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declarations {
    /// The topics.
    pub topics: Vec<TopicSpec>,
}

/// Kafka's legal topic-name characters and length.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err("name must be 1 to 249 characters".into());
    }
    if name == "." || name == ".." {
        return Err("name cannot be `.` or `..`".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "character `{bad}` is not allowed (use a-z, 0-9, `.`, `_`, `-`)"
        ));
    }
    Ok(())
}

impl Declarations {
    /// Reads and validates a declaration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            Error::Parse { source, .. } => Error::Parse {
                path: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Parses and validates declarations from YAML text.
    pub fn parse(text: &str) -> Result<Self> {
        let file: File = yaml_serde::from_str(text).map_err(|source| Error::Parse {
            path: "<text>".into(),
            source,
        })?;
        let mut seen = BTreeSet::new();
        let mut topics = Vec::with_capacity(file.topics.len());
        for raw in file.topics {
            let invalid = |reason: String| Error::Invalid {
                topic: raw.name.clone(),
                reason,
            };
            check_name(&raw.name).map_err(invalid)?;
            if !seen.insert(raw.name.clone()) {
                return Err(invalid("declared twice".into()));
            }
            let partitions = raw.partitions.unwrap_or(file.defaults.partitions);
            if partitions < 1 {
                return Err(invalid(format!(
                    "partitions must be >= 1, got {partitions}"
                )));
            }
            let replication_factor = raw
                .replication_factor
                .unwrap_or(file.defaults.replication_factor);
            if replication_factor < 1 {
                return Err(invalid(format!(
                    "replication_factor must be >= 1, got {replication_factor}"
                )));
            }
            let mut configs = file.defaults.configs.clone();
            configs.extend(raw.configs);
            topics.push(TopicSpec {
                name: raw.name,
                description: raw.description,
                value_schema: raw.value_schema,
                partitions,
                replication_factor,
                configs,
            });
        }
        Ok(Self { topics })
    }

    /// The declaration of `name`, if any.
    pub fn get(&self, name: &str) -> Option<&TopicSpec> {
        self.topics.iter().find(|t| t.name == name)
    }
}

/// Where an observed config value comes from, as the broker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigOrigin {
    /// Set on the topic itself.
    Topic,
    /// Inherited from broker configuration or Kafka's default.
    Inherited,
}

/// A topic as it exists on the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedTopic {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Replication factor of partition 0.
    pub replication_factor: i32,
    /// Every config the broker reported, with its origin.
    pub configs: BTreeMap<String, (String, ConfigOrigin)>,
}

/// A topic to create, with the values that fit the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Creation {
    /// Topic name.
    pub name: String,
    /// Partition count.
    pub partitions: i32,
    /// Effective replication factor.
    pub replication_factor: i32,
    /// Effective configs.
    pub configs: BTreeMap<String, String>,
}

/// One way an existing topic differs from its declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A declared config has another value on the cluster (`actual` is `None`
    /// when the broker did not report the key at all).
    Config {
        /// Config key.
        key: String,
        /// Declared (effective) value.
        declared: String,
        /// Value on the cluster.
        actual: Option<String>,
    },
    /// A config is set on the topic but not declared.
    Undeclared {
        /// Config key.
        key: String,
        /// Value on the cluster.
        actual: String,
    },
    /// Fewer partitions than declared (fixable: partitions can be added).
    TooFewPartitions {
        /// Declared count.
        declared: i32,
        /// Count on the cluster.
        actual: i32,
    },
    /// More partitions than declared (not fixable: Kafka cannot remove partitions).
    TooManyPartitions {
        /// Declared count.
        declared: i32,
        /// Count on the cluster.
        actual: i32,
    },
    /// Replication differs from the effective declared value (needs a reassignment).
    Replication {
        /// Effective declared factor.
        declared: i32,
        /// Factor on the cluster.
        actual: i32,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::Config {
                key,
                declared,
                actual: Some(actual),
            } => write!(f, "config {key}: declared {declared}, cluster has {actual}"),
            Drift::Config {
                key,
                declared,
                actual: None,
            } => write!(
                f,
                "config {key}: declared {declared}, cluster does not report it"
            ),
            Drift::Undeclared { key, actual } => {
                write!(
                    f,
                    "config {key}={actual} is set on the topic but not declared"
                )
            }
            Drift::TooFewPartitions { declared, actual } => write!(
                f,
                "partitions: declared {declared}, cluster has {actual} (fixable with --fix)"
            ),
            Drift::TooManyPartitions { declared, actual } => write!(
                f,
                "partitions: declared {declared}, cluster has {actual} (Kafka cannot remove partitions; recreate the topic or raise the declaration)"
            ),
            Drift::Replication { declared, actual } => write!(
                f,
                "replication factor: declared {declared} (effective), cluster has {actual} (needs a partition reassignment)"
            ),
        }
    }
}

impl Drift {
    /// Whether `topics apply --fix` can repair this drift in place.
    pub fn fixable(&self) -> bool {
        matches!(
            self,
            Drift::Config { .. } | Drift::Undeclared { .. } | Drift::TooFewPartitions { .. }
        )
    }
}

/// An existing topic that differs from its declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDrift {
    /// Topic name.
    pub name: String,
    /// Effective declared state, for fixing.
    pub desired: Creation,
    /// Every difference found.
    pub drifts: Vec<Drift>,
}

/// What reconciling declarations with a cluster takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Topics to create.
    pub create: Vec<Creation>,
    /// Existing topics that match.
    pub unchanged: Vec<String>,
    /// Existing topics that differ.
    pub drifted: Vec<TopicDrift>,
    /// Notes for the operator, such as replication capped at the broker count.
    pub notes: Vec<String>,
}

impl Plan {
    /// True when there is nothing to create and no drift.
    pub fn is_noop(&self) -> bool {
        self.create.is_empty() && self.drifted.is_empty()
    }
}

/// The declared topic fitted to a cluster of `brokers` brokers.
pub fn effective(spec: &TopicSpec, brokers: i32, notes: &mut Vec<String>) -> Creation {
    let brokers = brokers.max(1);
    let replication_factor = spec.replication_factor.min(brokers);
    if replication_factor < spec.replication_factor {
        notes.push(format!(
            "{}: replication factor {} capped at {} (the cluster has {} broker{})",
            spec.name,
            spec.replication_factor,
            replication_factor,
            brokers,
            if brokers == 1 { "" } else { "s" }
        ));
    }
    let mut configs = spec.configs.clone();
    if let Some(isr) = configs.get("min.insync.replicas")
        && isr.parse::<i32>().is_ok_and(|isr| isr > replication_factor)
    {
        notes.push(format!(
            "{}: min.insync.replicas {isr} capped at {replication_factor} to match replication",
            spec.name
        ));
        configs.insert("min.insync.replicas".into(), replication_factor.to_string());
    }
    Creation {
        name: spec.name.clone(),
        partitions: spec.partitions,
        replication_factor,
        configs,
    }
}

/// Decides what to do about `observed` to match `declared` on a cluster of `brokers` brokers.
///
/// Topics on the cluster that are not declared are ignored: the cluster is
/// shared and other owners' topics are not ours to judge.
pub fn plan(declared: &Declarations, observed: &[ObservedTopic], brokers: i32) -> Plan {
    let mut out = Plan::default();
    for spec in &declared.topics {
        let desired = effective(spec, brokers, &mut out.notes);
        let Some(actual) = observed.iter().find(|o| o.name == spec.name) else {
            out.create.push(desired);
            continue;
        };
        let drifts = diff(&desired, actual);
        if drifts.is_empty() {
            out.unchanged.push(spec.name.clone());
        } else {
            out.drifted.push(TopicDrift {
                name: spec.name.clone(),
                desired,
                drifts,
            });
        }
    }
    summarise_caps(&mut out.notes, brokers);
    out
}

/// One line instead of two per topic when the whole set is capped (a dev cluster).
fn summarise_caps(notes: &mut Vec<String>, brokers: i32) {
    if notes.len() <= 2 {
        return;
    }
    let capped = notes
        .iter()
        .filter(|n| n.contains("replication factor"))
        .count();
    let brokers = brokers.max(1);
    *notes = vec![format!(
        "replication factor capped at {brokers} on {capped} topic(s), min.insync.replicas lowered to match (the cluster has {brokers} broker{})",
        if brokers == 1 { "" } else { "s" }
    )];
}

fn diff(desired: &Creation, actual: &ObservedTopic) -> Vec<Drift> {
    let mut drifts = Vec::new();
    if actual.partitions < desired.partitions {
        drifts.push(Drift::TooFewPartitions {
            declared: desired.partitions,
            actual: actual.partitions,
        });
    } else if actual.partitions > desired.partitions {
        drifts.push(Drift::TooManyPartitions {
            declared: desired.partitions,
            actual: actual.partitions,
        });
    }
    if actual.replication_factor != desired.replication_factor {
        drifts.push(Drift::Replication {
            declared: desired.replication_factor,
            actual: actual.replication_factor,
        });
    }
    for (key, value) in &desired.configs {
        match actual.configs.get(key) {
            Some((v, _)) if v == value => {}
            Some((v, _)) => drifts.push(Drift::Config {
                key: key.clone(),
                declared: value.clone(),
                actual: Some(v.clone()),
            }),
            None => drifts.push(Drift::Config {
                key: key.clone(),
                declared: value.clone(),
                actual: None,
            }),
        }
    }
    for (key, (value, origin)) in &actual.configs {
        if *origin == ConfigOrigin::Topic && !desired.configs.contains_key(key) {
            drifts.push(Drift::Undeclared {
                key: key.clone(),
                actual: value.clone(),
            });
        }
    }
    drifts
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
defaults:
  partitions: 12
  replication_factor: 3
  configs:
    min.insync.replicas: "2"
topics:
  - name: a.scores
    configs:
      cleanup.policy: compact
  - name: b.metrics
    partitions: 3
    configs:
      retention.ms: "1000"
"#;

    fn observed(c: &Creation) -> ObservedTopic {
        ObservedTopic {
            name: c.name.clone(),
            partitions: c.partitions,
            replication_factor: c.replication_factor,
            configs: c
                .configs
                .iter()
                .map(|(k, v)| (k.clone(), (v.clone(), ConfigOrigin::Topic)))
                .chain([(
                    "segment.bytes".to_string(),
                    ("1073741824".to_string(), ConfigOrigin::Inherited),
                )])
                .collect(),
        }
    }

    fn decl() -> Declarations {
        Declarations::parse(YAML).unwrap_or_else(|e| panic!("fixture parses: {e}"))
    }

    #[test]
    fn defaults_merge_under_topic_values() {
        let d = decl();
        let b = d.get("b.metrics").unwrap_or_else(|| panic!("declared"));
        assert_eq!(b.partitions, 3);
        assert_eq!(b.replication_factor, 3);
        assert_eq!(
            b.configs.get("min.insync.replicas").map(String::as_str),
            Some("2")
        );
        assert_eq!(
            b.configs.get("retention.ms").map(String::as_str),
            Some("1000")
        );
    }

    #[test]
    fn single_broker_caps_replication_and_isr_with_notes() {
        let p = plan(&decl(), &[], 1);
        assert_eq!(p.create.len(), 2);
        for c in &p.create {
            assert_eq!(c.replication_factor, 1);
            assert_eq!(
                c.configs.get("min.insync.replicas").map(String::as_str),
                Some("1")
            );
        }
        assert!(
            p.notes.iter().any(|n| n.contains("capped at 1")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn applying_the_plan_makes_the_next_plan_a_noop() {
        let d = decl();
        let first = plan(&d, &[], 1);
        let cluster: Vec<_> = first.create.iter().map(observed).collect();
        let second = plan(&d, &cluster, 1);
        assert!(second.is_noop(), "{second:?}");
        assert_eq!(second.unchanged, vec!["a.scores", "b.metrics"]);
    }

    #[test]
    fn hand_changed_config_is_drift_and_inherited_defaults_are_not() {
        let d = decl();
        let mut cluster: Vec<_> = plan(&d, &[], 1).create.iter().map(observed).collect();
        cluster[1]
            .configs
            .insert("retention.ms".into(), ("5".into(), ConfigOrigin::Topic));
        cluster[0].configs.insert(
            "max.message.bytes".into(),
            ("10".into(), ConfigOrigin::Topic),
        );
        let p = plan(&d, &cluster, 1);
        assert_eq!(p.drifted.len(), 2);
        let b = &p
            .drifted
            .iter()
            .find(|t| t.name == "b.metrics")
            .unwrap_or_else(|| panic!());
        assert_eq!(
            b.drifts,
            vec![Drift::Config {
                key: "retention.ms".into(),
                declared: "1000".into(),
                actual: Some("5".into())
            }]
        );
        let a = &p
            .drifted
            .iter()
            .find(|t| t.name == "a.scores")
            .unwrap_or_else(|| panic!());
        assert!(
            matches!(&a.drifts[..], [Drift::Undeclared { key, .. }] if key == "max.message.bytes")
        );
    }

    #[test]
    fn partition_drift_says_whether_it_can_be_fixed() {
        let d = decl();
        let mut cluster: Vec<_> = plan(&d, &[], 1).create.iter().map(observed).collect();
        cluster[0].partitions = 6;
        cluster[1].partitions = 24;
        let p = plan(&d, &cluster, 1);
        let fixable: Vec<bool> = p.drifted.iter().map(|t| t.drifts[0].fixable()).collect();
        assert_eq!(fixable, vec![true, false]);
    }

    #[test]
    fn bad_declarations_name_the_topic() {
        let dup = "topics:\n  - name: x\n  - name: x\n";
        assert!(
            matches!(Declarations::parse(dup), Err(Error::Invalid { topic, .. }) if topic == "x")
        );
        let bad = "topics:\n  - name: \"a b\"\n";
        let err = Declarations::parse(bad)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("`a b`") && err.contains("` `"), "{err}");
        let zero = "topics:\n  - name: z\n    partitions: 0\n";
        assert!(matches!(
            Declarations::parse(zero),
            Err(Error::Invalid { .. })
        ));
        let typo = "topics:\n  - name: z\n    partition: 3\n";
        assert!(matches!(
            Declarations::parse(typo),
            Err(Error::Parse { .. })
        ));
    }

    #[test]
    fn repository_declarations_are_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../topics/topics.yaml");
        let d = Declarations::load(&path).unwrap_or_else(|e| panic!("{e}"));
        for name in [
            "crm.public.leads",
            "leads.scores.v1",
            "leads.scores.shadow.v1",
            "leads.scores.dlq.v1",
            "leadscore.metrics.v1",
            "leadscore.alerts.v1",
            "leadscore.retrain.requests.v1",
            "leadscore.model.lifecycle.v1",
        ] {
            assert!(d.get(name).is_some(), "{name} is not declared");
        }
        let scores = d.get("leads.scores.v1").unwrap_or_else(|| panic!());
        assert_eq!(
            scores.configs.get("cleanup.policy").map(String::as_str),
            Some("compact")
        );
    }

    proptest::proptest! {
        #[test]
        fn effective_replication_never_exceeds_brokers(rf in 1i32..10, brokers in 0i32..10, isr in 1i32..10) {
            let spec = TopicSpec {
                name: "t".into(), description: String::new(), value_schema: None,
                partitions: 1, replication_factor: rf,
                configs: [("min.insync.replicas".to_string(), isr.to_string())].into(),
            };
            let c = effective(&spec, brokers, &mut Vec::new());
            proptest::prop_assert!(c.replication_factor <= brokers.max(1));
            proptest::prop_assert!(c.replication_factor >= 1);
            let isr_eff: i32 = c.configs["min.insync.replicas"].parse().unwrap_or(0);
            proptest::prop_assert!(isr_eff <= c.replication_factor);
        }
    }
}
