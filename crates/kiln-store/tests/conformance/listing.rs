//! One owner's jobs listed newest first, a page at a time (`list_jobs`, behind
//! `GET /v1/requests`).

use crate::harness::*;
use kiln_core::ids::{BlobKey, KeyId, RequestId};
use kiln_core::job::Job;
use kiln_core::store::{JobCursor, JobPage, JobStore};
use std::collections::HashSet;
use std::time::Duration;

/// Submits `n` jobs of `owner`; their ids, oldest first.
async fn submit_n<S: JobStore + ?Sized>(store: &S, owner: KeyId, n: usize) -> Vec<RequestId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(submit(store, owner, &format!("job {i} of {owner}")).await);
    }
    ids
}

async fn page<S: JobStore + ?Sized>(
    store: &S,
    owner: KeyId,
    before: Option<JobCursor>,
    limit: u32,
) -> JobPage {
    store.list_jobs(owner, before, limit).await.unwrap()
}

fn ids(jobs: &[Job]) -> Vec<RequestId> {
    jobs.iter().map(|job| job.id).collect()
}

/// Every page of `owner`'s listing with `limit`, following `next` to the end.
async fn every_page<S: JobStore + ?Sized>(store: &S, owner: KeyId, limit: u32) -> Vec<JobPage> {
    let mut pages = vec![page(store, owner, None, limit).await];
    while let Some(next) = pages.last().unwrap().next {
        assert!(pages.len() < 100, "the listing never ends");
        pages.push(page(store, owner, Some(next), limit).await);
    }
    pages
}

pub async fn jobs_are_listed_newest_first_and_pages_reach_each_once<B: Backend>(b: B) {
    let store = b.store();
    let (owner, other) = (KeyId::new(), KeyId::new());
    // Another owner's submits in between: they take positions, and must leave no gap.
    let mut mine = submit_n(&*store, owner, 4).await;
    submit_n(&*store, other, 3).await;
    mine.extend(submit_n(&*store, owner, 3).await);
    let newest_first: Vec<RequestId> = mine.iter().rev().copied().collect();

    let whole = page(&*store, owner, None, 100).await;
    assert_eq!(ids(&whole.jobs), newest_first, "newest first, all of them");
    assert_eq!(whole.next, None, "nothing is older than the last job");

    let pages = every_page(&*store, owner, 3).await;
    let sizes: Vec<usize> = pages.iter().map(|p| p.jobs.len()).collect();
    assert_eq!(sizes, [3, 3, 1], "each page holds at most the limit");
    let listed: Vec<RequestId> = pages.iter().flat_map(|p| ids(&p.jobs)).collect();
    assert_eq!(
        listed, newest_first,
        "the pages, in turn, list each job once"
    );
    let unique: HashSet<RequestId> = listed.iter().copied().collect();
    assert_eq!(unique.len(), listed.len(), "no job twice");

    // A limit that divides the jobs exactly: the last full page says no older one exists.
    let pages = every_page(&*store, owner, 7).await;
    assert_eq!(pages.len(), 1, "7 jobs fit one page of 7");
    let one = page(&*store, owner, None, 1).await;
    assert_eq!(ids(&one.jobs), [newest_first[0]]);
    assert!(one.next.is_some());
}

pub async fn a_listed_job_reads_as_get_reads_it<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let [done, failed, cancelled, running, queued] = submit_n(&*store, owner, 5).await[..] else {
        unreachable!()
    };
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store
        .complete(&lease, output(vec![BlobKey::random("png")]))
        .await
        .unwrap();
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store.fail(&lease, engine_failed("no")).await.unwrap();
    store
        .cancel(owner, cancelled, CancelMode::QueuedOnly)
        .await
        .unwrap();
    claim(&*store, "w", LONG_LEASE).await;

    let listed = page(&*store, owner, None, 10).await.jobs;
    assert_eq!(ids(&listed), [queued, running, cancelled, failed, done]);
    for job in &listed {
        assert_eq!(
            job,
            &view(&*store, owner, job.id).await.job,
            "a listed job is the job, in its state, with what that state carries"
        );
    }
}

pub async fn another_owners_jobs_are_never_listed<B: Backend>(b: B) {
    let store = b.store();
    let (alice, bob) = (KeyId::new(), KeyId::new());
    let empty = page(&*store, alice, None, 20).await;
    assert!(empty.jobs.is_empty(), "a key with no jobs lists none");
    assert_eq!(empty.next, None);

    let alices = submit_n(&*store, alice, 3).await;
    let bobs = submit_n(&*store, bob, 2).await;
    let listed = page(&*store, bob, None, 20).await;
    assert_eq!(
        ids(&listed.jobs),
        bobs.iter().rev().copied().collect::<Vec<_>>()
    );
    assert!(listed.jobs.iter().all(|job| job.owner == bob));
    // A cursor taken from Alice's listing lists only Bob's jobs older than it, if any.
    let alices_page = page(&*store, alice, None, 1).await;
    let cursor = alices_page.next.expect("Alice has older jobs");
    assert_eq!(ids(&alices_page.jobs), [alices[2]]);
    let through_hers = page(&*store, bob, Some(cursor), 20).await;
    assert!(through_hers.jobs.is_empty(), "Bob's jobs are all newer");
    assert!(page(&*store, KeyId::new(), None, 20).await.jobs.is_empty());
}

pub async fn later_submits_never_shift_older_pages<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let ids_old = submit_n(&*store, owner, 4).await;
    let first = page(&*store, owner, None, 2).await;
    assert_eq!(ids(&first.jobs), [ids_old[3], ids_old[2]]);
    let newer = submit_n(&*store, owner, 2).await;
    let second = page(&*store, owner, first.next, 2).await;
    assert_eq!(
        ids(&second.jobs),
        [ids_old[1], ids_old[0]],
        "the second page goes on where the first ended"
    );
    assert_eq!(second.next, None);
    let fresh = page(&*store, owner, None, 2).await;
    assert_eq!(ids(&fresh.jobs), [newer[1], newer[0]]);
}

pub async fn expired_jobs_are_not_listed<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let kept = submit(&*store, owner, "kept").await;
    let short = store
        .enqueue(
            short_lived(owner, "short", Duration::from_millis(300)),
            None,
            ROOMY,
        )
        .await
        .unwrap()
        .view
        .job
        .id;
    store
        .cancel(owner, short, CancelMode::QueuedOnly)
        .await
        .unwrap();
    assert_eq!(
        ids(&page(&*store, owner, None, 10).await.jobs),
        [short, kept]
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Expired but not yet purged: gone from the listing as from `get`.
    assert!(hidden(&*store, owner, short).await);
    let listed = page(&*store, owner, None, 1).await;
    assert_eq!(ids(&listed.jobs), [kept]);
    assert_eq!(listed.next, None, "an expired job makes no older page");
}
