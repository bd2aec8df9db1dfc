//! Where model versions come from, chosen by URL scheme.
//!
//! * `file:///path/to/dir` (or a plain path): a directory holding
//!   `model.onnx` and `metadata.json`, e.g. the bundled `models/default`.
//! * `mlflow+http://host:port/NAME@ALIAS` or `.../NAME/VERSION` (also
//!   `mlflow+https`): the MLflow model registry over its REST API; the
//!   artifacts are downloaded through the tracking server and the ONNX
//!   checksum is verified against the metadata and the version's tag.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::{Error, Metadata, Model, Result, sha256_hex};

/// A place to fetch one model version from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local directory.
    Dir(PathBuf),
    /// A registered model in MLflow.
    Mlflow {
        /// `http(s)://host:port` of the tracking server.
        base: String,
        /// Registered model name.
        name: String,
        /// Which version.
        selector: Selector,
    },
}

/// Which version of a registered model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The version an alias points at (`champion`, `challenger`).
    Alias(String),
    /// A fixed version number.
    Version(String),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Dir(p) => write!(f, "file://{}", p.display()),
            ModelSource::Mlflow {
                base,
                name,
                selector: Selector::Alias(a),
            } => write!(f, "mlflow+{base}/{name}@{a}"),
            ModelSource::Mlflow {
                base,
                name,
                selector: Selector::Version(v),
            } => write!(f, "mlflow+{base}/{name}/{v}"),
        }
    }
}

fn bad_url(url: &str, reason: &str) -> Error {
    Error::Registry {
        registry: url.to_string(),
        reason: format!(
            "{reason}; expected file:///dir, a directory path, mlflow+http://host:port/NAME@ALIAS or mlflow+http://host:port/NAME/VERSION"
        ),
    }
}

impl ModelSource {
    /// Parses a model URL.
    pub fn parse(url: &str) -> Result<Self> {
        if let Some(path) = url.strip_prefix("file://") {
            return Ok(ModelSource::Dir(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("mlflow+") else {
            if url.contains("://") {
                return Err(bad_url(url, "unknown scheme"));
            }
            return Ok(ModelSource::Dir(PathBuf::from(url)));
        };
        let (scheme, tail) = rest
            .split_once("://")
            .ok_or_else(|| bad_url(url, "missing ://"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad_url(url, "mlflow+ needs http or https"));
        }
        let (host, model) = tail
            .split_once('/')
            .ok_or_else(|| bad_url(url, "no model name after the host"))?;
        let (name, selector) = if let Some((n, a)) = model.rsplit_once('@') {
            (n, Selector::Alias(a.to_string()))
        } else if let Some((n, v)) = model.rsplit_once('/') {
            (n, Selector::Version(v.to_string()))
        } else {
            return Err(bad_url(
                url,
                "give an alias (NAME@champion) or a version (NAME/3)",
            ));
        };
        if name.is_empty()
            || matches!(&selector, Selector::Alias(s) | Selector::Version(s) if s.is_empty())
        {
            return Err(bad_url(url, "empty model name, alias or version"));
        }
        Ok(ModelSource::Mlflow {
            base: format!("{scheme}://{host}"),
            name: name.to_string(),
            selector,
        })
    }

    /// Fetches and loads the model. Never leaves a half-loaded model behind.
    pub async fn fetch(&self) -> Result<Model> {
        match self {
            ModelSource::Dir(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || Model::load_dir(&dir))
                    .await
                    .map_err(|e| Error::Onnx {
                        model: self.to_string(),
                        reason: e.to_string(),
                    })?
            }
            ModelSource::Mlflow {
                base,
                name,
                selector,
            } => {
                let (onnx, meta) = Mlflow::new(base)?.download(name, selector).await?;
                tokio::task::spawn_blocking(move || Model::from_parts(&onnx, meta))
                    .await
                    .map_err(|e| Error::Onnx {
                        model: self.to_string(),
                        reason: e.to_string(),
                    })?
            }
        }
    }
}

/// A model version as the MLflow registry describes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ModelVersion {
    /// Registered model name.
    pub name: String,
    /// Version number.
    pub version: String,
    /// Artifact location.
    #[serde(default)]
    pub source: String,
    /// Run that produced it.
    #[serde(default)]
    pub run_id: String,
    /// Version tags.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// A key/value tag.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Tag {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
}

#[derive(Deserialize)]
struct VersionAnswer {
    model_version: ModelVersion,
}

/// How requests to MLflow authenticate: MLflow's own client variables, so the services and
/// the training job share one setting.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum MlflowAuth {
    /// No credentials (a tracking server without authentication).
    #[default]
    None,
    /// `Authorization: Bearer` (`MLFLOW_TRACKING_TOKEN`).
    Token(String),
    /// HTTP basic (`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`), as MLflow's
    /// basic-auth app expects.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
}

impl std::fmt::Debug for MlflowAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.write_str(match self {
            MlflowAuth::None => "None",
            MlflowAuth::Token(_) => "Token(..)",
            MlflowAuth::Basic { .. } => "Basic(..)",
        })
    }
}

impl MlflowAuth {
    /// From `MLFLOW_TRACKING_TOKEN`, else `MLFLOW_TRACKING_USERNAME` with
    /// `MLFLOW_TRACKING_PASSWORD`, else none.
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        if let Some(token) = var("MLFLOW_TRACKING_TOKEN") {
            return MlflowAuth::Token(token);
        }
        match (
            var("MLFLOW_TRACKING_USERNAME"),
            var("MLFLOW_TRACKING_PASSWORD"),
        ) {
            (Some(username), Some(password)) => MlflowAuth::Basic { username, password },
            _ => MlflowAuth::None,
        }
    }

    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            MlflowAuth::None => req,
            MlflowAuth::Token(t) => req.bearer_auth(t),
            MlflowAuth::Basic { username, password } => req.basic_auth(username, Some(password)),
        }
    }
}

/// What to do about a refused request.
fn auth_hint(status: reqwest::StatusCode) -> &'static str {
    match status.as_u16() {
        401 | 403 => {
            " (the tracking server wants credentials: set MLFLOW_TRACKING_TOKEN, or \
             MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
        }
        _ => "",
    }
}

/// Minimal MLflow REST client: aliases, versions, artifacts.
#[derive(Debug, Clone)]
pub struct Mlflow {
    base: String,
    http: reqwest::Client,
    auth: MlflowAuth,
}

impl Mlflow {
    /// A client for the tracking server at `base` (`http://host:port`), with the credentials
    /// of MLflow's client variables ([`MlflowAuth::from_env`]).
    pub fn new(base: &str) -> Result<Self> {
        Self::with_auth(base, MlflowAuth::from_env())
    }

    /// A client for the tracking server at `base` with `auth`.
    pub fn with_auth(base: &str, auth: MlflowAuth) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| Error::Registry {
                registry: base.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            http,
            auth,
        })
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::Registry {
            registry: self.base.clone(),
            reason: reason.into(),
        }
    }

    async fn get(&self, what: &str, path: &str, query: &[(&str, &str)]) -> Result<Vec<u8>> {
        let resp = self
            .auth
            .apply(self.http.get(format!("{}{path}", self.base)).query(query))
            .send()
            .await
            .map_err(|e| self.err(format!("{what}: unreachable: {e}")))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.err(format!("{what}: {e}")))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            return Err(self.err(format!(
                "{what}: HTTP {status}: {}{}",
                text.chars().take(300).collect::<String>(),
                auth_hint(status)
            )));
        }
        Ok(body.to_vec())
    }

    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<()> {
        let resp = self
            .auth
            .apply(req)
            .send()
            .await
            .map_err(|e| self.err(format!("{what}: unreachable: {e}")))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(self.err(format!(
            "{what}: HTTP {status}: {}{}",
            text.chars().take(300).collect::<String>(),
            auth_hint(status)
        )))
    }

    /// Points `alias` of `name` at `version`.
    pub async fn set_alias(&self, name: &str, alias: &str, version: &str) -> Result<()> {
        let body = serde_json::json!({"name": name, "alias": alias, "version": version});
        self.send(
            &format!("set {name}@{alias} to v{version}"),
            self.http
                .post(format!(
                    "{}/api/2.0/mlflow/registered-models/alias",
                    self.base
                ))
                .json(&body),
        )
        .await
    }

    /// Removes `alias` of `name`; removing an alias that does not exist is not an error.
    pub async fn delete_alias(&self, name: &str, alias: &str) -> Result<()> {
        let what = format!("remove {name}@{alias}");
        let result = self
            .send(
                &what,
                self.http
                    .delete(format!(
                        "{}/api/2.0/mlflow/registered-models/alias",
                        self.base
                    ))
                    .query(&[("name", name), ("alias", alias)])
                    .json(&serde_json::json!({"name": name, "alias": alias})),
            )
            .await;
        match result {
            Err(Error::Registry { reason, .. })
                if reason.contains("404")
                    || reason.contains("RESOURCE_DOES_NOT_EXIST")
                    || reason.contains("not found") =>
            {
                Ok(())
            }
            other => other,
        }
    }

    /// The version an alias or number selects.
    pub async fn version(&self, name: &str, selector: &Selector) -> Result<ModelVersion> {
        let (what, body) = match selector {
            Selector::Alias(alias) => {
                let what = format!("{name}@{alias}");
                let body = self
                    .get(
                        &what,
                        "/api/2.0/mlflow/registered-models/alias",
                        &[("name", name), ("alias", alias)],
                    )
                    .await?;
                (what, body)
            }
            Selector::Version(v) => {
                let what = format!("{name} v{v}");
                let body = self
                    .get(
                        &what,
                        "/api/2.0/mlflow/model-versions/get",
                        &[("name", name), ("version", v)],
                    )
                    .await?;
                (what, body)
            }
        };
        serde_json::from_slice::<VersionAnswer>(&body)
            .map(|a| a.model_version)
            .map_err(|e| self.err(format!("{what}: unexpected answer: {e}")))
    }

    /// Downloads `model.onnx` and `metadata.json` of the selected version and checks them.
    pub async fn download(&self, name: &str, selector: &Selector) -> Result<(Vec<u8>, Metadata)> {
        let mv = self.version(name, selector).await?;
        let label = format!("{name} v{}", mv.version);
        if mv.run_id.is_empty() {
            return Err(self.err(format!("{label} has no run; cannot locate its artifacts")));
        }
        // Artifacts live under the run; the version's source names the folder.
        let folder = mv
            .source
            .rsplit_once("/artifacts/")
            .map(|(_, p)| p.trim_matches('/').to_string())
            .unwrap_or_else(|| "model".into());
        let fetch = |file: &'static str| {
            let path = format!("{folder}/{file}");
            let run = mv.run_id.clone();
            let label = label.clone();
            async move {
                self.get(
                    &format!("{label} artifact {path}"),
                    "/get-artifact",
                    &[("path", &path), ("run_uuid", &run)],
                )
                .await
            }
        };
        let meta_bytes = fetch("metadata.json").await?;
        let meta = Metadata::parse(&label, &String::from_utf8_lossy(&meta_bytes))?;
        if meta.model_name != mv.name || meta.version != mv.version {
            return Err(Error::Mismatch {
                model: label,
                reason: format!("its metadata.json describes {}", meta.label()),
            });
        }
        let onnx = fetch("model.onnx").await?;
        let digest = sha256_hex(&onnx);
        if let Some(tag) = mv.tags.iter().find(|t| t.key == "onnx_sha256")
            && tag.value != digest
        {
            return Err(Error::Mismatch {
                model: label,
                reason: format!(
                    "downloaded model.onnx has SHA-256 {digest}, the registry tag says {}",
                    tag.value
                ),
            });
        }
        Ok((onnx, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlflow_credentials_come_from_mlflows_own_variables_and_never_print() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert_eq!(MlflowAuth::from_vars(vars(&[])), MlflowAuth::None);
        let basic = MlflowAuth::from_vars(vars(&[
            ("MLFLOW_TRACKING_USERNAME", "svc"),
            ("MLFLOW_TRACKING_PASSWORD", "s3cret"),
        ]));
        assert_eq!(
            basic,
            MlflowAuth::Basic {
                username: "svc".into(),
                password: "s3cret".into()
            }
        );
        assert!(!format!("{basic:?}").contains("s3cret"));
        // A user without a password is not a credential.
        assert_eq!(
            MlflowAuth::from_vars(vars(&[("MLFLOW_TRACKING_USERNAME", "svc")])),
            MlflowAuth::None
        );
        let token = MlflowAuth::from_vars(vars(&[
            ("MLFLOW_TRACKING_TOKEN", "t0k"),
            ("MLFLOW_TRACKING_USERNAME", "svc"),
            ("MLFLOW_TRACKING_PASSWORD", "s3cret"),
        ]));
        assert_eq!(token, MlflowAuth::Token("t0k".into()));
        assert!(!format!("{token:?}").contains("t0k"));
        assert!(auth_hint(reqwest::StatusCode::UNAUTHORIZED).contains("MLFLOW_TRACKING_TOKEN"));
        assert!(auth_hint(reqwest::StatusCode::NOT_FOUND).is_empty());
    }

    #[test]
    fn urls_pick_the_source_by_scheme() {
        assert_eq!(
            ModelSource::parse("file:///m/default").unwrap(),
            ModelSource::Dir("/m/default".into())
        );
        assert_eq!(
            ModelSource::parse("models/default").unwrap(),
            ModelSource::Dir("models/default".into())
        );
        assert_eq!(
            ModelSource::parse("mlflow+http://127.0.0.1:5000/lead-scoring@champion").unwrap(),
            ModelSource::Mlflow {
                base: "http://127.0.0.1:5000".into(),
                name: "lead-scoring".into(),
                selector: Selector::Alias("champion".into())
            }
        );
        assert_eq!(
            ModelSource::parse("mlflow+https://reg:443/lead-scoring/7").unwrap(),
            ModelSource::Mlflow {
                base: "https://reg:443".into(),
                name: "lead-scoring".into(),
                selector: Selector::Version("7".into())
            }
        );
    }

    #[test]
    fn bad_urls_say_what_is_expected() {
        for url in [
            "s3://bucket/model",
            "mlflow+ftp://h/x@a",
            "mlflow+http://h",
            "mlflow+http://h/name",
            "mlflow+http://h/@champion",
        ] {
            let err = ModelSource::parse(url).unwrap_err().to_string();
            assert!(err.contains("expected file:///dir"), "{url}: {err}");
        }
    }
}
