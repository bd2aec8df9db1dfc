//! The one transactional commit path of every service, and the one error classification.
//!
//! Every transactional service (scorer, drift aggregator, retrain trigger, training worker,
//! lifecycle controller, the bench) begins, produces, sends offsets and commits through
//! [`Transactional`] and [`Txn`], and routes failures on [`Class`], which follows
//! librdkafka's transactional contract:
//!
//! | class | what the caller does |
//! |---|---|
//! | [`Class::Retriable`] | already retried here (the same call, bounded, with backoff); reaching the caller it behaves as abortable |
//! | [`Class::Abortable`] | the transaction was aborted here; rewind to the last committed position and retry the batch |
//! | [`Class::Poison`] | one record can never be written (too large, invalid); the transaction is still open: replace or skip the record |
//! | [`Class::Fenced`] | another instance owns the transactional id: stop reading, not ready, exit |
//! | [`Class::Fatal`] | the producer cannot go on: not ready, exit non-zero |
//!
//! Delivery is awaited before offsets are sent and the transaction committed: rdkafka's
//! `commit_transaction` flushes with a loop that polls for at least 100 ms whenever a
//! message is still outstanding, so committing with nothing outstanding removes that floor.

use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaError};
use rdkafka::message::ToBytes;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, TopicPartitionList};

use leadscore_config::KafkaConfig;

/// How a failure is handled: one classification for every service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Repeat the same call: request timed out, coordinator moving.
    Retriable,
    /// Abort the transaction and retry the batch from the last committed position.
    Abortable,
    /// One record can never be written; the transaction goes on without it.
    Poison,
    /// Another instance took the transactional id: stop.
    Fenced,
    /// The producer cannot go on: stop with a non-zero exit.
    Fatal,
}

impl Class {
    /// Stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Retriable => "retriable",
            Class::Abortable => "abortable",
            Class::Poison => "poison",
            Class::Fenced => "fenced",
            Class::Fatal => "fatal",
        }
    }

    /// Whether the service must stop (fenced or fatal).
    pub fn stops(self) -> bool {
        matches!(self, Class::Fenced | Class::Fatal)
    }
}

/// A transactional step that failed, with its class.
#[derive(Debug, thiserror::Error)]
#[error("{context} ({transactional_id}) failed, {class}: {source}{hint}", class = class.as_str(), hint = hint(*class))]
pub struct TxnError {
    /// What was being done.
    pub context: &'static str,
    /// The producer's transactional id.
    pub transactional_id: String,
    /// How to handle it.
    pub class: Class,
    /// Index (in send order within the transaction) of the record whose delivery failed, if one did.
    pub record: Option<usize>,
    /// librdkafka's error.
    pub source: Box<KafkaError>,
}

fn hint(class: Class) -> &'static str {
    match class {
        Class::Fenced => "; another instance uses this transactional id: run one instance per id",
        Class::Fatal => {
            "; the producer cannot continue: the service stops and restarts from its last commit"
        }
        _ => "",
    }
}

fn fenced_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::Fenced
            | RDKafkaErrorCode::ProducerFenced
            | RDKafkaErrorCode::InvalidProducerEpoch
            | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
    )
}

/// Codes that belong to one record and will fail the same way every time.
pub fn record_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::MessageBatchTooLarge
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::UnknownTopic
    )
}

fn classify_txn(t: &RDKafkaError) -> Class {
    if fenced_code(t.code()) {
        Class::Fenced
    } else if t.is_fatal() {
        Class::Fatal
    } else if t.txn_requires_abort() {
        Class::Abortable
    } else if t.is_retriable() {
        Class::Retriable
    } else {
        Class::Abortable
    }
}

/// The class of a librdkafka error met on the transactional path.
pub fn classify(e: &KafkaError) -> Class {
    match e {
        KafkaError::Transaction(t) => classify_txn(t),
        KafkaError::MessageProduction(code) if fenced_code(*code) => Class::Fenced,
        KafkaError::MessageProduction(code) if record_code(*code) => Class::Poison,
        KafkaError::MessageProduction(RDKafkaErrorCode::Fatal) => Class::Fatal,
        KafkaError::ClientCreation(_) | KafkaError::ClientConfig(..) => Class::Fatal,
        _ => Class::Abortable,
    }
}

/// Producer settings every transactional service shares: idempotence, the transaction timeout,
/// short deliberate retry backoffs (librdkafka's default 100 ms backoff is paid on every
/// CONCURRENT_TRANSACTIONS answer) and a bounded linger.
pub fn transactional_config(
    kafka: &KafkaConfig,
    transactional_id: &str,
    transaction_timeout_ms: u64,
    client_id: &str,
) -> ClientConfig {
    let mut c = crate::client_config(kafka);
    c.set("transactional.id", transactional_id)
        .set("enable.idempotence", "true")
        .set("transaction.timeout.ms", transaction_timeout_ms.to_string())
        .set("retry.backoff.ms", "5")
        .set("retry.backoff.max.ms", "200")
        .set("linger.ms", "2")
        .set("compression.type", "lz4")
        .set("client.id", client_id);
    c
}

/// A consumer whose offsets are committed only inside transactions (`group`, read_committed,
/// no auto-commit, from the beginning when the group has no offsets).
pub fn consumer_config(kafka: &KafkaConfig, group: &str) -> ClientConfig {
    let mut c = crate::client_config(kafka);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed");
    c
}

/// How often a retriable call is repeated before the transaction is aborted.
const RETRIES: u32 = 5;

/// A transactional producer: the only place that begins, commits or aborts.
#[derive(Clone)]
pub struct Transactional {
    producer: FutureProducer,
    transactional_id: String,
    timeout: Duration,
}

impl Transactional {
    /// Creates the producer from `config` (which names the transactional id). Blocking-free.
    pub fn create(config: &ClientConfig, timeout: Duration) -> Result<Self, TxnError> {
        let transactional_id = config
            .get("transactional.id")
            .unwrap_or_default()
            .to_string();
        let producer: FutureProducer = config.create().map_err(|source| TxnError {
            context: "create the transactional producer",
            transactional_id: transactional_id.clone(),
            class: Class::Fatal,
            record: None,
            source: Box::new(source),
        })?;
        Ok(Self {
            producer,
            transactional_id,
            timeout,
        })
    }

    /// Creates a producer with [`transactional_config`] and initialises it (fencing older
    /// instances of `transactional_id`). Blocking.
    pub fn start(
        kafka: &KafkaConfig,
        transactional_id: &str,
        client_id: &str,
        transaction_timeout_ms: u64,
        timeout: Duration,
    ) -> Result<Self, TxnError> {
        let t = Self::create(
            &transactional_config(kafka, transactional_id, transaction_timeout_ms, client_id),
            timeout,
        )?;
        t.init()?;
        Ok(t)
    }

    /// `init_transactions`, repeated while retriable: fences older instances and aborts
    /// what they left open. Blocking.
    pub fn init(&self) -> Result<(), TxnError> {
        self.retrying("init transactions", || {
            self.producer.init_transactions(self.timeout)
        })
    }

    /// The producer, for non-transactional reads of its state (metadata, fatal error).
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// The transactional id.
    pub fn id(&self) -> &str {
        &self.transactional_id
    }

    /// Begins a transaction. Blocking.
    pub fn begin(&self) -> Result<Txn<'_>, TxnError> {
        self.retrying("begin transaction", || self.producer.begin_transaction())?;
        Ok(Txn {
            owner: self,
            pending: Vec::new(),
            open: true,
        })
    }

    fn error(&self, context: &'static str, source: KafkaError) -> TxnError {
        let mut class = classify(&source);
        if let Some((code, _)) = self.producer.client().fatal_error() {
            class = if fenced_code(code) {
                Class::Fenced
            } else {
                Class::Fatal
            };
        }
        TxnError {
            context,
            transactional_id: self.transactional_id.clone(),
            class,
            record: None,
            source: Box::new(source),
        }
    }

    /// Runs `call` until it succeeds, fails other than retriably, or has been retried
    /// [`RETRIES`] times (then the error is abortable).
    fn retrying(
        &self,
        context: &'static str,
        mut call: impl FnMut() -> Result<(), KafkaError>,
    ) -> Result<(), TxnError> {
        let mut wait = Duration::from_millis(20);
        for attempt in 0..=RETRIES {
            let started = std::time::Instant::now();
            let outcome = call();
            tracing::trace!(
                context,
                attempt,
                ms = started.elapsed().as_millis() as u64,
                ok = outcome.is_ok(),
                "transactional call"
            );
            match outcome {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let mut err = self.error(context, e);
                    if err.class != Class::Retriable {
                        return Err(err);
                    }
                    if attempt == RETRIES {
                        err.class = Class::Abortable;
                        return Err(err);
                    }
                    tracing::debug!(context, attempt, error = %err.source, "retriable; repeating the call");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}

/// An open transaction. Dropped without [`Txn::commit`], it is aborted.
pub struct Txn<'a> {
    owner: &'a Transactional,
    pending: Vec<DeliveryFuture>,
    open: bool,
}

impl Txn<'_> {
    /// Enqueues one record, waiting while the producer's queue is full. A record that can
    /// never be written fails with [`Class::Poison`] and leaves the transaction usable.
    pub fn send<K, P>(&mut self, mut record: FutureRecord<'_, K, P>) -> Result<(), TxnError>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        loop {
            match self.owner.producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    // Serve delivery reports meanwhile: the queue drains as they arrive.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(self.owner.error("produce", e)),
            }
        }
    }

    /// Records enqueued so far.
    pub fn sent(&self) -> usize {
        self.pending.len()
    }

    /// Waits until every record sent is delivered (or failed). A failed delivery aborts
    /// the transaction; the error names the record's index in send order.
    pub fn deliver(&mut self) -> Result<(), TxnError> {
        let pending = std::mem::take(&mut self.pending);
        let mut first_failure = None;
        for (i, delivery) in pending.into_iter().enumerate() {
            let outcome = futures::executor::block_on(delivery);
            let failure = match outcome {
                Ok(Ok(_)) => continue,
                Ok(Err((e, _))) => e,
                Err(_canceled) => KafkaError::Canceled,
            };
            if first_failure.is_none() {
                first_failure = Some((i, failure));
            }
        }
        match first_failure {
            None => Ok(()),
            Some((i, e)) => {
                let mut err = self.owner.error("deliver", e);
                err.record = Some(i);
                if err.class == Class::Poison || err.class == Class::Retriable {
                    // A delivery that failed makes the transaction abortable.
                    err.class = Class::Abortable;
                }
                Err(self.fail(err))
            }
        }
    }

    /// Delivers, sends `offsets` (consumed under `group`) and commits. An abortable failure
    /// aborts here before it is returned.
    pub fn commit(
        mut self,
        offsets: Option<(&TopicPartitionList, &ConsumerGroupMetadata)>,
    ) -> Result<(), TxnError> {
        self.deliver()?;
        let (owner, timeout) = (self.owner, self.owner.timeout);
        if let Some((offsets, group)) = offsets.filter(|(o, _)| o.count() > 0)
            && let Err(e) = owner.retrying("send offsets", || {
                owner
                    .producer
                    .send_offsets_to_transaction(offsets, group, timeout)
            })
        {
            return Err(self.fail(e));
        }
        match owner.retrying("commit", || owner.producer.commit_transaction(timeout)) {
            Ok(()) => {
                self.open = false;
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Aborts the transaction.
    pub fn abort(mut self) -> Result<(), TxnError> {
        self.abort_now()
    }

    fn abort_now(&mut self) -> Result<(), TxnError> {
        self.open = false;
        self.pending.clear();
        let (owner, timeout) = (self.owner, self.owner.timeout);
        owner
            .retrying("abort", || owner.producer.abort_transaction(timeout))
            .map_err(|mut e| {
                // A producer that cannot abort cannot begin again.
                if !e.class.stops() {
                    e.class = Class::Fatal;
                }
                e
            })
    }

    /// Aborts after `err` unless it stops the service; an abort that fails wins.
    fn fail(&mut self, err: TxnError) -> TxnError {
        if err.class.stops() {
            self.open = false;
            return err;
        }
        match self.abort_now() {
            Ok(()) => err,
            Err(abort) => abort,
        }
    }
}

impl Drop for Txn<'_> {
    fn drop(&mut self) {
        if self.open
            && let Err(e) = self.abort_now()
        {
            tracing::warn!(error = %e, "aborting a transaction left open");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_errors_are_poison_and_fencing_stops() {
        for code in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::InvalidRecord,
            RDKafkaErrorCode::MessageBatchTooLarge,
        ] {
            assert_eq!(
                classify(&KafkaError::MessageProduction(code)),
                Class::Poison
            );
        }
        assert_eq!(
            classify(&KafkaError::MessageProduction(
                RDKafkaErrorCode::ProducerFenced
            )),
            Class::Fenced
        );
        assert!(Class::Fenced.stops() && Class::Fatal.stops());
        assert!(!Class::Abortable.stops() && !Class::Poison.stops());
    }

    #[test]
    fn other_produce_errors_abort() {
        assert_eq!(
            classify(&KafkaError::MessageProduction(
                RDKafkaErrorCode::RequestTimedOut
            )),
            Class::Abortable
        );
        assert_eq!(classify(&KafkaError::Canceled), Class::Abortable);
    }

    #[test]
    fn the_message_says_what_to_do_when_fenced() {
        let e = TxnError {
            context: "commit",
            transactional_id: "t-1".into(),
            class: Class::Fenced,
            record: None,
            source: Box::new(KafkaError::MessageProduction(
                RDKafkaErrorCode::ProducerFenced,
            )),
        };
        let text = e.to_string();
        assert!(
            text.contains("t-1") && text.contains("one instance per id"),
            "{text}"
        );
    }
}
