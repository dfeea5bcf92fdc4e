//! The playground's files: served at `/` without a key, under a strict Content-Security-Policy.
//! (The page itself is exercised in a real browser by the `kiln` crate's service tests.)

use crate::harness::TestServer;

#[tokio::test]
async fn the_page_and_its_files_are_served_under_a_strict_policy() {
    let server = TestServer::start().await;
    for (path, content_type, marker) in [
        ("/", "text/html; charset=utf-8", "kiln playground"),
        (
            "/playground/app.js",
            "text/javascript; charset=utf-8",
            "textContent",
        ),
        (
            "/playground/app.css",
            "text/css; charset=utf-8",
            "prefers-color-scheme",
        ),
        ("/playground/icon.svg", "image/svg+xml", "<svg"),
    ] {
        let response = server.client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path} needs no key");
        let headers = response.headers().clone();
        assert_eq!(headers["content-type"], content_type, "{path}");
        let policy = headers["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "frame-ancestors 'none'",
        ] {
            assert!(policy.contains(directive), "{path}: {policy}");
        }
        assert!(!policy.contains("unsafe"), "{path}: {policy}");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        let body = response.text().await.unwrap();
        assert!(body.contains(marker), "{path} is the playground's file");
    }
}

#[tokio::test]
async fn the_page_is_not_an_api_operation() {
    let server = TestServer::start().await;
    let document: serde_json::Value = server
        .client
        .get(server.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let paths = document["paths"].as_object().unwrap();
    assert!(
        !paths.contains_key("/"),
        "the page is not in the API's document"
    );
    let post = server.client.post(server.url("/")).send().await.unwrap();
    assert_eq!(post.status(), 405);
}
