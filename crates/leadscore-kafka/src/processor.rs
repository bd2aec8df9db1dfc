//! The one processor loop of the services that keep state in a checkpoint (retrain trigger,
//! lifecycle controller): restore the checkpoint from the compacted state topic, assign the
//! inputs at its positions, read, hand each record to the service, and commit outputs +
//! checkpoint + offsets in one transaction through [`crate::txn`].
//!
//! The service fills [`Hooks`]: what a record does, what a tick does, and what its checkpoint
//! is ([`Checkpoint`]). The loop, the cadence of checkpoints, the restore and the commit live
//! here once. A failed commit is returned with its [`crate::txn::Class`]: the caller rewinds by
//! starting again from the last committed checkpoint (`leadscore_runtime::rewinding`) or stops.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use leadscore_config::KafkaConfig;

use crate::txn::{Transactional, TxnError};
use crate::{Error, Result};

/// Next offset to read of every input partition, kept in the checkpoint under
/// `topic/partition` keys (the JSON form the services have always written).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Positions(BTreeMap<String, i64>);

impl Positions {
    /// Records that the record at `offset` was handled: the next read starts after it.
    pub fn advance(&mut self, topic: &str, partition: i32, offset: i64) {
        self.0.insert(format!("{topic}/{partition}"), offset + 1);
    }

    /// Next offset of `topic`/`partition`, if one was recorded.
    pub fn next(&self, topic: &str, partition: i32) -> Option<i64> {
        self.0.get(&format!("{topic}/{partition}")).copied()
    }

    /// The positions as consumer offsets to commit (keys that are not `topic/partition` are
    /// ignored).
    pub fn offsets(&self) -> Result<TopicPartitionList> {
        let mut offsets = TopicPartitionList::new();
        for (tp, o) in &self.0 {
            if let Some((topic, p)) = tp.rsplit_once('/')
                && let Ok(p) = p.parse::<i32>()
            {
                offsets
                    .add_partition_offset(topic, p, Offset::Offset(*o))
                    .map_err(|source| Error::Admin {
                        action: format!("offset of {tp}"),
                        source,
                    })?;
            }
        }
        Ok(offsets)
    }
}

/// A service's checkpoint: JSON in the state topic, with the input positions inside.
pub trait Checkpoint: Serialize + DeserializeOwned + Default {
    /// The input positions the checkpoint holds.
    fn positions(&self) -> &Positions;
    /// The same, to advance.
    fn positions_mut(&mut self) -> &mut Positions;
}

/// A record a transaction writes besides the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    /// Topic.
    pub topic: String,
    /// Key.
    pub key: String,
    /// Value bytes.
    pub value: Vec<u8>,
}

/// Where a record was read: topic, partition, offset.
pub type Position<'a> = (&'a str, i32, i64);

/// What a service does inside [`Processor::run`].
pub trait Hooks {
    /// The checkpoint.
    type State: Checkpoint;
    /// The service's error; a failed commit converts into it.
    type Error: From<CommitError>;

    /// The state the next checkpoint writes.
    fn state(&mut self) -> &mut Self::State;

    /// Handles one record (its position is already advanced in the state). It may commit
    /// outputs at once with [`Processor::commit`].
    fn on_record(
        &mut self,
        p: &Processor,
        at: Position<'_>,
        payload: &[u8],
    ) -> Result<(), Self::Error>;

    /// Periodic work; returns whether the state changed.
    fn on_tick(&mut self, p: &Processor) -> Result<bool, Self::Error>;
}

/// How often [`Processor::run`] ticks and checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    /// Longest wait for a record.
    pub poll: Duration,
    /// Interval of [`Hooks::on_tick`].
    pub tick: Duration,
    /// Longest a changed state waits before it is committed.
    pub checkpoint: Duration,
}

/// The transactional clients of a stateful service, and where its checkpoint lives.
pub struct Processor {
    consumer: BaseConsumer,
    producer: Transactional,
    state_topic: String,
    state_key: String,
    /// A state change not yet committed.
    dirty: Cell<bool>,
}

/// What [`Processor::start`] needs.
pub struct Start<'a> {
    /// Consumer group (offsets are committed inside transactions under it).
    pub group: &'a str,
    /// Transactional id (one instance per id; a newer one fences this one).
    pub transactional_id: &'a str,
    /// Client id for broker logs.
    pub client_id: &'a str,
    /// Compacted topic holding the checkpoint.
    pub state_topic: &'a str,
    /// Key of the checkpoint in it.
    pub state_key: &'a str,
    /// Input topics, every partition assigned at the checkpoint's positions.
    pub inputs: &'a [&'a str],
    /// Admin and transactional call timeout.
    pub timeout: Duration,
}

impl Processor {
    /// Initialises the transactional producer (fencing an older instance and aborting what it
    /// left open), then restores the checkpoint and assigns every input partition at its
    /// position (the beginning where it has none). Blocking.
    pub fn start<S: Checkpoint>(
        kafka: &KafkaConfig,
        s: &Start<'_>,
    ) -> Result<(Self, S), StartError> {
        let consumer: BaseConsumer = crate::txn::consumer_config(kafka, s.group)
            .create()
            .map_err(|source| Error::Client {
                bootstrap: kafka.bootstrap_servers.clone(),
                source,
            })?;
        let producer =
            Transactional::start(kafka, s.transactional_id, s.client_id, 60_000, s.timeout)?;
        // After init_transactions: an older instance's open transaction is aborted, so what
        // is read here is the last committed checkpoint.
        let stored = crate::latest::read_latest(kafka, s.state_topic, s.state_key, s.timeout)?;
        let state: S = match stored.get(s.state_key) {
            Some(v) => serde_json::from_slice(&v.value).map_err(|e| StartError::Checkpoint {
                at: format!("{}/{}@{}", s.state_topic, v.partition, v.offset),
                reason: e.to_string(),
            })?,
            None => S::default(),
        };
        assign_at(&consumer, s.inputs, state.positions(), s.timeout)?;
        Ok((
            Self {
                consumer,
                producer,
                state_topic: s.state_topic.to_string(),
                state_key: s.state_key.to_string(),
                dirty: Cell::new(false),
            },
            state,
        ))
    }

    /// Commits `records`, the checkpoint `state` and its positions as consumer offsets in one
    /// transaction. `apply` runs once the broker has accepted the records (a fenced producer
    /// fails before it) and before the commit; `false` from it aborts, and `Ok(false)` says so.
    pub fn commit<S: Checkpoint>(
        &self,
        state: &S,
        records: &[Out],
        apply: impl FnOnce() -> bool,
    ) -> Result<bool, CommitError> {
        let checkpoint =
            serde_json::to_vec(state).map_err(|e| CommitError::Encode(e.to_string()))?;
        let mut all = Vec::with_capacity(records.len() + 1);
        all.extend(
            records
                .iter()
                .map(|r| (r.topic.as_str(), r.key.as_str(), r.value.as_slice())),
        );
        all.push((
            self.state_topic.as_str(),
            self.state_key.as_str(),
            checkpoint.as_slice(),
        ));
        let offsets = state.positions().offsets()?;
        if !commit_records(&self.producer, &self.consumer, &all, &offsets, apply)? {
            return Ok(false);
        }
        self.dirty.set(false);
        Ok(true)
    }

    /// Reads until `shutdown`: each record advances the state's position and goes to
    /// [`Hooks::on_record`]; [`Hooks::on_tick`] runs every `cadence.tick`; a changed state is
    /// committed at least every `cadence.checkpoint` and once more on the way out. `committed`
    /// is told of every checkpoint the loop commits. Blocking.
    pub fn run<H: Hooks>(
        &self,
        hooks: &mut H,
        cadence: Cadence,
        shutdown: &CancellationToken,
        committed: impl Fn(),
    ) -> Result<(), H::Error> {
        let mut last_tick: Option<Instant> = None;
        let mut last_checkpoint = Instant::now();
        while !shutdown.is_cancelled() {
            if let Some(msg) = self.consumer.poll(cadence.poll) {
                match msg {
                    Ok(m) => {
                        let (topic, partition, offset) =
                            (m.topic().to_string(), m.partition(), m.offset());
                        let payload = m.payload().map(<[u8]>::to_vec);
                        drop(m);
                        hooks
                            .state()
                            .positions_mut()
                            .advance(&topic, partition, offset);
                        self.dirty.set(true);
                        if let Some(p) = payload {
                            hooks.on_record(self, (&topic, partition, offset), &p)?;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "consumer error (retried by librdkafka)"),
                }
            }
            if last_tick.is_none_or(|t| t.elapsed() >= cadence.tick) {
                last_tick = Some(Instant::now());
                if hooks.on_tick(self)? {
                    self.dirty.set(true);
                }
            }
            if self.dirty.get() && last_checkpoint.elapsed() >= cadence.checkpoint {
                self.checkpoint(hooks)?;
                committed();
                last_checkpoint = Instant::now();
            }
        }
        if self.dirty.get() {
            self.checkpoint(hooks)?;
            committed();
        }
        Ok(())
    }

    fn checkpoint<H: Hooks>(&self, hooks: &mut H) -> Result<(), H::Error> {
        self.commit(hooks.state(), &[], || true)?;
        Ok(())
    }
}

/// Commits `records` (topic, key, value) and the consumer's `offsets` in one transaction of
/// `producer`: the one commit of every stateful service. `apply` runs once the broker has
/// accepted the records (a fenced producer fails before it) and before the commit; `false`
/// from it aborts, and `Ok(false)` says so.
pub fn commit_records(
    producer: &Transactional,
    consumer: &BaseConsumer,
    records: &[(&str, &str, &[u8])],
    offsets: &TopicPartitionList,
    apply: impl FnOnce() -> bool,
) -> Result<bool, CommitError> {
    let group = match offsets.count() {
        0 => None,
        _ => Some(consumer.group_metadata().ok_or(CommitError::NoGroup)?),
    };
    let mut txn = producer.begin()?;
    for (topic, key, value) in records {
        txn.send(FutureRecord::to(topic).key(*key).payload(*value))?;
    }
    txn.deliver()?;
    if !apply() {
        txn.abort()?;
        return Ok(false);
    }
    txn.commit(group.as_ref().map(|g| (offsets, g)))?;
    Ok(true)
}

/// Assigns every partition of `topics` at `positions` (the beginning where none is recorded).
/// Blocking.
pub fn assign_at(
    consumer: &BaseConsumer,
    topics: &[&str],
    positions: &Positions,
    timeout: Duration,
) -> Result<()> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let ids = crate::partitions(consumer, topic, timeout)?;
        for p in ids {
            let offset = positions
                .next(topic, p)
                .map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(topic, p, offset)
                .map_err(|source| Error::Admin {
                    action: format!("assignment of {topic}/{p}"),
                    source,
                })?;
        }
    }
    consumer.assign(&tpl).map_err(|source| Error::Admin {
        action: "assigning the inputs".into(),
        source,
    })
}

/// Why [`Processor::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A client, metadata or assignment failure.
    #[error(transparent)]
    Kafka(#[from] Error),
    /// The producer could not be initialised (its class says whether to retry).
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// The stored checkpoint does not parse.
    #[error(
        "the checkpoint at {at} is unreadable: {reason}; fix or delete that record (a tombstone for its key) to start from the beginning"
    )]
    Checkpoint {
        /// Topic/partition@offset of the record.
        at: String,
        /// The parser's error.
        reason: String,
    },
}

/// Why [`Processor::commit`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The transaction failed; its class says what to do.
    #[error(transparent)]
    Txn(#[from] TxnError),
    /// The offsets could not be built.
    #[error(transparent)]
    Kafka(#[from] Error),
    /// The checkpoint could not be encoded.
    #[error("encoding the checkpoint: {0}")]
    Encode(String),
    /// Offsets to commit but the consumer has not joined its group yet.
    #[error("the consumer has no group metadata yet; the checkpoint is committed later")]
    NoGroup,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_keep_the_next_offset_and_their_json_form() {
        let mut p = Positions::default();
        p.advance("a.b", 3, 41);
        p.advance("a.b", 3, 42);
        p.advance("c", 0, 0);
        assert_eq!(p.next("a.b", 3), Some(43));
        assert_eq!(p.next("a.b", 2), None);
        let json = serde_json::to_string(&p).unwrap_or_default();
        assert_eq!(json, r#"{"a.b/3":43,"c/0":1}"#);
        let back: Positions = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(back, p);
    }

    #[test]
    fn offsets_come_from_well_formed_keys_only() {
        let p: Positions =
            serde_json::from_str(r#"{"t/1":5,"t/x":7,"nokey":9}"#).unwrap_or_default();
        let offsets = p.offsets().unwrap_or_default();
        let got: Vec<(String, i32, Offset)> = offsets
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
            .collect();
        assert_eq!(got, vec![("t".to_string(), 1, Offset::Offset(5))]);
    }
}
