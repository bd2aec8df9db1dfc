//! One batch: decoded events in, output records out. No Kafka here.

use std::collections::HashMap;

use leadscore_cdc::dead::DeadPayload;
use leadscore_cdc::{Action, CdcError, ErrorKind};
use leadscore_crm::Lead;
use leadscore_model::{BandThresholds, Model, ReasonTexts};

use crate::records::{LeadScore, ModelScore, Reason, Role, ShadowScore, Source};

/// Where an input record came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// An input record after decoding; borrows the consumed message's bytes.
#[derive(Debug, Clone)]
pub struct Decoded<'a> {
    /// Source position.
    pub position: Position,
    /// Original key bytes.
    pub key: Option<Vec<u8>>,
    /// The original value (for a dead letter's size and digest).
    pub payload: Option<&'a [u8]>,
    /// What a dead letter of this input carries; set only when decoding refused it.
    pub dead: Option<DeadPayload>,
    /// Event time in ms: the source change time, else the Kafka timestamp.
    pub event_time_ms: i64,
    /// What to do, or why not.
    pub action: Result<Action, CdcError>,
}

/// An output record.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A live score for leads.scores.v1.
    Score {
        /// lead_id.
        key: String,
        /// The LeadScore record.
        record: LeadScore,
        /// Score (for the cache and metrics).
        score: f64,
        /// Event-to-score latency in ms.
        latency_ms: f64,
        /// What the cache keeps of it.
        cached: leadscore_cache::CachedScore,
    },
    /// A shadow score for leads.scores.shadow.v1.
    Shadow {
        /// lead_id.
        key: String,
        /// The ShadowScore record.
        record: ShadowScore,
    },
    /// A tombstone for leads.scores.v1.
    Tombstone {
        /// lead_id.
        key: String,
    },
    /// An input for the dead-letter topic.
    Dead {
        /// Original key.
        key: Option<Vec<u8>>,
        /// The payload (PII-free when the record decoded, capped) and its digest.
        dead: DeadPayload,
        /// Error kind.
        kind: &'static str,
        /// Error message.
        message: String,
        /// Where it came from.
        position: Position,
    },
    /// An output that could not be written even as a dead letter: counted, logged without
    /// payload, and skipped so the partition moves on.
    Skipped {
        /// lead_id or the input's position, for the log.
        what: String,
        /// Why.
        reason: String,
    },
    /// An outcome was seen (counted; drift reads outcomes from the input topic).
    Outcome,
    /// Nothing to publish.
    Ignored,
}

/// The models a batch is scored with, fixed for the whole batch.
pub struct BatchModels<'a> {
    /// Live model for most leads.
    pub champion: &'a Model,
    /// Shadow model, if any.
    pub challenger: Option<&'a Model>,
    /// Canary candidate and the share of leads (0-100) it serves.
    pub canary: Option<(&'a Model, f64)>,
    /// Reasons per score (`scorer.reasons`; 0: none computed).
    pub reasons: usize,
}

/// Stable share in [0, 100) for `lead_id` (FNV-1a 64): the same lead is always in or out of the canary.
pub fn canary_bucket(lead_id: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lead_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % 10_000) as f64 / 100.0
}

/// When a candidate's failure was last logged, ms: a failing candidate fails every batch,
/// so it is logged at most every [`FAILURE_LOG_EVERY_MS`] (every failure is counted).
static LAST_FAILURE_LOG_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
const FAILURE_LOG_EVERY_MS: i64 = 30_000;

fn failure_log_due(now_ms: i64) -> bool {
    use std::sync::atomic::Ordering;
    let last = LAST_FAILURE_LOG_MS.load(Ordering::Relaxed);
    now_ms - last >= FAILURE_LOG_EVERY_MS
        && LAST_FAILURE_LOG_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Scores one batch. Leads are scored with one ONNX call per model.
///
/// `dead_cap` bounds the payload of a dead letter made here (a lead the model refuses).
pub fn process(
    inputs: Vec<Decoded<'_>>,
    models: &BatchModels<'_>,
    bands: &BandThresholds,
    dead_cap: usize,
    now_ms: impl Fn() -> i64,
) -> Result<Vec<Output>, leadscore_model::Error> {
    let mut outputs: Vec<Output> = Vec::with_capacity(inputs.len());
    // Leads to score, and the index of the input each came from.
    let mut scored: Vec<usize> = Vec::new();
    let mut leads: Vec<Lead> = Vec::new();
    for (i, d) in inputs.iter().enumerate() {
        let out = match &d.action {
            Err(e) => Output::Dead {
                key: d.key.clone(),
                dead: d
                    .dead
                    .clone()
                    .unwrap_or_else(|| DeadPayload::omitted(d.payload.unwrap_or_default())),
                kind: e.kind.as_str(),
                message: e.message.clone(),
                position: d.position.clone(),
            },
            Ok(Action::Score(lead)) => {
                scored.push(i);
                leads.push(lead.clone());
                Output::Ignored
            }
            Ok(Action::Delete { lead_id }) => Output::Tombstone {
                key: lead_id.clone(),
            },
            Ok(Action::Outcome { .. }) => Output::Outcome,
            Ok(Action::Ignore(_)) => Output::Ignored,
        };
        outputs.push(out);
    }
    if leads.is_empty() {
        return Ok(outputs);
    }
    let top = models.reasons;
    let champion = models.champion.score_batch_with_reason_texts(&leads, top)?;
    // A candidate that fails never stops scoring: the champion serves its leads
    // and each failure is published as an error of the candidate's version.
    let challenger = models.challenger.map(|m| {
        m.score_batch_with_reason_texts(&leads, top).map_err(|e| {
            if failure_log_due(now_ms()) {
                tracing::warn!(version = %m.metadata().version, error = %e, leads = leads.len(), "challenger failed on a batch; counted as errors of its version (logged at most every 30 s)");
            }
            e.to_string()
        })
    });
    let canary_members: Vec<bool> = leads
        .iter()
        .map(|l| {
            models
                .canary
                .is_some_and(|(_, pct)| canary_bucket(&l.lead_id) < pct)
        })
        .collect();
    let mut canary_failed: Option<String> = None;
    let mut canary_scores: HashMap<usize, (f64, Option<ReasonTexts>)> = match models.canary {
        Some((model, _)) if canary_members.iter().any(|m| *m) => {
            let subset: Vec<Lead> = leads
                .iter()
                .zip(&canary_members)
                .filter(|(_, m)| **m)
                .map(|(l, _)| l.clone())
                .collect();
            match model.score_batch_with_reason_texts(&subset, top) {
                Ok(scored) => canary_members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| **m)
                    .map(|(j, _)| j)
                    .zip(scored)
                    .filter_map(|(j, s)| s.ok().map(|(s, r)| (j, (s.probability, r))))
                    .collect(),
                Err(e) => {
                    if failure_log_due(now_ms()) {
                        tracing::warn!(version = %model.metadata().version, error = %e, leads = subset.len(), "canary failed on a batch; the champion serves its leads, counted as errors of its version (logged at most every 30 s)");
                    }
                    canary_failed = Some(e.to_string());
                    HashMap::new()
                }
            }
        }
        _ => HashMap::new(),
    };
    let mut extra: Vec<(usize, Output)> = Vec::new();
    for (j, ((&i, lead), result)) in scored.iter().zip(&leads).zip(champion).enumerate() {
        let Decoded {
            position,
            event_time_ms,
            key,
            payload,
            ..
        } = &inputs[i];
        let (score, reasons) = match result {
            Ok((s, r)) => (s.probability, r),
            Err(invalid) => {
                // The lead decoded: the dead letter carries it (a row without PII columns).
                outputs[i] = Output::Dead {
                    key: key.clone(),
                    dead: DeadPayload::lead(lead, payload.unwrap_or_default(), dead_cap),
                    kind: ErrorKind::InvalidValue.as_str(),
                    message: invalid.to_string(),
                    position: position.clone(),
                };
                continue;
            }
        };
        let scored_at = now_ms();
        let latency_ms = (scored_at - event_time_ms).max(0) as f64;
        let in_canary = canary_scores.remove(&j);
        let served_by_canary = in_canary.is_some();
        let (live_model, live_score, live_reasons, champion_reasons, role) =
            match (in_canary, models.canary) {
                (Some((c, r)), Some((m, _))) => (m, c, r, reasons, Role::Canary),
                _ => (
                    models.champion,
                    score,
                    reasons.clone(),
                    reasons,
                    Role::Champion,
                ),
            };
        let model_score = |model: &Model, score: f64, reasons: Option<ReasonTexts>| ModelScore {
            model_name: model.metadata().model_name.clone(),
            model_version: model.metadata().version.clone(),
            score,
            band: bands.band(score),
            reasons,
        };
        let live = model_score(live_model, live_score, live_reasons);
        let cached = leadscore_cache::CachedScore {
            lead_id: lead.lead_id.clone(),
            score: live_score,
            band: live.band.as_str().to_string(),
            model_name: live.model_name.clone(),
            model_version: live.model_version.clone(),
            model_role: role.as_str().to_string(),
            scored_at_ms: scored_at,
            reasons: live.reasons.clone().unwrap_or_default(),
        };
        let record = LeadScore {
            lead_id: lead.lead_id.clone(),
            model: live.clone(),
            role,
            features: live_model.features().raw_values(lead).into_iter().collect(),
            event_time_ms: *event_time_ms,
            scored_at_ms: scored_at,
            latency_ms,
            source: Some(Source {
                topic: position.topic.clone(),
                partition: position.partition,
                offset: position.offset,
            }),
        };
        outputs[i] = Output::Score {
            key: lead.lead_id.clone(),
            record,
            score: live_score,
            latency_ms,
            cached,
        };
        let shadow = |reason: Reason,
                      shadow_model: &Model,
                      shadow_score: f64,
                      shadow_reasons: Option<ReasonTexts>,
                      error: Option<&String>| Output::Shadow {
            key: lead.lead_id.clone(),
            record: ShadowScore {
                lead_id: lead.lead_id.clone(),
                reason,
                shadow: model_score(shadow_model, shadow_score, shadow_reasons),
                live: live.clone(),
                live_role: role,
                event_time_ms: *event_time_ms,
                scored_at_ms: scored_at,
                latency_ms,
                error: error.cloned(),
            },
        };
        if served_by_canary {
            extra.push((
                i,
                shadow(
                    Reason::CanaryChampion,
                    models.champion,
                    score,
                    champion_reasons,
                    None,
                ),
            ));
        }
        if let (Some((m, _)), Some(why), true) = (models.canary, &canary_failed, canary_members[j])
        {
            extra.push((i, shadow(Reason::Canary, m, 0.0, None, Some(why))));
        }
        match (models.challenger, challenger.as_ref()) {
            (Some(m), Some(Ok(results))) => {
                if let Some(Ok((s, r))) = results.get(j) {
                    extra.push((
                        i,
                        shadow(Reason::Challenger, m, s.probability, r.clone(), None),
                    ));
                }
            }
            (Some(m), Some(Err(why))) => {
                extra.push((i, shadow(Reason::Challenger, m, 0.0, None, Some(why))));
            }
            _ => {}
        }
    }
    // Shadow records follow their live score; order within a key is preserved.
    let mut merged = Vec::with_capacity(outputs.len() + extra.len());
    let mut extra = extra.into_iter().peekable();
    for (i, out) in outputs.into_iter().enumerate() {
        merged.push(out);
        while let Some((_, o)) = extra.next_if(|(k, _)| *k == i) {
            merged.push(o);
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canary_bucket_is_stable_and_spread() {
        assert_eq!(canary_bucket("lead_1"), canary_bucket("lead_1"));
        let inside = (0..10_000)
            .filter(|i| canary_bucket(&format!("lead_{i}")) < 10.0)
            .count();
        assert!(
            (800..1200).contains(&inside),
            "about 10% in a 10% canary: {inside}"
        );
        for i in 0..1000 {
            let b = canary_bucket(&format!("x{i}"));
            assert!((0.0..100.0).contains(&b));
        }
    }
}
