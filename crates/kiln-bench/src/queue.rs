//! `kiln-bench queue`: the queue's own speed, on SQLite (a temporary file) and PostgreSQL (a
//! fresh database on the local server), in one run on one machine:
//!
//! 1. jobs per second end to end through the real worker pool ([`kiln_worker::run_pool`]) with
//!    kiln-testkit's [`ScriptedEngine`] doing next to nothing (one step of 0 ms, a 16x16 PNG),
//!    `--jobs` jobs queued beforehand, 1 slot and 4 slots: a job is the claim, the engine on a
//!    blocking thread, the PNG encoding, the blob put (a local directory: write, fsync, rename,
//!    fsync of the directory) and the completing transaction; the submit is not timed, and no
//!    heartbeat falls due (the first comes after a second). Beside it the store alone: loops of
//!    `claim` then `complete` (with a made-up output), 1 and 4 at once, over the same count;
//! 2. submits per second through [`JobStore::enqueue`] from `--submitters` concurrent tasks for
//!    `--seconds` (after a 1-second warm-up), nothing claiming, into an empty queue;
//! 3. the time from `enqueue` returning to the idle worker's claim returning a lease (one slot,
//!    one job at a time, `--latency-jobs` jobs), woken by the store's events (PostgreSQL's
//!    LISTEN/NOTIFY; SQLite's in-process broadcast) against polling alone (the pool is handed
//!    the store through a wrapper whose `subscribe()` never yields, so that only
//!    `poll_interval` wakes it), at poll intervals of 250 ms (the default) and 1000 ms.
//!
//! Everything runs in this process on one Tokio runtime of `--threads` threads, as `kiln serve`
//! runs its in-process worker; PostgreSQL runs on the same machine. Nothing here is shipped:
//! kiln-bench is not a dependency of the `kiln` binary.

use anyhow::{bail, Context};
use async_trait::async_trait;
use kiln_blob::LocalBlobStore;
use kiln_core::blob::BlobStore;
use kiln_core::catalog::Route;
use kiln_core::ids::{BlobKey, KeyId, RequestId, WorkerId};
use kiln_core::job::{
    CancelMode, CancelOutcome, JobError, JobOutput, JobState, JobView, NewJob, OutputMetadata,
    StatusView, StepReport, Timings,
};
use kiln_core::params::{
    GenerationParams, ImageSize, OutputFormat, OutputSize, Prompt, RouteOptions,
};
use kiln_core::store::{
    ClaimPolicy, Enqueued, HeartbeatAck, Idempotency, JobCursor, JobEvents, JobNotice, JobPage,
    JobStore, Lease, QueueLimits, StateCounts, StoreError,
};
use kiln_core::webhook::{AfterAttempt, WebhookAttempt, WebhookDelivery, WebhookRecord};
use kiln_testkit::postgres::TestDatabase;
use kiln_testkit::ScriptedEngine;
use kiln_worker::{run_pool, EngineSet, FetchPolicy, Slot, WorkerSettings};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

const ROUTE: Route = Route::Flux11ProTextToImage;
/// Room for everything the run queues: the limits are not what is measured.
const LIMITS: QueueLimits = QueueLimits {
    total: 100_000_000,
    per_owner: 100_000_000,
};
const WARM_UP: Duration = Duration::from_secs(1);
/// Concurrent submitters filling the queue before a throughput measurement.
const PREFILL_TASKS: usize = 32;
/// The longest any one measurement may take before the run gives up.
const GIVE_UP: Duration = Duration::from_secs(600);
/// Events-woken latency runs wait a spread of 0..this between jobs (the wake-up does not
/// depend on when the job comes; polling runs spread over the whole poll interval).
const EVENT_SPREAD: Duration = Duration::from_millis(50);

#[derive(clap::Args)]
pub struct QueueArgs {
    /// Jobs queued for each jobs-per-second measurement.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// How long each submit measurement runs, in seconds (after a 1-second warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Concurrent submitters.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Jobs submitted one at a time for each wake-up latency figure.
    #[arg(long, default_value_t = 50)]
    latency_jobs: usize,
    /// Threads of the runtime the pool, the submitters and the stores' tasks share.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where the SQLite files and the blobs go (default: the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// SQLite only (PostgreSQL is skipped, too, when it does not answer).
    #[arg(long)]
    no_postgres: bool,
    /// Also append the results as Markdown to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
}

pub fn run(args: &QueueArgs) -> anyhow::Result<()> {
    // As `kiln serve` and `kiln worker` run (one malloc arena), before any thread exists.
    kiln::allocator::reuse_freed_memory();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(args))?;
    crate::print_report(&report, args.markdown.as_deref())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// A new, empty store and blob directory for one measurement; removed (the database dropped)
/// when this is dropped.
struct Fresh {
    jobs: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    // Dropped after the stores (fields drop in order).
    _database: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

impl Fresh {
    async fn open(backend: Backend, dir: &Path) -> anyhow::Result<Fresh> {
        let tmp = tempfile::Builder::new()
            .prefix("kiln-bench-queue-")
            .tempdir_in(dir)?;
        let blobs = Arc::new(LocalBlobStore::new(tmp.path().join("blobs"))?);
        let (jobs, database): (Arc<dyn JobStore>, _) = match backend {
            Backend::Sqlite => {
                let store = kiln_store::SqliteStore::open(&tmp.path().join("kiln.db")).await?;
                (Arc::new(store), None)
            }
            Backend::Postgres => {
                let database = kiln_testkit::postgres::fresh_database_for("kiln-bench queue")
                    .await
                    .context("PostgreSQL does not answer")?;
                let store = kiln_store::PgStore::connect(database.url()).await?;
                (Arc::new(store), Some(database))
            }
        };
        Ok(Fresh {
            jobs,
            blobs,
            _database: database,
            _dir: tmp,
        })
    }
}

fn new_job(owner: KeyId, seed: u32) -> NewJob {
    let now = OffsetDateTime::now_utc();
    NewJob {
        id: RequestId::new(),
        owner,
        route: ROUTE,
        params: GenerationParams {
            prompt: Prompt::parse("a queue benchmark", 100).expect("a valid prompt"),
            size: OutputSize::Pixels(ImageSize {
                width: 16,
                height: 16,
            }),
            seed,
            num_inference_steps: Some(1),
            guidance_scale: None,
            output_format: OutputFormat::Png,
            options: RouteOptions::Flux11Pro { raw: false },
            reference_images: Vec::new(),
        },
        created_at: now,
        expires_at: now + Duration::from_secs(3600),
        webhook: None,
    }
}

fn settings(poll_interval: Duration) -> WorkerSettings {
    WorkerSettings {
        name: "bench".into(),
        lease: Duration::from_secs(60),
        max_attempts: 3,
        poll_interval,
        drain_timeout: Duration::from_secs(5),
        job_timeout: Duration::from_secs(60),
        fetch: FetchPolicy::default(),
    }
}

fn no_op_engines() -> EngineSet {
    let mut engine = ScriptedEngine::default();
    engine.steps = 1;
    engine.fast_step = Duration::ZERO;
    EngineSet::new().with(ROUTE, Arc::new(engine))
}

/// Queues `count` jobs from [`PREFILL_TASKS`] concurrent submitters.
async fn prefill(jobs: &Arc<dyn JobStore>, count: usize) -> anyhow::Result<()> {
    let owner = KeyId::new();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..PREFILL_TASKS {
        let jobs = jobs.clone();
        let mine = (task..count).step_by(PREFILL_TASKS).count();
        tasks.spawn(async move {
            for i in 0..mine {
                jobs.enqueue(new_job(owner, i as u32), None, LIMITS).await?;
            }
            Ok::<_, StoreError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

fn count_of(counts: &StateCounts, state: JobState) -> u64 {
    counts
        .counts
        .iter()
        .find(|(s, _)| *s == state)
        .map_or(0, |(_, n)| *n)
}

/// Waits until `count` jobs have succeeded: counts `Succeeded` events, and reads the store's
/// counts when events may have been missed and every 250 ms. Fails on a failed job.
async fn until_succeeded(
    jobs: &Arc<dyn JobStore>,
    events: &mut JobEvents,
    count: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + GIVE_UP;
    let mut heard = 0u64;
    loop {
        let check = match tokio::time::timeout(Duration::from_millis(250), events.recv()).await {
            Ok(Some(JobNotice::Event(e))) if e.state == JobState::Succeeded => {
                heard += 1;
                heard >= count
            }
            Ok(Some(JobNotice::Event(e))) if e.state == JobState::Failed => true,
            Ok(Some(JobNotice::Event(_))) => false,
            Ok(Some(JobNotice::Resync)) | Ok(None) | Err(_) => true,
        };
        if check {
            let counts = jobs.state_counts().await?;
            let failed = count_of(&counts, JobState::Failed);
            if failed > 0 {
                bail!("{failed} jobs failed");
            }
            if count_of(&counts, JobState::Succeeded) >= count {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{count} jobs did not succeed within {GIVE_UP:?}");
        }
    }
}

/// Jobs per second through the worker pool with `slots` slots.
async fn pool_rate(
    backend: Backend,
    dir: &Path,
    slots: usize,
    count: usize,
) -> anyhow::Result<f64> {
    let fresh = Fresh::open(backend, dir).await?;
    prefill(&fresh.jobs, count).await?;
    let mut events = fresh.jobs.subscribe();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let pool = tokio::spawn(run_pool(
        fresh.jobs.clone(),
        fresh.blobs.clone(),
        Slot::new(no_op_engines()).repeat(slots),
        settings(Duration::from_millis(250)),
        shutdown.clone(),
    ));
    until_succeeded(&fresh.jobs, &mut events, count as u64).await?;
    let seconds = started.elapsed().as_secs_f64();
    shutdown.cancel();
    pool.await?;
    Ok(count as f64 / seconds)
}

/// What a job's output would say; the store does not look inside.
fn made_up_output(lease: &Lease) -> JobOutput {
    let params = &lease.job.params;
    JobOutput {
        images: vec![BlobKey::random("png")],
        metadata: OutputMetadata {
            model: lease.job.route,
            seed: params.seed,
            width: 16,
            height: 16,
            num_inference_steps: 1,
            guidance: None,
            output_format: OutputFormat::Png,
            prompt: params.prompt.as_str().to_string(),
            timings_ms: Timings {
                queued: 0,
                inference: 0,
                encode_and_store: 0,
            },
            engine: "none".into(),
            notes: Vec::new(),
        },
    }
}

/// Jobs per second through `loops` concurrent loops of claim then complete, no pool.
async fn store_rate(
    backend: Backend,
    dir: &Path,
    loops: usize,
    count: usize,
) -> anyhow::Result<f64> {
    let fresh = Fresh::open(backend, dir).await?;
    prefill(&fresh.jobs, count).await?;
    let policy = ClaimPolicy {
        lease: Duration::from_secs(60),
        max_attempts: 3,
    };
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..loops {
        let jobs = fresh.jobs.clone();
        tasks.spawn(async move {
            let worker = WorkerId::new(format!("loop-{n}"));
            let mut done = 0usize;
            while let Some(lease) = jobs.claim(&worker, &[ROUTE], policy).await? {
                jobs.complete(&lease, made_up_output(&lease)).await?;
                done += 1;
            }
            Ok::<_, StoreError>(done)
        });
    }
    let mut done = 0;
    while let Some(finished) = tasks.join_next().await {
        done += finished??;
    }
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(done == count, "{done} of {count} jobs completed");
    Ok(count as f64 / seconds)
}

/// Latencies, sorted.
struct Sample(Vec<Duration>);

impl Sample {
    fn sorted(mut v: Vec<Duration>) -> Self {
        v.sort();
        Sample(v)
    }

    fn percentile_ms(&self, p: usize) -> f64 {
        let n = self.0.len();
        if n == 0 {
            return f64::NAN;
        }
        self.0[(n * p / 100).min(n - 1)].as_secs_f64() * 1e3
    }

    fn max_ms(&self) -> f64 {
        self.0.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    }
}

struct Submits {
    per_second: f64,
    latencies: Sample,
    /// Jobs queued at the end (warm-up included).
    depth: u64,
    /// The rate in the last fifth of the measurement over the rate in the first fifth.
    trend: f64,
}

/// Submits per second from `submitters` concurrent tasks for `duration`.
async fn submit_rate(
    backend: Backend,
    dir: &Path,
    submitters: usize,
    duration: Duration,
) -> anyhow::Result<Submits> {
    let fresh = Fresh::open(backend, dir).await?;
    submit_for(&fresh.jobs, submitters, WARM_UP).await?;
    let started = Instant::now();
    let done = submit_for(&fresh.jobs, submitters, duration).await?;
    let seconds = started.elapsed().as_secs_f64();
    let fifth = seconds / 5.0;
    let in_window = |from: f64, to: f64| {
        done.iter()
            .filter(|(at, _)| {
                let t = at.duration_since(started).as_secs_f64();
                t >= from && t < to
            })
            .count() as f64
    };
    let first = in_window(0.0, fifth);
    let last = in_window(seconds - fifth, seconds);
    let depth = count_of(&fresh.jobs.state_counts().await?, JobState::Queued);
    Ok(Submits {
        per_second: done.len() as f64 / seconds,
        latencies: Sample::sorted(done.into_iter().map(|(_, l)| l).collect()),
        depth,
        trend: last / first,
    })
}

/// Each submitter's submits until `duration` has passed: when each returned, and its latency.
async fn submit_for(
    jobs: &Arc<dyn JobStore>,
    submitters: usize,
    duration: Duration,
) -> anyhow::Result<Vec<(Instant, Duration)>> {
    let deadline = Instant::now() + duration;
    let owner = KeyId::new();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..submitters {
        let jobs = jobs.clone();
        tasks.spawn(async move {
            let mut done = Vec::new();
            let mut seed = 0;
            while Instant::now() < deadline {
                let sent = Instant::now();
                jobs.enqueue(new_job(owner, seed), None, LIMITS).await?;
                let at = Instant::now();
                done.push((at, at - sent));
                seed += 1;
            }
            Ok::<_, StoreError>(done)
        });
    }
    let mut all = Vec::new();
    while let Some(finished) = tasks.join_next().await {
        all.extend(finished??);
    }
    Ok(all)
}

/// What the wrapper saw the pool do.
enum Seen {
    Claimed(RequestId, Instant),
    Completed(RequestId),
}

/// A [`JobStore`] that hands everything to `inner`, reports the pool's claims and completions,
/// and, when `deaf`, hands out subscriptions that never yield an event, so that a pool given it
/// wakes on its poll interval alone.
struct Observed {
    inner: Arc<dyn JobStore>,
    deaf: bool,
    /// Never sent on: kept so that the deaf subscriptions stay open (and silent).
    silence: broadcast::Sender<JobNotice>,
    seen: mpsc::UnboundedSender<Seen>,
}

#[async_trait]
impl JobStore for Observed {
    async fn enqueue(
        &self,
        job: NewJob,
        idempotency: Option<Idempotency>,
        limits: QueueLimits,
    ) -> Result<Enqueued, StoreError> {
        self.inner.enqueue(job, idempotency, limits).await
    }

    async fn get(&self, owner: KeyId, id: RequestId) -> Result<Option<JobView>, StoreError> {
        self.inner.get(owner, id).await
    }

    async fn status(&self, owner: KeyId, id: RequestId) -> Result<Option<StatusView>, StoreError> {
        self.inner.status(owner, id).await
    }

    async fn list_jobs(
        &self,
        owner: KeyId,
        before: Option<JobCursor>,
        limit: u32,
    ) -> Result<JobPage, StoreError> {
        self.inner.list_jobs(owner, before, limit).await
    }

    async fn cancel(
        &self,
        owner: KeyId,
        id: RequestId,
        mode: CancelMode,
    ) -> Result<Option<CancelOutcome>, StoreError> {
        self.inner.cancel(owner, id, mode).await
    }

    async fn claim(
        &self,
        worker: &WorkerId,
        routes: &[Route],
        policy: ClaimPolicy,
    ) -> Result<Option<Lease>, StoreError> {
        let lease = self.inner.claim(worker, routes, policy).await?;
        if let Some(lease) = &lease {
            let _ = self.seen.send(Seen::Claimed(lease.job.id, Instant::now()));
        }
        Ok(lease)
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        report: &StepReport,
        extend_by: Duration,
    ) -> Result<HeartbeatAck, StoreError> {
        self.inner.heartbeat(lease, report, extend_by).await
    }

    async fn complete(&self, lease: &Lease, output: JobOutput) -> Result<(), StoreError> {
        self.inner.complete(lease, output).await?;
        let _ = self.seen.send(Seen::Completed(lease.job.id));
        Ok(())
    }

    async fn fail(&self, lease: &Lease, error: JobError) -> Result<(), StoreError> {
        self.inner.fail(lease, error).await
    }

    async fn end_cancelled(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.end_cancelled(lease).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(lease).await
    }

    async fn fail_abandoned(&self, max_attempts: u32) -> Result<u64, StoreError> {
        self.inner.fail_abandoned(max_attempts).await
    }

    async fn purge_expired(&self, now: OffsetDateTime) -> Result<Vec<BlobKey>, StoreError> {
        self.inner.purge_expired(now).await
    }

    async fn blob_is_live(&self, key: &BlobKey) -> Result<bool, StoreError> {
        self.inner.blob_is_live(key).await
    }

    async fn state_counts(&self) -> Result<StateCounts, StoreError> {
        self.inner.state_counts().await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }

    async fn claim_webhooks(
        &self,
        limit: u32,
        claim_for: Duration,
    ) -> Result<Vec<WebhookDelivery>, StoreError> {
        self.inner.claim_webhooks(limit, claim_for).await
    }

    async fn record_webhook_attempt(
        &self,
        delivery: &WebhookDelivery,
        attempt: WebhookAttempt,
        next: AfterAttempt,
    ) -> Result<(), StoreError> {
        self.inner
            .record_webhook_attempt(delivery, attempt, next)
            .await
    }

    async fn webhook_record(
        &self,
        owner: KeyId,
        id: RequestId,
    ) -> Result<Option<WebhookRecord>, StoreError> {
        self.inner.webhook_record(owner, id).await
    }

    fn subscribe(&self) -> JobEvents {
        if self.deaf {
            JobEvents::new(self.silence.subscribe())
        } else {
            self.inner.subscribe()
        }
    }
}

/// The `i`th of a sequence spread evenly over [0, 1) (the golden ratio's multiples).
fn spread(i: usize) -> f64 {
    (i as f64 * 0.618_033_988_749_895).fract()
}

/// From `enqueue` returning to the idle slot's claim returning, for `count` jobs submitted one
/// at a time to a one-slot pool that polls every `poll` and, unless `deaf`, wakes on events.
async fn wake_latency(
    backend: Backend,
    dir: &Path,
    poll: Duration,
    deaf: bool,
    count: usize,
) -> anyhow::Result<Sample> {
    let fresh = Fresh::open(backend, dir).await?;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let observed = Arc::new(Observed {
        inner: fresh.jobs.clone(),
        deaf,
        silence: broadcast::channel(1).0,
        seen: seen_tx,
    });
    let shutdown = CancellationToken::new();
    let pool = tokio::spawn(run_pool(
        observed,
        fresh.blobs.clone(),
        Slot::new(no_op_engines()).repeat(1),
        settings(poll),
        shutdown.clone(),
    ));
    // The slot's first claim finds nothing and it idles.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let owner = KeyId::new();
    let span = if deaf { poll } else { EVENT_SPREAD };
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        // A different moment of the slot's poll cycle for each job.
        tokio::time::sleep(span.mul_f64(spread(i))).await;
        let id = fresh
            .jobs
            .enqueue(new_job(owner, i as u32), None, LIMITS)
            .await?
            .view
            .job
            .id;
        let enqueued = Instant::now();
        let deadline = tokio::time::Instant::now() + poll + Duration::from_secs(30);
        let mut claimed = None;
        loop {
            let next = tokio::time::timeout_at(deadline, seen.recv())
                .await
                .with_context(|| format!("job {i} was not claimed and completed in time"))?
                .context("the pool stopped")?;
            match next {
                Seen::Claimed(got, at) if got == id => claimed = Some(at),
                Seen::Completed(got) if got == id => break,
                _ => {}
            }
        }
        let claimed = claimed.context("a job completed without a claim")?;
        latencies.push(claimed.saturating_duration_since(enqueued));
    }
    shutdown.cancel();
    pool.await?;
    Ok(Sample::sorted(latencies))
}

/// The server's version and durability settings.
async fn postgres_summary() -> anyhow::Result<String> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&kiln_testkit::postgres::admin_url()).await?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&mut conn)
        .await?;
    let mut settings = Vec::new();
    for name in ["fsync", "synchronous_commit", "shared_buffers"] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut conn)
            .await?;
        settings.push(format!("{name}={value}"));
    }
    let _ = conn.close().await;
    Ok(format!("{version}; {}", settings.join(", ")))
}

/// The median time of writing 4 KiB and fsyncing it, in `dir`: what every durable commit here
/// pays at least once.
fn fsync_ms(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let tmp = tempfile::tempfile_in(dir)?;
    let mut file = tmp;
    let block = [0u8; 4096];
    let mut times = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(started.elapsed());
    }
    Ok(Sample::sorted(times).percentile_ms(50))
}

struct Figures {
    backends: Vec<Backend>,
    /// (what, per backend's jobs/s)
    rates: Vec<(String, Vec<f64>)>,
    submits: Vec<Submits>,
    /// (wake-up, poll interval, per backend's sample)
    latencies: Vec<(&'static str, Duration, Vec<Sample>)>,
}

async fn measure(args: &QueueArgs) -> anyhow::Result<String> {
    let dir = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let postgres = if args.no_postgres {
        None
    } else {
        match postgres_summary().await {
            Ok(summary) => Some(summary),
            Err(e) => {
                eprintln!("PostgreSQL: SKIPPED ({e:#})");
                None
            }
        }
    };
    let mut backends = vec![Backend::Sqlite];
    if postgres.is_some() {
        backends.push(Backend::Postgres);
    }
    let count = args.jobs;
    let mut figures = Figures {
        backends: backends.clone(),
        rates: Vec::new(),
        submits: Vec::new(),
        latencies: Vec::new(),
    };
    for slots in [1, 4] {
        let mut row = Vec::new();
        for &b in &backends {
            let rate = pool_rate(b, &dir, slots, count).await?;
            eprintln!(
                "{}: worker pool, {slots} slot(s): {rate:.0} jobs/s",
                b.name()
            );
            row.push(rate);
        }
        let s = if slots == 1 { "" } else { "s" };
        figures
            .rates
            .push((format!("worker pool, {slots} slot{s} (jobs/s)"), row));
    }
    for loops in [1, 4] {
        let mut row = Vec::new();
        for &b in &backends {
            let rate = store_rate(b, &dir, loops, count).await?;
            eprintln!(
                "{}: claim + complete, {loops} loop(s): {rate:.0} jobs/s",
                b.name()
            );
            row.push(rate);
        }
        let s = if loops == 1 { "" } else { "s" };
        figures.rates.push((
            format!("store only: claim + complete, {loops} loop{s} (jobs/s)"),
            row,
        ));
    }
    let duration = Duration::from_secs(args.seconds);
    for &b in &backends {
        let submits = submit_rate(b, &dir, args.submitters, duration).await?;
        eprintln!(
            "{}: {} submitters: {:.0} submits/s, p99 {:.1} ms",
            b.name(),
            args.submitters,
            submits.per_second,
            submits.latencies.percentile_ms(99)
        );
        figures.submits.push(submits);
    }
    figures.rates.push((
        format!(
            "submits, {} concurrent `enqueue`s (submits/s)",
            args.submitters
        ),
        figures.submits.iter().map(|s| s.per_second).collect(),
    ));
    for (wake, deaf) in [("events", false), ("polling only", true)] {
        for poll_ms in [250, 1000] {
            let poll = Duration::from_millis(poll_ms);
            let mut row = Vec::new();
            for &b in &backends {
                let sample = wake_latency(b, &dir, poll, deaf, args.latency_jobs).await?;
                eprintln!(
                    "{}: {wake}, poll {poll_ms} ms: median {:.1} ms, p95 {:.1} ms",
                    b.name(),
                    sample.percentile_ms(50),
                    sample.percentile_ms(95)
                );
                row.push(sample);
            }
            figures.latencies.push((wake, poll, row));
        }
    }
    let machine = format!(
        "{}; {} (fsync of a 4 KiB write there: {:.2} ms median)",
        crate::cpu_summary(),
        dir.display(),
        fsync_ms(&dir)?
    );
    Ok(render(args, &machine, postgres.as_deref(), &figures))
}

fn render(args: &QueueArgs, machine: &str, postgres: Option<&str>, f: &Figures) -> String {
    let now = OffsetDateTime::now_utc();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nkiln-bench queue --jobs {} --seconds {} --submitters {} --latency-jobs {}, {} {:02}:{:02} UTC",
        args.jobs,
        args.seconds,
        args.submitters,
        args.latency_jobs,
        now.date(),
        now.hour(),
        now.minute()
    );
    let _ = writeln!(out, "\n- machine: {machine}");
    let _ = writeln!(
        out,
        "- PostgreSQL: {}",
        postgres.unwrap_or("skipped (not asked for, or it did not answer)")
    );
    let _ = writeln!(
        out,
        "- runtime: {} Tokio threads for the pool, the submitters and the stores' tasks; PostgreSQL on the same cores\n",
        args.threads
    );
    let two = f.backends.len() == 2;
    out.push_str("| what | SQLite | PostgreSQL | PostgreSQL/SQLite |\n|---|---|---|---|\n");
    for (what, row) in &f.rates {
        let (pg, ratio) = match (two, row.as_slice()) {
            (true, [sqlite, pg]) => (format!("{pg:.0}"), format!("**{:.2}**", pg / sqlite)),
            _ => ("-".into(), "-".into()),
        };
        let _ = writeln!(out, "| {what} | {:.0} | {pg} | {ratio} |", row[0]);
    }
    out.push_str(
        "\n| submits | submits/s | p50 ms | p99 ms | queued at the end | last fifth's rate / first fifth's |\n|---|---|---|---|---|---|\n",
    );
    for (b, s) in f.backends.iter().zip(&f.submits) {
        let _ = writeln!(
            out,
            "| {}, {} submitters, {} s | {:.0} | {:.2} | {:.2} | {} | {:.2} |",
            b.name(),
            args.submitters,
            args.seconds,
            s.per_second,
            s.latencies.percentile_ms(50),
            s.latencies.percentile_ms(99),
            s.depth,
            s.trend
        );
    }
    let _ = writeln!(
        out,
        "\nEnqueue to claim, idle one-slot pool, {} jobs one at a time (median / p95 / max, ms):\n",
        args.latency_jobs
    );
    out.push_str("| wake-up | poll interval | SQLite | PostgreSQL |\n|---|---|---|---|\n");
    for (wake, poll, row) in &f.latencies {
        let cell = |s: &Sample| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                s.percentile_ms(50),
                s.percentile_ms(95),
                s.max_ms()
            )
        };
        let pg = if two { cell(&row[1]) } else { "-".into() };
        let _ = writeln!(
            out,
            "| {wake} | {} ms | {} | {pg} |",
            poll.as_millis(),
            cell(&row[0])
        );
    }
    out
}
