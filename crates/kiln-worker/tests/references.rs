//! Fetching an edit's reference images: real HTTP on loopback, from a small server whose every
//! path misbehaves in one way (redirect loops, stalls, oversized bodies, wrong content,
//! decompression bombs), and data URIs.

use kiln_core::engine::RgbImage;
use kiln_core::image_file::encode_image;
use kiln_core::params::{ImageSource, OutputFormat};
use kiln_worker::{AllowList, FetchError, FetchPolicy, Reason, ReferenceFetcher};
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
        let png = Arc::new(png);
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

async fn answer(mut stream: TcpStream, png: Arc<Vec<u8>>) {
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
        "/bomb.png" => reply(
            "200 OK",
            "content-type: image/png\r\n",
            &png_declaring(16384, 16384),
        ),
        "/bomb.jpg" => reply(
            "200 OK",
            "content-type: image/jpeg\r\n",
            &jpeg_declaring(16384, 16384),
        ),
        "/photo.png" => reply(
            "200 OK",
            "content-type: image/png\r\n",
            &photo_png(2000, 1500),
        ),
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

/// A small real PNG whose header claims `width x height`: the IHDR's sizes rewritten and its
/// checksum recomputed, so only decoding the pixel data could tell.
fn png_declaring(width: u32, height: u32) -> Vec<u8> {
    let mut png = encode_image(&test_image(), OutputFormat::Png).unwrap();
    // Signature (8), IHDR length (4) and type (4), then width and height.
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// PNG's CRC-32 (ISO 3309), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A small real JPEG (a few hundred bytes) whose frame header claims `width x height`.
fn jpeg_declaring(width: u16, height: u16) -> Vec<u8> {
    let mut jpeg = encode_image(&test_image(), OutputFormat::Jpeg).unwrap();
    // Walk the marker segments after SOI to the start of frame (SOF0..SOF2).
    let mut at = 2;
    while !(0xc0..=0xc2).contains(&jpeg[at + 1]) {
        assert_eq!(jpeg[at], 0xff, "a marker at {at}");
        at += 2 + usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
    }
    // Marker (2), length (2), precision (1), then height and width.
    jpeg[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

/// A `width x height` PNG with some detail in it.
fn photo_png(width: u32, height: u32) -> Vec<u8> {
    let pixels = (0..width * height)
        .flat_map(|i| [(i % width) as u8, (i / width) as u8, (i % 7 * 30) as u8])
        .collect();
    let image = RgbImage {
        width,
        height,
        pixels,
    };
    encode_image(&image, OutputFormat::Png).unwrap()
}

fn data_uri(media_type: &str, bytes: &[u8]) -> ImageSource {
    use base64::Engine as _;
    let base64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    ImageSource::parse(&format!("data:{media_type};base64,{base64}")).unwrap()
}

fn allow(entries: &[&str]) -> AllowList {
    AllowList::parse(entries).unwrap()
}

/// Loopback opened by the allow list, and small limits.
fn loopback_policy() -> FetchPolicy {
    FetchPolicy {
        allow: allow(&["127.0.0.1/32"]),
        max_image_bytes: 1024 * 1024,
        timeout: Duration::from_secs(2),
        max_redirects: 3,
    }
}

/// The one failure of fetching `source` alone.
async fn failure(fetcher: &ReferenceFetcher, source: ImageSource) -> FetchError {
    let err = fetcher.fetch_all(&[source]).await.unwrap_err();
    assert_eq!(err.position, 1);
    err
}

/// What the log gets: the error's causes, one after another.
fn detail(err: &FetchError) -> String {
    let mut text = String::new();
    let mut cause = std::error::Error::source(err);
    while let Some(c) = cause {
        text = format!("{text}: {c}");
        cause = c.source();
    }
    text
}

#[tokio::test]
async fn urls_and_data_uris_decode_to_the_same_image() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let png = encode_image(&test_image(), OutputFormat::Png).unwrap();
    let images = fetcher
        .fetch_all(&[
            server.url("/cup.png"),
            data_uri("image/png", &png),
            server.url("/hop"),
        ])
        .await
        .unwrap();
    assert_eq!(images, vec![test_image(); 3]);
}

#[tokio::test]
async fn internal_addresses_are_refused_without_connecting() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(FetchPolicy::default());
    let url = format!("http://{}/cup.png", server.address);
    let err = failure(&fetcher, server.url("/cup.png")).await;
    assert_eq!(
        err.to_string(),
        format!("reference image 1 ({url}) is not a public address")
    );
    assert!(
        detail(&err).contains("127.0.0.1 (loopback 127.0.0.0/8)"),
        "{}",
        detail(&err)
    );
    // A name that resolves to loopback is refused too: the check is on the resolved address.
    // The client is not told which address the name has; the log is.
    let url = format!("http://localhost:{}/cup.png", server.address.port());
    let err = failure(&fetcher, ImageSource::parse(&url).unwrap()).await;
    assert_eq!(err.reason, Reason::NotPublic);
    assert_eq!(
        err.to_string(),
        format!("reference image 1 ({url}) is not a public address")
    );
    assert!(
        detail(&err).contains("localhost resolves to"),
        "{}",
        detail(&err)
    );
    let metadata = ImageSource::parse("http://169.254.169.254/latest/meta-data").unwrap();
    let err = failure(&fetcher, metadata).await;
    assert_eq!(err.reason, Reason::NotPublic);
    assert!(
        detail(&err).contains("link-local 169.254.0.0/16"),
        "{}",
        detail(&err)
    );
    assert_eq!(server.requests(), 0, "nothing reached the server");
}

#[tokio::test]
async fn the_allow_list_opens_listed_blocks_and_names_only() {
    let server = ImageServer::start().await;
    for (entries, opened) in [
        (&["127.0.0.1/32"][..], true),
        (&["127.0.0.0/8"][..], true),
        (&["10.0.0.0/8", "127.0.0.2"][..], false),
        (&["::1"][..], false),
    ] {
        let fetcher = ReferenceFetcher::new(FetchPolicy {
            allow: allow(entries),
            ..loopback_policy()
        });
        let result = fetcher.fetch_all(&[server.url("/cup.png")]).await;
        assert_eq!(result.is_ok(), opened, "{entries:?}: {result:?}");
    }
    assert_eq!(server.requests(), 2, "only the opened fetches connected");
    // A listed name opens what it resolves to, an address URL it does not.
    let fetcher = ReferenceFetcher::new(FetchPolicy {
        allow: allow(&["localhost"]),
        ..loopback_policy()
    });
    let by_name = format!("http://localhost:{}/cup.png", server.address.port());
    let images = fetcher
        .fetch_all(&[ImageSource::parse(&by_name).unwrap()])
        .await
        .unwrap();
    assert_eq!(images, vec![test_image()]);
    let err = failure(&fetcher, server.url("/cup.png")).await;
    assert_eq!(err.reason, Reason::NotPublic);
}

#[tokio::test]
async fn clients_get_one_message_per_kind_of_failure_and_the_log_the_detail() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let cases = [
        (format!("http://{closed}/cup.png"), "Connection refused"),
        (
            format!("http://{}/missing.png", server.address),
            "404 Not Found",
        ),
        (format!("http://{}/stalls", server.address), "within 2 s"),
        (
            format!("http://{}/loop", server.address),
            "more than 3 redirects",
        ),
        (
            format!("http://{}/to-file", server.address),
            "file:///etc/passwd",
        ),
    ];
    for (url, logged) in cases {
        let err = failure(&fetcher, ImageSource::parse(&url).unwrap()).await;
        assert_eq!(
            err.to_string(),
            format!("reference image 1 ({url}) could not be fetched")
        );
        assert!(detail(&err).contains(logged), "{url}: {}", detail(&err));
    }
    assert_eq!(
        server.requests(),
        1 + 1 + 4 + 1,
        "404, stall, 1 + 3 redirects, to-file"
    );
}

#[tokio::test]
async fn sizes_are_bounded() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    for path in ["/claims-huge", "/streams-huge"] {
        let err = failure(&fetcher, server.url(path)).await;
        assert_eq!(err.reason, Reason::TooLarge { max_bytes: 1048576 });
        assert!(
            err.to_string().ends_with("is larger than 1048576 bytes"),
            "{err}"
        );
    }
    let inline =
        ImageSource::parse(&format!("data:image/png;base64,{}", "A".repeat(2_000_000))).unwrap();
    let err = failure(&fetcher, inline).await;
    assert_eq!(err.reason, Reason::TooLarge { max_bytes: 1048576 });
}

#[tokio::test]
async fn what_is_not_an_image_is_named() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let err = failure(&fetcher, server.url("/page.html")).await;
    assert_eq!(
        err.to_string(),
        format!(
            "reference image 1 (http://{}/page.html) is not an image kiln can read (JPEG, PNG or WebP)",
            server.address
        )
    );
    // The second of two is named by its position.
    let err = fetcher
        .fetch_all(&[server.url("/cup.png"), server.url("/page.html")])
        .await
        .unwrap_err();
    assert_eq!(err.position, 2);
    let garbage = ImageSource::parse("data:image/png;base64,AAAA").unwrap();
    let err = failure(&fetcher, garbage).await;
    assert_eq!(
        err.to_string(),
        "reference image 1 (data URI, image/png, 4 base64 characters) is not an image kiln can \
         read (JPEG, PNG or WebP)"
    );
}

#[tokio::test]
async fn images_declaring_too_many_pixels_are_refused_before_decoding() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let png = png_declaring(16384, 16384);
    let jpeg = jpeg_declaring(16384, 16384);
    assert!(
        png.len() < 2_000 && jpeg.len() < 10_000,
        "{} {}",
        png.len(),
        jpeg.len()
    );
    let sources = [
        (
            server.url("/bomb.png"),
            format!("http://{}/bomb.png", server.address),
        ),
        (
            server.url("/bomb.jpg"),
            format!("http://{}/bomb.jpg", server.address),
        ),
        (
            data_uri("image/png", &png),
            format!(
                "data URI, image/png, {} base64 characters",
                png.len().div_ceil(3) * 4
            ),
        ),
        (
            data_uri("image/jpeg", &jpeg),
            format!(
                "data URI, image/jpeg, {} base64 characters",
                jpeg.len().div_ceil(3) * 4
            ),
        ),
    ];
    for (source, shown) in sources {
        let started = Instant::now();
        let err = failure(&fetcher, source).await;
        assert_eq!(
            err.to_string(),
            format!("reference image 1 ({shown}) is 16384x16384, larger than 16777216 pixels")
        );
        // Decoding 268 MP would take seconds and a gigabyte; reading a header takes nothing.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    // Within the limit per image, but not together: 4 x 16 MP is the most a request may have.
    let full = data_uri("image/png", &png_declaring(4096, 4096));
    let small = data_uri("image/png", &png_declaring(64, 64));
    let mut sources = vec![full; 4];
    sources.insert(2, small);
    let err = fetcher.fetch_all(&sources).await.unwrap_err();
    assert_eq!(err.reason, Reason::TooManyPixelsInAll, "{err}");
    assert!(
        err.to_string()
            .ends_with("takes the request's images past 67108864 pixels in all"),
        "{err}"
    );
}

#[tokio::test]
async fn large_images_come_back_at_the_models_working_size() {
    let server = ImageServer::start().await;
    let fetcher = ReferenceFetcher::new(FetchPolicy {
        max_image_bytes: 50_000_000,
        // Making the photo is unoptimised test code; fetching it is not what is timed here.
        timeout: Duration::from_secs(60),
        ..loopback_policy()
    });
    let images = fetcher
        .fetch_all(&[server.url("/photo.png")])
        .await
        .unwrap();
    let image = &images[0];
    // 2000x1500 to a megapixel, aspect kept, sides floored: what the engine would make of it.
    assert_eq!((image.width, image.height), (1182, 886));
    assert!(image.width * image.height <= 1024 * 1024);
    assert_eq!(image.pixels.len(), 1182 * 886 * 3);
}

/// A loopback listener that accepts connections and never answers; it counts them.
async fn silent_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    (address, accepted)
}

#[tokio::test]
async fn a_jobs_images_share_one_time_budget() {
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(silent_server().await);
    }
    let sources: Vec<ImageSource> = servers
        .iter()
        .map(|(address, _)| ImageSource::parse(&format!("http://{address}/a.png")).unwrap())
        .collect();
    let fetcher = ReferenceFetcher::new(loopback_policy());
    let started = Instant::now();
    let err = fetcher.fetch_all(&sources).await.unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err.reason, Reason::NotFetched);
    assert_eq!(err.position, 1, "the first image not had in time is named");
    assert!(detail(&err).contains("within 2 s"), "{}", detail(&err));
    // One after another they would take 3 x 2 s; together, the budget of 2 s.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    for (address, accepted) in &servers {
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "{address} was asked at once"
        );
    }
}

/// Set in the copy of this test binary that runs inside a network namespace of its own.
const IN_NAMESPACE: &str = "KILN_TEST_IN_NETWORK_NAMESPACE";
const NAMESPACE_TEST: &str = "special_ipv6_forms_of_internal_addresses_are_refused_on_a_network";
/// Printed by the copy inside: once it runs there, and once it has checked everything.
const ENTERED: &str = "network namespace: entered";
const CHECKED: &str = "network namespace: all forms checked";

/// IPv6 forms of internal addresses, put on the loopback of a namespace the test makes: there
/// each reaches a listener, as a NAT64 translator, a 6to4 relay or a local route would deliver
/// it on a real network; the guard must refuse each before connecting.
const SPECIAL_FORMS: &[&str] = &[
    "64:ff9b::7f00:1",  // NAT64 of 127.0.0.1
    "64:ff9b:1::1",     // NAT64 local use
    "2002:7f00:1::1",   // 6to4 of 127.0.0.1
    "::7f00:1",         // IPv4-compatible 127.0.0.1
    "2001:0:7f00:1::1", // Teredo
    "fec0::1",          // site-local
    "fd00::1",          // unique local
    "fd00:ec2::254",    // AWS's metadata service over IPv6
];

/// Runs itself again inside a new network namespace (`unshare --net --map-root-user`), where
/// it may put addresses on the loopback without touching any other network.
#[test]
fn special_ipv6_forms_of_internal_addresses_are_refused_on_a_network() {
    use std::process::Command;
    if std::env::var_os(IN_NAMESPACE).is_some() {
        return refuse_special_forms_inside_the_namespace();
    }
    let missing: Vec<&str> = ["unshare", "ip"]
        .into_iter()
        .filter(|tool| Command::new(tool).arg("-V").output().is_err())
        .collect();
    if !missing.is_empty() {
        return skip_namespace_test(&format!("{} not found", missing.join(" and ")));
    }
    let output = Command::new("unshare")
        .args(["--net", "--map-root-user", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([NAMESPACE_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stdout.contains(ENTERED) {
        return skip_namespace_test(&format!("no network namespace could be made: {stderr}"));
    }
    assert!(
        output.status.success() && stdout.contains(CHECKED),
        "inside the namespace:\n{stdout}\n{stderr}"
    );
}

fn skip_namespace_test(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{NAMESPACE_TEST} must run in CI: {why}"
    );
    eprintln!("SKIPPED: {NAMESPACE_TEST}: {why}");
}

/// Inside the namespace: the special forms on the loopback, a listener on each, and for each
/// a refused fetch that reaches no listener, then (guard opened) one that does.
fn refuse_special_forms_inside_the_namespace() {
    println!("{ENTERED}");
    let ip = |args: &[&str]| {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "ip {args:?}");
    };
    ip(&["link", "set", "lo", "up"]);
    let mut listeners = Vec::new();
    for form in SPECIAL_FORMS {
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("{form}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        let address: std::net::Ipv6Addr = form.parse().unwrap();
        let listener = std::net::TcpListener::bind((address, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        listeners.push((format!("[{form}]:{port}"), listener));
    }
    // An IPv4-mapped address reaches the IPv4 listener on the same host.
    let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = v4.local_addr().unwrap().port();
    listeners.push((format!("[::ffff:127.0.0.1]:{port}"), v4));

    let policy = |entries: &[&str]| FetchPolicy {
        allow: allow(entries),
        timeout: Duration::from_millis(500),
        ..FetchPolicy::default()
    };
    let guarded = ReferenceFetcher::new(policy(&[]));
    let opened = ReferenceFetcher::new(policy(&["::/0"]));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        for (authority, listener) in &listeners {
            listener.set_nonblocking(true).unwrap();
            let source = ImageSource::parse(&format!("http://{authority}/cup.png")).unwrap();
            let err = guarded
                .fetch_all(std::slice::from_ref(&source))
                .await
                .unwrap_err();
            assert_eq!(err.reason, Reason::NotPublic, "{authority}: {err}");
            assert!(listener.accept().is_err(), "{authority} was connected to");
            // The guard refused it, not the network: opened, the same URL reaches the listener
            // (which never answers, so the fetch itself runs out of time).
            opened.fetch_all(&[source]).await.unwrap_err();
            assert!(listener.accept().is_ok(), "{authority} is reachable");
            println!("{authority}: refused without a connection, reachable when allowed");
        }
    });
    println!("{CHECKED}");
}
