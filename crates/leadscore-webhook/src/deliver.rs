//! One endpoint's deliveries: `concurrency` lanes, a lead always in the same lane and each
//! lane in order (a newer score never overtakes an older one), a shared rate limit, retries
//! by [`leadscore_runtime::backoff`], and the dead-letter topic for what is given up.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leadscore_config::WebhookEndpoint;
use leadscore_runtime::backoff::{self, Backoff, Verdict};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;

use crate::event::{self, Event};
use crate::metrics::Metrics;

/// One record for one endpoint.
#[derive(Debug, Clone)]
pub struct Job {
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
    /// The event.
    pub event: Arc<Event>,
    /// Its body, the same for every endpoint.
    pub body: Arc<[u8]>,
    /// Its idempotency key.
    pub key: Arc<str>,
    /// When the score was committed (the record's timestamp), ms.
    pub committed_ms: i64,
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered {
        /// Attempts made.
        attempts: u32,
    },
    /// Refused (a 4xx other than 408/425/429) or retried past `give_up_after_ms`.
    GivenUp {
        /// The last status, if any answer came.
        status: Option<u16>,
        /// Attempts made.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// Shutdown came first: not done, delivered again after a restart.
    Interrupted,
}

/// A token bucket of `rate` per second shared by an endpoint's lanes (burst one second).
pub struct Limiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Limiter {
    fn new(rate: f64) -> Self {
        Self {
            rate,
            state: Mutex::new((rate.max(1.0), Instant::now())),
        }
    }

    async fn acquire(&self) {
        if self.rate <= 0.0 {
            return;
        }
        loop {
            let wait = {
                let mut s = self.state.lock().await;
                let now = Instant::now();
                let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
                s.0 = (s.0 + refill).min(self.rate.max(1.0));
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - s.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// An endpoint with its lanes running.
pub struct Endpoint {
    /// Configuration.
    pub cfg: WebhookEndpoint,
    lanes: Vec<mpsc::UnboundedSender<Job>>,
}

/// What every lane of every endpoint shares.
#[derive(Clone)]
pub struct Shared {
    /// HTTP client (one connection pool).
    pub http: reqwest::Client,
    /// Dead letters go here.
    pub producer: FutureProducer,
    /// The dead-letter topic.
    pub dlq_topic: String,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Completions: (partition, offset).
    pub done: mpsc::UnboundedSender<(i32, i64)>,
    /// Stops retries and new work.
    pub shutdown: CancellationToken,
}

impl Endpoint {
    /// Starts the lanes of `cfg` signing with `secret`; their handles join on shutdown.
    pub fn start(
        cfg: WebhookEndpoint,
        secret: Vec<u8>,
        shared: &Shared,
        handles: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        let limiter = Arc::new(Limiter::new(cfg.rate_per_sec));
        let secret: Arc<[u8]> = secret.into();
        let mut lanes = Vec::with_capacity(cfg.concurrency);
        for _ in 0..cfg.concurrency {
            let (tx, rx) = mpsc::unbounded_channel();
            lanes.push(tx);
            handles.push(tokio::spawn(lane(
                cfg.clone(),
                secret.clone(),
                limiter.clone(),
                shared.clone(),
                rx,
            )));
        }
        Self { cfg, lanes }
    }

    /// Queues `job` on its lead's lane. False when the lanes have stopped.
    pub fn queue(&self, job: Job) -> bool {
        let mut h = DefaultHasher::new();
        job.event.lead_id().hash(&mut h);
        let lane = (h.finish() % self.lanes.len() as u64) as usize;
        self.lanes[lane].send(job).is_ok()
    }
}

async fn lane(
    cfg: WebhookEndpoint,
    secret: Arc<[u8]>,
    limiter: Arc<Limiter>,
    shared: Shared,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    loop {
        let job = tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return,
            job = rx.recv() => match job {
                Some(job) => job,
                None => return,
            },
        };
        let outcome = deliver(&cfg, &secret, &limiter, &shared, &job).await;
        match &outcome {
            Outcome::Interrupted => return,
            Outcome::Delivered { attempts } => {
                let now = chrono::Utc::now().timestamp_millis();
                shared.metrics.delivered(
                    &cfg.name,
                    *attempts,
                    (now - job.committed_ms).max(0) as f64,
                );
            }
            Outcome::GivenUp {
                status,
                attempts,
                error,
            } => {
                tracing::warn!(endpoint = %cfg.name, lead_id = %job.event.lead_id(), idempotency_key = %job.key, status = ?status, attempts, error = %error, "delivery given up; to the dead-letter topic");
                if !dead_letter(&cfg, &shared, &job, *status, *attempts, error).await {
                    // Shutdown before the dead letter was written: not done, so it is
                    // delivered again after a restart rather than lost.
                    return;
                }
                shared.metrics.given_up(&cfg.name, *attempts);
            }
        }
        if shared.done.send((job.partition, job.offset)).is_err() {
            return;
        }
    }
}

/// Attempts `job` until it is delivered, refused, retried past the give-up time, or
/// shutdown comes.
pub async fn deliver(
    cfg: &WebhookEndpoint,
    secret: &[u8],
    limiter: &Limiter,
    shared: &Shared,
    job: &Job,
) -> Outcome {
    let started = Instant::now();
    let give_up = Duration::from_millis(cfg.give_up_after_ms);
    let policy = Backoff {
        initial: Duration::from_millis(cfg.retry_initial_ms),
        max: Duration::from_millis(cfg.retry_max_ms),
    };
    let mut attempts = 0u32;
    loop {
        tokio::select! {
            biased;
            () = shared.shutdown.cancelled() => return Outcome::Interrupted,
            () = limiter.acquire() => {}
        }
        attempts += 1;
        let (status, retry_after, error) =
            once(shared, &cfg.url, secret, job, cfg.timeout_ms).await;
        shared.metrics.attempt(&cfg.name, status);
        match backoff::verdict(status) {
            Verdict::Done => return Outcome::Delivered { attempts },
            Verdict::Refused => {
                return Outcome::GivenUp {
                    status,
                    attempts,
                    error,
                };
            }
            Verdict::Retry => {
                let wait = policy.wait(attempts, retry_after, rand::random::<f64>());
                if started.elapsed() + wait > give_up {
                    return Outcome::GivenUp {
                        status,
                        attempts,
                        error: format!("still failing after {} ms: {error}", cfg.give_up_after_ms),
                    };
                }
                shared.metrics.retry(&cfg.name);
                tracing::debug!(endpoint = %cfg.name, idempotency_key = %job.key, attempts, status = ?status, wait_ms = wait.as_millis() as u64, error = %error, "delivery failed; retrying");
                tokio::select! {
                    () = shared.shutdown.cancelled() => return Outcome::Interrupted,
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One POST: (status, the Retry-After asked, what went wrong).
async fn once(
    shared: &Shared,
    url: &str,
    secret: &[u8],
    job: &Job,
    timeout_ms: u64,
) -> (Option<u16>, Option<Duration>, String) {
    let timestamp = chrono::Utc::now().timestamp();
    let sent = shared
        .http
        .post(url)
        .timeout(Duration::from_millis(timeout_ms))
        .header("content-type", "application/json")
        .header("user-agent", "leadscore-webhook/1")
        .header("leadscore-idempotency-key", job.key.as_ref())
        .header("leadscore-timestamp", timestamp.to_string())
        .header(
            "leadscore-signature",
            event::signature(secret, timestamp, &job.body),
        )
        .body(job.body.to_vec())
        .send()
        .await;
    match sent {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| backoff::retry_after(v, std::time::SystemTime::now()));
            (Some(status), retry_after, format!("HTTP {status}"))
        }
        // The error names the request but never a header: no secret reaches a log.
        Err(e) if e.is_timeout() => (None, None, format!("timed out after {timeout_ms} ms")),
        Err(e) if e.is_connect() => (None, None, "connection failed".into()),
        Err(e) => (None, None, format!("request failed: {e}")),
    }
}

/// Writes the dead letter of `job` and waits for the broker; false if it could not.
async fn dead_letter(
    cfg: &WebhookEndpoint,
    shared: &Shared,
    job: &Job,
    status: Option<u16>,
    attempts: u32,
    error: &str,
) -> bool {
    let body: serde_json::Value =
        serde_json::from_slice(&job.body).unwrap_or(serde_json::Value::Null);
    let letter = serde_json::json!({
        "endpoint": cfg.name,
        "status": status,
        "attempts": attempts,
        "error": error,
        "lead_id": job.event.lead_id(),
        "idempotency_key": job.key.as_ref(),
        "source": {"partition": job.partition, "offset": job.offset},
        "given_up_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "body": body,
    })
    .to_string();
    let mut wait = Duration::from_secs(1);
    loop {
        let record = FutureRecord::to(&shared.dlq_topic)
            .key(job.event.lead_id())
            .payload(&letter);
        tokio::select! {
            () = shared.shutdown.cancelled() => return false,
            sent = shared.producer.send(record, Duration::from_secs(30)) => match sent {
                Ok(_) => return true,
                Err((e, _)) => {
                    tracing::error!(endpoint = %cfg.name, error = %e, topic = %shared.dlq_topic, retry_in_ms = wait.as_millis() as u64, "dead letter not written; the lane waits and writes it again (the record stays uncommitted)");
                }
            },
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return false,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_limiter_holds_an_endpoint_to_its_rate_after_a_burst() {
        let limiter = Limiter::new(100.0);
        let started = Instant::now();
        for _ in 0..150 {
            limiter.acquire().await;
        }
        // 100 at once (one second's burst), then 50 at 100/s: about half a second.
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(450), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let unlimited = Limiter::new(0.0);
        let started = Instant::now();
        for _ in 0..10_000 {
            unlimited.acquire().await;
        }
        assert!(started.elapsed() < Duration::from_millis(200));
    }
}
