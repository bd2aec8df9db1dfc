//! Lifecycle events (`ModelLifecycleEvent` on `leadscore.model.lifecycle.v1`)
//! and what a training run's result means for them.

use apache_avro::types::Value;
use serde::Deserialize;

/// A step in a model version's life (`LifecycleStage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Training started.
    Training,
    /// Registered as challenger.
    Registered,
    /// Did not beat the champion.
    Rejected,
    /// Scoring in shadow.
    Shadow,
    /// Serving a share of leads.
    Canary,
    /// Champion.
    Promoted,
    /// Taken back.
    RolledBack,
    /// Retired.
    Archived,
    /// Training failed.
    Failed,
}

impl Stage {
    const ALL: [Stage; 9] = [
        Stage::Training,
        Stage::Registered,
        Stage::Rejected,
        Stage::Shadow,
        Stage::Canary,
        Stage::Promoted,
        Stage::RolledBack,
        Stage::Archived,
        Stage::Failed,
    ];

    /// Symbol in the schema.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Training => "training",
            Stage::Registered => "registered",
            Stage::Rejected => "rejected",
            Stage::Shadow => "shadow",
            Stage::Canary => "canary",
            Stage::Promoted => "promoted",
            Stage::RolledBack => "rolled_back",
            Stage::Archived => "archived",
            Stage::Failed => "failed",
        }
    }

    fn index(self) -> u32 {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0) as u32
    }

    fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleEvent {
    /// Unique id (`<request id>/<stage>` for training steps, so redeliveries are recognisable).
    pub event_id: String,
    /// Model name.
    pub model_name: String,
    /// Version concerned ("" before one exists).
    pub version: String,
    /// Stage reached.
    pub stage: Stage,
    /// Canary share, percent.
    pub canary_percent: i32,
    /// Champion after this event.
    pub champion_version: Option<String>,
    /// Challenger after this event.
    pub challenger_version: Option<String>,
    /// Why.
    pub reason: String,
    /// When, ms.
    pub at_ms: i64,
}

fn opt(v: &Option<String>) -> Value {
    match v {
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

impl LifecycleEvent {
    /// The Avro value.
    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("event_id".into(), Value::String(self.event_id.clone())),
            ("model_name".into(), Value::String(self.model_name.clone())),
            ("version".into(), Value::String(self.version.clone())),
            (
                "stage".into(),
                Value::Enum(self.stage.index(), self.stage.as_str().into()),
            ),
            ("canary_percent".into(), Value::Int(self.canary_percent)),
            ("champion_version".into(), opt(&self.champion_version)),
            ("challenger_version".into(), opt(&self.challenger_version)),
            ("reason".into(), Value::String(self.reason.clone())),
            ("at".into(), Value::TimestampMillis(self.at_ms)),
        ])
    }

    /// Reads an event back.
    pub fn from_value(value: &Value) -> Option<Self> {
        let Value::Record(fields) = value else {
            return None;
        };
        let get = |name: &str| leadscore_schemas::Fields::new(fields).get(name);
        let string = |name: &str| match get(name)? {
            Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
            _ => None,
        };
        Some(Self {
            event_id: string("event_id")?,
            model_name: string("model_name")?,
            version: string("version")?,
            stage: Stage::parse(&string("stage")?)?,
            canary_percent: match get("canary_percent")? {
                Value::Int(i) => *i,
                _ => 0,
            },
            champion_version: string("champion_version"),
            challenger_version: string("challenger_version"),
            reason: string("reason")?,
            at_ms: match get("at")? {
                Value::TimestampMillis(t) | Value::Long(t) => *t,
                _ => return None,
            },
        })
    }
}

/// What the training job printed on success (its JSON result).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TrainingResult {
    /// Registered version (with MLflow).
    pub version: Option<String>,
    /// `champion`, `challenger` or `rejected`.
    pub gate: Option<String>,
    /// Why the gate decided so.
    pub gate_reason: Option<String>,
    /// Holdout AUC.
    pub validation_auc: f64,
}

/// The terminal event of a training run for `request_id`: from its exit and output.
pub fn training_outcome(
    request_id: &str,
    model_name: &str,
    success: bool,
    stdout: &str,
    stderr: &str,
    at_ms: i64,
) -> LifecycleEvent {
    let event = |stage: Stage, version: String, reason: String| LifecycleEvent {
        event_id: format!("{request_id}/{}", stage.as_str()),
        model_name: model_name.to_string(),
        version,
        stage,
        canary_percent: 0,
        champion_version: None,
        challenger_version: None,
        reason,
        at_ms,
    };
    // The last line the job logged as an error says why it failed (it never logs lead data).
    let why = || {
        stderr
            .lines()
            .rev()
            .find(|l| l.contains("ERROR"))
            .or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("no output")
            .chars()
            .take(500)
            .collect::<String>()
    };
    if !success {
        return event(
            Stage::Failed,
            String::new(),
            format!("training failed: {}", why()),
        );
    }
    let start = stdout.find('{').unwrap_or(stdout.len());
    let Ok(result) = serde_json::from_str::<TrainingResult>(&stdout[start..]) else {
        return event(
            Stage::Failed,
            String::new(),
            "training finished without a readable result".into(),
        );
    };
    let version = result.version.clone().unwrap_or_default();
    let reason = format!(
        "request {request_id}: validation AUC {:.4}; {}",
        result.validation_auc,
        result
            .gate_reason
            .clone()
            .unwrap_or_else(|| "not registered (no MLflow)".into())
    );
    match result.gate.as_deref() {
        Some("challenger") => LifecycleEvent {
            challenger_version: Some(version.clone()),
            ..event(Stage::Registered, version, reason)
        },
        Some("champion") => LifecycleEvent {
            champion_version: Some(version.clone()),
            ..event(Stage::Promoted, version, reason)
        },
        _ => event(Stage::Rejected, version, reason),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn training_results_become_the_right_stage() {
        let out = r#"log line
{"gate": "challenger", "gate_reason": "AUC 0.80 beats champion v1 (0.77) by +0.03 >= 0.02", "validation_auc": 0.8, "version": "2"}"#;
        let e = training_outcome("r1", "m", true, out, "", 5);
        assert_eq!((e.stage, e.version.as_str()), (Stage::Registered, "2"));
        assert_eq!(e.challenger_version.as_deref(), Some("2"));
        assert_eq!(e.event_id, "r1/registered");
        let rejected = out.replace("challenger", "rejected");
        assert_eq!(
            training_outcome("r1", "m", true, &rejected, "", 5).stage,
            Stage::Rejected
        );
        let first = out.replace("\"challenger\"", "\"champion\"");
        let e = training_outcome("r1", "m", true, &first, "", 5);
        assert_eq!(
            (e.stage, e.champion_version.as_deref()),
            (Stage::Promoted, Some("2"))
        );
        let failed = training_outcome(
            "r1",
            "m",
            false,
            "",
            "x\n2026 ERROR leadscore.training: refusing to train on 12 labelled leads\n",
            5,
        );
        assert_eq!(failed.stage, Stage::Failed);
        assert!(
            failed.reason.contains("refusing to train on 12"),
            "{}",
            failed.reason
        );
        assert_eq!(
            training_outcome("r1", "m", true, "garbage", "", 5).stage,
            Stage::Failed
        );
    }

    #[test]
    fn events_fit_the_schema_and_read_back() {
        let schema = apache_avro::Schema::parse_str(
            leadscore_schemas::find("ModelLifecycleEvent.avsc")
                .unwrap()
                .text,
        )
        .unwrap();
        for stage in Stage::ALL {
            let e = LifecycleEvent {
                event_id: "e".into(),
                model_name: "m".into(),
                version: "3".into(),
                stage,
                canary_percent: 10,
                champion_version: Some("2".into()),
                challenger_version: None,
                reason: "r".into(),
                at_ms: 9,
            };
            assert!(e.to_value().validate(&schema), "{stage:?}");
            assert_eq!(LifecycleEvent::from_value(&e.to_value()), Some(e));
        }
    }
}
