//! `/v1/requests/{id}/...`: polling and cancelling a submitted request.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::files::file_url;
use crate::state::AppState;
use crate::wire::{
    CancelResponse, ErrorBody, FailureBody, RequestStatus, ResultOutput, ResultResponse,
    StatusResponse,
};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use kiln_core::ids::{KeyId, MalformedRequestId, RequestId};
use kiln_core::job::{CancelOutcome, JobStatus, JobView};
use kiln_core::report::Chain;

/// The request id in the path. Not a UUID: 400001. A UUID that names no visible request:
/// 404001, whether it is unknown, expired or another token's.
fn request_id(path: Result<Path<String>, PathRejection>) -> Result<RequestId, ApiError> {
    let Path(raw) = path.map_err(|_| MalformedRequestId("(not UTF-8)".into()))?;
    Ok(raw.parse()?)
}

async fn visible_job(state: &AppState, owner: KeyId, id: RequestId) -> Result<JobView, ApiError> {
    state
        .jobs
        .get(owner, id)
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
    let view = visible_job(&state, caller.id, id).await?;
    let job = &view.job;
    let settings = &state.settings;
    Ok(Json(StatusResponse {
        request_id: id.to_string(),
        status: job.state().into(),
        queue_position: view
            .queue_position
            .filter(|_| job.status == JobStatus::Queued),
        status_url: settings.request_url(id, "status"),
        result_url: settings.request_url(id, "result"),
        progress: match job.status {
            JobStatus::Running { progress, .. } => progress.map(Into::into),
            _ => None,
        },
    }))
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
    let (job_state, finished_at) = (job.state(), job.status.finished_at());
    let (output, metadata, error) = match job.status {
        JobStatus::Succeeded { output, .. } => {
            let images: Vec<String> = output
                .images
                .iter()
                .map(|key| file_url(&state.settings, key, job.expires_at))
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
    Ok(Json(ResultResponse {
        request_id: id.to_string(),
        status: job_state.into(),
        output,
        created_at: job.created_at,
        finished_at,
        error,
        metadata,
    }))
}

/// Cancel a queued request. Running and finished requests are not cancellable; cancelling
/// twice is harmless.
#[utoipa::path(
    post,
    path = "/v1/requests/{request_id}/cancel",
    tag = "requests",
    params(("request_id" = String, Path, format = Uuid)),
    responses(
        (status = 202, body = CancelResponse),
        (status = 400, description = "Not a request id (400001)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 404, description = "Unknown, expired or another token's (404001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
) -> Result<(StatusCode, Json<CancelResponse>), ApiError> {
    let id = request_id(path)?;
    let outcome = state
        .jobs
        .cancel(caller.id, id)
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
        // Running or finished: read the state now, it may have moved on since.
        CancelOutcome::NotCancellable => {
            visible_job(&state, caller.id, id).await?.job.state().into()
        }
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
