//! The content type a key's extension stands for. kiln always names a blob after its format,
//! so both stores refuse a blob whose declared type says otherwise, and a store that keeps no
//! type (the local directory, an object written by hand) can answer from the key alone.

use kiln_core::blob::BlobError;
use kiln_core::ids::BlobKey;

/// The content type `key`'s extension stands for.
pub(crate) fn of_key(key: &BlobKey) -> &'static str {
    match key.as_str().rsplit_once('.').map(|(_, ext)| ext) {
        Some("jpeg" | "jpg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        _ => "application/octet-stream",
    }
}

/// Refuses a `content_type` that contradicts `key`'s extension.
pub(crate) fn check(key: &BlobKey, content_type: &str) -> Result<(), BlobError> {
    let expected = of_key(key);
    if content_type == expected {
        Ok(())
    } else {
        Err(BlobError::ContentType {
            content_type: content_type.to_string(),
            expected,
        })
    }
}
