//! The scorer process against the real broker and registry: exactly once
//! across SIGKILL and a second instance, poison inputs dead-lettered with
//! their kind, and an evolved Avro writer schema scored unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use apache_avro::types::Value;
use leadscore_crm::Lead;
use leadscore_e2e::scorer::{
    Topics, create_event, http_get, lead_json, leads, produce, read_dead_letters, read_scores,
    wait_readyz,
};
use leadscore_e2e::{Service, consumer, create_topic, delete_topics, free_port, unique};
use leadscore_registry::{Decoder, Registry};
use rdkafka::Message;
use rdkafka::consumer::StreamConsumer;
use serde_json::json;

/// Produces a Debezium create event for each lead, keyed by its id.
async fn produce_creates(topic: &str, leads: &[Lead]) {
    produce(
        topic,
        leads
            .iter()
            .map(|l| (Some(l.lead_id.clone()), create_event(l)))
            .collect(),
    )
    .await;
}

fn start_scorer(t: &Topics, group: &str, instance: &str, challenger: bool) -> Service {
    start_scorer_with(t, group, instance, challenger, &[]).0
}

fn start_scorer_with(
    t: &Topics,
    group: &str,
    instance: &str,
    challenger: bool,
    extra: &[(&str, &str)],
) -> (Service, u16) {
    leadscore_e2e::scorer::start_scorer_with(
        env!("CARGO_BIN_EXE_leadscore"),
        t,
        group,
        instance,
        challenger,
        extra,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_reach_redis_and_a_redis_outage_only_degrades_the_cache() {
    let t = Topics::create(1).await;
    let ls = leads("cache", 50, 6);
    produce_creates(&t.input, &ls).await;

    // Healthy Redis: every committed score is cached.
    let (mut scorer, _) = start_scorer_with(&t, &unique("it-cache"), "c1", false, &[]);
    let scores = read_scores(
        &consumer(&t.scores, "read_committed"),
        ls.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(scores.len(), ls.len());
    let cache = leadscore_cache::Cache::new(
        "redis://127.0.0.1:6379",
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .unwrap();
    let mut cached = 0;
    for _ in 0..50 {
        cached = 0;
        for l in &ls {
            if let Some(c) = cache.get(&l.lead_id).await.unwrap() {
                assert_eq!(c.model_version, "bundled-1");
                assert!((0.0..=1.0).contains(&c.score));
                cached += 1;
            }
        }
        if cached == ls.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cached, ls.len(), "every committed score is in Redis");
    scorer.kill().unwrap();
    scorer.wait().unwrap();

    // Redis unreachable: scoring goes on, the cache error is counted.
    let t2 = Topics::create(1).await;
    produce_creates(&t2.input, &ls).await;
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let (mut scorer, port) = start_scorer_with(
        &t2,
        &unique("it-cache-down"),
        "c2",
        false,
        &[("LEADSCORE__SCORER__REDIS_URL", dead_redis.as_str())],
    );
    let scores = read_scores(
        &consumer(&t2.scores, "read_committed"),
        ls.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(scores.len(), ls.len(), "scoring does not depend on Redis");
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = http_get(port, "/metrics").await;
        if !metrics.contains("leadscore_scorer_cache_errors_total 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        metrics.contains("leadscore_scorer_cache_errors_total "),
        "{metrics}"
    );
    assert!(
        !metrics.contains("leadscore_scorer_cache_errors_total 0\n"),
        "cache errors counted: {metrics}"
    );
    assert!(http_get(port, "/readyz").await.contains("200 OK"));
    assert!(http_get(port, "/healthz").await.contains("200 OK"));
    scorer.kill().unwrap();
    scorer.wait().unwrap();
    t.delete().await;
    t2.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_latencies_lag_and_otlp_export_reach_prometheus_and_the_collector() {
    let collector_log = std::env::var("LEADSCORE_OTELCOL_LOG")
        .expect("LEADSCORE_OTELCOL_LOG: run under `eval \"$(deploy/local/stack env)\"`");
    let endpoint = std::env::var("LEADSCORE__TELEMETRY__OTLP_ENDPOINT")
        .expect("LEADSCORE__TELEMETRY__OTLP_ENDPOINT from the stack env");
    let t = Topics::create(2).await;
    let ls = leads("otel", 300, 8);
    produce_creates(&t.input, &ls).await;
    let instance = unique("otel-scorer");
    let (mut scorer, port) = start_scorer_with(
        &t,
        &unique("it-otel"),
        "o1",
        false,
        &[
            ("LEADSCORE__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("LEADSCORE__TELEMETRY__METRICS_INTERVAL_MS", "500"),
            ("LEADSCORE__TELEMETRY__INSTANCE", instance.as_str()),
        ],
    );
    let scores = read_scores(
        &consumer(&t.scores, "read_committed"),
        ls.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(scores.len(), ls.len());

    // Prometheus: every stage timed; lag known for both partitions and drained to 0.
    let mut metrics = String::new();
    for _ in 0..150 {
        metrics = http_get(port, "/metrics").await;
        let lag_zero = (0..2).all(|p| {
            metrics.contains(&format!(
                "leadscore_scorer_consumer_lag{{topic=\"{}\",partition=\"{p}\"}} 0\n",
                t.input
            ))
        });
        if lag_zero {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for stage in ["fetch", "decode", "score", "produce", "commit"] {
        let count = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "leadscore_scorer_stage_ms_count{{stage=\"{stage}\"}} "
                ))
            })
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        assert!(count > 0, "stage {stage} timed: {metrics}");
    }
    for p in 0..2 {
        assert!(
            metrics.contains(&format!(
                "leadscore_scorer_consumer_lag{{topic=\"{}\",partition=\"{p}\"}} 0\n",
                t.input
            )),
            "lag of partition {p}: {metrics}"
        );
    }

    // SIGTERM flushes the exporters; the collector has this instance's spans and metrics.
    let pid = scorer.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = scorer.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    let mut log = String::new();
    for _ in 0..50 {
        log = std::fs::read_to_string(&collector_log).unwrap_or_default();
        if log.contains(&instance) && log.contains("scorer.commit") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ours: Vec<&str> = log
        .split("ResourceMetrics #")
        .chain(log.split("ResourceSpans #"))
        .filter(|block| block.contains(&instance))
        .collect();
    assert!(
        !ours.is_empty(),
        "no telemetry from {instance} in {collector_log}"
    );
    let ours = ours.join("\n");
    for name in [
        "leadscore.scorer.event_to_score",
        "leadscore.scorer.stage",
        "leadscore.scorer.inputs",
        "leadscore.scorer.model_info",
        "scorer.batch",
        "scorer.score",
        "scorer.commit",
    ] {
        assert!(ours.contains(name), "{name} exported by {instance}");
    }
    assert!(
        ours.contains("service.name: Str(leadscore-scorer)"),
        "{ours}"
    );
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_across_sigkill_and_a_second_instance() {
    let t = Topics::create(6).await;
    let group = unique("it-scorer-group");
    let first = leads("eo_a", 3000, 1);
    produce_creates(&t.input, &first).await;

    let mut a = start_scorer(&t, &group, "a", false);
    let mut b = start_scorer(&t, &group, "b", false);
    let reader = consumer(&t.scores, "read_committed");
    // Let both make progress, then kill one without warning.
    let partial = read_scores(&reader, 500, Duration::from_secs(60)).await;
    assert!(!partial.is_empty(), "scorers made no progress");
    a.kill().unwrap();
    a.wait().unwrap();

    let second = leads("eo_b", 2000, 2);
    produce_creates(&t.input, &second).await;
    // The survivor takes over the dead instance's partitions; a restarted "a" fences any zombie.
    let mut a2 = start_scorer(&t, &group, "a", false);

    let rest = read_scores(&reader, 5000 - partial.len(), Duration::from_secs(120)).await;
    let mut all = partial;
    for (k, n) in rest {
        *all.entry(k).or_default() += n;
    }
    leadscore_e2e::scorer::assert_exactly_once(
        &all,
        first.iter().chain(&second).map(|l| l.lead_id.as_str()),
    );

    // SIGTERM: graceful stop within the grace period.
    for child in [&mut b, &mut a2] {
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
    }
    for child in [&mut b, &mut a2] {
        let status = child.wait().unwrap();
        assert!(status.success(), "graceful shutdown exits 0, got {status}");
    }
    t.delete().await;
}

/// SIGKILL at random points, three times, during a stream: each restart resumes from the
/// last commit and the committed scores are exactly the leads, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_sigkills_at_random_points_lose_and_duplicate_nothing() {
    let t = Topics::create(6).await;
    let group = unique("it-kills");
    let all = leads("kills", 40_000, 9);
    // 40 s of input: each restart waits out the killed member's session (10 s) first.
    let feed = tokio::spawn(leadscore_e2e::scorer::stream(
        t.input.clone(),
        all.clone(),
        1_000,
    ));
    let seed = uuid::Uuid::new_v4().as_u128();
    let delays: Vec<u64> = (0..3)
        .map(|i| ((seed >> (i * 20)) as u64 & 0xfffff) % 1_500)
        .collect();
    eprintln!("kill delays after the first commit (ms): {delays:?}");
    let start = |instance: &str| {
        leadscore_e2e::scorer::start_scorer_with(
            env!("CARGO_BIN_EXE_leadscore"),
            &t,
            &group,
            instance,
            false,
            &[("LEADSCORE__SCORER__MAX_BATCH", "300")],
        )
    };
    for (i, delay) in delays.iter().enumerate() {
        let (scorer, port) = start("k");
        // Killed only once this instance has committed, at a random point after that.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while leadscore_e2e::scorer::try_http_get(port, "/metrics")
            .await
            .is_none()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        loop {
            let committed =
                leadscore_e2e::scorer::counter(port, "leadscore_scorer_transactions_total").await;
            if committed > 0 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "instance {i} committed nothing in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(*delay)).await;
        assert!(!feed.is_finished(), "kill {i} hits the stream mid-way");
        let mut child: std::process::Child = scorer.into();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let (_last, _) = start("k");
    feed.await.unwrap();
    let scores = read_scores(
        &consumer(&t.scores, "read_committed"),
        all.len(),
        Duration::from_secs(180),
    )
    .await;
    leadscore_e2e::scorer::assert_exactly_once(&scores, all.iter().map(|l| l.lead_id.as_str()));
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_inputs_go_to_the_dlq_with_their_kind_and_the_rest_is_scored() {
    // The input topic takes records up to 4 MiB; the outputs keep the broker's default (~1 MiB).
    let t = Topics::create_with(1, &[("max.message.bytes", "4194304")]).await;
    let config = leadscore_config::Config::load(None).unwrap();
    let registry = Registry::new(&config.registry).unwrap();
    // A CRM that does not exclude PII at the source: its rows carry `email`.
    let (avro, subject) = evolved_encoder(&registry, &t.input, "email").await;
    let good = leads("poison_ok", 40, 3);
    let base = lead_json(&good[0]);
    let with = |field: &str, v: serde_json::Value| {
        let mut row = base.clone();
        row["lead_id"] = json!(format!("poison_{field}"));
        if v.is_null() {
            row.as_object_mut().unwrap().remove(field);
        } else {
            row[field] = v;
        }
        serde_json::to_vec(&json!({"op": "c", "after": row})).unwrap()
    };
    let email = |v: Option<&str>| {
        vec![(
            "email".to_string(),
            v.map_or(Value::Union(0, Box::new(Value::Null)), |e| {
                Value::Union(1, Box::new(Value::String(e.into())))
            }),
        )]
    };
    let mut negative = good[1].clone();
    negative.page_views = Some(-5);
    let avro_bad_value = avro
        .encode(avro_envelope(avro_row(
            &negative,
            "poison_avro_negative",
            email(Some("pii@example.com")),
        )))
        .unwrap();
    let mut avro_trailing = avro
        .encode(avro_envelope(avro_row(
            &good[2],
            "poison_avro_trailing",
            email(None),
        )))
        .unwrap();
    avro_trailing.extend_from_slice(&[1, 2, 3]);
    let avro_cut = {
        let full = avro
            .encode(avro_envelope(avro_row(
                &good[3],
                "poison_avro_cut",
                email(None),
            )))
            .unwrap();
        full[..full.len() / 2].to_vec()
    };
    // Over 1 MiB, and one just under the outputs' limit: as raw dead letters neither would fit.
    let huge = with("industry", json!("I".repeat(1_200_000)));
    let near_limit = with("industry", json!("J".repeat(1_040_000)));
    let schemaful = serde_json::to_vec(&json!({
        "schema": {"type": "struct", "fields": [{"field": "email", "type": "string"}]},
        "payload": {"op": "c", "after": {"page_views": "many", "email": "pii@example.com", "lead_id": "sf", "created_at": "2026-01-01T00:00:00Z"}}
    }))
    .unwrap();
    let poison: Vec<(Vec<u8>, &str)> =
        vec![
        (b"\x07\x08\x09".to_vec(), "bad_magic"),
        (b"\x00\x01".to_vec(), "undecodable"),
        (vec![0, 0x7f, 0xff, 0xff, 0xf0, 1, 2], "unknown_schema"),
        (b"{not json".to_vec(), "undecodable"),
        (b"[1,2,3]".to_vec(), "not_an_envelope"),
        (
            br#"{"after": {"lead_id": "x"}}"#.to_vec(),
            "not_an_envelope",
        ),
        (br#"{"op": "c", "after": null}"#.to_vec(), "not_an_envelope"),
        (br#"{"op": "z", "after": {}}"#.to_vec(), "unknown_op"),
        (br#"{"op": 5, "after": {}}"#.to_vec(), "wrong_type"),
        (
            br#"{"op": "u", "before": null, "after": 7}"#.to_vec(),
            "wrong_type",
        ),
        (
            br#"{"op": "d", "before": null}"#.to_vec(),
            "not_an_envelope",
        ),
        (with("lead_id", serde_json::Value::Null), "missing_field"),
        (with("created_at", serde_json::Value::Null), "missing_field"),
        (with("page_views", json!("lots")), "wrong_type"),
        (with("page_views", json!(2.5)), "wrong_type"),
        (with("industry", json!(17)), "wrong_type"),
        (with("company_size", json!({"a": 1})), "wrong_type"),
        (with("time_on_site", json!("NaN")), "invalid_value"),
        (with("time_on_site", json!("Infinity")), "invalid_value"),
        (with("time_on_site", json!(-4.0)), "invalid_value"),
        (with("form_completion_time", json!(1e12)), "invalid_value"),
        (with("page_views", json!(5_000_000_000i64)), "invalid_value"),
        (with("created_at", json!("not a time")), "invalid_value"),
        (with("status", json!("won")), "invalid_value"),
        (with("country", json!("X".repeat(5000))), "invalid_value"),
        (
            serde_json::to_vec(
                &json!({"op": "c", "after": {"lead_id": "", "created_at": "2026-01-01T00:00:00Z"}}),
            )
            .unwrap(),
            "invalid_value",
        ),
        (Vec::new(), "undecodable"),
        (huge.clone(), "invalid_value"),
        (near_limit.clone(), "invalid_value"),
        (avro_bad_value, "invalid_value"),
        (avro_trailing, "trailing_bytes"),
        (avro_cut, "avro_decode"),
        (schemaful, "wrong_type"),
        (b"null".to_vec(), "bad_magic"),
        (
            format!("{}{}", "[".repeat(300), "]".repeat(300)).into_bytes(),
            "undecodable",
        ),
        (b"{\"op\": \"c\", \"after\": {\"lead_id\": \"\xff\"}}".to_vec(), "undecodable"),
        (br#"{"op": "c"} trailing"#.to_vec(), "undecodable"),
    ];
    assert!(poison.len() >= 36, "the corpus has {} kinds", poison.len());
    let mut records = Vec::new();
    for (i, l) in good.iter().enumerate() {
        records.push((Some(l.lead_id.clone()), create_event(l)));
        if let Some((bytes, _)) = poison.get(i) {
            records.push((Some(format!("poison-{i}")), bytes.clone()));
        }
    }
    for (i, (bytes, _)) in poison.iter().enumerate().skip(good.len()) {
        records.push((Some(format!("poison-{i}")), bytes.clone()));
    }
    produce(&t.input, records).await;

    let (mut scorer, port) = start_scorer_with(&t, &unique("it-poison"), "p", false, &[]);
    let scores = read_scores(
        &consumer(&t.scores, "read_committed"),
        good.len(),
        Duration::from_secs(60),
    )
    .await;
    let dead = read_dead_letters(&t.dlq, poison.len(), Duration::from_secs(30)).await;
    let ready = http_get(port, "/readyz").await;
    scorer.kill().unwrap();
    scorer.wait().unwrap();

    for (i, (bytes, kind)) in poison.iter().enumerate() {
        let d = dead
            .get(&format!("poison-{i}"))
            .unwrap_or_else(|| panic!("poison input {i} ({kind}) has no dead letter"));
        let h = |k: &str| d.headers.get(k).map(String::as_str).unwrap_or_default();
        assert_eq!(h("leadscore.error.kind"), *kind, "poison input {i}");
        assert_eq!(h("leadscore.source.topic"), t.input);
        assert!(!h("leadscore.error.message").is_empty());
        assert!(h("leadscore.error.message").len() <= 1024);
        assert_eq!(
            h("leadscore.original.size"),
            bytes.len().to_string(),
            "poison input {i}"
        );
        assert!(
            d.payload.len() <= 64 * 1024,
            "poison input {i}: payload capped"
        );
        let text = String::from_utf8_lossy(&d.payload);
        for pii in ["pii@example.com", "+971500000000"] {
            assert!(
                !text.contains(pii),
                "poison input {i} ({kind}): PII in the dead letter"
            );
            assert!(!h("leadscore.error.message").contains(pii));
        }
        match h("leadscore.payload.form") {
            "redacted-json" if h("leadscore.payload.truncated") == "false" => {
                let doc: serde_json::Value = serde_json::from_slice(&d.payload)
                    .unwrap_or_else(|e| panic!("poison input {i}: redacted payload is JSON: {e}"));
                assert!(!doc.to_string().contains("email"), "poison input {i}");
            }
            "redacted-json" => {}
            "raw" => assert_eq!(
                &d.payload[..],
                &bytes[..d.payload.len()],
                "poison input {i}"
            ),
            other => panic!("poison input {i}: payload form {other:?}"),
        }
    }
    for big in [&huge, &near_limit] {
        let i = poison.iter().position(|(b, _)| b == big).unwrap();
        let d = &dead[&format!("poison-{i}")];
        assert_eq!(d.headers["leadscore.payload.truncated"], "true");
        assert_eq!(d.headers["leadscore.payload.form"], "redacted-json");
        assert_eq!(
            d.headers["leadscore.original.sha256"],
            leadscore_cdc::dead::sha256_hex(big)
        );
    }
    for l in &good {
        assert_eq!(
            scores.get(&l.lead_id),
            Some(&1),
            "{} scored once",
            l.lead_id
        );
    }
    assert_eq!(scores.len(), good.len(), "nothing else was scored");
    assert!(
        ready.starts_with("HTTP/1.1 200") || ready.starts_with("HTTP/1.0 200"),
        "the scorer stays ready: {ready}"
    );
    registry.delete_subject(&subject).await.unwrap();
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_stalls_scoring_flips_readiness_and_loses_nothing() {
    let t = Topics::create(1).await;
    let config = leadscore_config::Config::load(None).unwrap();
    let registry = Registry::new(&config.registry).unwrap();
    // The scorer reaches the real registry through a forwarder the test can cut.
    let proxy = leadscore_e2e::Relay::to("127.0.0.1:8081").await;
    let url = format!("http://127.0.0.1:{}/apis/ccompat/v7", proxy.port);
    let (mut scorer, port) = start_scorer_with(
        &t,
        &unique("it-outage"),
        "o",
        false,
        &[
            ("LEADSCORE__REGISTRY__URL", &url),
            ("LEADSCORE__SCORER__STUCK_AFTER_ABORTS", "3"),
        ],
    );
    wait_readyz(port, "HTTP/1.1 200", Duration::from_secs(60))
        .await
        .expect("the scorer becomes ready");

    proxy.cut();
    // A writer schema the scorer has never seen: decoding needs the registry, which is gone.
    let (avro, subject) = evolved_encoder(&registry, &t.input, "campaign").await;
    let ls = leads("outage", 60, 9);
    let mut records = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        let bytes = if i % 2 == 0 {
            avro.encode(avro_envelope(avro_row(
                l,
                &l.lead_id,
                vec![("campaign".into(), Value::Union(0, Box::new(Value::Null)))],
            )))
            .unwrap()
        } else {
            create_event(l)
        };
        records.push((Some(l.lead_id.clone()), bytes));
    }
    produce(&t.input, records).await;
    let stuck = wait_readyz(port, "HTTP/1.1 503", Duration::from_secs(30))
        .await
        .expect("readiness turns false while the same batch keeps aborting");
    assert!(stuck.contains("aborted"), "{stuck}");
    let metrics = http_get(port, "/metrics").await;
    assert!(metrics.contains("leadscore_scorer_stuck 1"), "{metrics}");
    // The outage lasts a while: several aborts with backoff, nothing scored, nothing dead-lettered.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let during = read_scores(
        &consumer(&t.scores, "read_committed"),
        1,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        during.is_empty(),
        "nothing commits while the registry is out: {during:?}"
    );
    proxy.restore();

    let scores = read_scores(
        &consumer(&t.scores, "read_committed"),
        ls.len(),
        Duration::from_secs(60),
    )
    .await;
    let ready = wait_readyz(port, "HTTP/1.1 200", Duration::from_secs(30)).await;
    let dead = read_dead_letters(&t.dlq, 1, Duration::from_secs(3)).await;
    scorer.kill().unwrap();
    scorer.wait().unwrap();
    for l in &ls {
        assert_eq!(
            scores.get(&l.lead_id),
            Some(&1),
            "{} scored once",
            l.lead_id
        );
    }
    assert!(
        dead.is_empty(),
        "no good record was dead-lettered: {:?}",
        dead.keys().collect::<Vec<_>>()
    );
    assert!(ready.is_some(), "ready again once the registry answers");
    registry.delete_subject(&subject).await.unwrap();
    t.delete().await;
}

/// A lead's score and shadow score are written to the partition of the input record they
/// come from (so each lane's transaction touches only its own partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_and_shadow_scores_land_on_the_partition_of_their_input() {
    let t = Topics::create(6).await;
    let registry = Registry::new(&leadscore_config::Config::load(None).unwrap().registry).unwrap();
    let ls = leads("copart", 300, 21);
    produce_creates(&t.input, &ls).await;
    let mut scorer = start_scorer(&t, &unique("it-copart"), "c", true);
    let reader = consumer(&t.scores, "read_committed");
    let decoder = Decoder::new(registry);
    let mut score_partition: HashMap<String, i32> = HashMap::new();
    let mut inputs = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while score_partition.len() < ls.len() {
        let Ok(Ok(m)) = tokio::time::timeout_at(deadline, reader.recv()).await else {
            break;
        };
        let Value::Record(fields) = decoder.decode(m.payload().unwrap()).await.unwrap() else {
            panic!("not a record")
        };
        let source = fields
            .iter()
            .find(|(k, _)| k == "source")
            .unwrap()
            .1
            .clone();
        let Value::Union(_, source) = source else {
            panic!("source is {source:?}")
        };
        let Value::Record(source) = *source else {
            panic!("source is {source:?}")
        };
        let input = match source.iter().find(|(k, _)| k == "partition").unwrap().1 {
            Value::Int(p) => p,
            ref other => panic!("partition is {other:?}"),
        };
        inputs.insert(input);
        assert_eq!(m.partition(), input % 6, "score of input partition {input}");
        score_partition.insert(
            String::from_utf8_lossy(m.key().unwrap()).into_owned(),
            m.partition(),
        );
    }
    assert_eq!(score_partition.len(), ls.len());
    assert!(
        inputs.len() > 1,
        "the leads came from several partitions: {inputs:?}"
    );
    let shadow = leadscore_e2e::receive(
        &consumer(&t.shadow, "read_committed"),
        ls.len(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(shadow.len(), ls.len());
    for m in &shadow {
        let key = String::from_utf8_lossy(m.key().unwrap()).into_owned();
        assert_eq!(Some(&m.partition()), score_partition.get(&key), "{key}");
    }
    scorer.kill().unwrap();
    scorer.wait().unwrap();
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evolved_avro_writer_schema_scores_like_json_and_shadow_is_published() {
    let t = Topics::create(1).await;
    let config = leadscore_config::Config::load(None).unwrap();
    let registry = Registry::new(&config.registry).unwrap();
    // The CRM added a nullable column: the writer schema has one field more than ours.
    let (encoder, subject) = evolved_encoder(&registry, &t.input, "campaign").await;

    let ls = leads("evo", 20, 4);
    let mut records = Vec::new();
    for l in &ls {
        // Same lead twice: JSON (id suffix _json) and Avro with the extra column (suffix _avro).
        let mut json_lead = l.clone();
        json_lead.lead_id = format!("{}_json", l.lead_id);
        records.push((Some(json_lead.lead_id.clone()), create_event(&json_lead)));
        let row = avro_row(
            l,
            &format!("{}_avro", l.lead_id),
            vec![(
                "campaign".into(),
                Value::Union(1, Box::new(Value::String("spring".into()))),
            )],
        );
        let env = avro_envelope(row);
        records.push((
            Some(format!("{}_avro", l.lead_id)),
            encoder.encode(env).unwrap(),
        ));
    }
    produce(&t.input, records).await;

    let mut scorer = start_scorer(&t, &unique("it-evo"), "e", true);
    let reader = consumer(&t.scores, "read_committed");
    let decoder = Decoder::new(registry.clone());
    let mut by_key: HashMap<String, f64> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while by_key.len() < ls.len() * 2 {
        let Ok(Ok(m)) = tokio::time::timeout_at(deadline, reader.recv()).await else {
            break;
        };
        let Value::Record(fields) = decoder.decode(m.payload().unwrap()).await.unwrap() else {
            panic!()
        };
        let score = match &fields[1].1 {
            Value::Double(d) => *d,
            other => panic!("score is {other:?}"),
        };
        let features = format!("{:?}", fields[6].1);
        assert!(
            !features.contains("pii@example.com"),
            "no PII among features"
        );
        by_key.insert(
            String::from_utf8_lossy(m.key().unwrap()).into_owned(),
            score,
        );
    }
    let shadow = leadscore_e2e::receive(
        &consumer(&t.shadow, "read_committed"),
        ls.len() * 2,
        Duration::from_secs(30),
    )
    .await;
    scorer.kill().unwrap();
    scorer.wait().unwrap();
    for l in &ls {
        let j = by_key.get(&format!("{}_json", l.lead_id)).copied();
        let a = by_key.get(&format!("{}_avro", l.lead_id)).copied();
        assert!(
            j.is_some() && j == a,
            "{}: json {j:?} avro {a:?}",
            l.lead_id
        );
    }
    assert_eq!(
        shadow.len(),
        ls.len() * 2,
        "one shadow score per lead with a challenger configured"
    );
    // Both models' reasons ride on the shadow record; the challenger here is the champion's
    // own directory, so they say the same three things.
    for m in &shadow {
        let Value::Record(fields) = decoder.decode(m.payload().unwrap()).await.unwrap() else {
            panic!()
        };
        let reasons = |name: &str| -> Vec<String> {
            let Some((_, Value::Record(model))) = fields.iter().find(|(n, _)| n == name) else {
                panic!("no {name}")
            };
            match model.iter().find(|(n, _)| n == "reasons") {
                Some((_, Value::Union(1, list))) => match list.as_ref() {
                    Value::Array(items) => items
                        .iter()
                        .map(|v| match v {
                            Value::String(s) => s.clone(),
                            other => panic!("{other:?}"),
                        })
                        .collect(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{name} has no reasons: {other:?}"),
            }
        };
        let (live, challenger) = (reasons("live"), reasons("shadow"));
        assert_eq!(live.len(), 3, "{live:?}");
        assert_eq!(live, challenger);
        assert!(
            live.iter()
                .all(|r| r.parse::<leadscore_model::Reason>().is_ok()),
            "{live:?}"
        );
    }
    registry.delete_subject(&subject).await.unwrap();
    t.delete().await;
}

/// An encoder for `topic` whose row schema has one more nullable string column, `extra`,
/// after `lead_id` (a CRM that added a column, or one that does not exclude PII at the source).
async fn evolved_encoder(
    registry: &Registry,
    topic: &str,
    extra: &str,
) -> (leadscore_registry::Encoder, String) {
    let envelope = leadscore_schemas::find("crm.public.leads.Envelope.avsc")
        .unwrap()
        .text;
    let mut doc: serde_json::Value = serde_json::from_str(envelope).unwrap();
    let row = &mut doc["fields"][0]["type"][1]["fields"];
    row.as_array_mut().unwrap().insert(
        1,
        json!({"name": extra, "type": ["null", "string"], "default": null}),
    );
    let evolved_text = serde_json::to_string(&doc).unwrap();
    let subject = leadscore_schemas::value_subject(topic);
    let encoder = leadscore_registry::Encoder::for_subject(registry, &subject, &evolved_text)
        .await
        .unwrap();
    (encoder, subject)
}

/// The Avro row of `l` with id `id`, `extra` columns inserted after `lead_id`.
fn avro_row(l: &Lead, id: &str, extra: Vec<(String, Value)>) -> Value {
    let opt = |v: &Option<String>| match v {
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let null = || Value::Union(0, Box::new(Value::Null));
    let mut fields = vec![("lead_id".to_string(), Value::String(id.to_string()))];
    fields.extend(extra);
    fields.extend([
        ("company_size".into(), opt(&l.company_size)),
        ("industry".into(), opt(&l.industry)),
        (
            "page_views".into(),
            l.page_views
                .map_or_else(null, |v| Value::Union(1, Box::new(Value::Int(v)))),
        ),
        (
            "time_on_site".into(),
            l.time_on_site
                .map_or_else(null, |v| Value::Union(1, Box::new(Value::Double(v)))),
        ),
        (
            "form_completion_time".into(),
            l.form_completion_time
                .map_or_else(null, |v| Value::Union(1, Box::new(Value::Double(v)))),
        ),
        ("referral_source".into(), opt(&l.referral_source)),
        ("country".into(), opt(&l.country)),
        (
            "created_at".into(),
            Value::String(l.created_at.to_rfc3339()),
        ),
        (
            "updated_at".into(),
            Value::String(l.updated_at.to_rfc3339()),
        ),
        ("status".into(), Value::String("new".into())),
        ("converted_at".into(), null()),
        ("deal_value".into(), null()),
    ]);
    Value::Record(fields)
}

/// A Debezium create envelope around `row`.
fn avro_envelope(row: Value) -> Value {
    let null = || Value::Union(0, Box::new(Value::Null));
    let source = Value::Record(vec![
        ("version".into(), Value::String("3.6.1.Final".into())),
        ("connector".into(), Value::String("postgresql".into())),
        ("name".into(), Value::String("crm".into())),
        (
            "ts_ms".into(),
            Value::Long(chrono::Utc::now().timestamp_millis()),
        ),
        (
            "snapshot".into(),
            Value::Union(0, Box::new(Value::String("false".into()))),
        ),
        ("db".into(), Value::String("crm".into())),
        ("sequence".into(), null()),
        ("ts_us".into(), null()),
        ("ts_ns".into(), null()),
        ("schema".into(), Value::String("public".into())),
        ("table".into(), Value::String("leads".into())),
        ("txId".into(), null()),
        ("lsn".into(), null()),
        ("xmin".into(), null()),
    ]);
    Value::Record(vec![
        ("before".into(), null()),
        ("after".into(), Value::Union(1, Box::new(row))),
        ("source".into(), source),
        ("transaction".into(), null()),
        ("op".into(), Value::String("c".into())),
        ("ts_ms".into(), null()),
        ("ts_us".into(), null()),
        ("ts_ns".into(), null()),
    ])
}

async fn scored_versions(
    c: &StreamConsumer,
    decoder: &Decoder,
    want: usize,
) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while total < want {
        let Ok(Ok(m)) = tokio::time::timeout_at(deadline, c.recv()).await else {
            break;
        };
        let Value::Record(fields) = decoder.decode(m.payload().unwrap()).await.unwrap() else {
            panic!()
        };
        let Value::String(version) = &fields[4].1 else {
            panic!("model_version")
        };
        out.entry(String::from_utf8_lossy(m.key().unwrap()).into_owned())
            .or_default()
            .push(version.clone());
        total += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lifecycle_event_swaps_the_champion_between_batches() {
    let mlflow =
        std::env::var("MLFLOW_TRACKING_URI").unwrap_or_else(|_| "http://127.0.0.1:5000".into());
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("leads.csv");
    leadscore_e2e::write_leads_csv(&csv, 8, 8000);
    let name = format!(
        "it-swap-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    leadscore_e2e::train_and_register(&csv, &dir.path().join("v1"), &name, &mlflow, "0.02");

    let t = Topics::create(3).await;
    let lifecycle = format!("{}.lifecycle", t.input);
    create_topic(&lifecycle, 1).await;
    let champion = format!("mlflow+{mlflow}/{name}@champion");
    let (mut scorer, port) = start_scorer_with(
        &t,
        &unique("it-swap"),
        "s",
        false,
        &[
            ("LEADSCORE__SCORER__CHAMPION_MODEL", champion.as_str()),
            ("LEADSCORE__SCORER__LIFECYCLE_TOPIC", lifecycle.as_str()),
            ("LEADSCORE__SCORER__MODEL_POLL_SECS", "0"),
        ],
    );
    let before = leads("swap_a", 300, 9);
    produce_creates(&t.input, &before).await;
    let config = leadscore_config::Config::load(None).unwrap();
    let decoder = Decoder::new(Registry::new(&config.registry).unwrap());
    let reader = consumer(&t.scores, "read_committed");
    let first = scored_versions(&reader, &decoder, before.len()).await;
    assert_eq!(first.len(), before.len());
    assert!(
        first.values().all(|v| v == &vec!["1".to_string()]),
        "all scored by v1"
    );

    // Version 2 becomes champion in the registry; the lifecycle event tells the scorer.
    leadscore_e2e::train_and_register(&csv, &dir.path().join("v2"), &name, &mlflow, "-1");
    let resp = reqwest::Client::new()
        .post(format!("{mlflow}/api/2.0/mlflow/registered-models/alias"))
        .json(&json!({"name": name, "alias": "champion", "version": "2"}))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "{}",
        resp.text().await.unwrap_or_default()
    );
    produce(
        &lifecycle,
        vec![(
            Some(name.clone()),
            br#"{"stage":"promoted","version":"2"}"#.to_vec(),
        )],
    )
    .await;
    let mut swapped = false;
    for _ in 0..100 {
        if http_get(port, "/metrics")
            .await
            .contains(&format!("model=\"{name} v2\""))
        {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(swapped, "the scorer did not pick up v2");

    let after = leads("swap_b", 300, 10);
    produce_creates(&t.input, &after).await;
    let second = scored_versions(&reader, &decoder, after.len()).await;
    scorer.kill().unwrap();
    scorer.wait().unwrap();
    assert_eq!(second.len(), after.len(), "every lead scored");
    assert!(
        second.values().all(|v| v == &vec!["2".to_string()]),
        "each exactly once, by v2"
    );
    delete_topics(&[&lifecycle]).await;
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_serves_its_share_by_stable_hash_and_the_champion_goes_to_shadow() {
    // A second model: the bundled one relabelled, so its scores are recognisable by version.
    let dir = tempfile::tempdir().unwrap();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    std::fs::copy(bundled.join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled.join("metadata.json")).unwrap())
            .unwrap();
    meta["version"] = json!("canary-1");
    std::fs::write(dir.path().join("metadata.json"), meta.to_string()).unwrap();

    let t = Topics::create(2).await;
    let ls = leads("canary", 400, 12);
    produce_creates(&t.input, &ls).await;
    let canary_dir = dir.path().to_str().unwrap().to_string();
    let (mut scorer, _) = start_scorer_with(
        &t,
        &unique("it-canary"),
        "k",
        false,
        &[
            ("LEADSCORE__SCORER__CANARY_MODEL", canary_dir.as_str()),
            ("LEADSCORE__SCORER__CANARY_PERCENT", "30"),
        ],
    );
    let config = leadscore_config::Config::load(None).unwrap();
    let decoder = Decoder::new(Registry::new(&config.registry).unwrap());
    let versions =
        scored_versions(&consumer(&t.scores, "read_committed"), &decoder, ls.len()).await;
    let shadow = leadscore_e2e::receive(
        &consumer(&t.shadow, "read_committed"),
        ls.len(),
        Duration::from_secs(20),
    )
    .await;
    scorer.kill().unwrap();
    scorer.wait().unwrap();

    let mut in_canary = 0;
    for l in &ls {
        let expect_canary = leadscore_scorer::process::canary_bucket(&l.lead_id) < 30.0;
        in_canary += usize::from(expect_canary);
        let want = if expect_canary {
            "canary-1"
        } else {
            "bundled-1"
        };
        assert_eq!(
            versions.get(&l.lead_id),
            Some(&vec![want.to_string()]),
            "{}",
            l.lead_id
        );
    }
    assert!(
        (80..160).contains(&in_canary),
        "about 30% of 400 in the canary: {in_canary}"
    );
    let shadow_keys: HashSet<String> = shadow
        .iter()
        .map(|m| String::from_utf8_lossy(m.key().unwrap()).into_owned())
        .collect();
    assert_eq!(
        shadow.len(),
        in_canary,
        "one champion shadow score per canary lead"
    );
    for l in &ls {
        let expect_canary = leadscore_scorer::process::canary_bucket(&l.lead_id) < 30.0;
        assert_eq!(shadow_keys.contains(&l.lead_id), expect_canary);
    }
    t.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_share_follows_the_lifecycle_controllers_steps_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
    std::fs::copy(bundled.join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundled.join("metadata.json")).unwrap())
            .unwrap();
    let model_name = meta["model_name"].as_str().unwrap().to_string();
    meta["version"] = json!("canary-2");
    std::fs::write(dir.path().join("metadata.json"), meta.to_string()).unwrap();

    let t = Topics::create(1).await;
    let lifecycle = format!("{}.lifecycle", t.input);
    create_topic(&lifecycle, 1).await;
    let canary_dir = dir.path().to_str().unwrap().to_string();
    let (mut scorer, _) = start_scorer_with(
        &t,
        &unique("it-canary-steps"),
        "k",
        false,
        &[
            ("LEADSCORE__SCORER__CANARY_MODEL", canary_dir.as_str()),
            ("LEADSCORE__SCORER__CANARY_PERCENT", "0"),
            ("LEADSCORE__SCORER__LIFECYCLE_TOPIC", lifecycle.as_str()),
        ],
    );
    let config = leadscore_config::Config::load(None).unwrap();
    let registry = Registry::new(&config.registry).unwrap();
    let decoder = Decoder::new(registry.clone());
    let step = |percent: i32, stage: &str| {
        let stage = match stage {
            "canary" => leadscore_lifecycle::events::Stage::Canary,
            _ => leadscore_lifecycle::events::Stage::Promoted,
        };
        leadscore_lifecycle::events::LifecycleEvent {
            event_id: unique("rollout/test"),
            model_name: model_name.clone(),
            version: "canary-2".into(),
            stage,
            canary_percent: percent,
            champion_version: None,
            challenger_version: None,
            reason: "test step".into(),
            at_ms: 0,
        }
    };
    let encoder = leadscore_registry::Encoder::for_subject(
        &registry,
        &leadscore_schemas::value_subject(&lifecycle),
        leadscore_schemas::find("ModelLifecycleEvent.avsc")
            .unwrap()
            .text,
    )
    .await
    .unwrap();
    let scores = consumer(&t.scores, "read_committed");
    // Each phase: a step on the lifecycle topic, then fresh leads; the share of canary scores follows.
    for (phase, (percent, stage)) in [(0, "promoted"), (50, "canary"), (0, "promoted")]
        .into_iter()
        .enumerate()
    {
        produce(
            &lifecycle,
            vec![(
                Some(model_name.clone()),
                encoder.encode(step(percent, stage).to_value()).unwrap(),
            )],
        )
        .await;
        // The scorer applies the step on receipt; give it a moment before the leads.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ls = leads(&format!("steps{phase}"), 200, 20 + phase as u64);
        produce_creates(&t.input, &ls).await;
        let versions = scored_versions(&scores, &decoder, ls.len()).await;
        let canary = ls
            .iter()
            .filter(|l| versions.get(&l.lead_id) == Some(&vec!["canary-2".to_string()]))
            .count();
        let expected = ls
            .iter()
            .filter(|l| leadscore_scorer::process::canary_bucket(&l.lead_id) < f64::from(percent))
            .count();
        assert_eq!(canary, expected, "phase {phase} at {percent}%");
        if percent == 50 {
            assert!(canary > 50, "about half of 200: {canary}");
        }
    }
    scorer.kill().unwrap();
    scorer.wait().unwrap();
    delete_topics(&[&lifecycle]).await;
    t.delete().await;
}
