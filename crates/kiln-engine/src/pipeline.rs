//! The FLUX.1 text-to-image pipeline (diffusers' `FluxPipeline`): load a checkpoint once, then
//! prompt -> CLIP + T5 -> denoise with the transformer -> VAE decode -> RGB.

use crate::checkpoint::{read_json, CheckpointFiles, Layout, WeightFormat};
use crate::clip::ClipTextModel;
use crate::error::{Error, Result};
use crate::image_io::{preview, to_rgb};
use crate::sampling::{self, ScheduleConfig};
use crate::t5::{T5Config, T5Encoder};
use crate::tokenizer::PromptTokenizer;
use crate::transformer::{FluxTransformer, TransformerConfig};
use crate::vae::{groups, VaeConfig, VaeDecoder};
use crate::weights::{NameMap, Weights};
use candle_core::{DType, Device, Tensor};
use kiln_core::engine::{AppliedSettings, RgbImage, StepObserver};
use kiln_core::params::{GenerationParams, ImageSize};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// A CUDA device by ordinal (`"cuda"` is `"cuda:0"`); needs the `cuda` feature.
    Cuda(usize),
}

impl From<DeviceSpec> for String {
    fn from(device: DeviceSpec) -> Self {
        match device {
            DeviceSpec::Cpu => "cpu".to_string(),
            DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("device {other:?}: expected cpu, cuda or cuda:N")),
        }
    }
}

/// Compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

/// How to load a checkpoint.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineOptions {
    pub device: DeviceSpec,
    /// `None`: f32 on the CPU, bf16 on CUDA (what the references run FLUX in).
    pub precision: Option<Precision>,
}

impl EngineOptions {
    pub(crate) fn device(&self) -> Result<Device> {
        match self.device {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => Ok(Device::new_cuda(i)?),
        }
    }
    pub(crate) fn dtype(&self) -> DType {
        match (self.precision, self.device) {
            (Some(Precision::F32), _) | (None, DeviceSpec::Cpu) => DType::F32,
            (Some(Precision::Bf16), _) | (None, DeviceSpec::Cuda(_)) => DType::BF16,
            (Some(Precision::F16), _) => DType::F16,
        }
    }
}

/// Loading progress: `done` of `total` units of a component (the transformer counts blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    pub component: &'static str,
    pub done: usize,
    pub total: usize,
}

/// Which FLUX.1 a checkpoint is, from its weights: dev has a guidance embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Dev,
    Schnell,
}

/// Sampling settings used when a request does not say.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingDefaults {
    pub steps: u32,
    /// `None` for schnell, which takes no guidance.
    pub guidance: Option<f32>,
    pub max_sequence_length: usize,
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
    /// Packed initial latents `(1, tokens, in_channels)` instead of seeded noise (diffusers'
    /// `latents=`).
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
        steps: Option<u32>,
        guidance: Option<f32>,
        max_sequence_length: Option<usize>,
        preview_interval: u32,
    ) -> Self {
        Self {
            prompt: params.prompt.as_str().to_string(),
            width: size.width,
            height: size.height,
            steps: params.num_inference_steps.or(steps),
            guidance: params.guidance_scale.or(guidance),
            seed: u64::from(params.seed),
            max_sequence_length,
            initial_latents: None,
            preview_interval,
        }
    }
}

pub struct PipelineOutput {
    pub image: RgbImage,
    /// The packed latents the VAE decoded, f32 on the CPU.
    pub final_latents: Tensor,
    pub applied: AppliedSettings,
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

/// A loaded FLUX.1 checkpoint, resident on its device.
pub struct Flux1Pipeline {
    files: CheckpointFiles,
    device: Device,
    dtype: DType,
    clip_tokenizer: PromptTokenizer,
    t5_tokenizer: PromptTokenizer,
    clip: ClipTextModel,
    t5: T5Encoder,
    transformer: FluxTransformer,
    vae: VaeDecoder,
    schedule: ScheduleConfig,
    quantization: Option<String>,
}

fn config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_value(read_json(path)?).map_err(|e| Error::checkpoint(path, e.to_string()))
}

impl Flux1Pipeline {
    /// Loads the checkpoint in `dir` (any supported layout), reporting progress as it goes.
    pub fn load(
        dir: &Path,
        options: &EngineOptions,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self> {
        let files = CheckpointFiles::detect(dir)?;
        let device = options.device()?;
        let dtype = options.dtype();
        let mut report = |component, done, total| {
            progress(LoadProgress {
                component,
                done,
                total,
            })
        };

        let clip_tokenizer = PromptTokenizer::clip(&files.tokenizer)?;
        let t5_tokenizer = PromptTokenizer::t5(&files.tokenizer_2)?;
        report("tokenizers", 1, 1);

        let text_weights = |d: &Path| -> Result<Weights> {
            Weights::open_safetensors(
                &crate::checkpoint::safetensors_files(d, "model")?,
                &device,
                dtype,
            )
        };
        let clip = ClipTextModel::load(
            config(&files.text_encoder.join("config.json"))?,
            &text_weights(&files.text_encoder)?,
        )?;
        report("text_encoder", 1, 1);
        let t5_cfg: T5Config = config(&files.text_encoder_2.join("config.json"))?;
        let t5 = T5Encoder::load(t5_cfg, &text_weights(&files.text_encoder_2)?)?;
        report("text_encoder_2", 1, 1);

        let tw = match files.transformer_format {
            WeightFormat::Safetensors => {
                Weights::open_safetensors(&files.transformer, &device, dtype)?
            }
            WeightFormat::Gguf => Weights::open_gguf(&files.transformer[0], &device, dtype)?,
        };
        let (tcfg, tw) = transformer_config(&files, tw)?;
        let quantization = quantization_summary(&files);
        let transformer =
            FluxTransformer::load(tcfg, &tw, &mut |d, t| report("transformer", d, t))?;

        let vw = Weights::open_safetensors(&files.vae, &device, dtype)?;
        let (vcfg, vw) = match &files.vae_config {
            Some(p) => (config::<VaeConfig>(p)?, vw),
            None => {
                let groups = files.settings.autoencoder_norm_groups.unwrap_or(groups());
                let c = VaeConfig::infer_bfl(&vw, groups)?;
                let up_blocks = c.block_out_channels.len();
                (c, vw.with_map(NameMap::BflVae { up_blocks }))
            }
        };
        let vae = VaeDecoder::load(vcfg, &vw)?;
        report("vae", 1, 1);

        let schedule = match &files.scheduler_config {
            Some(p) => config(p)?,
            None => ScheduleConfig::for_guidance_distilled(transformer.config().guidance_embeds),
        };
        Ok(Self {
            files,
            device,
            dtype,
            clip_tokenizer,
            t5_tokenizer,
            clip,
            t5,
            transformer,
            vae,
            schedule,
            quantization,
        })
    }

    pub fn variant(&self) -> Variant {
        if self.transformer.config().guidance_embeds {
            Variant::Dev
        } else {
            Variant::Schnell
        }
    }

    /// The defaults a request falls back on: the variant's, except where the checkpoint's own
    /// settings say otherwise, and T5 never padded past its tokenizer's `model_max_length`.
    pub fn defaults(&self) -> SamplingDefaults {
        let variant = self.variant().defaults();
        SamplingDefaults {
            steps: self.files.settings.steps.unwrap_or(variant.steps),
            max_sequence_length: variant
                .max_sequence_length
                .min(self.t5_tokenizer.max_length),
            ..variant
        }
    }

    /// The size a `width x height` request is generated at: itself, or for a checkpoint with
    /// a `max_pixels` setting and a larger request, the size of at most `max_pixels` (and at
    /// least half that, where possible) whose aspect ratio is closest to the request's.
    pub fn generation_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.files.settings.max_pixels {
            Some(max) if width as u64 * height as u64 > max as u64 => {
                fit_area(width, height, max, self.size_multiple())
            }
            _ => (width, height),
        }
    }

    pub fn transformer_config(&self) -> &TransformerConfig {
        self.transformer.config()
    }

    pub fn vae_config(&self) -> &VaeConfig {
        self.vae.config()
    }

    /// Image sides must be multiples of this.
    pub fn size_multiple(&self) -> u32 {
        (self.vae.config().scale_factor() * 2) as u32
    }

    /// E.g. "FLUX.1 dev, diffusers layout, GGUF Q8_0 transformer, FLUX.1-dev on cuda:0 (bf16)":
    /// the checkpoint by name, never by path (clients see this in result metadata).
    pub fn describe(&self) -> String {
        let variant = match self.variant() {
            Variant::Dev => "dev",
            Variant::Schnell => "schnell",
        };
        let layout = match self.files.layout {
            Layout::Diffusers => "diffusers layout",
            Layout::BflSingleFile => "BFL single files",
        };
        let weights = match &self.quantization {
            Some(q) => format!(", GGUF {q} transformer"),
            None => String::new(),
        };
        let device = device_name(&self.device);
        let about = match &self.files.settings.description {
            Some(d) => format!(": {d}"),
            None => String::new(),
        };
        format!(
            "FLUX.1 {variant}, {layout}{weights}, {} on {device} ({:?}){about}",
            self.files.name, self.dtype
        )
    }

    /// CLIP's pooled vector and T5's hidden states for a prompt, T5 padded to
    /// `max_sequence_length` with no attention mask, as FLUX.1 was trained.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        max_sequence_length: usize,
    ) -> Result<PromptEmbeddings> {
        if max_sequence_length == 0 || max_sequence_length > self.t5_tokenizer.max_length {
            return Err(Error::InvalidRequest(format!(
                "max_sequence_length must be between 1 and {} (got {max_sequence_length})",
                self.t5_tokenizer.max_length
            )));
        }
        let clip_ids = self
            .clip_tokenizer
            .encode(prompt, self.clip_tokenizer.max_length)?;
        let t5_ids = self.t5_tokenizer.encode(prompt, max_sequence_length)?;
        let pooled = self.clip.pooled(&clip_ids)?;
        let t5 = self.t5.forward(&t5_ids)?;
        Ok(PromptEmbeddings {
            clip_ids,
            t5_ids,
            pooled,
            t5,
        })
    }

    /// The transformer's velocity for packed latents at noise level `sigma`.
    pub fn velocity(
        &self,
        latents: &Tensor,
        sigma: f32,
        guidance: Option<f32>,
        text: &PromptEmbeddings,
        width: u32,
        height: u32,
    ) -> Result<Tensor> {
        let (h, w) = self.latent_grid(width, height)?;
        let rope = self
            .transformer
            .rope(text.t5.dim(1)?, h / 2, w / 2, &self.device)?;
        self.velocity_with(latents, sigma, guidance, text, &rope)
    }

    fn velocity_with(
        &self,
        latents: &Tensor,
        sigma: f32,
        guidance: Option<f32>,
        text: &PromptEmbeddings,
        rope: &crate::transformer::Rope,
    ) -> Result<Tensor> {
        let g = guidance.map(|g| sampling::model_guidance(g, self.dtype));
        let t = sampling::model_timestep(sigma, self.dtype);
        let x = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        self.transformer
            .forward(&x, &text.t5, &text.pooled, t, g, rope)
    }

    /// Decodes packed latents to an image of `width x height`.
    pub fn decode(&self, packed: &Tensor, width: u32, height: u32) -> Result<RgbImage> {
        to_rgb(&self.decode_tensor(packed, width, height)?)
    }

    /// The decoder's output `(1, 3, height, width)` in [-1, 1].
    fn decode_tensor(&self, packed: &Tensor, width: u32, height: u32) -> Result<Tensor> {
        let (h, w) = self.latent_grid(width, height)?;
        let z = sampling::unpack(&packed.to_device(&self.device)?.to_dtype(self.dtype)?, h, w)?;
        self.vae.decode(&z)
    }

    /// The latent grid for an image, or why the size is unusable.
    fn latent_grid(&self, width: u32, height: u32) -> Result<(usize, usize)> {
        sampling::checked_latent_grid(width, height, self.vae.config().scale_factor())
    }

    /// Runs a whole generation.
    pub fn run(
        &self,
        req: &PipelineRequest,
        observer: &mut dyn StepObserver,
    ) -> Result<PipelineOutput> {
        let defaults = self.defaults();
        let steps = sampling::checked_steps(req.steps, defaults.steps)?;
        let mut notes: Vec<String> = self.files.settings.description.iter().cloned().collect();
        notes.push(format!("seed {}", req.seed));
        let true_cfg = self.files.settings.true_cfg_scale;
        // `guidance` goes to the guidance embedding (dev); `cfg_scale` weighs the prompt's
        // velocity against the empty prompt's, for a checkpoint trained for that.
        let (guidance, cfg_scale) = match (self.variant(), req.guidance, true_cfg) {
            (Variant::Dev, g, cfg) => (g.or(defaults.guidance), cfg),
            (Variant::Schnell, g, Some(cfg)) => (None, Some(g.unwrap_or(cfg))),
            (Variant::Schnell, Some(_), None) => {
                notes.push(
                    "guidance ignored: this checkpoint has no guidance embedding (schnell)".into(),
                );
                (None, None)
            }
            (Variant::Schnell, None, None) => (None, None),
        };
        // As diffusers: a scale of 1 or less is no guidance at all.
        let cfg_scale = cfg_scale.filter(|s| *s > 1.0);
        let max_len = req
            .max_sequence_length
            .unwrap_or(defaults.max_sequence_length);
        notes.push(format!("max_sequence_length {max_len}"));
        // The requested size is checked even when another is generated.
        self.latent_grid(req.width, req.height)?;
        let (gen_w, gen_h) = self.generation_size(req.width, req.height);
        if (gen_w, gen_h) != (req.width, req.height) {
            notes.push(format!(
                "generated at {gen_w}x{gen_h} (this checkpoint's maximum is {} pixels), upscaled to {}x{}",
                self.files.settings.max_pixels.unwrap_or_default(),
                req.width,
                req.height
            ));
        }
        let (h, w) = self.latent_grid(gen_w, gen_h)?;
        let channels = self.transformer.config().in_channels / 4;
        let tokens = (h / 2) * (w / 2);

        sampling::check_stop(observer)?;
        let text = self.encode_prompt(&req.prompt, max_len)?;
        // The empty prompt's encoding and the scale it is guided against.
        let unconditional = match cfg_scale {
            Some(s) => {
                notes.push(format!(
                    "true classifier-free guidance {s} against the empty prompt"
                ));
                sampling::check_stop(observer)?;
                Some((self.encode_prompt("", max_len)?, s))
            }
            None => None,
        };
        let latents = match &req.initial_latents {
            Some(l) => {
                if l.dims() != [1, tokens, channels * 4] {
                    return Err(Error::InvalidRequest(format!(
                        "initial latents have shape {:?}; {gen_w}x{gen_h} needs [1, {tokens}, {}]",
                        l.dims(),
                        channels * 4
                    )));
                }
                notes.push("initial latents given".into());
                l.to_device(&self.device)?.to_dtype(self.dtype)?
            }
            None => sampling::pack(&sampling::noise(req.seed, channels, h, w)?)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?,
        };
        let sigmas = self.schedule.sigmas(steps as usize, tokens);
        if self.schedule.use_dynamic_shifting {
            notes.push(format!("schedule shifted for {tokens} image tokens"));
        }
        let rope = self
            .transformer
            .rope(text.t5.dim(1)?, h / 2, w / 2, &self.device)?;
        let latents = sampling::denoise(
            latents,
            &sigmas,
            req.preview_interval,
            observer,
            &mut |x, sigma| {
                let v = self.velocity_with(x, sigma, guidance, &text, &rope)?;
                match &unconditional {
                    Some((empty, s)) => {
                        let vn = self.velocity_with(x, sigma, guidance, empty, &rope)?;
                        sampling::guided(&v, &vn, *s)
                    }
                    None => Ok(v),
                }
            },
            &|x0| preview(&sampling::unpack(x0, h, w)?),
        )?;
        sampling::check_stop(observer)?;
        let mut image = self.decode_tensor(&latents, gen_w, gen_h)?;
        if (gen_w, gen_h) != (req.width, req.height) {
            image = image.upsample_bilinear2d(req.height as usize, req.width as usize, false)?;
        }
        let image = to_rgb(&image)?;
        Ok(PipelineOutput {
            image,
            final_latents: latents.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
            applied: AppliedSettings {
                num_inference_steps: steps,
                guidance: guidance.or(cfg_scale),
                prompt: req.prompt.clone(),
                notes,
            },
        })
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
    let prefix = w.bfl_prefix("FLUX.1")?;
    let cfg = TransformerConfig::infer_bfl(&w, prefix)?;
    let map = NameMap::BflTransformer {
        prefix: prefix.to_string(),
        hidden: cfg.hidden(),
        mlp: cfg.mlp_hidden,
    };
    Ok((cfg, w.with_map(map)))
}

/// For a GGUF transformer, which block quantizations it holds (e.g. "Q8_0" or "Q4_K+Q6_K").
fn quantization_summary(files: &CheckpointFiles) -> Option<String> {
    if files.transformer_format != WeightFormat::Gguf {
        return None;
    }
    gguf_quantization(&files.transformer[0])
}

/// "cpu" with what runs its matrix products, or the accelerator's location (e.g.
/// "Cuda { gpu_id: 0 }").
pub(crate) fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu, matrix products by {}", kiln_kernels::gemm::describe()),
        d => format!("{:?}", d.location()),
    }
}

/// Which block quantizations a GGUF file holds (e.g. "Q8_0" or "Q4_K+Q6_K"), or
/// "unquantized"; `None` if it cannot be read.
pub(crate) fn gguf_quantization(path: &Path) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).ok()?;
    let mut kinds: Vec<String> = content
        .tensor_infos
        .values()
        .map(|i| format!("{:?}", i.ggml_dtype))
        .filter(|k| !matches!(k.as_str(), "F32" | "F16" | "BF16"))
        .collect();
    kinds.sort();
    kinds.dedup();
    Some(if kinds.is_empty() {
        "unquantized".into()
    } else {
        kinds.join("+")
    })
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
