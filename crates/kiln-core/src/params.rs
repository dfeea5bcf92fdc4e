//! Validated generation parameters. A value of these types has passed the route's schema: the
//! HTTP layer and `kiln generate` parse into them once, and nothing downstream checks again.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A prompt, trimmed and non-empty, within the configured length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Prompt(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromptError {
    #[error("must not be empty or only white space")]
    Empty,
    #[error("must be at most {max} characters after trimming (got {len})")]
    TooLong { len: usize, max: usize },
}

impl Prompt {
    pub fn parse(raw: &str, max_chars: usize) -> Result<Self, PromptError> {
        let trimmed = raw.trim();
        let len = trimmed.chars().count();
        if len == 0 {
            Err(PromptError::Empty)
        } else if len > max_chars {
            Err(PromptError::TooLong {
                len,
                max: max_chars,
            })
        } else {
            Ok(Self(trimmed.to_string()))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Prompt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The encoded file format of a result image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Jpeg,
    Png,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Png => "png",
        }
    }
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Png => "image/png",
        }
    }
}

/// Pixel dimensions of the requested image, already rounded and range-checked by the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// Everything an engine needs for one generation, in the route's vocabulary mapped to the
/// engine's: `None` means "the checkpoint's configured default".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    pub prompt: Prompt,
    pub size: ImageSize,
    pub seed: u32,
    pub num_inference_steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    pub output_format: OutputFormat,
    /// FLUX 1.1 [pro]'s "raw mode"; what it does is the model configuration's choice.
    pub raw: bool,
    /// FLUX.2's prompt expansion by the text encoder's own language model.
    pub enable_prompt_expansion: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_is_trimmed_and_bounded() {
        assert_eq!(Prompt::parse("  a cat ", 10).unwrap().as_str(), "a cat");
        assert_eq!(Prompt::parse(" \n\t", 10), Err(PromptError::Empty));
        assert_eq!(Prompt::parse("ééééé", 5).unwrap().as_str(), "ééééé");
        assert_eq!(
            Prompt::parse("abcdef", 5),
            Err(PromptError::TooLong { len: 6, max: 5 })
        );
    }
}
