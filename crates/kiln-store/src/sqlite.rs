//! The embedded store: one SQLite file in WAL mode.
//!
//! Durability: every write commits with `synchronous = FULL` before the call returns, so a job a
//! client was told about survives a SIGKILL or a power cut. Writes that read before they write take
//! `BEGIN IMMEDIATE`, so concurrent writers (API and worker processes on one file) queue on the
//! busy timeout instead of failing on a lock upgrade. Claims are one `UPDATE … RETURNING` and so
//! atomic by themselves. Concurrent submits are committed together, one sync for the group
//! (`group_commit`).
//!
//! Events ([`JobStore::subscribe`]): the writes made through this store (all its clones) are
//! published after each commit; those of other processes on the same file (a `kiln worker`
//! beside a `kiln serve --workers 0`) within a tenth of a second, read back from the
//! `job_changes` log their connections keep ([`changes`]).

mod changes;

use crate::common::{
    after_attempt, announce, attempt_set, blob_keys, cancel_abandoned, cancel_outcome,
    cancel_queued, claim_set, claimed, due, duplicate_name_or, event_key, expire_from_now,
    heartbeat_set, held, job_page, live_blob, owned_page, page_limit, reclaimable, request_cancel,
    state_counts, visible, worker_lost, Events, NO_CURSOR, QUEUE_POSITION, RELEASE_SET,
    STATE_COUNTS, TERMINAL,
};
use crate::group_commit::{run_committer, PendingEnqueue, WAITING};
use crate::reader::{self, ReadError, Readers};
use crate::record::{
    from_millis, millis, ApiKeyRow, DeliveryRow, JobRow, JobViewRow, ListedRow, StatusRow,
    DELIVERY_COLUMNS, JOB_COLUMNS, KEY_COLUMNS, STATUS_COLUMNS,
};
use async_trait::async_trait;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{
    CancelMode, CancelOutcome, JobError, JobOutput, JobState, JobView, NewJob, StatusView,
    StepReport,
};
use kiln_core::store::{
    ApiKey, ClaimPolicy, Enqueued, HeartbeatAck, Idempotency, JobCursor, JobEvents, JobPage,
    JobStore, KeyStore, Lease, QueueLimits, StateCounts, StoreError,
};
use kiln_core::webhook::{AfterAttempt, WebhookAttempt, WebhookDelivery, WebhookRecord};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection as _, SqliteConnection, SqlitePool};
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
    /// While a clone lives, the task that publishes other processes' changes runs.
    _alive: Arc<()>,
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
/// must be visible at. Built once, like [`status_sql`].
fn view_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| lookup_sql(JOB_COLUMNS));
    SQL.as_str()
}

/// What a status poll reads, selected as [`view_sql`] selects a job. Built once: status polls
/// run it more than anything else.
fn status_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| lookup_sql(STATUS_COLUMNS));
    SQL.as_str()
}

fn lookup_sql(columns: &str) -> String {
    format!(
        "SELECT {columns}, {QUEUE_POSITION} \
         FROM jobs WHERE id = ? AND (? IS NULL OR owner = ?) AND {}",
        visible("?")
    )
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
        // The schema first, on a connection of its own: the pool's connections install TEMP
        // triggers on its tables as they open.
        let mut migrating = options.connect().await.map_err(backend)?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut migrating)
            .await
            .map_err(backend)?;
        migrating.close().await.map_err(backend)?;
        let writer = uuid::Uuid::new_v4().simple().to_string();
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            // A pooled connection is a local file handle; pinging it before every use (sqlx's
            // default) cost a round trip to the connection's thread per query.
            .test_before_acquire(false)
            .after_connect({
                let writer = writer.clone();
                move |conn, _| {
                    let writer = writer.clone();
                    Box::pin(async move { changes::install_triggers(conn, &writer).await })
                }
            })
            .connect_with(options)
            .await
            .map_err(backend)?;
        let events = Events::new();
        let (submits, waiting) = mpsc::channel(WAITING);
        tokio::spawn(run_committer(pool.clone(), waiting, events.clone()));
        let alive = Arc::new(());
        tokio::spawn(changes::follow_others(
            pool.clone(),
            writer,
            events.clone(),
            Arc::downgrade(&alive),
        ));
        // Opened after the migrations, so they see the schema.
        let readers = Arc::new(Readers::open(path, READERS)?);
        Ok(Self {
            pool,
            submits,
            readers,
            events,
            _alive: alive,
        })
    }

    /// The job `id` of `owner` with its queue position, if visible at `now`: inline, or
    /// through the pool when the database is locked for a moment.
    /// The row `sql` selects for `id` when `owner`'s and visible at `now`: read inline on a
    /// read-only connection, or through the pool when that read would wait on a lock.
    async fn owned_row<T>(
        &self,
        sql: &'static str,
        (id, owner): (RequestId, KeyId),
        map: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + Send + Unpin,
    {
        let (id, owner, now) = (id.to_string(), owner.to_string(), now_millis());
        match self
            .readers
            .one_row(sql, rusqlite::params![id, owner, owner, now], map)
        {
            Ok(row) => return Ok(row),
            Err(ReadError::Failed(e)) => return Err(e),
            Err(ReadError::Busy) => {}
        }
        sqlx::query_as(sql)
            .bind(&id)
            .bind(&owner)
            .bind(&owner)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)
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
        announce_end(&mut tx, &id, now).await?;
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

/// Writes the webhook outbox's row of job `id`, which ended at `now` in `conn`'s transaction (if
/// it named a webhook).
async fn announce_end(conn: &mut SqliteConnection, id: &str, now: i64) -> Result<(), StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| announce("?1", "?2"));
    sqlx::query(&SQL)
        .bind(now)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
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
        let row = self.owned_row(view_sql(), (id, owner), reader::job_view);
        row.await?.map(JobViewRow::into_view).transpose()
    }

    async fn status(&self, owner: KeyId, id: RequestId) -> Result<Option<StatusView>, StoreError> {
        let row = self.owned_row(status_sql(), (id, owner), reader::status);
        row.await?.map(StatusRow::into_status).transpose()
    }

    async fn list_jobs(
        &self,
        owner: KeyId,
        before: Option<JobCursor>,
        limit: u32,
    ) -> Result<JobPage, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| owned_page("?1", "?2", "?3", "?4"));
        let rows: Vec<ListedRow> = sqlx::query_as(&SQL)
            .bind(owner.to_string())
            .bind(before.map_or(NO_CURSOR, JobCursor::position))
            .bind(now_millis())
            .bind(page_limit(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        job_page(rows, limit)
    }

    async fn cancel(
        &self,
        owner: KeyId,
        id: RequestId,
        mode: CancelMode,
    ) -> Result<Option<CancelOutcome>, StoreError> {
        let now = now_millis();
        let (id_typed, owner_typed) = (id, owner);
        let (id, owner) = (id.to_string(), owner.to_string());
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let cancelled: Option<String> = sqlx::query_scalar(&cancel_queued("?1", "?2", "?3"))
            .bind(now)
            .bind(&id)
            .bind(&owner)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        let mut requested = None;
        if cancelled.is_some() {
            announce_end(&mut tx, &id, now).await?;
        } else if mode == CancelMode::Force {
            requested = sqlx::query_scalar(&request_cancel("?1", "?2"))
                .bind(&id)
                .bind(&owner)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?;
        }
        let outcome = match (&cancelled, &requested) {
            (Some(_), _) => Some(CancelOutcome::Cancelled),
            (_, Some(_)) => Some(CancelOutcome::CancellationRequested),
            _ => Self::view(&mut tx, &id, Some(&owner), now)
                .await?
                .map(|view| cancel_outcome(&view, mode)),
        };
        tx.commit().await.map_err(backend)?;
        // A forced cancel's request is announced as the running job it still is, so that
        // watchers read it again.
        let changed = cancelled
            .map(|route| (route, JobState::Cancelled))
            .or(requested.map(|route| (route, JobState::Running)));
        if let Some((route, state)) = changed {
            let route = route.parse().map_err(|e| StoreError::corrupt("route", e))?;
            self.events
                .changed((id_typed, owner_typed, route), state, None);
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
               SELECT seq FROM (SELECT seq FROM jobs WHERE {} \
                 AND attempts < ?4 AND route IN ({route_params}) \
                 ORDER BY seq LIMIT 1))) \
             RETURNING {JOB_COLUMNS}",
            claim_set("?1", "?2", "?3"),
            reclaimable("?3")
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
        report: &StepReport,
        extend_by: Duration,
    ) -> Result<HeartbeatAck, StoreError> {
        let until = now_millis() + duration_millis(extend_by);
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE jobs SET {} WHERE {} RETURNING cancel_requested",
                heartbeat_set("?1", "?2", "?3", "?4", "?5"),
                held("?6", "?7")
            )
        });
        let (progress, preview) = (report.progress, report.preview.as_ref());
        let cancel_requested: Option<bool> = sqlx::query_scalar(&SQL)
            .bind(until)
            .bind(progress.map(|p| i64::from(p.step)))
            .bind(progress.map(|p| i64::from(p.total)))
            .bind(preview.map(|p| p.key.as_str()))
            .bind(preview.map(|p| i64::from(p.step)))
            .bind(lease.job.id.to_string())
            .bind(lease.fencing_token)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        let cancel_requested = cancel_requested.ok_or(StoreError::LeaseLost(lease.job.id))?;
        if progress.is_some() || preview.is_some() {
            self.events
                .changed(key_of(lease), JobState::Running, progress);
        }
        Ok(HeartbeatAck {
            expires_at: from_millis(until)?,
            cancel_requested,
        })
    }

    async fn complete(&self, lease: &Lease, output: JobOutput) -> Result<(), StoreError> {
        self.finish(lease, JobState::Succeeded, Some(&output), None)
            .await
    }

    async fn fail(&self, lease: &Lease, error: JobError) -> Result<(), StoreError> {
        self.finish(lease, JobState::Failed, None, Some(&error))
            .await
    }

    async fn end_cancelled(&self, lease: &Lease) -> Result<(), StoreError> {
        self.finish(lease, JobState::Cancelled, None, None).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        // A job its owner asked to stop is not put back in line: it ends `cancelled`, as its
        // worker would have ended it. The flag is only ever set while the job runs, so a release
        // refused here for it is the lease's to end (or `LeaseLost`, fenced alike).
        let sql = format!(
            "UPDATE jobs SET {RELEASE_SET} WHERE {} AND NOT cancel_requested",
            held("?", "?")
        );
        let done = sqlx::query(&sql)
            .bind(lease.job.id.to_string())
            .bind(lease.fencing_token)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return self.end_cancelled(lease).await;
        }
        self.events.changed(key_of(lease), JobState::Queued, None);
        Ok(())
    }

    async fn fail_abandoned(&self, max_attempts: u32) -> Result<u64, StoreError> {
        let now = now_millis();
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?1, lease_expires_at = NULL, {} \
             WHERE {} RETURNING id, owner, route",
            expire_from_now("?1"),
            cancel_abandoned("?1")
        );
        let cancelled: Vec<(String, String, String)> = sqlx::query_as(&sql)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        let sql = format!(
            "UPDATE jobs SET state = 'failed', error = ?2, finished_at = ?1, \
               lease_expires_at = NULL, {} \
             WHERE {} AND attempts >= ?3 RETURNING id, owner, route",
            expire_from_now("?1"),
            reclaimable("?1")
        );
        let failed: Vec<(String, String, String)> = sqlx::query_as(&sql)
            .bind(now)
            .bind(serde_json::to_string(&worker_lost(max_attempts)).map_err(backend)?)
            .bind(i64::from(max_attempts))
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        for (id, _, _) in cancelled.iter().chain(&failed) {
            announce_end(&mut tx, id, now).await?;
        }
        tx.commit().await.map_err(backend)?;
        for (keys, state) in [
            (&cancelled, JobState::Cancelled),
            (&failed, JobState::Failed),
        ] {
            for key in keys {
                self.events.changed(event_key(key)?, state, None);
            }
        }
        Ok((cancelled.len() + failed.len()) as u64)
    }

    async fn purge_expired(&self, now: OffsetDateTime) -> Result<Vec<BlobKey>, StoreError> {
        let now = millis(now);
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(backend)?;
        // The files, then the records (their `job_blobs` and webhook deliveries go with them,
        // by cascade).
        let sql = format!(
            "SELECT b.blob_key FROM job_blobs b JOIN jobs j ON j.id = b.job_id \
               WHERE j.expires_at <= ?1 AND j.{TERMINAL} \
             UNION ALL SELECT preview_key FROM jobs \
               WHERE expires_at <= ?1 AND {TERMINAL} AND preview_key IS NOT NULL"
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
        static SQL: LazyLock<String> = LazyLock::new(|| live_blob("?1", "?2"));
        let live: Option<i64> = sqlx::query_scalar(&SQL)
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

    async fn claim_webhooks(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        // One statement: SQLite runs one writer at a time, so no two claimers take a row.
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE webhook_deliveries SET due_at = ?1 + ?2, claim_token = claim_token + 1 \
                 WHERE request_id IN (SELECT request_id FROM webhook_deliveries WHERE {} \
                   ORDER BY due_at LIMIT ?3) \
                 RETURNING {DELIVERY_COLUMNS}",
                due("?1")
            )
        });
        let rows: Vec<DeliveryRow> = sqlx::query_as(&SQL)
            .bind(now_millis())
            .bind(duration_millis(claim_for))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        rows.into_iter().map(DeliveryRow::into_delivery).collect()
    }

    async fn record_webhook_attempt(
        &self,
        delivery: &WebhookDelivery,
        attempt: WebhookAttempt,
        next: AfterAttempt,
    ) -> Result<(), StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE webhook_deliveries SET {} WHERE {}",
                attempt_set("json_insert(attempts, '$[#]', json(?1))", "?2", "?3", "?4"),
                claimed("?5", "?6")
            )
        });
        let (state, retry_in) = after_attempt(next);
        let done = sqlx::query(&SQL)
            .bind(serde_json::to_string(&attempt).map_err(backend)?)
            .bind(now_millis())
            .bind(state)
            .bind(retry_in)
            .bind(delivery.request.to_string())
            .bind(delivery.claim_token)
            .execute(&self.pool)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost(delivery.request));
        }
        Ok(())
    }

    async fn webhook_record(
        &self,
        owner: KeyId,
        id: RequestId,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        static SQL: LazyLock<String> =
            LazyLock::new(|| crate::common::webhook_record("?1", "?2", "?3"));
        let row: Option<DeliveryRow> = sqlx::query_as(&SQL)
            .bind(id.to_string())
            .bind(owner.to_string())
            .bind(now_millis())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(DeliveryRow::into_record).transpose()
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
