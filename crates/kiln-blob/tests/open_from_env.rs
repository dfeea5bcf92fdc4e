//! `kiln_blob::open` on an `s3://` location reads the standard `AWS_*` environment variables,
//! as a kiln process started by a test (or by an operator) gets them. Alone in its own test
//! binary because it sets the process's environment.

use kiln_blob::BlobLocation;
use kiln_core::blob::Blob;
use kiln_core::ids::BlobKey;
use kiln_testkit::s3::S3Server;

#[tokio::test]
async fn an_s3_location_is_opened_from_the_aws_environment() {
    let server = S3Server::start();
    // Only the server's variables: a developer's own AWS_* (a profile's session token, an
    // AWS_ENDPOINT_URL_S3) would otherwise take part.
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("AWS_")) {
        std::env::remove_var(name);
    }
    for (name, value) in server.env() {
        std::env::set_var(name, value);
    }

    let location: BlobLocation = format!("s3://{}/from-env", server.bucket())
        .parse()
        .unwrap();
    let store = kiln_blob::open(&location).unwrap();
    store.ping().await.unwrap();
    let key = BlobKey::random("jpeg");
    let blob = Blob {
        bytes: vec![0xff, 0xd8, 0xff],
        content_type: "image/jpeg".into(),
    };
    store.put(&key, blob.clone()).await.unwrap();
    assert_eq!(server.object_keys(), vec![format!("from-env/{key}")]);
    assert_eq!(store.get(&key).await.unwrap(), Some(blob));
}
