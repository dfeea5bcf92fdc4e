//! Fetching an edit's reference images: real HTTP on loopback, from a small server whose every
//! path misbehaves in one way (redirect loops, stalls, oversized bodies, wrong content).

use kiln_core::engine::RgbImage;
use kiln_core::image_file::encode_image;
use kiln_core::params::{ImageSource, OutputFormat};
use kiln_worker::{FetchPolicy, ReferenceFetcher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn test_image() -> RgbImage {
    RgbImage {
        width: 24,
        height: 16,
        pixels: (0..24 * 16 * 3).map(|i| (i * 11 % 256) as u8).collect(),
    }
}

/// A loopback HTTP/1.1 server; it counts the requests it gets.
struct ImageServer {
    address: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl ImageServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        let png = encode_image(&test_image(), OutputFormat::Png).unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(stream, png.clone()));
            }
        });
        Self { address, requests }
    }

    fn url(&self, path: &str) -> ImageSource {
        ImageSource::parse(&format!("http://{}{path}", self.address)).unwrap()
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

async fn answer(mut stream: TcpStream, png: Vec<u8>) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let reply = |status: &str, headers: &str, body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n{headers}\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    };
    let bytes = match path.as_str() {
        "/cup.png" => reply("200 OK", "content-type: image/png\r\n", &png),
        "/missing.png" => reply("404 Not Found", "", b"no such image"),
        "/page.html" => reply("200 OK", "content-type: text/html\r\n", b"<html></html>"),
        "/loop" => reply("302 Found", "location: /loop\r\n", b""),
        "/hop" => reply("302 Found", "location: /cup.png\r\n", b""),
        "/to-file" => reply("302 Found", "location: file:///etc/passwd\r\n", b""),
        "/claims-huge" => {
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 999999999\r\n\r\n".to_vec()
        }
        "/streams-huge" => {
            // No length announced: the limit must hold while reading.
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .await;
            let chunk = vec![0u8; 64 * 1024];
            for _ in 0..64 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            return;
        }
        "/stalls" => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        _ => reply("404 Not Found", "", b""),
    };
    let _ = stream.write_all(&bytes).await;
}

fn loopback_policy() -> FetchPolicy {
    FetchPolicy {
        allow_private_addresses: true,
        max_image_bytes: 1024 * 1024,
        timeout: Duration::from_secs(2),
        max_redirects: 3,
    }
}

/// The one failure's reason for `source`.
async fn refusal(fetcher: &ReferenceFetcher, source: ImageSource) -> String {
    let err = fetcher.fetch_all(&[source]).await.unwrap_err();
    assert_eq!(err.position, 1);
    err.to_string()
}

#[tokio::test]
async fn urls_and_data_uris_decode_to_the_same_image() {
    use base64::Engine as _;
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let png = encode_image(&test_image(), OutputFormat::Png).unwrap();
    let data = ImageSource::parse(&format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&png)
    ))
    .unwrap();
    let images = fetcher
        .fetch_all(&[server.url("/cup.png"), data, server.url("/hop")])
        .await
        .unwrap();
    assert_eq!(images, vec![test_image(); 3]);
}

#[tokio::test]
async fn internal_addresses_are_refused_without_connecting() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(FetchPolicy::default());
    let message = refusal(&fetcher, server.url("/cup.png")).await;
    assert!(
        message.contains(
            "127.0.0.1 is a private, loopback, link-local or otherwise non-public address"
        ),
        "{message}"
    );
    // A name that resolves to loopback is refused too: the check is on the resolved address.
    let by_name = ImageSource::parse(&format!(
        "http://localhost:{}/cup.png",
        server.address.port()
    ))
    .unwrap();
    let message = refusal(&fetcher, by_name).await;
    assert!(
        message.contains("localhost resolves to") && message.contains("non-public address"),
        "{message}"
    );
    let metadata = ImageSource::parse("http://169.254.169.254/latest/meta-data").unwrap();
    assert!(refusal(&fetcher, metadata)
        .await
        .contains("169.254.169.254"));
    assert_eq!(server.requests(), 0, "nothing reached the server");
}

#[tokio::test]
async fn redirects_are_bounded_and_checked() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let message = refusal(&fetcher, server.url("/loop")).await;
    assert!(message.contains("more than 3 redirects"), "{message}");
    assert_eq!(server.requests(), 4, "the first request and 3 redirects");
    let message = refusal(&fetcher, server.url("/to-file")).await;
    assert!(
        message.contains("redirected to file:///etc/passwd, which is not followed"),
        "{message}"
    );
}

#[tokio::test]
async fn sizes_and_time_are_bounded() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let message = refusal(&fetcher, server.url("/claims-huge")).await;
    assert!(
        message.contains("999999999 bytes is larger than the limit of 1048576 bytes"),
        "{message}"
    );
    let message = refusal(&fetcher, server.url("/streams-huge")).await;
    assert!(
        message.contains("larger than the limit of 1048576 bytes"),
        "{message}"
    );
    let started = Instant::now();
    let message = refusal(&fetcher, server.url("/stalls")).await;
    assert!(
        message.contains("no complete answer within 2 s"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let inline =
        ImageSource::parse(&format!("data:image/png;base64,{}", "A".repeat(2_000_000))).unwrap();
    let message = refusal(&fetcher, inline).await;
    assert!(message.contains("larger than the limit"), "{message}");
}

#[tokio::test]
async fn what_is_not_an_image_is_named() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let message = refusal(&fetcher, server.url("/missing.png")).await;
    assert!(
        message.starts_with(&format!(
            "reference image 1 (http://{}/missing.png): the server answered 404 Not Found",
            server.address
        )),
        "{message}"
    );
    let message = refusal(&fetcher, server.url("/page.html")).await;
    assert!(
        message.contains("not an image kiln can read (JPEG, PNG or WebP)"),
        "{message}"
    );
    // The second of two is named by its position.
    let err = fetcher
        .fetch_all(&[server.url("/cup.png"), server.url("/page.html")])
        .await
        .unwrap_err();
    assert_eq!(err.position, 2);
    let garbage = ImageSource::parse("data:image/png;base64,AAAA").unwrap();
    let message = refusal(&fetcher, garbage).await;
    assert!(
        message.starts_with(
            "reference image 1 (data URI, image/png, 4 base64 characters): not an image"
        ),
        "{message}"
    );
}
