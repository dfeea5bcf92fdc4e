//! Job events: every committed change of a job reaches the store's subscribers, in order.

use crate::harness::*;
use kiln_core::ids::{KeyId, RequestId};
use kiln_core::job::{JobState, Progress};
use kiln_core::store::{JobEvent, JobEvents, JobNotice, JobStore};
use std::time::Duration;

/// The next event about `id`, skipping other jobs' (and failing on a timeout or a resync,
/// which a quiet test store has no reason to send).
async fn next_about(events: &mut JobEvents, id: RequestId) -> JobEvent {
    loop {
        let notice = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event about {id} within 5 s"))
            .expect("the store is open");
        match notice {
            JobNotice::Event(event) if event.id == id => return event,
            JobNotice::Event(_) => continue,
            JobNotice::Resync => panic!("an unexpected resync"),
        }
    }
}

pub async fn every_change_of_a_job_is_an_event_in_order<B: Backend>(b: B) {
    let store = b.store();
    let mut events = store.subscribe();
    let owner = KeyId::new();
    let id = submit(store.as_ref(), owner, "followed").await;
    let queued = next_about(&mut events, id).await;
    assert_eq!(
        (queued.owner, queued.route, queued.state, queued.progress),
        (owner, ROUTE, JobState::Queued, None)
    );

    let lease = claim(store.as_ref(), "w", LONG_LEASE).await;
    assert_eq!(next_about(&mut events, id).await.state, JobState::Running);
    let step = Progress { step: 2, total: 4 };
    store
        .heartbeat(&lease, &progressed(step), Duration::from_secs(60))
        .await
        .unwrap();
    let beat = next_about(&mut events, id).await;
    assert_eq!((beat.state, beat.progress), (JobState::Running, Some(step)));
    store.complete(&lease, output(vec![])).await.unwrap();
    assert_eq!(next_about(&mut events, id).await.state, JobState::Succeeded);

    let cancelled = submit(store.as_ref(), owner, "cancelled").await;
    assert_eq!(
        next_about(&mut events, cancelled).await.state,
        JobState::Queued
    );
    store
        .cancel(owner, cancelled, CancelMode::QueuedOnly)
        .await
        .unwrap();
    assert_eq!(
        next_about(&mut events, cancelled).await.state,
        JobState::Cancelled
    );
}

pub async fn a_released_or_failed_job_is_announced<B: Backend>(b: B) {
    let store = b.store();
    let mut events = store.subscribe();
    let owner = KeyId::new();
    let id = submit(store.as_ref(), owner, "back and forth").await;
    assert_eq!(next_about(&mut events, id).await.state, JobState::Queued);
    let lease = claim(store.as_ref(), "w", LONG_LEASE).await;
    assert_eq!(next_about(&mut events, id).await.state, JobState::Running);
    store.release(&lease).await.unwrap();
    assert_eq!(
        next_about(&mut events, id).await.state,
        JobState::Queued,
        "a released job waits again, and pollers and idle workers are told"
    );
    let lease = claim(store.as_ref(), "w", LONG_LEASE).await;
    assert_eq!(next_about(&mut events, id).await.state, JobState::Running);
    store.fail(&lease, engine_failed("boom")).await.unwrap();
    assert_eq!(next_about(&mut events, id).await.state, JobState::Failed);
}
