//! The row forms of jobs and API keys and their conversion into the domain's types, shared by
//! the SQL backends: both schemas have the same column names and types (text, and 64-bit
//! integers for counts and Unix-millisecond instants).

use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{Job, JobState, JobStatus, JobView, Preview, Progress, Stage, StatusView};
use kiln_core::params::GenerationParams;
use kiln_core::store::{ApiKey, Lease, StoreError};
use kiln_core::webhook::{DeliveryState, WebhookDelivery, WebhookRecord, WebhookUrl};
use time::OffsetDateTime;

/// Every column of `jobs` the domain needs, as SQL returns it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct JobRow {
    pub id: String,
    pub owner: String,
    pub route: String,
    pub params: String,
    pub state: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub expires_at: i64,
    pub progress_step: Option<i64>,
    pub progress_total: Option<i64>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub attempts: i64,
    pub fencing_token: i64,
    pub webhook_url: Option<String>,
    pub preview_key: Option<String>,
    pub preview_step: Option<i64>,
    pub cancel_requested: bool,
}

/// The column list matching [`JobRow`], for `SELECT` and `RETURNING`.
pub(crate) const JOB_COLUMNS: &str = "id, owner, route, params, state, created_at, started_at, \
    finished_at, expires_at, progress_step, progress_total, output, error, attempts, fencing_token, \
    webhook_url, preview_key, preview_step, cancel_requested";

fn corrupt(what: &'static str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::corrupt(what, detail)
}

/// A column the row's state requires, or the record is corrupt.
fn required<T>(value: Option<T>, what: &'static str, state: &str) -> Result<T, StoreError> {
    value.ok_or_else(|| corrupt(what, format_args!("missing in a {state} job")))
}

fn json<T: serde::de::DeserializeOwned>(
    text: Option<&str>,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    text.map(serde_json::from_str)
        .transpose()
        .map_err(|e| corrupt(what, e))
}

pub(crate) fn millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .map_err(|e| corrupt("instant", e))
}

impl JobRow {
    pub(crate) fn into_job(self) -> Result<Job, StoreError> {
        let uuid = |s: &str, what| uuid::Uuid::parse_str(s).map_err(|e| corrupt(what, e));
        let route = self
            .route
            .parse::<Route>()
            .map_err(|e| corrupt("route", e))?;
        Ok(Job {
            id: self.id.parse::<RequestId>().map_err(|e| corrupt("id", e))?,
            owner: KeyId::from_uuid(uuid(&self.owner, "owner")?),
            route,
            // The route too: records written before `RouteOptions` need it to be read.
            params: GenerationParams::from_stored_json(route, &self.params)
                .map_err(|e| corrupt("params", e))?,
            created_at: from_millis(self.created_at)?,
            expires_at: from_millis(self.expires_at)?,
            webhook: self
                .webhook_url
                .as_deref()
                .map(WebhookUrl::parse)
                .transpose()
                .map_err(|e| corrupt("webhook_url", e))?,
            status: self.status()?,
        })
    }

    /// The job a claim just took, as the claiming worker's lease.
    pub(crate) fn into_lease(
        self,
        worker: &WorkerId,
        expires_at: OffsetDateTime,
    ) -> Result<Lease, StoreError> {
        let fencing_token = self.fencing_token;
        let job = self.into_job()?;
        let JobStatus::Running {
            started_at,
            attempt,
            ..
        } = job.status
        else {
            return Err(corrupt("state", "a claimed job is not running"));
        };
        Ok(Lease {
            job,
            started_at,
            attempt,
            worker: worker.clone(),
            fencing_token,
            expires_at,
        })
    }

    /// The state column and the columns that state requires, as one [`JobStatus`].
    fn status(&self) -> Result<JobStatus, StoreError> {
        let state = JobState::parse(&self.state).ok_or_else(|| corrupt("state", &self.state))?;
        let name = state.as_str();
        let started_at = || required(self.started_at, "started_at", name).and_then(from_millis);
        let finished_at = || required(self.finished_at, "finished_at", name).and_then(from_millis);
        Ok(match state {
            JobState::Queued => JobStatus::Queued,
            JobState::Running => JobStatus::Running {
                started_at: started_at()?,
                attempt: u32::try_from(self.attempts).map_err(|e| corrupt("attempts", e))?,
                progress: progress(self.progress_step, self.progress_total)?,
                preview: preview(self.preview_key.as_deref(), self.preview_step)?,
                cancel_requested: self.cancel_requested,
            },
            JobState::Succeeded => JobStatus::Succeeded {
                started_at: started_at()?,
                finished_at: finished_at()?,
                output: required(json(self.output.as_deref(), "output")?, "output", name)?,
            },
            JobState::Failed => JobStatus::Failed {
                finished_at: finished_at()?,
                error: required(json(self.error.as_deref(), "error")?, "error", name)?,
            },
            JobState::Cancelled => JobStatus::Cancelled {
                finished_at: finished_at()?,
            },
        })
    }
}

/// A running job's last reported step, once it has reported one.
fn progress(step: Option<i64>, total: Option<i64>) -> Result<Option<Progress>, StoreError> {
    let count = |n: i64| u32::try_from(n).map_err(|e| corrupt("progress", e));
    match (step, total) {
        (Some(step), Some(total)) => Ok(Some(Progress {
            step: count(step)?,
            total: count(total)?,
        })),
        _ => Ok(None),
    }
}

/// A running job's preview: its key and step are written together, so one without the other is
/// a corrupt record.
fn preview(key: Option<&str>, step: Option<i64>) -> Result<Option<Preview>, StoreError> {
    match (key, step) {
        (None, None) => Ok(None),
        (Some(key), Some(step)) => Ok(Some(Preview {
            key: BlobKey::try_from(key.to_owned()).map_err(|e| corrupt("preview_key", e))?,
            step: u32::try_from(step).map_err(|e| corrupt("preview_step", e))?,
        })),
        (Some(_), None) => Err(corrupt("preview_step", "a preview key without its step")),
        (None, Some(_)) => Err(corrupt("preview_key", "a preview step without its key")),
    }
}

/// The columns of `jobs` a status poll reads, as SQL returns them: none of the stored JSON.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StatusRow {
    pub id: String,
    pub state: String,
    pub expires_at: i64,
    pub progress_step: Option<i64>,
    pub progress_total: Option<i64>,
    pub preview_key: Option<String>,
    pub preview_step: Option<i64>,
    pub queue_position: Option<i64>,
}

/// The column list matching [`StatusRow`] but for its queue position, which
/// [`crate::common::QUEUE_POSITION`] selects after them.
pub(crate) const STATUS_COLUMNS: &str =
    "id, state, expires_at, progress_step, progress_total, preview_key, preview_step";

impl StatusRow {
    pub(crate) fn into_status(self) -> Result<StatusView, StoreError> {
        let state = JobState::parse(&self.state).ok_or_else(|| corrupt("state", &self.state))?;
        let stage = match state {
            JobState::Queued => Stage::Queued {
                position: required(self.queue_position, "queue_position", state.as_str())?
                    .try_into()
                    .map_err(|e| corrupt("queue_position", e))?,
            },
            JobState::Running => Stage::Running {
                progress: progress(self.progress_step, self.progress_total)?,
                preview: preview(self.preview_key.as_deref(), self.preview_step)?,
            },
            JobState::Succeeded => Stage::Succeeded,
            JobState::Failed => Stage::Failed,
            JobState::Cancelled => Stage::Cancelled,
        };
        Ok(StatusView {
            id: self.id.parse::<RequestId>().map_err(|e| corrupt("id", e))?,
            expires_at: from_millis(self.expires_at)?,
            stage,
        })
    }
}

/// A job's row and its place in the queue, as status reads select them.
#[derive(sqlx::FromRow)]
pub(crate) struct JobViewRow {
    #[sqlx(flatten)]
    pub job: JobRow,
    pub queue_position: Option<i64>,
}

impl JobViewRow {
    pub(crate) fn into_view(self) -> Result<JobView, StoreError> {
        Ok(JobView {
            job: self.job.into_job()?,
            queue_position: self.queue_position.map(|p| p as u64),
        })
    }
}

/// A job's row with its submission position, as a listing of an owner's jobs selects them
/// (the position is the next page's cursor).
#[derive(sqlx::FromRow)]
pub(crate) struct ListedRow {
    #[sqlx(flatten)]
    pub job: JobRow,
    pub seq: i64,
}

/// The column list matching [`ApiKeyRow`].
pub(crate) const KEY_COLUMNS: &str = "id, name, prefix, created_at, revoked_at";

/// An API key's row (never the token's hash).
#[derive(sqlx::FromRow)]
pub(crate) struct ApiKeyRow {
    id: String,
    name: String,
    prefix: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl ApiKeyRow {
    pub(crate) fn into_key(self) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            id: KeyId::from_uuid(
                uuid::Uuid::parse_str(&self.id).map_err(|e| corrupt("key id", e))?,
            ),
            name: self.name,
            prefix: self.prefix,
            created_at: from_millis(self.created_at)?,
            revoked_at: self.revoked_at.map(from_millis).transpose()?,
        })
    }
}

/// The column list matching [`DeliveryRow`].
pub(crate) const DELIVERY_COLUMNS: &str =
    "request_id, owner, url, state, claim_token, attempts, created_at";

/// A row of `webhook_deliveries`, the webhook outbox.
#[derive(sqlx::FromRow)]
pub(crate) struct DeliveryRow {
    request_id: String,
    owner: String,
    url: String,
    state: String,
    claim_token: i64,
    attempts: String,
    created_at: i64,
}

impl DeliveryRow {
    /// The delivery as its (new) claimer holds it.
    pub(crate) fn into_delivery(self) -> Result<WebhookDelivery, StoreError> {
        Ok(WebhookDelivery {
            request: self
                .request_id
                .parse::<RequestId>()
                .map_err(|e| corrupt("request_id", e))?,
            owner: KeyId::from_uuid(
                uuid::Uuid::parse_str(&self.owner).map_err(|e| corrupt("owner", e))?,
            ),
            url: WebhookUrl::parse(&self.url).map_err(|e| corrupt("webhook url", e))?,
            created_at: from_millis(self.created_at)?,
            attempts: serde_json::from_str(&self.attempts)
                .map_err(|e| corrupt("webhook attempts", e))?,
            claim_token: self.claim_token,
        })
    }

    /// The delivery as the request's result shows it.
    pub(crate) fn into_record(self) -> Result<WebhookRecord, StoreError> {
        Ok(WebhookRecord {
            state: DeliveryState::parse(&self.state)
                .ok_or_else(|| corrupt("webhook state", &self.state))?,
            url: WebhookUrl::parse(&self.url).map_err(|e| corrupt("webhook url", e))?,
            attempts: serde_json::from_str(&self.attempts)
                .map_err(|e| corrupt("webhook attempts", e))?,
        })
    }
}
