//! `Prefer: wait=N` on submit (Replicate's synchronous mode): the submit holds its answer up to
//! N seconds and, if the request ends meanwhile, answers with its result object.
//!
//! The header follows RFC 7240: preferences are comma-separated, each `name[=value]` with
//! `;`-parameters; names are case-insensitive and unknown preferences are ignored. Of ours,
//! `wait` must be a whole number of seconds from 1 to 60 (422001 otherwise, as Replicate refuses
//! more than 60); a bare `wait` means 60. When honoured, the answer says
//! `Preference-Applied: wait=N`.

use crate::error::ApiError;
use crate::requests::{result_response, visible_job, webhook_record};
use crate::state::AppState;
use crate::wire::{SubmitResponse, WaitedResponse};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiln_core::ids::{KeyId, RequestId};
use kiln_core::job::Job;
use std::time::Duration;

/// The longest a submit may wait.
pub(crate) const MAX_WAIT_S: u64 = 60;

const PREFERENCE_APPLIED: &str = "preference-applied";

/// The seconds of the first `wait` preference among the `Prefer` headers, if there is one.
pub(crate) fn wait_preference(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let preferences = headers
        .get_all(HeaderName::from_static("prefer"))
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','));
    for preference in preferences {
        let name_and_value = preference.split(';').next().unwrap_or_default();
        let (name, value) = match name_and_value.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (name_and_value.trim(), None),
        };
        if !name.eq_ignore_ascii_case("wait") {
            continue;
        }
        let Some(value) = value else {
            return Ok(Some(MAX_WAIT_S));
        };
        return match value.parse::<u64>() {
            Ok(seconds) if (1..=MAX_WAIT_S).contains(&seconds) => Ok(Some(seconds)),
            _ => Err(ApiError::InvalidPreferWait(
                value.chars().take(20).collect(),
            )),
        };
    }
    Ok(None)
}

/// The submit's answer after waiting up to `wait_s` for request `id` to end: its result object
/// with the three URLs if it did, `submitted` otherwise (also when the node begins draining
/// meanwhile: a shutdown does not wait for it).
pub(crate) async fn answer_after_wait(
    state: &AppState,
    owner: KeyId,
    id: RequestId,
    wait_s: u64,
    submitted: SubmitResponse,
) -> Result<Response, ApiError> {
    // The operator's cap, if lower than the client's wish, is what is honoured (and said so).
    let wait_s = wait_s.min(state.settings.max_prefer_wait.as_secs()).max(1);
    let ended = wait_for_end(state, owner, id, Duration::from_secs(wait_s)).await?;
    // Honoured unless a drain cut the wait short.
    let applied = ended.is_some() || !state.is_draining();
    let mut response = match ended {
        Some(job) => {
            let webhook = webhook_record(state, &job).await?;
            Json(WaitedResponse {
                result: result_response(&state.settings, job, webhook),
                status_url: submitted.status_url,
                result_url: submitted.result_url,
                cancel_url: submitted.cancel_url,
            })
            .into_response()
        }
        None => Json(submitted).into_response(),
    };
    if applied {
        let value = HeaderValue::from_str(&format!("wait={wait_s}")).expect("ASCII");
        response
            .headers_mut()
            .insert(HeaderName::from_static(PREFERENCE_APPLIED), value);
    }
    Ok(response)
}

/// The job once it has ended, or `None` after `wait` (or once the node drains). Woken by the
/// node's hub, never polling: each wake is one read of the job.
async fn wait_for_end(
    state: &AppState,
    owner: KeyId,
    id: RequestId,
    wait: Duration,
) -> Result<Option<Job>, ApiError> {
    let deadline = tokio::time::Instant::now() + wait;
    // Registered before the read: an end between the enqueue and now is seen by the read, one
    // after it wakes the watch.
    let watch = state.live.watch(id);
    loop {
        let job = visible_job(state, owner, id).await?.job;
        if job.state().is_terminal() {
            return Ok(Some(job));
        }
        if state.is_draining() {
            return Ok(None);
        }
        if tokio::time::timeout_at(deadline, watch.changed())
            .await
            .is_err()
        {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_of(values: &[&str]) -> Result<Option<u64>, ApiError> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("prefer", HeaderValue::from_str(value).unwrap());
        }
        wait_preference(&headers)
    }

    #[test]
    fn wait_is_read_among_other_preferences() {
        assert_eq!(wait_of(&[]).unwrap(), None);
        assert_eq!(wait_of(&["wait=5"]).unwrap(), Some(5));
        assert_eq!(wait_of(&["respond-async, Wait = 60"]).unwrap(), Some(60));
        assert_eq!(
            wait_of(&["handling=lenient", "wait=\"7\"; x=y"]).unwrap(),
            Some(7)
        );
        assert_eq!(wait_of(&["wait"]).unwrap(), Some(60));
        assert_eq!(wait_of(&["return=minimal"]).unwrap(), None);
        assert_eq!(
            wait_of(&["wait=3, wait=61"]).unwrap(),
            Some(3),
            "the first wins"
        );
    }

    #[test]
    fn wait_outside_1_to_60_seconds_is_refused() {
        for bad in [
            "wait=61",
            "wait=0",
            "wait=-1",
            "wait=1.5",
            "wait=soon",
            "wait=",
        ] {
            let error = wait_of(&[bad]).unwrap_err();
            assert_eq!(error.status_and_code().1, 422001, "{bad}");
        }
    }
}
