//! The lifecycle controller against the real broker, registry and MLflow:
//! a registered challenger goes shadow -> canary 10/50/100 -> champion
//! (resuming at the right step after SIGKILLs at random points), one command rolls the
//! promotion back, and a slower canary is rolled back automatically.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::process::{Child, Command, Stdio};

use leadscore_e2e::Service;
use std::time::Duration;

use leadscore_drift::report::{LatencySummary, ShadowAgreement, WindowKind, WindowReport};
use leadscore_e2e::{
    consumer, create_topic, delete_topics, free_port, publish_avro, receive, terminate, unique,
};
use leadscore_lifecycle::events::{LifecycleEvent, Stage};
use leadscore_registry::{Decoder, Registry};

const H: i64 = 3_600_000;

struct Topics {
    lifecycle: String,
    metrics: String,
    commands: String,
    state: String,
    group: String,
}

impl Topics {
    async fn create() -> Self {
        let base = unique("it.lifecycle");
        let t = Topics {
            lifecycle: format!("{base}.lifecycle"),
            metrics: format!("{base}.metrics"),
            commands: format!("{base}.commands"),
            state: format!("{base}.state"),
            group: base,
        };
        for name in [&t.lifecycle, &t.metrics, &t.commands, &t.state] {
            create_topic(name, 1).await;
        }
        t
    }

    fn env(&self, model: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "LEADSCORE__LIFECYCLE__LIFECYCLE_TOPIC",
                self.lifecycle.clone(),
            ),
            ("LEADSCORE__LIFECYCLE__METRICS_TOPIC", self.metrics.clone()),
            (
                "LEADSCORE__LIFECYCLE__COMMANDS_TOPIC",
                self.commands.clone(),
            ),
            ("LEADSCORE__LIFECYCLE__STATE_TOPIC", self.state.clone()),
            ("LEADSCORE__LIFECYCLE__GROUP_ID", self.group.clone()),
            ("LEADSCORE__LIFECYCLE__TRANSACTIONAL_ID", self.group.clone()),
            ("LEADSCORE__LIFECYCLE__MODELS", format!("[\"{model}\"]")),
            ("LEADSCORE__LIFECYCLE__MLFLOW_URL", mlflow_url()),
            ("LEADSCORE__LIFECYCLE__SHADOW_MIN_MS", "0".into()),
            ("LEADSCORE__LIFECYCLE__SHADOW_MIN_PAIRS", "100".into()),
            ("LEADSCORE__LIFECYCLE__STEP_MIN_MS", "0".into()),
            ("LEADSCORE__LIFECYCLE__STEP_MIN_SCORES", "50".into()),
            ("LEADSCORE__LIFECYCLE__TICK_MS", "200".into()),
            // Re-scoring after promotion is tested on its own (it would send every open CRM lead).
            ("LEADSCORE__LIFECYCLE__RESCORE_RATE", "0".into()),
            ("LEADSCORE_LOG", "warn".into()),
        ]
    }
}

fn mlflow_url() -> String {
    std::env::var("MLFLOW_TRACKING_URI").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

fn leadscore(args: &[&str], env: &[(&'static str, String)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn start(t: &Topics, model: &str) -> Service {
    leadscore(&["model", "controller"], &t.env(model))
        .env(
            "LEADSCORE__LIFECYCLE__HTTP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
        .into()
}

/// What the training worker would publish.
async fn worker_event(t: &Topics, model: &str, id: &str, version: &str, stage: Stage) {
    let e = LifecycleEvent {
        event_id: format!("{id}/{}", stage.as_str()),
        model_name: model.into(),
        version: version.into(),
        stage,
        canary_percent: 0,
        champion_version: None,
        challenger_version: None,
        reason: "trained".into(),
        at_ms: chrono::Utc::now().timestamp_millis(),
    };
    publish_avro(
        &t.lifecycle,
        model,
        "ModelLifecycleEvent.avsc",
        e.to_value(),
    )
    .await;
}

/// An hourly report of `version` for the `n`th hour from now (each step counts only newer windows).
async fn report(
    t: &Topics,
    model: &str,
    version: &str,
    n: i64,
    scored: u64,
    p95: f64,
    shadow: Option<(&str, u64)>,
) {
    let start = (chrono::Utc::now().timestamp_millis() / H + n) * H;
    let r = WindowReport {
        model_name: model.into(),
        model_version: version.into(),
        kind: WindowKind::Hourly,
        start_ms: start,
        end_ms: start + H,
        scored,
        late_events: 0,
        errors: 0,
        features: Vec::new(),
        score_psi: None,
        score_judged: true,
        shadow: shadow.map(|(v, n)| ShadowAgreement {
            challenger_version: v.into(),
            pairs: n,
            mean_abs_diff: 0.01,
            band_agreement: 0.95,
            top_reason_agreement: None,
            reason_pairs: 0,
        }),
        latency: Some(LatencySummary {
            p50_ms: p95 / 2.0,
            p95_ms: p95,
            p99_ms: p95,
            max_ms: p95,
        }),
        outcomes: None,
        emitted_at_ms: start,
    };
    publish_avro(&t.metrics, model, "WindowReport.avsc", r.to_value()).await;
}

/// (stage, version, canary percent, reason) of the controller's events, waiting for `want`.
async fn steps(t: &Topics, want: usize) -> Vec<(String, String, i32, String)> {
    let decoder = Decoder::new(Registry::new(&leadscore_e2e::config().registry).unwrap());
    let c = consumer(&t.lifecycle, "read_committed");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < want && tokio::time::Instant::now() < deadline {
        out.clear();
        let c = consumer(&t.lifecycle, "read_committed");
        for m in receive(&c, usize::MAX, Duration::from_secs(2)).await {
            let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
            let e = LifecycleEvent::from_value(&v).unwrap();
            if e.event_id.starts_with("rollout/") {
                out.push((
                    e.stage.as_str().to_string(),
                    e.version,
                    e.canary_percent,
                    e.reason,
                ));
            }
        }
    }
    drop(c);
    out
}

async fn alias(model: &str, alias: &str) -> Option<String> {
    leadscore_e2e::mlflow_alias(&mlflow_url(), model, alias).await
}

fn kill(child: impl Into<Child>) {
    let mut child = child.into();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenger_is_rolled_out_to_champion_and_a_slower_one_is_rolled_back() {
    let t = Topics::create().await;
    let model = unique("it-rollout");
    // Two real versions in MLflow: v1 champion, v2 a better-or-equal challenger.
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 9, 3000);
    leadscore_e2e::train_and_register(&csv, &dir.path().join("v1"), &model, &mlflow_url(), "0.02");
    leadscore_e2e::train_and_register(&csv, &dir.path().join("v2"), &model, &mlflow_url(), "-1");
    assert_eq!(alias(&model, "champion").await.as_deref(), Some("1"));

    let controller = start(&t, &model);
    worker_event(&t, &model, "req-1", "1", Stage::Promoted).await;
    worker_event(&t, &model, "req-2", "2", Stage::Registered).await;
    // Shadow pairs on the champion's next report start the canary.
    steps(&t, 1).await;
    report(&t, &model, "1", 0, 1000, 100.0, Some(("2", 150))).await;
    let got = steps(&t, 2).await;
    assert_eq!(
        got.iter().map(|s| (s.0.as_str(), s.2)).collect::<Vec<_>>(),
        [("shadow", 0), ("canary", 10)],
        "{got:?}"
    );
    assert_eq!(alias(&model, "canary").await.as_deref(), Some("2"));

    // SIGKILL mid-rollout: the restarted controller resumes at canary 10.
    kill(controller);
    let controller = start(&t, &model);
    let status = leadscore(&["model", "status"], &t.env(&model))
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        status.contains("canary") && status.contains(" 10"),
        "{status}"
    );
    // The canary scores as fast as the champion, window after window: 50%, 100%, champion.
    // After each of the first two steps, another SIGKILL at a random point and a restart.
    let seed = uuid::Uuid::new_v4().as_u128();
    let mut controller = controller;
    for (n, want) in [(1, 3), (2, 4), (3, 6)] {
        report(&t, &model, "1", n, 900, 100.0, None).await;
        report(&t, &model, "2", n, 60, 105.0, None).await;
        if n < 3 {
            let delay = ((seed >> (n * 20)) as u64 & 0xfffff) % 1_000;
            tokio::time::sleep(Duration::from_millis(delay)).await;
            eprintln!("kill after window {n}'s reports, {delay} ms after they were sent");
            kill(controller);
            controller = start(&t, &model);
        }
        steps(&t, want).await;
    }
    let got = steps(&t, 6).await;
    let seen: Vec<(&str, i32)> = got.iter().map(|s| (s.0.as_str(), s.2)).collect();
    assert_eq!(
        seen,
        [
            ("shadow", 0),
            ("canary", 10),
            ("canary", 50),
            ("canary", 100),
            ("promoted", 0),
            ("archived", 0)
        ],
        "{got:?}"
    );
    assert_eq!(alias(&model, "champion").await.as_deref(), Some("2"));
    assert_eq!(alias(&model, "canary").await, None);
    assert_eq!(alias(&model, "challenger").await, None);

    // One command: v1 is champion again.
    let out = leadscore_e2e::succeed(&mut leadscore(
        &["model", "rollback", "--model", &model, "--by", "ops-1"],
        &t.env(&model),
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rolled_back"));
    assert_eq!(alias(&model, "champion").await.as_deref(), Some("1"));

    // v2 comes back as challenger, but its canary is four times slower: rolled back automatically.
    worker_event(&t, &model, "req-3", "2", Stage::Registered).await;
    steps(&t, 8).await;
    report(&t, &model, "1", 4, 1000, 100.0, Some(("2", 150))).await;
    steps(&t, 9).await;
    report(&t, &model, "1", 5, 900, 100.0, None).await;
    report(&t, &model, "2", 5, 60, 400.0, None).await;
    let got = steps(&t, 10).await;
    let last = got.last().unwrap();
    assert_eq!(
        (last.0.as_str(), last.1.as_str()),
        ("rolled_back", "2"),
        "{got:?}"
    );
    assert!(
        last.3.contains("automatic rollback") && last.3.contains("p95 latency"),
        "{}",
        last.3
    );
    assert_eq!(alias(&model, "champion").await.as_deref(), Some("1"));
    assert_eq!(alias(&model, "canary").await, None);
    terminate(controller);
    delete_topics(&[&t.lifecycle, &t.metrics, &t.commands, &t.state]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescoring_sends_every_open_lead_through_the_scorer_keyed_like_debezium() {
    let prefix = unique("it-rescore");
    let generated: Vec<leadscore_crm::Generated> =
        leadscore_crm::Generator::new(leadscore_crm::GeneratorConfig {
            seed: 77,
            id_prefix: prefix.clone(),
            end: chrono::Utc::now(),
            ..Default::default()
        })
        .take(80)
        .collect();
    let open: std::collections::BTreeSet<String> = generated
        .iter()
        .filter(|g| !g.lead.status.is_outcome())
        .map(|g| g.lead.lead_id.clone())
        .collect();
    assert!(
        !open.is_empty() && open.len() < generated.len(),
        "a mix of open and closed leads"
    );
    let url = leadscore_e2e::config().postgres.url;
    let mut pg = leadscore_postgres::connect(&url).await.unwrap();
    leadscore_postgres::upsert_leads(&mut pg, &generated)
        .await
        .unwrap();

    let base = unique("it.rescore");
    let (input, scores, shadow, dlq) = (
        format!("{base}.in"),
        format!("{base}.scores"),
        format!("{base}.shadow"),
        format!("{base}.dlq"),
    );
    for t in [&input, &scores, &shadow, &dlq] {
        create_topic(t, 3).await;
    }
    leadscore_e2e::succeed(&mut leadscore(
        &["model", "rescore", "--rate", "5000"],
        &[
            ("LEADSCORE__LIFECYCLE__RESCORE_TOPIC", input.clone()),
            ("LEADSCORE_LOG", "error".into()),
        ],
    ));
    // Our open leads are on the input topic, keyed like Debezium, without PII.
    let sent = receive(
        &consumer(&input, "read_committed"),
        usize::MAX,
        Duration::from_secs(5),
    )
    .await;
    let ours: Vec<_> = sent
        .iter()
        .filter(|m| String::from_utf8_lossy(rdkafka::Message::key(*m).unwrap()).contains(&prefix))
        .collect();
    assert_eq!(ours.len(), open.len());
    for m in &ours {
        let key = String::from_utf8_lossy(rdkafka::Message::key(*m).unwrap()).to_string();
        let id: serde_json::Value = serde_json::from_str(&key).unwrap();
        assert!(open.contains(id["lead_id"].as_str().unwrap()), "{key}");
        let payload = leadscore_e2e::payload(m);
        for g in &generated {
            let text = String::from_utf8_lossy(payload);
            assert!(
                !text.contains(&g.pii.email) && !text.contains(&g.pii.full_name),
                "PII in a re-score event"
            );
        }
    }
    // The scorer scores exactly those (op r = snapshot read).
    let mut scorer = leadscore(
        &["scorer"],
        &[
            ("LEADSCORE__SCORER__INPUT_TOPIC", input.clone()),
            ("LEADSCORE__SCORER__SCORES_TOPIC", scores.clone()),
            ("LEADSCORE__SCORER__SHADOW_TOPIC", shadow.clone()),
            ("LEADSCORE__SCORER__DLQ_TOPIC", dlq.clone()),
            ("LEADSCORE__SCORER__GROUP_ID", unique("it-rescore")),
            (
                "LEADSCORE__SCORER__CHAMPION_MODEL",
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../models/default")
                    .display()
                    .to_string(),
            ),
            ("LEADSCORE__SCORER__LIFECYCLE_TOPIC", String::new()),
            (
                "LEADSCORE__SCORER__HTTP_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            ),
            ("LEADSCORE_LOG", "warn".into()),
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::inherit())
    .spawn()
    .unwrap();
    let scored = receive(
        &consumer(&scores, "read_committed"),
        sent.len(),
        Duration::from_secs(60),
    )
    .await;
    let _ = scorer.kill();
    let _ = scorer.wait();
    let scored_ours: std::collections::BTreeSet<String> = scored
        .iter()
        .map(|m| String::from_utf8_lossy(rdkafka::Message::key(m).unwrap()).to_string())
        .filter(|k| k.starts_with(&prefix))
        .collect();
    assert_eq!(scored_ours, open);
    let ids: Vec<&str> = generated.iter().map(|g| g.lead.lead_id.as_str()).collect();
    pg.execute("DELETE FROM public.leads WHERE lead_id = ANY($1)", &[&ids])
        .await
        .unwrap();
    delete_topics(&[&input, &scores, &shadow, &dlq]).await;
}

/// Whether the service on `port` answers `/readyz` with 200.
fn ready(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200")
}

async fn wait_ready(port: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ready(port) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no readiness on {port}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_controller_fences_the_first_which_stops_without_acting() {
    let t = Topics::create().await;
    let model = unique("it-fence");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 11, 2000);
    leadscore_e2e::train_and_register(&csv, &dir.path().join("v1"), &model, &mlflow_url(), "0.02");
    // v2: any second version will do (the controller never loads it).
    leadscore_e2e::register_static_batch_copy(
        &dir.path().join("v1"),
        &dir.path().join("v2"),
        &model,
        &mlflow_url(),
    );

    // Two controllers with the same transactional id (a rolling update gone wrong).
    let (port_a, port_b) = (free_port(), free_port());
    let log_a = dir.path().join("a.log");
    let mut a = leadscore(&["model", "controller"], &t.env(&model))
        .env(
            "LEADSCORE__LIFECYCLE__HTTP_LISTEN",
            format!("127.0.0.1:{port_a}"),
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_a).unwrap())
        .spawn()
        .unwrap();
    wait_ready(port_a).await;
    let b = leadscore(&["model", "controller"], &t.env(&model))
        .env(
            "LEADSCORE__LIFECYCLE__HTTP_LISTEN",
            format!("127.0.0.1:{port_b}"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    wait_ready(port_b).await;

    // Both read the registration; only the second acts, the first stops on its next transaction.
    worker_event(&t, &model, "req-2", "2", Stage::Registered).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = a.try_wait().unwrap() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fenced controller kept running"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let log = std::fs::read_to_string(&log_a).unwrap();
    assert!(!status.success(), "{log}");
    assert!(log.contains("fenced"), "{log}");
    let got = steps(&t, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = steps(&t, 1).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(again, got, "one shadow step, published once");
    assert_eq!((got[0].0.as_str(), got[0].1.as_str()), ("shadow", "2"));
    assert_eq!(alias(&model, "challenger").await.as_deref(), Some("2"));
    terminate(b);
    delete_topics(&[&t.lifecycle, &t.metrics, &t.commands, &t.state]).await;
}
