//! What the SQL backends say alike, so that the two cannot drift apart: the fragments of
//! statements whose text is the same in both dialects, the error a job gets when its workers
//! keep dying, counts per state, the events of a change, and the webhook outbox's statements.
//!
//! Placeholders differ (`?1` in SQLite, `$1` in PostgreSQL), and an instant may be a bound
//! value or, in PostgreSQL, the server's clock; so a fragment that takes a value is a function
//! of the SQL that yields it.

use crate::record::{ListedRow, DELIVERY_COLUMNS, JOB_COLUMNS};
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId};
use kiln_core::job::{
    CancelMode, CancelOutcome, JobError, JobErrorCode, JobState, JobStatus, JobView, Progress,
};
use kiln_core::store::{
    JobCursor, JobEvent, JobEvents, JobNotice, JobPage, StateCounts, StoreError,
};
use kiln_core::webhook::{AfterAttempt, DeliveryState};
use tokio::sync::broadcast;

/// The states a job ends in: only records in these may be purged.
pub(crate) const TERMINAL: &str = "state IN ('succeeded', 'failed', 'cancelled')";

/// A job is visible to its owner while it runs or waits, and after it ends until it expires.
pub(crate) fn visible(now: &str) -> String {
    format!("(state IN ('queued', 'running') OR expires_at > {now})")
}

/// Up to `limit` of `owner`'s jobs visible at `now`, newest first, submitted before position
/// `before`: a backwards walk of the (owner, seq) index from `before`, each row with its
/// position ([`ListedRow`]). Callers ask one row more than the page shows ([`page_limit`]), to
/// learn whether an older page exists, and bind `before` to [`NO_CURSOR`] for the first page
/// (an `IS NULL` alternative would cost the index its range).
pub(crate) fn owned_page(owner: &str, before: &str, now: &str, limit: &str) -> String {
    format!(
        "SELECT {JOB_COLUMNS}, seq FROM jobs \
         WHERE owner = {owner} AND seq < {before} AND {} \
         ORDER BY seq DESC LIMIT {limit}",
        visible(now)
    )
}

/// `before` for a first page: past every position.
pub(crate) const NO_CURSOR: i64 = i64::MAX;

/// The rows [`owned_page`] asks for to show `limit`: one more.
pub(crate) fn page_limit(limit: u32) -> i64 {
    i64::from(limit) + 1
}

/// The page of `limit` jobs that [`owned_page`]'s `rows` make: a row beyond `limit` means an
/// older page exists, which starts after the page's last job.
pub(crate) fn job_page(mut rows: Vec<ListedRow>, limit: u32) -> Result<JobPage, StoreError> {
    let more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    let next = rows
        .last()
        .filter(|_| more)
        .map(|row| JobCursor::new(row.seq));
    let jobs = rows
        .into_iter()
        .map(|row| row.job.into_job())
        .collect::<Result<_, _>>()?;
    Ok(JobPage { jobs, next })
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

/// What a claim writes: a new attempt under a new fencing token, with no progress yet. The last
/// attempt's preview stays until this attempt's first one replaces it: the record is what
/// references its blob (the worker deletes a preview it replaced, purge the last one), so
/// clearing it here would leave the file behind.
pub(crate) fn claim_set(worker: &str, lease_until: &str, now: &str) -> String {
    format!(
        "state = 'running', attempts = attempts + 1, fencing_token = fencing_token + 1, \
         worker = {worker}, lease_expires_at = {lease_until}, started_at = {now}, \
         progress_step = NULL, progress_total = NULL"
    )
}

/// A running job whose lease ran out before `now` and may be claimed again. One with a forced
/// cancel pending never is: its owner asked it to stop, so `fail_abandoned` ends it `cancelled`
/// instead ([`CANCEL_ABANDONED`]).
pub(crate) fn reclaimable(now: &str) -> String {
    format!("state = 'running' AND lease_expires_at < {now} AND NOT cancel_requested")
}

/// A running job whose lease ran out before `now` while a forced cancel was pending: its worker
/// died before honouring it, and nobody will; `fail_abandoned` ends it `cancelled`.
pub(crate) fn cancel_abandoned(now: &str) -> String {
    format!("state = 'running' AND lease_expires_at < {now} AND cancel_requested")
}

/// What a heartbeat writes: the lease's new end and the report. A report without progress or a
/// preview keeps the last one (a worker reports them once it has them).
pub(crate) fn heartbeat_set(
    lease_until: &str,
    step: &str,
    total: &str,
    key: &str,
    preview_step: &str,
) -> String {
    format!(
        "lease_expires_at = {lease_until}, progress_step = COALESCE({step}, progress_step), \
         progress_total = COALESCE({total}, progress_total), \
         preview_key = COALESCE({key}, preview_key), \
         preview_step = COALESCE({preview_step}, preview_step)"
    )
}

/// What a release writes. A release is the worker's choice (shutdown), not the job's fault: the
/// attempt it used is given back so that it does not count towards `max_attempts`.
pub(crate) const RELEASE_SET: &str = "state = 'queued', attempts = attempts - 1, worker = NULL, \
    lease_expires_at = NULL, started_at = NULL, progress_step = NULL, progress_total = NULL, \
    preview_key = NULL, preview_step = NULL";

/// Cancels the queued job `id` of `owner` at `now`; returns its route when it did.
pub(crate) fn cancel_queued(now: &str, id: &str, owner: &str) -> String {
    format!(
        "UPDATE jobs SET state = 'cancelled', finished_at = {now}, {} \
         WHERE id = {id} AND owner = {owner} AND state = 'queued' RETURNING route",
        expire_from_now(now)
    )
}

/// Asks the running job `id` of `owner` to stop; returns its route when that is news (a
/// repeated request changes nothing and is no event).
pub(crate) fn request_cancel(id: &str, owner: &str) -> String {
    format!(
        "UPDATE jobs SET cancel_requested = TRUE \
         WHERE id = {id} AND owner = {owner} AND state = 'running' AND NOT cancel_requested \
         RETURNING route"
    )
}

/// What a cancel that changed nothing reports, from the job as it stands.
pub(crate) fn cancel_outcome(view: &JobView, mode: CancelMode) -> CancelOutcome {
    match (&view.job.status, mode) {
        (JobStatus::Cancelled { .. }, _) => CancelOutcome::Cancelled,
        (
            JobStatus::Running {
                cancel_requested: true,
                ..
            },
            CancelMode::Force,
        ) => CancelOutcome::CancellationRequested,
        _ => CancelOutcome::NotCancellable,
    }
}

/// The webhook outbox's row for job `id`, which has just ended at `now`: written in the
/// transaction of the terminal transition, and only for a job that named a webhook. A job ends
/// once, so the conflict clause only guards against a double write, never drops news.
pub(crate) fn announce(now: &str, id: &str) -> String {
    format!(
        "INSERT INTO webhook_deliveries \
           (request_id, owner, url, state, due_at, claim_token, attempts, created_at) \
         SELECT id, owner, webhook_url, 'pending', {now}, 0, '[]', {now} FROM jobs \
         WHERE id = {id} AND webhook_url IS NOT NULL \
         ON CONFLICT (request_id) DO NOTHING"
    )
}

/// Whether the blob `key` is referenced by a job still kept at `now`: as an output or stored
/// input (`job_blobs`), or as its current preview.
pub(crate) fn live_blob(key: &str, now: &str) -> String {
    format!(
        "SELECT 1 FROM job_blobs b JOIN jobs j ON j.id = b.job_id \
           WHERE b.blob_key = {key} AND j.expires_at > {now} \
         UNION ALL SELECT 1 FROM jobs WHERE preview_key = {key} AND expires_at > {now}"
    )
}

/// Webhook deliveries whose next attempt may start at `now`.
pub(crate) fn due(now: &str) -> String {
    format!("state = 'pending' AND due_at <= {now}")
}

/// What recording an attempt writes, after `append` (the dialect's way of adding the attempt to
/// the JSON list): the delivery's `state` and `retry_in` (milliseconds, NULL when no attempt
/// follows; `due_at` is then NULL too), bound as [`after_attempt`] gives them.
pub(crate) fn attempt_set(append: &str, now: &str, state: &str, retry_in: &str) -> String {
    format!("attempts = {append}, state = {state}, due_at = {now} + {retry_in}")
}

/// The delivery's state and the wait before its next attempt, after `next`.
pub(crate) fn after_attempt(next: AfterAttempt) -> (&'static str, Option<i64>) {
    match next {
        AfterAttempt::Delivered => (DeliveryState::Delivered.as_str(), None),
        AfterAttempt::RetryIn(wait) => (
            DeliveryState::Pending.as_str(),
            Some(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2)),
        ),
        AfterAttempt::GiveUp => (DeliveryState::Failed.as_str(), None),
    }
}

/// The outbox row of request `id` of `owner`, as long as its job is visible at `now`.
pub(crate) fn webhook_record(id: &str, owner: &str, now: &str) -> String {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries w \
         WHERE w.request_id = {id} AND w.owner = {owner} \
           AND EXISTS (SELECT 1 FROM jobs WHERE jobs.id = w.request_id AND {})",
        visible(now)
    )
}

/// A claimed delivery's write, unless the claim `token` was taken over or it has ended.
pub(crate) fn claimed(request: &str, token: &str) -> String {
    format!("request_id = {request} AND claim_token = {token} AND state = 'pending'")
}

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
