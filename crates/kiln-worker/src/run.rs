//! One job from lease to terminal state.
//!
//! The engine runs on a blocking thread while this task beats the lease and watches for
//! shutdown. Whatever happens, the job ends in exactly one of: completed (image stored),
//! failed (with a code and a message the user can act on), cancelled (its owner forced a
//! cancel), released (shutdown: back to the queue), or left to its lease (this worker was
//! fenced off: another one owns the job now). Each heartbeat also stores the engine's latest
//! preview (`preview.rs`).

use crate::memory::{MemoryBudget, Reservation};
use crate::metrics::{JOBS_FINISHED, JOB_SECONDS, STEP_SECONDS};
use crate::pool::{Slot, WorkerContext};
use crate::preview::{LatestPreview, Previews};
use kiln_core::blob::{Blob, BlobStore};
use kiln_core::engine::{Engine, EngineError, GeneratedImage, StepEvent, StepObserver};
use kiln_core::ids::{BlobKey, RequestId};
use kiln_core::image_file::encode_image;
use kiln_core::job::{
    Job, JobError, JobErrorCode, JobOutput, OutputMetadata, Progress, StepReport, Timings,
};
use kiln_core::params::{ImageLocation, ImageSource};
use kiln_core::report::Chain;
use kiln_core::store::{Lease, StoreError};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Shared between the engine's thread and the job's task.
#[derive(Default)]
struct RunSignals {
    progress: Mutex<Option<Progress>>,
    /// The engine's newest preview, until the next heartbeat takes it.
    preview: LatestPreview,
    /// Set to ask the engine to stop at its next step.
    stop: AtomicBool,
    /// Told when the engine finishes its first step, so that the job's progress is reported at
    /// once, not at the next heartbeat: a job shorter than the heartbeat interval would
    /// otherwise show no step at all.
    first_step: tokio::sync::Notify,
}

impl RunSignals {
    fn progress(&self) -> Option<Progress> {
        *self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct ProgressObserver {
    signals: Arc<RunSignals>,
    model: &'static str,
    last_step: Instant,
}

impl StepObserver for ProgressObserver {
    fn on_step(&mut self, event: StepEvent<'_>) -> ControlFlow<()> {
        STEP_SECONDS
            .with_label_values(&[self.model])
            .observe(self.last_step.elapsed().as_secs_f64());
        self.last_step = Instant::now();
        *self
            .signals
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Progress {
            step: event.step,
            total: event.total,
        });
        if let Some(preview) = event.preview {
            // Only kept here: scaling and encoding wait for the heartbeat, off this thread.
            self.signals.preview.offer(event.step, preview);
        }
        if event.step == 1 {
            self.signals.first_step.notify_one();
        }
        if self.signals.stop.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn stop_requested(&mut self) -> bool {
        self.signals.stop.load(Ordering::Relaxed)
    }
}

/// Why the engine was asked to stop, if it was. When several reasons come, the greater one
/// decides how the job ends (the variants are in that order): a lost lease forbids any write; a
/// cancel is its owner's explicit wish; a timeout fails the job; a shutdown only releases it,
/// which is the mildest end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum StopReason {
    /// The process is shutting down and the drain time ran out.
    Shutdown,
    /// The job ran past [`crate::WorkerSettings::job_timeout`].
    TimedOut,
    /// Its owner forced a cancel (a heartbeat answered `cancel_requested`).
    Cancelled,
    /// Another worker owns the job now; nothing more may be written for it.
    LeaseLost,
}

/// Asks the engine to stop for `reason`, unless a greater reason already did.
fn request_stop(stop_reason: &mut Option<StopReason>, reason: StopReason, signals: &RunSignals) {
    if stop_reason.is_some_and(|current| current >= reason) {
        return;
    }
    match reason {
        StopReason::Shutdown => {
            tracing::info!("shutdown: drain time is up; interrupting the job to release it")
        }
        StopReason::TimedOut => {
            tracing::warn!("the job ran past its time limit; stopping the engine")
        }
        StopReason::Cancelled => {
            tracing::info!("a forced cancel was asked for; stopping the engine")
        }
        StopReason::LeaseLost => {
            tracing::warn!("lease lost (another worker took the job); stopping the engine")
        }
    }
    *stop_reason = Some(reason);
    signals.stop.store(true, Ordering::Relaxed);
}

pub(crate) async fn run_job(context: &WorkerContext, slot: &Slot, lease: Lease) {
    let span = tracing::info_span!(
        "job",
        request_id = %lease.job.id,
        model = lease.job.route.id(),
        attempt = lease.attempt,
        worker = %lease.worker,
    );
    async {
        let started = Instant::now();
        let outcome = run_to_end(context, slot, &lease).await;
        if matches!(outcome, "succeeded" | "failed" | "cancelled") {
            delete_stored_images(context, &lease).await;
        }
        let model = lease.job.route.id();
        JOBS_FINISHED.with_label_values(&[model, outcome]).inc();
        JOB_SECONDS
            .with_label_values(&[model])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            outcome,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "job ended"
        );
    }
    .instrument(span)
    .await
}

/// Runs the job and returns the outcome's name (for metrics and logs).
async fn run_to_end(context: &WorkerContext, slot: &Slot, lease: &Lease) -> &'static str {
    let job = &lease.job;
    let Some(engine) = slot.engines.get(job.route).cloned() else {
        let error = JobError {
            code: JobErrorCode::EngineUnavailable,
            message: format!(
                "no engine for {} is loaded on the worker that took this job",
                job.route
            ),
        };
        return finish_failed(context, lease, error).await;
    };

    let signals = Arc::new(RunSignals::default());
    let inference_started = Instant::now();
    let mut generation = Box::pin(generate(
        context,
        slot.memory.as_deref(),
        job,
        engine.clone(),
        signals.clone(),
    ));

    let mut heartbeat = tokio::time::interval(context.settings.heartbeat_interval());
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heartbeat.tick().await;
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let mut stop_reason: Option<StopReason> = None;
    let mut first_step_reported = false;
    let mut previews = Previews::inherited(&job.status);
    let job_timeout = tokio::time::sleep(context.settings.job_timeout);
    tokio::pin!(job_timeout);
    let result = loop {
        let drain_expired = async {
            match drain_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            result = &mut generation => break result,
            _ = heartbeat.tick() => {
                if let Some(reason) = beat(context, lease, &signals, &mut previews, stop_reason.is_some()).await {
                    request_stop(&mut stop_reason, reason, &signals);
                }
            }
            () = signals.first_step.notified(), if !first_step_reported => {
                first_step_reported = true;
                if let Some(reason) = beat(context, lease, &signals, &mut previews, stop_reason.is_some()).await {
                    request_stop(&mut stop_reason, reason, &signals);
                }
            }
            () = context.shutdown.cancelled(), if drain_deadline.is_none() => {
                tracing::info!(drain_timeout_s = context.settings.drain_timeout.as_secs(), "shutdown: letting the running job finish");
                drain_deadline = Some(tokio::time::Instant::now() + context.settings.drain_timeout);
            }
            // Fires once (a finished sleep would fire at every turn of the loop).
            () = &mut job_timeout, if stop_reason < Some(StopReason::TimedOut) => {
                request_stop(&mut stop_reason, StopReason::TimedOut, &signals);
            }
            () = drain_expired => {
                request_stop(&mut stop_reason, StopReason::Shutdown, &signals);
                drain_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
            }
        }
    };
    let inference = inference_started.elapsed();
    let ended = Ended {
        engine: engine.describe(),
        stop_reason,
        inference,
    };
    let outcome = conclude(context, lease, result, ended).await;
    // After the ending's write, so the record says which preview it keeps.
    previews
        .settle(context.jobs.as_ref(), context.blobs.as_ref())
        .await;
    outcome
}

/// One heartbeat: stores the engine's latest preview (unless the engine is being stopped: the
/// job is ending, nobody needs one), reports it with the progress, extends the lease, and says
/// why to stop if the answer tells the worker to.
async fn beat(
    context: &WorkerContext,
    lease: &Lease,
    signals: &RunSignals,
    previews: &mut Previews,
    stopping: bool,
) -> Option<StopReason> {
    if !stopping {
        let budget = context.settings.heartbeat_interval();
        previews
            .store_latest(&context.blobs, &signals.preview, budget)
            .await;
    }
    let report = StepReport {
        progress: signals.progress(),
        preview: previews.report(),
    };
    match context
        .jobs
        .heartbeat(lease, &report, context.settings.lease)
        .await
    {
        Ok(ack) => {
            previews.acknowledged(context.blobs.as_ref()).await;
            ack.cancel_requested.then_some(StopReason::Cancelled)
        }
        // The previews this heartbeat reported are not recorded: `settle` deletes them.
        Err(StoreError::LeaseLost(_)) => Some(StopReason::LeaseLost),
        Err(e) => {
            tracing::warn!(error = %Chain(&e), "heartbeat failed; will retry");
            None
        }
    }
}

/// Reads and fetches the job's reference images, reserves the job's memory on the slot's
/// device, then runs the engine on a blocking thread. Fetching and waiting for memory are part
/// of the run: the lease is beaten meanwhile, an image that cannot be had fails the job as the
/// input's fault, and so does a size that needs more memory than the device may give.
async fn generate(
    context: &WorkerContext,
    memory: Option<&MemoryBudget>,
    job: &Job,
    engine: Arc<dyn Engine>,
    signals: Arc<RunSignals>,
) -> Result<Result<GeneratedImage, EngineError>, tokio::task::JoinError> {
    let params = job.params.clone();
    let sources = match read_stored_images(context.blobs.as_ref(), &params.reference_images).await {
        Ok(sources) => sources,
        Err(e) => return Ok(Err(e)),
    };
    let references = match context.fetcher.fetch_all(&sources).await {
        Ok(images) => images,
        Err(e) => return Ok(Err(EngineError::InvalidInput(e.to_string()))),
    };
    let reservation = match reserve(memory, engine.as_ref(), &params, &references, &signals).await {
        Ok(reservation) => reservation,
        Err(e) => return Ok(Err(e)),
    };
    let model = job.route.id();
    tokio::task::spawn_blocking(move || {
        let _reservation = reservation;
        let mut observer = ProgressObserver {
            signals,
            model,
            last_step: Instant::now(),
        };
        engine.generate(&params, &references, &mut observer)
    })
    .await
}

/// Waits for the job's memory on the slot's device (nothing to wait for without a budget, or
/// for an engine that cannot say what it needs). A stop asked for meanwhile (cancel, timeout,
/// shutdown) ends the wait as the engine's interruption would.
async fn reserve(
    memory: Option<&MemoryBudget>,
    engine: &dyn Engine,
    params: &kiln_core::params::GenerationParams,
    references: &[kiln_core::engine::RgbImage],
    signals: &RunSignals,
) -> Result<Option<Reservation>, EngineError> {
    let (Some(budget), Some(need)) = (memory, engine.job_memory(params, references)) else {
        return Ok(None);
    };
    // A job over the whole budget is refused at the first poll, before any wait.
    let reservation = budget.reserve(need);
    tokio::pin!(reservation);
    let mut waited = false;
    loop {
        tokio::select! {
            granted = &mut reservation => {
                let reservation = granted.map_err(|e| EngineError::InvalidInput(e.to_string()))?;
                return Ok(Some(reservation));
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if signals.stop.load(Ordering::Relaxed) {
                    return Err(EngineError::Interrupted);
                }
                if !waited {
                    waited = true;
                    tracing::info!(device = budget.device(), need_mib = need >> 20, "waiting for memory on the device: other jobs there hold it");
                }
            }
        }
    }
}

/// How a run ended, beside the engine's result.
struct Ended {
    engine: String,
    stop_reason: Option<StopReason>,
    inference: Duration,
}

/// Records the run's result: the job completed, failed, or released to the queue.
async fn conclude(
    context: &WorkerContext,
    lease: &Lease,
    result: Result<Result<GeneratedImage, EngineError>, tokio::task::JoinError>,
    ended: Ended,
) -> &'static str {
    match (result, ended.stop_reason) {
        (_, Some(StopReason::LeaseLost)) => "lease_lost",
        (Ok(Err(EngineError::Interrupted)), Some(StopReason::Cancelled)) => {
            match context.jobs.end_cancelled(lease).await {
                Ok(()) => "cancelled",
                Err(StoreError::LeaseLost(_)) => "lease_lost",
                Err(e) => {
                    // The lease runs out and the sweep ends the job cancelled (a forced cancel
                    // is pending), so nothing is lost but time.
                    tracing::warn!(error = %Chain(&e), "could not record the cancel; the sweep will");
                    "cancel_failed"
                }
            }
        }
        (Ok(Err(EngineError::Interrupted)), Some(StopReason::TimedOut)) => {
            let error = JobError {
                code: JobErrorCode::TimedOut,
                message: format!(
                    "the job ran longer than this server allows for one ({} s) and was stopped",
                    context.settings.job_timeout.as_secs()
                ),
            };
            finish_failed(context, lease, error).await
        }
        (result, _) => conclude_result(context, lease, result, ended).await,
    }
}

async fn conclude_result(
    context: &WorkerContext,
    lease: &Lease,
    result: Result<Result<GeneratedImage, EngineError>, tokio::task::JoinError>,
    ended: Ended,
) -> &'static str {
    let job = &lease.job;
    match result {
        Err(join_error) => {
            tracing::error!(error = %join_error, "the engine panicked");
            finish_failed(context, lease, engine_failure(job.id, "crashed")).await
        }
        Ok(Err(EngineError::Interrupted)) => match context.jobs.release(lease).await {
            Ok(()) => "released",
            Err(e) => {
                tracing::warn!(error = %Chain(&e), "could not release the job; its lease will expire");
                "release_failed"
            }
        },
        Ok(Err(EngineError::InvalidInput(message))) => {
            finish_failed(
                context,
                lease,
                JobError {
                    code: JobErrorCode::InvalidInput,
                    message,
                },
            )
            .await
        }
        Ok(Err(EngineError::Failed(internal))) => {
            // The engine's own words may name files and devices of this server: they go to
            // the log under the request id, the client gets the id.
            tracing::error!(error = %internal, "the engine failed");
            finish_failed(context, lease, engine_failure(job.id, "failed")).await
        }
        Ok(Ok(generated)) => {
            store_and_complete(context, lease, generated, ended.engine, ended.inference).await
        }
    }
}

/// What the client is told when the engine `what` (crashed, failed): its request id, under
/// which the log has the detail, and nothing of the engine's own words.
fn engine_failure(id: RequestId, what: &str) -> JobError {
    JobError {
        code: JobErrorCode::EngineFailed,
        message: format!(
            "the engine {what} while generating this image (request id {id}); \
             the server's logs have the details"
        ),
    }
}

/// The job's sources with its stored inline images read back from the blob store (the
/// fetcher takes them as the data URIs the client sent).
async fn read_stored_images(
    blobs: &dyn BlobStore,
    sources: &[ImageSource],
) -> Result<Vec<ImageSource>, EngineError> {
    let mut read = Vec::with_capacity(sources.len());
    for (i, source) in sources.iter().enumerate() {
        let ImageLocation::Stored { media_type, key } = source.location() else {
            read.push(source.clone());
            continue;
        };
        let gone = |detail: String| {
            EngineError::Failed(format!(
                "reference image {} stored with the job: {detail}",
                i + 1
            ))
        };
        let key = source
            .stored_key()
            .ok_or_else(|| gone(format!("bad key {key}")))?;
        match blobs.get(&key).await {
            Ok(Some(blob)) => read.push(ImageSource::data(media_type, &blob.bytes)),
            Ok(None) => return Err(gone("missing from the blob store".into())),
            Err(e) => return Err(gone(e.to_string())),
        }
    }
    Ok(read)
}

/// Once the job has ended its stored inline images have served their purpose.
async fn delete_stored_images(context: &WorkerContext, lease: &Lease) {
    for key in lease.job.params.stored_images() {
        if let Err(error) = context.blobs.delete(&key).await {
            // The record's purge deletes it later.
            tracing::warn!(error = %Chain(&error), blob = %key, "could not delete a stored reference image");
        }
    }
}

async fn store_and_complete(
    context: &WorkerContext,
    lease: &Lease,
    generated: GeneratedImage,
    engine: String,
    inference: Duration,
) -> &'static str {
    let job = &lease.job;
    let format = job.params.output_format;
    let store_started = Instant::now();
    let image = generated.image;
    let encoded =
        match tokio::task::spawn_blocking(move || encode_image(&image, format).map(|b| (b, image)))
            .await
        {
            Ok(Ok(encoded)) => encoded,
            Ok(Err(e)) => return storage_failed(context, lease, &e).await,
            Err(e) => return storage_failed(context, lease, &e).await,
        };
    let (bytes, image) = encoded;
    let key = BlobKey::random(format.extension());
    let blob = Blob {
        bytes,
        content_type: format.content_type().to_string(),
    };
    if let Err(e) = context.blobs.put(&key, blob).await {
        return storage_failed(context, lease, &e).await;
    }
    let queued = (lease.started_at - job.created_at).unsigned_abs();
    let applied = generated.applied;
    let output = JobOutput {
        images: vec![key.clone()],
        metadata: OutputMetadata {
            model: job.route,
            seed: job.params.seed,
            width: image.width,
            height: image.height,
            num_inference_steps: applied.num_inference_steps,
            guidance: applied.guidance,
            output_format: format,
            prompt: applied.prompt,
            timings_ms: Timings {
                queued: queued.as_millis() as u64,
                inference: inference.as_millis() as u64,
                encode_and_store: store_started.elapsed().as_millis() as u64,
            },
            engine,
            notes: applied.notes,
        },
    };
    match context.jobs.complete(lease, output).await {
        Ok(()) => "succeeded",
        Err(e) => {
            // Fenced off (or the store failed): the job is not ours to finish, so its file
            // must not linger unreferenced.
            tracing::warn!(error = %Chain(&e), "could not complete the job; discarding its image");
            if let Err(e) = context.blobs.delete(&key).await {
                tracing::warn!(error = %Chain(&e), blob = %key, "could not delete the discarded image");
            }
            "complete_failed"
        }
    }
}

async fn storage_failed(
    context: &WorkerContext,
    lease: &Lease,
    internal: &(dyn std::error::Error + Send + Sync + 'static),
) -> &'static str {
    tracing::error!(error = %Chain(internal), "storing the image failed");
    let error = JobError {
        code: JobErrorCode::StorageFailed,
        message: format!(
            "the image was generated but could not be stored (request id {}); try again, \
             and tell the operator if it persists",
            lease.job.id
        ),
    };
    finish_failed(context, lease, error).await
}

async fn finish_failed(context: &WorkerContext, lease: &Lease, error: JobError) -> &'static str {
    match context.jobs.fail(lease, error).await {
        Ok(()) => "failed",
        Err(e) => {
            tracing::warn!(error = %Chain(&e), "could not record the failure; the lease will expire and the job be retried");
            "fail_failed"
        }
    }
}
