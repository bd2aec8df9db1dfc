//! The container image on the real stack (`make image-test`, after `make image`): the
//! image's scorer, lookup service and drift aggregator run under podman with the host's
//! network, as the image's non-root user on a read-only root file system; the scorer scores
//! a stream exactly once, the lookup service scores on demand behind its token, the drift
//! aggregator is ready, and each stops cleanly on SIGTERM. Ignored unless `LEADSCORE_IMAGE`
//! names the image (the release build and the image take minutes: not in `make test`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::process::Command;
use std::time::Duration;

use leadscore_e2e::scorer::{
    Topics, assert_exactly_once, leads, read_scores, stream, try_http_get, wait_readyz,
};
use leadscore_e2e::{consumer, free_port, unique};

const TOKEN: &str = "it-image-token-0123456789";

fn image() -> String {
    std::env::var("LEADSCORE_IMAGE").expect("LEADSCORE_IMAGE: the image to test (make image-test)")
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman")
        .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .args(args)
        .output()
        .expect("podman (Debian package; deploy/image/build.sh installs it)")
}

/// A container of the image, removed when dropped.
struct Container(String);

impl Container {
    /// `podman run -d` of `leadscore <args>` with the host's network, read-only, env `env`.
    fn run(name: &str, env: &[(&str, String)], args: &[&str]) -> Self {
        let name = unique(name).replace('.', "-");
        let mut a: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--read-only",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1000:1000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (k, v) in env {
            a.push("-e".into());
            a.push(format!("{k}={v}"));
        }
        a.push(image());
        a.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = podman(&refs);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Container(name)
    }

    fn exec(&self, cmd: &[&str]) -> std::process::Output {
        let mut a = vec!["exec", &self.0];
        a.extend(cmd);
        podman(&a)
    }

    /// SIGTERM, then the exit code once it stopped.
    fn stop(&self) -> i32 {
        let out = podman(&["stop", "-t", "30", &self.0]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = podman(&["inspect", "--format", "{{.State.ExitCode}}", &self.0]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    fn logs(&self) -> String {
        let out = podman(&["logs", &self.0]);
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "5", &self.0]);
    }
}

/// As the image's user (10001, not root), on a read-only root file system.
fn assert_locked_down(c: &Container) {
    let id = c.exec(&["id", "-u"]);
    assert_eq!(
        String::from_utf8_lossy(&id.stdout).trim(),
        "10001",
        "runs as the image's user"
    );
    let write = c.exec(&["touch", "/opt/leadscore/written"]);
    assert!(!write.status.success(), "the root file system is read-only");
    assert!(
        String::from_utf8_lossy(&write.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&write.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the image: make image-test"]
async fn the_images_services_run_locked_down_and_score() {
    let t = Topics::create(3).await;
    let group = unique("it-image");

    // The scorer: a stream scored exactly once.
    let port = free_port();
    let scorer = Container::run(
        "it-image-scorer",
        &[
            ("LEADSCORE__SCORER__INPUT_TOPIC", t.input.clone()),
            ("LEADSCORE__SCORER__SCORES_TOPIC", t.scores.clone()),
            ("LEADSCORE__SCORER__SHADOW_TOPIC", t.shadow.clone()),
            ("LEADSCORE__SCORER__DLQ_TOPIC", t.dlq.clone()),
            ("LEADSCORE__SCORER__GROUP_ID", group.clone()),
            ("LEADSCORE__SCORER__INSTANCE_ID", format!("{group}-0")),
            (
                "LEADSCORE__SCORER__HTTP_LISTEN",
                format!("127.0.0.1:{port}"),
            ),
        ],
        &["scorer"],
    );
    if wait_readyz(port, "HTTP/1.1 200", Duration::from_secs(90))
        .await
        .is_none()
    {
        panic!("the image's scorer never became ready: {}", scorer.logs());
    }
    assert_locked_down(&scorer);
    let ls = leads("image", 300, 61);
    stream(t.input.clone(), ls.clone(), 500).await;
    let scores = read_scores(
        &consumer(&t.scores, "read_committed"),
        ls.len(),
        Duration::from_secs(60),
    )
    .await;
    assert_exactly_once(&scores, ls.iter().map(|l| l.lead_id.as_str()));

    // The lookup service: on-demand scoring behind its token.
    let (grpc, rest) = (free_port(), free_port());
    let lookup = Container::run(
        "it-image-lookup",
        &[
            (
                "LEADSCORE__LOOKUP__GRPC_LISTEN",
                format!("127.0.0.1:{grpc}"),
            ),
            (
                "LEADSCORE__LOOKUP__REST_LISTEN",
                format!("127.0.0.1:{rest}"),
            ),
            ("LEADSCORE__LOOKUP__AUTH_TOKENS", format!("[\"{TOKEN}\"]")),
            ("LEADSCORE__LOOKUP__SCORES_TOPIC", t.scores.clone()),
        ],
        &["lookup"],
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while try_http_get(rest, "/readyz")
        .await
        .is_none_or(|r| !r.contains(" 200 "))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lookup never ready: {}",
            lookup.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_locked_down(&lookup);
    let lead = serde_json::json!({"lead_id": "image-1", "company_size": "Medium", "industry": "Technology",
        "page_views": 15, "time_on_site": 300.5, "form_completion_time": 45.2,
        "referral_source": "Google", "created_at": "2024-01-01T00:00:00"});
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{rest}/score-lead");
    let denied = http.post(&url).json(&lead).send().await.unwrap();
    assert_eq!(denied.status().as_u16(), 401);
    let scored: serde_json::Value = http
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&lead)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let score = scored["lead_score"].as_f64().unwrap_or(-1.0);
    assert!((0.0..=1.0).contains(&score), "{scored}");

    // The drift aggregator on the scores.
    let run = leadscore_e2e::drift::Run::create().await;
    let dport = free_port();
    let drift = Container::run(
        "it-image-drift",
        &[
            ("LEADSCORE__DRIFT__SCORES_TOPIC", t.scores.clone()),
            ("LEADSCORE__DRIFT__SHADOW_TOPIC", t.shadow.clone()),
            ("LEADSCORE__DRIFT__METRICS_TOPIC", run.metrics.clone()),
            ("LEADSCORE__DRIFT__ALERTS_TOPIC", run.alerts.clone()),
            ("LEADSCORE__DRIFT__PARTIALS_TOPIC", run.partials.clone()),
            ("LEADSCORE__DRIFT__STATE_TOPIC", run.state.clone()),
            ("LEADSCORE__DRIFT__GROUP_ID", run.group.clone()),
            (
                "LEADSCORE__DRIFT__MODELS",
                "[\"/opt/leadscore/models/default\"]".into(),
            ),
            (
                "LEADSCORE__DRIFT__HTTP_LISTEN",
                format!("127.0.0.1:{dport}"),
            ),
            ("LEADSCORE__ALERTING__ENABLED", "false".into()),
        ],
        &["drift"],
    );
    if wait_readyz(dport, "HTTP/1.1 200", Duration::from_secs(60))
        .await
        .is_none()
    {
        panic!(
            "the image's drift aggregator never became ready: {}",
            drift.logs()
        );
    }
    assert_locked_down(&drift);

    // SIGTERM: each drains and exits 0.
    for (name, c) in [("scorer", &scorer), ("lookup", &lookup), ("drift", &drift)] {
        assert_eq!(c.stop(), 0, "{name} on SIGTERM: {}", c.logs());
    }
    leadscore_e2e::delete_topics(&run.topics()).await;
    t.delete().await;
}
