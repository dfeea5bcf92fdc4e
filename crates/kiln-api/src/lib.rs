//! kiln's HTTP layer: the hosted Model API's endpoints over the store and blob traits of
//! `kiln-core`.
//!
//! # Layout
//! - `state`: [`ApiSettings`] (what the binary configures) and [`AppState`] (what handlers share).
//! - [`auth`]: API tokens (minting, hashing) and the bearer-token extractor.
//! - [`inputs`]: each model's input schema; [`inputs::parse_input`] validates a body into
//!   generation parameters (the HTTP submit and `kiln generate` both use it).
//! - `models`: `/v1/models` (catalog, schemas) and submitting a request.
//! - `prefer`: `Prefer: wait=N` on submit (answer with the result if it ends within N s).
//! - `requests`: `/v1/requests/{id}/status|result|cancel`.
//! - `listing`: `/v1/requests`, the token's requests newest first, with the input of each.
//! - `webhooks`: the submit's `webhook` parameter, `/v1/webhooks/secret`, and [`WebhookBodies`]
//!   (the messages a dispatcher sends).
//! - `stream`: `/v1/requests/{id}/status/stream` (Server-Sent Events), fed by `live`: one
//!   subscription to the store's job events per node, waking whoever watches a request.
//! - `files`: signed capability URLs for result images, and serving them.
//! - `ops`: `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, and the 404/405 answers.
//! - `openapi`: the generated OpenAPI document.
//! - `playground`: the page at `/` (its files compiled in, served under a strict CSP).
//! - `metrics`: Prometheus metrics and the HTTP metrics middleware.
//! - `rate_limit`: per-key token buckets for submits.
//! - `error`: `ApiError`, the layer's one error type, and its table of statuses and codes.
//! - `access_log`: one `info` line per request (method, path, status, duration, request id,
//!   the client's own request id, key).
//! - `request_id`: our `x-request-id` for every request; the client's kept aside.
//! - `body_deadline`: the body-read timeout (408).
//! - [`server`]: the accept loop, the connection cap and the header and idle timeouts.
//! - `wire`: the JSON bodies of the API.
//!
//! [`router`] assembles the endpoints and layers; [`serve`] runs them until a shutdown signal.
//! The playground page, catalog, schemas, health, metrics and the OpenAPI document are public and need no
//! API key (`/metrics` takes the metrics token when one is set); files need none either (their
//! signed URL is the permission); everything else does.

mod access_log;
pub mod auth;
mod body_deadline;
mod error;
mod files;
pub mod inputs;
mod listing;
mod live;
mod metrics;
mod models;
mod openapi;
mod ops;
mod playground;
mod prefer;
mod rate_limit;
mod request_id;
mod requests;
pub mod server;
mod state;
mod stream;
mod webhooks;
mod wire;

pub use ops::Readiness;
pub use server::{serve_router, ConnectionLimits};
pub use state::{ApiSettings, AppState};
pub use webhooks::WebhookBodies;

use axum::extract::{DefaultBodyLimit, Request};
use axum::routing::{any, get, post};
use axum::Router;
use std::future::Future;
use tower::ServiceBuilder;
use tower_http::request_id::PropagateRequestIdLayer;
use tower_http::trace::TraceLayer;

/// Every endpoint, with request ids, tracing, metrics, the body limit and the body deadline.
/// `/metrics` is among them unless [`ApiSettings::metrics_on_api_port`] is off.
pub fn router(state: AppState) -> Router {
    let mut routes = Router::new()
        .route("/v1/models", get(models::list))
        // Model ids contain slashes: one wildcard takes submits and `.../schema` GETs.
        .route("/v1/models/{*model_id}", any(models::by_path))
        .route("/v1/requests", get(listing::list_requests))
        .route("/v1/requests/{id}/status", get(requests::status))
        .route(
            "/v1/requests/{id}/status/stream",
            get(stream::status_stream),
        )
        .route("/v1/requests/{id}/result", get(requests::result))
        .route("/v1/requests/{id}/cancel", post(requests::cancel))
        .route("/v1/webhooks/secret", get(webhooks::secret))
        .route("/files/{key}", get(files::download))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/openapi.json", get(ops::openapi_json))
        .route("/", get(playground::index))
        .route(playground::SCRIPT_PATH, get(playground::script))
        .route(playground::STYLE_PATH, get(playground::style))
        .route(playground::ICON_PATH, get(playground::icon));
    if state.settings.metrics_on_api_port {
        routes = routes.route("/metrics", get(ops::metrics));
    }
    let routes = routes
        .fallback(ops::no_such_endpoint)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes));
    let body_timeout = state.settings.connections.body_timeout;
    routes.with_state(state).layer(
        ServiceBuilder::new()
            .layer(axum::middleware::from_fn(request_id::assign))
            // Outside the span: the line carries its own fields, and a JSON line inside the
            // span would repeat them (the JSON formatter re-reads a span's fields per event).
            .layer(axum::middleware::from_fn(access_log::record))
            .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
                let request_id = request_id::request_id(request);
                let client_request_id = request_id::client_request_id(request);
                let client_request_id = client_request_id.as_deref();
                tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id, client_request_id)
            }))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(axum::middleware::from_fn_with_state(
                body_timeout,
                body_deadline::limit,
            )),
    )
}

/// `/metrics` alone, for a listener of its own (the binary's `metrics.bind`): scrapers reach it
/// on an internal address while the API port, behind a public load balancer, does not serve it.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(ops::metrics))
        .fallback(ops::no_such_endpoint)
        .with_state(state)
}

/// Serves `state`'s router on `listener`, within [`ApiSettings::connections`], until `shutdown`
/// completes, then drains: submits get 503001, no connection is accepted, and in-flight
/// requests finish before this returns.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let draining = state.clone();
    let limits = state.settings.connections;
    let app = router(state);
    let shutdown = async move {
        shutdown.await;
        draining.begin_draining();
    };
    serve_router(listener, app, limits, shutdown).await
}
