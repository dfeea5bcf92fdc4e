//! Group commit of submits: concurrent [`JobStore::enqueue`] calls share one `BEGIN IMMEDIATE`
//! transaction and so one `synchronous = FULL` sync, which is what a submit's latency and the
//! store's submit rate are bound by.
//!
//! Each call sends its job to one committer task per store and waits on its own answer. The
//! committer takes whatever is waiting (up to [`MAX_BATCH`]), runs every job through the same
//! checks a lone submit gets, in arrival order, inside one transaction, commits, and only then
//! answers each caller: a job is durable before its caller hears of it, as before. While one
//! batch syncs the next one gathers, so under load batches grow by themselves and with one
//! client nothing waits for company.
//!
//! Outcomes stay per job: an idempotency replay or conflict and a full queue are decided by
//! reads inside the transaction before the job writes anything, and counted within the batch
//! (the second of two jobs with one key in a batch replays the first; the queue depth grows with
//! each job inserted). Only a failure of the backend itself (I/O, the transaction) fails the
//! batch, and then every caller in it gets the error and none of its jobs was committed.
//!
//! Each new job's `Queued` event is published once its batch has committed (a replay is no
//! change and publishes nothing).
//!
//! [`JobStore::enqueue`]: kiln_core::store::JobStore::enqueue

use crate::common::Events;
use crate::record::millis;
use crate::sqlite::{backend, duration_millis, SqliteStore};
use kiln_core::job::{JobState, JobView, NewJob};
use kiln_core::store::{Enqueued, Idempotency, QueueLimits, StoreError};
use sqlx::{SqliteConnection, SqlitePool};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// The most submits one transaction takes. Large enough that the sync is shared widely, small
/// enough that the worker's writes do not wait long behind a batch.
pub(crate) const MAX_BATCH: usize = 256;
/// Submits that may wait for the committer before `enqueue` itself waits to hand its job over.
pub(crate) const WAITING: usize = 4 * MAX_BATCH;

/// One caller's job, with the parameters already serialised (that cannot fail in the batch).
pub(crate) struct PendingEnqueue {
    pub job: NewJob,
    pub params_json: String,
    pub idempotency: Option<Idempotency>,
    pub limits: QueueLimits,
    pub answer: oneshot::Sender<Outcome>,
}

/// What one caller is told.
pub(crate) type Outcome = Result<Enqueued, StoreError>;

/// The committer's end of the channel; it runs until every sender (every clone of the store) is
/// gone.
pub(crate) async fn run_committer(
    pool: SqlitePool,
    mut waiting: mpsc::Receiver<PendingEnqueue>,
    events: Events,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        match commit_batch(&pool, &batch).await {
            Ok(outcomes) => {
                for (pending, outcome) in batch.drain(..).zip(outcomes) {
                    if let Ok(Enqueued {
                        replayed: false, ..
                    }) = &outcome
                    {
                        let job = &pending.job;
                        events.changed((job.id, job.owner, job.route), JobState::Queued, None);
                    }
                    // A caller that stopped waiting (its client went away) needs no answer;
                    // its job is committed all the same, as a lone submit's would be.
                    let _ = pending.answer.send(outcome);
                }
            }
            Err(error) => {
                tracing::warn!(
                    jobs = batch.len(),
                    error = &error as &dyn std::error::Error,
                    "a batch of submits failed"
                );
                for pending in batch.drain(..) {
                    let _ = pending.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Runs `batch` in one transaction and commits it: each job's outcome, or the error that
/// stopped the whole batch (nothing of it is then committed).
async fn commit_batch(
    pool: &SqlitePool,
    batch: &[PendingEnqueue],
) -> Result<Vec<Outcome>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.map_err(backend)?;
    let depth: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
    let mut depths = QueueDepths {
        total: depth as u64,
        by_owner: HashMap::new(),
    };
    let mut outcomes = Vec::with_capacity(batch.len());
    for pending in batch {
        outcomes.push(enqueue_one(&mut tx, pending, &mut depths).await?);
    }
    tx.commit().await.map_err(backend)?;
    Ok(outcomes)
}

/// The queue's length so far in the batch: in all, and for each owner asked about (read once,
/// then counted along with the batch's inserts).
struct QueueDepths {
    total: u64,
    by_owner: HashMap<String, u64>,
}

impl QueueDepths {
    async fn of_owner(
        &mut self,
        conn: &mut SqliteConnection,
        owner: &str,
    ) -> Result<&mut u64, StoreError> {
        if !self.by_owner.contains_key(owner) {
            let queued: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND owner = ?",
            )
            .bind(owner)
            .fetch_one(&mut *conn)
            .await
            .map_err(backend)?;
            self.by_owner.insert(owner.to_string(), queued as u64);
        }
        Ok(self.by_owner.get_mut(owner).expect("inserted above"))
    }
}

/// One job inside the batch's transaction. The outer error is the backend's (it ends the
/// batch), the inner one this job's own outcome.
async fn enqueue_one(
    conn: &mut SqliteConnection,
    pending: &PendingEnqueue,
    depths: &mut QueueDepths,
) -> Result<Outcome, StoreError> {
    let job = &pending.job;
    if let Some(idem) = &pending.idempotency {
        if let Some(earlier) = earlier_submit(conn, job, idem).await? {
            return Ok(earlier);
        }
    }
    if depths.total >= pending.limits.total {
        return Ok(Err(StoreError::QueueFull {
            depth: depths.total,
        }));
    }
    let owner_depth = *depths.of_owner(conn, &job.owner.to_string()).await?;
    if owner_depth >= pending.limits.per_owner {
        return Ok(Err(StoreError::OwnerQueueFull {
            queued: owner_depth,
        }));
    }
    let (id, owner, now) = (
        job.id.to_string(),
        job.owner.to_string(),
        millis(job.created_at),
    );
    sqlx::query(
        "INSERT INTO jobs (id, owner, route, params, state, created_at, expires_at, webhook_url) \
         VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
    )
    .bind(&id)
    .bind(&owner)
    .bind(job.route.id())
    .bind(&pending.params_json)
    .bind(now)
    .bind(millis(job.expires_at))
    .bind(job.webhook.as_ref().map(|url| url.as_str()))
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    // Images stored with the job die with its record at the latest (the worker deletes them
    // when the job ends).
    for key in job.params.stored_images() {
        sqlx::query("INSERT INTO job_blobs (blob_key, job_id) VALUES (?, ?)")
            .bind(key.as_str())
            .bind(&id)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
    }
    if let Some(idem) = &pending.idempotency {
        sqlx::query(
            "INSERT OR REPLACE INTO idempotency_keys (owner, key, fingerprint, job_id, created_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&owner)
        .bind(&idem.key)
        .bind(&idem.fingerprint)
        .bind(&id)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    }
    // FIFO: everything queued before this insert, in earlier batches or this one, is ahead.
    let position = depths.total;
    depths.total += 1;
    *depths.of_owner(conn, &owner).await? += 1;
    Ok(Ok(Enqueued {
        view: queued_view(job.clone(), position),
        replayed: false,
    }))
}

/// The outcome of a repeated idempotency key, if `idem` was used within its window: the original
/// job (replayed), or a conflict when the request differs. `None`: submit as new.
async fn earlier_submit(
    conn: &mut SqliteConnection,
    job: &NewJob,
    idem: &Idempotency,
) -> Result<Option<Outcome>, StoreError> {
    let (owner, now) = (job.owner.to_string(), millis(job.created_at));
    sqlx::query("DELETE FROM idempotency_keys WHERE owner = ? AND key = ? AND created_at <= ?")
        .bind(&owner)
        .bind(&idem.key)
        .bind(now - duration_millis(idem.window))
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    let earlier: Option<(String, String)> = sqlx::query_as(
        "SELECT fingerprint, job_id FROM idempotency_keys WHERE owner = ? AND key = ?",
    )
    .bind(&owner)
    .bind(&idem.key)
    .fetch_optional(&mut *conn)
    .await
    .map_err(backend)?;
    let Some((fingerprint, job_id)) = earlier else {
        return Ok(None);
    };
    if fingerprint != idem.fingerprint {
        return Ok(Some(Err(StoreError::IdempotencyConflict)));
    }
    // The key's row dies with its job (cascade), so the original is still visible.
    let view = SqliteStore::view(conn, &job_id, Some(&owner), now).await?;
    Ok(view.map(|view| {
        Ok(Enqueued {
            view,
            replayed: true,
        })
    }))
}

/// The view of a job just inserted at `position` in the queue.
fn queued_view(job: NewJob, position: u64) -> JobView {
    JobView {
        job: job.into_queued(),
        queue_position: Some(position),
    }
}
