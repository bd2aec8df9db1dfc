//! The models this service scores with: the champion (for on-demand scoring,
//! exactly as the stream does), and what is known of the challenger and canary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use leadscore_crm::Lead;
use leadscore_model::{Band, BandThresholds, Model, ModelHandle};

use crate::Error;

/// One on-demand score.
#[derive(Debug, Clone)]
pub struct OnDemand {
    /// Probability in [0, 1].
    pub score: f64,
    /// Its band.
    pub band: Band,
    /// The model that scored it.
    pub model: Arc<Model>,
    /// The features that moved it most (empty: the model is not explained).
    pub reasons: Vec<leadscore_model::Reason>,
}

/// Models in service.
pub struct Served {
    /// The champion.
    pub champion: Arc<ModelHandle>,
    /// The challenger slot, if configured.
    pub challenger: Option<Arc<ModelHandle>>,
    /// The challenger slot holds the champion as a stand-in (no challenger now).
    pub challenger_stand_in: Arc<AtomicBool>,
    /// The canary share, percent, from lifecycle events (the canary is the challenger's version).
    pub canary_percent: Arc<leadscore_scorer::CanaryPercent>,
    /// Score bands (the scorer's).
    pub bands: BandThresholds,
    /// Reasons per on-demand score (the scorer's `scorer.reasons`).
    pub reasons: usize,
}

impl Served {
    /// Scores `lead` with the champion: the same feature building and ONNX call as the stream.
    pub fn score(&self, lead: &Lead) -> Result<OnDemand, Error> {
        let model = self.champion.get();
        let mut results = model
            .score_batch_with_reasons(std::slice::from_ref(lead), self.reasons)
            .map_err(|e| Error::Model(e.to_string()))?;
        match results.pop() {
            Some(Ok((s, reasons))) => Ok(OnDemand {
                score: s.probability,
                band: self.bands.band(s.probability),
                model,
                reasons: reasons.unwrap_or_default(),
            }),
            Some(Err(invalid)) => Err(Error::Invalid {
                field: invalid.field.to_string(),
                reason: invalid.reason,
            }),
            None => Err(Error::Model("the model returned no score".into())),
        }
    }

    /// The canary share now, percent.
    pub fn canary_percent(&self) -> f64 {
        self.canary_percent.get()
    }

    /// The challenger in shadow, if one is.
    pub fn challenger(&self) -> Option<Arc<Model>> {
        let h = self.challenger.as_ref()?;
        (!self.challenger_stand_in.load(Ordering::Relaxed)).then(|| h.get())
    }
}
