//! Helpers for tests that drive the scorer process through its topics and health port.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use leadscore_crm::{Generator, GeneratorConfig, Lead};
use rdkafka::Message;
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::{
    Service, client, consumer, create_topic, create_topic_with, delete_topics, free_port, unique,
};

/// A scorer's four topics, unique per test.
pub struct Topics {
    /// Input (CDC events).
    pub input: String,
    /// Live scores.
    pub scores: String,
    /// Shadow scores.
    pub shadow: String,
    /// Dead letters.
    pub dlq: String,
}

impl Topics {
    /// Creates the four topics with `partitions` each.
    pub async fn create(partitions: i32) -> Self {
        Self::create_with(partitions, &[]).await
    }

    /// Topics whose input has `input_configs`.
    pub async fn create_with(partitions: i32, input_configs: &[(&str, &str)]) -> Self {
        let base = unique("it.scorer");
        let t = Topics {
            input: format!("{base}.in"),
            scores: format!("{base}.scores"),
            shadow: format!("{base}.shadow"),
            dlq: format!("{base}.dlq"),
        };
        create_topic_with(&t.input, partitions, input_configs).await;
        for name in [&t.scores, &t.shadow, &t.dlq] {
            create_topic(name, partitions).await;
        }
        t
    }

    /// Deletes the four topics.
    pub async fn delete(&self) {
        delete_topics(&[&self.input, &self.scores, &self.shadow, &self.dlq]).await;
    }
}

/// Starts `leadscore scorer` (the binary at `exe`) on `t` with `extra` environment; returns it and its health port.
///
/// The instance id (and so the transactional id) is `instance` within `group`: a restart with the
/// same pair fences its predecessor, while tests running side by side never fence each other.
pub fn start_scorer_with(
    exe: &str,
    t: &Topics,
    group: &str,
    instance: &str,
    challenger: bool,
    extra: &[(&str, &str)],
) -> (Service, u16) {
    let port = free_port();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    let mut cmd = Command::new(exe);
    cmd.arg("scorer")
        .env("LEADSCORE__SCORER__INPUT_TOPIC", &t.input)
        .env("LEADSCORE__SCORER__SCORES_TOPIC", &t.scores)
        .env("LEADSCORE__SCORER__SHADOW_TOPIC", &t.shadow)
        .env("LEADSCORE__SCORER__DLQ_TOPIC", &t.dlq)
        .env("LEADSCORE__SCORER__GROUP_ID", group)
        .env(
            "LEADSCORE__SCORER__INSTANCE_ID",
            format!("{group}-{instance}"),
        )
        .env("LEADSCORE__SCORER__MAX_BATCH", "200")
        .env("LEADSCORE__SCORER__CHAMPION_MODEL", &models)
        .env(
            "LEADSCORE__SCORER__HTTP_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        // A failing run can be repeated with e.g. `LEADSCORE_E2E_SCORER_LOG=warn,librdkafka=debug`
        // and `LEADSCORE__KAFKA__DEBUG=eos,cgrp` (inherited) for the scorer's trace.
        .env(
            "LEADSCORE_LOG",
            std::env::var("LEADSCORE_E2E_SCORER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if challenger {
        cmd.env("LEADSCORE__SCORER__CHALLENGER_MODEL", &models);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    (cmd.spawn().unwrap().into(), port)
}

/// A counter of a service's Prometheus page.
pub async fn counter(port: u16, name: &str) -> u64 {
    let page = http_get(port, "/metrics").await;
    page.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not on the metrics page"))
}

/// GET over HTTP/1.0.
pub async fn http_get(port: u16, path: &str) -> String {
    try_http_get(port, path).await.unwrap()
}

/// GET over HTTP/1.0; `None` while nothing listens.
pub async fn try_http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// The CRM row of `l` as Debezium JSON, with PII columns a producer might send.
pub fn lead_json(l: &Lead) -> serde_json::Value {
    json!({
        "lead_id": l.lead_id, "company_size": l.company_size, "industry": l.industry,
        "page_views": l.page_views, "time_on_site": l.time_on_site,
        "form_completion_time": l.form_completion_time, "referral_source": l.referral_source,
        "country": l.country, "created_at": l.created_at.to_rfc3339(), "updated_at": l.updated_at.to_rfc3339(),
        "status": l.status.as_str(), "converted_at": null, "email": "pii@example.com", "phone": "+971500000000"
    })
}

/// A Debezium JSON create event of `l`, committed now.
pub fn create_event(l: &Lead) -> Vec<u8> {
    create_event_at(l, chrono::Utc::now().timestamp_millis())
}

/// A Debezium JSON create event of `l` committed at `ts_ms` (the score's event time).
pub fn create_event_at(l: &Lead, ts_ms: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({"op": "c", "before": null, "after": lead_json(l),
                               "source": {"ts_ms": ts_ms}}))
    .unwrap()
}

/// Produces `records` (key, value) to `topic` and waits for every delivery.
pub async fn produce(topic: &str, records: Vec<(Option<String>, Vec<u8>)>) {
    let producer: FutureProducer = client(&[
        ("message.timeout.ms", "30000"),
        ("linger.ms", "5"),
        ("message.max.bytes", "4194304"),
    ])
    .create()
    .unwrap();
    let futures: Vec<_> = records
        .iter()
        .map(|(k, v)| {
            let mut r = FutureRecord::<str, [u8]>::to(topic).payload(v.as_slice());
            if let Some(k) = k {
                r = r.key(k.as_str());
            }
            producer.send(r, Duration::from_secs(30))
        })
        .collect();
    for f in futures {
        f.await.map_err(|(e, _)| e).unwrap();
    }
}

/// Sends `ls` as create events at `rate` per second with an idempotent producer (a broker
/// fault never duplicates an input), then waits until every one is delivered.
pub async fn stream(topic: String, ls: Vec<Lead>, rate: u64) {
    let producer: FutureProducer = client(&[
        ("enable.idempotence", "true"),
        ("message.timeout.ms", "180000"),
        ("linger.ms", "5"),
    ])
    .create()
    .unwrap();
    let started = tokio::time::Instant::now();
    let mut pending = Vec::with_capacity(ls.len());
    for (i, l) in ls.iter().enumerate() {
        let due = started + Duration::from_micros(i as u64 * 1_000_000 / rate);
        tokio::time::sleep_until(due).await;
        let value = create_event(l);
        let record = FutureRecord::to(&topic)
            .key(l.lead_id.as_str())
            .payload(&value);
        pending.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
    }
    for p in pending {
        p.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// `n` generated leads with ids prefixed `prefix`.
pub fn leads(prefix: &str, n: usize, seed: u64) -> Vec<Lead> {
    Generator::new(GeneratorConfig {
        seed,
        id_prefix: prefix.into(),
        ..Default::default()
    })
    .take(n)
    .map(|g| g.lead)
    .collect()
}

/// Where one committed score record sits, and the input record it names as its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The score record's partition and offset.
    pub at: (i32, i64),
    /// The input record it was scored from (partition, offset), when the score names one.
    pub source: Option<(i32, i64)>,
}

/// The `source` (partition, offset) of a framed `LeadScore`, read with the current schema.
fn source_of(payload: &[u8]) -> Option<(i32, i64)> {
    use apache_avro::types::Value;
    let schema =
        apache_avro::Schema::parse_str(leadscore_schemas::find("LeadScore.avsc").ok()?.text)
            .ok()?;
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .ok()?;
    let Value::Record(fields) = reader.read_value(&mut payload.get(5..)?).ok()? else {
        return None;
    };
    let (_, source) = fields.iter().find(|(n, _)| n == "source")?;
    let Value::Union(_, inner) = source else {
        return None;
    };
    let Value::Record(src) = inner.as_ref() else {
        return None;
    };
    let get = |name: &str| src.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    match (get("partition")?, get("offset")?) {
        (Value::Int(p), Value::Long(o)) => Some((p, o)),
        _ => None,
    }
}

/// Reads the scores topic (read_committed) until `want` distinct keys are seen or time runs out,
/// then keeps reading briefly to catch duplicates. Returns the records of each key.
pub async fn read_score_records(
    c: &StreamConsumer,
    want: usize,
    within: Duration,
) -> HashMap<String, Vec<Seen>> {
    let mut seen: HashMap<String, Vec<Seen>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut settle: Option<tokio::time::Instant> = None;
    loop {
        let until = settle.unwrap_or(deadline);
        match tokio::time::timeout_at(until, c.recv()).await {
            Ok(Ok(m)) => {
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                seen.entry(key).or_default().push(Seen {
                    at: (m.partition(), m.offset()),
                    source: m.payload().and_then(source_of),
                });
                if seen.len() >= want && settle.is_none() {
                    settle = Some(tokio::time::Instant::now() + Duration::from_secs(3));
                }
            }
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) => break,
        }
    }
    seen
}

/// Reads the scores topic like [`read_score_records`]; returns records per key.
pub async fn read_scores(
    c: &StreamConsumer,
    want: usize,
    within: Duration,
) -> HashMap<String, usize> {
    read_score_records(c, want, within)
        .await
        .into_iter()
        .map(|(k, v)| (k, v.len()))
        .collect()
}

/// Fails unless `scores` (records per key, from [`read_scores`]) holds every id of `leads`
/// exactly once and nothing else.
pub fn assert_exactly_once<'a>(
    scores: &HashMap<String, usize>,
    leads: impl IntoIterator<Item = &'a str>,
) {
    let expected: std::collections::HashSet<&str> = leads.into_iter().collect();
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !scores.contains_key(**id))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "leads without a committed score, e.g. {missing:?}"
    );
    let duplicated: Vec<_> = scores.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(
        duplicated.is_empty(),
        "leads scored more than once: {duplicated:?}"
    );
    assert_eq!(scores.len(), expected.len());
}

/// [`assert_exactly_once`] on the records of [`read_score_records`]; a duplicate is reported
/// with where each of its scores sits and which input record each was scored from (one input
/// offset twice: the scorer committed it twice; two input offsets: the input holds it twice).
pub fn assert_records_exactly_once<'a>(
    records: &HashMap<String, Vec<Seen>>,
    leads: impl IntoIterator<Item = &'a str>,
) {
    let mut duplicated: Vec<_> = records.iter().filter(|(_, v)| v.len() > 1).collect();
    duplicated.sort_by_key(|(_, v)| v[0].source);
    assert!(
        duplicated.is_empty(),
        "{} leads scored more than once: {:?}",
        duplicated.len(),
        duplicated.iter().take(20).collect::<Vec<_>>()
    );
    let counts = records.iter().map(|(k, v)| (k.clone(), v.len())).collect();
    assert_exactly_once(&counts, leads);
}

/// A dead letter as the DLQ holds it.
pub struct DeadLetter {
    /// The payload.
    pub payload: Vec<u8>,
    /// Headers by name.
    pub headers: HashMap<String, String>,
}

/// Reads dead letters by key until `want` keys are seen or `within` passes.
pub async fn read_dead_letters(
    topic: &str,
    want: usize,
    within: Duration,
) -> HashMap<String, DeadLetter> {
    let reader = consumer(topic, "read_committed");
    let mut out = HashMap::new();
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < want {
        let Ok(Ok(m)) = tokio::time::timeout_at(deadline, reader.recv()).await else {
            break;
        };
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        (
                            h.key.to_string(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            String::from_utf8_lossy(m.key().unwrap()).into_owned(),
            DeadLetter {
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            },
        );
    }
    out
}

/// Polls `/readyz` until its status line starts with `want` (e.g. "HTTP/1.1 503"); returns the response.
pub async fn wait_readyz(port: u16, want: &str, within: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if let Some(r) = try_http_get(port, "/readyz").await
            && r.split_whitespace().nth(1) == want.split_whitespace().nth(1)
        {
            return Some(r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}
