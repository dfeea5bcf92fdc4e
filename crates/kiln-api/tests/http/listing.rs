//! GET /v1/requests: the token's own requests, newest first, paged by cursor, each with the
//! input that makes it again.

use crate::harness::{TestServer, EDIT, FLEX, PRO};
use kiln_core::ids::RequestId;
use kiln_core::job::{JobError, JobErrorCode};
use kiln_core::store::JobStore;
use reqwest::Method;
use serde_json::{json, Value};
use std::collections::HashSet;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A 1x1 PNG, as a data URI's payload.
const PNG_BASE64: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

fn request_id(answer: &Value) -> RequestId {
    answer["request_id"].as_str().unwrap().parse().unwrap()
}

/// Submits `input` to `model` as Alice; the request id.
async fn submit(server: &TestServer, model: &str, input: Value) -> RequestId {
    request_id(server.submit(model, input).await.ok())
}

/// Alice's listing at `query` (e.g. `?limit=2`), which must answer 200.
async fn list(server: &TestServer, query: &str) -> Value {
    server
        .get(&format!("/v1/requests{query}"))
        .await
        .ok()
        .clone()
}

fn ids(page: &Value) -> Vec<RequestId> {
    page["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(request_id)
        .collect()
}

/// Every request of Alice's listing with `limit`, page by page, following `next`.
async fn every_page(server: &TestServer, limit: u32) -> Vec<Value> {
    let mut pages = vec![list(server, &format!("?limit={limit}")).await];
    while let Some(next) = pages.last().unwrap()["next"].as_str() {
        assert!(pages.len() < 50, "the listing never ends");
        let next = next.to_string();
        pages.push(list(server, &format!("?limit={limit}&before={next}")).await);
    }
    pages
}

#[tokio::test]
async fn requests_are_listed_newest_first_and_pages_reach_each_once() {
    let server = TestServer::start().await;
    let mut submitted = Vec::new();
    for i in 0..5 {
        submitted.push(submit(&server, FLEX, json!({"prompt": format!("fox {i}")})).await);
    }
    let newest_first: Vec<RequestId> = submitted.iter().rev().copied().collect();

    let all = list(&server, "").await;
    assert_eq!(ids(&all), newest_first, "the default page holds them all");
    assert_eq!(all["next"], Value::Null, "{all}");
    let first = &all["requests"][0];
    assert_eq!(first["model"], FLEX);
    assert_eq!(first["status"], "in_queue");
    assert_eq!(first["input"]["prompt"], "fox 4");
    let created = first["created_at"].as_str().unwrap();
    OffsetDateTime::parse(created, &Rfc3339).expect("an RFC 3339 instant");
    assert!(first.get("finished_at").is_none() && first.get("output").is_none());
    let id = newest_first[0];
    assert_eq!(
        first["status_url"],
        server.url(&format!("/v1/requests/{id}/status"))
    );
    assert_eq!(
        first["result_url"],
        server.url(&format!("/v1/requests/{id}/result"))
    );
    server.get(first["status_url"].as_str().unwrap()).await.ok();

    let pages = every_page(&server, 2).await;
    let sizes: Vec<usize> = pages
        .iter()
        .map(|p| p["requests"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [2, 2, 1]);
    let listed: Vec<RequestId> = pages.iter().flat_map(ids).collect();
    assert_eq!(listed, newest_first, "each request once, in order");
    assert_eq!(listed.iter().collect::<HashSet<_>>().len(), listed.len());
    // A submit between pages does not move the pages already handed out.
    let cursor = pages[0]["next"].as_str().unwrap().to_string();
    submit(&server, FLEX, json!({"prompt": "a newer fox"})).await;
    let again = list(&server, &format!("?limit=2&before={cursor}")).await;
    assert_eq!(ids(&again), ids(&pages[1]));
}

#[tokio::test]
async fn another_tokens_requests_are_never_listed() {
    let server = TestServer::start().await;
    let (bob, _) = server.add_key("bob").await;
    let alices = submit(&server, FLEX, json!({"prompt": "alice's"})).await;
    let bobs = server
        .call(
            Method::POST,
            &format!("/v1/models/{FLEX}"),
            Some(&bob),
            Some(&json!({"prompt": "bob's"})),
        )
        .await;
    let bobs = request_id(bobs.ok());
    assert_eq!(ids(&list(&server, "").await), [alices]);
    let as_bob = server
        .call(Method::GET, "/v1/requests", Some(&bob), None)
        .await;
    assert_eq!(ids(as_bob.ok()), [bobs]);
    let (carol, _) = server.add_key("carol").await;
    let empty = server
        .call(Method::GET, "/v1/requests", Some(&carol), None)
        .await;
    assert_eq!(empty.ok(), &json!({"requests": [], "next": null}));
}

#[tokio::test]
async fn without_a_valid_token_it_is_401001() {
    let server = TestServer::start().await;
    server.submit_ok().await;
    for token in [None, Some("kiln_0000")] {
        let answer = server.call(Method::GET, "/v1/requests", token, None).await;
        answer.error(401, 401001);
        assert_eq!(answer.headers["www-authenticate"], "Bearer");
    }
}

#[tokio::test]
async fn bad_parameters_are_422001_naming_the_parameter_and_its_rule() {
    let server = TestServer::start().await;
    server.submit_ok().await;
    for (query, field, value) in [
        ("limit=0", "limit", "0"),
        ("limit=101", "limit", "101"),
        ("limit=abc", "limit", "abc"),
        ("limit=", "limit", ""),
        ("before=garbage", "before", "garbage"),
        ("before=-1", "before", "-1"),
    ] {
        let answer = server.get(&format!("/v1/requests?{query}")).await;
        let body = answer.error(422, 422001);
        let detail = body["detail"].as_array().unwrap();
        assert_eq!(detail.len(), 1, "{query}: {body}");
        assert_eq!(detail[0]["field"], field, "{query}");
        assert_eq!(detail[0]["value"], value, "{query}");
        let rule = detail[0]["rule"].as_str().unwrap();
        let expected = if field == "limit" {
            "1 to 100"
        } else {
            "`next`"
        };
        assert!(rule.contains(expected), "{query}: {rule}");
    }
    let both = server.get("/v1/requests?limit=1000&before=x").await;
    let fields: Vec<&Value> = both.error(422, 422001)["detail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["field"])
        .collect();
    assert_eq!(fields, [&json!("limit"), &json!("before")]);
    // Parameters the listing does not take are ignored.
    let page = list(&server, "?limit=1&colour=red").await;
    assert_eq!(page["requests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_listed_input_submitted_again_makes_the_same_request() {
    let server = TestServer::start().await;
    let inputs = [
        (
            PRO,
            json!({"prompt": "a lighthouse", "image_size": "Custom", "width": 500, "height": 700, "seed": 5, "raw": true}),
        ),
        (PRO, json!({"prompt": "a harbour"})),
        (
            FLEX,
            json!({"prompt": "a fox", "image_size": {"width": 1000, "height": 600}, "guidance_scale": 2.7, "num_inference_steps": 9, "output_format": "png", "enable_prompt_expansion": false, "seed": 99}),
        ),
        (FLEX, json!({"prompt": "a hare", "image_size": "square_hd"})),
        (
            EDIT,
            json!({"prompt": "make it red", "image_urls": ["https://example.com/cup.png"], "image_size": "auto", "seed": 3}),
        ),
    ];
    let mut originals = Vec::new();
    for (model, input) in &inputs {
        originals.push(submit(&server, model, input.clone()).await);
    }
    let first = list(&server, "").await;
    for listed in first["requests"].as_array().unwrap() {
        let model = listed["model"].as_str().unwrap();
        let again = submit(&server, model, listed["input"].clone()).await;
        let original = request_id(listed);
        let (was, is) = (job(&server, original).await, job(&server, again).await);
        assert_eq!((is.route, &is.params), (was.route, &was.params), "{listed}");
    }
    // The copies list with the same model and input as their originals.
    let page = list(&server, "").await;
    let entries = page["requests"].as_array().unwrap();
    let (copies, originals_listed) = entries.split_at(inputs.len());
    for (copy, original) in copies.iter().zip(originals_listed.iter().rev()) {
        assert_eq!(
            (&copy["model"], &copy["input"]),
            (&original["model"], &original["input"])
        );
    }
    assert_eq!(
        originals_listed.iter().map(request_id).collect::<Vec<_>>(),
        originals.iter().rev().copied().collect::<Vec<_>>()
    );
}

async fn job(server: &TestServer, id: RequestId) -> kiln_core::job::Job {
    server
        .store
        .get(server.owner, id)
        .await
        .unwrap()
        .expect("visible")
        .job
}

#[tokio::test]
async fn ended_requests_list_their_outcome_and_succeeded_ones_their_images() {
    let server = TestServer::start().await;
    let succeeds = server.submit_ok().await;
    let fails = server.submit_ok().await;
    let lease = server.claim().await;
    let png = b"\x89PNG listed".to_vec();
    server.complete(&lease, &png).await;
    let lease = server.claim().await;
    let error = JobError {
        code: JobErrorCode::EngineFailed,
        message: "the engine gave up".into(),
    };
    server.store.fail(&lease, error).await.unwrap();

    let page = list(&server, "").await;
    assert_eq!(ids(&page), [fails, succeeds]);
    let (failed, succeeded) = (&page["requests"][0], &page["requests"][1]);
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "engine_failed");
    assert!(failed.get("output").is_none());
    assert_eq!(succeeded["status"], "succeeded");
    let finished = succeeded["finished_at"].as_str().expect("finished_at");
    OffsetDateTime::parse(finished, &Rfc3339).expect("an RFC 3339 instant");
    let output = &succeeded["output"];
    assert_eq!(output["images"], json!([output["image"]]));
    // The same signed URL the result gives, downloading with no token.
    let result = server.result_of(succeeds).await;
    assert_eq!(output, &result.ok()["output"]);
    let response = server
        .client
        .get(output["image"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap().to_vec(), png);
}

#[tokio::test]
async fn an_edits_inline_image_is_shown_while_kept_and_named_once_deleted() {
    let server = TestServer::start().await;
    let url = "https://example.com/a.png";
    let input = json!({
        "prompt": "the same, in red",
        "image_urls": [format!("data:image/png;base64,{PNG_BASE64}"), url],
    });
    let id = submit(&server, EDIT, input).await;
    let queued = list(&server, "").await["requests"][0].clone();
    let urls = queued["input"]["image_urls"].as_array().unwrap().clone();
    assert_eq!(urls.len(), 2, "{queued}");
    assert_eq!(urls[1], url);
    assert!(queued.get("input_omitted").is_none(), "{queued}");
    // While the request waits, the stored copy downloads from its signed URL with no token.
    let copy = urls[0].as_str().unwrap();
    assert!(copy.starts_with(&server.url("/files/")), "{copy}");
    let response = server.client.get(copy).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/png");
    use base64::Engine as _;
    let png = base64::engine::general_purpose::STANDARD
        .decode(PNG_BASE64)
        .unwrap();
    assert_eq!(response.bytes().await.unwrap().to_vec(), png);
    // The input as listed is one the model takes.
    submit(&server, EDIT, queued["input"].clone()).await;

    // Cancelled, the request's copy is deleted: the image is left out, and named.
    let cancel = server
        .post(&format!("/v1/requests/{id}/cancel"), None)
        .await;
    assert_eq!(cancel.status, 202, "{}", cancel.body);
    let page = list(&server, "").await;
    let ended = page["requests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| request_id(r) == id)
        .unwrap()
        .clone();
    assert_eq!(ended["status"], "cancelled");
    assert_eq!(ended["input"]["image_urls"], json!([url]));
    assert_eq!(ended["input_omitted"], json!(["image_urls[0]"]));
}
