//! The shared store of a many-machine install: PostgreSQL, through sqlx's pool.
//!
//! Same tables, columns and column types as SQLite (text; BIGINT counts and Unix-millisecond
//! instants), so one row mapping (`record`) and one set of statement fragments (`common`) serve
//! both, and callers see the same behaviour and the same errors from either.
//!
//! # Clock
//! Every instant the store decides itself (a claim's start and lease, a heartbeat's lease, when a
//! job ends and so when it expires, the "now" of visibility and abandonment) is read from the
//! database server's clock ([`NOW`]: the transaction's `now()` in Unix milliseconds), never
//! the node's. Leases are compared across machines: with node clocks, a worker whose clock ran
//! ahead would take live jobs from others (fencing would keep that safe, but the work would be
//! done twice). Instants the caller hands in are the caller's, as the traits define them: a new
//! job's `created_at`/`expires_at` (its retention is their difference, which no skew changes),
//! the idempotency window (counted from `created_at`, as in SQLite) and `purge_expired`'s `now`.
//! The returned lease expiries (`Lease::expires_at`, `heartbeat`'s answer) are the server's.
//!
//! # Locking
//! - Start: the migrations run on a connection of their own, under a session advisory lock
//!   ([`MIGRATION_LOCK`]) that several nodes starting together queue on; the connection is
//!   closed afterwards, which releases the lock on every path, failure included. sqlx's migrator
//!   also takes a session advisory lock (keyed by the database's name) inside ours; we rely on
//!   our own, because sqlx's is left held when a migration fails and its connection lives on.
//! - Submits: one transaction per submit, serialised across all nodes by a transaction-scoped
//!   advisory lock ([`ENQUEUE_LOCK`]) taken first, so the queue counts behind `QueueFull` and
//!   `OwnerQueueFull` and the idempotency lookup see every earlier submit, and `seq` is handed out
//!   in commit order. A counter row would serialise just the same; the lock needs no extra row
//!   and no update per claim. The cost, a few round trips and one commit per submit while
//!   holding it, bounds submits to some hundreds per second for the whole cluster, far above
//!   what its GPUs can generate.
//! - Claims: `FOR UPDATE SKIP LOCKED` on the oldest claimable row, so concurrent workers on any
//!   node take different jobs without waiting on each other.
//! - Every write of a running job names its fencing token and `state = 'running'`; no row
//!   changed means the lease was lost.
//! - Webhook deliveries: claimed like jobs (`FOR UPDATE SKIP LOCKED`, the claim's end by the
//!   server's clock, a claim token that fences the attempt's record).
//!
//! Connections are opened with `default_transaction_isolation = 'read committed'`, whatever
//! the server's default: the submit lock relies on each statement seeing what committed
//! before it.
//!
//! # Events
//! A trigger on `jobs` (see the migrations) calls `pg_notify('kiln_jobs', …)` in the writing
//! transaction for every submit, state change, re-claim, change of progress or preview and
//! forced cancel's request, so it is heard on commit only, from whichever node wrote it. Each
//! store keeps one listening connection (`events`) that fans the notifications out to its
//! subscribers, including those of its own writes; after a lost connection it listens again and
//! tells subscribers to resync.

mod enqueue;
mod events;
mod keys;
#[cfg(test)]
mod tests;

use crate::common::{
    after_attempt, announce, attempt_set, blob_keys, cancel_abandoned, cancel_outcome,
    cancel_queued, claim_set, claimed, due, expire_from_now, heartbeat_set, held, job_page,
    live_blob, owned_page, page_limit, reclaimable, request_cancel, state_counts, visible,
    webhook_record, worker_lost, Events, NO_CURSOR, QUEUE_POSITION, RELEASE_SET, STATE_COUNTS,
    TERMINAL,
};
use crate::record::{
    from_millis, millis, DeliveryRow, JobRow, JobViewRow, ListedRow, StatusRow, DELIVERY_COLUMNS,
    JOB_COLUMNS, STATUS_COLUMNS,
};
use async_trait::async_trait;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{
    CancelMode, CancelOutcome, JobError, JobOutput, JobState, JobView, NewJob, StatusView,
    StepReport,
};
use kiln_core::store::{
    ClaimPolicy, Enqueued, HeartbeatAck, Idempotency, JobCursor, JobEvents, JobPage, JobStore,
    Lease, QueueLimits, StateCounts, StoreError,
};
use kiln_core::webhook::{AfterAttempt, WebhookAttempt, WebhookDelivery, WebhookRecord};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgExecutor, PgPool};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use time::OffsetDateTime;

/// The database server's clock, in Unix milliseconds: the instant the transaction began.
pub(crate) const NOW: &str = "(floor(extract(epoch FROM now()) * 1000)::bigint)";

/// The session advisory lock the migrations run under ("kiln" "migr" as two 32-bit halves).
const MIGRATION_LOCK: i64 = 0x6b69_6c6e_6d69_6772;
/// The transaction advisory lock every submit holds ("kiln" "enqu").
pub(crate) const ENQUEUE_LOCK: i64 = 0x6b69_6c6e_656e_7175;

/// Connections per store: a node's API handlers, worker slots and sweeper share them, and each
/// statement holds one for a round trip or two.
const POOL_SIZE: u32 = 10;
/// How long a connection may take to open, and a caller may wait for a pooled one: an
/// unreachable server fails `connect` (and later calls) within this instead of hanging.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The store. Clones share the pool and the events' listener, which stops when the last clone
/// is dropped.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    events: Events,
    _listener: Arc<events::Listener>,
}

pub(crate) fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend("postgres", e)
}

fn timed_out(what: &str) -> StoreError {
    backend(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("PostgreSQL did not answer {what} within {CONNECT_TIMEOUT:?}"),
    ))
}

pub(crate) fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A job's columns and its queue position, by id ($1), owner ($2, or NULL for any) and the
/// instant it must be visible at ($3, or NULL for the server's now).
fn view_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| lookup_sql(JOB_COLUMNS));
    SQL.as_str()
}

/// What a status poll reads, selected as [`view_sql`] selects a job.
fn status_sql() -> &'static str {
    static SQL: LazyLock<String> = LazyLock::new(|| lookup_sql(STATUS_COLUMNS));
    SQL.as_str()
}

fn lookup_sql(columns: &str) -> String {
    format!(
        "SELECT {columns}, {QUEUE_POSITION} FROM jobs \
         WHERE id = $1 AND ($2::text IS NULL OR owner = $2) AND {}",
        visible(&format!("COALESCE($3, {NOW})"))
    )
}

/// A claimed job's row and the lease's end, as the claim wrote it.
#[derive(sqlx::FromRow)]
struct ClaimedRow {
    #[sqlx(flatten)]
    job: JobRow,
    lease_expires_at: i64,
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`),
    /// brings its schema up to date and starts listening for job events. Must be called within
    /// a Tokio runtime. An unreachable server fails within about [`CONNECT_TIMEOUT`].
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(backend)?
            .application_name("kiln")
            // The startup packet's options are split at spaces unless escaped.
            .options([("default_transaction_isolation", r"read\ committed")])
            // Statements are logged at debug level otherwise: a record per query on the
            // polling path, which the service's filter then drops.
            .disable_statement_logging();
        migrate(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(backend)?;
        let events = Events::new();
        let listener = events::Listener::start(options, events.clone()).await?;
        Ok(Self {
            pool,
            events,
            _listener: Arc::new(listener),
        })
    }

    /// The job `id` (of `owner`, if given) with its queue position, if visible at `now` (the
    /// server's clock when `None`).
    pub(crate) async fn view(
        conn: impl PgExecutor<'_>,
        id: &str,
        owner: Option<&str>,
        now: Option<i64>,
    ) -> Result<Option<JobView>, StoreError> {
        let row: Option<JobViewRow> = sqlx::query_as(view_sql())
            .bind(id)
            .bind(owner)
            .bind(now)
            .fetch_optional(conn)
            .await
            .map_err(backend)?;
        row.map(JobViewRow::into_view).transpose()
    }

    /// Ends a running job held by `lease` in `state`, with its output or error, and records the
    /// output's files.
    async fn finish(
        &self,
        lease: &Lease,
        state: JobState,
        output: Option<&JobOutput>,
        error: Option<&JobError>,
    ) -> Result<(), StoreError> {
        let id = lease.job.id.to_string();
        let output_json = output
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        let error_json = error
            .map(serde_json::to_string)
            .transpose()
            .map_err(backend)?;
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let sql = format!(
            "UPDATE jobs SET state = $1, output = $2, error = $3, finished_at = {NOW}, \
               lease_expires_at = NULL, {} \
             WHERE {}",
            expire_from_now(NOW),
            held("$4", "$5")
        );
        let done = sqlx::query(&sql)
            .bind(state.as_str())
            .bind(output_json)
            .bind(error_json)
            .bind(&id)
            .bind(lease.fencing_token)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::LeaseLost(lease.job.id));
        }
        announce_end(&mut tx, &id).await?;
        let keys: Vec<&str> = output
            .map(|o| o.images.iter().map(BlobKey::as_str).collect())
            .unwrap_or_default();
        if !keys.is_empty() {
            sqlx::query("INSERT INTO job_blobs (blob_key, job_id) SELECT unnest($1::text[]), $2")
                .bind(keys)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }
}

/// Writes the webhook outbox's row of job `id`, which has just ended in `conn`'s transaction (if
/// it named a webhook).
async fn announce_end(conn: &mut PgConnection, id: &str) -> Result<(), StoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| announce(NOW, "$1"));
    sqlx::query(&SQL)
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    Ok(())
}

/// Brings the schema up to date on a connection of its own, under [`MIGRATION_LOCK`]. Closing
/// the connection ends its session, and with it both advisory locks, whatever happened.
async fn migrate(options: &PgConnectOptions) -> Result<(), StoreError> {
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options))
        .await
        .map_err(|_| timed_out("a connection"))?
        .map_err(backend)?;
    let migrated = async {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut conn)
            .await
            .map_err(backend)?;
        // `run_direct` is `run` on a connection we hold; `run(&mut conn)` makes this future
        // fail sqlx's `Acquire` lifetime bound, and then `connect` could not be spawned.
        sqlx::migrate!("./migrations/postgres")
            .run_direct(&mut conn)
            .await
            .map_err(backend)
    }
    .await;
    if let Err(e) = conn.close().await {
        tracing::warn!(
            error = &e as &dyn std::error::Error,
            "closing the migrations' connection failed"
        );
    }
    migrated
}

#[async_trait]
impl JobStore for PgStore {
    async fn enqueue(
        &self,
        job: NewJob,
        idempotency: Option<Idempotency>,
        limits: QueueLimits,
    ) -> Result<Enqueued, StoreError> {
        enqueue::enqueue(&self.pool, job, idempotency, limits).await
    }

    async fn get(&self, owner: KeyId, id: RequestId) -> Result<Option<JobView>, StoreError> {
        let owner = owner.to_string();
        Self::view(&self.pool, &id.to_string(), Some(&owner), None).await
    }

    async fn status(&self, owner: KeyId, id: RequestId) -> Result<Option<StatusView>, StoreError> {
        let row: Option<StatusRow> = sqlx::query_as(status_sql())
            .bind(id.to_string())
            .bind(owner.to_string())
            .bind(None::<i64>)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(StatusRow::into_status).transpose()
    }

    async fn list_jobs(
        &self,
        owner: KeyId,
        before: Option<JobCursor>,
        limit: u32,
    ) -> Result<JobPage, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| owned_page("$1", "$2", NOW, "$3"));
        let rows: Vec<ListedRow> = sqlx::query_as(&SQL)
            .bind(owner.to_string())
            .bind(before.map_or(NO_CURSOR, JobCursor::position))
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
        // The events (a cancelled job, a requested cancel) are the trigger's.
        let (id, owner) = (id.to_string(), owner.to_string());
        let mut tx = self.pool.begin().await.map_err(backend)?;
        let cancelled: Option<String> = sqlx::query_scalar(&cancel_queued(NOW, "$1", "$2"))
            .bind(&id)
            .bind(&owner)
            .fetch_optional(&mut *tx)
            .await
            .map_err(backend)?;
        let outcome = if cancelled.is_some() {
            announce_end(&mut tx, &id).await?;
            Some(CancelOutcome::Cancelled)
        } else if mode == CancelMode::Force
            && sqlx::query_scalar::<_, String>(&request_cancel("$1", "$2"))
                .bind(&id)
                .bind(&owner)
                .fetch_optional(&mut *tx)
                .await
                .map_err(backend)?
                .is_some()
        {
            Some(CancelOutcome::CancellationRequested)
        } else {
            Self::view(&mut *tx, &id, Some(&owner), None)
                .await?
                .map(|view| cancel_outcome(&view, mode))
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
        // The first queued job and the first abandoned one, each the first unlocked row of the
        // (state, seq) index, then the older of the two. Both candidates stay locked until the
        // statement ends, a moment; the other workers skip them meanwhile.
        let sql = format!(
            "WITH queued AS (SELECT seq FROM jobs WHERE state = 'queued' AND route = ANY($3) \
                 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED), \
               abandoned AS (SELECT seq FROM jobs WHERE {} \
                 AND attempts < $2 AND route = ANY($3) \
                 ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED), \
               chosen AS (SELECT seq FROM queued UNION ALL SELECT seq FROM abandoned \
                 ORDER BY seq LIMIT 1) \
             UPDATE jobs SET {} FROM chosen WHERE jobs.seq = chosen.seq \
             RETURNING {JOB_COLUMNS}, lease_expires_at",
            reclaimable(NOW),
            claim_set("$1", &format!("{NOW} + $4"), NOW)
        );
        let routes: Vec<&str> = routes.iter().map(|r| r.id()).collect();
        let row: Option<ClaimedRow> = sqlx::query_as(&sql)
            .bind(worker.as_str())
            .bind(i64::from(policy.max_attempts))
            .bind(routes)
            .bind(duration_millis(policy.lease))
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(|row| {
            row.job
                .into_lease(worker, from_millis(row.lease_expires_at)?)
        })
        .transpose()
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        report: &StepReport,
        extend_by: Duration,
    ) -> Result<HeartbeatAck, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "UPDATE jobs SET {} WHERE {} RETURNING lease_expires_at, cancel_requested",
                heartbeat_set(&format!("{NOW} + $1"), "$2", "$3", "$4", "$5"),
                held("$6", "$7")
            )
        });
        let (progress, preview) = (report.progress, report.preview.as_ref());
        let row: Option<(i64, bool)> = sqlx::query_as(&SQL)
            .bind(duration_millis(extend_by))
            .bind(progress.map(|p| i64::from(p.step)))
            .bind(progress.map(|p| i64::from(p.total)))
            .bind(preview.map(|p| p.key.as_str()))
            .bind(preview.map(|p| i64::from(p.step)))
            .bind(lease.job.id.to_string())
            .bind(lease.fencing_token)
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        let (until, cancel_requested) = row.ok_or(StoreError::LeaseLost(lease.job.id))?;
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
            held("$1", "$2")
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
        Ok(())
    }

    async fn fail_abandoned(&self, max_attempts: u32) -> Result<u64, StoreError> {
        // One statement: both kinds of abandoned job end, and their outbox rows are written,
        // together (each CTE's UPDATE sees the snapshot, so no row is ended twice: the two
        // conditions exclude each other).
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH cancelled AS (UPDATE jobs SET state = 'cancelled', finished_at = {NOW}, \
                   lease_expires_at = NULL, {expire} WHERE {} RETURNING id), \
                 failed AS (UPDATE jobs SET state = 'failed', error = $1, finished_at = {NOW}, \
                   lease_expires_at = NULL, {expire} WHERE {} AND attempts >= $2 RETURNING id), \
                 ended AS (SELECT id FROM cancelled UNION ALL SELECT id FROM failed), \
                 announced AS ({}) \
                 SELECT COUNT(*) FROM ended",
                cancel_abandoned(NOW),
                reclaimable(NOW),
                announce(NOW, "ANY (SELECT id FROM ended)"),
                expire = expire_from_now(NOW),
            )
        });
        let ended: i64 = sqlx::query_scalar(&SQL)
            .bind(serde_json::to_string(&worker_lost(max_attempts)).map_err(backend)?)
            .bind(i64::from(max_attempts))
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(ended as u64)
    }

    async fn purge_expired(&self, now: OffsetDateTime) -> Result<Vec<BlobKey>, StoreError> {
        // One statement: each record is deleted by exactly one sweeper, which alone gets its
        // files back (the SELECT reads the snapshot before the cascade removed `job_blobs` and
        // the webhook deliveries).
        let sql = format!(
            "WITH gone AS (DELETE FROM jobs WHERE expires_at <= $1 AND {TERMINAL} \
               RETURNING id, preview_key) \
             SELECT b.blob_key FROM job_blobs b JOIN gone ON gone.id = b.job_id \
             UNION ALL SELECT preview_key FROM gone WHERE preview_key IS NOT NULL"
        );
        let keys: Vec<String> = sqlx::query_scalar(&sql)
            .bind(millis(now))
            .fetch_all(&self.pool)
            .await
            .map_err(backend)?;
        blob_keys(keys)
    }

    async fn blob_is_live(&self, key: &BlobKey) -> Result<bool, StoreError> {
        static SQL: LazyLock<String> = LazyLock::new(|| live_blob("$1", NOW));
        let live: Option<i32> = sqlx::query_scalar(&SQL)
            .bind(key.as_str())
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
        // Concurrent dispatchers on any node skip the rows another is claiming.
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH chosen AS (SELECT request_id FROM webhook_deliveries WHERE {} \
                   ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
                 UPDATE webhook_deliveries w SET due_at = {NOW} + $2, \
                   claim_token = w.claim_token + 1 \
                 FROM chosen WHERE w.request_id = chosen.request_id \
                 RETURNING {}",
                due(NOW),
                DELIVERY_COLUMNS
                    .split(", ")
                    .map(|c| format!("w.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        let rows: Vec<DeliveryRow> = sqlx::query_as(&SQL)
            .bind(i64::from(limit))
            .bind(duration_millis(claim_for))
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
                attempt_set(
                    "(attempts::jsonb || jsonb_build_array($1::jsonb))::text",
                    NOW,
                    "$2",
                    "$3"
                ),
                claimed("$4", "$5")
            )
        });
        let (state, retry_in) = after_attempt(next);
        let done = sqlx::query(&SQL)
            .bind(serde_json::to_string(&attempt).map_err(backend)?)
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
        static SQL: LazyLock<String> = LazyLock::new(|| webhook_record("$1", "$2", NOW));
        let row: Option<DeliveryRow> = sqlx::query_as(&SQL)
            .bind(id.to_string())
            .bind(owner.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(backend)?;
        row.map(DeliveryRow::into_record).transpose()
    }

    fn subscribe(&self) -> JobEvents {
        self.events.subscribe()
    }
}
