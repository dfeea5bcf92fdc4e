//! FLUX.1 (dev, schnell and their fine-tunes) as a [`Family`], as diffusers' `FluxPipeline`
//! runs it: CLIP's pooled vector and T5's hidden states, 2x2-packed latents of 16 channels,
//! the schedule shifted linearly in the image's token count, the VAE's scale and shift.
//!
//! - `transformer`: the FLUX.1 transformer (`FluxTransformer2DModel`).

pub(crate) mod transformer;

use crate::checkpoint::{
    gguf_description, open_transformer, open_vae, read_config, safetensors_files, CheckpointFiles,
    WeightFormat,
};
use crate::error::{Error, Result};
use crate::layers::blocks::Rope;
use crate::memory::MemoryShape;
use crate::options::{LoadProgress, SamplingDefaults};
use crate::pipeline::{CheckpointInfo, Family, LatentGrid, Pipeline, Runtime};
use crate::sampling::{self, ScheduleConfig};
use crate::text::clip::ClipTextModel;
use crate::text::t5::{T5Config, T5Encoder};
use crate::text::tokenizer::PromptTokenizer;
use crate::vae::{VaeConfig, VaeDecoder};
use crate::weights::{NameMap, Weights};
use candle_core::Tensor;
use kiln_core::engine::RgbImage;
use std::path::Path;
use transformer::{FluxTransformer, TransformerConfig};

/// A loaded FLUX.1 checkpoint.
pub type Flux1Pipeline = Pipeline<Flux1>;

/// Which FLUX.1 a checkpoint is, from its weights: dev has a guidance embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Dev,
    Schnell,
}

impl Variant {
    pub fn defaults(self) -> SamplingDefaults {
        match self {
            Variant::Dev => SamplingDefaults {
                steps: 28,
                guidance: Some(3.5),
                max_sequence_length: 512,
            },
            Variant::Schnell => SamplingDefaults {
                steps: 4,
                guidance: None,
                max_sequence_length: 256,
            },
        }
    }
}

/// A prompt's encodings.
pub struct PromptEmbeddings {
    pub clip_ids: Vec<u32>,
    pub t5_ids: Vec<u32>,
    /// CLIP's pooled output `(1, clip_hidden)`.
    pub pooled: Tensor,
    /// T5's hidden states `(1, max_sequence_length, t5_hidden)`.
    pub t5: Tensor,
}

/// What the steps condition on besides the prompt: the position tables of text and image
/// tokens.
pub struct Flux1Conditioning(Rope);

/// FLUX.1's models, resident on their device.
pub struct Flux1 {
    clip_tokenizer: PromptTokenizer,
    t5_tokenizer: PromptTokenizer,
    clip: ClipTextModel,
    t5: T5Encoder,
    transformer: FluxTransformer,
    vae: VaeDecoder,
    schedule: ScheduleConfig,
}

impl Flux1 {
    pub fn variant(&self) -> Variant {
        if self.transformer.config().guidance_embeds {
            Variant::Dev
        } else {
            Variant::Schnell
        }
    }

    pub fn transformer_config(&self) -> &TransformerConfig {
        self.transformer.config()
    }

    pub fn vae_config(&self) -> &VaeConfig {
        self.vae.config()
    }
}

impl Family for Flux1 {
    const NAME: &'static str = "FLUX.1";
    const PREVIEW_INTERVAL: u32 = 4;
    const TAKES_REFERENCES: bool = false;
    type Text = PromptEmbeddings;
    type Conditioning = Flux1Conditioning;

    fn load(
        dir: &Path,
        rt: &Runtime,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<(Self, CheckpointInfo)> {
        let files = CheckpointFiles::detect(dir)?;
        let clip_tokenizer = PromptTokenizer::clip(&files.tokenizer)?;
        let t5_tokenizer = PromptTokenizer::t5(&files.tokenizer_2)?;
        progress(LoadProgress::whole("tokenizers"));
        let text_weights = |d: &Path| -> Result<Weights> {
            Weights::open_safetensors(&safetensors_files(d, "model")?, rt)
        };
        let clip = ClipTextModel::load(
            read_config(&files.text_encoder.join("config.json"))?,
            &text_weights(&files.text_encoder)?,
        )?;
        progress(LoadProgress::whole("text_encoder"));
        let t5_cfg: T5Config = read_config(&files.text_encoder_2.join("config.json"))?;
        let t5 = T5Encoder::load(t5_cfg, &text_weights(&files.text_encoder_2)?)?;
        progress(LoadProgress::whole("text_encoder_2"));

        let tw = open_transformer(files.transformer_format, &files.transformer, rt)?;
        let (tcfg, tw) = transformer_config(&files, tw)?;
        let transformer = FluxTransformer::load(tcfg, &tw, progress)?;
        let (vcfg, vw) = open_vae(
            &files.vae,
            files.vae_config.as_deref(),
            &files.settings,
            rt,
            VaeConfig::infer_bfl,
        )?;
        let vae = VaeDecoder::load(vcfg, &vw)?;
        progress(LoadProgress::whole("vae"));
        let schedule = match &files.scheduler_config {
            Some(p) => read_config(p)?,
            None => ScheduleConfig::for_guidance_distilled(transformer.config().guidance_embeds),
        };
        let info = CheckpointInfo {
            name: files.name.clone(),
            layout: files.layout,
            transformer_weights: gguf_description(files.transformer_format, &files.transformer),
            settings: files.settings.clone(),
        };
        let model = Self {
            clip_tokenizer,
            t5_tokenizer,
            clip,
            t5,
            transformer,
            vae,
            schedule,
        };
        Ok((model, info))
    }

    fn kind(&self) -> String {
        match self.variant() {
            Variant::Dev => "FLUX.1 dev".into(),
            Variant::Schnell => "FLUX.1 schnell".into(),
        }
    }

    /// The variant's, with T5 never padded past its tokenizer's `model_max_length`.
    fn defaults(&self) -> SamplingDefaults {
        let variant = self.variant().defaults();
        SamplingDefaults {
            max_sequence_length: variant
                .max_sequence_length
                .min(self.t5_tokenizer.max_length),
            ..variant
        }
    }

    fn embeds_guidance(&self) -> bool {
        self.transformer.config().guidance_embeds
    }

    fn ignores_guidance_because(&self) -> &'static str {
        "this checkpoint has no guidance embedding (schnell)"
    }

    fn max_text_tokens(&self) -> usize {
        self.t5_tokenizer.max_length
    }

    /// CLIP's pooled vector and T5's hidden states, T5 padded to `max_len` with no attention
    /// mask, as FLUX.1 was trained.
    fn encode_prompt(&self, prompt: &str, max_len: usize) -> Result<PromptEmbeddings> {
        let clip_ids = self
            .clip_tokenizer
            .encode(prompt, self.clip_tokenizer.max_length)?;
        let t5_ids = self.t5_tokenizer.encode(prompt, max_len)?;
        let pooled = self.clip.pooled(&clip_ids)?;
        let t5 = self.t5.forward(&t5_ids)?;
        Ok(PromptEmbeddings {
            clip_ids,
            t5_ids,
            pooled,
            t5,
        })
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
            mlp_hidden: cfg.mlp_hidden,
            vae_channels: self.vae.config().block_out_channels.clone(),
        }
    }

    /// Noise over the latent image's own channels, then 2x2-packed.
    fn noise(&self, seed: u64, grid: LatentGrid) -> Result<Tensor> {
        let channels = self.packed_channels() / 4;
        sampling::pack(&sampling::noise(seed, channels, grid.h, grid.w)?)
    }

    fn sigmas(&self, steps: usize, tokens: usize, notes: &mut Vec<String>) -> Vec<f32> {
        if self.schedule.use_dynamic_shifting {
            notes.push(format!("schedule shifted for {tokens} image tokens"));
        }
        self.schedule.sigmas(steps, tokens)
    }

    fn condition(
        &self,
        rt: &Runtime,
        text: &PromptEmbeddings,
        grid: LatentGrid,
        _references: &[RgbImage],
        _notes: &mut Vec<String>,
    ) -> Result<Flux1Conditioning> {
        let rope = self
            .transformer
            .rope(text.t5.dim(1)?, grid.h / 2, grid.w / 2, &rt.device)?;
        Ok(Flux1Conditioning(rope))
    }

    fn velocity(
        &self,
        x: &Tensor,
        t: f32,
        guidance: Option<f32>,
        text: &PromptEmbeddings,
        cond: &Flux1Conditioning,
    ) -> Result<Tensor> {
        self.transformer
            .forward(x, &text.t5, &text.pooled, t, guidance, &cond.0)
    }

    fn unpack(&self, packed: &Tensor, grid: LatentGrid) -> Result<Tensor> {
        sampling::unpack(packed, grid.h, grid.w)
    }

    fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.vae.decode(z)
    }
}

/// The transformer's configuration and the weights with the name map its layout needs.
fn transformer_config(files: &CheckpointFiles, w: Weights) -> Result<(TransformerConfig, Weights)> {
    if let Some(p) = &files.transformer_config {
        // A diffusers folder may hold a GGUF transformer, which keeps BFL's names.
        if files.transformer_format == WeightFormat::Safetensors
            || w.stored_shape("x_embedder.weight").is_some()
        {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            return Ok((TransformerConfig::from_diffusers_json(&text, &w)?, w));
        }
    }
    bfl_transformer(w)
}

/// The configuration of a transformer stored with BFL's names (a single file or a GGUF), read
/// from its tensors' shapes, and the weights with the map from kiln's names to BFL's.
pub(crate) fn bfl_transformer(w: Weights) -> Result<(TransformerConfig, Weights)> {
    let prefix = w.bfl_prefix("FLUX.1")?;
    let cfg = TransformerConfig::infer_bfl(&w, prefix)?;
    let map = NameMap::BflTransformer {
        prefix: prefix.to_string(),
        hidden: cfg.hidden(),
        mlp: cfg.mlp_hidden,
    };
    Ok((cfg, w.with_map(map)))
}
