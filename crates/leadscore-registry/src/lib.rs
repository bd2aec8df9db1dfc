//! Client for a Confluent-compatible schema registry and an Avro codec on top.
//!
//! Owns: registering schemas under subjects, compatibility configuration and
//! checks, schema lookup by id (cached, ids are immutable), and encoding and
//! decoding Avro values in the Confluent wire format. Speaks only the
//! Confluent REST API (Apicurio serves it under `/apis/ccompat/v7`); it holds
//! no business logic about topics or leads.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::types::Value;
use leadscore_config::RegistryConfig;
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

/// Errors raised by the registry client and codec.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The registry could not be reached or did not answer in time.
    #[error("schema registry at {url} is unreachable: {source}")]
    Unreachable {
        /// Base URL used.
        url: String,
        /// Transport error.
        source: reqwest::Error,
    },
    /// The registry refused a schema as incompatible with the subject's history.
    #[error("subject {subject}: schema refused as incompatible ({level}): {message}{local}", local = local.as_ref().map(|l| format!("; local check: {l}")).unwrap_or_default())]
    Incompatible {
        /// Subject that refused the schema.
        subject: String,
        /// Compatibility level in force.
        level: String,
        /// The registry's message (Apicurio names the field, e.g. `b at /fields/1`).
        message: String,
        /// What the local Avro check found, naming the field when it can.
        local: Option<String>,
    },
    /// The subject or schema id does not exist.
    #[error("not found in the schema registry: {0}")]
    NotFound(String),
    /// Any other refusal.
    #[error("schema registry answered {status} to {what}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The request, e.g. `POST /subjects/x/versions`.
        what: String,
        /// Body of the answer.
        message: String,
    },
    /// A schema from the registry or the catalogue does not parse.
    #[error(transparent)]
    Schema(#[from] leadscore_schemas::Error),
    /// A complete datum was read and bytes were left: the record is not what its schema says.
    #[error("{left} bytes left after the Avro datum of writer schema {schema_id}")]
    TrailingBytes {
        /// Writer schema id.
        schema_id: u32,
        /// Bytes left over.
        left: usize,
    },
    /// An Avro value does not match the schema or bytes do not decode.
    #[error("avro {action} failed for schema id {schema_id}: {source}")]
    Avro {
        /// `encode` or `decode`.
        action: &'static str,
        /// Schema id involved.
        schema_id: u32,
        /// Avro error.
        source: Box<apache_avro::Error>,
    },
}

impl Error {
    /// Whether retrying the same call later may succeed (transport, 5xx),
    /// as opposed to a refusal that will repeat (bad data, incompatibility).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unreachable { .. } => true,
            Error::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A version of a subject.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SubjectVersion {
    /// Subject name.
    pub subject: String,
    /// Version number within the subject.
    pub version: i32,
    /// Global schema id (used in the wire format).
    pub id: u32,
    /// Schema text.
    pub schema: String,
}

#[derive(Deserialize)]
struct IdAnswer {
    id: u32,
}

#[derive(Deserialize)]
struct SchemaAnswer {
    schema: String,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    message: String,
    #[serde(default)]
    error_code: i64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigAnswer {
    #[serde(alias = "compatibility")]
    compatibility_level: String,
}

#[derive(Deserialize)]
struct CompatAnswer {
    is_compatible: bool,
    #[serde(default)]
    messages: Vec<String>,
}

/// Confluent-compatible schema registry client. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    http: reqwest::Client,
    base: String,
    auth: Option<(String, Option<String>)>,
    by_id: Arc<RwLock<HashMap<u32, Arc<Schema>>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

impl Registry {
    /// Builds a client from configuration; opens no connection yet.
    pub fn new(config: &RegistryConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .build()
            .map_err(|source| Error::Unreachable {
                url: config.url.clone(),
                source,
            })?;
        Ok(Self {
            http,
            base: config.url.trim_end_matches('/').to_string(),
            auth: config
                .username
                .clone()
                .map(|u| (u, config.password.clone())),
            by_id: Arc::default(),
        })
    }

    /// Base URL in use.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .header(reqwest::header::ACCEPT, CONTENT_TYPE);
        if let Some((user, pass)) = &self.auth {
            req = req.basic_auth(user, pass.as_ref());
        }
        req
    }

    async fn send(
        &self,
        what: String,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, String)> {
        let resp = req.send().await.map_err(|source| Error::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let body = resp.text().await.map_err(|source| Error::Unreachable {
            url: self.base.clone(),
            source,
        })?;
        if status.is_success() {
            return Ok((status, body));
        }
        let parsed: Option<ErrorAnswer> = serde_json::from_str(&body).ok();
        let message = parsed.as_ref().map(|e| e.message.clone()).unwrap_or(body);
        if status == StatusCode::NOT_FOUND
            || parsed
                .as_ref()
                .is_some_and(|e| (40400..40500).contains(&e.error_code))
        {
            return Err(Error::NotFound(format!("{what}: {message}")));
        }
        Err(Error::Api {
            status: status.as_u16(),
            what,
            message,
        })
    }

    fn parse_json<T: serde::de::DeserializeOwned>(what: &str, body: &str) -> Result<T> {
        serde_json::from_str(body).map_err(|e| Error::Api {
            status: 200,
            what: what.to_string(),
            message: format!("unexpected answer ({e}): {body}"),
        })
    }

    /// All subjects.
    pub async fn subjects(&self) -> Result<Vec<String>> {
        let what = "GET /subjects".to_string();
        let (_, body) = self
            .send(
                what.clone(),
                self.request(reqwest::Method::GET, "/subjects"),
            )
            .await?;
        Self::parse_json(&what, &body)
    }

    /// Registers `schema` under `subject` (idempotent: an identical schema returns its id).
    ///
    /// An incompatible schema fails with [`Error::Incompatible`] naming the subject
    /// and, where the registry or the local check can tell, the field.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let what = format!("POST /subjects/{subject}/versions");
        let req = self
            .request(
                reqwest::Method::POST,
                &format!("/subjects/{}/versions", enc(subject)),
            )
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&json!({ "schema": schema, "schemaType": "AVRO" }));
        match self.send(what.clone(), req).await {
            Ok((_, body)) => Ok(Self::parse_json::<IdAnswer>(&what, &body)?.id),
            Err(Error::Api {
                status: 409,
                message,
                ..
            }) => {
                let level = self
                    .compatibility(subject)
                    .await
                    .unwrap_or_else(|_| "unknown".into());
                let local = self.local_diagnosis(subject, schema).await;
                Err(Error::Incompatible {
                    subject: subject.to_string(),
                    level,
                    message: message
                        .rsplit("RuleViolationException: ")
                        .next()
                        .unwrap_or(&message)
                        .to_string(),
                    local,
                })
            }
            Err(e) => Err(e),
        }
    }

    async fn local_diagnosis(&self, subject: &str, schema: &str) -> Option<String> {
        let latest = self.latest(subject).await.ok()?;
        let old = leadscore_schemas::parse(subject, &latest.schema).ok()?;
        let new = leadscore_schemas::parse(subject, schema).ok()?;
        leadscore_schemas::backward_incompatibility(&old, &new)
    }

    /// The id of `schema` if it is already registered under `subject`.
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>> {
        let what = format!("POST /subjects/{subject}");
        let req = self
            .request(
                reqwest::Method::POST,
                &format!("/subjects/{}", enc(subject)),
            )
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&json!({ "schema": schema, "schemaType": "AVRO" }));
        match self.send(what.clone(), req).await {
            Ok((_, body)) => Ok(Some(Self::parse_json::<SubjectVersion>(&what, &body)?.id)),
            Err(Error::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Latest version of `subject`.
    pub async fn latest(&self, subject: &str) -> Result<SubjectVersion> {
        let what = format!("GET /subjects/{subject}/versions/latest");
        let req = self.request(
            reqwest::Method::GET,
            &format!("/subjects/{}/versions/latest", enc(subject)),
        );
        let (_, body) = self.send(what.clone(), req).await?;
        Self::parse_json(&what, &body)
    }

    /// Compatibility level of `subject` (falls back to the global level).
    pub async fn compatibility(&self, subject: &str) -> Result<String> {
        let what = format!("GET /config/{subject}");
        let req = self.request(reqwest::Method::GET, &format!("/config/{}", enc(subject)));
        let body = match self.send(what.clone(), req).await {
            Ok((_, body)) => body,
            Err(Error::NotFound(_)) => {
                let (_, body) = self
                    .send(
                        "GET /config".into(),
                        self.request(reqwest::Method::GET, "/config"),
                    )
                    .await?;
                body
            }
            Err(e) => return Err(e),
        };
        Ok(Self::parse_json::<ConfigAnswer>(&what, &body)?.compatibility_level)
    }

    /// Sets the compatibility level of `subject` (e.g. `BACKWARD`).
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<()> {
        let what = format!("PUT /config/{subject}");
        let req = self
            .request(reqwest::Method::PUT, &format!("/config/{}", enc(subject)))
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&json!({ "compatibility": level }));
        self.send(what, req).await.map(|_| ())
    }

    /// Whether `schema` may be registered as the next version of `subject`.
    /// `Ok(Ok(()))` if compatible (or the subject is new), `Ok(Err(reason))` if not.
    pub async fn check(&self, subject: &str, schema: &str) -> Result<Result<(), String>> {
        let what = format!("POST /compatibility/subjects/{subject}/versions/latest");
        let req = self
            .request(
                reqwest::Method::POST,
                &format!(
                    "/compatibility/subjects/{}/versions/latest?verbose=true",
                    enc(subject)
                ),
            )
            .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
            .json(&json!({ "schema": schema, "schemaType": "AVRO" }));
        let body = match self.send(what.clone(), req).await {
            Ok((_, body)) => body,
            Err(Error::NotFound(_)) => return Ok(Ok(())),
            Err(e) => return Err(e),
        };
        let answer: CompatAnswer = Self::parse_json(&what, &body)?;
        if answer.is_compatible {
            return Ok(Ok(()));
        }
        let mut reasons = answer.messages;
        if let Some(local) = self.local_diagnosis(subject, schema).await {
            reasons.push(local);
        }
        if reasons.is_empty() {
            reasons.push("the registry gave no detail".into());
        }
        Ok(Err(reasons.join("; ")))
    }

    /// Deletes `subject` (soft, then permanently). Used by tests and cleanup.
    pub async fn delete_subject(&self, subject: &str) -> Result<()> {
        for suffix in ["", "?permanent=true"] {
            let what = format!("DELETE /subjects/{subject}{suffix}");
            let req = self.request(
                reqwest::Method::DELETE,
                &format!("/subjects/{}{suffix}", enc(subject)),
            );
            match self.send(what, req).await {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The schema with global id `id`, cached forever (ids are immutable).
    pub async fn schema_by_id(&self, id: u32) -> Result<Arc<Schema>> {
        if let Some(s) = self.by_id.read().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(s);
        }
        let what = format!("GET /schemas/ids/{id}");
        let req = self.request(reqwest::Method::GET, &format!("/schemas/ids/{id}"));
        let (_, body) = self.send(what.clone(), req).await?;
        let text = Self::parse_json::<SchemaAnswer>(&what, &body)?.schema;
        let schema = Arc::new(leadscore_schemas::parse(&format!("schema id {id}"), &text)?);
        if let Ok(mut m) = self.by_id.write() {
            m.insert(id, schema.clone());
        }
        Ok(schema)
    }
}

fn enc(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

type Writer = apache_avro::writer::datum::GenericDatumWriter<'static>;
type Reader = apache_avro::reader::datum::GenericDatumReader<'static>;

/// Schemas live for the whole process once a codec resolved them: one per
/// output subject and one per writer schema id seen (bounded by the
/// registry's contents). Leaking them lets the resolved readers and writers
/// be built once instead of on every record.
fn leak(schema: Schema) -> &'static Schema {
    Box::leak(Box::new(schema))
}

/// Encodes values of one schema for one subject in the Confluent wire format.
#[derive(Clone)]
pub struct Encoder {
    schema: &'static Schema,
    writer: Arc<Writer>,
    id: u32,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("schema_id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Encoder {
    /// Registers (or looks up) `schema_text` under `subject` and builds an encoder for it.
    pub async fn for_subject(
        registry: &Registry,
        subject: &str,
        schema_text: &str,
    ) -> Result<Self> {
        let schema = leak(leadscore_schemas::parse(subject, schema_text)?);
        let id = registry.register(subject, schema_text).await?;
        let writer = Writer::builder(schema)
            .build()
            .map_err(|source| Error::Avro {
                action: "resolve",
                schema_id: id,
                source: Box::new(source),
            })?;
        Ok(Self {
            schema,
            writer: Arc::new(writer),
            id,
        })
    }

    /// Schema id written in every message.
    pub fn schema_id(&self) -> u32 {
        self.id
    }

    /// The writer schema.
    pub fn schema(&self) -> &Schema {
        self.schema
    }

    /// Encodes `value` (validated against the schema) as a framed message.
    pub fn encode(&self, value: Value) -> Result<Vec<u8>> {
        let datum = self
            .writer
            .write_value_to_vec(value)
            .map_err(|source| Error::Avro {
                action: "encode",
                schema_id: self.id,
                source: Box::new(source),
            })?;
        Ok(leadscore_schemas::frame(self.id, &datum))
    }
}

/// Decodes Confluent-framed messages, resolving each writer schema by id
/// against an optional reader schema.
#[derive(Clone)]
pub struct Decoder {
    registry: Registry,
    reader: Option<&'static Schema>,
    readers: Arc<RwLock<HashMap<u32, Arc<Reader>>>>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder that returns values in each message's writer schema.
    pub fn new(registry: Registry) -> Self {
        Self {
            registry,
            reader: None,
            readers: Arc::default(),
        }
    }

    /// A decoder that resolves every message into `reader` (schema evolution).
    pub fn with_reader(registry: Registry, reader: Schema) -> Self {
        Self {
            registry,
            reader: Some(leak(reader)),
            readers: Arc::default(),
        }
    }

    /// Decodes like [`Decoder::decode`], but waits out a registry that cannot be reached
    /// (retryable errors), with backoff from 100 ms to 5 s: a control topic's record is never
    /// skipped because the registry is down. Before each wait `waiting(error, attempt)` is
    /// asked; `false` (e.g. shutting down) returns the retryable error. Any other error
    /// (the record itself is bad) is returned at once.
    pub async fn decode_waiting(
        &self,
        message: &[u8],
        mut waiting: impl FnMut(&Error, u32) -> bool,
    ) -> Result<Value> {
        let mut wait = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            match self.decode(message).await {
                Err(e) if e.is_retryable() => {
                    attempt += 1;
                    if !waiting(&e, attempt) {
                        return Err(e);
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Decodes one framed message.
    pub async fn decode(&self, message: &[u8]) -> Result<Value> {
        let (id, mut datum) = leadscore_schemas::unframe(message)?;
        let cached = self.readers.read().ok().and_then(|m| m.get(&id).cloned());
        let reader = match cached {
            Some(r) => r,
            None => {
                let writer = self.registry.schema_by_id(id).await?;
                let built = Reader::builder(leak((*writer).clone()))
                    .maybe_reader_schema(self.reader)
                    .build()
                    .map_err(|source| Error::Avro {
                        action: "resolve",
                        schema_id: id,
                        source: Box::new(source),
                    })?;
                let built = Arc::new(built);
                if let Ok(mut m) = self.readers.write() {
                    m.entry(id).or_insert_with(|| built.clone());
                }
                built
            }
        };
        let value = reader
            .read_value(&mut datum)
            .map_err(|source| Error::Avro {
                action: "decode",
                schema_id: id,
                source: Box::new(source),
            })?;
        if !datum.is_empty() {
            return Err(Error::TrailingBytes {
                schema_id: id,
                left: datum.len(),
            });
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(enc("crm.public.leads-value"), "crm.public.leads-value");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn transport_and_server_errors_are_retryable_refusals_are_not() {
        let api = |status| Error::Api {
            status,
            what: String::new(),
            message: String::new(),
        };
        assert!(api(503).is_retryable());
        assert!(api(429).is_retryable());
        assert!(!api(422).is_retryable());
        assert!(!Error::NotFound("x".into()).is_retryable());
    }
}
