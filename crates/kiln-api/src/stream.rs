//! `GET /v1/requests/{id}/status/stream`: the status object as Server-Sent Events, one event
//! each time it changes, until the request ends.
//!
//! A stream is a [`Watch`] on the node's [`crate::live::LiveHub`] and the last status object it
//! sent; no task, no timer of its own (axum's keep-alive is the only timer). Woken, it re-reads
//! the job and sends an event only if the object differs from the last one sent.
//!
//! Event ids count per stream: 1, 2, ... A client that reconnects with `Last-Event-ID: N`
//! gets ids from N + 1, and its first event is the current status object (each event is a
//! whole snapshot, so nothing missed needs replaying). A `Last-Event-ID` that is not a number
//! is ignored: the stream starts at 1.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::live::Watch;
use crate::requests::{request_id, status_response, visible_status};
use crate::state::AppState;
use crate::wire::{ErrorBody, RequestStatus, StatusResponse};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use kiln_core::ids::{KeyId, RequestId};
use kiln_core::job::StatusView;
use kiln_core::report::Chain;
use std::convert::Infallible;

const LAST_EVENT_ID: &str = "last-event-id";

/// Follow a request's status as Server-Sent Events.
///
/// Each event has an `id` and, as `data`, the status object (as the status endpoint answers
/// it); one is sent at once and then whenever the object changes (queue position, step,
/// preview, state). A comment line (`:`) comes every 15 s while nothing changes. The stream
/// closes after the event of the terminal state (`completed`, `cancelled`), and when the
/// server shuts down (reconnect). Ids count per stream from 1; reconnecting with
/// `Last-Event-ID: N` continues at N + 1 with the current status object. A `Last-Event-ID`
/// that is not a non-negative integer is ignored.
#[utoipa::path(
    get,
    path = "/v1/requests/{request_id}/status/stream",
    tag = "requests",
    params(
        ("request_id" = String, Path, format = Uuid),
        ("Last-Event-ID" = Option<String>, Header,
            description = "The id of the last event received: the stream resumes at the next id, with the current status; a value that is not a number is ignored (the stream starts at 1)"),
    ),
    responses(
        (status = 200, description = "Events, each `id: N` and `data: <status object>`", content_type = "text/event-stream", body = StatusResponse),
        (status = 400, description = "Not a request id (400001)", body = ErrorBody),
        (status = 401, description = "Missing or invalid token (401001)", body = ErrorBody),
        (status = 404, description = "Unknown, expired or another token's (404001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub(crate) async fn status_stream(
    State(state): State<AppState>,
    caller: Caller,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = request_id(path)?;
    // Registered before the first read, so that no change after it goes unseen.
    let watch = state.live.watch(id);
    let view = visible_status(&state, caller.id, id).await?;
    let next_id = headers
        .get(LAST_EVENT_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .and_then(|last| last.checked_add(1))
        .unwrap_or(1);
    let keep_alive = KeepAlive::new().interval(state.settings.stream_keep_alive);
    let follower = Follower {
        state,
        owner: caller.id,
        id,
        watch,
        first: Some(view),
        last_sent: None,
        next_id,
        done: false,
    };
    let sse = Sse::new(events(follower)).keep_alive(keep_alive);
    // nginx buffers responses unless told not to; events must go out as they come.
    let no_buffering = (
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(([no_buffering], sse).into_response())
}

/// One stream's state between events.
struct Follower {
    state: AppState,
    owner: KeyId,
    id: RequestId,
    watch: Watch,
    /// The job as the handler read it, for the first event.
    first: Option<StatusView>,
    /// The JSON of the last event's data.
    last_sent: Option<String>,
    next_id: u64,
    /// The terminal event has gone out (or the stream must end).
    done: bool,
}

fn events(follower: Follower) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(follower, |mut follower| async move {
        let event = follower.next_event().await?;
        Some((Ok(event), follower))
    })
}

impl Follower {
    /// The next event to send, waiting for a change; `None` ends the stream.
    async fn next_event(&mut self) -> Option<Event> {
        if self.done {
            return None;
        }
        loop {
            let view = match self.first.take() {
                Some(view) => view,
                None => {
                    self.watch.changed().await;
                    self.read().await?
                }
            };
            let status = status_response(&self.state.settings, &view);
            let terminal = matches!(
                status.status,
                RequestStatus::Completed | RequestStatus::Cancelled
            );
            self.watch
                .set_in_queue(status.status == RequestStatus::InQueue);
            // A draining node sends what it has and ends: the client reconnects elsewhere.
            self.done = terminal || self.state.is_draining();
            let data = serde_json::to_string(&status).expect("a status object serializes");
            if self.last_sent.as_ref() != Some(&data) {
                let event = Event::default().id(self.next_id.to_string()).data(&data);
                self.next_id += 1;
                self.last_sent = Some(data);
                return Some(event);
            }
            if self.done {
                return None;
            }
        }
    }

    /// The job now; `None` (ending the stream) once it is gone (expired) or unreadable: the
    /// client's reconnect tries again, and a failing store is not retried here in a loop.
    async fn read(&self) -> Option<StatusView> {
        match self.state.jobs.status(self.owner, self.id).await {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(error = %Chain(&error), request_id = %self.id, "a status stream could not read its job; ending it");
                None
            }
        }
    }
}
