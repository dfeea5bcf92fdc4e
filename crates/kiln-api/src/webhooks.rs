//! Webhooks, as far as the HTTP layer has them: the `webhook` query parameter of a submit, each
//! API key's signing secret (`GET /v1/webhooks/secret`), and the body of the message a
//! dispatcher POSTs when a request ends ([`WebhookBodies`]). Delivering it (the guarded HTTP
//! client, retries) is the worker crate's; the outbox is the store's.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::requests::result_response;
use crate::state::{ApiSettings, AppState};
use crate::wire::{ErrorBody, WebhookMessage, WebhookOutcome, WebhookSecret};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use kiln_core::job::{Job, JobStatus};
use kiln_core::store::{JobStore, StoreError};
use kiln_core::webhook::{webhook_secret, WebhookDelivery, WebhookMessages, WebhookUrl};
use std::collections::HashMap;
use std::sync::Arc;

/// The submit's `webhook` query parameter, parsed once: a URL that can never be delivered to
/// is refused now (422001 naming `webhook`) rather than failing quietly when the job ends.
/// Other query parameters are ignored, as they always were.
pub(crate) fn webhook_param(
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Result<Option<WebhookUrl>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid_query("query", e.body_text(), None))?;
    let Some(raw) = query.get("webhook") else {
        return Ok(None);
    };
    WebhookUrl::parse(raw)
        .map(Some)
        .map_err(|reason| ApiError::invalid_query("webhook", reason.to_string(), Some(raw)))
}

/// The key that signs the webhook messages of the caller's requests (Standard Webhooks:
/// `webhook-signature` is `v1,` and the base64 HMAC-SHA256 of `{webhook-id}.{webhook-timestamp}.{body}`
/// under the base64-decoded part after `whsec_`). One per API key, the same on every call and
/// every node; rotating the server's signing key rotates it.
#[utoipa::path(
    get,
    path = "/v1/webhooks/secret",
    tag = "webhooks",
    responses(
        (status = 200, body = WebhookSecret),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn secret(State(state): State<AppState>, caller: Caller) -> Json<WebhookSecret> {
    Json(WebhookSecret {
        key: webhook_secret(&state.settings.signing_key, caller.id),
    })
}

/// Writes webhook message bodies for the dispatcher: the request's result exactly as the result
/// endpoint answers it, wrapped in fal's `{request_id, status, payload, error}`. Needs only the
/// job store and the settings that sign file URLs, so a node without the public API (a `kiln
/// worker`) can run the dispatcher too.
pub struct WebhookBodies {
    jobs: Arc<dyn JobStore>,
    settings: Arc<ApiSettings>,
}

impl WebhookBodies {
    /// `settings` must carry the public URL and signing key of the API nodes: the payload's
    /// file URLs are built from them and must work there.
    pub fn new(jobs: Arc<dyn JobStore>, settings: ApiSettings) -> Self {
        Self {
            jobs,
            settings: Arc::new(settings),
        }
    }

    /// The bodies for the server `state` serves.
    pub fn from_state(state: &AppState) -> Self {
        Self {
            jobs: state.jobs.clone(),
            settings: state.settings.clone(),
        }
    }

    /// The message announcing `job`'s end.
    fn message(&self, job: Job) -> WebhookMessage {
        let (status, error) = match &job.status {
            JobStatus::Succeeded { .. } => (WebhookOutcome::Ok, None),
            JobStatus::Failed { error, .. } => (WebhookOutcome::Error, Some(error.message.clone())),
            JobStatus::Cancelled { .. } => (WebhookOutcome::Error, Some("cancelled".to_string())),
            // Deliveries are written with the terminal state; a job that is not terminal here
            // would be a store bug, announced as it stands rather than not at all.
            JobStatus::Queued | JobStatus::Running { .. } => (
                WebhookOutcome::Error,
                Some("the request has not ended".to_string()),
            ),
        };
        WebhookMessage {
            request_id: job.id.to_string(),
            status,
            // Without `webhook`: the message is that delivery; its own record would be stale the
            // moment it is sent.
            payload: result_response(&self.settings, job, None),
            error,
        }
    }
}

#[async_trait::async_trait]
impl WebhookMessages for WebhookBodies {
    async fn body(&self, delivery: &WebhookDelivery) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(view) = self.jobs.get(delivery.owner, delivery.request).await? else {
            return Ok(None);
        };
        let message = self.message(view.job);
        let body = serde_json::to_vec(&message).expect("wire types serialize infallibly");
        Ok(Some(body))
    }
}
