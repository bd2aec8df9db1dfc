//! The monitoring dashboard's state: what the page shows, folded from the project's own
//! topics (window reports, alerts, lifecycle events, live scores). Pure: records in, a JSON
//! snapshot out; no I/O here (the service feeds it and pushes snapshots to the page).

use std::collections::{BTreeMap, VecDeque};

use apache_avro::types::Value;
use serde_json::{Map, Value as Json, json};

/// A decoded Avro value as JSON: records and maps to objects, unions to their branch, enums
/// to their symbol, timestamps to milliseconds.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Boolean(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Long(l) | Value::TimestampMillis(l) | Value::TimestampMicros(l) => json!(l),
        Value::Float(f) => json!(f),
        Value::Double(d) => {
            if d.is_finite() {
                json!(d)
            } else {
                Json::Null
            }
        }
        Value::String(s) | Value::Enum(_, s) => json!(s),
        Value::Union(_, inner) => to_json(inner),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Value::Record(fields) => Json::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
        other => json!(format!("{other:?}")),
    }
}

/// The page: one HTML file with its script and styles inline (no build step, no CDN). It
/// follows `events` (server-sent snapshots) and renders them.
pub const PAGE: &str = include_str!("page.html");

/// The score distribution shown covers this much time.
pub const BAND_WINDOW_MS: i64 = 5 * 60_000;

/// Points kept per time series.
const POINTS: usize = 360;

/// A time series of (time ms, value), the newest `POINTS` kept.
#[derive(Debug, Default, Clone)]
struct Series(VecDeque<(i64, f64)>);

impl Series {
    fn push(&mut self, t: i64, v: f64) {
        self.0.push_back((t, v));
        while self.0.len() > POINTS {
            self.0.pop_front();
        }
    }

    fn json(&self) -> Json {
        Json::Array(self.0.iter().map(|(t, v)| json!([t, v])).collect())
    }
}

/// Where each model's versions stand, from lifecycle events.
#[derive(Debug, Default, Clone)]
struct ModelRoles {
    champion: Option<String>,
    challenger: Option<String>,
    canary: Option<(String, i64)>,
    stage: String,
}

/// Everything the page shows.
#[derive(Debug, Default)]
pub struct Board {
    /// Latest window report per (model, version, window kind).
    reports: BTreeMap<(String, String, String), Json>,
    /// Latest outcome report per (model, version).
    outcomes: BTreeMap<(String, String), Json>,
    /// Alerts by fingerprint, the latest state of each.
    alerts: BTreeMap<String, Json>,
    /// The newest lifecycle events, newest last.
    events: VecDeque<Json>,
    models: BTreeMap<String, ModelRoles>,
    /// Live scores counted since the last tick, by band.
    tick_scores: u64,
    tick_bands: BTreeMap<String, u64>,
    tick_deletes: u64,
    /// Band counts per closed tick within the last [`BAND_WINDOW_MS`].
    band_ticks: VecDeque<(i64, BTreeMap<String, u64>)>,
    scores_per_sec: Series,
    last_tick_ms: Option<i64>,
    total_scores: u64,
}

fn text(j: &Json, key: &str) -> String {
    j.get(key)
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string()
}

impl Board {
    /// A window report (`WindowReport`): the latest per model, version and window kind;
    /// one with `outcomes` is kept as that version's outcome report.
    pub fn report(&mut self, v: &Value) {
        let j = to_json(v);
        let (model, version) = (text(&j, "model_name"), text(&j, "model_version"));
        if j.get("outcomes").is_some_and(|o| !o.is_null()) {
            self.outcomes.insert((model, version), j);
            return;
        }
        let kind = text(&j, "window_kind");
        let key = (model, version, kind);
        let newer = |old: &Json| {
            j["window_start"].as_i64().unwrap_or(0) >= old["window_start"].as_i64().unwrap_or(0)
        };
        if self.reports.get(&key).is_none_or(newer) {
            self.reports.insert(key, j);
        }
    }

    /// An alert (`Alert`): firing or resolved, the latest per fingerprint.
    pub fn alert(&mut self, v: &Value) {
        let j = to_json(v);
        let fingerprint = text(&j, "fingerprint");
        if !fingerprint.is_empty() {
            self.alerts.insert(fingerprint, j);
        }
    }

    /// A lifecycle event (`ModelLifecycleEvent`): the model's roles and the last events.
    pub fn lifecycle(&mut self, v: &Value) {
        let j = to_json(v);
        let model = text(&j, "model_name");
        let version = text(&j, "version");
        let stage = text(&j, "stage");
        let roles = self.models.entry(model).or_default();
        match stage.as_str() {
            "shadow" => {
                roles.challenger = Some(version.clone());
                roles.canary = None;
            }
            "canary" => {
                roles.challenger = Some(version.clone());
                roles.canary = Some((version.clone(), j["canary_percent"].as_i64().unwrap_or(0)));
            }
            "promoted" => {
                roles.champion = Some(version.clone());
                roles.challenger = None;
                roles.canary = None;
            }
            "rolled_back" | "rejected" | "archived" => {
                if roles.challenger.as_deref() == Some(version.as_str()) {
                    roles.challenger = None;
                }
                if roles.canary.as_ref().is_some_and(|(v, _)| *v == version) {
                    roles.canary = None;
                }
            }
            _ => {}
        }
        if let Some(c) = j.get("champion_version").and_then(Json::as_str) {
            roles.champion = Some(c.to_string());
        }
        roles.stage = stage;
        self.events.push_back(j);
        while self.events.len() > 20 {
            self.events.pop_front();
        }
    }

    /// A live score (`LeadScore`), or `None` for a tombstone.
    pub fn score(&mut self, v: Option<&Value>) {
        let Some(v) = v else {
            self.tick_deletes += 1;
            return;
        };
        let j = to_json(v);
        let band = text(&j, "band");
        self.tick_scores += 1;
        self.total_scores += 1;
        *self.tick_bands.entry(band).or_default() += 1;
    }

    /// Closes a tick at `now_ms`: the scores/s point, and the band counts of the last tick.
    pub fn tick(&mut self, now_ms: i64) {
        if let Some(last) = self.last_tick_ms {
            let secs = ((now_ms - last) as f64 / 1000.0).max(0.001);
            self.scores_per_sec
                .push(now_ms, self.tick_scores as f64 / secs);
        }
        if self.tick_scores > 0 {
            self.band_ticks
                .push_back((now_ms, std::mem::take(&mut self.tick_bands)));
        }
        while self
            .band_ticks
            .front()
            .is_some_and(|(t, _)| *t <= now_ms - BAND_WINDOW_MS)
        {
            self.band_ticks.pop_front();
        }
        self.tick_bands.clear();
        self.tick_scores = 0;
        self.tick_deletes = 0;
        self.last_tick_ms = Some(now_ms);
    }

    /// Scores by band over the last [`BAND_WINDOW_MS`].
    fn bands(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (_, ticks) in &self.band_ticks {
            for (band, n) in ticks {
                *out.entry(band.clone()).or_default() += n;
            }
        }
        out
    }

    /// What the page shows, as JSON.
    pub fn snapshot(&self) -> Json {
        let mut drift: Vec<Json> = Vec::new();
        for ((model, version, kind), r) in &self.reports {
            let features: Vec<Json> = r["features"]
                .as_array()
                .map(|fs| {
                    fs.iter()
                        .map(|f| {
                            let psi = f["psi"].as_f64().unwrap_or(0.0);
                            json!({
                                "feature": f["feature"],
                                "psi": f["psi"], "kl": f["kl"], "js": f["js"],
                                "ks_p_value": f["ks_p_value"], "chi2_p_value": f["chi2_p_value"],
                                "new_category_rate": f["new_category_rate"],
                                "missing_rate": f["missing_rate"],
                                "judged": f["judged"],
                                "flagged": psi >= 0.25 && f["judged"].as_bool().unwrap_or(true),
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            drift.push(json!({
                "model": model, "version": version, "kind": kind,
                "window_start": r["window_start"], "scored": r["scored"],
                "score_psi": r["score_psi"], "shadow": r["shadow"], "latency": r["latency"],
                "features": features,
            }));
        }
        let outcomes: Vec<Json> = self
            .outcomes
            .iter()
            .map(|((model, version), r)| {
                json!({"model": model, "version": version, "window_start": r["window_start"], "outcomes": r["outcomes"]})
            })
            .collect();
        let (firing, resolved): (Vec<&Json>, Vec<&Json>) = self
            .alerts
            .values()
            .partition(|a| a["status"].as_str() == Some("firing"));
        let mut by_severity = Map::new();
        for a in &firing {
            let s = text(a, "severity");
            let n = by_severity.get(&s).and_then(Json::as_u64).unwrap_or(0);
            by_severity.insert(s, json!(n + 1));
        }
        let models: Vec<Json> = self
            .models
            .iter()
            .map(|(name, r)| {
                json!({
                    "model": name, "champion": r.champion, "challenger": r.challenger,
                    "canary": r.canary.as_ref().map(|(v, p)| json!({"version": v, "percent": p})),
                    "stage": r.stage,
                })
            })
            .collect();
        json!({
            "pipeline": {
                "scores_per_sec": self.scores_per_sec.json(),
                "scores_total": self.total_scores,
            },
            "bands": self.bands(),
            "models": models,
            "events": self.events.iter().rev().collect::<Vec<_>>(),
            "drift": drift,
            "outcomes": outcomes,
            "alerts": {"firing": firing, "resolved": resolved, "firing_by_severity": by_severity},
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn record(fields: Vec<(&str, Value)>) -> Value {
        Value::Record(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    fn report(version: &str, start: i64, psi: f64, outcomes: bool) -> Value {
        record(vec![
            ("model_name", s("lead-scoring")),
            ("model_version", s(version)),
            ("window_kind", Value::Enum(0, "hourly".into())),
            ("window_start", Value::TimestampMillis(start)),
            ("scored", Value::Long(100)),
            (
                "features",
                Value::Array(vec![record(vec![
                    ("feature", s("page_views")),
                    ("psi", Value::Double(psi)),
                    ("judged", Value::Boolean(true)),
                ])]),
            ),
            (
                "outcomes",
                if outcomes {
                    Value::Union(1, Box::new(record(vec![("labelled", Value::Long(9))])))
                } else {
                    Value::Union(0, Box::new(Value::Null))
                },
            ),
        ])
    }

    #[test]
    fn the_latest_window_per_version_is_shown_and_drift_is_flagged() {
        let mut b = Board::default();
        b.report(&report("1", 3_600_000, 0.4, false));
        b.report(&report("1", 0, 0.01, false)); // an older window arriving late
        b.report(&report("1", 3_600_000, 0.0, true));
        let snap = b.snapshot();
        let d = &snap["drift"][0];
        assert_eq!(d["window_start"], 3_600_000);
        assert_eq!(d["features"][0]["feature"], "page_views");
        assert_eq!(d["features"][0]["flagged"], true);
        assert_eq!(snap["outcomes"][0]["outcomes"]["labelled"], 9);
        assert_eq!(snap["drift"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn alerts_keep_their_latest_state_and_count_by_severity() {
        let mut b = Board::default();
        let alert = |fp: &str, status: &str, severity: &str| {
            record(vec![
                ("fingerprint", s(fp)),
                ("status", Value::Enum(0, status.into())),
                ("severity", Value::Enum(1, severity.into())),
            ])
        };
        b.alert(&alert("m/psi/a", "firing", "warning"));
        b.alert(&alert("m/psi/b", "firing", "critical"));
        b.alert(&alert("m/psi/c", "firing", "warning"));
        b.alert(&alert("m/psi/a", "resolved", "warning"));
        let snap = b.snapshot();
        assert_eq!(snap["alerts"]["firing"].as_array().unwrap().len(), 2);
        assert_eq!(snap["alerts"]["resolved"][0]["fingerprint"], "m/psi/a");
        assert_eq!(snap["alerts"]["firing_by_severity"]["warning"], 1);
        assert_eq!(snap["alerts"]["firing_by_severity"]["critical"], 1);
    }

    #[test]
    fn lifecycle_events_move_the_roles() {
        let mut b = Board::default();
        let event = |version: &str, stage: &str, percent: i32| {
            record(vec![
                ("model_name", s("m")),
                ("version", s(version)),
                ("stage", Value::Enum(0, stage.into())),
                ("canary_percent", Value::Int(percent)),
                ("champion_version", Value::Union(1, Box::new(s("1")))),
            ])
        };
        b.lifecycle(&event("2", "shadow", 0));
        let m = &b.snapshot()["models"][0];
        assert_eq!(
            (m["champion"].clone(), m["challenger"].clone()),
            (json!("1"), json!("2"))
        );
        b.lifecycle(&event("2", "canary", 50));
        assert_eq!(b.snapshot()["models"][0]["canary"]["percent"], 50);
        b.lifecycle(&event("2", "rolled_back", 0));
        let m = &b.snapshot()["models"][0];
        assert!(m["challenger"].is_null() && m["canary"].is_null());
        assert_eq!(b.snapshot()["events"][0]["stage"], "rolled_back");
    }

    #[test]
    fn scores_make_a_rate_and_the_band_mix_of_the_last_five_minutes() {
        let mut b = Board::default();
        b.tick(0);
        for band in ["High", "Low", "Low", "Medium"] {
            b.score(Some(&record(vec![("band", Value::Enum(0, band.into()))])));
        }
        b.score(None);
        b.tick(2_000);
        let snap = b.snapshot();
        assert_eq!(snap["pipeline"]["scores_per_sec"][0], json!([2_000, 2.0]));
        assert_eq!(snap["bands"]["Low"], 2);
        assert_eq!(snap["pipeline"]["scores_total"], 4);
        // A quiet tick keeps the mix; a later score adds to it; five minutes on, it is gone.
        b.tick(4_000);
        assert_eq!(b.snapshot()["bands"]["Low"], 2);
        assert_eq!(
            b.snapshot()["pipeline"]["scores_per_sec"][1],
            json!([4_000, 0.0])
        );
        b.score(Some(&record(vec![("band", Value::Enum(0, "Low".into()))])));
        b.tick(6_000);
        assert_eq!(b.snapshot()["bands"]["Low"], 3);
        b.tick(2_000 + BAND_WINDOW_MS);
        assert_eq!(
            b.snapshot()["bands"]["Low"],
            1,
            "the first tick's scores left the window"
        );
        b.tick(6_000 + BAND_WINDOW_MS);
        assert!(b.snapshot()["bands"].as_object().unwrap().is_empty());
    }
}
