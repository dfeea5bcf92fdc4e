//! Where a FLUX.2 checkpoint's parts are: a diffusers folder or BFL's single files, and the
//! variant each tells.

use super::transformer::Flux2TransformerConfig;
use super::Flux2Variant;
use crate::checkpoint::{
    bfl_transformer_file, diffusers_transformer, model_index, read_config, safetensors_files,
    CheckpointSettings, Layout, WeightFormat,
};
use crate::error::{Error, Result};
use crate::sampling::ScheduleConfig;
use crate::weights::{NameMap, Weights};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The transformer's configuration and weights: diffusers' names with `config.json`, or
/// BFL's names (a BFL file or a GGUF, which keeps them, dropped into `transformer/`) with the
/// configuration read from the tensors.
pub(super) fn transformer_config(
    xdir: &Path,
    w: Weights,
) -> Result<(Flux2TransformerConfig, Weights)> {
    if w.stored_shape("x_embedder.weight").is_some() {
        return Ok((read_config(&xdir.join("config.json"))?, w));
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
pub(super) struct Flux2Files {
    pub(super) layout: Layout,
    /// `None` for BFL files until the transformer's weights are read.
    pub(super) variant: Option<Flux2Variant>,
    pub(super) settings: CheckpointSettings,
    pub(super) transformer_format: WeightFormat,
    pub(super) transformer: Vec<PathBuf>,
    /// Where a diffusers transformer's `config.json` is (BFL-named weights carry their own).
    pub(super) transformer_dir: PathBuf,
    pub(super) vae: Vec<PathBuf>,
    /// diffusers' `vae/config.json`; BFL's `ae.safetensors` is read from its tensors.
    pub(super) vae_config: Option<PathBuf>,
    pub(super) scheduler_config: Option<PathBuf>,
    pub(super) text_encoder: PathBuf,
    pub(super) tokenizer: PathBuf,
    /// BFL's name for klein's undistilled base (`flux-2-klein-base-4b.safetensors`): nothing
    /// in its weights tells it from the distilled one.
    pub(super) named_base: bool,
}

impl Flux2Files {
    pub(super) fn detect(dir: &Path) -> Result<Self> {
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
            layout: Layout::Diffusers,
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
            layout: Layout::BflSingleFile,
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
    pub(super) fn variant(&self, transformer: &Flux2TransformerConfig) -> Flux2Variant {
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
pub(super) fn default_flux2_schedule() -> ScheduleConfig {
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
