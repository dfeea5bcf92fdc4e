//! Request ids: ours on every answer, a client's own never echoed.

use crate::harness::TestServer;

async fn request_id_answered(server: &TestServer, sent: Option<&str>) -> String {
    let mut request = server.client.get(server.url("/healthz"));
    if let Some(sent) = sent {
        request = request.header("x-request-id", sent);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let ids: Vec<_> = response.headers().get_all("x-request-id").iter().collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    ids[0].to_str().unwrap().to_string()
}

fn assert_uuid(id: &str) {
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|e| panic!("{id:?}: {e}"));
    assert_eq!(parsed.get_version_num(), 4, "{id}");
}

#[tokio::test]
async fn every_answer_carries_a_new_uuid_of_ours() {
    let server = TestServer::start().await;
    let first = request_id_answered(&server, None).await;
    let second = request_id_answered(&server, None).await;
    assert_uuid(&first);
    assert_uuid(&second);
    assert_ne!(first, second);
}

#[tokio::test]
async fn a_clients_own_id_is_not_echoed_valid_or_not() {
    let server = TestServer::start().await;
    let valid = "trace-me-1";
    let answered = request_id_answered(&server, Some(valid)).await;
    assert_ne!(answered, valid);
    assert_uuid(&answered);
    // Not even a UUID-shaped one: the client does not choose the id the log correlates by.
    let chosen = "0b6a8f5e-6f1c-4b61-9e55-3f1e2d8c7a10";
    let answered = request_id_answered(&server, Some(chosen)).await;
    assert_ne!(answered, chosen);
    assert_uuid(&answered);
    for invalid in ["has spaces in it", "<script>", &"x".repeat(129)] {
        let answered = request_id_answered(&server, Some(invalid)).await;
        assert_uuid(&answered);
    }
}

#[tokio::test]
async fn error_answers_carry_our_id_too() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get(server.url("/v2/nothing"))
        .header("x-request-id", "client-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_uuid(response.headers()["x-request-id"].to_str().unwrap());
}
