//! The scorer's output records, written straight to Avro binary.
//!
//! `LeadScore` and `ShadowScore` are the two records the scorer writes for
//! every lead. Building a generic `apache_avro::types::Value` tree, then
//! validating and encoding it, cost more than scoring the lead; these types
//! write the Avro binary encoding of `schemas/LeadScore.avsc` and
//! `schemas/ShadowScore.avsc` directly (zig-zag varints, length-prefixed
//! strings, union and enum indexes, fields in schema order). The tests decode
//! the bytes with the catalogue's schemas and compare them with
//! [`LeadScore::to_value`] / [`ShadowScore::to_value`], so a schema change
//! that this file does not follow fails the build's tests.

use apache_avro::types::Value;
use leadscore_features::RawValue;
use leadscore_model::Band;

/// Which model served the live score (`ModelRole`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The champion.
    Champion,
    /// The canary candidate.
    Canary,
}

impl Role {
    fn index(self) -> u32 {
        match self {
            Role::Champion => 0,
            Role::Canary => 1,
        }
    }

    /// Symbol in the schema.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Champion => "champion",
            Role::Canary => "canary",
        }
    }
}

/// Why a shadow score exists (`ShadowReason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The challenger in shadow.
    Challenger,
    /// The champion, for leads the canary serves.
    CanaryChampion,
    /// The canary, which failed on a lead it should have served (`error` says why).
    Canary,
}

impl Reason {
    fn index(self) -> u32 {
        match self {
            Reason::Challenger => 0,
            Reason::CanaryChampion => 1,
            Reason::Canary => 2,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Reason::Challenger => "challenger",
            Reason::CanaryChampion => "canary_champion",
            Reason::Canary => "canary",
        }
    }
}

fn band_index(band: Band) -> u32 {
    match band {
        Band::High => 0,
        Band::Medium => 1,
        Band::Low => 2,
    }
}

/// One model's score (`ModelScore`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelScore {
    /// Model name.
    pub model_name: String,
    /// Model version.
    pub model_version: String,
    /// Probability.
    pub score: f64,
    /// Band of the score.
    pub band: Band,
    /// The model's reasons (`feature=value +0.31`), largest first; `None`: not explained.
    pub reasons: Option<leadscore_model::ReasonTexts>,
}

/// Where the input came from (`SourcePosition`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// A live score (`LeadScore`).
#[derive(Debug, Clone, PartialEq)]
pub struct LeadScore {
    /// Lead id.
    pub lead_id: String,
    /// The live model's score.
    pub model: ModelScore,
    /// Champion or canary.
    pub role: Role,
    /// The feature values used, by name.
    pub features: Vec<(String, RawValue)>,
    /// Event time, ms since the epoch.
    pub event_time_ms: i64,
    /// Scoring time, ms since the epoch.
    pub scored_at_ms: i64,
    /// Event to score, ms.
    pub latency_ms: f64,
    /// Input position.
    pub source: Option<Source>,
}

fn encode_reasons(out: &mut Vec<u8>, reasons: &Option<leadscore_model::ReasonTexts>) {
    match reasons {
        None => long(out, 0),
        Some(list) => {
            long(out, 1);
            if !list.is_empty() {
                long(out, list.len() as i64);
                for r in list.iter() {
                    string(out, r);
                }
            }
            long(out, 0);
        }
    }
}

fn reasons_value(reasons: &Option<leadscore_model::ReasonTexts>) -> Value {
    match reasons {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(list) => Value::Union(
            1,
            Box::new(Value::Array(
                list.iter().map(|r| Value::String(r.clone())).collect(),
            )),
        ),
    }
}

/// A shadow score (`ShadowScore`).
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowScore {
    /// Lead id.
    pub lead_id: String,
    /// Why it exists.
    pub reason: Reason,
    /// The shadow model's score.
    pub shadow: ModelScore,
    /// The live score it shadows.
    pub live: ModelScore,
    /// The live score's role.
    pub live_role: Role,
    /// Event time, ms since the epoch.
    pub event_time_ms: i64,
    /// Scoring time, ms since the epoch.
    pub scored_at_ms: i64,
    /// Event to score, ms.
    pub latency_ms: f64,
    /// Why the shadow model failed on this lead (its score is then meaningless).
    pub error: Option<String>,
}

fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    long(out, s.len() as i64);
    out.extend_from_slice(s.as_bytes());
}

fn double(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

impl ModelScore {
    fn encode(&self, out: &mut Vec<u8>) {
        string(out, &self.model_name);
        string(out, &self.model_version);
        double(out, self.score);
        long(out, i64::from(band_index(self.band)));
        encode_reasons(out, &self.reasons);
    }

    fn to_value(&self) -> Value {
        Value::Record(vec![
            ("model_name".into(), Value::String(self.model_name.clone())),
            (
                "model_version".into(),
                Value::String(self.model_version.clone()),
            ),
            ("score".into(), Value::Double(self.score)),
            (
                "band".into(),
                Value::Enum(band_index(self.band), self.band.as_str().into()),
            ),
            ("reasons".into(), reasons_value(&self.reasons)),
        ])
    }
}

impl LeadScore {
    /// Appends the Avro binary encoding (no frame) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        string(out, &self.lead_id);
        double(out, self.model.score);
        long(out, i64::from(band_index(self.model.band)));
        string(out, &self.model.model_name);
        string(out, &self.model.model_version);
        long(out, i64::from(self.role.index()));
        if !self.features.is_empty() {
            long(out, self.features.len() as i64);
            for (name, value) in &self.features {
                string(out, name);
                match value {
                    RawValue::Null => long(out, 0),
                    RawValue::Long(l) => {
                        long(out, 1);
                        long(out, *l);
                    }
                    RawValue::Double(d) => {
                        long(out, 2);
                        double(out, *d);
                    }
                    RawValue::String(s) => {
                        long(out, 3);
                        string(out, s);
                    }
                }
            }
        }
        long(out, 0);
        long(out, self.event_time_ms);
        long(out, self.scored_at_ms);
        double(out, self.latency_ms);
        match &self.source {
            None => long(out, 0),
            Some(s) => {
                long(out, 1);
                string(out, &s.topic);
                long(out, i64::from(s.partition));
                long(out, s.offset);
            }
        }
        encode_reasons(out, &self.model.reasons);
    }

    /// The same record as a generic Avro value (tests and tools).
    pub fn to_value(&self) -> Value {
        let features = self
            .features
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    RawValue::Null => Value::Union(0, Box::new(Value::Null)),
                    RawValue::Long(l) => Value::Union(1, Box::new(Value::Long(*l))),
                    RawValue::Double(d) => Value::Union(2, Box::new(Value::Double(*d))),
                    RawValue::String(s) => Value::Union(3, Box::new(Value::String(s.clone()))),
                };
                (k.clone(), v)
            })
            .collect();
        Value::Record(vec![
            ("lead_id".into(), Value::String(self.lead_id.clone())),
            ("score".into(), Value::Double(self.model.score)),
            (
                "band".into(),
                Value::Enum(band_index(self.model.band), self.model.band.as_str().into()),
            ),
            (
                "model_name".into(),
                Value::String(self.model.model_name.clone()),
            ),
            (
                "model_version".into(),
                Value::String(self.model.model_version.clone()),
            ),
            (
                "model_role".into(),
                Value::Enum(self.role.index(), self.role.as_str().into()),
            ),
            ("features".into(), Value::Map(features)),
            (
                "event_time".into(),
                Value::TimestampMillis(self.event_time_ms),
            ),
            (
                "scored_at".into(),
                Value::TimestampMillis(self.scored_at_ms),
            ),
            ("latency_ms".into(), Value::Double(self.latency_ms)),
            (
                "source".into(),
                match &self.source {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(s) => Value::Union(
                        1,
                        Box::new(Value::Record(vec![
                            ("topic".into(), Value::String(s.topic.clone())),
                            ("partition".into(), Value::Int(s.partition)),
                            ("offset".into(), Value::Long(s.offset)),
                        ])),
                    ),
                },
            ),
            ("reasons".into(), reasons_value(&self.model.reasons)),
        ])
    }
}

impl ShadowScore {
    /// Appends the Avro binary encoding (no frame) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        string(out, &self.lead_id);
        long(out, i64::from(self.reason.index()));
        self.shadow.encode(out);
        self.live.encode(out);
        long(out, i64::from(self.live_role.index()));
        long(out, self.event_time_ms);
        long(out, self.scored_at_ms);
        double(out, self.latency_ms);
        match &self.error {
            None => long(out, 0),
            Some(e) => {
                long(out, 1);
                string(out, e);
            }
        }
    }

    /// The same record as a generic Avro value (tests and tools).
    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("lead_id".into(), Value::String(self.lead_id.clone())),
            (
                "reason".into(),
                Value::Enum(self.reason.index(), self.reason.as_str().into()),
            ),
            ("shadow".into(), self.shadow.to_value()),
            ("live".into(), self.live.to_value()),
            (
                "live_role".into(),
                Value::Enum(self.live_role.index(), self.live_role.as_str().into()),
            ),
            (
                "event_time".into(),
                Value::TimestampMillis(self.event_time_ms),
            ),
            (
                "scored_at".into(),
                Value::TimestampMillis(self.scored_at_ms),
            ),
            ("latency_ms".into(), Value::Double(self.latency_ms)),
            (
                "error".into(),
                match &self.error {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(e) => Value::Union(1, Box::new(Value::String(e.clone()))),
                },
            ),
        ])
    }
}

/// Frames `encode` in the Confluent wire format for `schema_id`.
pub fn framed(schema_id: u32, encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    encode(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schema(file: &str) -> &'static apache_avro::Schema {
        Box::leak(Box::new(
            apache_avro::Schema::parse_str(leadscore_schemas::find(file).unwrap().text).unwrap(),
        ))
    }

    fn decode(schema: &'static apache_avro::Schema, bytes: &[u8]) -> Value {
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema)
            .build()
            .unwrap();
        let mut datum = bytes;
        let v = reader.read_value(&mut datum).unwrap();
        assert!(datum.is_empty(), "trailing bytes");
        v
    }

    fn sorted_map(v: Value) -> Value {
        // Maps decode in arbitrary order; compare them sorted.
        match v {
            Value::Record(fields) => Value::Record(
                fields
                    .into_iter()
                    .map(|(k, v)| (k, sorted_map(v)))
                    .collect(),
            ),
            Value::Map(m) => {
                let sorted: std::collections::BTreeMap<_, _> = m.into_iter().collect();
                Value::Array(
                    sorted
                        .into_iter()
                        .map(|(k, v)| Value::Array(vec![Value::String(k), v]))
                        .collect(),
                )
            }
            other => other,
        }
    }

    fn band() -> impl Strategy<Value = Band> {
        prop_oneof![Just(Band::High), Just(Band::Medium), Just(Band::Low)]
    }

    fn model_score() -> impl Strategy<Value = ModelScore> {
        (
            ".{0,12}",
            "[a-z0-9.-]{0,8}",
            0.0f64..=1.0,
            band(),
            proptest::option::of(proptest::collection::vec(".{0,24}", 0..4)),
        )
            .prop_map(|(n, v, s, b, r)| ModelScore {
                model_name: n,
                model_version: v,
                score: s,
                band: b,
                reasons: r.map(Into::into),
            })
    }

    fn raw() -> impl Strategy<Value = RawValue> {
        prop_oneof![
            Just(RawValue::Null),
            any::<i64>().prop_map(RawValue::Long),
            any::<f64>()
                .prop_filter("NaN never equals itself", |d| !d.is_nan())
                .prop_map(RawValue::Double),
            ".{0,10}".prop_map(RawValue::String),
        ]
    }

    proptest! {
        #[test]
        fn lead_score_bytes_decode_with_the_schema_to_the_same_record(
            lead_id in ".{0,20}",
            model in model_score(),
            canary in any::<bool>(),
            features in proptest::collection::btree_map("[a-z_]{1,12}", raw(), 0..12),
            event in any::<i64>(),
            scored in any::<i64>(),
            latency in 0.0f64..1e7,
            source in proptest::option::of((".{1,10}", any::<i32>(), any::<i64>())),
        ) {
            let record = LeadScore {
                lead_id,
                model,
                role: if canary { Role::Canary } else { Role::Champion },
                features: features.into_iter().collect(),
                event_time_ms: event,
                scored_at_ms: scored,
                latency_ms: latency,
                source: source.map(|(topic, partition, offset)| Source { topic, partition, offset }),
            };
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            let decoded = decode(schema("LeadScore.avsc"), &bytes);
            prop_assert_eq!(sorted_map(decoded), sorted_map(record.to_value()));
        }

        #[test]
        fn shadow_score_bytes_decode_with_the_schema_to_the_same_record(
            lead_id in ".{0,20}",
            shadow in model_score(),
            live in model_score(),
            canary in any::<bool>(),
            reason in 0u8..3,
            event in any::<i64>(),
            scored in any::<i64>(),
            latency in 0.0f64..1e7,
            error in proptest::option::of(".{0,30}"),
        ) {
            let record = ShadowScore {
                lead_id,
                reason: [Reason::Challenger, Reason::CanaryChampion, Reason::Canary][usize::from(reason)],
                shadow,
                live,
                live_role: if canary { Role::Canary } else { Role::Champion },
                event_time_ms: event,
                scored_at_ms: scored,
                latency_ms: latency,
                error,
            };
            let mut bytes = Vec::new();
            record.encode(&mut bytes);
            let decoded = decode(schema("ShadowScore.avsc"), &bytes);
            prop_assert_eq!(decoded, record.to_value());
        }
    }

    #[test]
    fn frames_carry_the_schema_id() {
        let bytes = framed(0x0102_0304, |out| out.push(42));
        assert_eq!(bytes, [0, 1, 2, 3, 4, 42]);
    }
}
