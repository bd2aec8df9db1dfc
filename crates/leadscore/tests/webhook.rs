//! The webhook service on the real stack, delivering to local HTTP receivers (stand-ins for
//! a CRM's endpoint): every score arrives signed, in order per lead, with keys stable across
//! restarts; a failing and throttling receiver loses nothing; a SIGKILL redelivers and the
//! receiver's dedup gives one effect per score; a refusing endpoint dead-letters without
//! holding up the others.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use leadscore_e2e::scorer::http_get;
use leadscore_e2e::{Service, client, consumer, create_topic, delete_topics, free_port, unique};
use leadscore_model::Band;
use leadscore_registry::Registry;
use leadscore_scorer::records::{self, LeadScore, ModelScore, Role};
use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

const SECRET: &str = "whsec_it_0123456789abcdef";

/// What a receiver answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    Fail(u16),
    Throttle { retry_after_secs: u64 },
}

#[derive(Debug, Clone)]
struct Got {
    key: String,
    lead_id: String,
    kind: String,
    scored_at: String,
}

#[derive(Default)]
struct Inner {
    modes: BTreeMap<String, Mode>,
    /// Accepted deliveries, in arrival order, per endpoint path.
    accepted: BTreeMap<String, Vec<Got>>,
    statuses: BTreeMap<u16, usize>,
    bad_signatures: usize,
    delay: Duration,
}

/// A local HTTP receiver: `/hook/{name}` answers by that name's mode and keeps what it took.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Inner>>);

impl Receiver {
    async fn start() -> (Self, u16) {
        let r = Receiver::default();
        let app = axum::Router::new()
            .route("/hook/{name}", axum::routing::post(handle))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (r, port)
    }

    fn set(&self, name: &str, mode: Mode) {
        self.0.lock().unwrap().modes.insert(name.into(), mode);
    }

    fn accepted(&self, name: &str) -> Vec<Got> {
        self.0
            .lock()
            .unwrap()
            .accepted
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Distinct idempotency keys accepted on `name`: the effects after dedup.
    fn effects(&self, name: &str) -> HashSet<String> {
        self.accepted(name).into_iter().map(|g| g.key).collect()
    }

    async fn wait_effects(&self, name: &str, n: usize, within: Duration) -> HashSet<String> {
        let deadline = Instant::now() + within;
        loop {
            let e = self.effects(name);
            if e.len() >= n || Instant::now() > deadline {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn handle(
    State(r): State<Receiver>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap) {
    let delay = r.0.lock().unwrap().delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let header = |h: &str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let timestamp: i64 = header("leadscore-timestamp").parse().unwrap_or(0);
    let verified = leadscore_webhook::event::verify(
        SECRET.as_bytes(),
        &header("leadscore-signature"),
        timestamp,
        &body,
        chrono::Utc::now().timestamp(),
        300,
    );
    let mut inner = r.0.lock().unwrap();
    let mode = inner.modes.get(&name).copied().unwrap_or(Mode::Ok);
    let (status, mut out) = (
        match mode {
            Mode::Ok => StatusCode::OK,
            Mode::Fail(s) => StatusCode::from_u16(s).unwrap(),
            Mode::Throttle { .. } => StatusCode::TOO_MANY_REQUESTS,
        },
        HeaderMap::new(),
    );
    if let Mode::Throttle { retry_after_secs } = mode {
        out.insert("retry-after", retry_after_secs.to_string().parse().unwrap());
    }
    *inner.statuses.entry(status.as_u16()).or_default() += 1;
    if !verified {
        inner.bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, out);
    }
    if status == StatusCode::OK {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        // The body's id is the idempotency key.
        if v["id"].as_str() != Some(header("leadscore-idempotency-key").as_str()) {
            inner.bad_signatures += 1;
            return (StatusCode::BAD_REQUEST, out);
        }
        inner.accepted.entry(name).or_default().push(Got {
            key: header("leadscore-idempotency-key"),
            lead_id: v["lead_id"].as_str().unwrap_or_default().to_string(),
            kind: v["type"].as_str().unwrap_or_default().to_string(),
            scored_at: v["scored_at"].as_str().unwrap_or_default().to_string(),
        });
    }
    (status, out)
}

/// `versions` successive scores of each of `leads` leads (scored_at rising per lead), all on
/// `topic`, keyed by lead.
async fn produce_scores(topic: &str, prefix: &str, leads: usize, versions: usize) -> usize {
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    let id = registry
        .register(
            &leadscore_schemas::value_subject(topic),
            leadscore_schemas::find("LeadScore.avsc").unwrap().text,
        )
        .await
        .unwrap();
    let producer: FutureProducer = client(&[("linger.ms", "5")]).create().unwrap();
    let mut sends = Vec::new();
    let t0 = 1_800_000_000_000i64;
    for v in 0..versions {
        for l in 0..leads {
            let score = ((l * 7 + v * 13) % 100) as f64 / 100.0;
            let record = LeadScore {
                lead_id: format!("{prefix}-{l:05}"),
                model: ModelScore {
                    model_name: "lead-scoring".into(),
                    model_version: "3".into(),
                    score,
                    band: if score >= 0.5 { Band::High } else { Band::Low },
                    reasons: Some(vec![format!("page_views={l} +0.{v}1")].into()),
                },
                role: Role::Champion,
                features: Vec::new(),
                event_time_ms: t0 + (v * 1_000) as i64,
                scored_at_ms: t0 + (v * 1_000 + 5) as i64,
                latency_ms: 5.0,
                source: None,
            };
            let bytes = records::framed(id, |b| record.encode(b));
            let key = record.lead_id.clone();
            sends.push(
                producer
                    .send_result(FutureRecord::to(topic).key(&key).payload(&bytes))
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
        }
    }
    for s in sends {
        s.await.unwrap().unwrap();
    }
    leads * versions
}

struct Endpoint<'a> {
    name: &'a str,
    extra: &'a str,
}

/// Starts `leadscore webhook` for `topic` with a config file of `endpoints` on `receiver`.
fn start(
    topic: &str,
    dlq: &str,
    group: &str,
    receiver: u16,
    endpoints: &[Endpoint<'_>],
    dir: &tempfile::TempDir,
) -> (Service, u16) {
    let port = free_port();
    let mut toml = String::new();
    for e in endpoints {
        toml.push_str(&format!(
            "[[webhook.endpoints]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{receiver}/hook/{name}\"\nsecret_env = \"IT_WEBHOOK_SECRET\"\nallow_http = true\nretry_initial_ms = 50\nretry_max_ms = 2000\n{extra}\n",
            name = e.name,
            extra = e.extra
        ));
    }
    let path = dir.path().join(format!("webhook-{group}.toml"));
    std::fs::write(&path, toml).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .arg("webhook")
        .env("LEADSCORE_CONFIG", &path)
        .env("IT_WEBHOOK_SECRET", SECRET)
        .env("LEADSCORE__WEBHOOK__SCORES_TOPIC", topic)
        .env("LEADSCORE__WEBHOOK__DLQ_TOPIC", dlq)
        .env("LEADSCORE__WEBHOOK__GROUP_ID", group)
        .env("LEADSCORE__WEBHOOK__COMMIT_INTERVAL_MS", "200")
        .env(
            "LEADSCORE__WEBHOOK__HTTP_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("LEADSCORE_LOG", "warn")
        .spawn()
        .unwrap();
    (child.into(), port)
}

/// Per lead, the accepted scores' times never go back.
fn assert_lead_order(got: &[Got]) {
    let mut last: BTreeMap<&str, &str> = BTreeMap::new();
    for g in got.iter().filter(|g| g.kind == "lead.scored") {
        if let Some(prev) = last.get(g.lead_id.as_str()) {
            assert!(
                *prev <= g.scored_at.as_str(),
                "{}: {} accepted after {}",
                g.lead_id,
                g.scored_at,
                prev
            );
        }
        last.insert(&g.lead_id, &g.scored_at);
    }
}

async fn metric(port: u16, series: &str) -> f64 {
    let page = http_get(port, "/metrics").await;
    page.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_score_arrives_signed_in_lead_order_and_keys_survive_a_restart() {
    let (topic, dlq) = (unique("it-wh-scores"), unique("it-wh-dlq"));
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (receiver, rport) = Receiver::start().await;
    let total = produce_scores(&topic, "wh-a", 100, 3).await;
    // Ten deletes after the scores.
    let producer: FutureProducer = client(&[]).create().unwrap();
    for l in 0..10 {
        let key = format!("wh-a-{l:05}");
        producer
            .send(
                FutureRecord::<str, [u8]>::to(&topic).key(&key),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let total = total + 10;
    let endpoints = [Endpoint {
        name: "crm",
        extra: "",
    }];
    let (svc, port) = start(&topic, &dlq, &unique("it-wh"), rport, &endpoints, &dir);
    let effects = receiver
        .wait_effects("crm", total, Duration::from_secs(60))
        .await;
    assert_eq!(
        effects.len(),
        total,
        "every score and delete delivered once"
    );
    let got = receiver.accepted("crm");
    assert_eq!(receiver.0.lock().unwrap().bad_signatures, 0);
    assert_eq!(got.iter().filter(|g| g.kind == "lead.deleted").count(), 10);
    assert_lead_order(&got);
    assert_eq!(
        metric(
            port,
            "leadscore_webhook_deliveries_total{endpoint=\"crm\",outcome=\"delivered\"}"
        )
        .await as usize,
        got.len()
    );
    let ready = http_get(port, "/readyz").await;
    assert!(ready.contains(" 200 "), "ready while delivering: {ready}");
    leadscore_e2e::terminate(svc);

    // Another group reads everything again: the same keys (a restart's redelivery is
    // recognised by the receiver).
    let (svc, _) = start(
        &topic,
        &dlq,
        &unique("it-wh-again"),
        rport,
        &endpoints,
        &dir,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while receiver.accepted("crm").len() < 2 * total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    leadscore_e2e::terminate(svc);
    assert_eq!(receiver.accepted("crm").len(), 2 * total);
    assert_eq!(
        receiver.effects("crm"),
        effects,
        "the same keys the second time"
    );
    delete_topics(&[&topic, &dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_then_throttling_receiver_loses_nothing_and_keeps_lead_order() {
    let (topic, dlq) = (unique("it-wh-flaky"), unique("it-wh-flaky-dlq"));
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (receiver, rport) = Receiver::start().await;
    receiver.set("crm", Mode::Fail(500));
    let total = produce_scores(&topic, "wh-b", 50, 4).await;
    let endpoints = [Endpoint {
        name: "crm",
        extra: "concurrency = 4",
    }];
    let (svc, port) = start(&topic, &dlq, &unique("it-wh"), rport, &endpoints, &dir);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        receiver.effects("crm").is_empty(),
        "nothing accepted while it fails"
    );
    receiver.set(
        "crm",
        Mode::Throttle {
            retry_after_secs: 1,
        },
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    receiver.set("crm", Mode::Ok);
    let effects = receiver
        .wait_effects("crm", total, Duration::from_secs(60))
        .await;
    assert_eq!(effects.len(), total, "nothing lost");
    let statuses = receiver.0.lock().unwrap().statuses.clone();
    assert!(statuses.get(&500).copied().unwrap_or(0) > 0, "{statuses:?}");
    assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "{statuses:?}");
    let got = receiver.accepted("crm");
    assert_eq!(
        got.len(),
        total,
        "no duplicate accepted once the receiver recovered"
    );
    assert_lead_order(&got);
    assert!(metric(port, "leadscore_webhook_retries_total{endpoint=\"crm\"}").await > 0.0);
    assert_eq!(
        metric(
            port,
            "leadscore_webhook_attempts_total{endpoint=\"crm\",status=\"429\"}"
        )
        .await as usize,
        statuses[&429]
    );
    leadscore_e2e::terminate(svc);
    delete_topics(&[&topic, &dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_stream_redelivers_and_dedup_leaves_one_effect_per_score() {
    let (topic, dlq) = (unique("it-wh-kill"), unique("it-wh-kill-dlq"));
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (receiver, rport) = Receiver::start().await;
    receiver.0.lock().unwrap().delay = Duration::from_millis(4);
    let total = produce_scores(&topic, "wh-c", 500, 4).await;
    let group = unique("it-wh");
    let endpoints = [Endpoint {
        name: "crm",
        extra: "concurrency = 2",
    }];
    let (mut svc, _) = start(&topic, &dlq, &group, rport, &endpoints, &dir);
    receiver
        .wait_effects("crm", total / 4, Duration::from_secs(60))
        .await;
    svc.kill().unwrap();
    svc.wait().unwrap();
    let at_kill = receiver.effects("crm").len();
    assert!(
        at_kill >= total / 4 && at_kill < total,
        "killed mid-stream: {at_kill} of {total}"
    );
    let (svc, _) = start(&topic, &dlq, &group, rport, &endpoints, &dir);
    let effects = receiver
        .wait_effects("crm", total, Duration::from_secs(120))
        .await;
    leadscore_e2e::terminate(svc);
    assert_eq!(effects.len(), total, "every score at least once");
    let got = receiver.accepted("crm");
    assert!(got.len() >= total);
    eprintln!(
        "{} deliveries for {total} scores ({} redelivered after the kill)",
        got.len(),
        got.len() - total
    );
    delete_topics(&[&topic, &dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_dead_letters_with_attempts_and_the_other_is_unaffected() {
    let (topic, dlq) = (unique("it-wh-dead"), unique("it-wh-dead-dlq"));
    create_topic(&topic, 3).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let (receiver, rport) = Receiver::start().await;
    receiver.set("down", Mode::Fail(503));
    receiver.set("gone", Mode::Fail(410));
    let total = produce_scores(&topic, "wh-d", 40, 1).await;
    let endpoints = [
        Endpoint {
            name: "crm",
            extra: "",
        },
        Endpoint {
            name: "down",
            extra: "give_up_after_ms = 1500",
        },
        Endpoint {
            name: "gone",
            extra: "",
        },
        Endpoint {
            name: "high",
            extra: "bands = [\"High\"]",
        },
    ];
    let (svc, port) = start(&topic, &dlq, &unique("it-wh"), rport, &endpoints, &dir);
    let effects = receiver
        .wait_effects("crm", total, Duration::from_secs(60))
        .await;
    assert_eq!(effects.len(), total, "the healthy endpoint got everything");
    // The filtered endpoint gets the High scores only (the bench data: score = 7l % 100 / 100).
    let high = (0..40).filter(|l| (l * 7) % 100 >= 50).count();
    let got_high = receiver
        .wait_effects("high", high, Duration::from_secs(30))
        .await;
    assert_eq!(got_high.len(), high);
    let letters = leadscore_e2e::receive(
        &consumer(&dlq, "read_committed"),
        2 * total,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        letters.len(),
        2 * total,
        "one dead letter per score per failing endpoint"
    );
    let mut by_endpoint: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for m in &letters {
        let text = String::from_utf8(m.payload().unwrap().to_vec()).unwrap();
        assert!(!text.contains(SECRET), "no secret in a dead letter");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            v["lead_id"].as_str().map(str::to_string)
        );
        by_endpoint
            .entry(v["endpoint"].as_str().unwrap().to_string())
            .or_default()
            .push(v);
    }
    for v in &by_endpoint["down"] {
        assert_eq!(v["status"], 503);
        assert!(v["attempts"].as_u64().unwrap() >= 2, "{v}");
        assert_eq!(v["body"]["type"], "lead.scored");
    }
    for v in &by_endpoint["gone"] {
        assert_eq!(v["status"], 410);
        assert_eq!(v["attempts"], 1, "a 410 is not retried");
    }
    assert_eq!(by_endpoint["down"].len(), total);
    assert_eq!(by_endpoint["gone"].len(), total);
    // Every record is done (delivered or dead-lettered everywhere): progress is committed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(port, "leadscore_webhook_in_flight").await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(port, "leadscore_webhook_in_flight").await, 0.0);
    leadscore_e2e::terminate(svc);
    delete_topics(&[&topic, &dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_signs_a_test_event_and_says_what_the_receiver_answered() {
    let (receiver, rport) = Receiver::start().await;
    let ping = |name: &str| {
        Command::new(env!("CARGO_BIN_EXE_leadscore"))
            .args([
                "webhook",
                "ping",
                &format!("http://127.0.0.1:{rport}/hook/{name}"),
            ])
            .env("LEADSCORE_WEBHOOK_SECRET", SECRET)
            .env("LEADSCORE_LOG", "error")
            .output()
            .unwrap()
    };
    let ok = ping("crm");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("HTTP 200"));
    assert_eq!(receiver.accepted("crm")[0].kind, "ping");
    receiver.set("broken", Mode::Fail(500));
    let bad = ping("broken");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("HTTP 500"));
    let unset = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .args([
            "webhook",
            "ping",
            "http://127.0.0.1:9/x",
            "--secret-env",
            "IT_NOT_SET_ANYWHERE",
        ])
        .output()
        .unwrap();
    assert!(!unset.status.success());
    assert!(String::from_utf8_lossy(&unset.stderr).contains("IT_NOT_SET_ANYWHERE"));
}
