//! The scorer through faults of the one local broker, alone in its test binary (cargo runs
//! test binaries one after another, and these faults stop the broker for everyone): the
//! broker paused with SIGSTOP for longer than the request timeout, then restarted, each
//! during a 5,000/s stream. Every lead is scored exactly once and the scorer is ready again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use leadscore_crm::Lead;
use leadscore_e2e::scorer::{
    Topics, counter, leads, read_score_records, read_scores, stream, wait_readyz,
};
use leadscore_e2e::{consumer, unique};

fn repo() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kafka_pid() -> String {
    std::fs::read_to_string(repo().join(".stack/run/kafka.pid"))
        .unwrap()
        .trim()
        .to_string()
}

fn signal(sig: &str, pid: &str) {
    assert!(
        Command::new("kill")
            .args([sig, pid])
            .status()
            .unwrap()
            .success()
    );
}

// The pause (12 s) outlasts the broker's 9 s controller session, so on resuming the controller
// fences the broker and its first Metadata answers list no brokers. Unpatched librdkafka 2.12.1 decommissioned every broker on that answer and the
// scorer's clients stayed "all brokers down" for good (vendor/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_then_a_restarted_broker_loses_and_duplicates_nothing() {
    let t = Topics::create(6).await;
    let (_scorer, port) = leadscore_e2e::scorer::start_scorer_with(
        env!("CARGO_BIN_EXE_leadscore"),
        &t,
        &unique("it-broker"),
        "b",
        false,
        &[
            ("LEADSCORE__KAFKA__REQUEST_TIMEOUT_MS", "5000"),
            ("LEADSCORE__SCORER__MAX_BATCH", "1000"),
        ],
    );
    wait_readyz(port, "HTTP/1.1 200", Duration::from_secs(60))
        .await
        .expect("the scorer becomes ready");
    let warm_up = leads("warm", 20, 20);
    let first = leads("pause", 15_000, 21);
    let second = leads("restart", 15_000, 22);

    // 0. The scorer has joined its group and commits before any fault.
    stream(t.input.clone(), warm_up.clone(), 1_000).await;
    let warm = read_scores(
        &consumer(&t.scores, "read_committed"),
        warm_up.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(warm.len(), warm_up.len(), "warm-up leads scored");

    // 1. Paused for 12 s, longer than the 5 s request timeout and the broker's session, 1.5 s
    //    into a 3 s stream.
    let feed = tokio::spawn(stream(t.input.clone(), first.clone(), 5_000));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let committed_before = counter(port, "leadscore_scorer_transactions_total").await;
    assert!(
        committed_before > 0,
        "the scorer was committing when the broker paused"
    );
    let pid = kafka_pid();
    signal("-STOP", &pid);
    // Each lane may finish the commit whose answer the broker sent before it stopped; read the
    // count once those answers are in, then nothing more may commit until the broker resumes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed_stopped = counter(port, "leadscore_scorer_transactions_total").await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let committed_paused = counter(port, "leadscore_scorer_transactions_total").await;
    signal("-CONT", &pid);
    assert_eq!(
        committed_paused, committed_stopped,
        "nothing commits while the broker is paused (before the pause: {committed_before})"
    );
    assert!(!feed.is_finished(), "the pause hit the stream mid-way");
    feed.await.unwrap();

    // 2. Restarted (stopped, started: about 10 s) 1.5 s into a second 3 s stream.
    let feed = tokio::spawn(stream(t.input.clone(), second.clone(), 5_000));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(!feed.is_finished(), "the restart hits the stream mid-way");
    let restarted = Command::new(repo().join("deploy/local/stack"))
        .args(["restart", "kafka"])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        restarted.status.success(),
        "{}",
        String::from_utf8_lossy(&restarted.stderr)
    );
    feed.await.unwrap();

    let all: Vec<&Lead> = warm_up.iter().chain(&first).chain(&second).collect();
    let scores = read_score_records(
        &consumer(&t.scores, "read_committed"),
        all.len(),
        Duration::from_secs(180),
    )
    .await;
    leadscore_e2e::scorer::assert_records_exactly_once(
        &scores,
        all.iter().map(|l| l.lead_id.as_str()),
    );
    wait_readyz(port, "HTTP/1.1 200", Duration::from_secs(60))
        .await
        .expect("ready again after the broker came back");
    t.delete().await;
}
