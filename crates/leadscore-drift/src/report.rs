//! The records the drift aggregator publishes: `WindowReport` on
//! `leadscore.metrics.v1` and `Alert` on `leadscore.alerts.v1`, as Avro
//! values of `schemas/WindowReport.avsc` and `schemas/Alert.avsc`.

use std::collections::HashMap;

use apache_avro::types::Value;

use crate::FeatureDrift;
use crate::alerts::{AlertEvent, Severity, Status};

/// Window length class (`WindowKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowKind {
    /// One hour.
    Hourly,
    /// One day.
    Daily,
    /// One week.
    Weekly,
    /// Any other length.
    Custom,
}

impl WindowKind {
    /// The kind of a window of `size_ms`.
    pub fn of(size_ms: i64) -> Self {
        match size_ms {
            3_600_000 => Self::Hourly,
            86_400_000 => Self::Daily,
            604_800_000 => Self::Weekly,
            _ => Self::Custom,
        }
    }

    fn symbol(self) -> (u32, &'static str) {
        match self {
            Self::Hourly => (0, "hourly"),
            Self::Daily => (1, "daily"),
            Self::Weekly => (2, "weekly"),
            Self::Custom => (3, "custom"),
        }
    }
}

/// Challenger against live over the window's shadow scores.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowAgreement {
    /// Challenger version.
    pub challenger_version: String,
    /// Shadow/live pairs.
    pub pairs: u64,
    /// Mean |challenger - live|.
    pub mean_abs_diff: f64,
    /// Share of pairs in the same band.
    pub band_agreement: f64,
    /// Share of the pairs with reasons on both sides whose top reason is the same feature.
    pub top_reason_agreement: Option<f64>,
    /// Pairs with reasons on both sides.
    pub reason_pairs: u64,
}

/// Event-to-score latency of the window's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencySummary {
    /// Median, ms.
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Maximum, ms.
    pub max_ms: f64,
}

/// Outcomes of the window's scored leads, once known.
#[derive(Debug, Clone, PartialEq)]
pub struct OutcomeSummary {
    /// Leads with a known outcome.
    pub labelled: u64,
    /// Conversion rate per band.
    pub conversion_rate_by_band: HashMap<String, f64>,
    /// AUC of the scores against the outcomes.
    pub auc: Option<f64>,
    /// Sum of the won deals' values per band.
    pub revenue_by_band: HashMap<String, f64>,
    /// Revenue per labelled lead, per band.
    pub revenue_per_lead_by_band: HashMap<String, f64>,
}

fn double_map(m: &HashMap<String, f64>) -> apache_avro::types::Value {
    apache_avro::types::Value::Map(
        m.iter()
            .map(|(k, v)| (k.clone(), apache_avro::types::Value::Double(*v)))
            .collect(),
    )
}

/// One report per model version per window.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowReport {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Window length class.
    pub kind: WindowKind,
    /// Start, ms.
    pub start_ms: i64,
    /// End (exclusive), ms.
    pub end_ms: i64,
    /// Scores counted.
    pub scored: u64,
    /// Events that came after their window closed.
    pub late_events: u64,
    /// Records that could not be read.
    pub errors: u64,
    /// Per-feature drift.
    pub features: Vec<FeatureDrift>,
    /// PSI of the score distribution.
    pub score_psi: Option<f64>,
    /// Whether this window judges the score's PSI.
    pub score_judged: bool,
    /// Shadow agreement, with a challenger.
    pub shadow: Option<ShadowAgreement>,
    /// Latency of the window's scores.
    pub latency: Option<LatencySummary>,
    /// Outcomes, once known.
    pub outcomes: Option<OutcomeSummary>,
    /// When the report was made, ms.
    pub emitted_at_ms: i64,
}

fn opt_double(v: Option<f64>) -> Value {
    match v {
        Some(d) => Value::Union(1, Box::new(Value::Double(d))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn opt_record(v: Option<Vec<(String, Value)>>) -> Value {
    match v {
        Some(fields) => Value::Union(1, Box::new(Value::Record(fields))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn feature_value(d: &FeatureDrift) -> Value {
    Value::Record(vec![
        ("feature".into(), Value::String(d.feature.clone())),
        (
            "kind".into(),
            if d.numeric {
                Value::Enum(0, "numeric".into())
            } else {
                Value::Enum(1, "categorical".into())
            },
        ),
        ("sample_size".into(), Value::Long(d.sample_size as i64)),
        ("psi".into(), Value::Double(d.psi)),
        ("kl".into(), Value::Double(d.kl)),
        ("js".into(), Value::Double(d.js)),
        ("ks_statistic".into(), opt_double(d.ks.map(|k| k.0))),
        ("ks_p_value".into(), opt_double(d.ks.map(|k| k.1))),
        ("chi2_statistic".into(), opt_double(d.chi2.map(|c| c.0))),
        ("chi2_p_value".into(), opt_double(d.chi2.map(|c| c.1))),
        ("new_category_rate".into(), opt_double(d.new_category_rate)),
        ("missing_rate".into(), Value::Double(d.missing_rate)),
        (
            "reference_missing_rate".into(),
            Value::Double(d.reference_missing_rate),
        ),
        ("missing_p_value".into(), opt_double(d.missing_p)),
        ("judged".into(), Value::Boolean(d.judged)),
        (
            "bins".into(),
            Value::Array(
                d.bins
                    .iter()
                    .map(|b| {
                        Value::Record(vec![
                            ("label".into(), Value::String(b.label.clone())),
                            ("reference".into(), Value::Double(b.reference)),
                            ("current".into(), Value::Double(b.current)),
                        ])
                    })
                    .collect(),
            ),
        ),
    ])
}

impl WindowReport {
    /// The `WindowReport` Avro value.
    pub fn to_value(&self) -> Value {
        let (kind_index, kind) = self.kind.symbol();
        Value::Record(vec![
            ("model_name".into(), Value::String(self.model_name.clone())),
            (
                "model_version".into(),
                Value::String(self.model_version.clone()),
            ),
            ("window_kind".into(), Value::Enum(kind_index, kind.into())),
            ("window_start".into(), Value::TimestampMillis(self.start_ms)),
            ("window_end".into(), Value::TimestampMillis(self.end_ms)),
            ("scored".into(), Value::Long(self.scored as i64)),
            ("late_events".into(), Value::Long(self.late_events as i64)),
            ("errors".into(), Value::Long(self.errors as i64)),
            (
                "features".into(),
                Value::Array(self.features.iter().map(feature_value).collect()),
            ),
            ("score_psi".into(), opt_double(self.score_psi)),
            ("score_judged".into(), Value::Boolean(self.score_judged)),
            (
                "shadow".into(),
                opt_record(self.shadow.as_ref().map(|s| {
                    vec![
                        (
                            "challenger_version".into(),
                            Value::String(s.challenger_version.clone()),
                        ),
                        ("pairs".into(), Value::Long(s.pairs as i64)),
                        ("mean_abs_diff".into(), Value::Double(s.mean_abs_diff)),
                        ("band_agreement".into(), Value::Double(s.band_agreement)),
                        (
                            "top_reason_agreement".into(),
                            match s.top_reason_agreement {
                                None => Value::Union(0, Box::new(Value::Null)),
                                Some(a) => Value::Union(1, Box::new(Value::Double(a))),
                            },
                        ),
                        ("reason_pairs".into(), Value::Long(s.reason_pairs as i64)),
                    ]
                })),
            ),
            (
                "latency".into(),
                opt_record(self.latency.as_ref().map(|l| {
                    vec![
                        ("p50_ms".into(), Value::Double(l.p50_ms)),
                        ("p95_ms".into(), Value::Double(l.p95_ms)),
                        ("p99_ms".into(), Value::Double(l.p99_ms)),
                        ("max_ms".into(), Value::Double(l.max_ms)),
                    ]
                })),
            ),
            (
                "outcomes".into(),
                opt_record(self.outcomes.as_ref().map(|o| {
                    vec![
                        ("labelled".into(), Value::Long(o.labelled as i64)),
                        (
                            "conversion_rate_by_band".into(),
                            double_map(&o.conversion_rate_by_band),
                        ),
                        ("auc".into(), opt_double(o.auc)),
                        ("revenue_by_band".into(), double_map(&o.revenue_by_band)),
                        (
                            "revenue_per_lead_by_band".into(),
                            double_map(&o.revenue_per_lead_by_band),
                        ),
                    ]
                })),
            ),
            (
                "emitted_at".into(),
                Value::TimestampMillis(self.emitted_at_ms),
            ),
        ])
    }
}

impl AlertEvent {
    /// A sentence for people: what, where, how far past the threshold.
    pub fn message(&self) -> String {
        let what = match self.finding.feature.as_deref() {
            Some(f) => format!("{} of feature {f}", self.finding.kind),
            None => self.finding.kind.to_string(),
        };
        match self.status {
            Status::Firing => format!(
                "{what} is {:.4} (threshold {:.4}) for {} v{}",
                self.finding.value, self.finding.threshold, self.model_name, self.model_version
            ),
            Status::Resolved => format!(
                "{what} is back within its threshold for {} v{}",
                self.model_name, self.model_version
            ),
        }
    }

    /// The `Alert` Avro value.
    pub fn to_value(&self, raised_at_ms: i64) -> Value {
        let severity = match self.severity {
            Severity::Info => Value::Enum(0, "info".into()),
            Severity::Warning => Value::Enum(1, "warning".into()),
            Severity::Critical => Value::Enum(2, "critical".into()),
        };
        let status = match self.status {
            Status::Firing => Value::Enum(0, "firing".into()),
            Status::Resolved => Value::Enum(1, "resolved".into()),
        };
        Value::Record(vec![
            (
                "fingerprint".into(),
                Value::String(self.fingerprint.clone()),
            ),
            ("status".into(), status),
            ("severity".into(), severity),
            ("kind".into(), Value::String(self.finding.kind.clone())),
            (
                "feature".into(),
                match &self.finding.feature {
                    Some(f) => Value::Union(1, Box::new(Value::String(f.clone()))),
                    None => Value::Union(0, Box::new(Value::Null)),
                },
            ),
            ("value".into(), Value::Double(self.finding.value)),
            ("threshold".into(), Value::Double(self.finding.threshold)),
            (
                "window_start".into(),
                Value::TimestampMillis(self.window_start_ms),
            ),
            (
                "window_end".into(),
                Value::TimestampMillis(self.window_end_ms),
            ),
            ("model_name".into(), Value::String(self.model_name.clone())),
            (
                "model_version".into(),
                Value::String(self.model_version.clone()),
            ),
            ("message".into(), Value::String(self.message())),
            ("raised_at".into(), Value::TimestampMillis(raised_at_ms)),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::{AlertState, Thresholds, evaluate};

    fn schema(file: &str) -> apache_avro::Schema {
        apache_avro::Schema::parse_str(leadscore_schemas::find(file).unwrap().text).unwrap()
    }

    fn drift(feature: &str, numeric: bool, psi: f64) -> FeatureDrift {
        FeatureDrift {
            bins: Vec::new(),
            feature: feature.into(),
            numeric,
            sample_size: 1000,
            psi,
            kl: 0.01,
            js: 0.02,
            ks: numeric.then_some((0.1, 0.2)),
            chi2: (!numeric).then_some((3.0, 0.4)),
            new_category_rate: (!numeric).then_some(0.0),
            missing_rate: 0.03,
            reference_missing_rate: 0.03,
            missing_p: None,
            judged: true,
            psi_noise: 0.0,
        }
    }

    #[test]
    fn reports_with_and_without_the_optional_parts_fit_the_schema() {
        let schema = schema("WindowReport.avsc");
        let mut report = WindowReport {
            model_name: "lead-scoring".into(),
            model_version: "3".into(),
            kind: WindowKind::of(3_600_000),
            start_ms: 0,
            end_ms: 3_600_000,
            scored: 1000,
            late_events: 2,
            errors: 0,
            features: vec![
                drift("page_views", true, 0.01),
                drift("industry", false, 0.3),
            ],
            score_psi: None,
            score_judged: true,
            shadow: None,
            latency: None,
            outcomes: None,
            emitted_at_ms: 3_700_000,
        };
        assert!(report.to_value().validate(&schema));
        // The check has teeth: a field of the wrong type fails it.
        let Value::Record(mut fields) = report.to_value() else {
            unreachable!("a report is a record")
        };
        fields[5].1 = Value::String("1000".into());
        assert!(!Value::Record(fields).validate(&schema));
        report.score_psi = Some(0.02);
        report.shadow = Some(ShadowAgreement {
            challenger_version: "4".into(),
            pairs: 990,
            mean_abs_diff: 0.01,
            band_agreement: 0.97,
            top_reason_agreement: Some(0.8),
            reason_pairs: 900,
        });
        report.latency = Some(LatencySummary {
            p50_ms: 300.0,
            p95_ms: 450.0,
            p99_ms: 600.0,
            max_ms: 700.0,
        });
        report.outcomes = Some(OutcomeSummary {
            labelled: 120,
            conversion_rate_by_band: HashMap::from([("High".into(), 0.4), ("Low".into(), 0.05)]),
            auc: Some(0.71),
            revenue_by_band: HashMap::from([("High".into(), 480_000.0)]),
            revenue_per_lead_by_band: HashMap::from([("High".into(), 8_000.0)]),
        });
        assert!(report.to_value().validate(&schema));
        assert_eq!(WindowKind::of(86_400_000), WindowKind::Daily);
        assert_eq!(WindowKind::of(60_000), WindowKind::Custom);
    }

    #[test]
    fn alerts_fit_the_schema_and_say_what_moved() {
        let schema = schema("Alert.avsc");
        let mut state = AlertState::default();
        let findings = evaluate(
            &[drift("industry", false, 0.6)],
            Some((0.3, 10_000)),
            &Thresholds::default(),
        );
        let events = state.update("lead-scoring", "3", (0, 3_600_000), findings);
        assert!(!events.is_empty());
        for e in &events {
            assert!(e.to_value(1).validate(&schema), "{e:?}");
        }
        let psi = events
            .iter()
            .find(|e| e.finding.kind == "psi")
            .map(AlertEvent::message)
            .unwrap_or_default();
        assert!(psi.contains("industry") && psi.contains("0.6000"), "{psi}");
        let resolved = state.update("lead-scoring", "3", (3_600_000, 7_200_000), Vec::new());
        assert!(resolved.iter().all(|e| e.to_value(2).validate(&schema)));
        assert!(resolved[0].message().contains("back within"));
    }
}
