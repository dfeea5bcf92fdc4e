//! Auth, and GET status / GET result / POST cancel of /v1/requests/{id}.

use crate::harness::{TestServer, FLEX};
use kiln_core::job::{JobError, JobErrorCode, Progress, StepReport};
use kiln_core::store::{JobStore, KeyStore};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

mod auth {
    use super::*;

    #[tokio::test]
    async fn a_missing_token_is_401001_with_a_bearer_challenge() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        for (method, path) in [
            (Method::POST, format!("/v1/models/{FLEX}")),
            (Method::GET, format!("/v1/requests/{id}/status")),
            (Method::GET, format!("/v1/requests/{id}/result")),
            (Method::POST, format!("/v1/requests/{id}/cancel")),
        ] {
            let answer = server
                .call(method, &path, None, Some(&json!({"prompt": "x"})))
                .await;
            answer.error(401, 401001);
            assert_eq!(answer.headers["www-authenticate"], "Bearer", "{path}");
        }
    }

    #[tokio::test]
    async fn wrong_schemes_and_unknown_tokens_are_401001() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let status = server.url(&format!("/v1/requests/{id}/status"));
        let basic = server
            .client
            .get(&status)
            .basic_auth("alice", Some(&server.token))
            .send()
            .await
            .unwrap();
        assert_eq!(basic.status(), 401);
        let unknown = server
            .call(Method::GET, &status, Some("kiln_0000"), None)
            .await;
        unknown.error(401, 401001);
    }

    #[tokio::test]
    async fn a_revoked_token_is_401001() {
        // A revocation in the store reaches a server within its key cache's TTL (the cache's
        // unit tests show that); with no cache it is immediate, which this test checks over HTTP.
        let server = TestServer::start_with(|s| s.key_cache_ttl = Duration::ZERO).await;
        let (bob, _) = server.add_key("bob").await;
        let input = json!({"prompt": "x"});
        let path = format!("/v1/models/{FLEX}");
        server
            .call(Method::POST, &path, Some(&bob), Some(&input))
            .await
            .ok();
        server.store.revoke_key("bob").await.unwrap();
        server
            .call(Method::POST, &path, Some(&bob), Some(&input))
            .await
            .error(401, 401001);
        // Alice is unaffected.
        server.submit_ok().await;
    }
}

#[tokio::test]
async fn queued_requests_report_their_position_0_being_next() {
    let server = TestServer::start().await;
    let ids = [
        server.submit_ok().await,
        server.submit_ok().await,
        server.submit_ok().await,
    ];
    for (position, id) in ids.iter().enumerate() {
        let answer = server.status_of(*id).await;
        let body = answer.ok();
        assert_eq!(body["status"], "in_queue");
        assert_eq!(body["queue_position"], json!(position));
        assert_eq!(body["request_id"], id.to_string());
        assert_eq!(
            body["status_url"],
            server.url(&format!("/v1/requests/{id}/status"))
        );
        assert_eq!(
            body["result_url"],
            server.url(&format!("/v1/requests/{id}/result"))
        );
        assert!(body.get("progress").is_none());
    }
    // The first is taken: the others move up, and it reports progress once known.
    let lease = server.claim().await;
    assert_eq!(lease.job.id, ids[0]);
    let running = server.status_of(ids[0]).await;
    assert_eq!(running.ok()["status"], "in_progress");
    assert!(running.body.get("queue_position").is_none());
    assert!(running.body.get("progress").is_none());
    server
        .store
        .heartbeat(
            &lease,
            &StepReport {
                progress: Some(Progress { step: 3, total: 28 }),
                preview: None,
            },
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    let running = server.status_of(ids[0]).await;
    assert_eq!(running.ok()["progress"], json!({"step": 3, "total": 28}));
    assert_eq!(server.status_of(ids[1]).await.ok()["queue_position"], 0);
    assert_eq!(server.status_of(ids[2]).await.ok()["queue_position"], 1);
}

#[tokio::test]
async fn the_result_of_an_unfinished_request_is_its_current_state() {
    let server = TestServer::start().await;
    let id = server.submit_ok().await;
    let answer = server.result_of(id).await;
    let body = answer.ok();
    assert_eq!(body["status"], "in_queue");
    assert_eq!(body["request_id"], id.to_string());
    for absent in ["output", "error", "metadata", "finished_at"] {
        assert!(body.get(absent).is_none(), "{absent} in {body}");
    }
    let created = OffsetDateTime::parse(body["created_at"].as_str().unwrap(), &Rfc3339).unwrap();
    assert!((OffsetDateTime::now_utc() - created).whole_minutes().abs() < 5);
    server.claim().await;
    assert_eq!(server.result_of(id).await.ok()["status"], "in_progress");
}

#[tokio::test]
async fn a_succeeded_request_has_output_urls_and_metadata() {
    let server = TestServer::start().await;
    let id = server.submit_ok().await;
    let lease = server.claim().await;
    let key = server.complete(&lease, b"\x89PNG fake").await;

    let answer = server.result_of(id).await;
    let body = answer.ok();
    assert_eq!(body["status"], "succeeded");
    let image = body["output"]["image"].as_str().unwrap();
    assert!(
        image.starts_with(&server.url(&format!("/files/{key}?expires="))),
        "{image}"
    );
    assert_eq!(body["output"]["images"], json!([image]));
    assert!(body.get("error").is_none());
    let finished = body["finished_at"].as_str().expect("finished_at");
    OffsetDateTime::parse(finished, &Rfc3339).unwrap();
    let metadata = &body["metadata"];
    assert_eq!(metadata["model"], FLEX);
    assert_eq!(metadata["width"], 1024);
    assert_eq!(metadata["height"], 768);
    assert_eq!(metadata["seed"], 0);
    assert_eq!(metadata["num_inference_steps"], 28);
    assert_eq!(metadata["guidance"], 3.5);
    assert_eq!(metadata["output_format"], "png");
    assert_eq!(metadata["prompt"], "a red fox in snow");
    assert_eq!(
        metadata["timings_ms"],
        json!({"queued": 5, "inference": 1200, "encode_and_store": 30})
    );
    assert_eq!(metadata["engine"], "test engine");
    assert_eq!(metadata["notes"], json!(["made by the test harness"]));

    assert_eq!(server.status_of(id).await.ok()["status"], "completed");
}

#[tokio::test]
async fn a_failed_request_has_an_error_and_reads_completed_on_status() {
    let server = TestServer::start().await;
    let id = server.submit_ok().await;
    let lease = server.claim().await;
    let error = JobError {
        code: JobErrorCode::EngineFailed,
        message: "the engine ran out of memory".into(),
    };
    server.store.fail(&lease, error).await.unwrap();

    let answer = server.result_of(id).await;
    let body = answer.ok();
    assert_eq!(body["status"], "failed");
    assert_eq!(
        body["error"],
        json!({"code": "engine_failed", "message": "the engine ran out of memory"})
    );
    assert!(body.get("output").is_none() && body.get("metadata").is_none());
    assert_eq!(server.status_of(id).await.ok()["status"], "completed");
}

#[tokio::test]
async fn cancelling_a_queued_request_and_again_is_harmless() {
    let server = TestServer::start().await;
    let id = server.submit_ok().await;
    let cancel = format!("/v1/requests/{id}/cancel");
    for _ in 0..2 {
        let answer = server.post(&cancel, None).await;
        assert_eq!(answer.status, 202, "{}", answer.body);
        assert_eq!(
            answer.body,
            json!({"request_id": id.to_string(), "status": "cancelled", "outcome": "cancelled"})
        );
    }
    assert_eq!(server.status_of(id).await.ok()["status"], "cancelled");
    let result = server.result_of(id).await;
    assert_eq!(result.ok()["status"], "cancelled");
    assert!(result.body.get("finished_at").is_some());
}

#[tokio::test]
async fn running_and_finished_requests_are_not_cancellable() {
    let server = TestServer::start().await;
    let id = server.submit_ok().await;
    let lease = server.claim().await;
    let cancel = format!("/v1/requests/{id}/cancel");
    let answer = server.post(&cancel, None).await;
    assert_eq!(answer.status, 202);
    assert_eq!(answer.body["outcome"], "not_cancellable");
    assert_eq!(answer.body["status"], "in_progress");
    server.complete(&lease, b"png").await;
    let answer = server.post(&cancel, None).await;
    assert_eq!(answer.body["outcome"], "not_cancellable");
    assert_eq!(answer.body["status"], "completed");
}

mod forced_cancel {
    use super::*;

    #[tokio::test]
    async fn a_running_request_is_asked_to_stop_and_ends_cancelled() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let lease = server.claim().await;
        let cancel = format!("/v1/requests/{id}/cancel?force=true");
        for _ in 0..2 {
            let answer = server.post(&cancel, None).await;
            assert_eq!(answer.status, 202, "{}", answer.body);
            assert_eq!(
                answer.body,
                json!({"request_id": id.to_string(), "status": "in_progress", "outcome": "cancellation_requested"})
            );
        }
        // Its worker learns it at the next heartbeat, and stops.
        let report = StepReport {
            progress: Some(Progress { step: 2, total: 28 }),
            preview: None,
        };
        let ack = server
            .store
            .heartbeat(&lease, &report, Duration::from_secs(300))
            .await
            .unwrap();
        assert!(ack.cancel_requested);
        assert_eq!(server.status_of(id).await.ok()["status"], "in_progress");
        server.store.end_cancelled(&lease).await.unwrap();

        let result = server.result_of(id).await;
        assert_eq!(result.ok()["status"], "cancelled");
        assert!(result.body.get("finished_at").is_some());
        assert_eq!(server.status_of(id).await.ok()["status"], "cancelled");
        // Cancelling it again is harmless, as for a queued one.
        let answer = server.post(&cancel, None).await;
        assert_eq!(answer.body["outcome"], "cancelled");
        assert_eq!(answer.body["status"], "cancelled");
    }

    #[tokio::test]
    async fn a_queued_request_is_cancelled_at_once() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let answer = server
            .post(&format!("/v1/requests/{id}/cancel?force=true"), None)
            .await;
        assert_eq!(answer.body["outcome"], "cancelled", "{}", answer.body);
        assert_eq!(answer.body["status"], "cancelled");
    }

    #[tokio::test]
    async fn force_false_is_the_plain_cancel() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let lease = server.claim().await;
        let answer = server
            .post(&format!("/v1/requests/{id}/cancel?force=false"), None)
            .await;
        assert_eq!(answer.body["outcome"], "not_cancellable", "{}", answer.body);
        let report = StepReport {
            progress: None,
            preview: None,
        };
        let ack = server
            .store
            .heartbeat(&lease, &report, Duration::from_secs(300))
            .await
            .unwrap();
        assert!(!ack.cancel_requested);
    }

    #[tokio::test]
    async fn a_malformed_force_is_422001_naming_force() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        for value in ["maybe", "1", "", "TRUE"] {
            let answer = server
                .post(&format!("/v1/requests/{id}/cancel?force={value}"), None)
                .await;
            let body = answer.error(422, 422001);
            assert_eq!(body["detail"][0]["field"], "force", "{body}");
            assert_eq!(body["detail"][0]["rule"], "must be true or false", "{body}");
        }
        // Nothing was cancelled.
        assert_eq!(server.status_of(id).await.ok()["status"], "in_queue");
    }
}

#[tokio::test]
async fn malformed_request_ids_are_400001() {
    let server = TestServer::start().await;
    for path in ["/v1/requests/123/status", "/v1/requests/not-a-uuid/result"] {
        server.get(path).await.error(400, 400001);
    }
    server
        .post("/v1/requests/zzz/cancel", None)
        .await
        .error(400, 400001);
}

#[tokio::test]
async fn unknown_foreign_and_expired_requests_read_exactly_the_same() {
    let server = TestServer::start_with(|s| s.retention = Duration::ZERO).await;
    let (bob, _) = server.add_key("bob").await;
    let unknown = kiln_core::ids::RequestId::new();
    // Alice's request, seen by Bob.
    let alices = server.submit_ok().await;
    // A request that ended with zero retention: expired at once.
    let expired = server.submit_ok().await;
    server
        .post(&format!("/v1/requests/{expired}/cancel"), None)
        .await;

    for (method, endpoint) in [
        (Method::GET, "status"),
        (Method::GET, "result"),
        (Method::POST, "cancel"),
    ] {
        let path = |id| format!("/v1/requests/{id}/{endpoint}");
        let reference = server
            .call(method.clone(), &path(unknown), Some(&server.token), None)
            .await;
        reference.error(404, 404001);
        let foreign = server
            .call(method.clone(), &path(alices), Some(&bob), None)
            .await;
        assert_eq!(
            (foreign.status, &foreign.body),
            (reference.status, &reference.body)
        );
        let gone = server
            .call(method.clone(), &path(expired), Some(&server.token), None)
            .await;
        assert_eq!(
            (gone.status, &gone.body),
            (reference.status, &reference.body)
        );
    }
    // Bob's attempt changed nothing.
    assert_eq!(server.status_of(alices).await.ok()["status"], "in_queue");
}
