//! The gRPC services: `leadscore.v1.LeadScores` and Open Inference Protocol v2.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use leadscore_cache::CachedScore;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::models::Served;
use crate::proto::inference as oip;
use crate::proto::v1;
use crate::store::{Found, Origin, Store};
use crate::{Error, lead_from_fields};

/// State shared by the gRPC and REST front ends.
pub struct Lookup {
    /// Score reads.
    pub store: Arc<Store>,
    /// Models in service.
    pub models: Arc<Served>,
    /// Live scores for WatchScores.
    pub live: broadcast::Sender<v1::Score>,
    /// Most ids in one BatchGetScores.
    pub max_batch: usize,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Ends streams on shutdown.
    pub shutdown: CancellationToken,
}

/// The band enum of a band name.
pub fn band_of(name: &str) -> v1::Band {
    match name {
        "High" => v1::Band::High,
        "Medium" => v1::Band::Medium,
        "Low" => v1::Band::Low,
        _ => v1::Band::Unspecified,
    }
}

/// One reason as a message: its parts when the text reads as `feature=value +0.31`, the
/// text alone otherwise.
pub fn reason_message(text: &str) -> v1::Reason {
    match text.parse::<leadscore_model::Reason>() {
        Ok(r) => v1::Reason {
            feature: r.feature,
            value: r.value,
            contribution: r.contribution,
            text: text.to_string(),
        },
        Err(_) => v1::Reason {
            text: text.to_string(),
            ..Default::default()
        },
    }
}

/// A stored score as a message.
pub fn score_message(s: &CachedScore, source: v1::ScoreSource) -> v1::Score {
    v1::Score {
        lead_id: s.lead_id.clone(),
        score: s.score,
        band: band_of(&s.band) as i32,
        model_name: s.model_name.clone(),
        model_version: s.model_version.clone(),
        model_role: s.model_role.clone(),
        scored_at_ms: s.scored_at_ms,
        source: source as i32,
        reasons: s.reasons.iter().map(|r| reason_message(r)).collect(),
    }
}

fn found_message(f: &Found) -> v1::Score {
    score_message(
        &f.score,
        match f.origin {
            Origin::Memory => v1::ScoreSource::Memory,
            Origin::Cache => v1::ScoreSource::Cache,
            Origin::Database => v1::ScoreSource::Database,
        },
    )
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid { field, reason } => {
                Status::invalid_argument(format!("`{field}` is invalid: {reason}"))
            }
            Error::Unavailable(why) => Status::unavailable(format!(
                "score stores unavailable ({why}); retry with backoff"
            )),
            Error::Model(why) => Status::internal(format!("scoring failed: {why}")),
            Error::Startup(why) => Status::internal(why),
        }
    }
}

/// The caller's deadline (`grpc-timeout`), if any, as a duration from now.
fn deadline<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs `f` within the caller's deadline: DEADLINE_EXCEEDED when it does not finish in time.
async fn within<T>(
    limit: Option<Duration>,
    f: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match limit {
        // Answer before the transport's own timers (server and client, started earlier
        // than this handler) cancel the call: at nine tenths of the caller's budget.
        Some(d) => tokio::time::timeout(d.mul_f64(0.9), f)
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "not answered within the caller's deadline of {} ms",
                    d.as_millis()
                )))
            }),
        None => f.await,
    }
}

fn check_id(id: &str) -> Result<(), Status> {
    if id.trim().is_empty() {
        return Err(Status::invalid_argument("`lead_id` is invalid: empty"));
    }
    if id.len() > 256 {
        return Err(Status::invalid_argument(
            "`lead_id` is invalid: longer than 256 bytes",
        ));
    }
    Ok(())
}

type ScoreStream = Pin<Box<dyn Stream<Item = Result<v1::Score, Status>> + Send>>;

#[tonic::async_trait]
impl v1::lead_scores_server::LeadScores for Arc<Lookup> {
    async fn get_score(
        &self,
        req: Request<v1::GetScoreRequest>,
    ) -> Result<Response<v1::GetScoreResponse>, Status> {
        let started = Instant::now();
        let limit = deadline(&req);
        let id = req.into_inner().lead_id;
        let out = within(limit, async {
            check_id(&id)?;
            match self.store.get(&id).await? {
                Some(f) => Ok(v1::GetScoreResponse {
                    score: Some(found_message(&f)),
                }),
                None => Err(Status::not_found(format!(
                    "no score for lead `{id}`: unknown lead, or not scored yet"
                ))),
            }
        })
        .await;
        self.metrics.call("GetScore", &out, started);
        out.map(Response::new)
    }

    async fn batch_get_scores(
        &self,
        req: Request<v1::BatchGetScoresRequest>,
    ) -> Result<Response<v1::BatchGetScoresResponse>, Status> {
        let started = Instant::now();
        let limit = deadline(&req);
        let ids = req.into_inner().lead_ids;
        let out = within(limit, async {
            if ids.len() > self.max_batch {
                return Err(Status::invalid_argument(format!(
                    "`lead_ids` is invalid: {} ids, at most {} per call",
                    ids.len(),
                    self.max_batch
                )));
            }
            for id in &ids {
                check_id(id)?;
            }
            let found = self.store.get_many(&ids).await?;
            let mut resp = v1::BatchGetScoresResponse::default();
            for (id, f) in ids.iter().zip(found) {
                match f {
                    Some(f) => resp.scores.push(found_message(&f)),
                    None => resp.missing.push(id.clone()),
                }
            }
            Ok(resp)
        })
        .await;
        self.metrics.call("BatchGetScores", &out, started);
        out.map(Response::new)
    }

    async fn score_lead(
        &self,
        req: Request<v1::ScoreLeadRequest>,
    ) -> Result<Response<v1::ScoreLeadResponse>, Status> {
        let started = Instant::now();
        let lead = req.into_inner().lead;
        let out = (|| {
            let l = lead.ok_or_else(|| Status::invalid_argument("`lead` is invalid: missing"))?;
            check_id(&l.lead_id)?;
            let lead = lead_from_fields(
                l.lead_id,
                l.company_size,
                l.industry,
                l.page_views.map(i64::from),
                l.time_on_site,
                l.form_completion_time,
                l.referral_source,
                l.country,
                l.created_at.as_deref(),
            )?;
            let s = self.models.score(&lead)?;
            let meta = s.model.metadata();
            Ok(v1::ScoreLeadResponse {
                score: Some(v1::Score {
                    lead_id: lead.lead_id,
                    score: s.score,
                    band: band_of(s.band.as_str()) as i32,
                    model_name: meta.model_name.clone(),
                    model_version: meta.version.clone(),
                    model_role: "champion".into(),
                    scored_at_ms: chrono::Utc::now().timestamp_millis(),
                    source: v1::ScoreSource::OnDemand as i32,
                    reasons: s
                        .reasons
                        .iter()
                        .map(|r| v1::Reason {
                            feature: r.feature.clone(),
                            value: r.value.clone(),
                            contribution: r.contribution,
                            text: r.to_string(),
                        })
                        .collect(),
                }),
                latency_ms: started.elapsed().as_secs_f64() * 1000.0,
            })
        })();
        self.metrics.call("ScoreLead", &out, started);
        out.map(Response::new)
    }

    type WatchScoresStream = ScoreStream;

    async fn watch_scores(
        &self,
        req: Request<v1::WatchScoresRequest>,
    ) -> Result<Response<Self::WatchScoresStream>, Status> {
        let filter = req.into_inner();
        let bands: Vec<i32> = filter.bands.clone();
        if bands.contains(&(v1::Band::Unspecified as i32)) {
            return Err(Status::invalid_argument(
                "`bands` is invalid: BAND_UNSPECIFIED is not a band",
            ));
        }
        if !(0.0..=1.0).contains(&filter.min_score) {
            return Err(Status::invalid_argument(
                "`min_score` is invalid: outside [0, 1]",
            ));
        }
        let mut rx = self.live.subscribe();
        let shutdown = self.shutdown.clone();
        let metrics = self.metrics.clone();
        metrics.watchers(1);
        let stream = async_stream(move |tx| async move {
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    n = rx.recv() => n,
                };
                match next {
                    Ok(s) => {
                        if s.score < filter.min_score
                            || (!bands.is_empty() && !bands.contains(&s.band))
                        {
                            continue;
                        }
                        if tx.send(Ok(s)).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        metrics.watch_dropped(n);
                        tracing::debug!(
                            skipped = n,
                            "a WatchScores client fell behind; scores skipped"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
            metrics.watchers(-1);
        });
        Ok(Response::new(stream))
    }

    async fn get_model_info(
        &self,
        _req: Request<v1::GetModelInfoRequest>,
    ) -> Result<Response<v1::ModelInfo>, Status> {
        let started = Instant::now();
        let m = &self.models;
        let state = |model: &leadscore_model::Model, stage: &str| v1::ModelState {
            model_name: model.metadata().model_name.clone(),
            version: model.metadata().version.clone(),
            loaded: true,
            stage: stage.into(),
        };
        let challenger = m.challenger();
        let canary_percent = if challenger.is_some() {
            m.canary_percent()
        } else {
            0.0
        };
        let out: Result<v1::ModelInfo, Status> = Ok(v1::ModelInfo {
            champion: Some(state(&m.champion.get(), "Production")),
            challenger: challenger.as_deref().map(|c| state(c, "Staging")),
            canary: challenger
                .as_deref()
                .filter(|_| canary_percent > 0.0)
                .map(|c| state(c, "Canary")),
            canary_percent,
        });
        self.metrics.call("GetModelInfo", &out, started);
        out.map(Response::new)
    }
}

/// A stream fed by a task: `f` gets the sending half; the stream ends when it returns.
fn async_stream<F, Fut>(f: F) -> ScoreStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<v1::Score, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// Open Inference Protocol v2 over the champion: input `features` (FP32, [N, width],
/// built as the model's feature spec says), output `probability` (FP64, [N]).
pub struct Inference {
    /// Models in service.
    pub models: Arc<Served>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

impl Inference {
    fn check_model(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<leadscore_model::Model>, Status> {
        let model = self.models.champion.get();
        let meta = model.metadata();
        if name != meta.model_name {
            return Err(Status::not_found(format!(
                "model `{name}` is not served here; this server serves `{}`",
                meta.model_name
            )));
        }
        if !version.is_empty() && version != meta.version {
            return Err(Status::not_found(format!(
                "version `{version}` of `{name}` is not served here; the champion is version {}",
                meta.version
            )));
        }
        Ok(model)
    }
}

#[tonic::async_trait]
impl oip::grpc_inference_service_server::GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        _: Request<oip::ServerLiveRequest>,
    ) -> Result<Response<oip::ServerLiveResponse>, Status> {
        Ok(Response::new(oip::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<oip::ServerReadyRequest>,
    ) -> Result<Response<oip::ServerReadyResponse>, Status> {
        Ok(Response::new(oip::ServerReadyResponse { ready: true }))
    }

    async fn model_ready(
        &self,
        req: Request<oip::ModelReadyRequest>,
    ) -> Result<Response<oip::ModelReadyResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(oip::ModelReadyResponse {
            ready: self.check_model(&r.name, &r.version).is_ok(),
        }))
    }

    async fn server_metadata(
        &self,
        _: Request<oip::ServerMetadataRequest>,
    ) -> Result<Response<oip::ServerMetadataResponse>, Status> {
        Ok(Response::new(oip::ServerMetadataResponse {
            name: "leadscore".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        req: Request<oip::ModelMetadataRequest>,
    ) -> Result<Response<oip::ModelMetadataResponse>, Status> {
        let r = req.into_inner();
        let model = self.check_model(&r.name, &r.version)?;
        let width = model.features().width() as i64;
        Ok(Response::new(oip::ModelMetadataResponse {
            name: model.metadata().model_name.clone(),
            versions: vec![model.metadata().version.clone()],
            platform: "onnxruntime_onnx".into(),
            inputs: vec![oip::model_metadata_response::TensorMetadata {
                name: "features".into(),
                datatype: "FP32".into(),
                shape: vec![-1, width],
            }],
            outputs: {
                let mut outputs = vec![oip::model_metadata_response::TensorMetadata {
                    name: "probability".into(),
                    datatype: "FP64".into(),
                    shape: vec![-1],
                }];
                if model.explained() {
                    outputs.push(oip::model_metadata_response::TensorMetadata {
                        name: "contributions".into(),
                        datatype: "FP64".into(),
                        shape: vec![-1, width],
                    });
                }
                outputs
            },
        }))
    }

    async fn model_infer(
        &self,
        req: Request<oip::ModelInferRequest>,
    ) -> Result<Response<oip::ModelInferResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = (|| {
            let model = self.check_model(&r.model_name, &r.model_version)?;
            let width = model.features().width();
            let [input] = r.inputs.as_slice() else {
                return Err(Status::invalid_argument(format!(
                    "`inputs` is invalid: {} tensors, expected one named `features`",
                    r.inputs.len()
                )));
            };
            if input.datatype != "FP32" {
                return Err(Status::invalid_argument(format!(
                    "`inputs[0].datatype` is invalid: `{}`, expected FP32",
                    input.datatype
                )));
            }
            let (n, w) = match input.shape.as_slice() {
                [n, w] if *n >= 0 && *w == width as i64 => (*n as usize, *w as usize),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "`inputs[0].shape` is invalid: {other:?}, expected [N, {width}]"
                    )));
                }
            };
            let values: Vec<f32> = match (&input.contents, r.raw_input_contents.first()) {
                (_, Some(raw)) => {
                    if raw.len() != n * w * 4 {
                        return Err(Status::invalid_argument(format!(
                            "`raw_input_contents[0]` is invalid: {} bytes, expected {}",
                            raw.len(),
                            n * w * 4
                        )));
                    }
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                }
                (Some(c), None) => c.fp32_contents.clone(),
                (None, None) => {
                    return Err(Status::invalid_argument(
                        "`inputs[0].contents` is invalid: no data",
                    ));
                }
            };
            if values.len() != n * w {
                return Err(Status::invalid_argument(format!(
                    "`inputs[0].contents.fp32_contents` is invalid: {} values for shape [{n}, {w}]",
                    values.len()
                )));
            }
            // Outputs as the protocol asks: the requested ones, or every one when none is
            // named (`contributions` only for an explained tree ensemble).
            let wants =
                |name: &str| r.outputs.is_empty() || r.outputs.iter().any(|o| o.name == name);
            if let Some(other) = r
                .outputs
                .iter()
                .find(|o| o.name != "probability" && o.name != "contributions")
            {
                return Err(Status::invalid_argument(format!(
                    "`outputs` is invalid: no output named `{}` (probability, contributions)",
                    other.name
                )));
            }
            let mut outputs = Vec::new();
            if wants("probability") {
                let scores = model
                    .score_features(&values, n)
                    .map_err(|e| Status::internal(format!("inference failed: {e}")))?;
                outputs.push(oip::model_infer_response::InferOutputTensor {
                    name: "probability".into(),
                    datatype: "FP64".into(),
                    shape: vec![n as i64],
                    parameters: Default::default(),
                    contents: Some(oip::InferTensorContents {
                        fp64_contents: scores,
                        ..Default::default()
                    }),
                });
            }
            let explicit = r.outputs.iter().any(|o| o.name == "contributions");
            match model.contributions_of_rows(&values) {
                Some((phi, expected)) if wants("contributions") => {
                    let mut parameters = std::collections::HashMap::new();
                    parameters.insert(
                        "expected_value".to_string(),
                        oip::InferParameter {
                            parameter_choice: Some(
                                oip::infer_parameter::ParameterChoice::DoubleParam(expected),
                            ),
                        },
                    );
                    outputs.push(oip::model_infer_response::InferOutputTensor {
                        name: "contributions".into(),
                        datatype: "FP64".into(),
                        shape: vec![n as i64, w as i64],
                        parameters,
                        contents: Some(oip::InferTensorContents {
                            fp64_contents: phi,
                            ..Default::default()
                        }),
                    });
                }
                None if explicit => {
                    return Err(Status::failed_precondition(format!(
                        "model {} has no contributions: it is not an explained tree ensemble",
                        model.metadata().label()
                    )));
                }
                _ => {}
            }
            Ok(oip::ModelInferResponse {
                model_name: model.metadata().model_name.clone(),
                model_version: model.metadata().version.clone(),
                id: r.id.clone(),
                parameters: Default::default(),
                outputs,
                raw_output_contents: Vec::new(),
            })
        })();
        self.metrics.call("ModelInfer", &out, started);
        out.map(Response::new)
    }
}
