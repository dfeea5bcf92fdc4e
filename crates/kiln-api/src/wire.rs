//! The JSON bodies of the API (the input schemas are in [`crate::inputs`]). Domain types never
//! go on the wire directly: a change in `kiln-core` cannot silently change the protocol.

use crate::inputs::Violation;
use kiln_core::catalog::{ModelFamily, Route};
use kiln_core::job::{CancelOutcome, JobErrorCode, JobState, OutputMetadata, Progress};
use kiln_core::params::OutputFormat;
use kiln_core::webhook::{AttemptOutcome, DeliveryState, WebhookRecord};
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

/// Every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// Six digits: the HTTP status, then a number within it (422001: input does not match the
    /// model's schema).
    #[schema(example = 422001)]
    pub error_code: u32,
    pub error_message: String,
    /// One entry per field at fault (empty when no field is).
    pub detail: Vec<Violation>,
}

/// A submit's answer: where to poll.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubmitResponse {
    #[schema(format = Uuid)]
    pub request_id: String,
    #[schema(format = "uri")]
    pub status_url: String,
    #[schema(format = "uri")]
    pub result_url: String,
    #[schema(format = "uri")]
    pub cancel_url: String,
}

/// A `Prefer: wait` submit's answer when the request ended in time: its result object (as the
/// result endpoint answers it) with the submit's three URLs.
#[derive(Debug, Serialize, ToSchema)]
pub struct WaitedResponse {
    #[serde(flatten)]
    pub result: ResultResponse,
    #[schema(format = "uri")]
    pub status_url: String,
    #[schema(format = "uri")]
    pub result_url: String,
    #[schema(format = "uri")]
    pub cancel_url: String,
}

/// A request's state in the status endpoint's vocabulary (a failed request reads `completed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    InQueue,
    InProgress,
    Completed,
    Cancelled,
}

impl From<JobState> for RequestStatus {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued => RequestStatus::InQueue,
            JobState::Running => RequestStatus::InProgress,
            JobState::Succeeded | JobState::Failed => RequestStatus::Completed,
            JobState::Cancelled => RequestStatus::Cancelled,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StatusResponse {
    #[schema(format = Uuid)]
    pub request_id: String,
    pub status: RequestStatus,
    /// 0 = next to run; only while `in_queue`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    #[schema(format = "uri")]
    pub status_url: String,
    #[schema(format = "uri")]
    pub result_url: String,
    /// Denoising steps done; only while `in_progress`, once the engine has reported a step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<StepProgress>,
    /// A small JPEG (at most 256 px on its long side) of the image as it stands at the latest
    /// reported step; only while `in_progress`, once the worker has stored one. Like result
    /// URLs it needs no token; each preview has a URL of its own, and an old one stops working
    /// once a newer preview replaces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = "uri")]
    pub preview_url: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StepProgress {
    pub step: u32,
    pub total: u32,
}

impl From<Progress> for StepProgress {
    fn from(p: Progress) -> Self {
        StepProgress {
            step: p.step,
            total: p.total,
        }
    }
}

/// A request's state in the result endpoint's vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    InQueue,
    InProgress,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<JobState> for ResultStatus {
    fn from(state: JobState) -> Self {
        match state {
            JobState::Queued => ResultStatus::InQueue,
            JobState::Running => ResultStatus::InProgress,
            JobState::Succeeded => ResultStatus::Succeeded,
            JobState::Failed => ResultStatus::Failed,
            JobState::Cancelled => ResultStatus::Cancelled,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResultResponse {
    #[schema(format = Uuid)]
    pub request_id: String,
    pub status: ResultStatus,
    /// Only when `succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<ResultOutput>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the request ended (succeeded, failed or cancelled).
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// Only when `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureBody>,
    /// The settings applied (after defaults and prompt expansion); only when `succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ResultMetadata>,
    /// The announcement of the request's end to the submit's `webhook`; only when the submit
    /// named one and the request has ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookStatus>,
}

/// `GET /v1/requests`: a page of the token's own requests, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RequestList {
    pub requests: Vec<ListedRequest>,
    /// Where the next (older) page starts: send it back as `before`, as it is. `null` when no
    /// older request is kept.
    #[schema(required = true, pattern = "^[0-9]{1,19}$")]
    pub next: Option<String>,
}

/// One request as a listing shows it: what was asked (model and input) and how it stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListedRequest {
    #[schema(format = Uuid)]
    pub request_id: String,
    /// The model id, as `GET /v1/models` lists it.
    #[schema(example = "blackforestlabs/flux-2/flex/text-to-image")]
    pub model: &'static str,
    pub status: ResultStatus,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the request ended (succeeded, failed or cancelled).
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub finished_at: Option<OffsetDateTime>,
    /// The input, as the model's schema (`GET /v1/models/{model_id}/schema`) has it, with
    /// every field written out (defaults included): submitted to `model` again, it makes the
    /// same request. An edit's images are their URLs; one sent as a `data:` URI is a signed
    /// file URL of the server's copy while the request waits or runs, and is left out once it
    /// has ended (the copy is deleted then; `input_omitted` names it).
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// What `input` leaves out, by its place in the request as sent (`image_urls[0]`); absent
    /// when nothing is. Put it back before submitting `input` again.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub input_omitted: Vec<String>,
    /// Only when `succeeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<ResultOutput>,
    /// Only when `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<FailureBody>,
    #[schema(format = "uri")]
    pub status_url: String,
    #[schema(format = "uri")]
    pub result_url: String,
}

/// Where the announcement of a request's end stands.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookStatus {
    #[schema(format = "uri")]
    pub url: String,
    pub status: WebhookDeliveryStatus,
    /// Every attempt so far, oldest first.
    pub attempts: Vec<WebhookAttemptBody>,
}

/// `pending`: waiting for its next attempt; `delivered`: the receiver answered 2xx;
/// `failed`: not delivered before the retries ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookDeliveryStatus {
    Pending,
    Delivered,
    Failed,
}

impl From<DeliveryState> for WebhookDeliveryStatus {
    fn from(state: DeliveryState) -> Self {
        match state {
            DeliveryState::Pending => WebhookDeliveryStatus::Pending,
            DeliveryState::Delivered => WebhookDeliveryStatus::Delivered,
            DeliveryState::Failed => WebhookDeliveryStatus::Failed,
        }
    }
}

/// One try at delivering the announcement: the receiver's HTTP status, or why none came.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAttemptBody {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<WebhookRecord> for WebhookStatus {
    fn from(record: WebhookRecord) -> Self {
        let attempts = record
            .attempts
            .into_iter()
            .map(|attempt| {
                let (http_status, error) = match attempt.outcome {
                    AttemptOutcome::Status(code) => (Some(code), None),
                    AttemptOutcome::Error(reason) => (None, Some(reason)),
                };
                WebhookAttemptBody {
                    at: attempt.at,
                    http_status,
                    error,
                }
            })
            .collect();
        WebhookStatus {
            url: record.url.to_string(),
            status: record.state.into(),
            attempts,
        }
    }
}

/// What a webhook receiver is POSTed when a request ends (fal's shape).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookMessage {
    #[schema(format = Uuid)]
    pub request_id: String,
    pub status: WebhookOutcome,
    /// The result object, as `GET /v1/requests/{request_id}/result` answers it.
    pub payload: ResultResponse,
    /// Why the request did not succeed: the failure's message, or `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `OK` when the request succeeded; `ERROR` when it failed or was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum WebhookOutcome {
    #[serde(rename = "OK")]
    Ok,
    #[serde(rename = "ERROR")]
    Error,
}

/// `GET /v1/webhooks/secret`: the key that signs this API key's webhook messages.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookSecret {
    /// `whsec_` and the base64 of 32 bytes; the signing key is the base64 part, decoded
    /// (Standard Webhooks).
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub key: String,
}

/// The generated files. Their URLs need no token and stop working when the request expires.
#[derive(Debug, Serialize, ToSchema)]
pub struct ResultOutput {
    /// The first (here: the only) image.
    #[schema(format = "uri")]
    pub image: String,
    /// Every image.
    #[schema(format = "uri")]
    pub images: Vec<String>,
}

/// Why a request failed.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailureBody {
    /// A stable name: `invalid_input`, `engine_unavailable`, `engine_failed`, `worker_lost`,
    /// `storage_failed`, `timed_out`.
    #[schema(value_type = String, example = "engine_failed")]
    pub code: JobErrorCode,
    pub message: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResultMetadata {
    /// The model id.
    #[schema(value_type = String, example = "blackforestlabs/flux-2/flex/text-to-image")]
    pub model: Route,
    pub seed: u32,
    pub width: u32,
    pub height: u32,
    pub num_inference_steps: u32,
    /// The guidance applied, when the model takes one.
    pub guidance: Option<f32>,
    #[schema(value_type = String, example = "jpeg")]
    pub output_format: OutputFormat,
    /// The prompt the model saw (after expansion, if any).
    pub prompt: String,
    pub timings_ms: TimingsMs,
    /// Which checkpoint and engine made the image.
    pub engine: String,
    /// Plain statements about what was applied (raw mode, prompt expansion skipped, ...).
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TimingsMs {
    /// From submit to the start of the run that finished it.
    pub queued: u64,
    pub inference: u64,
    pub encode_and_store: u64,
}

impl From<OutputMetadata> for ResultMetadata {
    fn from(m: OutputMetadata) -> Self {
        ResultMetadata {
            model: m.model,
            seed: m.seed,
            width: m.width,
            height: m.height,
            num_inference_steps: m.num_inference_steps,
            guidance: m.guidance,
            output_format: m.output_format,
            prompt: m.prompt,
            timings_ms: TimingsMs {
                queued: m.timings_ms.queued,
                inference: m.timings_ms.inference,
                encode_and_store: m.timings_ms.encode_and_store,
            },
            engine: m.engine,
            notes: m.notes,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CancelResponse {
    #[schema(format = Uuid)]
    pub request_id: String,
    /// The state after the call, in the status endpoint's vocabulary.
    pub status: RequestStatus,
    pub outcome: CancelResult,
}

/// `cancelled`: it was queued and is now cancelled (or already was). `cancellation_requested`:
/// it is running and a forced cancel (`force=true`) was asked for; it ends `cancelled` at the
/// next step boundary. `not_cancellable`: it is running (without `force`) or finished; nothing
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelResult {
    Cancelled,
    CancellationRequested,
    NotCancellable,
}

impl From<CancelOutcome> for CancelResult {
    fn from(outcome: CancelOutcome) -> Self {
        match outcome {
            CancelOutcome::Cancelled => CancelResult::Cancelled,
            CancelOutcome::CancellationRequested => CancelResult::CancellationRequested,
            CancelOutcome::NotCancellable => CancelResult::NotCancellable,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelSummary>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelSummary {
    #[schema(example = "blackforestlabs/flux-2/flex/text-to-image")]
    pub id: &'static str,
    pub title: &'static str,
    #[schema(value_type = String, example = "flux2")]
    pub family: ModelFamily,
    /// Whether this server has an engine for it (submits to the others are refused).
    pub served: bool,
    #[schema(format = "uri")]
    pub schema_url: String,
}

/// A model's input and output schemas (JSON Schema).
#[derive(Serialize, ToSchema)]
pub struct ModelSchemas {
    pub model_id: &'static str,
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    #[schema(value_type = Object)]
    pub output: utoipa::openapi::RefOr<utoipa::openapi::Schema>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `ready`, `draining`, `store_unavailable` or `blob_store_unavailable`.
    pub status: &'static str,
}
