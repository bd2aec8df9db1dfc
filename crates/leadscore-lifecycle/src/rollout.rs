//! The rollout of a challenger: shadow, canary steps, promotion, rollback.
//!
//! A [`Rollout`] per model follows lifecycle events (a version registered as
//! challenger starts a rollout) and window reports (shadow pairs, the
//! candidate's and the champion's scores, errors, p95 latency and High-band
//! conversion, per window). On each tick it decides: stay, take the next
//! step, promote, or roll back when the candidate is worse than the champion
//! over the same windows. Every decision is a list of [`Action`]s (MLflow
//! alias changes and lifecycle events) for the service to carry out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::events::{LifecycleEvent, Stage};

/// Rollout rules, from configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutPolicy {
    /// Least time in shadow, ms.
    pub shadow_min_ms: i64,
    /// Least shadow pairs before the first canary step.
    pub shadow_min_pairs: u64,
    /// Canary steps, percent of leads; the last is followed by promotion.
    pub steps: Vec<i32>,
    /// Least time per canary step, ms.
    pub step_min_ms: i64,
    /// Least candidate scores per canary step.
    pub step_min_scores: u64,
    /// Roll back when the candidate's error rate is above this.
    pub max_error_rate: f64,
    /// Roll back when the candidate's p95 latency is above the champion's by more than this share.
    pub max_latency_regression: f64,
    /// Roll back when the candidate's High-band conversion is below the champion's by more than this share.
    pub max_kpi_drop: f64,
    /// Roll back when the candidate's High-band revenue per lead is below the champion's by
    /// more than this share (1 or more: never).
    #[serde(default = "default_revenue_drop")]
    pub max_revenue_drop: f64,
}

fn default_revenue_drop() -> f64 {
    0.2
}

impl Default for RolloutPolicy {
    fn default() -> Self {
        Self {
            shadow_min_ms: 24 * 3_600_000,
            shadow_min_pairs: 1_000,
            steps: vec![10, 50, 100],
            step_min_ms: 6 * 3_600_000,
            step_min_scores: 500,
            max_error_rate: 0.02,
            max_latency_regression: 0.5,
            max_kpi_drop: 0.1,
            max_revenue_drop: default_revenue_drop(),
        }
    }
}

/// One model version's figures in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionWindow {
    /// Scores.
    pub scored: u64,
    /// Inputs that failed.
    pub errors: u64,
    /// p95 event-to-score latency, ms.
    pub p95_ms: Option<f64>,
    /// Conversion rate of High-band leads (outcome reports).
    pub high_conversion: Option<f64>,
    /// Revenue per labelled High-band lead (outcome reports).
    #[serde(default)]
    pub high_revenue_per_lead: Option<f64>,
    /// Shadow pairs against each shadow version.
    pub shadow_pairs: BTreeMap<String, u64>,
}

impl VersionWindow {
    /// Reads an hourly `WindowReport` (or outcome report): `(model, version, window start, figures)`.
    pub fn from_report(value: &apache_avro::types::Value) -> Option<(String, String, i64, Self)> {
        use apache_avro::types::Value;
        fn field<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
            leadscore_schemas::Fields::new(fields).get(name)
        }
        let Value::Record(fields) = value else {
            return None;
        };
        let string = |name: &str| match field(fields, name)? {
            Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
            _ => None,
        };
        if matches!(string("window_kind")?.as_str(), "daily" | "weekly") {
            return None;
        }
        let long = |v: Option<&Value>| match v? {
            Value::Long(l) | Value::TimestampMillis(l) => Some(*l),
            _ => None,
        };
        let double = |v: Option<&Value>| match v? {
            Value::Double(d) => Some(*d),
            _ => None,
        };
        let record = |name: &str| match field(fields, name) {
            Some(Value::Record(r)) => Some(r.clone()),
            _ => None,
        };
        let mut w = VersionWindow {
            scored: long(field(fields, "scored")).unwrap_or(0).max(0) as u64,
            errors: long(field(fields, "errors")).unwrap_or(0).max(0) as u64,
            p95_ms: record("latency").and_then(|l| double(field(&l, "p95_ms"))),
            high_conversion: None,
            high_revenue_per_lead: None,
            shadow_pairs: BTreeMap::new(),
        };
        if let Some(o) = record("outcomes") {
            // An outcome report repeats the window: only the conversion counts.
            w.scored = 0;
            if let Some(Value::Map(m)) = field(&o, "conversion_rate_by_band") {
                w.high_conversion = m.get("High").and_then(|v| double(Some(v)));
            }
            if let Some(Value::Map(m)) = field(&o, "revenue_per_lead_by_band") {
                w.high_revenue_per_lead = m.get("High").and_then(|v| double(Some(v)));
            }
        }
        if let Some(sh) = record("shadow")
            && let Some(Value::String(v)) = field(&sh, "challenger_version")
        {
            w.shadow_pairs.insert(
                v.clone(),
                long(field(&sh, "pairs")).unwrap_or(0).max(0) as u64,
            );
        }
        Some((
            string("model_name")?,
            string("model_version")?,
            long(field(fields, "window_start"))?,
            w,
        ))
    }
}

/// Where a model's rollout stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// No candidate.
    #[default]
    Steady,
    /// The candidate scores in shadow.
    Shadow {
        /// Candidate version.
        version: String,
        /// Since, ms.
        since_ms: i64,
        /// Windows starting after this one count for this step.
        #[serde(default)]
        after_window_ms: Option<i64>,
    },
    /// The candidate serves `steps[step]` percent of leads.
    Canary {
        /// Candidate version.
        version: String,
        /// Index into the policy's steps.
        step: usize,
        /// Since, ms.
        since_ms: i64,
        /// Windows starting after this one count for this step.
        #[serde(default)]
        after_window_ms: Option<i64>,
    },
}

/// Something for the service to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Point an MLflow alias at a version (`None`: remove it).
    Alias {
        /// `champion`, `challenger` or `canary`.
        alias: &'static str,
        /// Version, or none.
        version: Option<String>,
    },
    /// Publish a lifecycle event.
    Event(LifecycleEvent),
}

/// The rollout state of one model: checkpointed by the controller.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Model name.
    pub model_name: String,
    /// Current champion.
    pub champion: Option<String>,
    /// The champion before the last promotion (for a manual rollback).
    pub previous_champion: Option<String>,
    /// Where the rollout stands.
    pub phase: Phase,
    /// Figures per version per window start.
    pub windows: BTreeMap<String, BTreeMap<i64, VersionWindow>>,
    /// Events published so far (for unique event ids).
    pub sequence: u64,
    /// Start of the newest window reported, ms: a step counts only windows after the one current when it began.
    #[serde(default)]
    pub latest_window_ms: Option<i64>,
}

/// Prefix of the event ids the controller writes (it skips them when reading the topic back).
pub const EVENT_PREFIX: &str = "rollout/";

impl Rollout {
    /// A rollout of `model_name`.
    pub fn new(model_name: &str) -> Self {
        Self {
            model_name: model_name.to_string(),
            ..Default::default()
        }
    }

    /// The candidate version, if a rollout is under way.
    pub fn candidate(&self) -> Option<&str> {
        match &self.phase {
            Phase::Steady => None,
            Phase::Shadow { version, .. } | Phase::Canary { version, .. } => Some(version),
        }
    }

    /// Canary percent in force.
    pub fn canary_percent(&self, p: &RolloutPolicy) -> i32 {
        match &self.phase {
            Phase::Canary { step, .. } => p.steps.get(*step).copied().unwrap_or(0),
            _ => 0,
        }
    }

    fn event(
        &mut self,
        stage: Stage,
        version: &str,
        reason: String,
        p: &RolloutPolicy,
        now_ms: i64,
    ) -> Action {
        self.sequence += 1;
        Action::Event(LifecycleEvent {
            event_id: format!("{EVENT_PREFIX}{}/{}", self.model_name, self.sequence),
            model_name: self.model_name.clone(),
            version: version.to_string(),
            stage,
            canary_percent: self.canary_percent(p),
            champion_version: self.champion.clone(),
            challenger_version: self.candidate().map(str::to_string),
            reason,
            at_ms: now_ms,
        })
    }

    /// A lifecycle event someone else wrote (the training worker, an earlier controller).
    pub fn on_event(&mut self, e: &LifecycleEvent, p: &RolloutPolicy, now_ms: i64) -> Vec<Action> {
        if e.event_id.starts_with(EVENT_PREFIX) || e.model_name != self.model_name {
            return Vec::new();
        }
        match e.stage {
            Stage::Promoted if self.champion.is_none() => {
                // The first model: champion straight from training.
                self.champion = Some(e.version.clone());
                Vec::new()
            }
            Stage::Registered if self.phase == Phase::Steady => {
                let version = e.version.clone();
                self.phase = Phase::Shadow {
                    version: version.clone(),
                    since_ms: now_ms,
                    after_window_ms: self.latest_window_ms,
                };
                vec![
                    Action::Alias {
                        alias: "challenger",
                        version: Some(version.clone()),
                    },
                    self.event(
                        Stage::Shadow,
                        &version,
                        format!("v{version} registered as challenger: scoring in shadow"),
                        p,
                        now_ms,
                    ),
                ]
            }
            _ => Vec::new(),
        }
    }

    /// Figures of one version in one window (from a window report or an outcome report).
    pub fn on_window(&mut self, version: &str, start_ms: i64, w: VersionWindow) {
        self.latest_window_ms = Some(self.latest_window_ms.map_or(start_ms, |l| l.max(start_ms)));
        let slot = self
            .windows
            .entry(version.to_string())
            .or_default()
            .entry(start_ms)
            .or_default();
        slot.scored = slot.scored.max(w.scored);
        slot.errors = slot.errors.max(w.errors);
        slot.p95_ms = w.p95_ms.or(slot.p95_ms);
        slot.high_conversion = w.high_conversion.or(slot.high_conversion);
        slot.high_revenue_per_lead = w.high_revenue_per_lead.or(slot.high_revenue_per_lead);
        for (v, n) in w.shadow_pairs {
            let e = slot.shadow_pairs.entry(v).or_default();
            *e = (*e).max(n);
        }
        // Keep a bounded history: the last 1,000 windows per version.
        if let Some(ws) = self.windows.get_mut(version)
            && ws.len() > 1_000
            && let Some(first) = ws.keys().next().copied()
        {
            ws.remove(&first);
        }
    }

    /// Why the candidate is worse than the champion over the windows after `after`, if it is.
    fn regression(&self, candidate: &str, after: Option<i64>, p: &RolloutPolicy) -> Option<String> {
        let champion = self.champion.as_deref()?;
        let empty = BTreeMap::new();
        let cand = self.windows.get(candidate).unwrap_or(&empty);
        let champ = self.windows.get(champion).unwrap_or(&empty);
        let since = |m: &BTreeMap<i64, VersionWindow>| {
            m.iter()
                .filter(|(k, _)| after.is_none_or(|a| **k > a))
                .map(|(k, v)| (*k, v.clone()))
                .collect::<Vec<_>>()
        };
        let (c, h) = (since(cand), since(champ));
        let (scored, errors): (u64, u64) = c
            .iter()
            .fold((0, 0), |a, (_, w)| (a.0 + w.scored, a.1 + w.errors));
        if scored + errors > 0 {
            let rate = errors as f64 / (scored + errors) as f64;
            if rate > p.max_error_rate {
                return Some(format!(
                    "error rate {:.2}% above {:.2}%",
                    rate * 100.0,
                    p.max_error_rate * 100.0
                ));
            }
        }
        // Same windows only.
        let both: Vec<(&VersionWindow, &VersionWindow)> = c
            .iter()
            .filter_map(|(k, cw)| h.iter().find(|(j, _)| j == k).map(|(_, hw)| (cw, hw)))
            .collect();
        let mean =
            |xs: Vec<f64>| (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
        let cand_p95 = mean(
            both.iter()
                .filter_map(|(c, h)| c.p95_ms.zip(h.p95_ms).map(|x| x.0))
                .collect(),
        );
        let champ_p95 = mean(
            both.iter()
                .filter_map(|(c, h)| c.p95_ms.zip(h.p95_ms).map(|x| x.1))
                .collect(),
        );
        if let (Some(a), Some(b)) = (cand_p95, champ_p95)
            && b > 0.0
            && a > b * (1.0 + p.max_latency_regression)
        {
            return Some(format!(
                "p95 latency {a:.1} ms vs champion {b:.1} ms: more than {:.0}% slower",
                p.max_latency_regression * 100.0
            ));
        }
        let cand_kpi = mean(
            both.iter()
                .filter_map(|(c, h)| c.high_conversion.zip(h.high_conversion).map(|x| x.0))
                .collect(),
        );
        let champ_kpi = mean(
            both.iter()
                .filter_map(|(c, h)| c.high_conversion.zip(h.high_conversion).map(|x| x.1))
                .collect(),
        );
        if let (Some(a), Some(b)) = (cand_kpi, champ_kpi)
            && b > 0.0
            && a < b * (1.0 - p.max_kpi_drop)
        {
            return Some(format!(
                "High-band conversion {:.1}% vs champion {:.1}%: more than {:.0}% lower",
                a * 100.0,
                b * 100.0,
                p.max_kpi_drop * 100.0
            ));
        }
        let revenue = |pick: fn((f64, f64)) -> f64| {
            mean(
                both.iter()
                    .filter_map(|(c, h)| {
                        c.high_revenue_per_lead
                            .zip(h.high_revenue_per_lead)
                            .map(pick)
                    })
                    .collect(),
            )
        };
        if let (Some(a), Some(b)) = (revenue(|x| x.0), revenue(|x| x.1))
            && b > 0.0
            && p.max_revenue_drop < 1.0
            && a < b * (1.0 - p.max_revenue_drop)
        {
            return Some(format!(
                "High-band revenue per lead {a:.2} vs champion {b:.2}: more than {:.0}% lower",
                p.max_revenue_drop * 100.0
            ));
        }
        None
    }

    fn abort(
        &mut self,
        version: &str,
        reason: String,
        p: &RolloutPolicy,
        now_ms: i64,
    ) -> Vec<Action> {
        self.phase = Phase::Steady;
        vec![
            Action::Alias {
                alias: "canary",
                version: None,
            },
            Action::Alias {
                alias: "challenger",
                version: None,
            },
            self.event(Stage::RolledBack, version, reason, p, now_ms),
        ]
    }

    fn promote(
        &mut self,
        version: &str,
        reason: String,
        p: &RolloutPolicy,
        now_ms: i64,
    ) -> Vec<Action> {
        self.previous_champion = self.champion.replace(version.to_string());
        self.phase = Phase::Steady;
        let mut out = vec![
            Action::Alias {
                alias: "champion",
                version: Some(version.to_string()),
            },
            Action::Alias {
                alias: "canary",
                version: None,
            },
            Action::Alias {
                alias: "challenger",
                version: None,
            },
            self.event(Stage::Promoted, version, reason, p, now_ms),
        ];
        if let Some(old) = self.previous_champion.clone() {
            out.push(self.event(
                Stage::Archived,
                &old,
                format!("replaced by v{version}; kept for rollback"),
                p,
                now_ms,
            ));
        }
        out
    }

    /// Time passes: take the next step, promote, or roll back.
    pub fn on_tick(&mut self, p: &RolloutPolicy, now_ms: i64) -> Vec<Action> {
        match self.phase.clone() {
            Phase::Steady => Vec::new(),
            Phase::Shadow {
                version,
                since_ms,
                after_window_ms,
            } => {
                let pairs: u64 = self
                    .champion
                    .as_ref()
                    .and_then(|c| self.windows.get(c))
                    .map(|ws| {
                        ws.iter()
                            .filter(|(k, _)| after_window_ms.is_none_or(|a| **k > a))
                            .filter_map(|(_, w)| w.shadow_pairs.get(&version))
                            .sum()
                    })
                    .unwrap_or(0);
                // A challenger that fails on leads in shadow never reaches the canary.
                let errors: u64 = self
                    .windows
                    .get(&version)
                    .map(|ws| {
                        ws.iter()
                            .filter(|(k, _)| after_window_ms.is_none_or(|a| **k > a))
                            .map(|(_, w)| w.errors)
                            .sum()
                    })
                    .unwrap_or(0);
                if errors > 0 {
                    let rate = errors as f64 / (pairs + errors) as f64;
                    if rate > p.max_error_rate {
                        return self.abort(
                            &version,
                            format!(
                                "automatic rollback of v{version} in shadow: error rate {:.2}% above {:.2}% ({errors} failed leads, {pairs} scored)",
                                rate * 100.0,
                                p.max_error_rate * 100.0
                            ),
                            p,
                            now_ms,
                        );
                    }
                }
                if now_ms - since_ms < p.shadow_min_ms || pairs < p.shadow_min_pairs {
                    return Vec::new();
                }
                self.phase = Phase::Canary {
                    version: version.clone(),
                    step: 0,
                    since_ms: now_ms,
                    after_window_ms: self.latest_window_ms,
                };
                vec![
                    Action::Alias {
                        alias: "canary",
                        version: Some(version.clone()),
                    },
                    self.event(
                        Stage::Canary,
                        &version,
                        format!(
                            "{pairs} shadow pairs: canary at {}%",
                            p.steps.first().copied().unwrap_or(100)
                        ),
                        p,
                        now_ms,
                    ),
                ]
            }
            Phase::Canary {
                version,
                step,
                since_ms,
                after_window_ms,
            } => {
                if let Some(why) = self.regression(&version, after_window_ms, p) {
                    return self.abort(
                        &version,
                        format!("automatic rollback of v{version}: {why}"),
                        p,
                        now_ms,
                    );
                }
                let scored: u64 = self
                    .windows
                    .get(&version)
                    .map(|ws| {
                        // Only windows the champion has reported too: the step is judged on them.
                        let champion = self.champion.as_ref().and_then(|c| self.windows.get(c));
                        ws.iter()
                            .filter(|(k, _)| after_window_ms.is_none_or(|a| **k > a))
                            .filter(|(k, _)| champion.is_none_or(|c| c.contains_key(k)))
                            .map(|(_, w)| w.scored)
                            .sum()
                    })
                    .unwrap_or(0);
                if now_ms - since_ms < p.step_min_ms || scored < p.step_min_scores {
                    return Vec::new();
                }
                if step + 1 < p.steps.len() {
                    self.phase = Phase::Canary {
                        version: version.clone(),
                        step: step + 1,
                        since_ms: now_ms,
                        after_window_ms: self.latest_window_ms,
                    };
                    let reason = format!(
                        "{scored} canary scores at {}% without regression: canary at {}%",
                        p.steps[step],
                        p.steps[step + 1]
                    );
                    vec![self.event(Stage::Canary, &version, reason, p, now_ms)]
                } else {
                    let reason = format!(
                        "{scored} canary scores at {}% without regression: promoted",
                        p.steps[step]
                    );
                    self.promote(&version, reason, p, now_ms)
                }
            }
        }
    }

    /// An operator promotes the candidate now.
    pub fn promote_now(
        &mut self,
        by: &str,
        p: &RolloutPolicy,
        now_ms: i64,
    ) -> Result<Vec<Action>, String> {
        let Some(version) = self.candidate().map(str::to_string) else {
            return Err(format!("{} has no candidate to promote", self.model_name));
        };
        Ok(self.promote(&version, format!("promoted by {by}"), p, now_ms))
    }

    /// An operator rolls back: the candidate if there is one, else the last promotion.
    pub fn rollback_now(
        &mut self,
        by: &str,
        p: &RolloutPolicy,
        now_ms: i64,
    ) -> Result<Vec<Action>, String> {
        if let Some(version) = self.candidate().map(str::to_string) {
            return Ok(self.abort(&version, format!("rolled back by {by}"), p, now_ms));
        }
        let (Some(current), Some(previous)) =
            (self.champion.clone(), self.previous_champion.take())
        else {
            return Err(format!(
                "{} has no earlier champion to roll back to",
                self.model_name
            ));
        };
        self.champion = Some(previous.clone());
        Ok(vec![
            Action::Alias {
                alias: "champion",
                version: Some(previous.clone()),
            },
            self.event(
                Stage::RolledBack,
                &current,
                format!("rolled back by {by}: v{previous} is champion again"),
                p,
                now_ms,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const H: i64 = 3_600_000;

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            shadow_min_ms: 2 * H,
            shadow_min_pairs: 100,
            steps: vec![10, 50, 100],
            step_min_ms: H,
            step_min_scores: 50,
            ..Default::default()
        }
    }

    fn registered(version: &str) -> LifecycleEvent {
        LifecycleEvent {
            event_id: format!("req/{version}"),
            model_name: "m".into(),
            version: version.into(),
            stage: Stage::Registered,
            canary_percent: 0,
            champion_version: None,
            challenger_version: Some(version.into()),
            reason: "trained".into(),
            at_ms: 0,
        }
    }

    fn stages(actions: &[Action]) -> Vec<(Stage, i32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(e) => Some((e.stage, e.canary_percent)),
                _ => None,
            })
            .collect()
    }

    fn window(scored: u64, p95: f64, shadow: Option<(&str, u64)>) -> VersionWindow {
        VersionWindow {
            scored,
            errors: 0,
            p95_ms: Some(p95),
            high_conversion: None,
            high_revenue_per_lead: None,
            shadow_pairs: shadow
                .map(|(v, n)| BTreeMap::from([(v.to_string(), n)]))
                .unwrap_or_default(),
        }
    }

    fn rollout() -> Rollout {
        let mut r = Rollout::new("m");
        r.champion = Some("1".into());
        r
    }

    #[test]
    fn a_good_candidate_goes_shadow_canary_10_50_100_then_champion() {
        let p = policy();
        let mut r = rollout();
        let a = r.on_event(&registered("2"), &p, 0);
        assert_eq!(stages(&a), [(Stage::Shadow, 0)]);
        assert!(a.contains(&Action::Alias {
            alias: "challenger",
            version: Some("2".into())
        }));
        // Not enough time nor pairs yet.
        assert!(r.on_tick(&p, H).is_empty());
        r.on_window("1", 0, window(500, 100.0, Some(("2", 120))));
        assert!(r.on_tick(&p, H).is_empty(), "too early");
        let a = r.on_tick(&p, 2 * H);
        assert_eq!(stages(&a), [(Stage::Canary, 10)]);
        let mut t = 2 * H;
        for (step, next) in [(10, Some(50)), (50, Some(100)), (100, None)] {
            r.on_window("2", t, window(60, 110.0, None));
            r.on_window("1", t, window(500, 100.0, None));
            assert!(
                r.on_tick(&p, t + H / 2).is_empty(),
                "step {step}: too early"
            );
            t += H;
            let a = r.on_tick(&p, t);
            match next {
                Some(n) => assert_eq!(stages(&a), [(Stage::Canary, n)]),
                None => {
                    assert_eq!(stages(&a), [(Stage::Promoted, 0), (Stage::Archived, 0)]);
                    assert!(a.contains(&Action::Alias {
                        alias: "champion",
                        version: Some("2".into())
                    }));
                    assert!(a.contains(&Action::Alias {
                        alias: "canary",
                        version: None
                    }));
                }
            }
        }
        assert_eq!(r.champion.as_deref(), Some("2"));
        assert_eq!(r.phase, Phase::Steady);
        // One command puts the previous champion back.
        let a = r.rollback_now("ops-1", &p, t).unwrap();
        assert_eq!(stages(&a), [(Stage::RolledBack, 0)]);
        assert_eq!(r.champion.as_deref(), Some("1"));
        assert!(
            r.rollback_now("ops-1", &p, t).is_err(),
            "nothing earlier to go back to"
        );
    }

    #[test]
    fn a_step_counts_only_windows_newer_than_its_start() {
        let p = policy();
        let mut r = rollout();
        r.on_event(&registered("2"), &p, 0);
        r.on_window("1", 0, window(500, 100.0, Some(("2", 200))));
        assert_eq!(stages(&r.on_tick(&p, 2 * H)), [(Stage::Canary, 10)]);
        // The window that started the canary does not count for the next step.
        r.on_window("2", 0, window(500, 100.0, None));
        assert!(r.on_tick(&p, 10 * H).is_empty());
        r.on_window("2", H, window(60, 100.0, None));
        assert!(
            r.on_tick(&p, 10 * H).is_empty(),
            "the champion has not reported that window yet"
        );
        r.on_window("1", H, window(500, 100.0, None));
        assert_eq!(stages(&r.on_tick(&p, 10 * H)), [(Stage::Canary, 50)]);
        assert!(r.on_tick(&p, 20 * H).is_empty(), "no newer window yet");
    }

    #[test]
    fn a_slower_or_worse_converting_canary_is_rolled_back_automatically() {
        let p = policy();
        for (cand, champ, why) in [
            (
                window(60, 400.0, None),
                window(500, 100.0, None),
                "p95 latency",
            ),
            (
                VersionWindow {
                    high_conversion: Some(0.2),
                    ..window(60, 100.0, None)
                },
                VersionWindow {
                    high_conversion: Some(0.4),
                    ..window(500, 100.0, None)
                },
                "High-band conversion",
            ),
            (
                // Converts as well, but its High band wins smaller deals: 30% less per lead.
                VersionWindow {
                    high_conversion: Some(0.4),
                    high_revenue_per_lead: Some(7_000.0),
                    ..window(60, 100.0, None)
                },
                VersionWindow {
                    high_conversion: Some(0.4),
                    high_revenue_per_lead: Some(10_000.0),
                    ..window(500, 100.0, None)
                },
                "High-band revenue per lead",
            ),
            (
                VersionWindow {
                    errors: 10,
                    ..window(60, 100.0, None)
                },
                window(500, 100.0, None),
                "error rate",
            ),
        ] {
            let mut r = rollout();
            r.on_event(&registered("2"), &p, 0);
            r.on_window("1", 0, window(500, 100.0, Some(("2", 200))));
            assert_eq!(stages(&r.on_tick(&p, 2 * H)), [(Stage::Canary, 10)]);
            r.on_window("2", 2 * H, cand);
            r.on_window("1", 2 * H, champ);
            let a = r.on_tick(&p, 2 * H + 1);
            assert_eq!(stages(&a), [(Stage::RolledBack, 0)], "{why}");
            let Action::Event(e) = a.last().unwrap() else {
                panic!()
            };
            assert!(e.reason.contains(why), "{}", e.reason);
            assert!(a.contains(&Action::Alias {
                alias: "canary",
                version: None
            }));
            assert_eq!(r.champion.as_deref(), Some("1"));
        }
    }

    #[test]
    fn revenue_within_the_allowed_drop_or_with_the_rule_off_keeps_the_canary() {
        for (drop, cand_revenue) in [(0.2, 8_500.0), (1.0, 1_000.0)] {
            let p = RolloutPolicy {
                max_revenue_drop: drop,
                ..policy()
            };
            let mut r = rollout();
            r.on_event(&registered("2"), &p, 0);
            r.on_window("1", 0, window(500, 100.0, Some(("2", 200))));
            assert_eq!(stages(&r.on_tick(&p, 2 * H)), [(Stage::Canary, 10)]);
            let with = |revenue: f64, scored: u64| VersionWindow {
                high_revenue_per_lead: Some(revenue),
                ..window(scored, 100.0, None)
            };
            r.on_window("2", 2 * H, with(cand_revenue, 60));
            r.on_window("1", 2 * H, with(10_000.0, 500));
            assert!(
                r.on_tick(&p, 2 * H + 1)
                    .iter()
                    .all(|a| !matches!(a, Action::Event(e) if e.stage == Stage::RolledBack)),
                "drop {drop}, revenue {cand_revenue}"
            );
        }
    }

    #[test]
    fn outcome_reports_carry_high_band_revenue_per_lead() {
        use apache_avro::types::Value;
        let map = |v: f64| Value::Map([("High".to_string(), Value::Double(v))].into());
        let report = Value::Record(vec![
            ("model_name".into(), Value::String("m".into())),
            ("model_version".into(), Value::String("2".into())),
            ("window_kind".into(), Value::Enum(0, "hourly".into())),
            ("window_start".into(), Value::TimestampMillis(3_600_000)),
            ("scored".into(), Value::Long(900)),
            (
                "outcomes".into(),
                Value::Union(
                    1,
                    Box::new(Value::Record(vec![
                        ("labelled".into(), Value::Long(50)),
                        ("conversion_rate_by_band".into(), map(0.4)),
                        ("revenue_by_band".into(), map(120_000.0)),
                        ("revenue_per_lead_by_band".into(), map(6_000.0)),
                    ])),
                ),
            ),
        ]);
        let (_, version, start, w) = VersionWindow::from_report(&report).unwrap();
        assert_eq!((version.as_str(), start), ("2", 3_600_000));
        assert_eq!(w.high_conversion, Some(0.4));
        assert_eq!(w.high_revenue_per_lead, Some(6_000.0));
        assert_eq!(w.scored, 0, "an outcome report repeats its window");
    }

    #[test]
    fn a_challenger_failing_in_shadow_is_rolled_back_and_rare_failures_are_tolerated() {
        let p = policy();
        let mut r = rollout();
        r.on_event(&registered("2"), &p, 0);
        // 1 failure in 200: 0.5%, under the 2% limit.
        r.on_window("1", 0, window(500, 100.0, Some(("2", 199))));
        r.on_window(
            "2",
            0,
            VersionWindow {
                errors: 1,
                ..Default::default()
            },
        );
        assert!(r.on_tick(&p, H).is_empty(), "0.5% failures: keep shadowing");
        // The next window: 30 failures of 130: far above.
        r.on_window("1", H, window(500, 100.0, Some(("2", 100))));
        r.on_window(
            "2",
            H,
            VersionWindow {
                errors: 30,
                ..Default::default()
            },
        );
        let a = r.on_tick(&p, H + 1);
        assert_eq!(stages(&a), [(Stage::RolledBack, 0)]);
        assert!(a.contains(&Action::Alias {
            alias: "challenger",
            version: None
        }));
        let Some(Action::Event(e)) = a.last() else {
            panic!("no event: {a:?}")
        };
        assert!(e.reason.contains("error rate"), "{}", e.reason);
        assert_eq!(r.phase, Phase::Steady);
    }

    #[test]
    fn operators_promote_or_roll_back_a_candidate_and_state_survives_serialisation() {
        let p = policy();
        let mut r = rollout();
        assert!(r.promote_now("ops", &p, 0).is_err());
        r.on_event(&registered("2"), &p, 0);
        let text = serde_json::to_string(&r).unwrap();
        let mut back: Rollout = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let a = back.promote_now("ops", &p, 5).unwrap();
        assert_eq!(stages(&a)[0], (Stage::Promoted, 0));
        r.on_event(&registered("2"), &p, 0);
        assert_eq!(
            stages(&r.rollback_now("ops", &p, 5).unwrap()),
            [(Stage::RolledBack, 0)]
        );
        // Events the controller wrote itself are not acted on again.
        let mut own = registered("3");
        own.event_id = format!("{EVENT_PREFIX}m/9");
        assert!(r.on_event(&own, &p, 0).is_empty());
    }
}
