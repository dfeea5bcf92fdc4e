//! The webhook dispatcher against a real SQLite store and a real receiver on loopback: signed
//! deliveries (checked by the `standardwebhooks` crate, an independent implementation of the
//! spec), retries, a restart between attempts, the address guard, timeouts and the deadline.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use kiln_core::ids::{KeyId, RequestId, WorkerId};
use kiln_core::store::{ClaimPolicy, JobStore, QueueLimits, StoreError};
use kiln_core::webhook::{
    message_id, webhook_secret, AttemptOutcome, DeliveryState, WebhookDelivery, WebhookMessages,
    WebhookRecord, WebhookUrl,
};
use kiln_store::SqliteStore;
use kiln_testkit::jobs::{new_job, output, ROUTE};
use kiln_worker::{run_dispatcher, AllowList, WebhookSettings};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SIGNING_KEY: &[u8] = b"the deployment's signing key";

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Answers this status only after this long.
    Slow(Duration, u16),
}

/// A request the receiver got.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

/// An HTTP server on loopback that records what it is sent and answers from a script (200
/// once the script is used up).
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

impl Receiver {
    /// Serves on an ephemeral loopback port; returns the webhook URL that reaches it.
    async fn start(script: impl IntoIterator<Item = Answer>) -> (Self, String) {
        let receiver = Self::default();
        receiver.script.lock().unwrap().extend(script);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, format!("http://127.0.0.1:{port}/hook"))
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Records the request and answers the script's next answer; a 3xx points back here.
async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, [(&'static str, &'static str); 1]) {
    receiver.seen.lock().unwrap().push(Seen {
        at: Instant::now(),
        headers,
        body,
    });
    let answer = receiver.script.lock().unwrap().pop_front();
    let status = match answer.unwrap_or(Answer::Status(200)) {
        Answer::Status(status) => status,
        Answer::Slow(after, status) => {
            tokio::time::sleep(after).await;
            status
        }
    };
    (
        StatusCode::from_u16(status).unwrap(),
        [("location", "/hook")],
    )
}

/// The message body kiln-api would write, reduced to what the tests check.
struct FixedBodies;

#[async_trait::async_trait]
impl WebhookMessages for FixedBodies {
    async fn body(&self, delivery: &WebhookDelivery) -> Result<Option<Vec<u8>>, StoreError> {
        let body = serde_json::json!({
            "request_id": delivery.request.to_string(),
            "status": "OK",
            "payload": {"status": "Ready"},
        });
        Ok(Some(body.to_string().into_bytes()))
    }
}

/// Messages whose requests' records have all expired.
struct NoRecords;

#[async_trait::async_trait]
impl WebhookMessages for NoRecords {
    async fn body(&self, _: &WebhookDelivery) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(None)
    }
}

async fn open(path: &Path) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(path).await.unwrap())
}

/// A job of `owner` naming `url` as its webhook, submitted, claimed and succeeded through the
/// store: its delivery is in the outbox.
async fn finished_job(store: &SqliteStore, owner: KeyId, url: &str) -> RequestId {
    let mut job = new_job(owner, "a lighthouse");
    job.webhook = Some(WebhookUrl::parse(url).unwrap());
    let id = job.id;
    store
        .enqueue(job, None, QueueLimits::total(100))
        .await
        .unwrap();
    let policy = ClaimPolicy {
        lease: Duration::from_secs(60),
        max_attempts: 3,
    };
    let lease = store
        .claim(&WorkerId::new("test-0"), &[ROUTE], policy)
        .await
        .unwrap()
        .expect("the job is queued");
    assert_eq!(lease.job.id, id);
    store.complete(&lease, output(vec![])).await.unwrap();
    id
}

/// Loopback allowed (the receiver is there), short retries.
fn settings() -> WebhookSettings {
    WebhookSettings {
        first_retry: Duration::from_millis(200),
        poll_interval: Duration::from_millis(100),
        ..WebhookSettings::new(
            Duration::from_secs(3600),
            Duration::from_secs(10),
            AllowList::parse(["127.0.0.1/32"]).unwrap(),
        )
    }
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("the dispatcher stops")
            .unwrap();
    }
}

fn dispatch(
    store: Arc<SqliteStore>,
    messages: impl WebhookMessages + 'static,
    settings: WebhookSettings,
) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run_dispatcher(
        store,
        Arc::new(messages),
        SIGNING_KEY.to_vec(),
        settings,
        shutdown.clone(),
    ));
    Running { shutdown, task }
}

/// The delivery's record once `done` holds of it, waiting up to `within`.
async fn record_when(
    store: &SqliteStore,
    owner: KeyId,
    id: RequestId,
    within: Duration,
    done: impl Fn(&WebhookRecord) -> bool,
) -> WebhookRecord {
    let deadline = Instant::now() + within;
    loop {
        let record = store.webhook_record(owner, id).await.unwrap();
        match record {
            Some(record) if done(&record) => return record,
            _ if Instant::now() > deadline => panic!("not within {within:?}: {record:?}"),
            _ => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

fn delivered(record: &WebhookRecord) -> bool {
    record.state == DeliveryState::Delivered
}

fn outcomes(record: &WebhookRecord) -> Vec<AttemptOutcome> {
    record.attempts.iter().map(|a| a.outcome.clone()).collect()
}

/// Every request `receiver` got was signed for `owner` and is message `id`'s.
fn assert_signed(seen: &[Seen], owner: KeyId, id: RequestId) {
    let verifier = standardwebhooks::Webhook::new(&webhook_secret(SIGNING_KEY, owner)).unwrap();
    for request in seen {
        verifier
            .verify(&request.body, &request.headers)
            .expect("a valid Standard Webhooks signature");
        assert_eq!(request.headers["webhook-id"], message_id(id).as_str());
        assert_eq!(request.headers["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        assert_eq!(body["request_id"], id.to_string());
    }
}

#[tokio::test]
async fn a_webhook_is_delivered_once_and_signed_per_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([]).await;
    let owner = KeyId::new();
    let id = finished_job(&store, owner, &url).await;

    let dispatcher = dispatch(store.clone(), FixedBodies, settings());
    let record = record_when(&store, owner, id, Duration::from_secs(10), delivered).await;
    assert_eq!(outcomes(&record), [AttemptOutcome::Status(200)]);
    assert_eq!(record.url.as_str(), url);
    // Nothing follows a 2xx.
    tokio::time::sleep(Duration::from_millis(600)).await;
    dispatcher.stop().await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 1);
    assert_signed(&seen, owner, id);
    // Another key's secret does not verify it.
    let other = standardwebhooks::Webhook::new(&webhook_secret(SIGNING_KEY, KeyId::new())).unwrap();
    assert!(other.verify(&seen[0].body, &seen[0].headers).is_err());
}

#[tokio::test]
async fn a_failing_receiver_is_retried_soon_with_the_same_id_until_it_answers_2xx() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([Answer::Status(500), Answer::Status(500)]).await;
    let owner = KeyId::new();
    let id = finished_job(&store, owner, &url).await;

    // The default backoff (2 s, then 4 s) and poll: the first retry comes within a few seconds.
    let settings = WebhookSettings::new(
        Duration::from_secs(3600),
        Duration::from_secs(10),
        AllowList::parse(["127.0.0.1/32"]).unwrap(),
    );
    let dispatcher = dispatch(store.clone(), FixedBodies, settings);
    let record = record_when(&store, owner, id, Duration::from_secs(20), delivered).await;
    assert_eq!(
        outcomes(&record),
        [
            AttemptOutcome::Status(500),
            AttemptOutcome::Status(500),
            AttemptOutcome::Status(200)
        ]
    );
    // Waiting past where a next retry would come: none does.
    tokio::time::sleep(Duration::from_secs(3)).await;
    dispatcher.stop().await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 3);
    assert_signed(&seen, owner, id);
    let first_retry = seen[1].at - seen[0].at;
    assert!(
        first_retry >= Duration::from_millis(1900) && first_retry < Duration::from_secs(5),
        "first retry after {first_retry:?}"
    );
    assert!(seen[2].at - seen[1].at > first_retry, "the backoff grows");
}

#[tokio::test]
async fn a_delivery_survives_a_restart_between_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    let (receiver, url) = Receiver::start([Answer::Status(500)]).await;
    let owner = KeyId::new();
    let settings = WebhookSettings {
        first_retry: Duration::from_secs(1),
        ..settings()
    };

    let store = open(&path).await;
    let id = finished_job(&store, owner, &url).await;
    let first = dispatch(store.clone(), FixedBodies, settings.clone());
    record_when(&store, owner, id, Duration::from_secs(10), |r| {
        r.attempts.len() == 1
    })
    .await;
    first.stop().await;
    drop(store);
    assert_eq!(receiver.seen().len(), 1);

    // kiln again, on the same file.
    let store = open(&path).await;
    let second = dispatch(store.clone(), FixedBodies, settings);
    let record = record_when(&store, owner, id, Duration::from_secs(10), delivered).await;
    assert_eq!(
        outcomes(&record),
        [AttemptOutcome::Status(500), AttemptOutcome::Status(200)]
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    second.stop().await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2, "no attempt after the 2xx");
    assert_signed(&seen, owner, id);
}

#[tokio::test]
async fn a_non_public_address_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([]).await;
    let by_name = url.replace("127.0.0.1", "localhost");
    let owner = KeyId::new();
    // An address in the URL (checked before the request) and a name resolving to loopback
    // (checked where it resolves).
    let by_address = finished_job(&store, owner, &url).await;
    let by_name = finished_job(&store, owner, &by_name).await;

    let settings = WebhookSettings {
        allow: AllowList::default(),
        ..settings()
    };
    let dispatcher = dispatch(store.clone(), FixedBodies, settings);
    for id in [by_address, by_name] {
        let record = record_when(&store, owner, id, Duration::from_secs(10), |r| {
            r.attempts.len() >= 2
        })
        .await;
        assert_eq!(
            record.state,
            DeliveryState::Pending,
            "retried until its deadline"
        );
        for outcome in outcomes(&record) {
            assert_eq!(
                outcome,
                AttemptOutcome::Error("not a public address".into())
            );
        }
    }
    dispatcher.stop().await;
    assert!(receiver.seen().is_empty(), "nothing reached the receiver");
}

#[tokio::test]
async fn an_attempt_past_its_timeout_fails_and_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([Answer::Slow(Duration::from_secs(3), 200)]).await;
    let owner = KeyId::new();
    let id = finished_job(&store, owner, &url).await;

    let settings = WebhookSettings {
        attempt_timeout: Duration::from_secs(1),
        ..settings()
    };
    let dispatcher = dispatch(store.clone(), FixedBodies, settings);
    let record = record_when(&store, owner, id, Duration::from_secs(10), delivered).await;
    dispatcher.stop().await;
    assert_eq!(
        outcomes(&record),
        [
            AttemptOutcome::Error("timed out after 1 s".into()),
            AttemptOutcome::Status(200)
        ]
    );
    assert_eq!(receiver.seen().len(), 2);
}

#[tokio::test]
async fn a_delivery_not_acknowledged_before_its_deadline_fails() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([Answer::Status(503); 100]).await;
    let owner = KeyId::new();
    let id = finished_job(&store, owner, &url).await;

    let settings = WebhookSettings {
        retry_for: Duration::from_secs(1),
        ..settings()
    };
    let dispatcher = dispatch(store.clone(), FixedBodies, settings);
    let failed = |r: &WebhookRecord| r.state == DeliveryState::Failed;
    let record = record_when(&store, owner, id, Duration::from_secs(10), failed).await;
    let attempts = outcomes(&record);
    assert!(
        attempts.len() >= 2,
        "retried before the deadline: {attempts:?}"
    );
    assert!(attempts.iter().all(|a| *a == AttemptOutcome::Status(503)));
    // The last attempt came at the deadline, not long after it.
    let last = record.attempts.last().unwrap().at;
    let first = record.attempts[0].at;
    assert!(
        last - first < time::Duration::seconds(2),
        "{first} .. {last}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    dispatcher.stop().await;
    assert_eq!(
        receiver.seen().len(),
        attempts.len(),
        "none after giving up"
    );
}

#[tokio::test]
async fn a_request_whose_record_expired_is_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([]).await;
    let owner = KeyId::new();
    let id = finished_job(&store, owner, &url).await;

    let dispatcher = dispatch(store.clone(), NoRecords, settings());
    let failed = |r: &WebhookRecord| r.state == DeliveryState::Failed;
    let record = record_when(&store, owner, id, Duration::from_secs(10), failed).await;
    dispatcher.stop().await;
    assert_eq!(
        outcomes(&record),
        [AttemptOutcome::Error(
            "the request's record has expired".into()
        )]
    );
    assert!(receiver.seen().is_empty());
}

#[tokio::test]
async fn a_job_ending_wakes_the_dispatcher_without_waiting_for_the_poll() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([]).await;
    let owner = KeyId::new();
    let settings = WebhookSettings {
        poll_interval: Duration::from_secs(60),
        ..settings()
    };
    let dispatcher = dispatch(store.clone(), FixedBodies, settings);
    // Its first look at the outbox found nothing; only the job's end can wake it in time.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = finished_job(&store, owner, &url).await;
    record_when(&store, owner, id, Duration::from_secs(5), delivered).await;
    dispatcher.stop().await;
    assert_eq!(receiver.seen().len(), 1);
}

#[tokio::test]
async fn shutdown_lets_the_attempt_under_way_finish() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([Answer::Slow(Duration::from_secs(1), 200)]).await;
    let owner = KeyId::new();
    let id = finished_job(&store, owner, &url).await;

    let dispatcher = dispatch(store.clone(), FixedBodies, settings());
    let deadline = Instant::now() + Duration::from_secs(10);
    while receiver.seen().is_empty() {
        assert!(Instant::now() < deadline, "the attempt never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dispatcher.stop().await;
    let record = store.webhook_record(owner, id).await.unwrap().unwrap();
    assert_eq!(record.state, DeliveryState::Delivered);
    assert_eq!(outcomes(&record), [AttemptOutcome::Status(200)]);
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("kiln.db")).await;
    let (receiver, url) = Receiver::start([Answer::Status(307)]).await;
    let owner = KeyId::new();
    let id = finished_job(&store, owner, &url).await;

    let dispatcher = dispatch(store.clone(), FixedBodies, settings());
    let record = record_when(&store, owner, id, Duration::from_secs(10), delivered).await;
    dispatcher.stop().await;
    // Followed, the redirect's 200 would have been the first attempt's.
    assert_eq!(
        outcomes(&record),
        [AttemptOutcome::Status(307), AttemptOutcome::Status(200)]
    );
    assert_eq!(receiver.seen().len(), 2);
}
