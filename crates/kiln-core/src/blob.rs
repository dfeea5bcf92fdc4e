//! Where result images live: a local directory on one machine, an S3-compatible bucket on many.

use crate::ids::BlobKey;
use async_trait::async_trait;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store backend: {0}")]
    Backend(String),
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
