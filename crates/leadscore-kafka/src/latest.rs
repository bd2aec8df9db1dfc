//! Reading the latest committed value of every key of a (compacted) topic:
//! how services restore the checkpoints they write there.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use leadscore_config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::{Error, Result, client_config};

/// A stored value with where it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Value bytes.
    pub value: Vec<u8>,
}

fn admin(action: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    let action = action.into();
    move |source| Error::Admin { action, source }
}

/// The latest committed (read_committed) value of every key starting with
/// `prefix` in `topic`; a tombstone removes its key. Blocking; reads to the
/// end of every partition as it was when called.
pub fn read_latest(
    config: &KafkaConfig,
    topic: &str,
    prefix: &str,
    timeout: Duration,
) -> Result<HashMap<String, Stored>> {
    let consumer: BaseConsumer = client_config(config)
        .set(
            "group.id",
            format!("leadscore-restore-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|source| Error::Client {
            bootstrap: config.bootstrap_servers.clone(),
            source,
        })?;
    let partitions = crate::partitions(&consumer, topic, timeout)?;
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, *p, timeout)
            .map_err(admin(format!("watermarks of {topic}/{p}")))?;
        if high > low {
            ends.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Beginning)
                .map_err(admin("assignment"))?;
        }
    }
    let mut latest = HashMap::new();
    if ends.is_empty() {
        return Ok(latest);
    }
    consumer
        .assign(&tpl)
        .map_err(admin(format!("assigning {topic}")))?;
    let deadline = Instant::now() + timeout * 4;
    while !ends.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Join(format!(
                "reading {topic} to its end took longer than {:?}",
                timeout * 4
            )));
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            // read_committed stops before trailing transaction markers: compare positions.
            if let Ok(pos) = consumer.position() {
                ends.retain(|p, end| {
                    !matches!(
                        pos.find_partition(topic, *p).map(|e| e.offset()),
                        Some(Offset::Offset(o)) if o >= *end
                    )
                });
            }
            continue;
        };
        let msg = msg.map_err(admin(format!("reading {topic}")))?;
        if let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok())
            && key.starts_with(prefix)
        {
            match msg.payload() {
                Some(v) => {
                    latest.insert(
                        key.to_string(),
                        Stored {
                            partition: msg.partition(),
                            offset: msg.offset(),
                            value: v.to_vec(),
                        },
                    );
                }
                None => {
                    latest.remove(key);
                }
            }
        }
        if ends
            .get(&msg.partition())
            .is_some_and(|end| msg.offset() + 1 >= *end)
        {
            ends.remove(&msg.partition());
        }
    }
    Ok(latest)
}
