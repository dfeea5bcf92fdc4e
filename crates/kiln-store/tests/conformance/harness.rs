//! What every case needs: a fresh store of one backend ([`Backend`]), more handles on the same
//! database, and small builders for jobs, outputs and assertions.

use kiln_core::catalog::Route;
use kiln_core::ids::{KeyId, RequestId, WorkerId};
use kiln_core::job::{JobError, JobErrorCode, JobState, JobView, NewJob, StatusView};
use kiln_core::store::{ClaimPolicy, JobStore, KeyStore, Lease, QueueLimits, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;

/// A backend under test: a fresh, empty store per test, and more handles on the same database,
/// each with its own connections (as another process would have).
#[allow(async_fn_in_trait)]
pub trait Backend: Sized + 'static {
    type Store: JobStore + KeyStore + 'static;

    /// A fresh store; `None` when the backend is not available here (the test is skipped, and
    /// the reason was printed).
    async fn open() -> Option<Self>;

    /// The store the test opened.
    fn store(&self) -> Arc<Self::Store>;

    /// Another handle on the same database with connections of its own.
    async fn another_handle(&self) -> Arc<Self::Store>;

    /// Runs `sql` on the database itself, past the store (as an older kiln wrote its records).
    async fn execute(&self, sql: &str);

    /// `n` handles: the test's own, then `n - 1` others.
    async fn handles(&self, n: usize) -> Vec<Arc<Self::Store>> {
        let mut handles = vec![self.store()];
        while handles.len() < n {
            handles.push(self.another_handle().await);
        }
        handles
    }
}

/// SQLite: a file in a temporary directory; more handles open the same file.
pub struct Sqlite {
    store: Arc<kiln_store::SqliteStore>,
    path: std::path::PathBuf,
    // Declared last: dropped after the store.
    _dir: tempfile::TempDir,
}

impl Backend for Sqlite {
    type Store = kiln_store::SqliteStore;

    async fn open() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let store = kiln_store::SqliteStore::open(&path).await.unwrap();
        Some(Self {
            store: Arc::new(store),
            path,
            _dir: dir,
        })
    }

    fn store(&self) -> Arc<Self::Store> {
        self.store.clone()
    }

    async fn another_handle(&self) -> Arc<Self::Store> {
        Arc::new(kiln_store::SqliteStore::open(&self.path).await.unwrap())
    }

    async fn execute(&self, sql: &str) {
        let conn = rusqlite::Connection::open(&self.path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute_batch(sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// PostgreSQL: a fresh database per test (`kiln_testkit::postgres`); more handles connect again
/// (each its own pool). `None` when PostgreSQL does not answer outside CI.
pub struct Postgres {
    store: Arc<kiln_store::PgStore>,
    // Declared last: the database is dropped (WITH (FORCE)) after the store.
    database: kiln_testkit::postgres::TestDatabase,
}

impl Backend for Postgres {
    type Store = kiln_store::PgStore;

    async fn open() -> Option<Self> {
        let database = kiln_testkit::postgres::fresh_database().await?;
        let store = kiln_store::PgStore::connect(database.url())
            .await
            .unwrap_or_else(|e| panic!("PgStore::connect({}): {e:?}", database.url()));
        Some(Self {
            store: Arc::new(store),
            database,
        })
    }

    fn store(&self) -> Arc<Self::Store> {
        self.store.clone()
    }

    async fn another_handle(&self) -> Arc<Self::Store> {
        Arc::new(
            kiln_store::PgStore::connect(self.database.url())
                .await
                .unwrap(),
        )
    }

    async fn execute(&self, sql: &str) {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(self.database.url())
            .await
            .unwrap();
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

pub use kiln_core::job::{CancelMode, StepReport};
pub use kiln_testkit::jobs::{
    new_job, new_job_on, new_job_with_webhook, output, previewed, progressed, ROUTE, WEBHOOK,
};
pub const OTHER_ROUTE: Route = Route::Flux2FlexTextToImage;

/// Long enough never to run out during a test.
pub const LONG_LEASE: ClaimPolicy = ClaimPolicy {
    lease: Duration::from_secs(60),
    max_attempts: 3,
};

/// A lease that runs out during the test: [`PAST_SHORT`] later it has.
pub const SHORT_LEASE: ClaimPolicy = ClaimPolicy {
    lease: Duration::from_millis(300),
    max_attempts: 3,
};
pub const PAST_SHORT: Duration = Duration::from_millis(700);

/// No limit a test reaches.
pub const ROOMY: QueueLimits = QueueLimits {
    total: 100_000,
    per_owner: 100_000,
};

/// A job kept only `retention` after it ends.
pub fn short_lived(owner: KeyId, prompt: &str, retention: Duration) -> NewJob {
    let mut job = new_job(owner, prompt);
    job.expires_at = job.created_at + retention;
    job
}

pub fn engine_failed(message: &str) -> JobError {
    JobError {
        code: JobErrorCode::EngineFailed,
        message: message.into(),
    }
}

pub fn worker(name: &str) -> WorkerId {
    WorkerId::new(name)
}

/// Submits a job of `owner` with no limit in reach; its id.
pub async fn submit<S: JobStore + ?Sized>(store: &S, owner: KeyId, prompt: &str) -> RequestId {
    store
        .enqueue(new_job(owner, prompt), None, ROOMY)
        .await
        .unwrap()
        .view
        .job
        .id
}

/// A claim that must find a job.
pub async fn claim<S: JobStore + ?Sized>(store: &S, name: &str, policy: ClaimPolicy) -> Lease {
    store
        .claim(&worker(name), &[ROUTE], policy)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{name} found no job to claim"))
}

/// The job as its owner sees it; it must be visible. Every case that reads a job this way also
/// checks the status read against it, so the two reads agree in every state each case reaches.
pub async fn view<S: JobStore + ?Sized>(store: &S, owner: KeyId, id: RequestId) -> JobView {
    let view = store
        .get(owner, id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("job {id} is not visible to its owner"));
    let status = store.status(owner, id).await.unwrap();
    assert_eq!(
        status,
        Some(StatusView::from(&view)),
        "the status read of {id}"
    );
    view
}

/// Whether `id` is hidden from `owner` (unknown, another's or expired), asserting that the
/// status read agrees with the whole read.
pub async fn hidden<S: JobStore + ?Sized>(store: &S, owner: KeyId, id: RequestId) -> bool {
    let whole = store.get(owner, id).await.unwrap().is_none();
    let status = store.status(owner, id).await.unwrap().is_none();
    assert_eq!(
        whole, status,
        "get and status disagree on whether {id} is visible"
    );
    whole
}

/// Every state's count; each state must be reported exactly once.
pub async fn counts<S: JobStore + ?Sized>(store: &S) -> HashMap<JobState, u64> {
    let listed = store.state_counts().await.unwrap().counts;
    let counts: HashMap<_, _> = listed.iter().copied().collect();
    assert_eq!(
        (listed.len(), counts.len()),
        (JobState::ALL.len(), JobState::ALL.len()),
        "every state once: {listed:?}"
    );
    counts
}

/// The counts as `[queued, running, succeeded, failed, cancelled]`.
pub async fn count_list<S: JobStore + ?Sized>(store: &S) -> [u64; 5] {
    let counts = counts(store).await;
    JobState::ALL.map(|state| counts[&state])
}

/// `result` is `LeaseLost` for job `id`.
#[track_caller]
pub fn assert_lease_lost<T: std::fmt::Debug>(result: Result<T, StoreError>, id: RequestId) {
    match result {
        Err(StoreError::LeaseLost(lost)) => assert_eq!(lost, id, "LeaseLost names the job"),
        other => panic!("expected LeaseLost({id}), got {other:?}"),
    }
}

/// `a` and `b` within `tolerance` of each other (stores keep instants to the millisecond).
#[track_caller]
pub fn assert_close(a: OffsetDateTime, b: OffsetDateTime, tolerance: Duration, what: &str) {
    let gap = (a - b).abs();
    assert!(
        gap <= tolerance,
        "{what}: {a} and {b} are {gap} apart (at most {tolerance:?} allowed)"
    );
}

/// Runs `futures` as tasks at once and returns their outputs in order.
pub async fn all_at_once<T: Send + 'static>(
    futures: impl IntoIterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let tasks: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut outputs = Vec::with_capacity(tasks.len());
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}
