//! Idempotency keys: a repeat replays the original, another request under the key conflicts,
//! keys are scoped to their token and forgotten after their window.

use crate::harness::*;
use kiln_core::ids::KeyId;
use kiln_core::job::{JobState, JobStatus};
use kiln_core::store::{Idempotency, JobStore, StoreError};
use std::time::Duration;

pub fn idem(key: &str, fingerprint: &str) -> Option<Idempotency> {
    Some(Idempotency {
        key: key.into(),
        fingerprint: fingerprint.into(),
        window: Duration::from_secs(86400),
    })
}

pub async fn a_repeated_key_replays_the_original_and_another_body_conflicts<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let first = store
        .enqueue(new_job(owner, "a"), idem("k1", "fp-a"), ROOMY)
        .await
        .unwrap();
    assert!(!first.replayed);
    let repeat = new_job(owner, "a");
    let again = store
        .enqueue(repeat.clone(), idem("k1", "fp-a"), ROOMY)
        .await
        .unwrap();
    assert!(again.replayed);
    assert_eq!(again.view.job.id, first.view.job.id);
    assert_eq!(again.view.job.status, JobStatus::Queued);
    assert_eq!(again.view.queue_position, Some(0));
    assert!(
        hidden(&*store, owner, repeat.id).await,
        "a replay stores nothing new"
    );
    let conflicting = new_job(owner, "b");
    assert!(matches!(
        store
            .enqueue(conflicting.clone(), idem("k1", "fp-b"), ROOMY)
            .await,
        Err(StoreError::IdempotencyConflict)
    ));
    assert!(hidden(&*store, owner, conflicting.id).await);
    let other_owner = store
        .enqueue(new_job(KeyId::new(), "a"), idem("k1", "fp-a"), ROOMY)
        .await
        .unwrap();
    assert!(!other_owner.replayed, "keys are scoped to their token");
    let other_key = store
        .enqueue(new_job(owner, "a"), idem("k2", "fp-a"), ROOMY)
        .await
        .unwrap();
    assert!(!other_key.replayed);
    assert_eq!(count_list(&*store).await, [3, 0, 0, 0, 0]);

    // A replay after the job has run answers the original as it stands now.
    let lease = claim(&*store, "w", LONG_LEASE).await;
    assert_eq!(lease.job.id, first.view.job.id);
    store.complete(&lease, output(vec![])).await.unwrap();
    let later = store
        .enqueue(new_job(owner, "a"), idem("k1", "fp-a"), ROOMY)
        .await
        .unwrap();
    assert!(later.replayed);
    assert_eq!(later.view.job.id, first.view.job.id);
    assert_eq!(later.view.job.state(), JobState::Succeeded);
    assert_eq!(later.view.queue_position, None);
    assert!(matches!(
        store
            .enqueue(new_job(owner, "b"), idem("k1", "fp-b"), ROOMY)
            .await,
        Err(StoreError::IdempotencyConflict)
    ));
    assert_eq!(count_list(&*store).await, [2, 0, 1, 0, 0]);
}

pub async fn a_key_past_its_window_is_forgotten<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let short = |fingerprint: &str| {
        Some(Idempotency {
            key: "k".into(),
            fingerprint: fingerprint.into(),
            window: Duration::from_millis(300),
        })
    };
    let a = store
        .enqueue(new_job(owner, "c"), short("x"), ROOMY)
        .await
        .unwrap();
    let within = store
        .enqueue(new_job(owner, "c"), short("x"), ROOMY)
        .await
        .unwrap();
    assert!(within.replayed, "still within the window");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let b = store
        .enqueue(new_job(owner, "c"), short("x"), ROOMY)
        .await
        .unwrap();
    assert!(
        !b.replayed && a.view.job.id != b.view.job.id,
        "a key past its window is forgotten"
    );
    let c = store
        .enqueue(new_job(owner, "c"), short("x"), ROOMY)
        .await
        .unwrap();
    assert!(c.replayed, "and remembered anew for the new job");
    assert_eq!(c.view.job.id, b.view.job.id);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let d = store
        .enqueue(new_job(owner, "other body"), short("y"), ROOMY)
        .await
        .expect("a forgotten key conflicts with nothing");
    assert!(!d.replayed);
    assert_eq!(count_list(&*store).await, [3, 0, 0, 0, 0]);
}
