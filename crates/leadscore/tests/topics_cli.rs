//! `leadscore topics apply` against the real broker: idempotent, and a topic
//! changed by hand is reported as drift (and repaired with --fix).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::io::Write;
use std::process::{Command, Output};

fn leadscore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .args(args)
        .output()
        .expect("run leadscore")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn apply_twice_changes_nothing_the_second_time_and_reports_hand_made_drift() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (a, b) = (format!("it.cli.{id}.a"), format!("it.cli.{id}.b"));
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(
        file,
        "defaults:\n  partitions: 2\n  replication_factor: 3\ntopics:\n  - name: {a}\n    configs:\n      cleanup.policy: compact\n  - name: {b}\n    configs:\n      retention.ms: \"3600000\"\n"
    )
    .unwrap();
    let path = file.path().to_str().unwrap();

    let first = leadscore(&["topics", "apply", "--file", path, "--check"]);
    assert_eq!(
        first.status.code(),
        Some(2),
        "first apply creates: {}",
        text(&first)
    );
    assert!(
        text(&first).contains(&format!("create  {a}")),
        "{}",
        text(&first)
    );
    assert!(
        text(&first).contains("capped at 1"),
        "replication cap is explained: {}",
        text(&first)
    );

    let second = leadscore(&["topics", "apply", "--file", path, "--check"]);
    assert!(second.status.success(), "second apply: {}", text(&second));
    assert!(
        text(&second).contains("nothing to change"),
        "{}",
        text(&second)
    );

    // Change a topic by hand, the way an operator with kafka-configs would.
    let alter = leadscore(&["topics", "set-config", &b, "retention.ms=60000"]);
    assert!(alter.status.success(), "{}", text(&alter));

    let drifted = leadscore(&["topics", "apply", "--file", path, "--check"]);
    assert_eq!(drifted.status.code(), Some(2), "{}", text(&drifted));
    let out = text(&drifted);
    assert!(
        out.contains(&format!(
            "drift   {b}: config retention.ms: declared 3600000, cluster has 60000"
        )),
        "{out}"
    );

    let fixed = leadscore(&["topics", "apply", "--file", path, "--fix"]);
    assert!(fixed.status.success(), "{}", text(&fixed));
    assert!(
        text(&fixed).contains(&format!("fixed   {b}")),
        "{}",
        text(&fixed)
    );
    let clean = leadscore(&["topics", "apply", "--file", path, "--check"]);
    assert!(clean.status.success(), "after --fix: {}", text(&clean));

    let deleted = leadscore(&["topics", "delete", "--yes", &a, &b]);
    assert!(deleted.status.success(), "{}", text(&deleted));
}
