//! `leadscore crm seed` into the real CRM Postgres and into files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::process::Command;

fn seed(args: &[&str]) -> String {
    let out = leadscore_e2e::succeed(
        Command::new(env!("CARGO_BIN_EXE_leadscore"))
            .args(["crm", "seed"])
            .args(args),
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn seeding_twice_upserts_the_same_rows_into_the_crm() {
    let prefix = format!("it_{}", uuid::Uuid::new_v4().simple());
    seed(&[
        "--count",
        "1200",
        "--batch",
        "500",
        "--id-prefix",
        &prefix,
        "--end",
        "now",
    ]);
    let out = seed(&["--count", "1200", "--id-prefix", &prefix, "--end", "now"]);
    assert!(out.contains("seeded 1200 leads into public.leads"), "{out}");

    let config = leadscore_config::Config::load(None).unwrap();
    let (client, conn) = tokio_postgres::connect(&config.postgres.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let pattern = format!("{prefix}_%");
    let row = client
        .query_one(
            "SELECT count(*), count(email), count(*) FILTER (WHERE status IN ('converted','lost')) \
             FROM public.leads WHERE lead_id LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap();
    let (total, with_email, outcomes): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(total, 1200, "re-seeding updates, never duplicates");
    assert_eq!(with_email, 1200, "the CRM rows carry (synthetic) PII");
    assert!(
        outcomes > 600,
        "most leads of a 180-day window have an outcome: {outcomes}"
    );
    client
        .execute(
            "DELETE FROM public.leads WHERE lead_id LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap();
}

#[test]
fn files_are_deterministic_per_seed_and_carry_no_pii() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    seed(&["--count", "3000", "--seed", "9", "--out", &path("a.csv")]);
    seed(&["--count", "3000", "--seed", "9", "--out", &path("b.csv")]);
    seed(&["--count", "3000", "--seed", "10", "--out", &path("c.csv")]);
    let read = |n: &str| std::fs::read_to_string(path(n)).unwrap();
    assert_eq!(read("a.csv"), read("b.csv"));
    assert_ne!(read("a.csv"), read("c.csv"));
    assert_eq!(read("a.csv").lines().count(), 3001);
    assert!(!read("a.csv").contains('@'), "no email in the file");
}

#[test]
fn a_bad_drift_knob_is_refused_by_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_leadscore"))
        .args([
            "crm",
            "seed",
            "--count",
            "1",
            "--out",
            "/dev/null",
            "--scale",
            "page_views=-2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("page_views=-2") && err.contains("scale must be > 0"),
        "{err}"
    );
}
