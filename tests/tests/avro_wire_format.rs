//! An Avro record produced and consumed through the real broker and the real
//! schema registry, in the Confluent wire format.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::collections::HashMap;
use std::time::Duration;

use apache_avro::types::Value;
use leadscore_e2e::{config, consumer, create_topic, delete_topics, payload, receive, unique};
use leadscore_registry::{Decoder, Encoder, Registry};
use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

fn lead_score(lead_id: &str, score: f64) -> Value {
    let features: HashMap<String, Value> = [
        (
            "page_views".to_string(),
            Value::Union(1, Box::new(Value::Long(15))),
        ),
        (
            "industry".to_string(),
            Value::Union(3, Box::new(Value::String("Technology".into()))),
        ),
        (
            "time_on_site".to_string(),
            Value::Union(0, Box::new(Value::Null)),
        ),
    ]
    .into();
    Value::Record(vec![
        ("lead_id".into(), Value::String(lead_id.into())),
        ("score".into(), Value::Double(score)),
        ("band".into(), Value::Enum(0, "High".into())),
        ("model_name".into(), Value::String("lead-scoring".into())),
        ("model_version".into(), Value::String("3".into())),
        ("model_role".into(), Value::Enum(0, "champion".into())),
        ("features".into(), Value::Map(features)),
        (
            "event_time".into(),
            Value::TimestampMillis(1_700_000_000_000),
        ),
        (
            "scored_at".into(),
            Value::TimestampMillis(1_700_000_000_012),
        ),
        ("latency_ms".into(), Value::Double(12.5)),
        ("source".into(), Value::Union(0, Box::new(Value::Null))),
        (
            "reasons".into(),
            Value::Union(
                1,
                Box::new(Value::Array(vec![Value::String(
                    "page_views=15 +0.42".into(),
                )])),
            ),
        ),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lead_score_round_trips_through_broker_and_registry() {
    let topic = unique("it.avro");
    let subject = leadscore_schemas::value_subject(&topic);
    create_topic(&topic, 1).await;
    let registry = Registry::new(&config().registry).unwrap();
    let schema = leadscore_schemas::find("LeadScore.avsc").unwrap();
    let encoder = Encoder::for_subject(&registry, &subject, schema.text)
        .await
        .unwrap();

    let producer: FutureProducer = leadscore_e2e::client(&[("message.timeout.ms", "30000")])
        .create()
        .unwrap();
    let sent = [lead_score("lead_1", 0.91), lead_score("lead_2", 0.12)];
    for value in &sent {
        let Value::Record(fields) = value else {
            unreachable!()
        };
        let Value::String(key) = &fields[0].1 else {
            unreachable!()
        };
        let bytes = encoder.encode(value.clone()).unwrap();
        producer
            .send(
                FutureRecord::to(&topic).key(key).payload(&bytes),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let consumer = consumer(&topic, "read_committed");
    let got = receive(&consumer, 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2, "both records come back");
    let decoder = Decoder::new(registry.clone());
    for (message, expected) in got.iter().zip(&sent) {
        let bytes = payload(message);
        assert_eq!(bytes[0], 0, "magic byte");
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        assert_eq!(
            id,
            encoder.schema_id(),
            "schema id in the frame is the registered one"
        );
        assert_eq!(
            registry.lookup(&subject, schema.text).await.unwrap(),
            Some(id),
            "registry knows the id under the subject"
        );
        let decoded = decoder.decode(bytes).await.unwrap();
        assert_eq!(&decoded, expected);
        assert!(message.key().is_some());
    }

    // A reader on a newer schema (one optional field more) resolves the old records.
    let evolved_text = schema.text.replacen(
        "\"fields\": [",
        "\"fields\": [{\"name\": \"tenant\", \"type\": [\"null\", \"string\"], \"default\": null},",
        1,
    );
    let evolved = leadscore_schemas::parse("LeadScore evolved", &evolved_text).unwrap();
    let reader = Decoder::with_reader(registry.clone(), evolved);
    let Value::Record(fields) = reader.decode(payload(&got[0])).await.unwrap() else {
        panic!("record expected")
    };
    assert_eq!(
        fields[0],
        ("tenant".to_string(), Value::Union(0, Box::new(Value::Null)))
    );

    // Bytes that are not Confluent-framed are refused with the reason.
    let err = decoder
        .decode(b"{\"json\":1}")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("magic byte"), "{err}");

    registry.delete_subject(&subject).await.unwrap();
    delete_topics(&[&topic]).await;
}
