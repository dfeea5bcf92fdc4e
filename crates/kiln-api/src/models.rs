//! `/v1/models`: the catalog, each model's schemas, and submitting a request.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::inputs::{self, parse_input, parse_json};
use crate::prefer;
use crate::state::AppState;
use crate::webhooks;
use crate::wire::{ErrorBody, ModelList, ModelSchemas, ModelSummary, ResultOutput, SubmitResponse};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::handler::Handler;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use kiln_core::blob::Blob;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, RequestId};
use kiln_core::job::NewJob;
use kiln_core::params::{GenerationParams, ImageLocation, ImageSource};
use kiln_core::report::Chain;
use kiln_core::store::Idempotency;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Instant;
use time::OffsetDateTime;
use utoipa::PartialSchema;

const IDEMPOTENCY_KEY: &str = "idempotency-key";
const IDEMPOTENCY_KEY_MAX_LEN: usize = 255;

/// Submit a generation request. It is durably queued when this answers.
///
/// `model_id` contains slashes; the OpenAPI document lists one path per model this server
/// serves, each with its input schema.
#[utoipa::path(
    post,
    path = "/v1/models/{model_id}",
    tag = "requests",
    params(
        ("model_id" = String, Path, description = "The model id"),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = "^[!-~]+$",
            description = "Repeating a submit with the same key (within 24 h) answers the original request instead of queueing another; 1 to 255 visible ASCII characters"),
        ("Prefer" = Option<String>, Header, example = "wait=30",
            description = "`wait=N` (1 to 60 s; a bare `wait` is 60): hold the answer until the request ends, up to N seconds. If it ends in time the answer is its result object (as the result endpoint answers it) plus `status_url`, `result_url` and `cancel_url`, with `Preference-Applied: wait=N`; otherwise the usual answer. Other preferences are ignored (RFC 7240)"),
        ("webhook" = Option<String>, Query, max_length = 2048,
            description = "An absolute http(s) URL that kiln POSTs `{request_id, status: OK|ERROR, payload: <result object>, error?}` to when the request ends (succeeded: OK; failed or cancelled: ERROR), signed per Standard Webhooks with the key `GET /v1/webhooks/secret` returns, and retried with backoff until a 2xx. Only the terminal event is sent (no progress events). The result lists the attempts under `webhook`"),
    ),
    request_body(content = Object, description = "The model's input"),
    responses(
        (status = 200, description = "Queued; with `Prefer: wait=N`, a request that ended within N seconds answers a WaitedResponse instead", body = SubmitResponse),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 413, description = "Body too large (413001)", body = ErrorBody),
        (status = 415, description = "The body is not declared application/json (415001)", body = ErrorBody),
        (status = 409, description = "The Idempotency-Key was already used for another input (409001)", body = ErrorBody),
        (status = 422, description = "Input does not match the model's schema, a malformed Idempotency-Key, an invalid webhook URL, or `Prefer: wait` beyond 1 to 60 s (422001)", body = ErrorBody),
        (status = 429, description = "Rate limited (429001); see Retry-After", body = ErrorBody),
        (status = 503, description = "Queue full or shutting down (503001); see Retry-After", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn submit(
    State(state): State<AppState>,
    Caller { id: owner, .. }: Caller,
    Path(model_id): Path<String>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let route = served_route(&state, &model_id)?;
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    let webhook = webhooks::webhook_param(query)?;
    let mut params = read_input(&state, route, &headers, body)?;
    let wait_s = prefer::wait_preference(&headers)?;
    // The fingerprint is of the input as sent: a replay stores its images under new keys.
    let idempotency = idempotency(&headers, route, &params, &state)?;
    let stored = store_inline_images(&state, &mut params).await?;
    let now = OffsetDateTime::now_utc();
    let job = NewJob {
        id: RequestId::new(),
        owner,
        route,
        params,
        created_at: now,
        expires_at: now + state.settings.retention,
        webhook,
    };
    // Only a valid submit reaches the budget, and only new work keeps its token: a replay
    // answers exactly as the original did (the same request id and URLs) and costs nothing.
    state
        .rate_limiter
        .take(owner, Instant::now())
        .map_err(|retry_after_s| ApiError::RateLimited { retry_after_s })?;
    let enqueued = state
        .jobs
        .enqueue(job, idempotency, state.settings.queue_limits())
        .await;
    if !enqueued.as_ref().is_ok_and(|e| !e.replayed) {
        state.rate_limiter.refund(owner);
        // No job of this submit holds the images: a replay's original has its own copies.
        delete_blobs(&state, &stored).await;
    }
    let enqueued = enqueued?;
    let id = enqueued.view.job.id;
    let settings = &state.settings;
    let submitted = SubmitResponse {
        request_id: id.to_string(),
        status_url: settings.request_url(id, "status"),
        result_url: settings.request_url(id, "result"),
        cancel_url: settings.request_url(id, "cancel"),
    };
    match wait_s {
        Some(wait_s) => prefer::answer_after_wait(&state, owner, id, wait_s, submitted).await,
        None => Ok(Json(submitted).into_response()),
    }
}

/// Moves the input's `data:` images into the blob store, for as long as the job needs them,
/// and points the parameters at them: a job's record keeps a key, not megabytes of base64
/// for the whole retention period. Returns the keys written.
async fn store_inline_images(
    state: &AppState,
    params: &mut GenerationParams,
) -> Result<Vec<BlobKey>, ApiError> {
    let mut stored = Vec::new();
    for source in &mut params.reference_images {
        let ImageLocation::Data { media_type, base64 } = source.location() else {
            continue;
        };
        // The edge checked the payload; decoding it again cannot fail.
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(base64)
            .map_err(|e| ApiError::Internal(Box::new(e)))?;
        // Stored under the blob store's own name for the type: the client's spelling of it
        // (`ImaGE/PNG`, or a type nothing knows) is not something to keep.
        let (extension, content_type) = blob_type(media_type);
        let key = BlobKey::random(extension);
        let blob = Blob {
            bytes,
            content_type: content_type.to_string(),
        };
        if let Err(e) = state.blobs.put(&key, blob).await {
            delete_blobs(state, &stored).await;
            return Err(e.into());
        }
        *source = ImageSource::stored(content_type, &key);
        stored.push(key);
    }
    Ok(stored)
}

/// The file extension and content type an inline image is stored under. The decoder tells the
/// format from the bytes, so an unknown type loses nothing.
fn blob_type(media_type: &str) -> (&'static str, &'static str) {
    match media_type.to_ascii_lowercase().as_str() {
        "image/png" => ("png", "image/png"),
        "image/jpeg" | "image/jpg" => ("jpeg", "image/jpeg"),
        "image/webp" => ("webp", "image/webp"),
        _ => ("bin", "application/octet-stream"),
    }
}

/// Best effort: a file left behind is purged with its record, if it has one, or stays an
/// orphan of no one's; neither changes the answer.
async fn delete_blobs(state: &AppState, keys: &[BlobKey]) {
    for key in keys {
        if let Err(error) = state.blobs.delete(key).await {
            tracing::warn!(error = %Chain(&error), blob = %key, "could not delete an inline image");
        }
    }
}

/// The body as `route`'s validated input.
fn read_input(
    state: &AppState,
    route: Route,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<GenerationParams, ApiError> {
    check_json_content_type(headers)?;
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge {
            limit: state.settings.max_body_bytes,
        },
        _ => ApiError::MalformedJson(rejection.body_text()),
    })?;
    let input = parse_json(&body)?;
    Ok(parse_input(route, &input, state.settings.max_prompt_chars)?)
}

/// `application/json` (any parameters, e.g. a charset) or a `+json` type: a body declared
/// as anything else (a form, text, none) is not parsed as JSON on a guess.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let essence = declared
        .as_deref()
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        Some(t) if t.starts_with("application/") && t.ends_with("+json") => Ok(()),
        _ => Err(ApiError::UnsupportedMediaType(
            declared.unwrap_or_else(|| "no Content-Type".into()),
        )),
    }
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

/// The parameters in the fingerprint's own form, frozen: a key sent before an upgrade and
/// replayed after it must still match, whatever `GenerationParams` has become since (this is
/// its shape from before route options were an enum, field for field).
#[derive(serde::Serialize)]
struct FingerprintForm<'a> {
    prompt: &'a kiln_core::params::Prompt,
    size: &'a kiln_core::params::OutputSize,
    seed: u32,
    num_inference_steps: Option<u32>,
    guidance_scale: Option<f32>,
    output_format: kiln_core::params::OutputFormat,
    raw: bool,
    enable_prompt_expansion: bool,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    reference_images: &'a [ImageSource],
}

/// SHA-256 of the route and the parameters in [`FingerprintForm`].
fn fingerprint(route: Route, params: &GenerationParams) -> Result<String, ApiError> {
    use kiln_core::params::RouteOptions;
    let (raw, enable_prompt_expansion) = match params.options {
        RouteOptions::Flux11Pro { raw } => (raw, false),
        RouteOptions::Flux2Flex {
            enable_prompt_expansion,
        } => (false, enable_prompt_expansion),
    };
    let form = FingerprintForm {
        prompt: &params.prompt,
        size: &params.size,
        seed: params.seed,
        num_inference_steps: params.num_inference_steps,
        guidance_scale: params.guidance_scale,
        output_format: params.output_format,
        raw,
        enable_prompt_expansion,
        reference_images: &params.reference_images,
    };
    let json = serde_json::to_string(&form).map_err(|e| ApiError::Internal(Box::new(e)))?;
    Ok(hex::encode(Sha256::digest(format!(
        "{}\n{json}",
        route.id()
    ))))
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
    let fingerprint = fingerprint(route, params)?;
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

/// A model's input and output JSON schemas.
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
pub(crate) async fn schema(
    State(state): State<AppState>,
    model_id: &str,
) -> Result<Json<ModelSchemas>, ApiError> {
    let route: Route = model_id.parse()?;
    Ok(Json(ModelSchemas {
        model_id: route.id(),
        input: inputs::input_schema(route, state.settings.max_prompt_chars),
        output: ResultOutput::schema(),
    }))
}

/// `/v1/models/{*path}`. Model ids contain slashes, so one wildcard route takes both the submits
/// (`POST /v1/models/{model_id}`) and the schemas (`GET /v1/models/{model_id}/schema`): the
/// suffix and the method choose, and another method is 405 with the `Allow` of that path.
pub(crate) async fn by_path(
    State(state): State<AppState>,
    Path(path): Path<String>,
    request: Request,
) -> Response {
    let method = request.method().clone();
    let (allow, served) = match path.strip_suffix("/schema") {
        Some(model_id) => {
            if method == Method::GET || method == Method::HEAD {
                return schema(State(state), model_id).await.into_response();
            }
            ("GET, HEAD", false)
        }
        None => ("POST", method == Method::POST),
    };
    if served {
        return submit.call(request, state).await;
    }
    let refusal = ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: format!("/v1/models/{path}"),
    };
    let mut response = refusal.into_response();
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

#[cfg(test)]
mod fingerprint_tests {
    use super::*;
    use kiln_core::params::{ImageSize, OutputFormat, OutputSize, Prompt, RouteOptions};

    /// The fingerprint of a request is what kiln computed before route options became an enum
    /// (the JSON below is that release's `GenerationParams`), so an idempotency key survives
    /// the upgrade.
    #[test]
    fn fingerprints_keep_their_form_across_upgrades() {
        let params = GenerationParams {
            prompt: Prompt::parse("a red fox", 100).unwrap(),
            size: OutputSize::Pixels(ImageSize {
                width: 1024,
                height: 768,
            }),
            seed: 42,
            num_inference_steps: Some(28),
            guidance_scale: None,
            output_format: OutputFormat::Jpeg,
            options: RouteOptions::Flux11Pro { raw: true },
            reference_images: Vec::new(),
        };
        let old = r#"{"prompt":"a red fox","size":{"width":1024,"height":768},"seed":42,"num_inference_steps":28,"guidance_scale":null,"output_format":"jpeg","raw":true,"enable_prompt_expansion":false}"#;
        let route = Route::Flux11ProTextToImage;
        let expected = hex::encode(Sha256::digest(format!("{}\n{old}", route.id())));
        assert_eq!(fingerprint(route, &params).unwrap(), expected);
    }
}
