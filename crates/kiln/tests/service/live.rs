//! Live requests (issue 16) through the built binary: the status stream followed from an API
//! node while a worker in another process runs the job (PostgreSQL, S3 bucket), webhooks that
//! survive a restart of kiln between attempts (checked by the `standardwebhooks` crate as an
//! independent verifier), `Prefer: wait` both ways and a forced cancel of a running job (real
//! FLUX.1 engine on the tiny checkpoint, SQLite).

use crate::harness::{write_config, Client, KilnProcess, PRO};
use crate::many_machines::{free_port, Cluster};
use axum::http::HeaderMap;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A status stream being read: its events as `(id, status object)`.
pub struct EventStream {
    response: reqwest::Response,
    pending: String,
    /// `:` comment lines seen so far (keep-alives).
    pub comments: usize,
}

impl EventStream {
    /// Opens `GET {base}/v1/requests/{id}/status/stream` with `token`.
    pub async fn open(base: &str, token: &str, id: &str, last_event_id: Option<u64>) -> Self {
        // No overall timeout: a stream lasts as long as its request.
        let http = reqwest::Client::new();
        let mut request = http
            .get(format!("{base}/v1/requests/{id}/status/stream"))
            .bearer_auth(token);
        if let Some(last) = last_event_id {
            request = request.header("Last-Event-ID", last.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Self {
            response,
            pending: String::new(),
            comments: 0,
        }
    }

    /// The next event, or `None` once the server has closed the stream.
    pub async fn next(&mut self) -> Option<(u64, Value)> {
        loop {
            while let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let (mut id, mut data) = (None, None);
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse().expect("numeric event ids"));
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data = Some(serde_json::from_str(v.trim()).expect("JSON data"));
                    }
                }
                if let Some(data) = data {
                    return Some((id.expect("every event has an id"), data));
                }
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.response.chunk())
                .await
                .expect("an event or a keep-alive within 60 s")
                .unwrap()?;
            self.pending.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Every event until the stream closes (at most `timeout`).
    pub async fn all(&mut self, timeout: Duration) -> Vec<(u64, Value)> {
        let deadline = Instant::now() + timeout;
        let mut events = vec![];
        while let Some(event) = self.next().await {
            events.push(event);
            assert!(
                Instant::now() < deadline,
                "the stream did not end: {events:?}"
            );
        }
        events
    }
}

/// Item 1 and 2 across processes: an API node streams what a worker in another process does,
/// the events reaching it through PostgreSQL's NOTIFY; queue positions fall, steps rise, a
/// preview downloads, the terminal event ends the stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_status_stream_follows_a_worker_in_another_process() {
    let Some(cluster) = Cluster::start_with(12, None, "preview_interval = 1\n").await else {
        return;
    };
    let (ok, token, err) = cluster.run("admin", &["keys", "create", "--name", "live"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    let port = free_port();
    let api = cluster.api_node("api", port);
    let client = Client::new(&api.base, &token);
    // Three requests wait before any worker runs: the last is third in line.
    let mut ids = vec![];
    for n in 0..3 {
        let (code, body) = client
            .submit(PRO, slow_input(&format!("a lantern {n}")))
            .await;
        assert_eq!(code, 200, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_string());
    }
    let mut stream = EventStream::open(&api.base, &token, &ids[2], None).await;
    let (first_id, first) = stream.next().await.unwrap();
    assert_eq!(
        (first["status"].as_str(), first["queue_position"].as_u64()),
        (Some("in_queue"), Some(2)),
        "{first}"
    );
    let _worker = cluster.worker("worker", false);
    let events = stream.all(Duration::from_secs(300)).await;
    let ids_seen: Vec<u64> = std::iter::once(first_id)
        .chain(events.iter().map(|e| e.0))
        .collect();
    assert!(
        ids_seen.windows(2).all(|w| w[0] < w[1]),
        "ids rise: {ids_seen:?}"
    );
    let statuses: Vec<&Value> = std::iter::once(&first)
        .chain(events.iter().map(|e| &e.1))
        .collect();
    let positions: Vec<u64> = statuses
        .iter()
        .filter_map(|s| s["queue_position"].as_u64())
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] > w[1]) && positions.len() >= 2,
        "positions fall: {positions:?}"
    );
    let steps: Vec<u64> = statuses
        .iter()
        .filter_map(|s| s["progress"]["step"].as_u64())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]) && steps.len() >= 2,
        "steps rise: {steps:?}"
    );
    let last = statuses.last().unwrap();
    assert_eq!(last["status"], "completed", "{last}");
    assert!(last.get("preview_url").is_none(), "{last}");
    // The last preview stays with the record: its URL downloads without a token.
    let preview = statuses
        .iter()
        .rev()
        .find_map(|s| s["preview_url"].as_str())
        .expect("a preview");
    let (code, content_type, bytes) = client.download(preview).await;
    assert_eq!((code, content_type.as_deref()), (200, Some("image/jpeg")));
    let image = image::load_from_memory(&bytes).unwrap();
    assert!(
        image.width().max(image.height()) <= 256,
        "{}x{}",
        image.width(),
        image.height()
    );
    // Resuming after the end: the terminal event again, numbered on, and the stream closes.
    let mut resumed =
        EventStream::open(&api.base, &token, &ids[2], Some(*ids_seen.last().unwrap())).await;
    let again = resumed.all(Duration::from_secs(10)).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, ids_seen.last().unwrap() + 1);
    assert_eq!(again[0].1["status"], "completed");
}

/// Slow enough on the tiny checkpoint that a stream sees several steps (heartbeats, which carry
/// them, come once a second): 12 steps at 512x512 took about 2 s in bf16 on a 2-core AMX machine
/// (half a second a step in f32 on older CPUs), too near one heartbeat; 640x640 has 1.6x the
/// tokens.
fn slow_input(prompt: &str) -> Value {
    json!({ "prompt": prompt, "image_size": "Custom", "width": 640, "height": 640 })
}

/// What a webhook receiver got: each request's headers and body, in order.
type Received = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

/// A receiver on loopback answering the statuses of `script` in turn (then 200).
async fn receiver(script: Vec<u16>) -> (String, Received) {
    let received: Received = Arc::default();
    let answers = Arc::new(Mutex::new(script.into_iter()));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let received = received.clone();
            move |headers: HeaderMap, body: axum::body::Bytes| {
                let (received, answers) = (received.clone(), answers.clone());
                async move {
                    received.lock().unwrap().push((headers, body.to_vec()));
                    let code = answers.lock().unwrap().next().unwrap_or(200);
                    axum::http::StatusCode::from_u16(code).unwrap()
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, received)
}

/// Waits until the receiver has `n` requests.
async fn wait_received(received: &Received, n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while received.lock().unwrap().len() < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} webhook requests arrived",
            received.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Item 3 and 6: a receiver that fails twice, kiln killed (SIGKILL) and started again between
/// the attempts: delivered, signed, the same `webhook-id` every time, nothing after the 2xx.
#[tokio::test(flavor = "multi_thread")]
async fn a_webhook_is_delivered_across_a_restart_and_verifies() {
    let (url, received) = receiver(vec![500, 500]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 2, "[fetch]\nallow = [\"127.0.0.1\"]\n");
    let data = dir.path().join("data");
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut kiln = KilnProcess::serve_with_env(&config, &data, &bind, &[], &[]);
    let token = kiln.first_key.clone().expect("a first start makes a key");
    let client = Client::new(&kiln.base, &token);
    let (code, secret) = client
        .call(reqwest::Method::GET, "/v1/webhooks/secret", None)
        .await;
    assert_eq!(code, 200, "{secret}");
    let secret = secret["key"].as_str().unwrap().to_string();
    let model = format!("{PRO}?webhook={url}");
    let (code, submitted) = client.submit(&model, crate::harness::input("a kiln")).await;
    assert_eq!(code, 200, "{submitted}");
    let id = submitted["request_id"].as_str().unwrap().to_string();
    wait_received(&received, 1, Duration::from_secs(120)).await;
    kiln.sigkill();
    let kiln = KilnProcess::serve_with_env(&config, &data, &bind, &[], &[]);
    // The first retry waits ~2 s, the second ~4 s: well within 60 s, with the restart.
    wait_received(&received, 3, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 3, "no attempt after the 2xx");
    let verifier = standardwebhooks::Webhook::new(&secret).unwrap();
    let message_id = received[0].0["webhook-id"].clone();
    for (headers, body) in &received {
        assert_eq!(
            headers["webhook-id"], message_id,
            "the same id on every attempt"
        );
        verifier
            .verify(body, headers)
            .expect("signed per Standard Webhooks");
        let message: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            (message["request_id"].as_str(), message["status"].as_str()),
            (Some(id.as_str()), Some("OK")),
            "{message}"
        );
        assert_eq!(message["payload"]["status"], "succeeded", "{message}");
    }
    // A tampered body does not verify.
    let (headers, body) = &received[2];
    let mut tampered = body.clone();
    tampered[0] = b' ';
    assert!(verifier.verify(&tampered, headers).is_err());
    let message: Value = serde_json::from_slice(body).unwrap();
    let image = message["payload"]["output"]["image"].as_str().unwrap();
    assert_eq!(client.download(image).await.0, 200);
    let (_, result) = client.result(&id).await;
    let webhook = &result["webhook"];
    assert_eq!(webhook["status"], "delivered", "{result}");
    let codes: Vec<u64> = webhook["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["http_status"].as_u64())
        .collect();
    assert_eq!(codes, [500, 500, 200], "{result}");
    drop(kiln);
}

/// Items 4 and 5 on one process: `Prefer: wait` answered with the result or, past its time,
/// the usual answer; a running request cancelled with `force` ends cancelled at a step
/// boundary and the slot goes on to the next request.
#[tokio::test(flavor = "multi_thread")]
async fn prefer_wait_both_ways_and_a_forced_cancel_of_a_running_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 12, "");
    let kiln = KilnProcess::serve(&config, &dir.path().join("data"), &[]);
    let token = kiln.first_key.clone().unwrap();
    let client = Client::new(&kiln.base, &token);
    let http = reqwest::Client::new();
    let submit = |input: Value, wait: u32| {
        http.post(format!("{}/v1/models/{PRO}", kiln.base))
            .bearer_auth(&token)
            .header("Prefer", format!("wait={wait}"))
            .json(&input)
            .send()
    };
    let answer = submit(crate::harness::input("a quick one"), 60)
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let done: Value = answer.json().await.unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["output"]["image"].is_string()
            && done["status_url"].is_string()
            && done["result_url"].is_string()
            && done["cancel_url"].is_string(),
        "{done}"
    );

    let started = Instant::now();
    // Larger than `slow_input`: the forced cancel must reach a running step (at the next
    // heartbeat, up to a second later) before the last one, and at 512x512 a fast machine's
    // bf16 products finished all 12 steps in about 2 seconds.
    let larger =
        json!({ "prompt": "a slow one", "image_size": "Custom", "width": 1024, "height": 1024 });
    let answer = submit(larger, 1).await.unwrap();
    assert_eq!(answer.status(), 200);
    let queued: Value = answer.json().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        queued.get("output").is_none() && queued["status_url"].is_string(),
        "{queued}"
    );
    let slow = queued["request_id"].as_str().unwrap().to_string();
    let (_, next) = client
        .submit(PRO, crate::harness::input("the next one"))
        .await;
    let next = next["request_id"].as_str().unwrap().to_string();
    client
        .wait_status(&slow, &["in_progress"], Duration::from_secs(60))
        .await;
    assert_eq!(client.cancel(&slow).await["outcome"], "not_cancellable");
    let (code, forced) = client
        .call(
            reqwest::Method::POST,
            &format!("/v1/requests/{slow}/cancel?force=true"),
            None,
        )
        .await;
    assert_eq!(code, 202, "{forced}");
    assert_eq!(forced["outcome"], "cancellation_requested", "{forced}");
    let ended = client.wait_result(&slow, Duration::from_secs(60)).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    let next = client.wait_result(&next, Duration::from_secs(120)).await;
    assert_eq!(
        next["status"], "succeeded",
        "the slot took the next request: {next}"
    );
}

/// One machine, two processes on one SQLite file (`kiln serve --workers 0` and `kiln worker`):
/// the worker's changes reach the API node's stream through the file's change log.
#[tokio::test(flavor = "multi_thread")]
async fn a_status_stream_on_sqlite_hears_a_worker_process() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        12,
        "preview_interval = 1\n[workers]\nlease_secs = 3\npoll_interval_ms = 100\n",
    );
    let data = dir.path().join("data");
    let api = KilnProcess::serve(&config, &data, &["--workers", "0"]);
    let token = api.first_key.clone().unwrap();
    let client = Client::new(&api.base, &token);
    let (code, submitted) = client.submit(PRO, slow_input("one machine")).await;
    assert_eq!(code, 200, "{submitted}");
    let id = submitted["request_id"].as_str().unwrap();
    let mut stream = EventStream::open(&api.base, &token, id, None).await;
    let _worker = KilnProcess::worker(&config, &data);
    let events = stream.all(Duration::from_secs(120)).await;
    let steps: Vec<u64> = events
        .iter()
        .filter_map(|(_, s)| s["progress"]["step"].as_u64())
        .collect();
    assert!(steps.len() >= 2, "steps seen: {events:?}");
    assert!(
        events.iter().any(|(_, s)| s["preview_url"].is_string()),
        "{events:?}"
    );
    assert_eq!(
        events.last().unwrap().1["status"],
        "completed",
        "{events:?}"
    );
}
