//! What every handler shares: the stores, the settings, and the server's own bookkeeping
//! (draining flag, rate-limit buckets, metrics, cached token lookups).

use crate::auth::KeyCache;
use crate::live::LiveHub;
use crate::metrics::Metrics;
use crate::ops::Readiness;
use crate::rate_limit::RateLimiter;
use crate::server::ConnectionLimits;
use kiln_core::blob::BlobStore;
use kiln_core::catalog::Route;
use kiln_core::ids::RequestId;
use kiln_core::store::{JobStore, KeyStore, QueueLimits};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How the HTTP layer behaves; the binary fills it from its configuration.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// The server's public base URL without a trailing slash, e.g. `https://kiln.example.com`;
    /// every URL in an answer (status, result, cancel, files) is built from it.
    pub public_url: String,
    /// The HMAC-SHA256 key that signs file URLs. Changing it invalidates every URL handed out.
    pub signing_key: Vec<u8>,
    /// How long a request's record and images are kept after its job ends (the store moves the
    /// expiry to the end on every terminal transition).
    pub retention: Duration,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// The longest prompt accepted, in characters after trimming.
    pub max_prompt_chars: usize,
    /// How many jobs may wait in the queue before submits are refused (503001).
    pub max_queued: u64,
    /// How many of those one API key may have waiting (429001 beyond), so that one key cannot
    /// fill the shared queue for everyone.
    pub max_queued_per_key: u64,
    /// Submits per minute per API key, refilled continuously; 0 (the default) turns rate
    /// limiting off. Off by default because the default install is single-tenant: the limit
    /// serves deployments that share a server among tenants, and `max_queued` is the
    /// back-pressure either way. Only accepted new jobs spend it (not refused submits, not
    /// `Idempotency-Key` replays). Polling is not limited: it is cheap, and clients poll in loops.
    pub rate_limit_per_minute: u32,
    /// How many submits a key may make at once before the per-minute rate applies (100 by
    /// default: a script's batch passes whole).
    pub rate_limit_burst: u32,
    /// How long an `Idempotency-Key` is remembered.
    pub idempotency_window: Duration,
    /// The routes an engine is configured for; submits to the others are refused (400001).
    pub served_routes: Vec<Route>,
    /// How long a token's lookup is trusted (see [`crate::auth::KEY_CACHE_TTL`]): a key revoked
    /// elsewhere is refused here within this long. Zero looks every request's token up.
    pub key_cache_ttl: Duration,
    /// The connection cap and the header, body and idle timeouts (see [`crate::server`]).
    pub connections: ConnectionLimits,
    /// Whether the API port serves `/metrics`. Off when the binary serves it on a listener of
    /// its own ([`crate::metrics_router`]): the API port then answers it 404.
    pub metrics_on_api_port: bool,
    /// When set, `/metrics` (wherever served) requires `Authorization: Bearer <this>`.
    pub metrics_token: Option<String>,
    /// How often a status stream with nothing to say sends a comment line (15 s by default),
    /// so that proxies and load balancers do not close it as idle. Below the proxies' idle
    /// timeouts and `connections.idle_timeout`.
    pub stream_keep_alive: Duration,
    /// The longest a `Prefer: wait=N` submit is held (clients may ask up to 60 s): lower it
    /// behind a proxy that times requests out sooner. The answer's `Preference-Applied` says
    /// what was honoured.
    pub max_prefer_wait: Duration,
}

impl ApiSettings {
    /// Settings with the documented defaults, serving every route.
    pub fn with_defaults(public_url: impl Into<String>, signing_key: Vec<u8>) -> Self {
        const DAY: Duration = Duration::from_secs(24 * 60 * 60);
        Self {
            public_url: public_url.into(),
            signing_key,
            retention: DAY,
            max_body_bytes: 16 * 1024 * 1024,
            max_prompt_chars: 10_000,
            max_queued: 1_000,
            max_queued_per_key: 500,
            // Off: see `rate_limit_per_minute`.
            rate_limit_per_minute: 0,
            rate_limit_burst: 100,
            idempotency_window: DAY,
            served_routes: Route::ALL.to_vec(),
            key_cache_ttl: crate::auth::KEY_CACHE_TTL,
            connections: ConnectionLimits::default(),
            metrics_on_api_port: true,
            metrics_token: None,
            stream_keep_alive: Duration::from_secs(15),
            max_prefer_wait: Duration::from_secs(60),
        }
    }

    pub(crate) fn queue_limits(&self) -> QueueLimits {
        QueueLimits {
            total: self.max_queued,
            per_owner: self.max_queued_per_key,
        }
    }

    /// A request's status, result or cancel URL.
    pub(crate) fn request_url(&self, id: RequestId, action: &str) -> String {
        self.absolute_url(&format!("/v1/requests/{id}/{action}"))
    }

    /// `path` (starting with `/`) under the public URL.
    pub(crate) fn absolute_url(&self, path: &str) -> String {
        format!("{}{path}", self.public_url.trim_end_matches('/'))
    }
}

/// The state behind the router: one shared allocation, so that each of the clones the router
/// and its middleware make per request changes one reference count, not one per part (counts
/// that every core's requests write).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] shares; its fields read through `state.field`.
pub struct Shared {
    pub(crate) jobs: Arc<dyn JobStore>,
    pub(crate) keys: Arc<dyn KeyStore>,
    pub(crate) blobs: Arc<dyn BlobStore>,
    pub(crate) settings: Arc<ApiSettings>,
    pub(crate) rate_limiter: Arc<RateLimiter>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) key_cache: Arc<KeyCache>,
    pub(crate) readiness: Arc<Readiness>,
    /// The node's one subscription to job events, for status streams and `Prefer: wait`.
    pub(crate) live: Arc<LiveHub>,
    draining: AtomicBool,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub fn new(
        jobs: Arc<dyn JobStore>,
        keys: Arc<dyn KeyStore>,
        blobs: Arc<dyn BlobStore>,
        settings: ApiSettings,
    ) -> Self {
        let rate_limiter =
            RateLimiter::new(settings.rate_limit_per_minute, settings.rate_limit_burst);
        Self(Arc::new(Shared {
            readiness: Arc::new(Readiness::new(jobs.clone(), blobs.clone())),
            live: Arc::new(LiveHub::new(jobs.clone())),
            jobs,
            keys,
            blobs,
            key_cache: Arc::new(KeyCache::new(settings.key_cache_ttl)),
            settings: Arc::new(settings),
            rate_limiter: Arc::new(rate_limiter),
            metrics: Arc::new(Metrics::new()),
            draining: AtomicBool::new(false),
        }))
    }

    /// From now on submits answer 503001 and `/readyz` 503, so that load balancers and clients
    /// go elsewhere while accepted work finishes. [`crate::serve`] calls it when its shutdown
    /// signal fires; the binary may call it earlier (clones share the flag). Status streams end
    /// (their clients reconnect, elsewhere, with `Last-Event-ID`) and `Prefer: wait` submits
    /// answer at once, so that they do not hold the shutdown up.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.live.wake_all();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
