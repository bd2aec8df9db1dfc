//! Layered configuration shared by every `leadscore` subcommand.
//!
//! Layers, later wins: built-in defaults, then an optional TOML file, then
//! environment variables named `LEADSCORE__SECTION__KEY` (for example
//! `LEADSCORE__KAFKA__BOOTSTRAP_SERVERS`). Unknown keys are rejected so a typo
//! never silently falls back to a default.
//!
//! This crate only reads and validates; it opens no connection and knows
//! nothing of process start-up.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Errors raised while loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A layer could not be read or a value has the wrong type.
    #[error("configuration could not be loaded: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value parsed but is not acceptable.
    #[error("configuration key `{key}` is invalid: {reason}")]
    Invalid {
        /// Dotted key path, e.g. `kafka.bootstrap_servers`.
        key: &'static str,
        /// Why the value was refused and what to set instead.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Root of the configuration tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka cluster connection.
    pub kafka: KafkaConfig,
    /// Confluent-compatible schema registry.
    pub registry: RegistryConfig,
    /// The CRM's PostgreSQL database.
    pub postgres: PostgresConfig,
    /// The scorer service.
    pub scorer: ScorerConfig,
    /// OpenTelemetry export shared by every service.
    pub telemetry: TelemetryConfig,
    /// Kafka Connect, for `leadscore connectors`.
    pub connect: ConnectConfig,
    /// The drift aggregator service.
    pub drift: DriftConfig,
    /// Where alerts go: Slack, email, PagerDuty.
    pub alerting: AlertingConfig,
    /// The retrain trigger.
    pub retrain: RetrainConfig,
    /// The training worker.
    pub training: TrainingConfig,
    /// The lifecycle controller.
    pub lifecycle: LifecycleConfig,
    /// The lookup service (gRPC, the seed's REST contract, Open Inference Protocol).
    pub lookup: LookupConfig,
    /// The webhook service: every score POSTed to the CRM's endpoints.
    pub webhook: WebhookConfig,
    /// The monitoring dashboard.
    pub dashboard: DashboardConfig,
    /// The async runtime every command runs on.
    pub runtime: RuntimeConfig,
}

/// The monitoring dashboard: a page fed from the project's own topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DashboardConfig {
    /// The page, `/api/state`, `/events`, `/healthz`, `/readyz`, `/metrics`.
    pub http_listen: String,
    /// Window and outcome reports.
    pub metrics_topic: String,
    /// Alerts.
    pub alerts_topic: String,
    /// Model lifecycle events.
    pub lifecycle_topic: String,
    /// Live scores (read from the end).
    pub scores_topic: String,
    /// How often the page gets a new snapshot, ms.
    pub push_interval_ms: u64,
    /// The scorers' `/metrics` pages (leads in, dead letters, lag, event-to-score latency),
    /// scraped every push; empty: none.
    pub scrape_urls: Vec<String>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            http_listen: "127.0.0.1:9480".into(),
            metrics_topic: "leadscore.metrics.v1".into(),
            alerts_topic: "leadscore.alerts.v1".into(),
            lifecycle_topic: "leadscore.model.lifecycle.v1".into(),
            scores_topic: "leads.scores.v1".into(),
            push_interval_ms: 2_000,
            scrape_urls: vec!["http://127.0.0.1:9464/metrics".into()],
        }
    }
}

/// The webhook service: follows the live scores and POSTs each one (and each delete) to
/// every configured endpoint, signed, retried, in order per lead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Live scores to deliver (read_committed).
    pub scores_topic: String,
    /// Deliveries given up: JSON with the endpoint, status and attempts, never a secret.
    pub dlq_topic: String,
    /// Consumer group whose committed offsets are this service's progress.
    pub group_id: String,
    /// Partitions this instance delivers (empty: all); instances on disjoint sets scale out.
    pub partitions: Vec<i32>,
    /// Where scores go.
    pub endpoints: Vec<WebhookEndpoint>,
    /// Records taken in but not yet delivered everywhere, at most (backpressure).
    pub max_in_flight: usize,
    /// Committed progress at least this often, ms.
    pub commit_interval_ms: u64,
    /// On SIGTERM: time to finish in-flight deliveries and commit, ms.
    pub shutdown_grace_ms: u64,
    /// `/healthz`, `/readyz`, `/metrics`.
    pub http_listen: String,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            scores_topic: "leads.scores.v1".into(),
            dlq_topic: "leads.scores.webhook.dlq.v1".into(),
            group_id: "leadscore-webhook".into(),
            partitions: Vec::new(),
            endpoints: Vec::new(),
            max_in_flight: 20_000,
            commit_interval_ms: 1_000,
            shutdown_grace_ms: 20_000,
            http_listen: "127.0.0.1:9470".into(),
        }
    }
}

/// One receiver of scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookEndpoint {
    /// Name in metrics, logs and dead letters (`[a-z0-9_-]`).
    pub name: String,
    /// `https://...` (`http://` only with `allow_http`).
    pub url: String,
    /// Environment variable holding the signing secret (never the secret itself).
    pub secret_env: String,
    /// Bands delivered (empty: all).
    pub bands: Vec<String>,
    /// Model names delivered (empty: all).
    pub models: Vec<String>,
    /// Deliveries in flight at once; a lead always goes through the same one, in order.
    pub concurrency: usize,
    /// Requests per second at most (0: no limit).
    pub rate_per_sec: f64,
    /// Per-request timeout, ms.
    pub timeout_ms: u64,
    /// First retry wait's upper bound, ms (exponential with jitter).
    pub retry_initial_ms: u64,
    /// Longest wait between attempts, ms (also caps a `Retry-After`).
    pub retry_max_ms: u64,
    /// Give up on a delivery after retrying this long, ms: it goes to the dead-letter topic.
    pub give_up_after_ms: u64,
    /// Allow a plain-HTTP URL (a receiver on the same host or a test).
    pub allow_http: bool,
}

impl Default for WebhookEndpoint {
    fn default() -> Self {
        Self {
            name: String::new(),
            url: String::new(),
            secret_env: String::new(),
            bands: Vec::new(),
            models: Vec::new(),
            concurrency: 8,
            rate_per_sec: 0.0,
            timeout_ms: 5_000,
            retry_initial_ms: 200,
            retry_max_ms: 60_000,
            give_up_after_ms: 6 * 3_600_000,
            allow_http: false,
        }
    }
}

/// The async runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Runtime worker threads; 0: one per CPU available to the process.
    /// Fewer than the CPUs helps when a service shares its cores (one
    /// thread saves cross-core wake-ups on a small machine).
    pub worker_threads: usize,
}

/// The lookup service: score reads, on-demand scoring, model info.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LookupConfig {
    /// gRPC address (leadscore.v1.LeadScores, Open Inference Protocol v2, health, reflection).
    pub grpc_listen: String,
    /// REST address: the seed's contract (`/health`, `/score-lead`, `/model-info`), `/leads/{id}/score`, `/healthz`, `/readyz`, `/metrics`.
    pub rest_listen: String,
    /// Redis score cache; unset reads Postgres only.
    pub redis_url: Option<String>,
    /// Per-call Redis timeout, ms (a slow cache falls back to Postgres).
    pub redis_timeout_ms: u64,
    /// Connections to the CRM database (`postgres.url`).
    pub pool_size: usize,
    /// Per-query Postgres timeout, ms.
    pub db_timeout_ms: u64,
    /// Champion model URL; unset: `scorer.champion_model` (the same model as the stream).
    pub champion_model: Option<String>,
    /// Challenger model URL; unset: `scorer.challenger_model`.
    pub challenger_model: Option<String>,
    /// Re-resolve MLflow aliases this often, s (0 disables); lifecycle events also trigger it.
    pub model_poll_secs: u64,
    /// Lifecycle events (model swaps, canary share); empty disables following them.
    pub lifecycle_topic: String,
    /// Live scores WatchScores follows.
    pub scores_topic: String,
    /// Leads whose latest score the service keeps in memory, kept current by
    /// `scores_topic` and filled by reads; 0 (or no `scores_topic`): none.
    pub memory_entries: usize,
    /// How long a remembered score is answered without a newer one from the stream, ms.
    pub memory_ttl_ms: u64,
    /// Most ids in one BatchGetScores.
    pub max_batch: usize,
    /// Largest request body or message, bytes.
    pub max_request_bytes: usize,
    /// Bearer tokens accepted (give them through the environment), with those of
    /// `auth_tokens_file`. With none, the lookup service and the dashboard refuse to start
    /// unless `allow_unauthenticated` is set.
    pub auth_tokens: Vec<String>,
    /// A file of bearer tokens, one per line (`#` comments).
    pub auth_tokens_file: Option<String>,
    /// Serve every caller when no token is configured (local use only); off by default.
    pub allow_unauthenticated: bool,
    /// PEM certificate chain for gRPC TLS; with `tls_key`.
    pub tls_cert: Option<String>,
    /// PEM private key for gRPC TLS.
    pub tls_key: Option<String>,
    /// PEM CA bundle: when set, gRPC clients must present a certificate it signed (mutual TLS).
    pub tls_client_ca: Option<String>,
    /// Origins allowed by CORS on the REST port (`*` for any); empty sends no CORS headers.
    pub cors_origins: Vec<String>,
    /// On SIGTERM: time to drain in-flight calls and streams, ms.
    pub shutdown_grace_ms: u64,
}

impl Default for LookupConfig {
    fn default() -> Self {
        Self {
            grpc_listen: "127.0.0.1:50051".into(),
            rest_listen: "127.0.0.1:8000".into(),
            redis_url: Some("redis://127.0.0.1:6379".into()),
            redis_timeout_ms: 50,
            pool_size: 4,
            db_timeout_ms: 1_000,
            champion_model: None,
            challenger_model: None,
            model_poll_secs: 30,
            lifecycle_topic: "leadscore.model.lifecycle.v1".into(),
            scores_topic: "leads.scores.v1".into(),
            memory_entries: 200_000,
            memory_ttl_ms: 60_000,
            max_batch: 1_000,
            max_request_bytes: 64 * 1024,
            auth_tokens: Vec::new(),
            auth_tokens_file: None,
            allow_unauthenticated: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            cors_origins: Vec::new(),
            shutdown_grace_ms: 10_000,
        }
    }
}

/// The lifecycle controller: rollout rules, topics, MLflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Lifecycle events, read and written.
    pub lifecycle_topic: String,
    /// Window reports (shadow pairs, scores, latency, outcomes per version).
    pub metrics_topic: String,
    /// Operators' commands (promote, rollback), from `leadscore model`.
    pub commands_topic: String,
    /// Checkpoints (internal, compacted).
    pub state_topic: String,
    /// Consumer group and checkpoint key prefix.
    pub group_id: String,
    /// Transactional id: a second controller with the same id fences the first.
    pub transactional_id: String,
    /// Models under control.
    pub models: Vec<String>,
    /// MLflow tracking server (aliases champion, challenger, canary).
    pub mlflow_url: String,
    /// Least time in shadow, ms (default 24 h).
    pub shadow_min_ms: i64,
    /// Least shadow pairs before the first canary step.
    pub shadow_min_pairs: u64,
    /// Canary steps, percent.
    pub steps: Vec<i32>,
    /// Least time per canary step, ms (default 6 h).
    pub step_min_ms: i64,
    /// Least candidate scores per step.
    pub step_min_scores: u64,
    /// Automatic rollback above this error rate.
    pub max_error_rate: f64,
    /// Automatic rollback when p95 latency is more than this share above the champion's.
    pub max_latency_regression: f64,
    /// Automatic rollback when High-band conversion is more than this share below the champion's.
    pub max_kpi_drop: f64,
    /// Automatic rollback when High-band revenue per lead (won deals' values over labelled
    /// leads) is more than this share below the champion's; 1 or more turns the rule off.
    pub max_revenue_drop: f64,
    /// How often steps are decided, ms.
    pub tick_ms: u64,
    /// After a promotion, open leads are re-scored through this input topic (the scorer's).
    pub rescore_topic: String,
    /// Re-scoring rate, leads per second; 0 disables re-scoring after promotion.
    pub rescore_rate: u32,
    /// Health and metrics endpoints.
    pub http_listen: String,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            lifecycle_topic: "leadscore.model.lifecycle.v1".into(),
            metrics_topic: "leadscore.metrics.v1".into(),
            commands_topic: "leadscore.model.commands.v1".into(),
            state_topic: "leadscore.lifecycle.state.v1".into(),
            group_id: "leadscore-lifecycle".into(),
            transactional_id: "leadscore-lifecycle".into(),
            models: vec!["lead-scoring".into()],
            mlflow_url: "http://127.0.0.1:5000".into(),
            shadow_min_ms: 24 * 3_600_000,
            shadow_min_pairs: 1_000,
            steps: vec![10, 50, 100],
            step_min_ms: 6 * 3_600_000,
            step_min_scores: 500,
            max_error_rate: 0.02,
            max_latency_regression: 0.5,
            max_kpi_drop: 0.1,
            max_revenue_drop: 0.2,
            tick_ms: 5_000,
            rescore_topic: "crm.public.leads".into(),
            rescore_rate: 200,
            http_listen: "127.0.0.1:9468".into(),
        }
    }
}

/// The training worker: runs the training job for each retrain request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Requests to serve.
    pub requests_topic: String,
    /// Where the steps go.
    pub lifecycle_topic: String,
    /// Consumer group: one worker of the group serves a request at a time.
    pub group_id: String,
    /// Transactional id.
    pub transactional_id: String,
    /// Python interpreter with the training requirements.
    pub python: String,
    /// Directory holding the `leadscore_training` package.
    pub dir: String,
    /// Training data: a `postgres://` URL or a CSV path; unset: `postgres.url`.
    pub data: Option<String>,
    /// MLflow tracking server the job registers in.
    pub mlflow_url: String,
    /// Optuna trials.
    pub trials: u32,
    /// Further arguments to the training job (e.g. `["--min-rows", "10000"]`).
    pub extra_args: Vec<String>,
    /// Longest a training run may take, seconds; longer runs are killed and reported failed.
    pub timeout_secs: u64,
    /// Health and metrics endpoints.
    pub http_listen: String,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            requests_topic: "leadscore.retrain.requests.v1".into(),
            lifecycle_topic: "leadscore.model.lifecycle.v1".into(),
            group_id: "leadscore-training".into(),
            transactional_id: "leadscore-training".into(),
            python: "python3".into(),
            dir: "training".into(),
            data: None,
            mlflow_url: "http://127.0.0.1:5000".into(),
            trials: 30,
            extra_args: Vec::new(),
            timeout_secs: 7_200,
            http_listen: "127.0.0.1:9467".into(),
        }
    }
}

/// The retrain trigger: policies, gates, topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrainConfig {
    /// Window reports to watch.
    pub metrics_topic: String,
    /// Alerts to watch (critical PSI alerts ask at once).
    pub alerts_topic: String,
    /// Where requests go (also read: every request, manual ones included, restarts the cooldown).
    pub requests_topic: String,
    /// Checkpoints (internal, compacted).
    pub state_topic: String,
    /// Consumer group and checkpoint key prefix.
    pub group_id: String,
    /// Transactional id; two triggers with the same id fence each other.
    pub transactional_id: String,
    /// Models on the schedule.
    pub models: Vec<String>,
    /// PSI above this for `sustained_windows` consecutive hourly windows asks for a retrain.
    pub psi_sustained: f64,
    /// Consecutive windows for the sustained rule.
    pub sustained_windows: u32,
    /// PSI above this in one window asks at once.
    pub psi_immediate: f64,
    /// Scheduled period while a champion is young, ms (default 7 d).
    pub young_every_ms: i64,
    /// Scheduled period afterwards, ms (default 30 d).
    pub mature_every_ms: i64,
    /// How long a champion is young, ms (default 90 d).
    pub young_for_ms: i64,
    /// No request sooner than this after the last, ms (default 7 d; manual requests ignore it).
    pub cooldown_ms: i64,
    /// Fewest labelled rows in the data window.
    pub min_labelled_rows: u64,
    /// Fewest won deals with a value (`leads.deal_value`) in the data window; 0 needs none.
    pub min_valued_wins: u64,
    /// The data window, months back from the newest lead (as the training job counts).
    pub data_window_months: i32,
    /// How often the schedule is checked, ms.
    pub tick_ms: u64,
    /// Health and metrics endpoints.
    pub http_listen: String,
}

impl Default for RetrainConfig {
    fn default() -> Self {
        Self {
            metrics_topic: "leadscore.metrics.v1".into(),
            alerts_topic: "leadscore.alerts.v1".into(),
            requests_topic: "leadscore.retrain.requests.v1".into(),
            state_topic: "leadscore.retrain.state.v1".into(),
            group_id: "leadscore-retrain".into(),
            transactional_id: "leadscore-retrain".into(),
            models: vec!["lead-scoring".into()],
            psi_sustained: 0.25,
            sustained_windows: 3,
            psi_immediate: 0.5,
            young_every_ms: 7 * 86_400_000,
            mature_every_ms: 30 * 86_400_000,
            young_for_ms: 90 * 86_400_000,
            cooldown_ms: 7 * 86_400_000,
            min_labelled_rows: 10_000,
            min_valued_wins: 0,
            data_window_months: 6,
            tick_ms: 60_000,
            http_listen: "127.0.0.1:9466".into(),
        }
    }
}

/// The drift aggregator: windows, checkpoints, reference models and alert thresholds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftConfig {
    /// Live scores to watch.
    pub scores_topic: String,
    /// Shadow scores (challenger against live).
    pub shadow_topic: String,
    /// Where `WindowReport`s go.
    pub metrics_topic: String,
    /// Where alerts go.
    pub alerts_topic: String,
    /// Partial aggregates from the partition stage to the merger (internal, one partition).
    pub partials_topic: String,
    /// Checkpoints of the window state (internal, compacted).
    pub state_topic: String,
    /// Consumer group (offsets are committed for lag monitoring; positions come from checkpoints).
    pub group_id: String,
    /// This instance's id: part of its transactional id and checkpoint keys.
    pub instance_id: String,
    /// Prefix of the transactional id: `<prefix>-<instance_id>`.
    pub transactional_id_prefix: String,
    /// Input partitions this instance aggregates; unset for all of them.
    pub partitions: Option<Vec<i32>>,
    /// Whether this instance runs the merger (exactly one instance must).
    pub merge: bool,
    /// Window length, ms (default 1 h).
    pub window_ms: i64,
    /// Roll-up window lengths, ms, multiples of `window_ms` (default daily and weekly).
    pub rollups_ms: Vec<i64>,
    /// How long a window stays open after its end, ms of event time.
    pub lateness_ms: i64,
    /// A partition with nothing to read this long (wall clock, ms) stops holding windows back.
    pub idle_ms: u64,
    /// How often state, outputs and offsets are committed together, ms.
    pub checkpoint_ms: u64,
    /// Kafka transaction timeout, ms.
    pub transaction_timeout_ms: u64,
    /// Model URLs whose metadata gives the reference distributions (directory or MLflow).
    pub models: Vec<String>,
    /// MLflow tracking server (`http://host:port`) to fetch the reference of a version seen for the first time.
    pub mlflow_url: Option<String>,
    /// How long after a window is reported its leads' outcomes are summarised
    /// (conversion by band, AUC, from the CRM's `leads` and `lead_scores`), ms; 0 disables.
    pub outcomes_after_ms: i64,
    /// Alert thresholds.
    pub thresholds: DriftThresholds,
    /// Health and metrics endpoints.
    pub http_listen: String,
    /// Longest wait for the last checkpoint at shutdown, ms.
    pub shutdown_grace_ms: u64,
}

impl DriftConfig {
    /// This instance's Kafka transactional id.
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.transactional_id_prefix, self.instance_id)
    }
}

impl Default for DriftConfig {
    fn default() -> Self {
        Self {
            scores_topic: "leads.scores.v1".into(),
            shadow_topic: "leads.scores.shadow.v1".into(),
            metrics_topic: "leadscore.metrics.v1".into(),
            alerts_topic: "leadscore.alerts.v1".into(),
            partials_topic: "leadscore.drift.partials.v1".into(),
            state_topic: "leadscore.drift.state.v1".into(),
            group_id: "leadscore-drift".into(),
            instance_id: "drift-0".into(),
            transactional_id_prefix: "leadscore-drift".into(),
            partitions: None,
            merge: true,
            window_ms: 3_600_000,
            rollups_ms: vec![86_400_000, 604_800_000],
            lateness_ms: 300_000,
            idle_ms: 60_000,
            checkpoint_ms: 5_000,
            transaction_timeout_ms: 60_000,
            models: vec!["models/default".into()],
            mlflow_url: None,
            outcomes_after_ms: 14 * 86_400_000,
            thresholds: DriftThresholds::default(),
            http_listen: "127.0.0.1:9465".into(),
            shutdown_grace_ms: 20_000,
        }
    }
}

/// When a window's statistics raise an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftThresholds {
    /// PSI above this is a warning.
    pub psi_warning: f64,
    /// PSI above this is critical.
    pub psi_critical: f64,
    /// KL divergence above this is a warning.
    pub kl_warning: f64,
    /// Family-wise significance level of a window's KS and chi-square tests (Holm).
    pub alpha: f64,
    /// Fewest values in a window for a feature to be judged.
    pub min_sample: u64,
    /// Least PSI for a significant test to be a warning rather than info.
    pub effect_psi: f64,
    /// Share of never-seen categories above this is a warning.
    pub new_category_rate: f64,
    /// Missing rate this far (absolute) above the reference's is a warning.
    pub missing_rate_increase: f64,
    /// Least rise of the missing rate for a significant missing-rate test to be a warning.
    pub missing_rate_effect: f64,
}

impl Default for DriftThresholds {
    fn default() -> Self {
        Self {
            psi_warning: 0.25,
            psi_critical: 0.5,
            kl_warning: 0.1,
            alpha: 0.01,
            min_sample: 500,
            effect_psi: 0.1,
            new_category_rate: 0.05,
            missing_rate_increase: 0.1,
            missing_rate_effect: 0.05,
        }
    }
}

/// Alert routing: info to the log, warning to Slack, critical to Slack, email and PagerDuty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// Whether the drift service routes alerts (it consumes its alerts topic to do so).
    pub enabled: bool,
    /// Consumer group of the router.
    pub group_id: String,
    /// Slack incoming-webhook URL (a secret: set it through the environment).
    pub slack_webhook_url: Option<String>,
    /// PagerDuty Events API v2 endpoint.
    pub pagerduty_url: String,
    /// PagerDuty routing (integration) key; unset disables PagerDuty.
    pub pagerduty_routing_key: Option<String>,
    /// SMTP server host; unset disables email.
    pub smtp_host: Option<String>,
    /// SMTP port.
    pub smtp_port: u16,
    /// Use STARTTLS.
    pub smtp_starttls: bool,
    /// SMTP user, if the server wants one.
    pub smtp_username: Option<String>,
    /// SMTP password.
    pub smtp_password: Option<String>,
    /// Sender address.
    pub email_from: String,
    /// Recipients.
    pub email_to: Vec<String>,
    /// Delivery attempts per alert and receiver.
    pub max_attempts: u32,
    /// First retry delay, ms (doubles per attempt).
    pub retry_initial_ms: u64,
    /// Per-request timeout, ms.
    pub request_timeout_ms: u64,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            group_id: "leadscore-alert-router".into(),
            slack_webhook_url: None,
            pagerduty_url: "https://events.pagerduty.com/v2/enqueue".into(),
            pagerduty_routing_key: None,
            smtp_host: None,
            smtp_port: 587,
            smtp_starttls: true,
            smtp_username: None,
            smtp_password: None,
            email_from: "leadscore@localhost".into(),
            email_to: Vec::new(),
            max_attempts: 5,
            retry_initial_ms: 500,
            request_timeout_ms: 5_000,
        }
    }
}

/// Kafka Connect's REST API and the connector definitions applied to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectConfig {
    /// Base URL of the Connect REST API.
    pub url: String,
    /// Directory of connector definitions (`<name>.json`: `{"name", "config"}`).
    pub dir: String,
    /// Per-request timeout, in milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            url: "http://localhost:8083".into(),
            dir: "connectors".into(),
            request_timeout_ms: 30_000,
        }
    }
}

/// OpenTelemetry: traces and metrics exported over OTLP (gRPC).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP gRPC endpoint of a collector (e.g. `http://127.0.0.1:4317`); unset disables export.
    pub otlp_endpoint: Option<String>,
    /// How often metrics are pushed over OTLP, in milliseconds.
    pub metrics_interval_ms: u64,
    /// Share of batches traced, 0.0 to 1.0.
    pub trace_sample_ratio: f64,
    /// `service.instance.id` resource attribute; defaults to the host name.
    pub instance: Option<String>,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            metrics_interval_ms: 10_000,
            trace_sample_ratio: 1.0,
            instance: None,
        }
    }
}

/// The scorer: CDC in, scores, shadow scores and dead letters out, exactly once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScorerConfig {
    /// Debezium change events of public.leads.
    pub input_topic: String,
    /// Live scores (compacted, key lead_id).
    pub scores_topic: String,
    /// Challenger and canary-champion scores.
    pub shadow_topic: String,
    /// Inputs that cannot be scored, with the reason in headers.
    pub dlq_topic: String,
    /// Consumer group shared by all scorer replicas.
    pub group_id: String,
    /// This replica's id; with the prefix it forms the transactional id. Unique per replica.
    pub instance_id: String,
    /// Prefix of the transactional id (`<prefix>-<instance_id>`).
    pub transactional_id_prefix: String,
    /// Most input records per transaction (and per ONNX call).
    pub max_batch: usize,
    /// How long to wait for more records before scoring a partial batch, in milliseconds: what
    /// a lead waits at low rates (at high rates a batch keeps growing while the previous one
    /// commits, so this does not bound the batch size).
    pub batch_linger_ms: u64,
    /// Kafka transaction timeout, in milliseconds.
    pub transaction_timeout_ms: u64,
    /// Transactional producers a batch is committed through in parallel, each for the input
    /// partitions `p` with `p % lanes == lane` (1..=64). A lead's outputs go to partition
    /// `p % partitions` of each output topic, so a lane's transaction touches only its own.
    pub lanes: u32,
    /// Reasons on every score (0..=20): the features that moved it most, by exact TreeSHAP,
    /// on the score, shadow and CRM records; 0 computes none. Models that are not tree
    /// ensembles score without reasons whatever this says.
    pub reasons: usize,
    /// Champion model URL: a directory, `file://dir` or `mlflow+http://host:port/NAME@champion`.
    pub champion_model: String,
    /// Challenger (shadow) model URL; unset for none.
    pub challenger_model: Option<String>,
    /// Canary candidate model URL; unset for none.
    pub canary_model: Option<String>,
    /// Share of leads (0-100) whose live score comes from the canary, by a stable hash of lead_id.
    pub canary_percent: f64,
    /// Scores at or above this are High.
    pub band_high: f64,
    /// Scores at or above this (and below band_high) are Medium.
    pub band_medium: f64,
    /// On SIGTERM: time to finish the in-flight batch and commit, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Address of /healthz, /readyz and /metrics.
    pub http_listen: String,
    /// Redis for the score cache (`redis://host:port[/db]`); unset disables the cache.
    pub redis_url: Option<String>,
    /// How long a cached score lives, in seconds.
    pub cache_ttl_secs: u64,
    /// Lifecycle events that make the scorer re-resolve its models at once; empty disables.
    pub lifecycle_topic: String,
    /// Fallback: re-resolve MLflow aliases this often, in seconds (0 disables). Directory models never change.
    pub model_poll_secs: u64,
    /// Largest dead-letter payload, bytes: a longer one is cut (its size and SHA-256 stay in
    /// headers), so a dead letter always fits the topic whatever the input.
    pub dlq_max_payload_bytes: usize,
    /// Columns removed from dead letters besides `email`, `phone` and `full_name` (any depth, case-insensitive).
    pub pii_columns: Vec<String>,
    /// The same batch aborted this many times in a row makes the scorer not ready (a stuck loop).
    pub stuck_after_aborts: u32,
    /// No commit for this long while records wait makes the scorer not ready, in milliseconds.
    pub stuck_after_ms: u64,
}

impl ScorerConfig {
    /// This replica's Kafka transactional id: `<transactional_id_prefix>-<instance_id>`.
    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.transactional_id_prefix, self.instance_id)
    }

    /// The transactional id of `lane`: [`Self::transactional_id`] with one lane, else
    /// `<transactional_id_prefix>-<instance_id>-<lane>`.
    pub fn lane_transactional_id(&self, lane: u32) -> String {
        if self.lanes <= 1 {
            self.transactional_id()
        } else {
            format!("{}-{lane}", self.transactional_id())
        }
    }
}

impl Default for ScorerConfig {
    fn default() -> Self {
        Self {
            input_topic: "crm.public.leads".into(),
            scores_topic: "leads.scores.v1".into(),
            shadow_topic: "leads.scores.shadow.v1".into(),
            dlq_topic: "leads.scores.dlq.v1".into(),
            group_id: "leadscore-scorer".into(),
            instance_id: "scorer-0".into(),
            transactional_id_prefix: "leadscore-scorer".into(),
            max_batch: 1000,
            batch_linger_ms: 5,
            lanes: 2,
            reasons: 3,
            transaction_timeout_ms: 60_000,
            champion_model: "models/default".into(),
            challenger_model: None,
            canary_model: None,
            canary_percent: 0.0,
            band_high: 0.5,
            band_medium: 0.25,
            shutdown_grace_ms: 20_000,
            http_listen: "127.0.0.1:9464".into(),
            redis_url: Some("redis://127.0.0.1:6379".into()),
            cache_ttl_secs: 7 * 86_400,
            lifecycle_topic: "leadscore.model.lifecycle.v1".into(),
            model_poll_secs: 30,
            dlq_max_payload_bytes: 64 * 1024,
            pii_columns: Vec::new(),
            stuck_after_aborts: 5,
            stuck_after_ms: 60_000,
        }
    }
}

/// How to reach the CRM database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// `postgres://user:password@host:port/db`; give the password through the environment in production.
    pub url: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://leadscore:leadscore@127.0.0.1:5432/crm".into(),
        }
    }
}

/// How to reach the Kafka cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers.
    pub bootstrap_servers: String,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub security_protocol: String,
    /// SASL mechanism when a SASL protocol is used (e.g. `SCRAM-SHA-512`).
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password; set it through the environment, never in a file in git.
    pub sasl_password: Option<String>,
    /// CA bundle for `SSL` / `SASL_SSL` (PEM file path).
    pub ssl_ca_location: Option<String>,
    /// Client certificate for mutual TLS (PEM file path).
    pub ssl_certificate_location: Option<String>,
    /// Client private key for mutual TLS (PEM file path).
    pub ssl_key_location: Option<String>,
    /// Password of the client key; set it through the environment.
    pub ssl_key_password: Option<String>,
    /// Timeout for admin and metadata requests, in milliseconds.
    pub request_timeout_ms: u64,
    /// librdkafka debug contexts for every client (e.g. `broker,eos,cgrp`), logged at
    /// debug under the `librdkafka` target; unset in production.
    pub debug: Option<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "localhost:9092".into(),
            security_protocol: "PLAINTEXT".into(),
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            request_timeout_ms: 30_000,
            debug: None,
        }
    }
}

/// How to reach the schema registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of the Confluent-compatible API (for Apicurio: `.../apis/ccompat/v7`).
    pub url: String,
    /// Basic-auth user, if the registry requires it.
    pub username: Option<String>,
    /// Basic-auth password; set it through the environment.
    pub password: Option<String>,
    /// Per-request timeout, in milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: "http://localhost:8081/apis/ccompat/v7".into(),
            username: None,
            password: None,
            request_timeout_ms: 10_000,
        }
    }
}

const PROTOCOLS: [&str; 4] = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

impl Config {
    /// Loads defaults, then `file` if given, then `LEADSCORE__*` variables, and validates.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        Self::from_figment(Self::figment(file))
    }

    /// The layered figment, exposed so tests can add layers.
    pub fn figment(file: Option<&Path>) -> Figment {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            figment = figment.merge(Toml::file_exact(path));
        }
        figment.merge(Env::prefixed("LEADSCORE__").split("__").lowercase(true))
    }

    /// Extracts and validates a configuration from a figment.
    pub fn from_figment(figment: Figment) -> Result<Self> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.kafka.bootstrap_servers.trim().is_empty() {
            return Err(Error::Invalid {
                key: "kafka.bootstrap_servers",
                reason: "empty; set it to host:port[,host:port...]".into(),
            });
        }
        if !PROTOCOLS.contains(&self.kafka.security_protocol.as_str()) {
            return Err(Error::Invalid {
                key: "kafka.security_protocol",
                reason: format!(
                    "`{}` is not one of {}",
                    self.kafka.security_protocol,
                    PROTOCOLS.join(", ")
                ),
            });
        }
        if self.kafka.security_protocol.starts_with("SASL") && self.kafka.sasl_mechanism.is_none() {
            return Err(Error::Invalid {
                key: "kafka.sasl_mechanism",
                reason: "required when security_protocol is SASL_*".into(),
            });
        }
        if self.kafka.request_timeout_ms == 0 {
            return Err(Error::Invalid {
                key: "kafka.request_timeout_ms",
                reason: "must be greater than zero".into(),
            });
        }
        let s = &self.scorer;
        if s.max_batch == 0 || s.max_batch > 100_000 {
            return Err(Error::Invalid {
                key: "scorer.max_batch",
                reason: format!("{} is not in 1..=100000", s.max_batch),
            });
        }
        if !(1..=64).contains(&s.lanes) {
            return Err(Error::Invalid {
                key: "scorer.lanes",
                reason: format!("{} is not in 1..=64", s.lanes),
            });
        }
        if s.reasons > 20 {
            return Err(Error::Invalid {
                key: "scorer.reasons",
                reason: format!("{} is not in 0..=20", s.reasons),
            });
        }
        if !(1024..=512 * 1024).contains(&s.dlq_max_payload_bytes) {
            return Err(Error::Invalid {
                key: "scorer.dlq_max_payload_bytes",
                reason: format!(
                    "{} is not in 1024..=524288 (a dead letter must fit the topic's max.message.bytes)",
                    s.dlq_max_payload_bytes
                ),
            });
        }
        if s.stuck_after_aborts == 0 || s.stuck_after_ms == 0 {
            return Err(Error::Invalid {
                key: "scorer.stuck_after_aborts",
                reason: "scorer.stuck_after_aborts and scorer.stuck_after_ms must be at least 1"
                    .into(),
            });
        }
        if !(0.0..=100.0).contains(&s.canary_percent) {
            return Err(Error::Invalid {
                key: "scorer.canary_percent",
                reason: format!("{} is not in 0..=100", s.canary_percent),
            });
        }
        if s.canary_percent > 0.0 && s.canary_model.is_none() {
            return Err(Error::Invalid {
                key: "scorer.canary_model",
                reason: "canary_percent > 0 needs a canary_model".into(),
            });
        }
        if !(0.0 < s.band_medium && s.band_medium < s.band_high && s.band_high < 1.0) {
            return Err(Error::Invalid {
                key: "scorer.band_high",
                reason: format!(
                    "bands need 0 < band_medium ({}) < band_high ({}) < 1",
                    s.band_medium, s.band_high
                ),
            });
        }
        if s.instance_id.is_empty() || s.instance_id.contains(char::is_whitespace) {
            return Err(Error::Invalid {
                key: "scorer.instance_id",
                reason: "must be non-empty without spaces (it is part of the transactional id)"
                    .into(),
            });
        }
        if s.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(Error::Invalid {
                key: "scorer.http_listen",
                reason: format!("`{}` is not host:port", s.http_listen),
            });
        }
        self.validate_drift()?;
        self.validate_lookup()?;
        self.validate_webhook()?;
        if !(self.connect.url.starts_with("http://") || self.connect.url.starts_with("https://")) {
            return Err(Error::Invalid {
                key: "connect.url",
                reason: format!("`{}` is not an http(s) URL", self.connect.url),
            });
        }
        let t = &self.telemetry;
        if let Some(e) = &t.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(Error::Invalid {
                key: "telemetry.otlp_endpoint",
                reason: format!("`{e}` is not an http(s) URL such as http://127.0.0.1:4317"),
            });
        }
        if !(0.0..=1.0).contains(&t.trace_sample_ratio) {
            return Err(Error::Invalid {
                key: "telemetry.trace_sample_ratio",
                reason: format!("{} is not in 0..=1", t.trace_sample_ratio),
            });
        }
        if t.metrics_interval_ms < 100 {
            return Err(Error::Invalid {
                key: "telemetry.metrics_interval_ms",
                reason: format!("{} is below 100 ms", t.metrics_interval_ms),
            });
        }
        if !(self.postgres.url.starts_with("postgres://")
            || self.postgres.url.starts_with("postgresql://"))
        {
            return Err(Error::Invalid {
                key: "postgres.url",
                reason: "must start with postgres:// or postgresql://".into(),
            });
        }
        if !(self.registry.url.starts_with("http://") || self.registry.url.starts_with("https://"))
        {
            return Err(Error::Invalid {
                key: "registry.url",
                reason: format!("`{}` is not an http(s) URL", self.registry.url),
            });
        }
        Ok(())
    }
}

impl Config {
    fn validate_webhook(&self) -> Result<()> {
        let w = &self.webhook;
        let invalid = |key: &'static str, reason: String| Err(Error::Invalid { key, reason });
        if w.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "webhook.http_listen",
                format!("`{}` is not an ip:port address", w.http_listen),
            );
        }
        if w.max_in_flight == 0 {
            return invalid("webhook.max_in_flight", "must be at least 1".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for e in &w.endpoints {
            let bad = |reason: String| {
                invalid(
                    "webhook.endpoints",
                    format!("endpoint `{}`: {reason}", e.name),
                )
            };
            if e.name.is_empty()
                || !e
                    .name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
            {
                return bad("name must be non-empty [a-z0-9_-]".into());
            }
            if !names.insert(e.name.as_str()) {
                return bad("two endpoints have this name".into());
            }
            let https = e.url.starts_with("https://");
            let http = e.url.starts_with("http://");
            if !(https || (http && e.allow_http)) {
                return bad(format!(
                    "url `{}` must be https:// (http:// only with allow_http = true)",
                    e.url
                ));
            }
            if e.secret_env.is_empty() {
                return bad(
                    "secret_env must name the environment variable of the signing secret".into(),
                );
            }
            if e.concurrency == 0 || e.concurrency > 1024 {
                return bad(format!("concurrency {} is not in 1..=1024", e.concurrency));
            }
            if !(e.rate_per_sec >= 0.0 && e.rate_per_sec.is_finite()) {
                return bad(format!("rate_per_sec {} must be 0 or more", e.rate_per_sec));
            }
            if e.timeout_ms == 0 || e.retry_initial_ms == 0 || e.retry_max_ms < e.retry_initial_ms {
                return bad("timeout_ms and retry_initial_ms must be positive, retry_max_ms at least retry_initial_ms".into());
            }
            if let Some(b) = e
                .bands
                .iter()
                .find(|b| !["High", "Medium", "Low"].contains(&b.as_str()))
            {
                return bad(format!("band `{b}` is not High, Medium or Low"));
            }
        }
        Ok(())
    }

    fn validate_lookup(&self) -> Result<()> {
        let l = &self.lookup;
        let invalid = |key: &'static str, reason: String| Err(Error::Invalid { key, reason });
        for (key, addr) in [
            ("lookup.grpc_listen", &l.grpc_listen),
            ("lookup.rest_listen", &l.rest_listen),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return invalid(key, format!("`{addr}` is not an ip:port address"));
            }
        }
        if l.max_batch == 0 || l.pool_size == 0 {
            return invalid(
                "lookup.max_batch",
                "lookup.max_batch and lookup.pool_size must be at least 1".into(),
            );
        }
        if l.tls_cert.is_some() != l.tls_key.is_some() {
            return invalid(
                "lookup.tls_cert",
                "set both lookup.tls_cert and lookup.tls_key, or neither".into(),
            );
        }
        if l.tls_client_ca.is_some() && l.tls_cert.is_none() {
            return invalid(
                "lookup.tls_client_ca",
                "mutual TLS needs the server's own lookup.tls_cert and lookup.tls_key".into(),
            );
        }
        if l.auth_tokens.iter().any(|t| t.trim().len() < 16) {
            return invalid(
                "lookup.auth_tokens",
                "a token is shorter than 16 characters; use long random tokens".into(),
            );
        }
        Ok(())
    }

    fn validate_drift(&self) -> Result<()> {
        let d = &self.drift;
        let invalid = |key: &'static str, reason: String| Err(Error::Invalid { key, reason });
        if d.window_ms < 1000 {
            return invalid(
                "drift.window_ms",
                format!("{} is below 1000 ms", d.window_ms),
            );
        }
        if let Some(r) = d
            .rollups_ms
            .iter()
            .find(|r| **r <= d.window_ms || *r % d.window_ms != 0)
        {
            return invalid(
                "drift.rollups_ms",
                format!(
                    "{r} is not a multiple of drift.window_ms ({}) above it",
                    d.window_ms
                ),
            );
        }
        if d.lateness_ms < 0 {
            return invalid("drift.lateness_ms", "must be >= 0".into());
        }
        if d.outcomes_after_ms < 0 {
            return invalid(
                "drift.outcomes_after_ms",
                "must be >= 0 (0 disables)".into(),
            );
        }
        if d.checkpoint_ms == 0 {
            return invalid("drift.checkpoint_ms", "must be greater than zero".into());
        }
        if d.instance_id.is_empty()
            || d.instance_id.contains(char::is_whitespace)
            || d.instance_id.contains('/')
        {
            return invalid(
                "drift.instance_id",
                "must be non-empty without spaces or `/` (it is part of the transactional id)"
                    .into(),
            );
        }
        if d.models.is_empty() && d.mlflow_url.is_none() {
            return invalid(
                "drift.models",
                "name at least one model URL (or drift.mlflow_url) to take reference distributions from".into(),
            );
        }
        if d.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "drift.http_listen",
                format!("`{}` is not host:port", d.http_listen),
            );
        }
        let t = &d.thresholds;
        if !(0.0 < t.psi_warning && t.psi_warning <= t.psi_critical) {
            return invalid(
                "drift.thresholds.psi_warning",
                format!(
                    "need 0 < psi_warning ({}) <= psi_critical ({})",
                    t.psi_warning, t.psi_critical
                ),
            );
        }
        if !(0.0 < t.alpha && t.alpha < 1.0) {
            return invalid(
                "drift.thresholds.alpha",
                format!("{} is not in (0, 1)", t.alpha),
            );
        }
        let r = &self.retrain;
        if r.sustained_windows == 0 {
            return invalid("retrain.sustained_windows", "must be at least 1".into());
        }
        if !(0.0 < r.psi_sustained && r.psi_sustained <= r.psi_immediate) {
            return invalid(
                "retrain.psi_sustained",
                format!(
                    "need 0 < psi_sustained ({}) <= psi_immediate ({})",
                    r.psi_sustained, r.psi_immediate
                ),
            );
        }
        if r.young_every_ms <= 0
            || r.mature_every_ms <= 0
            || r.cooldown_ms < 0
            || r.young_for_ms < 0
        {
            return invalid(
                "retrain.young_every_ms",
                "schedule periods must be > 0 and cooldown / young_for >= 0".into(),
            );
        }
        if r.data_window_months <= 0 {
            return invalid("retrain.data_window_months", "must be at least 1".into());
        }
        if r.tick_ms == 0 {
            return invalid("retrain.tick_ms", "must be greater than zero".into());
        }
        if r.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "retrain.http_listen",
                format!("`{}` is not host:port", r.http_listen),
            );
        }
        let l = &self.lifecycle;
        if l.steps.is_empty()
            || l.steps.iter().any(|s| !(1..=100).contains(s))
            || l.steps.windows(2).any(|w| w[0] >= w[1])
        {
            return invalid(
                "lifecycle.steps",
                format!("{:?}: need increasing percentages in 1..=100", l.steps),
            );
        }
        if l.tick_ms == 0 {
            return invalid("lifecycle.tick_ms", "must be greater than zero".into());
        }
        if l.http_listen.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "lifecycle.http_listen",
                format!("`{}` is not host:port", l.http_listen),
            );
        }
        if self.training.timeout_secs == 0 {
            return invalid("training.timeout_secs", "must be greater than zero".into());
        }
        if self
            .training
            .http_listen
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return invalid(
                "training.http_listen",
                format!("`{}` is not host:port", self.training.http_listen),
            );
        }
        let a = &self.alerting;
        if a.max_attempts == 0 {
            return invalid("alerting.max_attempts", "must be at least 1".into());
        }
        if a.smtp_host.is_some() && a.email_to.is_empty() {
            return invalid(
                "alerting.email_to",
                "smtp_host is set but there are no recipients".into(),
            );
        }
        Ok(())
    }
}

// figment::Jail fixes the closure's (large) error type.
#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn env_overrides_file_and_defaults() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "leadscore.toml",
                "[kafka]\nbootstrap_servers = \"file:9092\"\nrequest_timeout_ms = 5\n",
            )?;
            jail.set_env("LEADSCORE__KAFKA__BOOTSTRAP_SERVERS", "env:9092");
            let config =
                Config::load(Some(Path::new("leadscore.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.kafka.bootstrap_servers, "env:9092");
            assert_eq!(config.kafka.request_timeout_ms, 5);
            assert_eq!(config.registry, RegistryConfig::default());
            Ok(())
        });
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("bad.toml", "[kafka]\nbootstrap_server = \"x:1\"\n")?;
            let err = Config::load(Some(Path::new("bad.toml")))
                .err()
                .map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains("bootstrap_server"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn sasl_without_mechanism_names_the_key() {
        let mut config = Config::default();
        config.kafka.security_protocol = "SASL_SSL".into();
        let err = config
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("kafka.sasl_mechanism"), "{err}");
    }

    #[test]
    fn unknown_protocol_is_refused() {
        let mut config = Config::default();
        config.kafka.security_protocol = "TLS".into();
        assert!(matches!(
            config.validate(),
            Err(Error::Invalid {
                key: "kafka.security_protocol",
                ..
            })
        ));
    }

    #[test]
    fn otlp_endpoint_must_be_a_url() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("LEADSCORE__TELEMETRY__OTLP_ENDPOINT", "127.0.0.1:4317");
            let err = Config::load(None).err().map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
            jail.set_env(
                "LEADSCORE__TELEMETRY__OTLP_ENDPOINT",
                "http://127.0.0.1:4317",
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                config.telemetry.otlp_endpoint.as_deref(),
                Some("http://127.0.0.1:4317")
            );
            Ok(())
        });
    }
}
