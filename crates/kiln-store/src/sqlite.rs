//! The embedded store: one SQLite file in WAL mode.
//!
//! Durability: every write commits with `synchronous = FULL` before the call returns, so a job a
//! client was told about survives a SIGKILL or a power cut. Writes that read before they write take
//! `BEGIN IMMEDIATE`, so concurrent writers (API and worker processes on one file) queue on the
//! busy timeout instead of failing on a lock upgrade. Claims are one `UPDATE … RETURNING` and so
//! atomic by themselves. Concurrent submits are committed together, one sync for the group
//! (`group_commit`).

use crate::group_commit::{run_committer, PendingEnqueue, WAITING};
use crate::reader::{ReadError, Readers};
use crate::record::{from_millis, millis, JobRow, JOB_COLUMNS};
use async_trait::async_trait;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{
    CancelOutcome, JobError, JobErrorCode, JobOutput, JobState, JobView, NewJob, Progress,
};
use kiln_core::store::{
    ApiKey, ClaimPolicy, Enqueued, Idempotency, JobStore, KeyStore, Lease, QueueLimits,
    StateCounts, StoreError,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, SqliteConnection, SqlitePool};
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

/// A job is visible to its owner while it runs or waits, and after it ends until it expires.
const VISIBLE: &str = "(state IN ('queued', 'running') OR expires_at > ?)";

/// Retention counts from the end of a job: on every terminal transition the expiry moves to
/// "now + (expiry − creation)", the retention the job was submitted with.
const EXPIRE_FROM_NOW: &str = "expires_at = ?1 + (expires_at - created_at)";

/// The store. Clones share the pool and the submit committer; the committer task (spawned on
/// the Tokio runtime that opened the store) stops when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    submits: mpsc::Sender<PendingEnqueue>,
    /// Read-only connections for status polls, used inline ([`Readers`]).
    readers: Arc<Readers>,
}

/// Inline readers: about one per runtime thread is enough, as each read holds its connection
/// for microseconds.
const READERS: usize = 4;

pub(crate) fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend("sqlite", e)
}

/// A write that names a lease changed nothing: the lease is no longer this worker's.
fn fenced(done: SqliteQueryResult, lease: &Lease) -> Result<(), StoreError> {
    if done.rows_affected() == 0 {
        Err(StoreError::LeaseLost(lease.job.id))
    } else {
        Ok(())
    }
}

fn now_millis() -> i64 {
    millis(OffsetDateTime::now_utc())
}

pub(crate) fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A job's columns and its queue position, by id, owner (or NULL for any) and the instant it
/// must be visible at. Built once: status polls run it more than anything else.
fn view_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {JOB_COLUMNS}, CASE WHEN state = 'queued' THEN \
               (SELECT COUNT(*) FROM jobs q WHERE q.state = 'queued' AND q.seq < jobs.seq) END \
               AS queue_position \
             FROM jobs WHERE id = ? AND (? IS NULL OR owner = ?) AND {VISIBLE}"
        )
    });
    SQL.as_str()
}

#[derive(sqlx::FromRow)]
struct JobViewRow {
    #[sqlx(flatten)]
    job: JobRow,
    queue_position: Option<i64>,
}

impl JobViewRow {
    fn into_view(self) -> Result<JobView, StoreError> {
        Ok(JobView {
            job: self.job.into_job()?,
            queue_position: self.queue_position.map(|p| p as u64),
        })
    }
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: String,
    name: String,
    prefix: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl ApiKeyRow {
    fn into_key(self) -> Result<ApiKey, StoreError> {
        Ok(ApiKey {
            id: KeyId::from_uuid(
                uuid::Uuid::parse_str(&self.id).map_err(|e| StoreError::corrupt("key id", e))?,
            ),
            name: self.name,
            prefix: self.prefix,
            created_at: from_millis(self.created_at)?,
            revoked_at: self.revoked_at.map(from_millis).transpose()?,
        })
    }
}

const KEY_COLUMNS: &str = "id, name, prefix, created_at, revoked_at";

impl SqliteStore {
    /// Opens (creating if needed) the database file and brings its schema up to date. Must be
    /// called within a Tokio runtime: it starts the task that commits submits.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true)
            // Statements are logged at debug level otherwise: a formatted log record per query
            // on the polling path, which the service's filter then drops.
            .disable_statement_logging();
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // A pooled connection is a local file handle; pinging it before every use (sqlx's
            // default) cost a round trip to the connection's thread per query.
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(backend)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(backend)?;
        let (submits, waiting) = mpsc::channel(WAITING);
        tokio::spawn(run_committer(pool.clone(), waiting));
        // Opened after the migrations, so they see the schema.
        let readers = Arc::new(Readers::open(path, READERS)?);
        Ok(Self {
            pool,
            submits,
            readers,
        })
    }

    /// The job `id` of `owner` with its queue position, if visible at `now`: inline, or
    /// through the pool when the database is locked for a moment.
    async fn owned_view(
        &self,
        id: &str,
        owner: &str,
        now: i64,
    ) -> Result<Option<JobView>, StoreError> {
        match self
            .readers
            .job_view_row(view_sql(), rusqlite::params![id, owner, owner, now])
        {
            Ok(row) => {
                return row
                    .map(|(job, queue_position)| {
                        JobViewRow {
                            job,
                            queue_position,
                        }
                        .into_view()
                    })
                    .transpose()
            }
            Err(ReadError::Failed(e)) => return Err(e),
            Err(ReadError::Busy) => {}
        }
        let mut conn = self.pool.acquire().await.map_err(backend)?;
        Self::view(&mut conn, id, Some(owner), now).await
    }

    /// The job `id` with its queue position, if visible at `now`.
    pub(crate) async fn view(
        conn: &mut SqliteConnection,
        id: &str,
        owner: Option<&str>,
        now: i64,
    ) -> Result<Option<JobView>, StoreError> {
        let row: Option<JobViewRow> = sqlx::query_as(view_sql())
            .bind(id)
            .bind(owner)
            .bind(owner)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await
            .map_err(backend)?;
        row.map(JobViewRow::into_view).transpose()
    }

    /// Ends a running job held by `lease` in `state`, with its output or error.
    async fn finish(
        &self,
        lease: &Lease,
        state: JobState,
        output: Option<&JobOutput>,
        error: Option<&JobError>,
    ) -> Result<(), StoreError> {
        let now = now_millis();
        let id = lease.job.id.to_string();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE jobs SET state = ?2, output = ?3, error = ?4, finished_at = ?1, \
               lease_expires_at = NULL, {EXPIRE_FROM_NOW} \
             WHERE id = ?5 AND fencing_token = ?6 AND state = 'running'"
        );
        let done = sqlx::query(&sql)
            .bind(now)
            .bind(state.as_str())
            .bind(
                output
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(backend)?,
            )
            .bind(
                error
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(backend)?,
            )
            .bind(&id)
            .bind(lease.fencing_token)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        fenced(done, lease)?;
        for key in output.map(|o| o.images.as_slice()).unwrap_or_default() {
            sqlx::query("INSERT INTO job_blobs (blob_key, job_id) VALUES (?, ?)")
                .bind(key.as_str())
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn enqueue(
        &self,
        job: NewJob,
        idempotency: Option<Idempotency>,
        limits: QueueLimits,
    ) -> Result<Enqueued, StoreError> {
        let params_json = serde_json::to_string(&job.params).map_err(backend)?;
        let (answer, answered) = oneshot::channel();
        let pending = PendingEnqueue {
            job,
            params_json,
            idempotency,
            limits,
            answer,
        };
        // The committer stops only when the runtime that opened the store shuts down.
        self.submits
            .send(pending)
            .await
            .map_err(|_| StoreError::Closed)?;
        // Answered only once the batch holding this job has committed (or failed).
        answered.await.map_err(|_| StoreError::Closed)?
    }

    async fn get(&self, owner: KeyId, id: RequestId) -> Result<Option<JobView>, StoreError> {
        self.owned_view(&id.to_string(), &owner.to_string(), now_millis())
            .await
    }

    async fn cancel(
        &self,
        owner: KeyId,
        id: RequestId,
    ) -> Result<Option<CancelOutcome>, StoreError> {
        let now = now_millis();
        let (id, owner) = (id.to_string(), owner.to_string());
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?1, {EXPIRE_FROM_NOW} \
             WHERE id = ?2 AND owner = ?3 AND state = 'queued'"
        );
        let cancelled = sqlx::query(&sql)
            .bind(now)
            .bind(&id)
            .bind(&owner)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        let outcome = if cancelled.rows_affected() == 1 {
            Some(CancelOutcome::Cancelled)
        } else {
            Self::view(&mut tx, &id, Some(&owner), now)
                .await?
                .map(|v| match v.job.state() {
                    JobState::Cancelled => CancelOutcome::Cancelled,
                    _ => CancelOutcome::NotCancellable,
                })
        };
        tx.commit().await.map_err(backend)?;
        Ok(outcome)
    }

    async fn claim(
        &self,
        worker: &WorkerId,
        routes: &[Route],
        policy: ClaimPolicy,
    ) -> Result<Option<Lease>, StoreError> {
        if routes.is_empty() {
            return Ok(None);
        }
        let now = now_millis();
        let lease_until = now + duration_millis(policy.lease);
        // ?1 worker, ?2 lease end, ?3 now, ?4 attempts limit, ?5.. the routes.
        let route_params: Vec<String> = (0..routes.len()).map(|i| format!("?{}", i + 5)).collect();
        let route_params = route_params.join(", ");
        // The first queued job and the first abandoned one, each found by walking the
        // (state, seq) index to its first match, then the older of the two: one query with `OR`
        // read every queued row and sorted them, per claim, which a deep queue made slow.
        let sql = format!(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, \
               fencing_token = fencing_token + 1, worker = ?1, lease_expires_at = ?2, started_at = ?3, \
               progress_step = NULL, progress_total = NULL \
             WHERE seq = (SELECT MIN(seq) FROM ( \
               SELECT seq FROM (SELECT seq FROM jobs WHERE state = 'queued' \
                 AND route IN ({route_params}) ORDER BY seq LIMIT 1) \
               UNION ALL \
               SELECT seq FROM (SELECT seq FROM jobs WHERE state = 'running' \
                 AND lease_expires_at < ?3 AND attempts < ?4 AND route IN ({route_params}) \
                 ORDER BY seq LIMIT 1))) \
             RETURNING {JOB_COLUMNS}"
        );
        let mut query = sqlx::query_as::<_, JobRow>(&sql)
            .bind(worker.as_str())
            .bind(lease_until)
            .bind(now)
            .bind(i64::from(policy.max_attempts));
        for route in routes {
            query = query.bind(route.id());
        }
        let row = query.fetch_optional(&self.pool).await.map_err(backend)?;
        row.map(|row| row.into_lease(worker, from_millis(lease_until)?))
            .transpose()
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        progress: Option<Progress>,
        extend_by: Duration,
    ) -> Result<OffsetDateTime, StoreError> {
        let until = now_millis() + duration_millis(extend_by);
        let done = sqlx::query(
            "UPDATE jobs SET lease_expires_at = ?, progress_step = COALESCE(?, progress_step), \
               progress_total = COALESCE(?, progress_total) \
             WHERE id = ? AND fencing_token = ? AND state = 'running'",
        )
        .bind(until)
        .bind(progress.map(|p| i64::from(p.step)))
        .bind(progress.map(|p| i64::from(p.total)))
        .bind(lease.job.id.to_string())
        .bind(lease.fencing_token)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        fenced(done, lease)?;
        from_millis(until)
    }

    async fn complete(&self, lease: &Lease, output: JobOutput) -> Result<(), StoreError> {
        self.finish(lease, JobState::Succeeded, Some(&output), None)
            .await
    }

    async fn fail(&self, lease: &Lease, error: JobError) -> Result<(), StoreError> {
        self.finish(lease, JobState::Failed, None, Some(&error))
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        // A release is the worker's choice (shutdown), not the job's fault: the attempt it
        // used is given back so that it does not count towards `max_attempts`.
        let done = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = attempts - 1, worker = NULL, \
               lease_expires_at = NULL, started_at = NULL, progress_step = NULL, progress_total = NULL \
             WHERE id = ? AND fencing_token = ? AND state = 'running'",
        )
        .bind(lease.job.id.to_string())
        .bind(lease.fencing_token)
        .execute(&self.pool)
        .await
        .map_err(backend)?;
        fenced(done, lease)
    }

    async fn fail_abandoned(&self, max_attempts: u32) -> Result<u64, StoreError> {
        let error = JobError {
            code: JobErrorCode::WorkerLost,
            message: format!(
                "the worker running this job stopped responding {max_attempts} times; \
                 the job was given up (try a smaller size, or ask the operator to check the workers)"
            ),
        };
        let sql = format!(
            "UPDATE jobs SET state = 'failed', error = ?2, finished_at = ?1, lease_expires_at = NULL, \
               {EXPIRE_FROM_NOW} \
             WHERE state = 'running' AND lease_expires_at < ?1 AND attempts >= ?3"
        );
        let done = sqlx::query(&sql)
            .bind(now_millis())
            .bind(serde_json::to_string(&error).map_err(backend)?)
            .bind(i64::from(max_attempts))
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    async fn purge_expired(&self, now: OffsetDateTime) -> Result<Vec<BlobKey>, StoreError> {
        let now = millis(now);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let keys: Vec<String> = sqlx::query_scalar(
            "SELECT b.blob_key FROM job_blobs b JOIN jobs j ON j.id = b.job_id \
             WHERE j.expires_at <= ? AND j.state IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(backend)?;
        sqlx::query("DELETE FROM jobs WHERE expires_at <= ? AND state IN ('succeeded', 'failed', 'cancelled')")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        keys.into_iter()
            .map(|k| BlobKey::try_from(k).map_err(|e| StoreError::corrupt("blob key", e)))
            .collect()
    }

    async fn blob_is_live(&self, key: &BlobKey) -> Result<bool, StoreError> {
        let live: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM job_blobs b JOIN jobs j ON j.id = b.job_id \
             WHERE b.blob_key = ? AND j.expires_at > ?",
        )
        .bind(key.as_str())
        .bind(now_millis())
        .fetch_optional(&self.pool)
        .await
        .map_err(backend)?;
        Ok(live.is_some())
    }

    async fn state_counts(&self) -> Result<StateCounts, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM jobs GROUP BY state")
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
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
        Ok(StateCounts { counts })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn insert_key(
        &self,
        name: &str,
        token_hash: &str,
        prefix: &str,
    ) -> Result<ApiKey, StoreError> {
        let sql = format!(
            "INSERT INTO api_keys (id, name, token_hash, prefix, created_at) VALUES (?, ?, ?, ?, ?) \
             RETURNING {KEY_COLUMNS}"
        );
        let row: ApiKeyRow = sqlx::query_as(&sql)
            .bind(KeyId::new().to_string())
            .bind(name)
            .bind(token_hash)
            .bind(prefix)
            .bind(now_millis())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| match e.as_database_error() {
                Some(db) if db.is_unique_violation() => {
                    StoreError::DuplicateKeyName(name.to_string())
                }
                _ => backend(e),
            })?;
        row.into_key()
    }

    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, name");
        let rows: Vec<ApiKeyRow> = sqlx::query_as(&sql)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.into_iter().map(ApiKeyRow::into_key).collect()
    }

    async fn revoke_key(&self, name: &str) -> Result<ApiKey, StoreError> {
        let sql = format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE name = ? RETURNING {KEY_COLUMNS}"
        );
        let row: Option<ApiKeyRow> = sqlx::query_as(&sql)
            .bind(now_millis())
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.ok_or_else(|| StoreError::NoSuchKey(name.to_string()))?
            .into_key()
    }

    async fn key_by_hash(&self, token_hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE token_hash = ? AND revoked_at IS NULL"
        );
        let row: Option<ApiKeyRow> = sqlx::query_as(&sql)
            .bind(token_hash)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(ApiKeyRow::into_key).transpose()
    }

    async fn key_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_keys")
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(n as u64)
    }
}
