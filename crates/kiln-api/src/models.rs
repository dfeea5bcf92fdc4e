//! `/v1/models`: the catalog, each model's schemas, and submitting a request.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::inputs::{self, parse_input};
use crate::state::AppState;
use crate::wire::{ErrorBody, ModelList, ModelSchemas, ModelSummary, ResultOutput, SubmitResponse};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use kiln_core::catalog::Route;
use kiln_core::ids::RequestId;
use kiln_core::job::NewJob;
use kiln_core::params::GenerationParams;
use kiln_core::store::Idempotency;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::time::Instant;
use time::OffsetDateTime;
use utoipa::PartialSchema;

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const IDEMPOTENCY_KEY_MAX_LEN: usize = 255;

/// Submit a generation request. It is durably queued when this answers.
///
/// `model_id` contains slashes; the OpenAPI document lists one path per model, each with its
/// input schema.
#[utoipa::path(
    post,
    path = "/v1/models/{model_id}",
    tag = "requests",
    params(
        ("model_id" = String, Path, description = "The model id"),
        ("Idempotency-Key" = Option<String>, Header,
            description = "Repeating a submit with the same key (within 24 h) answers the original request instead of queueing another"),
    ),
    request_body(content = Object, description = "The model's input"),
    responses(
        (status = 200, description = "Queued", body = SubmitResponse),
        (status = 400, description = "Unknown model, or none served here (400001)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 413, description = "Body too large (413001)", body = ErrorBody),
        (status = 422, description = "Input does not match the model's schema, or an Idempotency-Key reused for another input (422001)", body = ErrorBody),
        (status = 429, description = "Rate limited (429001); see Retry-After", body = ErrorBody),
        (status = 503, description = "Queue full or shutting down (503001); see Retry-After", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn submit(
    State(state): State<AppState>,
    Caller(owner): Caller,
    Path(model_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SubmitResponse>, ApiError> {
    let route = served_route(&state, &model_id)?;
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    state
        .rate_limiter
        .take(owner, Instant::now())
        .map_err(|retry_after_s| ApiError::RateLimited { retry_after_s })?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge {
            limit: state.settings.max_body_bytes,
        },
        _ => ApiError::MalformedJson(rejection.body_text()),
    })?;
    let input: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    let params = parse_input(route, &input, state.settings.max_prompt_chars)?;
    let idempotency = idempotency(&headers, route, &params, &state)?;
    let now = OffsetDateTime::now_utc();
    let job = NewJob {
        id: RequestId::new(),
        owner,
        route,
        params,
        created_at: now,
        expires_at: now + state.settings.retention,
    };
    // A replay answers exactly as the original did: the same request id and URLs.
    let enqueued = state
        .jobs
        .enqueue(job, idempotency, state.settings.max_queued)
        .await?;
    let id = enqueued.view.job.id;
    let settings = &state.settings;
    Ok(Json(SubmitResponse {
        request_id: id.to_string(),
        status_url: settings.request_url(id, "status"),
        result_url: settings.request_url(id, "result"),
        cancel_url: settings.request_url(id, "cancel"),
    }))
}

/// The route named `model_id`, if this server runs it.
fn served_route(state: &AppState, model_id: &str) -> Result<Route, ApiError> {
    let route: Route = model_id.parse()?;
    let served = &state.settings.served_routes;
    if served.contains(&route) {
        return Ok(route);
    }
    let served = if served.is_empty() {
        "nothing".to_string()
    } else {
        served.iter().map(|r| r.id()).collect::<Vec<_>>().join(", ")
    };
    Err(ApiError::ModelNotServed { route, served })
}

/// The submit's `Idempotency-Key`, scoped by the store to the caller's token. The fingerprint
/// covers the model and the parameters after defaults, so a repeat that differs only in
/// spelling out a default is the same request.
fn idempotency(
    headers: &HeaderMap,
    route: Route,
    params: &GenerationParams,
    state: &AppState,
) -> Result<Option<Idempotency>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| {
            (1..=IDEMPOTENCY_KEY_MAX_LEN).contains(&k.len())
                && k.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or(ApiError::InvalidIdempotencyKey)?;
    let params_json = serde_json::to_string(params)
        .map_err(|e| ApiError::Internal(format!("serializing params: {e}")))?;
    let fingerprint = hex::encode(Sha256::digest(format!("{}\n{params_json}", route.id())));
    Ok(Some(Idempotency {
        key: key.to_string(),
        fingerprint,
        window: state.settings.idempotency_window,
    }))
}

/// The models of the hosted API this server knows, and whether it serves each.
#[utoipa::path(get, path = "/v1/models", tag = "models", responses((status = 200, body = ModelList)))]
pub(crate) async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let settings = &state.settings;
    let models = Route::ALL
        .into_iter()
        .map(|route| ModelSummary {
            id: route.id(),
            title: route.title(),
            family: route.family(),
            served: settings.served_routes.contains(&route),
            schema_url: settings.absolute_url(&format!("/v1/models/{}/schema", route.id())),
        })
        .collect();
    Json(ModelList { models })
}

/// A model's input and output JSON schemas. (Served under the wildcard route that also takes
/// submits; only the `/schema` suffix is a GET.)
#[utoipa::path(
    get,
    path = "/v1/models/{model_id}/schema",
    tag = "models",
    params(("model_id" = String, Path, description = "The model id")),
    responses(
        (status = 200, body = ModelSchemas),
        (status = 400, description = "Unknown model (400001)", body = ErrorBody),
    )
)]
pub(crate) async fn schema(Path(path): Path<String>) -> Result<Json<ModelSchemas>, ApiError> {
    let model_id = path
        .strip_suffix("/schema")
        .ok_or_else(|| ApiError::NoSuchEndpoint {
            method: "GET".into(),
            path: format!("/v1/models/{path}"),
        })?;
    let route: Route = model_id.parse()?;
    Ok(Json(ModelSchemas {
        model_id: route.id(),
        input: inputs::schema_object(route),
        output: ResultOutput::schema(),
    }))
}
