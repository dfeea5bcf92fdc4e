//! Many workers and submitters at once, each with its own handle on the database where the
//! backend allows (as separate processes or machines would have).

use crate::harness::*;
use crate::idempotency::idem;
use kiln_core::ids::{BlobKey, KeyId, RequestId};
use kiln_core::job::JobStatus;
use kiln_core::store::{JobStore, QueueLimits, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const JOBS: usize = 500;
const WORKERS: usize = 8;
const SUBMITTERS: usize = 4;

/// Race (a): 8 workers, each with its own handle, claim and complete 500 jobs while 4
/// submitters are still submitting them: every job is claimed once and completed once.
pub async fn eight_workers_complete_every_job_exactly_once<B: Backend>(b: B) {
    let handles = b.handles(WORKERS).await;
    let owner = KeyId::new();
    let completed = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);

    let submitters = (0..SUBMITTERS).map(|s| {
        let store = handles[s].clone();
        tokio::spawn(async move {
            let mut ids = vec![];
            for i in 0..JOBS / SUBMITTERS {
                let e = store
                    .enqueue(new_job(owner, &format!("{s}-{i}")), None, ROOMY)
                    .await
                    .unwrap();
                ids.push(e.view.job.id);
            }
            ids
        })
    });
    let submitters: Vec<_> = submitters.collect();

    let workers: Vec<_> = handles
        .iter()
        .enumerate()
        .map(|(w, store)| {
            let store = store.clone();
            let completed = completed.clone();
            tokio::spawn(async move {
                let name = format!("w{w}");
                let mut done: Vec<(RequestId, BlobKey)> = vec![];
                while completed.load(Ordering::SeqCst) < JOBS {
                    assert!(
                        Instant::now() < deadline,
                        "{name}: the jobs never all ended"
                    );
                    let Some(lease) = store
                        .claim(&worker(&name), &[ROUTE], LONG_LEASE)
                        .await
                        .unwrap()
                    else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    assert_eq!(lease.attempt, 1, "{name}: a job claimed a second time");
                    let key = BlobKey::random("jpeg");
                    store
                        .complete(&lease, output(vec![key.clone()]))
                        .await
                        .unwrap_or_else(|e| panic!("{name}: completing {}: {e:?}", lease.job.id));
                    done.push((lease.job.id, key));
                    completed.fetch_add(1, Ordering::SeqCst);
                }
                done
            })
        })
        .collect();

    let mut submitted = HashSet::new();
    for s in submitters {
        submitted.extend(s.await.unwrap());
    }
    assert_eq!(submitted.len(), JOBS);
    let mut completions: HashMap<RequestId, Vec<BlobKey>> = HashMap::new();
    for w in workers {
        for (id, key) in w.await.unwrap() {
            completions.entry(id).or_default().push(key);
        }
    }
    let twice: Vec<_> = completions.iter().filter(|(_, k)| k.len() > 1).collect();
    assert!(twice.is_empty(), "completed more than once: {twice:?}");
    let ids: HashSet<_> = completions.keys().copied().collect();
    assert_eq!(
        ids, submitted,
        "every job completed, none lost, none made up"
    );
    // [queued, running, succeeded, failed, cancelled]
    assert_eq!(count_list(&*handles[0]).await, [0, 0, JOBS as u64, 0, 0]);
    for (id, keys) in &completions {
        match view(&*handles[0], owner, *id).await.job.status {
            JobStatus::Succeeded { output, .. } => {
                assert_eq!(&output.images, keys, "the completing worker's output")
            }
            other => panic!("{id}: {other:?}"),
        }
    }
}

/// Race (c): 40 submits at once from 4 handles against a queue of 25: exactly 25 accepted.
pub async fn concurrent_submits_never_pass_the_queue_limit<B: Backend>(b: B) {
    let handles = b.handles(4).await;
    let limits = QueueLimits::total(25);
    let outcomes = all_at_once((0..40).map(|i| {
        let store = handles[i % handles.len()].clone();
        // Several owners: the whole queue's limit, not one key's.
        let owner = KeyId::new();
        async move { store.enqueue(new_job(owner, "j"), None, limits).await }
    }))
    .await;
    let mut positions = HashSet::new();
    let mut refused = 0;
    for outcome in outcomes {
        match outcome {
            Ok(e) => assert!(positions.insert(e.view.queue_position.unwrap())),
            Err(StoreError::QueueFull { depth: 25 }) => refused += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((positions.len(), refused), (25, 15));
    assert_eq!(positions, (0..25).collect(), "one place in line each");
    assert_eq!(count_list(&*handles[0]).await, [25, 0, 0, 0, 0]);
}

pub async fn the_per_key_limit_is_exact_under_concurrent_submits<B: Backend>(b: B) {
    let handles = b.handles(4).await;
    let (x, y) = (KeyId::new(), KeyId::new());
    let limits = QueueLimits {
        total: 1_000,
        per_owner: 7,
    };
    let outcomes = all_at_once((0..40).map(|i| {
        let store = handles[i % handles.len()].clone();
        let owner = if i % 2 == 0 { x } else { y };
        async move {
            (
                owner,
                store.enqueue(new_job(owner, "j"), None, limits).await,
            )
        }
    }))
    .await;
    let mut accepted: HashMap<KeyId, u64> = HashMap::new();
    for (owner, outcome) in outcomes {
        match outcome {
            Ok(_) => *accepted.entry(owner).or_default() += 1,
            Err(StoreError::OwnerQueueFull { queued: 7 }) => {}
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!((accepted[&x], accepted[&y]), (7, 7));
    assert_eq!(count_list(&*handles[0]).await, [14, 0, 0, 0, 0]);
}

pub async fn concurrent_submits_each_get_their_own_place_in_line<B: Backend>(b: B) {
    let handles = b.handles(4).await;
    let owner = KeyId::new();
    let outcomes = all_at_once((0..200).map(|i| {
        let store = handles[i % handles.len()].clone();
        async move {
            store
                .enqueue(new_job(owner, &format!("job {i}")), None, ROOMY)
                .await
                .unwrap()
        }
    }))
    .await;
    let positions: HashSet<_> = outcomes
        .iter()
        .map(|e| e.view.queue_position.unwrap())
        .collect();
    assert_eq!(positions, (0..200).collect(), "one place in line each");
    for e in &outcomes {
        let stored = view(&*handles[1], owner, e.view.job.id).await;
        assert_eq!(stored.job.params, e.view.job.params);
        assert_eq!(
            stored.queue_position, e.view.queue_position,
            "the place the submit was told is its place"
        );
    }
    assert_eq!(count_list(&*handles[0]).await, [200, 0, 0, 0, 0]);
}

/// Race (d): one idempotency key submitted many times at once (from 4 handles) makes one job;
/// with two bodies at once under one key, the first to commit wins and the other conflicts.
pub async fn one_idempotency_key_submitted_concurrently_makes_one_job<B: Backend>(b: B) {
    let handles = b.handles(4).await;
    let owner = KeyId::new();
    let outcomes = all_at_once((0..16).map(|i| {
        let store = handles[i % handles.len()].clone();
        async move {
            store
                .enqueue(new_job(owner, "same"), idem("same-key", "fp"), ROOMY)
                .await
                .unwrap()
        }
    }))
    .await;
    let ids: HashSet<_> = outcomes.iter().map(|e| e.view.job.id).collect();
    assert_eq!(ids.len(), 1, "one job for one key: {ids:?}");
    assert_eq!(outcomes.iter().filter(|e| !e.replayed).count(), 1);
    assert_eq!(count_list(&*handles[0]).await, [1, 0, 0, 0, 0]);

    let outcomes = all_at_once((0..16).map(|i| {
        let store = handles[i % handles.len()].clone();
        let fingerprint = if i % 2 == 0 { "body-a" } else { "body-b" };
        async move {
            let outcome = store
                .enqueue(
                    new_job(owner, fingerprint),
                    idem("mixed", fingerprint),
                    ROOMY,
                )
                .await;
            (fingerprint, outcome)
        }
    }))
    .await;
    let created: Vec<_> = outcomes
        .iter()
        .filter_map(|(fp, o)| match o {
            Ok(e) if !e.replayed => Some((*fp, e.view.job.id)),
            _ => None,
        })
        .collect();
    assert_eq!(created.len(), 1, "one job for one key: {created:?}");
    let (winner, job) = created[0];
    for (fp, outcome) in &outcomes {
        match outcome {
            Ok(e) => assert_eq!((*fp, e.view.job.id), (winner, job)),
            Err(StoreError::IdempotencyConflict) => assert_ne!(*fp, winner),
            Err(other) => panic!("{other:?}"),
        }
    }
    assert_eq!(count_list(&*handles[0]).await, [2, 0, 0, 0, 0]);
}
