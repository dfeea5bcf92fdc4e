//! Identifiers. Each is its own type so that a key id can never be passed where a request id is meant.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// The id a client gets back from a submit and polls with. Random (v4), so ids of other
/// tokens cannot be guessed from one's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(Uuid);

impl RequestId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// A string that is not a request id at all (as opposed to an id that names no request).
#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a request id (expected a UUID such as 0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9)")]
pub struct MalformedRequestId(pub String);

impl FromStr for RequestId {
    type Err = MalformedRequestId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| MalformedRequestId(s.chars().take(64).collect()))
    }
}

/// An API key's stable id (the token itself is secret and stored only as a hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(Uuid);

impl KeyId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
    pub fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl Default for KeyId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Names one worker process (or one slot of an in-process pool) in leases and logs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(String);

impl WorkerId {
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a stored file lives in a [`crate::blob::BlobStore`]. Random, so a key is also
/// unguessable; restricted to characters safe in a path and in a URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BlobKey(String);

#[derive(Debug, thiserror::Error)]
#[error("'{0}' is not a blob key (1..=128 characters of a-z, A-Z, 0-9, '-', '_', '.', not starting with '.')")]
pub struct InvalidBlobKey(pub String);

impl BlobKey {
    /// A fresh random key with the given file extension, e.g. `3f2a...c9.jpeg`.
    pub fn random(extension: &str) -> Self {
        Self(format!(
            "{}{}.{extension}",
            Uuid::new_v4().simple(),
            Uuid::new_v4().simple()
        ))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BlobKey {
    type Error = InvalidBlobKey;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && !s.starts_with('.')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if ok {
            Ok(Self(s))
        } else {
            Err(InvalidBlobKey(s.chars().take(64).collect()))
        }
    }
}

impl From<BlobKey> for String {
    fn from(k: BlobKey) -> String {
        k.0
    }
}

impl fmt::Display for BlobKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_round_trips_and_rejects_garbage() {
        let id = RequestId::new();
        assert_eq!(id.to_string().parse::<RequestId>().unwrap(), id);
        assert!("not-a-uuid".parse::<RequestId>().is_err());
    }

    #[test]
    fn blob_keys_refuse_path_tricks() {
        assert!(BlobKey::try_from("../etc/passwd".to_string()).is_err());
        assert!(BlobKey::try_from(".hidden".to_string()).is_err());
        assert!(BlobKey::try_from("a/b".to_string()).is_err());
        assert!(BlobKey::try_from(String::new()).is_err());
        let k = BlobKey::random("png");
        assert!(k.as_str().ends_with(".png"));
        assert_eq!(BlobKey::try_from(k.to_string()).unwrap(), k);
    }
}
