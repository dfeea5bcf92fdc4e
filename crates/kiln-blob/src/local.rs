//! Blobs as files under one directory, fanned out by the key's first two characters so that no
//! directory grows past a few thousand entries.
//!
//! A write goes to a temporary file that is synced and then renamed into place, so a reader (or a
//! restart after a crash) sees a whole image or none. The content type is not stored: it follows
//! from the key's extension, which kiln always sets from the output format.

use async_trait::async_trait;
use kiln_core::blob::{Blob, BlobError, BlobStore};
use kiln_core::ids::BlobKey;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
}

fn backend(
    action: &'static str,
    e: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> BlobError {
    BlobError::backend("local", action, e)
}

/// The content type a key's extension stands for.
fn content_type_of(key: &BlobKey) -> &'static str {
    match key.as_str().rsplit_once('.').map(|(_, ext)| ext) {
        Some("jpeg" | "jpg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

impl LocalBlobStore {
    /// Uses (and creates) `root`.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| backend("creating the directory of", e))?;
        Ok(Self { root })
    }

    fn path_of(&self, key: &BlobKey) -> PathBuf {
        // BlobKey admits no separators and no leading dot, so this stays under root.
        let fan_out: String = key.as_str().chars().take(2).collect();
        self.root.join(fan_out).join(key.as_str())
    }
}

fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().expect("blob paths have a parent");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile_in(dir)?;
    tmp.1.write_all(bytes)?;
    tmp.1.sync_all()?;
    std::fs::rename(&tmp.0, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// A new file beside the final one (same filesystem, so the rename is atomic).
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for attempt in 0..16u32 {
        let path = dir.join(format!(".tmp-{}-{attempt}-{}", std::process::id(), nanos()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::new(
        ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, key: &BlobKey, blob: Blob) -> Result<(), BlobError> {
        let expected = content_type_of(key);
        if blob.content_type != expected {
            return Err(BlobError::ContentType {
                content_type: blob.content_type,
                expected,
            });
        }
        let path = self.path_of(key);
        tokio::task::spawn_blocking(move || write_durably(&path, &blob.bytes))
            .await
            .map_err(|e| backend("writing", e))?
            .map_err(|e| backend("writing", e))
    }

    async fn get(&self, key: &BlobKey) -> Result<Option<Blob>, BlobError> {
        match tokio::fs::read(self.path_of(key)).await {
            Ok(bytes) => Ok(Some(Blob {
                bytes,
                content_type: content_type_of(key).to_string(),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend("reading", e)),
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path_of(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend("deleting", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path().join("blobs")).unwrap();
        let key = BlobKey::random("png");
        assert_eq!(store.get(&key).await.unwrap(), None);
        let blob = Blob {
            bytes: vec![1, 2, 3],
            content_type: "image/png".into(),
        };
        store.put(&key, blob.clone()).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), Some(blob));
        store.delete(&key).await.unwrap();
        store.delete(&key).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), None);
        let leftovers: Vec<_> = std::fs::read_dir(store.path_of(&key).parent().unwrap())
            .unwrap()
            .collect();
        assert!(
            leftovers.is_empty(),
            "no temporary files are left behind: {leftovers:?}"
        );
    }

    #[tokio::test]
    async fn a_content_type_that_contradicts_the_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path()).unwrap();
        let wrong = Blob {
            bytes: vec![0],
            content_type: "image/png".into(),
        };
        assert!(store.put(&BlobKey::random("jpeg"), wrong).await.is_err());
    }
}
