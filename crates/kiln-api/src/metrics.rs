//! Prometheus metrics: the job gauges (read from the store at scrape time, so they are right
//! however many processes share the store), HTTP request counts and latencies, and whatever
//! other crates registered in the default registry (the worker's step and job histograms).

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use kiln_core::job::JobState;
use kiln_core::store::JobStore;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::time::Instant;

/// The HTTP layer's own metrics, in a registry of their own: an `AppState` per test server
/// must not collide with another in the process-wide default registry.
pub(crate) struct Metrics {
    registry: Registry,
    jobs: IntGaugeVec,
    queue_depth: IntGauge,
    http_requests: IntCounterVec,
    http_seconds: HistogramVec,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let jobs = IntGaugeVec::new(
            Opts::new("kiln_jobs", "Jobs in the store by state"),
            &["state"],
        )
        .expect("valid metric");
        let queue_depth =
            IntGauge::new("kiln_queue_depth", "Jobs waiting to be claimed").expect("valid metric");
        let http_requests = IntCounterVec::new(
            Opts::new(
                "kiln_http_requests_total",
                "HTTP requests answered, by route template and status",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let http_seconds = HistogramVec::new(
            HistogramOpts::new(
                "kiln_http_request_duration_seconds",
                "Time to answer an HTTP request",
            ),
            &["method", "route"],
        )
        .expect("valid metric");
        let registry = Registry::new();
        for collector in [
            Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(queue_depth.clone()),
            Box::new(http_requests.clone()),
            Box::new(http_seconds.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            jobs,
            queue_depth,
            http_requests,
            http_seconds,
        }
    }

    /// The exposition text: job gauges refreshed from the store now, then everything else.
    pub(crate) async fn render(&self, store: &dyn JobStore) -> Result<String, ApiError> {
        let counts = store.state_counts().await?;
        for state in JobState::ALL {
            let count = counts
                .counts
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            self.jobs.with_label_values(&[state.as_str()]).set(count);
            if state == JobState::Queued {
                self.queue_depth.set(count);
            }
        }
        let mut families = self.registry.gather();
        families.extend(prometheus::gather());
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut text)
            .map_err(|e| ApiError::Internal(Box::new(e)))?;
        String::from_utf8(text).map_err(|e| ApiError::Internal(Box::new(e)))
    }
}

/// Middleware: counts and times every request under its route template (`/v1/requests/{id}/status`,
/// never the id itself, which would make a series per request).
pub(crate) async fn track(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    // Label values come from a closed set: a client cannot mint new series.
    let method = match *request.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::HEAD
        | Method::OPTIONS
        | Method::PATCH => request.method().as_str().to_owned(),
        _ => "other".to_owned(),
    };
    let route = matched
        .as_ref()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .http_seconds
        .with_label_values(&[&method, &route])
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .with_label_values(&[&method, &route, response.status().as_str()])
        .inc();
    response
}
