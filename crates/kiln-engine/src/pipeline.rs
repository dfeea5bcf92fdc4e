//! The one generation path: a [`Family`] says what its models do, and [`Pipeline`] runs every
//! family's generation the same way: guidance plan -> prompt encoding -> initial latents ->
//! denoise with the observer -> decode -> the settings that were applied.
//!
//! What differs between FLUX.1 and FLUX.2 (text encoders, latent layout, schedule shift,
//! reference images, how the VAE reads latents) sits behind the trait; what they share (step
//! and size checks, classifier-free guidance, the Euler loop, previews, upscaling, the notes
//! a result carries) is written here once.

use crate::checkpoint::{CheckpointSettings, Layout};
use crate::error::{Error, Result};
use crate::image_io::{preview, to_rgb};
use crate::memory::{self, JobSize, MemoryShape};
use crate::options::{EngineOptions, LoadProgress, SamplingDefaults};
use crate::sampling;
use candle_core::{DType, Device, Tensor};
use kiln_core::engine::{AppliedSettings, RgbImage, StepObserver};
use kiln_core::params::{GenerationParams, ImageSize};
use std::collections::HashMap;
use std::path::Path;

use crate::options::Products;
pub use crate::options::Runtime;

/// What a family's loader found about the checkpoint, for descriptions and defaults.
#[derive(Debug, Clone)]
pub struct CheckpointInfo {
    /// What clients are told the checkpoint is called (never its path).
    pub name: String,
    pub layout: Layout,
    /// How the transformer's weights are stored where that is worth saying ("GGUF Q8_0
    /// transformer"); `None` for the layout's usual safetensors.
    pub transformer_weights: Option<String>,
    pub settings: CheckpointSettings,
}

/// A latent image's grid, before 2x2 patching: `h x w` latent pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentGrid {
    pub h: usize,
    pub w: usize,
}

impl LatentGrid {
    /// Image tokens: one per 2x2 patch.
    pub fn tokens(self) -> usize {
        (self.h / 2) * (self.w / 2)
    }
}

/// A prompt expansion's outcome: the rewrite, or why the family cannot write one.
#[derive(Debug, Clone, PartialEq)]
pub enum Expanded {
    Text(Expansion),
    /// The reason, to complete "prompt expansion is not available: ...".
    Unavailable(String),
}

/// A prompt rewritten by the text encoder's own language model.
#[derive(Debug, Clone, PartialEq)]
pub struct Expansion {
    /// The new tokens, the stop token included where one was written.
    pub tokens: Vec<u32>,
    /// The tokens as text, special tokens left out.
    pub text: String,
}

/// What a model family supplies to the one generation path. Each method is one of the
/// path's stages; the path itself (`Pipeline::run`) never asks which family it runs.
pub trait Family: Sized + Send + Sync + 'static {
    /// The family's name in messages: "FLUX.1", "FLUX.2".
    const NAME: &'static str;
    /// A preview every this many steps unless the operator says otherwise.
    const PREVIEW_INTERVAL: u32;
    /// Whether the family conditions on reference images.
    const TAKES_REFERENCES: bool;
    /// A prompt's encoding, as the transformer reads it.
    type Text;
    /// What every step conditions on besides the prompt: position tables, reference tokens.
    type Conditioning;

    /// Loads the checkpoint in `dir` (any layout the family reads) onto `rt`.
    fn load(
        dir: &Path,
        rt: &Runtime,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<(Self, CheckpointInfo)>;
    /// The variant, e.g. "FLUX.1 dev" or "FLUX.2 klein (distilled)".
    fn kind(&self) -> String;
    /// The variant's defaults (the checkpoint's own `steps` setting is applied on top).
    fn defaults(&self) -> SamplingDefaults;
    /// Whether the transformer takes guidance as an input (a guidance embedding).
    fn embeds_guidance(&self) -> bool;
    /// Why a request's guidance is ignored by a checkpoint that takes none, to complete
    /// "guidance ignored: ...".
    fn ignores_guidance_because(&self) -> &'static str;
    /// The longest prompt encoding, in tokens.
    fn max_text_tokens(&self) -> usize;
    /// Encodes a prompt to `max_len` tokens (checked against [`Self::max_text_tokens`]).
    fn encode_prompt(&self, prompt: &str, max_len: usize) -> Result<Self::Text>;
    /// Pixels per latent pixel.
    fn vae_scale(&self) -> usize;
    /// The widths that size a generation's working memory ([`crate::memory`]).
    fn memory_shape(&self) -> MemoryShape;
    /// Channels of a packed latent token (the transformer's input width).
    fn packed_channels(&self) -> usize;
    /// Seeded standard-normal noise, packed `(1, tokens, packed_channels)`, f32 on the CPU.
    fn noise(&self, seed: u64, grid: LatentGrid) -> Result<Tensor>;
    /// Given initial latents in the layout the family's reference pipeline takes them, packed.
    fn pack_given(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(latents.clone())
    }
    /// The `steps + 1` noise levels for `tokens` image tokens; a note says how they shift.
    fn sigmas(&self, steps: usize, tokens: usize, notes: &mut Vec<String>) -> Vec<f32>;
    /// What the steps condition on besides the prompt, reference images included (the path
    /// refuses those before it gets here when [`Self::TAKES_REFERENCES`] is false).
    fn condition(
        &self,
        rt: &Runtime,
        text: &Self::Text,
        grid: LatentGrid,
        references: &[RgbImage],
        notes: &mut Vec<String>,
    ) -> Result<Self::Conditioning>;
    /// The velocity of packed latents `x` (on the device, compute dtype) at the model's
    /// timestep `t`, with the embedded guidance `guidance`.
    fn velocity(
        &self,
        x: &Tensor,
        t: f32,
        guidance: Option<f32>,
        text: &Self::Text,
        cond: &Self::Conditioning,
    ) -> Result<Tensor>;
    /// Packed latents as the VAE reads them, `(1, C, h, w)` (FLUX.2 undoes its normalisation).
    fn unpack(&self, packed: &Tensor, grid: LatentGrid) -> Result<Tensor>;
    /// The VAE's image of `unpack`'s latents, `(1, 3, H, W)` in [-1, 1].
    fn decode(&self, z: &Tensor) -> Result<Tensor>;
    /// The size an image-conditioned request without one is generated at: the first
    /// reference's, as the family prepares it.
    fn reference_size(&self, _first: &RgbImage) -> Result<ImageSize> {
        Err(no_references::<Self>())
    }
    /// The text encoder's rewrite of a prompt, sampled from `seed`.
    fn expand_prompt(
        &self,
        _prompt: &str,
        _seed: u64,
        _should_stop: &mut dyn FnMut() -> bool,
    ) -> Result<Expanded> {
        Ok(Expanded::Unavailable(format!(
            "{} has no language model to write one",
            Self::NAME
        )))
    }
}

fn no_references<F: Family>() -> Error {
    Error::InvalidRequest(format!(
        "{} checkpoints cannot take reference images",
        F::NAME
    ))
}

/// One generation, in the pipeline's own terms.
#[derive(Debug, Clone)]
pub struct PipelineRequest {
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: Option<u32>,
    pub guidance: Option<f32>,
    pub seed: u64,
    pub max_sequence_length: Option<usize>,
    /// Initial latents instead of seeded noise (diffusers' `latents=`), in the layout the
    /// family's reference pipeline takes them.
    pub initial_latents: Option<Tensor>,
    /// A preview every this many steps; 0 for none.
    pub preview_interval: u32,
}

impl PipelineRequest {
    /// A worker's request: the parameters at `size` (the engine resolves an edit's
    /// first-reference size), with the model configuration's choices where they leave
    /// something out; seeded noise.
    pub(crate) fn from_params(
        params: &GenerationParams,
        size: ImageSize,
        defaults: &RequestDefaults,
    ) -> Self {
        Self {
            prompt: params.prompt.as_str().to_string(),
            width: size.width,
            height: size.height,
            steps: params.num_inference_steps.or(defaults.steps),
            guidance: params.guidance_scale.or(defaults.guidance),
            seed: u64::from(params.seed),
            max_sequence_length: defaults.max_sequence_length,
            initial_latents: None,
            preview_interval: defaults.preview_interval,
        }
    }
}

/// What a deployment's configuration fills in where a request leaves it out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RequestDefaults {
    pub steps: Option<u32>,
    pub guidance: Option<f32>,
    pub max_sequence_length: Option<usize>,
    pub preview_interval: u32,
}

pub struct PipelineOutput {
    pub image: RgbImage,
    /// The packed latents the VAE decoded, f32 on the CPU.
    pub final_latents: Tensor,
    pub applied: AppliedSettings,
}

/// How a request's guidance is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
struct GuidancePlan {
    /// Fed to the transformer's guidance embedding.
    embedded: Option<f32>,
    /// True classifier-free guidance against the empty prompt at this scale (above 1).
    cfg: Option<f32>,
    /// What the result reports.
    applied: Option<f32>,
}

/// A request checked and resolved against the checkpoint.
struct Plan {
    steps: u32,
    guidance: GuidancePlan,
    max_len: usize,
    /// The size generated at (before any upscaling to the requested size) and its grid.
    generated: (u32, u32),
    grid: LatentGrid,
}

/// A loaded checkpoint of family `F`, resident on its device.
pub struct Pipeline<F: Family> {
    model: F,
    checkpoint: CheckpointInfo,
    rt: Runtime,
}

impl<F: Family> Pipeline<F> {
    /// Loads the checkpoint in `dir`, reporting progress as it goes.
    pub fn load(
        dir: &Path,
        options: &EngineOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let rt = options.runtime()?;
        let (model, checkpoint) = F::load(dir, &rt, progress)?;
        Ok(Self {
            model,
            checkpoint,
            rt,
        })
    }

    /// The family's loaded models, for what only that family does.
    pub fn model(&self) -> &F {
        &self.model
    }

    pub fn checkpoint(&self) -> &CheckpointInfo {
        &self.checkpoint
    }

    /// E.g. "FLUX.1 dev, diffusers layout, GGUF Q8_0 transformer, FLUX.1-dev on cuda:0 (BF16)":
    /// the checkpoint by name, never by path (clients see this in result metadata).
    pub fn describe(&self) -> String {
        let c = &self.checkpoint;
        let layout = match c.layout {
            Layout::Diffusers => "diffusers layout",
            Layout::BflSingleFile => "BFL single files",
        };
        let weights = c
            .transformer_weights
            .as_ref()
            .map(|w| format!(", {w}"))
            .unwrap_or_default();
        let about = c
            .settings
            .description
            .as_ref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        format!(
            "{}, {layout}{weights}, {} on {} ({}){about}",
            self.model.kind(),
            c.name,
            device_name(&self.rt),
            self.rt.describe()
        )
    }

    /// The defaults a request falls back on: the family's, the checkpoint's steps first.
    pub fn defaults(&self) -> SamplingDefaults {
        let family = self.model.defaults();
        SamplingDefaults {
            steps: self.checkpoint.settings.steps.unwrap_or(family.steps),
            ..family
        }
    }

    /// Image sides must be multiples of this.
    pub fn size_multiple(&self) -> u32 {
        (self.model.vae_scale() * 2) as u32
    }

    /// The size a `width x height` request is generated at: itself, or for a checkpoint with
    /// a `max_pixels` setting and a larger request, the size of at most `max_pixels` (and at
    /// least half that, where possible) whose aspect ratio is closest to the request's.
    pub fn generation_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.checkpoint.settings.max_pixels {
            Some(max) if width as u64 * height as u64 > max as u64 => {
                fit_area(width, height, max, self.size_multiple())
            }
            _ => (width, height),
        }
    }

    /// About the memory a generation of `width x height` with `references` (as the engine
    /// receives them, already scaled) holds on the device at its peak beyond the weights
    /// ([`crate::memory`]): at the size it is generated at, with the longest prompt encoding.
    pub fn job_memory(&self, width: u32, height: u32, references: &[RgbImage]) -> u64 {
        let (width, height) = self.generation_size(width, height);
        let patch = self.size_multiple() as u64;
        let tokens = |w: u32, h: u32| (w as u64).div_ceil(patch) * (h as u64).div_ceil(patch);
        let reference_tokens: u64 = references.iter().map(|r| tokens(r.width, r.height)).sum();
        let size = JobSize {
            pixels: width as u64 * height as u64,
            tokens: tokens(width, height) + self.model.max_text_tokens() as u64 + reference_tokens,
            reference_pixels: references
                .iter()
                .map(|r| r.width as u64 * r.height as u64)
                .max()
                .unwrap_or(0),
        };
        memory::job_bytes(&self.model.memory_shape(), &self.rt, size)
    }

    /// The size an edit without one is generated at (see [`Family::reference_size`]).
    pub fn reference_size(&self, first: &RgbImage) -> Result<ImageSize> {
        self.model.reference_size(first)
    }

    /// A prompt's encoding at `max_sequence_length` tokens.
    pub fn encode_prompt(&self, prompt: &str, max_sequence_length: usize) -> Result<F::Text> {
        let max = self.model.max_text_tokens();
        if max_sequence_length == 0 || max_sequence_length > max {
            return Err(Error::InvalidRequest(format!(
                "max_sequence_length must be between 1 and {max} (got {max_sequence_length})"
            )));
        }
        self.model.encode_prompt(prompt, max_sequence_length)
    }

    /// The transformer's velocity for packed latents at noise level `sigma`, text-to-image.
    pub fn velocity(
        &self,
        latents: &Tensor,
        sigma: f32,
        guidance: Option<f32>,
        text: &F::Text,
        width: u32,
        height: u32,
    ) -> Result<Tensor> {
        let grid = self.latent_grid(width, height)?;
        let cond = self
            .model
            .condition(&self.rt, text, grid, &[], &mut Vec::new())?;
        self.velocity_with(latents, sigma, guidance, text, &cond)
    }

    /// The model's timestep and guidance rounded through the compute dtype as diffusers
    /// rounds them, then the family's velocity.
    fn velocity_with(
        &self,
        latents: &Tensor,
        sigma: f32,
        guidance: Option<f32>,
        text: &F::Text,
        cond: &F::Conditioning,
    ) -> Result<Tensor> {
        let g = guidance.map(|g| sampling::model_guidance(g, self.rt.dtype));
        let t = sampling::model_timestep(sigma, self.rt.dtype);
        self.model
            .velocity(&self.rt.put(latents)?, t, g, text, cond)
    }

    /// Packed latents as diffusers' `output_type="latent"` returns them, `(1, C, h, w)` f32 on
    /// the CPU.
    pub fn unpack_latents(&self, packed: &Tensor, width: u32, height: u32) -> Result<Tensor> {
        let grid = self.latent_grid(width, height)?;
        let z = self.model.unpack(&self.rt.put(packed)?, grid)?;
        Ok(z.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }

    /// Decodes packed latents to an image of `width x height`.
    pub fn decode(&self, packed: &Tensor, width: u32, height: u32) -> Result<RgbImage> {
        to_rgb(&self.decode_tensor(packed, self.latent_grid(width, height)?)?)
    }

    fn decode_tensor(&self, packed: &Tensor, grid: LatentGrid) -> Result<Tensor> {
        let z = self.model.unpack(&self.rt.put(packed)?, grid)?;
        self.model.decode(&z)
    }

    /// The latent grid for an image, or why the size is unusable.
    fn latent_grid(&self, width: u32, height: u32) -> Result<LatentGrid> {
        let (h, w) = sampling::checked_latent_grid(width, height, self.model.vae_scale())?;
        Ok(LatentGrid { h, w })
    }

    /// Runs a whole generation, conditioned on `references` where the family takes them
    /// (editing).
    pub fn run(
        &self,
        req: &PipelineRequest,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<PipelineOutput> {
        if !references.is_empty() && !F::TAKES_REFERENCES {
            return Err(no_references::<F>());
        }
        let mut notes: Vec<String> = self
            .checkpoint
            .settings
            .description
            .iter()
            .cloned()
            .collect();
        notes.push(format!("seed {}", req.seed));
        let plan = self.plan(req, &mut notes)?;
        let latents = self.sample(req, &plan, references, observer, &mut notes)?;
        sampling::check_stop(observer)?;
        let mut image = self.decode_tensor(&latents, plan.grid)?;
        if plan.generated != (req.width, req.height) {
            image = image.upsample_bilinear2d(req.height as usize, req.width as usize, false)?;
        }
        Ok(PipelineOutput {
            image: to_rgb(&image)?,
            final_latents: latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            applied: AppliedSettings {
                num_inference_steps: plan.steps,
                guidance: plan.guidance.applied,
                prompt: req.prompt.clone(),
                notes,
            },
        })
    }

    /// Steps, guidance, text length and sizes for a request, or why it cannot run.
    fn plan(&self, req: &PipelineRequest, notes: &mut Vec<String>) -> Result<Plan> {
        let defaults = self.defaults();
        let steps = sampling::checked_steps(req.steps, defaults.steps)?;
        let guidance = self.guidance_plan(req.guidance, &defaults, notes);
        let max_len = req
            .max_sequence_length
            .unwrap_or(defaults.max_sequence_length);
        notes.push(format!("max_sequence_length {max_len}"));
        // The requested size is checked even when another is generated.
        self.latent_grid(req.width, req.height)?;
        let generated = self.generation_size(req.width, req.height);
        if generated != (req.width, req.height) {
            notes.push(format!(
                "generated at {}x{} (this checkpoint's maximum is {} pixels), upscaled to {}x{}",
                generated.0,
                generated.1,
                self.checkpoint.settings.max_pixels.unwrap_or_default(),
                req.width,
                req.height
            ));
        }
        Ok(Plan {
            steps,
            guidance,
            max_len,
            generated,
            grid: self.latent_grid(generated.0, generated.1)?,
        })
    }

    /// How guidance is applied: through the guidance embedding where the transformer has one
    /// (and, for a checkpoint whose settings ask for it, true classifier-free guidance at the
    /// configured scale too); else as true classifier-free guidance at the requested scale
    /// where the checkpoint is guided at all; else not, with a note when one was asked for.
    fn guidance_plan(
        &self,
        requested: Option<f32>,
        defaults: &SamplingDefaults,
        notes: &mut Vec<String>,
    ) -> GuidancePlan {
        let true_cfg = self.checkpoint.settings.true_cfg_scale;
        let (embedded, cfg) = if self.model.embeds_guidance() {
            (requested.or(defaults.guidance), true_cfg)
        } else if let Some(scale) = true_cfg.or(defaults.guidance) {
            (None, Some(requested.unwrap_or(scale)))
        } else {
            if requested.is_some() {
                let why = self.model.ignores_guidance_because();
                notes.push(format!("guidance ignored: {why}"));
            }
            (None, None)
        };
        GuidancePlan {
            embedded,
            // As diffusers: a scale of 1 or less is no guidance at all.
            cfg: cfg.filter(|s| *s > 1.0),
            applied: embedded.or(cfg),
        }
    }

    /// Encodes the prompt (and the empty prompt it is guided against), draws or takes the
    /// initial latents and runs the Euler loop with previews.
    fn sample(
        &self,
        req: &PipelineRequest,
        plan: &Plan,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
        notes: &mut Vec<String>,
    ) -> Result<Tensor> {
        sampling::check_stop(observer)?;
        let text = self.encode_prompt(&req.prompt, plan.max_len)?;
        let unconditional = match plan.guidance.cfg {
            Some(s) => {
                notes.push(format!(
                    "true classifier-free guidance {s} against the empty prompt"
                ));
                sampling::check_stop(observer)?;
                Some((self.encode_prompt("", plan.max_len)?, s))
            }
            None => None,
        };
        let latents = self.initial_latents(req, plan, notes)?;
        let sigmas = self
            .model
            .sigmas(plan.steps as usize, plan.grid.tokens(), notes);
        sampling::check_stop(observer)?;
        let cond = self
            .model
            .condition(&self.rt, &text, plan.grid, references, notes)?;
        sampling::check_stop(observer)?;
        let embedded = plan.guidance.embedded;
        sampling::denoise(
            latents,
            &sigmas,
            req.preview_interval,
            observer,
            &mut |x, sigma| {
                let v = self.velocity_with(x, sigma, embedded, &text, &cond)?;
                match &unconditional {
                    Some((empty, s)) => {
                        let vn = self.velocity_with(x, sigma, embedded, empty, &cond)?;
                        sampling::guided(&v, &vn, *s)
                    }
                    None => Ok(v),
                }
            },
            &|x0| preview(&self.model.unpack(x0, plan.grid)?),
        )
    }

    /// The request's initial latents, checked against the grid, or seeded noise.
    fn initial_latents(
        &self,
        req: &PipelineRequest,
        plan: &Plan,
        notes: &mut Vec<String>,
    ) -> Result<Tensor> {
        let Some(given) = &req.initial_latents else {
            return self.rt.put(&self.model.noise(req.seed, plan.grid)?);
        };
        let packed = self.model.pack_given(given)?;
        let (tokens, channels) = (plan.grid.tokens(), self.model.packed_channels());
        if packed.dims() != [1, tokens, channels] {
            return Err(Error::InvalidRequest(format!(
                "initial latents have shape {:?}; {}x{} needs [1, {tokens}, {channels}]",
                given.dims(),
                plan.generated.0,
                plan.generated.1
            )));
        }
        notes.push("initial latents given".into());
        self.rt.put(&packed)
    }
}

/// The multiple-of-`m` size of at most `max` pixels (and at least half, where one exists)
/// whose aspect ratio is closest to `width / height`; the larger of equally close ones.
fn fit_area(width: u32, height: u32, max: u32, m: u32) -> (u32, u32) {
    let aspect = (width as f64 / height as f64).ln();
    let mut all = Vec::new();
    for h in (m..=max / m).step_by(m as usize) {
        for w in (m..=max / h).step_by(m as usize) {
            all.push((w, h));
        }
    }
    let large: Vec<(u32, u32)> = all
        .iter()
        .copied()
        .filter(|&(w, h)| 2 * w * h >= max)
        .collect();
    let pool = if large.is_empty() { &all } else { &large };
    let error = |&(w, h): &(u32, u32)| ((w as f64 / h as f64).ln() - aspect).abs();
    pool.iter()
        .copied()
        .min_by(|a, b| {
            error(a)
                .total_cmp(&error(b))
                .then((b.0 * b.1).cmp(&(a.0 * a.1)))
        })
        .unwrap_or((m, m))
}

/// "cpu" with what runs its f32 matrix products (bf16 ones are in [`Runtime::describe`]), or
/// the accelerator's location (e.g. "Cuda { gpu_id: 0 }").
fn device_name(rt: &Runtime) -> String {
    match (&rt.device, rt.products) {
        (Device::Cpu, Products::Native) => {
            format!("cpu, matrix products by {}", kiln_kernels::gemm::describe())
        }
        (Device::Cpu, Products::CpuBf16) => "cpu".into(),
        (d, _) => format!("{:?}", d.location()),
    }
}

/// Reads packed latents saved as the safetensors tensor `latents` (f32, on the CPU).
pub fn read_latents(path: &Path) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::checkpoint(path, format!("cannot read latents: {e}")))?;
    let t = tensors
        .remove("latents")
        .ok_or_else(|| Error::checkpoint(path, "no tensor named `latents`"))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// Writes packed latents as the safetensors tensor `latents` (f32).
pub fn write_latents(path: &Path, latents: &Tensor) -> Result<()> {
    let t = latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("latents", t)]), path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fit_area;

    #[test]
    fn fit_area_keeps_the_aspect_ratio_within_the_area() {
        // The demo checkpoint's 64x64 pixels, for each preset's aspect ratio.
        assert_eq!(fit_area(1024, 1024, 4096, 16), (64, 64));
        assert_eq!(fit_area(1024, 768, 4096, 16), (64, 48));
        assert_eq!(fit_area(768, 1024, 4096, 16), (48, 64));
        assert_eq!(fit_area(1024, 576, 4096, 16), (80, 48));
        assert_eq!(fit_area(576, 1024, 4096, 16), (48, 80));
        // Not a tiny exact ratio (48x32) when a size of at least half the area comes close.
        assert_eq!(fit_area(1440, 960, 4096, 16), (80, 48));
        // An area too small for the half-area rule still gives a size.
        assert_eq!(fit_area(1440, 256, 256, 16), (16, 16));
    }
}
