//! API tokens: minting and hashing them (for `kiln keys create`), and the extractor that turns
//! an `Authorization: Bearer` header into the calling key.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use kiln_core::ids::KeyId;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Marks a string as a kiln token (secret scanners and people both recognise it).
const TOKEN_PREFIX: &str = "kiln_";
/// 256 random bits: guessing is hopeless, so a fast unsalted hash is the right way to store it.
const TOKEN_RANDOM_BYTES: usize = 32;
/// `kiln_` and 7 hex digits: enough to tell keys apart in a listing, far too little to matter.
const LISTED_PREFIX_CHARS: usize = 12;

/// A fresh token: `kiln_` and 64 hex digits from the operating system's random source.
pub fn new_token() -> String {
    let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// What the key store keeps instead of the token: its SHA-256, in hex.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token's first characters, shown in key listings.
pub fn token_prefix(token: &str) -> String {
    token.chars().take(LISTED_PREFIX_CHARS).collect()
}

/// The API key a request was made with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller(pub KeyId);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or(ApiError::MissingToken)?;
        let token = header
            .to_str()
            .ok()
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(ApiError::MissingToken)?;
        let key = state.keys.key_by_hash(&hash_token(token)).await?;
        match key {
            Some(key) if key.revoked_at.is_none() => Ok(Caller(key.id)),
            _ => Err(ApiError::InvalidToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_recognisable() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with("kiln_"));
        assert_eq!(a.len(), 5 + 64);
        assert!(a[5..].bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn hashes_are_sha256_hex_and_prefixes_short() {
        // sha256("abc"), a published test vector.
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let token = new_token();
        assert_eq!(hash_token(&token), hash_token(&token));
        assert_eq!(token_prefix(&token).len(), 12);
        assert!(token.starts_with(&token_prefix(&token)));
    }
}
