//! The seed's REST contract (`GET /health`, `POST /score-lead`, `GET /model-info`),
//! `GET /leads/{id}/score`, and `/healthz`, `/readyz`, `/metrics`.
//!
//! Invalid input gets a 422 in the seed's (FastAPI) shape, naming the field:
//! `{"detail": [{"loc": ["body", "page_views"], "msg": "...", "type": "..."}]}`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::auth::Tokens;
use crate::grpc::Lookup;
use crate::{Error, lead_from_fields};

/// Python's `datetime.isoformat()` of a UTC time, as the seed printed it.
fn iso(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

fn unprocessable(field: &str, msg: String, kind: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"loc": ["body", field], "msg": msg, "type": kind}]})),
    )
        .into_response()
}

/// A field that failed validation: becomes the 422.
struct Bad {
    field: String,
    msg: String,
    kind: &'static str,
}

impl Bad {
    fn new(field: &str, msg: &str, kind: &'static str) -> Self {
        Self {
            field: field.into(),
            msg: msg.into(),
            kind,
        }
    }

    fn response(self) -> Response {
        unprocessable(&self.field, self.msg, self.kind)
    }
}

fn detail(code: StatusCode, msg: String) -> Response {
    (code, Json(json!({"detail": msg}))).into_response()
}

async fn health(State(l): State<Arc<Lookup>>) -> Response {
    let loaded = l.metrics.is_ready();
    Json(json!({
        "status": if loaded { "healthy" } else { "unhealthy" },
        "model_loaded": loaded,
        "model_stage": "Production",
        "timestamp": iso(chrono::Utc::now()),
    }))
    .into_response()
}

async fn model_info(State(l): State<Arc<Lookup>>) -> Response {
    let champion = l.models.champion.get();
    let challenger = l.models.challenger();
    Json(json!({
        "production_model": {
            "loaded": true,
            "stage": "Production",
            "model_name": champion.metadata().model_name,
            "version": champion.metadata().version,
        },
        "shadow_model": {
            "enabled": l.models.challenger.is_some(),
            "loaded": challenger.is_some(),
            "stage": "Staging",
            "version": challenger.as_ref().map(|c| c.metadata().version.clone()),
        },
        "canary_percent": if challenger.is_some() { l.models.canary_percent() } else { 0.0 },
    }))
    .into_response()
}

/// A string field: absent or null is `None`; another type is a 422.
fn text(body: &serde_json::Map<String, Value>, field: &str) -> Result<Option<String>, Bad> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Bad::new(
            field,
            "Input should be a valid string",
            "string_type",
        )),
    }
}

fn number(body: &serde_json::Map<String, Value>, field: &str) -> Result<Option<f64>, Bad> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(_) => Err(Bad::new(
            field,
            "Input should be a valid number",
            "float_type",
        )),
    }
}

fn integer(body: &serde_json::Map<String, Value>, field: &str) -> Result<Option<i64>, Bad> {
    let bad = || Bad::new(field, "Input should be a valid integer", "int_type");
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

async fn score_lead(State(l): State<Arc<Lookup>>, body: axum::body::Bytes) -> Response {
    let started = Instant::now();
    let out = score_lead_inner(&l, &body, started);
    let code = out.status();
    l.metrics.record(
        "POST /score-lead",
        match code.as_u16() {
            200 => "OK",
            422 => "INVALID_ARGUMENT",
            _ => "INTERNAL",
        },
        started,
    );
    out
}

fn score_lead_inner(l: &Lookup, body: &[u8], started: Instant) -> Response {
    let body: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return unprocessable("body", format!("JSON decode error: {e}"), "json_invalid"),
    };
    let Value::Object(body) = body else {
        return unprocessable(
            "body",
            "Input should be a valid dictionary".into(),
            "dict_type",
        );
    };
    let fields = (|| {
        let lead_id = text(&body, "lead_id")?
            .ok_or_else(|| Bad::new("lead_id", "Field required", "missing"))?;
        Ok::<_, Bad>((
            lead_id,
            text(&body, "company_size")?,
            text(&body, "industry")?,
            integer(&body, "page_views")?,
            number(&body, "time_on_site")?,
            number(&body, "form_completion_time")?,
            text(&body, "referral_source")?,
            text(&body, "country")?,
            text(&body, "created_at")?,
        ))
    })();
    let (id, size, industry, views, time, form, referral, country, created) = match fields {
        Ok(f) => f,
        Err(bad) => return bad.response(),
    };
    let scored = lead_from_fields(
        id,
        size,
        industry,
        views,
        time,
        form,
        referral,
        country,
        created.as_deref(),
    )
    .and_then(|lead| l.models.score(&lead).map(|s| (lead, s)));
    match scored {
        Ok((lead, s)) => Json(json!({
            "lead_id": lead.lead_id,
            "lead_score": s.score,
            "score_category": s.band.as_str(),
            "model_version": s.model.metadata().version,
            "reasons": s.reasons.iter().map(|r| reason_json(&r.to_string())).collect::<Vec<_>>(),
            "prediction_timestamp": iso(chrono::Utc::now()),
            "latency_ms": started.elapsed().as_secs_f64() * 1000.0,
        }))
        .into_response(),
        Err(Error::Invalid { field, reason }) => unprocessable(&field, reason, "value_error"),
        Err(e) => detail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// One reason in a REST answer: `{"feature", "value", "contribution", "text"}` (the gRPC
/// `Reason`); a text that does not read as `feature=value +0.31` comes back as text alone.
fn reason_json(text: &str) -> Value {
    let r = crate::grpc::reason_message(text);
    if r.feature.is_empty() {
        return json!({ "text": r.text });
    }
    json!({
        "feature": r.feature,
        "value": r.value,
        "contribution": r.contribution,
        "text": r.text,
    })
}

async fn lead_score(State(l): State<Arc<Lookup>>, Path(id): Path<String>) -> Response {
    let started = Instant::now();
    let (out, code) = match l.store.get(&id).await {
        Ok(Some(f)) => (
            Json(json!({
                "lead_id": f.score.lead_id,
                "lead_score": f.score.score,
                "score_category": f.score.band,
                "model_name": f.score.model_name,
                "model_version": f.score.model_version,
                "model_role": f.score.model_role,
                "scored_at_ms": f.score.scored_at_ms,
                "reasons": f.score.reasons.iter().map(|r| reason_json(r)).collect::<Vec<_>>(),
                "source": f.origin.as_str(),
            }))
            .into_response(),
            "OK",
        ),
        Ok(None) => (
            detail(StatusCode::NOT_FOUND, format!("no score for lead `{id}`")),
            "NOT_FOUND",
        ),
        Err(e) => (
            detail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; retry with backoff"),
            ),
            "UNAVAILABLE",
        ),
    };
    l.metrics.record("GET /leads/{id}/score", code, started);
    out
}

async fn require_token(State(tokens): State<Tokens>, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if tokens.allows(given) {
        return next.run(req).await;
    }
    let mut r = detail(
        StatusCode::UNAUTHORIZED,
        if given.is_none() {
            "missing `Authorization: Bearer <token>` header".into()
        } else {
            "the bearer token is not accepted".into()
        },
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

async fn log_request(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let r = next.run(req).await;
    // Paths hold lead ids at most: opaque keys, never PII. Bodies are never logged.
    tracing::info!(%method, %path, status = r.status().as_u16(), ms = started.elapsed().as_secs_f64() * 1000.0, "rest request");
    r
}

/// The REST router.
pub fn router(
    lookup: Arc<Lookup>,
    tokens: Tokens,
    cors_origins: &[String],
    max_body: usize,
) -> Router {
    let protected = Router::new()
        .route("/score-lead", post(score_lead))
        .route("/model-info", get(model_info))
        .route("/leads/{id}/score", get(lead_score))
        .route_layer(axum::middleware::from_fn_with_state(tokens, require_token));
    let open = Router::new()
        .route("/health", get(health))
        .merge(leadscore_runtime::routes(Arc::new(LookupStatus(
            lookup.clone(),
        ))));
    let mut app = protected
        .merge(open)
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(log_request))
        .with_state(lookup);
    if !cors_origins.is_empty() {
        use tower_http::cors::{AllowOrigin, CorsLayer};
        let origins = if cors_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                cors_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    app
}

/// What the shared `/readyz` and `/metrics` routes ask the lookup.
struct LookupStatus(Arc<Lookup>);

impl leadscore_runtime::Status for LookupStatus {
    fn readiness(&self) -> Result<(), leadscore_runtime::NotReady> {
        if self.0.metrics.is_ready() {
            Ok(())
        } else {
            Err(leadscore_runtime::NotReady::Starting)
        }
    }

    fn metrics(&self) -> String {
        self.0
            .metrics
            .render(&self.0.store.counts, self.0.store.memory().map(|m| m.len()))
    }
}
