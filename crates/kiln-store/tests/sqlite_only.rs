//! What only the SQLite store has: a file that outlives its handles, and group commit's batches.
//! Everything both backends do is in the conformance suite (`tests/conformance`).

use kiln_core::ids::KeyId;
use kiln_core::job::{JobStatus, NewJob};
use kiln_core::store::{Enqueued, Idempotency, JobStore, QueueLimits, StoreError};
use kiln_store::SqliteStore;
use kiln_testkit::jobs::new_job;
use std::collections::HashSet;
use std::time::Duration;

fn idem(key: &str, fingerprint: &str) -> Option<Idempotency> {
    Some(Idempotency {
        key: key.into(),
        fingerprint: fingerprint.into(),
        window: Duration::from_secs(86400),
    })
}

async fn queued_count(store: &SqliteStore) -> u64 {
    let counts = store.state_counts().await.unwrap().counts;
    counts
        .iter()
        .find(|(state, _)| *state == kiln_core::job::JobState::Queued)
        .map(|(_, n)| *n)
        .unwrap()
}

/// Submits every job at once (each its own task) and returns their outcomes in order.
async fn submit_all(
    store: &SqliteStore,
    jobs: Vec<(NewJob, Option<Idempotency>)>,
    max_queued: u64,
) -> Vec<Result<Enqueued, StoreError>> {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(job, idem)| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .enqueue(job, idem, QueueLimits::total(max_queued))
                    .await
            })
        })
        .collect();
    let mut outcomes = vec![];
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

#[tokio::test]
async fn accepted_jobs_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let owner = KeyId::new();
    let id = {
        let store = SqliteStore::open(&path).await.unwrap();
        store
            .enqueue(new_job(owner, "durable"), None, QueueLimits::total(100))
            .await
            .unwrap()
            .view
            .job
            .id
    };
    let store = SqliteStore::open(&path).await.unwrap();
    let view = store.get(owner, id).await.unwrap().unwrap();
    assert_eq!(view.job.params.prompt.as_str(), "durable");
    assert_eq!(view.job.status, JobStatus::Queued);
}

/// Group commit: many submits at once share transactions; each is durable when answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submits_are_all_committed_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let owner = KeyId::new();
    let store = SqliteStore::open(&path).await.unwrap();
    let jobs = (0..300)
        .map(|i| (new_job(owner, &format!("job {i}")), None))
        .collect();
    let outcomes = submit_all(&store, jobs, 10_000).await;
    let accepted: Vec<_> = outcomes.into_iter().map(Result::unwrap).collect();
    let positions: HashSet<_> = accepted
        .iter()
        .map(|e| e.view.queue_position.unwrap())
        .collect();
    assert_eq!(positions, (0..300).collect(), "one place in line each");
    drop(store);

    let store = SqliteStore::open(&path).await.unwrap();
    for e in &accepted {
        let view = store.get(owner, e.view.job.id).await.unwrap().unwrap();
        assert_eq!(view.job.status, JobStatus::Queued);
        assert_eq!(view.job.params.prompt, e.view.job.params.prompt);
        assert_eq!(view.queue_position, e.view.queue_position);
    }
    assert_eq!(queued_count(&store).await, 300);
}

// One thread: the tasks run in the order they were spawned, so their jobs reach the committer
// in that order and, being all waiting together, share one transaction.
#[tokio::test(flavor = "current_thread")]
async fn a_conflict_a_replay_and_a_full_queue_in_a_batch_fail_only_their_own_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let owner = KeyId::new();
    let original = store
        .enqueue(
            new_job(owner, "original"),
            idem("k", "a"),
            QueueLimits::total(100),
        )
        .await
        .unwrap();
    let jobs = vec![
        (new_job(owner, "conflict"), idem("k", "b")),
        (new_job(owner, "replay"), idem("k", "a")),
        (new_job(owner, "new 1"), None),
        (new_job(owner, "keyed"), idem("n", "x")),
        (new_job(owner, "keyed again"), idem("n", "x")),
        (new_job(owner, "over the cap"), None),
    ];
    let ids: Vec<_> = jobs.iter().map(|(job, _)| job.id).collect();
    let outcomes = submit_all(&store, jobs, 3).await;

    assert!(matches!(outcomes[0], Err(StoreError::IdempotencyConflict)));
    let replay = outcomes[1].as_ref().unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.view.job.id, original.view.job.id);
    let new_1 = outcomes[2].as_ref().unwrap();
    assert_eq!(
        (new_1.replayed, new_1.view.queue_position),
        (false, Some(1))
    );
    let keyed = outcomes[3].as_ref().unwrap();
    assert_eq!(
        (keyed.replayed, keyed.view.queue_position),
        (false, Some(2))
    );
    let keyed_again = outcomes[4].as_ref().unwrap();
    assert!(
        keyed_again.replayed,
        "the key's first use in the batch counts"
    );
    assert_eq!(keyed_again.view.job.id, keyed.view.job.id);
    assert!(
        matches!(outcomes[5], Err(StoreError::QueueFull { depth: 3 })),
        "{:?}",
        outcomes[5]
    );

    for (id, stored) in ids.iter().zip([false, false, true, true, false, false]) {
        assert_eq!(store.get(owner, *id).await.unwrap().is_some(), stored);
    }
    assert_eq!(queued_count(&store).await, 3);
}

/// Many submits at once through one handle (so through one committer's batches) against a
/// small queue: the cap is exact across batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_queue_cap_is_exact_across_a_committers_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    let owner = KeyId::new();
    let jobs = (0..200)
        .map(|i| (new_job(owner, &format!("job {i}")), None))
        .collect();
    let outcomes = submit_all(&store, jobs, 50).await;
    let mut positions = HashSet::new();
    let mut refused = 0;
    for outcome in outcomes {
        match outcome {
            Ok(e) => assert!(positions.insert(e.view.queue_position.unwrap())),
            Err(StoreError::QueueFull { depth: 50 }) => refused += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(positions, (0..50).collect());
    assert_eq!(refused, 150);
    assert_eq!(queued_count(&store).await, 50);
}

/// The next notice within two seconds (other stores' changes arrive within a tick).
async fn next_notice(events: &mut kiln_core::store::JobEvents) -> kiln_core::store::JobNotice {
    tokio::time::timeout(Duration::from_secs(2), events.recv())
        .await
        .expect("a notice within 2 s")
        .expect("the store is open")
}

/// Two stores on one file stand for two processes (`kiln serve --workers 0` and `kiln worker`):
/// each hears the other's changes through the `job_changes` log, and its own only once.
#[tokio::test]
async fn a_store_hears_another_store_on_the_same_file_and_itself_once() {
    use kiln_core::job::{JobState, Progress, StepReport};
    use kiln_core::store::{ClaimPolicy, JobEvent, JobNotice};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let (api, worker) = (
        SqliteStore::open(&path).await.unwrap(),
        SqliteStore::open(&path).await.unwrap(),
    );
    let (mut api_events, mut worker_events) = (api.subscribe(), worker.subscribe());
    let owner = KeyId::new();
    let id = api
        .enqueue(new_job(owner, "heard"), None, QueueLimits::total(10))
        .await
        .unwrap()
        .view
        .job
        .id;
    let state_of = |notice: JobNotice| match notice {
        JobNotice::Event(JobEvent {
            id: seen,
            state,
            progress,
            ..
        }) if seen == id => (state, progress),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        state_of(next_notice(&mut api_events).await),
        (JobState::Queued, None)
    );
    assert_eq!(
        state_of(next_notice(&mut worker_events).await),
        (JobState::Queued, None)
    );
    let policy = ClaimPolicy {
        lease: Duration::from_secs(30),
        max_attempts: 3,
    };
    let lease = worker
        .claim(
            &kiln_core::ids::WorkerId::new("w"),
            &[kiln_testkit::jobs::ROUTE],
            policy,
        )
        .await
        .unwrap()
        .unwrap();
    let progress = Some(Progress { step: 2, total: 4 });
    let report = StepReport {
        progress,
        preview: None,
    };
    worker
        .heartbeat(&lease, &report, policy.lease)
        .await
        .unwrap();
    assert_eq!(
        state_of(next_notice(&mut api_events).await),
        (JobState::Running, None)
    );
    assert_eq!(
        state_of(next_notice(&mut api_events).await),
        (JobState::Running, progress)
    );
    // Each store's own changes reached its subscribers once: nothing more is waiting.
    for _ in 0..2 {
        next_notice(&mut worker_events).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(api_events.try_recv(), None);
    assert_eq!(worker_events.try_recv(), None);
}
