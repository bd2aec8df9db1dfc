//! Feature building for the lead model.
//!
//! Owns the encoding contract with `training/leadscore_training/features.py`,
//! described by the `feature_spec` in every model's metadata:
//! categorical values become their index in the sorted training vocabulary
//! (missing or never-seen: NaN), numeric values pass through as `f32`
//! (missing: NaN), and `hour_of_day` / `day_of_week` come from `created_at`
//! in UTC. Shared test vectors (`models/default/parity.json`) prove Rust and
//! Python agree. Also validates inputs: a value no model should see
//! (negative, non-finite, absurd, oversized) is an [`InvalidInput`] naming the
//! field, which the scorer dead-letters.
//!
//! Pure: no I/O.

use chrono::{Datelike, Timelike};
use leadscore_crm::Lead;
use serde::{Deserialize, Serialize};

/// Version of the spec format this crate understands.
pub const SPEC_VERSION: u32 = 1;
/// Longest accepted categorical value or lead id, in bytes.
pub const MAX_STRING: usize = 256;

/// Errors in a feature spec.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// The spec is of another format version.
    #[error("feature spec version {found} is not supported (expected {SPEC_VERSION})")]
    Version {
        /// Version found.
        found: u32,
    },
    /// A feature names a source this crate cannot build.
    #[error("feature `{feature}`: {reason}")]
    Feature {
        /// Feature name.
        feature: String,
        /// What is wrong.
        reason: String,
    },
}

/// A lead that must not be scored; the scorer dead-letters it with this reason.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("field `{field}` is invalid: {reason}")]
pub struct InvalidInput {
    /// The CRM column at fault.
    pub field: &'static str,
    /// Why, without echoing the value when it could be PII.
    pub reason: String,
}

/// How a feature is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Index in the vocabulary.
    Categorical,
    /// The number itself.
    Numeric,
}

/// One model input column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDef {
    /// Feature name.
    pub name: String,
    /// Encoding.
    pub kind: Kind,
    /// CRM column it comes from.
    pub source: String,
    /// Sorted training vocabulary (categorical only).
    #[serde(default)]
    pub vocabulary: Vec<String>,
    /// Derivation from `source` (`hour_of_day`, `day_of_week`).
    #[serde(default)]
    pub derive: Option<String>,
}

/// The model's input columns, in order, as written by training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSpec {
    /// Format version.
    pub version: u32,
    /// Columns in input order.
    pub features: Vec<FeatureDef>,
}

#[derive(Debug, Clone, PartialEq)]
enum Extract {
    Category(CatCol, Vec<String>),
    Number(NumCol),
    Hour,
    Weekday,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum CatCol {
    CompanySize,
    Industry,
    ReferralSource,
    Country,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NumCol {
    PageViews,
    TimeOnSite,
    FormCompletionTime,
}

/// A validated spec, ready to build feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureBuilder {
    spec: FeatureSpec,
    extract: Vec<Extract>,
}

/// The value of one feature as the model saw it, for output topics.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum RawValue {
    /// Missing.
    Null,
    /// An integer column.
    Long(i64),
    /// A float column.
    Double(f64),
    /// A categorical column (the raw category, not its index).
    String(String),
}

impl FeatureBuilder {
    /// Validates `spec` and prepares extraction.
    pub fn new(spec: FeatureSpec) -> Result<Self, SpecError> {
        if spec.version != SPEC_VERSION {
            return Err(SpecError::Version {
                found: spec.version,
            });
        }
        let mut extract = Vec::with_capacity(spec.features.len());
        for f in &spec.features {
            let bad = |reason: &str| SpecError::Feature {
                feature: f.name.clone(),
                reason: reason.to_string(),
            };
            let e = match (f.kind, f.source.as_str(), f.derive.as_deref()) {
                (Kind::Categorical, src, None) => {
                    let col = match src {
                        "company_size" => CatCol::CompanySize,
                        "industry" => CatCol::Industry,
                        "referral_source" => CatCol::ReferralSource,
                        "country" => CatCol::Country,
                        _ => return Err(bad("unknown categorical source column")),
                    };
                    if f.vocabulary.windows(2).any(|w| w[0] >= w[1]) {
                        return Err(bad("vocabulary must be sorted and unique"));
                    }
                    Extract::Category(col, f.vocabulary.clone())
                }
                (Kind::Numeric, "page_views", None) => Extract::Number(NumCol::PageViews),
                (Kind::Numeric, "time_on_site", None) => Extract::Number(NumCol::TimeOnSite),
                (Kind::Numeric, "form_completion_time", None) => {
                    Extract::Number(NumCol::FormCompletionTime)
                }
                (Kind::Numeric, "created_at", Some("hour_of_day")) => Extract::Hour,
                (Kind::Numeric, "created_at", Some("day_of_week")) => Extract::Weekday,
                _ => return Err(bad("unknown source/derivation")),
            };
            extract.push(e);
        }
        Ok(Self { spec, extract })
    }

    /// The spec in use.
    pub fn spec(&self) -> &FeatureSpec {
        &self.spec
    }

    /// Number of model inputs.
    pub fn width(&self) -> usize {
        self.extract.len()
    }

    /// Feature names in input order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.spec.features.iter().map(|f| f.name.as_str())
    }

    /// Checks that `lead` is fit to score.
    pub fn validate(lead: &Lead) -> Result<(), InvalidInput> {
        if lead.lead_id.trim().is_empty() {
            return Err(InvalidInput {
                field: "lead_id",
                reason: "empty".into(),
            });
        }
        if lead.lead_id.len() > MAX_STRING {
            return Err(InvalidInput {
                field: "lead_id",
                reason: format!("{} bytes, more than {MAX_STRING}", lead.lead_id.len()),
            });
        }
        for (field, v) in [
            ("company_size", &lead.company_size),
            ("industry", &lead.industry),
            ("referral_source", &lead.referral_source),
            ("country", &lead.country),
        ] {
            if let Some(v) = v
                && v.len() > MAX_STRING
            {
                return Err(InvalidInput {
                    field,
                    reason: format!("{} bytes, more than {MAX_STRING}", v.len()),
                });
            }
        }
        if let Some(pv) = lead.page_views {
            check_range("page_views", f64::from(pv), 1_000_000.0)?;
        }
        if let Some(t) = lead.time_on_site {
            check_range("time_on_site", t, 30.0 * 86_400.0)?;
        }
        if let Some(t) = lead.form_completion_time {
            check_range("form_completion_time", t, 86_400.0)?;
        }
        Ok(())
    }

    /// Appends the features of `lead` to `out` (`width()` values); validates first.
    pub fn build_into(&self, lead: &Lead, out: &mut Vec<f32>) -> Result<(), InvalidInput> {
        Self::validate(lead)?;
        for e in &self.extract {
            out.push(match e {
                Extract::Category(col, vocab) => cat(lead, *col)
                    .and_then(|v| vocab.binary_search_by(|x| x.as_str().cmp(v)).ok())
                    .map_or(f32::NAN, |i| i as f32),
                Extract::Number(col) => num(lead, *col).map_or(f32::NAN, |v| v as f32),
                Extract::Hour => lead.created_at.hour() as f32,
                Extract::Weekday => lead.created_at.weekday().num_days_from_monday() as f32,
            });
        }
        Ok(())
    }

    /// The features of one lead.
    pub fn build(&self, lead: &Lead) -> Result<Vec<f32>, InvalidInput> {
        let mut out = Vec::with_capacity(self.width());
        self.build_into(lead, &mut out)?;
        Ok(out)
    }

    /// The raw values the features were built from, by feature name.
    pub fn raw_values(&self, lead: &Lead) -> Vec<(String, RawValue)> {
        self.spec
            .features
            .iter()
            .zip(&self.extract)
            .map(|(f, e)| (f.name.clone(), raw(lead, e)))
            .collect()
    }

    /// Appends the raw value of feature `index` as reason texts show it: the number or the
    /// category, `(missing)` when absent (or past the width). Allocates nothing else.
    pub fn write_raw_value(&self, lead: &Lead, index: usize, out: &mut String) {
        use std::fmt::Write;
        let written = match self.extract.get(index) {
            Some(Extract::Category(col, _)) => match cat(lead, *col) {
                Some(s) => {
                    out.push_str(s);
                    Ok(())
                }
                None => Err(()),
            },
            Some(Extract::Number(NumCol::PageViews)) => match lead.page_views {
                Some(v) => write!(out, "{v}").map_err(|_| ()),
                None => Err(()),
            },
            Some(Extract::Number(col)) => match num(lead, *col) {
                Some(v) => write!(out, "{v}").map_err(|_| ()),
                None => Err(()),
            },
            Some(Extract::Hour) => write!(out, "{}", lead.created_at.hour()).map_err(|_| ()),
            Some(Extract::Weekday) => {
                write!(out, "{}", lead.created_at.weekday().num_days_from_monday()).map_err(|_| ())
            }
            None => Err(()),
        };
        if written.is_err() {
            out.push_str("(missing)");
        }
    }

    /// The raw value feature `index` (spec order) was built from; `Null` past the width.
    pub fn raw_value(&self, lead: &Lead, index: usize) -> RawValue {
        self.extract
            .get(index)
            .map_or(RawValue::Null, |e| raw(lead, e))
    }
}

fn raw(lead: &Lead, e: &Extract) -> RawValue {
    match e {
        Extract::Category(col, _) => {
            cat(lead, *col).map_or(RawValue::Null, |s| RawValue::String(s.to_string()))
        }
        Extract::Number(NumCol::PageViews) => lead
            .page_views
            .map_or(RawValue::Null, |v| RawValue::Long(i64::from(v))),
        Extract::Number(col) => num(lead, *col).map_or(RawValue::Null, RawValue::Double),
        Extract::Hour => RawValue::Long(i64::from(lead.created_at.hour())),
        Extract::Weekday => {
            RawValue::Long(i64::from(lead.created_at.weekday().num_days_from_monday()))
        }
    }
}

fn check_range(field: &'static str, v: f64, max: f64) -> Result<(), InvalidInput> {
    if !v.is_finite() {
        return Err(InvalidInput {
            field,
            reason: "not a finite number".into(),
        });
    }
    if v < 0.0 {
        return Err(InvalidInput {
            field,
            reason: format!("negative ({v})"),
        });
    }
    if v > max {
        return Err(InvalidInput {
            field,
            reason: format!("{v} is above the plausible maximum {max}"),
        });
    }
    Ok(())
}

fn cat(lead: &Lead, col: CatCol) -> Option<&str> {
    match col {
        CatCol::CompanySize => lead.company_size.as_deref(),
        CatCol::Industry => lead.industry.as_deref(),
        CatCol::ReferralSource => lead.referral_source.as_deref(),
        CatCol::Country => lead.country.as_deref(),
    }
}

fn num(lead: &Lead, col: NumCol) -> Option<f64> {
    match col {
        NumCol::PageViews => lead.page_views.map(f64::from),
        NumCol::TimeOnSite => lead.time_on_site,
        NumCol::FormCompletionTime => lead.form_completion_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leadscore_crm::{Generator, GeneratorConfig};

    fn spec() -> FeatureSpec {
        let text = include_str!("../../../models/default/metadata.json");
        let meta: serde_json::Value = serde_json::from_str(text).unwrap();
        serde_json::from_value(meta["feature_spec"].clone()).unwrap()
    }

    fn lead() -> Lead {
        Generator::new(GeneratorConfig::default()).next_lead().lead
    }

    #[test]
    fn bundled_spec_is_valid_and_has_nine_features() {
        let b = FeatureBuilder::new(spec()).unwrap();
        assert_eq!(b.width(), 9);
        assert_eq!(b.names().next(), Some("company_size"));
    }

    #[test]
    fn missing_and_unseen_categories_are_nan_known_ones_their_index() {
        let b = FeatureBuilder::new(spec()).unwrap();
        let mut l = lead();
        l.company_size = Some("Enterprise".into());
        l.industry = None;
        l.referral_source = Some("TikTok".into());
        l.page_views = None;
        let f = b.build(&l).unwrap();
        let vocab = &b.spec().features[0].vocabulary;
        assert_eq!(
            f[0],
            vocab.iter().position(|v| v == "Enterprise").unwrap() as f32
        );
        assert!(f[1].is_nan() && f[2].is_nan() && f[4].is_nan());
    }

    #[test]
    fn invalid_values_name_their_field() {
        let b = FeatureBuilder::new(spec()).unwrap();
        type Mutation = Box<dyn Fn(&mut Lead)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("lead_id", Box::new(|l| l.lead_id = " ".into())),
            ("lead_id", Box::new(|l| l.lead_id = "x".repeat(300))),
            (
                "time_on_site",
                Box::new(|l| l.time_on_site = Some(f64::NAN)),
            ),
            (
                "time_on_site",
                Box::new(|l| l.time_on_site = Some(f64::INFINITY)),
            ),
            (
                "form_completion_time",
                Box::new(|l| l.form_completion_time = Some(-1.0)),
            ),
            ("page_views", Box::new(|l| l.page_views = Some(-3))),
            ("page_views", Box::new(|l| l.page_views = Some(50_000_000))),
            (
                "industry",
                Box::new(|l| l.industry = Some("x".repeat(1000))),
            ),
        ];
        for (field, mutate) in cases {
            let mut l = lead();
            mutate(&mut l);
            assert_eq!(b.build(&l).unwrap_err().field, field);
        }
    }

    #[test]
    fn spec_errors_name_the_feature() {
        let mut s = spec();
        s.features[0].vocabulary.reverse();
        assert!(
            matches!(FeatureBuilder::new(s), Err(SpecError::Feature { feature, .. }) if feature == "company_size")
        );
        let mut s = spec();
        s.version = 9;
        assert_eq!(FeatureBuilder::new(s), Err(SpecError::Version { found: 9 }));
    }

    proptest::proptest! {
        #[test]
        fn every_generated_lead_builds_to_the_spec_width(seed in 0u64..50) {
            let b = FeatureBuilder::new(spec()).unwrap();
            for g in Generator::new(GeneratorConfig { seed, ..Default::default() }).take(20) {
                let f = b.build(&g.lead).unwrap();
                proptest::prop_assert_eq!(f.len(), 9);
                proptest::prop_assert!(f[7] >= 0.0 && f[7] < 24.0);
                proptest::prop_assert!(f[8] >= 0.0 && f[8] < 7.0);
            }
        }
    }
}
