//! Blobs as objects in an S3-compatible bucket (AWS S3, MinIO, R2, Ceph), through
//! `object_store`'s S3 client: every API node and worker of a cluster reads and writes the same
//! bucket, so no machine's disk holds a result only it can serve.
//!
//! Each blob is one object, `PREFIX/KEY`, written with a single PUT (S3 makes it visible whole
//! or not at all, like the local store's rename) and carrying its content type as the object's
//! `Content-Type`. Requests are path-style (`ENDPOINT/BUCKET/KEY`), which every S3-compatible
//! service accepts, where virtual-hosted style needs a DNS name per bucket.

use crate::content_type;
use async_trait::async_trait;
use futures::stream::{StreamExt, TryStreamExt};
use kiln_core::blob::{Blob, BlobError, BlobStore, BlobStream, S3Settings};
use kiln_core::ids::BlobKey;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload, RetryConfig,
};
use std::time::Duration;

/// A failure of the S3 client while doing `action`, keeping its error (which names the
/// request and the service's answer, never the credentials) as the cause.
fn backend(action: &'static str, e: object_store::Error) -> BlobError {
    BlobError::backend("s3", action, e)
}

/// Retries bounded well below `object_store`'s default of ten over three minutes: a readiness
/// check or a worker finishing a job should learn within seconds that the service is down.
fn retry_config() -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(20),
        ..RetryConfig::default()
    }
}

#[derive(Debug)]
pub struct S3BlobStore {
    store: AmazonS3,
    bucket: String,
    /// Where our objects live inside the bucket; the empty path is the top level.
    prefix: Path,
}

impl S3BlobStore {
    /// A store on the bucket `settings` describe. Reads no environment variable, so tests can
    /// run stores on different servers side by side. Nothing is sent until the first request;
    /// [`BlobStore::ping`] checks bucket and credentials.
    pub fn new(settings: S3Settings) -> Result<Self, BlobError> {
        let mut builder = AmazonS3Builder::new()
            .with_access_key_id(settings.access_key_id)
            .with_secret_access_key(settings.secret_access_key)
            .with_allow_http(settings.allow_http);
        if let Some(endpoint) = settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = settings.region {
            builder = builder.with_region(region);
        }
        Self::build(builder, settings.bucket, settings.prefix.as_deref())
    }

    /// A store on `bucket` configured by the standard `AWS_*` environment variables, as the
    /// AWS tools read them: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_ALLOW_HTTP=true` for an `http://` endpoint. Without keys in the environment the
    /// credentials come from the machine (web identity, ECS/EKS task role, instance metadata).
    pub fn from_env(bucket: &str, prefix: Option<&str>) -> Result<Self, BlobError> {
        Self::build(AmazonS3Builder::from_env(), bucket.to_string(), prefix)
    }

    fn build(
        builder: AmazonS3Builder,
        bucket: String,
        prefix: Option<&str>,
    ) -> Result<Self, BlobError> {
        let prefix = match prefix {
            Some(prefix) => {
                Path::parse(prefix).map_err(|e| backend("configuring its prefix", e.into()))?
            }
            None => Path::default(),
        };
        let store = builder
            .with_bucket_name(&bucket)
            // Path-style: the bucket goes in the path, so MinIO-like endpoints need no
            // per-bucket DNS name (this is also object_store's default; said here on purpose).
            .with_virtual_hosted_style_request(false)
            .with_retry(retry_config())
            .build()
            .map_err(|e| backend("configuring its client", e))?;
        Ok(Self {
            store,
            bucket,
            prefix,
        })
    }

    fn path_of(&self, key: &BlobKey) -> Path {
        // BlobKey admits no separators, so each key is exactly one segment under the prefix.
        self.prefix.clone().join(key.as_str())
    }

    /// The bucket, for the startup summary.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }
}

/// The object's own `Content-Type` if it has one, else what its key's extension stands for
/// (an object copied in by hand, or by a tool that sets no type).
fn content_type_from(attributes: &Attributes, key: &BlobKey) -> String {
    match attributes.get(&Attribute::ContentType) {
        Some(value) => value.to_string(),
        None => content_type::of_key(key).to_string(),
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, key: &BlobKey, blob: Blob) -> Result<(), BlobError> {
        content_type::check(key, &blob.content_type)?;
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, blob.content_type.into());
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        self.store
            .put_opts(&self.path_of(key), PutPayload::from(blob.bytes), options)
            .await
            .map(|_| ())
            .map_err(|e| backend("writing a blob", e))
    }

    async fn open(&self, key: &BlobKey) -> Result<Option<BlobStream>, BlobError> {
        let result = match self.store.get(&self.path_of(key)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(backend("opening a blob", e)),
        };
        let content_type = content_type_from(&result.attributes, key);
        let length = result.meta.size;
        let body = result
            .into_stream()
            .map_err(|e| backend("reading a blob", e))
            .boxed();
        Ok(Some(BlobStream {
            content_type,
            length: Some(length),
            body,
        }))
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        // S3 answers 204 for a missing key, but some compatible services answer 404.
        match self.store.delete(&self.path_of(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend("deleting a blob", e)),
        }
    }

    async fn ping(&self) -> Result<(), BlobError> {
        // One ListObjectsV2 page under the prefix proves the bucket exists and the credentials
        // may read it; only the first page is asked for, however many blobs there are.
        match self.store.list(Some(&self.prefix)).next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(backend("listing its bucket", e)),
        }
    }
}
