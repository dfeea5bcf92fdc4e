//! The operations listeners of their own: `kiln worker`'s (`workers.metrics_bind`: `/metrics`,
//! `/healthz`, `/readyz`) and `kiln serve`'s (`metrics.bind`: `/metrics`), both served by the
//! API's accept loop and its limits.
//!
//! A worker has no API port, yet its series (step and job durations, jobs finished by outcome)
//! are measured only where the engine runs, so a worker on its own machine exports them here
//! for Prometheus to scrape, and answers an orchestrator's liveness and readiness probes (ready:
//! the store and the blob store both answer). `kiln serve` moves its `/metrics` here to keep it off an API port
//! that a public load balancer exposes.

use crate::app::Stores;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Json;
use axum::Router;
use kiln_api::{ConnectionLimits, Readiness};
use prometheus::{Encoder, TextEncoder};
use serde_json::json;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `kiln worker`: serves `GET /metrics` (the process's default registry), `GET /healthz` and
/// `GET /readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    stores: Stores,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(Readiness::new(stores.jobs, stores.blobs)));
    serve_router(listener, app, shutdown).await
}

async fn readyz(State(readiness): State<Arc<Readiness>>) -> impl IntoResponse {
    readiness.check().await
}

/// Serves `router`, a metrics router, on `listener` until `shutdown`, with the default limits
/// (a scraper makes one short request at a time).
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = ConnectionLimits::default();
    kiln_api::serve_router(listener, router, limits, shutdown.cancelled_owned()).await
}

async fn metrics() -> impl IntoResponse {
    let mut text = Vec::new();
    // Encoding the process's own registry into memory cannot fail short of a bug in prometheus.
    TextEncoder::new()
        .encode(&prometheus::gather(), &mut text)
        .expect("metrics encode as text");
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
