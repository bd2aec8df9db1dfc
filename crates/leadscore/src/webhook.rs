//! `leadscore webhook`: runs the webhook service with health endpoints and signals;
//! `leadscore webhook ping URL` sends one signed test event.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use leadscore_config::Config;
use leadscore_runtime::{Ended, Liveness};

#[derive(Debug, Args)]
pub(crate) struct WebhookArgs {
    #[command(subcommand)]
    command: Option<WebhookCommand>,
}

impl WebhookArgs {
    /// The service this runs, if it is one (not `ping`).
    pub(crate) fn service(&self) -> Option<&'static str> {
        match self.command {
            None => Some("leadscore-webhook"),
            Some(_) => None,
        }
    }
}

#[derive(Debug, Subcommand)]
enum WebhookCommand {
    /// POST one signed `ping` event to URL and print the answer (checks a receiver's URL,
    /// TLS and signature check before scores flow).
    Ping {
        /// The receiver's URL.
        url: String,
        /// Environment variable holding the signing secret.
        #[arg(long, default_value = "LEADSCORE_WEBHOOK_SECRET")]
        secret_env: String,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 5_000)]
        timeout_ms: u64,
    },
}

pub(crate) async fn run(args: WebhookArgs, config: Config) -> anyhow::Result<ExitCode> {
    if let Some(WebhookCommand::Ping {
        url,
        secret_env,
        timeout_ms,
    }) = args.command
    {
        let secret = std::env::var(&secret_env)
            .ok()
            .filter(|s| !s.is_empty())
            .with_context(|| {
                format!("the environment variable `{secret_env}` (the signing secret) is not set")
            })?;
        let (status, took) =
            leadscore_webhook::ping(&url, secret.as_bytes(), Duration::from_millis(timeout_ms))
                .await
                .map_err(anyhow::Error::msg)?;
        println!(
            "{url}: HTTP {status} in {:.1} ms",
            took.as_secs_f64() * 1000.0
        );
        return Ok(if (200..300).contains(&status) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let cfg = config.webhook.clone();
    leadscore_webhook::secrets(&config)?;
    let liveness = Liveness::new(u32::MAX, Duration::from_secs(300));
    let metrics = Arc::new(leadscore_webhook::metrics::Metrics::new(liveness));
    let addr = cfg.http_listen.parse().context("webhook.http_listen")?;
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    let m = metrics.clone();
    let ended = leadscore_runtime::host(
        "webhook",
        addr,
        metrics.clone(),
        grace,
        |shutdown| async move { leadscore_webhook::run(&config, m, shutdown).await },
    )
    .await
    .context("webhook.http_listen")?;
    match ended {
        Ended::Finished(r) => {
            r.context("webhook service")?;
            Ok(ExitCode::SUCCESS)
        }
        Ended::GraceExceeded => Ok(ExitCode::FAILURE),
    }
}
