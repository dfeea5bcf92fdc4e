//! The worker pool against a real SQLite store and a real blob directory, driven by the scripted
//! test engine.

use kiln_blob::LocalBlobStore;
use kiln_core::blob::BlobStore;
use kiln_core::catalog::Route;
use kiln_core::ids::{KeyId, RequestId, WorkerId};
use kiln_core::job::{
    CancelMode, CancelOutcome, Job, JobErrorCode, JobState, JobStatus, NewJob, Preview,
};
use kiln_core::params::{
    GenerationParams, ImageSize, ImageSource, OutputFormat, OutputSize, Prompt, RouteOptions,
};
use kiln_core::store::{ClaimPolicy, JobStore, QueueLimits};
use kiln_store::SqliteStore;
use kiln_testkit::ScriptedEngine;
use kiln_worker::{run_pool, EngineSet, FetchPolicy, MemoryBudget, Slot, WorkerSettings};
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

const ROUTE: Route = Route::Flux2FlexTextToImage;

struct Harness {
    _dir: tempfile::TempDir,
    jobs: Arc<SqliteStore>,
    blobs: Arc<LocalBlobStore>,
    engine: Arc<ScriptedEngine>,
    owner: KeyId,
}

impl Harness {
    async fn new() -> Self {
        Self::with_engine(ScriptedEngine::default()).await
    }

    async fn with_engine(engine: ScriptedEngine) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Arc::new(
            SqliteStore::open(&dir.path().join("kiln.db"))
                .await
                .unwrap(),
        );
        let blobs = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
        Self {
            _dir: dir,
            jobs,
            blobs,
            engine: Arc::new(engine),
            owner: KeyId::new(),
        }
    }

    fn settings(&self) -> WorkerSettings {
        WorkerSettings {
            name: "test".into(),
            lease: Duration::from_millis(600),
            max_attempts: 3,
            poll_interval: Duration::from_millis(20),
            drain_timeout: Duration::ZERO,
            job_timeout: Duration::from_secs(60),
            fetch: FetchPolicy::default(),
        }
    }

    fn start(&self, settings: WorkerSettings) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        self.start_slots(settings, self.slot().repeat(1))
    }

    /// A slot running the harness's engine, without a memory budget.
    fn slot(&self) -> Slot {
        Slot::new(EngineSet::new().with(ROUTE, self.engine.clone()))
    }

    fn start_slots(
        &self,
        settings: WorkerSettings,
        slots: Vec<Slot>,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let pool = tokio::spawn(run_pool(
            self.jobs.clone(),
            self.blobs.clone(),
            slots,
            settings,
            shutdown.clone(),
        ));
        (shutdown, pool)
    }

    async fn submit(&self, prompt: &str, seed: u32, format: OutputFormat) -> RequestId {
        self.enqueue(params(prompt, seed, format)).await
    }

    async fn enqueue(&self, params: GenerationParams) -> RequestId {
        let now = OffsetDateTime::now_utc();
        let job = NewJob {
            id: RequestId::new(),
            owner: self.owner,
            route: ROUTE,
            params,
            created_at: now,
            expires_at: now + Duration::from_secs(3600),
            webhook: None,
        };
        self.jobs
            .enqueue(job, None, QueueLimits::total(100))
            .await
            .unwrap()
            .view
            .job
            .id
    }

    /// Stores `bytes` as the API keeps an inline image, runs an edit of it to its end with a
    /// fresh pool, and returns the job and the image's key.
    async fn run_stored_edit(&self, bytes: Vec<u8>) -> (Job, kiln_core::ids::BlobKey) {
        let key = kiln_core::ids::BlobKey::random("png");
        let blob = kiln_core::blob::Blob {
            bytes,
            content_type: "image/png".into(),
        };
        self.blobs.put(&key, blob).await.unwrap();
        let edit = GenerationParams {
            size: OutputSize::FirstReference,
            reference_images: vec![ImageSource::stored("image/png", &key)],
            ..params("an edit", 9, OutputFormat::Png)
        };
        let id = self.enqueue(edit).await;
        let (shutdown, pool) = self.start(self.settings());
        let job = self.wait_terminal(id).await;
        shutdown.cancel();
        pool.await.unwrap();
        (job, key)
    }

    /// The job's preview once it has one different from `other` (polled while it runs).
    async fn wait_preview(&self, id: RequestId, other: Option<&Preview>) -> Preview {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let job = self.jobs.get(self.owner, id).await.unwrap().unwrap().job;
            if let JobStatus::Running {
                preview: Some(preview),
                ..
            } = &job.status
            {
                if Some(preview) != other {
                    return preview.clone();
                }
            }
            assert!(
                Instant::now() < deadline && !job.state().is_terminal(),
                "no new preview seen: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every file in the blob directory (a write's temporary file excepted).
    fn blob_files(&self) -> Vec<std::path::PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if !path
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(".tmp-")
                {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self._dir.path().join("blobs"), &mut out);
        out
    }

    async fn wait_terminal(&self, id: RequestId) -> Job {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let job = self.jobs.get(self.owner, id).await.unwrap().unwrap().job;
            if job.state().is_terminal() {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still {:?}",
                job.state()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn params(prompt: &str, seed: u32, format: OutputFormat) -> GenerationParams {
    GenerationParams {
        prompt: Prompt::parse(prompt, 1000).unwrap(),
        size: OutputSize::Pixels(ImageSize {
            width: 64,
            height: 48,
        }),
        seed,
        num_inference_steps: Some(3),
        guidance_scale: Some(3.5),
        output_format: format,
        options: RouteOptions::Flux2Flex {
            enable_prompt_expansion: false,
        },
        reference_images: Vec::new(),
    }
}

#[tokio::test]
async fn a_job_runs_to_a_stored_image_with_its_metadata() {
    let h = Harness::new().await;
    let (shutdown, pool) = h.start(h.settings());
    let id = h
        .submit("a red circle", 0x00AA_5511, OutputFormat::Png)
        .await;
    let job = h.wait_terminal(id).await;
    shutdown.cancel();
    pool.await.unwrap();

    let JobStatus::Succeeded { output, .. } = job.status else {
        panic!("not succeeded: {:?}", job.status);
    };
    let meta = &output.metadata;
    assert_eq!(
        (meta.width, meta.height, meta.num_inference_steps, meta.seed),
        (64, 48, 3, 0x00AA_5511)
    );
    assert_eq!(
        (meta.prompt.as_str(), meta.engine.as_str()),
        ("a red circle", "scripted test engine")
    );
    let blob = h.blobs.get(&output.images[0]).await.unwrap().unwrap();
    assert_eq!(blob.content_type, "image/png");
    let img = image::load_from_memory(&blob.bytes).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 48));
    assert_eq!(
        img.get_pixel(10, 10).0,
        ScriptedEngine::color_of(0x00AA_5511)
    );
}

#[tokio::test]
async fn progress_is_recorded_while_the_job_runs() {
    let h = Harness::new().await;
    let (shutdown, pool) = h.start(h.settings());
    let id = h.submit("slow drawing", 5, OutputFormat::Jpeg).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let progress = loop {
        let job = h.jobs.get(h.owner, id).await.unwrap().unwrap().job;
        if let JobStatus::Running {
            progress: Some(p), ..
        } = job.status
        {
            break p;
        }
        assert!(
            Instant::now() < deadline && !job.state().is_terminal(),
            "no progress seen: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(progress.total, 3);
    assert!((1..=3).contains(&progress.step));
    assert_eq!(h.wait_terminal(id).await.state(), JobState::Succeeded);
    shutdown.cancel();
    pool.await.unwrap();
}

#[tokio::test]
async fn an_engine_panic_fails_that_job_and_the_worker_goes_on() {
    let h = Harness::new().await;
    let (shutdown, pool) = h.start(h.settings());
    let bad = h.submit("please panic", 1, OutputFormat::Jpeg).await;
    let good = h.submit("a blue square", 2, OutputFormat::Jpeg).await;
    let bad = h.wait_terminal(bad).await;
    let good = h.wait_terminal(good).await;
    shutdown.cancel();
    pool.await.unwrap();

    let error = bad.status.error().expect("failed").clone();
    assert_eq!(error.code, JobErrorCode::EngineFailed);
    assert!(
        error.message.contains(&bad.id.to_string()),
        "names the request: {}",
        error.message
    );
    assert!(
        !error.message.contains("told to panic"),
        "the panic text stays in the logs"
    );
    assert_eq!(good.state(), JobState::Succeeded);
}

#[tokio::test]
async fn engine_errors_end_the_job_failed_with_an_actionable_code() {
    let h = Harness::new().await;
    let (shutdown, pool) = h.start(h.settings());
    let rejected = h.submit("reject this", 1, OutputFormat::Jpeg).await;
    let failed = h.submit("fail this", 1, OutputFormat::Jpeg).await;
    let rejected = h
        .wait_terminal(rejected)
        .await
        .status
        .error()
        .unwrap()
        .clone();
    let failed = h
        .wait_terminal(failed)
        .await
        .status
        .error()
        .unwrap()
        .clone();
    shutdown.cancel();
    pool.await.unwrap();
    assert_eq!(
        (rejected.code, rejected.message.as_str()),
        (
            JobErrorCode::InvalidInput,
            "this checkpoint cannot draw that"
        )
    );
    assert_eq!(failed.code, JobErrorCode::EngineFailed);
    assert!(
        failed.message.contains("request id") && !failed.message.contains("scripted"),
        "the engine's own words stay in the log: {}",
        failed.message
    );
}

#[tokio::test]
async fn shutdown_releases_a_running_job_back_to_the_queue() {
    let h = Harness::new().await;
    let (shutdown, pool) = h.start(h.settings());
    let id = h.submit("slow painting", 3, OutputFormat::Jpeg).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.jobs.get(h.owner, id).await.unwrap().unwrap().job.state() != JobState::Running {
        assert!(Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    pool.await.unwrap();
    let view = h.jobs.get(h.owner, id).await.unwrap().unwrap();
    assert_eq!(
        (&view.job.status, view.queue_position),
        (&JobStatus::Queued, Some(0))
    );

    let (shutdown, pool) = h.start(h.settings());
    assert_eq!(
        h.wait_terminal(id).await.state(),
        JobState::Succeeded,
        "the next worker finishes it"
    );
    shutdown.cancel();
    pool.await.unwrap();
}

#[tokio::test]
async fn a_job_whose_worker_died_is_retaken_after_its_lease_and_completed_once() {
    let h = Harness::new().await;
    let id = h.submit("a green triangle", 4, OutputFormat::Jpeg).await;
    // A worker that claims and then dies: it never beats its lease again.
    let policy = ClaimPolicy {
        lease: Duration::from_millis(300),
        max_attempts: 3,
    };
    let dead = h
        .jobs
        .claim(&WorkerId::new("dead"), &[ROUTE], policy)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.job.id, id);

    let (shutdown, pool) = h.start(h.settings());
    let job = h.wait_terminal(id).await;
    shutdown.cancel();
    pool.await.unwrap();
    assert_eq!(dead.attempt, 1);
    let output = job.status.output().expect("succeeded").clone();
    assert_eq!(h.engine.runs(), 1, "the live worker ran it once");
    assert!(
        h.jobs.complete(&dead, output).await.is_err(),
        "the dead worker is fenced off"
    );
}

#[tokio::test]
async fn the_sweep_purges_expired_records_with_their_files() {
    let h = Harness::new().await;
    let now = OffsetDateTime::now_utc();
    let params = GenerationParams {
        prompt: Prompt::parse("short-lived", 1000).unwrap(),
        size: OutputSize::Pixels(ImageSize {
            width: 16,
            height: 16,
        }),
        seed: 1,
        num_inference_steps: Some(1),
        guidance_scale: None,
        output_format: OutputFormat::Png,
        options: RouteOptions::Flux2Flex {
            enable_prompt_expansion: false,
        },
        reference_images: Vec::new(),
    };
    let job = NewJob {
        id: RequestId::new(),
        owner: h.owner,
        route: ROUTE,
        params,
        created_at: now,
        // Retention of 100 ms, counted from the end of the job.
        expires_at: now + Duration::from_millis(100),
        webhook: None,
    };
    let id = h
        .jobs
        .enqueue(job, None, QueueLimits::total(100))
        .await
        .unwrap()
        .view
        .job
        .id;
    let (shutdown, pool) = h.start(h.settings());
    let key = h.wait_terminal(id).await.status.output().unwrap().images[0].clone();
    shutdown.cancel();
    pool.await.unwrap();
    assert!(h.blobs.get(&key).await.unwrap().is_some());
    // The image, and the step's preview where a heartbeat stored one before the job ended (the
    // progress report at the first step races the one-step job's end): the record keeps both.
    let stored = h.blob_files().len();
    assert!((1..=2).contains(&stored), "{:?}", h.blob_files());

    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = kiln_worker::maintenance::sweep(h.jobs.as_ref(), h.blobs.as_ref(), 3).await;
    assert_eq!(report.records_purged_files, stored as u64);
    assert!(
        h.blobs.get(&key).await.unwrap().is_none(),
        "the file is gone with its record"
    );
    assert!(h.blob_files().is_empty(), "{:?}", h.blob_files());
    assert!(h.jobs.get(h.owner, id).await.unwrap().is_none());
}

#[tokio::test]
async fn an_edit_gets_its_reference_images_and_one_that_cannot_be_had_fails_it() {
    use base64::Engine as _;
    let h = Harness::new().await;
    let (shutdown, pool) = h.start(h.settings());
    let reference = kiln_core::engine::RgbImage {
        width: 40,
        height: 24,
        pixels: vec![200; 40 * 24 * 3],
    };
    let png = kiln_core::image_file::encode_image(&reference, OutputFormat::Png).unwrap();
    let inline = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let edit = GenerationParams {
        size: OutputSize::FirstReference,
        reference_images: vec![ImageSource::parse(&inline).unwrap()],
        ..params("an edit", 9, OutputFormat::Png)
    };
    let edited = h.enqueue(edit.clone()).await;
    let internal = GenerationParams {
        reference_images: vec![ImageSource::parse("http://127.0.0.1:9/cup.png").unwrap()],
        ..edit
    };
    let refused = h.enqueue(internal).await;
    let (edited, refused) = (
        h.wait_terminal(edited).await,
        h.wait_terminal(refused).await,
    );
    shutdown.cancel();
    pool.await.unwrap();

    let meta = edited
        .status
        .output()
        .unwrap_or_else(|| panic!("not succeeded: {:?}", edited.status))
        .metadata
        .clone();
    assert_eq!(
        (meta.width, meta.height),
        (40, 24),
        "the first reference's size"
    );
    assert!(
        meta.notes.iter().any(|n| n == "1 reference image(s)"),
        "{:?}",
        meta.notes
    );

    let error = refused.status.error().expect("failed").clone();
    assert_eq!(error.code, JobErrorCode::InvalidInput);
    // The client is told which image and why in a few words; the address detail is logged.
    assert_eq!(
        error.message,
        "reference image 1 (http://127.0.0.1:9/cup.png) is not a public address"
    );
}

#[tokio::test]
async fn an_image_stored_with_the_job_is_read_back_and_deleted_when_the_job_ends() {
    let h = Harness::new().await;
    let reference = kiln_core::engine::RgbImage {
        width: 32,
        height: 48,
        pixels: vec![90; 32 * 48 * 3],
    };
    let png = kiln_core::image_file::encode_image(&reference, OutputFormat::Png).unwrap();
    let (job, key) = h.run_stored_edit(png).await;
    let meta = job
        .status
        .output()
        .unwrap_or_else(|| panic!("not succeeded: {:?}", job.status))
        .metadata
        .clone();
    assert_eq!(
        (meta.width, meta.height),
        (32, 48),
        "the stored image's size"
    );
    assert!(
        h.blobs.get(&key).await.unwrap().is_none(),
        "the stored image is deleted once the job has ended"
    );
}

#[tokio::test]
async fn a_job_past_its_time_limit_is_stopped_and_failed_as_timed_out() {
    let h = Harness::new().await;
    let settings = WorkerSettings {
        job_timeout: Duration::from_millis(600),
        lease: Duration::from_secs(5),
        ..h.settings()
    };
    let (shutdown, pool) = h.start(settings);
    // 250 ms a step, 20 steps: five seconds, far past the limit.
    let slow = h
        .enqueue(GenerationParams {
            num_inference_steps: Some(20),
            ..params("a slow one", 1, OutputFormat::Jpeg)
        })
        .await;
    let next = h.submit("a quick one", 2, OutputFormat::Jpeg).await;
    let slow = h.wait_terminal(slow).await;
    let next = h.wait_terminal(next).await;
    shutdown.cancel();
    pool.await.unwrap();
    let JobStatus::Failed { error, finished_at } = slow.status else {
        panic!("not failed: {:?}", slow.status);
    };
    assert_eq!(error.code, JobErrorCode::TimedOut, "{}", error.message);
    assert!(
        error.message.contains("ran longer than"),
        "{}",
        error.message
    );
    // Run to its end it would take 20 x 250 ms = 5 s: it was stopped well before.
    let ran = finished_at - slow.created_at;
    assert!(
        ran < time::Duration::seconds(4),
        "stopped early, not run to the end ({ran})"
    );
    assert_eq!(next.state(), JobState::Succeeded, "the slot is free again");
}

#[tokio::test]
async fn a_stored_image_that_is_not_an_image_fails_its_job_and_is_deleted_all_the_same() {
    let h = Harness::new().await;
    // What the probe sent: megabytes of random bytes calling themselves an image.
    let noise = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let (job, key) = h.run_stored_edit(noise).await;
    assert_eq!(
        job.status.error().expect("failed").code,
        JobErrorCode::InvalidInput
    );
    assert!(
        h.blobs.get(&key).await.unwrap().is_none(),
        "a failed job's stored image is deleted too"
    );
}

/// Reads back a stored preview: a JPEG within 256 px on its long side, in the colour of the step
/// it claims to show.
async fn check_preview(h: &Harness, preview: &Preview) {
    let blob = h
        .blobs
        .get(&preview.key)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("preview {} is not in the blob store", preview.key));
    assert_eq!(blob.content_type, "image/jpeg");
    assert!(preview.key.as_str().ends_with(".jpeg"), "{}", preview.key);
    let img = image::load_from_memory_with_format(&blob.bytes, image::ImageFormat::Jpeg)
        .unwrap()
        .to_rgb8();
    // The scripted engine draws 320 x 240: scaled to 256 on the long side, aspect kept.
    assert_eq!(img.dimensions(), (256, 192));
    let want = ScriptedEngine::preview_color(preview.step);
    let got = img.get_pixel(128, 96).0;
    assert!(
        want.iter().zip(got).all(|(w, g)| w.abs_diff(g) <= 8),
        "step {}'s preview is {got:?}, not {want:?}",
        preview.step
    );
}

#[tokio::test]
async fn a_running_job_shows_its_latest_preview_and_a_new_one_replaces_the_old() {
    let h = Harness::new().await;
    // Heartbeats every second (a third of the lease, at most a second): a preview read from
    // the record stays stored long enough for the test to read it back, even on a busy machine.
    let settings = WorkerSettings {
        lease: Duration::from_secs(3),
        ..h.settings()
    };
    let (shutdown, pool) = h.start(settings);
    // 16 steps of 250 ms, a preview each.
    let id = h
        .enqueue(GenerationParams {
            num_inference_steps: Some(16),
            ..params("a slow sunrise", 7, OutputFormat::Png)
        })
        .await;

    let first = h.wait_preview(id, None).await;
    check_preview(&h, &first).await;
    let second = h.wait_preview(id, Some(&first)).await;
    assert_ne!(second.key, first.key, "a new preview is a new key");
    assert!(second.step > first.step, "{second:?} after {first:?}");
    check_preview(&h, &second).await;
    // Deleted once the store acknowledged its replacement (the heartbeat's answer, which the
    // status read may see a moment before the worker deletes).
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.blobs.get(&first.key).await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the replaced preview is still stored"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!h.jobs.blob_is_live(&first.key).await.unwrap());

    let job = h.wait_terminal(id).await;
    shutdown.cancel();
    pool.await.unwrap();
    let output = job.status.output().expect("succeeded");
    // Left: the image and the last preview, which stays with the record until its purge.
    let files = h.blob_files();
    assert_eq!(files.len(), 2, "{files:?}");
    let last = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .find(|name| name.as_str() != output.images[0].as_str())
        .expect("the last preview");
    let last = kiln_core::ids::BlobKey::try_from(last).unwrap();
    assert!(
        h.jobs.blob_is_live(&last).await.unwrap(),
        "{last} is the record's"
    );
}

#[tokio::test]
async fn a_forced_cancel_stops_a_running_job_within_a_step_and_the_slot_goes_on() {
    let h = Harness::new().await;
    let (shutdown, pool) = h.start(h.settings());
    let png = kiln_core::image_file::encode_image(
        &kiln_core::engine::RgbImage {
            width: 32,
            height: 32,
            pixels: vec![90; 32 * 32 * 3],
        },
        OutputFormat::Png,
    )
    .unwrap();
    let stored = kiln_core::ids::BlobKey::random("png");
    let blob = kiln_core::blob::Blob {
        bytes: png,
        content_type: "image/png".into(),
    };
    h.blobs.put(&stored, blob).await.unwrap();
    // 40 steps of 250 ms: ten seconds if it were left to run.
    let slow = h
        .enqueue(GenerationParams {
            num_inference_steps: Some(40),
            size: OutputSize::FirstReference,
            reference_images: vec![ImageSource::stored("image/png", &stored)],
            ..params("a slow edit", 1, OutputFormat::Jpeg)
        })
        .await;
    let next = h.submit("a quick one", 2, OutputFormat::Jpeg).await;
    h.wait_preview(slow, None).await;

    let asked = Instant::now();
    let outcome = h
        .jobs
        .cancel(h.owner, slow, CancelMode::Force)
        .await
        .unwrap();
    assert_eq!(outcome, Some(CancelOutcome::CancellationRequested));
    let cancelled = h.wait_terminal(slow).await;
    let took = asked.elapsed();
    assert_eq!(
        cancelled.state(),
        JobState::Cancelled,
        "{:?}",
        cancelled.status
    );
    // A heartbeat (200 ms) tells the worker, the engine stops at its next step (250 ms).
    assert!(took < Duration::from_millis(1500), "took {took:?}");

    let next = h.wait_terminal(next).await;
    shutdown.cancel();
    pool.await.unwrap();
    // Deleted just after the job's end is recorded, so looked for once the pool has stopped.
    assert!(
        h.blobs.get(&stored).await.unwrap().is_none(),
        "the cancelled job's stored image is deleted"
    );
    assert_eq!(
        next.state(),
        JobState::Succeeded,
        "the slot runs the next job"
    );
    assert_eq!(h.engine.runs(), 2, "the cancelled job is not run again");
}

/// What the memory tests' engine says a job needs: 1 KiB per pixel, so that the harness's
/// 64x48 jobs need 3 MiB each.
const MIB: u64 = 1 << 20;

async fn memory_harness() -> Harness {
    Harness::with_engine(ScriptedEngine::with_memory_per_pixel(1024)).await
}

/// Runs three slow jobs on `slots` and returns the most that ran at once.
async fn most_at_once(h: &Harness, slots: Vec<Slot>) -> u64 {
    let (shutdown, pool) = h.start_slots(h.settings(), slots);
    let mut ids = Vec::new();
    for seed in 0..3 {
        ids.push(h.submit("slow drawing", seed, OutputFormat::Png).await);
    }
    for id in ids {
        let job = h.wait_terminal(id).await;
        assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.status);
    }
    shutdown.cancel();
    pool.await.unwrap();
    h.engine.most_at_once()
}

/// Two slots on one device whose budget holds one job at a time take turns; with room for
/// two, or on devices of their own, they run together.
#[tokio::test]
async fn slots_sharing_a_device_never_reserve_more_than_its_budget() {
    let h = memory_harness().await;
    let device = Arc::new(MemoryBudget::new("cuda:0", 5 * MIB));
    let slots = h.slot().with_memory(device.clone()).repeat(2);
    assert_eq!(most_at_once(&h, slots).await, 1, "two 3 MiB jobs in 5 MiB");
    assert_eq!(device.available_bytes(), 5 * MIB, "a job kept its memory");

    let h = memory_harness().await;
    let roomy = Arc::new(MemoryBudget::new("cuda:0", 6 * MIB));
    let slots = h.slot().with_memory(roomy).repeat(2);
    assert_eq!(most_at_once(&h, slots).await, 2, "two 3 MiB jobs in 6 MiB");

    let h = memory_harness().await;
    let slots = vec![
        h.slot()
            .with_memory(Arc::new(MemoryBudget::new("cuda:0", 5 * MIB))),
        h.slot()
            .with_memory(Arc::new(MemoryBudget::new("cuda:1", 5 * MIB))),
    ];
    assert_eq!(most_at_once(&h, slots).await, 2, "one job on each device");
}

/// A job that needs more than the device may give fails at once, as the input's fault, with a
/// message that says what would fit; the slot goes on to the next job.
#[tokio::test]
async fn a_job_larger_than_the_devices_budget_fails_with_a_clear_message() {
    let h = memory_harness().await;
    let budget = Arc::new(MemoryBudget::new("cuda:0", 2 * MIB));
    let (shutdown, pool) = h.start_slots(h.settings(), h.slot().with_memory(budget).repeat(1));
    let id = h.submit("a red circle", 1, OutputFormat::Png).await;
    let job = h.wait_terminal(id).await;
    let JobStatus::Failed { error, .. } = &job.status else {
        panic!("not failed: {:?}", job.status);
    };
    assert_eq!(error.code, JobErrorCode::InvalidInput);
    assert!(
        error.message.contains("about 3 MiB")
            && error.message.contains("may use 2 MiB")
            && error.message.contains("smaller image size"),
        "{}",
        error.message
    );
    assert_eq!(h.engine.runs(), 0, "the engine ran a job that cannot fit");

    let mut small = params("a small one", 2, OutputFormat::Png);
    small.size = OutputSize::Pixels(ImageSize {
        width: 32,
        height: 32,
    });
    let id = h.enqueue(small).await;
    let job = h.wait_terminal(id).await;
    assert_eq!(job.state(), JobState::Succeeded, "{:?}", job.status);
    shutdown.cancel();
    pool.await.unwrap();
}

/// A job waiting for memory is still its owner's to cancel: the wait ends, the job is
/// cancelled, and the memory it never got stays free.
#[tokio::test]
async fn a_job_waiting_for_memory_can_be_cancelled() {
    let h = memory_harness().await;
    let budget = Arc::new(MemoryBudget::new("cuda:0", 4 * MIB));
    let held = budget.reserve(2 * MIB).await.unwrap();
    let (shutdown, pool) =
        h.start_slots(h.settings(), h.slot().with_memory(budget.clone()).repeat(1));
    let id = h.submit("a red circle", 1, OutputFormat::Png).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while h.jobs.get(h.owner, id).await.unwrap().unwrap().job.state() != JobState::Running {
        assert!(Instant::now() < deadline, "the job was not claimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.jobs.cancel(h.owner, id, CancelMode::Force).await.unwrap();
    let job = h.wait_terminal(id).await;
    assert_eq!(job.state(), JobState::Cancelled, "{:?}", job.status);
    assert_eq!(h.engine.runs(), 0);
    drop(held);
    assert_eq!(budget.available_bytes(), 4 * MIB);
    shutdown.cancel();
    pool.await.unwrap();
}
