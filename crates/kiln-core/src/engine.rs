//! The trait between the worker and the inference engines. An engine knows tensors and
//! checkpoints; it knows nothing of HTTP, queues or storage.

use crate::params::GenerationParams;
use std::ops::ControlFlow;

/// An 8-bit RGB image, row-major, 3 bytes a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// One denoising step done.
pub struct StepEvent<'a> {
    /// 1-based: `step == total` on the last one.
    pub step: u32,
    pub total: u32,
    /// A cheap preview of the current latents, when the engine made one this step.
    pub preview: Option<&'a RgbImage>,
}

/// Watches a generation. Returning `ControlFlow::Break` asks the engine to stop early (the
/// worker does this when it shuts down or loses its lease); the engine then returns
/// [`EngineError::Interrupted`].
pub trait StepObserver {
    fn on_step(&mut self, event: StepEvent<'_>) -> ControlFlow<()>;

    /// Whether to stop now. Engines ask between the long phases where no step fires (prompt
    /// encoding, every token of a prompt expansion, reference encoding, before decoding), so
    /// that a stop is honoured within one phase, not only at the next step.
    fn stop_requested(&mut self) -> bool {
        false
    }
}

/// Nobody watching: the generation runs to the end.
impl StepObserver for () {
    fn on_step(&mut self, _: StepEvent<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// Settings the engine actually applied, for the result's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedSettings {
    pub num_inference_steps: u32,
    pub guidance: Option<f32>,
    /// The prompt the model saw (after expansion, if any).
    pub prompt: String,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedImage {
    pub image: RgbImage,
    pub applied: AppliedSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The parameters passed the route's schema but this checkpoint cannot honour them.
    #[error("{0}")]
    InvalidInput(String),
    /// The observer asked to stop.
    #[error("generation interrupted")]
    Interrupted,
    #[error("{0}")]
    Failed(String),
}

/// A loaded model, resident and ready. Generation is CPU/GPU-bound and blocking: callers run
/// it on a blocking thread.
pub trait Engine: Send + Sync {
    /// Says which checkpoint, on which device, for logs and result metadata.
    fn describe(&self) -> String;

    /// One image for `params`. `references` are the decoded `params.reference_images`, in the
    /// same order (the worker fetches them; the engine never touches the network); an engine
    /// that cannot condition on images refuses a non-empty slice with
    /// [`EngineError::InvalidInput`].
    fn generate(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<GeneratedImage, EngineError>;

    /// About how many bytes of its device's memory generating `params` (with these decoded
    /// `references`) may hold at its peak beyond the resident weights: what a worker reserves
    /// from the device's memory budget before it runs the job, so that jobs sharing a device
    /// never overcommit it. An upper estimate; `None` where the engine cannot say (its jobs
    /// then run without a reservation).
    fn job_memory(&self, params: &GenerationParams, references: &[RgbImage]) -> Option<u64> {
        let _ = (params, references);
        None
    }
}
