//! The Avro schemas of `schemas/` and the Confluent wire format.
//!
//! Owns: the catalogue of schema files compiled into the binary, the
//! TopicNameStrategy subject naming, the 5-byte Confluent framing (magic byte
//! 0 + big-endian schema id) and a local BACKWARD compatibility check that
//! names the offending field. It must not talk to a registry or a broker:
//! `leadscore-registry` does that.

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;

/// Errors raised by this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A schema file does not parse as Avro.
    #[error("schema {name} does not parse: {source}")]
    Parse {
        /// File name under `schemas/`.
        name: String,
        /// Parser error.
        source: Box<apache_avro::Error>,
    },
    /// No schema of that file name is in the catalogue.
    #[error("no schema named {0} in schemas/; known: {known}", known = CATALOGUE.iter().map(|s| s.file).collect::<Vec<_>>().join(", "))]
    Unknown(String),
    /// A message is shorter than the 5-byte Confluent header.
    #[error("message of {0} bytes is too short for the Confluent wire format (needs at least 5)")]
    TooShort(usize),
    /// The first byte is not the Confluent magic byte 0.
    #[error("wrong magic byte {0:#04x}: not Confluent wire format (expected 0x00)")]
    BadMagic(u8),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One schema file compiled into the binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaFile {
    /// File name under `schemas/`.
    pub file: &'static str,
    /// The JSON text.
    pub text: &'static str,
}

macro_rules! schema_file {
    ($name:literal) => {
        SchemaFile {
            file: $name,
            text: include_str!(concat!("../../../schemas/", $name)),
        }
    };
}

/// Every schema under `schemas/`.
pub const CATALOGUE: &[SchemaFile] = &[
    schema_file!("crm.public.leads.Value.avsc"),
    schema_file!("crm.public.leads.Envelope.avsc"),
    schema_file!("LeadScore.avsc"),
    schema_file!("ShadowScore.avsc"),
    schema_file!("WindowReport.avsc"),
    schema_file!("Alert.avsc"),
    schema_file!("RetrainRequest.avsc"),
    schema_file!("ModelLifecycleEvent.avsc"),
];

/// The catalogue entry for `file`.
pub fn find(file: &str) -> Result<&'static SchemaFile> {
    CATALOGUE
        .iter()
        .find(|s| s.file == file)
        .ok_or_else(|| Error::Unknown(file.to_string()))
}

impl SchemaFile {
    /// Parses the schema.
    pub fn parse(&self) -> Result<Schema> {
        parse(self.file, self.text)
    }
}

/// Parses schema text, naming `name` in the error.
pub fn parse(name: &str, text: &str) -> Result<Schema> {
    Schema::parse_str(text).map_err(|source| Error::Parse {
        name: name.to_string(),
        source: Box::new(source),
    })
}

/// The value subject of `topic` under TopicNameStrategy.
pub fn value_subject(topic: &str) -> String {
    format!("{topic}-value")
}

/// Length of the Confluent header: magic byte + 4-byte schema id.
pub const HEADER_LEN: usize = 5;

/// Frames an Avro datum in the Confluent wire format.
pub fn frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// Splits a Confluent-framed message into its schema id and Avro datum.
pub fn unframe(message: &[u8]) -> Result<(u32, &[u8])> {
    if message.len() < HEADER_LEN {
        return Err(Error::TooShort(message.len()));
    }
    if message[0] != 0 {
        return Err(Error::BadMagic(message[0]));
    }
    let id = u32::from_be_bytes([message[1], message[2], message[3], message[4]]);
    Ok((id, &message[HEADER_LEN..]))
}

/// Why `new` cannot read data written with `old` (BACKWARD), or `None` if it can.
///
/// The text names the field where the check failed when Avro can tell.
pub fn backward_incompatibility(old: &Schema, new: &Schema) -> Option<String> {
    SchemaCompatibility::can_read(old, new)
        .err()
        .map(|e| e.to_string())
}

/// The fields of a decoded Avro record, read by name, a union's branch unwrapped: the one
/// reader of the project's records (alerts, lifecycle events, retrain requests, window
/// reports, scores) by their generic `Value`.
#[derive(Clone, Copy)]
pub struct Fields<'a>(&'a [(String, apache_avro::types::Value)]);

impl<'a> Fields<'a> {
    /// The fields of a record already matched.
    pub fn new(fields: &'a [(String, apache_avro::types::Value)]) -> Self {
        Self(fields)
    }

    /// The fields of `value`, or `None` when it is not a record.
    pub fn of(value: &'a apache_avro::types::Value) -> Option<Self> {
        match value {
            apache_avro::types::Value::Record(fields) => Some(Self(fields)),
            _ => None,
        }
    }

    /// Field `name`, a union unwrapped to its branch (`Null` for an absent optional).
    pub fn get(&self, name: &str) -> Option<&'a apache_avro::types::Value> {
        use apache_avro::types::Value;
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| match v {
                Value::Union(_, inner) => inner.as_ref(),
                other => other,
            })
    }

    /// Field `name` as text: a string or an enum's symbol.
    pub fn string(&self, name: &str) -> Option<String> {
        use apache_avro::types::Value;
        match self.get(name)? {
            Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_unwrap_unions_and_read_strings_and_enums() {
        use apache_avro::types::Value;
        let v = Value::Record(vec![
            (
                "a".into(),
                Value::Union(1, Box::new(Value::String("x".into()))),
            ),
            ("b".into(), Value::Enum(0, "firing".into())),
            ("c".into(), Value::Union(0, Box::new(Value::Null))),
            ("d".into(), Value::Long(7)),
        ]);
        let f = Fields::of(&v).unwrap();
        assert_eq!(f.string("a").as_deref(), Some("x"));
        assert_eq!(f.string("b").as_deref(), Some("firing"));
        assert_eq!(f.get("c"), Some(&Value::Null));
        assert_eq!(f.get("d"), Some(&Value::Long(7)));
        assert_eq!(f.string("d"), None);
        assert!(f.get("e").is_none());
        assert!(Fields::of(&Value::Null).is_none());
    }
    use proptest::prelude::*;

    #[test]
    fn every_schema_parses() {
        for s in CATALOGUE {
            s.parse().unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn catalogue_matches_the_schemas_folder() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".avsc"))
            .collect();
        on_disk.sort();
        let mut listed: Vec<String> = CATALOGUE.iter().map(|s| s.file.to_string()).collect();
        listed.sort();
        assert_eq!(on_disk, listed, "add new schema files to CATALOGUE");
    }

    #[test]
    fn envelope_embeds_exactly_the_row_schema() {
        let row = find("crm.public.leads.Value.avsc")
            .unwrap()
            .parse()
            .unwrap();
        let env = find("crm.public.leads.Envelope.avsc")
            .unwrap()
            .parse()
            .unwrap();
        let Schema::Record(env) = env else {
            panic!("envelope is a record")
        };
        let before = &env.fields[env.lookup["before"]].schema;
        let Schema::Union(u) = before else {
            panic!("before is a union")
        };
        assert_eq!(u.variants()[1].canonical_form(), row.canonical_form());
    }

    #[test]
    fn no_output_schema_has_a_pii_field() {
        for s in CATALOGUE {
            for pii in ["\"email\"", "\"phone\"", "\"full_name\""] {
                assert!(!s.text.contains(pii), "{} has PII field {pii}", s.file);
            }
        }
    }

    #[test]
    fn adding_a_field_without_default_is_backward_incompatible_and_named() {
        let old = find("Alert.avsc").unwrap().parse().unwrap();
        let text = find("Alert.avsc").unwrap().text.replacen(
            "\"fields\": [",
            "\"fields\": [{\"name\": \"team\", \"type\": \"string\"},",
            1,
        );
        let new = parse("Alert.avsc (edited)", &text).unwrap();
        let why = backward_incompatibility(&old, &new).expect("incompatible");
        assert!(why.contains("team"), "{why}");
        let with_default = find("Alert.avsc").unwrap().text.replacen(
            "\"fields\": [",
            "\"fields\": [{\"name\": \"team\", \"type\": [\"null\", \"string\"], \"default\": null},",
            1,
        );
        let new = parse("Alert.avsc (edited)", &with_default).unwrap();
        assert_eq!(backward_incompatibility(&old, &new), None);
    }

    #[test]
    fn unframe_rejects_short_and_wrong_magic() {
        assert!(matches!(unframe(&[0, 0, 0]), Err(Error::TooShort(3))));
        assert!(matches!(unframe(&[1, 0, 0, 0, 7]), Err(Error::BadMagic(1))));
        assert_eq!(unframe(&[0, 0, 0, 1, 2]).unwrap(), (258, &[][..]));
    }

    proptest! {
        #[test]
        fn frame_unframe_round_trips(id in any::<u32>(), datum in proptest::collection::vec(any::<u8>(), 0..64)) {
            let framed = frame(id, &datum);
            let (back_id, back) = unframe(&framed).unwrap();
            prop_assert_eq!(back_id, id);
            prop_assert_eq!(back, &datum[..]);
        }

        #[test]
        fn unframe_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = unframe(&bytes);
        }
    }
}
