//! [`Flux2Engine`]: a loaded FLUX.2 pipeline (dev or klein) and its configuration, behind kiln-core's
//! [`Engine`] trait (what serves the `blackforestlabs/flux-2/flex/text-to-image` route).

use super::lm::TokenChoice;
use super::pipeline::{Flux2Pipeline, EXPANSION_MAX_NEW_TOKENS, EXPANSION_TEMPERATURE};
use crate::error::{Error, Result};
use crate::pipeline::{DeviceSpec, EngineOptions, LoadProgress, PipelineRequest, Precision};
use kiln_core::catalog::{SideBounds, FLUX2_SIDES};
use kiln_core::engine::{Engine, EngineError, GeneratedImage, RgbImage, StepObserver};
use kiln_core::params::{GenerationParams, ImageSize, OutputSize};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The operator's configuration of a FLUX.2 model.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Flux2Config {
    /// A diffusers FLUX.2 folder (`model_index.json` naming `Flux2Pipeline` for dev or
    /// `Flux2KleinPipeline`), or BFL's single files beside the text encoder's and tokenizer's
    /// folders.
    pub checkpoint: PathBuf,
    /// `cpu` (default), `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// `f32`, `bf16` or `f16`; by default f32 on the CPU and bf16 on CUDA.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// Default steps when a request gives none (else 4 for distilled klein, 50 otherwise).
    #[serde(default)]
    pub steps: Option<u32>,
    /// Default guidance when a request gives none (else 4; distilled klein ignores it).
    #[serde(default)]
    pub guidance: Option<f32>,
    /// Text sequence length (else 512).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// A preview every this many steps; 0 for none.
    #[serde(default = "default_preview_interval")]
    pub preview_interval: u32,
    /// Whether a request's `enable_prompt_expansion` (on by default in the FLUX.2 [flex]
    /// schema) is honoured. Expansion has the text encoder write up to 512 tokens before the
    /// image, which a deployment of a large text encoder on CPU may not want to pay; off, the
    /// result's notes say the prompt was used as given.
    #[serde(default = "default_prompt_expansion")]
    pub prompt_expansion: bool,
}

fn default_preview_interval() -> u32 {
    1
}

fn default_prompt_expansion() -> bool {
    true
}

impl Flux2Config {
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
            prompt_expansion: default_prompt_expansion(),
        }
    }
}

pub struct Flux2Engine {
    config: Flux2Config,
    pipeline: Flux2Pipeline,
}

impl Flux2Engine {
    /// Loads the configured checkpoint; it stays resident for every later generation.
    pub fn load(config: Flux2Config, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        let options = EngineOptions {
            device: config.device,
            precision: config.precision,
        };
        let pipeline = Flux2Pipeline::load(&config.checkpoint, &options, progress)?;
        Ok(Self { config, pipeline })
    }

    pub fn pipeline(&self) -> &Flux2Pipeline {
        &self.pipeline
    }

    pub fn config(&self) -> &Flux2Config {
        &self.config
    }

    /// The size to generate: the request's, or (`image_size: "auto"`) the first reference's,
    /// as the pipeline encodes it, kept within the route's sizes.
    fn output_size(
        &self,
        size: OutputSize,
        first: Option<&RgbImage>,
        notes: &mut Vec<String>,
    ) -> Result<ImageSize> {
        match (size, first) {
            (OutputSize::Pixels(size), _) => Ok(size),
            (OutputSize::FirstReference, Some(first)) => {
                let size = self.pipeline.reference_size(first)?;
                notes.push(format!(
                    "image size {}x{} from the first reference image",
                    size.width, size.height
                ));
                // A reference may be any shape (4096x16 is under a megapixel); the result
                // keeps to what the route accepts as an explicit size.
                let bounds = SideBounds {
                    step: self.pipeline.size_multiple(),
                    ..FLUX2_SIDES
                };
                let (width, height) = bounds.fit(size.width, size.height);
                if (width, height) != (size.width, size.height) {
                    notes.push(format!(
                        "brought to {width}x{height}, within the route's sizes (sides {} to {}, at most {} pixels)",
                        FLUX2_SIDES.min, FLUX2_SIDES.max, FLUX2_SIDES.max_pixels
                    ));
                }
                Ok(ImageSize { width, height })
            }
            (OutputSize::FirstReference, None) => Err(Error::InvalidRequest(
                "the image size comes from the first reference image, and none was given".into(),
            )),
        }
    }

    fn generate_inner(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<GeneratedImage> {
        let mut notes = Vec::new();
        if params.raw {
            notes.push("raw mode is a FLUX 1.1 [pro] option; FLUX.2 ignores it".into());
        }
        let size = self.output_size(params.size, references.first(), &mut notes)?;
        let mut request = PipelineRequest::from_params(
            params,
            size,
            self.config.steps,
            self.config.guidance,
            self.config.max_sequence_length,
            self.config.preview_interval,
        );
        if params.enable_prompt_expansion && !self.config.prompt_expansion {
            notes.push(
                "prompt expansion is turned off in this deployment's configuration (prompt_expansion = false); the prompt was used as given"
                    .into(),
            );
        } else if params.enable_prompt_expansion {
            let choice = TokenChoice::Sampled {
                temperature: EXPANSION_TEMPERATURE,
                seed: u64::from(params.seed),
            };
            let expansion = self.pipeline.expand_prompt(
                &request.prompt,
                EXPANSION_MAX_NEW_TOKENS,
                choice,
                &mut || observer.stop_requested(),
            )?;
            match expansion {
                Some(e) if !e.text.trim().is_empty() => {
                    notes.push(format!(
                        "prompt expanded by the text encoder ({} tokens, temperature {EXPANSION_TEMPERATURE}); the original: {}",
                        e.tokens.len(),
                        request.prompt
                    ));
                    request.prompt = e.text.trim().to_string();
                }
                Some(_) => notes.push(
                    "prompt expansion wrote nothing; the prompt was used as given".into(),
                ),
                None => notes.push(
                    "prompt expansion is not available: this checkpoint's text encoder has no language-model head; the prompt was used as given"
                        .into(),
                ),
            }
        }
        let out = self
            .pipeline
            .run_with_references(&request, references, observer)?;
        let mut applied = out.applied;
        applied.notes.extend(notes);
        Ok(GeneratedImage {
            image: out.image,
            applied,
        })
    }
}

impl Engine for Flux2Engine {
    fn describe(&self) -> String {
        self.pipeline.describe()
    }

    /// Text-to-image, or an edit conditioned on `references` (the `image_urls` of the
    /// `flux-2/flex/edit` route, fetched and decoded by the worker).
    fn generate(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> std::result::Result<GeneratedImage, EngineError> {
        Ok(self.generate_inner(params, references, observer)?)
    }
}
