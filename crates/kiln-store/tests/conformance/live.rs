//! Live requests: previews recorded by heartbeats, forced cancels of running jobs.

use crate::harness::*;
use kiln_core::ids::{BlobKey, KeyId};
use kiln_core::job::{CancelOutcome, JobState, JobStatus, Preview, Progress};
use kiln_core::store::{ClaimPolicy, JobNotice, JobStore};
use std::time::Duration;

const RETENTION: Duration = Duration::from_millis(400);
const PAST_RETENTION: Duration = Duration::from_millis(900);

/// The progress, preview and forced-cancel flag of a running job.
fn running_parts(status: &JobStatus) -> (Option<Progress>, Option<Preview>, bool) {
    match status {
        JobStatus::Running {
            progress,
            preview,
            cancel_requested,
            ..
        } => (*progress, preview.clone(), *cancel_requested),
        other => panic!("not running: {other:?}"),
    }
}

pub async fn a_heartbeat_records_the_latest_preview_and_only_it_stays_live<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = store
        .enqueue(short_lived(owner, "previewed", RETENTION), None, ROOMY)
        .await
        .unwrap()
        .view
        .job
        .id;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    let (first, second) = (BlobKey::random("jpeg"), BlobKey::random("jpeg"));
    let ack = store
        .heartbeat(
            &lease,
            &previewed(1, 4, first.clone()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(!ack.cancel_requested);
    let preview = |key: &BlobKey, step| {
        Some(Preview {
            key: key.clone(),
            step,
        })
    };
    assert_eq!(
        running_parts(&view(&*store, owner, id).await.job.status),
        (
            Some(Progress { step: 1, total: 4 }),
            preview(&first, 1),
            false
        )
    );
    assert!(store.blob_is_live(&first).await.unwrap());
    store
        .heartbeat(
            &lease,
            &previewed(2, 4, second.clone()),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(
        !store.blob_is_live(&first).await.unwrap(),
        "a replaced preview is no longer live"
    );
    assert!(store.blob_is_live(&second).await.unwrap());
    store
        .heartbeat(
            &lease,
            &progressed(Progress { step: 3, total: 4 }),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(
        running_parts(&view(&*store, owner, id).await.job.status),
        (
            Some(Progress { step: 3, total: 4 }),
            preview(&second, 2),
            false
        ),
        "a report without a preview keeps the last one"
    );
    let image = BlobKey::random("jpeg");
    store
        .complete(&lease, output(vec![image.clone()]))
        .await
        .unwrap();
    assert!(
        store.blob_is_live(&second).await.unwrap(),
        "the last preview lives with the record"
    );
    tokio::time::sleep(PAST_RETENTION).await;
    let mut purged = store
        .purge_expired(time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    purged.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut expected = vec![image, second.clone()];
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(purged, expected, "the output and the last preview");
    assert!(!store.blob_is_live(&second).await.unwrap());
}

/// A job taken again after a lost lease starts without progress but keeps the last attempt's
/// preview: the record is what references its blob, so it is deleted when the new attempt's
/// first preview replaces it, or with the record (a claim that dropped it would leak the file).
pub async fn a_new_claim_keeps_the_last_attempts_preview_until_replaced<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "retried").await;
    let lease = claim(&*store, "w", SHORT_LEASE).await;
    let key = BlobKey::random("jpeg");
    store
        .heartbeat(&lease, &previewed(1, 4, key.clone()), SHORT_LEASE.lease)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    let again = claim(&*store, "w2", LONG_LEASE).await;
    assert_eq!((again.job.id, again.attempt), (id, 2));
    let (progress, preview, cancel) = running_parts(&again.job.status);
    assert_eq!((progress, cancel), (None, false));
    assert_eq!(preview.map(|p| p.key), Some(key.clone()));
    assert!(store.blob_is_live(&key).await.unwrap());
    store.release(&again).await.unwrap();
    assert_eq!(view(&*store, owner, id).await.job.status, JobStatus::Queued);
}

pub async fn a_forced_cancel_stops_a_running_job<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "stopped").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    assert_eq!(
        store
            .cancel(owner, id, CancelMode::QueuedOnly)
            .await
            .unwrap(),
        Some(CancelOutcome::NotCancellable),
        "a running job is not cancelled without force"
    );
    assert!(!running_parts(&view(&*store, owner, id).await.job.status).2);
    assert!(
        store
            .cancel(KeyId::new(), id, CancelMode::Force)
            .await
            .unwrap()
            .is_none(),
        "another owner's job is not there"
    );
    for _ in 0..2 {
        assert_eq!(
            store.cancel(owner, id, CancelMode::Force).await.unwrap(),
            Some(CancelOutcome::CancellationRequested),
            "asked for, and asking again is harmless"
        );
    }
    assert_eq!(
        store
            .cancel(owner, id, CancelMode::QueuedOnly)
            .await
            .unwrap(),
        Some(CancelOutcome::NotCancellable)
    );
    assert!(running_parts(&view(&*store, owner, id).await.job.status).2);
    let ack = store
        .heartbeat(&lease, &StepReport::default(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(
        ack.cancel_requested,
        "the worker learns it at its heartbeat"
    );
    assert_eq!(count_list(&*store).await, [0, 1, 0, 0, 0]);
    store.end_cancelled(&lease).await.unwrap();
    let ended = view(&*store, owner, id).await.job;
    let JobStatus::Cancelled { finished_at } = ended.status else {
        panic!("{:?}", ended.status);
    };
    assert_close(
        ended.expires_at,
        finished_at + Duration::from_secs(3600),
        Duration::from_millis(5),
        "retention counts from the end",
    );
    assert_lease_lost(store.end_cancelled(&lease).await, id);
    assert_lease_lost(store.complete(&lease, output(vec![])).await, id);
    assert_eq!(
        store.cancel(owner, id, CancelMode::Force).await.unwrap(),
        Some(CancelOutcome::Cancelled),
        "it is cancelled"
    );
    assert_eq!(count_list(&*store).await, [0, 0, 0, 0, 1]);

    let done = submit(&*store, owner, "done").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store.complete(&lease, output(vec![])).await.unwrap();
    assert_eq!(
        store.cancel(owner, done, CancelMode::Force).await.unwrap(),
        Some(CancelOutcome::NotCancellable),
        "a finished job is not cancelled"
    );
}

pub async fn a_stale_lease_cannot_end_a_job_cancelled<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "taken over").await;
    let stale = claim(&*store, "a", SHORT_LEASE).await;
    tokio::time::sleep(PAST_SHORT).await;
    let fresh = claim(&*store, "b", LONG_LEASE).await;
    assert_eq!(fresh.job.id, id);
    store.cancel(owner, id, CancelMode::Force).await.unwrap();
    assert_lease_lost(store.end_cancelled(&stale).await, id);
    assert_lease_lost(
        store
            .heartbeat(&stale, &StepReport::default(), Duration::from_secs(60))
            .await,
        id,
    );
    assert_eq!(
        view(&*store, owner, id).await.job.state(),
        JobState::Running
    );
    store.end_cancelled(&fresh).await.unwrap();
    assert_eq!(
        view(&*store, owner, id).await.job.state(),
        JobState::Cancelled
    );
}

pub async fn a_forced_cancel_whose_worker_died_is_cancelled_not_taken_again<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "orphan").await;
    let policy = ClaimPolicy {
        lease: SHORT_LEASE.lease,
        max_attempts: 3,
    };
    let lease = claim(&*store, "w", policy).await;
    assert_eq!(
        store.cancel(owner, id, CancelMode::Force).await.unwrap(),
        Some(CancelOutcome::CancellationRequested)
    );
    tokio::time::sleep(PAST_SHORT).await;
    assert!(
        store
            .claim(&worker("w2"), &[ROUTE], policy)
            .await
            .unwrap()
            .is_none(),
        "a job its owner asked to stop is not run again"
    );
    assert_eq!(store.fail_abandoned(3).await.unwrap(), 1);
    assert_eq!(
        view(&*store, owner, id).await.job.state(),
        JobState::Cancelled,
        "cancelled, though attempts were left"
    );
    assert_eq!(store.fail_abandoned(3).await.unwrap(), 0);
    assert_lease_lost(store.end_cancelled(&lease).await, id);
    assert!(store
        .claim(&worker("w2"), &[ROUTE], policy)
        .await
        .unwrap()
        .is_none());
}

pub async fn previews_and_forced_cancels_are_events<B: Backend>(b: B) {
    let store = b.store();
    let mut events = store.subscribe();
    let owner = KeyId::new();
    let id = submit(&*store, owner, "watched").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store
        .heartbeat(
            &lease,
            &previewed(1, 4, BlobKey::random("jpeg")),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    // The same step's preview again, under a new key: only the preview changed.
    store
        .heartbeat(
            &lease,
            &previewed(1, 4, BlobKey::random("jpeg")),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    store.cancel(owner, id, CancelMode::Force).await.unwrap();
    store.end_cancelled(&lease).await.unwrap();
    let mut seen = vec![];
    while seen.last().map(|(state, _)| *state) != Some(JobState::Cancelled) {
        let notice = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("an event within 5 s")
            .expect("the store is open");
        match notice {
            JobNotice::Event(event) if event.id == id => seen.push((event.state, event.progress)),
            JobNotice::Event(_) => {}
            JobNotice::Resync => panic!("an unexpected resync"),
        }
    }
    let states: Vec<JobState> = seen.iter().map(|(state, _)| *state).collect();
    assert_eq!(
        states,
        [
            JobState::Queued,
            JobState::Running,
            JobState::Running,
            // A new preview, then the forced cancel's request: watchers read the job again.
            JobState::Running,
            JobState::Running,
            JobState::Cancelled,
        ],
        "{seen:?}"
    );
    assert_eq!(
        seen[2].1,
        Some(Progress { step: 1, total: 4 }),
        "the heartbeat's"
    );
}

pub async fn a_released_job_with_a_forced_cancel_pending_ends_cancelled<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let id = store
        .enqueue(new_job_with_webhook(owner, "shut down"), None, ROOMY)
        .await
        .unwrap()
        .view
        .job
        .id;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store.cancel(owner, id, CancelMode::Force).await.unwrap();
    store.release(&lease).await.unwrap();
    assert_eq!(
        view(&*store, owner, id).await.job.state(),
        JobState::Cancelled,
        "not put back in line"
    );
    assert!(store
        .claim(&worker("w2"), &[ROUTE], LONG_LEASE)
        .await
        .unwrap()
        .is_none());
    assert_lease_lost(store.release(&lease).await, id);
    let record = store.webhook_record(owner, id).await.unwrap();
    assert!(record.is_some(), "its end is announced");
}
