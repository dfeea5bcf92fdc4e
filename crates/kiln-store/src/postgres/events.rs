//! The store's listening connection: every notification on `kiln_jobs` (written by the `jobs`
//! triggers, on commit, by any node) becomes a [`JobNotice::Event`] for this store's
//! subscribers.
//!
//! The connection is its own (a pool of one, apart from the store's), held for the store's life.
//! When it is lost, notifications sent meanwhile are lost with it: once listening again the task
//! sends [`JobNotice::Resync`], and subscribers re-read what they follow (their polling is the
//! fallback in any case).

use super::{backend, CONNECT_TIMEOUT};
use crate::common::{event_key, Events};
use kiln_core::job::{JobState, Progress};
use kiln_core::report::Chain;
use kiln_core::store::{JobEvent, JobNotice, StoreError};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use sqlx::PgPool;
use std::time::Duration;
use tokio::task::JoinHandle;

/// The channel the `jobs` triggers notify.
const CHANNEL: &str = "kiln_jobs";

/// The wait before listening again after a failure, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The running listener task; dropping this (with the store's last clone) stops it and closes
/// its connection.
pub(super) struct Listener {
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Listener {
    /// Listens on `kiln_jobs` before returning, so that every change committed after `connect`
    /// returns is heard; then hands notifications to `events` from a task of its own.
    pub(super) async fn start(
        options: PgConnectOptions,
        events: Events,
    ) -> Result<Listener, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(CONNECT_TIMEOUT)
            // The connection is held for ever: no lifetime or idle limit applies to it.
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(options);
        let listener = listen(&pool).await.map_err(backend)?;
        let task = tokio::spawn(run(pool, listener, events));
        Ok(Listener { task })
    }
}

async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}

async fn run(pool: PgPool, mut listener: PgListener, events: Events) {
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => match event(notification.payload()) {
                Ok(event) => events.send(JobNotice::Event(event)),
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), "a job event could not be read; subscribers resync");
                    events.send(JobNotice::Resync);
                }
            },
            // The connection was lost and sqlx has opened and listened on a new one.
            Ok(None) => {
                tracing::warn!(
                    "the job events' connection was lost and reopened; subscribers resync"
                );
                events.send(JobNotice::Resync);
            }
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "listening for job events failed; listening again");
                drop(listener);
                listener = relisten(&pool).await;
                events.send(JobNotice::Resync);
            }
        }
    }
}

/// A new listener, retried with a growing pause until the server answers.
async fn relisten(pool: &PgPool) -> PgListener {
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::time::sleep(backoff).await;
        match listen(pool).await {
            Ok(listener) => return listener,
            Err(e) => {
                tracing::warn!(error = %Chain(&e), retry_in = ?backoff, "listening for job events failed");
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// A notification's payload, as `kiln_notify_job()` builds it.
#[derive(serde::Deserialize)]
struct Payload {
    id: String,
    owner: String,
    route: String,
    state: String,
    step: Option<i64>,
    total: Option<i64>,
}

fn event(payload: &str) -> Result<JobEvent, StoreError> {
    let p: Payload =
        serde_json::from_str(payload).map_err(|e| StoreError::corrupt("job event", e))?;
    let (id, owner, route) = event_key(&(p.id, p.owner, p.route))?;
    let state = JobState::parse(&p.state).ok_or_else(|| StoreError::corrupt("state", &p.state))?;
    let progress = match (state, p.step, p.total) {
        (JobState::Running, Some(step), Some(total)) => Some(Progress {
            step: u32::try_from(step).map_err(|e| StoreError::corrupt("progress", e))?,
            total: u32::try_from(total).map_err(|e| StoreError::corrupt("progress", e))?,
        }),
        _ => None,
    };
    Ok(JobEvent {
        id,
        owner,
        route,
        state,
        progress,
    })
}
