//! The PostgreSQL store on a real server (127.0.0.1:5432, user `postgres`, trust auth), a fresh
//! database per test. Without a server they skip, except under CI (env `CI` set), where they
//! fail. The behaviour shared with SQLite is tested by the backend-neutral suite in `tests/`;
//! these cover what is PostgreSQL's own: concurrent starts, cross-node claims and events.

use super::PgStore;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{JobOutput, JobState, NewJob, OutputMetadata, Progress, Timings};
use kiln_core::params::{GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt};
use kiln_core::store::{
    ClaimPolicy, JobEvent, JobEvents, JobNotice, JobStore, KeyStore, QueueLimits, StoreError,
};
use sqlx::{Connection, Executor, PgConnection};
use std::future::Future;
use std::time::Duration;
use time::OffsetDateTime;

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const ROUTE: Route = Route::Flux11ProTextToImage;
const POLICY: ClaimPolicy = ClaimPolicy {
    lease: Duration::from_secs(60),
    max_attempts: 3,
};
const LIMITS: QueueLimits = QueueLimits {
    total: 100,
    per_owner: 100,
};

/// Runs `test` with the URL of a database of its own, dropped afterwards (`WITH (FORCE)`, which
/// ends the sessions the stores left) whether the test passed or not.
async fn with_database<F, Fut>(test: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let connecting = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(ADMIN_URL));
    let mut admin = match connecting.await {
        Ok(Ok(conn)) => conn,
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer within 5 s".to_string(),
            };
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL at 127.0.0.1:5432 does not answer ({why}), and CI skips nothing"
            );
            println!("SKIPPED: PostgreSQL at 127.0.0.1:5432 does not answer ({why})");
            return;
        }
    };
    let name = format!("kiln_t_{}", uuid::Uuid::new_v4().simple());
    admin
        .execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let outcome = tokio::spawn(test(format!("postgres://postgres@127.0.0.1:5432/{name}"))).await;
    admin
        .execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str())
        .await
        .unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

fn new_job(owner: KeyId, prompt: &str) -> NewJob {
    let now = OffsetDateTime::now_utc();
    NewJob {
        id: RequestId::new(),
        owner,
        route: ROUTE,
        params: GenerationParams {
            prompt: Prompt::parse(prompt, 100).unwrap(),
            size: OutputSize::Pixels(ImageSize {
                width: 1024,
                height: 768,
            }),
            seed: 7,
            num_inference_steps: None,
            guidance_scale: None,
            output_format: OutputFormat::Jpeg,
            raw: false,
            enable_prompt_expansion: false,
            reference_images: Vec::new(),
        },
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
    }
}

fn output(key: &BlobKey) -> JobOutput {
    JobOutput {
        images: vec![key.clone()],
        metadata: OutputMetadata {
            model: ROUTE,
            seed: 7,
            width: 1024,
            height: 768,
            num_inference_steps: 4,
            guidance: None,
            output_format: OutputFormat::Jpeg,
            prompt: "p".into(),
            timings_ms: Timings {
                queued: 1,
                inference: 2,
                encode_and_store: 3,
            },
            engine: "test".into(),
            notes: Vec::new(),
        },
    }
}

/// The next event, skipping resyncs; fails after 10 s.
async fn next_event(events: &mut JobEvents) -> JobEvent {
    let wait = async {
        loop {
            match events.recv().await.expect("the store is gone") {
                JobNotice::Event(event) => return event,
                JobNotice::Resync => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("no event within 10 s")
}

#[tokio::test]
async fn two_nodes_start_together_then_share_the_queue() {
    with_database(|url| async move {
        // Both run the migrations at once: one waits on the advisory lock, then finds them done.
        let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
        let (a, b) = (a.unwrap(), b.unwrap());
        let isolation: String = sqlx::query_scalar("SHOW default_transaction_isolation")
            .fetch_one(&a.pool)
            .await
            .unwrap();
        assert_eq!(isolation, "read committed", "the submit lock relies on it");
        let owner = KeyId::new();
        let first = a
            .enqueue(new_job(owner, "one"), None, LIMITS)
            .await
            .unwrap();
        let second = a
            .enqueue(new_job(owner, "two"), None, LIMITS)
            .await
            .unwrap();
        assert_eq!(first.view.queue_position, Some(0));
        assert_eq!(second.view.queue_position, Some(1));
        let seen = b.get(owner, second.view.job.id).await.unwrap().unwrap();
        assert_eq!(seen.queue_position, Some(1));

        let worker = WorkerId::new("w".to_string());
        let lease = b.claim(&worker, &[ROUTE], POLICY).await.unwrap().unwrap();
        assert_eq!(lease.job.id, first.view.job.id, "the oldest job first");
        assert_eq!((lease.attempt, lease.fencing_token), (1, 1));
        let progress = Progress { step: 2, total: 4 };
        b.heartbeat(&lease, Some(progress), Duration::from_secs(60))
            .await
            .unwrap();
        let key = BlobKey::try_from("out-1.jpg".to_string()).unwrap();
        b.complete(&lease, output(&key)).await.unwrap();
        assert!(matches!(
            b.complete(&lease, output(&key)).await,
            Err(StoreError::LeaseLost(id)) if id == lease.job.id
        ));
        let done = a.get(owner, lease.job.id).await.unwrap().unwrap();
        assert_eq!(done.job.state(), JobState::Succeeded);
        assert!(a.blob_is_live(&key).await.unwrap());
        assert_eq!(
            a.get(owner, second.view.job.id)
                .await
                .unwrap()
                .unwrap()
                .queue_position,
            Some(0)
        );
        let counts = a.state_counts().await.unwrap().counts;
        assert!(counts.contains(&(JobState::Queued, 1)));
        assert!(counts.contains(&(JobState::Succeeded, 1)));
        a.ping().await.unwrap();

        a.insert_key("ci", "hash", "kiln_ab").await.unwrap();
        assert!(matches!(
            b.insert_key("ci", "hash2", "kiln_cd").await,
            Err(StoreError::DuplicateKeyName(name)) if name == "ci"
        ));
        assert_eq!(b.key_count().await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn another_node_hears_of_a_submit_and_its_changes() {
    with_database(|url| async move {
        let a = PgStore::connect(&url).await.unwrap();
        let b = PgStore::connect(&url).await.unwrap();
        let mut heard = b.subscribe();
        let owner = KeyId::new();
        let job = a
            .enqueue(new_job(owner, "one"), None, LIMITS)
            .await
            .unwrap();
        let id = job.view.job.id;
        let expected = |state, progress| JobEvent {
            id,
            owner,
            route: ROUTE,
            state,
            progress,
        };
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Queued, None)
        );

        let lease = a
            .claim(&WorkerId::new("w".to_string()), &[ROUTE], POLICY)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Running, None)
        );
        // A heartbeat that changes nothing but the lease is no event; one with progress is.
        a.heartbeat(&lease, None, Duration::from_secs(60))
            .await
            .unwrap();
        let progress = Progress { step: 1, total: 4 };
        a.heartbeat(&lease, Some(progress), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Running, Some(progress))
        );
        a.release(&lease).await.unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Queued, None)
        );
        a.cancel(owner, id).await.unwrap();
        assert_eq!(
            next_event(&mut heard).await,
            expected(JobState::Cancelled, None)
        );
    })
    .await;
}

#[tokio::test]
async fn an_unreachable_server_fails_promptly_as_a_backend_error() {
    let started = std::time::Instant::now();
    let refused = PgStore::connect("postgres://postgres@127.0.0.1:1/kiln").await;
    assert!(matches!(
        refused,
        Err(StoreError::Backend {
            backend: "postgres",
            ..
        })
    ));
    assert!(started.elapsed() < super::CONNECT_TIMEOUT + Duration::from_secs(1));
}
