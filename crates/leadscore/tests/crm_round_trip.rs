//! The CRM round trip on the real stack, through public surfaces only: rows
//! inserted into the CRM's `public.leads` come back as rows in
//! `public.lead_scores`, through the Debezium source, the scorer and the
//! JDBC sink; updates rescore, deletes remove the row, PII reaches no topic,
//! and restarting Kafka Connect and Postgres mid-stream loses and
//! duplicates nothing.
//!
//! The tests use the production topics and connectors (`connectors/`), so
//! they run one at a time.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use leadscore_crm::{Generated, Generator, GeneratorConfig, Lead};
use leadscore_e2e::{client, unique};
use leadscore_model::Model;
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn leadscore(args: &[&str]) -> String {
    let out = leadscore_e2e::succeed(
        Command::new(env!("CARGO_BIN_EXE_leadscore"))
            .args(args)
            .current_dir(repo()),
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stack(args: &[&str]) {
    leadscore_e2e::succeed(Command::new(repo().join("deploy/local/stack")).args(args));
}

/// A `leadscore` process of the test, stopped with SIGTERM on drop.
struct Running(Child);

impl Running {
    fn spawn(args: &[&str], env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
        cmd.args(args)
            .current_dir(repo())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Running(cmd.spawn().unwrap())
    }

    /// The scorer with its production configuration.
    fn scorer() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::spawn(
            &["scorer"],
            &[
                ("LEADSCORE__SCORER__INSTANCE_ID", "e2e-0".into()),
                (
                    "LEADSCORE__SCORER__HTTP_LISTEN",
                    format!("127.0.0.1:{port}"),
                ),
                ("LEADSCORE_LOG", "warn".into()),
            ],
        )
    }

    /// `leadscore connectors supervise`: what restarts a task that fails while its
    /// database is down (as Strimzi's autoRestart would).
    fn supervisor() -> Self {
        Self::spawn(
            &[
                "connectors",
                "supervise",
                "--interval-secs",
                "2",
                "--max-backoff-secs",
                "10",
            ],
            &[],
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

async fn postgres() -> tokio_postgres::Client {
    leadscore_postgres::connect(&leadscore_e2e::config().postgres.url)
        .await
        .unwrap()
}

fn generate(prefix: &str, n: usize, seed: u64) -> Vec<Generated> {
    Generator::new(GeneratorConfig {
        seed,
        id_prefix: prefix.into(),
        end: chrono::Utc::now(),
        ..Default::default()
    })
    .take(n)
    .collect()
}

fn model() -> Model {
    leadscore_model::init_runtime(None).unwrap();
    Model::load_dir(&repo().join("models/default")).unwrap()
}

/// The bands the scorer uses (its configuration).
fn bands() -> leadscore_model::BandThresholds {
    let cfg = leadscore_e2e::config().scorer;
    leadscore_model::BandThresholds {
        high: cfg.band_high,
        medium: cfg.band_medium,
    }
}

fn expected(model: &Model, lead: &Lead) -> f64 {
    model.score(lead).unwrap().unwrap().probability
}

/// (score, band, model_version) per lead_id of `prefix` in lead_scores.
async fn score_rows(
    pg: &tokio_postgres::Client,
    prefix: &str,
) -> HashMap<String, (f64, String, String)> {
    pg.query(
        "SELECT lead_id, score, band, model_version FROM public.lead_scores WHERE lead_id LIKE $1",
        &[&format!("{prefix}%")],
    )
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
            .collect()
    })
    .unwrap_or_default()
}

/// Polls lead_scores until `done` holds for the rows of `prefix`, or `within` passes.
async fn wait_rows(
    pg: &tokio_postgres::Client,
    prefix: &str,
    within: Duration,
    done: impl Fn(&HashMap<String, (f64, String, String)>) -> bool,
) -> (HashMap<String, (f64, String, String)>, Duration) {
    let started = Instant::now();
    loop {
        let rows = score_rows(pg, prefix).await;
        if done(&rows) || started.elapsed() > within {
            return (rows, started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn connectors_running() {
    leadscore(&["connectors", "apply", "--wait-secs", "120"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crm_rows_come_back_as_score_rows_rescored_on_update_removed_on_delete() {
    let _serial = SERIAL.lock().await;
    connectors_running();
    let _scorer = Running::scorer();
    let model = model();
    let mut pg = postgres().await;
    let prefix = unique("e2e-rt").replace('.', "-");
    let leads = generate(&prefix, 25, 11);
    leadscore_postgres::upsert_leads(&mut pg, &leads)
        .await
        .unwrap();

    // Insert: every lead gets its row, with the score the model gives it.
    let (rows, took) = wait_rows(&pg, &prefix, Duration::from_secs(90), |r| {
        r.len() == leads.len()
    })
    .await;
    assert_eq!(rows.len(), leads.len(), "score rows after {took:?}");
    eprintln!("{} leads inserted -> score rows in {took:?}", leads.len());
    for g in &leads {
        let (score, band, version) = &rows[&g.lead.lead_id];
        let want = expected(&model, &g.lead);
        assert!(
            (score - want).abs() < 1e-6,
            "{}: {score} vs {want}",
            g.lead.lead_id
        );
        assert_eq!(band, bands().band(want).as_str());
        assert_eq!(version, "bundled-1");
    }
    // Each row says why, in the model's words: its three reasons for that lead.
    let reasons: HashMap<String, Vec<String>> = pg
        .query(
            "SELECT lead_id, reasons FROM public.lead_scores WHERE lead_id LIKE $1",
            &[&format!("{prefix}%")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get::<_, Option<Vec<String>>>(1).unwrap_or_default(),
            )
        })
        .collect();
    for g in &leads {
        let want: Vec<String> = model
            .reasons(&g.lead, 3)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(reasons[&g.lead.lead_id], want, "{}", g.lead.lead_id);
    }

    // Update a feature: the row follows the new score.
    let target = &leads[0].lead;
    let mut changed = target.clone();
    changed.page_views = Some(target.page_views.unwrap_or(0) + 400);
    changed.time_on_site = Some(target.time_on_site.unwrap_or(0.0) + 1800.0);
    let new_score = expected(&model, &changed);
    let old_score = rows[&target.lead_id].0;
    assert!(
        (new_score - old_score).abs() > 1e-6,
        "the change must move the score"
    );
    pg.execute(
        "UPDATE public.leads SET page_views = $2, time_on_site = $3, updated_at = now() WHERE lead_id = $1",
        &[&target.lead_id, &changed.page_views, &changed.time_on_site],
    )
    .await
    .unwrap();
    let (rows, took) = wait_rows(&pg, &prefix, Duration::from_secs(60), |r| {
        r.get(&target.lead_id)
            .is_some_and(|(s, _, _)| (s - new_score).abs() < 1e-6)
    })
    .await;
    let (score, band, _) = &rows[&target.lead_id];
    assert!(
        (score - new_score).abs() < 1e-6,
        "rescored after {took:?}: {score} vs {new_score}"
    );
    assert_eq!(band, bands().band(new_score).as_str());

    // Delete: the tombstone removes the row.
    let gone: Vec<String> = leads[..5].iter().map(|g| g.lead.lead_id.clone()).collect();
    pg.execute("DELETE FROM public.leads WHERE lead_id = ANY($1)", &[&gone])
        .await
        .unwrap();
    let (rows, took) = wait_rows(&pg, &prefix, Duration::from_secs(60), |r| {
        gone.iter().all(|id| !r.contains_key(id))
    })
    .await;
    assert!(
        gone.iter().all(|id| !rows.contains_key(id)),
        "deleted rows gone after {took:?}"
    );
    assert_eq!(rows.len(), leads.len() - gone.len(), "the other rows stay");

    pg.execute(
        "DELETE FROM public.leads WHERE lead_id LIKE $1",
        &[&format!("{prefix}%")],
    )
    .await
    .unwrap();
}

/// Every topic's records, read uncommitted from the beginning to the end, as one visitor call each.
fn scan_all_topics(mut visit: impl FnMut(&str, &[u8])) -> usize {
    let consumer: BaseConsumer = client(&[
        ("group.id", &unique("it-pii-scan")),
        ("enable.auto.commit", "false"),
        ("isolation.level", "read_uncommitted"),
    ])
    .create()
    .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(t.name(), p.id(), Duration::from_secs(10))
                .unwrap();
            if high > low {
                tpl.add_partition_offset(t.name(), p.id(), Offset::Offset(low))
                    .unwrap();
                ends.insert((t.name().to_string(), p.id()), high);
            }
        }
    }
    consumer.assign(&tpl).unwrap();
    let mut records = 0;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !ends.is_empty() && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                records += 1;
                let topic = m.topic().to_string();
                visit(&topic, m.key().unwrap_or_default());
                visit(&topic, m.payload().unwrap_or_default());
                if let Some(h) = m.headers() {
                    use rdkafka::message::Headers;
                    for header in h.iter() {
                        visit(&topic, header.value.unwrap_or_default());
                    }
                }
            }
            // Transaction markers take offsets but are never delivered: the position tells the end.
            _ => {
                let positions = consumer.position().unwrap();
                for e in positions.elements() {
                    if let Offset::Offset(pos) = e.offset()
                        && ends
                            .get(&(e.topic().to_string(), e.partition()))
                            .is_some_and(|end| pos >= *end)
                    {
                        ends.remove(&(e.topic().to_string(), e.partition()));
                    }
                }
            }
        }
    }
    assert!(ends.is_empty(), "topics not read to the end: {ends:?}");
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pii_of_a_crm_row_reaches_no_kafka_topic() {
    let _serial = SERIAL.lock().await;
    connectors_running();
    let _scorer = Running::scorer();
    let pg = postgres().await;
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let lead_id = format!("e2e-pii-{tag}");
    let email = format!("pii.{tag}@example.test");
    let phone = format!("+1-555-{}", &tag[..10]);
    let name = format!("Zed Quux{}", &tag[..8]);
    pg.execute(
        "INSERT INTO public.leads (lead_id, company_size, industry, page_views, time_on_site, \
         form_completion_time, referral_source, country, email, phone, full_name) \
         VALUES ($1, 'Large', 'Technology', 12, 300.5, 40.2, 'Google', 'US', $2, $3, $4)",
        &[&lead_id, &email, &phone, &name],
    )
    .await
    .unwrap();
    // Through the whole pipeline first, so every topic it touches has its records.
    let (rows, _) = wait_rows(&pg, &lead_id, Duration::from_secs(90), |r| r.len() == 1).await;
    assert_eq!(rows.len(), 1, "the lead was scored and written back");

    let needles = [email.as_bytes(), phone.as_bytes(), name.as_bytes()];
    let mut leaks: Vec<String> = Vec::new();
    let mut seen_in: Vec<String> = Vec::new();
    let records = scan_all_topics(|topic, bytes| {
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        for n in needles {
            if has(n) {
                leaks.push(topic.to_string());
            }
        }
        if has(lead_id.as_bytes()) && !seen_in.iter().any(|t| t == topic) {
            seen_in.push(topic.to_string());
        }
    });
    // The scan really saw this lead's records, so a clean result means something.
    for topic in ["crm.public.leads", "leads.scores.v1"] {
        assert!(
            seen_in.iter().any(|t| t == topic),
            "lead {lead_id} not found in {topic} among {records} records (seen in {seen_in:?})"
        );
    }
    assert!(leaks.is_empty(), "PII found in topics {leaks:?}");
    pg.execute("DELETE FROM public.leads WHERE lead_id = $1", &[&lead_id])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_connect_and_postgres_mid_stream_loses_and_duplicates_nothing() {
    let _serial = SERIAL.lock().await;
    connectors_running();
    let _scorer = Running::scorer();
    let _supervisor = Running::supervisor();
    let model = model();
    let prefix = unique("e2e-fault").replace('.', "-");
    let leads = generate(&prefix, 600, 12);
    let mut pg = postgres().await;

    // First half in, then Kafka Connect restarts while it streams them.
    leadscore_postgres::upsert_leads(&mut pg, &leads[..300])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack(&["restart", "connect"]);
    // Second half, then the database (the CRM and the sink's target) restarts mid-stream.
    leadscore_postgres::upsert_leads(&mut pg, &leads[300..])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack(&["restart", "postgres"]);

    let pg = postgres().await;
    let (rows, took) = wait_rows(&pg, &prefix, Duration::from_secs(180), |r| {
        r.len() == leads.len()
    })
    .await;
    if rows.len() != leads.len() {
        let status = Command::new(env!("CARGO_BIN_EXE_leadscore"))
            .args(["connectors", "status"])
            .current_dir(repo())
            .output()
            .unwrap();
        panic!(
            "{} of {} score rows after {took:?}; connectors:\n{}",
            rows.len(),
            leads.len(),
            String::from_utf8_lossy(&status.stdout)
        );
    }
    // One row per lead (the key is the primary key), each with the lead's own score.
    let count: i64 = pg
        .query_one(
            "SELECT count(*) FROM public.lead_scores WHERE lead_id LIKE $1",
            &[&format!("{prefix}%")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as usize, leads.len());
    for g in &leads {
        let want = expected(&model, &g.lead);
        let got = rows[&g.lead.lead_id].0;
        assert!(
            (got - want).abs() < 1e-6,
            "{}: {got} vs {want}",
            g.lead.lead_id
        );
    }
    eprintln!("600 leads through a Connect and a Postgres restart: all rows in {took:?}");
    pg.execute(
        "DELETE FROM public.leads WHERE lead_id LIKE $1",
        &[&format!("{prefix}%")],
    )
    .await
    .unwrap();
}
