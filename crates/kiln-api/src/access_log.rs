//! One log line per HTTP request, at `info`: method, path, status, duration, request id (ours),
//! the client's own request id when it sent a valid one, and the API key's name when the
//! request carried a valid one.
//!
//! The path is logged without its query: a file URL's query is its signature, a capability
//! that must not end up in log files. The key's name comes from the bearer-token extractor,
//! which fills the [`KeyNameSlot`] this middleware puts into the request beforehand (handlers
//! that take no token leave it empty).

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Where the token extractor leaves the calling key's name for the access log.
#[derive(Clone, Default)]
pub(crate) struct KeyNameSlot(Arc<OnceLock<Arc<str>>>);

impl KeyNameSlot {
    pub(crate) fn set(&self, name: Arc<str>) {
        // A request authenticates once; a second extraction would name the same key.
        let _ = self.0.set(name);
    }
}

/// The `axum::middleware::from_fn` that writes the line once the response is ready.
pub(crate) async fn record(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let slot = KeyNameSlot::default();
    request.extensions_mut().insert(slot.clone());
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let request_id = crate::request_id::request_id(&request).to_owned();
    let client_request_id = crate::request_id::client_request_id(&request);
    let response = next.run(request).await;
    let key = slot.0.get().map_or("-", |name| name.as_ref());
    tracing::info!(
        target: "kiln::access",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        duration_ms = format!("{:.2}", started.elapsed().as_secs_f64() * 1000.0),
        request_id = %request_id,
        client_request_id = client_request_id.as_deref(),
        key = %key,
        "request"
    );
    response
}
