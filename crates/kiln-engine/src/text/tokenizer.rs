//! Prompt tokenizers from the files real repositories ship: CLIP's `vocab.json` + `merges.txt`
//! (FLUX.1's `tokenizer/` has no `tokenizer.json`) or a `tokenizer.json` (T5's `tokenizer_2/`).
//! Special tokens, padding token and maximum length come from `tokenizer_config.json`.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// transformers' `CLIPTokenizer` pre-tokenization pattern.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A tokenizer that frames (`bos`? ... `eos`), truncates and pads to a fixed length, as
/// `tokenizer(prompt, padding="max_length", truncation=True)` does.
pub(crate) struct PromptTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: u32,
    /// `model_max_length` from tokenizer_config.json.
    pub(crate) max_length: usize,
    dir: PathBuf,
}

impl PromptTokenizer {
    /// CLIP's tokenizer: BOS, text, EOS, padded with the configured pad token (FLUX.1 ships
    /// `<|endoftext|>`), 77 tokens unless configured otherwise.
    pub(crate) fn clip(dir: &Path) -> Result<Self> {
        let cfg = TokenizerConfig::read(dir)?;
        let inner = if dir.join("tokenizer.json").exists() {
            load_json(dir)?
        } else {
            build_clip_bpe(
                dir,
                &cfg.token("unk_token")
                    .unwrap_or_else(|| "<|endoftext|>".into()),
            )?
        };
        let mut t = Self::from_parts(
            dir,
            inner,
            &cfg,
            "<|startoftext|>",
            "<|endoftext|>",
            "<|endoftext|>",
            77,
        )?;
        t.add_specials()?;
        Ok(t)
    }

    /// T5's tokenizer: text then EOS, padded with `<pad>` (no BOS).
    pub(crate) fn t5(dir: &Path) -> Result<Self> {
        let cfg = TokenizerConfig::read(dir)?;
        let inner = load_json(dir)?;
        let mut t = Self::from_parts(dir, inner, &cfg, "", "</s>", "<pad>", 512)?;
        t.bos = None;
        Ok(t)
    }

    /// A chat model's tokenizer (Qwen3, Mistral) for text already framed by its chat
    /// template, which writes any BOS itself: nothing added, padded on the right with the
    /// configured pad token (Qwen's `<|endoftext|>` if none is configured).
    pub(crate) fn chat(dir: &Path) -> Result<Self> {
        let cfg = TokenizerConfig::read(dir)?;
        // Left padding would move the prompt's positions and put padding rows first in the
        // embeddings the transformer reads; only right padding is implemented and checked.
        if cfg.json["padding_side"].as_str() == Some("left") {
            return Err(Error::Tokenizer {
                path: dir.to_path_buf(),
                message: "padding_side \"left\" is not supported: this engine pads on the right"
                    .into(),
            });
        }
        let inner = load_json(dir)?;
        let mut t = Self::from_parts(dir, inner, &cfg, "", "<|im_end|>", "<|endoftext|>", 131_072)?;
        t.eos = None;
        Ok(t)
    }

    fn from_parts(
        dir: &Path,
        inner: Tokenizer,
        cfg: &TokenizerConfig,
        bos: &str,
        eos: &str,
        pad: &str,
        default_max: usize,
    ) -> Result<Self> {
        let id = |key: &str, default: &str| -> Result<u32> {
            let tok = cfg.token(key).unwrap_or_else(|| default.to_string());
            inner.token_to_id(&tok).ok_or_else(|| Error::Tokenizer {
                path: dir.to_path_buf(),
                message: format!("{key} {tok:?} is not in the vocabulary"),
            })
        };
        Ok(Self {
            bos: if bos.is_empty() {
                None
            } else {
                Some(id("bos_token", bos)?)
            },
            eos: Some(id("eos_token", eos)?),
            pad: id("pad_token", pad)?,
            max_length: cfg.max_length.unwrap_or(default_max),
            inner,
            dir: dir.to_path_buf(),
        })
    }

    /// Special tokens written in a prompt are recognised as such, as in transformers.
    fn add_specials(&mut self) -> Result<()> {
        let specials: Vec<AddedToken> = [self.bos, self.eos]
            .into_iter()
            .flatten()
            .filter_map(|id| self.inner.id_to_token(id))
            .map(|t| AddedToken::from(t, true))
            .collect();
        self.inner
            .add_special_tokens(specials)
            .map_err(|e| self.error(e))?;
        Ok(())
    }

    /// Exactly `length` ids: framed, truncated (keeping the special tokens), padded.
    pub(crate) fn encode(&self, text: &str, length: usize) -> Result<Vec<u32>> {
        Ok(self.encode_with_mask(text, length)?.0)
    }

    /// [`Self::encode`] and how many of the ids are not padding (the attention mask's ones).
    pub(crate) fn encode_with_mask(&self, text: &str, length: usize) -> Result<(Vec<u32>, usize)> {
        let text_ids = self.ids(text)?;
        let specials = usize::from(self.bos.is_some()) + usize::from(self.eos.is_some());
        let room = length.saturating_sub(specials);
        let mut ids = Vec::with_capacity(length);
        ids.extend(self.bos);
        ids.extend(text_ids.iter().take(room));
        ids.extend(self.eos);
        let valid = ids.len();
        ids.resize(length, self.pad);
        Ok((ids, valid))
    }

    /// The text's own token ids: no framing, truncation or padding.
    pub(crate) fn ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.error(e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids back to text, special tokens left out (`skip_special_tokens=True`).
    pub(crate) fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.error(e))
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer {
            path: self.dir.clone(),
            message: e.to_string(),
        }
    }
}

fn load_json(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
        path,
        message: e.to_string(),
    })
}

/// The BPE tokenizer transformers' `CLIPTokenizer` builds from `vocab.json` and `merges.txt`.
fn build_clip_bpe(dir: &Path, unk: &str) -> Result<Tokenizer> {
    let err = |message: String| Error::Tokenizer {
        path: dir.to_path_buf(),
        message,
    };
    let vocab = dir.join("vocab.json");
    let merges = dir.join("merges.txt");
    if !vocab.exists() || !merges.exists() {
        return Err(err(
            "neither tokenizer.json nor vocab.json + merges.txt".into()
        ));
    }
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .unk_token(unk.to_string())
        .end_of_word_suffix("</w>".to_string())
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut tok = Tokenizer::new(bpe);
    let whitespace = Replace::new(r"\s+", " ").map_err(|e| err(e.to_string()))?;
    tok.with_normalizer(Some(NormSequence::new(vec![
        NFC.into(),
        whitespace.into(),
        Lowercase.into(),
    ])))
    .map_err(|e| err(e.to_string()))?;
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| err(e.to_string()))?;
    tok.with_pre_tokenizer(Some(PreSequence::new(vec![
        split.into(),
        ByteLevel::new(false, true, false).into(),
    ])));
    Ok(tok)
}

/// What `tokenizer_config.json` (or, failing it, `special_tokens_map.json`) says.
struct TokenizerConfig {
    json: Value,
    specials: Value,
    max_length: Option<usize>,
}

impl TokenizerConfig {
    fn read(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Value> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
                    path,
                    message: e.to_string(),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Value::Null),
                Err(e) => Err(Error::io(path, e)),
            }
        };
        let json = read("tokenizer_config.json")?;
        let specials = read("special_tokens_map.json")?;
        // transformers writes a huge sentinel when the length is unbounded.
        let max_length = json["model_max_length"]
            .as_f64()
            .filter(|&m| m < 1e9)
            .map(|m| m as usize);
        Ok(Self {
            json,
            specials,
            max_length,
        })
    }

    /// A special token, written either as a string or as `{"content": ...}`.
    fn token(&self, key: &str) -> Option<String> {
        [&self.json[key], &self.specials[key]]
            .into_iter()
            .find_map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .or_else(|| v["content"].as_str().map(str::to_string))
            })
    }
}
