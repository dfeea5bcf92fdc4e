//! `kiln worker`'s optional metrics listener. A worker has no API port, yet its series (step and
//! job durations, jobs finished by outcome) are measured only where the engine runs, so a
//! worker on its own machine exports them here for Prometheus to scrape.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(metrics));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
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
