//! The whole service in one process with the scripted engine: where a test needs jobs of a
//! known length (progress, queue positions, cancel in each state, token isolation end to end).

use crate::harness::{InProcess, FLEX};
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_queue_positions_then_progress_and_cancel_follows_the_state() {
    let kiln = InProcess::start(|_| {}).await;
    let client = &kiln.client;
    let mut ids = vec![];
    for prompt in ["slow one", "slow two", "slow three"] {
        let (code, body) = client
            .submit(FLEX, json!({"prompt": prompt, "num_inference_steps": 6}))
            .await;
        assert_eq!(code, 200, "{body}");
        ids.push(body["request_id"].as_str().unwrap().to_string());
    }
    // One worker slot: the first runs, the others wait in order.
    let running = client
        .wait_status(&ids[0], &["in_progress"], Duration::from_secs(10))
        .await;
    assert!(running.get("output").is_none());
    let status = client.status(&ids[0]).await;
    assert_eq!(status["status"], "in_progress");
    assert_eq!(client.status(&ids[1]).await["queue_position"], 0);
    assert_eq!(client.status(&ids[2]).await["queue_position"], 1);

    assert_eq!(client.cancel(&ids[2]).await["outcome"], "cancelled");
    assert_eq!(client.status(&ids[2]).await["status"], "cancelled");
    assert_eq!(client.cancel(&ids[0]).await["outcome"], "not_cancellable");
    let (code, hidden) = kiln.other.result(&ids[0]).await;
    assert_eq!(
        (code, hidden["error_code"].as_u64()),
        (404, Some(404001)),
        "another token sees nothing"
    );

    let mut saw_progress = false;
    loop {
        let status = client.status(&ids[0]).await;
        if status["status"] != "in_progress" {
            break;
        }
        if let Some(step) = status["progress"]["step"].as_u64() {
            assert_eq!(status["progress"]["total"], 6);
            assert!((1..=6).contains(&step));
            saw_progress = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_progress, "progress was reported while the job ran");
    let first = client.wait_result(&ids[0], Duration::from_secs(20)).await;
    assert_eq!(first["status"], "succeeded");
    assert_eq!(client.status(&ids[0]).await["status"], "completed");
    assert_eq!(
        client.wait_result(&ids[1], Duration::from_secs(20)).await["status"],
        "succeeded"
    );
    let cancelled = client.wait_result(&ids[2], Duration::from_secs(1)).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(kiln.engine.runs(), 2, "the cancelled job never ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_generation_reads_completed_on_status_and_failed_on_result() {
    let kiln = InProcess::start(|_| {}).await;
    let (_, body) = kiln
        .client
        .submit(FLEX, json!({"prompt": "please fail"}))
        .await;
    let id = body["request_id"].as_str().unwrap();
    let result = kiln.client.wait_result(id, Duration::from_secs(10)).await;
    assert_eq!(result["status"], "failed");
    assert_eq!(result["error"]["code"], "engine_failed");
    assert!(result.get("output").is_none());
    assert_eq!(kiln.client.status(id).await["status"], "completed");
}

#[tokio::test(flavor = "multi_thread")]
async fn images_come_in_the_requested_format_at_the_requested_size() {
    let kiln = InProcess::start(|_| {}).await;
    let input = json!({"prompt": "a png", "output_format": "png", "image_size": {"width": 100, "height": 70}, "seed": 7});
    let (_, body) = kiln.client.submit(FLEX, input).await;
    let result = kiln
        .client
        .wait_result(
            body["request_id"].as_str().unwrap(),
            Duration::from_secs(10),
        )
        .await;
    assert_eq!(result["metadata"]["output_format"], "png");
    let (code, content_type, bytes) = kiln
        .client
        .download(result["output"]["image"].as_str().unwrap())
        .await;
    assert_eq!((code, content_type.as_deref()), (200, Some("image/png")));
    let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(
        img.dimensions(),
        (96, 64),
        "custom sides are rounded to multiples of 16"
    );
    assert_eq!(
        img.get_pixel(0, 0).0,
        kiln_testkit::ScriptedEngine::color_of(7)
    );
}
