//! The SQLite store through its traits, on a real database file per test.

use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{
    CancelOutcome, JobError, JobErrorCode, JobOutput, JobState, NewJob, OutputMetadata, Progress,
    Timings,
};
use kiln_core::params::{GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt};
use kiln_core::store::{ClaimPolicy, Idempotency, JobStore, KeyStore, QueueLimits, StoreError};
use kiln_store::SqliteStore;
use std::time::Duration;
use time::OffsetDateTime;

const ROUTE: Route = Route::Flux11ProTextToImage;
const LONG_LEASE: ClaimPolicy = ClaimPolicy {
    lease: Duration::from_secs(60),
    max_attempts: 3,
};

async fn fresh() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("kiln.db"))
        .await
        .unwrap();
    (dir, store)
}

fn params(prompt: &str) -> GenerationParams {
    GenerationParams {
        prompt: Prompt::parse(prompt, 100).unwrap(),
        size: OutputSize::Pixels(ImageSize {
            width: 1024,
            height: 768,
        }),
        seed: 7,
        num_inference_steps: None,
        guidance_scale: None,
        output_format: OutputFormat::Jpeg,
        raw: false,
        enable_prompt_expansion: false,
        reference_images: Vec::new(),
    }
}

fn new_job(owner: KeyId, prompt: &str) -> NewJob {
    let now = OffsetDateTime::now_utc();
    NewJob {
        id: RequestId::new(),
        owner,
        route: ROUTE,
        params: params(prompt),
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
    }
}

fn output(keys: Vec<BlobKey>) -> JobOutput {
    JobOutput {
        images: keys,
        metadata: OutputMetadata {
            model: ROUTE,
            seed: 7,
            width: 1024,
            height: 768,
            num_inference_steps: 4,
            guidance: None,
            output_format: OutputFormat::Jpeg,
            prompt: "p".into(),
            timings_ms: Timings {
                queued: 1,
                inference: 2,
                encode_and_store: 3,
            },
            engine: "test".into(),
            notes: vec![],
        },
    }
}

fn worker(name: &str) -> WorkerId {
    WorkerId::new(name)
}

#[tokio::test]
async fn queue_positions_follow_submission_order() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    let mut ids = vec![];
    for i in 0..4 {
        let e = store
            .enqueue(
                new_job(owner, &format!("job {i}")),
                None,
                QueueLimits::total(100),
            )
            .await
            .unwrap();
        assert_eq!(e.view.queue_position, Some(i));
        assert!(!e.replayed);
        ids.push(e.view.job.id);
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            store.get(owner, *id).await.unwrap().unwrap().queue_position,
            Some(i as u64)
        );
    }
    let lease = store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.job.id, ids[0], "the oldest job is claimed first");
    let running = store.get(owner, ids[0]).await.unwrap().unwrap();
    assert_eq!(
        (running.job.state, running.queue_position),
        (JobState::Running, None)
    );
    assert_eq!(
        store
            .get(owner, ids[3])
            .await
            .unwrap()
            .unwrap()
            .queue_position,
        Some(2)
    );
}

#[tokio::test]
async fn another_owner_sees_nothing() {
    let (_dir, store) = fresh().await;
    let (alice, bob) = (KeyId::new(), KeyId::new());
    let id = store
        .enqueue(new_job(alice, "mine"), None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    assert!(store.get(bob, id).await.unwrap().is_none());
    assert!(store.cancel(bob, id).await.unwrap().is_none());
    assert!(store.get(alice, id).await.unwrap().is_some());
}

#[tokio::test]
async fn queue_depth_is_bounded() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    store
        .enqueue(new_job(owner, "a"), None, QueueLimits::total(2))
        .await
        .unwrap();
    store
        .enqueue(new_job(owner, "b"), None, QueueLimits::total(2))
        .await
        .unwrap();
    let err = store
        .enqueue(new_job(owner, "c"), None, QueueLimits::total(2))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::QueueFull { depth: 2 }), "{err:?}");
    store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue(new_job(owner, "c"), None, QueueLimits::total(2))
        .await
        .expect("a claimed job frees a place");
}

#[tokio::test]
async fn one_key_may_not_fill_the_shared_queue() {
    let (_dir, store) = fresh().await;
    let (greedy, other) = (KeyId::new(), KeyId::new());
    let limits = QueueLimits {
        total: 10,
        per_owner: 2,
    };
    for prompt in ["a", "b"] {
        store
            .enqueue(new_job(greedy, prompt), None, limits)
            .await
            .unwrap();
    }
    let err = store
        .enqueue(new_job(greedy, "c"), None, limits)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::OwnerQueueFull { queued: 2 }),
        "{err:?}"
    );
    store
        .enqueue(new_job(other, "x"), None, limits)
        .await
        .expect("another key still has room");
    store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    store
        .enqueue(new_job(greedy, "c"), None, limits)
        .await
        .expect("a claimed job frees one of the key's places");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_key_cap_is_exact_under_concurrent_submits() {
    let (_dir, store) = fresh().await;
    let (a, b) = (KeyId::new(), KeyId::new());
    let limits = QueueLimits {
        total: 1_000,
        per_owner: 7,
    };
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            let owner = if i % 2 == 0 { a } else { b };
            tokio::spawn(async move {
                (
                    owner,
                    store.enqueue(new_job(owner, "j"), None, limits).await,
                )
            })
        })
        .collect();
    let mut accepted = std::collections::HashMap::new();
    for task in tasks {
        let (owner, outcome) = task.await.unwrap();
        match outcome {
            Ok(_) => *accepted.entry(owner).or_insert(0) += 1,
            Err(StoreError::OwnerQueueFull { queued: 7 }) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((accepted[&a], accepted[&b]), (7, 7));
}

#[tokio::test]
async fn cancel_in_each_state() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    let queued = store
        .enqueue(new_job(owner, "q"), None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    let running = store
        .enqueue(new_job(owner, "r"), None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    assert_eq!(
        store.cancel(owner, queued).await.unwrap(),
        Some(CancelOutcome::Cancelled)
    );
    assert_eq!(
        store.cancel(owner, queued).await.unwrap(),
        Some(CancelOutcome::Cancelled),
        "twice is harmless"
    );
    let view = store.get(owner, queued).await.unwrap().unwrap();
    assert_eq!(view.job.state, JobState::Cancelled);
    assert!(view.job.finished_at.is_some());

    let lease = store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.job.id, running, "a cancelled job is never claimed");
    assert_eq!(
        store.cancel(owner, running).await.unwrap(),
        Some(CancelOutcome::NotCancellable)
    );
    store.complete(&lease, output(vec![])).await.unwrap();
    assert_eq!(
        store.cancel(owner, running).await.unwrap(),
        Some(CancelOutcome::NotCancellable)
    );
    assert_eq!(
        store.get(owner, running).await.unwrap().unwrap().job.state,
        JobState::Succeeded
    );
    assert!(store
        .cancel(owner, RequestId::new())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn claims_only_the_routes_asked_for() {
    let (_dir, store) = fresh().await;
    store
        .enqueue(new_job(KeyId::new(), "a"), None, QueueLimits::total(100))
        .await
        .unwrap();
    assert!(store
        .claim(&worker("w"), &[Route::Flux2FlexTextToImage], LONG_LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .claim(&worker("w"), &[], LONG_LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn a_stale_worker_is_fenced_off_after_its_lease_expires() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    let id = store
        .enqueue(new_job(owner, "a"), None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    let short = ClaimPolicy {
        lease: Duration::from_millis(50),
        max_attempts: 3,
    };
    let stale = store
        .claim(&worker("stale"), &[ROUTE], short)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .claim(&worker("other"), &[ROUTE], short)
            .await
            .unwrap()
            .is_none(),
        "lease still held"
    );
    tokio::time::sleep(Duration::from_millis(120)).await;

    let fresh = store
        .claim(&worker("fresh"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fresh.job.id, id);
    assert!(fresh.fencing_token > stale.fencing_token);
    assert_eq!(fresh.job.attempts, 2);

    let heartbeat = store
        .heartbeat(
            &stale,
            Some(Progress { step: 1, total: 4 }),
            Duration::from_secs(60),
        )
        .await;
    assert!(
        matches!(heartbeat, Err(StoreError::LeaseLost(_))),
        "{heartbeat:?}"
    );
    let complete = store
        .complete(&stale, output(vec![BlobKey::random("jpeg")]))
        .await;
    assert!(matches!(complete, Err(StoreError::LeaseLost(_))));
    let fail = store
        .fail(
            &stale,
            JobError {
                code: JobErrorCode::EngineFailed,
                message: "x".into(),
            },
        )
        .await;
    assert!(matches!(fail, Err(StoreError::LeaseLost(_))));
    assert!(matches!(
        store.release(&stale).await,
        Err(StoreError::LeaseLost(_))
    ));

    store
        .heartbeat(
            &fresh,
            Some(Progress { step: 3, total: 4 }),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let view = store.get(owner, id).await.unwrap().unwrap();
    assert_eq!(view.job.progress, Some(Progress { step: 3, total: 4 }));
    let key = BlobKey::random("jpeg");
    store
        .complete(&fresh, output(vec![key.clone()]))
        .await
        .unwrap();
    let done = store.get(owner, id).await.unwrap().unwrap().job;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.output.unwrap().images, vec![key.clone()]);
    assert!(store.blob_is_live(&key).await.unwrap());
    assert!(
        matches!(
            store.complete(&fresh, output(vec![])).await,
            Err(StoreError::LeaseLost(_))
        ),
        "ends once"
    );
}

#[tokio::test]
async fn a_job_that_keeps_killing_workers_is_failed() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    let id = store
        .enqueue(new_job(owner, "poison"), None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    let policy = ClaimPolicy {
        lease: Duration::from_millis(20),
        max_attempts: 2,
    };
    for _ in 0..2 {
        store
            .claim(&worker("w"), &[ROUTE], policy)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        store
            .claim(&worker("w"), &[ROUTE], policy)
            .await
            .unwrap()
            .is_none(),
        "no third attempt"
    );
    assert_eq!(store.fail_abandoned(2).await.unwrap(), 1);
    let job = store.get(owner, id).await.unwrap().unwrap().job;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.unwrap().code, JobErrorCode::WorkerLost);
}

#[tokio::test]
async fn release_puts_the_job_back_first_in_line_without_spending_an_attempt() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    let first = store
        .enqueue(new_job(owner, "first"), None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    store
        .enqueue(new_job(owner, "second"), None, QueueLimits::total(100))
        .await
        .unwrap();
    let lease = store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    store.release(&lease).await.unwrap();
    let view = store.get(owner, first).await.unwrap().unwrap();
    assert_eq!(
        (view.job.state, view.queue_position, view.job.attempts),
        (JobState::Queued, Some(0), 0)
    );
    let again = store
        .claim(&worker("w2"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.job.id, first);
}

#[tokio::test]
async fn idempotency_keys_replay_and_conflict() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    let idem = |fp: &str| Idempotency {
        key: "k1".into(),
        fingerprint: fp.into(),
        window: Duration::from_secs(86400),
    };
    let first = store
        .enqueue(
            new_job(owner, "a"),
            Some(idem("fp-a")),
            QueueLimits::total(100),
        )
        .await
        .unwrap();
    let again = store
        .enqueue(
            new_job(owner, "a"),
            Some(idem("fp-a")),
            QueueLimits::total(100),
        )
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.view.job.id, first.view.job.id);
    assert!(matches!(
        store
            .enqueue(
                new_job(owner, "b"),
                Some(idem("fp-b")),
                QueueLimits::total(100)
            )
            .await,
        Err(StoreError::IdempotencyConflict)
    ));
    let other_owner = store
        .enqueue(
            new_job(KeyId::new(), "a"),
            Some(idem("fp-a")),
            QueueLimits::total(100),
        )
        .await
        .unwrap();
    assert!(!other_owner.replayed, "keys are scoped to their token");
    let counts = store.state_counts().await.unwrap().counts;
    assert!(counts.contains(&(JobState::Queued, 2)), "{counts:?}");

    let short = Idempotency {
        key: "k2".into(),
        fingerprint: "x".into(),
        window: Duration::from_millis(30),
    };
    let a = store
        .enqueue(
            new_job(owner, "c"),
            Some(short.clone()),
            QueueLimits::total(100),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(60)).await;
    let b = store
        .enqueue(new_job(owner, "c"), Some(short), QueueLimits::total(100))
        .await
        .unwrap();
    assert!(
        !b.replayed && a.view.job.id != b.view.job.id,
        "a key past its window is forgotten"
    );
}

#[tokio::test]
async fn purge_removes_expired_records_and_reports_their_files() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    let mut job = new_job(owner, "short-lived");
    job.expires_at = job.created_at + Duration::from_millis(50);
    let id = store
        .enqueue(job, None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    let keep = store
        .enqueue(new_job(owner, "long-lived"), None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    let lease = store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    let key = BlobKey::random("png");
    store
        .complete(&lease, output(vec![key.clone()]))
        .await
        .unwrap();
    assert!(
        store
            .purge_expired(OffsetDateTime::now_utc())
            .await
            .unwrap()
            .is_empty(),
        "retention runs from the end"
    );
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(
        !store.blob_is_live(&key).await.unwrap(),
        "an expired record's file is dead at once"
    );
    assert!(store.get(owner, id).await.unwrap().is_none());
    assert_eq!(
        store
            .purge_expired(OffsetDateTime::now_utc())
            .await
            .unwrap(),
        vec![key]
    );
    assert!(
        store.get(owner, keep).await.unwrap().is_some(),
        "a queued job is never purged"
    );
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
    assert_eq!(view.job.state, JobState::Queued);
}

#[tokio::test]
async fn keys_are_created_listed_found_by_hash_and_revoked() {
    let (_dir, store) = fresh().await;
    assert_eq!(store.key_count().await.unwrap(), 0);
    let key = store.insert_key("ci", "hash-1", "kiln_ab").await.unwrap();
    assert!(matches!(
        store.insert_key("ci", "hash-2", "kiln_cd").await,
        Err(StoreError::DuplicateKeyName(_))
    ));
    assert_eq!(
        store.key_by_hash("hash-1").await.unwrap().unwrap().id,
        key.id
    );
    assert!(store.key_by_hash("hash-2").await.unwrap().is_none());
    let revoked = store.revoke_key("ci").await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(
        store.revoke_key("ci").await.unwrap().revoked_at,
        revoked.revoked_at,
        "twice is harmless"
    );
    assert!(store.key_by_hash("hash-1").await.unwrap().is_none());
    assert!(matches!(
        store.revoke_key("nope").await,
        Err(StoreError::NoSuchKey(_))
    ));
    let listed = store.list_keys().await.unwrap();
    assert_eq!((listed.len(), listed[0].name.as_str()), (1, "ci"));
    assert_eq!(store.key_count().await.unwrap(), 1);
}

#[tokio::test]
async fn concurrent_claims_hand_each_job_to_exactly_one_worker() {
    let (_dir, store) = fresh().await;
    let owner = KeyId::new();
    for i in 0..20 {
        store
            .enqueue(
                new_job(owner, &format!("{i}")),
                None,
                QueueLimits::total(100),
            )
            .await
            .unwrap();
    }
    let mut tasks = vec![];
    for w in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = vec![];
            while let Some(lease) = store
                .claim(&worker(&format!("w{w}")), &[ROUTE], LONG_LEASE)
                .await
                .unwrap()
            {
                got.push(lease.job.id);
            }
            got
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (20, 20));
}

/// Group commit: many submits at once share transactions, and each keeps its own outcome.
mod group_commit {
    use super::*;
    use std::collections::HashSet;

    /// Submits every job at once (each its own task) and returns their outcomes in order.
    async fn submit_all(
        store: &SqliteStore,
        jobs: Vec<(NewJob, Option<Idempotency>)>,
        max_queued: u64,
    ) -> Vec<Result<kiln_core::store::Enqueued, StoreError>> {
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
            assert_eq!(view.job.state, JobState::Queued);
            assert_eq!(view.job.params.prompt, e.view.job.params.prompt);
            assert_eq!(view.queue_position, e.view.queue_position);
        }
        let counts = store.state_counts().await.unwrap().counts;
        assert!(counts.contains(&(JobState::Queued, 300)), "{counts:?}");
    }

    // One thread: the tasks run in the order they were spawned, so their jobs reach the
    // committer in that order and, being all waiting together, share one transaction.
    #[tokio::test(flavor = "current_thread")]
    async fn a_conflict_a_replay_and_a_full_queue_in_a_batch_fail_only_their_own_jobs() {
        let (_dir, store) = fresh().await;
        let owner = KeyId::new();
        let idem = |key: &str, fingerprint: &str| {
            Some(Idempotency {
                key: key.into(),
                fingerprint: fingerprint.into(),
                window: Duration::from_secs(86400),
            })
        };
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
        let counts = store.state_counts().await.unwrap().counts;
        assert!(counts.contains(&(JobState::Queued, 3)), "{counts:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_queue_cap_is_exact_under_concurrent_submits() {
        let (_dir, store) = fresh().await;
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
        let counts = store.state_counts().await.unwrap().counts;
        assert!(counts.contains(&(JobState::Queued, 50)), "{counts:?}");
    }
}
