//! Slow and idle clients: the header, body and idle timeouts, the connection cap, and graceful
//! shutdown with requests in flight, over raw TCP where a well-behaved client would not do it.

use crate::harness::{TestServer, FLEX};
use kiln_api::{serve, ConnectionLimits};
use kiln_core::store::JobStore;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request head cut off before its blank line: what a slow-loris client sends.
const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: kiln\r\nX-Slow: ";

fn limits(change: impl FnOnce(&mut ConnectionLimits)) -> ConnectionLimits {
    let mut limits = ConnectionLimits::default();
    change(&mut limits);
    limits
}

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the server closes the connection (or resets it); what it had sent, and when.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, Instant) {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(within, read_all)
        .await
        .expect("the server closed the connection in time");
    (
        String::from_utf8_lossy(&received).into_owned(),
        Instant::now(),
    )
}

async fn healthz(server: &TestServer) -> reqwest::StatusCode {
    server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn a_half_sent_head_is_closed_after_the_header_timeout() {
    let server = TestServer::start_with(|s| {
        s.connections = limits(|l| l.header_timeout = Duration::from_secs(1))
    })
    .await;
    let mut slow = connect(&server).await;
    let started = Instant::now();
    slow.write_all(HALF_HEAD).await.unwrap();
    let (answer, closed) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    let held = closed - started;
    assert!(
        held >= Duration::from_millis(900),
        "closed too early: {held:?}"
    );
    assert!(!answer.contains("200 OK"), "{answer}");

    // A connection that sends nothing at all is closed on the same clock.
    let mut silent = connect(&server).await;
    let started = Instant::now();
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(closed - started >= Duration::from_millis(900));
    assert_eq!(healthz(&server).await, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let server = TestServer::start_with(|s| {
        s.connections = limits(|l| {
            l.header_timeout = Duration::from_secs(30);
            l.idle_timeout = Duration::from_secs(1);
        })
    })
    .await;
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let held = closed - started;
    assert!(
        held >= Duration::from_millis(900) && held < Duration::from_secs(10),
        "kept open {held:?} though idle, with a header timeout of 30 s"
    );
}

#[tokio::test]
async fn at_the_connection_cap_further_clients_wait_and_are_served_when_a_slot_frees() {
    let server = TestServer::start_with(|s| {
        s.connections = limits(|l| {
            l.max_connections = 2;
            l.header_timeout = Duration::from_secs(60);
        })
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(&server).await;
        stream.write_all(HALF_HEAD).await.unwrap();
        held.push(stream);
    }
    // Let the server accept both before the third client arrives.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = server.client.clone();
    let url = server.url("/healthz");
    let waiting = tokio::spawn(async move { client.get(url).send().await.unwrap().status() });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "a third connection was served past a cap of 2"
    );
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn health_answers_while_half_open_connections_are_held_below_the_cap() {
    let server = TestServer::start_with(|s| {
        s.connections = limits(|l| {
            l.max_connections = 64;
            l.header_timeout = Duration::from_secs(60);
        })
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut stream = connect(&server).await;
        stream.write_all(HALF_HEAD).await.unwrap();
        held.push(stream);
    }
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(healthz(&server).await, 200);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(held.len(), 40);
}

#[tokio::test]
async fn a_slow_body_is_answered_408() {
    let server = TestServer::start_with(|s| {
        s.connections = limits(|l| l.body_timeout = Duration::from_secs(1))
    })
    .await;
    let mut stream = connect(&server).await;
    let head = format!(
        "POST /v1/models/{FLEX} HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\": ",
        server.token
    );
    let started = Instant::now();
    stream.write_all(head.as_bytes()).await.unwrap();
    let (answer, answered) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("408001"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("x-request-id"),
        "{answer}"
    );
    assert!(answered - started >= Duration::from_millis(900));
    assert!(
        server
            .store
            .state_counts()
            .await
            .unwrap()
            .counts
            .iter()
            .all(|(_, n)| *n == 0),
        "nothing was queued"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_requests_in_flight_finish() {
    let server = TestServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(serve(listener, server.state.clone(), async {
        let _ = stopped.await;
    }));
    let body = br#"{"prompt": "a red fox in snow"}"#;
    let head = format!(
        "POST /v1/models/{FLEX} HTTP/1.1\r\nHost: kiln\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        server.token,
        body.len()
    );
    let mut in_flight = TcpStream::connect(address).await.unwrap();
    in_flight.write_all(head.as_bytes()).await.unwrap();
    in_flight.write_all(&body[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        TcpStream::connect(address).await.is_err(),
        "a new connection was accepted after the shutdown signal"
    );
    assert!(!serving.is_finished(), "returned with a request in flight");
    in_flight.write_all(&body[5..]).await.unwrap();
    let (answer, _) = read_until_closed(&mut in_flight, Duration::from_secs(10)).await;
    // The request finishes; a draining server refuses new work with 503001.
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("503001"), "{answer}");
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("serve returns once its connections are done")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_keep_alive_connection_waits_for_its_next_head_at_most_the_header_timeout() {
    let server = TestServer::start_with(|s| {
        s.connections = limits(|l| {
            l.header_timeout = Duration::from_secs(1);
            l.idle_timeout = Duration::from_secs(60);
        })
    })
    .await;
    let mut stream = connect(&server).await;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kiln\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (answer, closed) = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        closed - started < Duration::from_secs(10),
        "hyper's header timer also bounds the wait for the next request"
    );
}
