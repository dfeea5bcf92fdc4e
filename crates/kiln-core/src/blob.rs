//! Where result images live: a local directory on one machine, an S3-compatible bucket on many.

use crate::ids::BlobKey;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The store failed while doing `action` (`writing`, `reading`, `deleting`, `opening`).
    /// Not shown to clients; the cause is kept for the log.
    #[error("the {backend} blob store failed {action} a blob")]
    Backend {
        backend: &'static str,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A blob whose content type does not match its key's extension (kiln sets both).
    #[error(
        "content type {content_type} does not match the key's extension (expected {expected})"
    )]
    ContentType {
        content_type: String,
        expected: &'static str,
    },
}

impl BlobError {
    /// A failure of `backend` while doing `action`, keeping `source` as the cause.
    pub fn backend(
        backend: &'static str,
        action: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        BlobError::Backend {
            backend,
            action,
            source: source.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub content_type: String,
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Writes the blob durably; an existing blob under `key` is replaced.
    async fn put(&self, key: &BlobKey, blob: Blob) -> Result<(), BlobError>;
    async fn get(&self, key: &BlobKey) -> Result<Option<Blob>, BlobError>;
    /// Deleting a missing blob is not an error.
    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError>;
}
