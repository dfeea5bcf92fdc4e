//! What is on disk: which checkpoint layout a directory holds and where each part is.

use crate::error::{Error, Result};
use crate::pipeline::Runtime;
use crate::weights::{NameMap, Weights};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// How a checkpoint directory is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers folder: `model_index.json`, `transformer/`, `vae/`, ...
    Diffusers,
    /// BFL's single files (`flux1-*.safetensors` or a `.gguf`, `ae.safetensors`) beside the
    /// text encoders' and tokenizers' folders.
    BflSingleFile,
}

/// How the transformer's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// A GGUF file, block-quantized (Q8_0, Q4_0, Q4_K, ...) with BFL's tensor names.
    Gguf,
}

/// The files of a checkpoint, found by [`CheckpointFiles::detect`].
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub root: PathBuf,
    /// What clients are told the checkpoint is called ([`checkpoint_name`]).
    pub name: String,
    pub layout: Layout,
    pub transformer_format: WeightFormat,
    /// One file, or a sharded checkpoint's shards.
    pub transformer: Vec<PathBuf>,
    /// diffusers' `transformer/config.json`; BFL files carry none.
    pub transformer_config: Option<PathBuf>,
    pub vae: Vec<PathBuf>,
    pub vae_config: Option<PathBuf>,
    pub scheduler_config: Option<PathBuf>,
    /// CLIP-L (transformers' folder with `config.json`).
    pub text_encoder: PathBuf,
    /// T5 (transformers' folder with `config.json`).
    pub text_encoder_2: PathBuf,
    pub tokenizer: PathBuf,
    pub tokenizer_2: PathBuf,
    /// What a diffusers folder's `model_index.json` says under `_kiln`.
    pub settings: CheckpointSettings,
}

/// Generation settings a checkpoint made for kiln carries in its `model_index.json`, under the
/// key `_kiln` (diffusers ignores keys starting with `_`): its own defaults, for a model
/// trained far from FLUX.1's resolution or step count. Other checkpoints have none.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSettings {
    /// Default steps, instead of the variant's (28 for dev, 4 for schnell).
    #[serde(default)]
    pub steps: Option<u32>,
    /// The most pixels the model generates at: a larger request is generated at this area
    /// (its aspect ratio kept as closely as the size multiple allows) and upscaled.
    #[serde(default)]
    pub max_pixels: Option<u32>,
    /// What the model is, in a sentence: shown in the engine's description and in every
    /// result's notes.
    #[serde(default)]
    pub description: Option<String>,
    /// The checkpoint was trained with captions dropped and is sampled with true
    /// classifier-free guidance against the empty prompt at this scale, as diffusers'
    /// `FluxPipeline` does with `true_cfg_scale` and `negative_prompt=""`. For a checkpoint
    /// without a guidance embedding a request's guidance sets this scale.
    #[serde(default)]
    pub true_cfg_scale: Option<f32>,
    /// FLUX.2 only: the text encoder layers whose hidden states are stacked (1-based, as
    /// transformers counts `hidden_states`), for a checkpoint whose text encoder is not one
    /// of the reference sizes (klein's Qwen3 uses 9, 18, 27; dev's Mistral 10, 20, 30).
    #[serde(default)]
    pub text_encoder_out_layers: Option<Vec<usize>>,
    /// BFL layouts only: the autoencoder's GroupNorm groups, for one smaller than BFL's (whose
    /// are 32; the weights do not say).
    #[serde(default)]
    pub autoencoder_norm_groups: Option<usize>,
}

/// Where a checkpoint without `model_index.json` (BFL's single files) keeps its `_kiln`
/// settings, as a JSON object of the same fields.
pub const BFL_SETTINGS_FILE: &str = "kiln.json";

impl CheckpointSettings {
    /// A BFL layout's [`BFL_SETTINGS_FILE`], or the defaults where there is none.
    pub(crate) fn from_bfl_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(BFL_SETTINGS_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        Self::deserialize(read_json(&path)?).map_err(|e| Error::checkpoint(&path, e.to_string()))
    }

    /// The `_kiln` entry of a `model_index.json`, or the defaults where there is none.
    pub(crate) fn from_index(index: &Value, index_path: &Path) -> Result<Self> {
        match index.get("_kiln") {
            Some(v) => Self::deserialize(v)
                .map_err(|e| Error::checkpoint(index_path, format!("`_kiln`: {e}"))),
            None => Ok(Self::default()),
        }
    }
}

/// A diffusers `transformer/` folder's weights: its one GGUF file, its
/// `diffusion_pytorch_model` safetensors (or shards), or else its one `.safetensors` file of
/// another name (a BFL single file put there in place of diffusers' weights).
pub(crate) fn diffusers_transformer(tdir: &Path) -> Result<(WeightFormat, Vec<PathBuf>)> {
    if let Some(g) = gguf_files(tdir)? {
        return Ok((WeightFormat::Gguf, vec![g]));
    }
    let diffusers = safetensors_files(tdir, "diffusion_pytorch_model");
    if diffusers.is_ok() {
        return Ok((WeightFormat::Safetensors, diffusers?));
    }
    let others: Vec<PathBuf> = list(tdir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    match others.as_slice() {
        [one] => Ok((WeightFormat::Safetensors, vec![one.clone()])),
        _ => diffusers.map(|f| (WeightFormat::Safetensors, f)),
    }
}

impl CheckpointFiles {
    /// Looks at `dir` and says which layout it holds, or why it is none this engine loads.
    pub fn detect(dir: &Path) -> Result<Self> {
        match model_index(dir)? {
            Some((index_path, index)) => Self::diffusers(dir, &index_path, &index),
            None => Self::bfl(dir),
        }
    }

    fn diffusers(dir: &Path, index_path: &Path, index: &Value) -> Result<Self> {
        let class = index["_class_name"].as_str().unwrap_or("");
        if class.starts_with("Flux2") || class.contains("Kontext") || class.contains("Fill") {
            return Err(Error::checkpoint(
                dir,
                format!("{class} is not a FLUX.1 text-to-image pipeline"),
            ));
        }
        for part in [
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
        ] {
            if index[part].is_null() || !dir.join(part).is_dir() {
                return Err(Error::checkpoint(
                    dir,
                    format!(
                        "diffusers folder without the `{part}` component a FLUX.1 pipeline needs"
                    ),
                ));
            }
        }
        let settings = CheckpointSettings::from_index(index, index_path)?;
        let tdir = dir.join("transformer");
        let (transformer_format, transformer) = diffusers_transformer(&tdir)?;
        let vdir = dir.join("vae");
        let scheduler = dir.join("scheduler/scheduler_config.json");
        Ok(Self {
            root: dir.to_path_buf(),
            name: checkpoint_name(dir),
            layout: Layout::Diffusers,
            transformer_format,
            transformer,
            transformer_config: Some(tdir.join("config.json")),
            vae: safetensors_files(&vdir, "diffusion_pytorch_model")?,
            vae_config: Some(vdir.join("config.json")),
            scheduler_config: scheduler.is_file().then_some(scheduler),
            text_encoder: dir.join("text_encoder"),
            text_encoder_2: dir.join("text_encoder_2"),
            tokenizer: dir.join("tokenizer"),
            tokenizer_2: dir.join("tokenizer_2"),
            settings,
        })
    }

    fn bfl(dir: &Path) -> Result<Self> {
        let ae = dir.join("ae.safetensors");
        let (transformer_format, transformer) = bfl_transformer_file(
            dir,
            "no checkpoint found: expected a diffusers folder (model_index.json) or BFL single \
             files (flux1-*.safetensors or a .gguf transformer, ae.safetensors, and the \
             text_encoder, text_encoder_2, tokenizer, tokenizer_2 folders)",
        )?;
        if !ae.is_file() {
            return Err(Error::checkpoint(
                dir,
                "BFL layout without ae.safetensors (the autoencoder)",
            ));
        }
        for part in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"] {
            if !dir.join(part).is_dir() {
                return Err(Error::checkpoint(
                    dir,
                    format!("BFL layout without the `{part}` folder (transformers' format) beside the single files"),
                ));
            }
        }
        Ok(Self {
            root: dir.to_path_buf(),
            name: checkpoint_name(dir),
            layout: Layout::BflSingleFile,
            transformer_format,
            transformer: vec![transformer],
            transformer_config: None,
            vae: vec![ae],
            vae_config: None,
            scheduler_config: None,
            text_encoder: dir.join("text_encoder"),
            text_encoder_2: dir.join("text_encoder_2"),
            tokenizer: dir.join("tokenizer"),
            tokenizer_2: dir.join("tokenizer_2"),
            settings: CheckpointSettings::from_bfl_dir(dir)?,
        })
    }
}

/// What clients are told a checkpoint is called: the title of its model card (`MODEL_CARD.md`
/// or `README.md`, the first `# ` heading after any YAML front matter, as Hugging Face cards
/// have), else its folder's name. Never a path: result metadata must not show clients where the
/// server keeps its files (logs may).
pub fn checkpoint_name(dir: &Path) -> String {
    ["MODEL_CARD.md", "README.md"]
        .iter()
        .filter_map(|card| std::fs::read_to_string(dir.join(card)).ok())
        .find_map(|text| card_title(&text))
        .or_else(|| folder_name(dir))
        .unwrap_or_else(|| "unnamed checkpoint".to_string())
}

/// A Markdown model card's first level-1 heading, skipping YAML front matter.
fn card_title(text: &str) -> Option<String> {
    let mut lines = text.lines();
    let mut body: Vec<&str> = Vec::new();
    match lines.next() {
        // Front matter runs to the next `---`.
        Some(first) if first.trim() == "---" => {
            lines.by_ref().find(|l| l.trim() == "---")?;
        }
        Some(first) => body.push(first),
        None => return None,
    }
    body.into_iter()
        .chain(lines)
        .find_map(|l| l.strip_prefix("# "))
        .map(|title| title.trim().to_string())
        .filter(|title| !title.is_empty())
}

/// The directory's own name (resolving `.` and `..`).
fn folder_name(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    Some(dir.file_name()?.to_string_lossy().into_owned())
}

/// Which family a checkpoint directory holds, from what is on disk: a diffusers folder's
/// pipeline class (`Flux2Pipeline`, `Flux2KleinPipeline`: FLUX.2), or for BFL's single files
/// the text encoders (FLUX.1 has a second one, T5, in `text_encoder_2/`; FLUX.2 one).
pub fn checkpoint_family(dir: &Path) -> Result<kiln_core::catalog::ModelFamily> {
    use kiln_core::catalog::ModelFamily;
    let flux2 = match model_index(dir)? {
        Some((_, index)) => index["_class_name"]
            .as_str()
            .is_some_and(|class| class.starts_with("Flux2")),
        None => !dir.join("text_encoder_2").is_dir(),
    };
    Ok(if flux2 {
        ModelFamily::Flux2
    } else {
        ModelFamily::Flux1
    })
}

/// A checkpoint directory's `model_index.json` (its path and contents) where it is a diffusers
/// folder, `None` where it is not (BFL's single files), or why it is no directory at all.
pub(crate) fn model_index(dir: &Path) -> Result<Option<(PathBuf, Value)>> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(dir, "not a directory"));
    }
    let path = dir.join("model_index.json");
    if !path.is_file() {
        return Ok(None);
    }
    let index = read_json(&path)?;
    Ok(Some((path, index)))
}

/// The one transformer file of a BFL layout: a `.gguf`, or the one `.safetensors` file that
/// is not `ae.safetensors`; `none_found` says what was expected where there is none.
pub(crate) fn bfl_transformer_file(
    dir: &Path,
    none_found: &str,
) -> Result<(WeightFormat, PathBuf)> {
    let gguf = gguf_files(dir)?;
    let singles: Vec<PathBuf> = list(dir)?
        .into_iter()
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && p.file_name().is_some_and(|n| n != "ae.safetensors")
        })
        .collect();
    match (gguf, singles.as_slice()) {
        (Some(g), []) => Ok((WeightFormat::Gguf, g)),
        (None, [one]) => Ok((WeightFormat::Safetensors, one.clone())),
        (None, []) => Err(Error::checkpoint(dir, none_found)),
        _ => Err(Error::checkpoint(
            dir,
            format!(
                "more than one transformer file; keep one of: {}",
                singles
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(path, format!("invalid JSON: {e}")))
}

/// A component's JSON configuration (a `config.json`), as `T`.
pub(crate) fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    serde_json::from_value(read_json(path)?).map_err(|e| Error::checkpoint(path, e.to_string()))
}

/// The transformer's weights, mapped from their files in either format.
pub(crate) fn open_transformer(
    format: WeightFormat,
    files: &[PathBuf],
    rt: &Runtime,
) -> Result<Weights> {
    match format {
        WeightFormat::Safetensors => Weights::open_safetensors(files, rt),
        WeightFormat::Gguf => Weights::open_gguf(&files[0], rt),
    }
}

/// How a transformer's weights are stored, where that is worth telling: "GGUF Q8_0
/// transformer" (the block quantizations the file holds).
pub(crate) fn gguf_description(format: WeightFormat, files: &[PathBuf]) -> Option<String> {
    (format == WeightFormat::Gguf).then(|| {
        let kinds = gguf_quantization(&files[0]).unwrap_or_else(|| "unreadable".into());
        format!("GGUF {kinds} transformer")
    })
}

/// Which block quantizations a GGUF file holds (e.g. "Q8_0" or "Q4_K+Q6_K"), or
/// "unquantized"; `None` if it cannot be read.
fn gguf_quantization(path: &Path) -> Option<String> {
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

/// The autoencoder's configuration and weights: diffusers' `config.json` where there is one,
/// else BFL's `ae.safetensors` read from its tensors (`infer`, with the checkpoint's GroupNorm
/// groups) under BFL's names.
pub(crate) fn open_vae<C: DeserializeOwned + crate::vae::UpBlocks>(
    files: &[PathBuf],
    config: Option<&Path>,
    settings: &CheckpointSettings,
    rt: &Runtime,
    infer: impl Fn(&Weights, usize) -> Result<C>,
) -> Result<(C, Weights)> {
    let w = Weights::open_safetensors(files, rt)?;
    match config {
        Some(path) => Ok((read_config(path)?, w)),
        None => {
            let groups = settings
                .autoencoder_norm_groups
                .unwrap_or(crate::vae::groups());
            let cfg = infer(&w, groups)?;
            let up_blocks = cfg.up_blocks();
            Ok((cfg, w.with_map(NameMap::BflVae { up_blocks })))
        }
    }
}

fn list(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    Ok(out)
}

/// The one `.gguf` file of a folder, if any.
fn gguf_files(dir: &Path) -> Result<Option<PathBuf>> {
    let g: Vec<PathBuf> = list(dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    match g.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        _ => Err(Error::checkpoint(dir, "more than one .gguf file; keep one")),
    }
}

/// `{stem}.safetensors`, or the shards its `.index.json` lists.
pub(crate) fn safetensors_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let index = dir.join(format!("{stem}.safetensors.index.json"));
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::checkpoint(&index, "no weight_map"))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    let single = dir.join(format!("{stem}.safetensors"));
    if single.is_file() {
        Ok(vec![single])
    } else {
        Err(Error::checkpoint(
            dir,
            format!("no {stem}.safetensors (nor a sharded index)"),
        ))
    }
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn a_model_card_title_names_a_checkpoint_else_its_folder() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("FLUX.1-dev");
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(checkpoint_name(&dir), "FLUX.1-dev");
        assert_eq!(
            checkpoint_name(&dir.join("..").join("FLUX.1-dev")),
            "FLUX.1-dev"
        );
        std::fs::write(
            dir.join("README.md"),
            "---\nlicense: other\ntitle: not this\n---\n\n# FLUX.1 [dev]\n\nText.\n# Later\n",
        )
        .unwrap();
        assert_eq!(checkpoint_name(&dir), "FLUX.1 [dev]");
        std::fs::write(dir.join("MODEL_CARD.md"), "# kiln demo checkpoint\n").unwrap();
        assert_eq!(
            checkpoint_name(&dir),
            "kiln demo checkpoint",
            "MODEL_CARD.md first"
        );
        std::fs::write(dir.join("MODEL_CARD.md"), "no heading here\n").unwrap();
        assert_eq!(
            checkpoint_name(&dir),
            "FLUX.1 [dev]",
            "a card without a title is skipped"
        );
    }
}
