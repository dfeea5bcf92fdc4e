//! [`ModelEngine`]: a loaded checkpoint of any family and its configuration, behind kiln-core's
//! [`Engine`] trait. It turns a request's parameters into a [`PipelineRequest`]: the output
//! size (an edit's may come from its first reference image), the deployment's defaults, and
//! each route's own options ([`RouteOptions`]); then runs the one generation path.

use crate::error::{Error, Result};
use crate::flux1::Flux1;
use crate::flux2::Flux2;
use crate::options::{DeviceSpec, EngineOptions, LoadProgress, Precision};
use crate::pipeline::{Expanded, Family, Pipeline, PipelineRequest, RequestDefaults};
use crate::sampling::check_stop;
use kiln_core::catalog::{SideBounds, FLUX2_SIDES};
use kiln_core::engine::{Engine, EngineError, GeneratedImage, RgbImage, StepObserver};
use kiln_core::params::{GenerationParams, ImageSize, OutputSize, RouteOptions};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The operator's configuration of a model (a `[models."<route>"]` table).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A checkpoint directory in any layout its family reads (see [`crate::CheckpointFiles`]
    /// and the FLUX.2 module).
    pub checkpoint: PathBuf,
    /// `cpu` (the default), `cuda` or `cuda:N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceSpec>,
    /// `f32`, `bf16` or `f16`; by default bf16 on CUDA and on a CPU whose bf16 products beat
    /// its f32 ones (AMX tiles; AVX512-BF16 on AMD), f32 on other CPUs (bf16 there needs
    /// AVX512-BF16, and is refused without it).
    #[serde(default)]
    pub precision: Option<Precision>,
    /// Default steps when a request gives none (else the checkpoint's).
    #[serde(default)]
    pub steps: Option<u32>,
    /// Default guidance when a request gives none (else the checkpoint's).
    #[serde(default)]
    pub guidance: Option<f32>,
    /// Text sequence length (else the checkpoint's: 512 for FLUX.1 dev and FLUX.2, 256 for
    /// schnell).
    #[serde(default)]
    pub max_sequence_length: Option<usize>,
    /// A preview every this many steps; 0 for none (else 4 for FLUX.1, 1 for FLUX.2).
    #[serde(default)]
    pub preview_interval: Option<u32>,
    /// FLUX 1.1 [pro]'s route only: what a request's `raw: true` does. Without it, raw
    /// requests run as usual, with a note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawModeConfig>,
    /// FLUX.2 [flex]'s routes only: whether a request's `enable_prompt_expansion` (on by
    /// default in that schema) is honoured. Expansion has the text encoder write up to 512
    /// tokens before the image, which a deployment of a large text encoder on CPU may not
    /// want to pay; off, the result's notes say the prompt was used as given. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_expansion: Option<bool>,
}

impl ModelConfig {
    /// A checkpoint with every setting at its default.
    pub fn new(checkpoint: impl Into<PathBuf>) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            device: None,
            precision: None,
            steps: None,
            guidance: None,
            max_sequence_length: None,
            preview_interval: None,
            raw: None,
            prompt_expansion: None,
        }
    }

    /// The device the checkpoint runs on.
    pub fn device(&self) -> DeviceSpec {
        self.device.unwrap_or_default()
    }

    /// The same checkpoint and settings, on `device`.
    pub fn on(self, device: DeviceSpec) -> Self {
        Self {
            device: Some(device),
            ..self
        }
    }

    /// Whether this machine can run the configured precision on the configured device
    /// ([`EngineOptions::check`]).
    pub fn check_precision(&self) -> std::result::Result<(), String> {
        self.options().check()
    }

    fn options(&self) -> EngineOptions {
        EngineOptions {
            device: self.device(),
            precision: self.precision,
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

impl RawModeConfig {
    /// What raw mode changes, for the result's notes.
    fn notes(&self) -> Vec<String> {
        let mut what = vec![];
        if let Some(c) = &self.checkpoint {
            what.push(format!("checkpoint {}", crate::checkpoint_name(c)));
        }
        if let Some(s) = self.steps {
            what.push(format!("steps {s}"));
        }
        if let Some(g) = self.guidance {
            what.push(format!("guidance {g}"));
        }
        let mut notes = vec![format!(
            "raw mode: {}",
            if what.is_empty() {
                "no changes configured".into()
            } else {
                what.join(", ")
            }
        )];
        notes.extend(self.description.iter().map(|d| format!("raw mode: {d}")));
        notes
    }
}

/// A FLUX.1 checkpoint served to the worker.
pub type Flux1Engine = ModelEngine<Flux1>;
/// A FLUX.2 checkpoint served to the worker.
pub type Flux2Engine = ModelEngine<Flux2>;

/// A loaded checkpoint of family `F` (and raw mode's, where configured) and its configuration.
pub struct ModelEngine<F: Family> {
    config: ModelConfig,
    main: Pipeline<F>,
    raw: Option<Pipeline<F>>,
}

impl<F: Family> ModelEngine<F> {
    /// Loads the configured checkpoint(s); they stay resident for every later generation.
    pub fn load(config: ModelConfig, progress: &mut dyn FnMut(LoadProgress)) -> Result<Self> {
        let options = config.options();
        let main = Pipeline::load(&config.checkpoint, &options, progress)?;
        let raw = match config.raw.as_ref().and_then(|r| r.checkpoint.as_ref()) {
            Some(dir) => Some(Pipeline::load(dir, &options, progress)?),
            None => None,
        };
        Ok(Self { config, main, raw })
    }

    pub fn pipeline(&self) -> &Pipeline<F> {
        &self.main
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn defaults(&self) -> RequestDefaults {
        RequestDefaults {
            steps: self.config.steps,
            guidance: self.config.guidance,
            max_sequence_length: self.config.max_sequence_length,
            preview_interval: self.config.preview_interval.unwrap_or(F::PREVIEW_INTERVAL),
        }
    }

    fn generate_inner(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<GeneratedImage> {
        let mut notes = Vec::new();
        let size = self.output_size(params.size, references.first(), &mut notes)?;
        let mut defaults = self.defaults();
        let (pipeline, expand) = match params.options {
            RouteOptions::Flux11Pro { raw } => {
                (self.raw_mode(raw, &mut defaults, &mut notes), false)
            }
            RouteOptions::Flux2Flex {
                enable_prompt_expansion,
            } => (&self.main, enable_prompt_expansion),
        };
        let mut request = PipelineRequest::from_params(params, size, &defaults);
        if expand {
            self.expand(&mut request, observer, &mut notes)?;
        }
        let out = pipeline.run(&request, references, observer)?;
        let mut applied = out.applied;
        applied.notes.extend(notes);
        Ok(GeneratedImage {
            image: out.image,
            applied,
        })
    }

    /// The pipeline a request runs on, raw mode's settings applied to `defaults` where asked
    /// for and configured.
    fn raw_mode(
        &self,
        raw: bool,
        defaults: &mut RequestDefaults,
        notes: &mut Vec<String>,
    ) -> &Pipeline<F> {
        match (&self.config.raw, raw) {
            (_, false) => &self.main,
            (None, true) => {
                notes.push("raw mode requested; this model's configuration defines none, generated as usual".into());
                &self.main
            }
            (Some(r), true) => {
                defaults.steps = r.steps.or(defaults.steps);
                defaults.guidance = r.guidance.or(defaults.guidance);
                notes.extend(r.notes());
                self.raw.as_ref().unwrap_or(&self.main)
            }
        }
    }

    /// The prompt rewritten by the text encoder where the deployment allows it and the
    /// checkpoint can; the notes say which, and keep the original.
    fn expand(
        &self,
        request: &mut PipelineRequest,
        observer: &mut dyn StepObserver,
        notes: &mut Vec<String>,
    ) -> Result<()> {
        if self.config.prompt_expansion == Some(false) {
            notes.push("prompt expansion is turned off in this deployment's configuration (prompt_expansion = false); the prompt was used as given".into());
            return Ok(());
        }
        check_stop(observer)?;
        let expanded =
            self.main
                .model()
                .expand_prompt(&request.prompt, request.seed, &mut || {
                    observer.stop_requested()
                })?;
        match expanded {
            Expanded::Text(e) if !e.text.trim().is_empty() => {
                notes.push(format!(
                    "prompt expanded by the text encoder ({} tokens, temperature {}); the original: {}",
                    e.tokens.len(),
                    crate::flux2::EXPANSION_TEMPERATURE,
                    request.prompt
                ));
                request.prompt = e.text.trim().to_string();
            }
            Expanded::Text(_) => {
                notes.push("prompt expansion wrote nothing; the prompt was used as given".into())
            }
            Expanded::Unavailable(why) => notes.push(format!(
                "prompt expansion is not available: {why}; the prompt was used as given"
            )),
        }
        Ok(())
    }

    /// The size to generate: the request's, or (`image_size: "auto"`) the first reference's,
    /// as the family prepares it, kept within the sizes of the route that offers "auto" (the
    /// FLUX.2 [flex] edit route).
    fn output_size(
        &self,
        size: OutputSize,
        first: Option<&RgbImage>,
        notes: &mut Vec<String>,
    ) -> Result<ImageSize> {
        let first = match (size, first) {
            (OutputSize::Pixels(size), _) => return Ok(size),
            (OutputSize::FirstReference, Some(first)) => first,
            (OutputSize::FirstReference, None) => {
                return Err(Error::InvalidRequest(
                    "the image size comes from the first reference image, and none was given"
                        .into(),
                ))
            }
        };
        let size = self.main.reference_size(first)?;
        notes.push(format!(
            "image size {}x{} from the first reference image",
            size.width, size.height
        ));
        // A reference may be any shape (4096x16 is under a megapixel); the result keeps to
        // what the route accepts as an explicit size.
        let bounds = SideBounds {
            step: self.main.size_multiple(),
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
}

impl<F: Family> Engine for ModelEngine<F> {
    fn describe(&self) -> String {
        match &self.raw {
            Some(raw) => format!("{}; raw mode: {}", self.main.describe(), raw.describe()),
            None => self.main.describe(),
        }
    }

    /// Text-to-image, or an edit conditioned on `references` (the `image_urls` of the
    /// `flux-2/flex/edit` route, fetched and decoded by the worker) where the family takes
    /// them.
    fn generate(
        &self,
        params: &GenerationParams,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> std::result::Result<GeneratedImage, EngineError> {
        Ok(self.generate_inner(params, references, observer)?)
    }

    /// At the size the request is generated at; raw mode's checkpoint is of the same family and
    /// loaded for the same device, and sized alike. `None` when the size cannot be had (the
    /// generation then fails on its own, without a reservation).
    fn job_memory(&self, params: &GenerationParams, references: &[RgbImage]) -> Option<u64> {
        let size = self
            .output_size(params.size, references.first(), &mut Vec::new())
            .ok()?;
        Some(self.main.job_memory(size.width, size.height, references))
    }
}
