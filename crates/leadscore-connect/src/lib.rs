//! Kafka Connect: the connector definitions in `connectors/` and the REST
//! calls that apply and operate them.
//!
//! A definition is one JSON file, `{"name": ..., "config": {...}}`, the body
//! Connect itself accepts. [`load_dir`] reads and checks them: names are
//! unique and match the file, values are strings, and no secret is written
//! as a literal (a key naming a password, secret, token or credential must
//! take its value from a config provider, `${env:NAME}` or `${file:...}`).
//!
//! [`Client::apply`] is create-or-update and idempotent: it compares the
//! running config with the definition and only PUTs a difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use leadscore_config::ConnectConfig;
use serde::{Deserialize, Serialize};

/// Errors from definitions or the Connect REST API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A definition file could not be read or is malformed.
    #[error("connector definition {path}: {reason}")]
    Definition {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A secret is written as a literal value.
    #[error(
        "connector definition {path}: `{key}` holds a literal secret; use a config provider such as ${{env:NAME}}"
    )]
    LiteralSecret {
        /// The file.
        path: PathBuf,
        /// The config key.
        key: String,
    },
    /// Connect could not be reached.
    #[error(
        "Kafka Connect at {url} is unreachable: {source}; is it running (deploy/local/stack status)?"
    )]
    Unreachable {
        /// The URL called.
        url: String,
        /// The transport error.
        source: reqwest::Error,
    },
    /// Connect answered with an error.
    #[error("Kafka Connect refused {what}: HTTP {status}: {message}")]
    Api {
        /// What was asked.
        what: String,
        /// HTTP status.
        status: u16,
        /// Connect's error message.
        message: String,
    },
    /// No such connector.
    #[error("connector `{0}` does not exist in Kafka Connect; run `leadscore connectors apply`")]
    NotFound(String),
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A connector as Connect's REST API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// Connector name.
    pub name: String,
    /// Connector config (string values only).
    pub config: BTreeMap<String, String>,
}

const SECRET_WORDS: [&str; 5] = ["password", "secret", "token", "credential", "api.key"];

impl Definition {
    /// Parses and checks one definition; `path` is used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Definition {
                path: path.to_path_buf(),
                reason: format!("not valid JSON: {e}"),
            })?;
        if let Some(config) = value.get("config").and_then(|c| c.as_object())
            && let Some((key, _)) = config.iter().find(|(_, v)| !v.is_string())
        {
            return Err(Error::Definition {
                path: path.to_path_buf(),
                reason: format!("config value of `{key}` must be a string (Connect takes strings)"),
            });
        }
        let def: Definition = serde_json::from_value(value).map_err(|e| Error::Definition {
            path: path.to_path_buf(),
            reason: format!("expected {{\"name\": ..., \"config\": {{...}}}}: {e}"),
        })?;
        if def.name.trim().is_empty() {
            return Err(Error::Definition {
                path: path.to_path_buf(),
                reason: "name is empty".into(),
            });
        }
        if !def.config.contains_key("connector.class") {
            return Err(Error::Definition {
                path: path.to_path_buf(),
                reason: "config has no connector.class".into(),
            });
        }
        for (key, value) in &def.config {
            let lower = key.to_ascii_lowercase();
            if SECRET_WORDS.iter().any(|w| lower.contains(w))
                && !value.is_empty()
                && !value.contains("${")
            {
                return Err(Error::LiteralSecret {
                    path: path.to_path_buf(),
                    key: key.clone(),
                });
            }
        }
        Ok(def)
    }
}

/// Reads every `*.json` definition in `dir`, sorted by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<Definition>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::Definition {
        path: dir.to_path_buf(),
        reason: format!("cannot list the directory: {e} (set connect.dir)"),
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut defs: Vec<Definition> = Vec::with_capacity(paths.len());
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Definition {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let def = Definition::parse(&text, &path)?;
        if path.file_stem().and_then(|s| s.to_str()) != Some(def.name.as_str()) {
            return Err(Error::Definition {
                reason: format!("name `{}` must match the file name", def.name),
                path,
            });
        }
        defs.push(def);
    }
    Ok(defs)
}

/// What `apply` did to one connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// It did not exist.
    Created,
    /// Its config differed and was replaced.
    Updated,
    /// Its config already matched.
    Unchanged,
}

/// One task's state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TaskStatus {
    /// Task number.
    pub id: i32,
    /// RUNNING, FAILED, PAUSED, UNASSIGNED...
    pub state: String,
    /// Worker running it.
    #[serde(default)]
    pub worker_id: String,
    /// Stack trace of a failed task.
    #[serde(default)]
    pub trace: Option<String>,
}

/// The connector's own state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ConnectorState {
    /// RUNNING, FAILED, PAUSED...
    pub state: String,
    /// Worker running it.
    #[serde(default)]
    pub worker_id: String,
    /// Stack trace if failed.
    #[serde(default)]
    pub trace: Option<String>,
}

/// `GET /connectors/{name}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Status {
    /// Connector name.
    pub name: String,
    /// Connector state.
    pub connector: ConnectorState,
    /// Task states.
    pub tasks: Vec<TaskStatus>,
}

impl Status {
    /// Running with every task running.
    pub fn is_running(&self) -> bool {
        self.connector.state == "RUNNING"
            && !self.tasks.is_empty()
            && self.tasks.iter().all(|t| t.state == "RUNNING")
    }

    /// The connector or a task failed.
    pub fn has_failed(&self) -> bool {
        self.connector.state == "FAILED" || self.tasks.iter().any(|t| t.state == "FAILED")
    }
}

/// Client of the Connect REST API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    message: String,
}

impl Client {
    /// A client for `config.url`.
    pub fn new(config: &ConnectConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .build()
            .map_err(|source| Error::Unreachable {
                url: config.url.clone(),
                source,
            })?;
        Ok(Self {
            base: config.url.trim_end_matches('/').to_string(),
            http,
        })
    }

    async fn call(
        &self,
        what: String,
        req: reqwest::RequestBuilder,
    ) -> Result<Option<reqwest::Response>> {
        let url = format!("{}{}", self.base, what.split_once(' ').map_or("", |x| x.1));
        let resp = req
            .send()
            .await
            .map_err(|source| Error::Unreachable { url, source })?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json::from_str::<ApiError>(&text)
                .map(|e| e.message)
                .ok()
                .filter(|m| !m.is_empty())
                .unwrap_or(text);
            return Err(Error::Api {
                what,
                status: status.as_u16(),
                message,
            });
        }
        Ok(Some(resp))
    }

    /// The running config of `name`, if it exists.
    pub async fn config(&self, name: &str) -> Result<Option<BTreeMap<String, String>>> {
        let path = format!("/connectors/{name}/config");
        match self
            .call(
                format!("GET {path}"),
                self.http.get(format!("{}{path}", self.base)),
            )
            .await?
        {
            Some(resp) => resp
                .json()
                .await
                .map(Some)
                .map_err(|source| Error::Unreachable { url: path, source }),
            None => Ok(None),
        }
    }

    /// Creates or updates `def`; a matching running config is left alone.
    pub async fn apply(&self, def: &Definition) -> Result<Applied> {
        let current = self.config(&def.name).await?;
        let outcome = match &current {
            None => Applied::Created,
            Some(running) => {
                let mut running = running.clone();
                // Connect adds the name to the stored config.
                running.remove("name");
                let mut wanted = def.config.clone();
                wanted.remove("name");
                if running == wanted {
                    return Ok(Applied::Unchanged);
                }
                Applied::Updated
            }
        };
        let path = format!("/connectors/{}/config", def.name);
        self.call(
            format!("PUT {path}"),
            self.http
                .put(format!("{}{path}", self.base))
                .json(&def.config),
        )
        .await?;
        Ok(outcome)
    }

    /// The status of `name`.
    pub async fn status(&self, name: &str) -> Result<Status> {
        let path = format!("/connectors/{name}/status");
        let resp = self
            .call(
                format!("GET {path}"),
                self.http.get(format!("{}{path}", self.base)),
            )
            .await?
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        resp.json()
            .await
            .map_err(|source| Error::Unreachable { url: path, source })
    }

    async fn put_empty(&self, name: &str, action: &str) -> Result<()> {
        let path = format!("/connectors/{name}/{action}");
        self.call(
            format!("PUT {path}"),
            self.http.put(format!("{}{path}", self.base)),
        )
        .await?
        .ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(())
    }

    /// Pauses the connector and its tasks.
    pub async fn pause(&self, name: &str) -> Result<()> {
        self.put_empty(name, "pause").await
    }

    /// Resumes a paused connector.
    pub async fn resume(&self, name: &str) -> Result<()> {
        self.put_empty(name, "resume").await
    }

    /// Restarts the connector and its failed tasks.
    pub async fn restart_failed(&self, name: &str) -> Result<()> {
        let path = format!("/connectors/{name}/restart?includeTasks=true&onlyFailed=true");
        self.call(
            format!("POST {path}"),
            self.http.post(format!("{}{path}", self.base)),
        )
        .await?
        .ok_or_else(|| Error::NotFound(name.to_string()))?;
        Ok(())
    }

    /// Waits until `name` runs with all its tasks, or fails, or `within` passes.
    pub async fn wait_running(&self, name: &str, within: Duration) -> Result<Status> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let status = match self.status(name).await {
                Ok(s) => Some(s),
                Err(Error::NotFound(_)) => None,
                Err(e) => return Err(e),
            };
            if let Some(s) = &status
                && (s.is_running() || s.has_failed())
            {
                return Ok(s.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return status.ok_or_else(|| Error::NotFound(name.to_string()));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Definition> {
        Definition::parse(text, Path::new("x.json"))
    }

    #[test]
    fn a_literal_password_is_refused_and_a_provider_reference_accepted() {
        let literal =
            r#"{"name":"x","config":{"connector.class":"C","database.password":"hunter2"}}"#;
        assert!(matches!(
            parse(literal),
            Err(Error::LiteralSecret { key, .. }) if key == "database.password"
        ));
        let provided = r#"{"name":"x","config":{"connector.class":"C","database.password":"${env:PG_PASSWORD}"}}"#;
        assert_eq!(parse(provided).unwrap().config.len(), 2);
    }

    #[test]
    fn malformed_definitions_name_the_problem() {
        let number = r#"{"name":"x","config":{"connector.class":"C","tasks.max":1}}"#;
        let err = parse(number).unwrap_err().to_string();
        assert!(err.contains("tasks.max") && err.contains("string"), "{err}");
        let no_class = r#"{"name":"x","config":{}}"#;
        assert!(
            parse(no_class)
                .unwrap_err()
                .to_string()
                .contains("connector.class")
        );
        let extra = r#"{"name":"x","config":{"connector.class":"C"},"tasks":[]}"#;
        assert!(parse(extra).unwrap_err().to_string().contains("tasks"));
    }

    #[test]
    fn the_file_name_must_match_the_connector_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"name":"b","config":{"connector.class":"C"}}"#,
        )
        .unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a.json") && err.contains("`b`"), "{err}");
    }

    #[test]
    fn the_shipped_definitions_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../connectors");
        let defs = load_dir(&dir).unwrap();
        let names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["crm-leads-source", "lead-scores-sink"]);
        let source = &defs[0].config;
        // PII never leaves the database.
        let excluded = source["column.exclude.list"].as_str();
        for column in ["email", "phone", "full_name"] {
            assert!(
                excluded.contains(&format!("public.leads.{column}")),
                "{column}"
            );
        }
        assert_eq!(source["publication.autocreate.mode"], "disabled");
        let sink = &defs[1].config;
        assert_eq!(sink["consumer.override.isolation.level"], "read_committed");
        assert_eq!(sink["delete.enabled"], "true");
        assert_eq!(sink["insert.mode"], "upsert");
    }
}
