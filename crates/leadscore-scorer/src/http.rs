//! What the shared runtime's `/healthz` `/readyz` `/metrics` server asks the scorer.

use leadscore_runtime::{NotReady, Status};

use crate::Metrics;

impl Status for Metrics {
    fn readiness(&self) -> Result<(), NotReady> {
        self.liveness().readiness()
    }

    fn metrics(&self) -> String {
        self.render()
    }
}
