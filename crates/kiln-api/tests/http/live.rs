//! Live requests: the status stream (Server-Sent Events) and `Prefer: wait` on submit. No
//! worker runs here: the tests move jobs through the store as a worker would (claim, heartbeat
//! with progress and previews, complete), and the store's events reach the API as they would
//! from a worker on another host.

use crate::harness::{TestServer, FLEX};
use kiln_core::blob::{Blob, BlobStore};
use kiln_core::ids::{BlobKey, RequestId};
use kiln_core::job::{Preview, Progress, StepReport};
use kiln_core::store::{JobStore, Lease};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long a test waits for an event that must come.
const PATIENCE: Duration = Duration::from_secs(10);

/// What a stream sends: an event, or a comment line (a keep-alive).
#[derive(Debug)]
enum Frame {
    Event { id: u64, data: Value },
    Comment,
}

/// A minimal Server-Sent Events client over a streamed reqwest body: frames are separated by a
/// blank line, fields are `name: value` lines, comments start with `:`.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
}

impl EventStream {
    async fn open(server: &TestServer, id: RequestId, last_event_id: Option<&str>) -> Self {
        let response = stream_request(server, id, Some(&server.token), last_event_id).await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        EventStream {
            response,
            buffer: String::new(),
        }
    }

    /// The next frame; `None` once the server has closed the stream.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                return Some(parse_frame(&block));
            }
            let chunk = tokio::time::timeout(PATIENCE, self.response.chunk())
                .await
                .expect("the stream went quiet")
                .expect("the stream failed")?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next event, skipping keep-alives.
    async fn event(&mut self) -> (u64, Value) {
        loop {
            match self.frame().await {
                Some(Frame::Event { id, data }) => return (id, data),
                Some(Frame::Comment) => continue,
                None => panic!("the stream closed before an expected event"),
            }
        }
    }

    /// Asserts the stream ends now (no further event).
    async fn assert_closed(&mut self) {
        loop {
            match self.frame().await {
                None => return,
                Some(Frame::Comment) => continue,
                Some(event) => panic!("an event after the last one: {event:?}"),
            }
        }
    }
}

fn parse_frame(block: &str) -> Frame {
    let (mut id, mut data) = (None, None);
    for line in block.lines() {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = Some(value.parse().expect("a numeric event id")),
            "data" => data = Some(serde_json::from_str(value).expect("JSON data")),
            other => panic!("an unexpected field {other:?} in {block:?}"),
        }
    }
    match (id, data) {
        (Some(id), Some(data)) => Frame::Event { id, data },
        (None, None) => Frame::Comment,
        _ => panic!("an event without both id and data: {block:?}"),
    }
}

async fn stream_request(
    server: &TestServer,
    id: impl std::fmt::Display,
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> reqwest::Response {
    let mut request = server
        .client
        .get(server.url(&format!("/v1/requests/{id}/status/stream")));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(last) = last_event_id {
        request = request.header("last-event-id", last);
    }
    request.send().await.unwrap()
}

/// Stores `bytes` as a preview JPEG, as a worker does, and reports it with `step`.
async fn report_step(server: &TestServer, lease: &Lease, step: u32, preview: bool) -> StepReport {
    let preview = if preview {
        let key = BlobKey::random("jpeg");
        let blob = Blob {
            bytes: format!("jpeg of step {step}").into_bytes(),
            content_type: "image/jpeg".into(),
        };
        server.blobs.put(&key, blob).await.unwrap();
        Some(Preview { key, step })
    } else {
        None
    };
    let report = StepReport {
        progress: Some(Progress { step, total: 4 }),
        preview,
    };
    server
        .store
        .heartbeat(lease, &report, Duration::from_secs(300))
        .await
        .unwrap();
    report
}

mod stream {
    use super::*;

    #[tokio::test]
    async fn queue_positions_fall_as_the_jobs_ahead_leave() {
        let server = TestServer::start().await;
        let (_first, second, third) = (
            server.submit_ok().await,
            server.submit_ok().await,
            server.submit_ok().await,
        );
        let mut stream = EventStream::open(&server, third, None).await;
        let (id, data) = stream.event().await;
        assert_eq!(id, 1);
        assert_eq!(data["status"], "in_queue", "{data}");
        assert_eq!(data["queue_position"], 2, "{data}");
        assert_eq!(data["request_id"], third.to_string());
        assert_eq!(
            data["status_url"],
            server.url(&format!("/v1/requests/{third}/status"))
        );
        assert_eq!(
            data["result_url"],
            server.url(&format!("/v1/requests/{third}/result"))
        );

        let _running = server.claim().await;
        let (id, data) = stream.event().await;
        assert_eq!((id, &data["queue_position"]), (2, &json!(1)), "{data}");

        server
            .post(&format!("/v1/requests/{second}/cancel"), None)
            .await;
        let (id, data) = stream.event().await;
        assert_eq!((id, &data["queue_position"]), (3, &json!(0)), "{data}");

        let _lease = server.claim().await;
        let (id, data) = stream.event().await;
        assert_eq!(id, 4);
        assert_eq!(data["status"], "in_progress", "{data}");
        assert!(data.get("queue_position").is_none(), "{data}");
    }

    #[tokio::test]
    async fn steps_rise_previews_replace_each_other_and_the_end_closes_the_stream() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let mut stream = EventStream::open(&server, id, None).await;
        assert_eq!(stream.event().await.1["status"], "in_queue");
        let lease = server.claim().await;
        let (_, data) = stream.event().await;
        assert_eq!(data["status"], "in_progress", "{data}");
        assert!(data.get("progress").is_none(), "{data}");

        report_step(&server, &lease, 1, true).await;
        let (_, data) = stream.event().await;
        assert_eq!(data["progress"], json!({"step": 1, "total": 4}), "{data}");
        let first_preview = data["preview_url"]
            .as_str()
            .expect("a preview URL")
            .to_string();
        let download = server.client.get(&first_preview).send().await.unwrap();
        assert_eq!(download.status(), 200);
        assert_eq!(download.headers()["content-type"], "image/jpeg");
        assert_eq!(download.bytes().await.unwrap(), "jpeg of step 1");
        // The status endpoint answers the same object.
        assert_eq!(server.status_of(id).await.ok(), &data);

        report_step(&server, &lease, 2, true).await;
        let (_, data) = stream.event().await;
        assert_eq!(data["progress"]["step"], 2, "{data}");
        let second_preview = data["preview_url"].as_str().unwrap();
        assert_ne!(second_preview, first_preview);
        let download = server.client.get(second_preview).send().await.unwrap();
        assert_eq!(download.bytes().await.unwrap(), "jpeg of step 2");
        let stale = server.client.get(&first_preview).send().await.unwrap();
        assert_eq!(
            stale.status(),
            404,
            "a replaced preview's URL stops working"
        );

        // A step without a new preview keeps the last one.
        report_step(&server, &lease, 3, false).await;
        let (_, data) = stream.event().await;
        assert_eq!(data["progress"]["step"], 3, "{data}");
        assert_eq!(data["preview_url"], second_preview, "{data}");

        server.complete(&lease, b"png").await;
        let (_, data) = stream.event().await;
        assert_eq!(data["status"], "completed", "{data}");
        assert!(data.get("preview_url").is_none(), "{data}");
        assert!(data.get("progress").is_none(), "{data}");
        stream.assert_closed().await;

        // A stream of a request that has ended sends its state once and closes.
        let mut stream = EventStream::open(&server, id, None).await;
        assert_eq!(stream.event().await.1["status"], "completed");
        stream.assert_closed().await;
    }

    #[tokio::test]
    async fn last_event_id_resumes_the_numbering_and_a_malformed_one_is_ignored() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let mut stream = EventStream::open(&server, id, Some("7")).await;
        let (event_id, data) = stream.event().await;
        assert_eq!(event_id, 8);
        assert_eq!(data["status"], "in_queue");
        let _lease = server.claim().await;
        assert_eq!(stream.event().await.0, 9);

        for malformed in ["seven", "-1", "18446744073709551615"] {
            let mut stream = EventStream::open(&server, id, Some(malformed)).await;
            assert_eq!(stream.event().await.0, 1, "{malformed}");
        }
    }

    #[tokio::test]
    async fn cancelling_a_queued_request_ends_its_stream() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let mut stream = EventStream::open(&server, id, None).await;
        stream.event().await;
        server
            .post(&format!("/v1/requests/{id}/cancel"), None)
            .await;
        assert_eq!(stream.event().await.1["status"], "cancelled");
        stream.assert_closed().await;
    }

    #[tokio::test]
    async fn a_quiet_stream_sends_keep_alive_comments() {
        let server = TestServer::start_with(|settings| {
            settings.stream_keep_alive = Duration::from_millis(200);
        })
        .await;
        let id = server.submit_ok().await;
        let mut stream = EventStream::open(&server, id, None).await;
        stream.event().await;
        let started = Instant::now();
        for _ in 0..2 {
            assert!(matches!(stream.frame().await, Some(Frame::Comment)));
        }
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn a_draining_server_ends_its_streams() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let mut stream = EventStream::open(&server, id, None).await;
        stream.event().await;
        server.state.begin_draining();
        stream.assert_closed().await;
    }

    #[tokio::test]
    async fn the_same_auth_and_ids_as_status() {
        let server = TestServer::start().await;
        let id = server.submit_ok().await;
        let (bob, _) = server.add_key("bob").await;
        let cases = [
            (id.to_string(), None, 401, 401001),
            (id.to_string(), Some(bob.as_str()), 404, 404001),
            (
                RequestId::new().to_string(),
                Some(server.token.as_str()),
                404,
                404001,
            ),
            (
                "not-a-uuid".to_string(),
                Some(server.token.as_str()),
                400,
                400001,
            ),
        ];
        for (path_id, token, status, code) in cases {
            let response = stream_request(&server, &path_id, token, None).await;
            assert_eq!(response.status().as_u16(), status, "{path_id} {token:?}");
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error_code"], code, "{body}");
        }
    }

    #[tokio::test]
    async fn many_streams_each_get_their_events() {
        let server = TestServer::start().await;
        let ids = [server.submit_ok().await, server.submit_ok().await];
        let mut streams = Vec::new();
        for _ in 0..20 {
            for id in ids {
                let mut stream = EventStream::open(&server, id, None).await;
                stream.event().await;
                streams.push((id, stream));
            }
        }
        let lease = server.claim().await;
        for (id, stream) in &mut streams {
            let (_, data) = stream.event().await;
            if *id == lease.job.id {
                assert_eq!(data["status"], "in_progress", "{data}");
            } else {
                assert_eq!(data["queue_position"], 0, "{data}");
            }
        }
    }
}

mod prefer_wait {
    use super::*;

    /// A submit of a valid FLEX request as Alice with `Prefer: {prefer}`: status, headers, body.
    async fn submit_preferring(
        server: &TestServer,
        prefer: &str,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let response = server
            .client
            .post(server.url(&format!("/v1/models/{FLEX}")))
            .bearer_auth(&server.token)
            .header("prefer", prefer)
            .json(&json!({"prompt": "a red fox in snow"}))
            .send()
            .await
            .unwrap();
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        (status, headers, response.json().await.unwrap())
    }

    /// Claims the first job to be queued, as a worker polling would, and completes it.
    async fn run_the_next_job(server: &TestServer) {
        loop {
            let policy = kiln_core::store::ClaimPolicy {
                lease: Duration::from_secs(300),
                max_attempts: 3,
            };
            let worker = kiln_core::ids::WorkerId::new("test-worker");
            let routes = kiln_core::catalog::Route::ALL;
            if let Some(lease) = server.store.claim(&worker, &routes, policy).await.unwrap() {
                report_step(server, &lease, 1, true).await;
                server.complete(&lease, b"png").await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_request_that_ends_in_time_answers_its_result() {
        let server = TestServer::start().await;
        let ((status, headers, body), ()) = tokio::join!(
            submit_preferring(&server, "wait=10"),
            run_the_next_job(&server)
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(headers["preference-applied"], "wait=10");
        assert_eq!(body["status"], "succeeded", "{body}");
        let id: RequestId = body["request_id"].as_str().unwrap().parse().unwrap();
        for action in ["status", "result", "cancel"] {
            let url = server.url(&format!("/v1/requests/{id}/{action}"));
            assert_eq!(body[format!("{action}_url")], url, "{body}");
        }
        let result = server.result_of(id).await;
        let result = result.ok();
        for field in ["output", "metadata", "created_at", "finished_at"] {
            assert_eq!(body[field], result[field], "{field}");
        }
        let image = body["output"]["image"].as_str().unwrap();
        let download = server.client.get(image).send().await.unwrap();
        assert_eq!(download.status(), 200);
    }

    #[tokio::test]
    async fn a_request_that_does_not_end_in_time_answers_as_usual() {
        let server = TestServer::start().await;
        let started = Instant::now();
        let (status, headers, body) = submit_preferring(&server, "wait=1").await;
        let waited = started.elapsed();
        assert_eq!(status, 200, "{body}");
        assert!(waited >= Duration::from_secs(1), "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        assert_eq!(headers["preference-applied"], "wait=1");
        let mut fields: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
        fields.sort();
        assert_eq!(
            fields,
            ["cancel_url", "request_id", "result_url", "status_url"],
            "{body}"
        );
    }

    #[tokio::test]
    async fn waits_beyond_60_seconds_are_refused_and_other_preferences_ignored() {
        let server = TestServer::start().await;
        let (status, _, body) = submit_preferring(&server, "wait=61").await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["error_code"], 422001);
        assert_eq!(body["detail"][0]["field"], "Prefer", "{body}");
        assert_eq!(body["detail"][0]["rule"], "wait must be 1..=60 seconds");
        let counts = server.store.state_counts().await.unwrap();
        assert!(
            counts.counts.iter().all(|(_, n)| *n == 0),
            "nothing was queued: {counts:?}"
        );

        let started = Instant::now();
        let (status, headers, body) = submit_preferring(&server, "respond-async").await;
        assert_eq!(status, 200, "{body}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(headers.get("preference-applied").is_none());
        assert!(body["request_id"].is_string(), "{body}");
    }
}

/// The OpenAPI document lists the stream.
#[tokio::test]
async fn the_stream_is_documented() {
    let server = TestServer::start().await;
    let doc = server
        .call(Method::GET, "/openapi.json", None, None)
        .await
        .ok()
        .clone();
    let get = &doc["paths"]["/v1/requests/{request_id}/status/stream"]["get"];
    assert!(
        get["responses"]["200"]["content"]["text/event-stream"].is_object(),
        "{get}"
    );
}
