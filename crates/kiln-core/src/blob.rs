//! Where result images live: a local directory on one machine, an S3-compatible bucket on many.

use crate::ids::BlobKey;
use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, TryStreamExt};
use std::fmt;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The store failed while doing `action` (`writing a blob`, `reading a blob`,
    /// `listing the bucket`, ...). Not shown to clients; the cause is kept for the log.
    #[error("the {backend} blob store failed {action}")]
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

/// A blob being read: its content type and length are known before the first byte, the bytes
/// arrive in chunks, so a large image passes through without being held whole.
pub struct BlobStream {
    pub content_type: String,
    /// The length in bytes, when the store knows it up front (both of kiln's stores do).
    pub length: Option<u64>,
    pub body: BoxStream<'static, Result<Bytes, BlobError>>,
}

impl BlobStream {
    /// Reads the rest of the body into one [`Blob`].
    pub async fn collect(self) -> Result<Blob, BlobError> {
        let capacity = self.length.map_or(0, |n| n.min(64 << 20) as usize);
        let bytes = self
            .body
            .try_fold(Vec::with_capacity(capacity), |mut all, chunk| async move {
                all.extend_from_slice(&chunk);
                Ok(all)
            })
            .await?;
        Ok(Blob {
            bytes,
            content_type: self.content_type,
        })
    }
}

impl fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobStream")
            .field("content_type", &self.content_type)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Writes the blob durably; an existing blob under `key` is replaced. A content type that
    /// contradicts the key's extension is refused ([`BlobError::ContentType`]).
    async fn put(&self, key: &BlobKey, blob: Blob) -> Result<(), BlobError>;

    /// Reads a blob as a stream of chunks; `None` if there is none under `key`.
    async fn open(&self, key: &BlobKey) -> Result<Option<BlobStream>, BlobError>;

    /// Reads a whole blob into memory: for small blobs (an edit's reference images).
    async fn get(&self, key: &BlobKey) -> Result<Option<Blob>, BlobError> {
        match self.open(key).await? {
            Some(stream) => stream.collect().await.map(Some),
            None => Ok(None),
        }
    }

    /// Deleting a missing blob is not an error.
    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError>;

    /// Proves the store can be used (the directory is there; the bucket answers to our
    /// credentials) without reading or writing a blob: for readiness checks.
    async fn ping(&self) -> Result<(), BlobError>;
}

/// How to reach an S3-compatible bucket (AWS S3, MinIO, R2, Ceph), given explicitly.
///
/// Lives here rather than in `kiln-blob` so that test helpers can hand one out without
/// depending on the store itself. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    pub bucket: String,
    /// Objects live under `PREFIX/`; `None` puts them at the bucket's top level.
    pub prefix: Option<String>,
    /// The service's URL, e.g. `http://127.0.0.1:9000`; `None` for AWS S3 itself.
    pub endpoint: Option<String>,
    /// `None` means `us-east-1`.
    pub region: Option<String>,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Allows an `http://` endpoint (a local MinIO, a test server).
    pub allow_http: bool,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_never_show_the_secret() {
        let settings = S3Settings {
            bucket: "b".into(),
            prefix: None,
            endpoint: None,
            region: None,
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI".into(),
            allow_http: false,
        };
        let shown = format!("{settings:?}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
    }

    #[test]
    fn a_stream_collects_into_its_blob() {
        let chunks: Vec<Result<Bytes, BlobError>> =
            vec![Ok(Bytes::from_static(b"ab")), Ok(Bytes::from_static(b"cd"))];
        let stream = BlobStream {
            content_type: "image/png".into(),
            length: Some(4),
            body: Box::pin(futures::stream::iter(chunks)),
        };
        let blob = futures::executor::block_on(stream.collect()).unwrap();
        assert_eq!(blob.bytes, b"abcd");
        assert_eq!(blob.content_type, "image/png");
    }
}
