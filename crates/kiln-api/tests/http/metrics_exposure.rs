//! Where `/metrics` is served, and the metrics token.

use crate::harness::TestServer;
use kiln_api::{metrics_router, serve_router, ConnectionLimits};
use reqwest::Method;

async fn openapi(server: &TestServer) -> serde_json::Value {
    server
        .call(Method::GET, "/openapi.json", None, None)
        .await
        .ok()
        .clone()
}

#[tokio::test]
async fn on_a_listener_of_its_own_metrics_leave_the_api_port_and_its_document() {
    let server = TestServer::start_with(|s| s.metrics_on_api_port = false).await;
    server
        .call(Method::GET, "/metrics", None, None)
        .await
        .error(404, 404001);
    let doc = openapi(&server).await;
    assert!(doc["paths"].get("/metrics").is_none(), "{}", doc["paths"]);
    assert!(doc["paths"]["/healthz"].is_object());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let router = metrics_router(server.state.clone());
    let limits = ConnectionLimits::default();
    tokio::spawn(serve_router(
        listener,
        router,
        limits,
        std::future::pending(),
    ));
    server.submit_ok().await;
    let response = server
        .client
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        text.lines().any(|l| l == "kiln_jobs{state=\"queued\"} 1"),
        "{text}"
    );
    let elsewhere = server
        .client
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        elsewhere.status(),
        404,
        "the metrics listener serves metrics only"
    );
}

#[tokio::test]
async fn a_metrics_token_is_required_when_set_and_declared_in_the_document() {
    let server = TestServer::start_with(|s| s.metrics_token = Some("scrape-secret".into())).await;
    let missing = server.call(Method::GET, "/metrics", None, None).await;
    missing.error(401, 401001);
    assert_eq!(missing.headers["www-authenticate"], "Bearer");
    server
        .call(Method::GET, "/metrics", Some("wrong"), None)
        .await
        .error(401, 401001);
    server
        .call(Method::GET, "/metrics", Some(&server.token), None)
        .await
        .error(401, 401001);
    let response = server
        .client
        .get(server.url("/metrics"))
        .bearer_auth("scrape-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("kiln_queue_depth"));

    let doc = openapi(&server).await;
    let get = &doc["paths"]["/metrics"]["get"];
    assert!(get["responses"]["401"].is_object(), "{get}");
    assert_eq!(get["security"], serde_json::json!([{"bearer": []}]));
}

#[tokio::test]
async fn without_a_token_metrics_stay_open_on_the_api_port() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let doc = openapi(&server).await;
    let get = &doc["paths"]["/metrics"]["get"];
    assert!(get["responses"].get("401").is_none(), "{get}");
}
