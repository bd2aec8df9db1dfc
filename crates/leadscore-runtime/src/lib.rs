//! The service runtime every long-running `leadscore` service shares.
//!
//! Owns: [`Liveness`], the one readiness rule (started, not stopped, not stuck: the same
//! batch aborted N times in a row, or no committed progress for a configured time while
//! input waits), and [`serve`], the one `/healthz` `/readyz` `/metrics` server. Services
//! report what happened (`progressed`, `aborted`, `set_backlog`); the rule lives here.
//! [`prom`] is the one writer of the Prometheus text of every `/metrics` page;
//! [`backoff`] the one retry rule of HTTP deliveries (alerts, webhooks).
//!
//! Must not: know about Kafka, models or any one service's metrics.

pub mod backoff;
pub mod prom;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Why a service is not ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// Still starting (restoring, connecting, loading).
    Starting,
    /// Stopped: shutting down, fenced or failed.
    Stopped,
    /// The same batch was aborted this many times in a row.
    Aborting(u32),
    /// No committed progress for this many milliseconds while input waits.
    NoProgress(i64),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Starting => write!(f, "not ready: starting"),
            NotReady::Stopped => write!(f, "not ready: stopped"),
            NotReady::Aborting(n) => {
                write!(
                    f,
                    "not ready: stuck, the same batch aborted {n} times in a row"
                )
            }
            NotReady::NoProgress(ms) => write!(
                f,
                "not ready: stuck, no committed progress for {ms} ms while input waits"
            ),
        }
    }
}

/// What a service's loop reports, and the readiness rule over it.
#[derive(Debug)]
pub struct Liveness {
    started: AtomicBool,
    stopped: AtomicBool,
    aborts: AtomicU32,
    last_progress_ms: AtomicI64,
    backlog: AtomicI64,
    stuck_after_aborts: u32,
    stuck_after_ms: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Default for Liveness {
    /// Stuck after 5 aborts in a row or 60 s without progress while input waits.
    fn default() -> Self {
        Self {
            started: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            aborts: AtomicU32::new(0),
            last_progress_ms: AtomicI64::new(now_ms()),
            backlog: AtomicI64::new(0),
            stuck_after_aborts: 5,
            stuck_after_ms: 60_000,
        }
    }
}

impl Liveness {
    /// A loop is stuck after `stuck_after_aborts` aborts in a row, or after `stuck_after`
    /// without progress while its backlog is above zero.
    pub fn new(stuck_after_aborts: u32, stuck_after: Duration) -> Arc<Self> {
        Arc::new(Self {
            stuck_after_aborts: stuck_after_aborts.max(1),
            stuck_after_ms: stuck_after.as_millis().max(1) as i64,
            ..Self::default()
        })
    }

    /// The loop is running (restored, assigned, models loaded).
    pub fn started(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
        self.started.store(true, Ordering::Relaxed);
    }

    /// The loop has stopped (shutdown, fenced, fatal): never ready again.
    pub fn stopped(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// A transaction committed (or the loop is idle and caught up).
    pub fn progressed(&self) {
        self.aborts.store(0, Ordering::Relaxed);
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// A batch was aborted; returns how many in a row.
    pub fn aborted(&self) -> u32 {
        self.aborts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Records waiting to be processed (consumer lag). The no-progress clock starts when
    /// input begins to wait, so a long idle spell is not taken for a stuck loop.
    pub fn set_backlog(&self, records: i64) {
        let before = self.backlog.swap(records, Ordering::Relaxed);
        if before <= 0 && records > 0 {
            self.last_progress_ms.fetch_max(now_ms(), Ordering::Relaxed);
        }
    }

    /// Ready, or why not, at `now_ms`.
    pub fn readiness_at(&self, now_ms: i64) -> Result<(), NotReady> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(NotReady::Stopped);
        }
        if !self.started.load(Ordering::Relaxed) {
            return Err(NotReady::Starting);
        }
        let aborts = self.aborts.load(Ordering::Relaxed);
        if aborts >= self.stuck_after_aborts {
            return Err(NotReady::Aborting(aborts));
        }
        let idle = now_ms - self.last_progress_ms.load(Ordering::Relaxed);
        if self.backlog.load(Ordering::Relaxed) > 0 && idle >= self.stuck_after_ms {
            return Err(NotReady::NoProgress(idle));
        }
        Ok(())
    }

    /// Ready now, or why not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        self.readiness_at(now_ms())
    }

    /// `leadscore_<service>_ready` and `..._stuck` lines for a Prometheus page.
    pub fn render(&self, service: &str) -> String {
        let mut page = prom::Page::new();
        self.write(&mut page, service);
        page.finish()
    }

    /// Writes `leadscore_<service>_ready` and `..._stuck` to `page`.
    pub fn write(&self, page: &mut prom::Page, service: &str) {
        let state = self.readiness();
        let stuck = matches!(state, Err(NotReady::Aborting(_) | NotReady::NoProgress(_)));
        page.gauge(
            &format!("leadscore_{service}_ready"),
            "Whether the service is ready.",
            u8::from(state.is_ok()),
        )
        .gauge(
            &format!("leadscore_{service}_stuck"),
            "Whether the loop is stuck (aborting or making no progress while input waits).",
            u8::from(stuck),
        );
    }
}

/// What the health server asks a service.
pub trait Status: Send + Sync + 'static {
    /// Ready, or why not.
    fn readiness(&self) -> Result<(), NotReady>;
    /// The Prometheus text of `/metrics`.
    fn metrics(&self) -> String;
}

/// The `/healthz` (alive), `/readyz` (200 or 503 with the reason) and `/metrics` routes
/// of `status`, for a service that serves them beside routes of its own (the lookup's REST).
pub fn routes<S: Clone + Send + Sync + 'static>(status: Arc<dyn Status>) -> axum::Router<S> {
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<Arc<dyn Status>>| async move {
                match s.readiness() {
                    Ok(()) => (StatusCode::OK, "ready".to_string()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why.to_string()),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<Arc<dyn Status>>| async move { s.metrics() }),
        )
        .with_state(status)
}

/// Serves [`routes`] on `listener` until `shutdown`.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    status: Arc<dyn Status>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, routes::<()>(status))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `addr` and serves as [`serve_on`].
pub async fn serve(
    addr: SocketAddr,
    status: Arc<dyn Status>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "health and metrics endpoints listening");
    serve_on(listener, status, shutdown).await
}

/// A [`Status`] from a liveness and a metrics renderer (services whose metrics type does not
/// implement [`Status`] itself).
pub struct Report {
    /// Service name in metric names (`leadscore_<name>_ready`).
    pub name: &'static str,
    /// The readiness rule.
    pub liveness: Arc<Liveness>,
    /// The service's own Prometheus text.
    pub render: Box<dyn Fn() -> String + Send + Sync>,
}

impl Status for Report {
    fn readiness(&self) -> Result<(), NotReady> {
        self.liveness.readiness()
    }

    fn metrics(&self) -> String {
        let mut out = (self.render)();
        out.push_str(&self.liveness.render(self.name));
        out
    }
}

/// How a hosted service ended.
#[derive(Debug)]
pub enum Ended<T> {
    /// The work returned (after shutdown or on its own).
    Finished(T),
    /// Shutdown was asked and the work did not return within the grace.
    GraceExceeded,
}

/// Runs one service: binds `addr` for `/healthz` `/readyz` `/metrics` (a port in use fails
/// here, at start), cancels the token given to `work` on SIGTERM or Ctrl-C, and waits for
/// `work` at most `grace` after that. The health server stops last.
pub async fn host<T, Fut>(
    service: &'static str,
    addr: SocketAddr,
    status: Arc<dyn Status>,
    grace: Duration,
    work: impl FnOnce(CancellationToken) -> Fut,
) -> std::io::Result<Ended<T>>
where
    Fut: std::future::Future<Output = T>,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, service, "health and metrics endpoints listening");
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(serve_on(listener, status, http_stop.clone()));
    let work = work(shutdown.clone());
    tokio::pin!(work);
    let ended = tokio::select! {
        r = &mut work => Ended::Finished(r),
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::error!(service, grace_ms = grace.as_millis() as u64, "did not stop within the shutdown grace; exiting (what was not committed is redone after a restart)");
            Ended::GraceExceeded
        }
    };
    http_stop.cancel();
    let _ = http.await;
    Ok(ended)
}

/// Runs `attempt` (restore from the last committed checkpoint, then work) again after an
/// error that `rewinds` says a restore recovers from (an aborted transaction), with backoff,
/// counting each in `liveness` (so repeated failure reads as a stuck loop); any other
/// error, or one after shutdown was asked, is returned.
pub async fn rewinding<T, E, Fut>(
    service: &'static str,
    liveness: &Liveness,
    shutdown: &CancellationToken,
    rewinds: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    E: std::fmt::Display,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    loop {
        match attempt().await {
            Err(e) if rewinds(&e) && !shutdown.is_cancelled() => {
                let in_a_row = liveness.aborted();
                let wait = Duration::from_millis(100 * (1u64 << in_a_row.min(7)));
                tracing::warn!(service, error = %e, in_a_row, wait_ms = wait.as_millis() as u64, "transaction aborted; restoring the last committed checkpoint and going on");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = shutdown.cancelled() => return Err(e),
                }
            }
            other => return other,
        }
    }
}

/// Cancels `token` on the first SIGTERM or Ctrl-C.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                        let _ = tokio::signal::ctrl_c().await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_then_ready_then_stopped() {
        let l = Liveness::new(3, Duration::from_secs(10));
        assert_eq!(l.readiness(), Err(NotReady::Starting));
        l.started();
        assert_eq!(l.readiness(), Ok(()));
        l.stopped();
        assert_eq!(l.readiness(), Err(NotReady::Stopped));
    }

    #[test]
    fn aborts_in_a_row_make_it_stuck_and_a_commit_clears_it() {
        let l = Liveness::new(3, Duration::from_secs(10));
        l.started();
        assert_eq!((l.aborted(), l.aborted()), (1, 2));
        assert_eq!(l.readiness(), Ok(()));
        assert_eq!(l.aborted(), 3);
        assert_eq!(l.readiness(), Err(NotReady::Aborting(3)));
        l.progressed();
        assert_eq!(l.readiness(), Ok(()));
    }

    #[test]
    fn no_progress_is_stuck_only_while_input_waits() {
        let l = Liveness::new(3, Duration::from_millis(1000));
        l.started();
        let later = now_ms() + 5_000;
        assert_eq!(
            l.readiness_at(later),
            Ok(()),
            "idle with nothing waiting is fine"
        );
        l.last_progress_ms
            .store(now_ms() - 60_000, Ordering::Relaxed);
        l.set_backlog(10);
        assert_eq!(
            l.readiness(),
            Ok(()),
            "the clock starts when input begins to wait"
        );
        assert!(matches!(
            l.readiness_at(later),
            Err(NotReady::NoProgress(ms)) if ms >= 5_000
        ));
        assert!(
            l.render("x").contains("leadscore_x_ready 1"),
            "now is still fine"
        );
    }
}
