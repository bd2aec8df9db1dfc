//! Retrain policies: drift, schedule, manual; cooldown; minimum data.

use std::collections::BTreeMap;

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// The policy, from configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// PSI above this for `sustained_windows` consecutive windows asks for a retrain.
    pub psi_sustained: f64,
    /// Consecutive hourly windows for the sustained rule.
    pub sustained_windows: u32,
    /// PSI above this in one window asks at once.
    pub psi_immediate: f64,
    /// Scheduled retraining period while the champion is young, ms.
    pub young_every_ms: i64,
    /// Scheduled retraining period afterwards, ms.
    pub mature_every_ms: i64,
    /// How long a champion is young, ms.
    pub young_for_ms: i64,
    /// No new request sooner than this after the last one, ms (manual requests ignore it).
    pub cooldown_ms: i64,
    /// Fewest labelled rows in the data window.
    pub min_labelled_rows: u64,
    /// Fewest won deals with a value in the data window (0: no revenue needed), so the
    /// candidate's revenue per lead can be judged.
    pub min_valued_wins: u64,
}

/// What the CRM holds in the data window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataWindow {
    /// Leads with an outcome (converted or lost).
    pub labelled: u64,
    /// Converted leads whose deal value is entered.
    pub valued_wins: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            psi_sustained: 0.25,
            sustained_windows: 3,
            psi_immediate: 0.5,
            young_every_ms: 7 * DAY_MS,
            mature_every_ms: 30 * DAY_MS,
            young_for_ms: 90 * DAY_MS,
            cooldown_ms: 7 * DAY_MS,
            min_labelled_rows: 10_000,
            min_valued_wins: 0,
        }
    }
}

/// What started a candidate (`RetrainTrigger`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// Drift in the window reports.
    Drift,
    /// The schedule.
    Schedule,
    /// An operator.
    Manual,
}

impl Trigger {
    /// Symbol in the schema, and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Drift => "drift",
            Trigger::Schedule => "schedule",
            Trigger::Manual => "manual",
        }
    }

    fn index(self) -> u32 {
        match self {
            Trigger::Drift => 0,
            Trigger::Schedule => 1,
            Trigger::Manual => 2,
        }
    }
}

/// One piece of evidence (`Evidence`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// `psi` or `score_psi`, `schedule`, `manual`.
    pub kind: String,
    /// Feature, if any.
    pub feature: Option<String>,
    /// Measured value.
    pub value: f64,
    /// Threshold crossed.
    pub threshold: f64,
    /// Window, if any.
    pub window_start_ms: Option<i64>,
}

/// A reason to retrain, before the gates.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Model name.
    pub model_name: String,
    /// What started it.
    pub trigger: Trigger,
    /// For people.
    pub reason: String,
    /// What was measured.
    pub evidence: Vec<Evidence>,
    /// Operator, for manual requests.
    pub requested_by: Option<String>,
}

/// Why a candidate was not sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Too soon after the last request.
    Cooldown {
        /// When the last request was made, ms.
        last_ms: i64,
        /// When the next may be made, ms.
        until_ms: i64,
    },
    /// Too few labelled rows to train on.
    NotEnoughData {
        /// Rows available.
        have: u64,
        /// Rows needed.
        need: u64,
    },
    /// Too few won deals with a value to judge revenue per lead.
    NotEnoughRevenue {
        /// Won deals with a value.
        have: u64,
        /// Needed.
        need: u64,
    },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Cooldown { until_ms, .. } => {
                write!(
                    f,
                    "cooldown: the last request is too recent; next allowed at {until_ms} ms"
                )
            }
            Refusal::NotEnoughData { have, need } => {
                write!(
                    f,
                    "not enough data: {have} labelled rows in the data window, {need} needed"
                )
            }
            Refusal::NotEnoughRevenue { have, need } => {
                write!(
                    f,
                    "not enough revenue data: {have} won deals with a value (leads.deal_value) in the data window, {need} needed"
                )
            }
        }
    }
}

impl Refusal {
    /// Label value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::Cooldown { .. } => "cooldown",
            Refusal::NotEnoughData { .. } => "not_enough_data",
            Refusal::NotEnoughRevenue { .. } => "not_enough_revenue",
        }
    }
}

/// The gates' verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send the request.
    Request(Candidate),
    /// Do not, because.
    NotNow(Candidate, Refusal),
}

/// An hourly window report, as the trigger reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportView {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Window start, ms.
    pub start_ms: i64,
    /// PSI per feature.
    pub psi: Vec<(String, f64)>,
    /// Score PSI.
    pub score_psi: Option<f64>,
}

impl ReportView {
    /// Reads a `WindowReport` value; `None` for daily and weekly roll-ups and outcome reports (only base windows count).
    pub fn from_value(value: &Value) -> Option<Self> {
        let Value::Record(fields) = value else {
            return None;
        };
        let get = |name: &str| leadscore_schemas::Fields::new(fields).get(name);
        let string = |name: &str| match get(name)? {
            Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
            _ => None,
        };
        if matches!(string("window_kind")?.as_str(), "daily" | "weekly") {
            return None;
        }
        let Value::Array(features) = get("features")? else {
            return None;
        };
        if features.is_empty() {
            return None; // an outcome report
        }
        let psi = features
            .iter()
            .filter_map(|f| {
                let Value::Record(ff) = f else { return None };
                let name = ff
                    .iter()
                    .find(|(n, _)| n == "feature")
                    .and_then(|(_, v)| match v {
                        Value::String(s) => Some(s.clone()),
                        _ => None,
                    })?;
                let psi = ff
                    .iter()
                    .find(|(n, _)| n == "psi")
                    .and_then(|(_, v)| match v {
                        Value::Double(d) => Some(*d),
                        _ => None,
                    })?;
                // A feature this window does not judge (a calendar feature in an hourly
                // window) asks for nothing; reports without the flag judge everything.
                let judged = !ff
                    .iter()
                    .any(|(n, v)| n == "judged" && matches!(v, Value::Boolean(false)));
                judged.then_some((name, psi))
            })
            .collect();
        Some(Self {
            model_name: string("model_name")?,
            model_version: string("model_version")?,
            start_ms: match get("window_start")? {
                Value::TimestampMillis(t) | Value::Long(t) => *t,
                _ => return None,
            },
            psi,
            score_psi: match (get("score_psi"), get("score_judged")) {
                (_, Some(Value::Boolean(false))) => None,
                (Some(Value::Double(d)), _) => Some(*d),
                _ => None,
            },
        })
    }
}

/// What the trigger remembers about one model: checkpointed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelState {
    /// Consecutive windows above the sustained threshold, per feature (`score` for the score).
    pub streaks: BTreeMap<String, u32>,
    /// Start of the last window counted, ms (reports are counted once, in order).
    pub last_window_ms: Option<i64>,
    /// When the last request (any trigger) was made, ms.
    pub last_request_ms: Option<i64>,
    /// Since when the current champion serves, ms.
    pub champion_since_ms: Option<i64>,
}

const SCORE: &str = "score";

impl ModelState {
    /// Counts one hourly report; a drift candidate when a rule fires.
    pub fn on_report(&mut self, r: &ReportView, p: &Policy) -> Option<Candidate> {
        if self.last_window_ms.is_some_and(|w| r.start_ms <= w) {
            return None; // already counted (redelivery or an older window)
        }
        self.last_window_ms = Some(r.start_ms);
        let mut evidence = Vec::new();
        let mut immediate = false;
        let values = r
            .psi
            .iter()
            .map(|(f, v)| (f.as_str(), *v))
            .chain(r.score_psi.map(|v| (SCORE, v)));
        let mut seen = Vec::new();
        for (feature, psi) in values {
            seen.push(feature.to_string());
            let kind = if feature == SCORE { "score_psi" } else { "psi" };
            let streak = self.streaks.entry(feature.to_string()).or_default();
            if psi > p.psi_sustained {
                *streak += 1;
            } else {
                *streak = 0;
            }
            let ev = |threshold| Evidence {
                kind: kind.into(),
                feature: (feature != SCORE).then(|| feature.to_string()),
                value: psi,
                threshold,
                window_start_ms: Some(r.start_ms),
            };
            if psi > p.psi_immediate {
                immediate = true;
                evidence.push(ev(p.psi_immediate));
            } else if *streak >= p.sustained_windows {
                evidence.push(ev(p.psi_sustained));
            }
        }
        self.streaks.retain(|f, _| seen.contains(f));
        if evidence.is_empty() {
            return None;
        }
        let what: Vec<String> = evidence
            .iter()
            .map(|e| format!("{} {:.3}", e.feature.as_deref().unwrap_or(SCORE), e.value))
            .collect();
        let reason = if immediate {
            format!(
                "PSI above {} in window {}: {}",
                p.psi_immediate,
                r.start_ms,
                what.join(", ")
            )
        } else {
            format!(
                "PSI above {} for {} consecutive windows: {}",
                p.psi_sustained,
                p.sustained_windows,
                what.join(", ")
            )
        };
        Some(Candidate {
            model_name: r.model_name.clone(),
            trigger: Trigger::Drift,
            reason,
            evidence,
            requested_by: None,
        })
    }

    /// A schedule candidate when the period since the last request (or the champion's start) has passed.
    pub fn on_tick(&mut self, model_name: &str, now_ms: i64, p: &Policy) -> Option<Candidate> {
        let since = *self.champion_since_ms.get_or_insert(now_ms);
        let every = if now_ms - since < p.young_for_ms {
            p.young_every_ms
        } else {
            p.mature_every_ms
        };
        let anchor = self.last_request_ms.unwrap_or(since).max(since);
        if now_ms - anchor < every {
            return None;
        }
        Some(Candidate {
            model_name: model_name.to_string(),
            trigger: Trigger::Schedule,
            reason: format!(
                "scheduled: {} days since the last training request (every {} days at this model age)",
                (now_ms - anchor) / DAY_MS,
                every / DAY_MS
            ),
            evidence: vec![Evidence {
                kind: "schedule".into(),
                feature: None,
                value: (now_ms - anchor) as f64 / DAY_MS as f64,
                threshold: every as f64 / DAY_MS as f64,
                window_start_ms: None,
            }],
            requested_by: None,
        })
    }

    /// The gates: cooldown (not for manual requests), then minimum labelled rows, then
    /// minimum won deals with a value.
    pub fn gate(&self, c: Candidate, now_ms: i64, data: DataWindow, p: &Policy) -> Decision {
        if c.trigger != Trigger::Manual
            && let Some(last) = self.last_request_ms
            && now_ms - last < p.cooldown_ms
        {
            return Decision::NotNow(
                c,
                Refusal::Cooldown {
                    last_ms: last,
                    until_ms: last + p.cooldown_ms,
                },
            );
        }
        if data.labelled < p.min_labelled_rows {
            return Decision::NotNow(
                c,
                Refusal::NotEnoughData {
                    have: data.labelled,
                    need: p.min_labelled_rows,
                },
            );
        }
        if data.valued_wins < p.min_valued_wins {
            return Decision::NotNow(
                c,
                Refusal::NotEnoughRevenue {
                    have: data.valued_wins,
                    need: p.min_valued_wins,
                },
            );
        }
        Decision::Request(c)
    }

    /// Records a request made (by this trigger or by anyone else on the topic).
    pub fn requested(&mut self, at_ms: i64) {
        self.last_request_ms = Some(self.last_request_ms.map_or(at_ms, |l| l.max(at_ms)));
        // The drift that asked has been answered: start counting afresh.
        self.streaks.clear();
    }
}

/// A request to publish (`RetrainRequest`).
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Idempotency key.
    pub request_id: String,
    /// The candidate that passed.
    pub candidate: Candidate,
    /// When, ms.
    pub requested_at_ms: i64,
}

impl Request {
    /// The `RetrainRequest` Avro value.
    pub fn to_value(&self) -> Value {
        let c = &self.candidate;
        let opt_s = |s: &Option<String>| match s {
            Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
            None => Value::Union(0, Box::new(Value::Null)),
        };
        Value::Record(vec![
            ("request_id".into(), Value::String(self.request_id.clone())),
            ("model_name".into(), Value::String(c.model_name.clone())),
            (
                "trigger".into(),
                Value::Enum(c.trigger.index(), c.trigger.as_str().into()),
            ),
            ("reason".into(), Value::String(c.reason.clone())),
            (
                "evidence".into(),
                Value::Array(
                    c.evidence
                        .iter()
                        .map(|e| {
                            Value::Record(vec![
                                ("kind".into(), Value::String(e.kind.clone())),
                                ("feature".into(), opt_s(&e.feature)),
                                ("value".into(), Value::Double(e.value)),
                                ("threshold".into(), Value::Double(e.threshold)),
                                (
                                    "window_start".into(),
                                    match e.window_start_ms {
                                        Some(t) => {
                                            Value::Union(1, Box::new(Value::TimestampMillis(t)))
                                        }
                                        None => Value::Union(0, Box::new(Value::Null)),
                                    },
                                ),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("requested_by".into(), opt_s(&c.requested_by)),
            (
                "requested_at".into(),
                Value::TimestampMillis(self.requested_at_ms),
            ),
        ])
    }
}

/// Reads `model_name` and `requested_at` of a `RetrainRequest` value.
pub fn request_time(value: &Value) -> Option<(String, i64)> {
    let Value::Record(fields) = value else {
        return None;
    };
    let name = fields
        .iter()
        .find(|(n, _)| n == "model_name")
        .and_then(|(_, v)| match v {
            Value::String(s) => Some(s.clone()),
            _ => None,
        })?;
    let at = fields
        .iter()
        .find(|(n, _)| n == "requested_at")
        .and_then(|(_, v)| match v {
            Value::TimestampMillis(t) | Value::Long(t) => Some(*t),
            _ => None,
        })?;
    Some((name, at))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn report(start: i64, psi: &[(&str, f64)], score: f64) -> ReportView {
        ReportView {
            model_name: "lead-scoring".into(),
            model_version: "3".into(),
            start_ms: start,
            psi: psi.iter().map(|(f, v)| (f.to_string(), *v)).collect(),
            score_psi: Some(score),
        }
    }

    const H: i64 = 3_600_000;

    #[test]
    fn a_report_view_leaves_out_what_its_window_does_not_judge() {
        let feature = |name: &str, psi: f64, judged: Option<bool>| {
            let mut f = vec![
                ("feature".to_string(), Value::String(name.into())),
                ("psi".to_string(), Value::Double(psi)),
            ];
            if let Some(j) = judged {
                f.push(("judged".to_string(), Value::Boolean(j)));
            }
            Value::Record(f)
        };
        let value = |score_judged: Option<bool>| {
            let mut r = vec![
                ("model_name".to_string(), Value::String("m".into())),
                ("model_version".to_string(), Value::String("1".into())),
                ("window_kind".to_string(), Value::Enum(0, "hourly".into())),
                ("window_start".to_string(), Value::TimestampMillis(H)),
                (
                    "features".to_string(),
                    Value::Array(vec![
                        feature("hour_of_day", 8.0, Some(false)),
                        feature("industry", 0.3, Some(true)),
                        feature("country", 0.1, None),
                    ]),
                ),
                (
                    "score_psi".to_string(),
                    Value::Union(1, Box::new(Value::Double(0.4))),
                ),
            ];
            if let Some(j) = score_judged {
                r.push(("score_judged".to_string(), Value::Boolean(j)));
            }
            Value::Record(r)
        };
        let v = ReportView::from_value(&value(Some(false))).unwrap();
        assert_eq!(
            v.psi,
            [("industry".to_string(), 0.3), ("country".to_string(), 0.1)]
        );
        assert_eq!(v.score_psi, None);
        // A report written before the flags existed judges everything.
        assert_eq!(
            ReportView::from_value(&value(None)).unwrap().score_psi,
            Some(0.4)
        );
    }

    #[test]
    fn sustained_drift_asks_after_n_windows_and_a_gap_resets_the_streak() {
        let p = Policy::default();
        let mut s = ModelState::default();
        assert!(
            s.on_report(&report(0, &[("industry", 0.3)], 0.0), &p)
                .is_none()
        );
        assert!(
            s.on_report(&report(H, &[("industry", 0.3)], 0.0), &p)
                .is_none()
        );
        // A quiet window in between: the streak starts again.
        assert!(
            s.on_report(&report(2 * H, &[("industry", 0.1)], 0.0), &p)
                .is_none()
        );
        assert!(
            s.on_report(&report(3 * H, &[("industry", 0.3)], 0.0), &p)
                .is_none()
        );
        assert!(
            s.on_report(&report(4 * H, &[("industry", 0.3)], 0.0), &p)
                .is_none()
        );
        let c = s
            .on_report(&report(5 * H, &[("industry", 0.3)], 0.0), &p)
            .unwrap();
        assert_eq!(c.trigger, Trigger::Drift);
        assert_eq!(c.evidence.len(), 1);
        assert_eq!(c.evidence[0].feature.as_deref(), Some("industry"));
        assert_eq!(c.evidence[0].threshold, 0.25);
        // The same window again (a redelivery) is not counted twice.
        assert!(
            s.on_report(&report(5 * H, &[("industry", 0.3)], 0.0), &p)
                .is_none()
        );
    }

    #[test]
    fn critical_drift_on_a_feature_or_the_score_asks_at_once() {
        let p = Policy::default();
        let mut s = ModelState::default();
        let c = s
            .on_report(&report(0, &[("page_views", 0.7)], 0.1), &p)
            .unwrap();
        assert_eq!(c.evidence[0].threshold, 0.5);
        let c = s
            .on_report(&report(H, &[("page_views", 0.1)], 0.9), &p)
            .unwrap();
        assert_eq!(c.evidence[0].kind, "score_psi");
        assert_eq!(c.evidence[0].feature, None);
    }

    #[test]
    fn the_schedule_is_weekly_while_young_then_monthly() {
        let p = Policy::default();
        let mut s = ModelState {
            champion_since_ms: Some(0),
            ..Default::default()
        };
        assert!(s.on_tick("m", 6 * DAY_MS, &p).is_none());
        assert!(s.on_tick("m", 7 * DAY_MS, &p).is_some());
        s.requested(7 * DAY_MS);
        assert!(s.on_tick("m", 13 * DAY_MS, &p).is_none());
        assert!(s.on_tick("m", 14 * DAY_MS, &p).is_some());
        // Past three months: monthly.
        s.requested(91 * DAY_MS);
        assert!(s.on_tick("m", 98 * DAY_MS, &p).is_none());
        assert!(s.on_tick("m", 121 * DAY_MS, &p).is_some());
    }

    fn labelled(n: u64) -> DataWindow {
        DataWindow {
            labelled: n,
            valued_wins: 0,
        }
    }

    #[test]
    fn the_revenue_gate_counts_valued_wins_only_when_asked() {
        let c = Candidate {
            model_name: "m".into(),
            trigger: Trigger::Manual,
            reason: "operator".into(),
            evidence: Vec::new(),
            requested_by: None,
        };
        let data = DataWindow {
            labelled: 20_000,
            valued_wins: 499,
        };
        let s = ModelState::default();
        assert!(matches!(
            s.gate(c.clone(), 0, data, &Policy::default()),
            Decision::Request(_)
        ));
        let p = Policy {
            min_valued_wins: 500,
            ..Policy::default()
        };
        match s.gate(c.clone(), 0, data, &p) {
            Decision::NotNow(
                _,
                r @ Refusal::NotEnoughRevenue {
                    have: 499,
                    need: 500,
                },
            ) => {
                assert_eq!(r.as_str(), "not_enough_revenue");
                assert!(r.to_string().contains("499 won deals with a value"), "{r}");
            }
            other => panic!("{other:?}"),
        }
        let enough = DataWindow {
            valued_wins: 500,
            ..data
        };
        assert!(matches!(s.gate(c, 0, enough, &p), Decision::Request(_)));
    }

    #[test]
    fn gates_refuse_with_the_reason_and_manual_requests_skip_the_cooldown() {
        let p = Policy::default();
        let mut s = ModelState::default();
        s.requested(0);
        let c = s.on_report(&report(H, &[("x", 0.9)], 0.0), &p).unwrap();
        match s.gate(c.clone(), DAY_MS, labelled(50_000), &p) {
            Decision::NotNow(_, Refusal::Cooldown { until_ms, .. }) => {
                assert_eq!(until_ms, 7 * DAY_MS)
            }
            other => panic!("{other:?}"),
        }
        match s.gate(c.clone(), 8 * DAY_MS, labelled(9_999), &p) {
            Decision::NotNow(
                _,
                r @ Refusal::NotEnoughData {
                    have: 9_999,
                    need: 10_000,
                },
            ) => {
                assert!(r.to_string().contains("9999 labelled rows"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.gate(c.clone(), 8 * DAY_MS, labelled(10_000), &p),
            Decision::Request(_)
        ));
        let manual = Candidate {
            trigger: Trigger::Manual,
            ..c
        };
        assert!(matches!(
            s.gate(manual, DAY_MS, labelled(10_000), &p),
            Decision::Request(_)
        ));
    }

    #[test]
    fn requests_fit_the_schema_and_read_back() {
        let schema = apache_avro::Schema::parse_str(
            leadscore_schemas::find("RetrainRequest.avsc").unwrap().text,
        )
        .unwrap();
        let mut s = ModelState::default();
        let c = s
            .on_report(&report(H, &[("x", 0.9)], 0.7), &Policy::default())
            .unwrap();
        let r = Request {
            request_id: "r-1".into(),
            candidate: c,
            requested_at_ms: 42,
        };
        let v = r.to_value();
        assert!(v.validate(&schema));
        assert_eq!(request_time(&v), Some(("lead-scoring".into(), 42)));
    }
}
