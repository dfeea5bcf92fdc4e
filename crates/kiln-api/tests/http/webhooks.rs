//! Webhooks over HTTP: the submit's `webhook` parameter, `GET /v1/webhooks/secret`, the
//! result's `webhook` field, and the message bodies [`kiln_api::WebhookBodies`] writes.

use crate::harness::{Answer, TestServer, FLEX};
use kiln_api::WebhookBodies;
use kiln_core::job::{JobError, JobErrorCode, StepReport};
use kiln_core::store::{JobStore, Lease};
use kiln_core::webhook::{
    AfterAttempt, AttemptOutcome, WebhookAttempt, WebhookDelivery, WebhookMessages,
};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::Duration;
use time::OffsetDateTime;

const HOOK: &str = "https://example.com/h?tenant=7";

/// Submits a valid FLUX.2 request as Alice with `?webhook=<webhook>` (encoded as a client
/// would).
async fn submit_with_webhook(server: &TestServer, webhook: &str) -> Answer {
    let url = reqwest::Url::parse_with_params(
        &server.url(&format!("/v1/models/{FLEX}")),
        [("webhook", webhook)],
    )
    .unwrap();
    let input = json!({"prompt": "a red fox in snow"});
    server
        .call(
            Method::POST,
            url.as_str(),
            Some(&server.token),
            Some(&input),
        )
        .await
}

async fn submit_hooked(server: &TestServer) -> kiln_core::ids::RequestId {
    let answer = submit_with_webhook(server, HOOK).await;
    answer.ok()["request_id"].as_str().unwrap().parse().unwrap()
}

/// The one due delivery, as a dispatcher would claim it.
async fn claim_delivery(server: &TestServer) -> WebhookDelivery {
    let mut due = server
        .store
        .claim_webhooks(10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    due.remove(0)
}

/// The message body `WebhookBodies` writes for `delivery`, as JSON.
async fn message_for(server: &TestServer, delivery: &WebhookDelivery) -> Value {
    let bodies = WebhookBodies::from_state(&server.state);
    let body = bodies.body(delivery).await.unwrap().expect("a body");
    serde_json::from_slice(&body).unwrap()
}

async fn fail(server: &TestServer, lease: &Lease) {
    let error = JobError {
        code: JobErrorCode::EngineFailed,
        message: "the engine ran out of memory".into(),
    };
    server.store.fail(lease, error).await.unwrap();
}

mod submit {
    use super::*;

    #[tokio::test]
    async fn the_webhook_is_stored_and_the_result_lists_it_once_the_request_ends() {
        let server = TestServer::start().await;
        let id = submit_hooked(&server).await;
        // No announcement before the end.
        assert!(server.result_of(id).await.ok().get("webhook").is_none());
        let lease = server.claim().await;
        assert_eq!(lease.job.webhook.as_ref().map(|w| w.as_str()), Some(HOOK));
        server.complete(&lease, b"png").await;

        let result = server.result_of(id).await;
        assert_eq!(
            result.ok()["webhook"],
            json!({"url": HOOK, "status": "pending", "attempts": []})
        );
    }

    #[tokio::test]
    async fn the_result_lists_each_attempt() {
        let server = TestServer::start().await;
        let id = submit_hooked(&server).await;
        let lease = server.claim().await;
        server.complete(&lease, b"png").await;
        let at = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let attempts = [
            (
                AttemptOutcome::Status(503),
                AfterAttempt::RetryIn(Duration::ZERO),
            ),
            (
                AttemptOutcome::Error("could not connect".into()),
                AfterAttempt::RetryIn(Duration::ZERO),
            ),
            (AttemptOutcome::Status(204), AfterAttempt::Delivered),
        ];
        for (outcome, next) in attempts {
            let delivery = claim_delivery(&server).await;
            let attempt = WebhookAttempt { at, outcome };
            server
                .store
                .record_webhook_attempt(&delivery, attempt, next)
                .await
                .unwrap();
        }
        let result = server.result_of(id).await;
        let webhook = &result.ok()["webhook"];
        assert_eq!(webhook["status"], "delivered");
        let at = at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        assert_eq!(
            webhook["attempts"],
            json!([
                {"at": at, "http_status": 503},
                {"at": at, "error": "could not connect"},
                {"at": at, "http_status": 204},
            ])
        );
    }

    #[tokio::test]
    async fn a_request_without_a_webhook_has_none_in_its_result() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let lease = server.claim().await;
        assert_eq!(lease.job.webhook, None);
        server.complete(&lease, b"png").await;
        assert!(server.result_of(id).await.ok().get("webhook").is_none());
        let due = server
            .store
            .claim_webhooks(10, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(due.is_empty(), "{due:?}");
    }

    #[tokio::test]
    async fn bad_webhook_urls_are_422001_naming_webhook() {
        let server = TestServer::start().await;
        let long = format!("https://example.com/{}", "a".repeat(2048));
        for (url, rule) in [
            ("ftp://example.com/h", "http or https"),
            ("/relative/hook", "absolute URL"),
            ("", "absolute URL"),
            (long.as_str(), "at most 2048 characters"),
        ] {
            let answer = submit_with_webhook(&server, url).await;
            let body = answer.error(422, 422001);
            let detail = &body["detail"];
            assert_eq!(detail.as_array().unwrap().len(), 1, "{body}");
            assert_eq!(detail[0]["field"], "webhook", "{body}");
            let said = detail[0]["rule"].as_str().unwrap();
            assert!(said.contains(rule), "{url}: {said}");
        }
        // Nothing was queued.
        assert_eq!(
            server
                .store
                .state_counts()
                .await
                .unwrap()
                .counts
                .iter()
                .map(|(_, n)| n)
                .sum::<u64>(),
            0
        );
    }

    #[tokio::test]
    async fn other_query_parameters_are_ignored_as_before() {
        let server = TestServer::start().await;
        let path = format!("/v1/models/{FLEX}?something=else");
        let answer = server
            .post(&path, Some(&json!({"prompt": "a red fox in snow"})))
            .await;
        answer.ok();
    }
}

mod secret {
    use super::*;

    #[tokio::test]
    async fn each_key_has_its_own_stable_secret() {
        let server = TestServer::start().await;
        let (bob, _) = server.add_key("bob").await;
        let alice_secret = server.get("/v1/webhooks/secret").await.ok()["key"].clone();
        let key = alice_secret.as_str().unwrap();
        assert!(key.starts_with("whsec_"), "{key}");
        assert_eq!(
            server.get("/v1/webhooks/secret").await.ok()["key"],
            alice_secret
        );
        let bobs = server
            .call(Method::GET, "/v1/webhooks/secret", Some(&bob), None)
            .await;
        assert_ne!(bobs.ok()["key"], alice_secret);
        // The secret the dispatcher signs with.
        let expected =
            kiln_core::webhook::webhook_secret(crate::harness::SIGNING_KEY, server.owner);
        assert_eq!(key, expected);
    }

    #[tokio::test]
    async fn the_secret_needs_a_token() {
        let server = TestServer::start().await;
        server
            .call(Method::GET, "/v1/webhooks/secret", None, None)
            .await
            .error(401, 401001);
        server
            .call(Method::GET, "/v1/webhooks/secret", Some("kiln_nope"), None)
            .await
            .error(401, 401001);
    }
}

mod bodies {
    use super::*;

    #[tokio::test]
    async fn a_succeeded_request_is_ok_with_its_result_whose_image_downloads_without_a_token() {
        let server = TestServer::start().await;
        let id = submit_hooked(&server).await;
        let lease = server.claim().await;
        server.complete(&lease, b"the png bytes").await;
        let delivery = claim_delivery(&server).await;
        assert_eq!(delivery.request, id);
        let message = message_for(&server, &delivery).await;
        assert_eq!(message["request_id"], id.to_string());
        assert_eq!(message["status"], "OK");
        assert!(message.get("error").is_none(), "{message}");
        let payload = &message["payload"];
        assert_eq!(payload["status"], "succeeded");
        assert_eq!(payload["request_id"], id.to_string());
        // The payload is the result object (less its own delivery record).
        let mut result = server.result_of(id).await.ok().clone();
        result.as_object_mut().unwrap().remove("webhook");
        assert_eq!(payload["metadata"], result["metadata"]);
        assert_eq!(payload.get("webhook"), None);
        let image = payload["output"]["image"].as_str().unwrap();
        let download = reqwest::get(image).await.unwrap();
        assert_eq!(download.status(), 200);
        assert_eq!(&download.bytes().await.unwrap()[..], b"the png bytes");
    }

    #[tokio::test]
    async fn a_failed_request_is_error_with_the_failure() {
        let server = TestServer::start().await;
        let id = submit_hooked(&server).await;
        let lease = server.claim().await;
        fail(&server, &lease).await;
        let message = message_for(&server, &claim_delivery(&server).await).await;
        assert_eq!(message["request_id"], id.to_string());
        assert_eq!(message["status"], "ERROR");
        assert_eq!(message["error"], "the engine ran out of memory");
        assert_eq!(message["payload"]["status"], "failed");
        assert_eq!(message["payload"]["error"]["code"], "engine_failed");
    }

    #[tokio::test]
    async fn a_cancelled_request_is_error_cancelled() {
        let server = TestServer::start().await;
        // Queued, then cancelled.
        let queued = submit_hooked(&server).await;
        let cancel = server
            .post(&format!("/v1/requests/{queued}/cancel"), None)
            .await;
        assert_eq!(cancel.body["outcome"], "cancelled");
        let message = message_for(&server, &claim_delivery(&server).await).await;
        assert_eq!(message["request_id"], queued.to_string());
        assert_eq!(message["status"], "ERROR");
        assert_eq!(message["error"], "cancelled");
        assert_eq!(message["payload"]["status"], "cancelled");

        // Running, then cancelled by force at a step boundary.
        let running = submit_hooked(&server).await;
        let lease = server.claim().await;
        let cancel = server
            .post(&format!("/v1/requests/{running}/cancel?force=true"), None)
            .await;
        assert_eq!(cancel.body["outcome"], "cancellation_requested");
        let report = StepReport {
            progress: None,
            preview: None,
        };
        let ack = server
            .store
            .heartbeat(&lease, &report, Duration::from_secs(300))
            .await
            .unwrap();
        assert!(ack.cancel_requested);
        server.store.end_cancelled(&lease).await.unwrap();
        let message = message_for(&server, &claim_delivery(&server).await).await;
        assert_eq!(message["request_id"], running.to_string());
        assert_eq!(message["error"], "cancelled");
    }

    #[tokio::test]
    async fn a_request_whose_record_is_gone_has_no_body() {
        let server = TestServer::start().await;
        let delivery = WebhookDelivery {
            request: kiln_core::ids::RequestId::new(),
            owner: server.owner,
            url: kiln_core::webhook::WebhookUrl::parse(HOOK).unwrap(),
            created_at: OffsetDateTime::now_utc(),
            attempts: Vec::new(),
            claim_token: 1,
        };
        let bodies = WebhookBodies::from_state(&server.state);
        assert_eq!(bodies.body(&delivery).await.unwrap(), None);
    }
}

#[tokio::test]
async fn webhooks_and_forced_cancel_are_documented() {
    let server = TestServer::start().await;
    let doc = server.call(Method::GET, "/openapi.json", None, None).await;
    let doc = doc.ok();
    let paths = &doc["paths"];
    let secret = &paths["/v1/webhooks/secret"]["get"];
    assert!(secret["responses"]["200"].is_object(), "{secret}");
    let names = |op: &Value| -> Vec<String> {
        op["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    let submit = &paths[format!("/v1/models/{FLEX}")]["post"];
    assert!(names(submit).contains(&"webhook".to_string()), "{submit}");
    let cancel = &paths["/v1/requests/{request_id}/cancel"]["post"];
    assert!(names(cancel).contains(&"force".to_string()), "{cancel}");
    let schemas = &doc["components"]["schemas"];
    for schema in ["WebhookMessage", "WebhookSecret", "WebhookStatus"] {
        assert!(schemas[schema].is_object(), "{schema} is not documented");
    }
    let outcomes = &schemas["CancelResult"]["enum"];
    assert!(
        outcomes
            .as_array()
            .unwrap()
            .contains(&json!("cancellation_requested")),
        "{outcomes}"
    );
}
