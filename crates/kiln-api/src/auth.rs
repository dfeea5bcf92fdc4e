//! API tokens: minting and hashing them (for `kiln keys create`), and the extractor that turns
//! an `Authorization: Bearer` header into the calling key.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use kiln_core::ids::KeyId;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

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

/// How long a token's lookup is trusted before the key store is asked again. A key revoked by
/// another process (`kiln keys revoke`) is refused by this one within this long; a key store
/// query per request was most of an authenticated poll's cost.
pub const KEY_CACHE_TTL: Duration = Duration::from_secs(5);
/// Valid keys remembered at most: keys are made by operators, so this bounds a pathological
/// install, not an attacker.
const KNOWN_CAPACITY: usize = 10_000;
/// Unknown tokens remembered at most. Anyone can send random tokens: once this many are
/// remembered, further ones are looked up every time instead of filling memory (and they never
/// push out valid keys, which live in the other map).
const UNKNOWN_CAPACITY: usize = 1_000;

/// The API key a request was made with: its id (which owns jobs) and its name (for logs).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub id: KeyId,
    pub name: Arc<str>,
}

/// Token lookups by hash, trusted for a TTL: valid keys and, bounded apart, unknown tokens.
/// Revocation takes effect after at most the TTL (a zero TTL caches nothing).
pub(crate) struct KeyCache {
    ttl: Duration,
    known: Mutex<HashMap<String, (Caller, Instant)>>,
    unknown: Mutex<HashMap<String, Instant>>,
}

impl KeyCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            known: Mutex::default(),
            unknown: Mutex::default(),
        }
    }

    fn fresh(&self, fetched: Instant, now: Instant) -> bool {
        now.saturating_duration_since(fetched) < self.ttl
    }

    /// `Some(Some(caller))`: a valid key; `Some(None)`: known not to be one; `None`: ask.
    fn lookup(&self, hash: &str, now: Instant) -> Option<Option<Caller>> {
        if let Some((caller, fetched)) = lock(&self.known).get(hash) {
            if self.fresh(*fetched, now) {
                return Some(Some(caller.clone()));
            }
        }
        match lock(&self.unknown).get(hash) {
            Some(fetched) if self.fresh(*fetched, now) => Some(None),
            _ => None,
        }
    }

    /// Records what the key store said about `hash` at `now`.
    fn remember(&self, hash: String, caller: Option<Caller>, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        match caller {
            Some(caller) => {
                let mut known = lock(&self.known);
                if known.len() >= KNOWN_CAPACITY && !known.contains_key(&hash) {
                    known.retain(|_, (_, fetched)| self.fresh(*fetched, now));
                    if known.len() >= KNOWN_CAPACITY {
                        // All fresh: any one may go; it is looked up again when next used.
                        if let Some(victim) = known.keys().next().cloned() {
                            known.remove(&victim);
                        }
                    }
                }
                lock(&self.unknown).remove(&hash);
                known.insert(hash, (caller, now));
            }
            None => {
                lock(&self.known).remove(&hash);
                let mut unknown = lock(&self.unknown);
                if unknown.len() >= UNKNOWN_CAPACITY && !unknown.contains_key(&hash) {
                    unknown.retain(|_, fetched| self.fresh(*fetched, now));
                    if unknown.len() >= UNKNOWN_CAPACITY {
                        return;
                    }
                }
                unknown.insert(hash, now);
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (lock(&self.known).len(), lock(&self.unknown).len())
    }
}

/// The maps hold no invariant a panicking holder could break halfway, so a poisoned lock is
/// still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The key `token` belongs to, through the cache; `InvalidToken` if none or revoked.
async fn authenticate(state: &AppState, token: &str, now: Instant) -> Result<Caller, ApiError> {
    let hash = hash_token(token);
    let caller = match state.key_cache.lookup(&hash, now) {
        Some(cached) => cached,
        None => {
            let key = state.keys.key_by_hash(&hash).await?;
            let caller = key
                .filter(|key| key.revoked_at.is_none())
                .map(|key| Caller {
                    id: key.id,
                    name: key.name.into(),
                });
            state.key_cache.remember(hash, caller.clone(), now);
            caller
        }
    };
    caller.ok_or(ApiError::InvalidToken)
}

/// The token of an `Authorization: Bearer <token>` header.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(AUTHORIZATION)
        .and_then(|header| header.to_str().ok())
        .and_then(|value| value.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or(ApiError::MissingToken)
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let caller = authenticate(state, token, Instant::now()).await?;
        if let Some(slot) = parts.extensions.get::<crate::access_log::KeyNameSlot>() {
            slot.set(caller.name.clone());
        }
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use kiln_blob::LocalBlobStore;
    use kiln_core::store::KeyStore;
    use kiln_store::SqliteStore;
    use tempfile::TempDir;

    async fn state_with_ttl(ttl: Duration) -> (AppState, Arc<SqliteStore>, TempDir) {
        let dir = TempDir::new().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("kiln.db"))
                .await
                .unwrap(),
        );
        let blobs = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
        let mut settings = crate::ApiSettings::with_defaults("http://kiln.test", vec![7; 32]);
        settings.key_cache_ttl = ttl;
        let state = AppState::new(store.clone(), store.clone(), blobs, settings);
        (state, store, dir)
    }

    async fn add_key(store: &SqliteStore, name: &str) -> (String, KeyId) {
        let token = new_token();
        let key = store
            .insert_key(name, &hash_token(&token), &token_prefix(&token))
            .await
            .unwrap();
        (token, key.id)
    }

    #[tokio::test]
    async fn a_revoked_key_is_refused_once_its_cached_lookup_expires() {
        let (state, store, _dir) = state_with_ttl(KEY_CACHE_TTL).await;
        let (token, id) = add_key(&store, "ci").await;
        let t0 = Instant::now();
        let caller = authenticate(&state, &token, t0).await.unwrap();
        assert_eq!((caller.id, &*caller.name), (id, "ci"));

        // Revoked by another process: this one trusts its lookup for the TTL at most.
        store.revoke_key("ci").await.unwrap();
        let cached = authenticate(&state, &token, t0 + KEY_CACHE_TTL / 2).await;
        assert_eq!(cached.unwrap().id, id);
        let expired = authenticate(&state, &token, t0 + KEY_CACHE_TTL).await;
        assert!(matches!(expired, Err(ApiError::InvalidToken)));
        // The refusal is remembered too, and stays a refusal.
        let later = authenticate(&state, &token, t0 + KEY_CACHE_TTL * 3 / 2).await;
        assert!(matches!(later, Err(ApiError::InvalidToken)));
    }

    #[tokio::test]
    async fn an_unknown_token_is_rechecked_after_the_ttl() {
        let (state, store, _dir) = state_with_ttl(KEY_CACHE_TTL).await;
        let token = new_token();
        let t0 = Instant::now();
        assert!(matches!(
            authenticate(&state, &token, t0).await,
            Err(ApiError::InvalidToken)
        ));
        let key = store
            .insert_key("late", &hash_token(&token), &token_prefix(&token))
            .await
            .unwrap();
        let later = authenticate(&state, &token, t0 + KEY_CACHE_TTL).await;
        assert_eq!(later.unwrap().id, key.id);
    }

    #[tokio::test]
    async fn a_zero_ttl_caches_nothing() {
        let (state, store, _dir) = state_with_ttl(Duration::ZERO).await;
        let (token, _) = add_key(&store, "ci").await;
        let now = Instant::now();
        authenticate(&state, &token, now).await.unwrap();
        store.revoke_key("ci").await.unwrap();
        assert!(matches!(
            authenticate(&state, &token, now).await,
            Err(ApiError::InvalidToken)
        ));
        assert_eq!(state.key_cache.len(), (0, 0));
    }

    #[test]
    fn the_cache_is_bounded_and_unknown_tokens_never_push_out_keys() {
        let cache = KeyCache::new(KEY_CACHE_TTL);
        let t0 = Instant::now();
        let alice = Caller {
            id: KeyId::new(),
            name: "alice".into(),
        };
        cache.remember(hash_token("alice"), Some(alice.clone()), t0);
        for i in 0..UNKNOWN_CAPACITY * 3 {
            cache.remember(hash_token(&format!("guess {i}")), None, t0);
        }
        assert_eq!(cache.len(), (1, UNKNOWN_CAPACITY));
        let hit = cache.lookup(&hash_token("alice"), t0).unwrap().unwrap();
        assert_eq!(hit.id, alice.id);
        // A guess past the bound is not remembered: it is asked about again.
        let last = hash_token(&format!("guess {}", UNKNOWN_CAPACITY * 3 - 1));
        assert!(cache.lookup(&last, t0).is_none());

        // Once the remembered ones expire, new ones replace them, still within the bound.
        let t1 = t0 + KEY_CACHE_TTL;
        cache.remember(last.clone(), None, t1);
        assert_eq!(cache.len(), (1, 1));
        assert!(matches!(cache.lookup(&last, t1), Some(None)));

        for i in 0..KNOWN_CAPACITY + 10 {
            cache.remember(hash_token(&format!("key {i}")), Some(alice.clone()), t1);
        }
        assert_eq!(cache.len().0, KNOWN_CAPACITY);
    }

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
