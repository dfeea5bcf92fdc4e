//! What the SQL backends say alike, so that the two cannot drift apart: the fragments of
//! statements whose text is the same in both dialects, the error a job gets when its workers
//! keep dying, counts per state, and the events of a change.
//!
//! Placeholders differ (`?1` in SQLite, `$1` in PostgreSQL), and an instant may be a bound
//! value or, in PostgreSQL, the server's clock; so a fragment that takes a value is a function
//! of the SQL that yields it.

use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId};
use kiln_core::job::{JobError, JobErrorCode, JobState, Progress};
use kiln_core::store::{JobEvent, JobEvents, JobNotice, StateCounts, StoreError};
use tokio::sync::broadcast;

/// The states a job ends in: only records in these may be purged.
pub(crate) const TERMINAL: &str = "state IN ('succeeded', 'failed', 'cancelled')";

/// A job is visible to its owner while it runs or waits, and after it ends until it expires.
pub(crate) fn visible(now: &str) -> String {
    format!("(state IN ('queued', 'running') OR expires_at > {now})")
}

/// Retention counts from the end of a job: on every terminal transition the expiry moves to
/// "now + (expiry − creation)", the retention the job was submitted with.
pub(crate) fn expire_from_now(now: &str) -> String {
    format!("expires_at = {now} + (expires_at - created_at)")
}

/// A queued job's place in the queue (how many queued jobs are ahead of it by `seq`), as the
/// column `queue_position` of a `SELECT … FROM jobs`; NULL for a job that is not queued.
pub(crate) const QUEUE_POSITION: &str = "CASE WHEN state = 'queued' THEN \
    (SELECT COUNT(*) FROM jobs q WHERE q.state = 'queued' AND q.seq < jobs.seq) END \
    AS queue_position";

/// What a claim writes: a new attempt under a new fencing token, with no progress yet.
pub(crate) fn claim_set(worker: &str, lease_until: &str, now: &str) -> String {
    format!(
        "state = 'running', attempts = attempts + 1, fencing_token = fencing_token + 1, \
         worker = {worker}, lease_expires_at = {lease_until}, started_at = {now}, \
         progress_step = NULL, progress_total = NULL"
    )
}

/// What a release writes. A release is the worker's choice (shutdown), not the job's fault: the
/// attempt it used is given back so that it does not count towards `max_attempts`.
pub(crate) const RELEASE_SET: &str = "state = 'queued', attempts = attempts - 1, worker = NULL, \
    lease_expires_at = NULL, started_at = NULL, progress_step = NULL, progress_total = NULL";

/// The job `id` as long as the lease with fencing token `token` holds it.
pub(crate) fn held(id: &str, token: &str) -> String {
    format!("id = {id} AND fencing_token = {token} AND state = 'running'")
}

pub(crate) const STATE_COUNTS: &str = "SELECT state, COUNT(*) FROM jobs GROUP BY state";

/// Every state with its count (0 for a state no row is in), from [`STATE_COUNTS`]' rows.
pub(crate) fn state_counts(rows: &[(String, i64)]) -> StateCounts {
    let counts = JobState::ALL
        .into_iter()
        .map(|state| {
            let n = rows
                .iter()
                .find(|(s, _)| s == state.as_str())
                .map_or(0, |(_, n)| *n);
            (state, n as u64)
        })
        .collect();
    StateCounts { counts }
}

/// The error of a job given up after its workers stopped responding `max_attempts` times.
pub(crate) fn worker_lost(max_attempts: u32) -> JobError {
    JobError {
        code: JobErrorCode::WorkerLost,
        message: format!(
            "the worker running this job stopped responding {max_attempts} times; \
             the job was given up (try a smaller size, or ask the operator to check the workers)"
        ),
    }
}

/// An `insert_key` that failed: a unique violation is the name's (the token hashes are random
/// and unique in practice), anything else the backend's.
pub(crate) fn duplicate_name_or(
    e: sqlx::Error,
    name: &str,
    backend: fn(sqlx::Error) -> StoreError,
) -> StoreError {
    match e.as_database_error() {
        Some(db) if db.is_unique_violation() => StoreError::DuplicateKeyName(name.to_string()),
        _ => backend(e),
    }
}

/// A job's id, owner and route as stored, read back for an event.
pub(crate) fn event_key(
    (id, owner, route): &(String, String, String),
) -> Result<(RequestId, KeyId, Route), StoreError> {
    Ok((
        id.parse().map_err(|e| StoreError::corrupt("id", e))?,
        KeyId::from_uuid(
            uuid::Uuid::parse_str(owner).map_err(|e| StoreError::corrupt("owner", e))?,
        ),
        route.parse().map_err(|e| StoreError::corrupt("route", e))?,
    ))
}

/// Stored blob keys, read back.
pub(crate) fn blob_keys(keys: Vec<String>) -> Result<Vec<BlobKey>, StoreError> {
    keys.into_iter()
        .map(|k| BlobKey::try_from(k).map_err(|e| StoreError::corrupt("blob key", e)))
        .collect()
}

/// Notices one subscriber may fall behind by before it is told to resync. A burst of submits
/// is the largest source; a few hundred bytes each.
const EVENT_BUFFER: usize = 4096;

/// Where a store publishes its events. Sending never waits and never fails: with nobody
/// subscribed an event simply goes nowhere.
#[derive(Clone)]
pub(crate) struct Events {
    sender: broadcast::Sender<JobNotice>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            sender: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    pub(crate) fn subscribe(&self) -> JobEvents {
        JobEvents::new(self.sender.subscribe())
    }

    pub(crate) fn send(&self, notice: JobNotice) {
        let _ = self.sender.send(notice);
    }

    /// Publishes that job `id` of `owner` on `route` is now in `state`.
    pub(crate) fn changed(
        &self,
        (id, owner, route): (RequestId, KeyId, Route),
        state: JobState,
        progress: Option<Progress>,
    ) {
        self.send(JobNotice::Event(JobEvent {
            id,
            owner,
            route,
            state,
            progress,
        }));
    }
}
