//! The CRM lead row and a synthetic lead generator.
//!
//! Owns the shape of a `public.leads` row as the rest of the system sees it
//! ([`Lead`], PII kept apart in [`Pii`]) and a deterministic generator of
//! realistic leads: skewed page views and time on site, hour-of-day and
//! weekday seasonality, industry, size, country and referral mixes, a hidden
//! conversion probability and the outcome it draws. [`DriftSpec`] injects
//! drift with known ground truth (shift or scale a numeric feature, change a
//! category mix, add a never-seen category, raise a missing rate).
//!
//! Pure: no files, no database. `csv` writes to any `io::Write`.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub mod csv;

/// Errors raised by this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A drift knob could not be parsed.
    #[error("drift knob `{knob}` is invalid: {reason}")]
    BadKnob {
        /// The knob as given.
        knob: String,
        /// What is wrong, with the expected form.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Lead status in the CRM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Just created.
    New,
    /// Sales reached out.
    Contacted,
    /// Sales qualified it.
    Qualified,
    /// Became a customer (positive outcome).
    Converted,
    /// Will not convert (negative outcome).
    Lost,
}

impl Status {
    /// The CRM's text for the status.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Contacted => "contacted",
            Status::Qualified => "qualified",
            Status::Converted => "converted",
            Status::Lost => "lost",
        }
    }

    /// Whether the status is a final outcome (a label).
    pub fn is_outcome(self) -> bool {
        matches!(self, Status::Converted | Status::Lost)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "new" => Status::New,
            "contacted" => Status::Contacted,
            "qualified" => Status::Qualified,
            "converted" => Status::Converted,
            "lost" => Status::Lost,
            other => return Err(format!("unknown status `{other}`")),
        })
    }
}

/// A `public.leads` row without its PII columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Lead {
    /// Primary key.
    pub lead_id: String,
    /// Small | Medium | Large | Enterprise.
    pub company_size: Option<String>,
    /// Industry.
    pub industry: Option<String>,
    /// Pages viewed before the form.
    pub page_views: Option<i32>,
    /// Seconds on site.
    pub time_on_site: Option<f64>,
    /// Seconds to complete the form.
    pub form_completion_time: Option<f64>,
    /// Where the lead came from.
    pub referral_source: Option<String>,
    /// ISO country code.
    pub country: Option<String>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// CRM status.
    pub status: Status,
    /// When it converted.
    pub converted_at: Option<DateTime<Utc>>,
}

/// The PII columns of a lead: never features, never logged, never in a topic.
#[derive(Clone, PartialEq, Eq)]
pub struct Pii {
    /// Email address.
    pub email: String,
    /// Phone number.
    pub phone: String,
    /// Full name.
    pub full_name: String,
}

impl fmt::Debug for Pii {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pii(<redacted>)")
    }
}

/// A generated lead with its hidden truth.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The CRM row.
    pub lead: Lead,
    /// Synthetic PII for the CRM table.
    pub pii: Pii,
    /// The conversion probability the outcome was drawn from.
    pub true_probability: f64,
    /// Whether the lead converts (known even before the outcome is visible).
    pub converts: bool,
    /// The won deal's value (the CRM's `deal_value`, in the CRM's currency, to the cent):
    /// set once the lead shows as converted, `None` otherwise.
    pub deal_value: Option<f64>,
}

/// Median first-year deal value by company size (the unknown size as Medium's below).
pub const DEAL_BASE: &[(&str, f64)] = &[
    ("Small", 4_000.0),
    ("Medium", 15_000.0),
    ("Large", 60_000.0),
    ("Enterprise", 250_000.0),
];
/// Deal value multiplier by industry (1 for any other).
pub const DEAL_INDUSTRY: &[(&str, f64)] = &[
    ("Technology", 1.2),
    ("Finance", 1.5),
    ("Healthcare", 1.1),
    ("Retail", 0.7),
    ("Manufacturing", 1.0),
    ("Education", 0.6),
    ("Real Estate", 0.9),
    ("Logistics", 0.8),
];

/// A won deal's value: the size's median times the industry's multiplier times a
/// log-normal spread (sigma 0.6), to the cent. Drawn from its own stream keyed by the
/// seed and the lead's index, so the other columns stay what they were without it.
fn deal_value(seed: u64, index: u64, company_size: Option<&str>, industry: Option<&str>) -> f64 {
    let base = company_size
        .and_then(|s| DEAL_BASE.iter().find(|(k, _)| *k == s))
        .map_or(10_000.0, |(_, v)| *v);
    let factor = industry
        .and_then(|s| DEAL_INDUSTRY.iter().find(|(k, _)| *k == s))
        .map_or(1.0, |(_, v)| *v);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // Box-Muller: one standard normal.
    let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (base * factor * (0.6 * z).exp() * 100.0).round() / 100.0
}

/// Company sizes and their base mix.
pub const COMPANY_SIZES: &[(&str, f64)] = &[
    ("Small", 0.45),
    ("Medium", 0.30),
    ("Large", 0.17),
    ("Enterprise", 0.08),
];
/// Industries and their base mix.
pub const INDUSTRIES: &[(&str, f64)] = &[
    ("Technology", 0.24),
    ("Finance", 0.14),
    ("Healthcare", 0.12),
    ("Retail", 0.14),
    ("Manufacturing", 0.12),
    ("Education", 0.08),
    ("Real Estate", 0.08),
    ("Logistics", 0.08),
];
/// Referral sources and their base mix.
pub const REFERRAL_SOURCES: &[(&str, f64)] = &[
    ("Google", 0.34),
    ("LinkedIn", 0.18),
    ("Referral", 0.10),
    ("Direct", 0.14),
    ("Facebook", 0.10),
    ("Email", 0.08),
    ("Event", 0.06),
];
/// Countries and their base mix.
pub const COUNTRIES: &[(&str, f64)] = &[
    ("AE", 0.30),
    ("SA", 0.12),
    ("IN", 0.14),
    ("GB", 0.10),
    ("US", 0.12),
    ("DE", 0.06),
    ("EG", 0.08),
    ("PK", 0.08),
];

fn size_effect(v: &str) -> f64 {
    match v {
        "Small" => -0.45,
        "Medium" => 0.0,
        "Large" => 0.35,
        "Enterprise" => 0.7,
        _ => 0.0,
    }
}

fn industry_effect(v: &str) -> f64 {
    match v {
        "Technology" => 0.45,
        "Finance" => 0.35,
        "Healthcare" => 0.1,
        "Retail" => -0.25,
        "Manufacturing" => -0.05,
        "Education" => -0.35,
        "Real Estate" => 0.05,
        "Logistics" => -0.1,
        _ => 0.0,
    }
}

fn referral_effect(v: &str) -> f64 {
    match v {
        "Google" => 0.15,
        "LinkedIn" => 0.5,
        "Referral" => 0.9,
        "Direct" => 0.2,
        "Facebook" => -0.3,
        "Email" => 0.3,
        "Event" => 0.6,
        _ => 0.0,
    }
}

fn country_effect(v: &str) -> f64 {
    match v {
        "AE" => 0.2,
        "SA" => 0.1,
        "GB" => 0.05,
        "US" => 0.1,
        "IN" => -0.15,
        _ => 0.0,
    }
}

/// A categorical feature the generator draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Categorical {
    /// `company_size`.
    CompanySize,
    /// `industry`.
    Industry,
    /// `referral_source`.
    ReferralSource,
    /// `country`.
    Country,
}

/// A numeric feature the generator draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Numeric {
    /// `page_views`.
    PageViews,
    /// `time_on_site`.
    TimeOnSite,
    /// `form_completion_time`.
    FormCompletionTime,
}

/// Any generated feature column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Column {
    /// A categorical column.
    Cat(Categorical),
    /// A numeric column.
    Num(Numeric),
}

impl FromStr for Column {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "company_size" => Column::Cat(Categorical::CompanySize),
            "industry" => Column::Cat(Categorical::Industry),
            "referral_source" => Column::Cat(Categorical::ReferralSource),
            "country" => Column::Cat(Categorical::Country),
            "page_views" => Column::Num(Numeric::PageViews),
            "time_on_site" => Column::Num(Numeric::TimeOnSite),
            "form_completion_time" => Column::Num(Numeric::FormCompletionTime),
            other => {
                return Err(format!(
                    "unknown column `{other}` (company_size, industry, referral_source, country, page_views, time_on_site, form_completion_time)"
                ));
            }
        })
    }
}

impl Categorical {
    fn base(self) -> &'static [(&'static str, f64)] {
        match self {
            Categorical::CompanySize => COMPANY_SIZES,
            Categorical::Industry => INDUSTRIES,
            Categorical::ReferralSource => REFERRAL_SOURCES,
            Categorical::Country => COUNTRIES,
        }
    }
}

/// Drift to inject, with known ground truth.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriftSpec {
    /// Added to a numeric feature (after drawing).
    pub shift: BTreeMap<Numeric, f64>,
    /// Multiplies a numeric feature (before the shift).
    pub scale: BTreeMap<Numeric, f64>,
    /// Multiplies the base weight of categories (`industry=Retail:3`).
    pub mix: BTreeMap<Categorical, BTreeMap<String, f64>>,
    /// A never-seen category drawn at the given rate.
    pub new_category: BTreeMap<Categorical, (String, f64)>,
    /// Missing rate per column (replaces the base rate).
    pub missing: BTreeMap<Column, f64>,
}

fn bad(knob: &str, reason: impl Into<String>) -> Error {
    Error::BadKnob {
        knob: knob.to_string(),
        reason: reason.into(),
    }
}

fn split_knob(knob: &str) -> Result<(Column, &str)> {
    let (col, value) = knob
        .split_once('=')
        .ok_or_else(|| bad(knob, "expected column=value"))?;
    let col = col.parse::<Column>().map_err(|e| bad(knob, e))?;
    Ok((col, value))
}

fn number(knob: &str, v: &str) -> Result<f64> {
    let x: f64 = v
        .trim()
        .parse()
        .map_err(|_| bad(knob, format!("`{v}` is not a number")))?;
    if !x.is_finite() {
        return Err(bad(knob, "must be finite"));
    }
    Ok(x)
}

impl DriftSpec {
    /// Whether no drift is configured.
    pub fn is_empty(&self) -> bool {
        self == &DriftSpec::default()
    }

    /// `page_views=+5`: add to a numeric column.
    pub fn add_shift(&mut self, knob: &str) -> Result<()> {
        match split_knob(knob)? {
            (Column::Num(n), v) => {
                self.shift.insert(n, number(knob, v)?);
                Ok(())
            }
            _ => Err(bad(knob, "shift applies to numeric columns")),
        }
    }

    /// `time_on_site=1.5`: scale a numeric column.
    pub fn add_scale(&mut self, knob: &str) -> Result<()> {
        match split_knob(knob)? {
            (Column::Num(n), v) => {
                let f = number(knob, v)?;
                if f <= 0.0 {
                    return Err(bad(knob, "scale must be > 0"));
                }
                self.scale.insert(n, f);
                Ok(())
            }
            _ => Err(bad(knob, "scale applies to numeric columns")),
        }
    }

    /// `industry=Retail:3,Technology:0.5`: multiply category weights.
    pub fn add_mix(&mut self, knob: &str) -> Result<()> {
        let (Column::Cat(c), v) = split_knob(knob)? else {
            return Err(bad(knob, "mix applies to categorical columns"));
        };
        let entry = self.mix.entry(c).or_default();
        for part in v.split(',') {
            let (cat, w) = part
                .split_once(':')
                .ok_or_else(|| bad(knob, "expected category:weight[,category:weight]"))?;
            if !c.base().iter().any(|(name, _)| *name == cat) {
                return Err(bad(
                    knob,
                    format!("`{cat}` is not a known category; use --new-category for unseen ones"),
                ));
            }
            let w = number(knob, w)?;
            if w < 0.0 {
                return Err(bad(knob, "weights must be >= 0"));
            }
            entry.insert(cat.to_string(), w);
        }
        Ok(())
    }

    /// `referral_source=TikTok:0.2`: a never-seen category at a rate.
    pub fn add_new_category(&mut self, knob: &str) -> Result<()> {
        let (Column::Cat(c), v) = split_knob(knob)? else {
            return Err(bad(knob, "new categories apply to categorical columns"));
        };
        let (cat, rate) = v
            .split_once(':')
            .ok_or_else(|| bad(knob, "expected category:rate"))?;
        if c.base().iter().any(|(name, _)| *name == cat) {
            return Err(bad(knob, format!("`{cat}` is already a known category")));
        }
        let rate = number(knob, rate)?;
        if !(0.0..=1.0).contains(&rate) {
            return Err(bad(knob, "rate must be in [0, 1]"));
        }
        self.new_category.insert(c, (cat.to_string(), rate));
        Ok(())
    }

    /// `form_completion_time=0.3`: missing rate of a column.
    pub fn add_missing(&mut self, knob: &str) -> Result<()> {
        let (col, v) = split_knob(knob)?;
        let rate = number(knob, v)?;
        if !(0.0..=1.0).contains(&rate) {
            return Err(bad(knob, "rate must be in [0, 1]"));
        }
        self.missing.insert(col, rate);
        Ok(())
    }
}

/// Generator settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Random seed: same seed and settings, same leads.
    pub seed: u64,
    /// Prefix of generated lead ids.
    pub id_prefix: String,
    /// Leads are created uniformly (with seasonality) in `[end - days, end)`.
    pub end: DateTime<Utc>,
    /// Length of the creation window in days.
    pub days: u32,
    /// Mean delay from creation to outcome, in days.
    pub outcome_delay_days: f64,
    /// Base missing rate of every optional column.
    pub missing_rate: f64,
    /// Drift applied to leads created at or after `drift_from` (all if `None`).
    pub drift: DriftSpec,
    /// Start of the drifted period.
    pub drift_from: Option<DateTime<Utc>>,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            id_prefix: "lead".into(),
            end: Utc
                .with_ymd_and_hms(2026, 11, 1, 0, 0, 0)
                .single()
                .unwrap_or_default(),
            days: 180,
            outcome_delay_days: 10.0,
            missing_rate: 0.03,
            drift: DriftSpec::default(),
            drift_from: None,
        }
    }
}

/// Deterministic stream of leads: an `Iterator` that never ends.
#[derive(Debug, Clone)]
pub struct Generator {
    config: GeneratorConfig,
    rng: ChaCha8Rng,
    next: u64,
}

const HOUR_WEIGHTS: [f64; 24] = [
    0.2, 0.15, 0.1, 0.1, 0.1, 0.15, 0.3, 0.6, 1.0, 1.4, 1.6, 1.6, 1.3, 1.4, 1.6, 1.5, 1.3, 1.0,
    0.8, 0.7, 0.6, 0.5, 0.4, 0.3,
];

impl Generator {
    /// A generator at its first lead.
    pub fn new(config: GeneratorConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Self {
            config,
            rng,
            next: 0,
        }
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller; u1 in (0, 1] so ln is finite.
        let u1: f64 = 1.0 - self.rng.random::<f64>();
        let u2: f64 = self.rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn pick(&mut self, options: &[(&str, f64)], drift: Option<&BTreeMap<String, f64>>) -> String {
        let weights: Vec<f64> = options
            .iter()
            .map(|(name, w)| w * drift.and_then(|d| d.get(*name)).copied().unwrap_or(1.0))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut x = self.rng.random::<f64>() * total;
        for ((name, _), w) in options.iter().zip(&weights) {
            if x < *w {
                return (*name).to_string();
            }
            x -= w;
        }
        options
            .last()
            .map(|(n, _)| (*n).to_string())
            .unwrap_or_default()
    }

    fn created_at(&mut self) -> DateTime<Utc> {
        let start = self.config.end - Duration::days(i64::from(self.config.days));
        loop {
            let day = self.rng.random_range(0..self.config.days.max(1));
            let date = start + Duration::days(i64::from(day));
            let weekend = date.weekday().number_from_monday() >= 6;
            if weekend && self.rng.random::<f64>() > 0.35 {
                continue;
            }
            let total: f64 = HOUR_WEIGHTS.iter().sum();
            let mut x = self.rng.random::<f64>() * total;
            let mut hour = 23;
            for (h, w) in HOUR_WEIGHTS.iter().enumerate() {
                if x < *w {
                    hour = h;
                    break;
                }
                x -= w;
            }
            let secs = self.rng.random_range(0..3600);
            let day_start = date
                .with_hour(0)
                .and_then(|d| d.with_minute(0))
                .and_then(|d| d.with_second(0))
                .unwrap_or(date);
            return day_start + Duration::hours(hour as i64) + Duration::seconds(secs);
        }
    }

    fn missing(&mut self, col: Column, drifted: bool) -> bool {
        let rate = if drifted {
            self.config
                .drift
                .missing
                .get(&col)
                .copied()
                .unwrap_or(self.config.missing_rate)
        } else {
            self.config.missing_rate
        };
        self.rng.random::<f64>() < rate
    }

    fn category(&mut self, c: Categorical, drifted: bool) -> Option<String> {
        if self.missing(Column::Cat(c), drifted) {
            return None;
        }
        if drifted
            && let Some((name, rate)) = self.config.drift.new_category.get(&c).cloned()
            && self.rng.random::<f64>() < rate
        {
            return Some(name);
        }
        let mix = if drifted {
            self.config.drift.mix.get(&c).cloned()
        } else {
            None
        };
        Some(self.pick(c.base(), mix.as_ref()))
    }

    fn numeric(&mut self, n: Numeric, raw: f64, drifted: bool) -> Option<f64> {
        if self.missing(Column::Num(n), drifted) {
            return None;
        }
        let mut v = raw;
        if drifted {
            v *= self.config.drift.scale.get(&n).copied().unwrap_or(1.0);
            v += self.config.drift.shift.get(&n).copied().unwrap_or(0.0);
        }
        Some(v.max(0.0))
    }

    /// The next lead.
    pub fn next_lead(&mut self) -> Generated {
        let index = self.next;
        self.next += 1;
        let created_at = self.created_at();
        let drifted = !self.config.drift.is_empty()
            && self.config.drift_from.is_none_or(|from| created_at >= from);

        let company_size = self.category(Categorical::CompanySize, drifted);
        let industry = self.category(Categorical::Industry, drifted);
        let referral_source = self.category(Categorical::ReferralSource, drifted);
        let country = self.category(Categorical::Country, drifted);

        // Engagement is correlated: one latent "interest" drives all three.
        let interest = self.normal();
        let pv_raw = (1.6 + 0.55 * interest + 0.6 * self.normal()).exp().round();
        let tos_raw = (4.9 + 0.5 * interest + 0.7 * self.normal()).exp();
        let fct_raw = (3.7 - 0.15 * interest + 0.5 * self.normal()).exp();
        let page_views = self
            .numeric(Numeric::PageViews, pv_raw, drifted)
            .map(|v| v.round().min(10_000.0) as i32);
        let time_on_site = self
            .numeric(Numeric::TimeOnSite, tos_raw, drifted)
            .map(|v| (v * 10.0).round() / 10.0);
        let form_completion_time = self
            .numeric(Numeric::FormCompletionTime, fct_raw, drifted)
            .map(|v| (v * 10.0).round() / 10.0);

        let mut logit = -1.9;
        logit += company_size.as_deref().map_or(0.0, size_effect);
        logit += industry.as_deref().map_or(0.0, industry_effect);
        logit += referral_source.as_deref().map_or(0.0, referral_effect);
        logit += country.as_deref().map_or(0.0, country_effect);
        logit += page_views.map_or(-0.2, |pv| 0.55 * (1.0 + f64::from(pv)).ln() - 1.0);
        logit += time_on_site.map_or(0.0, |t| 0.35 * (1.0 + t / 60.0).ln() - 0.4);
        logit += form_completion_time.map_or(0.0, |f| {
            // Bots fill forms in seconds; the undecided take minutes.
            if f < 8.0 {
                -1.0
            } else {
                -0.35 * (f / 40.0).ln().abs()
            }
        });
        let hour = created_at.hour();
        logit += if (9..18).contains(&hour) { 0.25 } else { -0.1 };
        logit += if created_at.weekday().number_from_monday() <= 5 {
            0.15
        } else {
            -0.2
        };
        let true_probability = 1.0 / (1.0 + (-logit).exp());
        let converts = self.rng.random::<f64>() < true_probability;

        // Outcome after an exponential delay; earlier stages before that.
        let u: f64 = 1.0 - self.rng.random::<f64>();
        let delay_days = -self.config.outcome_delay_days * u.ln();
        let outcome_at = created_at + Duration::seconds((delay_days * 86_400.0) as i64);
        let (status, updated_at, converted_at) = if outcome_at <= self.config.end {
            if converts {
                (Status::Converted, outcome_at, Some(outcome_at))
            } else {
                (Status::Lost, outcome_at, None)
            }
        } else {
            let age = (self.config.end - created_at).num_seconds() as f64;
            let progress = age / (outcome_at - created_at).num_seconds().max(1) as f64;
            let status = if progress < 0.3 {
                Status::New
            } else if progress < 0.7 {
                Status::Contacted
            } else {
                Status::Qualified
            };
            (status, created_at, None)
        };

        let first = [
            "Aisha", "Omar", "Li", "Maria", "John", "Fatima", "Ravi", "Sara",
        ];
        let last = [
            "Khan", "Smith", "Haddad", "Garcia", "Chen", "Patel", "Ali", "Jones",
        ];
        let full_name = format!(
            "{} {}",
            first[self.rng.random_range(0..first.len())],
            last[self.rng.random_range(0..last.len())]
        );
        let lead_id = format!("{}_{:09}", self.config.id_prefix, index);
        let pii = Pii {
            email: format!("{}@example.com", lead_id.to_lowercase()),
            phone: format!("+9715{:08}", self.rng.random_range(0..100_000_000u32)),
            full_name,
        };
        let deal_value = (status == Status::Converted).then(|| {
            deal_value(
                self.config.seed,
                index,
                company_size.as_deref(),
                industry.as_deref(),
            )
        });
        Generated {
            lead: Lead {
                lead_id,
                company_size,
                industry,
                page_views,
                time_on_site,
                form_completion_time,
                referral_source,
                country,
                created_at,
                updated_at,
                status,
                converted_at,
            },
            deal_value,
            pii,
            true_probability,
            converts,
        }
    }
}

impl Iterator for Generator {
    type Item = Generated;
    fn next(&mut self) -> Option<Generated> {
        Some(self.next_lead())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(config: GeneratorConfig, n: usize) -> Vec<Generated> {
        Generator::new(config).take(n).collect()
    }

    #[test]
    fn same_seed_same_leads_other_seed_other_leads() {
        let a = sample(GeneratorConfig::default(), 200);
        let b = sample(GeneratorConfig::default(), 200);
        assert_eq!(a, b);
        let c = sample(
            GeneratorConfig {
                seed: 7,
                ..Default::default()
            },
            200,
        );
        assert_ne!(a, c);
    }

    #[test]
    fn page_views_are_right_skewed_and_time_is_seasonal() {
        let leads = sample(GeneratorConfig::default(), 20_000);
        let mut pv: Vec<i32> = leads.iter().filter_map(|g| g.lead.page_views).collect();
        pv.sort_unstable();
        let median = pv[pv.len() / 2];
        let mean = pv.iter().map(|&v| f64::from(v)).sum::<f64>() / pv.len() as f64;
        assert!(
            mean > f64::from(median),
            "skewed: mean {mean} > median {median}"
        );
        let office = leads
            .iter()
            .filter(|g| (9..18).contains(&g.lead.created_at.hour()))
            .count();
        assert!(
            office as f64 / leads.len() as f64 > 0.5,
            "most leads arrive in office hours"
        );
        let weekend = leads
            .iter()
            .filter(|g| g.lead.created_at.weekday().number_from_monday() >= 6)
            .count();
        assert!((weekend as f64 / leads.len() as f64) < 2.0 / 7.0 * 0.6);
    }

    #[test]
    fn outcomes_follow_the_hidden_probability() {
        let leads = sample(GeneratorConfig::default(), 30_000);
        let labelled: Vec<&Generated> = leads
            .iter()
            .filter(|g| g.lead.status.is_outcome())
            .collect();
        assert!(
            labelled.len() > 20_000,
            "most leads of a 180-day window have an outcome"
        );
        let (hi, lo): (Vec<_>, Vec<_>) = labelled.iter().partition(|g| g.true_probability > 0.3);
        let rate = |v: &[&&Generated]| {
            v.iter()
                .filter(|g| g.lead.status == Status::Converted)
                .count() as f64
                / v.len() as f64
        };
        assert!(
            rate(&hi) > 2.0 * rate(&lo),
            "high-probability leads convert more"
        );
        for g in &labelled {
            assert_eq!(
                g.lead.converted_at.is_some(),
                g.lead.status == Status::Converted
            );
            assert_eq!(g.deal_value.is_some(), g.lead.status == Status::Converted);
            assert!(g.lead.updated_at >= g.lead.created_at);
        }
    }

    #[test]
    fn deal_values_grow_with_company_size_and_are_skewed() {
        let leads = sample(GeneratorConfig::default(), 40_000);
        let median = |size: &str| {
            let mut v: Vec<f64> = leads
                .iter()
                .filter(|g| g.lead.company_size.as_deref() == Some(size))
                .filter_map(|g| g.deal_value)
                .collect();
            assert!(v.len() > 100, "{size}: {} deals", v.len());
            v.sort_by(f64::total_cmp);
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            (v[v.len() / 2], mean)
        };
        let sizes: Vec<(f64, f64)> = ["Small", "Medium", "Large", "Enterprise"]
            .into_iter()
            .map(median)
            .collect();
        for w in sizes.windows(2) {
            assert!(w[1].0 > 2.0 * w[0].0, "medians rise with size: {sizes:?}");
        }
        for (median, mean) in &sizes {
            assert!(
                mean > median,
                "right-skewed: mean {mean} vs median {median}"
            );
        }
        // An industry's multiplier shows in its median, within one size.
        let of = |industry: &str| {
            let mut v: Vec<f64> = leads
                .iter()
                .filter(|g| g.lead.company_size.as_deref() == Some("Medium"))
                .filter(|g| g.lead.industry.as_deref() == Some(industry))
                .filter_map(|g| g.deal_value)
                .collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        assert!(of("Finance") > 1.5 * of("Education"));
        // Cents, never negative; the same seed gives the same values.
        for g in leads.iter().filter_map(|g| g.deal_value) {
            assert!(g > 0.0 && (g * 100.0 - (g * 100.0).round()).abs() < 1e-6);
        }
        let again = sample(GeneratorConfig::default(), 1_000);
        assert!(
            again
                .iter()
                .zip(&leads)
                .all(|(a, b)| a.deal_value == b.deal_value)
        );
    }

    #[test]
    fn drift_knobs_move_exactly_what_they_name() {
        let mut drift = DriftSpec::default();
        drift.add_scale("time_on_site=2").unwrap();
        drift
            .add_new_category("referral_source=TikTok:0.25")
            .unwrap();
        drift.add_missing("form_completion_time=0.5").unwrap();
        drift.add_mix("industry=Retail:5").unwrap();
        let base = sample(GeneratorConfig::default(), 20_000);
        let drifted = sample(
            GeneratorConfig {
                drift,
                ..Default::default()
            },
            20_000,
        );
        let median = |v: &[Generated]| {
            let mut t: Vec<f64> = v.iter().filter_map(|g| g.lead.time_on_site).collect();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        let ratio = median(&drifted) / median(&base);
        assert!(
            (1.8..2.2).contains(&ratio),
            "time_on_site scaled x2, got x{ratio}"
        );
        let share = |v: &[Generated], f: &dyn Fn(&Lead) -> bool| {
            v.iter().filter(|g| f(&g.lead)).count() as f64 / v.len() as f64
        };
        let tiktok = share(&drifted, &|l| {
            l.referral_source.as_deref() == Some("TikTok")
        });
        assert!((0.22..0.28).contains(&tiktok), "new category rate {tiktok}");
        assert_eq!(
            share(&base, &|l| l.referral_source.as_deref() == Some("TikTok")),
            0.0
        );
        let missing = share(&drifted, &|l| l.form_completion_time.is_none());
        assert!((0.47..0.53).contains(&missing), "missing rate {missing}");
        let retail = |v| share(v, &|l: &Lead| l.industry.as_deref() == Some("Retail"));
        assert!(retail(&drifted) > 2.5 * retail(&base));
        // Untouched columns keep their distribution.
        let pv = |v: &[Generated]| share(v, &|l| l.page_views.is_some_and(|p| p > 10));
        assert!((pv(&drifted) - pv(&base)).abs() < 0.02);
    }

    #[test]
    fn drift_starts_at_drift_from() {
        let mut drift = DriftSpec::default();
        drift.add_new_category("country=XX:1.0").unwrap();
        let config = GeneratorConfig::default();
        let from = config.end - Duration::days(30);
        for g in sample(
            GeneratorConfig {
                drift,
                drift_from: Some(from),
                ..config
            },
            5_000,
        ) {
            let is_new = g.lead.country.as_deref() == Some("XX");
            if g.lead.created_at < from {
                assert!(!is_new);
            } else {
                assert!(is_new || g.lead.country.is_none());
            }
        }
    }

    #[test]
    fn bad_knobs_are_named() {
        let mut d = DriftSpec::default();
        for (knob, f) in [
            (
                "pageviews=+3",
                DriftSpec::add_shift as fn(&mut DriftSpec, &str) -> Result<()>,
            ),
            ("industry=+3", DriftSpec::add_shift),
            ("time_on_site=-1", DriftSpec::add_scale),
            ("industry=Mining:2", DriftSpec::add_mix),
            ("industry=Retail:0.1", DriftSpec::add_new_category),
            ("country=2", DriftSpec::add_missing),
        ] {
            let err = f(&mut d, knob).unwrap_err().to_string();
            assert!(err.contains(knob), "{err}");
        }
    }

    #[test]
    fn pii_never_prints() {
        let g = Generator::new(GeneratorConfig::default()).next_lead();
        let shown = format!("{g:?}");
        assert!(!shown.contains(&g.pii.email) && !shown.contains(&g.pii.full_name));
    }
}
