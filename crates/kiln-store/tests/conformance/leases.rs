//! Claims, heartbeats, the ends of a job, release, fencing, the attempt limit.

use crate::harness::*;
use kiln_core::ids::{BlobKey, KeyId};
use kiln_core::job::{CancelOutcome, JobErrorCode, JobState, JobStatus, Progress};
use kiln_core::store::{ClaimPolicy, JobStore};
use std::time::Duration;

pub async fn claims_take_the_oldest_job_of_the_routes_asked_for<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let first = store
        .enqueue(new_job_on(ROUTE, owner, "a"), None, ROOMY)
        .await
        .unwrap()
        .view
        .job
        .id;
    let other = store
        .enqueue(new_job_on(OTHER_ROUTE, owner, "b"), None, ROOMY)
        .await
        .unwrap()
        .view
        .job
        .id;
    let last = store
        .enqueue(new_job_on(ROUTE, owner, "c"), None, ROOMY)
        .await
        .unwrap()
        .view
        .job
        .id;
    let none = kiln_core::catalog::Route::Flux2FlexEdit;
    assert!(store
        .claim(&worker("w"), &[none], LONG_LEASE)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .claim(&worker("w"), &[], LONG_LEASE)
        .await
        .unwrap()
        .is_none());
    let lease = store
        .claim(&worker("w"), &[OTHER_ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (lease.job.id, lease.job.route),
        (other, OTHER_ROUTE),
        "only the routes asked for, though older jobs wait"
    );
    let lease = store
        .claim(&worker("w"), &[OTHER_ROUTE, ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.job.id, first, "the oldest of the routes asked for");
    let lease = store
        .claim(&worker("w"), &[ROUTE, none], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.job.id, last);
    assert!(store
        .claim(&worker("w"), &[ROUTE, OTHER_ROUTE, none], LONG_LEASE)
        .await
        .unwrap()
        .is_none());
    assert_eq!(count_list(&*store).await, [0, 3, 0, 0, 0]);
}

pub async fn a_heartbeat_extends_the_lease_and_records_progress<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "long run").await;
    let lease = claim(&*store, "w", SHORT_LEASE).await;
    let until = store
        .heartbeat(
            &lease,
            &progressed(Progress { step: 2, total: 8 }),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .expires_at;
    assert!(
        until >= lease.expires_at + Duration::from_secs(50),
        "extended by about a minute: {until} (was {})",
        lease.expires_at
    );
    let running = |progress| JobStatus::Running {
        started_at: lease.started_at,
        attempt: 1,
        progress,
        preview: None,
        cancel_requested: false,
    };
    let status = view(&*store, owner, id).await.job.status;
    assert_eq!(
        status,
        running(Some(Progress { step: 2, total: 8 })),
        "{status:?}"
    );
    store
        .heartbeat(&lease, &StepReport::default(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        view(&*store, owner, id).await.job.status,
        running(Some(Progress { step: 2, total: 8 })),
        "a heartbeat without progress keeps the last"
    );
    store
        .heartbeat(
            &lease,
            &progressed(Progress { step: 5, total: 8 }),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert!(
        store
            .claim(&worker("other"), &[ROUTE], LONG_LEASE)
            .await
            .unwrap()
            .is_none(),
        "the extended lease still holds past the claim's own"
    );
    assert_eq!(store.fail_abandoned(1).await.unwrap(), 0);
    assert_eq!(
        view(&*store, owner, id).await.job.status,
        running(Some(Progress { step: 5, total: 8 }))
    );
}

pub async fn complete_ends_the_job_with_its_output_once<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "done").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    let key = BlobKey::random("jpeg");
    assert!(!store.blob_is_live(&key).await.unwrap());
    store
        .complete(&lease, output(vec![key.clone()]))
        .await
        .unwrap();
    let done = view(&*store, owner, id).await;
    assert_eq!(done.queue_position, None);
    match done.job.status {
        JobStatus::Succeeded {
            started_at,
            finished_at,
            output: stored,
        } => {
            assert_eq!(stored, output(vec![key.clone()]));
            assert_eq!(started_at, lease.started_at);
            assert!(finished_at >= started_at);
        }
        other => panic!("{other:?}"),
    }
    assert!(store.blob_is_live(&key).await.unwrap());
    assert!(!store.blob_is_live(&BlobKey::random("jpeg")).await.unwrap());

    // The job ends once: every later write under the lease is refused and changes nothing.
    assert_lease_lost(store.complete(&lease, output(vec![])).await, id);
    assert_lease_lost(store.fail(&lease, engine_failed("late")).await, id);
    assert_lease_lost(
        store
            .heartbeat(
                &lease,
                &progressed(Progress { step: 1, total: 2 }),
                Duration::from_secs(60),
            )
            .await,
        id,
    );
    assert_lease_lost(store.release(&lease).await, id);
    let after = view(&*store, owner, id).await.job.status;
    assert!(
        matches!(&after, JobStatus::Succeeded { output: o, .. } if o.images == vec![key.clone()]),
        "{after:?}"
    );
    assert!(store
        .claim(&worker("w"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .is_none());
    assert_eq!(count_list(&*store).await, [0, 0, 1, 0, 0]);
}

pub async fn fail_ends_the_job_with_its_error_once<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "doomed").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    let error = engine_failed("the engine gave up");
    store.fail(&lease, error.clone()).await.unwrap();
    let status = view(&*store, owner, id).await.job.status;
    match &status {
        JobStatus::Failed {
            finished_at,
            error: stored,
        } => {
            assert_eq!(stored, &error);
            assert!(*finished_at >= lease.started_at);
        }
        other => panic!("{other:?}"),
    }
    assert_lease_lost(store.fail(&lease, engine_failed("again")).await, id);
    assert_lease_lost(store.complete(&lease, output(vec![])).await, id);
    assert_lease_lost(store.release(&lease).await, id);
    assert_eq!(
        store
            .cancel(owner, id, CancelMode::QueuedOnly)
            .await
            .unwrap(),
        Some(CancelOutcome::NotCancellable)
    );
    assert_eq!(view(&*store, owner, id).await.job.status, status);
    assert_eq!(count_list(&*store).await, [0, 0, 0, 1, 0]);
}

pub async fn release_puts_the_job_back_first_in_line_without_spending_an_attempt<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let first = submit(&*store, owner, "first").await;
    let second = submit(&*store, owner, "second").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store
        .heartbeat(
            &lease,
            &progressed(Progress { step: 1, total: 4 }),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    store.release(&lease).await.unwrap();
    let released = view(&*store, owner, first).await;
    assert_eq!(
        (released.job.status, released.queue_position),
        (JobStatus::Queued, Some(0))
    );
    assert_eq!(view(&*store, owner, second).await.queue_position, Some(1));
    assert_lease_lost(store.complete(&lease, output(vec![])).await, first);

    let again = claim(&*store, "w2", LONG_LEASE).await;
    assert_eq!(again.job.id, first, "first in line again");
    assert_eq!(again.attempt, 1, "the released attempt was given back");
    assert!(again.fencing_token > lease.fencing_token);
    assert_eq!(
        again.job.status,
        JobStatus::Running {
            started_at: again.started_at,
            attempt: 1,
            progress: None,
            preview: None,
            cancel_requested: false,
        },
        "the released run's progress is gone"
    );
    assert_lease_lost(
        store
            .heartbeat(&lease, &StepReport::default(), Duration::from_secs(60))
            .await,
        first,
    );
    store.complete(&again, output(vec![])).await.unwrap();
}

/// Race (b): worker A's lease runs out, worker B (another handle, as another machine would
/// have) takes the job over; every write of A is refused, B's are not, and the output is B's.
pub async fn a_stale_lease_holder_is_fenced_off<B: Backend>(b: B) {
    let handles = b.handles(2).await;
    let (a, b_store) = (&handles[0], &handles[1]);
    let owner = KeyId::new();
    let id = submit(&**a, owner, "contested").await;
    let stale = claim(&**a, "a", SHORT_LEASE).await;
    assert!(
        b_store
            .claim(&worker("b"), &[ROUTE], LONG_LEASE)
            .await
            .unwrap()
            .is_none(),
        "the lease still holds"
    );
    tokio::time::sleep(PAST_SHORT).await;

    let fresh = claim(&**b_store, "b", LONG_LEASE).await;
    assert_eq!(fresh.job.id, id);
    assert!(fresh.fencing_token > stale.fencing_token);
    assert_eq!((stale.attempt, fresh.attempt), (1, 2));
    assert_eq!(
        fresh.job.status,
        JobStatus::Running {
            started_at: fresh.started_at,
            attempt: 2,
            progress: None,
            preview: None,
            cancel_requested: false,
        }
    );

    let stale_key = BlobKey::random("jpeg");
    assert_lease_lost(
        a.heartbeat(
            &stale,
            &progressed(Progress { step: 1, total: 4 }),
            Duration::from_secs(60),
        )
        .await,
        id,
    );
    assert_lease_lost(
        a.complete(&stale, output(vec![stale_key.clone()])).await,
        id,
    );
    assert_lease_lost(a.fail(&stale, engine_failed("stale")).await, id);
    assert_lease_lost(a.release(&stale).await, id);
    assert_eq!(
        view(&**a, owner, id).await.job.status,
        JobStatus::Running {
            started_at: fresh.started_at,
            attempt: 2,
            progress: None,
            preview: None,
            cancel_requested: false,
        },
        "A's refused writes changed nothing"
    );

    b_store
        .heartbeat(
            &fresh,
            &progressed(Progress { step: 3, total: 4 }),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let progress = match view(&**a, owner, id).await.job.status {
        JobStatus::Running { progress, .. } => progress,
        other => panic!("{other:?}"),
    };
    assert_eq!(progress, Some(Progress { step: 3, total: 4 }));
    let key = BlobKey::random("jpeg");
    b_store
        .complete(&fresh, output(vec![key.clone()]))
        .await
        .unwrap();
    match view(&**a, owner, id).await.job.status {
        JobStatus::Succeeded {
            output, started_at, ..
        } => {
            assert_eq!(output.images, vec![key.clone()], "the output is B's");
            assert_eq!(started_at, fresh.started_at);
        }
        other => panic!("{other:?}"),
    }
    assert!(a.blob_is_live(&key).await.unwrap());
    assert!(
        !a.blob_is_live(&stale_key).await.unwrap(),
        "A's refused output is not referenced"
    );
    assert_lease_lost(a.complete(&stale, output(vec![])).await, id);
    assert_lease_lost(b_store.complete(&fresh, output(vec![])).await, id);
}

pub async fn a_job_that_keeps_killing_workers_is_failed<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let poison = submit(&*store, owner, "poison").await;
    let policy = ClaimPolicy {
        lease: SHORT_LEASE.lease,
        max_attempts: 2,
    };
    let mut leases = vec![];
    for attempt in 1..=2 {
        let lease = claim(&*store, "w", policy).await;
        assert_eq!((lease.job.id, lease.attempt), (poison, attempt));
        leases.push(lease);
        tokio::time::sleep(PAST_SHORT).await;
    }
    assert!(leases[1].fencing_token > leases[0].fencing_token);
    assert!(
        store
            .claim(&worker("w"), &[ROUTE], policy)
            .await
            .unwrap()
            .is_none(),
        "no third attempt"
    );
    assert_eq!(
        store.fail_abandoned(2).await.unwrap(),
        1,
        "the job past its last attempt"
    );
    match view(&*store, owner, poison).await.job.status {
        JobStatus::Failed { error, .. } => assert_eq!(error.code, JobErrorCode::WorkerLost),
        other => panic!("{other:?}"),
    }
    assert_lease_lost(store.complete(&leases[1], output(vec![])).await, poison);
    assert_eq!(store.fail_abandoned(2).await.unwrap(), 0, "failed once");

    // A held lease, and a lapsed one with attempts left, are not given up.
    let held = submit(&*store, owner, "held").await;
    let lapsed = submit(&*store, owner, "lapsed").await;
    let held_lease = claim(&*store, "w", LONG_LEASE).await;
    assert_eq!(held_lease.job.id, held);
    let lapsed_lease = claim(&*store, "w", policy).await;
    assert_eq!(lapsed_lease.job.id, lapsed);
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.fail_abandoned(2).await.unwrap(), 0);
    assert_eq!(
        view(&*store, owner, held).await.job.state(),
        JobState::Running
    );
    let retaken = claim(&*store, "w2", policy).await;
    assert_eq!((retaken.job.id, retaken.attempt), (lapsed, 2));
    assert_eq!(count_list(&*store).await, [0, 2, 0, 1, 0]);
}
