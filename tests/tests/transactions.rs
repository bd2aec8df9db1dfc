//! Transactional produce on the real broker: invisible to read_committed
//! consumers until commit, never visible after abort.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::time::Duration;

use leadscore_e2e::{client, consumer, create_topic, delete_topics, payload, receive, unique};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

fn transactional_producer() -> ThreadedProducer<DefaultProducerContext> {
    let producer: ThreadedProducer<DefaultProducerContext> = client(&[
        ("transactional.id", &unique("it-tx")),
        ("enable.idempotence", "true"),
        ("message.timeout.ms", "30000"),
    ])
    .create()
    .unwrap();
    producer.init_transactions(Duration::from_secs(30)).unwrap();
    producer
}

fn send(producer: &ThreadedProducer<DefaultProducerContext>, topic: &str, values: &[&str]) {
    for v in values {
        producer
            .send(BaseRecord::to(topic).key("k").payload(*v))
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_writes_are_invisible_to_read_committed_until_commit() {
    let topic = unique("it.tx");
    create_topic(&topic, 1).await;
    let producer = transactional_producer();
    let committed_reader = consumer(&topic, "read_committed");
    let uncommitted_reader = consumer(&topic, "read_uncommitted");

    producer.begin_transaction().unwrap();
    send(&producer, &topic, &["a", "b", "c"]);

    // The records are in the log (a read_uncommitted consumer sees them) ...
    let dirty = receive(&uncommitted_reader, 3, Duration::from_secs(30)).await;
    assert_eq!(dirty.len(), 3, "records are written before commit");
    // ... but read_committed sees nothing while the transaction is open.
    let before = receive(&committed_reader, 1, Duration::from_secs(3)).await;
    assert!(
        before.is_empty(),
        "read_committed saw {} uncommitted records",
        before.len()
    );

    producer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();
    let after = receive(&committed_reader, 3, Duration::from_secs(30)).await;
    let values: Vec<&[u8]> = after.iter().map(payload).collect();
    assert_eq!(values, vec![&b"a"[..], b"b", b"c"]);

    delete_topics(&[&topic]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_writes_are_never_visible_to_read_committed() {
    let topic = unique("it.tx-abort");
    create_topic(&topic, 1).await;
    let producer = transactional_producer();

    producer.begin_transaction().unwrap();
    send(&producer, &topic, &["lost-1", "lost-2"]);
    producer.abort_transaction(Duration::from_secs(30)).unwrap();

    producer.begin_transaction().unwrap();
    send(&producer, &topic, &["kept"]);
    producer
        .commit_transaction(Duration::from_secs(30))
        .unwrap();

    let reader = consumer(&topic, "read_committed");
    let got = receive(&reader, 3, Duration::from_secs(10)).await;
    let values: Vec<&[u8]> = got.iter().map(payload).collect();
    assert_eq!(
        values,
        vec![&b"kept"[..]],
        "only the committed record is visible"
    );

    delete_topics(&[&topic]).await;
}
