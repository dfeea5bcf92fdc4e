//! [`Flux1Engine`]: a loaded FLUX.1 pipeline and its configuration, behind kiln-core's
//! [`Engine`] trait (the `blackforestlabs/flux-1-1-pro/text-to-image` route).

use crate::error::{Error, Result};
use crate::pipeline::{
    DeviceSpec, EngineOptions, Flux1Pipeline, LoadProgress, PipelineRequest, Precision,
};
use kiln_core::engine::{Engine, EngineError, GeneratedImage, RgbImage, StepObserver};
use kiln_core::params::{GenerationParams, OutputSize};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The operator's configuration of a FLUX.1 model.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Flux1Config {
    /// A diffusers folder or a folder of BFL single files (see [`crate::CheckpointFiles`]).
    pub checkpoint: PathBuf,
    /// `cpu` (default), `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// `f32`, `bf16` or `f16`; by default f32 on the CPU and bf16 on CUDA.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// Default steps when a request gives none (else 28 for dev, 4 for schnell).
    #[serde(default)]
    pub steps: Option<u32>,
    /// Default guidance when a request gives none (else 3.5 for dev).
    #[serde(default)]
    pub guidance: Option<f32>,
    /// T5 sequence length (else 512 for dev, 256 for schnell).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// A preview every this many steps; 0 for none.
    #[serde(default = "default_preview_interval")]
    pub preview_interval: u32,
    /// What a request's `raw: true` does. Without it, raw requests run as usual, with a note.
    #[serde(default)]
    pub raw: Option<RawModeConfig>,
}

fn default_preview_interval() -> u32 {
    4
}

impl Flux1Config {
    /// A checkpoint with every setting at its default.
    pub fn new(checkpoint: impl Into<PathBuf>) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            device: DeviceSpec::default(),
            precision: None,
            steps: None,
            guidance: None,
            max_sequence_length: None,
            preview_interval: default_preview_interval(),
            raw: None,
        }
    }
}

/// Raw mode ("less processed, more natural images" on the hosted API) as this deployment
/// defines it: another checkpoint (a fine-tune) and/or other sampling settings.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawModeConfig {
    /// A separate checkpoint for raw requests, loaded and kept resident beside the main one.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub steps: Option<u32>,
    #[serde(default)]
    pub guidance: Option<f32>,
    /// Shown in the result's notes, e.g. where the settings are documented.
    #[serde(default)]
    pub description: Option<String>,
}

pub struct Flux1Engine {
    config: Flux1Config,
    main: Flux1Pipeline,
    raw: Option<Flux1Pipeline>,
}

impl Flux1Engine {
    /// Loads the configured checkpoint(s); they stay resident for every later generation.
    pub fn load(config: Flux1Config, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        let options = EngineOptions {
            device: config.device,
            precision: config.precision,
        };
        let main = Flux1Pipeline::load(&config.checkpoint, &options, progress)?;
        let raw = match config.raw.as_ref().and_then(|r| r.checkpoint.as_ref()) {
            Some(dir) => Some(Flux1Pipeline::load(dir, &options, progress)?),
            None => None,
        };
        Ok(Self { config, main, raw })
    }

    pub fn pipeline(&self) -> &Flux1Pipeline {
        &self.main
    }

    pub fn config(&self) -> &Flux1Config {
        &self.config
    }

    fn generate_inner(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<GeneratedImage> {
        let size = match params.size {
            OutputSize::Pixels(size) if references.is_empty() => size,
            _ => {
                return Err(Error::InvalidRequest(
                    "FLUX.1 checkpoints cannot take reference images".into(),
                ))
            }
        };
        let mut notes = Vec::new();
        let raw = match (&self.config.raw, params.raw) {
            (Some(r), true) => Some(r),
            (None, true) => {
                notes.push("raw mode requested; this model's configuration defines none, generated as usual".into());
                None
            }
            (_, false) => None,
        };
        let pipeline = match (&self.raw, raw) {
            (Some(p), Some(_)) => p,
            _ => &self.main,
        };
        if let Some(r) = raw {
            let mut what = vec![];
            if let Some(c) = &r.checkpoint {
                what.push(format!("checkpoint {}", c.display()));
            }
            if let Some(s) = r.steps {
                what.push(format!("steps {s}"));
            }
            if let Some(g) = r.guidance {
                what.push(format!("guidance {g}"));
            }
            notes.push(format!(
                "raw mode: {}",
                if what.is_empty() {
                    "no changes configured".into()
                } else {
                    what.join(", ")
                }
            ));
            if let Some(d) = &r.description {
                notes.push(format!("raw mode: {d}"));
            }
        }
        if params.enable_prompt_expansion {
            notes.push(
                "prompt expansion is not available for FLUX.1; the prompt was used as given".into(),
            );
        }
        let request = PipelineRequest::from_params(
            params,
            size,
            raw.and_then(|r| r.steps).or(self.config.steps),
            raw.and_then(|r| r.guidance).or(self.config.guidance),
            self.config.max_sequence_length,
            self.config.preview_interval,
        );
        let out = pipeline.run(&request, observer)?;
        let mut applied = out.applied;
        applied.notes.extend(notes);
        Ok(GeneratedImage {
            image: out.image,
            applied,
        })
    }
}

impl Engine for Flux1Engine {
    fn describe(&self) -> String {
        match &self.raw {
            Some(raw) => format!("{}; raw mode: {}", self.main.describe(), raw.describe()),
            None => self.main.describe(),
        }
    }

    fn generate(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> std::result::Result<GeneratedImage, EngineError> {
        Ok(self.generate_inner(params, references, observer)?)
    }
}
