//! The lead model: ONNX Runtime inference, model metadata, and where models come from.
//!
//! Owns: loading the ONNX Runtime shared library (`load-dynamic`, the
//! library from the `onnxruntime` wheel, nothing downloaded), a [`Model`]
//! (session + metadata + feature builder) that scores one lead or a batch,
//! [`source`]s that fetch a model version from a local directory or the
//! MLflow registry, and a [`ModelHandle`] that swaps models atomically while
//! scoring continues. A tree-ensemble graph (the LightGBM export) is evaluated
//! natively ([`native`]) once it agrees with ONNX Runtime on probe rows; every
//! other graph runs in ONNX Runtime. It knows nothing of Kafka.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use leadscore_crm::Lead;
use leadscore_features::{FeatureBuilder, FeatureSpec, InvalidInput};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

pub mod explain;
pub mod native;
pub mod source;

/// Errors raised while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ONNX Runtime library could not be loaded.
    #[error(
        "cannot load ONNX Runtime from {path}: {reason} (set ORT_DYLIB_PATH to libonnxruntime.so from the onnxruntime wheel; `deploy/local/stack env` prints it)"
    )]
    Runtime {
        /// Library path tried.
        path: String,
        /// Why it failed.
        reason: String,
    },
    /// A model file is missing or unreadable.
    #[error("model {model}: cannot read {path}: {source}")]
    Read {
        /// Model name and version, or the directory.
        model: String,
        /// File path.
        path: PathBuf,
        /// I/O error.
        source: std::io::Error,
    },
    /// The metadata is not valid JSON of the expected shape.
    #[error("model {model}: metadata is invalid: {reason}")]
    Metadata {
        /// Model name and version, or the directory.
        model: String,
        /// What is wrong.
        reason: String,
    },
    /// The ONNX file is corrupt or does not match its metadata.
    #[error("model {model}: {reason}")]
    Mismatch {
        /// Model name and version.
        model: String,
        /// What does not match.
        reason: String,
    },
    /// ONNX Runtime refused to load or run the model.
    #[error("model {model}: ONNX Runtime error: {reason}")]
    Onnx {
        /// Model name and version.
        model: String,
        /// Runtime message.
        reason: String,
    },
    /// A model registry could not be reached or answered nonsense.
    #[error("model registry {registry}: {reason}")]
    Registry {
        /// Registry URL (no credentials).
        registry: String,
        /// What failed.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

static RUNTIME: OnceLock<std::result::Result<ort::environment::Environment, String>> =
    OnceLock::new();

/// Loads ONNX Runtime once per process from `path`, or `ORT_DYLIB_PATH` when `None`.
pub fn init_runtime(path: Option<&Path>) -> Result<&'static ort::environment::Environment> {
    let path = path
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .ok_or_else(|| Error::Runtime {
            path: "<unset>".into(),
            reason: "no library path given and ORT_DYLIB_PATH is not set".into(),
        })?;
    let shown = path.display().to_string();
    let result = RUNTIME.get_or_init(|| {
        if !path.is_file() {
            return Err(format!("{shown} does not exist"));
        }
        ort::init_from(&path)
            .map_err(|e| e.to_string())?
            .with_name("leadscore")
            .build()
            .map_err(|e| e.to_string())
    });
    result.as_ref().map_err(|reason| Error::Runtime {
        path: shown,
        reason: reason.clone(),
    })
}

/// Where the model's input and output tensors are.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TensorDesc {
    /// Tensor name in the graph.
    pub name: String,
    /// Index of the positive class in the output (outputs only).
    #[serde(default)]
    pub positive_index: Option<usize>,
}

/// The metadata file written by training next to `model.onnx`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Metadata {
    /// Registered model name.
    pub model_name: String,
    /// Version (registry version, or a label for bundled models).
    pub version: String,
    /// Input tensor.
    pub input: TensorDesc,
    /// Output tensor.
    pub output: TensorDesc,
    /// How to build the input from a lead.
    pub feature_spec: FeatureSpec,
    /// Reference distributions for drift (used by the drift service).
    pub reference: serde_json::Value,
    /// Training metrics (AUC, ...).
    pub metrics: serde_json::Value,
    /// SHA-256 of `model.onnx`, hex.
    pub onnx_sha256: String,
    /// What per-feature contributions need (tree covers); absent in older models.
    #[serde(default)]
    pub explain: Option<ExplainMeta>,
}

/// The `explain` section of the metadata.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExplainMeta {
    /// Training rows of each node: `covers[tree id][node id]` in the ONNX graph.
    pub covers: Vec<Vec<f64>>,
}

impl Metadata {
    /// Parses metadata JSON, naming `model` in errors.
    pub fn parse(model: &str, text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Metadata {
            model: model.to_string(),
            reason: e.to_string(),
        })
    }

    /// `name vversion`, for messages and logs.
    pub fn label(&self) -> String {
        format!("{} v{}", self.model_name, self.version)
    }
}

/// Why a score is what it is: one feature, the lead's value of it and how far it moved the
/// score, in log-odds (positive: towards converting).
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    /// Feature name, as in the model's feature spec.
    pub feature: String,
    /// The lead's value (`None`: missing).
    pub value: Option<String>,
    /// The feature's contribution to the log-odds.
    pub contribution: f64,
}

impl std::fmt::Display for Reason {
    /// `page_views=42 +0.31`, `industry=(missing) -0.05`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}={} {:+.2}",
            self.feature,
            self.value.as_deref().unwrap_or("(missing)"),
            self.contribution
        )
    }
}

impl std::str::FromStr for Reason {
    type Err = String;

    /// Reads the [`Display`](std::fmt::Display) form back: the feature is up to the first
    /// `=` (feature names have none), the contribution after the last space (it has none),
    /// the value in between (`(missing)` for none).
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || format!("reason {s:?} is not `feature=value +0.00`");
        let (feature, rest) = s.split_once('=').ok_or_else(bad)?;
        let (value, contribution) = rest.rsplit_once(' ').ok_or_else(bad)?;
        if feature.is_empty() {
            return Err(bad());
        }
        let contribution: f64 = contribution.parse().map_err(|_| bad())?;
        Ok(Reason {
            feature: feature.to_string(),
            value: (value != "(missing)").then(|| value.to_string()),
            contribution,
        })
    }
}

impl Reason {
    fn new(feature: &str, value: leadscore_features::RawValue, contribution: f64) -> Self {
        use leadscore_features::RawValue;
        Reason {
            feature: feature.to_string(),
            value: match value {
                RawValue::Null => None,
                RawValue::Long(v) => Some(v.to_string()),
                RawValue::Double(v) => Some(format!("{v}")),
                RawValue::String(s) => Some(s),
            },
            contribution,
        }
    }
}

/// The `n` largest contributions of one row by absolute value, largest first, ties in
/// feature order: (feature index, contribution).
fn top_contributions(phi: &[f64], n: usize) -> Vec<(usize, f64)> {
    let mut order: Vec<(usize, f64)> = phi.iter().copied().enumerate().collect();
    // Stable: equal magnitudes keep feature order.
    order.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    order.truncate(n);
    order
}

/// The logistic function: a raw score (log-odds) to a probability.
fn logistic(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// A score and its reasons (`None`: none asked, or the model is not explained).
pub type Explained = (Score, Option<Vec<Reason>>);

/// One lead's outcome in a batch: its score and what explains it, or why it was refused.
pub type ScoredWith<R> = std::result::Result<(Score, Option<R>), InvalidInput>;

/// Reasons as records carry them (`page_views=42 +0.31`), shared by the records of one
/// score without copying.
pub type ReasonTexts = std::sync::Arc<[String]>;

/// A scored lead.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Conversion probability in [0, 1].
    pub probability: f64,
}

/// A loaded model, ready to score. Cheap to share behind an `Arc`.
pub struct Model {
    meta: Metadata,
    features: FeatureBuilder,
    session: Mutex<Session>,
    /// The graph's trees, evaluated in Rust; `None` when ONNX Runtime scores.
    native: Option<native::Forest>,
    /// Per-feature contributions; `None` when the metadata has no covers or the graph is
    /// not an explained tree ensemble.
    explainer: Option<explain::Explainer>,
}

/// Largest difference allowed between native and ONNX Runtime scores on the probe rows.
pub const NATIVE_TOLERANCE: f64 = 1e-6;

/// Which engine scores a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The native tree-ensemble evaluator.
    Native,
    /// ONNX Runtime.
    OnnxRuntime,
}

impl Engine {
    /// Stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Native => "native",
            Engine::OnnxRuntime => "onnxruntime",
        }
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model", &self.meta.label())
            .finish_non_exhaustive()
    }
}

fn read(model: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read {
        model: model.to_string(),
        path: path.to_path_buf(),
        source,
    })
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Model {
    /// Loads `model.onnx` and `metadata.json` from a directory.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let shown = dir.display().to_string();
        let text = read(&shown, &dir.join("metadata.json"))?;
        let meta = Metadata::parse(&shown, &String::from_utf8_lossy(&text))?;
        let onnx = read(&meta.label(), &dir.join("model.onnx"))?;
        Self::from_parts(&onnx, meta)
    }

    /// Builds a model from ONNX bytes and metadata, checking they belong together.
    pub fn from_parts(onnx: &[u8], meta: Metadata) -> Result<Self> {
        let label = meta.label();
        let digest = sha256_hex(onnx);
        if digest != meta.onnx_sha256 {
            return Err(Error::Mismatch {
                model: label,
                reason: format!(
                    "model.onnx has SHA-256 {digest} but the metadata says {}: the file is corrupt or from another version",
                    meta.onnx_sha256
                ),
            });
        }
        let features =
            FeatureBuilder::new(meta.feature_spec.clone()).map_err(|e| Error::Metadata {
                model: label.clone(),
                reason: e.to_string(),
            })?;
        let env = init_runtime(None)?;
        let onnx_err = |e: ort::Error| Error::Onnx {
            model: label.clone(),
            reason: e.to_string(),
        };
        let session = Session::builder(env)
            .map_err(onnx_err)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| onnx_err(e.into()))?
            .with_intra_threads(1)
            .map_err(|e| onnx_err(e.into()))?
            .commit_from_memory(onnx)
            .map_err(onnx_err)?;
        let has_input = session.inputs().iter().any(|i| i.name() == meta.input.name);
        let has_output = session
            .outputs()
            .iter()
            .any(|o| o.name() == meta.output.name);
        if !has_input || !has_output {
            return Err(Error::Mismatch {
                model: label,
                reason: format!(
                    "metadata names input `{}` and output `{}`, the graph has inputs {:?} and outputs {:?}",
                    meta.input.name,
                    meta.output.name,
                    session
                        .inputs()
                        .iter()
                        .map(|i| i.name())
                        .collect::<Vec<_>>(),
                    session
                        .outputs()
                        .iter()
                        .map(|o| o.name())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let mut model = Self {
            meta,
            features,
            session: Mutex::new(session),
            native: None,
            explainer: None,
        };
        // A graph whose width differs from the feature spec fails here, not on the first lead.
        let probe = vec![f32::NAN; model.features.width()];
        model
            .score_features(&probe, 1)
            .map_err(|e| Error::Mismatch {
                model: model.meta.label(),
                reason: format!(
                    "the graph does not accept {} features as the spec says: {e}",
                    model.features.width()
                ),
            })?;
        model.native = model.native_if_equal(onnx);
        model.explainer = model.explainer_if_exact(onnx);
        Ok(model)
    }

    /// The TreeSHAP explainer of the graph, if the metadata has the trees' covers and the
    /// explainer's raw scores give the model's probabilities on probe rows (so its
    /// contributions are of this model).
    fn explainer_if_exact(&self, onnx: &[u8]) -> Option<explain::Explainer> {
        let label = self.meta.label();
        let covers = &self.meta.explain.as_ref()?.covers;
        let explainer = match native::explainer(
            onnx,
            &self.meta.output.name,
            self.features.width(),
            covers,
        ) {
            Ok(e) => e,
            Err(why) => {
                tracing::warn!(model = %label, reason = %why, "scores of this model carry no reasons");
                return None;
            }
        };
        let width = self.features.width();
        let rows = native::Forest::from_onnx(onnx, &self.meta.output.name, width)
            .map(|f| f.probe_rows(64))
            .unwrap_or_default();
        let n = rows.len() / width.max(1);
        let want = self.score_onnx(&rows, n).ok()?;
        let worst = rows
            .chunks(width)
            .zip(&want)
            .map(|(row, w)| (logistic(explainer.predict(row)) - w).abs())
            .fold(0.0f64, f64::max);
        if n == 0 || worst > NATIVE_TOLERANCE {
            tracing::warn!(model = %label, max_abs_diff = worst, "the explainer's scores differ from the model's; scores carry no reasons");
            return None;
        }
        Some(explainer)
    }

    /// Each feature's contribution to `lead`'s score in log-odds (path-dependent TreeSHAP),
    /// by feature name in the spec's order, and the expected log-odds they add to; `None`
    /// when this model is not explained.
    pub fn contributions(&self, lead: &Lead) -> Option<(Vec<(&str, f64)>, f64)> {
        let explainer = self.explainer.as_ref()?;
        let row = self.features.build(lead).ok()?;
        let phi = explainer.contributions(&row);
        let names = self
            .meta
            .feature_spec
            .features
            .iter()
            .map(|f| f.name.as_str());
        Some((names.zip(phi).collect(), explainer.expected_value()))
    }

    /// Each feature's contribution (log-odds) for `n` rows of built features (row-major,
    /// `n * width`), row by row, and the expected log-odds they add to; `None` when this
    /// model is not explained or the rows are not whole.
    pub fn contributions_of_rows(&self, rows: &[f32]) -> Option<(Vec<f64>, f64)> {
        let explainer = self.explainer.as_ref()?;
        let phi = explainer.contributions_batch(rows);
        (phi.len() == rows.len()).then_some((phi, explainer.expected_value()))
    }

    /// Whether scores of this model can carry reasons.
    pub fn explained(&self) -> bool {
        self.explainer.is_some()
    }

    /// The `n` features that moved `lead`'s score most (largest absolute contribution
    /// first, ties by feature order), each with the lead's value; `None` when this model is
    /// not explained.
    pub fn reasons(&self, lead: &Lead, n: usize) -> Option<Vec<Reason>> {
        let explainer = self.explainer.as_ref()?;
        let row = self.features.build(lead).ok()?;
        Some(self.reasons_of(lead, &explainer.contributions(&row), n))
    }

    /// The reasons of one row's contributions `phi` (spec order).
    fn reasons_of(&self, lead: &Lead, phi: &[f64], n: usize) -> Vec<Reason> {
        let names = &self.meta.feature_spec.features;
        top_contributions(phi, n)
            .into_iter()
            .map(|(f, c)| {
                let name = names.get(f).map_or("", |s| s.name.as_str());
                Reason::new(name, self.features.raw_value(lead, f), c)
            })
            .collect()
    }

    /// The native evaluator of the graph, if the graph is a covered tree ensemble and its
    /// scores equal ONNX Runtime's on probe rows (within [`NATIVE_TOLERANCE`]).
    fn native_if_equal(&self, onnx: &[u8]) -> Option<native::Forest> {
        let label = self.meta.label();
        if self.meta.output.positive_index.is_some_and(|i| i != 1) {
            tracing::info!(model = %label, engine = "onnxruntime", "positive class is not index 1; not evaluated natively");
            return None;
        }
        let forest = match native::Forest::from_onnx(
            onnx,
            &self.meta.output.name,
            self.features.width(),
        ) {
            Ok(f) => f,
            Err(why) => {
                tracing::info!(model = %label, engine = "onnxruntime", reason = %why, "graph not evaluated natively");
                return None;
            }
        };
        let rows = forest.probe_rows(512);
        let n = rows.len() / forest.width();
        let want = match self.score_onnx(&rows, n) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(model = %label, error = %e, "probe rows failed in ONNX Runtime; not evaluated natively");
                return None;
            }
        };
        let got = forest.score(&rows);
        let worst = want
            .iter()
            .zip(&got)
            .map(|(w, g)| (w - f64::from(*g).clamp(0.0, 1.0)).abs())
            .fold(0.0f64, f64::max);
        if worst > NATIVE_TOLERANCE {
            tracing::warn!(model = %label, engine = "onnxruntime", max_abs_diff = worst, "native scores differ from ONNX Runtime; ONNX Runtime scores this model");
            return None;
        }
        tracing::info!(model = %label, engine = "native", trees = forest.trees(), probe_rows = n, max_abs_diff = worst, "tree ensemble evaluated natively");
        Some(forest)
    }

    /// Which engine scores this model.
    pub fn engine(&self) -> Engine {
        if self.native.is_some() {
            Engine::Native
        } else {
            Engine::OnnxRuntime
        }
    }

    /// The model's metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// The feature builder for this model's spec.
    pub fn features(&self) -> &FeatureBuilder {
        &self.features
    }

    /// Scores `n` rows of already-built features (row-major, `n * width` values).
    pub fn score_features(&self, rows: &[f32], n: usize) -> Result<Vec<f64>> {
        match &self.native {
            Some(forest) => {
                self.check_rows(rows, n)?;
                Ok(forest
                    .score(rows)
                    .into_iter()
                    .map(|p| f64::from(p).clamp(0.0, 1.0))
                    .collect())
            }
            None => self.score_onnx(rows, n),
        }
    }

    fn check_rows(&self, rows: &[f32], n: usize) -> Result<()> {
        let width = self.features.width();
        if rows.len() != n * width {
            return Err(Error::Mismatch {
                model: self.meta.label(),
                reason: format!("{} values for {n} rows of {width}", rows.len()),
            });
        }
        Ok(())
    }

    /// Scores `n` rows in ONNX Runtime, whatever the engine.
    pub fn score_onnx(&self, rows: &[f32], n: usize) -> Result<Vec<f64>> {
        let width = self.features.width();
        let label = || self.meta.label();
        self.check_rows(rows, n)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let onnx_err = |e: ort::Error| Error::Onnx {
            model: label(),
            reason: e.to_string(),
        };
        let input = Tensor::from_array(([n, width], rows.to_vec())).map_err(onnx_err)?;
        let mut session = self.session.lock().map_err(|_| Error::Onnx {
            model: label(),
            reason: "a previous inference panicked; reload the model".into(),
        })?;
        let outputs = session
            .run(ort::inputs![self.meta.input.name.as_str() => input])
            .map_err(onnx_err)?;
        let (shape, data) = outputs[self.meta.output.name.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(onnx_err)?;
        let classes = shape.get(1).copied().unwrap_or(1).max(1) as usize;
        let positive = self.meta.output.positive_index.unwrap_or(classes - 1);
        if data.len() != n * classes || positive >= classes {
            return Err(Error::Mismatch {
                model: label(),
                reason: format!("output shape {shape:?} does not hold {n} probabilities"),
            });
        }
        Ok((0..n)
            .map(|i| f64::from(data[i * classes + positive]).clamp(0.0, 1.0))
            .collect())
    }

    /// Scores one lead.
    pub fn score(&self, lead: &Lead) -> Result<Result<Score, InvalidInput>> {
        let features = match self.features.build(lead) {
            Ok(f) => f,
            Err(e) => return Ok(Err(e)),
        };
        let p = self.score_features(&features, 1)?;
        Ok(Ok(Score {
            probability: p.first().copied().unwrap_or(0.0),
        }))
    }

    /// Scores a batch in one ONNX call; invalid leads get their reason, the rest a score.
    pub fn score_batch(&self, leads: &[Lead]) -> Result<Vec<Result<Score, InvalidInput>>> {
        Ok(self
            .score_batch_with_reasons(leads, 0)?
            .into_iter()
            .map(|r| r.map(|(score, _)| score))
            .collect())
    }

    /// [`Self::score_batch`], each score with the `top` features that moved it most (see
    /// [`Self::reasons`]); the reasons are `None` when `top` is 0 or the model is not
    /// explained. The contributions of the batch are computed together.
    pub fn score_batch_with_reasons(
        &self,
        leads: &[Lead],
        top: usize,
    ) -> Result<Vec<Result<Explained, InvalidInput>>> {
        self.score_batch_explaining(leads, top, |lead, phi| self.reasons_of(lead, phi, top))
    }

    /// [`Self::score_batch_with_reasons`] with each reason as records carry it
    /// (`page_views=42 +0.31`, [`Reason`]'s text), written straight from the contributions:
    /// one string per reason and one shared list per score, for the scorer's hot path.
    pub fn score_batch_with_reason_texts(
        &self,
        leads: &[Lead],
        top: usize,
    ) -> Result<Vec<ScoredWith<ReasonTexts>>> {
        self.score_batch_explaining(leads, top, |lead, phi| {
            let names = &self.meta.feature_spec.features;
            top_contributions(phi, top)
                .into_iter()
                .map(|(f, c)| {
                    use std::fmt::Write;
                    let name = names.get(f).map_or("", |s| s.name.as_str());
                    let mut text = String::with_capacity(name.len() + 24);
                    text.push_str(name);
                    text.push('=');
                    self.features.write_raw_value(lead, f, &mut text);
                    let _ = write!(text, " {c:+.2}");
                    text
                })
                .collect()
        })
    }

    fn score_batch_explaining<R>(
        &self,
        leads: &[Lead],
        top: usize,
        explain: impl Fn(&Lead, &[f64]) -> R,
    ) -> Result<Vec<ScoredWith<R>>> {
        let width = self.features.width();
        let mut rows = Vec::with_capacity(leads.len() * width);
        let mut out: Vec<ScoredWith<R>> = Vec::with_capacity(leads.len());
        let mut valid = Vec::with_capacity(leads.len());
        for (i, lead) in leads.iter().enumerate() {
            match self.features.build_into(lead, &mut rows) {
                Ok(()) => {
                    valid.push(i);
                    out.push(Ok((Score { probability: 0.0 }, None)));
                }
                Err(e) => {
                    rows.truncate(valid.len() * width);
                    out.push(Err(e));
                }
            }
        }
        let scores = self.score_features(&rows, valid.len())?;
        let phi = match &self.explainer {
            Some(explainer) if top > 0 => explainer.contributions_batch(&rows),
            _ => Vec::new(),
        };
        for (k, (i, p)) in valid.into_iter().zip(scores).enumerate() {
            let reasons = phi
                .get(k * width..(k + 1) * width)
                .map(|row| explain(&leads[i], row));
            out[i] = Ok((Score { probability: p }, reasons));
        }
        Ok(out)
    }
}

/// Score bands by thresholds: High at or above `high`, Medium at or above `medium`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
pub struct BandThresholds {
    /// Lower bound of High.
    pub high: f64,
    /// Lower bound of Medium.
    pub medium: f64,
}

impl Default for BandThresholds {
    fn default() -> Self {
        Self {
            high: 0.5,
            medium: 0.25,
        }
    }
}

/// A score band.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Band {
    /// Likely to convert.
    High,
    /// Maybe.
    Medium,
    /// Unlikely.
    Low,
}

impl Band {
    /// Name as in the schemas and the REST contract.
    pub fn as_str(self) -> &'static str {
        match self {
            Band::High => "High",
            Band::Medium => "Medium",
            Band::Low => "Low",
        }
    }
}

impl BandThresholds {
    /// The band of `score`.
    pub fn band(&self, score: f64) -> Band {
        if score >= self.high {
            Band::High
        } else if score >= self.medium {
            Band::Medium
        } else {
            Band::Low
        }
    }
}

/// The model in service; swapped atomically while scoring continues.
#[derive(Debug)]
pub struct ModelHandle {
    current: RwLock<Arc<Model>>,
}

impl ModelHandle {
    /// A handle serving `model`.
    pub fn new(model: Model) -> Self {
        Self {
            current: RwLock::new(Arc::new(model)),
        }
    }

    /// The model in service now. A batch scored with it stays on it even if a swap happens meanwhile.
    pub fn get(&self) -> Arc<Model> {
        match self.current.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Serves `model` from now on; returns the previous one.
    pub fn swap(&self, model: Model) -> Arc<Model> {
        let new = Arc::new(model);
        match self.current.write() {
            Ok(mut g) => std::mem::replace(&mut *g, new),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }

    /// Fetches from `source` and swaps; on any error the last good model stays in service.
    pub async fn reload(&self, source: &source::ModelSource) -> Result<Arc<Model>> {
        let model = source.fetch().await?;
        tracing::info!(model = %model.metadata().label(), "model swapped in");
        Ok(self.swap(model))
    }
}

/// The model bundled in the repository (`models/default`), for tests and the default config.
pub fn bundled_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_reads_as_feature_value_and_signed_contribution() {
        let r = |value: Option<&str>, contribution: f64| Reason {
            feature: "page_views".into(),
            value: value.map(str::to_string),
            contribution,
        };
        assert_eq!(r(Some("42"), 0.314).to_string(), "page_views=42 +0.31");
        assert_eq!(r(None, -0.049).to_string(), "page_views=(missing) -0.05");
    }

    #[test]
    fn bands_follow_thresholds_at_their_bounds() {
        let t = BandThresholds::default();
        assert_eq!(t.band(0.5), Band::High);
        assert_eq!(t.band(0.4999), Band::Medium);
        assert_eq!(t.band(0.25), Band::Medium);
        assert_eq!(t.band(0.0), Band::Low);
    }

    #[test]
    fn checksum_is_hex_sha256() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
