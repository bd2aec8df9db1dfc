//! The drift aggregator against the real broker and registry: ground truth
//! from the generator's drift knobs, identical reports across repeated SIGKILLs and
//! across a split over instances, and alerts routed to real local HTTP and
//! SMTP receivers.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use leadscore_e2e::Service;
use leadscore_e2e::drift::Run;
use std::time::Duration;

use apache_avro::types::Value;
use leadscore_aggregator::route::AlertMessage;
use leadscore_crm::{DriftSpec, Generator, GeneratorConfig};
use leadscore_e2e::{
    client, consumer, create_topic, delete_topics, free_port, receive, terminate, unique,
};
use leadscore_model::{BandThresholds, Model};
use leadscore_registry::{Decoder, Registry};
use leadscore_scorer::records::{self, LeadScore, ModelScore, Reason, Role, ShadowScore};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// 2026-01-05 00:00 UTC: event time of window 0.
const T0: i64 = 1_767_571_200_000;
const HOUR: i64 = 3_600_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> Model {
    leadscore_model::init_runtime(None).unwrap();
    Model::load_dir(&repo().join("models/default")).unwrap()
}

/// The input topics, shared by every aggregator run of a test.
struct Input {
    scores: String,
    shadow: String,
}

impl Input {
    async fn create(partitions: i32) -> Self {
        let base = unique("it.drift");
        let t = Input {
            scores: format!("{base}.scores"),
            shadow: format!("{base}.shadow"),
        };
        create_topic(&t.scores, partitions).await;
        create_topic(&t.shadow, partitions).await;
        t
    }
}

fn start(input: &Input, run: &Run, instance: &str, extra: &[(&str, String)]) -> (Service, u16) {
    leadscore_e2e::drift::start(
        env!("CARGO_BIN_EXE_leadscore"),
        &input.scores,
        &input.shadow,
        run,
        instance,
        extra,
    )
}

async fn http_get(port: u16, path: &str) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    reqwest::get(&url).await.unwrap().text().await.unwrap()
}

fn generator(seed: u64, drift: DriftSpec) -> Generator {
    Generator::new(GeneratorConfig {
        seed,
        drift,
        ..Default::default()
    })
}

fn bands() -> BandThresholds {
    let cfg = leadscore_e2e::config().scorer;
    BandThresholds {
        high: cfg.band_high,
        medium: cfg.band_medium,
    }
}

/// Scores a lead as the scorer would, with the given event time; `None` for invalid input.
fn score_lead(model: &Model, lead: &leadscore_crm::Lead, event: i64, i: i64) -> Option<LeadScore> {
    let meta = model.metadata();
    let Ok(Ok(score)) = model.score(lead) else {
        return None;
    };
    Some(LeadScore {
        lead_id: lead.lead_id.clone(),
        model: ModelScore {
            model_name: meta.model_name.clone(),
            model_version: meta.version.clone(),
            score: score.probability,
            band: bands().band(score.probability),
            reasons: model
                .reasons(lead, 3)
                .map(|r| r.iter().map(ToString::to_string).collect()),
        },
        role: Role::Champion,
        features: model.features().raw_values(lead),
        event_time_ms: event,
        scored_at_ms: event + 40,
        latency_ms: 40.0 + (i % 50) as f64,
        source: None,
    })
}

/// Scores `n` generated leads as the scorer would, with event times spread over window `w`.
fn window_scores(model: &Model, g: &mut Generator, w: i64, n: usize) -> Vec<LeadScore> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let lead = g.next_lead().lead;
        let i = out.len() as i64;
        let event = T0 + w * HOUR + i * (HOUR - 1000) / n as i64;
        out.extend(score_lead(model, &lead, event, i));
    }
    out
}

/// A challenger that scores 0.02 higher than live, with live's reasons in reverse order
/// when `flip` (another top reason).
fn shadow_of(s: &LeadScore, flip: bool) -> ShadowScore {
    let shadow = (s.model.score + 0.02).min(1.0);
    ShadowScore {
        lead_id: s.lead_id.clone(),
        reason: Reason::Challenger,
        shadow: ModelScore {
            model_name: s.model.model_name.clone(),
            model_version: "challenger-1".into(),
            score: shadow,
            band: bands().band(shadow),
            reasons: s.model.reasons.as_ref().map(|r| {
                let mut r = r.to_vec();
                if flip {
                    r.reverse();
                }
                r.into()
            }),
        },
        live: s.model.clone(),
        live_role: Role::Champion,
        event_time_ms: s.event_time_ms,
        scored_at_ms: s.scored_at_ms,
        latency_ms: s.latency_ms,
        error: None,
    }
}

async fn schema_id(topic: &str, file: &str) -> u32 {
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    registry
        .register(
            &leadscore_schemas::value_subject(topic),
            leadscore_schemas::find(file).unwrap().text,
        )
        .await
        .unwrap()
}

async fn produce_scores(input: &Input, scores: &[LeadScore], shadow_every: usize) {
    let sid = schema_id(&input.scores, "LeadScore.avsc").await;
    let shid = schema_id(&input.shadow, "ShadowScore.avsc").await;
    let producer: FutureProducer = client(&[("linger.ms", "20")]).create().unwrap();
    let mut sends = Vec::new();
    for (i, s) in scores.iter().enumerate() {
        let bytes = records::framed(sid, |out| s.encode(out));
        sends.push(
            producer
                .send_result(
                    FutureRecord::to(&input.scores)
                        .key(s.lead_id.as_str())
                        .payload(&bytes),
                )
                .map_err(|(e, _)| e)
                .unwrap(),
        );
        if shadow_every > 0 && i % shadow_every == 0 {
            // Every other pair disagrees on the top reason.
            let sh = shadow_of(s, (i / shadow_every) % 2 == 1);
            let bytes = records::framed(shid, |out| sh.encode(out));
            sends.push(
                producer
                    .send_result(
                        FutureRecord::to(&input.shadow)
                            .key(s.lead_id.as_str())
                            .payload(&bytes),
                    )
                    .map_err(|(e, _)| e)
                    .unwrap(),
            );
        }
    }
    for s in sends {
        s.await.unwrap().unwrap();
    }
}

/// Moves every partition's watermark past `w`'s end: one record per partition, at window `w + 2`.
async fn flush_to(input: &Input, model: &Model, w: i64, partitions: i32) {
    let sid = schema_id(&input.scores, "LeadScore.avsc").await;
    let producer: FutureProducer = client(&[]).create().unwrap();
    let mut g = generator(999, DriftSpec::default());
    let mut scores = window_scores(model, &mut g, w + 2, partitions as usize);
    for (p, s) in scores.iter_mut().enumerate() {
        let bytes = records::framed(sid, |out| s.encode(out));
        producer
            .send(
                FutureRecord::to(&input.scores)
                    .key(s.lead_id.as_str())
                    .partition(p as i32)
                    .payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// A `WindowReport`, as the test reads it.
#[derive(Debug, Clone, PartialEq)]
struct Report {
    kind: String,
    version: String,
    start: i64,
    scored: i64,
    late: i64,
    psi: BTreeMap<String, f64>,
    score_psi: Option<f64>,
    shadow_pairs: Option<i64>,
    shadow_mad: Option<f64>,
    top_reason_agreement: Option<f64>,
    p50: Option<f64>,
    /// Labelled leads, AUC and conversion rate by band, for outcome reports.
    outcomes: Option<Outcomes>,
    /// Everything but emitted_at.
    value: Vec<(String, Value)>,
}

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> &'a Value {
    let v = &fields.iter().find(|(n, _)| n == name).unwrap().1;
    match v {
        Value::Union(_, inner) => inner,
        other => other,
    }
}

fn long(v: &Value) -> i64 {
    match v {
        Value::Long(l) | Value::TimestampMillis(l) => *l,
        Value::Int(i) => i64::from(*i),
        other => panic!("not a long: {other:?}"),
    }
}

fn double(v: &Value) -> Option<f64> {
    match v {
        Value::Double(d) => Some(*d),
        _ => None,
    }
}

/// Labelled, AUC, conversion rate by band, revenue per lead by band.
type Outcomes = (
    i64,
    Option<f64>,
    BTreeMap<String, f64>,
    BTreeMap<String, f64>,
);

fn doubles(v: &Value) -> BTreeMap<String, f64> {
    match v {
        Value::Map(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), double(v).unwrap()))
            .collect(),
        other => panic!("not a map: {other:?}"),
    }
}

fn string(v: &Value) -> String {
    match v {
        Value::String(s) | Value::Enum(_, s) => s.clone(),
        other => panic!("not a string: {other:?}"),
    }
}

fn report(v: Value) -> Report {
    let Value::Record(fields) = v else {
        panic!("not a record")
    };
    let mut psi = BTreeMap::new();
    if let Value::Array(fs) = field(&fields, "features") {
        for f in fs {
            let Value::Record(ff) = f else { continue };
            psi.insert(
                string(field(ff, "feature")),
                double(field(ff, "psi")).unwrap(),
            );
        }
    }
    let sub = |name: &str, inner: &str| match field(&fields, name) {
        Value::Record(r) => Some(field(r, inner).clone()),
        _ => None,
    };
    Report {
        kind: string(field(&fields, "window_kind")),
        version: string(field(&fields, "model_version")),
        start: long(field(&fields, "window_start")),
        scored: long(field(&fields, "scored")),
        late: long(field(&fields, "late_events")),
        psi,
        score_psi: double(field(&fields, "score_psi")),
        shadow_pairs: sub("shadow", "pairs").map(|v| long(&v)),
        shadow_mad: sub("shadow", "mean_abs_diff").and_then(|v| double(&v)),
        top_reason_agreement: sub("shadow", "top_reason_agreement").and_then(|v| double(&v)),
        p50: sub("latency", "p50_ms").and_then(|v| double(&v)),
        outcomes: match field(&fields, "outcomes") {
            Value::Record(o) => Some((
                long(field(o, "labelled")),
                double(field(o, "auc")),
                doubles(field(o, "conversion_rate_by_band")),
                doubles(field(o, "revenue_per_lead_by_band")),
            )),
            _ => None,
        },
        value: fields
            .into_iter()
            .filter(|(n, _)| n != "emitted_at")
            .collect(),
    }
}

/// Reads the reports until `want` hourly ones are there.
async fn hourly_reports(run: &Run, want: usize, within: Duration) -> Vec<Report> {
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    let decoder = Decoder::new(registry);
    let c = consumer(&run.metrics, "read_committed");
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.iter().filter(|r: &&Report| r.kind == "hourly").count() < want
        && tokio::time::Instant::now() < deadline
    {
        for m in receive(&c, 1, Duration::from_secs(1)).await {
            let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
            out.push(report(v));
        }
    }
    out
}

async fn alerts(run: &Run, within: Duration) -> Vec<AlertMessage> {
    let registry = Registry::new(&leadscore_e2e::config().registry).unwrap();
    let decoder = Decoder::new(registry);
    let c = consumer(&run.alerts, "read_committed");
    let mut out = Vec::new();
    for m in receive(&c, usize::MAX, within).await {
        let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
        out.push(AlertMessage::from_value(&v).unwrap());
    }
    out
}

fn knob(f: impl FnOnce(&mut DriftSpec) -> leadscore_crm::Result<()>) -> DriftSpec {
    let mut d = DriftSpec::default();
    f(&mut d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_drift_is_flagged_on_its_feature_and_clean_windows_stay_quiet() {
    let model = model();
    let input = Input::create(3).await;
    let run = Run::create().await;
    let per_window = 800;
    let clean = 20;
    let mut scores = Vec::new();
    let mut g = generator(7, DriftSpec::default());
    for w in 0..clean {
        scores.extend(window_scores(&model, &mut g, w, per_window));
    }
    // One drift per window after the clean ones, with the alerts it must raise:
    // (knob, [(kind, feature, severity)]); "score" stands for the score distribution.
    type Expect = Vec<(&'static str, &'static str, &'static str)>;
    let drifts: Vec<(DriftSpec, Expect)> = vec![
        (
            knob(|d| d.add_shift("page_views=+25")),
            vec![("psi", "page_views", "critical")],
        ),
        (
            knob(|d| d.add_mix("industry=Retail:4")),
            vec![("psi", "industry", "warning")],
        ),
        (
            knob(|d| d.add_new_category("referral_source=TikTok:0.3")),
            vec![
                ("new_category", "referral_source", "warning"),
                ("psi", "referral_source", "critical"),
            ],
        ),
        (
            knob(|d| d.add_missing("time_on_site=0.4")),
            vec![
                ("missing_rate", "time_on_site", "warning"),
                ("psi", "time_on_site", "critical"),
            ],
        ),
        (
            knob(|d| d.add_mix("company_size=Enterprise:8")),
            vec![("psi", "company_size", "critical")],
        ),
    ];
    for (i, (spec, ..)) in drifts.iter().enumerate() {
        let mut g = generator(100 + i as u64, spec.clone());
        scores.extend(window_scores(&model, &mut g, clean + i as i64, per_window));
    }
    let last = clean + drifts.len() as i64 - 1;
    produce_scores(&input, &scores, 4).await;
    flush_to(&input, &model, last, 3).await;

    let (child, port) = start(&input, &run, "gt-0", &[]);
    let reports = hourly_reports(&run, (last + 1) as usize, Duration::from_secs(120)).await;
    let alerts = alerts(&run, Duration::from_secs(3)).await;
    let metrics = http_get(port, "/metrics").await;
    terminate(child);
    // Every score is counted once (the flush records too), every shadow pair once.
    assert!(
        metrics.contains(&format!(
            "leadscore_drift_events_total{{kind=\"counted\"}} {}",
            scores.len() + 3
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "leadscore_drift_events_total{{kind=\"shadow\"}} {}",
            scores.len() / 4
        )),
        "{metrics}"
    );

    let hourly: Vec<&Report> = reports.iter().filter(|r| r.kind == "hourly").collect();
    assert_eq!(hourly.len(), (last + 1) as usize, "one report per window");
    // The first day (windows 0 to 23) is rolled up into one daily report.
    let daily: Vec<&Report> = reports.iter().filter(|r| r.kind == "daily").collect();
    assert_eq!(
        daily.len(),
        1,
        "{:?}",
        daily.iter().map(|r| r.start).collect::<Vec<_>>()
    );
    assert_eq!(
        (daily[0].start, daily[0].scored),
        (T0, 24 * per_window as i64)
    );
    for r in &hourly {
        assert_eq!(r.scored, per_window as i64, "window {}", r.start);
        assert_eq!(r.late, 0);
        // Every fourth lead has a challenger score 0.02 higher.
        assert_eq!(r.shadow_pairs, Some((per_window / 4) as i64));
        assert!(
            (r.shadow_mad.unwrap() - 0.02).abs() < 1e-3,
            "{:?}",
            r.shadow_mad
        );
        // Every other pair's challenger names another feature first.
        let pairs = (per_window / 4) as f64;
        assert!(
            (r.top_reason_agreement.unwrap() - 0.5).abs() <= 1.0 / pairs,
            "{:?}",
            r.top_reason_agreement
        );
        assert!(r.p50.unwrap() >= 40.0 && r.p50.unwrap() <= 90.0);
    }
    // Hourly windows' alerts (the score is judged in the daily roll-up: the model takes
    // the hour of day).
    let firing_in = |w: i64| -> Vec<&AlertMessage> {
        alerts
            .iter()
            .filter(|a| a.firing && a.window_start_ms == T0 + w * HOUR)
            .filter(|a| a.window_end_ms - a.window_start_ms == HOUR)
            .filter(|a| a.severity != leadscore_drift::alerts::Severity::Info)
            .collect()
    };
    for w in 0..clean {
        assert!(
            firing_in(w).is_empty(),
            "clean window {w} raised {:?}",
            firing_in(w)
        );
    }
    for (i, (_, expect)) in drifts.iter().enumerate() {
        let w = clean + i as i64;
        let fired = firing_in(w);
        for (kind, feature, severity) in expect {
            let hit = fired
                .iter()
                .find(|a| a.kind == *kind && a.feature.as_deref().unwrap_or("score") == *feature)
                .map(|a| format!("{:?}", a.severity).to_lowercase());
            assert_eq!(
                hit.as_deref(),
                Some(*severity),
                "window {w}, {kind} of {feature}: {fired:?}"
            );
        }
        // Nothing fires on a feature the drift did not touch (the score may follow any feature).
        for a in &fired {
            let f = a.feature.as_deref().unwrap_or("score");
            assert!(
                expect.iter().any(|(_, e, _)| *e == f) || f == "score",
                "window {w}: {} fired too",
                a.fingerprint
            );
        }
    }
    delete_topics(&[&input.scores, &input.shadow]).await;
    delete_topics(&run.topics()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_stays_quiet_until_a_drift_and_then_names_each_drifted_feature() {
    let model = model();
    let input = Input::create(3).await;
    let run = Run::create().await;
    // Three days of leads as they are created: event time = creation time, so an hourly
    // window holds one hour of the day and one weekday. Two and a half clean days, then
    // from hour 60 (noon, when an hour holds enough leads to judge) four drifts at once.
    let (hours, drift_at) = (72i64, 60i64);
    let at = |h: i64| chrono::DateTime::from_timestamp_millis(T0 + h * HOUR).unwrap();
    let mut g = Generator::new(GeneratorConfig {
        seed: 5,
        days: 3,
        end: at(hours),
        drift: knob(|d| {
            d.add_shift("page_views=+25")?;
            d.add_mix("industry=Retail:4")?;
            d.add_new_category("referral_source=TikTok:0.3")?;
            d.add_missing("time_on_site=0.4")
        }),
        drift_from: Some(at(drift_at)),
        ..Default::default()
    });
    let mut leads: Vec<leadscore_crm::Lead> = (0..72_000).map(|_| g.next_lead().lead).collect();
    leads.sort_by_key(|l| l.created_at);
    let scores: Vec<LeadScore> = leads
        .iter()
        .enumerate()
        .filter_map(|(i, l)| score_lead(&model, l, l.created_at.timestamp_millis(), i as i64))
        .collect();
    produce_scores(&input, &scores, 0).await;
    flush_to(&input, &model, hours - 1, 3).await;
    let (child, _) = start(&input, &run, "live-0", &[]);
    let reports = hourly_reports(&run, hours as usize, Duration::from_secs(180)).await;
    let alerts = alerts(&run, Duration::from_secs(3)).await;
    terminate(child);

    let hourly: Vec<&Report> = reports.iter().filter(|r| r.kind == "hourly").collect();
    let judged = hourly
        .iter()
        .filter(|r| r.start < T0 + drift_at * HOUR && r.scored >= 500)
        .count();
    assert!(
        judged >= 28,
        "most clean hours hold enough leads to be judged: {judged}"
    );
    let serious: Vec<&AlertMessage> = alerts
        .iter()
        .filter(|a| a.firing && a.severity != leadscore_drift::alerts::Severity::Info)
        .collect();
    // No warning or critical alert from a window that ends before the drift: not on the
    // calendar features (judged daily and weekly only), not on the score (judged daily:
    // the model takes the hour of day), not on anything else.
    let early: Vec<&&AlertMessage> = serious
        .iter()
        .filter(|a| a.window_end_ms <= T0 + drift_at * HOUR)
        .collect();
    assert!(early.is_empty(), "alerts before the drift: {early:?}");
    // In the first drifted hour: each drifted feature, by the rule its drift breaks.
    let first: Vec<(String, String)> = serious
        .iter()
        .filter(|a| a.window_start_ms == T0 + drift_at * HOUR)
        .filter(|a| a.window_end_ms - a.window_start_ms == HOUR)
        .map(|a| (a.kind.clone(), a.feature.clone().unwrap_or_default()))
        .collect();
    for (kind, feature) in [
        ("psi", "page_views"),
        ("psi", "industry"),
        ("new_category", "referral_source"),
        ("missing_rate", "time_on_site"),
    ] {
        assert!(
            first.iter().any(|(k, f)| k == kind && f == feature),
            "{kind} on {feature} in the first drifted hour: {first:?}"
        );
    }
    delete_topics(&[&input.scores, &input.shadow]).await;
    delete_topics(&run.topics()).await;
}

/// Every report of a run, without emission times, in a stable order.
async fn all_reports(run: &Run, hourly: usize) -> Vec<Vec<(String, Value)>> {
    let mut reports = hourly_reports(run, hourly, Duration::from_secs(120)).await;
    reports.sort_by_key(|r| (r.kind.clone(), r.start, r.version.clone()));
    reports.into_iter().map(|r| r.value).collect()
}

/// Asserts two report lists are equal, naming the first field that differs.
fn assert_same(a: &[Vec<(String, Value)>], b: &[Vec<(String, Value)>]) {
    assert_eq!(a.len(), b.len(), "report counts differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        for ((name, u), (_, v)) in x.iter().zip(y) {
            assert!(u == v, "report {i}, field {name}: {u:?} != {v:?}");
        }
    }
}

fn metric(text: &str, kind: &str) -> u64 {
    let prefix = format!("leadscore_drift_events_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the aggregator on `port` has counted `n` scores.
async fn wait_counted(port: u16, n: u64) -> String {
    for _ in 0..600 {
        if let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await
            && let Ok(text) = resp.text().await
            && metric(&text, "counted") >= n
        {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the aggregator on {port} did not count {n} scores");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_mid_window_and_restarts_give_the_reports_of_an_uninterrupted_run() {
    let model = model();
    let input = Input::create(3).await;
    let killed = Run::create().await;
    let reference = Run::create().await;
    let mut g = generator(11, DriftSpec::default());
    let windows = 10;
    let scores: Vec<LeadScore> = (0..windows)
        .flat_map(|w| window_scores(&model, &mut g, w, 300))
        .collect();
    // First kill, placed: up to the middle of window 4, then to the middle of window 6.
    let (a, b) = (300 * 4 + 150, 300 * 6 + 150);
    produce_scores(&input, &scores[..a], 4).await;
    let slow = [("LEADSCORE__DRIFT__CHECKPOINT_MS", "2500".to_string())];
    let (mut child, port) = start(&input, &killed, "kill-0", &slow);
    // Phase one is counted and checkpointed (window 4 open in the checkpoint).
    let text = wait_counted(port, a as u64).await;
    let checkpoints = metric(&text, "checkpoint");
    loop {
        let text = http_get(port, "/metrics").await;
        if metric(&text, "checkpoint") > checkpoints {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Phase two is counted but (most likely) not yet checkpointed: SIGKILL now.
    produce_scores(&input, &scores[a..b], 4).await;
    wait_counted(port, b as u64).await;
    child.kill().unwrap();
    child.wait().unwrap();
    // Two more kills at random points: each restart is killed a random time after its
    // first checkpoint, with a segment of random length produced meanwhile.
    let seed = uuid::Uuid::new_v4().as_u128();
    let random = |i: u32, below: usize| ((seed >> (i * 20)) as usize & 0xfffff) % below;
    let c = b + 100 + random(0, 300);
    let bounds = [(b, c), (c, c + 100 + random(1, 300))];
    for (i, (from, to)) in bounds.into_iter().enumerate() {
        let checkpoint_ms = (300 + random(2 + i as u32, 1_200)).to_string();
        let delay = random(4 + i as u32, 1_500) as u64;
        let (mut child, port) = start(
            &input,
            &killed,
            "kill-0",
            &[("LEADSCORE__DRIFT__CHECKPOINT_MS", checkpoint_ms.clone())],
        );
        produce_scores(&input, &scores[from..to], 4).await;
        loop {
            let text = http_get(port, "/metrics").await;
            if metric(&text, "checkpoint") > 0 && metric(&text, "counted") > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let text = http_get(port, "/metrics").await;
        eprintln!(
            "kill {}: scores {from}..{to}, checkpoint every {checkpoint_ms} ms, killed {delay} ms \
             after its first checkpoint ({} counted, {} checkpoints)",
            i + 1,
            metric(&text, "counted"),
            metric(&text, "checkpoint"),
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let rest = bounds[1].1;
    produce_scores(&input, &scores[rest..], 4).await;
    flush_to(&input, &model, windows - 1, 3).await;
    let (child, _) = start(&input, &killed, "kill-0", &[]);
    let after_kill = all_reports(&killed, windows as usize).await;
    terminate(child);

    let (child, _) = start(&input, &reference, "ref-0", &[]);
    let uninterrupted = all_reports(&reference, windows as usize).await;
    terminate(child);

    assert_eq!(after_kill.len(), windows as usize);
    assert_same(&after_kill, &uninterrupted);
    delete_topics(&[&input.scores, &input.shadow]).await;
    delete_topics(&killed.topics()).await;
    delete_topics(&reference.topics()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_on_disjoint_partitions_merge_to_the_reports_of_one_instance() {
    let model = model();
    let input = Input::create(4).await;
    let single = Run::create().await;
    let split = Run::create().await;
    let mut g = generator(12, DriftSpec::default());
    let windows = 6;
    let scores: Vec<LeadScore> = (0..windows)
        .flat_map(|w| window_scores(&model, &mut g, w, 400))
        .collect();
    produce_scores(&input, &scores, 3).await;
    flush_to(&input, &model, windows - 1, 4).await;

    let (one, _) = start(&input, &single, "one-0", &[]);
    let from_one = all_reports(&single, windows as usize).await;
    terminate(one);

    let left = [
        ("LEADSCORE__DRIFT__PARTITIONS", "[0, 1]".to_string()),
        ("LEADSCORE__DRIFT__MERGE", "true".to_string()),
    ];
    let right = [
        ("LEADSCORE__DRIFT__PARTITIONS", "[2, 3]".to_string()),
        ("LEADSCORE__DRIFT__MERGE", "false".to_string()),
    ];
    let (x, _) = start(&input, &split, "split-0", &left);
    let (y, _) = start(&input, &split, "split-1", &right);
    let from_two = all_reports(&split, windows as usize).await;
    terminate(x);
    terminate(y);

    assert_eq!(from_one.len(), windows as usize);
    assert_same(&from_one, &from_two);
    delete_topics(&[&input.scores, &input.shadow]).await;
    delete_topics(&single.topics()).await;
    delete_topics(&split.topics()).await;
}

/// What the local Slack and PagerDuty receiver got: (path, JSON body), and how many requests to fail first.
#[derive(Default)]
struct Received {
    posts: Vec<(String, serde_json::Value)>,
    fail_first: usize,
    requests: usize,
}

async fn http_receiver(state: std::sync::Arc<std::sync::Mutex<Received>>) -> u16 {
    use axum::extract::{Path as UrlPath, State};
    use axum::http::StatusCode;
    let app = axum::Router::new()
        .route(
            "/{hook}",
            axum::routing::post(
                |State(s): State<std::sync::Arc<std::sync::Mutex<Received>>>,
                 UrlPath(hook): UrlPath<String>,
                 body: String| async move {
                    let mut r = s.lock().unwrap();
                    r.requests += 1;
                    if r.fail_first > 0 {
                        r.fail_first -= 1;
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    r.posts.push((hook, serde_json::from_str(&body).unwrap()));
                    StatusCode::OK
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

struct SmtpSink {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmtpSink {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("mail.jsonl");
        let port = free_port();
        let mut child = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/smtp_sink.py"))
            .arg(port.to_string())
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Wait for "listening".
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert!(line.contains("listening"), "smtp sink: {line}");
        Self {
            child,
            port,
            out,
            _dir: dir,
        }
    }

    fn mails(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_slack_email_and_pagerduty_by_severity_through_receiver_failures() {
    let model = model();
    let input = Input::create(2).await;
    let run = Run::create().await;
    // Window 0 clean, 1 a warning-level mix change, 2 a critical shift, 3 clean again.
    let plan = [
        DriftSpec::default(),
        knob(|d| d.add_mix("industry=Retail:4")),
        knob(|d| d.add_shift("page_views=+25")),
        DriftSpec::default(),
    ];
    let mut scores = Vec::new();
    for (w, spec) in plan.iter().enumerate() {
        let mut g = generator(300 + w as u64, spec.clone());
        scores.extend(window_scores(&model, &mut g, w as i64, 800));
    }
    produce_scores(&input, &scores, 0).await;
    flush_to(&input, &model, 3, 2).await;

    let received = std::sync::Arc::new(std::sync::Mutex::new(Received {
        fail_first: 2, // Slack's first two requests fail: delivered on retry
        ..Default::default()
    }));
    let http = http_receiver(received.clone()).await;
    let smtp = SmtpSink::start();
    let routing = [
        ("LEADSCORE__ALERTING__ENABLED", "true".to_string()),
        ("LEADSCORE__ALERTING__GROUP_ID", unique("it-router")),
        (
            "LEADSCORE__ALERTING__SLACK_WEBHOOK_URL",
            format!("http://127.0.0.1:{http}/slack"),
        ),
        (
            "LEADSCORE__ALERTING__PAGERDUTY_URL",
            format!("http://127.0.0.1:{http}/pagerduty"),
        ),
        (
            "LEADSCORE__ALERTING__PAGERDUTY_ROUTING_KEY",
            "it-routing-key".to_string(),
        ),
        ("LEADSCORE__ALERTING__SMTP_HOST", "127.0.0.1".to_string()),
        ("LEADSCORE__ALERTING__SMTP_PORT", smtp.port.to_string()),
        ("LEADSCORE__ALERTING__SMTP_STARTTLS", "false".to_string()),
        (
            "LEADSCORE__ALERTING__EMAIL_FROM",
            "drift@example.com".to_string(),
        ),
        (
            "LEADSCORE__ALERTING__EMAIL_TO",
            "[\"oncall@example.com\"]".to_string(),
        ),
        ("LEADSCORE__ALERTING__RETRY_INITIAL_MS", "100".to_string()),
    ];
    let (child, _) = start(&input, &run, "route-0", &routing);
    let reports = hourly_reports(&run, 4, Duration::from_secs(120)).await;
    assert_eq!(reports.iter().filter(|r| r.kind == "hourly").count(), 4);
    let alerts = alerts(&run, Duration::from_secs(3)).await;
    let fired = |sev: leadscore_drift::alerts::Severity| {
        alerts
            .iter()
            .filter(|a| a.firing && a.severity == sev)
            .count()
    };
    let (warnings, criticals) = (
        fired(leadscore_drift::alerts::Severity::Warning),
        fired(leadscore_drift::alerts::Severity::Critical),
    );
    let critical_fps: Vec<&str> = alerts
        .iter()
        .filter(|a| a.firing && a.severity == leadscore_drift::alerts::Severity::Critical)
        .map(|a| a.fingerprint.as_str())
        .collect();
    assert!(warnings > 0 && criticals > 0, "{alerts:?}");
    assert!(critical_fps.contains(&"lead-scoring/psi/page_views"));
    // Firing warnings and criticals and their resolves go to Slack; criticals also to PagerDuty and email.
    let slack_want = alerts
        .iter()
        .filter(|a| a.severity != leadscore_drift::alerts::Severity::Info)
        .count();
    let pd_want = alerts
        .iter()
        .filter(|a| a.severity == leadscore_drift::alerts::Severity::Critical)
        .count();
    let counts = |r: &Received| {
        let n = |hook: &str| r.posts.iter().filter(|(h, _)| h == hook).count();
        (n("slack"), n("pagerduty"))
    };
    let mut ok = false;
    for _ in 0..200 {
        let (slack, pd) = counts(&received.lock().unwrap());
        if slack >= slack_want && pd >= pd_want && smtp.mails().len() >= pd_want {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    terminate(child);
    delete_topics(&[&input.scores, &input.shadow]).await;
    delete_topics(&run.topics()).await;
    let r = received.lock().unwrap();
    let posts = |hook: &str| -> Vec<&serde_json::Value> {
        r.posts
            .iter()
            .filter(|(h, _)| h == hook)
            .map(|(_, b)| b)
            .collect()
    };
    assert!(
        ok,
        "slack {}/{slack_want}, pagerduty {}/{pd_want}, mail {}/{pd_want}",
        posts("slack").len(),
        posts("pagerduty").len(),
        smtp.mails().len()
    );
    assert_eq!(posts("slack").len(), slack_want, "each alert once");
    assert!(
        r.requests >= slack_want + pd_want + 2,
        "the two failed Slack requests were retried"
    );
    assert!(
        posts("slack")
            .iter()
            .any(|b| b["text"].as_str().unwrap().contains("page_views"))
    );
    // PagerDuty: a trigger per critical fingerprint, and a resolve with the same dedup key once it cleared.
    let pd = posts("pagerduty");
    let trigger = pd
        .iter()
        .find(|b| b["event_action"] == "trigger" && b["dedup_key"] == "lead-scoring/psi/page_views")
        .expect("a PagerDuty trigger for the page_views PSI");
    assert_eq!(trigger["routing_key"], "it-routing-key");
    assert_eq!(trigger["payload"]["severity"], "critical");
    assert!(
        pd.iter()
            .any(|b| b["event_action"] == "resolve"
                && b["dedup_key"] == "lead-scoring/psi/page_views")
    );
    // No warning reaches PagerDuty.
    assert!(
        pd.iter()
            .all(|b| b["dedup_key"] != "lead-scoring/psi/industry")
    );
    let mails = smtp.mails();
    assert!(mails.iter().all(|m| m["to"][0] == "oncall@example.com"));
    assert!(mails.iter().any(|m| {
        m["data"]
            .as_str()
            .unwrap()
            .contains("Fingerprint: lead-scoring/psi/page_views")
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_of_a_windows_leads_give_conversion_by_band_and_auc() {
    let model = model();
    let input = Input::create(1).await;
    let run = Run::create().await;
    let mut g = Generator::new(GeneratorConfig {
        seed: 21,
        id_prefix: unique("it-outcome"),
        ..Default::default()
    });
    let mut truth = std::collections::HashMap::new();
    let mut scores = Vec::new();
    for w in 0..2 {
        let mut i = 0;
        while i < 300 {
            let generated = g.next_lead();
            let event = T0 + w * HOUR + i * 10_000;
            if let Some(s) = score_lead(&model, &generated.lead, event, i) {
                truth.insert(s.lead_id.clone(), generated.converts);
                scores.push(s);
                i += 1;
            }
        }
    }
    // The CRM: every score in lead_scores (as the sink writes it); two leads in three have an outcome.
    let pg = leadscore_postgres::connect(&leadscore_e2e::config().postgres.url)
        .await
        .unwrap();
    let mut expected: BTreeMap<i64, Vec<leadscore_drift::outcomes::Labelled>> = BTreeMap::new();
    for (i, s) in scores.iter().enumerate() {
        let status = match (i % 3, truth[&s.lead_id]) {
            (0, _) => "contacted",
            (_, true) => "converted",
            (_, false) => "lost",
        };
        // Won deals of 1,000 to 100,900; every tenth won deal has no value entered yet.
        let deal_value =
            (status == "converted" && i % 10 != 1).then_some(1_000.0 + (i % 1_000) as f64 * 100.0);
        pg.execute(
            "INSERT INTO public.leads (lead_id, status, deal_value) VALUES ($1, $2, $3::double precision)",
            &[&s.lead_id, &status, &deal_value],
        )
        .await
        .unwrap();
        let ts = |ms: i64| chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).unwrap();
        pg.execute(
            "INSERT INTO public.lead_scores (lead_id, score, band, model_name, model_version, model_role, event_time, scored_at, latency_ms) \
             VALUES ($1, $2, $3, $4, $5, 'champion', $6, $7, $8)",
            &[
                &s.lead_id,
                &s.model.score,
                &s.model.band.as_str(),
                &s.model.model_name,
                &s.model.model_version,
                &ts(s.event_time_ms),
                &ts(s.scored_at_ms),
                &s.latency_ms,
            ],
        )
        .await
        .unwrap();
        if status != "contacted" {
            expected
                .entry((s.event_time_ms - T0) / HOUR)
                .or_default()
                .push(leadscore_drift::outcomes::Labelled {
                    score: s.model.score,
                    band: s.model.band.as_str().into(),
                    converted: status == "converted",
                    deal_value,
                });
        }
    }
    produce_scores(&input, &scores, 0).await;
    flush_to(&input, &model, 1, 1).await;
    let extra = [("LEADSCORE__DRIFT__OUTCOMES_AFTER_MS", "1".to_string())];
    let (child, _) = start(&input, &run, "outcomes-0", &extra);
    // Two window reports, then two outcome reports.
    let reports = hourly_reports(&run, 4, Duration::from_secs(120)).await;
    terminate(child);
    let outcome_reports: Vec<&Report> = reports.iter().filter(|r| r.outcomes.is_some()).collect();
    assert_eq!(outcome_reports.len(), 2, "{reports:?}");
    for r in outcome_reports {
        let w = (r.start - T0) / HOUR;
        let want = leadscore_drift::outcomes::summarize(&expected[&w]);
        let (labelled, auc, by_band, revenue) = r.outcomes.clone().unwrap();
        assert_eq!(labelled as u64, want.labelled, "window {w}");
        assert_eq!(labelled, 200);
        let (got, want_auc) = (auc.unwrap(), want.auc.unwrap());
        assert!(
            (got - want_auc).abs() < 1e-12,
            "window {w}: AUC {got} != {want_auc}"
        );
        // The model ranks better than chance on the generator's hidden truth.
        assert!(got > 0.6, "window {w}: AUC {got}");
        assert_eq!(by_band.len(), want.conversion_rate_by_band.len());
        for (band, rate) in &want.conversion_rate_by_band {
            assert!(
                (by_band[band] - rate).abs() < 1e-12,
                "window {w} band {band}"
            );
        }
        // Revenue per lead from the CRM's deal values, and High leads earn more than Low.
        assert_eq!(revenue.len(), want.revenue_per_lead_by_band.len());
        for (band, per_lead) in &want.revenue_per_lead_by_band {
            assert!(
                (revenue[band] - per_lead).abs() < 1e-6,
                "window {w} band {band}: {} vs {per_lead}",
                revenue[band]
            );
        }
        assert!(
            revenue.values().any(|v| *v > 0.0),
            "window {w}: {revenue:?}"
        );
    }
    let ids: Vec<&str> = scores.iter().map(|s| s.lead_id.as_str()).collect();
    pg.execute(
        "DELETE FROM public.lead_scores WHERE lead_id = ANY($1)",
        &[&ids],
    )
    .await
    .unwrap();
    pg.execute("DELETE FROM public.leads WHERE lead_id = ANY($1)", &[&ids])
        .await
        .unwrap();
    delete_topics(&[&input.scores, &input.shadow]).await;
    delete_topics(&run.topics()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_first_seen_in_the_scores_is_profiled_from_mlflow() {
    let mlflow =
        std::env::var("MLFLOW_TRACKING_URI").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let name = unique("it-drift-mlflow");
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 13, 3000);
    leadscore_e2e::train_and_register(&csv, &dir.path().join("v1"), &name, &mlflow, "0.02");

    let model = model();
    let input = Input::create(1).await;
    let run = Run::create().await;
    let mut g = generator(31, DriftSpec::default());
    let mut scores = Vec::new();
    for w in 0..2 {
        for mut s in window_scores(&model, &mut g, w, 300) {
            (s.model.model_name, s.model.model_version) = (name.clone(), "1".into());
            scores.push(s);
        }
    }
    produce_scores(&input, &scores, 0).await;
    flush_to(&input, &model, 1, 1).await;
    let (child, port) = start(
        &input,
        &run,
        "mlflow-0",
        &[("LEADSCORE__DRIFT__MLFLOW_URL", mlflow.clone())],
    );
    let reports = hourly_reports(&run, 2, Duration::from_secs(120)).await;
    let metrics = http_get(port, "/metrics").await;
    terminate(child);
    let ours: Vec<&Report> = reports
        .iter()
        .filter(|r| r.version == "1" && r.kind == "hourly")
        .collect();
    assert_eq!(ours.len(), 2, "{reports:?}");
    assert!(ours.iter().all(|r| r.scored == 300 && !r.psi.is_empty()));
    assert_eq!(metric(&metrics, "unprofiled"), 0, "{metrics}");
    delete_topics(&[&input.scores, &input.shadow]).await;
    delete_topics(&run.topics()).await;
}
