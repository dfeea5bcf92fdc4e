//! Retention counts from the end of a job; purge deletes expired records and reports the files
//! they referenced; a file is live while a visible record references it.

use crate::harness::*;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId};
use kiln_core::job::{JobStatus, NewJob};
use kiln_core::params::ImageSource;
use kiln_core::store::JobStore;
use std::time::Duration;
use time::OffsetDateTime;

const RETENTION: Duration = Duration::from_millis(400);
const PAST_RETENTION: Duration = Duration::from_millis(900);

async fn enqueue<S: JobStore + ?Sized>(store: &S, job: NewJob) -> RequestId {
    store.enqueue(job, None, ROOMY).await.unwrap().view.job.id
}

/// One job of each kind, by owner `owner`: ended (succeeded, failed, cancelled, and a failed edit
/// with a stored reference image) with a short retention, succeeded with an hour's, still
/// running, still queued.
struct Jobs {
    owner: KeyId,
    succeeds: RequestId,
    fails: RequestId,
    cancelled: RequestId,
    kept: RequestId,
    running: RequestId,
    queued: RequestId,
    edit: RequestId,
    /// The short-lived succeeded job's image, the kept one's, and the edit's reference.
    short_key: BlobKey,
    kept_key: BlobKey,
    reference: BlobKey,
}

async fn one_job_of_each_kind<S: JobStore + ?Sized>(store: &S) -> Jobs {
    let owner = KeyId::new();
    // An edit whose reference image is stored with the job: the file lives with the record.
    let reference = BlobKey::random("png");
    let mut edit = short_lived(owner, "edit", RETENTION);
    edit.route = Route::Flux2FlexEdit;
    edit.params.reference_images = vec![ImageSource::stored("image/png", &reference)];
    let ids = [
        enqueue(store, short_lived(owner, "succeeds", RETENTION)).await,
        enqueue(store, short_lived(owner, "fails", RETENTION)).await,
        enqueue(store, short_lived(owner, "cancelled", RETENTION)).await,
        enqueue(store, new_job(owner, "kept an hour")).await,
        enqueue(store, short_lived(owner, "still running", RETENTION)).await,
        enqueue(store, short_lived(owner, "still queued", RETENTION)).await,
        enqueue(store, edit).await,
    ];
    let [succeeds, fails, cancelled, kept, running, queued, edit] = ids;
    assert!(store.blob_is_live(&reference).await.unwrap());
    store
        .cancel(owner, cancelled, CancelMode::QueuedOnly)
        .await
        .unwrap();
    let (short_key, kept_key) = (BlobKey::random("png"), BlobKey::random("png"));
    let lease = claim(store, "w", LONG_LEASE).await;
    assert_eq!(lease.job.id, succeeds);
    store
        .complete(&lease, output(vec![short_key.clone()]))
        .await
        .unwrap();
    let lease = claim(store, "w", LONG_LEASE).await;
    store.fail(&lease, engine_failed("no")).await.unwrap();
    let lease = claim(store, "w", LONG_LEASE).await;
    assert_eq!(lease.job.id, kept);
    store
        .complete(&lease, output(vec![kept_key.clone()]))
        .await
        .unwrap();
    let lease = claim(store, "w", LONG_LEASE).await;
    assert_eq!(lease.job.id, running);
    let edit_lease = store
        .claim(&worker("w"), &[Route::Flux2FlexEdit], LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    store.fail(&edit_lease, engine_failed("no")).await.unwrap();
    Jobs {
        owner,
        succeeds,
        fails,
        cancelled,
        kept,
        running,
        queued,
        edit,
        short_key,
        kept_key,
        reference,
    }
}

pub async fn purge_removes_expired_records_and_reports_their_files<B: Backend>(b: B) {
    let store = b.store();
    let Jobs {
        owner,
        succeeds,
        fails,
        cancelled,
        kept,
        running,
        queued,
        edit,
        short_key,
        kept_key,
        reference,
    } = one_job_of_each_kind(&*store).await;

    // Every terminal transition moves the expiry to the end + the retention submitted with.
    for id in [succeeds, fails, cancelled] {
        let job = view(&*store, owner, id).await.job;
        let finished = job.status.finished_at().expect("ended");
        let slack = Duration::from_millis(2);
        assert_close(
            job.expires_at,
            finished + RETENTION,
            slack,
            "expiry after the end",
        );
    }
    assert!(
        store
            .purge_expired(OffsetDateTime::now_utc())
            .await
            .unwrap()
            .is_empty(),
        "retention runs from the end, not from the submit"
    );
    assert!(store.blob_is_live(&short_key).await.unwrap());

    tokio::time::sleep(PAST_RETENTION).await;
    for id in [succeeds, fails, cancelled, edit] {
        assert!(
            hidden(&*store, owner, id).await,
            "an expired record is gone for its owner at once"
        );
    }
    assert!(
        !store.blob_is_live(&short_key).await.unwrap(),
        "an expired record's file is dead at once"
    );
    assert!(!store.blob_is_live(&reference).await.unwrap());
    assert!(store.blob_is_live(&kept_key).await.unwrap());
    assert_eq!(count_list(&*store).await, [1, 1, 2, 2, 1]);

    let mut purged = store
        .purge_expired(OffsetDateTime::now_utc())
        .await
        .unwrap();
    purged.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut expected = vec![short_key, reference];
    expected.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    assert_eq!(
        purged, expected,
        "the expired records' files, and only theirs"
    );
    // [queued, running, succeeded, failed, cancelled]: what waits or runs is never purged.
    assert_eq!(count_list(&*store).await, [1, 1, 1, 0, 0]);
    assert_eq!(
        view(&*store, owner, queued).await.job.status,
        JobStatus::Queued
    );
    assert_eq!(
        view(&*store, owner, running).await.job.status.finished_at(),
        None
    );
    assert!(view(&*store, owner, kept)
        .await
        .job
        .status
        .finished_at()
        .is_some());
    assert!(store.blob_is_live(&kept_key).await.unwrap());
    assert!(store
        .purge_expired(OffsetDateTime::now_utc())
        .await
        .unwrap()
        .is_empty());
}
