//! The drift aggregator's core, pure: reference profiles from a model's
//! metadata, event-time tumbling windows closed by per-partition
//! watermarks, and per-feature drift statistics for a window.
//!
//! A [`Profile`] turns the `reference` section of a model's `metadata.json`
//! (written by the training job) into bins and expected distributions: each
//! numeric feature's cut points and proportions (bin rule: searchsorted
//! right), each categorical feature's vocabulary and proportions, and both
//! missing rates. A [`Window`] counts scored leads into histograms over those
//! bins; windows of different partitions or instances [`Window::merge`]
//! exactly. [`Windows`] assigns events to tumbling windows by event time and
//! releases a window once every partition's watermark has passed its end
//! plus the allowed lateness; events for released windows are counted late.

use std::collections::BTreeMap;
use std::sync::Arc;

pub mod alerts;
pub mod report;

use leadscore_features::RawValue;
use leadscore_stats::{CategoryBins, Histogram, NumericBins, smooth};
use serde::Deserialize;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metadata's reference section is missing or malformed.
    #[error("model metadata reference: {0}")]
    Reference(String),
    /// Windows of different profiles or feature sets.
    #[error("windows do not merge: {0}")]
    Mismatch(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Deserialize)]
struct NumericRef {
    count: u64,
    edges: Vec<f64>,
    #[serde(default)]
    missing_rate: f64,
    proportions: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct CategoricalRef {
    count: u64,
    #[serde(default)]
    missing_rate: f64,
    proportions: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
struct ReferenceDoc {
    #[serde(default)]
    numeric: BTreeMap<String, NumericRef>,
    #[serde(default)]
    categorical: BTreeMap<String, CategoricalRef>,
    score: Option<NumericRef>,
}

/// How one feature is binned and what the reference looked like.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureBins {
    /// Numeric: `[underflow, inner..., overflow, missing]`.
    Numeric(NumericBins),
    /// Categorical: `[vocabulary..., unseen, missing]`.
    Categorical(CategoryBins),
}

/// One feature of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureProfile {
    /// Feature name (as in the score records' `features` map).
    pub name: String,
    /// Bins.
    pub bins: FeatureBins,
    /// Reference proportions over the bins, smoothed.
    pub expected: Vec<f64>,
    /// Reference share of missing values.
    pub missing_rate: f64,
    /// Reference sample size.
    pub count: u64,
}

impl FeatureProfile {
    fn bins_len(&self) -> usize {
        match &self.bins {
            FeatureBins::Numeric(b) => b.len(),
            FeatureBins::Categorical(b) => b.len(),
        }
    }

    /// The bin of a raw feature value.
    pub fn bin(&self, value: &RawValue) -> usize {
        match (&self.bins, value) {
            (FeatureBins::Numeric(b), RawValue::Long(l)) => b.bin(*l as f64),
            (FeatureBins::Numeric(b), RawValue::Double(d)) => b.bin(*d),
            (FeatureBins::Numeric(b), RawValue::Null | RawValue::String(_)) => b.missing(),
            (FeatureBins::Categorical(b), RawValue::String(s)) => b.bin(Some(s)),
            (FeatureBins::Categorical(b), RawValue::Null) => b.missing(),
            (FeatureBins::Categorical(b), RawValue::Long(l)) => b.bin(Some(&l.to_string())),
            (FeatureBins::Categorical(b), RawValue::Double(d)) => b.bin(Some(&d.to_string())),
        }
    }
}

fn numeric_profile(name: &str, r: &NumericRef) -> Result<FeatureProfile> {
    if r.proportions.len() != r.edges.len() + 1 {
        return Err(Error::Reference(format!(
            "numeric `{name}`: {} proportions for {} edges (want edges + 1)",
            r.proportions.len(),
            r.edges.len()
        )));
    }
    if r.edges.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Reference(format!(
            "numeric `{name}`: edges are not strictly increasing"
        )));
    }
    let bins = NumericBins {
        cuts: r.edges.clone(),
        range: None,
    };
    let present = 1.0 - r.missing_rate;
    let mut weights = vec![0.0];
    weights.extend(r.proportions.iter().map(|p| p * present));
    weights.push(0.0);
    weights.push(r.missing_rate);
    Ok(FeatureProfile {
        name: name.to_string(),
        expected: smooth(&weights),
        bins: FeatureBins::Numeric(bins),
        missing_rate: r.missing_rate,
        count: r.count,
    })
}

fn categorical_profile(name: &str, r: &CategoricalRef) -> FeatureProfile {
    let bins = CategoryBins::new(r.proportions.keys().cloned().collect());
    let present = 1.0 - r.missing_rate;
    let mut weights: Vec<f64> = bins
        .vocabulary
        .iter()
        .map(|c| r.proportions.get(c).copied().unwrap_or(0.0) * present)
        .collect();
    weights.push(0.0);
    weights.push(r.missing_rate);
    FeatureProfile {
        name: name.to_string(),
        expected: smooth(&weights),
        bins: FeatureBins::Categorical(bins),
        missing_rate: r.missing_rate,
        count: r.count,
    }
}

/// The reference of one model version: every feature's bins and expected distribution, and the score's.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Features, sorted by name.
    pub features: Vec<FeatureProfile>,
    /// The score distribution, if the metadata has one.
    pub score: Option<FeatureProfile>,
}

impl Profile {
    /// Reads the `reference` section of a model's `metadata.json`.
    pub fn from_metadata(metadata: &serde_json::Value) -> Result<Self> {
        let reference = metadata
            .get("reference")
            .ok_or_else(|| Error::Reference("no `reference` section".into()))?;
        let doc: ReferenceDoc = serde_json::from_value(reference.clone())
            .map_err(|e| Error::Reference(e.to_string()))?;
        let mut features = Vec::new();
        for (name, r) in &doc.numeric {
            features.push(numeric_profile(name, r)?);
        }
        for (name, r) in &doc.categorical {
            features.push(categorical_profile(name, r));
        }
        features.sort_by(|a, b| a.name.cmp(&b.name));
        let score = doc
            .score
            .as_ref()
            .map(|r| numeric_profile("score", r))
            .transpose()?;
        Ok(Self { features, score })
    }
}

/// Drift of one feature in one window (the `FeatureDrift` record of `WindowReport`).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDrift {
    /// Feature name.
    pub feature: String,
    /// Numeric or categorical.
    pub numeric: bool,
    /// Values counted (missing included).
    pub sample_size: u64,
    /// Population stability index against the reference.
    pub psi: f64,
    /// KL(window || reference), nats.
    pub kl: f64,
    /// Jensen-Shannon distance.
    pub js: f64,
    /// Binned KS statistic and p-value (numeric).
    pub ks: Option<(f64, f64)>,
    /// Chi-square statistic and p-value (categorical).
    pub chi2: Option<(f64, f64)>,
    /// Share of categories the reference never saw (categorical).
    pub new_category_rate: Option<f64>,
    /// Share of missing values in the window.
    pub missing_rate: f64,
    /// Share of missing values in the reference.
    pub reference_missing_rate: f64,
}

/// Counts of one window of one model version.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    profile: Arc<Profile>,
    features: Vec<Histogram>,
    score: Option<Histogram>,
    /// Scored leads counted.
    pub scored: u64,
}

impl Window {
    /// An empty window over `profile`'s bins.
    pub fn new(profile: Arc<Profile>) -> Self {
        let features = profile
            .features
            .iter()
            .map(|f| Histogram::new(f.bins_len()))
            .collect();
        let score = profile.score.as_ref().map(|s| Histogram::new(s.bins_len()));
        Self {
            profile,
            features,
            score,
            scored: 0,
        }
    }

    /// Counts one scored lead: its feature values (by name) and its score.
    pub fn observe(&mut self, features: &BTreeMap<String, RawValue>, score: f64) {
        self.scored += 1;
        for (f, h) in self.profile.features.iter().zip(&mut self.features) {
            let value = features.get(&f.name).unwrap_or(&RawValue::Null);
            h.add(f.bin(value));
        }
        if let (Some(p), Some(h)) = (&self.profile.score, &mut self.score) {
            h.add(p.bin(&RawValue::Double(score)));
        }
    }

    /// Adds another partial window of the same profile.
    pub fn merge(&mut self, other: &Window) -> Result<()> {
        if self.profile != other.profile {
            return Err(Error::Mismatch("different reference profiles".into()));
        }
        for (a, b) in self.features.iter_mut().zip(&other.features) {
            a.merge(b).map_err(|e| Error::Mismatch(e.to_string()))?;
        }
        if let (Some(a), Some(b)) = (&mut self.score, &other.score) {
            a.merge(b).map_err(|e| Error::Mismatch(e.to_string()))?;
        }
        self.scored += other.scored;
        Ok(())
    }

    /// PSI of the score distribution against the reference's.
    pub fn score_psi(&self) -> Option<f64> {
        let (p, h) = (self.profile.score.as_ref()?, self.score.as_ref()?);
        (h.total() > 0).then(|| leadscore_stats::psi(&p.expected, &h.smoothed()))
    }

    /// Every feature's drift statistics.
    pub fn report(&self) -> Vec<FeatureDrift> {
        self.profile
            .features
            .iter()
            .zip(&self.features)
            .map(|(f, h)| {
                let actual = h.smoothed();
                let (numeric, missing, new_category_rate, ks, chi2) = match &f.bins {
                    FeatureBins::Numeric(b) => (
                        true,
                        b.missing(),
                        None,
                        // Over the non-missing bins; the missing rate is reported on its own.
                        leadscore_stats::ks_binned(
                            &f.expected[..b.missing()],
                            f.count,
                            &h.counts[..b.missing()],
                        ),
                        None,
                    ),
                    FeatureBins::Categorical(b) => (
                        false,
                        b.missing(),
                        Some(h.rate(b.unseen())),
                        None,
                        leadscore_stats::chi_square(&h.counts, &f.expected),
                    ),
                };
                FeatureDrift {
                    feature: f.name.clone(),
                    numeric,
                    sample_size: h.total(),
                    psi: leadscore_stats::psi(&f.expected, &actual),
                    kl: leadscore_stats::kl(&actual, &f.expected),
                    js: leadscore_stats::js_distance(&f.expected, &actual),
                    ks,
                    chi2,
                    new_category_rate,
                    missing_rate: h.rate(missing),
                    reference_missing_rate: f.missing_rate,
                }
            })
            .collect()
    }
}

/// Start of the tumbling window of `size_ms` that holds `event_ms`.
pub fn window_start(event_ms: i64, size_ms: i64) -> i64 {
    event_ms.div_euclid(size_ms.max(1)) * size_ms.max(1)
}

/// What happened to an observed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Counted in its window.
    Counted,
    /// Its window was already released: counted as late only.
    Late,
}

/// A released window: model version, start, end and counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed {
    /// Model version the scores came from.
    pub model_version: String,
    /// Window start, ms.
    pub start_ms: i64,
    /// Window end (exclusive), ms.
    pub end_ms: i64,
    /// Events that arrived for this window after a later window had been released.
    pub late_events: u64,
    /// The counts.
    pub window: Window,
}

/// Tumbling event-time windows per model version, closed by per-partition watermarks.
#[derive(Debug)]
pub struct Windows {
    size_ms: i64,
    lateness_ms: i64,
    profiles: BTreeMap<String, Arc<Profile>>,
    open: BTreeMap<(String, i64), Window>,
    watermarks: BTreeMap<i32, i64>,
    released_before: i64,
    late: BTreeMap<(String, i64), u64>,
}

impl Windows {
    /// Windows of `size_ms`, held open `lateness_ms` past their end.
    pub fn new(size_ms: i64, lateness_ms: i64) -> Self {
        Self {
            size_ms: size_ms.max(1),
            lateness_ms: lateness_ms.max(0),
            profiles: BTreeMap::new(),
            open: BTreeMap::new(),
            watermarks: BTreeMap::new(),
            released_before: i64::MIN,
            late: BTreeMap::new(),
        }
    }

    /// Registers the reference of a model version (scores of unknown versions are not counted).
    pub fn add_profile(&mut self, model_version: &str, profile: Arc<Profile>) {
        self.profiles.insert(model_version.to_string(), profile);
    }

    /// Counts one score; `None` when its model version has no profile.
    pub fn observe(
        &mut self,
        partition: i32,
        model_version: &str,
        event_ms: i64,
        features: &BTreeMap<String, RawValue>,
        score: f64,
    ) -> Option<Observed> {
        let w = self.watermarks.entry(partition).or_insert(event_ms);
        *w = (*w).max(event_ms);
        let profile = self.profiles.get(model_version)?.clone();
        let start = window_start(event_ms, self.size_ms);
        if start < self.released_before {
            *self
                .late
                .entry((model_version.to_string(), start))
                .or_default() += 1;
            return Some(Observed::Late);
        }
        self.open
            .entry((model_version.to_string(), start))
            .or_insert_with(|| Window::new(profile))
            .observe(features, score);
        Some(Observed::Counted)
    }

    /// The watermark: the lowest of the partitions' highest event times.
    pub fn watermark(&self) -> Option<i64> {
        self.watermarks.values().copied().min()
    }

    /// Releases every window whose end plus lateness the watermark has passed, oldest first.
    pub fn close_ready(&mut self) -> Vec<Closed> {
        let Some(wm) = self.watermark() else {
            return Vec::new();
        };
        // Windows ending at or before this are complete.
        let horizon = window_start(wm - self.lateness_ms, self.size_ms);
        self.released_before = self.released_before.max(horizon);
        let ready: Vec<(String, i64)> = self
            .open
            .keys()
            .filter(|(_, start)| *start < horizon)
            .cloned()
            .collect();
        ready
            .into_iter()
            .filter_map(|key| {
                let window = self.open.remove(&key)?;
                let late_events = self.late.remove(&key).unwrap_or(0);
                Some(Closed {
                    model_version: key.0,
                    start_ms: key.1,
                    end_ms: key.1 + self.size_ms,
                    late_events,
                    window,
                })
            })
            .collect()
    }

    /// Late events counted for windows already released (reported with the next report).
    pub fn late_after_close(&self) -> u64 {
        self.late.values().sum()
    }
}

#[cfg(test)]
mod tests;
