//! `/v1/requests/{id}/...`: polling and cancelling a submitted request.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::files::file_url;
use crate::state::{ApiSettings, AppState};
use crate::wire::{
    CancelResponse, ErrorBody, FailureBody, RequestStatus, ResultOutput, ResultResponse,
    StatusResponse,
};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use kiln_core::ids::{KeyId, MalformedRequestId, RequestId};
use kiln_core::job::{CancelMode, CancelOutcome, Job, JobStatus, JobView, Stage, StatusView};
use kiln_core::report::Chain;
use kiln_core::webhook::WebhookRecord;
use std::collections::HashMap;

/// The request id in the path. Not a UUID: 400001. A UUID that names no visible request:
/// 404001, whether it is unknown, expired or another token's.
pub(crate) fn request_id(path: Result<Path<String>, PathRejection>) -> Result<RequestId, ApiError> {
    let Path(raw) = path.map_err(|_| MalformedRequestId("(not UTF-8)".into()))?;
    Ok(raw.parse()?)
}

pub(crate) async fn visible_job(
    state: &AppState,
    owner: KeyId,
    id: RequestId,
) -> Result<JobView, ApiError> {
    state
        .jobs
        .get(owner, id)
        .await?
        .ok_or(ApiError::RequestNotFound)
}

/// What a status poll shows of the job, read without its parameters or output.
pub(crate) async fn visible_status(
    state: &AppState,
    owner: KeyId,
    id: RequestId,
) -> Result<StatusView, ApiError> {
    state
        .jobs
        .status(owner, id)
        .await?
        .ok_or(ApiError::RequestNotFound)
}

/// Where a request stands.
#[utoipa::path(
    get,
    path = "/v1/requests/{request_id}/status",
    tag = "requests",
    params(("request_id" = String, Path, format = Uuid)),
    responses(
        (status = 200, body = StatusResponse),
        (status = 400, description = "Not a request id (400001)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 404, description = "Unknown, expired or another token's (404001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn status(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<StatusResponse>, ApiError> {
    let id = request_id(path)?;
    let view = visible_status(&state, caller.id, id).await?;
    Ok(Json(status_response(&state.settings, &view)))
}

/// The status object, as the status endpoint and every event of its stream carry it.
pub(crate) fn status_response(settings: &ApiSettings, view: &StatusView) -> StatusResponse {
    let id = view.id;
    let (queue_position, progress, preview_url) = match &view.stage {
        Stage::Queued { position } => (Some(*position), None, None),
        Stage::Running { progress, preview } => (
            None,
            progress.map(Into::into),
            preview
                .as_ref()
                .map(|preview| file_url(settings, &preview.key, view.expires_at)),
        ),
        Stage::Succeeded | Stage::Failed | Stage::Cancelled => (None, None, None),
    };
    StatusResponse {
        request_id: id.to_string(),
        status: view.stage.state().into(),
        queue_position,
        status_url: settings.request_url(id, "status"),
        result_url: settings.request_url(id, "result"),
        progress,
        preview_url,
    }
}

/// A request's outcome; before it ends, its current state (clients may poll here).
#[utoipa::path(
    get,
    path = "/v1/requests/{request_id}/result",
    tag = "requests",
    params(("request_id" = String, Path, format = Uuid)),
    responses(
        (status = 200, body = ResultResponse),
        (status = 400, description = "Not a request id (400001)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 404, description = "Unknown, expired or another token's (404001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn result(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ResultResponse>, ApiError> {
    let id = request_id(path)?;
    let job = visible_job(&state, caller.id, id).await?.job;
    let webhook = webhook_record(&state, &job).await?;
    Ok(Json(result_response(&state.settings, job, webhook)))
}

/// The announcement of `job`'s end, when its submit named a webhook: only then is the outbox
/// asked, so an ordinary result costs no extra query.
pub(crate) async fn webhook_record(
    state: &AppState,
    job: &Job,
) -> Result<Option<WebhookRecord>, ApiError> {
    if job.webhook.is_none() {
        return Ok(None);
    }
    Ok(state.jobs.webhook_record(job.owner, job.id).await?)
}

/// The result object, as the result endpoint, the webhook message's `payload` and a
/// `Prefer: wait` submit all carry it. File URLs are signed afresh on every call.
pub(crate) fn result_response(
    settings: &ApiSettings,
    job: Job,
    webhook: Option<WebhookRecord>,
) -> ResultResponse {
    let (job_state, finished_at) = (job.state(), job.status.finished_at());
    let (output, metadata, error) = match job.status {
        JobStatus::Succeeded { output, .. } => {
            let images: Vec<String> = output
                .images
                .iter()
                .map(|key| file_url(settings, key, job.expires_at))
                .collect();
            let output_urls = images
                .first()
                .cloned()
                .map(|image| ResultOutput { image, images });
            (output_urls, Some(output.metadata.into()), None)
        }
        JobStatus::Failed { error, .. } => (
            None,
            None,
            Some(FailureBody {
                code: error.code,
                message: error.message,
            }),
        ),
        _ => (None, None, None),
    };
    ResultResponse {
        request_id: job.id.to_string(),
        status: job_state.into(),
        output,
        created_at: job.created_at,
        finished_at,
        error,
        metadata,
        webhook: webhook.map(Into::into),
    }
}

/// Cancel a request. A queued one is cancelled; a running one only with `force=true`, which
/// asks its worker to stop at the next step boundary (the request then ends `cancelled`);
/// finished ones are not cancellable. Cancelling twice is harmless.
#[utoipa::path(
    post,
    path = "/v1/requests/{request_id}/cancel",
    tag = "requests",
    params(
        ("request_id" = String, Path, format = Uuid),
        ("force" = Option<bool>, Query,
            description = "Also stop a running request, at its next denoising step (`cancellation_requested`); without it (or `false`), a running request is `not_cancellable`"),
    ),
    responses(
        (status = 202, body = CancelResponse),
        (status = 400, description = "Not a request id (400001)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 404, description = "Unknown, expired or another token's (404001)", body = ErrorBody),
        (status = 422, description = "`force` is neither `true` nor `false` (422001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<(StatusCode, Json<CancelResponse>), ApiError> {
    let id = request_id(path)?;
    let mode = cancel_mode(query)?;
    let outcome = state
        .jobs
        .cancel(caller.id, id, mode)
        .await?
        .ok_or(ApiError::RequestNotFound)?;
    let status = match outcome {
        CancelOutcome::Cancelled => {
            // No worker will read its stored inline images now.
            let job = visible_job(&state, caller.id, id).await?.job;
            for key in job.params.stored_images() {
                if let Err(error) = state.blobs.delete(&key).await {
                    tracing::warn!(error = %Chain(&error), blob = %key, "could not delete a stored reference image");
                }
            }
            RequestStatus::Cancelled
        }
        // Still running until its worker honours the request at a step boundary.
        CancelOutcome::CancellationRequested => RequestStatus::InProgress,
        // Running or finished: read the state now, it may have moved on since.
        CancelOutcome::NotCancellable => visible_status(&state, caller.id, id)
            .await?
            .stage
            .state()
            .into(),
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(CancelResponse {
            request_id: id.to_string(),
            status,
            outcome: outcome.into(),
        }),
    ))
}

/// `?force=true` forces; `false` or none cancels only a queued request. Anything else is
/// refused rather than read as `false`: a client that meant to force should learn it did not.
fn cancel_mode(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<CancelMode, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid_query("query", e.body_text(), None))?;
    match query.get("force").map(String::as_str) {
        None | Some("false") => Ok(CancelMode::QueuedOnly),
        Some("true") => Ok(CancelMode::Force),
        Some(other) => Err(ApiError::invalid_query(
            "force",
            "must be true or false",
            Some(other),
        )),
    }
}
