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

/// One sample of a Prometheus text page: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_bucket`, `_sum`, `_count` suffixes as written).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// The samples of a Prometheus text page (comments and malformed lines skipped).
pub fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some((s, v)) => (s.trim(), v),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let mut labels = BTreeMap::new();
                for pair in rest.trim_end_matches('}').split("\",") {
                    if let Some((k, v)) = pair.split_once("=\"") {
                        labels.insert(
                            k.trim_start_matches(',').to_string(),
                            v.trim_end_matches('"').to_string(),
                        );
                    }
                }
                (name.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// The totals the pipeline charts are made from, summed over every scraped scorer.
#[derive(Debug, Default, Clone)]
struct Totals {
    inputs: f64,
    scored: f64,
    dead_by_kind: BTreeMap<String, f64>,
    lag: f64,
    /// Event-to-score histogram: cumulative count per upper bound.
    latency: BTreeMap<u64, f64>,
}

impl Totals {
    fn of(samples: &[Sample]) -> Self {
        let mut t = Totals::default();
        for s in samples {
            match s.name.as_str() {
                "leadscore_scorer_inputs_total" => t.inputs += s.value,
                "leadscore_scorer_scored_total" => t.scored += s.value,
                "leadscore_scorer_dead_letters_total" => {
                    let kind = s.labels.get("kind").cloned().unwrap_or_default();
                    *t.dead_by_kind.entry(kind).or_default() += s.value;
                }
                "leadscore_scorer_consumer_lag" => t.lag += s.value,
                "leadscore_scorer_event_to_score_ms_bucket" => {
                    let le = s.labels.get("le").map(String::as_str).unwrap_or("+Inf");
                    let bound = if le == "+Inf" {
                        u64::MAX
                    } else {
                        // Bounds in ms, kept to the microsecond as map keys.
                        (le.parse::<f64>().unwrap_or(f64::MAX) * 1000.0) as u64
                    };
                    *t.latency.entry(bound).or_default() += s.value;
                }
                _ => {}
            }
        }
        t
    }
}

/// The `q` quantile (0..1) of a histogram given as cumulative counts per upper bound (in
/// microseconds), by linear interpolation within the bucket; `None` without samples.
fn quantile(cumulative: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let total = cumulative.values().copied().fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (&bound, &count) in cumulative {
        let upper = if bound == u64::MAX {
            lower
        } else {
            bound as f64 / 1000.0
        };
        if count >= rank {
            let share = if count > below {
                (rank - below) / (count - below)
            } else {
                0.0
            };
            return Some(lower + (upper - lower) * share);
        }
        lower = upper;
        below = count;
    }
    Some(lower)
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
    /// The last scrape of the scorers' metrics and when it was taken.
    last_scrape: Option<(i64, Totals)>,
    leads_in_per_sec: Series,
    scored_per_sec: Series,
    dead_per_sec: BTreeMap<String, Series>,
    lag: Series,
    latency_p50: Series,
    latency_p95: Series,
    latency_p99: Series,
    error_rate: Series,
    /// The drift aggregator's PSI thresholds (warning, critical), drawn on the page.
    psi_thresholds: Option<(f64, f64)>,
}

/// PSI thresholds when none are configured: the aggregator's defaults.
const PSI_THRESHOLDS: (f64, f64) = (0.25, 0.5);

fn text(j: &Json, key: &str) -> String {
    j.get(key)
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string()
}

impl Board {
    /// A board drawing the aggregator's PSI thresholds `warning` and `critical`
    /// (`drift.thresholds.psi_warning` / `psi_critical`).
    pub fn with_psi_thresholds(warning: f64, critical: f64) -> Self {
        Self {
            psi_thresholds: Some((warning, critical)),
            ..Self::default()
        }
    }

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

    /// The scorers' metrics pages scraped at `now_ms` (their samples together): rates since
    /// the last scrape, the lag, and event-to-score percentiles of the scores in between.
    pub fn scrape(&mut self, now_ms: i64, samples: &[Sample]) {
        let now = Totals::of(samples);
        if let Some((then_ms, then)) = &self.last_scrape {
            let secs = ((now_ms - then_ms) as f64 / 1000.0).max(0.001);
            // A restarted scorer starts its counters again: no negative rates.
            let rate = |a: f64, b: f64| (a - b).max(0.0) / secs;
            let inputs = rate(now.inputs, then.inputs);
            self.leads_in_per_sec.push(now_ms, inputs);
            self.scored_per_sec
                .push(now_ms, rate(now.scored, then.scored));
            let mut dead = 0.0;
            for (kind, n) in &now.dead_by_kind {
                let r = rate(*n, then.dead_by_kind.get(kind).copied().unwrap_or(0.0));
                dead += r;
                self.dead_per_sec
                    .entry(kind.clone())
                    .or_default()
                    .push(now_ms, r);
            }
            self.error_rate
                .push(now_ms, if inputs > 0.0 { dead / inputs } else { 0.0 });
            let delta: BTreeMap<u64, f64> = now
                .latency
                .iter()
                .map(|(b, c)| {
                    (
                        *b,
                        (c - then.latency.get(b).copied().unwrap_or(0.0)).max(0.0),
                    )
                })
                .collect();
            for (series, q) in [
                (&mut self.latency_p50, 0.5),
                (&mut self.latency_p95, 0.95),
                (&mut self.latency_p99, 0.99),
            ] {
                if let Some(v) = quantile(&delta, q) {
                    series.push(now_ms, v);
                }
            }
        }
        self.lag.push(now_ms, now.lag);
        self.last_scrape = Some((now_ms, now));
    }

    /// What the page shows, as JSON.
    pub fn snapshot(&self) -> Json {
        let (psi_warning, psi_critical) = self.psi_thresholds.unwrap_or(PSI_THRESHOLDS);
        // Features with a warning or critical alert firing: flagged whatever rule fired
        // (PSI, missing rate, new category, KS, chi-square), as the aggregator judged.
        let alerting: std::collections::BTreeSet<(String, String, String)> = self
            .alerts
            .values()
            .filter(|a| {
                a["status"].as_str() == Some("firing")
                    && matches!(a["severity"].as_str(), Some("warning" | "critical"))
            })
            .map(|a| {
                (
                    text(a, "model_name"),
                    text(a, "model_version"),
                    text(a, "feature"),
                )
            })
            .collect();
        let mut drift: Vec<Json> = Vec::new();
        for ((model, version, kind), r) in &self.reports {
            let features: Vec<Json> = r["features"]
                .as_array()
                .map(|fs| {
                    fs.iter()
                        .map(|f| {
                            let psi = f["psi"].as_f64().unwrap_or(0.0);
                            let name = f["feature"].as_str().unwrap_or_default().to_string();
                            let alerted =
                                alerting.contains(&(model.clone(), version.clone(), name));
                            json!({
                                "feature": f["feature"],
                                "psi": f["psi"], "kl": f["kl"], "js": f["js"],
                                "ks_p_value": f["ks_p_value"], "chi2_p_value": f["chi2_p_value"],
                                "new_category_rate": f["new_category_rate"],
                                "missing_rate": f["missing_rate"],
                                "judged": f["judged"],
                                "bins": f["bins"],
                                "flagged": alerted
                                    || (psi >= psi_warning && f["judged"].as_bool().unwrap_or(true)),
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
                "leads_in_per_sec": self.leads_in_per_sec.json(),
                "scored_per_sec": self.scored_per_sec.json(),
                "dead_letters_per_sec": self.dead_per_sec.iter().map(|(k, s)| (k.clone(), s.json())).collect::<Map<String, Json>>(),
                "lag": self.lag.json(),
                "latency_ms": {"p50": self.latency_p50.json(), "p95": self.latency_p95.json(), "p99": self.latency_p99.json()},
                "error_rate": self.error_rate.json(),
            },
            "bands": self.bands(),
            "models": models,
            "events": self.events.iter().rev().collect::<Vec<_>>(),
            "drift": drift,
            "outcomes": outcomes,
            "alerts": {"firing": firing, "resolved": resolved, "firing_by_severity": by_severity},
            "thresholds": {"psi_warning": psi_warning, "psi_critical": psi_critical},
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
    fn flags_and_the_drawn_thresholds_follow_the_configured_psi_thresholds() {
        let mut b = Board::default();
        b.report(&report("1", 0, 0.3, false));
        let snap = b.snapshot();
        assert_eq!(
            snap["thresholds"]["psi_warning"], 0.25,
            "the aggregator's default"
        );
        assert_eq!(snap["drift"][0]["features"][0]["flagged"], true);
        let mut strict = Board::with_psi_thresholds(0.4, 0.8);
        strict.report(&report("1", 0, 0.3, false));
        let snap = strict.snapshot();
        assert_eq!(
            snap["drift"][0]["features"][0]["flagged"], false,
            "0.3 < 0.4"
        );
        assert_eq!(snap["thresholds"]["psi_critical"], 0.8);
    }

    #[test]
    fn a_feature_with_a_firing_warning_is_flagged_whatever_its_psi() {
        let mut b = Board::default();
        b.report(&report("1", 0, 0.05, false));
        let alert = |severity: &str, status: &str| {
            record(vec![
                (
                    "fingerprint",
                    s(&format!("lead-scoring/missing_rate/page_views/{severity}")),
                ),
                ("status", Value::Enum(0, status.into())),
                ("severity", Value::Enum(1, severity.into())),
                ("model_name", s("lead-scoring")),
                ("model_version", s("1")),
                ("feature", Value::Union(1, Box::new(s("page_views")))),
            ])
        };
        b.alert(&alert("info", "firing"));
        assert_eq!(
            b.snapshot()["drift"][0]["features"][0]["flagged"],
            false,
            "info does not flag"
        );
        b.alert(&alert("warning", "firing"));
        assert_eq!(b.snapshot()["drift"][0]["features"][0]["flagged"], true);
        b.alert(&alert("warning", "resolved"));
        assert_eq!(
            b.snapshot()["drift"][0]["features"][0]["flagged"],
            false,
            "resolved"
        );
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
    fn scrapes_make_rates_lag_and_latency_percentiles() {
        let page = |inputs: u64, dead: u64, lag: u64, b10: u64, b100: u64, inf: u64| {
            format!(
                "# HELP x\nleadscore_scorer_inputs_total {inputs}\n\
                 leadscore_scorer_dead_letters_total{{kind=\"invalid_value\"}} {dead}\n\
                 leadscore_scorer_consumer_lag{{topic=\"t\",partition=\"0\"}} {lag}\n\
                 leadscore_scorer_consumer_lag{{topic=\"t\",partition=\"1\"}} 1\n\
                 leadscore_scorer_event_to_score_ms_bucket{{le=\"10\"}} {b10}\n\
                 leadscore_scorer_event_to_score_ms_bucket{{le=\"100\"}} {b100}\n\
                 leadscore_scorer_event_to_score_ms_bucket{{le=\"+Inf\"}} {inf}\n"
            )
        };
        let samples = parse_prometheus(&page(100, 0, 5, 10, 20, 20));
        assert_eq!(samples.len(), 7);
        assert_eq!(samples[1].labels["kind"], "invalid_value");
        let mut b = Board::default();
        b.scrape(0, &samples);
        // 2 s later: 400 more inputs, 8 dead letters, 100 more scores all between 10 and 100 ms.
        b.scrape(2_000, &parse_prometheus(&page(500, 8, 7, 10, 120, 120)));
        let p = &b.snapshot()["pipeline"];
        assert_eq!(p["leads_in_per_sec"][0], json!([2_000, 200.0]));
        assert_eq!(
            p["dead_letters_per_sec"]["invalid_value"][0],
            json!([2_000, 4.0])
        );
        assert_eq!(p["error_rate"][0], json!([2_000, 0.02]));
        assert_eq!(p["lag"][1], json!([2_000, 8.0]));
        assert_eq!(p["latency_ms"]["p50"][0], json!([2_000, 55.0]));
        assert_eq!(p["latency_ms"]["p99"][0], json!([2_000, 99.1]));
        // A restarted scorer (counters back near zero) gives no negative rate.
        b.scrape(4_000, &parse_prometheus(&page(3, 0, 0, 0, 0, 0)));
        let p = &b.snapshot()["pipeline"];
        assert_eq!(p["leads_in_per_sec"][1], json!([4_000, 0.0]));
        assert_eq!(
            p["latency_ms"]["p50"].as_array().unwrap().len(),
            1,
            "no scores, no point"
        );
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
