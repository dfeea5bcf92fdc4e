//! The queue/record store and the key store. SQLite serves one machine; PostgreSQL serves many.
//! Both implement these traits, so callers never change with the backend.
//!
//! Leases and fencing: [`JobStore::claim`] hands a worker a [`Lease`] carrying a fencing token
//! that increases with every claim of the job. Every later write of that worker names the token;
//! once the lease has expired and another worker has claimed the job, the old token no longer
//! matches and the write is refused with [`StoreError::LeaseLost`]. A stale worker can therefore
//! never overwrite a job another worker now owns.
//!
//! Events: [`JobStore::subscribe`] yields a [`JobEvent`] for each submit and each change of a
//! job's state (and progress) after it commits. They are hints, not a log: a subscriber that
//! falls behind, or a store that loses its connection to the events' source, hands out
//! [`JobNotice::Resync`] instead of what was missed, and whoever needs the truth reads the store.

use crate::catalog::Route;
use crate::ids::{BlobKey, KeyId, RequestId, WorkerId};
use crate::job::{
    CancelMode, CancelOutcome, Job, JobError, JobOutput, JobState, JobView, NewJob, Progress,
    StatusView, StepReport,
};
use crate::webhook::{AfterAttempt, WebhookAttempt, WebhookDelivery, WebhookRecord};
use async_trait::async_trait;
use std::time::Duration;
use time::OffsetDateTime;
use tokio::sync::broadcast;

/// Clone: one failure can be the answer to many callers (see [`Cause`]).
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The queue holds as many jobs as it may.
    #[error("the queue is full ({depth} jobs waiting)")]
    QueueFull { depth: u64 },
    /// The submitting key has as many jobs waiting as one key may.
    #[error("this API key has {queued} jobs waiting, the most one key may have queued")]
    OwnerQueueFull { queued: u64 },
    /// This worker's lease was taken over (it expired) or the job has ended.
    #[error("the lease on job {0} is no longer held by this worker")]
    LeaseLost(RequestId),
    /// The idempotency key was used before, by the same token, for a different request.
    #[error("this Idempotency-Key was already used for a different request")]
    IdempotencyConflict,
    #[error("no API key named '{0}'")]
    NoSuchKey(String),
    #[error("an API key named '{0}' already exists")]
    DuplicateKeyName(String),
    /// The backend failed (I/O, connection, a statement). Not shown to clients. `backend` names
    /// which one (`sqlite`, `postgres`); the cause is kept for the log.
    #[error("the {backend} store failed")]
    Backend {
        backend: &'static str,
        #[source]
        source: Cause,
    },
    /// A stored record could not be read back into the domain (a column out of range, JSON
    /// that no longer parses, a state without what that state must carry).
    #[error("a stored job record is corrupt ({what})")]
    Corrupt {
        what: &'static str,
        #[source]
        source: Cause,
    },
    /// The store was closed (the process is shutting down) while the call waited.
    #[error("the store has been closed")]
    Closed,
}

/// A backend failure's cause. Shared, because one failure can answer many callers: a group
/// commit that fails fails every submit in its batch with the same cause.
pub type Cause = std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>;

impl StoreError {
    /// A failure of `backend`, keeping `source` as the cause.
    pub fn backend(
        backend: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            backend,
            source: std::sync::Arc::new(source),
        }
    }

    /// A record whose `what` did not read back, for the reason `detail`.
    pub fn corrupt(what: &'static str, detail: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            what,
            source: std::sync::Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
                detail.to_string(),
            )),
        }
    }
}

/// How many jobs may wait in the queue: in all (back-pressure for the whole service), and per
/// API key (so that one key cannot fill the shared queue for everyone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub total: u64,
    pub per_owner: u64,
}

impl QueueLimits {
    /// A limit on the whole queue only (one key may fill it).
    pub fn total(total: u64) -> Self {
        Self {
            total,
            per_owner: total,
        }
    }
}

/// An idempotency key as the client sent it, scoped to its token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    /// A digest of the request (route and parameters): a repeat with another body is a conflict.
    pub fingerprint: String,
    /// Keys older than this are forgotten.
    pub window: Duration,
}

/// What a submit got: a new job, or the original one for a repeated idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct Enqueued {
    pub view: JobView,
    pub replayed: bool,
}

/// A worker's hold on a running job.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The job as claimed (its status is `Running`).
    pub job: Job,
    /// When this claim started the job.
    pub started_at: OffsetDateTime,
    /// Which claim of the job this is: 1 for the first, more after lease expiries.
    pub attempt: u32,
    pub worker: WorkerId,
    /// Increases with every claim of this job; writes must carry the current one.
    pub fencing_token: i64,
    pub expires_at: OffsetDateTime,
}

/// What a heartbeat learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// The lease's new end.
    pub expires_at: OffsetDateTime,
    /// A forced cancel was asked for: stop and end the job with [`JobStore::end_cancelled`].
    pub cancel_requested: bool,
}

/// Counts per state, for metrics and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateCounts {
    pub counts: Vec<(JobState, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimPolicy {
    pub lease: Duration,
    /// A job claimed this many times whose lease runs out again is failed (`worker_lost`)
    /// rather than taken once more, so one poisonous job cannot kill workers forever.
    pub max_attempts: u32,
}

/// Where a listing of one owner's jobs goes on: strictly before (older than) the job it was
/// taken from. It wraps the job's place in submission order (the store's `seq`, which only
/// grows and which both backends hand out in commit order), so a page boundary never moves:
/// jobs submitted meanwhile are newer and never shift the older pages, and no job is listed
/// twice or skipped. Clients see it only encoded by the HTTP layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobCursor(i64);

impl JobCursor {
    /// The cursor at submission position `position` (a value a store handed out, or one the
    /// HTTP layer decoded: any value is safe, as a listing is always scoped to its owner).
    pub fn new(position: i64) -> Self {
        Self(position)
    }

    /// The submission position, for the store's query and the HTTP layer's encoding.
    pub fn position(self) -> i64 {
        self.0
    }
}

/// One page of an owner's jobs, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Where the next (older) page starts; `None` when no older job is visible.
    pub next: Option<JobCursor>,
}

/// A committed change of one job: a submit (`Queued`), a claim (`Running`, also when a job whose
/// lease ran out is taken again), progress reported by a heartbeat (`Running` with `progress`),
/// a release (`Queued` again), the end of the job (`Succeeded`, `Failed`, `Cancelled`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub id: RequestId,
    pub owner: KeyId,
    pub route: Route,
    /// The state the change left the job in.
    pub state: JobState,
    /// The latest step of a running job, when the change recorded one.
    pub progress: Option<Progress>,
}

/// What a subscription hands out next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobNotice {
    Event(JobEvent),
    /// Events may have been missed (this subscriber fell behind, or the store lost the connection
    /// its events come through): what the subscriber follows should be read again.
    Resync,
}

/// One subscriber's view of a store's events ([`JobStore::subscribe`]). Each subscriber has its
/// own buffer; a slow one misses events (and is told so) rather than slowing the store down.
#[derive(Debug)]
pub struct JobEvents {
    receiver: broadcast::Receiver<JobNotice>,
}

impl JobEvents {
    /// A subscription through `receiver` (a backend hands one out from `subscribe`).
    pub fn new(receiver: broadcast::Receiver<JobNotice>) -> Self {
        Self { receiver }
    }

    /// The next notice, waiting for it; `None` once the store is gone.
    pub async fn recv(&mut self) -> Option<JobNotice> {
        match self.receiver.recv().await {
            Ok(notice) => Some(notice),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(JobNotice::Resync),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// The next notice if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<JobNotice> {
        match self.receiver.try_recv() {
            Ok(notice) => Some(notice),
            Err(broadcast::error::TryRecvError::Lagged(_)) => Some(JobNotice::Resync),
            Err(broadcast::error::TryRecvError::Empty | broadcast::error::TryRecvError::Closed) => {
                None
            }
        }
    }
}

#[async_trait]
pub trait JobStore: Send + Sync {
    /// Commits a new job (or finds the original of a repeated idempotency key). Returns only
    /// once the job is durable. Fails with `QueueFull` when `limits.total` jobs already wait, and
    /// with `OwnerQueueFull` when `limits.per_owner` jobs of the job's owner do.
    async fn enqueue(
        &self,
        job: NewJob,
        idempotency: Option<Idempotency>,
        limits: QueueLimits,
    ) -> Result<Enqueued, StoreError>;

    /// The job if it exists, belongs to `owner` and has not expired.
    async fn get(&self, owner: KeyId, id: RequestId) -> Result<Option<JobView>, StoreError>;

    /// What a status poll shows of the job [`JobStore::get`] would return: the same visibility,
    /// without reading the stored parameters or output. Equal to `StatusView::from` of `get`'s
    /// view at the same instant.
    async fn status(&self, owner: KeyId, id: RequestId) -> Result<Option<StatusView>, StoreError>;

    /// The visible jobs of `owner` (as [`JobStore::get`] sees them: expired ones are not),
    /// newest first, at most `limit`, strictly older than `before` when given.
    async fn list_jobs(
        &self,
        owner: KeyId,
        before: Option<JobCursor>,
        limit: u32,
    ) -> Result<JobPage, StoreError>;

    /// Cancels a queued job of `owner`; with [`CancelMode::Force`], also marks a running one
    /// to be stopped (its worker learns it at its next heartbeat). `None` when there is no such
    /// (visible) job.
    async fn cancel(
        &self,
        owner: KeyId,
        id: RequestId,
        mode: CancelMode,
    ) -> Result<Option<CancelOutcome>, StoreError>;

    /// Takes the oldest queued job of one of `routes` (or one whose lease ran out).
    async fn claim(
        &self,
        worker: &WorkerId,
        routes: &[Route],
        policy: ClaimPolicy,
    ) -> Result<Option<Lease>, StoreError>;

    /// Extends the lease and records progress and the latest preview. `LeaseLost` tells the
    /// worker to stop; so does `cancel_requested` in the answer.
    async fn heartbeat(
        &self,
        lease: &Lease,
        report: &StepReport,
        extend_by: Duration,
    ) -> Result<HeartbeatAck, StoreError>;

    /// Ends the job `succeeded` with its output.
    async fn complete(&self, lease: &Lease, output: JobOutput) -> Result<(), StoreError>;

    /// Ends the job `failed`.
    async fn fail(&self, lease: &Lease, error: JobError) -> Result<(), StoreError>;

    /// Ends a running job whose forced cancel its worker honoured: `cancelled`.
    async fn end_cancelled(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Puts a running job back at the head of the queue (graceful shutdown), keeping its attempt count.
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Fails jobs whose lease ran out after their last allowed attempt, and cancels those whose
    /// lease ran out with a forced cancel pending; returns how many ended.
    async fn fail_abandoned(&self, max_attempts: u32) -> Result<u64, StoreError>;

    /// Deletes records that expired before `now` (with their webhook deliveries) and returns
    /// the blobs they referenced (images, stored inputs, the last preview).
    async fn purge_expired(&self, now: OffsetDateTime) -> Result<Vec<BlobKey>, StoreError>;

    /// Whether `key` is referenced by a live (unexpired) job, as an output, a stored input or
    /// its current preview: capability URLs stop working when the record goes (a preview's, as
    /// soon as the next one replaces it).
    async fn blob_is_live(&self, key: &BlobKey) -> Result<bool, StoreError>;

    async fn state_counts(&self) -> Result<StateCounts, StoreError>;

    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Takes up to `limit` webhook deliveries that are due (their next attempt's time has come,
    /// or a claim on them ran out), each for `claim_for`: meanwhile no other dispatcher takes it.
    async fn claim_webhooks(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<WebhookDelivery>, StoreError>;

    /// Records an attempt at a claimed delivery and what follows it. `LeaseLost` (naming the
    /// request) when the claim was taken over meanwhile; nothing is recorded then.
    async fn record_webhook_attempt(
        &self,
        delivery: &WebhookDelivery,
        attempt: WebhookAttempt,
        next: AfterAttempt,
    ) -> Result<(), StoreError>;

    /// The terminal announcement of request `id` of `owner`, once the job has ended with a
    /// webhook named (`None` before, or without one).
    async fn webhook_record(
        &self,
        owner: KeyId,
        id: RequestId,
    ) -> Result<Option<WebhookRecord>, StoreError>;

    /// Events of the changes committed from now on (which writers a backend reports is its own
    /// to document: every node's for PostgreSQL, this process's for SQLite).
    fn subscribe(&self) -> JobEvents;
}

/// An API key as listed (never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub id: KeyId,
    pub name: String,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
    /// The first characters of the token, to tell keys apart.
    pub prefix: String,
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a key under `name` with the token's hash.
    async fn insert_key(
        &self,
        name: &str,
        token_hash: &str,
        prefix: &str,
    ) -> Result<ApiKey, StoreError>;
    async fn list_keys(&self) -> Result<Vec<ApiKey>, StoreError>;
    /// Revokes the key named `name`. Revoking twice is harmless.
    async fn revoke_key(&self, name: &str) -> Result<ApiKey, StoreError>;
    /// The live key whose token hashes to `token_hash`.
    async fn key_by_hash(&self, token_hash: &str) -> Result<Option<ApiKey>, StoreError>;
    /// How many keys exist, revoked ones included (a first start has none).
    async fn key_count(&self) -> Result<u64, StoreError>;
}
