//! What a dead letter carries: the record without its PII columns when it decodes, else the
//! raw bytes; either capped in size so the dead letter always fits the topic.
//!
//! Pure: the scorer calls it on the error path only, so good records pay nothing.

use apache_avro::types::Value;
use leadscore_crm::Lead;
use serde_json::Value as Json;
use sha2::{Digest as _, Sha256};

/// The PII columns of `public.leads`, removed from every dead letter (more can be configured).
pub const PII_COLUMNS: [&str; 3] = ["email", "phone", "full_name"];

/// How a dead letter's payload relates to the input record (header `leadscore.payload.form`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// The decoded record as JSON, PII columns removed at any depth.
    Redacted,
    /// The input bytes as they came (they did not decode, so nothing could be removed).
    Raw,
    /// No payload: see the source topic, partition and offset.
    Omitted,
}

impl Form {
    /// Stable header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Redacted => "redacted-json",
            Form::Raw => "raw",
            Form::Omitted => "omitted",
        }
    }
}

/// A dead letter's payload and what describes it in headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadPayload {
    /// The bytes to write (at most the cap).
    pub bytes: Vec<u8>,
    /// What they are.
    pub form: Form,
    /// Whether `bytes` were cut at the cap.
    pub truncated: bool,
    /// Size of the input record's value, bytes.
    pub original_size: usize,
    /// SHA-256 of the input record's value, lower-case hex.
    pub original_sha256: String,
}

impl DeadPayload {
    /// A payload for `original`: `redacted` when the record decoded, else the raw bytes; cut
    /// to `cap` bytes.
    pub fn new(original: &[u8], redacted: Option<Vec<u8>>, cap: usize) -> Self {
        let (mut bytes, form) = match redacted {
            Some(r) => (r, Form::Redacted),
            None => (original.to_vec(), Form::Raw),
        };
        let truncated = bytes.len() > cap;
        bytes.truncate(cap);
        Self {
            bytes,
            form,
            truncated,
            original_size: original.len(),
            original_sha256: sha256_hex(original),
        }
    }

    /// The lead `original` decoded into (a row without PII columns) as JSON, for a lead that
    /// decoded but could not be scored.
    pub fn lead(lead: &Lead, original: &[u8], cap: usize) -> Self {
        let doc = serde_json::json!({
            "lead_id": lead.lead_id,
            "company_size": lead.company_size,
            "industry": lead.industry,
            "page_views": lead.page_views,
            "time_on_site": lead.time_on_site.map(number),
            "form_completion_time": lead.form_completion_time.map(number),
            "referral_source": lead.referral_source,
            "country": lead.country,
            "created_at": lead.created_at.to_rfc3339(),
            "updated_at": lead.updated_at.to_rfc3339(),
            "status": lead.status.as_str(),
            "converted_at": lead.converted_at.map(|t| t.to_rfc3339()),
        });
        Self::new(original, serde_json::to_vec(&doc).ok(), cap)
    }

    /// No payload: only the original's size and digest; the source position finds the record.
    pub fn omitted(original: &[u8]) -> Self {
        Self {
            bytes: Vec::new(),
            form: Form::Omitted,
            truncated: false,
            original_size: original.len(),
            original_sha256: sha256_hex(original),
        }
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn is_pii(key: &str, pii: &[String]) -> bool {
    PII_COLUMNS.iter().any(|c| c.eq_ignore_ascii_case(key))
        || pii.iter().any(|c| c.eq_ignore_ascii_case(key))
}

fn strip(doc: &mut Json, pii: &[String]) {
    match doc {
        Json::Object(map) => {
            map.retain(|k, _| !is_pii(k, pii));
            for v in map.values_mut() {
                strip(v, pii);
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|v| strip(v, pii)),
        _ => {}
    }
}

/// The JSON record without PII columns (removed at any depth, also from an embedded schema's
/// field list), or `None` when `bytes` are not JSON.
pub fn redact_json(bytes: &[u8], pii: &[String]) -> Option<Vec<u8>> {
    let mut doc: Json = serde_json::from_slice(bytes).ok()?;
    strip(&mut doc, pii);
    strip_schema_fields(&mut doc, pii);
    serde_json::to_vec(&doc).ok()
}

/// Debezium's embedded schema lists fields as `{"field": "email", ...}`: drop those entries too.
fn strip_schema_fields(doc: &mut Json, pii: &[String]) {
    match doc {
        Json::Object(map) => map.values_mut().for_each(|v| strip_schema_fields(v, pii)),
        Json::Array(items) => {
            items.retain(|v| {
                !v.get("field")
                    .and_then(Json::as_str)
                    .is_some_and(|f| is_pii(f, pii))
            });
            items.iter_mut().for_each(|v| strip_schema_fields(v, pii));
        }
        _ => {}
    }
}

/// A decoded Avro record as JSON without PII fields (at any depth).
pub fn redact_avro(value: &Value, pii: &[String]) -> Vec<u8> {
    let mut doc = avro_json(value, pii);
    strip(&mut doc, pii);
    serde_json::to_vec(&doc).unwrap_or_default()
}

fn number(f: f64) -> Json {
    serde_json::Number::from_f64(f).map_or_else(|| Json::String(f.to_string()), Json::Number)
}

fn avro_json(value: &Value, pii: &[String]) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Int(i) | Value::Date(i) | Value::TimeMillis(i) => Json::from(*i),
        Value::Long(i)
        | Value::TimeMicros(i)
        | Value::TimestampMillis(i)
        | Value::TimestampMicros(i)
        | Value::TimestampNanos(i)
        | Value::LocalTimestampMillis(i)
        | Value::LocalTimestampMicros(i)
        | Value::LocalTimestampNanos(i) => Json::from(*i),
        Value::Float(f) => number(f64::from(*f)),
        Value::Double(f) => number(*f),
        Value::String(s) | Value::Enum(_, s) => Json::String(s.clone()),
        Value::Uuid(u) => Json::String(u.to_string()),
        Value::Bytes(b) | Value::Fixed(_, b) => Json::String(sha256_hex(b)),
        Value::Union(_, v) => avro_json(v, pii),
        Value::Array(items) => Json::Array(items.iter().map(|v| avro_json(v, pii)).collect()),
        Value::Map(m) => Json::Object(
            m.iter()
                .filter(|(k, _)| !is_pii(k, pii))
                .map(|(k, v)| (k.clone(), avro_json(v, pii)))
                .collect(),
        ),
        Value::Record(fields) => Json::Object(
            fields
                .iter()
                .filter(|(k, _)| !is_pii(k, pii))
                .map(|(k, v)| (k.clone(), avro_json(v, pii)))
                .collect(),
        ),
        // Decimals and durations are not in the CRM row; keep their kind, not their bytes.
        other => Json::String(format!("<{}>", kind_name(other))),
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Decimal(_) | Value::BigDecimal(_) => "decimal",
        Value::Duration(_) => "duration",
        _ => "value",
    }
}

/// `message` cut to at most `max` bytes at a character boundary (header values stay bounded).
pub fn bounded(message: &str, max: usize) -> &str {
    if message.len() <= max {
        return message;
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_loses_pii_at_every_depth_and_in_the_embedded_schema() {
        let doc = serde_json::json!({
            "schema": {"fields": [{"field": "after", "fields": [{"field": "email"}, {"field": "lead_id"}]}]},
            "payload": {"op": "c", "after": {"lead_id": "l1", "email": "a@b.c", "Phone": "+1", "full_name": "N", "ssn": "x"}}
        });
        let out = redact_json(&serde_json::to_vec(&doc).unwrap(), &["ssn".into()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        for gone in ["a@b.c", "+1", "\"N\"", "email", "ssn", "full_name"] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert!(text.contains("\"lead_id\":\"l1\""), "{text}");
        assert_eq!(redact_json(b"{not json", &[]), None);
    }

    #[test]
    fn avro_records_lose_pii_fields() {
        let v = Value::Record(vec![
            ("op".into(), Value::String("c".into())),
            (
                "after".into(),
                Value::Union(
                    1,
                    Box::new(Value::Record(vec![
                        ("lead_id".into(), Value::String("l2".into())),
                        (
                            "email".into(),
                            Value::Union(1, Box::new(Value::String("p@q.r".into()))),
                        ),
                        ("page_views".into(), Value::Int(3)),
                        ("time_on_site".into(), Value::Double(f64::NAN)),
                    ])),
                ),
            ),
        ]);
        let text = String::from_utf8(redact_avro(&v, &[])).unwrap();
        assert!(!text.contains("p@q.r") && !text.contains("email"), "{text}");
        assert!(
            text.contains("\"page_views\":3") && text.contains("NaN"),
            "{text}"
        );
    }

    #[test]
    fn payloads_are_capped_and_keep_the_original_digest() {
        let big = vec![b'x'; 10_000];
        let d = DeadPayload::new(&big, None, 1000);
        assert_eq!(
            (d.bytes.len(), d.truncated, d.form),
            (1000, true, Form::Raw)
        );
        assert_eq!(d.original_size, 10_000);
        assert_eq!(d.original_sha256, sha256_hex(&big));
        let small = DeadPayload::new(b"abc", Some(b"{}".to_vec()), 1000);
        assert_eq!(
            (small.bytes.as_slice(), small.truncated),
            (&b"{}"[..], false)
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_refused_lead_is_carried_without_pii_and_with_the_original_digest() {
        let lead = Lead {
            lead_id: "l9".into(),
            company_size: Some("Small".into()),
            industry: Some("X".repeat(500)),
            page_views: Some(3),
            time_on_site: Some(-4.0),
            form_completion_time: None,
            referral_source: None,
            country: None,
            created_at: chrono::DateTime::UNIX_EPOCH,
            updated_at: chrono::DateTime::UNIX_EPOCH,
            status: leadscore_crm::Status::New,
            converted_at: None,
        };
        let original = br#"{"after": {"lead_id": "l9", "email": "a@b.c"}}"#;
        let d = DeadPayload::lead(&lead, original, 100_000);
        assert_eq!(d.form, Form::Redacted);
        let doc: Json = serde_json::from_slice(&d.bytes).unwrap();
        assert_eq!(doc["lead_id"], "l9");
        assert_eq!(doc["time_on_site"], -4.0);
        assert_eq!(d.original_sha256, sha256_hex(original));
        assert_eq!(d.original_size, original.len());
        assert!(DeadPayload::lead(&lead, original, 64).truncated);
    }

    proptest! {
        #[test]
        fn bounded_never_exceeds_and_stays_a_prefix(s in "\\PC{0,64}", max in 0usize..80) {
            let b = bounded(&s, max);
            prop_assert!(b.len() <= max);
            prop_assert!(s.starts_with(b));
        }

        #[test]
        fn capped_payloads_never_exceed_the_cap(len in 0usize..5000, cap in 0usize..3000) {
            let d = DeadPayload::new(&vec![7u8; len], None, cap);
            prop_assert!(d.bytes.len() <= cap);
            prop_assert_eq!(d.truncated, len > cap);
        }
    }
}
