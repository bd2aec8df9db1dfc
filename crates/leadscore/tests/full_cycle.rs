//! The whole loop on the real stack, time compressed through configuration:
//! leads with injected drift -> scorer -> drift aggregator (warning, then
//! critical) -> retrain trigger -> training worker (MLflow) -> lifecycle
//! controller: shadow scores appear, canary 10/50/100, the challenger is
//! promoted; every lifecycle step is on the topic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::path::Path;
use std::process::{Command, Stdio};

use leadscore_e2e::Service;
use std::time::Duration;

use leadscore_crm::{DriftSpec, Generator, GeneratorConfig};
use leadscore_e2e::{client, consumer, create_topic, delete_topics, receive, terminate, unique};
use leadscore_lifecycle::events::LifecycleEvent;
use leadscore_registry::{Decoder, Registry};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// `127.0.0.1:<free port>`, for a service's health endpoint.
fn free_port() -> String {
    format!("127.0.0.1:{}", leadscore_e2e::free_port())
}

fn spawn(args: &[&str], env: &[(String, String)]) -> Service {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
    cmd.args(args)
        .env("LEADSCORE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap().into()
}

fn kv(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

const TOPICS: [&str; 13] = [
    "in",
    "scores",
    "shadow",
    "dlq",
    "metrics",
    "alerts",
    "partials",
    "dstate",
    "requests",
    "rstate",
    "lifecycle",
    "commands",
    "lstate",
];

/// Every topic the services use, under `base`: leads and scores on 2 partitions.
async fn create_topics(base: &str) {
    for s in TOPICS {
        let partitions = if ["in", "scores", "shadow"].contains(&s) {
            2
        } else {
            1
        };
        create_topic(&format!("{base}.{s}"), partitions).await;
    }
}

async fn delete_all(base: &str) {
    for s in TOPICS {
        delete_topics(&[&format!("{base}.{s}")]).await;
    }
}

/// Sends 200 generated leads with event times from `ts` (10 ms apart); returns their ids.
async fn send_window(
    producer: &FutureProducer,
    topic: &str,
    g: &mut Generator,
    ts: i64,
) -> Vec<String> {
    let mut sends = Vec::new();
    let mut ids = Vec::new();
    for i in 0..200 {
        let lead = g.next_lead().lead;
        let bytes = leadscore_e2e::debezium_create(&lead, ts + i * 10);
        sends.push(
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .key(lead.lead_id.as_str())
                        .payload(&bytes),
                )
                .map_err(|(e, _)| e)
                .unwrap(),
        );
        ids.push(lead.lead_id);
    }
    for s in sends {
        s.await.unwrap().unwrap();
    }
    ids
}

/// The lifecycle events of `name` on the topic since the last call: (stage, version, percent, reason).
async fn lifecycle_events(
    c: &rdkafka::consumer::StreamConsumer,
    decoder: &Decoder,
    name: &str,
) -> Vec<(String, String, i32, String)> {
    let mut out = Vec::new();
    for m in receive(c, usize::MAX, Duration::from_millis(700)).await {
        let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
        let e = LifecycleEvent::from_value(&v).unwrap();
        if e.model_name == name {
            eprintln!(
                "lifecycle: {} v{} {}% ({})",
                e.stage.as_str(),
                e.version,
                e.canary_percent,
                e.reason
            );
            out.push((
                e.stage.as_str().to_string(),
                e.version,
                e.canary_percent,
                e.reason,
            ));
        }
    }
    out
}

/// Every service's configuration: topics under `base`, model `name`, 2-second windows.
fn env(base: &str, name: &str, mlflow: &str, csv: &Path) -> Vec<(String, String)> {
    let python = std::env::var("LEADSCORE_PYTHON")
        .expect("LEADSCORE_PYTHON (from `deploy/local/stack env`) runs the training job");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let t = |s: &str| format!("{base}.{s}");
    let alias = |a: &str| format!("mlflow+{mlflow}/{name}@{a}");
    kv(&[
        ("LEADSCORE__SCORER__INPUT_TOPIC", t("in")),
        ("LEADSCORE__SCORER__SCORES_TOPIC", t("scores")),
        ("LEADSCORE__SCORER__SHADOW_TOPIC", t("shadow")),
        ("LEADSCORE__SCORER__DLQ_TOPIC", t("dlq")),
        ("LEADSCORE__SCORER__GROUP_ID", format!("{base}-scorer")),
        (
            "LEADSCORE__SCORER__TRANSACTIONAL_ID_PREFIX",
            format!("{base}-scorer"),
        ),
        ("LEADSCORE__SCORER__CHAMPION_MODEL", alias("champion")),
        ("LEADSCORE__SCORER__CHALLENGER_MODEL", alias("challenger")),
        ("LEADSCORE__SCORER__CANARY_MODEL", alias("canary")),
        ("LEADSCORE__SCORER__LIFECYCLE_TOPIC", t("lifecycle")),
        ("LEADSCORE__SCORER__MODEL_POLL_SECS", "2".into()),
        ("LEADSCORE__SCORER__MAX_BATCH", "200".into()),
        ("LEADSCORE__SCORER__HTTP_LISTEN", free_port()),
        // Drift: 2-second windows of event time.
        ("LEADSCORE__DRIFT__SCORES_TOPIC", t("scores")),
        ("LEADSCORE__DRIFT__SHADOW_TOPIC", t("shadow")),
        ("LEADSCORE__DRIFT__METRICS_TOPIC", t("metrics")),
        ("LEADSCORE__DRIFT__ALERTS_TOPIC", t("alerts")),
        ("LEADSCORE__DRIFT__PARTIALS_TOPIC", t("partials")),
        ("LEADSCORE__DRIFT__STATE_TOPIC", t("dstate")),
        ("LEADSCORE__DRIFT__GROUP_ID", format!("{base}-drift")),
        ("LEADSCORE__DRIFT__INSTANCE_ID", "cycle-0".into()),
        // Transactional ids unique per test: tests run side by side.
        (
            "LEADSCORE__DRIFT__TRANSACTIONAL_ID_PREFIX",
            format!("{base}-drift"),
        ),
        (
            "LEADSCORE__DRIFT__MODELS",
            format!("[\"{}\"]", alias("champion")),
        ),
        ("LEADSCORE__DRIFT__MLFLOW_URL", mlflow.to_string()),
        ("LEADSCORE__DRIFT__WINDOW_MS", "2000".into()),
        ("LEADSCORE__DRIFT__ROLLUPS_MS", "[]".into()),
        ("LEADSCORE__DRIFT__LATENESS_MS", "0".into()),
        ("LEADSCORE__DRIFT__IDLE_MS", "1000".into()),
        ("LEADSCORE__DRIFT__CHECKPOINT_MS", "300".into()),
        ("LEADSCORE__DRIFT__THRESHOLDS__MIN_SAMPLE", "100".into()),
        ("LEADSCORE__DRIFT__HTTP_LISTEN", free_port()),
        ("LEADSCORE__ALERTING__ENABLED", "false".into()),
        // Retrain trigger: a critical window asks at once.
        ("LEADSCORE__RETRAIN__METRICS_TOPIC", t("metrics")),
        ("LEADSCORE__RETRAIN__ALERTS_TOPIC", t("alerts")),
        ("LEADSCORE__RETRAIN__REQUESTS_TOPIC", t("requests")),
        ("LEADSCORE__RETRAIN__STATE_TOPIC", t("rstate")),
        ("LEADSCORE__RETRAIN__GROUP_ID", format!("{base}-retrain")),
        (
            "LEADSCORE__RETRAIN__TRANSACTIONAL_ID",
            format!("{base}-retrain"),
        ),
        ("LEADSCORE__RETRAIN__MODELS", "[]".into()),
        ("LEADSCORE__RETRAIN__MIN_LABELLED_ROWS", "0".into()),
        ("LEADSCORE__RETRAIN__TICK_MS", "200".into()),
        ("LEADSCORE__RETRAIN__HTTP_LISTEN", free_port()),
        // Training worker: a margin of -1 registers the new version as challenger.
        ("LEADSCORE__TRAINING__REQUESTS_TOPIC", t("requests")),
        ("LEADSCORE__TRAINING__LIFECYCLE_TOPIC", t("lifecycle")),
        ("LEADSCORE__TRAINING__GROUP_ID", format!("{base}-training")),
        (
            "LEADSCORE__TRAINING__TRANSACTIONAL_ID",
            format!("{base}-training"),
        ),
        ("LEADSCORE__TRAINING__PYTHON", python),
        (
            "LEADSCORE__TRAINING__DIR",
            repo.join("training").display().to_string(),
        ),
        ("LEADSCORE__TRAINING__DATA", csv.display().to_string()),
        ("LEADSCORE__TRAINING__MLFLOW_URL", mlflow.to_string()),
        ("LEADSCORE__TRAINING__TRIALS", "2".into()),
        (
            "LEADSCORE__TRAINING__EXTRA_ARGS",
            r#"["--cv-splits", "2", "--min-rows", "500", "--gate-margin", "-1"]"#.into(),
        ),
        ("LEADSCORE__TRAINING__HTTP_LISTEN", free_port()),
        // Lifecycle controller: steps as soon as the figures are there.
        ("LEADSCORE__LIFECYCLE__LIFECYCLE_TOPIC", t("lifecycle")),
        ("LEADSCORE__LIFECYCLE__METRICS_TOPIC", t("metrics")),
        ("LEADSCORE__LIFECYCLE__COMMANDS_TOPIC", t("commands")),
        ("LEADSCORE__LIFECYCLE__STATE_TOPIC", t("lstate")),
        (
            "LEADSCORE__LIFECYCLE__GROUP_ID",
            format!("{base}-lifecycle"),
        ),
        (
            "LEADSCORE__LIFECYCLE__TRANSACTIONAL_ID",
            format!("{base}-lifecycle"),
        ),
        ("LEADSCORE__LIFECYCLE__MODELS", format!("[\"{name}\"]")),
        ("LEADSCORE__LIFECYCLE__MLFLOW_URL", mlflow.to_string()),
        ("LEADSCORE__LIFECYCLE__SHADOW_MIN_MS", "0".into()),
        ("LEADSCORE__LIFECYCLE__SHADOW_MIN_PAIRS", "50".into()),
        ("LEADSCORE__LIFECYCLE__STEP_MIN_MS", "0".into()),
        ("LEADSCORE__LIFECYCLE__STEP_MIN_SCORES", "5".into()),
        ("LEADSCORE__LIFECYCLE__MAX_LATENCY_REGRESSION", "100".into()),
        ("LEADSCORE__LIFECYCLE__TICK_MS", "200".into()),
        ("LEADSCORE__LIFECYCLE__RESCORE_RATE", "0".into()),
        ("LEADSCORE__LIFECYCLE__HTTP_LISTEN", free_port()),
    ])
}

/// One cycle's own topics under a unique base and its model's v1, the champion, trained and
/// registered in MLflow on 3,000 generated leads (`seed`).
struct Cycle {
    mlflow: String,
    name: String,
    base: String,
    /// Holds the leads CSV and the model directories (`v1`, ...).
    dir: tempfile::TempDir,
    csv: std::path::PathBuf,
}

async fn champion(name: &str, base: &str, seed: u64) -> Cycle {
    let mlflow =
        std::env::var("MLFLOW_TRACKING_URI").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let (name, base) = (unique(name), unique(base));
    create_topics(&base).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, seed, 3000);
    leadscore_e2e::train_and_register(&csv, &dir.path().join("v1"), &name, &mlflow, "0.02");
    Cycle {
        mlflow,
        name,
        base,
        dir,
        csv,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_to_retraining_to_shadow_canary_and_promotion() {
    // v1: the champion, trained on generated leads.
    let Cycle {
        mlflow,
        name,
        base,
        dir: _dir,
        csv,
    } = champion("it-cycle", "it.cycle", 41).await;
    let t = |s: &str| format!("{base}.{s}");
    let env = env(&base, &name, &mlflow, &csv);
    let mut services = vec![
        spawn(&["scorer"], &env),
        spawn(&["drift"], &env),
        spawn(&["retrain"], &env),
        spawn(&["retrain", "worker"], &env),
        spawn(&["model", "controller"], &env),
    ];

    // Leads keep coming, 200 per 2-second window of event time: clean, a warning-level
    // mix change, then a critical shift; then clean leads while the rollout runs.
    let producer: FutureProducer = client(&[("linger.ms", "5")]).create().unwrap();
    let decoder = Decoder::new(Registry::new(&leadscore_e2e::config().registry).unwrap());
    let lifecycle = consumer(&t("lifecycle"), "read_committed");
    let mut steps: Vec<(String, String, i32)> = Vec::new();
    let mut ts = chrono::Utc::now().timestamp_millis() / 2000 * 2000;
    let knob = |f: &dyn Fn(&mut DriftSpec) -> leadscore_crm::Result<()>| {
        let mut d = DriftSpec::default();
        f(&mut d).unwrap();
        d
    };
    let plan: Vec<DriftSpec> = vec![
        DriftSpec::default(),
        DriftSpec::default(),
        knob(&|d| d.add_mix("industry=Retail:4")),
        knob(&|d| d.add_shift("page_views=+25")),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(400);
    let mut window = 0u64;
    while tokio::time::Instant::now() < deadline
        && !steps.iter().any(|s| s.0 == "promoted" && s.1 == "2")
    {
        for s in &mut services {
            assert!(
                s.try_wait().unwrap().is_none(),
                "a service stopped (see its log above)"
            );
        }
        let spec = plan.get(window as usize).cloned().unwrap_or_default();
        let mut g = Generator::new(GeneratorConfig {
            seed: 500 + window,
            id_prefix: format!("{name}-w{window}"),
            drift: spec,
            ..Default::default()
        });
        send_window(&producer, &t("in"), &mut g, ts).await;
        ts += 2000;
        window += 1;
        for e in lifecycle_events(&lifecycle, &decoder, &name).await {
            steps.push((e.0, e.1, e.2));
        }
    }
    for s in services {
        terminate(s);
    }
    let seen: Vec<(&str, i32)> = steps.iter().map(|s| (s.0.as_str(), s.2)).collect();
    let want = [
        ("training", 0),
        ("registered", 0),
        ("shadow", 0),
        ("canary", 10),
        ("canary", 50),
        ("canary", 100),
        ("promoted", 0),
    ];
    let mut it = seen.iter();
    for w in want {
        assert!(it.any(|s| *s == w), "{w:?} missing in order from {seen:?}");
    }
    // Shadow scores of the challenger appeared while it was in shadow.
    let shadow = receive(
        &consumer(&t("shadow"), "read_committed"),
        1,
        Duration::from_secs(5),
    )
    .await;
    assert!(!shadow.is_empty(), "no shadow scores");
    delete_all(&base).await;
}

/// A string field of a decoded record (unions unwrapped).
fn text(v: &apache_avro::types::Value, path: &[&str]) -> Option<String> {
    use apache_avro::types::Value;
    let mut v = v;
    for name in path {
        let Value::Record(fields) = v else {
            return None;
        };
        v = &fields.iter().find(|(n, _)| n == name)?.1;
        if let Value::Union(_, inner) = v {
            v = inner;
        }
    }
    match v {
        Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenger_failing_on_leads_is_rolled_back_in_canary_and_every_lead_is_still_scored() {
    // v1 the champion; v2 the same model exported with a fixed batch size of one:
    // it loads, but fails on every batch of two leads or more.
    let Cycle {
        mlflow,
        name,
        base,
        dir,
        csv,
    } = champion("it-failing", "it.failing", 43).await;
    let t = |s: &str| format!("{base}.{s}");
    let v2 = leadscore_e2e::register_static_batch_copy(
        &dir.path().join("v1"),
        &dir.path().join("v2"),
        &name,
        &mlflow,
    );
    assert_eq!(v2, "2");

    let mut env = env(&base, &name, &mlflow, &csv);
    // Straight to the canary; the step never completes on its own: only a rollback ends it.
    env.extend(kv(&[
        ("LEADSCORE__LIFECYCLE__SHADOW_MIN_PAIRS", "0".into()),
        ("LEADSCORE__LIFECYCLE__STEP_MIN_SCORES", "100000000".into()),
    ]));
    let mut services = vec![
        spawn(&["scorer"], &env),
        spawn(&["drift"], &env),
        spawn(&["model", "controller"], &env),
    ];
    // What the training worker publishes for a version that passed its gate.
    let registered = LifecycleEvent {
        event_id: "req-1/registered".into(),
        model_name: name.clone(),
        version: "2".into(),
        stage: leadscore_lifecycle::events::Stage::Registered,
        canary_percent: 0,
        champion_version: Some("1".into()),
        challenger_version: Some("2".into()),
        reason: "trained".into(),
        at_ms: chrono::Utc::now().timestamp_millis(),
    };
    leadscore_e2e::publish_avro(
        &t("lifecycle"),
        &name,
        "ModelLifecycleEvent.avsc",
        registered.to_value(),
    )
    .await;

    let producer: FutureProducer = client(&[("linger.ms", "5")]).create().unwrap();
    let decoder = Decoder::new(Registry::new(&leadscore_e2e::config().registry).unwrap());
    let lifecycle = consumer(&t("lifecycle"), "read_committed");
    let mut steps = Vec::new();
    let mut sent = std::collections::BTreeSet::new();
    let mut ts = chrono::Utc::now().timestamp_millis() / 2000 * 2000;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let mut window = 0u64;
    while tokio::time::Instant::now() < deadline
        && !steps
            .iter()
            .any(|s: &(String, String, i32, String)| s.0 == "rolled_back")
    {
        for s in &mut services {
            assert!(
                s.try_wait().unwrap().is_none(),
                "a service stopped (see its log above)"
            );
        }
        let mut g = Generator::new(GeneratorConfig {
            seed: 900 + window,
            id_prefix: format!("{name}-w{window}"),
            ..Default::default()
        });
        sent.extend(send_window(&producer, &t("in"), &mut g, ts).await);
        ts += 2000;
        window += 1;
        steps.extend(lifecycle_events(&lifecycle, &decoder, &name).await);
    }
    // The controller's steps (the worker's `registered` event is the test's own).
    steps.retain(|s| s.0 != "registered");
    let seen: Vec<(&str, i32)> = steps.iter().map(|s| (s.0.as_str(), s.2)).collect();
    assert_eq!(
        seen,
        [("shadow", 0), ("canary", 10), ("rolled_back", 0)],
        "{steps:?}"
    );
    let reason = &steps[2].3;
    assert!(
        reason.contains("automatic rollback of v2") && reason.contains("error rate"),
        "{reason}"
    );

    // Every lead got a live score, nearly all from the champion.
    let scores = consumer(&t("scores"), "read_committed");
    let mut scored = std::collections::BTreeMap::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    while scored.len() < sent.len() && tokio::time::Instant::now() < until {
        for m in receive(&scores, usize::MAX, Duration::from_secs(2)).await {
            let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
            let id = text(&v, &["lead_id"]).unwrap();
            scored.insert(id, text(&v, &["model_version"]).unwrap());
        }
    }
    for s in services {
        terminate(s);
    }
    assert_eq!(scored.len(), sent.len(), "leads without a live score");
    assert!(scored.keys().eq(sent.iter()));
    // A batch with a single canary lead is one the fixed-batch model can score: rare.
    let from_champion = scored.values().filter(|v| *v == "1").count();
    assert!(
        from_champion * 10 >= sent.len() * 9,
        "{from_champion} of {} live scores from the champion",
        sent.len()
    );
    // v2's failures are on the shadow topic, as errors of v2, from shadow and from the canary.
    let shadow = receive(
        &consumer(&t("shadow"), "read_committed"),
        usize::MAX,
        Duration::from_secs(5),
    )
    .await;
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    for m in &shadow {
        let v = decoder.decode(leadscore_e2e::payload(m)).await.unwrap();
        if text(&v, &["error"]).is_some() {
            assert_eq!(text(&v, &["shadow", "model_version"]).as_deref(), Some("2"));
            *failures.entry(text(&v, &["reason"]).unwrap()).or_default() += 1;
        }
    }
    assert!(
        failures.get("challenger").is_some_and(|n| *n > 0),
        "{failures:?}"
    );
    assert!(
        failures.get("canary").is_some_and(|n| *n > 0),
        "{failures:?}"
    );
    let alias = |a: &'static str| leadscore_e2e::mlflow_alias(&mlflow, &name, a);
    assert_eq!(alias("champion").await.as_deref(), Some("1"));
    assert_eq!(alias("challenger").await, None);
    assert_eq!(alias("canary").await, None);
    delete_all(&base).await;
}

/// The CI workflow's model rollout, `scripts/rollout.sh`, driving the real services: it asks
/// for a retrain, follows `leadscore model status` through shadow and the canary steps, and
/// exits 0 once the new version is champion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_rollout_script_takes_a_new_version_to_champion() {
    let Cycle {
        mlflow,
        name,
        base,
        dir: _dir,
        csv,
    } = champion("it-rollout-script", "it.rollscript", 43).await;
    let t = |s: &str| format!("{base}.{s}");
    let env = env(&base, &name, &mlflow, &csv);
    let mut services = vec![
        spawn(&["scorer"], &env),
        spawn(&["drift"], &env),
        spawn(&["retrain", "worker"], &env),
        spawn(&["model", "controller"], &env),
    ];
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut script = Command::new(repo.join("scripts/rollout.sh"));
    script
        .args([name.as_str(), "release it-test", "300"])
        .env("LEADSCORE_CLI", env!("CARGO_BIN_EXE_leadscore"))
        .env("ROLLOUT_POLL_SECS", "1")
        .env("ROLLOUT_BY", "it-ci")
        .env("LEADSCORE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in &env {
        script.env(k, v);
    }
    let mut rollout: Service = script.spawn().unwrap().into();

    // Leads keep coming (clean) so the shadow and canary steps have scores to judge.
    let producer: FutureProducer = client(&[("linger.ms", "5")]).create().unwrap();
    let mut ts = chrono::Utc::now().timestamp_millis() / 2000 * 2000;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(400);
    let mut window = 0u64;
    let status = loop {
        if let Some(status) = rollout.try_wait().unwrap() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollout.sh did not finish"
        );
        for s in &mut services {
            assert!(
                s.try_wait().unwrap().is_none(),
                "a service stopped (see its log above)"
            );
        }
        let mut g = Generator::new(GeneratorConfig {
            seed: 900 + window,
            id_prefix: format!("{name}-w{window}"),
            ..Default::default()
        });
        send_window(&producer, &t("in"), &mut g, ts).await;
        ts += 2000;
        window += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let mut out = String::new();
    std::io::Read::read_to_string(rollout.stdout.as_mut().unwrap(), &mut out).unwrap();
    for s in services {
        terminate(s);
    }
    assert!(status.success(), "rollout.sh failed: {out}");
    assert!(out.contains("version 2 is champion"), "{out}");
    // What the script followed, as the controller recorded it.
    let decoder = Decoder::new(Registry::new(&leadscore_e2e::config().registry).unwrap());
    let lifecycle = consumer(&t("lifecycle"), "read_committed");
    let mut seen: Vec<(String, i32)> = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|s| s.0 == "promoted") && tokio::time::Instant::now() < until {
        seen.extend(
            lifecycle_events(&lifecycle, &decoder, &name)
                .await
                .into_iter()
                .map(|e| (e.0, e.2)),
        );
    }
    let mut it = seen.iter();
    for w in [
        ("training", 0),
        ("registered", 0),
        ("shadow", 0),
        ("canary", 10),
        ("canary", 50),
        ("canary", 100),
        ("promoted", 0),
    ] {
        assert!(
            it.any(|s| (s.0.as_str(), s.1) == w),
            "{w:?} missing in order from {seen:?}"
        );
    }
    delete_all(&base).await;
}
