//! Request ids. Every request gets a new UUID of ours as its `x-request-id` (on the request for
//! the layers inside, on the response for the client), which the log correlates by: a client
//! cannot choose it, so it cannot make its requests' log lines collide with another's or forge
//! an entry. A client's own `x-request-id`, when valid, is kept beside it as
//! `client_request_id` in the trace span and the access log, and never echoed.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use std::sync::Arc;

pub(crate) const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client request id kept.
const MAX_CLIENT_ID_LEN: usize = 128;

/// The id a client sent in `x-request-id`, validated.
#[derive(Clone, Debug)]
pub(crate) struct ClientRequestId(pub(crate) Arc<str>);

/// The `axum::middleware::from_fn` that replaces the client's id with ours.
pub(crate) async fn assign(mut request: Request, next: Next) -> Response {
    let headers = request.headers_mut();
    let client = headers.remove(X_REQUEST_ID).and_then(|v| validated(&v));
    let ours = uuid::Uuid::new_v4().to_string();
    headers.insert(
        X_REQUEST_ID,
        HeaderValue::from_str(&ours).expect("a UUID is a valid header value"),
    );
    if let Some(client) = client {
        request.extensions_mut().insert(ClientRequestId(client));
    }
    next.run(request).await
}

/// A client id worth logging: 1 to 128 characters of `[A-Za-z0-9._:-]`, which cannot break a
/// log line or smuggle markup into a log viewer.
fn validated(value: &HeaderValue) -> Option<Arc<str>> {
    let text = value.to_str().ok()?;
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-');
    let valid = (1..=MAX_CLIENT_ID_LEN).contains(&text.len()) && text.bytes().all(allowed);
    valid.then(|| Arc::from(text))
}

/// Our id of `request`, as [`assign`] set it.
pub(crate) fn request_id(request: &Request) -> &str {
    request
        .headers()
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The client's id of `request`, if it sent a valid one.
pub(crate) fn client_request_id(request: &Request) -> Option<Arc<str>> {
    request
        .extensions()
        .get::<ClientRequestId>()
        .map(|id| id.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_ids_are_kept() {
        let check = |s: &str| validated(&HeaderValue::from_str(s).unwrap()).is_some();
        assert!(check("trace-me-1"));
        assert!(check("a.b_c:D-9"));
        assert!(check(&"x".repeat(128)));
        assert!(!check(&"x".repeat(129)));
        assert!(!check(""));
        assert!(!check("has space"));
        assert!(!check("<script>"));
        assert!(!check("quote\"d"));
    }
}
