//! The FLUX.2 text-to-image pipelines (diffusers' `Flux2Pipeline` for dev,
//! `Flux2KleinPipeline` for klein): load a checkpoint once, then prompt -> chat template ->
//! stacked hidden states of the text model -> denoise with the transformer on the
//! empirical-mu schedule -> batch-norm denormalisation -> VAE -> RGB.

use super::lm::{stop_tokens, LmConfig, TextModel, TokenChoice};
use super::sampling::{empirical_mu, pack_channels_last};
use super::transformer::{Flux2Transformer, Flux2TransformerConfig};
use super::vae::{Flux2Vae, Flux2VaeConfig};
use crate::checkpoint::{
    bfl_transformer_file, checkpoint_name, diffusers_transformer, model_index, read_json,
    safetensors_files, CheckpointSettings, WeightFormat,
};
use crate::error::{Error, Result};
use crate::image_io::{preview, to_rgb};
use crate::pipeline::{
    device_name, gguf_quantization, EngineOptions, LoadProgress, PipelineOutput, PipelineRequest,
    SamplingDefaults,
};
use crate::sampling::{self, ScheduleConfig};
use crate::tokenizer::PromptTokenizer;
use crate::transformer::Rope;
use crate::vae::groups;
use crate::weights::{NameMap, Weights};
use candle_core::{DType, Device, Tensor};
use kiln_core::engine::{AppliedSettings, RgbImage, StepObserver};
use kiln_core::image_file::{fit_to_area, resize_lanczos};
use kiln_core::params::ImageSize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// klein's Qwen3 layers whose hidden states are stacked (of 36).
const QWEN3_OUT_LAYERS: [usize; 3] = [9, 18, 27];
/// dev's Mistral Small layers whose hidden states are stacked (of 40).
const MISTRAL_OUT_LAYERS: [usize; 3] = [10, 20, 30];
/// The system turn dev's prompts are encoded under (BFL's `flux2/system_messages.py`, as
/// diffusers copies it).
pub const SYSTEM_MESSAGE: &str = "You are an AI that reasons about image descriptions. You give structured responses focusing on object relationships, object\nattribution and actions without speculation.";

/// The system turn under which the text encoder rewrites a prompt for text-to-image
/// (`SYSTEM_MESSAGE_UPSAMPLING_T2I`, BFL's `flux2/system_messages.py` as diffusers copies it).
pub const SYSTEM_MESSAGE_UPSAMPLING_T2I: &str = "You are an expert prompt engineer for FLUX.2 by Black Forest Labs. Rewrite user prompts to be more descriptive while strictly preserving their core subject and intent.\n\nGuidelines:\n1. Structure: Keep structured inputs structured (enhance within fields). Convert natural language to detailed paragraphs.\n2. Details: Add concrete visual specifics - form, scale, textures, materials, lighting (quality, direction, color), shadows, spatial relationships, and environmental context.\n3. Text in Images: Put ALL text in quotation marks, matching the prompt's language. Always provide explicit quoted text for objects that would contain text in reality (signs, labels, screens, etc.) - without it, the model generates gibberish.\n\nOutput only the revised prompt and nothing else.";

/// Prompt expansion as the reference runs it (`Flux2Pipeline.upsample_prompt`).
pub const EXPANSION_TEMPERATURE: f32 = 0.15;
pub const EXPANSION_MAX_NEW_TOKENS: usize = 512;

/// A prompt rewritten by the text encoder's own language model.
#[derive(Debug, Clone, PartialEq)]
pub struct Expansion {
    /// The new tokens, the stop token included where one was written.
    pub tokens: Vec<u32>,
    /// The tokens as text, special tokens left out.
    pub text: String,
}

/// Which FLUX.2, from the pipeline class a checkpoint names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flux2Variant {
    /// 32B, Mistral Small 3.x text encoder, embedded guidance.
    Dev,
    /// 4B / 9B, Qwen3 text encoder; step-distilled or the undistilled base.
    Klein { distilled: bool },
}
/// The longest prompt, in tokens of the chat-framed text.
const MAX_SEQUENCE_LENGTH: usize = 512;

/// A prompt's encoding.
pub struct Flux2PromptEmbeddings {
    /// The chat-framed prompt's token ids, padded to the sequence length.
    pub ids: Vec<u32>,
    /// How many of `ids` are the prompt (the rest is padding, masked in the text encoder).
    pub valid: usize,
    /// `(1, sequence length, layers * hidden)`: the chosen layers' hidden states per token.
    pub embeds: Tensor,
}

/// Reference images as the transformer takes them.
/// Larger reference images are scaled down to this many pixels (diffusers: 1024 * 1024).
pub use kiln_core::image_file::REFERENCE_MAX_PIXELS;

/// A `width x height` reference image's size after scaling down to [`REFERENCE_MAX_PIXELS`] of
/// area (aspect ratio kept, sides floored, as diffusers' `_resize_to_target_area`), and after
/// cutting each side down to a multiple of `multiple`; `None` where a side is then empty.
fn prepared_reference_size(
    width: u32,
    height: u32,
    multiple: u32,
) -> Option<((u32, u32), (u32, u32))> {
    let fit = fit_to_area(width, height, REFERENCE_MAX_PIXELS);
    let cut = (fit.0 / multiple * multiple, fit.1 / multiple * multiple);
    (cut.0 > 0 && cut.1 > 0).then_some((fit, cut))
}

/// `img` resampled to `(width, height)` with a Lanczos filter (PIL's LANCZOS, as diffusers).
fn resize(img: &RgbImage, size: (u32, u32)) -> Result<RgbImage> {
    let buffer =
        image::RgbImage::from_raw(img.width, img.height, img.pixels.clone()).ok_or_else(|| {
            Error::InvalidRequest("a reference image's pixels do not match its size".into())
        })?;
    Ok(resize_lanczos(&buffer, size))
}

struct References {
    /// All images' packed normalised tokens, in order; `None` for no image.
    tokens: Option<Tensor>,
    /// Each image's token grid (rows, columns).
    grids: Vec<(usize, usize)>,
}

/// A loaded FLUX.2 checkpoint, resident on its device.
pub struct Flux2Pipeline {
    /// What clients are told the checkpoint is called (never its path).
    name: String,
    settings: CheckpointSettings,
    device: Device,
    dtype: DType,
    variant: Flux2Variant,
    tokenizer: PromptTokenizer,
    text: TextModel,
    text_layers: Vec<usize>,
    /// The tokens that end the text model's writing (its `eos_token_id`).
    stop_tokens: Vec<u32>,
    transformer: Flux2Transformer,
    vae: Flux2Vae,
    schedule: ScheduleConfig,
    /// How the transformer's weights are stored, for [`Self::describe`].
    transformer_weights: String,
}

fn config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_value(read_json(path)?).map_err(|e| Error::checkpoint(path, e.to_string()))
}

/// Qwen3's chat template for an optional system turn and one user turn, with the
/// generation prompt and `enable_thinking=False`, as `_get_qwen3_prompt_embeds` applies it
/// (no system turn).
pub fn qwen3_chat_text(system: Option<&str>, prompt: &str) -> String {
    let system = system
        .map(|s| format!("<|im_start|>system\n{s}<|im_end|>\n"))
        .unwrap_or_default();
    format!(
        "{system}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
}

/// Mistral Small 3.x's chat template for a system turn and one user turn (its generation
/// prompt adds nothing), as `_get_mistral_3_small_prompt_embeds` applies it with
/// [`SYSTEM_MESSAGE`] (`[IMG]` removed from the prompt first, as `format_input` does).
pub fn mistral_chat_text(system: &str, prompt: &str) -> String {
    format!(
        "<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{}[/INST]",
        prompt.replace("[IMG]", "")
    )
}

/// The transformer's configuration and weights: diffusers' names with `config.json`, or
/// BFL's names (a BFL file or a GGUF, which keeps them, dropped into `transformer/`) with the
/// configuration read from the tensors.
fn transformer_config(xdir: &Path, w: Weights) -> Result<(Flux2TransformerConfig, Weights)> {
    if w.stored_shape("x_embedder.weight").is_some() {
        return Ok((config(&xdir.join("config.json"))?, w));
    }
    let prefix = w.bfl_prefix("FLUX.2")?;
    let cfg = Flux2TransformerConfig::infer_bfl(&w, prefix)?;
    let map = NameMap::BflFlux2Transformer {
        prefix: prefix.to_string(),
        hidden: cfg.hidden(),
    };
    Ok((cfg, w.with_map(map)))
}

/// Where a FLUX.2 checkpoint's parts are, by its layout: a diffusers folder (`model_index.json`,
/// whose pipeline class names the variant), or BFL's single files (a transformer file, which
/// may be a GGUF, and `ae.safetensors`, beside the text encoder's and tokenizer's folders),
/// whose variant the weights and the file's name tell.
struct Flux2Files {
    /// `None` for BFL files until the transformer's weights are read.
    variant: Option<Flux2Variant>,
    settings: CheckpointSettings,
    transformer_format: WeightFormat,
    transformer: Vec<PathBuf>,
    /// Where a diffusers transformer's `config.json` is (BFL-named weights carry their own).
    transformer_dir: PathBuf,
    vae: Vec<PathBuf>,
    /// diffusers' `vae/config.json`; BFL's `ae.safetensors` is read from its tensors.
    vae_config: Option<PathBuf>,
    scheduler_config: Option<PathBuf>,
    text_encoder: PathBuf,
    tokenizer: PathBuf,
    /// BFL's name for klein's undistilled base (`flux-2-klein-base-4b.safetensors`): nothing
    /// in its weights tells it from the distilled one.
    named_base: bool,
}

impl Flux2Files {
    fn detect(dir: &Path) -> Result<Self> {
        match model_index(dir)? {
            Some((index_path, index)) => Self::diffusers(dir, &index_path, &index),
            None => Self::bfl(dir),
        }
    }

    fn diffusers(dir: &Path, index_path: &Path, index: &Value) -> Result<Self> {
        let variant = match index["_class_name"].as_str().unwrap_or("") {
            "Flux2Pipeline" => Flux2Variant::Dev,
            "Flux2KleinPipeline" => Flux2Variant::Klein {
                distilled: index["is_distilled"].as_bool().unwrap_or(false),
            },
            class => {
                return Err(Error::checkpoint(
                    dir,
                    format!("{class:?} is not a FLUX.2 text-to-image pipeline (Flux2Pipeline, Flux2KleinPipeline)"),
                ))
            }
        };
        for part in [
            "transformer",
            "vae",
            "text_encoder",
            "tokenizer",
            "scheduler",
        ] {
            if !dir.join(part).is_dir() {
                return Err(Error::checkpoint(
                    dir,
                    format!("diffusers folder without the `{part}` component FLUX.2 needs"),
                ));
            }
        }
        let transformer_dir = dir.join("transformer");
        let (transformer_format, transformer) = diffusers_transformer(&transformer_dir)?;
        let vdir = dir.join("vae");
        Ok(Self {
            variant: Some(variant),
            settings: CheckpointSettings::from_index(index, index_path)?,
            transformer_format,
            transformer,
            transformer_dir,
            vae: safetensors_files(&vdir, "diffusion_pytorch_model")?,
            vae_config: Some(vdir.join("config.json")),
            scheduler_config: Some(dir.join("scheduler/scheduler_config.json")),
            text_encoder: dir.join("text_encoder"),
            tokenizer: dir.join("tokenizer"),
            named_base: false,
        })
    }

    fn bfl(dir: &Path) -> Result<Self> {
        let (transformer_format, transformer) = bfl_transformer_file(
            dir,
            "no FLUX.2 checkpoint found: expected a diffusers folder (model_index.json) or BFL \
             single files (flux2-dev.safetensors, flux-2-klein-*.safetensors or a .gguf \
             transformer, ae.safetensors, and the text_encoder and tokenizer folders)",
        )?;
        let ae = dir.join("ae.safetensors");
        if !ae.is_file() {
            return Err(Error::checkpoint(
                dir,
                "BFL layout without ae.safetensors (the autoencoder)",
            ));
        }
        for part in ["text_encoder", "tokenizer"] {
            if !dir.join(part).is_dir() {
                return Err(Error::checkpoint(
                    dir,
                    format!("BFL layout without the `{part}` folder (transformers' format) beside the single files"),
                ));
            }
        }
        let scheduler = dir.join("scheduler/scheduler_config.json");
        let named_base = transformer
            .file_name()
            .is_some_and(|n| n.to_string_lossy().to_lowercase().contains("base"));
        Ok(Self {
            variant: None,
            settings: CheckpointSettings::from_bfl_dir(dir)?,
            transformer_format,
            transformer: vec![transformer],
            transformer_dir: dir.to_path_buf(),
            vae: vec![ae],
            vae_config: None,
            scheduler_config: scheduler.is_file().then_some(scheduler),
            text_encoder: dir.join("text_encoder"),
            tokenizer: dir.join("tokenizer"),
            named_base,
        })
    }

    /// The variant: the diffusers pipeline's, or for BFL files dev when the transformer embeds
    /// guidance, else klein (distilled unless the file is named as the base).
    fn variant(&self, transformer: &Flux2TransformerConfig) -> Flux2Variant {
        self.variant.unwrap_or(if transformer.guidance_embeds {
            Flux2Variant::Dev
        } else {
            Flux2Variant::Klein {
                distilled: !self.named_base,
            }
        })
    }
}

/// The scheduler of diffusers' FLUX.2 pipelines, for BFL files that carry none (only the
/// fields the empirical-mu schedule reads matter).
fn default_flux2_schedule() -> ScheduleConfig {
    serde_json::from_value(serde_json::json!({
        "use_dynamic_shifting": true,
        "shift": 3.0,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    }))
    .expect("a valid scheduler configuration")
}

impl Flux2Pipeline {
    /// Loads a FLUX.2 checkpoint (dev or klein) from `dir`: a diffusers folder or BFL's single
    /// files.
    pub fn load(
        dir: &Path,
        options: &EngineOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let files = Flux2Files::detect(dir)?;
        let settings = files.settings.clone();
        let device = options.device()?;
        let dtype = options.dtype();
        let mut report = |component, done, total| {
            progress(LoadProgress {
                component,
                done,
                total,
            })
        };

        // The transformer's configuration first (mapping its file costs nothing yet): for BFL
        // files it is what tells the variant, which chooses the text encoder's layers.
        let xw = match files.transformer_format {
            WeightFormat::Safetensors => {
                Weights::open_safetensors(&files.transformer, &device, dtype)?
            }
            WeightFormat::Gguf => Weights::open_gguf(&files.transformer[0], &device, dtype)?,
        };
        let bfl_names = xw.stored_shape("x_embedder.weight").is_none();
        let (xcfg, xw) = transformer_config(&files.transformer_dir, xw)?;
        let variant = files.variant(&xcfg);
        let transformer_weights = match files.transformer_format {
            WeightFormat::Gguf => format!(
                "GGUF {} transformer",
                gguf_quantization(&files.transformer[0]).unwrap_or_else(|| "unreadable".into())
            ),
            WeightFormat::Safetensors if bfl_names => "BFL-named transformer".into(),
            WeightFormat::Safetensors => "diffusers transformer".into(),
        };

        let tokenizer = PromptTokenizer::chat(&files.tokenizer)?;
        report("tokenizer", 1, 1);
        let tdir = &files.text_encoder;
        let text_cfg = LmConfig::read(&tdir.join("config.json"))?;
        let text_layers = settings.text_encoder_out_layers.clone().unwrap_or_else(|| {
            match variant {
                Flux2Variant::Dev => MISTRAL_OUT_LAYERS,
                Flux2Variant::Klein { .. } => QWEN3_OUT_LAYERS,
            }
            .to_vec()
        });
        let depth = text_layers.iter().copied().max().unwrap_or(0);
        let tw = Weights::open_safetensors(&safetensors_files(tdir, "model")?, &device, dtype)?;
        let text = TextModel::load(text_cfg, depth, &tw)?;
        let stop_tokens = stop_tokens(tdir)?;
        report("text_encoder", 1, 1);

        let transformer =
            Flux2Transformer::load(xcfg, &xw, &mut |d, t| report("transformer", d, t))?;

        let vw = Weights::open_safetensors(&files.vae, &device, dtype)?;
        let (vcfg, vw) = match &files.vae_config {
            Some(path) => (config(path)?, vw),
            None => {
                let groups = settings.autoencoder_norm_groups.unwrap_or(groups());
                let cfg = Flux2VaeConfig::infer_bfl(&vw, groups)?;
                let up_blocks = cfg.block_out_channels.len();
                (cfg, vw.with_map(NameMap::BflVae { up_blocks }))
            }
        };
        let vae = Flux2Vae::load(vcfg, &vw)?;
        report("vae", 1, 1);
        let schedule = match &files.scheduler_config {
            Some(path) => config(path)?,
            None => default_flux2_schedule(),
        };
        Ok(Self {
            name: checkpoint_name(dir),
            settings,
            device,
            dtype,
            variant,
            tokenizer,
            text,
            text_layers,
            stop_tokens,
            transformer,
            vae,
            schedule,
            transformer_weights,
        })
    }

    pub fn variant(&self) -> Flux2Variant {
        self.variant
    }

    /// Whether the checkpoint is a step-distilled klein (4 steps, no guidance).
    fn distilled(&self) -> bool {
        self.variant == Flux2Variant::Klein { distilled: true }
    }

    pub fn transformer_config(&self) -> &Flux2TransformerConfig {
        self.transformer.config()
    }

    pub fn vae_config(&self) -> &Flux2VaeConfig {
        self.vae.config()
    }

    /// The defaults a request falls back on: the reference pipelines' (distilled klein: 4
    /// steps, guidance ignored; klein base and dev: 50 steps, guidance 4, which dev embeds and
    /// the base applies as classifier-free guidance), the checkpoint's steps first.
    pub fn defaults(&self) -> SamplingDefaults {
        let (steps, guidance) = if self.distilled() {
            (4, None)
        } else {
            (50, Some(4.0))
        };
        SamplingDefaults {
            steps: self.settings.steps.unwrap_or(steps),
            guidance,
            max_sequence_length: MAX_SEQUENCE_LENGTH,
        }
    }

    /// The `steps + 1` noise levels for an image of `image_seq_len` tokens: the scheduler's
    /// time shift with BFL's empirical `mu`.
    pub fn schedule_sigmas(&self, steps: usize, image_seq_len: usize) -> Vec<f32> {
        self.schedule
            .sigmas_with_mu(steps, empirical_mu(image_seq_len, steps))
    }

    /// Image sides must be multiples of this.
    pub fn size_multiple(&self) -> u32 {
        (self.vae.config().scale_factor() * 2) as u32
    }

    /// E.g. "FLUX.2 klein (distilled), diffusers layout, GGUF Q8_0 transformer, FLUX.2-klein-4B
    /// on cpu (F32)": the checkpoint by name, never by path (clients see this in metadata).
    pub fn describe(&self) -> String {
        let kind = match self.variant {
            Flux2Variant::Dev => "dev",
            Flux2Variant::Klein { distilled: true } => "klein (distilled)",
            Flux2Variant::Klein { distilled: false } => "klein (base)",
        };
        let about = self
            .settings
            .description
            .as_ref()
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        format!(
            "FLUX.2 {kind}, diffusers layout, {}, {} on {} ({:?}){about}",
            self.transformer_weights,
            self.name,
            device_name(&self.device),
            self.dtype
        )
    }

    /// The prompt as the text model reads it: framed by its chat template.
    pub fn chat_text(&self, prompt: &str) -> String {
        match self.variant {
            Flux2Variant::Dev => mistral_chat_text(SYSTEM_MESSAGE, prompt),
            Flux2Variant::Klein { .. } => qwen3_chat_text(None, prompt),
        }
    }

    /// The prompt as the text model is asked to rewrite it: under
    /// [`SYSTEM_MESSAGE_UPSAMPLING_T2I`], ready for the model's answer.
    pub fn expansion_chat_text(&self, prompt: &str) -> String {
        match self.variant {
            Flux2Variant::Dev => mistral_chat_text(SYSTEM_MESSAGE_UPSAMPLING_T2I, prompt),
            Flux2Variant::Klein { .. } => {
                qwen3_chat_text(Some(SYSTEM_MESSAGE_UPSAMPLING_T2I), prompt)
            }
        }
    }

    /// Whether the text encoder can rewrite prompts: it was loaded with its language-model
    /// head (a checkpoint that ships the bare text model cannot).
    pub fn can_expand_prompts(&self) -> bool {
        self.text.can_generate()
    }

    /// The text encoder's rewrite of `prompt` (the reference's `upsample_prompt`), or `None`
    /// where the checkpoint has no language-model head. The reference samples at
    /// [`EXPANSION_TEMPERATURE`] for at most [`EXPANSION_MAX_NEW_TOKENS`] tokens.
    pub fn expand_prompt(
        &self,
        prompt: &str,
        max_new_tokens: usize,
        choice: TokenChoice,
        should_stop: &mut dyn FnMut() -> bool,
    ) -> Result<Option<Expansion>> {
        if !self.can_expand_prompts() {
            return Ok(None);
        }
        let ids = self.tokenizer.ids(&self.expansion_chat_text(prompt))?;
        let tokens =
            self.text
                .generate(&ids, max_new_tokens, choice, &self.stop_tokens, should_stop)?;
        let text = self.tokenizer.decode(&tokens)?;
        Ok(Some(Expansion { tokens, text }))
    }

    /// The token ids of `text` as the text model reads it (no padding, nothing added).
    pub fn text_ids(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.ids(text)
    }

    /// The stacked text-model hidden states of the chat-framed prompt, padded to
    /// `max_sequence_length` tokens (masked in the encoder, kept in the output, as diffusers).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        max_sequence_length: usize,
    ) -> Result<Flux2PromptEmbeddings> {
        if max_sequence_length == 0 || max_sequence_length > self.tokenizer.max_length {
            return Err(Error::InvalidRequest(format!(
                "max_sequence_length must be between 1 and {} (got {max_sequence_length})",
                self.tokenizer.max_length
            )));
        }
        let (ids, valid) = self
            .tokenizer
            .encode_with_mask(&self.chat_text(prompt), max_sequence_length)?;
        let embeds = self
            .text
            .stacked_hidden_states(&ids, valid, &self.text_layers)?;
        Ok(Flux2PromptEmbeddings { ids, valid, embeds })
    }

    /// The transformer's velocity for packed latents at noise level `sigma`.
    pub fn velocity(
        &self,
        latents: &Tensor,
        sigma: f32,
        guidance: Option<f32>,
        text: &Flux2PromptEmbeddings,
        width: u32,
        height: u32,
    ) -> Result<Tensor> {
        let (h, w) = self.latent_grid(width, height)?;
        let rope = self.rope(text, h, w, &[])?;
        self.velocity_with(latents, sigma, guidance, text, None, &rope)
    }

    fn rope(
        &self,
        text: &Flux2PromptEmbeddings,
        h: usize,
        w: usize,
        references: &[(usize, usize)],
    ) -> Result<Rope> {
        self.transformer.rope(
            text.embeds.dim(1)?,
            (h / 2, w / 2),
            references,
            &self.device,
        )
    }

    /// The velocity of the noisy tokens; reference tokens, if any, ride along after them and
    /// their predictions are dropped.
    fn velocity_with(
        &self,
        latents: &Tensor,
        sigma: f32,
        guidance: Option<f32>,
        text: &Flux2PromptEmbeddings,
        references: Option<&Tensor>,
        rope: &Rope,
    ) -> Result<Tensor> {
        let g = guidance.map(|g| sampling::model_guidance(g, self.dtype));
        let t = sampling::model_timestep(sigma, self.dtype);
        let x = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let n = x.dim(1)?;
        let x = match references {
            Some(r) => Tensor::cat(&[&x, r], 1)?,
            None => x,
        };
        let v = self.transformer.forward(&x, &text.embeds, t, g, rope)?;
        Ok(v.narrow(1, 0, n)?)
    }

    /// Reference images as packed normalised tokens, concatenated, and each one's token grid.
    /// Each is prepared as diffusers' `Flux2Pipeline` prepares it (see
    /// [`Self::reference_size`]); where that changes its size, the notes say so.
    fn encode_references(
        &self,
        images: &[RgbImage],
        notes: &mut Vec<String>,
    ) -> Result<References> {
        let f = self.vae.config().scale_factor() as u32;
        let mut tokens = Vec::with_capacity(images.len());
        let mut grids = Vec::with_capacity(images.len());
        for (i, img) in images.iter().enumerate() {
            let (area_fit, (w, h)) = self.reference_sizes(i, img)?;
            let resized;
            let img = if area_fit != (img.width, img.height) {
                notes.push(format!(
                    "reference image {} resized from {}x{} to {}x{} (at most {REFERENCE_MAX_PIXELS} pixels)",
                    i + 1,
                    img.width,
                    img.height,
                    area_fit.0,
                    area_fit.1
                ));
                resized = resize(img, area_fit)?;
                &resized
            } else {
                img
            };
            if (w, h) != (img.width, img.height) {
                notes.push(format!(
                    "reference image {} centre-cropped from {}x{} to {w}x{h}",
                    i + 1,
                    img.width,
                    img.height
                ));
            }
            let full = Tensor::from_vec(
                img.pixels.clone(),
                (img.height as usize, img.width as usize, 3),
                &Device::Cpu,
            )?;
            let crop = full
                .narrow(0, ((img.height - h) / 2) as usize, h as usize)?
                .narrow(1, ((img.width - w) / 2) as usize, w as usize)?;
            // diffusers' image processor: [0, 255] -> [0, 1] in f32 -> [-1, 1].
            let x = ((crop.to_dtype(DType::F32)? / 255.0)? * 2.0)?
                .affine(1.0, -1.0)?
                .permute((2, 0, 1))?
                .unsqueeze(0)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            tokens.push(self.vae.encode(&x)?);
            grids.push(((h / f / 2) as usize, (w / f / 2) as usize));
        }
        let tokens = if tokens.is_empty() {
            None
        } else {
            Some(Tensor::cat(&tokens, 1)?)
        };
        Ok(References { tokens, grids })
    }

    /// The size the first reference image is encoded at: what an edit with
    /// `image_size: "auto"` generates, as diffusers' `Flux2Pipeline` does without a size.
    pub fn reference_size(&self, img: &RgbImage) -> Result<ImageSize> {
        let (_, (width, height)) = self.reference_sizes(0, img)?;
        Ok(ImageSize { width, height })
    }

    /// The `index`th reference image's sizes as diffusers prepares it: scaled down to
    /// [`REFERENCE_MAX_PIXELS`] of area when larger (aspect ratio kept, sides floored), then
    /// each side cut down to a multiple of [`Self::size_multiple`]. (diffusers resamples to that
    /// last size where kiln centre-crops: the two differ by at most 15 pixels a side.)
    fn reference_sizes(&self, index: usize, img: &RgbImage) -> Result<((u32, u32), (u32, u32))> {
        let m = self.size_multiple();
        prepared_reference_size(img.width, img.height, m).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "reference image {} is {}x{}: each side needs at least {m} pixels after scaling to at most {REFERENCE_MAX_PIXELS} pixels",
                index + 1,
                img.width,
                img.height
            ))
        })
    }

    /// Packed latents as diffusers' `output_type="latent"` returns them: batch-norm statistics
    /// undone and un-patchified, `(1, C, h, w)` f32 on the CPU.
    pub fn unpack_latents(&self, packed: &Tensor, width: u32, height: u32) -> Result<Tensor> {
        let (h, w) = self.latent_grid(width, height)?;
        let z =
            self.vae
                .denormalise(&packed.to_device(&self.device)?.to_dtype(self.dtype)?, h, w)?;
        Ok(z.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
    }

    /// Decodes packed latents to an image of `width x height`.
    pub fn decode(&self, packed: &Tensor, width: u32, height: u32) -> Result<RgbImage> {
        let (h, w) = self.latent_grid(width, height)?;
        let z =
            self.vae
                .denormalise(&packed.to_device(&self.device)?.to_dtype(self.dtype)?, h, w)?;
        to_rgb(&self.vae.decode(&z)?)
    }

    /// The (un-patchified) latent grid for an image, or why the size is unusable.
    fn latent_grid(&self, width: u32, height: u32) -> Result<(usize, usize)> {
        sampling::checked_latent_grid(width, height, self.vae.config().scale_factor())
    }

    /// Runs a whole text-to-image generation.
    pub fn run(
        &self,
        req: &PipelineRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<PipelineOutput> {
        self.run_with_references(req, &[], observer)
    }

    /// Runs a whole generation conditioned on `references` (editing: their tokens follow the
    /// noisy ones, at times 10, 20, ...). A distilled checkpoint ignores guidance; the klein
    /// base runs true classifier-free guidance against the empty prompt when guidance exceeds
    /// 1, with the same references.
    pub fn run_with_references(
        &self,
        req: &PipelineRequest,
        references: &[RgbImage],
        observer: &mut dyn StepObserver,
    ) -> Result<PipelineOutput> {
        let defaults = self.defaults();
        let steps = sampling::checked_steps(req.steps, defaults.steps)?;
        let mut notes: Vec<String> = self.settings.description.iter().cloned().collect();
        notes.push(format!("seed {}", req.seed));
        let guidance = if self.distilled() {
            if req.guidance.is_some() {
                notes.push("guidance ignored: this checkpoint is step-distilled".into());
            }
            None
        } else {
            req.guidance.or(defaults.guidance)
        };
        let max_len = req
            .max_sequence_length
            .unwrap_or(defaults.max_sequence_length);
        let (h, w) = self.latent_grid(req.width, req.height)?;
        let channels = self.transformer.config().in_channels;
        let tokens = (h / 2) * (w / 2);

        sampling::check_stop(observer)?;
        let text = self.encode_prompt(&req.prompt, max_len)?;
        // The base model guides with its own guidance-free prediction for the empty prompt.
        let unconditional = match guidance {
            Some(g) if g > 1.0 && !self.transformer.config().guidance_embeds => {
                notes.push(format!("classifier-free guidance {g}"));
                sampling::check_stop(observer)?;
                Some((self.encode_prompt("", max_len)?, g))
            }
            _ => None,
        };
        let embedded_guidance = guidance.filter(|_| self.transformer.config().guidance_embeds);
        let latents = match &req.initial_latents {
            Some(l) => {
                // diffusers' FLUX.2 pipelines take `latents=` patchified but not yet packed,
                // `(1, 4C, h/2, w/2)`.
                let packed;
                let l = if l.rank() == 4 {
                    packed = pack_channels_last(l)?;
                    &packed
                } else {
                    l
                };
                if l.dims() != [1, tokens, channels] {
                    return Err(Error::InvalidRequest(format!(
                        "initial latents have shape {:?}; {}x{} needs [1, {tokens}, {channels}]",
                        l.dims(),
                        req.width,
                        req.height
                    )));
                }
                notes.push("initial latents given".into());
                l.to_device(&self.device)?.to_dtype(self.dtype)?
            }
            None => pack_channels_last(&sampling::noise(req.seed, channels, h / 2, w / 2)?)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?,
        };
        let sigmas = self.schedule_sigmas(steps as usize, tokens);
        notes.push(format!("empirical-mu schedule for {tokens} image tokens"));
        sampling::check_stop(observer)?;
        let References {
            tokens: refs,
            grids,
        } = self.encode_references(references, &mut notes)?;
        sampling::check_stop(observer)?;
        if !references.is_empty() {
            notes.push(format!("{} reference image(s)", references.len()));
        }
        let rope = self.rope(&text, h, w, &grids)?;
        let latents = sampling::denoise(
            latents,
            &sigmas,
            req.preview_interval,
            observer,
            &mut |x, sigma| {
                let v =
                    self.velocity_with(x, sigma, embedded_guidance, &text, refs.as_ref(), &rope)?;
                match &unconditional {
                    Some((empty, g)) => {
                        let vn = self.velocity_with(x, sigma, None, empty, refs.as_ref(), &rope)?;
                        sampling::guided(&v, &vn, *g)
                    }
                    None => Ok(v),
                }
            },
            &|x0| preview(&self.vae.denormalise(x0, h, w)?),
        )?;
        sampling::check_stop(observer)?;
        let z = self.vae.denormalise(&latents, h, w)?;
        let image = to_rgb(&self.vae.decode(&z)?)?;
        Ok(PipelineOutput {
            image,
            final_latents: latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            applied: AppliedSettings {
                num_inference_steps: steps,
                guidance,
                prompt: req.prompt.clone(),
                notes,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_scaled_to_a_megapixel_then_cut_to_the_size_multiple() {
        // A 12 MP photo: about 1 MP with its aspect ratio, then multiples of 16.
        assert_eq!(
            prepared_reference_size(4000, 3000, 16),
            Some(((1182, 886), (1168, 880)))
        );
        assert_eq!(
            prepared_reference_size(1500, 1000, 16),
            Some(((1254, 836), (1248, 832)))
        );
        // Up to a megapixel only the cut applies.
        assert_eq!(
            prepared_reference_size(1024, 1024, 16),
            Some(((1024, 1024), (1024, 1024)))
        );
        assert_eq!(
            prepared_reference_size(70, 50, 16),
            Some(((70, 50), (64, 48)))
        );
        assert_eq!(prepared_reference_size(10, 500, 16), None);
        assert_eq!(prepared_reference_size(20000, 10, 16), None);
    }

    #[test]
    fn resizing_keeps_a_flat_image_flat() {
        let flat = RgbImage {
            width: 40,
            height: 30,
            pixels: [10, 200, 90].repeat(40 * 30),
        };
        let out = resize(&flat, (20, 15)).unwrap();
        assert_eq!((out.width, out.height), (20, 15));
        assert!(out.pixels.chunks(3).all(|p| p == [10, 200, 90]));
    }
}
