//! The PostgreSQL store on a real server, a fresh database per test
//! (`kiln_testkit::postgres::fresh_database`). Without a server they skip, except under CI (env
//! `CI` set), where they fail. The behaviour shared with SQLite is tested by the backend-neutral suite in `tests/`;
//! these cover what is PostgreSQL's own: concurrent starts, cross-node claims and events.

use super::PgStore;
use kiln_core::ids::{BlobKey, KeyId, WorkerId};
use kiln_core::job::{CancelMode, JobState, Progress, StepReport};
use kiln_core::store::{
    ClaimPolicy, JobEvent, JobEvents, JobNotice, JobStore, KeyStore, QueueLimits, StoreError,
};
use kiln_testkit::jobs::{new_job, output, progressed, ROUTE};
use kiln_testkit::postgres::fresh_database;
use std::time::Duration;

const POLICY: ClaimPolicy = ClaimPolicy {
    lease: Duration::from_secs(60),
    max_attempts: 3,
};
const LIMITS: QueueLimits = QueueLimits {
    total: 100,
    per_owner: 100,
};

/// The next event, skipping resyncs; fails after 10 s.
async fn next_event(events: &mut JobEvents) -> JobEvent {
    let wait = async {
        loop {
            match events.recv().await.expect("the store is gone") {
                JobNotice::Event(event) => return event,
                JobNotice::Resync => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("no event within 10 s")
}

#[tokio::test]
async fn two_nodes_start_together_then_share_the_queue() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let url = database.url();
    {
        // Both run the migrations at once: one waits on the advisory lock, then finds them done.
        let (a, b) = tokio::join!(PgStore::connect(url), PgStore::connect(url));
        let (a, b) = (a.unwrap(), b.unwrap());
        let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
            .fetch_one(&a.pool)
            .await
            .unwrap();
        assert_eq!(isolation, "read committed", "the submit lock relies on it");
        let owner = KeyId::new();
        let first = a
            .enqueue(new_job(owner, "one"), None, LIMITS)
            .await
            .unwrap();
        let second = a
            .enqueue(new_job(owner, "two"), None, LIMITS)
            .await
            .unwrap();
        assert_eq!(first.view.queue_position, Some(0));
        assert_eq!(second.view.queue_position, Some(1));
        let seen = b.get(owner, second.view.job.id).await.unwrap().unwrap();
        assert_eq!(seen.queue_position, Some(1));

        let worker = WorkerId::new("w".to_string());
        let lease = b.claim(&worker, &[ROUTE], POLICY).await.unwrap().unwrap();
        assert_eq!(lease.job.id, first.view.job.id, "the oldest job first");
        assert_eq!((lease.attempt, lease.fencing_token), (1, 1));
        let progress = Progress { step: 2, total: 4 };
        b.heartbeat(&lease, &progressed(progress), Duration::from_secs(60))
            .await
            .unwrap();
        let key = BlobKey::try_from("out-1.jpg".to_string()).unwrap();
        b.complete(&lease, output(vec![key.clone()])).await.unwrap();
        assert!(matches!(
            b.complete(&lease, output(vec![key.clone()])).await,
            Err(StoreError::LeaseLost(id)) if id == lease.job.id
        ));
        let done = a.get(owner, lease.job.id).await.unwrap().unwrap();
        assert_eq!(done.job.state(), JobState::Succeeded);
        assert!(a.blob_is_live(&key).await.unwrap());
        assert_eq!(
            a.get(owner, second.view.job.id)
                .await
                .unwrap()
                .unwrap()
                .queue_position,
            Some(0)
        );
        let counts = a.state_counts().await.unwrap().counts;
        assert!(counts.contains(&(JobState::Queued, 1)));
        assert!(counts.contains(&(JobState::Succeeded, 1)));
        a.ping().await.unwrap();

        a.insert_key("ci", "hash", "kiln_ab").await.unwrap();
        assert!(matches!(
            b.insert_key("ci", "hash2", "kiln_cd").await,
            Err(StoreError::DuplicateKeyName(name)) if name == "ci"
        ));
        assert_eq!(b.key_count().await.unwrap(), 1);
    }
}

#[tokio::test]
async fn another_node_hears_of_a_submit_and_its_changes() {
    let Some(database) = fresh_database().await else {
        return;
    };
    let url = database.url();
    {
        let a = PgStore::connect(url).await.unwrap();
        let b = PgStore::connect(url).await.unwrap();
        let mut heard = b.subscribe();
        let owner = KeyId::new();
        let job = a
            .enqueue(new_job(owner, "one"), None, LIMITS)
            .await
            .unwrap();
        let id = job.view.job.id;
        let expected = |state, progress| JobEvent {
            id,
            owner,
            route: ROUTE,
            state,
            progress,
        };
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Queued, None)
        );

        let lease = a
            .claim(&WorkerId::new("w".to_string()), &[ROUTE], POLICY)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Running, None)
        );
        // A heartbeat that changes nothing but the lease is no event; one with progress is.
        a.heartbeat(&lease, &StepReport::default(), Duration::from_secs(60))
            .await
            .unwrap();
        let progress = Progress { step: 1, total: 4 };
        a.heartbeat(&lease, &progressed(progress), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Running, Some(progress))
        );
        a.release(&lease).await.unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Queued, None)
        );
        a.cancel(owner, id, CancelMode::QueuedOnly).await.unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Cancelled, None)
        );
    }
}

#[tokio::test]
async fn an_unreachable_server_fails_promptly_as_a_backend_error() {
    let started = std::time::Instant::now();
    let refused = PgStore::connect("postgres://postgres@127.0.0.1:1/kiln").await;
    assert!(matches!(
        refused,
        Err(StoreError::Backend {
            backend: "postgres",
            ..
        })
    ));
    assert!(started.elapsed() < super::CONNECT_TIMEOUT + Duration::from_secs(1));
}
