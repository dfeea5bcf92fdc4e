//! Test-only helpers. Used as a dev-dependency only: the shipped binary never fakes an image.
//!
//! # Layout
//! - [`ScriptedEngine`]: an [`Engine`] whose behaviour the prompt selects, for driving workers
//!   through every path (success, failure, panic, slow runs) without model weights.
//! - [`jobs`]: jobs and outputs for store tests.
//! - [`postgres`]: a fresh database per test on the PostgreSQL the machine runs.
//! - [`s3`]: an S3-compatible server on a temporary directory, in-process.

pub mod jobs;
pub mod postgres;
pub mod s3;

use kiln_core::engine::{
    AppliedSettings, Engine, EngineError, GeneratedImage, RgbImage, StepEvent, StepObserver,
};
use kiln_core::params::{GenerationParams, OutputSize};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Behaviour by prompt word:
/// - `panic`: panics at the first step;
/// - `fail`: returns [`EngineError::Failed`];
/// - `reject`: returns [`EngineError::InvalidInput`];
/// - `slow`: takes `slow_step` per step;
/// - anything else: `fast_step` per step.
///
/// The image is a solid colour derived from the seed, at the requested size, so tests can check
/// that the stored file is the one this request produced.
///
/// With `memory_per_pixel` set, it says a job needs that many bytes per output pixel
/// ([`Engine::job_memory`]), and it counts how many generations ran at once
/// ([`ScriptedEngine::most_at_once`]), for tests of memory budgets.
///
/// Every step hands the observer a preview, as the real engines do every `preview_interval`
/// steps: [`ScriptedEngine::PREVIEW_SIZE`] (larger than the worker stores, so that its
/// downscale is exercised) in a solid colour that tells the step ([`ScriptedEngine::preview_color`]).
pub struct ScriptedEngine {
    pub steps: u32,
    pub fast_step: Duration,
    pub slow_step: Duration,
    pub memory_per_pixel: Option<u64>,
    runs: AtomicU64,
    running: AtomicU64,
    most_at_once: AtomicU64,
}

impl Default for ScriptedEngine {
    fn default() -> Self {
        Self {
            steps: 4,
            fast_step: Duration::from_millis(5),
            slow_step: Duration::from_millis(250),
            memory_per_pixel: None,
            runs: AtomicU64::new(0),
            running: AtomicU64::new(0),
            most_at_once: AtomicU64::new(0),
        }
    }
}

impl ScriptedEngine {
    /// How many generations were started (each attempt counts).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::SeqCst)
    }

    /// An engine that says each job needs `bytes` per output pixel.
    pub fn with_memory_per_pixel(bytes: u64) -> Self {
        Self {
            memory_per_pixel: Some(bytes),
            ..Self::default()
        }
    }

    /// The most generations that ran at the same time so far.
    pub fn most_at_once(&self) -> u64 {
        self.most_at_once.load(Ordering::SeqCst)
    }

    /// The size of every preview: 4:3 and longer than the 256 pixels the worker keeps.
    pub const PREVIEW_SIZE: (u32, u32) = (320, 240);

    /// The colour of step `step`'s preview: far apart for neighbouring steps, so that a JPEG's
    /// small error never makes one step's preview pass for another's.
    pub fn preview_color(step: u32) -> [u8; 3] {
        let level = |k: u32| ((step.wrapping_mul(k) % 8) * 32 + 16) as u8;
        [level(1), level(3), level(5)]
    }

    fn preview(step: u32) -> RgbImage {
        let (width, height) = Self::PREVIEW_SIZE;
        RgbImage {
            width,
            height,
            pixels: Self::preview_color(step).repeat((width * height) as usize),
        }
    }

    /// The colour a seed paints.
    pub fn color_of(seed: u32) -> [u8; 3] {
        let b = seed.to_le_bytes();
        [b[0], b[1], b[2] ^ b[3]]
    }
}

impl Engine for ScriptedEngine {
    fn describe(&self) -> String {
        "scripted test engine".to_string()
    }

    fn generate(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<GeneratedImage, EngineError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        let result = self.run(params, references, observer);
        self.running.fetch_sub(1, Ordering::SeqCst);
        result
    }

    fn job_memory(&self, params: &GenerationParams, references: &[RgbImage]) -> Option<u64> {
        let (width, height) = output_size(params, references).ok()?;
        Some(self.memory_per_pixel? * width as u64 * height as u64)
    }
}

/// The requested size, or the first reference's.
fn output_size(
    params: &GenerationParams,
    references: &[RgbImage],
) -> Result<(u32, u32), EngineError> {
    match (params.size, references.first()) {
        (OutputSize::Pixels(size), _) => Ok((size.width, size.height)),
        (OutputSize::FirstReference, Some(first)) => Ok((first.width, first.height)),
        (OutputSize::FirstReference, None) => {
            Err(EngineError::InvalidInput("no reference image".into()))
        }
    }
}

impl ScriptedEngine {
    fn run(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<GeneratedImage, EngineError> {
        let prompt = params.prompt.as_str();
        if prompt.contains("reject") {
            return Err(EngineError::InvalidInput(
                "this checkpoint cannot draw that".into(),
            ));
        }
        if prompt.contains("fail") {
            return Err(EngineError::Failed(
                "the scripted engine was told to fail".into(),
            ));
        }
        let step_time = if prompt.contains("slow") {
            self.slow_step
        } else {
            self.fast_step
        };
        let total = params.num_inference_steps.unwrap_or(self.steps);
        for step in 1..=total {
            if prompt.contains("panic") {
                panic!("the scripted engine was told to panic");
            }
            std::thread::sleep(step_time);
            let preview = Self::preview(step);
            if observer.on_step(StepEvent {
                step,
                total,
                preview: Some(&preview),
            }) == ControlFlow::Break(())
            {
                return Err(EngineError::Interrupted);
            }
        }
        let (width, height) = output_size(params, references)?;
        let pixels = Self::color_of(params.seed).repeat((width * height) as usize);
        Ok(GeneratedImage {
            image: RgbImage {
                width,
                height,
                pixels,
            },
            applied: AppliedSettings {
                num_inference_steps: total,
                guidance: params.guidance_scale,
                prompt: prompt.to_string(),
                notes: vec![
                    "scripted test engine".to_string(),
                    format!("{} reference image(s)", references.len()),
                ],
            },
        })
    }
}
