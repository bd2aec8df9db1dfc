//! Helpers for tests that drive the drift aggregator process through its topics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed step is a failed test

use std::path::Path;
use std::process::{Command, Stdio};

use crate::{Service, create_topic, free_port, unique};

/// One aggregator deployment's own topics and group.
pub struct Run {
    /// Consumer group.
    pub group: String,
    /// Window reports.
    pub metrics: String,
    /// Alerts.
    pub alerts: String,
    /// Partial windows (stage one to stage two).
    pub partials: String,
    /// Checkpoints.
    pub state: String,
}

impl Run {
    /// Creates the run's topics (one partition each), unique to this test.
    pub async fn create() -> Self {
        let base = unique("it.drift.run");
        let r = Run {
            group: base.clone(),
            metrics: format!("{base}.metrics"),
            alerts: format!("{base}.alerts"),
            partials: format!("{base}.partials"),
            state: format!("{base}.state"),
        };
        for t in [&r.metrics, &r.alerts, &r.partials, &r.state] {
            create_topic(t, 1).await;
        }
        r
    }

    /// The run's topics, to delete them.
    pub fn topics(&self) -> [&str; 4] {
        [&self.metrics, &self.alerts, &self.partials, &self.state]
    }
}

/// Starts `leadscore drift` (binary `exe`) on `scores` and `shadow` with the bundled model,
/// short checkpoints, a 2 s idle flush, 60 s of lateness and alert routing off; `extra`
/// variables go last. Returns the process and its HTTP port.
pub fn start(
    exe: &str,
    scores: &str,
    shadow: &str,
    run: &Run,
    instance: &str,
    extra: &[(&str, String)],
) -> (Service, u16) {
    let port = free_port();
    let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/default");
    let mut cmd = Command::new(exe);
    cmd.arg("drift")
        .env("LEADSCORE__DRIFT__SCORES_TOPIC", scores)
        .env("LEADSCORE__DRIFT__SHADOW_TOPIC", shadow)
        .env("LEADSCORE__DRIFT__METRICS_TOPIC", &run.metrics)
        .env("LEADSCORE__DRIFT__ALERTS_TOPIC", &run.alerts)
        .env("LEADSCORE__DRIFT__PARTIALS_TOPIC", &run.partials)
        .env("LEADSCORE__DRIFT__STATE_TOPIC", &run.state)
        .env("LEADSCORE__DRIFT__GROUP_ID", &run.group)
        .env("LEADSCORE__DRIFT__INSTANCE_ID", instance)
        .env(
            "LEADSCORE__DRIFT__MODELS",
            format!("[\"{}\"]", models.display()),
        )
        .env("LEADSCORE__DRIFT__CHECKPOINT_MS", "300")
        .env("LEADSCORE__DRIFT__IDLE_MS", "2000")
        .env("LEADSCORE__DRIFT__LATENESS_MS", "60000")
        .env("LEADSCORE__DRIFT__HTTP_LISTEN", format!("127.0.0.1:{port}"))
        .env("LEADSCORE__ALERTING__ENABLED", "false")
        .env("LEADSCORE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    (cmd.spawn().unwrap().into(), port)
}
