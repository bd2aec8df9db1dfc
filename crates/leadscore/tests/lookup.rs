//! The lookup service against real Redis, Postgres, Kafka and the registry:
//! Redis hit, miss then Postgres, Redis killed mid-test (Postgres answers),
//! both down (UNAVAILABLE); ScoreLead equal bit for bit to the stream;
//! WatchScores follows the stream; the seed's REST contract; bearer tokens;
//! Open Inference Protocol v2.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use leadscore_cache::{Cache, CachedScore};
use leadscore_crm::{Generator, GeneratorConfig};
use leadscore_e2e::{
    client, consumer, create_topic, delete_topics, free_port, receive, terminate, unique,
};
use leadscore_lookup::proto::inference as oip;
use leadscore_lookup::proto::v1;
use leadscore_registry::{Decoder, Registry};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tonic::Code;
use tonic::transport::Channel;

const TOKEN: &str = "it-lookup-token-0123456789";

struct Lookup {
    child: Option<Child>,
    grpc: u16,
    rest: u16,
}

impl Drop for Lookup {
    // A failed test must not leave the service running (it holds the test's stderr).
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_lookup(env: &[(&str, String)]) -> Lookup {
    let (grpc, rest) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_leadscore"));
    cmd.arg("lookup")
        .env("LEADSCORE_LOG", "warn")
        // Tests of other things run open; the ones about tokens set them.
        .env("LEADSCORE__LOOKUP__ALLOW_UNAUTHENTICATED", "true")
        .env(
            "LEADSCORE__LOOKUP__GRPC_LISTEN",
            format!("127.0.0.1:{grpc}"),
        )
        .env(
            "LEADSCORE__LOOKUP__REST_LISTEN",
            format!("127.0.0.1:{rest}"),
        )
        .env("LEADSCORE__SCORER__CHAMPION_MODEL", models())
        .env("LEADSCORE__LOOKUP__MODEL_POLL_SECS", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Lookup {
        child: Some(cmd.spawn().unwrap()),
        grpc,
        rest,
    }
}

fn models() -> String {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/default")
        .display()
        .to_string()
}

impl Lookup {
    async fn channel(&self) -> Channel {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(c) = Channel::from_shared(format!("http://127.0.0.1:{}", self.grpc))
                .unwrap()
                .connect()
                .await
            {
                // Ready once REST answers too.
                if reqwest::get(format!("http://127.0.0.1:{}/readyz", self.rest))
                    .await
                    .is_ok_and(|r| r.status().is_success())
                {
                    return c;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "lookup never became ready"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn scores(
        &self,
        token: Option<&str>,
    ) -> v1::lead_scores_client::LeadScoresClient<
        tonic::service::interceptor::InterceptedService<
            Channel,
            impl tonic::service::Interceptor + use<>,
        >,
    > {
        let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
            token.map(|t| format!("Bearer {t}").parse().unwrap());
        v1::lead_scores_client::LeadScoresClient::with_interceptor(
            self.channel().await,
            move |mut req: tonic::Request<()>| {
                if let Some(h) = &header {
                    req.metadata_mut().insert("authorization", h.clone());
                }
                Ok(req)
            },
        )
    }
}

fn score(id: &str, s: f64, version: &str) -> CachedScore {
    CachedScore {
        lead_id: id.into(),
        score: s,
        band: if s >= 0.5 { "High" } else { "Low" }.into(),
        model_name: "lead-scoring".into(),
        model_version: version.into(),
        model_role: "champion".into(),
        scored_at_ms: 1_700_000_000_000,
        reasons: vec![
            format!("page_views={} +0.31", (s * 100.0) as i64),
            "industry=Real Estate -0.12".into(),
        ]
        .into(),
    }
}

async fn insert_row(pg: &tokio_postgres::Client, s: &CachedScore) {
    pg.execute(
        "INSERT INTO public.lead_scores (lead_id, score, band, model_name, model_version, model_role, scored_at, reasons) \
         VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7::double precision / 1000), $8) \
         ON CONFLICT (lead_id) DO UPDATE SET score = EXCLUDED.score, model_version = EXCLUDED.model_version, reasons = EXCLUDED.reasons",
        &[&s.lead_id, &s.score, &s.band, &s.model_name, &s.model_version, &s.model_role, &(s.scored_at_ms as f64), &s.reasons.to_vec()],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_redis_then_postgres_survive_a_redis_kill_and_fail_unavailable_when_both_are_down()
 {
    // A Redis of this test's own (it gets killed), and Postgres behind a relay (it gets cut).
    let redis_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pg_url = leadscore_e2e::config().postgres.url;
    let (pg, conn) = tokio_postgres::connect(&pg_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let relay = leadscore_e2e::Relay::to("127.0.0.1:5432").await;
    let relayed = pg_url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    assert_ne!(
        relayed, pg_url,
        "postgres.url is expected on 127.0.0.1:5432"
    );

    let p = unique("it-lookup");
    let (cached, stored, unknown) = (
        format!("{p}-cached"),
        format!("{p}-stored"),
        format!("{p}-unknown"),
    );
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let cache = Cache::new(&redis_url, Duration::from_secs(600), Duration::from_secs(2)).unwrap();
    // In Redis and Postgres (the scorer's cache and the sink connector's row), and in Postgres only.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache
        .write(&[score(&cached, 0.81, "7")], &[])
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "private redis did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    insert_row(&pg, &score(&cached, 0.81, "7")).await;
    insert_row(&pg, &score(&stored, 0.12, "6")).await;

    let mut lookup = start_lookup(&[
        ("LEADSCORE__LOOKUP__REDIS_URL", redis_url.clone()),
        ("LEADSCORE__POSTGRES__URL", relayed),
        ("LEADSCORE__LOOKUP__MAX_BATCH", "3".into()),
        ("LEADSCORE__LOOKUP__SCORES_TOPIC", String::new()),
        ("LEADSCORE__LOOKUP__LIFECYCLE_TOPIC", String::new()),
    ]);
    let mut c = lookup.scores(None).await;
    let get = |id: &str| v1::GetScoreRequest { lead_id: id.into() };

    let hit = c
        .get_score(get(&cached))
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    assert_eq!((hit.score, hit.model_version.as_str()), (0.81, "7"));
    assert_eq!(hit.source, v1::ScoreSource::Cache as i32);
    // The reasons come back from the cache, in parts and as the CRM shows them.
    let parts: Vec<(&str, Option<&str>, f64, &str)> = hit
        .reasons
        .iter()
        .map(|r| {
            (
                r.feature.as_str(),
                r.value.as_deref(),
                r.contribution,
                r.text.as_str(),
            )
        })
        .collect();
    assert_eq!(
        parts,
        [
            ("page_views", Some("81"), 0.31, "page_views=81 +0.31"),
            (
                "industry",
                Some("Real Estate"),
                -0.12,
                "industry=Real Estate -0.12"
            ),
        ]
    );
    assert_eq!(hit.band, v1::Band::High as i32);
    let miss = c
        .get_score(get(&stored))
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    assert_eq!(
        (miss.score, miss.source),
        (0.12, v1::ScoreSource::Database as i32)
    );
    let texts: Vec<&str> = miss.reasons.iter().map(|r| r.text.as_str()).collect();
    assert_eq!(texts, ["page_views=12 +0.31", "industry=Real Estate -0.12"]);
    let e = c.get_score(get(&unknown)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c.get_score(get("")).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("lead_id"), "{}", e.message());
    let batch = c
        .batch_get_scores(v1::BatchGetScoresRequest {
            lead_ids: vec![cached.clone(), stored.clone(), unknown.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, i32)> = batch
        .scores
        .iter()
        .map(|s| (s.lead_id.as_str(), s.source))
        .collect();
    assert_eq!(
        got,
        [
            (cached.as_str(), v1::ScoreSource::Cache as i32),
            (stored.as_str(), v1::ScoreSource::Database as i32)
        ]
    );
    assert_eq!(batch.missing, std::slice::from_ref(&unknown));
    let e = c
        .batch_get_scores(v1::BatchGetScoresRequest {
            lead_ids: vec!["a".into(); 4],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("lead_ids") && e.message().contains("at most 3"),
        "{}",
        e.message()
    );

    // Redis killed: the same lead is answered from Postgres.
    redis.kill().unwrap();
    redis.wait().unwrap();
    let after = c
        .get_score(get(&cached))
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    assert_eq!(
        (after.score, after.source),
        (0.81, v1::ScoreSource::Database as i32)
    );
    let rest: serde_json::Value = reqwest::get(format!(
        "http://127.0.0.1:{}/leads/{cached}/score",
        lookup.rest
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(rest["source"], "database");
    assert_eq!(rest["lead_score"], 0.81);
    assert_eq!(rest["reasons"][0]["feature"], "page_views");
    assert_eq!(rest["reasons"][0]["value"], "81");
    assert_eq!(rest["reasons"][0]["contribution"], 0.31);
    assert_eq!(rest["reasons"][1]["text"], "industry=Real Estate -0.12");

    // Postgres stalls: a caller's deadline shorter than the database timeout is honoured,
    // and without one the answer is UNAVAILABLE once the database timeout passes.
    relay.stall();
    // (A pooled connection not yet seen broken fails at once with UNAVAILABLE.)
    let mut codes = Vec::new();
    while codes.len() < 10 && codes.last() != Some(&Code::DeadlineExceeded) {
        let mut req = tonic::Request::new(get(&stored));
        req.set_timeout(Duration::from_millis(200));
        codes.push(c.get_score(req).await.unwrap_err().code());
    }
    assert_eq!(codes.last(), Some(&Code::DeadlineExceeded), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::DeadlineExceeded | Code::Unavailable)),
        "{codes:?}"
    );
    let e = c.get_score(get(&stored)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // And Postgres cut too: UNAVAILABLE, never NOT_FOUND.
    relay.cut();
    let e = c.get_score(get(&stored)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let r = reqwest::get(format!(
        "http://127.0.0.1:{}/leads/{stored}/score",
        lookup.rest
    ))
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    terminate(lookup.child.take().unwrap());
    pg.execute(
        "DELETE FROM public.lead_scores WHERE lead_id LIKE $1",
        &[&format!("{p}-%")],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_lead_equals_the_stream_bit_for_bit_and_watch_scores_follows_it() {
    let base = unique("it.lookup");
    let t = |s: &str| format!("{base}.{s}");
    for s in ["in", "scores", "shadow", "dlq"] {
        create_topic(&t(s), 2).await;
    }
    let mut lookup = start_lookup(&[
        ("LEADSCORE__LOOKUP__SCORES_TOPIC", t("scores")),
        ("LEADSCORE__LOOKUP__LIFECYCLE_TOPIC", String::new()),
    ]);
    let mut c = lookup.scores(None).await;
    let scorer = leadscore_e2e::Service::from(
        Command::new(env!("CARGO_BIN_EXE_leadscore"))
            .arg("scorer")
            .env("LEADSCORE__SCORER__INPUT_TOPIC", t("in"))
            .env("LEADSCORE__SCORER__SCORES_TOPIC", t("scores"))
            .env("LEADSCORE__SCORER__SHADOW_TOPIC", t("shadow"))
            .env("LEADSCORE__SCORER__DLQ_TOPIC", t("dlq"))
            .env("LEADSCORE__SCORER__GROUP_ID", format!("{base}-scorer"))
            .env(
                "LEADSCORE__SCORER__TRANSACTIONAL_ID_PREFIX",
                format!("{base}-scorer"),
            )
            .env("LEADSCORE__SCORER__CHAMPION_MODEL", models())
            .env("LEADSCORE__SCORER__LIFECYCLE_TOPIC", "")
            .env(
                "LEADSCORE__SCORER__HTTP_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("LEADSCORE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let producer: FutureProducer = client(&[]).create().unwrap();
    let send = |l: leadscore_crm::Lead| {
        let producer = producer.clone();
        let topic = t("in");
        async move {
            let bytes = leadscore_e2e::debezium_create(&l, chrono::Utc::now().timestamp_millis());
            producer
                .send(
                    FutureRecord::to(&topic)
                        .key(l.lead_id.as_str())
                        .payload(&bytes),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
    };

    // Warm up until the lookup's live feed is assigned: a watcher sees a score.
    let mut warm = c
        .watch_scores(v1::WatchScoresRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut g = Generator::new(GeneratorConfig {
        seed: 7,
        id_prefix: format!("{base}-warm"),
        ..Default::default()
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        send(g.next_lead().lead).await;
        if let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::from_millis(700), warm.message()).await
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no live score reached WatchScores"
        );
    }
    drop(warm);

    let mut all = c
        .watch_scores(v1::WatchScoresRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut high = c
        .watch_scores(v1::WatchScoresRequest {
            bands: vec![v1::Band::High as i32],
            min_score: 0.0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut g = Generator::new(GeneratorConfig {
        seed: 8,
        id_prefix: format!("{base}-lead"),
        ..Default::default()
    });
    let leads: Vec<leadscore_crm::Lead> = (0..60).map(|_| g.next_lead().lead).collect();
    for l in &leads {
        send(l.clone()).await;
    }
    let mut watched = std::collections::BTreeMap::new();
    while watched.len() < leads.len() {
        let s = tokio::time::timeout(Duration::from_secs(60), all.message())
            .await
            .expect("WatchScores stalled")
            .unwrap()
            .unwrap();
        if s.lead_id.starts_with(&format!("{base}-lead")) {
            assert_eq!(s.source, v1::ScoreSource::Stream as i32);
            watched.insert(s.lead_id.clone(), s);
        }
    }
    // The stream's own records, from the topic.
    let decoder = Decoder::new(Registry::new(&leadscore_e2e::config().registry).unwrap());
    let mut stream = std::collections::BTreeMap::new();
    for m in receive(
        &consumer(&t("scores"), "read_committed"),
        usize::MAX,
        Duration::from_secs(5),
    )
    .await
    {
        let v = decoder.decode(leadscore_e2e::payload(&m)).await.unwrap();
        let apache_avro::types::Value::Record(f) = v else {
            panic!()
        };
        let get = |n: &str| f.iter().find(|(k, _)| k == n).unwrap().1.clone();
        let (apache_avro::types::Value::String(id), apache_avro::types::Value::Double(score)) =
            (get("lead_id"), get("score"))
        else {
            panic!()
        };
        stream.insert(id, score);
    }
    for l in &leads {
        let streamed = stream[&l.lead_id];
        assert_eq!(watched[&l.lead_id].score.to_bits(), streamed.to_bits());
        let on_demand = c
            .score_lead(v1::ScoreLeadRequest {
                lead: Some(v1::Lead::from(l)),
            })
            .await
            .unwrap()
            .into_inner()
            .score
            .unwrap();
        assert_eq!(
            on_demand.score.to_bits(),
            streamed.to_bits(),
            "{}: on demand {} vs stream {}",
            l.lead_id,
            on_demand.score,
            streamed
        );
        assert_eq!(on_demand.band, watched[&l.lead_id].band);
        assert_eq!(on_demand.source, v1::ScoreSource::OnDemand as i32);
        // The same reasons on demand as on the stream: three, in the CRM's words.
        let texts = |s: &v1::Score| s.reasons.iter().map(|r| r.text.clone()).collect::<Vec<_>>();
        assert_eq!(on_demand.reasons.len(), 3, "{}", l.lead_id);
        assert_eq!(
            texts(&on_demand),
            texts(&watched[&l.lead_id]),
            "{}",
            l.lead_id
        );
    }
    // The High-only watcher saw exactly the High scores.
    let want_high = watched
        .values()
        .filter(|s| s.band == v1::Band::High as i32)
        .count();
    let mut got_high = 0;
    while got_high < want_high {
        let s = tokio::time::timeout(Duration::from_secs(10), high.message())
            .await
            .expect("the High watcher stalled")
            .unwrap()
            .unwrap();
        assert_eq!(s.band, v1::Band::High as i32);
        if s.lead_id.starts_with(&format!("{base}-lead")) {
            got_high += 1;
        }
    }
    // The scorer's cache write is what GetScore finds first.
    let first = &leads[0].lead_id;
    let mut found = None;
    for _ in 0..50 {
        if let Ok(r) = c
            .get_score(v1::GetScoreRequest {
                lead_id: first.clone(),
            })
            .await
        {
            found = r.into_inner().score;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let found = found.expect("the streamed score is not readable");
    assert_eq!(found.score.to_bits(), stream[first].to_bits());
    assert_eq!(found.source, v1::ScoreSource::Memory as i32);

    // A change re-scores the lead; the memory follows the stream, never
    // answering the old score once the new one is streamed.
    let mut changed = leads[0].clone();
    changed.page_views = Some(changed.page_views.unwrap_or(0) + 250);
    changed.time_on_site = Some(changed.time_on_site.unwrap_or(0.0) + 1_800.0);
    changed.form_completion_time = Some(12.0);
    changed.updated_at = chrono::Utc::now();
    let expected = c
        .score_lead(v1::ScoreLeadRequest {
            lead: Some(v1::Lead::from(&changed)),
        })
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap()
        .score;
    assert_ne!(
        expected.to_bits(),
        found.score.to_bits(),
        "the change must move the score"
    );
    send(changed).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = c
            .get_score(v1::GetScoreRequest {
                lead_id: first.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .score
            .unwrap();
        assert_eq!(now.source, v1::ScoreSource::Memory as i32);
        if now.score.to_bits() == expected.to_bits() {
            break;
        }
        assert_eq!(
            now.score.to_bits(),
            found.score.to_bits(),
            "neither old nor new"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "the re-score never reached GetScore"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A deleted lead: its tombstone makes it unknown, though its score was remembered.
    let mut delete: serde_json::Value =
        serde_json::from_slice(&leadscore_e2e::debezium_create(&leads[0], 0)).unwrap();
    delete["op"] = "d".into();
    delete["before"] = delete["after"].take();
    producer
        .send(
            FutureRecord::to(&t("in"))
                .key(first.as_str())
                .payload(&serde_json::to_vec(&delete).unwrap()),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match c
            .get_score(v1::GetScoreRequest {
                lead_id: first.clone(),
            })
            .await
        {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            Ok(r) => assert_eq!(
                r.into_inner().score.unwrap().score.to_bits(),
                expected.to_bits()
            ),
            Err(status) => panic!("{status}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deletion never reached GetScore"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = c
        .get_model_info(v1::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let champion = info.champion.unwrap();
    assert_eq!(
        (
            champion.version.as_str(),
            champion.loaded,
            champion.stage.as_str()
        ),
        ("bundled-1", true, "Production")
    );
    assert!(info.challenger.is_none() && info.canary.is_none());

    // SIGTERM ends open streams and the service exits cleanly.
    terminate(lookup.child.take().unwrap());
    // (Scores streamed since the last read arrive first.)
    let ended = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(ended, all.message()).await {
            Ok(Ok(Some(_))) => continue,
            Ok(_) => break,
            Err(_) => panic!("WatchScores stayed open after SIGTERM"),
        }
    }
    drop(scorer);
    for s in ["in", "scores", "shadow", "dlq"] {
        delete_topics(&[&t(s)]).await;
    }
}

/// The seed design's documented request.
fn seed_example() -> serde_json::Value {
    serde_json::json!({"lead_id": "lead_123", "company_size": "Medium", "industry": "Technology",
        "page_views": 15, "time_on_site": 300.5, "form_completion_time": 45.2,
        "referral_source": "Google", "created_at": "2024-01-01T00:00:00"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_rest_contract_bearer_tokens_health_and_open_inference_protocol() {
    let mut lookup = start_lookup(&[
        ("LEADSCORE__LOOKUP__AUTH_TOKENS", format!("[\"{TOKEN}\"]")),
        (
            "LEADSCORE__LOOKUP__CORS_ORIGINS",
            "[\"https://crm.example\"]".into(),
        ),
        ("LEADSCORE__LOOKUP__SCORES_TOPIC", String::new()),
        ("LEADSCORE__LOOKUP__LIFECYCLE_TOPIC", String::new()),
    ]);
    let channel = lookup.channel().await;
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://127.0.0.1:{}{p}", lookup.rest);

    // GET /health: open, the seed's shape.
    let r = http
        .get(url("/health"))
        .header("Origin", "https://crm.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://crm.example"
    );
    let h: serde_json::Value = r.json().await.unwrap();
    let keys: Vec<&str> = h.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["model_loaded", "model_stage", "status", "timestamp"]);
    assert_eq!(
        (
            h["status"].as_str(),
            h["model_loaded"].as_bool(),
            h["model_stage"].as_str()
        ),
        (Some("healthy"), Some(true), Some("Production"))
    );
    chrono::NaiveDateTime::parse_from_str(h["timestamp"].as_str().unwrap(), "%Y-%m-%dT%H:%M:%S%.f")
        .unwrap();

    // POST /score-lead: missing, wrong and right token.
    let post = |token: Option<&str>, body: serde_json::Value| {
        let mut r = http.post(url("/score-lead")).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(
        post(None, seed_example()).await.unwrap().status().as_u16(),
        401
    );
    let wrong = post(Some("it-lookup-token-0123456788"), seed_example())
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    let r = post(Some(TOKEN), seed_example()).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let s: serde_json::Value = r.json().await.unwrap();
    let keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "latency_ms",
            "lead_id",
            "lead_score",
            "model_version",
            "prediction_timestamp",
            "reasons",
            "score_category"
        ]
    );
    // The seed's fields, and the reasons besides: the three features that moved the score.
    let reasons = s["reasons"].as_array().unwrap();
    assert_eq!(reasons.len(), 3, "{s}");
    for r in reasons {
        let text = r["text"].as_str().unwrap();
        let feature = r["feature"].as_str().unwrap();
        assert!(text.starts_with(&format!("{feature}=")), "{r}");
        assert!(r["contribution"].is_f64(), "{r}");
    }
    assert_eq!(s["lead_id"], "lead_123");
    assert_eq!(s["model_version"], "bundled-1");
    let score = s["lead_score"].as_f64().unwrap();
    let want = if score >= 0.5 {
        "High"
    } else if score >= 0.25 {
        "Medium"
    } else {
        "Low"
    };
    assert_eq!(s["score_category"], want);
    assert!(s["latency_ms"].as_f64().unwrap() >= 0.0);
    chrono::NaiveDateTime::parse_from_str(
        s["prediction_timestamp"].as_str().unwrap(),
        "%Y-%m-%dT%H:%M:%S%.f",
    )
    .unwrap();

    // 422 names the field, in the seed's (FastAPI) shape.
    for (patch, field) in [
        (serde_json::json!({"page_views": "many"}), "page_views"),
        (serde_json::json!({"time_on_site": -3.0}), "time_on_site"),
        (serde_json::json!({"lead_id": null}), "lead_id"),
        (serde_json::json!({"created_at": "yesterday"}), "created_at"),
    ] {
        let mut body = seed_example();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = post(Some(TOKEN), body).await.unwrap();
        assert_eq!(r.status().as_u16(), 422, "{field}");
        let d: serde_json::Value = r.json().await.unwrap();
        assert_eq!(
            d["detail"][0]["loc"],
            serde_json::json!(["body", field]),
            "{d}"
        );
    }
    // A body over the size limit is refused before parsing.
    let huge = serde_json::json!({"lead_id": "x".repeat(100 * 1024)});
    assert_eq!(
        post(Some(TOKEN), huge).await.unwrap().status().as_u16(),
        413
    );

    // GET /model-info.
    let m: serde_json::Value = http
        .get(url("/model-info"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(m["production_model"]["loaded"], true);
    assert_eq!(m["production_model"]["stage"], "Production");
    assert_eq!(m["shadow_model"]["enabled"], false);
    assert_eq!(m["shadow_model"]["stage"], "Staging");
    assert_eq!(
        http.get(url("/model-info"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );

    // gRPC: the same tokens; health is open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "leadscore.v1.LeadScores".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Server reflection lists every service, to a caller with the token only.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    let list_services = || {
        tokio_stream::iter(vec![tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        }])
    };
    let refused = reflection
        .server_reflection_info(list_services())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut request = tonic::Request::new(list_services());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut answers = reflection
        .server_reflection_info(request)
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        ),
    ) = answer.message_response
    else {
        panic!("{answer:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "leadscore.v1.LeadScores",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let e = lookup
        .scores(None)
        .await
        .get_model_info(v1::GetModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = lookup
        .scores(Some("it-lookup-token-wrong-wrong"))
        .await
        .get_model_info(v1::GetModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut c = lookup.scores(Some(TOKEN)).await;
    let info = c
        .get_model_info(v1::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.champion.unwrap().version, "bundled-1");
    // ScoreLead agrees with POST /score-lead.
    let on_demand = c
        .score_lead(v1::ScoreLeadRequest {
            lead: Some(v1::Lead {
                lead_id: "lead_123".into(),
                company_size: Some("Medium".into()),
                industry: Some("Technology".into()),
                page_views: Some(15),
                time_on_site: Some(300.5),
                form_completion_time: Some(45.2),
                referral_source: Some("Google".into()),
                country: None,
                created_at: Some("2024-01-01T00:00:00".into()),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .score
        .unwrap();
    assert_eq!(on_demand.score.to_bits(), score.to_bits());
    let grpc_texts: Vec<&str> = on_demand.reasons.iter().map(|r| r.text.as_str()).collect();
    let rest_texts: Vec<&str> = reasons
        .iter()
        .map(|r| r["text"].as_str().unwrap())
        .collect();
    assert_eq!(grpc_texts, rest_texts);
    let e = c
        .score_lead(v1::ScoreLeadRequest {
            lead: Some(v1::Lead {
                lead_id: "x".into(),
                page_views: Some(-1),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("page_views"), "{}", e.message());

    // Open Inference Protocol v2: the champion's own features in, the same probability out.
    leadscore_model::init_runtime(None).unwrap();
    let model = leadscore_model::Model::load_dir(std::path::Path::new(&models())).unwrap();
    let lead = leadscore_lookup::lead_from_fields(
        "lead_123".into(),
        Some("Medium".into()),
        Some("Technology".into()),
        Some(15),
        Some(300.5),
        Some(45.2),
        Some("Google".into()),
        None,
        Some("2024-01-01T00:00:00"),
    )
    .unwrap();
    let mut row = Vec::new();
    model.features().build_into(&lead, &mut row).unwrap();
    let header: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
        format!("Bearer {TOKEN}").parse().unwrap();
    let mut oip_client =
        oip::grpc_inference_service_client::GrpcInferenceServiceClient::with_interceptor(
            channel.clone(),
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", header.clone());
                Ok(req)
            },
        );
    let meta = oip_client
        .model_metadata(oip::ModelMetadataRequest {
            name: "lead-scoring".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(meta.inputs[0].name, "features");
    assert_eq!(meta.inputs[0].shape, [-1, row.len() as i64]);
    let infer = |rows: Vec<f32>, n: i64| oip::ModelInferRequest {
        model_name: "lead-scoring".into(),
        id: "req-1".into(),
        inputs: vec![oip::model_infer_request::InferInputTensor {
            name: "features".into(),
            datatype: "FP32".into(),
            shape: vec![n, row.len() as i64],
            contents: Some(oip::InferTensorContents {
                fp32_contents: rows,
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = oip_client
        .model_infer(infer(row.clone(), 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.id.as_str(), r.model_version.as_str()),
        ("req-1", "bundled-1")
    );
    let out = r.outputs[0]
        .contents
        .as_ref()
        .unwrap()
        .fp64_contents
        .clone();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].to_bits(), score.to_bits());
    // The second output: each feature's contribution, adding up (with the expected value
    // in its parameters) to the score's log-odds.
    assert_eq!(
        meta.outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect::<Vec<_>>(),
        ["probability", "contributions"]
    );
    let contributions = &r.outputs[1];
    assert_eq!(contributions.name, "contributions");
    assert_eq!(contributions.shape, [1, row.len() as i64]);
    let phi = &contributions.contents.as_ref().unwrap().fp64_contents;
    let Some(oip::infer_parameter::ParameterChoice::DoubleParam(expected)) =
        contributions.parameters["expected_value"].parameter_choice
    else {
        panic!("no expected_value")
    };
    let margin = expected + phi.iter().sum::<f64>();
    assert!(
        (1.0 / (1.0 + (-margin).exp()) - score).abs() < 1e-6,
        "{margin} vs {score}"
    );
    let mut only = infer(row.clone(), 1);
    only.outputs = vec![oip::model_infer_request::InferRequestedOutputTensor {
        name: "contributions".into(),
        ..Default::default()
    }];
    let r = oip_client
        .model_infer(only.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(&r.outputs[0].contents.as_ref().unwrap().fp64_contents, phi);
    only.outputs[0].name = "shap".into();
    let e = oip_client.model_infer(only).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("shap"), "{}", e.message());
    let e = oip_client
        .model_infer(infer(row.clone(), 2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = oip_client
        .model_metadata(oip::ModelMetadataRequest {
            name: "other".into(),
            version: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    terminate(lookup.child.take().unwrap());
}

/// A CA, and PEM (certificate, key) pairs it signed for `name`.
fn pki(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    for name in ["server", "client"] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    (dir.to_path_buf(), ca_cert.pem().into_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_mutual_tls_refuses_clients_without_a_certificate() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let tmp = tempfile::tempdir().unwrap();
    let (dir, ca) = pki(tmp.path());
    let path = |f: &str| dir.join(f).display().to_string();
    let mut lookup = start_lookup(&[
        ("LEADSCORE__LOOKUP__TLS_CERT", path("server.pem")),
        ("LEADSCORE__LOOKUP__TLS_KEY", path("server.key")),
        ("LEADSCORE__LOOKUP__TLS_CLIENT_CA", path("ca.pem")),
        ("LEADSCORE__LOOKUP__SCORES_TOPIC", String::new()),
        ("LEADSCORE__LOOKUP__LIFECYCLE_TOPIC", String::new()),
    ]);
    // REST is TLS too, with the same certificate: probes need no client certificate.
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .build()
        .unwrap();
    let rest = |p: &str| format!("https://localhost:{}{p}", lookup.rest);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !https
        .get(rest("/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lookup never became ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let endpoint = || Channel::from_shared(format!("https://localhost:{}", lookup.grpc)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name("localhost");
    // With a client certificate the CA signed: served.
    let with_cert = endpoint()
        .tls_config(tls.clone().identity(Identity::from_pem(
            std::fs::read(dir.join("client.pem")).unwrap(),
            std::fs::read(dir.join("client.key")).unwrap(),
        )))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let info = v1::lead_scores_client::LeadScoresClient::new(with_cert)
        .get_model_info(v1::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.champion.unwrap().version, "bundled-1");
    // Without one: the handshake fails, no call is served.
    let refused = match endpoint().tls_config(tls).unwrap().connect().await {
        Err(_) => true,
        Ok(ch) => v1::lead_scores_client::LeadScoresClient::new(ch)
            .get_model_info(v1::GetModelInfoRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    // Plain text is not served either.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", lookup.grpc))
        .unwrap()
        .connect()
        .await;
    let plain_served = match plain {
        Err(_) => false,
        Ok(ch) => v1::lead_scores_client::LeadScoresClient::new(ch)
            .get_model_info(v1::GetModelInfoRequest {})
            .await
            .is_ok(),
    };
    assert!(!plain_served);
    // REST: plain HTTP is not served, a certificate from another CA is refused, the API wants
    // the token over TLS as over plain.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{}/readyz", lookup.rest))
            .await
            .is_err(),
        "plain HTTP on the TLS REST port"
    );
    let other = tempfile::tempdir().unwrap();
    let (other_dir, _) = pki(other.path());
    let foreign = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .identity(
            reqwest::Identity::from_pem(
                &[
                    std::fs::read(other_dir.join("client.pem")).unwrap(),
                    std::fs::read(other_dir.join("client.key")).unwrap(),
                ]
                .concat(),
            )
            .unwrap(),
        )
        .build()
        .unwrap();
    assert!(
        foreign.get(rest("/readyz")).send().await.is_err(),
        "a client certificate from another CA was accepted"
    );
    let info = https.get(rest("/model-info")).send().await.unwrap();
    assert_eq!(
        info.status().as_u16(),
        200,
        "no token configured in this test"
    );
    terminate(lookup.child.take().unwrap());
}

/// Secure by default: without a token and without `lookup.allow_unauthenticated`, the lookup
/// service and the dashboard (which shares its tokens) refuse to start, and say what to set.
#[test]
fn without_a_token_the_lookup_and_the_dashboard_refuse_to_start() {
    for service in ["lookup", "dashboard"] {
        let out = Command::new(env!("CARGO_BIN_EXE_leadscore"))
            .arg(service)
            .env("LEADSCORE_LOG", "warn")
            .env_remove("LEADSCORE__LOOKUP__AUTH_TOKENS")
            .env_remove("LEADSCORE__LOOKUP__AUTH_TOKENS_FILE")
            .env_remove("LEADSCORE__LOOKUP__ALLOW_UNAUTHENTICATED")
            .env(
                "LEADSCORE__LOOKUP__GRPC_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env(
                "LEADSCORE__LOOKUP__REST_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env(
                "LEADSCORE__DASHBOARD__HTTP_LISTEN",
                format!("127.0.0.1:{}", free_port()),
            )
            .env("LEADSCORE__SCORER__CHAMPION_MODEL", models())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{service} started without a token");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("no bearer token configured")
                && err.contains("lookup.auth_tokens")
                && err.contains("lookup.allow_unauthenticated"),
            "{service}: {err}"
        );
    }
}
