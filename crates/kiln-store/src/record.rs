//! The row form of a job and its conversion into the domain's [`Job`].

use kiln_core::catalog::Route;
use kiln_core::ids::{KeyId, RequestId};
use kiln_core::job::{Job, JobState, Progress};
use kiln_core::store::StoreError;
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
}

/// The column list matching [`JobRow`], for `SELECT` and `RETURNING`.
pub(crate) const JOB_COLUMNS: &str = "id, owner, route, params, state, created_at, started_at, \
    finished_at, expires_at, progress_step, progress_total, output, error, attempts, fencing_token";

fn corrupt(what: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("corrupt job row ({what}): {detail}"))
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
        let progress = match (self.progress_step, self.progress_total) {
            (Some(step), Some(total)) => Some(Progress {
                step: step as u32,
                total: total as u32,
            }),
            _ => None,
        };
        Ok(Job {
            id: self.id.parse::<RequestId>().map_err(|e| corrupt("id", e))?,
            owner: KeyId::from_uuid(uuid(&self.owner, "owner")?),
            route: self
                .route
                .parse::<Route>()
                .map_err(|e| corrupt("route", e))?,
            params: serde_json::from_str(&self.params).map_err(|e| corrupt("params", e))?,
            state: JobState::parse(&self.state).ok_or_else(|| corrupt("state", &self.state))?,
            created_at: from_millis(self.created_at)?,
            started_at: self.started_at.map(from_millis).transpose()?,
            finished_at: self.finished_at.map(from_millis).transpose()?,
            expires_at: from_millis(self.expires_at)?,
            progress,
            output: self
                .output
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| corrupt("output", e))?,
            error: self
                .error
                .as_deref()
                .map(serde_json::from_str)
                .transpose()
                .map_err(|e| corrupt("error", e))?,
            attempts: self.attempts as u32,
        })
    }
}
