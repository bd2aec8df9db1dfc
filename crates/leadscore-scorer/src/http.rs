//! `/healthz` (alive), `/readyz` (started, not stuck) and `/metrics` (Prometheus), served by
//! the shared runtime.

use std::net::SocketAddr;
use std::sync::Arc;

use leadscore_runtime::{NotReady, Status};
use tokio_util::sync::CancellationToken;

use crate::Metrics;

impl Status for Metrics {
    fn readiness(&self) -> Result<(), NotReady> {
        self.liveness().readiness()
    }

    fn metrics(&self) -> String {
        self.render()
    }
}

/// Serves the endpoints until `shutdown` is cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    leadscore_runtime::serve(addr, metrics, shutdown).await
}
