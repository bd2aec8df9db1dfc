//! Reads `LeadScore` and `ShadowScore` Avro binary straight into the few
//! fields the aggregator needs, without building generic Avro values (the
//! aggregator reads every score the system makes).
//!
//! The fast path only applies to messages whose writer schema is the one in
//! `schemas/` (checked by canonical form, once per schema id); see
//! [`crate::Aggregator`].

use std::collections::BTreeMap;

use leadscore_features::RawValue;

/// Why bytes are not a record of the expected schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {record} at byte {at}: {reason}")]
pub struct Malformed {
    /// Record type being read.
    pub record: &'static str,
    /// Byte offset in the datum.
    pub at: usize,
    /// What was wrong.
    pub reason: &'static str,
}

struct Cursor<'a> {
    record: &'static str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: &'static str) -> Malformed {
        Malformed {
            record: self.record,
            at: self.at,
            reason,
        }
    }

    fn long(&mut self) -> Result<i64, Malformed> {
        let mut z: u64 = 0;
        let mut shift = 0;
        loop {
            let b = *self
                .bytes
                .get(self.at)
                .ok_or_else(|| self.err("truncated varint"))?;
            self.at += 1;
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(self.err("varint too long"));
            }
        }
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }

    fn double(&mut self) -> Result<f64, Malformed> {
        let end = self.at + 8;
        let raw = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| self.err("truncated double"))?;
        self.at = end;
        let mut b = [0u8; 8];
        b.copy_from_slice(raw);
        Ok(f64::from_le_bytes(b))
    }

    fn str(&mut self) -> Result<&'a str, Malformed> {
        let len = usize::try_from(self.long()?).map_err(|_| self.err("negative length"))?;
        let end = self
            .at
            .checked_add(len)
            .ok_or_else(|| self.err("length overflow"))?;
        let raw = self
            .bytes
            .get(self.at..end)
            .ok_or_else(|| self.err("truncated string"))?;
        self.at = end;
        std::str::from_utf8(raw).map_err(|_| self.err("string is not UTF-8"))
    }

    fn index(&mut self, n: i64) -> Result<i64, Malformed> {
        let i = self.long()?;
        if (0..n).contains(&i) {
            Ok(i)
        } else {
            Err(self.err("enum or union index out of range"))
        }
    }
}

/// `ScoreBand` symbols, in schema order.
pub const BANDS: [&str; 3] = ["High", "Medium", "Low"];

/// The fields of a `LeadScore` the aggregator uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Score<'a> {
    /// Probability.
    pub score: f64,
    /// Band index into [`BANDS`].
    pub band: usize,
    /// Model name.
    pub model_name: &'a str,
    /// Model version.
    pub model_version: &'a str,
    /// Event time, ms.
    pub event_time_ms: i64,
    /// Event to score, ms.
    pub latency_ms: f64,
}

/// Reads a `LeadScore` datum (no frame) into `features`, reusing its entries:
/// afterwards every feature of the record has its value and any other key is `Null`.
pub fn lead_score<'a>(
    datum: &'a [u8],
    features: &mut BTreeMap<String, RawValue>,
) -> Result<Score<'a>, Malformed> {
    let mut c = Cursor {
        record: "LeadScore",
        bytes: datum,
        at: 0,
    };
    c.str()?; // lead_id: never kept
    let score = c.double()?;
    let band = c.index(3)? as usize;
    let model_name = c.str()?;
    let model_version = c.str()?;
    c.index(2)?; // model_role
    // Reuse the map's keys and string buffers: every value is reset to Null,
    // then overwritten; a feature absent from this record stays Null (= missing).
    for v in features.values_mut() {
        *v = RawValue::Null;
    }
    loop {
        let mut n = c.long()?;
        if n == 0 {
            break;
        }
        if n < 0 {
            n = -n;
            c.long()?; // block size in bytes
        }
        for _ in 0..n {
            let name = c.str()?;
            let index = c.index(4)?;
            let slot = match features.get_mut(name) {
                Some(slot) => slot,
                None => features.entry(name.to_string()).or_insert(RawValue::Null),
            };
            *slot = match index {
                0 => RawValue::Null,
                1 => RawValue::Long(c.long()?),
                2 => RawValue::Double(c.double()?),
                _ => {
                    let text = c.str()?;
                    match std::mem::replace(slot, RawValue::Null) {
                        RawValue::String(mut buf) => {
                            buf.clear();
                            buf.push_str(text);
                            RawValue::String(buf)
                        }
                        _ => RawValue::String(text.to_string()),
                    }
                }
            };
        }
    }
    let event_time_ms = c.long()?;
    c.long()?; // scored_at
    let latency_ms = c.double()?;
    Ok(Score {
        score,
        band,
        model_name,
        model_version,
        event_time_ms,
        latency_ms,
    })
}

/// How a writer laid out its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `ModelScore` ends with `reasons` (schemas from reason codes on).
    pub reasons: bool,
}

impl<'a> Cursor<'a> {
    /// Reads an optional array of reason strings; the feature of the first, if any.
    fn top_reason(&mut self) -> Result<Option<&'a str>, Malformed> {
        if self.index(2)? == 0 {
            return Ok(None);
        }
        let mut top = None;
        loop {
            let mut n = self.long()?;
            if n == 0 {
                break;
            }
            if n < 0 {
                n = -n;
                self.long()?; // block size in bytes
            }
            for _ in 0..n {
                let reason = self.str()?;
                if top.is_none() {
                    top = Some(reason.split_once('=').map_or(reason, |(f, _)| f));
                }
            }
        }
        Ok(top)
    }
}

/// The fields of a `ShadowScore` the aggregator uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Shadow<'a> {
    /// Shadow model name.
    pub shadow_name: &'a str,
    /// Shadow model version.
    pub shadow_version: &'a str,
    /// Shadow score.
    pub shadow: f64,
    /// Shadow band index.
    pub shadow_band: usize,
    /// Live model name.
    pub live_name: &'a str,
    /// Live model version.
    pub live_version: &'a str,
    /// Live score.
    pub live: f64,
    /// Live band index.
    pub live_band: usize,
    /// Event time, ms.
    pub event_time_ms: i64,
    /// The shadow model failed on this lead (its score is meaningless).
    pub failed: bool,
    /// The feature of the shadow model's first reason, if it gave reasons.
    pub shadow_top: Option<&'a str>,
    /// The feature of the live model's first reason, if it gave reasons.
    pub live_top: Option<&'a str>,
}

/// Reads a `ShadowScore` datum (no frame) written in `layout`.
pub fn shadow_score(datum: &[u8], layout: Layout) -> Result<Shadow<'_>, Malformed> {
    let mut c = Cursor {
        record: "ShadowScore",
        bytes: datum,
        at: 0,
    };
    c.str()?; // lead_id
    c.index(3)?; // reason
    let shadow_name = c.str()?;
    let shadow_version = c.str()?;
    let shadow = c.double()?;
    let shadow_band = c.index(3)? as usize;
    let shadow_top = if layout.reasons {
        c.top_reason()?
    } else {
        None
    };
    let live_name = c.str()?;
    let live_version = c.str()?;
    let live = c.double()?;
    let live_band = c.index(3)? as usize;
    let live_top = if layout.reasons {
        c.top_reason()?
    } else {
        None
    };
    c.index(2)?; // live_role
    let event_time_ms = c.long()?;
    c.long()?; // scored_at
    c.double()?; // latency_ms
    // Records written before `error` existed end here.
    let failed = c.at < c.bytes.len() && c.index(2)? == 1;
    Ok(Shadow {
        shadow_name,
        shadow_version,
        shadow,
        shadow_band,
        live_name,
        live_version,
        live,
        live_band,
        event_time_ms,
        failed,
        shadow_top,
        live_top,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use leadscore_model::Band;
    use leadscore_scorer::records::{LeadScore, ModelScore, Reason, Role, ShadowScore, Source};
    use proptest::prelude::*;

    fn raw() -> impl Strategy<Value = RawValue> {
        prop_oneof![
            Just(RawValue::Null),
            any::<i64>().prop_map(RawValue::Long),
            any::<f64>()
                .prop_filter("NaN", |d| !d.is_nan())
                .prop_map(RawValue::Double),
            "[a-zA-Z ]{0,12}".prop_map(RawValue::String),
        ]
    }

    fn band() -> impl Strategy<Value = Band> {
        prop_oneof![Just(Band::High), Just(Band::Medium), Just(Band::Low)]
    }

    fn model(band: Band, score: f64, version: String) -> ModelScore {
        ModelScore {
            model_name: "lead-scoring".into(),
            model_version: version,
            score,
            band,
            reasons: None,
        }
    }

    /// `value` without its `reasons` fields, at any depth.
    fn without_reasons(value: apache_avro::types::Value) -> apache_avro::types::Value {
        use apache_avro::types::Value;
        match value {
            Value::Record(fields) => Value::Record(
                fields
                    .into_iter()
                    .filter(|(k, _)| k != "reasons")
                    .map(|(k, v)| (k, without_reasons(v)))
                    .collect(),
            ),
            Value::Union(i, v) => Value::Union(i, Box::new(without_reasons(*v))),
            other => other,
        }
    }

    /// The bytes a scorer from before reasons wrote for `record`.
    fn old_layout(record: &ShadowScore) -> Vec<u8> {
        let mut json: serde_json::Value =
            serde_json::from_str(leadscore_schemas::find("ShadowScore.avsc").unwrap().text)
                .unwrap();
        crate::drop_reasons(&mut json);
        let schema = apache_avro::Schema::parse_str(&json.to_string()).unwrap();
        apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(without_reasons(record.to_value()))
            .unwrap()
    }

    proptest! {
        #[test]
        fn lead_scores_read_back_what_the_scorer_wrote(
            features in proptest::collection::btree_map("[a-z_]{1,16}", raw(), 0..12),
            score in 0.0f64..1.0,
            band in band(),
            version in "[0-9]{1,4}",
            event in any::<i64>(),
            latency in 0.0f64..1e6,
            source in any::<bool>(),
        ) {
            let record = LeadScore {
                lead_id: "lead-1".into(),
                model: model(band, score, version.clone()),
                role: Role::Canary,
                features: features.clone().into_iter().collect(),
                event_time_ms: event,
                scored_at_ms: 7,
                latency_ms: latency,
                source: source.then(|| Source { topic: "t".into(), partition: 3, offset: 9 }),
            };
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            // A map left over from an earlier record: its extra keys read as Null.
            let mut got = BTreeMap::from([("zz_stale".to_string(), RawValue::String("x".into()))]);
            let s = lead_score(&bytes, &mut got).unwrap();
            prop_assert_eq!(got.remove("zz_stale"), Some(RawValue::Null));
            prop_assert_eq!(got, features);
            prop_assert_eq!(s.score, score);
            prop_assert_eq!(BANDS[s.band], band.as_str());
            prop_assert_eq!(s.model_version, version.as_str());
            prop_assert_eq!(s.event_time_ms, event);
            prop_assert_eq!(s.latency_ms, latency);
            // Any truncation is an error, never a panic.
            for cut in 0..bytes.len() {
                let _ = lead_score(&bytes[..cut], &mut BTreeMap::new());
            }
        }

        #[test]
        fn shadow_scores_read_back_what_the_scorer_wrote(
            live in 0.0f64..1.0, shadow in 0.0f64..1.0, lb in band(), sb in band(), event in any::<i64>(),
            error in proptest::option::of(".{0,20}"),
            shadow_reasons in proptest::option::of(proptest::collection::vec("[a-z_]{1,8}=[a-z0-9 ]{0,6} [+-]0\\.[0-9]{2}", 0..4)),
            live_reasons in proptest::option::of(proptest::collection::vec("[a-z_]{1,8}=[a-z0-9 ]{0,6} [+-]0\\.[0-9]{2}", 0..4)),
        ) {
            let top = |r: &Option<Vec<String>>| {
                r.as_ref().and_then(|r| r.first()).map(|r| r.split('=').next().unwrap().to_string())
            };
            let mut record = ShadowScore {
                lead_id: "lead-2".into(),
                reason: if error.is_some() { Reason::Canary } else { Reason::Challenger },
                shadow: ModelScore { reasons: shadow_reasons.clone().map(Into::into), ..model(sb, shadow, "8".into()) },
                live: ModelScore { reasons: live_reasons.clone().map(Into::into), ..model(lb, live, "7".into()) },
                live_role: Role::Champion,
                event_time_ms: event,
                scored_at_ms: 1,
                latency_ms: 2.0,
                error: None,
            };
            let mut before_error = Vec::new();
            record.encode(&mut before_error);
            before_error.pop(); // the `error` union: records written before it existed end here
            record.error = error.clone();
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            let now = Layout { reasons: true };
            let s = shadow_score(&bytes, now).unwrap();
            prop_assert_eq!(s.shadow_top.map(str::to_string), top(&shadow_reasons));
            prop_assert_eq!(s.live_top.map(str::to_string), top(&live_reasons));
            prop_assert_eq!((s.shadow_name, s.shadow_version, s.live_version), ("lead-scoring", "8", "7"));
            prop_assert_eq!((s.shadow, s.live), (shadow, live));
            prop_assert_eq!((BANDS[s.shadow_band], BANDS[s.live_band]), (sb.as_str(), lb.as_str()));
            prop_assert_eq!(s.event_time_ms, event);
            prop_assert_eq!(s.failed, error.is_some());
            let old = shadow_score(&before_error, now).unwrap();
            prop_assert!(!old.failed);
            prop_assert_eq!(old.shadow_version, "8");
            // Cut anywhere before the optional `error` field: an error, never a panic.
            for cut in 0..before_error.len() {
                prop_assert!(shadow_score(&bytes[..cut], now).is_err());
            }
            // Written by a scorer from before reasons: the same fields, no reasons.
            let older = old_layout(&record);
            let o = shadow_score(&older, Layout { reasons: false }).unwrap();
            prop_assert_eq!((o.shadow, o.live, o.event_time_ms), (shadow, live, event));
            prop_assert_eq!((o.shadow_top, o.live_top, o.failed), (None, None, error.is_some()));
        }
    }
}
