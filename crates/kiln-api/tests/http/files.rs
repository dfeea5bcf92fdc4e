//! GET /files/{key}: capability URLs for result images.

use crate::harness::{signed_file_url, TestServer};
use kiln_core::ids::BlobKey;
use time::OffsetDateTime;

/// A succeeded request's image URL and bytes.
async fn finished_image(server: &TestServer) -> (String, BlobKey, Vec<u8>) {
    let id = server.submit_ok().await;
    let lease = server.claim().await;
    let png = b"\x89PNG\r\n\x1a\n not really an image".to_vec();
    let key = server.complete(&lease, &png).await;
    let url = server.result_of(id).await.ok()["output"]["image"]
        .as_str()
        .unwrap()
        .to_string();
    (url, key, png)
}

async fn error_code(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (status, body["error_code"].clone())
}

#[tokio::test]
async fn a_result_url_downloads_without_a_token() {
    let server = TestServer::start().await;
    let (url, _, png) = finished_image(&server).await;
    let response = server.client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    let cache = response.headers()["cache-control"]
        .to_str()
        .unwrap()
        .to_string();
    let max_age: i64 = cache
        .split("max-age=")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The URL lives as long as the request's record (24 h by default), and no longer.
    assert!(max_age > 0 && max_age <= 24 * 3600, "{cache}");
    assert_eq!(response.bytes().await.unwrap().as_ref(), png.as_slice());
}

#[tokio::test]
async fn tampered_or_unsigned_urls_are_403001() {
    let server = TestServer::start().await;
    let (url, key, _) = finished_image(&server).await;
    let (path, query) = url.split_once('?').unwrap();
    let expires: i64 = query
        .split('&')
        .find_map(|p| p.strip_prefix("expires="))
        .unwrap()
        .parse()
        .unwrap();
    let sig = query
        .split('&')
        .find_map(|p| p.strip_prefix("sig="))
        .unwrap();

    let longer = format!("{path}?expires={}&sig={sig}", expires + 3600);
    let mut flipped = sig.to_string();
    flipped.replace_range(0..1, if sig.starts_with('0') { "1" } else { "0" });
    let forged = format!("{path}?expires={expires}&sig={flipped}");
    let unsigned = format!("{path}?expires={expires}");
    let bare = path.to_string();
    let other_key = url.replace(key.as_str(), BlobKey::random("png").as_str());
    for bad in [longer, forged, unsigned, bare, other_key] {
        let response = server.client.get(&bad).send().await.unwrap();
        assert_eq!(
            error_code(response).await,
            (403, serde_json::json!(403001)),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn expired_urls_are_404001() {
    let server = TestServer::start().await;
    let (_, key, _) = finished_image(&server).await;
    let past = OffsetDateTime::now_utc().unix_timestamp() - 1;
    let response = server
        .client
        .get(signed_file_url(&server.base, key.as_str(), past))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (404, serde_json::json!(404001)));
}

#[tokio::test]
async fn files_of_no_live_request_are_404001_even_when_signed() {
    // A blob that no request references (as after its request was purged).
    let server = TestServer::start().await;
    let key = BlobKey::random("png");
    let blob = kiln_core::blob::Blob {
        bytes: b"orphan".to_vec(),
        content_type: "image/png".into(),
    };
    kiln_core::blob::BlobStore::put(server.blobs.as_ref(), &key, blob)
        .await
        .unwrap();
    let future = OffsetDateTime::now_utc().unix_timestamp() + 3600;
    let response = server
        .client
        .get(signed_file_url(&server.base, key.as_str(), future))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(response).await, (404, serde_json::json!(404001)));
}
