//! The accept loop: HTTP/1.1 and HTTP/2 connections served by hyper, with the limits that keep
//! slow or idle clients from holding the process's descriptors.
//!
//! - At most [`ConnectionLimits::max_connections`] connections are open at once. At the cap the
//!   loop stops accepting until one closes: the next clients wait in the kernel's listen backlog
//!   and are served as slots free, rather than being accepted only to be closed (which spends a
//!   descriptor and tells the client nothing it could act on). A process whose descriptor limit
//!   is below the cap cannot reach the cap: the binary sets it below that limit.
//! - A connection must deliver its first request's head within `header_timeout` of being
//!   accepted, and each later head within `header_timeout` too (hyper's HTTP/1 header timer,
//!   which also runs while a keep-alive connection waits for its next request).
//! - A connection with no request in a handler and no byte read or written for `idle_timeout`
//!   is closed (HTTP/2 connections, responses a client stopped reading).
//! - A request's body must arrive whole within `body_timeout` (see `body_deadline`).
//!
//! On the shutdown signal the loop stops accepting and asks every connection to finish its
//! requests in flight and close; it returns when all have.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

/// How long the loop pauses after a failed accept (out of descriptors, most likely) before it
/// tries again, so that it does not spin while connections close.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a server allows its clients; [`crate::ApiSettings::connections`] holds the API's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; further clients wait to be accepted.
    pub max_connections: usize,
    /// The longest a client may take to send a request's head (method, path, headers).
    pub header_timeout: Duration,
    /// The longest a client may take to send a request's whole body, from its head; past it
    /// the request is answered 408 (408001).
    pub body_timeout: Duration,
    /// How long a connection may stay open with nothing in flight and no byte moving.
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then stops
/// accepting and returns once the open connections have finished their requests.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    let builder = connection_builder(&limits);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accepting a connection failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = serve_connection(
            stream,
            router.clone(),
            builder.clone(),
            graceful.watcher(),
            limits,
            slot,
        );
        tokio::spawn(connection);
    }
    // New clients are refused from here on; the open connections finish what they started.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn connection_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// One connection, until it ends, goes idle, or (after shutdown) finishes its requests. Its
/// slot is given back when this returns.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    builder: auto::Builder<TokioExecutor>,
    watcher: Watcher,
    limits: ConnectionLimits,
    _slot: OwnedSemaphorePermit,
) {
    // Small answers go out at once rather than waiting on Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let requests = activity.clone();
    let service = tower::service_fn(move |request: hyper::Request<Incoming>| {
        let in_handler = requests.begin_request();
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            drop(in_handler);
            response
        }
    });
    let connection = builder
        .serve_connection(io, TowerToHyperService::new(service))
        .into_owned();
    tokio::select! {
        served = watcher.watch(connection) => {
            if let Err(error) = served {
                // A client's broken or timed-out connection: nothing for the operator to do.
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        () = activity.until_idle(&limits) => {
            tracing::debug!("closing an idle connection");
        }
    }
}

/// When a connection last moved a byte, and whether a request is in a handler.
struct Activity {
    opened: Instant,
    /// Milliseconds from `opened` to the last byte read or written.
    last_byte_ms: AtomicU64,
    in_handlers: AtomicUsize,
    any_request: AtomicBool,
}

/// A request in a handler; the connection is not idle while one lives.
struct InHandler(Arc<Activity>);

impl Drop for InHandler {
    fn drop(&mut self) {
        self.0.in_handlers.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            last_byte_ms: AtomicU64::new(0),
            in_handlers: AtomicUsize::new(0),
            any_request: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_byte_ms.store(now, Ordering::Relaxed);
    }

    fn begin_request(self: &Arc<Self>) -> InHandler {
        self.in_handlers.fetch_add(1, Ordering::SeqCst);
        self.any_request.store(true, Ordering::SeqCst);
        InHandler(self.clone())
    }

    /// Completes when the connection should be closed for want of activity: no request
    /// within `header_timeout` of the accept (hyper's header timer starts only once HTTP/1 is
    /// recognised, and HTTP/2 has none), or later `idle_timeout` with nothing in a handler and
    /// no byte moving.
    async fn until_idle(&self, limits: &ConnectionLimits) {
        loop {
            let now = self.opened.elapsed();
            if self.in_handlers.load(Ordering::SeqCst) > 0 {
                // A handler's duration is the handler's business; look again later.
                tokio::time::sleep(limits.idle_timeout).await;
                continue;
            }
            let deadline = if self.any_request.load(Ordering::SeqCst) {
                let last = Duration::from_millis(self.last_byte_ms.load(Ordering::Relaxed));
                last + limits.idle_timeout
            } else {
                limits.header_timeout
            };
            if now >= deadline {
                return;
            }
            // Activity moves the deadline while this sleeps: wake by the earliest it could be
            // and look again (at most once per idle timeout, so cheap).
            tokio::time::sleep((deadline - now).min(limits.idle_timeout)).await;
        }
    }
}

/// A socket that notes in its [`Activity`] every byte it moves.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
