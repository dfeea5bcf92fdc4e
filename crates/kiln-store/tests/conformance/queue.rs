//! Submit, get, cancel, queue positions, queue limits, state counts.

use crate::harness::*;
use kiln_core::ids::{KeyId, RequestId};
use kiln_core::job::{CancelOutcome, JobState, JobStatus};
use kiln_core::params::{GenerationParams, RouteOptions};
use kiln_core::store::{JobStore, QueueLimits, StoreError};

pub async fn a_submitted_job_reads_back_as_submitted<B: Backend>(b: B) {
    let store = b.store();
    store.ping().await.unwrap();
    let owner = KeyId::new();
    let job = new_job(owner, "a lighthouse at dusk");
    let enqueued = store.enqueue(job.clone(), None, ROOMY).await.unwrap();
    assert!(!enqueued.replayed);
    assert_eq!(enqueued.view.queue_position, Some(0));
    assert_eq!(enqueued.view.job.status, JobStatus::Queued);
    assert_eq!(
        enqueued.view.job.id, job.id,
        "the store keeps the submit's id"
    );

    let read = view(&*store, owner, job.id).await;
    assert_eq!(read.queue_position, Some(0));
    let read = read.job;
    assert_eq!(
        (read.id, read.owner, read.route, &read.params, &read.status),
        (job.id, owner, ROUTE, &job.params, &JobStatus::Queued)
    );
    assert_close(
        read.created_at,
        job.created_at,
        std::time::Duration::from_millis(1),
        "created_at",
    );
    assert_close(
        read.expires_at,
        job.expires_at,
        std::time::Duration::from_millis(1),
        "expires_at",
    );
    assert!(hidden(&*store, owner, RequestId::new()).await);
}

/// Jobs accepted before `RouteOptions` hold the two flags at the top level of their params; an
/// upgrade must still read them, taking the flag of the job's route.
pub async fn a_job_stored_before_route_options_reads_back<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let legacy = r#"{"prompt":"a lighthouse","size":{"width":1024,"height":768},"seed":7,"num_inference_steps":null,"guidance_scale":null,"output_format":"jpeg","raw":true,"enable_prompt_expansion":false}"#;
    let cases = [
        (ROUTE, RouteOptions::Flux11Pro { raw: true }),
        (
            OTHER_ROUTE,
            RouteOptions::Flux2Flex {
                enable_prompt_expansion: false,
            },
        ),
    ];
    for (route, options) in cases {
        let job = new_job_on(route, owner, "a lighthouse");
        store.enqueue(job.clone(), None, ROOMY).await.unwrap();
        b.execute(&format!(
            "UPDATE jobs SET params = '{legacy}' WHERE id = '{}'",
            job.id
        ))
        .await;
        let read = view(&*store, owner, job.id).await.job;
        let expected = GenerationParams {
            options,
            ..job.params.clone()
        };
        assert_eq!((read.route, &read.params), (route, &expected));
        let written = serde_json::to_value(&read.params).unwrap();
        assert!(
            written.get("raw").is_none() && written.get("enable_prompt_expansion").is_none(),
            "written back in the current form only: {written}"
        );
    }
    // A worker can take it too.
    let lease = claim(&*store, "w", LONG_LEASE).await;
    assert_eq!(
        lease.job.params.options,
        RouteOptions::Flux11Pro { raw: true }
    );
}

pub async fn queue_positions_follow_submission_order<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let mut ids = vec![];
    for i in 0..4 {
        let e = store
            .enqueue(new_job(owner, &format!("job {i}")), None, ROOMY)
            .await
            .unwrap();
        assert_eq!(e.view.queue_position, Some(i));
        ids.push(e.view.job.id);
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            view(&*store, owner, *id).await.queue_position,
            Some(i as u64)
        );
    }
    let lease = claim(&*store, "w", LONG_LEASE).await;
    assert_eq!(lease.job.id, ids[0], "the oldest job is claimed first");
    assert_eq!(lease.worker, worker("w"));
    assert_eq!(lease.attempt, 1);
    assert!(lease.expires_at > lease.started_at);
    assert_eq!(
        lease.job.status,
        JobStatus::Running {
            started_at: lease.started_at,
            attempt: 1,
            progress: None,
            preview: None,
            cancel_requested: false,
        }
    );
    let running = view(&*store, owner, ids[0]).await;
    assert_eq!(
        running.queue_position, None,
        "a running job has no place in line"
    );
    match running.job.status {
        JobStatus::Running {
            started_at,
            attempt,
            progress,
            preview: None,
            cancel_requested: false,
        } => {
            assert_close(
                started_at,
                lease.started_at,
                std::time::Duration::from_millis(1),
                "started_at",
            );
            assert_eq!((attempt, progress), (1, None));
        }
        other => panic!("{other:?}"),
    }
    for (i, id) in ids.iter().enumerate().skip(1) {
        assert_eq!(
            view(&*store, owner, *id).await.queue_position,
            Some(i as u64 - 1),
            "everyone behind moves up"
        );
    }
}

pub async fn another_owner_sees_nothing<B: Backend>(b: B) {
    let store = b.store();
    let (alice, bob) = (KeyId::new(), KeyId::new());
    let id = submit(&*store, alice, "mine").await;
    assert!(hidden(&*store, bob, id).await);
    assert!(store
        .cancel(bob, id, CancelMode::QueuedOnly)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        view(&*store, alice, id).await.job.status,
        JobStatus::Queued,
        "bob's cancel changed nothing"
    );
}

pub async fn the_queue_limit_counts_waiting_jobs<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let limits = QueueLimits::total(2);
    for prompt in ["a", "b"] {
        store
            .enqueue(new_job(owner, prompt), None, limits)
            .await
            .unwrap();
    }
    let refused = new_job(owner, "c");
    let err = store
        .enqueue(refused.clone(), None, limits)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::QueueFull { depth: 2 }), "{err:?}");
    assert!(
        hidden(&*store, owner, refused.id).await,
        "a refused job is not stored"
    );
    claim(&*store, "w", LONG_LEASE).await;
    store
        .enqueue(new_job(owner, "c"), None, limits)
        .await
        .expect("a claimed job frees a place");
    let cancelled = store
        .enqueue(new_job(owner, "d"), None, QueueLimits::total(3))
        .await
        .unwrap()
        .view
        .job
        .id;
    assert!(matches!(
        store
            .enqueue(new_job(owner, "e"), None, QueueLimits::total(3))
            .await,
        Err(StoreError::QueueFull { depth: 3 })
    ));
    store
        .cancel(owner, cancelled, CancelMode::QueuedOnly)
        .await
        .unwrap();
    store
        .enqueue(new_job(owner, "e"), None, QueueLimits::total(3))
        .await
        .expect("a cancelled job frees a place");
    assert_eq!(count_list(&*store).await, [3, 1, 0, 0, 1]);
}

pub async fn one_key_may_not_fill_the_shared_queue<B: Backend>(b: B) {
    let store = b.store();
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
    claim(&*store, "w", LONG_LEASE).await;
    store
        .enqueue(new_job(greedy, "c"), None, limits)
        .await
        .expect("a claimed job frees one of the key's places");
    assert!(matches!(
        store.enqueue(new_job(greedy, "d"), None, limits).await,
        Err(StoreError::OwnerQueueFull { queued: 2 })
    ));
    assert_eq!(count_list(&*store).await, [3, 1, 0, 0, 0]);
}

pub async fn cancel_in_each_state<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let queued = submit(&*store, owner, "q").await;
    let running = submit(&*store, owner, "r").await;
    assert_eq!(
        store
            .cancel(owner, queued, CancelMode::QueuedOnly)
            .await
            .unwrap(),
        Some(CancelOutcome::Cancelled)
    );
    let first = view(&*store, owner, queued).await;
    let JobStatus::Cancelled { finished_at } = first.job.status else {
        panic!("{:?}", first.job.status);
    };
    assert!(finished_at >= first.job.created_at);
    assert_eq!(first.queue_position, None);
    assert_eq!(
        store
            .cancel(owner, queued, CancelMode::QueuedOnly)
            .await
            .unwrap(),
        Some(CancelOutcome::Cancelled),
        "twice is harmless"
    );
    assert_eq!(
        view(&*store, owner, queued).await.job.status,
        JobStatus::Cancelled { finished_at },
        "and changes nothing"
    );
    assert_eq!(
        view(&*store, owner, running).await.queue_position,
        Some(0),
        "a cancelled job leaves the line"
    );

    let lease = claim(&*store, "w", LONG_LEASE).await;
    assert_eq!(lease.job.id, running, "a cancelled job is never claimed");
    assert_eq!(
        store
            .cancel(owner, running, CancelMode::QueuedOnly)
            .await
            .unwrap(),
        Some(CancelOutcome::NotCancellable)
    );
    assert_eq!(
        view(&*store, owner, running).await.job.state(),
        JobState::Running
    );
    store.complete(&lease, output(vec![])).await.unwrap();
    assert_eq!(
        store
            .cancel(owner, running, CancelMode::QueuedOnly)
            .await
            .unwrap(),
        Some(CancelOutcome::NotCancellable)
    );
    assert_eq!(
        view(&*store, owner, running).await.job.state(),
        JobState::Succeeded
    );
    assert!(store
        .cancel(owner, RequestId::new(), CancelMode::QueuedOnly)
        .await
        .unwrap()
        .is_none());
}

pub async fn state_counts_count_every_state<B: Backend>(b: B) {
    let store = b.store();
    assert_eq!(count_list(&*store).await, [0, 0, 0, 0, 0]);
    let owner = KeyId::new();
    let mut ids = vec![];
    for i in 0..6 {
        ids.push(submit(&*store, owner, &format!("{i}")).await);
    }
    assert_eq!(count_list(&*store).await, [6, 0, 0, 0, 0]);
    let succeeds = claim(&*store, "w", LONG_LEASE).await;
    store.complete(&succeeds, output(vec![])).await.unwrap();
    let fails = claim(&*store, "w", LONG_LEASE).await;
    store.fail(&fails, engine_failed("no")).await.unwrap();
    claim(&*store, "w", LONG_LEASE).await;
    store
        .cancel(owner, ids[3], CancelMode::QueuedOnly)
        .await
        .unwrap();
    // [queued, running, succeeded, failed, cancelled]
    assert_eq!(count_list(&*store).await, [2, 1, 1, 1, 1]);
}
