//! Alert routing: reads `leadscore.alerts.v1` and tells people.
//!
//! Info goes to the log (and the dashboard, through the topic); warning to
//! Slack (incoming webhook); critical to Slack, email (SMTP) and PagerDuty
//! (Events API v2, deduplicated by fingerprint, resolved by resolve events).
//! Each receiver has its own queue and worker that retries with exponential
//! backoff; a receiver that is down or slow only fills its own queue, and
//! when that is full its alerts are dropped with an error in the log. The
//! router has its own consumer group, so nothing here can slow the
//! aggregator.

use std::time::Duration;

use apache_avro::types::Value;
use leadscore_config::{AlertingConfig, KafkaConfig};
use leadscore_drift::alerts::Severity;
use leadscore_registry::{Decoder, Registry};
use lettre::AsyncTransport as _;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

/// An alert as read from the topic.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertMessage {
    /// Fingerprint (model/kind/feature).
    pub fingerprint: String,
    /// Firing (else resolved).
    pub firing: bool,
    /// Severity.
    pub severity: Severity,
    /// What was measured.
    pub kind: String,
    /// Feature, if any.
    pub feature: Option<String>,
    /// Measured value.
    pub value: f64,
    /// Threshold crossed.
    pub threshold: f64,
    /// Window start, ms.
    pub window_start_ms: i64,
    /// Window end, ms.
    pub window_end_ms: i64,
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Sentence for people.
    pub message: String,
}

impl AlertMessage {
    /// Reads an `Alert` record.
    pub fn from_value(value: &Value) -> Result<Self, String> {
        let Value::Record(fields) = value else {
            return Err("not a record".into());
        };
        let get = |name: &str| {
            leadscore_schemas::Fields::new(fields)
                .get(name)
                .ok_or_else(|| format!("no field `{name}`"))
        };
        let string = |name: &str| match get(name)? {
            Value::String(s) | Value::Enum(_, s) => Ok(s.clone()),
            other => Err(format!("`{name}` is {other:?}, not a string")),
        };
        let double = |name: &str| match get(name)? {
            Value::Double(d) => Ok(*d),
            other => Err(format!("`{name}` is {other:?}, not a double")),
        };
        let millis = |name: &str| match get(name)? {
            Value::TimestampMillis(t) | Value::Long(t) => Ok(*t),
            other => Err(format!("`{name}` is {other:?}, not a timestamp")),
        };
        let severity = match string("severity")?.as_str() {
            "info" => Severity::Info,
            "warning" => Severity::Warning,
            "critical" => Severity::Critical,
            other => return Err(format!("unknown severity `{other}`")),
        };
        Ok(Self {
            fingerprint: string("fingerprint")?,
            firing: string("status")? == "firing",
            severity,
            kind: string("kind")?,
            feature: match get("feature")? {
                Value::String(s) => Some(s.clone()),
                _ => None,
            },
            value: double("value")?,
            threshold: double("threshold")?,
            window_start_ms: millis("window_start")?,
            window_end_ms: millis("window_end")?,
            model_name: string("model_name")?,
            model_version: string("model_version")?,
            message: string("message")?,
        })
    }

    fn severity_str(&self) -> &'static str {
        match self.severity {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    fn title(&self) -> String {
        let state = if self.firing { "FIRING" } else { "RESOLVED" };
        format!(
            "[{}] [{state}] {}",
            self.severity_str().to_uppercase(),
            self.message
        )
    }

    fn window(&self) -> String {
        let ts = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                .unwrap_or_else(|| ms.to_string())
        };
        format!("{} to {}", ts(self.window_start_ms), ts(self.window_end_ms))
    }
}

/// A place alerts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// Slack incoming webhook.
    Slack,
    /// Email over SMTP.
    Email,
    /// PagerDuty Events API v2.
    PagerDuty,
}

impl Receiver {
    fn as_str(self) -> &'static str {
        match self {
            Receiver::Slack => "slack",
            Receiver::Email => "email",
            Receiver::PagerDuty => "pagerduty",
        }
    }
}

/// Where alerts of a severity go (info only to the log).
pub fn receivers(severity: Severity) -> &'static [Receiver] {
    match severity {
        Severity::Info => &[],
        Severity::Warning => &[Receiver::Slack],
        Severity::Critical => &[Receiver::Slack, Receiver::Email, Receiver::PagerDuty],
    }
}

/// The Slack message.
pub fn slack_body(a: &AlertMessage) -> serde_json::Value {
    serde_json::json!({
        "text": a.title(),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("*{}*", a.title())}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": format!(
                "model {} v{} · {} · window {} · fingerprint `{}`",
                a.model_name, a.model_version, a.kind, a.window(), a.fingerprint
            )}]}
        ]
    })
}

/// The PagerDuty Events API v2 event: trigger or resolve, deduplicated by fingerprint.
pub fn pagerduty_body(a: &AlertMessage, routing_key: &str) -> serde_json::Value {
    if !a.firing {
        return serde_json::json!({
            "routing_key": routing_key,
            "event_action": "resolve",
            "dedup_key": a.fingerprint,
        });
    }
    serde_json::json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": a.fingerprint,
        "payload": {
            "summary": a.title(),
            "source": "leadscore-drift",
            "severity": a.severity_str(),
            "component": a.model_name,
            "group": a.feature.clone().unwrap_or_else(|| "score".into()),
            "class": a.kind,
            "custom_details": {
                "model_version": a.model_version,
                "value": a.value,
                "threshold": a.threshold,
                "window": a.window(),
            }
        }
    })
}

/// The email.
pub fn email(a: &AlertMessage, from: &str, to: &[String]) -> Result<lettre::Message, String> {
    let mut b = lettre::Message::builder()
        .from(
            from.parse()
                .map_err(|e| format!("alerting.email_from `{from}`: {e}"))?,
        )
        .subject(a.title());
    for r in to {
        b = b.to(r
            .parse()
            .map_err(|e| format!("alerting.email_to `{r}`: {e}"))?);
    }
    let body = format!(
        "{}\n\nModel: {} v{}\nCheck: {}\nFeature: {}\nValue: {:.6}\nThreshold: {:.6}\nWindow: {}\nFingerprint: {}\n",
        a.message,
        a.model_name,
        a.model_version,
        a.kind,
        a.feature.as_deref().unwrap_or("-"),
        a.value,
        a.threshold,
        a.window(),
        a.fingerprint
    );
    b.body(body).map_err(|e| format!("building the email: {e}"))
}

struct Sender {
    cfg: AlertingConfig,
    http: reqwest::Client,
    smtp: Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
}

impl Sender {
    async fn once(&self, receiver: Receiver, a: &AlertMessage) -> Result<(), String> {
        let post = |url: &str, body: serde_json::Value| {
            let req = self.http.post(url).json(&body);
            async move {
                let resp = req.send().await.map_err(|e| e.to_string())?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(format!("HTTP {}", resp.status()))
                }
            }
        };
        match receiver {
            Receiver::Slack => match &self.cfg.slack_webhook_url {
                Some(url) => post(url, slack_body(a)).await,
                None => Ok(()),
            },
            Receiver::PagerDuty => match &self.cfg.pagerduty_routing_key {
                Some(key) => post(&self.cfg.pagerduty_url, pagerduty_body(a, key)).await,
                None => Ok(()),
            },
            Receiver::Email => match &self.smtp {
                Some(smtp) => {
                    let m = email(a, &self.cfg.email_from, &self.cfg.email_to)?;
                    smtp.send(m).await.map(|_| ()).map_err(|e| e.to_string())
                }
                None => Ok(()),
            },
        }
    }

    /// Delivers with retries; true when delivered.
    async fn deliver(&self, receiver: Receiver, a: &AlertMessage) -> bool {
        let backoff = leadscore_runtime::backoff::Backoff {
            initial: Duration::from_millis(self.cfg.retry_initial_ms),
            max: Duration::from_secs(60),
        };
        for attempt in 1..=self.cfg.max_attempts {
            let delay = backoff.wait(attempt, None, rand::random::<f64>());
            match self.once(receiver, a).await {
                Ok(()) => {
                    tracing::info!(receiver = receiver.as_str(), fingerprint = %a.fingerprint, attempt, "alert delivered");
                    return true;
                }
                Err(e) if attempt < self.cfg.max_attempts => {
                    tracing::warn!(receiver = receiver.as_str(), fingerprint = %a.fingerprint, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "alert delivery failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    tracing::error!(receiver = receiver.as_str(), fingerprint = %a.fingerprint, attempts = attempt, error = %e, "alert not delivered; giving up (it stays on the alerts topic)");
                }
            }
        }
        false
    }
}

fn smtp(
    cfg: &AlertingConfig,
) -> Result<Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>, String> {
    let Some(host) = &cfg.smtp_host else {
        return Ok(None);
    };
    let mut b = if cfg.smtp_starttls {
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::starttls_relay(host)
            .map_err(|e| format!("alerting.smtp_host `{host}`: {e}"))?
    } else {
        lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(host)
    };
    b = b
        .port(cfg.smtp_port)
        .timeout(Some(Duration::from_millis(cfg.request_timeout_ms)));
    if let (Some(u), Some(p)) = (&cfg.smtp_username, &cfg.smtp_password) {
        b = b.credentials(lettre::transport::smtp::authentication::Credentials::new(
            u.clone(),
            p.clone(),
        ));
    }
    Ok(Some(b.build()))
}

/// Routes alerts from `topic` until `shutdown`. Errors are logged; it never stops the aggregator.
pub async fn run(
    cfg: AlertingConfig,
    kafka: KafkaConfig,
    topic: String,
    registry: Registry,
    shutdown: CancellationToken,
) {
    if let Err(e) = route(cfg, kafka, topic, registry, shutdown).await {
        tracing::error!(error = %e, "alert router stopped; alerts stay on the topic and are routed after a restart");
    }
}

async fn route(
    cfg: AlertingConfig,
    kafka: KafkaConfig,
    topic: String,
    registry: Registry,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.request_timeout_ms))
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let sender = std::sync::Arc::new(Sender {
        smtp: smtp(&cfg)?,
        http,
        cfg: cfg.clone(),
    });
    let enabled: Vec<Receiver> = [
        (Receiver::Slack, cfg.slack_webhook_url.is_some()),
        (Receiver::Email, cfg.smtp_host.is_some()),
        (Receiver::PagerDuty, cfg.pagerduty_routing_key.is_some()),
    ]
    .into_iter()
    .filter_map(|(r, on)| on.then_some(r))
    .collect();
    tracing::info!(receivers = ?enabled.iter().map(|r| r.as_str()).collect::<Vec<_>>(), %topic, "alert router starting");
    let consumer: StreamConsumer = leadscore_kafka::client_config(&kafka)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(|e| format!("alert router consumer: {e}"))?;
    consumer
        .subscribe(&[&topic])
        .map_err(|e| format!("subscribing to {topic}: {e}"))?;
    let decoder = Decoder::new(registry);
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => break,
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "alert router: consumer error (retried)");
                continue;
            }
        };
        if let Some(payload) = msg.payload() {
            let decoded = decoder
                .decode_waiting(payload, |e, attempt| {
                    tracing::warn!(offset = msg.offset(), partition = msg.partition(), attempt, error = %e, "alert router: schema registry unreachable; waiting to read the alert (it is not skipped)");
                    !shutdown.is_cancelled()
                })
                .await;
            match decoded {
                // Stopped while the registry was out: the alert is read again after a restart.
                Err(e) if e.is_retryable() => break,
                Err(e) => {
                    tracing::error!(offset = msg.offset(), partition = msg.partition(), error = %e, "unreadable alert skipped");
                }
                Ok(v) => match AlertMessage::from_value(&v) {
                    Err(e) => {
                        tracing::error!(offset = msg.offset(), partition = msg.partition(), error = %e, "unreadable alert skipped");
                    }
                    Ok(a) => {
                        if a.severity == Severity::Info {
                            tracing::info!(fingerprint = %a.fingerprint, firing = a.firing, "{}", a.message);
                        }
                        // At least once: the offset is stored only after every receiver has
                        // delivered or finally given up (logged with the fingerprint).
                        let sends = enabled
                            .iter()
                            .filter(|r| receivers(a.severity).contains(r))
                            .map(|r| sender.deliver(*r, &a));
                        tokio::select! {
                            _ = futures::future::join_all(sends) => {}
                            // Shutdown mid-delivery: not stored, so delivered again after a restart.
                            () = shutdown.cancelled() => break,
                        }
                    }
                },
            }
        }
        if let Err(e) = consumer.store_offset_from_message(&msg) {
            tracing::warn!(error = %e, "alert router: storing the offset");
        }
    }
    let _ = consumer.commit_consumer_state(CommitMode::Sync);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use leadscore_drift::FeatureDrift;
    use leadscore_drift::alerts::{AlertState, Thresholds, evaluate};

    fn alert(psi: f64, resolve: bool) -> AlertMessage {
        let d = FeatureDrift {
            bins: Vec::new(),
            feature: "industry".into(),
            numeric: false,
            sample_size: 1000,
            psi,
            kl: 0.0,
            js: 0.0,
            ks: None,
            chi2: None,
            new_category_rate: Some(0.0),
            missing_rate: 0.0,
            reference_missing_rate: 0.0,
            missing_p: None,
            judged: true,
            psi_noise: 0.0,
        };
        let mut state = AlertState::default();
        let mut events = state.update(
            "lead-scoring",
            "3",
            (0, 3_600_000),
            evaluate(&[d], None, &Thresholds::default()),
        );
        if resolve {
            events = state.update("lead-scoring", "3", (3_600_000, 7_200_000), Vec::new());
        }
        AlertMessage::from_value(&events[0].to_value(5)).unwrap()
    }

    #[test]
    fn alerts_read_back_from_their_record_and_route_by_severity() {
        let a = alert(0.7, false);
        assert_eq!(a.severity, Severity::Critical);
        assert!(a.firing);
        assert_eq!(a.feature.as_deref(), Some("industry"));
        assert_eq!(
            receivers(a.severity),
            [Receiver::Slack, Receiver::Email, Receiver::PagerDuty]
        );
        assert_eq!(receivers(alert(0.3, false).severity), [Receiver::Slack]);
        assert!(receivers(Severity::Info).is_empty());
    }

    #[test]
    fn pagerduty_events_trigger_and_resolve_by_fingerprint() {
        let fire = pagerduty_body(&alert(0.7, false), "key");
        assert_eq!(fire["event_action"], "trigger");
        assert_eq!(fire["payload"]["severity"], "critical");
        assert_eq!(fire["dedup_key"], "lead-scoring/psi/industry");
        let resolve = pagerduty_body(&alert(0.7, true), "key");
        assert_eq!(resolve["event_action"], "resolve");
        assert_eq!(resolve["dedup_key"], fire["dedup_key"]);
        let slack = slack_body(&alert(0.3, false));
        assert!(
            slack["text"]
                .as_str()
                .unwrap()
                .starts_with("[WARNING] [FIRING]")
        );
        let m = email(
            &alert(0.7, false),
            "drift@example.com",
            &["oncall@example.com".into()],
        )
        .unwrap();
        let text = String::from_utf8(m.formatted()).unwrap();
        assert!(
            text.contains("Fingerprint: lead-scoring/psi/industry"),
            "{text}"
        );
        assert!(email(&alert(0.7, false), "not an address", &[]).is_err());
    }
}
