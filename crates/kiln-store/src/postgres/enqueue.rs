//! A submit: one transaction under the cluster-wide submit lock ([`ENQUEUE_LOCK`]), making the
//! same decisions in the same order as SQLite's group commit: a repeated idempotency key
//! (replay or conflict), then the whole queue's limit, then the owner's, then the insert.
//!
//! The lock is taken by the transaction's first statement and held until its commit, so every
//! later statement here (each reading what committed before it, under read committed) sees
//! every earlier submit of every node; no two submits can both take the last place in the queue.

use super::{backend, duration_millis, PgStore, ENQUEUE_LOCK};
use crate::record::millis;
use kiln_core::job::{JobView, NewJob};
use kiln_core::store::{Enqueued, Idempotency, QueueLimits, StoreError};
use sqlx::{PgConnection, PgPool};

/// What one submit is told: its outcome (a job, a replay, a refusal).
type Outcome = Result<Enqueued, StoreError>;

pub(super) async fn enqueue(
    pool: &PgPool,
    job: NewJob,
    idempotency: Option<Idempotency>,
    limits: QueueLimits,
) -> Outcome {
    let params_json = serde_json::to_string(&job.params).map_err(backend)?;
    let mut tx = pool.begin().await.map_err(backend)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(ENQUEUE_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
    let outcome = decide(&mut tx, &job, &params_json, idempotency.as_ref(), limits).await?;
    // Committed whatever the outcome: a refusal may have forgotten an expired idempotency key.
    tx.commit().await.map_err(backend)?;
    outcome
}

/// The submit's outcome inside the locked transaction. The outer error is the backend's (the
/// transaction is then rolled back), the inner one the submit's own refusal.
async fn decide(
    conn: &mut PgConnection,
    job: &NewJob,
    params_json: &str,
    idempotency: Option<&Idempotency>,
    limits: QueueLimits,
) -> Result<Outcome, StoreError> {
    if let Some(idem) = idempotency {
        if let Some(earlier) = earlier_submit(conn, job, idem).await? {
            return Ok(earlier);
        }
    }
    let owner = job.owner.to_string();
    let (depth, owner_depth): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COUNT(*) FILTER (WHERE owner = $1) FROM jobs WHERE state = 'queued'",
    )
    .bind(&owner)
    .fetch_one(&mut *conn)
    .await
    .map_err(backend)?;
    let (depth, owner_depth) = (depth as u64, owner_depth as u64);
    if depth >= limits.total {
        return Ok(Err(StoreError::QueueFull { depth }));
    }
    if owner_depth >= limits.per_owner {
        return Ok(Err(StoreError::OwnerQueueFull {
            queued: owner_depth,
        }));
    }
    insert(conn, job, params_json, idempotency).await?;
    // FIFO: every job queued before this one (all committed, under the lock) is ahead of it.
    Ok(Ok(Enqueued {
        view: JobView {
            job: job.clone().into_queued(),
            queue_position: Some(depth),
        },
        replayed: false,
    }))
}

/// Writes the job, the images stored with it (they die with its record at the latest) and its
/// idempotency key.
async fn insert(
    conn: &mut PgConnection,
    job: &NewJob,
    params_json: &str,
    idempotency: Option<&Idempotency>,
) -> Result<(), StoreError> {
    let (id, owner, now) = (
        job.id.to_string(),
        job.owner.to_string(),
        millis(job.created_at),
    );
    sqlx::query(
        "INSERT INTO jobs (id, owner, route, params, state, created_at, expires_at, webhook_url) \
         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7)",
    )
    .bind(&id)
    .bind(&owner)
    .bind(job.route.id())
    .bind(params_json)
    .bind(now)
    .bind(millis(job.expires_at))
    .bind(job.webhook.as_ref().map(|url| url.as_str()))
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    let stored: Vec<String> = job
        .params
        .stored_images()
        .into_iter()
        .map(|k| k.as_str().to_string())
        .collect();
    if !stored.is_empty() {
        sqlx::query("INSERT INTO job_blobs (blob_key, job_id) SELECT unnest($1::text[]), $2")
            .bind(stored)
            .bind(&id)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
    }
    if let Some(idem) = idempotency {
        // A key whose job is no longer visible is taken over by this job (SQLite: INSERT OR
        // REPLACE).
        sqlx::query(
            "INSERT INTO idempotency_keys (owner, key, fingerprint, job_id, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner, key) DO UPDATE SET \
               fingerprint = EXCLUDED.fingerprint, job_id = EXCLUDED.job_id, \
               created_at = EXCLUDED.created_at",
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
    Ok(())
}

/// The outcome of a repeated idempotency key, if `idem` was used within its window: the original
/// job (replayed), or a conflict when the request differs. `None`: submit as new.
async fn earlier_submit(
    conn: &mut PgConnection,
    job: &NewJob,
    idem: &Idempotency,
) -> Result<Option<Outcome>, StoreError> {
    let (owner, now) = (job.owner.to_string(), millis(job.created_at));
    sqlx::query("DELETE FROM idempotency_keys WHERE owner = $1 AND key = $2 AND created_at <= $3")
        .bind(&owner)
        .bind(&idem.key)
        .bind(now - duration_millis(idem.window))
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    let earlier: Option<(String, String)> = sqlx::query_as(
        "SELECT fingerprint, job_id FROM idempotency_keys WHERE owner = $1 AND key = $2",
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
    // The key's row dies with its job (cascade), so the original still exists; visible at the
    // instant of this submit, as in SQLite.
    let view = PgStore::view(&mut *conn, &job_id, Some(&owner), Some(now)).await?;
    Ok(view.map(|view| {
        Ok(Enqueued {
            view,
            replayed: true,
        })
    }))
}
