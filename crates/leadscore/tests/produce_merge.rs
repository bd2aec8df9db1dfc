//! The vendored librdkafka's merged ProduceRequests (decision 0024) against the real broker:
//! several partitions' records go out in one request, each partition is answered with its
//! own result, and a transaction over many partitions commits each record exactly once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leadscore_e2e::{
    client, consumer, create_topic, create_topic_with, delete_topics, receive, unique,
};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;

/// Keeps librdkafka's log lines and each record's delivery result, by payload.
#[derive(Clone, Default)]
struct Recorder {
    logs: Arc<Mutex<Vec<String>>>,
    delivered: Arc<Mutex<HashMap<String, Result<i32, KafkaError>>>>,
}

impl ClientContext for Recorder {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, message: &str) {
        if let Ok(mut logs) = self.logs.lock() {
            logs.push(format!("{fac} {message}"));
        }
    }
}

impl ProducerContext for Recorder {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let (payload, outcome) = match result {
            Ok(m) => (m.payload(), Ok(m.partition())),
            Err((e, m)) => (m.payload(), Err(e.clone())),
        };
        let payload = String::from_utf8_lossy(payload.unwrap_or_default()).into_owned();
        if let Ok(mut d) = self.delivered.lock() {
            d.insert(payload, outcome);
        }
    }
}

impl Recorder {
    /// Each record's delivery result so far, by payload.
    fn delivered(&self) -> HashMap<String, Result<i32, KafkaError>> {
        self.delivered.lock().map(|d| d.clone()).unwrap_or_default()
    }

    /// The partition counts of the merges librdkafka logged.
    fn merges(&self) -> Vec<usize> {
        let logs = self.logs.lock().map(|l| l.clone()).unwrap_or_default();
        logs.iter()
            .filter_map(|l| {
                let rest = l.split("Merged ").nth(1)?;
                rest.split(' ').next()?.parse().ok()
            })
            .collect()
    }
}

fn producer(extra: &[(&str, &str)]) -> (BaseProducer<Recorder>, Recorder) {
    let recorder = Recorder::default();
    let mut config = client(&[("debug", "msg"), ("linger.ms", "20")]);
    for (k, v) in extra {
        config.set(*k, *v);
    }
    let producer = config
        .set_log_level(RDKafkaLogLevel::Debug)
        .create_with_context(recorder.clone())
        .unwrap_or_else(|e| panic!("producer: {e}"));
    (producer, recorder)
}

/// Enqueues `value` for `partition` of `topic`.
fn send(producer: &BaseProducer<Recorder>, topic: &str, partition: i32, value: &str) {
    producer
        .send(
            BaseRecord::<str, str>::to(topic)
                .partition(partition)
                .payload(value),
        )
        .unwrap_or_else(|(e, _)| panic!("send: {e}"));
}

fn flush(producer: &BaseProducer<Recorder>) {
    producer
        .flush(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("flush: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_over_many_partitions_goes_out_merged_and_commits_each_record_once() {
    let (a, b) = (unique("it.merge.a"), unique("it.merge.b"));
    create_topic(&a, 6).await;
    create_topic(&b, 6).await;
    let (producer, recorder) = producer(&[
        ("transactional.id", &unique("it-merge")),
        ("enable.idempotence", "true"),
    ]);
    producer
        .init_transactions(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("init: {e}"));

    // Three transactions, each writing 20 records to every partition of both topics.
    let mut sent = Vec::new();
    for txn in 0..3 {
        producer
            .begin_transaction()
            .unwrap_or_else(|e| panic!("begin: {e}"));
        for i in 0..20 {
            for (topic, name) in [(&a, "a"), (&b, "b")] {
                for p in 0..6 {
                    let value = format!("{name}/{p}/{txn}/{i}");
                    send(&producer, topic, p, &value);
                    sent.push(value);
                }
            }
        }
        producer
            .commit_transaction(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("commit: {e}"));
    }

    // The merge happened: requests carried several partitions, across both topics.
    let merges = recorder.merges();
    assert!(
        merges.iter().any(|&n| n > 6),
        "no request carried partitions of both topics; merges: {merges:?}"
    );

    // Every record committed once, on its partition, in order within it.
    let mut read = Vec::new();
    for (topic, name) in [(&a, "a"), (&b, "b")] {
        let messages = receive(
            &consumer(topic, "read_committed"),
            360,
            Duration::from_secs(30),
        )
        .await;
        for m in &messages {
            let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            let parts: Vec<&str> = value.split('/').collect();
            assert_eq!(parts[0], name, "{value} read from {topic}");
            assert_eq!(
                parts[1],
                m.partition().to_string(),
                "{value} on partition {}",
                m.partition()
            );
            read.push((m.partition(), m.offset(), value));
        }
    }
    let mut values: Vec<&String> = read.iter().map(|r| &r.2).collect();
    values.sort();
    let mut want: Vec<&String> = sent.iter().collect();
    want.sort();
    assert_eq!(values, want, "committed records differ from the sent ones");
    let delivered = recorder.delivered();
    assert_eq!(delivered.len(), sent.len());
    assert!(delivered.values().all(Result::is_ok), "a delivery failed");
    delete_topics(&[&a, &b]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_of_a_merged_request_gets_its_own_answer() {
    // One partition of `small` refuses a large record; the records merged with it in the same
    // requests are written.
    let (big, small) = (unique("it.merge.big"), unique("it.merge.small"));
    create_topic(&big, 4).await;
    create_topic_with(&small, 2, &[("max.message.bytes", "2048")]).await;
    let (producer, recorder) = producer(&[("enable.idempotence", "true")]);

    let large = format!("large/{}", "x".repeat(8192));
    let mut ok = Vec::new();
    for i in 0..10 {
        for p in 0..4 {
            let value = format!("big/{p}/{i}");
            send(&producer, &big, p, &value);
            ok.push(value);
        }
        let value = format!("small/1/{i}");
        send(&producer, &small, 1, &value);
        ok.push(value);
    }
    send(&producer, &small, 0, &large);
    flush(&producer);

    let merges = recorder.merges();
    assert!(
        merges.contains(&6),
        "one request should carry all six partitions; merges: {merges:?}"
    );
    let delivered = recorder.delivered();
    match delivered.get(&large) {
        Some(Err(KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge))) => {}
        other => panic!("the oversized record: {other:?}"),
    }
    for value in &ok {
        let want_partition: i32 = value
            .split('/')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(-1);
        match delivered.get(value) {
            Some(Ok(p)) if *p == want_partition => {}
            other => panic!("{value}: {other:?}"),
        }
    }
    let read = receive(
        &consumer(&big, "read_uncommitted"),
        40,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(read.len(), 40);
    delete_topics(&[&big, &small]).await;
}
