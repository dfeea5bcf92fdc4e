//! The catalog, schemas, OpenAPI document, health, metrics, and answers for unknown routes.

use crate::harness::{TestServer, EDIT, FLEX, PRO};
use kiln_core::catalog::Route;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn health_and_readiness_need_no_token() {
    let server = TestServer::start().await;
    let health = server.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(health.ok()["status"], "ok");
    let ready = server.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(ready.ok()["status"], "ready");
}

#[tokio::test]
async fn the_catalog_lists_every_model_and_which_are_served() {
    let server =
        TestServer::start_with(|s| s.served_routes = vec![Route::Flux2FlexTextToImage]).await;
    let answer = server.call(Method::GET, "/v1/models", None, None).await;
    let models = answer.ok()["models"].as_array().unwrap().clone();
    assert_eq!(models.len(), 3);
    let pro = models.iter().find(|m| m["id"] == PRO).unwrap();
    let flex = models.iter().find(|m| m["id"] == FLEX).unwrap();
    let edit = models
        .iter()
        .find(|m| m["id"] == "blackforestlabs/flux-2/flex/edit")
        .unwrap();
    assert_eq!(
        (
            pro["served"].clone(),
            flex["served"].clone(),
            edit["served"].clone()
        ),
        (json!(false), json!(true), json!(false))
    );
    assert_eq!(edit["family"], "flux2");
    assert_eq!(pro["family"], "flux1");
    assert_eq!(flex["title"], "FLUX.2 [flex] text-to-image");
    // The schema URL works as given.
    let schema = server
        .call(
            Method::GET,
            flex["schema_url"].as_str().unwrap(),
            None,
            None,
        )
        .await;
    assert_eq!(schema.ok()["model_id"], FLEX);
}

#[tokio::test]
async fn each_model_serves_its_input_and_output_schema() {
    let server = TestServer::start().await;
    let answer = server
        .call(Method::GET, &format!("/v1/models/{PRO}/schema"), None, None)
        .await;
    let body = answer.ok();
    let input = &body["input"];
    assert_eq!(input["required"], json!(["prompt"]));
    assert_eq!(input["properties"]["image_size"]["default"], "16:9");
    assert_eq!(input["properties"]["seed"]["default"], 81_048_285);
    let order: Vec<&String> = input["properties"].as_object().unwrap().keys().collect();
    assert_eq!(order.len(), 6);
    assert!(
        body["output"]["properties"]["images"].is_object(),
        "{}",
        body["output"]
    );

    let flex = server
        .call(
            Method::GET,
            &format!("/v1/models/{FLEX}/schema"),
            None,
            None,
        )
        .await;
    assert_eq!(
        flex.ok()["input"]["properties"]["num_inference_steps"]["maximum"],
        50
    );

    let unknown = server
        .call(Method::GET, "/v1/models/acme/nope/schema", None, None)
        .await;
    unknown.error(400, 400001);
    let submit_only = server
        .call(Method::GET, &format!("/v1/models/{FLEX}"), None, None)
        .await;
    submit_only.error(405, 405001);
    assert_eq!(submit_only.headers["allow"], "POST");
}

#[tokio::test]
async fn wrong_methods_are_405001_with_the_paths_own_allow() {
    let server = TestServer::start().await;
    for (method, path, allow) in [
        (
            Method::POST,
            format!("/v1/models/{PRO}/schema"),
            "GET, HEAD",
        ),
        (
            Method::DELETE,
            format!("/v1/models/{PRO}/schema"),
            "GET, HEAD",
        ),
        (Method::PUT, format!("/v1/models/{PRO}"), "POST"),
        (Method::OPTIONS, format!("/v1/models/{FLEX}"), "POST"),
        (Method::PATCH, "/v1/models/acme/nope".to_string(), "POST"),
    ] {
        let answer = server
            .call(method.clone(), &path, Some(&server.token), Some(&json!({})))
            .await;
        answer.error(405, 405001);
        assert_eq!(answer.headers["allow"], allow, "{method} {path}");
    }
}

#[tokio::test]
async fn the_openapi_document_describes_this_server_as_configured() {
    let server = TestServer::start_with(|s| {
        s.served_routes = vec![Route::Flux11ProTextToImage];
        s.max_prompt_chars = 500;
    })
    .await;
    let doc = server.call(Method::GET, "/openapi.json", None, None).await;
    let doc = doc.ok();
    assert_eq!(doc["servers"], json!([{"url": server.base}]));
    let paths = &doc["paths"];
    assert!(paths[format!("/v1/models/{PRO}")]["post"].is_object());
    assert!(paths.get(format!("/v1/models/{FLEX}")).is_none());
    assert!(paths.get(format!("/v1/models/{EDIT}")).is_none());
    // Schemas answer for every model, served or not.
    assert!(paths[format!("/v1/models/{FLEX}/schema")]["get"].is_object());
    let schemas = &doc["components"]["schemas"];
    assert!(schemas.get("Flux2FlexInput").is_none());
    let prompt = &schemas["Flux11ProInput"]["properties"]["prompt"];
    assert!(
        prompt["pattern"].as_str().unwrap().contains("{0,498}"),
        "{prompt}"
    );

    let submit = &paths[format!("/v1/models/{PRO}")]["post"]["responses"];
    for status in ["200", "401", "405", "413", "422", "429", "500", "503"] {
        let response = &submit[status];
        assert!(response["headers"]["x-request-id"].is_object(), "{status}");
    }
    assert!(submit["429"]["headers"]["Retry-After"].is_object());
    assert!(submit["503"]["headers"]["Retry-After"].is_object());
    assert!(submit["405"]["headers"]["Allow"].is_object());
    let status = &paths["/v1/requests/{request_id}/status"]["get"]["responses"];
    assert!(status["500"].is_object() && status.get("413").is_none());
}

#[tokio::test]
async fn the_openapi_document_has_every_endpoint_and_both_input_schemas() {
    let server = TestServer::start().await;
    let answer = server.call(Method::GET, "/openapi.json", None, None).await;
    let doc = answer.ok();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let schemas = &doc["components"]["schemas"];
    for name in [
        "Flux11ProInput",
        "Flux2FlexInput",
        "ErrorBody",
        "SubmitResponse",
        "StatusResponse",
        "ResultResponse",
    ] {
        assert!(schemas[name].is_object(), "{name} missing");
    }
    assert_eq!(
        schemas["Flux11ProInput"]["properties"]["raw"]["title"],
        "Raw Mode"
    );
    let paths = &doc["paths"];
    for (model, schema) in [(PRO, "Flux11ProInput"), (FLEX, "Flux2FlexInput")] {
        let submit = &paths[format!("/v1/models/{model}")]["post"];
        assert_eq!(
            submit["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            format!("#/components/schemas/{schema}")
        );
        assert!(paths[format!("/v1/models/{model}/schema")]["get"].is_object());
    }
    assert!(paths.get("/v1/models/{model_id}").is_none());
    for path in [
        "/v1/requests/{request_id}/status",
        "/v1/requests/{request_id}/result",
        "/files/{key}",
        "/metrics",
    ] {
        assert!(paths[path].is_object(), "{path} missing");
    }
    assert!(paths["/v1/requests/{request_id}/cancel"]["post"]["responses"]["202"].is_object());
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[tokio::test]
async fn metrics_report_jobs_by_state_and_http_requests() {
    let server = TestServer::start().await;
    server.submit_ok().await;
    server.submit_ok().await;
    server.claim().await;
    let response = server
        .client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for line in [
        "kiln_jobs{state=\"queued\"} 1",
        "kiln_jobs{state=\"running\"} 1",
        "kiln_jobs{state=\"succeeded\"} 0",
        "kiln_queue_depth 1",
        "kiln_http_requests_total{method=\"POST\",route=\"/v1/models/{*model_id}\",status=\"200\"} 2",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line:?} in:\n{text}");
    }
    assert!(
        text.contains("kiln_http_request_duration_seconds_bucket"),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_format() {
    let server = TestServer::start().await;
    server
        .call(Method::GET, "/v2/anything", None, None)
        .await
        .error(404, 404001);
    let id = server.submit_ok().await;
    let wrong_method = server.get(&format!("/v1/requests/{id}/cancel")).await;
    wrong_method.error(405, 405001);
}
