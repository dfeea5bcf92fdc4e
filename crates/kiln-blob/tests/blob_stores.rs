//! One conformance suite, run against every blob store kiln ships: the local directory and an
//! S3 bucket on the in-process s3s-fs server (`kiln_testkit::s3`), plus what only one of them
//! has (the bucket's prefix and credentials, the directory's disappearance).

use futures::StreamExt;
use kiln_blob::{LocalBlobStore, S3BlobStore};
use kiln_core::blob::{Blob, BlobError, BlobStore, S3Settings};
use kiln_core::ids::BlobKey;
use kiln_core::report::Chain;
use kiln_testkit::s3::S3Server;

/// Bytes that differ from one blob to the next, so a test cannot mistake one for another.
fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn png(len: usize, seed: u8) -> Blob {
    Blob {
        bytes: bytes(len, seed),
        content_type: "image/png".into(),
    }
}

/// The behaviour every [`BlobStore`] must have.
async fn conformance(store: &dyn BlobStore) {
    store.ping().await.expect("a fresh store answers");
    round_trip(store).await;
    streams_a_large_blob_in_chunks(store).await;
    replaces(store).await;
    deletes_idempotently(store).await;
    refuses_a_contradicting_content_type(store).await;
}

async fn round_trip(store: &dyn BlobStore) {
    let key = BlobKey::random("jpeg");
    assert_eq!(
        store.get(&key).await.unwrap(),
        None,
        "missing key reads as None"
    );
    assert!(store.open(&key).await.unwrap().is_none());
    let blob = Blob {
        bytes: bytes(1000, 7),
        content_type: "image/jpeg".into(),
    };
    store.put(&key, blob.clone()).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Some(blob.clone()));
    let opened = store.open(&key).await.unwrap().expect("just written");
    assert_eq!(opened.content_type, "image/jpeg");
    assert_eq!(opened.length, Some(1000));
    assert_eq!(opened.collect().await.unwrap(), blob);
    store.delete(&key).await.unwrap();
}

async fn streams_a_large_blob_in_chunks(store: &dyn BlobStore) {
    let key = BlobKey::random("png");
    let blob = png(5 << 20, 3);
    store.put(&key, blob.clone()).await.unwrap();
    let opened = store.open(&key).await.unwrap().expect("just written");
    assert_eq!(opened.content_type, "image/png");
    assert_eq!(opened.length, Some(5 << 20));
    let chunks: Vec<_> = opened.body.collect().await;
    assert!(
        chunks.len() > 1,
        "5 MiB arrive in several chunks, not one buffer"
    );
    let mut read = Vec::with_capacity(5 << 20);
    for chunk in chunks {
        read.extend_from_slice(&chunk.unwrap());
    }
    assert!(read == blob.bytes, "the chunks are the blob, in order");
    store.delete(&key).await.unwrap();
}

async fn replaces(store: &dyn BlobStore) {
    let key = BlobKey::random("png");
    store.put(&key, png(5000, 1)).await.unwrap();
    store.put(&key, png(300, 2)).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), Some(png(300, 2)));
    let opened = store.open(&key).await.unwrap().unwrap();
    assert_eq!(
        opened.length,
        Some(300),
        "no tail of the longer blob is left"
    );
    store.delete(&key).await.unwrap();
}

async fn deletes_idempotently(store: &dyn BlobStore) {
    let key = BlobKey::random("png");
    store.put(&key, png(10, 4)).await.unwrap();
    store.delete(&key).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    assert!(store.open(&key).await.unwrap().is_none());
    store
        .delete(&key)
        .await
        .expect("deleting a missing blob is not an error");
    store
        .delete(&BlobKey::random("webp"))
        .await
        .expect("nor is deleting one never written");
}

async fn refuses_a_contradicting_content_type(store: &dyn BlobStore) {
    let key = BlobKey::random("jpeg");
    let error = store.put(&key, png(10, 5)).await.unwrap_err();
    assert!(
        matches!(
            &error,
            BlobError::ContentType { content_type, expected: "image/jpeg" } if content_type == "image/png"
        ),
        "{error:?}"
    );
    assert_eq!(store.get(&key).await.unwrap(), None, "nothing was written");
}

fn s3_store(server: &S3Server, prefix: Option<&str>) -> S3BlobStore {
    S3BlobStore::new(S3Settings {
        prefix: prefix.map(Into::into),
        ..server.settings()
    })
    .unwrap()
}

#[tokio::test]
async fn the_local_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    conformance(&LocalBlobStore::new(dir.path().join("blobs")).unwrap()).await;
}

#[tokio::test]
async fn the_s3_store_conforms_with_and_without_a_prefix() {
    let server = S3Server::start();
    conformance(&s3_store(&server, Some("kiln/results"))).await;
    conformance(&s3_store(&server, None)).await;
    assert_eq!(
        server.object_keys(),
        Vec::<String>::new(),
        "the suite deletes every blob it writes, and nothing else is left"
    );
}

#[tokio::test]
async fn the_local_store_is_not_ready_without_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("blobs");
    let store = LocalBlobStore::new(&root).unwrap();
    std::fs::remove_dir(&root).unwrap();
    assert!(store.ping().await.is_err(), "the directory is gone");
    std::fs::write(&root, b"not a directory").unwrap();
    let error = store.ping().await.unwrap_err();
    assert!(
        Chain(&error).to_string().contains("is not a directory"),
        "{}",
        Chain(&error)
    );
}

#[tokio::test]
async fn s3_objects_land_under_the_prefix_with_their_content_type() {
    let server = S3Server::start();
    let store = s3_store(&server, Some("tenant-a/images"));
    let key = BlobKey::random("png");
    store.put(&key, png(64, 9)).await.unwrap();
    assert_eq!(server.object_keys(), vec![format!("tenant-a/images/{key}")]);

    // Another prefix in the same bucket sees none of it.
    let other = s3_store(&server, Some("tenant-b"));
    assert_eq!(other.get(&key).await.unwrap(), None);
    let top = s3_store(&server, None);
    assert_eq!(top.get(&key).await.unwrap(), None);

    // The type is the object's own Content-Type, read back through plain S3.
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(server.bucket())
        .with_endpoint(server.endpoint())
        .with_region(server.region())
        .with_access_key_id(server.access_key_id())
        .with_secret_access_key(server.secret_access_key())
        .with_allow_http(true)
        .build()
        .unwrap();
    let path = object_store::path::Path::from(format!("tenant-a/images/{key}"));
    let got = object_store::ObjectStoreExt::get(&raw, &path)
        .await
        .unwrap();
    assert_eq!(
        got.attributes
            .get(&object_store::Attribute::ContentType)
            .map(|v| v.to_string()),
        Some("image/png".to_string())
    );
}

#[tokio::test]
async fn an_s3_object_without_a_content_type_reads_as_its_extension() {
    let server = S3Server::start();
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(server.bucket())
        .with_endpoint(server.endpoint())
        .with_access_key_id(server.access_key_id())
        .with_secret_access_key(server.secret_access_key())
        .with_allow_http(true)
        .build()
        .unwrap();
    let key = BlobKey::random("webp");
    let path = object_store::path::Path::from(format!("p/{key}"));
    object_store::ObjectStoreExt::put(&raw, &path, vec![1u8, 2, 3].into())
        .await
        .unwrap();
    let blob = s3_store(&server, Some("p"))
        .get(&key)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(blob.content_type, "image/webp");
    assert_eq!(blob.bytes, [1, 2, 3]);
}

/// Every operation with a wrong secret is an error, and nothing the error says (its whole
/// chain, or its Debug) holds either secret.
#[tokio::test]
async fn wrong_s3_credentials_are_an_error_that_keeps_the_secret() {
    let server = S3Server::start();
    let wrong_secret = "wrong-secret-9d8c7b6a5f";
    let store = S3BlobStore::new(S3Settings {
        secret_access_key: wrong_secret.into(),
        ..server.settings()
    })
    .unwrap();
    let key = BlobKey::random("png");
    let errors = [
        store.ping().await.unwrap_err(),
        store.put(&key, png(10, 1)).await.unwrap_err(),
        store.get(&key).await.unwrap_err(),
        store.open(&key).await.unwrap_err(),
        store.delete(&key).await.unwrap_err(),
    ];
    for error in &errors {
        assert!(
            matches!(error, BlobError::Backend { backend: "s3", .. }),
            "{error:?}"
        );
        let shown = format!("{} / {error:?}", Chain(error));
        assert!(shown.contains("403 Forbidden"), "the log says why: {shown}");
        for secret in [wrong_secret, server.secret_access_key()] {
            assert!(!shown.contains(secret), "the secret leaked: {shown}");
        }
    }
    assert!(format!("{store:?}").find(wrong_secret).is_none());
    assert!(
        server.object_keys().is_empty(),
        "the refused put stored nothing"
    );
}

#[tokio::test]
async fn an_s3_store_on_a_missing_bucket_is_not_ready() {
    let server = S3Server::start();
    let store = S3BlobStore::new(S3Settings {
        bucket: "no-such-bucket".into(),
        ..server.settings()
    })
    .unwrap();
    let error = store.ping().await.unwrap_err();
    assert!(
        matches!(error, BlobError::Backend { backend: "s3", .. }),
        "{error:?}"
    );
}

/// The server has its own thread and runtime: it answers while the test's (single-threaded)
/// runtime is blocked, as it must when the stores are in other processes, and it is gone once
/// dropped.
#[tokio::test]
async fn the_test_server_serves_while_the_test_blocks_and_stops_on_drop() {
    let server = S3Server::start();
    let settings = server.settings();
    // `join` blocks this runtime's only thread until the other thread's requests are answered.
    let read_back = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = S3BlobStore::new(settings).unwrap();
            let key = BlobKey::random("png");
            store.put(&key, png(100, 6)).await.unwrap();
            store.get(&key).await.unwrap()
        })
    })
    .join()
    .unwrap();
    assert_eq!(read_back, Some(png(100, 6)));

    let address = server.endpoint().trim_start_matches("http://").to_string();
    drop(server);
    assert!(
        std::net::TcpStream::connect(&address).is_err(),
        "nothing listens on {address} after the drop"
    );
}
