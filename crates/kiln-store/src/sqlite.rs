//! The embedded store: one SQLite file in WAL mode.
//!
//! Durability: every write commits with `synchronous = FULL` before the call returns, so a job a
//! client was told about survives a SIGKILL or a power cut. Writes that read before they write take
//! `BEGIN IMMEDIATE`, so concurrent writers (API and worker processes on one file) queue on the
//! busy timeout instead of failing on a lock upgrade. Claims are one `UPDATE … RETURNING` and so
//! atomic by themselves. Concurrent submits are committed together, one sync for the group
//! (`group_commit`).
//!
//! Events ([`JobStore::subscribe`]) are those of the writes made through this process's store
//! (all its clones), published after each commit. Other processes on the same file (a
//! `kiln worker` beside a `kiln serve`) are not heard: their changes are seen by polling, which
//! every consumer of events keeps as its fallback.

use crate::common::{
    blob_keys, claim_set, duplicate_name_or, event_key, expire_from_now, held, state_counts,
    visible, worker_lost, Events, QUEUE_POSITION, RELEASE_SET, STATE_COUNTS, TERMINAL,
};
use crate::group_commit::{run_committer, PendingEnqueue, WAITING};
use crate::reader::{ReadError, Readers};
use crate::record::{from_millis, millis, ApiKeyRow, JobRow, JobViewRow, JOB_COLUMNS, KEY_COLUMNS};
use async_trait::async_trait;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{CancelOutcome, JobError, JobOutput, JobState, JobView, NewJob, Progress};
use kiln_core::store::{
    ApiKey, ClaimPolicy, Enqueued, Idempotency, JobEvents, JobStore, KeyStore, Lease, QueueLimits,
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

/// The store. Clones share the pool and the submit committer; the committer task (spawned on
/// the Tokio runtime that opened the store) stops when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    submits: mpsc::Sender<PendingEnqueue>,
    /// Read-only connections for status polls, used inline ([`Readers`]).
    readers: Arc<Readers>,
    events: Events,
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
            "SELECT {JOB_COLUMNS}, {QUEUE_POSITION} \
             FROM jobs WHERE id = ? AND (? IS NULL OR owner = ?) AND {}",
            visible("?")
        )
    });
    SQL.as_str()
}

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
        let events = Events::new();
        let (submits, waiting) = mpsc::channel(WAITING);
        tokio::spawn(run_committer(pool.clone(), waiting, events.clone()));
        // Opened after the migrations, so they see the schema.
        let readers = Arc::new(Readers::open(path, READERS)?);
        Ok(Self {
            pool,
            submits,
            readers,
            events,
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
               lease_expires_at = NULL, {} \
             WHERE {}",
            expire_from_now("?1"),
            held("?5", "?6")
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
        tx.commit().await.map_err(backend)?;
        self.events.changed(key_of(lease), state, None);
        Ok(())
    }
}

/// A leased job's id, owner and route, as its events name it.
fn key_of(lease: &Lease) -> (RequestId, KeyId, Route) {
    (lease.job.id, lease.job.owner, lease.job.route)
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
        let (id_typed, owner_typed) = (id, owner);
        let (id, owner) = (id.to_string(), owner.to_string());
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?1, {} \
             WHERE id = ?2 AND owner = ?3 AND state = 'queued' RETURNING route",
            expire_from_now("?1")
        );
        let cancelled: Option<String> = sqlx::query_scalar(&sql)
            .bind(now)
            .bind(&id)
            .bind(&owner)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        let outcome = if cancelled.is_some() {
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
        if let Some(route) = cancelled {
            let route = route.parse().map_err(|e| StoreError::corrupt("route", e))?;
            self.events
                .changed((id_typed, owner_typed, route), JobState::Cancelled, None);
        }
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
            "UPDATE jobs SET {} \
             WHERE seq = (SELECT MIN(seq) FROM ( \
               SELECT seq FROM (SELECT seq FROM jobs WHERE state = 'queued' \
                 AND route IN ({route_params}) ORDER BY seq LIMIT 1) \
               UNION ALL \
               SELECT seq FROM (SELECT seq FROM jobs WHERE state = 'running' \
                 AND lease_expires_at < ?3 AND attempts < ?4 AND route IN ({route_params}) \
                 ORDER BY seq LIMIT 1))) \
             RETURNING {JOB_COLUMNS}",
            claim_set("?1", "?2", "?3")
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
        let lease = row
            .map(|row| row.into_lease(worker, from_millis(lease_until)?))
            .transpose()?;
        if let Some(lease) = &lease {
            self.events.changed(key_of(lease), JobState::Running, None);
        }
        Ok(lease)
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        progress: Option<Progress>,
        extend_by: Duration,
    ) -> Result<OffsetDateTime, StoreError> {
        let until = now_millis() + duration_millis(extend_by);
        let sql = format!(
            "UPDATE jobs SET lease_expires_at = ?, progress_step = COALESCE(?, progress_step), \
               progress_total = COALESCE(?, progress_total) WHERE {}",
            held("?", "?")
        );
        let done = sqlx::query(&sql)
            .bind(until)
            .bind(progress.map(|p| i64::from(p.step)))
            .bind(progress.map(|p| i64::from(p.total)))
            .bind(lease.job.id.to_string())
            .bind(lease.fencing_token)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        fenced(done, lease)?;
        if progress.is_some() {
            self.events
                .changed(key_of(lease), JobState::Running, progress);
        }
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
        let sql = format!("UPDATE jobs SET {RELEASE_SET} WHERE {}", held("?", "?"));
        let done = sqlx::query(&sql)
            .bind(lease.job.id.to_string())
            .bind(lease.fencing_token)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        fenced(done, lease)?;
        self.events.changed(key_of(lease), JobState::Queued, None);
        Ok(())
    }

    async fn fail_abandoned(&self, max_attempts: u32) -> Result<u64, StoreError> {
        let error = worker_lost(max_attempts);
        let sql = format!(
            "UPDATE jobs SET state = 'failed', error = ?2, finished_at = ?1, lease_expires_at = NULL, \
               {} \
             WHERE state = 'running' AND lease_expires_at < ?1 AND attempts >= ?3 \
             RETURNING id, owner, route",
            expire_from_now("?1")
        );
        let failed: Vec<(String, String, String)> = sqlx::query_as(&sql)
            .bind(now_millis())
            .bind(serde_json::to_string(&error).map_err(backend)?)
            .bind(i64::from(max_attempts))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        for key in &failed {
            self.events.changed(event_key(key)?, JobState::Failed, None);
        }
        Ok(failed.len() as u64)
    }

    async fn purge_expired(&self, now: OffsetDateTime) -> Result<Vec<BlobKey>, StoreError> {
        let now = millis(now);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let sql = format!(
            "SELECT b.blob_key FROM job_blobs b JOIN jobs j ON j.id = b.job_id \
             WHERE j.expires_at <= ? AND j.{TERMINAL}"
        );
        let keys: Vec<String> = sqlx::query_scalar(&sql)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        sqlx::query(&format!(
            "DELETE FROM jobs WHERE expires_at <= ? AND {TERMINAL}"
        ))
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        blob_keys(keys)
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
        let rows: Vec<(String, i64)> = sqlx::query_as(STATE_COUNTS)
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        Ok(state_counts(&rows))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        Ok(())
    }

    fn subscribe(&self) -> JobEvents {
        self.events.subscribe()
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
            .map_err(|e| duplicate_name_or(e, name, backend))?;
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
