//! The crate's one error type. Callers see which file or request field is at fault; the
//! [`kiln_core::engine::EngineError`] conversion keeps "bad input" apart from "engine broke".

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What is on disk is not a checkpoint this engine can load, or is inconsistent.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },
    /// A request this checkpoint cannot honour (size, steps, latents shape...).
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tokenizer {}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// The configured device cannot be used: no CUDA in this build, or no driver or device.
    #[error("device {device}: {message}")]
    Device {
        device: String,
        message: String,
        #[source]
        source: Option<Box<candle_core::Error>>,
    },
    #[error("tensor computation: {0}")]
    Candle(#[from] candle_core::Error),
    /// The step observer asked to stop.
    #[error("generation interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<Error> for kiln_core::engine::EngineError {
    fn from(e: Error) -> Self {
        use kiln_core::engine::EngineError;
        match e {
            Error::InvalidRequest(m) => EngineError::InvalidInput(m),
            Error::Interrupted => EngineError::Interrupted,
            other => EngineError::Failed(other.to_string()),
        }
    }
}
