//! The dashboard on the real stack: what the topics hold reaches `/api/state` and the
//! server-sent `/events` the page follows; the data needs the bearer token, the page not.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::process::Command;
use std::time::{Duration, Instant};

use apache_avro::types::Value;
use leadscore_drift::FeatureDrift;
use leadscore_drift::report::{WindowKind, WindowReport};
use leadscore_e2e::{
    Service, client, create_topic, delete_topics, free_port, publish_avro, unique,
};
use leadscore_lifecycle::events::{LifecycleEvent, Stage};
use leadscore_model::Band;
use leadscore_registry::Registry;
use leadscore_scorer::records::{self, LeadScore, ModelScore, Role};
use rdkafka::producer::{FutureProducer, FutureRecord};

const TOKEN: &str = "it-dashboard-token-0123456789";

fn drift(feature: &str, psi: f64) -> FeatureDrift {
    FeatureDrift {
        bins: vec![
            leadscore_drift::Bin {
                label: "[0, 10)".into(),
                reference: 0.6,
                current: 0.6 - psi,
            },
            leadscore_drift::Bin {
                label: "[10, 50]".into(),
                reference: 0.4,
                current: 0.4 + psi,
            },
        ],
        feature: feature.into(),
        numeric: true,
        sample_size: 500,
        psi,
        kl: psi / 2.0,
        js: psi / 3.0,
        ks: Some((0.2, 0.001)),
        chi2: None,
        new_category_rate: None,
        missing_rate: 0.01,
        reference_missing_rate: 0.01,
        missing_p: None,
        judged: true,
        psi_noise: 0.0,
    }
}

async fn get(port: u16, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new().get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// Runs headless Chromium (Debian's) on `url` with `extra` flags; its standard output.
fn chromium(url: &str, extra: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,1100",
            "--virtual-time-budget=6000",
        ])
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium (Debian package `chromium`, installed by deploy/local/stack)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_topics_hold_reaches_the_page_state_and_its_event_stream() {
    let base = unique("it-dash");
    let (metrics, alerts, lifecycle, scores) = (
        format!("{base}.metrics"),
        format!("{base}.alerts"),
        format!("{base}.lifecycle"),
        format!("{base}.scores"),
    );
    for t in [&metrics, &alerts, &lifecycle, &scores] {
        create_topic(t, 1).await;
    }
    let start = 1_800_000_000_000i64;
    let report = WindowReport {
        model_name: "lead-scoring".into(),
        model_version: "7".into(),
        kind: WindowKind::Hourly,
        start_ms: start,
        end_ms: start + 3_600_000,
        scored: 500,
        late_events: 0,
        errors: 0,
        features: vec![drift("page_views", 0.41), drift("industry", 0.01)],
        score_psi: Some(0.02),
        score_judged: true,
        shadow: None,
        latency: None,
        outcomes: None,
        emitted_at_ms: start,
    };
    publish_avro(
        &metrics,
        "lead-scoring",
        "WindowReport.avsc",
        report.to_value(),
    )
    .await;
    let alert = Value::Record(vec![
        (
            "fingerprint".into(),
            Value::String("lead-scoring/psi/page_views".into()),
        ),
        ("status".into(), Value::Enum(0, "firing".into())),
        ("severity".into(), Value::Enum(2, "critical".into())),
        ("kind".into(), Value::String("psi".into())),
        (
            "feature".into(),
            Value::Union(1, Box::new(Value::String("page_views".into()))),
        ),
        ("value".into(), Value::Double(0.41)),
        ("threshold".into(), Value::Double(0.25)),
        ("window_start".into(), Value::TimestampMillis(start)),
        (
            "window_end".into(),
            Value::TimestampMillis(start + 3_600_000),
        ),
        ("model_name".into(), Value::String("lead-scoring".into())),
        ("model_version".into(), Value::String("7".into())),
        ("message".into(), Value::String("psi of page_views".into())),
        ("raised_at".into(), Value::TimestampMillis(start)),
    ]);
    publish_avro(&alerts, "lead-scoring/psi/page_views", "Alert.avsc", alert).await;
    let event = LifecycleEvent {
        event_id: unique("ev"),
        model_name: "lead-scoring".into(),
        version: "8".into(),
        stage: Stage::Canary,
        canary_percent: 10,
        champion_version: Some("7".into()),
        challenger_version: Some("8".into()),
        reason: "shadow passed".into(),
        at_ms: start,
    };
    publish_avro(
        &lifecycle,
        "lead-scoring",
        "ModelLifecycleEvent.avsc",
        event.to_value(),
    )
    .await;

    let (svc, port) = start_dashboard(&metrics, &alerts, &lifecycle, &scores, &[]).await;
    // The page is open; its data needs the token.
    let page = get(port, "/", None).await;
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("leadscore, live"));
    assert_eq!(get(port, "/api/state", None).await.status().as_u16(), 401);
    assert_eq!(
        get(port, "/api/state", Some("wrong-token-0123456789"))
            .await
            .status()
            .as_u16(),
        401
    );

    // Scores produced after it started: read from the end of the topic.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    let id = registry
        .register(
            &leadscore_schemas::value_subject(&scores),
            leadscore_schemas::find("LeadScore.avsc").unwrap().text,
        )
        .await
        .unwrap();
    let producer: FutureProducer = client(&[]).create().unwrap();
    for i in 0..30 {
        let band = [Band::High, Band::Medium, Band::Low][i % 3];
        let r = LeadScore {
            lead_id: format!("dash-{i}"),
            model: ModelScore {
                model_name: "lead-scoring".into(),
                model_version: "7".into(),
                score: 0.5,
                band,
                reasons: None,
            },
            role: Role::Champion,
            features: Vec::new(),
            event_time_ms: start,
            scored_at_ms: start,
            latency_ms: 1.0,
            source: None,
        };
        let bytes = records::framed(id, |b| r.encode(b));
        producer
            .send(
                FutureRecord::to(&scores).key(&r.lead_id).payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }

    let state = state_when(port, Duration::from_secs(30), |s| {
        s["drift"].as_array().is_some_and(|d| !d.is_empty())
            && s["alerts"]["firing"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            && s["models"].as_array().is_some_and(|m| !m.is_empty())
            && s["pipeline"]["scores_total"] == 30
    })
    .await;
    let d = &state["drift"][0];
    assert_eq!(
        (d["version"].as_str(), d["scored"].as_u64()),
        (Some("7"), Some(500))
    );
    let flagged: Vec<&str> = d["features"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["flagged"] == true)
        .map(|f| f["feature"].as_str().unwrap())
        .collect();
    assert_eq!(flagged, ["page_views"], "the drifted feature, and only it");
    assert_eq!(state["alerts"]["firing_by_severity"]["critical"], 1);
    let m = &state["models"][0];
    assert_eq!(
        (m["champion"].as_str(), m["canary"]["percent"].as_i64()),
        (Some("7"), Some(10))
    );
    assert_eq!(state["pipeline"]["scores_total"], 30);

    // The page's stream carries the same state.
    let mut events = get(port, "/events", Some(TOKEN)).await;
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let mut buf = String::new();
    while !buf.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), events.chunk())
            .await
            .expect("an event within the push interval")
            .unwrap()
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = buf
        .split("\n\n")
        .next()
        .unwrap()
        .strip_prefix("data: ")
        .unwrap();
    let streamed: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        streamed["drift"][0]["features"],
        state["drift"][0]["features"]
    );

    // In a browser: headless Chromium (Debian's) runs the page's script against the stream.
    let url = format!("http://127.0.0.1:{port}/#token={TOKEN}");
    let dom = chromium(&url, &["--dump-dom"]);
    assert!(
        dom.contains("data-updated="),
        "the page rendered a snapshot: {dom}"
    );
    assert!(
        dom.contains(r#"<tr data-feature="page_views" class="flag">"#),
        "the drifted feature is flagged in the page"
    );
    assert!(dom.contains(r#"<tr data-feature="industry" class="">"#));
    assert!(
        dom.contains("PSI warning 0.25, critical 0.5"),
        "the aggregator's thresholds (drift.thresholds) drawn"
    );
    assert!(dom.contains(r#"<b id="firing">1</b>"#), "one alert firing");
    // Each feature opens on a click to its reference vs current bars.
    assert!(
        dom.contains(r#"<details data-histogram="page_views">"#),
        "{dom}"
    );
    assert!(dom.contains("<title>reference 60.0%</title>"));
    assert!(
        dom.contains("<title>current 19.0%</title>"),
        "page_views: 0.6 - 0.41"
    );
    assert!(
        dom.contains(r#"<span data-band="High">High: <b>10</b></span>"#),
        "{dom}"
    );
    assert!(dom.contains("8 (10%)"), "the canary and its share");
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "a screenshot at {}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
    // Stopped before its topics go, so it logs no missing-topic errors.
    drop(svc);
    delete_topics(&[&metrics, &alerts, &lifecycle, &scores]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_panel_follows_a_real_scorer() {
    use leadscore_e2e::scorer::{Topics, leads, start_scorer_with, stream};
    let t = Topics::create(3).await;
    let base = unique("it-dash-pipe");
    let empty: Vec<String> = ["metrics", "alerts", "lifecycle"]
        .iter()
        .map(|s| format!("{base}.{s}"))
        .collect();
    for e in &empty {
        create_topic(e, 1).await;
    }
    let (scorer, sport) = start_scorer_with(
        env!("CARGO_BIN_EXE_leadscore"),
        &t,
        &unique("it-dash"),
        "a",
        false,
        &[],
    );
    let (svc, port) = start_dashboard(
        &empty[0],
        &empty[1],
        &empty[2],
        &t.scores,
        &[(
            "LEADSCORE__DASHBOARD__SCRAPE_URLS",
            format!("[\"http://127.0.0.1:{sport}/metrics\"]"),
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ls = leads("dash-pipe", 300, 31);
    stream(t.input.clone(), ls, 100).await;
    let state = state_when(port, Duration::from_secs(60), |s| {
        let p = &s["pipeline"];
        p["scores_total"] == 300
            && p["leads_in_per_sec"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x[1].as_f64() > Some(0.0)))
            && p["latency_ms"]["p50"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    })
    .await;
    let p = &state["pipeline"];
    assert_eq!(p["scores_total"], 300, "{p}");
    let peak_in = p["leads_in_per_sec"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x[1].as_f64())
        .fold(0.0, f64::max);
    assert!(
        peak_in > 20.0 && peak_in < 1_000.0,
        "leads in at about 100/s: {peak_in}"
    );
    let p50 = p["latency_ms"]["p50"][0][1].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 < 10_000.0, "event-to-score p50 {p50} ms");
    assert!(p["lag"].as_array().is_some_and(|a| !a.is_empty()));
    assert!(
        p["error_rate"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x[1] == 0.0),
        "no dead letters: {}",
        p["error_rate"]
    );
    let names: Vec<&str> = empty.iter().map(String::as_str).collect();
    drop((svc, scorer));
    delete_topics(&names).await;
    t.delete().await;
}

async fn get_ok(port: u16) -> Option<()> {
    reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .ok()
        .map(|_| ())
}

/// Starts `leadscore dashboard` on the given topics with the test token and `extra`
/// variables; waits until it listens.
async fn start_dashboard(
    metrics: &str,
    alerts: &str,
    lifecycle: &str,
    scores: &str,
    extra: &[(&str, String)],
) -> (Service, u16) {
    let port = free_port();
    let svc: Service = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .arg("dashboard")
        .env("LEADSCORE__DASHBOARD__METRICS_TOPIC", metrics)
        .env("LEADSCORE__DASHBOARD__ALERTS_TOPIC", alerts)
        .env("LEADSCORE__DASHBOARD__LIFECYCLE_TOPIC", lifecycle)
        .env("LEADSCORE__DASHBOARD__SCORES_TOPIC", scores)
        .env("LEADSCORE__DASHBOARD__PUSH_INTERVAL_MS", "300")
        .env(
            "LEADSCORE__DASHBOARD__HTTP_LISTEN",
            format!("127.0.0.1:{port}"),
        )
        .env("LEADSCORE__LOOKUP__AUTH_TOKENS", format!("[\"{TOKEN}\"]"))
        .env("LEADSCORE_LOG", "warn")
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .spawn()
        .unwrap()
        .into();
    let deadline = Instant::now() + Duration::from_secs(60);
    while get_ok(port).await.is_none() {
        assert!(Instant::now() < deadline, "the dashboard never listened");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (svc, port)
}

/// The dashboard's state once `done` holds for it (or after `within`, for the assertions).
async fn state_when(
    port: u16,
    within: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let s: serde_json::Value = get(port, "/api/state", Some(TOKEN))
            .await
            .json()
            .await
            .unwrap();
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The hourly window report starting at `start` on `topic`: (scored, PSI by feature).
async fn report_on_topic(
    topic: &str,
    start: i64,
) -> (i64, std::collections::BTreeMap<String, f64>) {
    let decoder =
        leadscore_registry::Decoder::new(Registry::new(&leadscore_e2e::config().registry).unwrap());
    let c = leadscore_e2e::consumer(topic, "read_committed");
    for m in leadscore_e2e::receive(&c, usize::MAX, Duration::from_secs(3)).await {
        let Value::Record(fields) = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap()
        else {
            continue;
        };
        let get = |n: &str| {
            fields
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let (Value::TimestampMillis(s), Value::Enum(_, kind)) =
            (get("window_start"), get("window_kind"))
        else {
            panic!("a window report without its window")
        };
        if s != start || kind != "hourly" {
            continue;
        }
        let Value::Long(scored) = get("scored") else {
            panic!("scored")
        };
        let Value::Array(features) = get("features") else {
            panic!("features")
        };
        let psi = features
            .iter()
            .filter_map(|f| match f {
                Value::Record(ff) => {
                    let name = ff.iter().find(|(k, _)| k == "feature")?;
                    let psi = ff.iter().find(|(k, _)| k == "psi")?;
                    match (&name.1, &psi.1) {
                        (Value::String(n), Value::Double(p)) => Some((n.clone(), *p)),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect();
        return (scored, psi);
    }
    panic!("no hourly report from {start} on {topic}")
}

/// The firing alerts on `topic`, the latest per fingerprint.
async fn firing_on_topic(topic: &str) -> Vec<leadscore_aggregator::route::AlertMessage> {
    let decoder =
        leadscore_registry::Decoder::new(Registry::new(&leadscore_e2e::config().registry).unwrap());
    let c = leadscore_e2e::consumer(topic, "read_committed");
    let mut latest = std::collections::BTreeMap::new();
    for m in leadscore_e2e::receive(&c, usize::MAX, Duration::from_secs(3)).await {
        let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
        let a = leadscore_aggregator::route::AlertMessage::from_value(&v).unwrap();
        latest.insert(a.fingerprint.clone(), a);
    }
    latest.into_values().filter(|a| a.firing).collect()
}

/// The `<tr>` of `feature` in the page's drift table.
fn feature_row<'d>(dom: &'d str, feature: &str) -> &'d str {
    let start = dom
        .find(&format!("<tr data-feature=\"{feature}\""))
        .unwrap_or_else(|| panic!("no row for {feature}: {dom}"));
    let len = dom[start..].find("</tr>").unwrap();
    &dom[start..start + len]
}

/// The whole path, in a browser: leads of a clean hour and of an hour drifted with the
/// generator's knob (`page_views=+25`) go as CDC events through a real scorer and a real drift
/// aggregator; the page first shows the clean window with nothing flagged and no alert, then the
/// drifted one with `page_views` flagged, its PSI and the firing alerts as the topics hold them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_from_the_generators_knobs_through_the_pipeline_is_flagged_in_the_browser() {
    use leadscore_crm::{DriftSpec, Generator, GeneratorConfig};
    use leadscore_e2e::scorer::{Topics, create_event_at, produce, start_scorer_with};
    /// 2026-01-05 10:00 UTC: the clean hour; the drifted one follows.
    const W0: i64 = 1_767_607_200_000;
    const HOUR: i64 = 3_600_000;
    const PER_HOUR: usize = 1_000;

    let exe = env!("CARGO_BIN_EXE_leadscore");
    let t = Topics::create(3).await;
    let run = leadscore_e2e::drift::Run::create().await;
    let lifecycle = unique("it-dash-drift.lifecycle");
    create_topic(&lifecycle, 1).await;
    let (scorer, _) = start_scorer_with(exe, &t, &unique("it-dash-drift"), "a", false, &[]);
    let (drift, _) = leadscore_e2e::drift::start(exe, &t.scores, &t.shadow, &run, "dash-0", &[]);
    let (dash, port) = start_dashboard(&run.metrics, &run.alerts, &lifecycle, &t.scores, &[]).await;
    let url = format!("http://127.0.0.1:{port}/#token={TOKEN}");

    // Create events spread over an hour, with the CRM commit time as their event time.
    let hour = |prefix: &str, seed: u64, drift: DriftSpec, start: i64| {
        let mut g = Generator::new(GeneratorConfig {
            seed,
            id_prefix: prefix.into(),
            drift,
            ..Default::default()
        });
        (0..PER_HOUR)
            .map(|i| {
                let l = g.next_lead().lead;
                let at = start + 60_000 + i as i64 * (HOUR - 120_000) / PER_HOUR as i64;
                (Some(l.lead_id.clone()), create_event_at(&l, at))
            })
            .collect::<Vec<_>>()
    };
    let mut shifted = DriftSpec::default();
    shifted.add_shift("page_views=+25").unwrap();
    produce(&t.input, hour("clean", 41, DriftSpec::default(), W0)).await;
    // The drifted hour's events move the event-time watermark past the clean hour: it closes.
    produce(&t.input, hour("drifted", 42, shifted, W0 + HOUR)).await;

    // 1. The clean hour: judged, nothing flagged, no alert.
    let s = state_when(port, Duration::from_secs(120), |s| {
        s["drift"][0]["window_start"] == W0
    })
    .await;
    assert_eq!(
        s["drift"][0]["window_start"], W0,
        "the clean hour's report: {s}"
    );
    let (scored, _) = report_on_topic(&run.metrics, W0).await;
    assert_eq!(
        scored, PER_HOUR as i64,
        "every clean lead scored and counted"
    );
    let dom = chromium(&url, &["--dump-dom"]);
    assert!(
        dom.contains(&format!("{scored} scores")),
        "the clean hour's count as the topic holds it: {dom}"
    );
    assert!(feature_row(&dom, "page_views").contains(r#"class="""#));
    assert!(
        !dom.contains(r#"class="flag""#),
        "nothing flagged in a clean hour"
    );
    assert!(
        dom.contains(r#"<b id="firing">0</b>"#),
        "no alert in a clean hour"
    );

    // 2. One record per input partition three hours on closes the drifted hour.
    let producer: FutureProducer = client(&[]).create().unwrap();
    let mut g = Generator::new(GeneratorConfig {
        seed: 43,
        id_prefix: "flush".into(),
        ..Default::default()
    });
    for p in 0..3 {
        let l = g.next_lead().lead;
        let value = create_event_at(&l, W0 + 3 * HOUR + 60_000);
        producer
            .send(
                FutureRecord::to(&t.input)
                    .key(l.lead_id.as_str())
                    .partition(p)
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    let s = state_when(port, Duration::from_secs(120), |s| {
        s["drift"][0]["window_start"] == W0 + HOUR
            && s["alerts"]["firing"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(
        s["drift"][0]["window_start"],
        W0 + HOUR,
        "the drifted hour's report: {s}"
    );
    let (scored, psi) = report_on_topic(&run.metrics, W0 + HOUR).await;
    let firing = firing_on_topic(&run.alerts).await;
    assert!(
        firing
            .iter()
            .any(|a| a.feature.as_deref() == Some("page_views") && a.kind == "psi"),
        "the aggregator alerts on page_views: {firing:?}"
    );
    let dom = chromium(&url, &["--dump-dom"]);
    assert!(dom.contains(&format!("{scored} scores")), "{dom}");
    let row = feature_row(&dom, "page_views");
    assert!(row.contains(r#"class="flag""#), "page_views flagged: {row}");
    assert!(
        row.contains(&format!(r#"<td class="num">{:.3}</td>"#, psi["page_views"])),
        "page_views' PSI as the report holds it ({}): {row}",
        psi["page_views"]
    );
    // Flagged: a PSI of 0.25 or more, or a warning or critical alert firing on the feature.
    for (feature, p) in &psi {
        let alerted = firing.iter().any(|a| {
            a.feature.as_deref() == Some(feature.as_str())
                && a.severity != leadscore_drift::alerts::Severity::Info
        });
        assert_eq!(
            feature_row(&dom, feature).contains(r#"class="flag""#),
            *p >= 0.25 || alerted,
            "{feature} (PSI {p}, alerted {alerted})"
        );
    }
    assert!(
        dom.contains(&format!(r#"<b id="firing">{}</b>"#, firing.len())),
        "the firing alerts as the topic holds them ({}): {dom}",
        firing.len()
    );
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-drift.png");
    chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!("screenshot: {}", shot.display());

    let mut names: Vec<&str> = run.topics().to_vec();
    names.push(&lifecycle);
    drop((dash, drift, scorer));
    delete_topics(&names).await;
    t.delete().await;
}
