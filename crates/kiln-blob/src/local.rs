//! Blobs as files under one directory, fanned out by the key's first two characters so that no
//! directory grows past a few thousand entries.
//!
//! A write goes to a temporary file that is synced and then renamed into place, so a reader (or a
//! restart after a crash) sees a whole image or none. The content type is not stored: it follows
//! from the key's extension, which kiln always sets from the output format.

use crate::content_type;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::{self, StreamExt};
use kiln_core::blob::{Blob, BlobError, BlobStore, BlobStream};
use kiln_core::ids::BlobKey;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;

/// How much of a file one chunk of a [`BlobStream`] holds: large enough that a multi-MiB image
/// is a few dozen reads, small enough that many concurrent downloads stay cheap.
const CHUNK: usize = 256 * 1024;

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

impl LocalBlobStore {
    /// Uses (and creates) `root`.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(|e| backend("creating its directory", e))?;
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
        content_type::check(key, &blob.content_type)?;
        let path = self.path_of(key);
        tokio::task::spawn_blocking(move || write_durably(&path, &blob.bytes))
            .await
            .map_err(|e| backend("writing a blob", e))?
            .map_err(|e| backend("writing a blob", e))
    }

    async fn open(&self, key: &BlobKey) -> Result<Option<BlobStream>, BlobError> {
        let file = match tokio::fs::File::open(self.path_of(key)).await {
            Ok(file) => file,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(backend("opening a blob", e)),
        };
        // The length of the file we opened: a replacement renamed over it later is another
        // inode, so this handle keeps reading the whole old image and nothing else.
        let length = file
            .metadata()
            .await
            .map_err(|e| backend("opening a blob", e))?
            .len();
        Ok(Some(BlobStream {
            content_type: content_type::of_key(key).to_string(),
            length: Some(length),
            body: chunks_of(file).boxed(),
        }))
    }

    async fn get(&self, key: &BlobKey) -> Result<Option<Blob>, BlobError> {
        match tokio::fs::read(self.path_of(key)).await {
            Ok(bytes) => Ok(Some(Blob {
                bytes,
                content_type: content_type::of_key(key).to_string(),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend("reading a blob", e)),
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        match tokio::fs::remove_file(self.path_of(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(backend("deleting a blob", e)),
        }
    }

    async fn ping(&self) -> Result<(), BlobError> {
        let metadata = tokio::fs::metadata(&self.root)
            .await
            .map_err(|e| backend("finding its directory", e))?;
        if metadata.is_dir() {
            Ok(())
        } else {
            Err(backend(
                "finding its directory",
                format!("{} is not a directory", self.root.display()),
            ))
        }
    }
}

/// The file's bytes, [`CHUNK`] at a time, until its end.
fn chunks_of(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = Result<Bytes, BlobError>> + Send + 'static {
    stream::try_unfold(file, |mut file| async move {
        let mut buf = BytesMut::with_capacity(CHUNK);
        // `read_buf` fills at most the spare capacity; zero means the end of the file.
        while buf.len() < CHUNK {
            let n = file
                .read_buf(&mut buf)
                .await
                .map_err(|e| backend("reading a blob", e))?;
            if n == 0 {
                break;
            }
        }
        if buf.is_empty() {
            Ok(None)
        } else {
            Ok(Some((buf.freeze(), file)))
        }
    })
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
