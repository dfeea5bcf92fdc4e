//! The API key store.

use crate::harness::*;
use kiln_core::store::{KeyStore, StoreError};

pub async fn keys_are_created_listed_found_by_hash_and_revoked<B: Backend>(b: B) {
    let store = b.store();
    assert_eq!(store.key_count().await.unwrap(), 0);
    assert!(store.list_keys().await.unwrap().is_empty());
    let key = store.insert_key("a-ci", "hash-1", "kiln_ab").await.unwrap();
    assert_eq!(
        (key.name.as_str(), key.prefix.as_str(), key.revoked_at),
        ("a-ci", "kiln_ab", None)
    );
    assert!(matches!(
        store.insert_key("a-ci", "hash-2", "kiln_cd").await,
        Err(StoreError::DuplicateKeyName(name)) if name == "a-ci"
    ));
    let second = store
        .insert_key("b-deploy", "hash-3", "kiln_ef")
        .await
        .unwrap();
    assert_ne!(second.id, key.id);
    assert_eq!(
        store.key_by_hash("hash-1").await.unwrap(),
        Some(key.clone())
    );
    assert!(store.key_by_hash("hash-2").await.unwrap().is_none());

    let revoked = store.revoke_key("a-ci").await.unwrap();
    assert_eq!(revoked.id, key.id);
    let revoked_at = revoked.revoked_at.expect("revoked");
    assert!(revoked_at >= key.created_at);
    assert_eq!(
        store.revoke_key("a-ci").await.unwrap().revoked_at,
        Some(revoked_at),
        "twice is harmless and keeps the first instant"
    );
    assert!(
        store.key_by_hash("hash-1").await.unwrap().is_none(),
        "a revoked key no longer authenticates"
    );
    assert_eq!(
        store.key_by_hash("hash-3").await.unwrap().map(|k| k.id),
        Some(second.id)
    );
    assert!(matches!(
        store.revoke_key("nope").await,
        Err(StoreError::NoSuchKey(name)) if name == "nope"
    ));
    let listed = store.list_keys().await.unwrap();
    let names: Vec<_> = listed.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(
        names,
        ["a-ci", "b-deploy"],
        "oldest first, revoked ones listed"
    );
    assert_eq!(listed[0].revoked_at, Some(revoked_at));
    assert_eq!(listed[1], second);
    assert_eq!(store.key_count().await.unwrap(), 2, "revoked keys count");
}
