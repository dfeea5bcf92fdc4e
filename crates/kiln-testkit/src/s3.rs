//! An S3-compatible server on a temporary directory, in-process: [`S3Server::start`].
//!
//! The tests of kiln's S3 blob store run against s3s-fs, the filesystem backend of the `s3s`
//! crate, started inside the test process rather than against a MinIO container or binary:
//! - nothing is downloaded or installed, so the tests run on every machine and in CI alike,
//!   and none of them is ever skipped for want of a server;
//! - it is still the real protocol: the store's `object_store` client speaks HTTP to a socket,
//!   signs every request with SigV4, and the server checks the signature against its one key
//!   pair (so wrong credentials are refused as a real service would refuse them), parses
//!   path-style requests, keeps `Content-Type`, answers `NoSuchKey` and lists with prefixes.
//!
//! The server runs on a thread of its own with its own Tokio runtime: it keeps serving while
//! the test's runtime is blocked or busy, and when the stores under test are in separate kiln
//! processes (which reach it through [`S3Server::env`]). Dropping the value stops the server,
//! waits for its thread and removes the directory.
//!
//! s3s-fs keeps each object as the file `ROOT/BUCKET/KEY` (its metadata lives beside the
//! bucket's directory, not in it), which is how [`S3Server::object_keys`] lists the bucket.

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use kiln_core::blob::S3Settings;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use std::path::Path;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// The only key pair the server accepts.
const ACCESS_KEY_ID: &str = "kiln-test-access-key";
const SECRET_ACCESS_KEY: &str = "kiln-test-secret-4f9c2e1a7b3d";
/// The bucket made at start; stores use it, tests may make others beside it.
const BUCKET: &str = "kiln-test";
/// s3s checks that a signature names *a* region, not which: any fixed one will do.
const REGION: &str = "us-east-1";

/// An s3s-fs server on `127.0.0.1`, serving one bucket until dropped.
pub struct S3Server {
    endpoint: String,
    root: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl S3Server {
    /// Starts a server on a free port over a fresh temporary directory, with the bucket
    /// [`bucket`](Self::bucket) made. Callable from synchronous and asynchronous tests alike.
    /// Panics if the machine cannot give it a directory, a thread or a port.
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("a temporary directory for the S3 server");
        // s3s-fs's bucket is a directory under its root (its CreateBucket is a `create_dir`).
        std::fs::create_dir(root.path().join(BUCKET)).expect("the test bucket's directory");
        let service = service(root.path());
        // Bound here, before the thread starts, so the address is known at once and a client's
        // first connection waits in the backlog rather than being refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port on 127.0.0.1");
        let addr = listener.local_addr().expect("the listener's address");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let (shutdown, stop) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("kiln-test-s3".into())
            .spawn(move || run(listener, service, stop))
            .expect("the S3 server's thread");
        S3Server {
            endpoint: format!("http://{addr}"),
            root,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn access_key_id(&self) -> &str {
        ACCESS_KEY_ID
    }

    pub fn secret_access_key(&self) -> &str {
        SECRET_ACCESS_KEY
    }

    /// Settings for a store on the bucket, with no prefix (set `prefix` to test one).
    pub fn settings(&self) -> S3Settings {
        S3Settings {
            bucket: BUCKET.to_string(),
            prefix: None,
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.to_string()),
            access_key_id: ACCESS_KEY_ID.to_string(),
            secret_access_key: SECRET_ACCESS_KEY.to_string(),
            allow_http: true,
        }
    }

    /// The environment a kiln process needs to reach the server with `blobs.url =
    /// "s3://BUCKET[/PREFIX]"`. A child inherits the test's own environment too: a developer's
    /// `AWS_ENDPOINT_URL_S3` or `AWS_SESSION_TOKEN` would win or interfere, so remove those.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
    }

    /// Every object key in the bucket, sorted: what a test compares with the blobs its
    /// requests own, to find an object nothing owns.
    pub fn object_keys(&self) -> Vec<String> {
        let bucket = self.root.path().join(BUCKET);
        let mut keys = Vec::new();
        collect_keys(&bucket, &bucket, &mut keys);
        keys.sort();
        keys
    }
}

/// s3s over s3s-fs on `root`, refusing any request not signed with our key pair.
fn service(root: &Path) -> S3Service {
    let fs = s3s_fs::FileSystem::new(root).expect("s3s-fs on the temporary directory");
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(
        ACCESS_KEY_ID,
        SECRET_ACCESS_KEY.to_string(),
    ));
    builder.build()
}

/// The server's thread: its own runtime, so it serves whatever the test's runtime is doing.
fn run(listener: std::net::TcpListener, service: S3Service, stop: oneshot::Receiver<()>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln-test-s3-worker")
        .enable_all()
        .build()
        .expect("the S3 server's runtime");
    runtime.block_on(accept(listener, service, stop));
    // Dropping the runtime ends the connections still open; a test that dropped the server
    // wants it gone, not drained.
}

async fn accept(
    listener: std::net::TcpListener,
    service: S3Service,
    mut stop: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a Tokio listener");
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                // A failed accept (out of descriptors, a reset in the backlog) costs one
                // connection, not the server.
                Err(_) => continue,
            },
            _ = &mut stop => return,
        };
        let connection = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            // A client that hangs up mid-request is the client's business.
            let _ = connection.await;
        });
    }
}

/// The files under `dir`, as keys relative to the bucket's directory.
fn collect_keys(bucket: &Path, dir: &Path, keys: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir).expect("the bucket's directory is readable");
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect_keys(bucket, &path, keys);
        } else {
            let relative = path.strip_prefix(bucket).expect("under the bucket");
            let segments: Vec<_> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            keys.push(segments.join("/"));
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // The thread may have died already; then there is nothing to stop.
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // Re-raising the server's panic in a drop would abort; the test has its own result.
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("endpoint", &self.endpoint)
            .field("bucket", &BUCKET)
            .field("root", &self.root.path())
            .finish_non_exhaustive()
    }
}
