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

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: RequestId,
    pub owner: KeyId,
    pub route: Route,
    pub params: GenerationParams,
    pub state: JobState,
    pub created_at: OffsetDateTime,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
    /// The record and its files are purged after this instant.
    pub expires_at: OffsetDateTime,
    pub progress: Option<Progress>,
    pub output: Option<JobOutput>,
    pub error: Option<JobError>,
    /// How many times a worker has claimed this job.
    pub attempts: u32,
}

/// A job as a client sees it: the record plus its place in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub job: Job,
    /// 0 = next to be claimed; `Some` only while queued.
    pub queue_position: Option<u64>,
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
}

/// What cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued and is now cancelled (or had already been cancelled).
    Cancelled,
    /// It is running or finished; nothing changed.
    NotCancellable,
}
