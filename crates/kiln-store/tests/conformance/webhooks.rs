//! The webhook outbox: one delivery per ended job that named a webhook, written with the end;
//! claims, attempts and what follows them; the record a result shows; purge.

use crate::harness::*;
use kiln_core::ids::{KeyId, RequestId};
use kiln_core::job::{CancelOutcome, JobState};
use kiln_core::store::{ClaimPolicy, JobStore};
use kiln_core::webhook::{
    AfterAttempt, AttemptOutcome, DeliveryState, WebhookAttempt, WebhookDelivery, WebhookRecord,
    WebhookUrl,
};
use std::collections::HashSet;
use std::time::Duration;
use time::OffsetDateTime;

const RETENTION: Duration = Duration::from_millis(400);
const PAST_RETENTION: Duration = Duration::from_millis(900);
/// A claim on deliveries that runs out during the test, and a wait past it.
const CLAIM: Duration = Duration::from_secs(1);
const PAST_CLAIM: Duration = Duration::from_millis(1600);
/// A claim that never runs out during the test.
const LONG_CLAIM: Duration = Duration::from_secs(600);

async fn submit_hooked<S: JobStore + ?Sized>(store: &S, owner: KeyId, prompt: &str) -> RequestId {
    store
        .enqueue(new_job_with_webhook(owner, prompt), None, ROOMY)
        .await
        .unwrap()
        .view
        .job
        .id
}

fn pending() -> WebhookRecord {
    WebhookRecord {
        url: WebhookUrl::parse(WEBHOOK).unwrap(),
        state: DeliveryState::Pending,
        attempts: vec![],
    }
}

fn attempt(outcome: AttemptOutcome) -> WebhookAttempt {
    // Whole milliseconds are enough; the store keeps the attempt as written.
    WebhookAttempt {
        at: OffsetDateTime::now_utc(),
        outcome,
    }
}

fn ids(deliveries: &[WebhookDelivery]) -> HashSet<RequestId> {
    deliveries.iter().map(|d| d.request).collect()
}

pub async fn every_end_of_a_job_with_a_webhook_writes_one_delivery<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let mut ended = vec![];

    let id = submit_hooked(&*store, owner, "succeeds").await;
    assert_eq!(
        store.webhook_record(owner, id).await.unwrap(),
        None,
        "not yet ended"
    );
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store.complete(&lease, output(vec![])).await.unwrap();
    ended.push(id);

    let id = submit_hooked(&*store, owner, "fails").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store.fail(&lease, engine_failed("no")).await.unwrap();
    ended.push(id);

    let id = submit_hooked(&*store, owner, "cancelled while queued").await;
    for _ in 0..2 {
        assert_eq!(
            store
                .cancel(owner, id, CancelMode::QueuedOnly)
                .await
                .unwrap(),
            Some(CancelOutcome::Cancelled)
        );
    }
    ended.push(id);

    let id = submit_hooked(&*store, owner, "stopped").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store.cancel(owner, id, CancelMode::Force).await.unwrap();
    assert_eq!(
        store.webhook_record(owner, id).await.unwrap(),
        None,
        "still running"
    );
    store.end_cancelled(&lease).await.unwrap();
    ended.push(id);

    // Abandoned: one past its last attempt, one with a forced cancel pending.
    let policy = ClaimPolicy {
        lease: SHORT_LEASE.lease,
        max_attempts: 1,
    };
    let lost = submit_hooked(&*store, owner, "worker lost").await;
    claim(&*store, "w", policy).await;
    let orphan = submit_hooked(&*store, owner, "orphan").await;
    claim(&*store, "w", policy).await;
    store
        .cancel(owner, orphan, CancelMode::Force)
        .await
        .unwrap();
    tokio::time::sleep(PAST_SHORT).await;
    assert_eq!(store.fail_abandoned(1).await.unwrap(), 2);
    assert_eq!(
        view(&*store, owner, lost).await.job.state(),
        JobState::Failed
    );
    assert_eq!(
        view(&*store, owner, orphan).await.job.state(),
        JobState::Cancelled
    );
    ended.extend([lost, orphan]);

    let silent = submit(&*store, owner, "no webhook").await;
    let lease = claim(&*store, "w", LONG_LEASE).await;
    store.complete(&lease, output(vec![])).await.unwrap();
    let silent_cancelled = submit(&*store, owner, "no webhook, cancelled").await;
    store
        .cancel(owner, silent_cancelled, CancelMode::QueuedOnly)
        .await
        .unwrap();

    for id in &ended {
        assert_eq!(
            store.webhook_record(owner, *id).await.unwrap(),
            Some(pending())
        );
        assert_eq!(
            store.webhook_record(KeyId::new(), *id).await.unwrap(),
            None,
            "owner's only"
        );
    }
    assert_eq!(store.webhook_record(owner, silent).await.unwrap(), None);
    let claimed = store.claim_webhooks(100, LONG_CLAIM).await.unwrap();
    assert_eq!(claimed.len(), ended.len(), "one each: {claimed:?}");
    assert_eq!(ids(&claimed), ended.iter().copied().collect());
    for delivery in &claimed {
        assert_eq!((delivery.owner, delivery.url.as_str()), (owner, WEBHOOK));
        assert!(delivery.attempts.is_empty());
    }
}

pub async fn a_due_delivery_goes_to_one_claimer_at_a_time<B: Backend>(b: B) {
    let handles = b.handles(2).await;
    let store = handles[0].clone();
    let owner = KeyId::new();
    let id = submit_hooked(&*store, owner, "announced").await;
    store
        .cancel(owner, id, CancelMode::QueuedOnly)
        .await
        .unwrap();
    let claims = all_at_once(handles.iter().map(|h| {
        let h = h.clone();
        async move { h.claim_webhooks(10, CLAIM).await.unwrap() }
    }))
    .await;
    let first: Vec<WebhookDelivery> = claims.into_iter().flatten().collect();
    assert_eq!(first.len(), 1, "one claimer only: {first:?}");
    assert_eq!(first[0].request, id);
    assert!(
        handles[1]
            .claim_webhooks(10, CLAIM)
            .await
            .unwrap()
            .is_empty(),
        "not again while claimed"
    );
    tokio::time::sleep(PAST_CLAIM).await;
    let again = handles[1].claim_webhooks(10, CLAIM).await.unwrap();
    assert_eq!(
        ids(&again),
        HashSet::from([id]),
        "taken over once the claim ran out"
    );
    assert!(again[0].claim_token > first[0].claim_token);
    assert_lease_lost(
        store
            .record_webhook_attempt(
                &first[0],
                attempt(AttemptOutcome::Status(200)),
                AfterAttempt::Delivered,
            )
            .await,
        id,
    );
    assert_eq!(
        store.webhook_record(owner, id).await.unwrap(),
        Some(pending())
    );
    handles[1]
        .record_webhook_attempt(
            &again[0],
            attempt(AttemptOutcome::Status(204)),
            AfterAttempt::Delivered,
        )
        .await
        .unwrap();
}

pub async fn attempts_are_recorded_in_order_and_decide_what_follows<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let mut jobs = vec![];
    for prompt in ["retried then delivered", "retried later", "given up"] {
        let id = submit_hooked(&*store, owner, prompt).await;
        store
            .cancel(owner, id, CancelMode::QueuedOnly)
            .await
            .unwrap();
        jobs.push(id);
    }
    let [delivered, later, given_up] = [jobs[0], jobs[1], jobs[2]];
    let claimed = store.claim_webhooks(10, LONG_CLAIM).await.unwrap();
    assert_eq!(ids(&claimed), jobs.iter().copied().collect());
    let of = |id| claimed.iter().find(|d| d.request == id).unwrap().clone();

    // Retried at once: due again, claimed again (by a new claim), then delivered.
    let failed_once = attempt(AttemptOutcome::Status(500));
    store
        .record_webhook_attempt(
            &of(delivered),
            failed_once.clone(),
            AfterAttempt::RetryIn(Duration::ZERO),
        )
        .await
        .unwrap();
    let retry = store.claim_webhooks(10, LONG_CLAIM).await.unwrap();
    assert_eq!(ids(&retry), HashSet::from([delivered]), "only the one due");
    assert_eq!(retry[0].attempts, vec![failed_once.clone()]);
    assert_lease_lost(
        store
            .record_webhook_attempt(
                &of(delivered),
                attempt(AttemptOutcome::Status(200)),
                AfterAttempt::Delivered,
            )
            .await,
        delivered,
    );
    let ok = attempt(AttemptOutcome::Status(200));
    store
        .record_webhook_attempt(&retry[0], ok.clone(), AfterAttempt::Delivered)
        .await
        .unwrap();
    assert_eq!(
        store.webhook_record(owner, delivered).await.unwrap(),
        Some(WebhookRecord {
            state: DeliveryState::Delivered,
            attempts: vec![failed_once, ok],
            ..pending()
        })
    );
    assert_lease_lost(
        store
            .record_webhook_attempt(
                &retry[0],
                attempt(AttemptOutcome::Status(200)),
                AfterAttempt::Delivered,
            )
            .await,
        delivered,
    );

    // Retried in an hour: pending, and not due.
    let timed_out = attempt(AttemptOutcome::Error("timed out after 10 s".into()));
    store
        .record_webhook_attempt(
            &of(later),
            timed_out.clone(),
            AfterAttempt::RetryIn(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    assert_eq!(
        store.webhook_record(owner, later).await.unwrap(),
        Some(WebhookRecord {
            attempts: vec![timed_out],
            ..pending()
        })
    );

    // Given up.
    let refused = attempt(AttemptOutcome::Error("could not connect".into()));
    store
        .record_webhook_attempt(&of(given_up), refused.clone(), AfterAttempt::GiveUp)
        .await
        .unwrap();
    assert_eq!(
        store.webhook_record(owner, given_up).await.unwrap(),
        Some(WebhookRecord {
            state: DeliveryState::Failed,
            attempts: vec![refused],
            ..pending()
        })
    );
    assert_lease_lost(
        store
            .record_webhook_attempt(
                &of(given_up),
                attempt(AttemptOutcome::Status(200)),
                AfterAttempt::Delivered,
            )
            .await,
        given_up,
    );
    assert!(
        store
            .claim_webhooks(10, LONG_CLAIM)
            .await
            .unwrap()
            .is_empty(),
        "nothing is due: delivered, an hour away, given up"
    );
}

pub async fn purge_removes_the_deliveries_of_purged_jobs<B: Backend>(b: B) {
    let store = b.store();
    let owner = KeyId::new();
    let mut job = new_job_with_webhook(owner, "short-lived");
    job.expires_at = job.created_at + RETENTION;
    let id = store.enqueue(job, None, ROOMY).await.unwrap().view.job.id;
    let kept = submit_hooked(&*store, owner, "kept").await;
    for id in [id, kept] {
        store
            .cancel(owner, id, CancelMode::QueuedOnly)
            .await
            .unwrap();
    }
    tokio::time::sleep(PAST_RETENTION).await;
    assert_eq!(
        store.webhook_record(owner, id).await.unwrap(),
        None,
        "an expired request shows nothing"
    );
    store
        .purge_expired(OffsetDateTime::now_utc())
        .await
        .unwrap();
    let claimed = store.claim_webhooks(10, LONG_CLAIM).await.unwrap();
    assert_eq!(
        ids(&claimed),
        HashSet::from([kept]),
        "the purged job's delivery is gone"
    );
}
