//! Debezium change events of `public.leads` and what they mean for scoring.
//!
//! Owns: turning a decoded Debezium envelope (an Avro [`Value`] already
//! resolved by the registry codec, or Debezium JsonConverter JSON with or
//! without an embedded schema) into a [`CdcEvent`], and the scoring
//! semantics of [`decide`]: create/snapshot scores, an update rescores only
//! when a feature input changed, a status change to converted/lost is an
//! outcome, a delete is a tombstone. Every refusal is a [`CdcError`] whose
//! [`ErrorKind`] goes into the dead-letter headers.
//!
//! Pure: no I/O. PII columns are ignored even when a producer sends them.

pub mod dead;
pub mod direct;

use apache_avro::types::Value;
use chrono::{DateTime, TimeZone, Utc};
use leadscore_crm::{Lead, Status};
use serde_json::Value as Json;

/// Why an input cannot be scored; the dead-letter header `error.kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Bytes that are neither Confluent Avro nor JSON.
    Undecodable,
    /// Confluent framing with a magic byte other than 0.
    BadMagic,
    /// A schema id the registry does not know.
    UnknownSchema,
    /// The record does not match its writer schema.
    AvroDecode,
    /// Not a Debezium envelope (no `op`, no `after`/`before` where needed).
    NotAnEnvelope,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong type.
    WrongType,
    /// A field's value is not acceptable (NaN, negative, absurd, oversized, empty id).
    InvalidValue,
    /// An `op` other than c, r, u, d, t.
    UnknownOp,
    /// Bytes left over after a complete Avro datum: not the record its schema describes.
    TrailingBytes,
    /// An output for the record could not be written (e.g. larger than the topic allows).
    Unwritable,
}

impl ErrorKind {
    /// Stable name used in headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Undecodable => "undecodable",
            ErrorKind::BadMagic => "bad_magic",
            ErrorKind::UnknownSchema => "unknown_schema",
            ErrorKind::AvroDecode => "avro_decode",
            ErrorKind::NotAnEnvelope => "not_an_envelope",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::WrongType => "wrong_type",
            ErrorKind::InvalidValue => "invalid_value",
            ErrorKind::UnknownOp => "unknown_op",
            ErrorKind::TrailingBytes => "trailing_bytes",
            ErrorKind::Unwritable => "unwritable",
        }
    }
}

/// An input that cannot be scored. Never carries field values that could be PII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}", kind = kind.as_str())]
pub struct CdcError {
    /// Category, for routing and counting.
    pub kind: ErrorKind,
    /// What is wrong, naming the field.
    pub message: String,
}

impl CdcError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = CdcError> = std::result::Result<T, E>;

/// Debezium operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Insert.
    Create,
    /// Snapshot read.
    Read,
    /// Update.
    Update,
    /// Delete.
    Delete,
    /// Truncate.
    Truncate,
}

/// A decoded change event.
#[derive(Debug, Clone, PartialEq)]
pub struct CdcEvent {
    /// Operation.
    pub op: Op,
    /// Row before (updates with REPLICA IDENTITY FULL, deletes).
    pub before: Option<Lead>,
    /// Row after (creates, reads, updates).
    pub after: Option<Lead>,
    /// When the change was made in the source, if known (ms since epoch).
    pub source_ts_ms: Option<i64>,
}

/// What the scorer does with an event.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Score this lead.
    Score(Lead),
    /// A lead reached an outcome (a label for drift and training), no rescore.
    Outcome {
        /// The lead.
        lead_id: String,
        /// Converted or lost.
        status: Status,
    },
    /// The lead is gone: tombstone its score and drop the cache entry.
    Delete {
        /// The lead.
        lead_id: String,
    },
    /// Nothing to do, and why.
    Ignore(&'static str),
}

fn features_equal(a: &Lead, b: &Lead) -> bool {
    a.company_size == b.company_size
        && a.industry == b.industry
        && a.page_views == b.page_views
        && a.time_on_site.map(f64::to_bits) == b.time_on_site.map(f64::to_bits)
        && a.form_completion_time.map(f64::to_bits) == b.form_completion_time.map(f64::to_bits)
        && a.referral_source == b.referral_source
        && a.country == b.country
        && a.created_at == b.created_at
}

/// The scoring semantics of one event.
pub fn decide(event: CdcEvent) -> Result<Action> {
    match event.op {
        Op::Create | Op::Read => match event.after {
            Some(lead) => Ok(Action::Score(lead)),
            None => Err(CdcError::new(
                ErrorKind::NotAnEnvelope,
                "create/read event without `after`",
            )),
        },
        Op::Update => {
            let Some(after) = event.after else {
                return Err(CdcError::new(
                    ErrorKind::NotAnEnvelope,
                    "update event without `after`",
                ));
            };
            match event.before {
                // Without the old row (REPLICA IDENTITY DEFAULT) we cannot tell: rescore.
                None => Ok(Action::Score(after)),
                Some(before) if !features_equal(&before, &after) => Ok(Action::Score(after)),
                Some(before) if before.status != after.status && after.status.is_outcome() => {
                    Ok(Action::Outcome {
                        lead_id: after.lead_id,
                        status: after.status,
                    })
                }
                Some(_) => Ok(Action::Ignore("update without a feature or outcome change")),
            }
        }
        Op::Delete => match event.before {
            Some(before) => Ok(Action::Delete {
                lead_id: before.lead_id,
            }),
            None => Err(CdcError::new(
                ErrorKind::NotAnEnvelope,
                "delete event without `before`",
            )),
        },
        Op::Truncate => Ok(Action::Ignore("truncate")),
    }
}

fn op_from(s: &str) -> Result<Op> {
    Ok(match s {
        "c" => Op::Create,
        "r" => Op::Read,
        "u" => Op::Update,
        "d" => Op::Delete,
        "t" => Op::Truncate,
        other => {
            return Err(CdcError::new(
                ErrorKind::UnknownOp,
                format!(
                    "op `{}` is not one of c, r, u, d, t",
                    other.chars().take(8).collect::<String>()
                ),
            ));
        }
    })
}

/// Field access shared by the Avro and JSON readers.
trait Row {
    fn field(&self, name: &str) -> Option<Field<'_>>;
}

/// A field value, normalised across Avro and JSON.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Null,
    Str(&'a str),
    Int(i64),
    Float(f64),
    Other(&'static str),
}

fn missing(name: &str) -> CdcError {
    CdcError::new(
        ErrorKind::MissingField,
        format!("field `{name}` is missing"),
    )
}

fn wrong(name: &str, expected: &str, got: &str) -> CdcError {
    CdcError::new(
        ErrorKind::WrongType,
        format!("field `{name}` should be {expected}, is {got}"),
    )
}

fn opt_str(row: &dyn Row, name: &str) -> Result<Option<String>> {
    match row.field(name) {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Str(s)) => Ok(Some(s.to_string())),
        Some(Field::Int(_)) => Err(wrong(name, "a string", "a number")),
        Some(Field::Float(_)) => Err(wrong(name, "a string", "a number")),
        Some(Field::Other(t)) => Err(wrong(name, "a string", t)),
    }
}

fn opt_int(row: &dyn Row, name: &str) -> Result<Option<i32>> {
    match row.field(name) {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Int(i)) => i32::try_from(i).map(Some).map_err(|_| {
            CdcError::new(
                ErrorKind::InvalidValue,
                format!("field `{name}` is out of range"),
            )
        }),
        Some(Field::Float(f)) if f.fract() == 0.0 && f.abs() < 2e9 => Ok(Some(f as i32)),
        Some(Field::Float(_)) => Err(wrong(name, "an integer", "a fraction")),
        Some(Field::Str(_)) => Err(wrong(name, "an integer", "a string")),
        Some(Field::Other(t)) => Err(wrong(name, "an integer", t)),
    }
}

fn opt_float(row: &dyn Row, name: &str) -> Result<Option<f64>> {
    match row.field(name) {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Float(f)) => Ok(Some(f)),
        Some(Field::Int(i)) => Ok(Some(i as f64)),
        // JSON cannot carry NaN/Infinity as numbers; Debezium writes them as strings.
        Some(Field::Str(s)) if matches!(s, "NaN" | "Infinity" | "-Infinity") => Err(CdcError::new(
            ErrorKind::InvalidValue,
            format!("field `{name}` is {s}"),
        )),
        Some(Field::Str(_)) => Err(wrong(name, "a number", "a string")),
        Some(Field::Other(t)) => Err(wrong(name, "a number", t)),
    }
}

fn opt_time(row: &dyn Row, name: &str) -> Result<Option<DateTime<Utc>>> {
    match row.field(name) {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Str(s)) => DateTime::parse_from_rfc3339(s)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| {
                CdcError::new(
                    ErrorKind::InvalidValue,
                    format!("field `{name}` is not an ISO-8601 timestamp"),
                )
            }),
        // Debezium's connect time precision: epoch milliseconds (micro with MicroTimestamp).
        Some(Field::Int(ms)) => {
            let ms = if ms.abs() > 100_000_000_000_000 {
                ms / 1000
            } else {
                ms
            };
            Utc.timestamp_millis_opt(ms)
                .single()
                .map(Some)
                .ok_or_else(|| {
                    CdcError::new(
                        ErrorKind::InvalidValue,
                        format!("field `{name}` is out of range"),
                    )
                })
        }
        Some(Field::Float(_)) => Err(wrong(name, "a timestamp", "a fraction")),
        Some(Field::Other(t)) => Err(wrong(name, "a timestamp", t)),
    }
}

fn lead_from(row: &dyn Row) -> Result<Lead> {
    let lead_id = opt_str(row, "lead_id")?.ok_or_else(|| missing("lead_id"))?;
    if lead_id.trim().is_empty() {
        return Err(CdcError::new(
            ErrorKind::InvalidValue,
            "field `lead_id` is empty",
        ));
    }
    let created_at = opt_time(row, "created_at")?.ok_or_else(|| missing("created_at"))?;
    let updated_at = opt_time(row, "updated_at")?.unwrap_or(created_at);
    let status = match opt_str(row, "status")? {
        None => Status::New,
        Some(s) => s.parse::<Status>().map_err(|_| {
            CdcError::new(
                ErrorKind::InvalidValue,
                "field `status` is not one of new, contacted, qualified, converted, lost",
            )
        })?,
    };
    Ok(Lead {
        lead_id,
        company_size: opt_str(row, "company_size")?,
        industry: opt_str(row, "industry")?,
        page_views: opt_int(row, "page_views")?,
        time_on_site: opt_float(row, "time_on_site")?,
        form_completion_time: opt_float(row, "form_completion_time")?,
        referral_source: opt_str(row, "referral_source")?,
        country: opt_str(row, "country")?,
        created_at,
        updated_at,
        status,
        converted_at: opt_time(row, "converted_at")?,
    })
}

// ---------------------------------------------------------------- Avro ---

struct AvroRow<'a>(&'a [(String, Value)]);

fn avro_field(v: &Value) -> Field<'_> {
    match v {
        Value::Null => Field::Null,
        Value::Union(_, inner) => avro_field(inner),
        Value::String(s) | Value::Enum(_, s) => Field::Str(s),
        Value::Int(i) | Value::Date(i) => Field::Int(i64::from(*i)),
        Value::Long(l) => Field::Int(*l),
        Value::TimestampMillis(ms) | Value::LocalTimestampMillis(ms) => Field::Int(*ms),
        Value::TimestampMicros(us) | Value::LocalTimestampMicros(us) => Field::Int(us / 1000),
        Value::Float(f) => Field::Float(f64::from(*f)),
        Value::Double(d) => Field::Float(*d),
        Value::Boolean(_) => Field::Other("a boolean"),
        Value::Bytes(_) | Value::Fixed(..) => Field::Other("bytes"),
        Value::Record(_) => Field::Other("a record"),
        Value::Array(_) => Field::Other("an array"),
        Value::Map(_) => Field::Other("a map"),
        _ => Field::Other("an unsupported Avro type"),
    }
}

impl Row for AvroRow<'_> {
    fn field(&self, name: &str) -> Option<Field<'_>> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| avro_field(v))
    }
}

fn avro_record<'a>(v: &'a Value, name: &str) -> Result<Option<&'a [(String, Value)]>> {
    match v {
        Value::Null => Ok(None),
        Value::Union(_, inner) => avro_record(inner, name),
        Value::Record(fields) => Ok(Some(fields)),
        _ => Err(wrong(name, "a record", "something else")),
    }
}

/// Decodes a Debezium envelope decoded from Avro.
pub fn from_avro(value: &Value) -> Result<CdcEvent> {
    let Value::Record(fields) = value else {
        return Err(CdcError::new(
            ErrorKind::NotAnEnvelope,
            "the value is not a record",
        ));
    };
    let get = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let op = match get("op").map(avro_field) {
        Some(Field::Str(s)) => op_from(s)?,
        Some(_) => return Err(wrong("op", "a string", "another type")),
        None => {
            return Err(CdcError::new(
                ErrorKind::NotAnEnvelope,
                "no `op` field: not a Debezium envelope",
            ));
        }
    };
    let row = |name: &str| -> Result<Option<Lead>> {
        match get(name) {
            None => Ok(None),
            Some(v) => avro_record(v, name)?
                .map(|r| lead_from(&AvroRow(r)))
                .transpose(),
        }
    };
    let source_ts_ms = match get("source") {
        Some(Value::Record(src)) => {
            src.iter()
                .find(|(k, _)| k == "ts_ms")
                .and_then(|(_, v)| match avro_field(v) {
                    Field::Int(ms) => Some(ms),
                    _ => None,
                })
        }
        _ => None,
    }
    .or_else(|| match get("ts_ms").map(avro_field) {
        Some(Field::Int(ms)) => Some(ms),
        _ => None,
    });
    Ok(CdcEvent {
        op,
        before: row("before")?,
        after: row("after")?,
        source_ts_ms,
    })
}

// ---------------------------------------------------------------- JSON ---

struct JsonRow<'a>(&'a serde_json::Map<String, Json>);

impl Row for JsonRow<'_> {
    fn field(&self, name: &str) -> Option<Field<'_>> {
        self.0.get(name).map(|v| match v {
            Json::Null => Field::Null,
            Json::String(s) => Field::Str(s),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Field::Int(i),
                None => Field::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::Bool(_) => Field::Other("a boolean"),
            Json::Array(_) => Field::Other("an array"),
            Json::Object(_) => Field::Other("an object"),
        })
    }
}

/// Decodes Debezium JsonConverter output, with (`{"schema":..,"payload":..}`) or without an embedded schema.
pub fn from_json(bytes: &[u8]) -> Result<CdcEvent> {
    let doc: Json = serde_json::from_slice(bytes)
        .map_err(|e| CdcError::new(ErrorKind::Undecodable, format!("not JSON: {e}")))?;
    let payload = match doc.get("payload") {
        Some(p) if doc.get("schema").is_some() => p,
        _ => &doc,
    };
    let Json::Object(env) = payload else {
        return Err(CdcError::new(
            ErrorKind::NotAnEnvelope,
            "JSON value is not an object",
        ));
    };
    let op = match env.get("op") {
        Some(Json::String(s)) => op_from(s)?,
        Some(_) => return Err(wrong("op", "a string", "another type")),
        None => {
            return Err(CdcError::new(
                ErrorKind::NotAnEnvelope,
                "no `op` field: not a Debezium envelope",
            ));
        }
    };
    let row = |name: &str| -> Result<Option<Lead>> {
        match env.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Object(r)) => lead_from(&JsonRow(r)).map(Some),
            Some(_) => Err(wrong(name, "an object", "another type")),
        }
    };
    let source_ts_ms = env
        .get("source")
        .and_then(|s| s.get("ts_ms"))
        .and_then(Json::as_i64)
        .or_else(|| env.get("ts_ms").and_then(Json::as_i64));
    Ok(CdcEvent {
        op,
        before: row("before")?,
        after: row("after")?,
        source_ts_ms,
    })
}

/// A Debezium change event (`crm.public.leads.Envelope.avsc`) for `lead`:
/// `op` is `c` (create) or `r` (snapshot read, how re-scoring goes through
/// the normal pipeline). Never carries PII: `Lead` has none.
pub fn envelope(lead: &leadscore_crm::Lead, op: &str, ts_ms: i64) -> Value {
    let opt_s = |v: &Option<String>| match v {
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    };
    let null = || Value::Union(0, Box::new(Value::Null));
    let row = Value::Record(vec![
        ("lead_id".into(), Value::String(lead.lead_id.clone())),
        ("company_size".into(), opt_s(&lead.company_size)),
        ("industry".into(), opt_s(&lead.industry)),
        (
            "page_views".into(),
            lead.page_views
                .map_or_else(null, |v| Value::Union(1, Box::new(Value::Int(v)))),
        ),
        (
            "time_on_site".into(),
            lead.time_on_site
                .map_or_else(null, |v| Value::Union(1, Box::new(Value::Double(v)))),
        ),
        (
            "form_completion_time".into(),
            lead.form_completion_time
                .map_or_else(null, |v| Value::Union(1, Box::new(Value::Double(v)))),
        ),
        ("referral_source".into(), opt_s(&lead.referral_source)),
        ("country".into(), opt_s(&lead.country)),
        (
            "created_at".into(),
            Value::String(lead.created_at.to_rfc3339()),
        ),
        (
            "updated_at".into(),
            Value::String(lead.updated_at.to_rfc3339()),
        ),
        ("status".into(), Value::String(lead.status.as_str().into())),
        (
            "converted_at".into(),
            lead.converted_at.map_or_else(null, |t| {
                Value::Union(1, Box::new(Value::String(t.to_rfc3339())))
            }),
        ),
        // An outcome column, not on `Lead`: the scorer never reads it.
        ("deal_value".into(), null()),
    ]);
    let source = Value::Record(vec![
        ("version".into(), Value::String("3.6.1.Final".into())),
        ("connector".into(), Value::String("postgresql".into())),
        ("name".into(), Value::String("crm".into())),
        ("ts_ms".into(), Value::Long(ts_ms)),
        (
            "snapshot".into(),
            Value::Union(0, Box::new(Value::String("false".into()))),
        ),
        ("db".into(), Value::String("crm".into())),
        ("sequence".into(), null()),
        ("ts_us".into(), null()),
        ("ts_ns".into(), null()),
        ("schema".into(), Value::String("public".into())),
        ("table".into(), Value::String("leads".into())),
        ("txId".into(), null()),
        ("lsn".into(), null()),
        ("xmin".into(), null()),
    ]);
    Value::Record(vec![
        ("before".into(), null()),
        ("after".into(), Value::Union(1, Box::new(row))),
        ("source".into(), source),
        ("transaction".into(), null()),
        ("op".into(), Value::String(op.into())),
        ("ts_ms".into(), null()),
        ("ts_us".into(), null()),
        ("ts_ns".into(), null()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_fit_the_debezium_schema_and_read_back_as_the_same_lead() {
        let schema = apache_avro::Schema::parse_str(
            leadscore_schemas::find("crm.public.leads.Envelope.avsc")
                .unwrap()
                .text,
        )
        .unwrap();
        let mut g = leadscore_crm::Generator::new(leadscore_crm::GeneratorConfig::default());
        for _ in 0..50 {
            let lead = g.next_lead().lead;
            let v = envelope(&lead, "r", 1_700_000_000_000);
            assert!(v.validate(&schema), "{lead:?}");
            let event = from_avro(&v).unwrap();
            assert_eq!(event.op, Op::Read);
            let after = event.after.unwrap();
            assert_eq!(after.lead_id, lead.lead_id);
            assert_eq!(after.status, lead.status);
            assert_eq!(after.page_views, lead.page_views);
            assert_eq!(after.industry, lead.industry);
        }
    }
    use serde_json::json;

    fn row(id: &str) -> Json {
        json!({"lead_id": id, "company_size": "Medium", "industry": "Technology", "page_views": 15,
               "time_on_site": 300.5, "form_completion_time": 45.2, "referral_source": "Google",
               "country": "AE", "created_at": "2024-01-01T00:00:00Z", "updated_at": "2024-01-01T00:00:00Z",
               "status": "new", "converted_at": null, "email": "someone@example.com"})
    }

    fn event(op: &str, before: Json, after: Json) -> Vec<u8> {
        serde_json::to_vec(&json!({"op": op, "before": before, "after": after, "source": {"ts_ms": 1_700_000_000_000i64}})).unwrap()
    }

    fn act(bytes: &[u8]) -> Result<Action> {
        decide(from_json(bytes)?)
    }

    #[test]
    fn create_and_snapshot_score() {
        for op in ["c", "r"] {
            let a = act(&event(op, Json::Null, row("l1"))).unwrap();
            assert!(matches!(a, Action::Score(l) if l.lead_id == "l1" && l.page_views == Some(15)));
        }
    }

    #[test]
    fn embedded_schema_envelope_is_unwrapped() {
        let doc = json!({"schema": {"type": "struct"}, "payload": {"op": "c", "before": null, "after": row("l2")}});
        let e = from_json(&serde_json::to_vec(&doc).unwrap()).unwrap();
        assert_eq!(e.after.unwrap().lead_id, "l2");
    }

    #[test]
    fn update_rescores_only_on_feature_change() {
        let mut after = row("l1");
        after["page_views"] = json!(16);
        assert!(matches!(
            act(&event("u", row("l1"), after)).unwrap(),
            Action::Score(_)
        ));

        let mut contacted = row("l1");
        contacted["status"] = json!("contacted");
        assert!(matches!(
            act(&event("u", row("l1"), contacted)).unwrap(),
            Action::Ignore(_)
        ));

        let mut converted = row("l1");
        converted["status"] = json!("converted");
        converted["converted_at"] = json!("2024-02-01T00:00:00Z");
        assert_eq!(
            act(&event("u", row("l1"), converted)).unwrap(),
            Action::Outcome {
                lead_id: "l1".into(),
                status: Status::Converted
            }
        );
        // No old row (REPLICA IDENTITY DEFAULT): cannot tell, so rescore.
        assert!(matches!(
            act(&event("u", Json::Null, row("l1"))).unwrap(),
            Action::Score(_)
        ));
    }

    #[test]
    fn delete_is_a_tombstone_and_truncate_is_ignored() {
        assert_eq!(
            act(&event("d", row("l9"), Json::Null)).unwrap(),
            Action::Delete {
                lead_id: "l9".into()
            }
        );
        assert!(matches!(
            act(&event("t", Json::Null, Json::Null)).unwrap(),
            Action::Ignore("truncate")
        ));
    }

    #[test]
    fn poison_inputs_get_the_right_kind_and_name_the_field() {
        let kinds = |bytes: Vec<u8>| act(&bytes).unwrap_err();
        assert_eq!(
            kinds(b"\x00\x01garbage".to_vec()).kind,
            ErrorKind::Undecodable
        );
        assert_eq!(kinds(b"[1,2]".to_vec()).kind, ErrorKind::NotAnEnvelope);
        assert_eq!(
            kinds(br#"{"after": {}}"#.to_vec()).kind,
            ErrorKind::NotAnEnvelope
        );
        assert_eq!(
            kinds(event("x", Json::Null, row("a"))).kind,
            ErrorKind::UnknownOp
        );
        assert_eq!(
            kinds(event("c", Json::Null, Json::Null)).kind,
            ErrorKind::NotAnEnvelope
        );
        let mut r = row("a");
        r.as_object_mut().unwrap().remove("lead_id");
        let e = kinds(event("c", Json::Null, r));
        assert!(e.kind == ErrorKind::MissingField && e.message.contains("lead_id"));
        let mut r = row("a");
        r["page_views"] = json!("many");
        let e = kinds(event("c", Json::Null, r));
        assert!(e.kind == ErrorKind::WrongType && e.message.contains("page_views"));
        let mut r = row("a");
        r["time_on_site"] = json!("NaN");
        assert_eq!(
            kinds(event("c", Json::Null, r)).kind,
            ErrorKind::InvalidValue
        );
        let mut r = row("a");
        r["created_at"] = json!("yesterday");
        assert_eq!(
            kinds(event("c", Json::Null, r)).kind,
            ErrorKind::InvalidValue
        );
        assert_eq!(
            kinds(event("c", Json::Null, row(""))).kind,
            ErrorKind::InvalidValue
        );
        let mut r = row("a");
        r["status"] = json!("won");
        assert_eq!(
            kinds(event("c", Json::Null, r)).kind,
            ErrorKind::InvalidValue
        );
    }

    #[test]
    fn pii_never_reaches_the_lead_or_the_error() {
        let e = from_json(&event("c", Json::Null, row("l1"))).unwrap();
        assert!(!format!("{e:?}").contains("someone@example.com"));
        let mut r = row("l1");
        r["industry"] = json!(42);
        let err = from_json(&event("c", Json::Null, r)).unwrap_err();
        assert!(!err.to_string().contains("42"));
    }

    #[test]
    fn avro_envelope_decodes_like_json() {
        let lead = |id: &str| {
            Value::Union(
                1,
                Box::new(Value::Record(vec![
                    ("lead_id".into(), Value::String(id.into())),
                    (
                        "company_size".into(),
                        Value::Union(1, Box::new(Value::String("Large".into()))),
                    ),
                    (
                        "page_views".into(),
                        Value::Union(1, Box::new(Value::Int(7))),
                    ),
                    (
                        "time_on_site".into(),
                        Value::Union(0, Box::new(Value::Null)),
                    ),
                    (
                        "created_at".into(),
                        Value::String("2026-01-02T03:04:05Z".into()),
                    ),
                    (
                        "updated_at".into(),
                        Value::String("2026-01-02T03:04:05Z".into()),
                    ),
                    ("status".into(), Value::String("new".into())),
                    ("tenant".into(), Value::Union(0, Box::new(Value::Null))),
                ])),
            )
        };
        let env = Value::Record(vec![
            ("before".into(), Value::Union(0, Box::new(Value::Null))),
            ("after".into(), lead("a1")),
            ("op".into(), Value::String("c".into())),
            ("ts_ms".into(), Value::Union(1, Box::new(Value::Long(5)))),
        ]);
        let e = from_avro(&env).unwrap();
        assert_eq!(e.op, Op::Create);
        assert_eq!(e.source_ts_ms, Some(5));
        let l = e.after.unwrap();
        assert_eq!(
            (l.company_size.as_deref(), l.page_views, l.time_on_site),
            (Some("Large"), Some(7), None)
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = from_json(&bytes).and_then(decide);
        }
    }
}
