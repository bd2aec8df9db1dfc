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
pub mod outcomes;
pub mod report;
pub mod state;

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

/// How long one cycle of a calendar feature is: a window shorter than that holds only part
/// of the cycle, so the feature is judged only over windows at least this long.
pub fn calendar_cycle_ms(derive: &str) -> Option<i64> {
    const HOUR_MS: i64 = 3_600_000;
    match derive {
        "hour_of_day" => Some(24 * HOUR_MS),
        "day_of_week" => Some(7 * 24 * HOUR_MS),
        _ => None,
    }
}

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
    /// Reference proportions over the bins as measured (a bin it never saw is 0).
    pub reference: Vec<f64>,
    /// Reference share of missing values.
    pub missing_rate: f64,
    /// Reference sample size.
    pub count: u64,
    /// For a calendar feature (derived from a timestamp, as the model's `feature_spec` says),
    /// the length of its cycle: it is judged only over windows at least that long.
    pub cycle_ms: Option<i64>,
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
        reference: normalised(&weights),
        bins: FeatureBins::Numeric(bins),
        missing_rate: r.missing_rate,
        count: r.count,
        cycle_ms: None,
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
        reference: normalised(&weights),
        bins: FeatureBins::Categorical(bins),
        missing_rate: r.missing_rate,
        count: r.count,
        cycle_ms: None,
    }
}

/// `weights` as proportions, zeros kept (all zero stays zero).
fn normalised(weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    weights
        .iter()
        .map(|w| {
            if total > 0.0 && w.is_finite() && *w > 0.0 {
                w / total
            } else {
                0.0
            }
        })
        .collect()
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
        // Calendar features, as the training job's feature spec derives them.
        if let Some(spec) = metadata
            .pointer("/feature_spec/features")
            .and_then(|f| f.as_array())
        {
            for f in spec {
                let (Some(name), Some(derive)) = (
                    f.get("name").and_then(|n| n.as_str()),
                    f.get("derive").and_then(|d| d.as_str()),
                ) else {
                    continue;
                };
                if let Some(p) = features.iter_mut().find(|p| p.name == name) {
                    p.cycle_ms = calendar_cycle_ms(derive);
                }
            }
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

impl Profile {
    /// Whether a window of `size_ms` judges `feature` (`None`: the score) for alerts, given
    /// the window sizes reported, base window first: a calendar feature only in the smallest
    /// size that holds its whole cycle (hour of day daily, day of week weekly), since a
    /// shorter window holds one slice of the cycle; the score, which a model with calendar
    /// features makes depend on the hour, in the smallest size that holds the shortest of
    /// their cycles; everything else in the base window.
    pub fn judges(&self, feature: Option<&str>, size_ms: i64, sizes: &[i64]) -> bool {
        let Some(&base) = sizes.first() else {
            return false;
        };
        let cycle = match feature {
            Some(name) => self
                .features
                .iter()
                .find(|f| f.name == name)
                .and_then(|f| f.cycle_ms),
            None => self.features.iter().filter_map(|f| f.cycle_ms).min(),
        };
        match cycle {
            Some(cycle) if cycle > base => {
                sizes.iter().copied().filter(|s| *s >= cycle).min() == Some(size_ms)
            }
            _ => size_ms == base,
        }
    }
}

/// One bin of a feature's distribution: the reference's share and the window's.
#[derive(Debug, Clone, PartialEq)]
pub struct Bin {
    /// What the bin holds (`[10, 25)`, `Retail`, `(missing)`).
    pub label: String,
    /// The reference's share, as measured.
    pub reference: f64,
    /// The window's share.
    pub current: f64,
}

/// Drift of one feature in one window (the `FeatureDrift` record of `WindowReport`).
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDrift {
    /// The reference's and the window's distributions, bin by bin.
    pub bins: Vec<Bin>,
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
    /// Two-sided p-value of the two-proportion test of the window's missing rate against
    /// the reference's (both samples' sizes); `None` when it cannot be computed.
    pub missing_p: Option<f64>,
    /// Whether the window it is reported in judges it (alerts, retraining); see
    /// [`Profile::judges`].
    pub judged: bool,
    /// The PSI expected without any drift from sampling alone, (bins - 1) x (1/n + 1/N):
    /// what the effect size is measured above (not published).
    pub psi_noise: f64,
}

/// The mergeable counts of one window of one model version: what a
/// checkpoint stores and what partial aggregates carry between instances.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    /// Scored leads counted.
    pub scored: u64,
    /// One histogram per profile feature, in profile order.
    pub features: Vec<Histogram>,
    /// The score histogram, if the profile has a score reference.
    pub score: Option<Histogram>,
    /// Event-to-score latency.
    #[serde(default)]
    pub latency: LatencyHistogram,
    /// Shadow pairs per shadow model version.
    #[serde(default)]
    pub shadow: BTreeMap<String, ShadowCounts>,
    /// Leads this version failed on (a candidate that could not score them).
    #[serde(default)]
    pub errors: u64,
}

impl Counts {
    /// Empty counts over `profile`'s bins.
    pub fn new(profile: &Profile) -> Self {
        Self {
            scored: 0,
            features: profile
                .features
                .iter()
                .map(|f| Histogram::new(f.bins_len()))
                .collect(),
            score: profile.score.as_ref().map(|s| Histogram::new(s.bins_len())),
            latency: LatencyHistogram::default(),
            shadow: BTreeMap::new(),
            errors: 0,
        }
    }

    /// Whether these counts have the shape of `profile`'s bins.
    pub fn fits(&self, profile: &Profile) -> bool {
        self.features.len() == profile.features.len()
            && self
                .features
                .iter()
                .zip(&profile.features)
                .all(|(h, f)| h.counts.len() == f.bins_len())
            && match (&self.score, &profile.score) {
                (Some(h), Some(s)) => h.counts.len() == s.bins_len(),
                (None, None) => true,
                _ => false,
            }
    }

    /// Counts one scored lead: its feature values (by name) and its score.
    pub fn observe(
        &mut self,
        profile: &Profile,
        features: &BTreeMap<String, RawValue>,
        score: f64,
    ) {
        self.scored += 1;
        for (f, h) in profile.features.iter().zip(&mut self.features) {
            let value = features.get(&f.name).unwrap_or(&RawValue::Null);
            h.add(f.bin(value));
        }
        if let (Some(p), Some(h)) = (&profile.score, &mut self.score) {
            h.add(p.bin(&RawValue::Double(score)));
        }
    }

    /// Counts one shadow/live pair.
    pub fn observe_shadow(
        &mut self,
        shadow_version: &str,
        live: f64,
        shadow: f64,
        same_band: bool,
        same_top_reason: Option<bool>,
    ) {
        let s = self.shadow.entry(shadow_version.to_string()).or_default();
        s.pairs += 1;
        // Fixed point, so merged sums do not depend on the order of addition.
        s.sum_abs_diff_nanos += ((live - shadow).abs() * 1e9).round() as u64;
        s.same_band += u64::from(same_band);
        if let Some(same) = same_top_reason {
            s.reason_pairs += 1;
            s.same_top_reason += u64::from(same);
        }
    }

    /// Adds other counts of the same shape.
    pub fn merge(&mut self, other: &Counts) -> Result<()> {
        if self.features.len() != other.features.len()
            || self.score.is_some() != other.score.is_some()
        {
            return Err(Error::Mismatch("different feature sets".into()));
        }
        for (a, b) in self.features.iter_mut().zip(&other.features) {
            a.merge(b).map_err(|e| Error::Mismatch(e.to_string()))?;
        }
        if let (Some(a), Some(b)) = (&mut self.score, &other.score) {
            a.merge(b).map_err(|e| Error::Mismatch(e.to_string()))?;
        }
        self.scored += other.scored;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
        for (v, s) in &other.shadow {
            let mine = self.shadow.entry(v.clone()).or_default();
            mine.pairs += s.pairs;
            mine.sum_abs_diff_nanos += s.sum_abs_diff_nanos;
            mine.same_band += s.same_band;
            mine.reason_pairs += s.reason_pairs;
            mine.same_top_reason += s.same_top_reason;
        }
        Ok(())
    }
}

/// Shadow/live pairs of one shadow model version.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShadowCounts {
    /// Pairs counted.
    pub pairs: u64,
    /// Sum of |live - shadow|, in units of 1e-9 (exact under merging).
    pub sum_abs_diff_nanos: u64,
    /// Pairs in the same band.
    pub same_band: u64,
    /// Pairs where both sides carried reasons (checkpoints from before reasons have none).
    #[serde(default)]
    pub reason_pairs: u64,
    /// Of those, pairs whose first reason names the same feature.
    #[serde(default)]
    pub same_top_reason: u64,
}

/// Relative width of a latency bucket: values are kept to within 1%.
const LATENCY_GROWTH: f64 = 1.01;
/// Upper bound of the first latency bucket, ms.
const LATENCY_FLOOR_MS: f64 = 0.01;

/// A mergeable latency histogram with log-spaced buckets (1% relative error).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatencyHistogram {
    /// Count per bucket index; bucket `i` holds values up to `0.01 ms * 1.01^i`.
    pub buckets: BTreeMap<u32, u64>,
    /// Values counted.
    pub count: u64,
    /// Largest value, ms.
    pub max_ms: f64,
}

impl LatencyHistogram {
    fn bucket(ms: f64) -> u32 {
        if ms.is_nan() || ms <= LATENCY_FLOOR_MS {
            return 0;
        }
        ((ms / LATENCY_FLOOR_MS).ln() / LATENCY_GROWTH.ln())
            .ceil()
            .min(f64::from(u16::MAX)) as u32
    }

    fn upper(i: u32) -> f64 {
        LATENCY_FLOOR_MS * LATENCY_GROWTH.powi(i as i32)
    }

    /// Counts one latency, ms.
    pub fn add(&mut self, ms: f64) {
        *self.buckets.entry(Self::bucket(ms)).or_default() += 1;
        self.count += 1;
        if ms > self.max_ms {
            self.max_ms = ms;
        }
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (i, n) in &other.buckets {
            *self.buckets.entry(*i).or_default() += n;
        }
        self.count += other.count;
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    /// The `q` quantile (nearest rank), to within 1%; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in &self.buckets {
            seen += n;
            if seen >= rank {
                return Some(Self::upper(*i).min(self.max_ms));
            }
        }
        Some(self.max_ms)
    }

    /// p50, p95, p99 and max.
    pub fn summary(&self) -> Option<report::LatencySummary> {
        Some(report::LatencySummary {
            p50_ms: self.quantile(0.5)?,
            p95_ms: self.quantile(0.95)?,
            p99_ms: self.quantile(0.99)?,
            max_ms: self.max_ms,
        })
    }
}

/// The counts of one window of one model version, with the profile they are binned by.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    profile: Arc<Profile>,
    /// The counts.
    pub counts: Counts,
}

impl Window {
    /// An empty window over `profile`'s bins.
    pub fn new(profile: Arc<Profile>) -> Self {
        let counts = Counts::new(&profile);
        Self { profile, counts }
    }

    /// A window over existing counts (from a checkpoint or a partial aggregate).
    pub fn from_counts(profile: Arc<Profile>, counts: Counts) -> Result<Self> {
        if !counts.fits(&profile) {
            return Err(Error::Mismatch(
                "counts do not have the profile's bins".into(),
            ));
        }
        Ok(Self { profile, counts })
    }

    /// Scored leads counted.
    pub fn scored(&self) -> u64 {
        self.counts.scored
    }

    /// Counts one scored lead: its feature values (by name) and its score.
    pub fn observe(&mut self, features: &BTreeMap<String, RawValue>, score: f64) {
        self.counts.observe(&self.profile, features, score);
    }

    /// Adds another partial window of the same profile.
    pub fn merge(&mut self, other: &Window) -> Result<()> {
        if self.profile != other.profile {
            return Err(Error::Mismatch("different reference profiles".into()));
        }
        self.counts.merge(&other.counts)
    }

    /// PSI of the score distribution against the reference's.
    pub fn score_psi(&self) -> Option<f64> {
        let (p, h) = (self.profile.score.as_ref()?, self.counts.score.as_ref()?);
        (h.total() > 0).then(|| leadscore_stats::psi(&p.expected, &h.smoothed()))
    }

    /// Scores counted into the score distribution.
    pub fn score_sample(&self) -> u64 {
        self.counts.score.as_ref().map_or(0, Histogram::total)
    }

    /// Every feature's drift statistics.
    pub fn report(&self) -> Vec<FeatureDrift> {
        self.profile
            .features
            .iter()
            .zip(&self.counts.features)
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
                        // Both samples' noise counts: the reference is a sample too.
                        leadscore_stats::chi_square_2samp(
                            &f.reference
                                .iter()
                                .map(|p| p * f.count as f64)
                                .collect::<Vec<_>>(),
                            &h.counts,
                        ),
                    ),
                };
                let reference_n = f.count as f64;
                let missing_p = leadscore_stats::two_proportion(
                    f.missing_rate * reference_n,
                    reference_n,
                    h.counts.get(missing).copied().unwrap_or(0) as f64,
                    h.total() as f64,
                )
                .map(|(_, p)| p);
                let labels = match &f.bins {
                    FeatureBins::Numeric(b) => b.labels(),
                    FeatureBins::Categorical(b) => b.labels(),
                };
                let total = h.total().max(1) as f64;
                let bins = labels
                    .into_iter()
                    .zip(&f.reference)
                    .zip(&h.counts)
                    .map(|((label, r), c)| Bin {
                        label,
                        reference: *r,
                        current: *c as f64 / total,
                    })
                    .collect();
                FeatureDrift {
                    bins,
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
                    missing_p,
                    judged: true,
                    psi_noise: if h.total() > 0 && f.count > 0 {
                        let bins = f.reference.iter().filter(|p| **p > 0.0).count();
                        bins.saturating_sub(1) as f64
                            * (1.0 / h.total() as f64 + 1.0 / f.count as f64)
                    } else {
                        0.0
                    },
                }
            })
            .collect()
    }

    /// Shadow agreement of the shadow version with the most pairs.
    pub fn shadow(&self) -> Option<report::ShadowAgreement> {
        let (version, s) = self
            .counts
            .shadow
            .iter()
            .filter(|(_, s)| s.pairs > 0)
            .max_by_key(|(_, s)| s.pairs)?;
        Some(report::ShadowAgreement {
            challenger_version: version.clone(),
            pairs: s.pairs,
            mean_abs_diff: s.sum_abs_diff_nanos as f64 / 1e9 / s.pairs as f64,
            band_agreement: s.same_band as f64 / s.pairs as f64,
            top_reason_agreement: (s.reason_pairs > 0)
                .then(|| s.same_top_reason as f64 / s.reason_pairs as f64),
            reason_pairs: s.reason_pairs,
        })
    }
}

/// Start of the tumbling window of `size_ms` that holds `event_ms`.
pub fn window_start(event_ms: i64, size_ms: i64) -> i64 {
    event_ms.div_euclid(size_ms.max(1)) * size_ms.max(1)
}

#[cfg(test)]
mod tests;
