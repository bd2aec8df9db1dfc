//! From a window's drift report to alerts: severities from thresholds, a
//! multiple-testing correction, and deduplication with resolve events.
//!
//! [`evaluate`] turns one window's statistics into findings:
//! - PSI above `psi_warning` (default 0.25) is a warning, above
//!   `psi_critical` (0.5) critical; the score distribution's PSI likewise;
//! - KL above `kl_warning` (0.1) is a warning;
//! - KS, chi-square (two-sample: the reference is a sample too) and
//!   missing-rate (two-proportion) p-values are corrected with Holm's
//!   step-down method over every test of the window. A significant test is a
//!   warning only if the feature also moved (PSI at least `effect_psi`, 0.1,
//!   above what sampling alone gives at the window's and the reference's sizes;
//!   for missing values a rise of at least `missing_rate_effect`, 0.05) and
//!   the window has `min_sample` values, so a very large window does not alarm
//!   on a trivial difference and a tiny one not on noise; otherwise it is info;
//! - a missing rate `missing_rate_increase` (0.1) above the reference's is a
//!   warning whatever the test says;
//! - the score's PSI counts only with `min_sample` scores, as features do.
//!
//! [`AlertState`] deduplicates by fingerprint (model, kind, feature): a
//! condition fires once, fires again only when its severity changes, and
//! resolves when a later window no longer shows it.

use std::collections::BTreeMap;

use crate::FeatureDrift;

/// Alert thresholds.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// PSI above this is a warning.
    pub psi_warning: f64,
    /// PSI above this is critical.
    pub psi_critical: f64,
    /// KL divergence above this is a warning.
    pub kl_warning: f64,
    /// Family-wise significance level of the window's KS and chi-square tests.
    pub alpha: f64,
    /// Fewest values in a window for a test to count.
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

impl Default for Thresholds {
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

/// Alert severity (`Severity` in Alert.avsc).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Log and dashboard.
    Info,
    /// Slack.
    Warning,
    /// Slack, email and PagerDuty.
    Critical,
}

/// One condition found in a window.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// `psi`, `kl`, `ks`, `chi2` or `score_psi`.
    pub kind: String,
    /// The feature, if the condition is about one.
    pub feature: Option<String>,
    /// The measured value (a p-value for tests).
    pub value: f64,
    /// The threshold it crossed (the corrected level for tests).
    pub threshold: f64,
    /// How bad.
    pub severity: Severity,
}

/// The conditions of one window's report; `score` is the score distribution's PSI and the
/// number of scores it was measured on.
pub fn evaluate(
    report: &[FeatureDrift],
    score: Option<(f64, u64)>,
    t: &Thresholds,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let psi_severity = |psi: f64| {
        if psi > t.psi_critical {
            Some((Severity::Critical, t.psi_critical))
        } else if psi > t.psi_warning {
            Some((Severity::Warning, t.psi_warning))
        } else {
            None
        }
    };
    for d in report {
        if d.sample_size < t.min_sample {
            continue;
        }
        if let Some((severity, threshold)) = psi_severity(d.psi) {
            out.push(Finding {
                kind: "psi".into(),
                feature: Some(d.feature.clone()),
                value: d.psi,
                threshold,
                severity,
            });
        }
        if let Some(rate) = d.new_category_rate
            && rate > t.new_category_rate
        {
            out.push(Finding {
                kind: "new_category".into(),
                feature: Some(d.feature.clone()),
                value: rate,
                threshold: t.new_category_rate,
                severity: Severity::Warning,
            });
        }
        if d.missing_rate - d.reference_missing_rate > t.missing_rate_increase {
            out.push(Finding {
                kind: "missing_rate".into(),
                feature: Some(d.feature.clone()),
                value: d.missing_rate,
                threshold: d.reference_missing_rate + t.missing_rate_increase,
                severity: Severity::Warning,
            });
        }
        if d.kl > t.kl_warning {
            out.push(Finding {
                kind: "kl".into(),
                feature: Some(d.feature.clone()),
                value: d.kl,
                threshold: t.kl_warning,
                severity: Severity::Warning,
            });
        }
    }
    if let Some((psi, n)) = score
        && n >= t.min_sample
        && let Some((severity, threshold)) = psi_severity(psi)
    {
        out.push(Finding {
            kind: "score_psi".into(),
            feature: None,
            value: psi,
            threshold,
            severity,
        });
    }
    // Holm's step-down over every test of the window with enough data.
    let mut tests: Vec<(&FeatureDrift, &'static str, f64)> = report
        .iter()
        .filter(|d| d.sample_size >= t.min_sample)
        .flat_map(|d| {
            [
                d.ks.map(|(_, p)| (d, "ks", p)),
                d.chi2.map(|(_, p)| (d, "chi2", p)),
                // Rises only: fewer missing values than the reference is no alarm.
                d.missing_p
                    .filter(|_| d.missing_rate > d.reference_missing_rate)
                    .map(|p| (d, "missing_rate", p)),
            ]
        })
        .flatten()
        .collect();
    tests.sort_by(|a, b| a.2.total_cmp(&b.2));
    let m = tests.len();
    for (rank, (d, kind, p)) in tests.into_iter().enumerate() {
        let level = t.alpha / (m - rank) as f64;
        if p >= level {
            break;
        }
        // The effect is measured above what sampling alone gives, so a change just under
        // the effect size is not a warning in small windows (noise) and info in large ones.
        let moved = if kind == "missing_rate" {
            d.missing_rate - d.reference_missing_rate >= t.missing_rate_effect
        } else {
            d.psi - d.psi_noise >= t.effect_psi
        };
        let severity = if moved {
            Severity::Warning
        } else {
            Severity::Info
        };
        // The absolute missing-rate rule may have reported it already.
        if kind == "missing_rate"
            && out
                .iter()
                .any(|f| f.kind == kind && f.feature.as_deref() == Some(d.feature.as_str()))
        {
            continue;
        }
        out.push(Finding {
            kind: kind.into(),
            feature: Some(d.feature.clone()),
            value: p,
            threshold: level,
            severity,
        });
    }
    out
}

/// Firing or resolved (`AlertStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The condition holds.
    Firing,
    /// It held and no longer does.
    Resolved,
}

/// An alert to publish (the `Alert` record).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    /// Identity of the condition: model, kind, feature.
    pub fingerprint: String,
    /// Firing or resolved.
    pub status: Status,
    /// Severity (of the firing condition; a resolve repeats the last one).
    pub severity: Severity,
    /// The condition.
    pub finding: Finding,
    /// Model name.
    pub model_name: String,
    /// Model version of the window.
    pub model_version: String,
    /// Window start, ms.
    pub window_start_ms: i64,
    /// Window end, ms.
    pub window_end_ms: i64,
}

/// Fingerprint of a condition: stable across windows and versions of one model.
pub fn fingerprint(model_name: &str, kind: &str, feature: Option<&str>) -> String {
    format!("{model_name}/{kind}/{}", feature.unwrap_or("-"))
}

/// The conditions firing now, per fingerprint.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AlertState {
    firing: BTreeMap<String, Finding>,
}

impl AlertState {
    /// Events for one window of `model_name`: new or changed conditions fire, vanished ones resolve.
    pub fn update(
        &mut self,
        model_name: &str,
        model_version: &str,
        window: (i64, i64),
        findings: Vec<Finding>,
    ) -> Vec<AlertEvent> {
        self.update_scoped(model_name, model_version, window, findings, |_| true)
    }

    /// [`Self::update`] for a window that judged only the features `in_scope` says (by
    /// feature; `None` is the score): a firing condition outside the scope is left as it is,
    /// since this window could not see it.
    pub fn update_scoped(
        &mut self,
        model_name: &str,
        model_version: &str,
        window: (i64, i64),
        findings: Vec<Finding>,
        in_scope: impl Fn(Option<&str>) -> bool,
    ) -> Vec<AlertEvent> {
        let event = |fp: String, status, finding: Finding| AlertEvent {
            fingerprint: fp,
            status,
            severity: finding.severity,
            finding,
            model_name: model_name.to_string(),
            model_version: model_version.to_string(),
            window_start_ms: window.0,
            window_end_ms: window.1,
        };
        let mut out = Vec::new();
        let mut seen: Vec<String> = Vec::new();
        for f in findings {
            let fp = fingerprint(model_name, &f.kind, f.feature.as_deref());
            seen.push(fp.clone());
            let changed = self
                .firing
                .get(&fp)
                .is_none_or(|prev| prev.severity != f.severity);
            self.firing.insert(fp.clone(), f.clone());
            if changed {
                out.push(event(fp, Status::Firing, f));
            }
        }
        let prefix = format!("{model_name}/");
        let gone: Vec<String> = self
            .firing
            .iter()
            .filter(|(fp, f)| {
                fp.starts_with(&prefix) && !seen.contains(fp) && in_scope(f.feature.as_deref())
            })
            .map(|(fp, _)| fp.clone())
            .collect();
        for fp in gone {
            if let Some(f) = self.firing.remove(&fp) {
                out.push(event(fp, Status::Resolved, f));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drift(feature: &str, psi: f64, p: Option<f64>, n: u64) -> FeatureDrift {
        FeatureDrift {
            bins: Vec::new(),
            feature: feature.into(),
            numeric: true,
            sample_size: n,
            psi,
            kl: psi / 4.0,
            js: 0.0,
            ks: p.map(|p| (0.1, p)),
            chi2: None,
            new_category_rate: None,
            missing_rate: 0.0,
            reference_missing_rate: 0.0,
            missing_p: None,
            judged: true,
            psi_noise: 0.0,
        }
    }

    #[test]
    fn psi_thresholds_set_the_severity() {
        let t = Thresholds::default();
        let f = evaluate(
            &[
                drift("a", 0.3, None, 1000),
                drift("b", 0.6, None, 1000),
                drift("c", 0.1, None, 1000),
            ],
            Some((0.7, 10_000)),
            &t,
        );
        let sev = |kind: &str, feat: Option<&str>| {
            f.iter()
                .find(|x| x.kind == kind && x.feature.as_deref() == feat)
                .map(|x| x.severity)
        };
        assert_eq!(sev("psi", Some("a")), Some(Severity::Warning));
        assert_eq!(sev("psi", Some("b")), Some(Severity::Critical));
        assert_eq!(sev("psi", Some("c")), None);
        assert_eq!(sev("score_psi", None), Some(Severity::Critical));
        assert_eq!(
            sev("kl", Some("b")),
            Some(Severity::Warning),
            "KL 0.15 > 0.1"
        );
    }

    #[test]
    fn new_categories_and_missing_values_warn_on_their_feature() {
        let t = Thresholds::default();
        let mut cat = drift("referral_source", 0.01, None, 1000);
        cat.new_category_rate = Some(0.2);
        let mut gaps = drift("time_on_site", 0.01, None, 1000);
        (gaps.reference_missing_rate, gaps.missing_rate) = (0.03, 0.3);
        let mut fine = drift("page_views", 0.01, None, 1000);
        (fine.reference_missing_rate, fine.missing_rate) = (0.03, 0.1);
        let f = evaluate(&[cat, gaps, fine], None, &t);
        let kinds: Vec<(&str, &str)> = f
            .iter()
            .map(|x| (x.kind.as_str(), x.feature.as_deref().unwrap_or("-")))
            .collect();
        assert_eq!(
            kinds,
            [
                ("new_category", "referral_source"),
                ("missing_rate", "time_on_site")
            ]
        );
        assert!(f.iter().all(|x| x.severity == Severity::Warning));
    }

    #[test]
    fn tests_are_corrected_for_multiplicity_and_need_data_and_an_effect() {
        let t = Thresholds::default();
        // Ten tests; 0.01 is below 0.05 but above Holm's first level 0.005.
        let report: Vec<FeatureDrift> = (0..10)
            .map(|i| drift(&format!("f{i}"), 0.0, Some(0.01 + i as f64 * 0.01), 1000))
            .collect();
        assert!(evaluate(&report, None, &t).is_empty());
        // A tiny p-value on a feature that barely moved is info; with an effect, a warning.
        let mut report = report;
        report[0] = drift("f0", 0.01, Some(1e-9), 1000);
        report[1] = drift("f1", 0.2, Some(1e-9), 1000);
        let f = evaluate(&report, None, &t);
        let ks: Vec<(&str, Severity)> = f
            .iter()
            .filter(|x| x.kind == "ks")
            .map(|x| (x.feature.as_deref().unwrap_or(""), x.severity))
            .collect();
        assert_eq!(ks, vec![("f0", Severity::Info), ("f1", Severity::Warning)]);
        // Too few values: nothing at all.
        assert!(evaluate(&[drift("x", 0.9, Some(0.0), 10)], None, &t).is_empty());
    }

    /// A feature whose missing rate went from `reference` (of 44,000) to `window` (of `n`).
    fn gaps(reference: f64, window: f64, n: u64) -> FeatureDrift {
        let mut d = drift("time_on_site", 0.01, None, n);
        (d.reference_missing_rate, d.missing_rate) = (reference, window);
        d.missing_p = leadscore_stats::two_proportion(
            reference * 44_000.0,
            44_000.0,
            (window * n as f64).round(),
            n as f64,
        )
        .map(|(_, p)| p);
        d
    }

    #[test]
    fn a_missing_rate_rise_is_tested_and_warns_only_with_an_effect() {
        let t = Thresholds::default();
        let kinds = |d: FeatureDrift| -> Vec<(String, Severity)> {
            evaluate(&[d], None, &t)
                .into_iter()
                .map(|f| (f.kind, f.severity))
                .collect()
        };
        // 9 points up at 10,000: under the absolute rule (10 points), found by the test.
        assert_eq!(
            kinds(gaps(0.03, 0.12, 10_000)),
            [("missing_rate".to_string(), Severity::Warning)]
        );
        // 1 point up at 1,000,000: significant, but below the effect: info.
        assert_eq!(
            kinds(gaps(0.03, 0.04, 1_000_000)),
            [("missing_rate".to_string(), Severity::Info)]
        );
        // Noise at 1,000 and a drop: nothing.
        assert!(kinds(gaps(0.03, 0.035, 1_000)).is_empty());
        assert!(kinds(gaps(0.03, 0.0, 100_000)).is_empty());
        // Over the absolute rule: one finding, not two.
        assert_eq!(kinds(gaps(0.03, 0.3, 10_000)).len(), 1);
    }

    #[test]
    fn the_effect_is_measured_above_the_sampling_noise() {
        let t = Thresholds::default();
        let severity = |noise: f64| {
            let mut d = drift("industry", 0.105, Some(1e-9), 1000);
            d.psi_noise = noise;
            evaluate(&[d], None, &t)
                .into_iter()
                .find(|f| f.kind == "ks")
                .map(|f| f.severity)
        };
        assert_eq!(severity(0.0), Some(Severity::Warning));
        assert_eq!(severity(0.01), Some(Severity::Info));
    }

    #[test]
    fn the_score_psi_needs_the_minimum_sample() {
        let t = Thresholds::default();
        assert!(evaluate(&[], Some((0.4, 100)), &t).is_empty());
        assert_eq!(evaluate(&[], Some((0.4, 500)), &t).len(), 1);
    }

    #[test]
    fn a_window_resolves_only_the_conditions_it_judged() {
        let t = Thresholds::default();
        let mut state = AlertState::default();
        // A daily window finds hour_of_day drifted.
        let daily = evaluate(&[drift("hour_of_day", 0.4, None, 5000)], None, &t);
        assert_eq!(state.update("m", "1", (0, 10), daily).len(), 1);
        // An hourly window does not judge hour_of_day: the alert stays firing.
        let hourly = evaluate(&[drift("pv", 0.0, None, 1000)], None, &t);
        let e = state.update_scoped("m", "1", (10, 20), hourly, |f| f != Some("hour_of_day"));
        assert!(e.is_empty(), "{e:?}");
        // The next daily window, fine again, resolves it.
        let e = state.update_scoped("m", "1", (20, 30), Vec::new(), |f| f == Some("hour_of_day"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].status, Status::Resolved);
    }

    #[test]
    fn alerts_fire_once_escalate_and_resolve() {
        let t = Thresholds::default();
        let mut state = AlertState::default();
        let w = |psi: f64| evaluate(&[drift("pv", psi, None, 1000)], None, &t);
        let e = state.update("m", "1", (0, 10), w(0.3));
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].status, e[0].severity),
            (Status::Firing, Severity::Warning)
        );
        assert_eq!(e[0].fingerprint, "m/psi/pv");
        assert!(
            state.update("m", "1", (10, 20), w(0.3)).is_empty(),
            "deduplicated"
        );
        let e = state.update("m", "1", (20, 30), w(0.7));
        assert!(
            e.iter()
                .any(|a| a.status == Status::Firing && a.severity == Severity::Critical)
        );
        let e = state.update("m", "1", (30, 40), w(0.0));
        assert!(!e.is_empty() && e.iter().all(|a| a.status == Status::Resolved));
        assert!(state.update("m", "1", (40, 50), w(0.0)).is_empty());
        // Another model's conditions are its own.
        state.update("m", "1", (50, 60), w(0.3));
        assert!(state.update("other", "1", (50, 60), Vec::new()).is_empty());
    }
}
