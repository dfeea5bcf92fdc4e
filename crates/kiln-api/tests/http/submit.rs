//! POST /v1/models/{model_id}: submitting, validation, limits, idempotency.

use crate::harness::{TestServer, EDIT, FLEX, PRO};
use kiln_core::catalog::Route;
use kiln_core::ids::RequestId;
use kiln_core::job::JobState;
use kiln_core::params::{ImageSize, OutputSize};
use kiln_core::store::JobStore;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn a_submit_is_queued_durably_and_answers_absolute_urls() {
    let server = TestServer::start().await;
    let answer = server
        .submit(
            PRO,
            json!({"prompt": "a lighthouse", "image_size": "1:1", "seed": 7}),
        )
        .await;
    let body = answer.ok();
    let id: RequestId = body["request_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        body["status_url"],
        server.url(&format!("/v1/requests/{id}/status"))
    );
    assert_eq!(
        body["result_url"],
        server.url(&format!("/v1/requests/{id}/result"))
    );
    assert_eq!(
        body["cancel_url"],
        server.url(&format!("/v1/requests/{id}/cancel"))
    );

    let job = server
        .store
        .get(server.owner, id)
        .await
        .unwrap()
        .expect("stored")
        .job;
    assert_eq!(job.state(), JobState::Queued);
    assert_eq!(job.route, Route::Flux11ProTextToImage);
    assert_eq!(
        job.params.size,
        OutputSize::Pixels(ImageSize {
            width: 1024,
            height: 1024
        })
    );
    assert_eq!(job.params.seed, 7);
    assert_eq!(job.params.prompt.as_str(), "a lighthouse");
}

#[tokio::test]
async fn unknown_models_are_400001_naming_the_known_ones() {
    let server = TestServer::start().await;
    let answer = server
        .submit(
            "blackforestlabs/flux-9/text-to-image",
            json!({"prompt": "x"}),
        )
        .await;
    let message = answer.error(400, 400001)["error_message"].as_str().unwrap();
    assert!(message.contains(PRO) && message.contains(FLEX), "{message}");
}

#[tokio::test]
async fn models_without_an_engine_here_are_400001_saying_so() {
    let server =
        TestServer::start_with(|s| s.served_routes = vec![Route::Flux11ProTextToImage]).await;
    let answer = server.submit(FLEX, json!({"prompt": "x"})).await;
    let message = answer.error(400, 400001)["error_message"].as_str().unwrap();
    assert!(
        message.contains("no engine is configured for model"),
        "{message}"
    );
    assert!(message.contains(FLEX) && message.contains(PRO), "{message}");
    server.submit(PRO, json!({"prompt": "x"})).await.ok();
}

#[tokio::test]
async fn schema_violations_are_422001_listing_every_field() {
    let server = TestServer::start().await;
    let input = json!({"prompt": "x", "image_size": {"width": 5000, "height": 512}, "num_inference_steps": "many", "colour": 1});
    let answer = server.submit(FLEX, input).await;
    let detail = answer.error(422, 422001)["detail"]
        .as_array()
        .unwrap()
        .clone();
    let fields: Vec<&str> = detail
        .iter()
        .map(|d| d["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        ["image_size.width", "num_inference_steps", "colour"]
    );
    assert_eq!(detail[0]["value"], json!(5000));
    assert!(
        detail[0]["rule"]
            .as_str()
            .unwrap()
            .contains("between 64 and 2048"),
        "{}",
        detail[0]
    );
    assert!(
        detail[2]["rule"]
            .as_str()
            .unwrap()
            .contains("allowed fields: prompt, image_size"),
        "{}",
        detail[2]
    );

    let answer = server.submit(PRO, json!({})).await;
    assert_eq!(answer.error(422, 422001)["detail"][0]["field"], "prompt");
}

#[tokio::test]
async fn bodies_that_are_not_json_objects_are_422001() {
    let server = TestServer::start().await;
    for body in ["{\"prompt\": ", "prompt=a cat", ""] {
        let response = server
            .submit_raw(FLEX, body, Some("application/json"))
            .await;
        assert_eq!(response.status(), 422, "{body:?}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["error_code"], 422001);
        assert_eq!(error["detail"][0]["field"], "body");
    }
    let answer = server
        .post(&format!("/v1/models/{FLEX}"), Some(&json!(["a cat"])))
        .await;
    assert_eq!(
        answer.error(422, 422001)["detail"][0]["rule"],
        "must be a JSON object"
    );
}

#[tokio::test]
async fn oversized_bodies_are_413001() {
    let server = TestServer::start_with(|s| s.max_body_bytes = 1024).await;
    let answer = server
        .submit(FLEX, json!({"prompt": "x".repeat(2000)}))
        .await;
    let message = answer.error(413, 413001)["error_message"].as_str().unwrap();
    assert!(message.contains("1024"), "{message}");
    server
        .submit(FLEX, json!({"prompt": "x".repeat(900)}))
        .await
        .ok();
}

#[tokio::test]
async fn prompts_over_the_configured_length_are_422001() {
    let server = TestServer::start_with(|s| s.max_prompt_chars = 10).await;
    let answer = server
        .submit(PRO, json!({"prompt": "a very long prompt"}))
        .await;
    let rule = answer.error(422, 422001)["detail"][0]["rule"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        rule,
        "must be at most 10 characters after trimming (got 18)"
    );
}

#[tokio::test]
async fn submits_beyond_the_rate_are_429001_with_retry_after() {
    let server = TestServer::start_with(|s| {
        s.rate_limit_per_minute = 1;
        s.rate_limit_burst = 2;
    })
    .await;
    server.submit_ok().await;
    server.submit_ok().await;
    let answer = server.submit(FLEX, json!({"prompt": "x"})).await;
    answer.error(429, 429001);
    assert!(answer.retry_after() >= 1);
    // Another key has its own bucket.
    let (bob, _) = server.add_key("bob").await;
    let other = server
        .call(
            Method::POST,
            &format!("/v1/models/{FLEX}"),
            Some(&bob),
            Some(&json!({"prompt": "x"})),
        )
        .await;
    other.ok();
}

/// Submits until one is refused; how many passed.
async fn valid_submits_until_refused(server: &TestServer, at_most: usize) -> usize {
    for n in 0..at_most {
        let answer = server.submit(FLEX, json!({"prompt": "a red fox"})).await;
        if answer.status != 200 {
            answer.error(429, 429001);
            return n;
        }
    }
    at_most
}

#[tokio::test]
async fn by_default_a_burst_of_100_valid_submits_passes() {
    let server = TestServer::start().await;
    assert_eq!(valid_submits_until_refused(&server, 150).await, 150);
}

#[tokio::test]
async fn switched_on_the_default_burst_is_100_then_the_rate_applies() {
    let server = TestServer::start_with(|s| s.rate_limit_per_minute = 1).await;
    assert_eq!(valid_submits_until_refused(&server, 150).await, 100);
}

#[tokio::test]
async fn refused_submits_do_not_spend_the_budget() {
    let server = TestServer::start_with(|s| {
        s.rate_limit_per_minute = 1;
        s.rate_limit_burst = 2;
    })
    .await;
    let url = format!("/v1/models/{FLEX}");
    for _ in 0..5 {
        let invalid = server
            .submit(FLEX, json!({"prompt": "x", "seed": -1}))
            .await;
        invalid.error(422, 422001);
        let unknown_field = server.submit(FLEX, json!({"prompt": "x", "n": 4})).await;
        unknown_field.error(422, 422001);
        let bad_token = server
            .call(
                Method::POST,
                &url,
                Some("kiln_nope"),
                Some(&json!({"prompt": "x"})),
            )
            .await;
        bad_token.error(401, 401001);
        let no_token = server
            .call(Method::POST, &url, None, Some(&json!({"prompt": "x"})))
            .await;
        no_token.error(401, 401001);
    }
    assert_eq!(valid_submits_until_refused(&server, 5).await, 2);
}

#[tokio::test]
async fn a_full_queue_refunds_the_token() {
    let server = TestServer::start_with(|s| {
        s.rate_limit_per_minute = 1;
        s.rate_limit_burst = 2;
        s.max_queued = 1;
    })
    .await;
    server.submit_ok().await;
    for _ in 0..5 {
        let full = server.submit(FLEX, json!({"prompt": "x"})).await;
        full.error(503, 503001);
    }
    server.claim().await;
    // The refused submits cost nothing: the second token is still there.
    server.submit_ok().await;
    server.claim().await;
    assert_eq!(valid_submits_until_refused(&server, 1).await, 0);
}

#[tokio::test]
async fn a_full_queue_is_503001_with_retry_after() {
    let server = TestServer::start_with(|s| s.max_queued = 2).await;
    server.submit_ok().await;
    server.submit_ok().await;
    let answer = server.submit(FLEX, json!({"prompt": "x"})).await;
    answer.error(503, 503001);
    assert!(answer.retry_after() >= 1);
    // A claimed job no longer waits: there is room again.
    server.claim().await;
    server.submit_ok().await;
}

#[tokio::test]
async fn one_key_with_its_share_of_the_queue_waiting_gets_429001_and_others_still_submit() {
    let server = TestServer::start_with(|s| s.max_queued_per_key = 2).await;
    server.submit_ok().await;
    server.submit_ok().await;
    let answer = server.submit(FLEX, json!({"prompt": "x"})).await;
    let body = answer.error(429, 429001);
    assert!(
        body["error_message"]
            .as_str()
            .unwrap()
            .contains("2 jobs waiting"),
        "{body}"
    );
    assert!(answer.retry_after() >= 1);
    let (bob, _) = server.add_key("bob").await;
    let input = json!({"prompt": "bob's turn"});
    let path = format!("/v1/models/{FLEX}");
    let bobs = server
        .call(Method::POST, &path, Some(&bob), Some(&input))
        .await;
    bobs.ok();
    // Once one of Alice's jobs runs, she has room again.
    server.claim().await;
    server.submit_ok().await;
}

#[tokio::test]
async fn a_draining_server_refuses_submits_with_503001_and_is_not_ready() {
    let server = TestServer::start().await;
    let id = server.submit_ok().await;
    server.state.begin_draining();
    let answer = server.submit(FLEX, json!({"prompt": "x"})).await;
    answer.error(503, 503001);
    assert!(answer.retry_after() >= 1);
    let ready = server.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["status"], "draining");
    // Accepted work can still be polled.
    server.status_of(id).await.ok();
}

mod idempotency {
    use super::*;
    use crate::harness::Answer;

    async fn submit_with_key(
        server: &TestServer,
        token: &str,
        key: &str,
        input: serde_json::Value,
    ) -> Answer {
        let response = server
            .client
            .post(server.url(&format!("/v1/models/{FLEX}")))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&input)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        Answer {
            status,
            headers,
            body: response.json().await.unwrap(),
        }
    }

    #[tokio::test]
    async fn a_replay_answers_the_original_request() {
        let server = TestServer::start().await;
        let first = submit_with_key(
            &server,
            &server.token,
            "order-42",
            json!({"prompt": "a cat"}),
        )
        .await;
        // Spelling out a default is the same request.
        let again = submit_with_key(
            &server,
            &server.token,
            "order-42",
            json!({"prompt": "a cat", "seed": 0}),
        )
        .await;
        assert_eq!(first.ok(), again.ok());
        let counts = server.store.state_counts().await.unwrap();
        assert_eq!(
            counts
                .counts
                .iter()
                .find(|(s, _)| *s == JobState::Queued)
                .map(|(_, n)| *n),
            Some(1)
        );
    }

    #[tokio::test]
    async fn replays_do_not_spend_the_budget() {
        let server = TestServer::start_with(|s| {
            s.rate_limit_per_minute = 1;
            s.rate_limit_burst = 2;
        })
        .await;
        let input = json!({"prompt": "a cat"});
        let first = submit_with_key(&server, &server.token, "k1", input.clone()).await;
        for _ in 0..5 {
            let replay = submit_with_key(&server, &server.token, "k1", input.clone()).await;
            assert_eq!(replay.ok(), first.ok());
        }
        let conflict = submit_with_key(&server, &server.token, "k1", json!({"prompt": "a dog"}));
        conflict.await.error(409, 409001);
        // The original spent one token; one is left, then the limit applies.
        submit_with_key(&server, &server.token, "k2", input.clone())
            .await
            .ok();
        submit_with_key(&server, &server.token, "k3", input)
            .await
            .error(429, 429001);
    }

    #[tokio::test]
    async fn a_key_reused_for_another_input_is_409001() {
        let server = TestServer::start().await;
        submit_with_key(
            &server,
            &server.token,
            "order-42",
            json!({"prompt": "a cat"}),
        )
        .await
        .ok();
        let answer = submit_with_key(
            &server,
            &server.token,
            "order-42",
            json!({"prompt": "a dog"}),
        )
        .await;
        assert_eq!(
            answer.error(409, 409001)["detail"][0]["field"],
            "Idempotency-Key"
        );
    }

    #[tokio::test]
    async fn keys_are_scoped_to_their_token() {
        let server = TestServer::start().await;
        let (bob, _) = server.add_key("bob").await;
        let alice = submit_with_key(&server, &server.token, "k", json!({"prompt": "a cat"})).await;
        let bob = submit_with_key(&server, &bob, "k", json!({"prompt": "a cat"})).await;
        assert_ne!(alice.ok()["request_id"], bob.ok()["request_id"]);
    }

    #[tokio::test]
    async fn malformed_keys_are_422001() {
        let server = TestServer::start().await;
        let answer = submit_with_key(
            &server,
            &server.token,
            &"k".repeat(256),
            json!({"prompt": "a cat"}),
        )
        .await;
        assert_eq!(
            answer.error(422, 422001)["detail"][0]["field"],
            "Idempotency-Key"
        );
    }
}

/// A data URI's image lives in the blob store while its job needs it, not in the job's record.
#[tokio::test]
async fn inline_images_are_stored_as_blobs_and_cancelling_deletes_them() {
    use kiln_core::blob::BlobStore;
    let server = TestServer::start().await;
    let payload = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";
    let input = json!({
        "prompt": "the same, in red",
        "image_urls": ["https://example.com/a.png", format!("data:image/png;base64,{payload}")],
    });
    let id: RequestId = server.submit(EDIT, input).await.ok()["request_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let job = server
        .store
        .get(server.owner, id)
        .await
        .unwrap()
        .unwrap()
        .job;
    let record = serde_json::to_string(&job.params).unwrap();
    assert!(
        !record.contains(payload),
        "the record keeps a key, not the image: {record}"
    );
    assert!(
        record.contains("https://example.com/a.png"),
        "URLs stay as sent"
    );
    let stored = job.params.stored_images();
    assert_eq!(stored.len(), 1, "{record}");
    let blob = server.blobs.get(&stored[0]).await.unwrap().expect("stored");
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .unwrap();
    assert_eq!(
        (blob.bytes, blob.content_type.as_str()),
        (bytes, "image/png")
    );

    let cancelled = server
        .post(&format!("/v1/requests/{id}/cancel"), None)
        .await;
    assert_eq!(cancelled.status, 202, "{}", cancelled.body);
    assert!(
        server.blobs.get(&stored[0]).await.unwrap().is_none(),
        "a cancelled job's images are deleted"
    );
}

#[tokio::test]
async fn a_replayed_submit_leaves_no_second_copy_of_its_images() {
    let server = TestServer::start().await;
    let input = json!({
        "prompt": "the same, in red",
        // A media type no blob store knows is stored all the same (the decoder reads bytes).
        "image_urls": ["data:ImaGE/\u{d6};base64,iVBORw0KGgo="],
    });
    let path = format!("/v1/models/{EDIT}");
    let submit = || async {
        server
            .client
            .post(server.url(&path))
            .bearer_auth(&server.token)
            .header("Idempotency-Key", "batch-7")
            .json(&input)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(submit().await.status(), 200);
    assert_eq!(submit().await.status(), 200);
    let files = walk_files(server.blobs_root());
    assert_eq!(files.len(), 1, "one job, one stored image: {files:?}");
}

fn walk_files(dir: std::path::PathBuf) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk_files(path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn a_repeated_field_is_422001_naming_it() {
    let server = TestServer::start().await;
    let body = r#"{"prompt": "a fox", "image_size": {"width": 512, "height": 512, "width": 1024}}"#;
    let response = server
        .submit_raw(FLEX, body, Some("application/json"))
        .await;
    assert_eq!(response.status(), 422);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["error_code"], 422001, "{answer}");
    assert_eq!(answer["detail"][0]["field"], "image_size.width", "{answer}");
    assert!(answer["detail"][0]["rule"]
        .as_str()
        .unwrap()
        .contains("more than once"));
}

#[tokio::test]
async fn a_body_not_declared_json_is_415001() {
    let server = TestServer::start().await;
    let body = r#"{"prompt": "a fox"}"#;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let response = server.submit_raw(FLEX, body, content_type).await;
        assert_eq!(response.status(), 415, "{content_type:?}");
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["error_code"], 415001, "{answer}");
        assert_eq!(answer["detail"][0]["field"], "Content-Type", "{answer}");
    }
    for content_type in ["application/json; charset=utf-8", "application/merge+json"] {
        let response = server.submit_raw(FLEX, body, Some(content_type)).await;
        assert_eq!(response.status(), 200, "{content_type}");
    }
}
