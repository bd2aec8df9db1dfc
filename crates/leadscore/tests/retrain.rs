//! The retrain trigger against the real broker, registry and CRM database:
//! sustained drift asks once, the cooldown refuses a second ask (also after a
//! SIGKILL and restart), repeated SIGKILLs give the requests of an uninterrupted
//! run, an operator's request skips the cooldown, the
//! schedule asks when due, and too little labelled data refuses with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::process::{Command, Stdio};

use leadscore_e2e::Service;
use std::time::Duration;

use apache_avro::types::Value;
use leadscore_drift::FeatureDrift;
use leadscore_drift::report::{WindowKind, WindowReport};
use leadscore_e2e::{
    client, consumer, create_topic, delete_topics, free_port, receive, terminate, unique,
};
use leadscore_registry::{Decoder, Encoder, Registry};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

const H: i64 = 3_600_000;

#[derive(Clone)]
struct Topics {
    metrics: String,
    alerts: String,
    requests: String,
    state: String,
    group: String,
}

impl Topics {
    async fn create() -> Self {
        let base = unique("it.retrain");
        let t = Topics {
            metrics: format!("{base}.metrics"),
            alerts: format!("{base}.alerts"),
            requests: format!("{base}.requests"),
            state: format!("{base}.state"),
            group: base,
        };
        for name in [&t.metrics, &t.alerts, &t.requests, &t.state] {
            create_topic(name, 1).await;
        }
        t
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LEADSCORE__RETRAIN__METRICS_TOPIC", self.metrics.clone()),
            ("LEADSCORE__RETRAIN__ALERTS_TOPIC", self.alerts.clone()),
            ("LEADSCORE__RETRAIN__REQUESTS_TOPIC", self.requests.clone()),
            ("LEADSCORE__RETRAIN__STATE_TOPIC", self.state.clone()),
            ("LEADSCORE__RETRAIN__GROUP_ID", self.group.clone()),
            ("LEADSCORE__RETRAIN__TRANSACTIONAL_ID", self.group.clone()),
            ("LEADSCORE__RETRAIN__TICK_MS", "200".into()),
        ]
    }

    async fn delete(&self) {
        delete_topics(&[&self.metrics, &self.alerts, &self.requests, &self.state]).await;
    }
}

fn start(t: &Topics, extra: &[(&str, String)]) -> (Service, u16) {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
    cmd.arg("retrain")
        .env(
            "LEADSCORE__RETRAIN__HTTP_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("LEADSCORE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in t.env() {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    (cmd.spawn().unwrap().into(), port)
}

async fn metrics_text(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn wait_for(port: u16, needle: &str) -> String {
    for _ in 0..300 {
        let text = metrics_text(port).await;
        if text.contains(needle) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{needle} never appeared on :{port}: {}",
        metrics_text(port).await
    );
}

fn report(model: &str, start: i64, industry_psi: f64) -> WindowReport {
    let f = |name: &str, psi: f64| FeatureDrift {
        bins: Vec::new(),
        feature: name.into(),
        numeric: false,
        sample_size: 1000,
        psi,
        kl: 0.0,
        js: 0.0,
        ks: None,
        chi2: None,
        new_category_rate: Some(0.0),
        missing_rate: 0.0,
        reference_missing_rate: 0.0,
        missing_p: None,
        judged: true,
        psi_noise: 0.0,
    };
    WindowReport {
        model_name: model.into(),
        model_version: "1".into(),
        kind: WindowKind::Hourly,
        start_ms: start,
        end_ms: start + H,
        scored: 1000,
        late_events: 0,
        errors: 0,
        features: vec![f("industry", industry_psi), f("country", 0.01)],
        score_psi: Some(0.02),
        score_judged: true,
        shadow: None,
        latency: None,
        outcomes: None,
        emitted_at_ms: start + H,
    }
}

async fn produce_reports(t: &Topics, reports: &[WindowReport]) {
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    let encoder = Encoder::for_subject(
        &registry,
        &leadscore_schemas::value_subject(&t.metrics),
        leadscore_schemas::find("WindowReport.avsc").unwrap().text,
    )
    .await
    .unwrap();
    let producer: FutureProducer = client(&[]).create().unwrap();
    for r in reports {
        let bytes = encoder.encode(r.to_value()).unwrap();
        producer
            .send(
                FutureRecord::to(&t.metrics)
                    .key(r.model_name.as_str())
                    .payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// (trigger, reason, evidence features, requested_by, model) of every request on the topic.
async fn requests(
    t: &Topics,
    within: Duration,
) -> Vec<(String, String, Vec<String>, Option<String>, String)> {
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    let decoder = Decoder::new(registry);
    let c = consumer(&t.requests, "read_committed");
    let mut out = Vec::new();
    for m in receive(&c, usize::MAX, within).await {
        let Value::Record(fields) = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap()
        else {
            panic!("not a record")
        };
        let get = |n: &str| fields.iter().find(|(k, _)| k == n).unwrap().1.clone();
        let s = |v: Value| match v {
            Value::String(s) | Value::Enum(_, s) => s,
            Value::Union(_, b) => match *b {
                Value::String(s) => s,
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        let evidence =
            match get("evidence") {
                Value::Array(items) => items
                    .into_iter()
                    .filter_map(|e| match e {
                        Value::Record(ef) => ef.into_iter().find(|(k, _)| k == "feature").and_then(
                            |(_, v)| match v {
                                Value::Union(_, b) => match *b {
                                    Value::String(s) => Some(s),
                                    _ => None,
                                },
                                _ => None,
                            },
                        ),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            };
        let by = match get("requested_by") {
            Value::Union(_, b) => match *b {
                Value::String(s) => Some(s),
                _ => None,
            },
            _ => None,
        };
        out.push((
            s(get("trigger")),
            s(get("reason")),
            evidence,
            by,
            s(get("model_name")),
        ));
    }
    out
}

/// Waits until the trigger's group has committed the first `n` reports of the metrics topic
/// (their requests and checkpoint are committed with them).
async fn wait_committed(t: &Topics, n: i64) {
    let c: BaseConsumer = client(&[("group.id", t.group.as_str())]).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&t.metrics, 0);
    let mut at = None;
    for _ in 0..600 {
        at = c
            .committed_offsets(tpl.clone(), Duration::from_secs(5))
            .ok()
            .and_then(|got| {
                got.find_partition(&t.metrics, 0)
                    .and_then(|p| match p.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    })
            });
        if at >= Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the trigger committed up to {at:?} of {n} reports");
}

/// Hourly reports of `models` models over 8 hours: model `i` drifts (industry PSI 0.3) in
/// three consecutive hours when `i % 3 == 0`, in every hour when `i % 3 == 1` (asked once,
/// then the cooldown), and in alternate hours otherwise (never sustained).
fn drift_pattern(prefix: &str, models: usize) -> Vec<WindowReport> {
    (0..8)
        .flat_map(|h| {
            (0..models).map(move |i| {
                let drifts = match i % 3 {
                    0 => (2..5).contains(&h),
                    1 => true,
                    _ => h % 2 == 0,
                };
                report(
                    &format!("{prefix}-{i}"),
                    h * H,
                    if drifts { 0.3 } else { 0.01 },
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkills_give_the_requests_of_an_uninterrupted_run() {
    let prefix = unique("it-kills-model");
    let reports = drift_pattern(&prefix, 12);
    let n = reports.len() as i64;
    let env = [
        ("LEADSCORE__RETRAIN__MIN_LABELLED_ROWS", "0".to_string()),
        ("LEADSCORE__RETRAIN__COOLDOWN_MS", (100 * H).to_string()),
        ("LEADSCORE__RETRAIN__MODELS", "[]".to_string()),
    ];
    // The reference: one uninterrupted run over the same reports.
    let reference = Topics::create().await;
    produce_reports(&reference, &reports).await;
    let (child, _) = start(&reference, &env);
    wait_committed(&reference, n).await;
    terminate(child);
    let mut expected = requests(&reference, Duration::from_secs(2)).await;
    expected.sort();
    assert_eq!(
        expected.len(),
        8,
        "one request per sustained model: {expected:?}"
    );

    // The same reports streamed (one every 60 ms) through a trigger SIGKILLed three times,
    // each a random time after it has read a report.
    let t = Topics::create().await;
    let feed = {
        let (t, reports) = (t.clone(), reports.clone());
        tokio::spawn(async move {
            for r in reports {
                produce_reports(&t, std::slice::from_ref(&r)).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        })
    };
    let seed = uuid::Uuid::new_v4().as_u128();
    for i in 0..3 {
        let delay = ((seed >> (i * 20)) as u64 & 0xfffff) % 1_500;
        let (child, port) = start(&t, &env);
        wait_for(port, "leadscore_retrain_reports_total ").await;
        loop {
            let text = metrics_text(port).await;
            let read = text
                .lines()
                .find_map(|l| l.strip_prefix("leadscore_retrain_reports_total "))
                .and_then(|v| v.trim().parse::<u64>().ok());
            if read.is_some_and(|r| r > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;
        assert!(!feed.is_finished(), "kill {i} hits the stream mid-way");
        eprintln!("kill {i}: {delay} ms after the restarted trigger read its first report");
        let mut child: std::process::Child = child.into();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let (child, _) = start(&t, &env);
    feed.await.unwrap();
    wait_committed(&t, n).await;
    terminate(child);
    let mut got = requests(&t, Duration::from_secs(2)).await;
    got.sort();
    assert_eq!(got, expected);
    t.delete().await;
    reference.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_drift_asks_once_and_the_cooldown_holds_across_a_restart() {
    let t = Topics::create().await;
    let model = unique("it-model");
    let env = [
        ("LEADSCORE__RETRAIN__MIN_LABELLED_ROWS", "0".to_string()),
        ("LEADSCORE__RETRAIN__COOLDOWN_MS", H.to_string()),
        ("LEADSCORE__RETRAIN__MODELS", "[]".to_string()),
    ];
    let (child, port) = start(&t, &env);
    // Two windows above 0.25, then a third: the sustained rule asks.
    produce_reports(&t, &[report(&model, 0, 0.3), report(&model, H, 0.3)]).await;
    wait_for(port, "leadscore_retrain_reports_total 2").await;
    assert!(
        requests(&t, Duration::from_secs(1)).await.is_empty(),
        "two windows are not sustained"
    );
    produce_reports(&t, &[report(&model, 2 * H, 0.3)]).await;
    wait_for(port, "trigger=\"drift\",outcome=\"requested\"} 1").await;
    let got = requests(&t, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, "drift");
    assert_eq!(got[0].2, ["industry"]);
    assert!(got[0].1.contains("3 consecutive windows"), "{}", got[0].1);

    // SIGKILL, restart: the state (cooldown) comes back from the checkpoint.
    let mut child = child;
    child.kill().unwrap();
    child.wait().unwrap();
    let (child, port) = start(&t, &env);
    produce_reports(&t, &[report(&model, 3 * H, 0.9)]).await;
    wait_for(port, "trigger=\"drift\",outcome=\"cooldown\"} 1").await;
    assert_eq!(
        requests(&t, Duration::from_secs(2)).await.len(),
        1,
        "no second request in the cooldown"
    );

    // An operator's request skips the cooldown; too little data refuses it.
    let cli = |min: &str, by: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
        cmd.args([
            "retrain",
            "request",
            "--reason",
            "new pricing page",
            "--model",
            &model,
            "--by",
            by,
        ])
        .env("LEADSCORE__RETRAIN__MIN_LABELLED_ROWS", min)
        .env("LEADSCORE_LOG", "error");
        for (k, v) in t.env() {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    let refused = cli("1000000000000", "ops-1");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not enough data"));
    let sent = cli("0", "ops-1");
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let got = requests(&t, Duration::from_secs(3)).await;
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(
        (got[1].0.as_str(), got[1].3.as_deref()),
        ("manual", Some("ops-1"))
    );
    terminate(child);
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_asks_when_due_unless_the_data_is_too_thin() {
    let t = Topics::create().await;
    let model = unique("it-scheduled");
    let thin = [
        (
            "LEADSCORE__RETRAIN__MIN_LABELLED_ROWS",
            "1000000000000".to_string(),
        ),
        ("LEADSCORE__RETRAIN__YOUNG_EVERY_MS", "1000".to_string()),
        ("LEADSCORE__RETRAIN__COOLDOWN_MS", "0".to_string()),
        ("LEADSCORE__RETRAIN__MODELS", format!("[\"{model}\"]")),
    ];
    let (child, port) = start(&t, &thin);
    wait_for(port, "trigger=\"schedule\",outcome=\"not_enough_data\"}").await;
    assert!(requests(&t, Duration::from_secs(1)).await.is_empty());
    terminate(child);

    // Enough labelled rows, but the revenue gate asks for more won deals with a value than
    // the CRM holds.
    let no_revenue = [
        ("LEADSCORE__RETRAIN__MIN_LABELLED_ROWS", "0".to_string()),
        (
            "LEADSCORE__RETRAIN__MIN_VALUED_WINS",
            "1000000000000".to_string(),
        ),
        ("LEADSCORE__RETRAIN__YOUNG_EVERY_MS", "1000".to_string()),
        ("LEADSCORE__RETRAIN__COOLDOWN_MS", "0".to_string()),
        ("LEADSCORE__RETRAIN__MODELS", format!("[\"{model}\"]")),
    ];
    let (child, port) = start(&t, &no_revenue);
    wait_for(port, "trigger=\"schedule\",outcome=\"not_enough_revenue\"}").await;
    assert!(requests(&t, Duration::from_secs(1)).await.is_empty());
    terminate(child);

    let due = [
        ("LEADSCORE__RETRAIN__MIN_LABELLED_ROWS", "0".to_string()),
        ("LEADSCORE__RETRAIN__YOUNG_EVERY_MS", "1000".to_string()),
        ("LEADSCORE__RETRAIN__COOLDOWN_MS", "0".to_string()),
        ("LEADSCORE__RETRAIN__MODELS", format!("[\"{model}\"]")),
    ];
    let (child, port) = start(&t, &due);
    wait_for(port, "trigger=\"schedule\",outcome=\"requested\"}").await;
    terminate(child);
    let got = requests(&t, Duration::from_secs(3)).await;
    assert!(!got.is_empty());
    assert!(got.iter().all(|r| r.0 == "schedule"));
    assert!(got[0].1.starts_with("scheduled:"), "{}", got[0].1);
    t.delete().await;
}

/// (stage, version, reason) of every lifecycle event of `model`.
async fn lifecycle(topic: &str, model: &str, want: usize) -> Vec<(String, String, String)> {
    lifecycle_within(topic, model, want, Duration::from_secs(240)).await
}

/// As [`lifecycle`], waiting at most `wait` for `want` events.
async fn lifecycle_within(
    topic: &str,
    model: &str,
    want: usize,
    wait: Duration,
) -> Vec<(String, String, String)> {
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    let decoder = Decoder::new(registry);
    let c = consumer(topic, "read_committed");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while out.len() < want && tokio::time::Instant::now() < deadline {
        for m in receive(&c, 1, Duration::from_secs(1)).await {
            let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
            let e = leadscore_lifecycle::events::LifecycleEvent::from_value(&v).unwrap();
            if e.model_name == model {
                out.push((e.stage.as_str().to_string(), e.version, e.reason));
            }
        }
    }
    out
}

/// `leadscore retrain request --force` for `model`, as an operator would.
fn request_retrain(t: &Topics, model: &str, reason: &str) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
    cmd.args([
        "retrain", "request", "--force", "--reason", reason, "--model", model,
    ])
    .env("LEADSCORE_LOG", "error");
    for (k, v) in t.env() {
        cmd.env(k, v);
    }
    leadscore_e2e::succeed(&mut cmd);
}

fn start_worker(
    requests: &str,
    lifecycle: &str,
    group: &str,
    csv: &std::path::Path,
    extra: &[&str],
) -> Service {
    worker_command(requests, lifecycle, group, csv, extra)
        .spawn()
        .unwrap()
        .into()
}

fn worker_command(
    requests: &str,
    lifecycle: &str,
    group: &str,
    csv: &std::path::Path,
    extra: &[&str],
) -> Command {
    let python = std::env::var("LEADSCORE_PYTHON")
        .expect("LEADSCORE_PYTHON (from `deploy/local/stack env`) runs the training job");
    let args = std::iter::once("--cv-splits")
        .chain(std::iter::once("2"))
        .chain(extra.iter().copied())
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
    cmd.args(["retrain", "worker"])
        .env("LEADSCORE__TRAINING__REQUESTS_TOPIC", requests)
        .env("LEADSCORE__TRAINING__LIFECYCLE_TOPIC", lifecycle)
        .env("LEADSCORE__TRAINING__GROUP_ID", group)
        .env("LEADSCORE__TRAINING__TRANSACTIONAL_ID", group)
        .env("LEADSCORE__TRAINING__PYTHON", python)
        .env(
            "LEADSCORE__TRAINING__DIR",
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../training"),
        )
        .env("LEADSCORE__TRAINING__DATA", csv)
        .env("LEADSCORE__TRAINING__TRIALS", "2")
        .env("LEADSCORE__TRAINING__EXTRA_ARGS", format!("[{args}]"))
        .env(
            "LEADSCORE__TRAINING__HTTP_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("LEADSCORE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_trains_registers_and_reports_each_request_once() {
    let t = Topics::create().await;
    let lifecycle_topic = format!("{}.lifecycle", t.group);
    create_topic(&lifecycle_topic, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 5, 4000);
    let model = unique("it-trained");
    let request = |reason: &str| request_retrain(&t, &model, reason);
    let group = format!("{}.worker", t.group);
    // A margin of -1 lets any later version past the gate: the second becomes challenger.
    let worker = start_worker(
        &t.requests,
        &lifecycle_topic,
        &group,
        &csv,
        &["--min-rows", "500", "--gate-margin", "-1"],
    );
    request("first model");
    request("second model");
    let events = lifecycle(&lifecycle_topic, &model, 4).await;
    terminate(worker);
    let stages: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        stages,
        ["training", "promoted", "training", "registered"],
        "{events:?}"
    );
    assert_eq!(events[1].1, "1");
    assert_eq!(events[3].1, "2");
    assert!(events[3].2.contains("validation AUC"), "{}", events[3].2);

    // Restarted, the worker does not run committed requests again; a run that fails says why.
    let worker = start_worker(
        &t.requests,
        &lifecycle_topic,
        &group,
        &csv,
        &["--min-rows", "100000000"],
    );
    request("too little data");
    let events = lifecycle(&lifecycle_topic, &model, 6).await;
    terminate(worker);
    let stages: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(stages[4..], ["training", "failed"], "{events:?}");
    assert!(events[5].2.contains("refusing to train"), "{}", events[5].2);
    delete_topics(&[&lifecycle_topic]).await;
    t.delete().await;
}

/// Versions of `model` registered in MLflow.
async fn mlflow_versions(model: &str) -> usize {
    let base =
        std::env::var("MLFLOW_TRACKING_URI").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let body: serde_json::Value = reqwest::Client::new()
        .get(format!("{base}/api/2.0/mlflow/model-versions/search"))
        .query(&[("filter", format!("name='{model}'"))])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["model_versions"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_runs_the_request_again_and_registers_one_version() {
    let t = Topics::create().await;
    let lifecycle_topic = format!("{}.lifecycle", t.group);
    create_topic(&lifecycle_topic, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 6, 4000);
    let model = unique("it-killed");
    let group = format!("{}.worker", t.group);
    let args = ["--min-rows", "500", "--gate-margin", "-1"];
    let worker = start_worker(&t.requests, &lifecycle_topic, &group, &csv, &args);
    request_retrain(&t, &model, "killed mid-run");

    // The run has started (its "training" event is committed): SIGKILL the worker now.
    let started = lifecycle_within(&lifecycle_topic, &model, 1, Duration::from_secs(120)).await;
    assert_eq!(started.len(), 1, "the run started: {started:?}");
    let mut child: std::process::Child = worker.into();
    let scratch = |pid: u32| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("leadscore-train-{pid}-")))
            })
            .collect()
    };
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    let left = scratch(pid);
    assert_eq!(left.len(), 1, "the killed run left its scratch directory");
    // Killed mid-run: no outcome was committed, and the orphaned training job stops by
    // itself instead of registering a version (given time to do so if it did not).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after_kill = lifecycle_within(&lifecycle_topic, &model, 2, Duration::from_secs(2)).await;
    assert_eq!(
        after_kill.len(),
        1,
        "no outcome before the restart: {after_kill:?}"
    );
    assert_eq!(
        mlflow_versions(&model).await,
        0,
        "the orphaned run registered nothing"
    );

    // Restarted, the worker runs the uncommitted request again, once.
    let worker = start_worker(&t.requests, &lifecycle_topic, &group, &csv, &args);
    let events = lifecycle(&lifecycle_topic, &model, 3).await;
    terminate(worker);
    let stages: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(stages, ["training", "training", "promoted"], "{events:?}");
    assert!(!left[0].exists(), "the restarted worker removed {left:?}");
    assert_eq!(mlflow_versions(&model).await, 1, "one version registered");
    assert_eq!(events[2].1, "1");
    delete_topics(&[&lifecycle_topic]).await;
    t.delete().await;
}

/// Runs a `retrain worker` as the Helm chart's Job does and returns its exit
/// status, killing it if it outlives `limit`.
fn run_job(mut cmd: Command, limit: Duration) -> std::process::ExitStatus {
    let mut child = cmd.spawn().unwrap();
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker job did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_as_a_job_serves_one_request_per_run_and_exits_when_none_is_pending() {
    let t = Topics::create().await;
    let lifecycle_topic = format!("{}.lifecycle", t.group);
    create_topic(&lifecycle_topic, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 5, 300);
    let model = unique("it-job");
    for reason in ["first", "second"] {
        request_retrain(&t, &model, reason);
    }
    let group = format!("{}.worker", t.group);
    // Too little data: each run fails fast with its reason, which is what this test needs.
    let job = |idle: &str| {
        let mut cmd = worker_command(
            &t.requests,
            &lifecycle_topic,
            &group,
            &csv,
            &["--min-rows", "100000000"],
        );
        cmd.args(["--once", "--idle-exit-secs", idle]);
        cmd
    };
    let limit = Duration::from_secs(180);

    // Each run serves exactly one request: two pending, two runs, one outcome each.
    assert!(run_job(job("60"), limit).success());
    let events = lifecycle(&lifecycle_topic, &model, 2).await;
    let stages: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(stages, ["training", "failed"], "{events:?}");
    assert!(events[0].2.contains("(manual): first"), "{}", events[0].2);
    assert!(run_job(job("60"), limit).success());
    let events = lifecycle(&lifecycle_topic, &model, 4).await;
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events[2].2.contains("(manual): second"), "{}", events[2].2);
    assert_eq!(events[3].0, "failed");

    // Nothing pending: a run exits on its idle limit and runs no committed request again.
    let started = std::time::Instant::now();
    assert!(run_job(job("3"), limit).success());
    assert!(started.elapsed() >= Duration::from_secs(3));
    let events = lifecycle_within(&lifecycle_topic, &model, 5, Duration::from_secs(5)).await;
    assert_eq!(events.len(), 4, "a committed request ran again: {events:?}");
    delete_topics(&[&lifecycle_topic]).await;
    t.delete().await;
}
