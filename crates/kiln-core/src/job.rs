//! A job's record and life cycle.
//!
//! ```text
//!   submit ──► Queued ──claim──► Running ──► Succeeded | Failed
//!                │   ▲              │
//!           cancel   └─lease expiry─┘ (taken again; failed after too many attempts)
//!                ▼
//!            Cancelled
//! ```

use crate::catalog::Route;
use crate::ids::{BlobKey, KeyId, RequestId};
use crate::params::{GenerationParams, OutputFormat};
use crate::webhook::WebhookUrl;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// The name used in storage, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Per-step progress of a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub step: u32,
    pub total: u32,
}

/// The latest preview of a running job: a small JPEG of its current latents, stored under a
/// fresh key each time (the old one is deleted), so a preview's URL never changes content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preview {
    pub key: BlobKey,
    /// The step it shows (1-based).
    pub step: u32,
}

/// What a worker reports with a heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// The engine's last step, once it has made one.
    pub progress: Option<Progress>,
    /// The latest preview, once one is stored.
    pub preview: Option<Preview>,
}

/// Why a job failed, in words a user can act on. `code` is a stable machine-readable name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobError {
    pub code: JobErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorCode {
    /// The engine could not take this input (for example a size the checkpoint cannot make).
    InvalidInput,
    /// No engine is configured for the job's model on the worker that took it.
    EngineUnavailable,
    /// The engine failed (or panicked) while generating.
    EngineFailed,
    /// Workers kept dying while holding this job; it was given up after the attempt limit.
    WorkerLost,
    /// The image was generated but could not be stored.
    StorageFailed,
    /// The job ran past the worker's time limit for one job (`workers.job_timeout_secs`).
    TimedOut,
}

/// What a finished generation recorded: the applied settings, after defaults and expansion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputMetadata {
    pub model: Route,
    pub seed: u32,
    pub width: u32,
    pub height: u32,
    pub num_inference_steps: u32,
    pub guidance: Option<f32>,
    pub output_format: OutputFormat,
    /// The prompt the model saw (after expansion, if any).
    pub prompt: String,
    pub timings_ms: Timings,
    /// Which checkpoint and engine made the image.
    pub engine: String,
    /// Plain statements about what was applied (raw mode, demo checkpoint, expansion skipped...).
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From submit to the start of the run that finished it.
    pub queued: u64,
    /// The engine's run.
    pub inference: u64,
    /// Encoding and storing the image.
    pub encode_and_store: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOutput {
    pub images: Vec<BlobKey>,
    pub metadata: OutputMetadata,
}

/// A job as stored: what every job has, and its status, which carries what that state has.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: RequestId,
    pub owner: KeyId,
    pub route: Route,
    pub params: GenerationParams,
    pub created_at: OffsetDateTime,
    /// The record and its files are purged after this instant.
    pub expires_at: OffsetDateTime,
    /// Where the job's end is announced, if the submit named a webhook.
    pub webhook: Option<WebhookUrl>,
    pub status: JobStatus,
}

/// Where a job is in its life cycle, with what that state has and nothing else: a reader never
/// re-checks a state against optional fields.
#[derive(Debug, Clone, PartialEq)]
pub enum JobStatus {
    Queued,
    Running {
        started_at: OffsetDateTime,
        /// Which claim of the job this is (1 for the first run; more after lease expiries).
        attempt: u32,
        /// The engine's last reported step, once it has reported one.
        progress: Option<Progress>,
        /// The latest preview, once the worker has stored one.
        preview: Option<Preview>,
        /// A forced cancel was asked for: the worker stops at its next step boundary and the
        /// job ends `Cancelled`.
        cancel_requested: bool,
    },
    Succeeded {
        started_at: OffsetDateTime,
        finished_at: OffsetDateTime,
        output: JobOutput,
    },
    Failed {
        finished_at: OffsetDateTime,
        error: JobError,
    },
    Cancelled {
        finished_at: OffsetDateTime,
    },
}

impl JobStatus {
    /// The state's name, without its data.
    pub fn state(&self) -> JobState {
        match self {
            JobStatus::Queued => JobState::Queued,
            JobStatus::Running { .. } => JobState::Running,
            JobStatus::Succeeded { .. } => JobState::Succeeded,
            JobStatus::Failed { .. } => JobState::Failed,
            JobStatus::Cancelled { .. } => JobState::Cancelled,
        }
    }

    /// The output of a succeeded job.
    pub fn output(&self) -> Option<&JobOutput> {
        match self {
            JobStatus::Succeeded { output, .. } => Some(output),
            _ => None,
        }
    }

    /// Why a failed job failed.
    pub fn error(&self) -> Option<&JobError> {
        match self {
            JobStatus::Failed { error, .. } => Some(error),
            _ => None,
        }
    }

    /// When the job ended; `None` while it waits or runs.
    pub fn finished_at(&self) -> Option<OffsetDateTime> {
        match self {
            JobStatus::Queued | JobStatus::Running { .. } => None,
            JobStatus::Succeeded { finished_at, .. }
            | JobStatus::Failed { finished_at, .. }
            | JobStatus::Cancelled { finished_at } => Some(*finished_at),
        }
    }
}

impl Job {
    pub fn state(&self) -> JobState {
        self.status.state()
    }
}

/// A job as a client sees it: the record plus its place in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: Job,
    /// 0 = next to be claimed; `Some` only while queued.
    pub queue_position: Option<u64>,
}

/// What a status poll shows of a job: its state with what that state adds for a poll. None of
/// the stored parameters or output: polls are the service's most frequent request and never
/// show them, and decoding them was a measured share of a poll's cost.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusView {
    pub id: RequestId,
    /// Preview URLs are signed to end with the record.
    pub expires_at: OffsetDateTime,
    pub stage: Stage,
}

/// A job's state as a poll sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// `position` queued jobs are ahead of it (0 = next to be claimed).
    Queued {
        position: u64,
    },
    Running {
        progress: Option<Progress>,
        preview: Option<Preview>,
    },
    Succeeded,
    Failed,
    Cancelled,
}

impl Stage {
    /// The state's name, without its data.
    pub fn state(&self) -> JobState {
        match self {
            Stage::Queued { .. } => JobState::Queued,
            Stage::Running { .. } => JobState::Running,
            Stage::Succeeded => JobState::Succeeded,
            Stage::Failed => JobState::Failed,
            Stage::Cancelled => JobState::Cancelled,
        }
    }
}

impl From<&JobView> for StatusView {
    fn from(view: &JobView) -> Self {
        let job = &view.job;
        let stage = match &job.status {
            // Every store reads a queued job's position with it.
            JobStatus::Queued => Stage::Queued {
                position: view.queue_position.unwrap_or_default(),
            },
            JobStatus::Running {
                progress, preview, ..
            } => Stage::Running {
                progress: *progress,
                preview: preview.clone(),
            },
            JobStatus::Succeeded { .. } => Stage::Succeeded,
            JobStatus::Failed { .. } => Stage::Failed,
            JobStatus::Cancelled { .. } => Stage::Cancelled,
        };
        StatusView {
            id: job.id,
            expires_at: job.expires_at,
            stage,
        }
    }
}

/// What a submit hands the store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub id: RequestId,
    pub owner: KeyId,
    pub route: Route,
    pub params: GenerationParams,
    pub created_at: OffsetDateTime,
    pub expires_at: OffsetDateTime,
    pub webhook: Option<WebhookUrl>,
}

impl NewJob {
    /// The job as it stands once committed: queued.
    pub fn into_queued(self) -> Job {
        Job {
            id: self.id,
            owner: self.owner,
            route: self.route,
            params: self.params,
            created_at: self.created_at,
            expires_at: self.expires_at,
            webhook: self.webhook,
            status: JobStatus::Queued,
        }
    }
}

/// What cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled (or had already been cancelled).
    Cancelled,
    /// It is running and a forced cancel was asked for (now or before): it ends `Cancelled` at
    /// the engine's next step boundary.
    CancellationRequested,
    /// It is running (and the cancel was not forced) or finished; nothing changed.
    NotCancellable,
}

/// How far a cancel may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMode {
    /// Only a queued job is cancelled (the hosted API's behaviour).
    QueuedOnly,
    /// A running job is asked to stop too (`?force=true`).
    Force,
}
