//! Operations endpoints: liveness, readiness, metrics, the OpenAPI document, and the answers
//! for paths and methods nothing else takes. None needs an API key: they carry no user data.
//! `/metrics` takes the operator's metrics token when one is configured.

use crate::auth::bearer_token;
use crate::error::ApiError;
use crate::openapi;
use crate::state::{ApiSettings, AppState};
use crate::wire::Health;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use kiln_core::blob::BlobStore;
use kiln_core::report::Chain;
use kiln_core::store::JobStore;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The process is up and answering.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Whether to send traffic here: the server is not shutting down, and the store and the blob
/// store both answer (a node that cannot reach either can take no request to its end).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses((status = 200, body = Health), (status = 503, description = "Draining, or the store or the blob store unavailable", body = Health))
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if state.is_draining() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health { status: "draining" }),
        );
    }
    state.readiness.check().await
}

/// How long a readiness answer is reused: each check is a round trip to the database and a
/// request to the bucket (an S3 LIST, billed per request), and `/readyz` takes no token, so a
/// flood of probes must not become a flood of store requests.
const READINESS_TTL: Duration = Duration::from_secs(1);

/// The readiness answer of any kiln process that uses the stores (an API node, a worker): 200
/// `ready`, or 503 naming which store does not answer (the cause goes to the log only). At most
/// one check runs at a time and its answer serves every probe for [`READINESS_TTL`].
pub struct Readiness {
    jobs: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    /// When the last check ran and what it found.
    last: tokio::sync::Mutex<Option<(Instant, StatusCode, &'static str)>>,
}

impl Readiness {
    pub fn new(jobs: Arc<dyn JobStore>, blobs: Arc<dyn BlobStore>) -> Self {
        Self {
            jobs,
            blobs,
            last: tokio::sync::Mutex::new(None),
        }
    }

    pub async fn check(&self) -> (StatusCode, Json<Health>) {
        // Held across the check: probes that arrive meanwhile wait for its answer.
        let mut last = self.last.lock().await;
        let (status, text) = match *last {
            Some((at, status, text)) if at.elapsed() < READINESS_TTL => (status, text),
            _ => {
                let (status, text) = self.ping_both().await;
                *last = Some((Instant::now(), status, text));
                (status, text)
            }
        };
        (status, Json(Health { status: text }))
    }

    async fn ping_both(&self) -> (StatusCode, &'static str) {
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        // Both at once: a readiness probe has a deadline, and each ping is a network round trip
        // on a shared store.
        match tokio::join!(self.jobs.ping(), self.blobs.ping()) {
            (Err(error), _) => {
                tracing::warn!(error = %Chain(&error), "readiness: the store does not answer");
                (unavailable, "store_unavailable")
            }
            (Ok(()), Err(error)) => {
                tracing::warn!(error = %Chain(&error), "readiness: the blob store does not answer");
                (unavailable, "blob_store_unavailable")
            }
            (Ok(()), Ok(())) => (StatusCode::OK, "ready"),
        }
    }
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, content_type = "text/plain; version=0.0.4", body = String))
)]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(expected) = &state.settings.metrics_token {
        let sent = bearer_token(&headers)?;
        // Compared as digests, so the time taken says nothing about a prefix of the token.
        if Sha256::digest(sent.as_bytes()) != Sha256::digest(expected.as_bytes()) {
            return Err(ApiError::InvalidToken);
        }
    }
    let text = state.metrics.render(state.jobs.as_ref()).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// Fits the OpenAPI document's `/metrics` to how this server exposes it: left out when another
/// listener serves it, and declared to take the metrics token (401001) when one is set.
pub(crate) fn document_metrics(doc: &mut serde_json::Value, settings: &ApiSettings) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    if !settings.metrics_on_api_port {
        paths.remove("/metrics");
        return;
    }
    if settings.metrics_token.is_none() {
        return;
    }
    if let Some(get) = paths.get_mut("/metrics").map(|item| &mut item["get"]) {
        get["security"] = json!([{"bearer": []}]);
        get["responses"]["401"] = json!({
            "description": "Missing or wrong metrics token (401001)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        });
    }
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations", responses((status = 200, body = Object)))]
pub(crate) async fn openapi_json(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(openapi::document(&state.settings))
}

pub(crate) async fn no_such_endpoint(method: Method, uri: Uri) -> ApiError {
    ApiError::NoSuchEndpoint {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::blob::{Blob, BlobError, BlobStream};
    use kiln_core::ids::BlobKey;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A real directory store that counts the pings it is asked for.
    struct CountedPings {
        inner: kiln_blob::LocalBlobStore,
        pings: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl BlobStore for CountedPings {
        async fn put(&self, key: &BlobKey, blob: Blob) -> Result<(), BlobError> {
            self.inner.put(key, blob).await
        }
        async fn open(&self, key: &BlobKey) -> Result<Option<BlobStream>, BlobError> {
            self.inner.open(key).await
        }
        async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
            self.inner.delete(key).await
        }
        async fn ping(&self) -> Result<(), BlobError> {
            self.pings.fetch_add(1, Ordering::SeqCst);
            self.inner.ping().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_probes_is_one_check_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = kiln_store::SqliteStore::open(&dir.path().join("kiln.db"))
            .await
            .unwrap();
        let blobs = Arc::new(CountedPings {
            inner: kiln_blob::LocalBlobStore::new(dir.path().join("files")).unwrap(),
            pings: AtomicUsize::new(0),
        });
        let readiness = Arc::new(Readiness::new(Arc::new(jobs), blobs.clone()));
        let probes: Vec<_> = (0..200)
            .map(|_| {
                let readiness = readiness.clone();
                tokio::spawn(async move { readiness.check().await })
            })
            .collect();
        for probe in probes {
            let (status, Json(health)) = probe.await.unwrap();
            assert_eq!((status, health.status), (StatusCode::OK, "ready"));
        }
        assert_eq!(
            blobs.pings.load(Ordering::SeqCst),
            1,
            "one check for the flood"
        );
        tokio::time::sleep(READINESS_TTL + Duration::from_millis(100)).await;
        let (status, _) = readiness.check().await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            blobs.pings.load(Ordering::SeqCst),
            2,
            "checked again once the answer is older than {READINESS_TTL:?}"
        );
    }
}
