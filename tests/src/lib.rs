//! Shared helpers for the integration and end-to-end tests in `tests/tests/`.
//!
//! The tests talk to the real local stack (`deploy/local/stack up`) through
//! the same configuration the services use (`LEADSCORE__*` variables; the
//! defaults point at the local stack). Every test works on uniquely named
//! topics and subjects so tests can run in parallel and reruns never collide.

// Test support only: a failed set-up step is a failed test, so panicking is right.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod drift;
pub mod scorer;

use std::time::Duration;

use leadscore_config::Config;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::OwnedMessage;

/// Configuration of the stack under test.
pub fn config() -> Config {
    Config::load(None).unwrap_or_else(|e| panic!("test configuration: {e}"))
}

/// A name unique to this test run, e.g. `it.avro.3f2a...`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// Creates a topic with one partition and waits until it is usable.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_with(name, partitions, &[]).await;
}

/// Creates a topic with topic `configs` (e.g. `max.message.bytes`), if it does not exist.
pub async fn create_topic_with(name: &str, partitions: i32, configs: &[(&str, &str)]) {
    let mut yaml = format!(
        "defaults:\n  replication_factor: 1\ntopics:\n  - name: {name}\n    partitions: {partitions}\n"
    );
    if !configs.is_empty() {
        yaml.push_str("    configs:\n");
        for (k, v) in configs {
            yaml.push_str(&format!("      {k}: \"{v}\"\n"));
        }
    }
    let declared = leadscore_topics::Declarations::parse(&yaml).unwrap();
    let admin = leadscore_kafka::TopicAdmin::new(&config().kafka).unwrap();
    let (brokers, observed) = admin.observe(&declared).await.unwrap();
    let plan = leadscore_topics::plan(&declared, &observed, brokers);
    admin.apply(&plan, false).await.unwrap();
}

/// Deletes test topics, ignoring ones already gone.
pub async fn delete_topics(names: &[&str]) {
    let admin = leadscore_kafka::TopicAdmin::new(&config().kafka).unwrap();
    admin.delete_topics(names).await.unwrap();
}

/// Client settings for the stack, plus `extra`.
pub fn client(extra: &[(&str, &str)]) -> ClientConfig {
    let mut c = leadscore_kafka::client_config(&config().kafka);
    for (k, v) in extra {
        c.set(*k, *v);
    }
    c
}

/// A consumer of `topic` from the beginning with the given isolation level.
pub fn consumer(topic: &str, isolation: &str) -> StreamConsumer {
    let consumer: StreamConsumer = client(&[
        ("group.id", &unique("it-group")),
        ("auto.offset.reset", "earliest"),
        ("enable.auto.commit", "false"),
        ("isolation.level", isolation),
    ])
    .create()
    .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    consumer
}

/// Receives messages until `want` have arrived or `within` has passed.
pub async fn receive(
    consumer: &StreamConsumer,
    want: usize,
    within: Duration,
) -> Vec<OwnedMessage> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while out.len() < want {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// Payload of a message as bytes (empty for a tombstone).
pub fn payload(m: &OwnedMessage) -> &[u8] {
    m.payload().unwrap_or_default()
}

/// Writes `count` generated leads (generator seed `seed`) as a training CSV.
pub fn write_leads_csv(path: &std::path::Path, seed: u64, count: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    leadscore_crm::csv::write_header(&mut out).unwrap();
    let config = leadscore_crm::GeneratorConfig {
        seed,
        ..Default::default()
    };
    for g in leadscore_crm::Generator::new(config).take(count) {
        leadscore_crm::csv::write_row(&mut out, &g).unwrap();
    }
    std::io::Write::flush(&mut out).unwrap();
}

/// Runs the training job (2 Optuna trials) on `csv` and registers the result
/// as a new version of `name` in the MLflow at `mlflow`, with the given gate margin.
pub fn train_and_register(
    csv: &std::path::Path,
    out: &std::path::Path,
    name: &str,
    mlflow: &str,
    gate_margin: &str,
) {
    let python = std::env::var("LEADSCORE_PYTHON")
        .expect("LEADSCORE_PYTHON (from `deploy/local/stack env`) runs the training job");
    let training = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../training");
    let status = std::process::Command::new(python)
        .current_dir(training)
        .args(["-m", "leadscore_training.train", "--data"])
        .arg(csv)
        .arg("--out")
        .arg(out)
        .args([
            "--model-name",
            name,
            "--mlflow",
            mlflow,
            "--trials",
            "2",
            "--cv-splits",
            "2",
        ])
        .args(["--min-rows", "1000", "--gate-margin", gate_margin])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "training job failed");
}

/// A free local TCP port (for a service's health endpoint).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A spawned process that is killed when dropped, so a failed assertion
/// leaves nothing running; otherwise used as the `Child` it holds.
pub struct Service(Option<std::process::Child>);

impl From<std::process::Child> for Service {
    fn from(child: std::process::Child) -> Self {
        Self(Some(child))
    }
}

impl From<Service> for std::process::Child {
    fn from(mut s: Service) -> Self {
        s.0.take().expect("a Service holds its child until dropped")
    }
}

impl std::ops::Deref for Service {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("a Service holds its child until dropped")
    }
}

impl std::ops::DerefMut for Service {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0
            .as_mut()
            .expect("a Service holds its child until dropped")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process started in a process group of its own, the whole group killed when dropped:
/// for servers that start workers of their own (MLflow's uvicorn and job consumers), which
/// killing the first process alone would leave running.
pub struct ProcessGroup(std::process::Child);

impl ProcessGroup {
    /// Spawns `cmd` as the leader of a new process group.
    pub fn spawn(cmd: &mut std::process::Command) -> Self {
        use std::os::unix::process::CommandExt;
        Self(
            cmd.process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
        )
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to the end and returns its output; a failure fails the test
/// with the command, its exit status and everything it printed.
pub fn succeed(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stops a service the way Kubernetes does: SIGTERM, up to 10 s for a graceful exit, then SIGKILL.
pub fn terminate(child: impl Into<std::process::Child>) {
    let mut child = child.into();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Encodes `value` with the schema file `schema` under `topic`'s value subject and sends it, keyed by `key`.
pub async fn publish_avro(topic: &str, key: &str, schema: &str, value: apache_avro::types::Value) {
    let registry = leadscore_registry::Registry::new(&config().registry).unwrap();
    let encoder = leadscore_registry::Encoder::for_subject(
        &registry,
        &leadscore_schemas::value_subject(topic),
        leadscore_schemas::find(schema).unwrap().text,
    )
    .await
    .unwrap();
    let bytes = encoder.encode(value).unwrap();
    let producer: rdkafka::producer::FutureProducer = client(&[]).create().unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topic)
                .key(key)
                .payload(&bytes),
            std::time::Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// A Debezium JSON create event of `lead` (status new) at source time `ts_ms`, as the CDC connector writes it.
pub fn debezium_create(l: &leadscore_crm::Lead, ts_ms: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"op": "c", "before": null, "after": {
        "lead_id": l.lead_id, "company_size": l.company_size, "industry": l.industry,
        "page_views": l.page_views, "time_on_site": l.time_on_site,
        "form_completion_time": l.form_completion_time, "referral_source": l.referral_source,
        "country": l.country, "created_at": l.created_at.to_rfc3339(), "updated_at": l.updated_at.to_rfc3339(),
        "status": "new", "converted_at": null
    }, "source": {"ts_ms": ts_ms}}))
    .unwrap()
}

/// Registers, as a new version of `name`, a copy of the model trained into `trained` whose
/// ONNX graph only takes batches of one lead (it fails on every larger batch); returns the version.
pub fn register_static_batch_copy(
    trained: &std::path::Path,
    out: &std::path::Path,
    name: &str,
    mlflow: &str,
) -> String {
    let python = std::env::var("LEADSCORE_PYTHON")
        .expect("LEADSCORE_PYTHON (from `deploy/local/stack env`) runs the registration");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/leadscore/tests/support/static_batch_version.py");
    let done = succeed(
        std::process::Command::new(python)
            .arg(script)
            .args([mlflow, name])
            .arg(trained)
            .arg(out),
    );
    // MLflow prints its own lines first.
    String::from_utf8_lossy(&done.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// The version MLflow's `alias` of `model` names, if it exists.
pub async fn mlflow_alias(mlflow: &str, model: &str, alias: &str) -> Option<String> {
    let m = leadscore_model::source::Mlflow::new(mlflow).unwrap();
    m.version(
        model,
        &leadscore_model::source::Selector::Alias(alias.into()),
    )
    .await
    .ok()
    .map(|v| v.version)
}

/// A TCP relay from a local port to a real service that a test can stall, cut and
/// restore: a network fault between one client and a dependency, without stopping the
/// dependency for the other tests.
pub struct Relay {
    /// The local port that forwards to the target.
    pub port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

const FORWARD: u8 = 0;
const STALL: u8 = 1;
const REFUSE: u8 = 2;

impl Relay {
    /// Forwards `127.0.0.1:<port>` to `target` (`host:port`).
    pub async fn to(target: &str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(FORWARD));
        let conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> =
            Default::default();
        let (m, c, target) = (mode.clone(), conns.clone(), target.to_string());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mode = m.load(Ordering::SeqCst);
                if mode == REFUSE {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let t = tokio::spawn(async move {
                    if mode == STALL {
                        // Accept, then never answer.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(inbound);
                    } else if let Ok(mut out) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                if let Ok(mut conns) = c.lock() {
                    conns.push(t.abort_handle());
                }
            }
        });
        Self {
            port,
            mode,
            conns,
            task,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
        if mode != FORWARD
            && let Ok(mut conns) = self.conns.lock()
        {
            for c in conns.drain(..) {
                c.abort();
            }
        }
    }

    /// Open connections break; new ones are accepted and never answered.
    pub fn stall(&self) {
        self.set(STALL);
    }

    /// Every connection breaks and new ones are closed at once.
    pub fn cut(&self) {
        self.set(REFUSE);
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.set(FORWARD);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.set(REFUSE);
    }
}
