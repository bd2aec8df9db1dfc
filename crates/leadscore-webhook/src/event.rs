//! What one delivery carries: the event read from a live-score record, its JSON body, its
//! idempotency key and its signature. Pure: no I/O, no clock.
//!
//! # Verifying a delivery (the receiver's side)
//!
//! Each request has the headers
//!
//! - `Leadscore-Idempotency-Key`: the same for every delivery of one score (retries, a
//!   restart of the service), different for the next score of the lead: store it and drop a
//!   request whose key you have seen;
//! - `Leadscore-Timestamp`: Unix seconds when this attempt was signed;
//! - `Leadscore-Signature`: `v1=<hex>`, the HMAC-SHA256 with the endpoint's secret of the
//!   timestamp, a `.`, and the raw body bytes.
//!
//! To verify: compute `HMAC_SHA256(secret, timestamp + "." + body)` over the body exactly as
//! received, compare it with the hex after `v1=` in constant time, and refuse a timestamp more
//! than five minutes from your clock (a replay). [`verify`] does exactly that.

use hmac::{Hmac, Mac};
use leadscore_cache::CachedScore;
use sha2::{Digest, Sha256};

/// A live score or a delete, as read from `leads.scores.v1`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A lead was scored.
    Scored(CachedScore),
    /// A lead was deleted from the CRM (a tombstone).
    Deleted {
        /// Lead id.
        lead_id: String,
        /// When the tombstone was written, ms since the epoch.
        at_ms: i64,
    },
}

/// Why a record cannot become an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreadable {
    /// A tombstone without a key: no lead to delete.
    #[error("a tombstone without a key")]
    KeylessTombstone,
    /// The value is not a `LeadScore`.
    #[error("not a LeadScore: {0}")]
    NotALeadScore(String),
}

impl Event {
    /// The event of a record: `value` decoded into `LeadScore.avsc`, or `None` for a
    /// tombstone of `key` written at `timestamp_ms`.
    pub fn from_record(
        key: Option<&[u8]>,
        value: Option<&apache_avro::types::Value>,
        timestamp_ms: i64,
    ) -> Result<Self, Unreadable> {
        let Some(value) = value else {
            let key = key.ok_or(Unreadable::KeylessTombstone)?;
            return Ok(Event::Deleted {
                lead_id: String::from_utf8_lossy(key).into_owned(),
                at_ms: timestamp_ms,
            });
        };
        CachedScore::from_lead_score(value)
            .map(Event::Scored)
            .map_err(Unreadable::NotALeadScore)
    }

    /// The lead.
    pub fn lead_id(&self) -> &str {
        match self {
            Event::Scored(s) => &s.lead_id,
            Event::Deleted { lead_id, .. } => lead_id,
        }
    }

    /// Stable for one score of one lead (its model version and scoring time) or one delete:
    /// a retry or a redelivery after a restart carries the same key.
    pub fn idempotency_key(&self) -> String {
        let mut h = Sha256::new();
        match self {
            Event::Scored(s) => {
                h.update(b"scored\0");
                h.update(s.lead_id.as_bytes());
                h.update(b"\0");
                h.update(s.model_name.as_bytes());
                h.update(b"\0");
                h.update(s.model_version.as_bytes());
                h.update(b"\0");
                h.update(s.scored_at_ms.to_be_bytes());
            }
            Event::Deleted { lead_id, at_ms } => {
                h.update(b"deleted\0");
                h.update(lead_id.as_bytes());
                h.update(b"\0");
                h.update(at_ms.to_be_bytes());
            }
        }
        let digest = h.finalize();
        let mut key = String::with_capacity(35);
        key.push_str("ls_");
        for b in &digest[..16] {
            key.push_str(&format!("{b:02x}"));
        }
        key
    }

    /// The JSON body: `{"type", "id", "lead_id", ...}`; scores also carry `score`, `band`,
    /// `model` (`name`, `version`, `role`), `scored_at` (RFC 3339) and `reasons`.
    pub fn body(&self) -> Vec<u8> {
        let rfc3339 = |ms: i64| {
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        };
        let value = match self {
            Event::Scored(s) => serde_json::json!({
                "type": "lead.scored",
                "id": self.idempotency_key(),
                "lead_id": s.lead_id,
                "score": s.score,
                "band": s.band,
                "model": {"name": s.model_name, "version": s.model_version, "role": s.model_role},
                "scored_at": rfc3339(s.scored_at_ms),
                "reasons": s.reasons,
            }),
            Event::Deleted { lead_id, at_ms } => serde_json::json!({
                "type": "lead.deleted",
                "id": self.idempotency_key(),
                "lead_id": lead_id,
                "deleted_at": rfc3339(*at_ms),
            }),
        };
        value.to_string().into_bytes()
    }

    /// Whether an endpoint with these filters takes this event (empty: everything). A
    /// delete goes to every endpoint that takes some of the lead's scores.
    pub fn passes(&self, bands: &[String], models: &[String]) -> bool {
        match self {
            Event::Scored(s) => {
                (bands.is_empty() || bands.contains(&s.band))
                    && (models.is_empty() || models.contains(&s.model_name))
            }
            Event::Deleted { .. } => true,
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// The MAC of `timestamp.body`; `None` never happens for HMAC (any key length is valid).
fn mac(secret: &[u8], timestamp: i64, body: &[u8]) -> Option<HmacSha256> {
    let mut m = HmacSha256::new_from_slice(secret).ok()?;
    m.update(timestamp.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    Some(m)
}

/// The `Leadscore-Signature` header value of `body` signed at `timestamp` (Unix seconds).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    if let Some(m) = mac(secret, timestamp, body) {
        for b in m.finalize().into_bytes() {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out
}

/// The receiver's check: `header` is `v1=<hex>` of `body` at `timestamp`, and `timestamp`
/// is within `tolerance_secs` of `now_secs`. Constant-time in the tag.
pub fn verify(
    secret: &[u8],
    header: &str,
    timestamp: i64,
    body: &[u8],
    now_secs: i64,
    tolerance_secs: i64,
) -> bool {
    if (now_secs - timestamp).abs() > tolerance_secs {
        return false;
    }
    let Some(hex) = header.strip_prefix("v1=") else {
        return false;
    };
    if hex.len() != 64 {
        return false;
    }
    let mut tag = [0u8; 32];
    for (i, byte) in tag.iter_mut().enumerate() {
        match u8::from_str_radix(&hex[2 * i..2 * i + 2], 16) {
            Ok(b) => *byte = b,
            Err(_) => return false,
        }
    }
    mac(secret, timestamp, body).is_some_and(|m| m.verify_slice(&tag).is_ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use apache_avro::types::Value;
    use proptest::prelude::*;

    fn record(version: &str, scored_at: i64, reasons: Option<Vec<&str>>) -> Value {
        Value::Record(vec![
            ("lead_id".into(), Value::String("lead_1".into())),
            ("score".into(), Value::Double(0.71)),
            ("band".into(), Value::Enum(0, "High".into())),
            ("model_name".into(), Value::String("lead-scoring".into())),
            ("model_version".into(), Value::String(version.into())),
            ("model_role".into(), Value::Enum(0, "champion".into())),
            ("scored_at".into(), Value::TimestampMillis(scored_at)),
            (
                "reasons".into(),
                match reasons {
                    None => Value::Union(0, Box::new(Value::Null)),
                    Some(r) => Value::Union(
                        1,
                        Box::new(Value::Array(
                            r.into_iter().map(|s| Value::String(s.into())).collect(),
                        )),
                    ),
                },
            ),
        ])
    }

    #[test]
    fn a_score_becomes_a_body_with_its_reasons_and_a_stable_key() {
        let v = record("7", 1_700_000_000_123, Some(vec!["page_views=42 +0.31"]));
        let e = Event::from_record(Some(b"lead_1"), Some(&v), 5).unwrap();
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(body["type"], "lead.scored");
        assert_eq!(body["lead_id"], "lead_1");
        assert_eq!(body["score"], 0.71);
        assert_eq!(body["band"], "High");
        assert_eq!(body["model"]["version"], "7");
        assert_eq!(body["model"]["role"], "champion");
        assert_eq!(body["scored_at"], "2023-11-14T22:13:20.123Z");
        assert_eq!(body["reasons"][0], "page_views=42 +0.31");
        assert_eq!(body["id"], e.idempotency_key());
        // The same score read again has the same key; the next score of the lead another.
        let again = Event::from_record(Some(b"lead_1"), Some(&v), 99).unwrap();
        assert_eq!(again.idempotency_key(), e.idempotency_key());
        let next = record("7", 1_700_000_000_124, None);
        let next = Event::from_record(None, Some(&next), 5).unwrap();
        assert_ne!(next.idempotency_key(), e.idempotency_key());
        let body: serde_json::Value = serde_json::from_slice(&next.body()).unwrap();
        assert_eq!(body["reasons"], serde_json::json!([]));
    }

    #[test]
    fn a_tombstone_is_a_delete_and_garbage_says_what_is_missing() {
        let e = Event::from_record(Some(b"lead_9"), None, 1_000).unwrap();
        assert_eq!(
            e,
            Event::Deleted {
                lead_id: "lead_9".into(),
                at_ms: 1_000
            }
        );
        assert!(e.passes(&["High".into()], &["other".into()]));
        let body: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(body["type"], "lead.deleted");
        assert_eq!(
            Event::from_record(None, None, 0),
            Err(Unreadable::KeylessTombstone)
        );
        let bad = Value::Record(vec![("lead_id".into(), Value::String("x".into()))]);
        assert_eq!(
            Event::from_record(None, Some(&bad), 0),
            Err(Unreadable::NotALeadScore("no `score`".into()))
        );
    }

    #[test]
    fn filters_by_band_and_model() {
        let v = record("1", 1, None);
        let e = Event::from_record(None, Some(&v), 0).unwrap();
        assert!(e.passes(&[], &[]));
        assert!(e.passes(&["High".into()], &["lead-scoring".into()]));
        assert!(!e.passes(&["Low".into()], &[]));
        assert!(!e.passes(&[], &["other".into()]));
    }

    #[test]
    fn signatures_verify_and_a_changed_byte_time_or_secret_does_not() {
        let body = br#"{"type":"lead.scored"}"#;
        let sig = signature(b"whsec_test", 1_700_000_000, body);
        assert!(sig.starts_with("v1=") && sig.len() == 67);
        assert!(verify(
            b"whsec_test",
            &sig,
            1_700_000_000,
            body,
            1_700_000_100,
            300
        ));
        assert!(!verify(
            b"whsec_other",
            &sig,
            1_700_000_000,
            body,
            1_700_000_100,
            300
        ));
        assert!(!verify(
            b"whsec_test",
            &sig,
            1_700_000_001,
            body,
            1_700_000_100,
            300
        ));
        assert!(!verify(
            b"whsec_test",
            &sig,
            1_700_000_000,
            b"{}",
            1_700_000_100,
            300
        ));
        assert!(
            !verify(b"whsec_test", &sig, 1_700_000_000, body, 1_700_000_400, 300),
            "too old: a replay"
        );
        assert!(!verify(
            b"whsec_test",
            "v1=zz",
            1_700_000_000,
            body,
            1_700_000_000,
            300
        ));
    }

    proptest! {
        #[test]
        fn any_body_signed_verifies(body in proptest::collection::vec(any::<u8>(), 0..512), t in 0i64..4_000_000_000, secret in proptest::collection::vec(any::<u8>(), 1..64)) {
            let sig = signature(&secret, t, &body);
            prop_assert!(verify(&secret, &sig, t, &body, t, 0));
        }
    }
}
