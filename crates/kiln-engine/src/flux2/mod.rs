//! FLUX.2 (dev, klein) as a [`Family`], written from diffusers' `transformer_flux2.py`,
//! `pipeline_flux2.py`, `pipeline_flux2_klein.py` and `autoencoder_kl_flux2.py`: the prompt
//! framed by a chat template -> stacked hidden states of a decoder-only language model ->
//! channels-last packed latents of 128 channels on the empirical-mu schedule, reference images'
//! tokens riding along after the noisy ones -> batch-norm denormalisation -> VAE.
//!
//! # Layout
//! - `files`: where a checkpoint's parts are (diffusers folder or BFL single files) and which
//!   variant it is.
//! - `transformer`: the FLUX.2 transformer (shared modulation, SwiGLU, 4-axis RoPE).
//! - `references`: reference images prepared and encoded for editing.
//! - [`sampling`]: the empirical-mu schedule and channels-last packing.

mod files;
mod references;
pub mod sampling;
pub(crate) mod transformer;

use crate::checkpoint::{
    checkpoint_name, gguf_description, open_transformer, open_vae, read_config, safetensors_files,
    WeightFormat,
};
use crate::error::Result;
use crate::layers::blocks::Rope;
use crate::memory::MemoryShape;
use crate::options::{LoadProgress, SamplingDefaults};
use crate::pipeline::{CheckpointInfo, Expanded, Expansion, Family, LatentGrid, Pipeline, Runtime};
use crate::sampling::{noise, ScheduleConfig};
pub use crate::text::chat::{
    mistral_chat_text, qwen3_chat_text, SYSTEM_MESSAGE, SYSTEM_MESSAGE_UPSAMPLING_T2I,
};
use crate::text::lm::{stop_tokens, TextModel};
pub use crate::text::lm::{LmConfig, TokenChoice};
use crate::text::tokenizer::PromptTokenizer;
use crate::vae::flux2::Flux2Vae;
pub use crate::vae::flux2::Flux2VaeConfig;
use crate::weights::Weights;
use candle_core::Tensor;
use files::{default_flux2_schedule, transformer_config, Flux2Files};
use kiln_core::engine::RgbImage;
use kiln_core::params::ImageSize;
pub use references::REFERENCE_MAX_PIXELS;
use sampling::{empirical_mu, pack_channels_last};
use std::path::Path;
use transformer::Flux2Transformer;
pub use transformer::Flux2TransformerConfig;

/// A loaded FLUX.2 checkpoint.
pub type Flux2Pipeline = Pipeline<Flux2>;

/// klein's Qwen3 layers whose hidden states are stacked (of 36).
const QWEN3_OUT_LAYERS: [usize; 3] = [9, 18, 27];
/// dev's Mistral Small layers whose hidden states are stacked (of 40).
const MISTRAL_OUT_LAYERS: [usize; 3] = [10, 20, 30];
/// The longest prompt, in tokens of the chat-framed text.
const MAX_SEQUENCE_LENGTH: usize = 512;

/// Prompt expansion as the reference runs it (`Flux2Pipeline.upsample_prompt`).
pub const EXPANSION_TEMPERATURE: f32 = 0.15;
pub const EXPANSION_MAX_NEW_TOKENS: usize = 512;

/// Which FLUX.2, from the pipeline class a checkpoint names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flux2Variant {
    /// 32B, Mistral Small 3.x text encoder, embedded guidance.
    Dev,
    /// 4B / 9B, Qwen3 text encoder; step-distilled or the undistilled base.
    Klein { distilled: bool },
}

/// A prompt's encoding.
pub struct Flux2PromptEmbeddings {
    /// The chat-framed prompt's token ids, padded to the sequence length.
    pub ids: Vec<u32>,
    /// How many of `ids` are the prompt (the rest is padding, masked in the text encoder).
    pub valid: usize,
    /// `(1, sequence length, layers * hidden)`: the chosen layers' hidden states per token.
    pub embeds: Tensor,
}

/// What the steps condition on besides the prompt.
pub struct Flux2Conditioning {
    rope: Rope,
    /// Reference images' tokens, appended after the noisy ones.
    references: Option<Tensor>,
}

/// FLUX.2's models, resident on their device.
pub struct Flux2 {
    variant: Flux2Variant,
    tokenizer: PromptTokenizer,
    text: TextModel,
    text_layers: Vec<usize>,
    /// The tokens that end the text model's writing (its `eos_token_id`).
    stop_tokens: Vec<u32>,
    transformer: Flux2Transformer,
    vae: Flux2Vae,
    schedule: ScheduleConfig,
}

impl Flux2 {
    pub fn variant(&self) -> Flux2Variant {
        self.variant
    }

    pub fn transformer_config(&self) -> &Flux2TransformerConfig {
        self.transformer.config()
    }

    pub fn vae_config(&self) -> &Flux2VaeConfig {
        self.vae.config()
    }

    /// The `steps + 1` noise levels for an image of `image_seq_len` tokens: the scheduler's
    /// time shift with BFL's empirical `mu`.
    pub fn schedule_sigmas(&self, steps: usize, image_seq_len: usize) -> Vec<f32> {
        self.schedule
            .sigmas_with_mu(steps, empirical_mu(image_seq_len, steps))
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
    pub fn rewrite_prompt(
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

    /// Whether the checkpoint is a step-distilled klein (4 steps, no guidance).
    fn distilled(&self) -> bool {
        self.variant == Flux2Variant::Klein { distilled: true }
    }
}

impl Family for Flux2 {
    const NAME: &'static str = "FLUX.2";
    const PREVIEW_INTERVAL: u32 = 1;
    const TAKES_REFERENCES: bool = true;
    type Text = Flux2PromptEmbeddings;
    type Conditioning = Flux2Conditioning;

    fn load(
        dir: &Path,
        rt: &Runtime,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<(Self, CheckpointInfo)> {
        let files = Flux2Files::detect(dir)?;
        // The transformer's configuration first (mapping its file costs nothing yet): for BFL
        // files it is what tells the variant, which chooses the text encoder's layers.
        let xw = open_transformer(files.transformer_format, &files.transformer, rt)?;
        let bfl_names = xw.stored_shape("x_embedder.weight").is_none();
        let (xcfg, xw) = transformer_config(&files.transformer_dir, xw)?;
        let variant = files.variant(&xcfg);
        let transformer_weights = gguf_description(files.transformer_format, &files.transformer)
            .or_else(|| {
                (files.transformer_format == WeightFormat::Safetensors && bfl_names)
                    .then(|| "BFL-named transformer".to_string())
            });
        let (tokenizer, text, text_layers, stop_tokens) = load_text(&files, variant, rt)?;
        progress(LoadProgress::whole("tokenizer"));
        progress(LoadProgress::whole("text_encoder"));
        let transformer = Flux2Transformer::load(xcfg, &xw, progress)?;
        let (vcfg, vw) = open_vae(
            &files.vae,
            files.vae_config.as_deref(),
            &files.settings,
            rt,
            Flux2VaeConfig::infer_bfl,
        )?;
        let vae = Flux2Vae::load(vcfg, &vw)?;
        progress(LoadProgress::whole("vae"));
        let schedule = match &files.scheduler_config {
            Some(path) => read_config(path)?,
            None => default_flux2_schedule(),
        };
        let info = CheckpointInfo {
            name: checkpoint_name(dir),
            layout: files.layout,
            transformer_weights,
            settings: files.settings,
        };
        let model = Self {
            variant,
            tokenizer,
            text,
            text_layers,
            stop_tokens,
            transformer,
            vae,
            schedule,
        };
        Ok((model, info))
    }

    fn kind(&self) -> String {
        match self.variant {
            Flux2Variant::Dev => "FLUX.2 dev",
            Flux2Variant::Klein { distilled: true } => "FLUX.2 klein (distilled)",
            Flux2Variant::Klein { distilled: false } => "FLUX.2 klein (base)",
        }
        .into()
    }

    /// The reference pipelines' (distilled klein: 4 steps, guidance ignored; klein base and
    /// dev: 50 steps, guidance 4, which dev embeds and the base applies as classifier-free
    /// guidance).
    fn defaults(&self) -> SamplingDefaults {
        let (steps, guidance) = if self.distilled() {
            (4, None)
        } else {
            (50, Some(4.0))
        };
        SamplingDefaults {
            steps,
            guidance,
            max_sequence_length: MAX_SEQUENCE_LENGTH,
        }
    }

    fn embeds_guidance(&self) -> bool {
        self.transformer.config().guidance_embeds
    }

    fn ignores_guidance_because(&self) -> &'static str {
        "this checkpoint is step-distilled"
    }

    fn max_text_tokens(&self) -> usize {
        self.tokenizer.max_length
    }

    /// The stacked text-model hidden states of the chat-framed prompt, padded to `max_len`
    /// tokens (masked in the encoder, kept in the output, as diffusers).
    fn encode_prompt(&self, prompt: &str, max_len: usize) -> Result<Flux2PromptEmbeddings> {
        let (ids, valid) = self
            .tokenizer
            .encode_with_mask(&self.chat_text(prompt), max_len)?;
        let embeds = self
            .text
            .stacked_hidden_states(&ids, valid, &self.text_layers)?;
        Ok(Flux2PromptEmbeddings { ids, valid, embeds })
    }

    fn vae_scale(&self) -> usize {
        self.vae.config().scale_factor()
    }

    fn packed_channels(&self) -> usize {
        self.transformer.config().in_channels
    }

    fn memory_shape(&self) -> MemoryShape {
        let cfg = self.transformer.config();
        MemoryShape {
            hidden: cfg.hidden(),
            mlp_hidden: cfg.mlp_hidden(),
            vae_channels: self.vae.config().decoder_channels().to_vec(),
        }
    }

    /// FLUX.2 draws its noise already patchified and packs it channels-last.
    fn noise(&self, seed: u64, grid: LatentGrid) -> Result<Tensor> {
        pack_channels_last(&noise(
            seed,
            self.packed_channels(),
            grid.h / 2,
            grid.w / 2,
        )?)
    }

    /// diffusers' FLUX.2 pipelines take `latents=` patchified but not yet packed,
    /// `(1, 4C, h/2, w/2)`; packed ones pass as they are.
    fn pack_given(&self, latents: &Tensor) -> Result<Tensor> {
        if latents.rank() == 4 {
            pack_channels_last(latents)
        } else {
            Ok(latents.clone())
        }
    }

    fn sigmas(&self, steps: usize, tokens: usize, notes: &mut Vec<String>) -> Vec<f32> {
        notes.push(format!("empirical-mu schedule for {tokens} image tokens"));
        self.schedule_sigmas(steps, tokens)
    }

    /// Reference images' tokens at times 10, 20, ... after the noisy ones.
    fn condition(
        &self,
        rt: &Runtime,
        text: &Flux2PromptEmbeddings,
        grid: LatentGrid,
        references: &[RgbImage],
        notes: &mut Vec<String>,
    ) -> Result<Flux2Conditioning> {
        let refs = references::encode(&self.vae, rt, references, notes)?;
        if !references.is_empty() {
            notes.push(format!("{} reference image(s)", references.len()));
        }
        let rope = self.transformer.rope(
            text.embeds.dim(1)?,
            (grid.h / 2, grid.w / 2),
            &refs.grids,
            &rt.device,
        )?;
        Ok(Flux2Conditioning {
            rope,
            references: refs.tokens,
        })
    }

    /// The velocity of the noisy tokens; reference tokens, if any, ride along after them and
    /// their predictions are dropped.
    fn velocity(
        &self,
        x: &Tensor,
        t: f32,
        guidance: Option<f32>,
        text: &Flux2PromptEmbeddings,
        cond: &Flux2Conditioning,
    ) -> Result<Tensor> {
        let n = x.dim(1)?;
        let joint;
        let x = match &cond.references {
            Some(r) => {
                joint = Tensor::cat(&[x, r], 1)?;
                &joint
            }
            None => x,
        };
        let v = self
            .transformer
            .forward(x, &text.embeds, t, guidance, &cond.rope)?;
        Ok(v.narrow(1, 0, n)?)
    }

    /// Batch-norm statistics undone and un-patchified.
    fn unpack(&self, packed: &Tensor, grid: LatentGrid) -> Result<Tensor> {
        self.vae.denormalise(packed, grid.h, grid.w)
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.vae.decode(z)
    }

    /// The first reference as [`references`] prepares it: what an edit with
    /// `image_size: "auto"` generates, as diffusers' `Flux2Pipeline` does without a size.
    fn reference_size(&self, first: &RgbImage) -> Result<ImageSize> {
        let multiple = (self.vae_scale() * 2) as u32;
        let (_, (width, height)) = references::reference_sizes(0, first, multiple)?;
        Ok(ImageSize { width, height })
    }

    fn expand_prompt(
        &self,
        prompt: &str,
        seed: u64,
        should_stop: &mut dyn FnMut() -> bool,
    ) -> Result<Expanded> {
        let choice = TokenChoice::Sampled {
            temperature: EXPANSION_TEMPERATURE,
            seed,
        };
        Ok(
            match self.rewrite_prompt(prompt, EXPANSION_MAX_NEW_TOKENS, choice, should_stop)? {
                Some(e) => Expanded::Text(e),
                None => Expanded::Unavailable(
                    "this checkpoint's text encoder has no language-model head".into(),
                ),
            },
        )
    }
}

/// The chat tokenizer, the text model to the deepest layer it is read at, those layers and
/// its stop tokens.
fn load_text(
    files: &Flux2Files,
    variant: Flux2Variant,
    rt: &Runtime,
) -> Result<(PromptTokenizer, TextModel, Vec<usize>, Vec<u32>)> {
    let tokenizer = PromptTokenizer::chat(&files.tokenizer)?;
    let tdir = &files.text_encoder;
    let text_cfg = LmConfig::read(&tdir.join("config.json"))?;
    let text_layers = files
        .settings
        .text_encoder_out_layers
        .clone()
        .unwrap_or_else(|| {
            match variant {
                Flux2Variant::Dev => MISTRAL_OUT_LAYERS,
                Flux2Variant::Klein { .. } => QWEN3_OUT_LAYERS,
            }
            .to_vec()
        });
    let depth = text_layers.iter().copied().max().unwrap_or(0);
    let tw = Weights::open_safetensors(&safetensors_files(tdir, "model")?, rt)?;
    let text = TextModel::load(text_cfg, depth, &tw)?;
    let stop_tokens = stop_tokens(tdir)?;
    Ok((tokenizer, text, text_layers, stop_tokens))
}
