//! The running service: stores, HTTP API, worker pool and sweeper, started and stopped together.

use crate::config::Settings;
use crate::store_url::StoreLocation;
use anyhow::Context;
use kiln_api::{ApiSettings, AppState, ConnectionLimits};
use kiln_blob::BlobLocation;
use kiln_core::blob::BlobStore;
use kiln_core::catalog::Route;
use kiln_core::store::{JobStore, KeyStore};
use kiln_store::{PgStore, SqliteStore};
use kiln_worker::maintenance::run_sweeper;
use kiln_worker::{run_dispatcher, run_pool, Slot, WebhookSettings, WorkerSettings};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The three stores every command works with.
#[derive(Clone)]
pub struct Stores {
    pub jobs: Arc<dyn JobStore>,
    pub keys: Arc<dyn KeyStore>,
    pub blobs: Arc<dyn BlobStore>,
}

/// Opens the configured stores: `store.url` and `blobs.url` (creating the data directory and
/// the SQLite file on a first start). A store that cannot be opened or reached stops the start
/// with the setting's name and the backend's reason.
pub async fn open_stores(settings: &Settings) -> anyhow::Result<Stores> {
    let store = settings.store_location()?;
    let blob_location = settings.blob_location()?;
    let (jobs, keys): (Arc<dyn JobStore>, Arc<dyn KeyStore>) = match &store {
        StoreLocation::Sqlite(path) => {
            create_parent(path)?;
            let sqlite = SqliteStore::open(path)
                .await
                .with_context(|| format!("store.url: opening {store}"))?;
            let sqlite = Arc::new(sqlite);
            (sqlite.clone(), sqlite)
        }
        StoreLocation::Postgres(url) => {
            let pg = PgStore::connect(url.as_str())
                .await
                .with_context(|| format!("store.url: connecting to {store}"))?;
            let pg = Arc::new(pg);
            (pg.clone(), pg)
        }
    };
    if let (StoreLocation::Postgres(_), BlobLocation::Directory(dir)) = (&store, &blob_location) {
        // Legitimate on one machine; on several, a result written here downloads only here.
        tracing::warn!(
            blob_dir = %dir.display(),
            "store.url is shared (PostgreSQL) but blobs.url is this machine's directory: \
             images are kept on this node alone; with API nodes or workers on other machines, \
             set blobs.url to an s3:// bucket"
        );
    }
    let blobs = kiln_blob::open(&blob_location)
        .with_context(|| format!("blobs.url: opening {blob_location}"))?;
    Ok(Stores { jobs, keys, blobs })
}

/// Creates the directory a SQLite file goes in (the data directory, on a first start).
fn create_parent(path: &Path) -> anyhow::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the directory {}", dir.display())),
        _ => Ok(()),
    }
}

/// The key that signs file URLs: configured, or created once in the data directory.
fn signing_key(settings: &Settings) -> anyhow::Result<Vec<u8>> {
    if let Some(hex_key) = &settings.signing_key {
        let key = hex::decode(hex_key).context("signing_key must be hex")?;
        anyhow::ensure!(
            key.len() >= 32,
            "signing_key must be at least 32 bytes (64 hex digits)"
        );
        return Ok(key);
    }
    // A key made here would be this node's alone: every API node on a shared store must sign
    // and check file URLs with the same key, so it has to come from the configuration.
    if let Ok(store @ StoreLocation::Postgres(_)) = settings.store_location() {
        anyhow::bail!(
            "signing_key must be set when the store is shared ({}): every API node signs and \
             checks file URLs with it, so all must have the same one (64 hex digits, e.g. from \
             `openssl rand -hex 32`; KILN_SIGNING_KEY)",
            store.kind()
        );
    }
    let path = settings.data_dir.join("signing.key");
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "creating the data directory {}",
            settings.data_dir.display()
        )
    })?;
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            hex::decode(text.trim()).with_context(|| format!("{} is not hex", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key: [u8; 32] = rand::random();
            write_private(&path, &hex::encode(key))?;
            Ok(key.to_vec())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a secret readable by the owner only.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

pub fn worker_settings(settings: &Settings) -> WorkerSettings {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "kiln".to_string());
    WorkerSettings {
        name: format!("{host}-{}", std::process::id()),
        lease: Duration::from_secs(settings.workers.lease_secs),
        max_attempts: settings.workers.max_attempts,
        poll_interval: Duration::from_millis(settings.workers.poll_interval_ms),
        drain_timeout: Duration::from_secs(settings.workers.drain_timeout_secs),
        job_timeout: Duration::from_secs(settings.workers.job_timeout_secs),
        fetch: settings.fetch.policy(),
    }
}

/// The maintenance sweeper every long-running command runs beside its work.
pub fn spawn_sweeper(
    settings: &Settings,
    stores: &Stores,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run_sweeper(
        stores.jobs.clone(),
        stores.blobs.clone(),
        settings.workers.max_attempts,
        Duration::from_secs(settings.sweep_interval_secs),
        shutdown.clone(),
    ))
}

/// The webhook dispatcher every API node runs beside its server: each delivery is claimed in
/// the store, so any number of nodes may run one and each announcement is sent by one of them.
pub fn spawn_dispatcher(
    settings: &Settings,
    state: &AppState,
    jobs: std::sync::Arc<dyn kiln_core::store::JobStore>,
    signing_key: Vec<u8>,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let webhooks = WebhookSettings::new(
        Duration::from_secs(settings.webhooks.retry_hours * 3600),
        Duration::from_secs(settings.webhooks.timeout_secs),
        // The same guard as image URLs: what `fetch.allow` opens, webhooks may reach.
        settings.fetch.policy().allow,
    );
    tokio::spawn(run_dispatcher(
        jobs,
        std::sync::Arc::new(kiln_api::WebhookBodies::from_state(state)),
        signing_key,
        webhooks,
        shutdown.clone(),
    ))
}

/// Descriptors kept back from the HTTP connections: SQLite's pool (the database, its WAL and
/// shared-memory files per connection), blob writes (a temporary file and its directory), the
/// workers' reference-image downloads, the checkpoint files, the runtime and the listeners.
const DESCRIPTOR_RESERVE: u64 = 64;

/// The connection cap in force: `configured`, lowered to leave [`DESCRIPTOR_RESERVE`]
/// descriptors free, after raising the soft descriptor limit to the hard one.
fn connection_cap(configured: usize) -> usize {
    let Some(soft) = raise_descriptor_limit() else {
        return configured;
    };
    let room = usize::try_from(soft.saturating_sub(DESCRIPTOR_RESERVE)).unwrap_or(usize::MAX);
    let cap = configured.min(room).max(1);
    if cap < configured {
        tracing::warn!(
            descriptor_limit = soft,
            configured,
            max_connections = cap,
            reserved = DESCRIPTOR_RESERVE,
            "connection cap: lowered to fit the descriptor limit (raise `ulimit -n` for more)"
        );
    } else {
        tracing::info!(
            descriptor_limit = soft,
            max_connections = cap,
            "connection cap"
        );
    }
    cap
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (the soft default, often 1024, is far
/// below what a server needs) and returns the soft limit in force; `None` if it cannot be read.
fn raise_descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        // Refused on some systems (macOS will not take an unlimited soft limit): keep the soft.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    // `rlim_t` is u64 on Linux and macOS, but not on every Unix.
    #[allow(clippy::useless_conversion)]
    let soft = u64::try_from(limit.rlim_cur).unwrap_or(u64::MAX);
    Some(soft)
}

/// `kiln serve`'s `/metrics` listener (`metrics.bind`), bound at build time so that a taken
/// port fails the start.
struct MetricsListener {
    listener: TcpListener,
    address: SocketAddr,
}

/// A bound, ready service. Build it, read its address, then [`Application::run`] it.
pub struct Application {
    listener: TcpListener,
    address: SocketAddr,
    metrics: Option<MetricsListener>,
    public_url: String,
    served_routes: Vec<Route>,
    state: AppState,
    stores: Stores,
    /// The in-process worker slots (none on an API node).
    slots: Vec<Slot>,
    settings: Settings,
    /// What signs file URLs and derives the webhook secrets.
    signing_key: Vec<u8>,
}

impl Application {
    /// Opens the stores and binds the listener (`bind` port 0 picks a free port).
    pub async fn build(settings: Settings, slots: Vec<Slot>) -> anyhow::Result<Self> {
        // Before the stores: a start that cannot serve must not create a schema on the way out.
        let signing_key = signing_key(&settings)?;
        let stores = open_stores(&settings).await?;
        let listener = TcpListener::bind(settings.bind)
            .await
            .with_context(|| format!("binding {}", settings.bind))?;
        let address = listener.local_addr()?;
        let metrics = match settings.metrics.bind {
            Some(bind) => {
                let listener = TcpListener::bind(bind)
                    .await
                    .with_context(|| format!("binding metrics.bind {bind}"))?;
                let address = listener.local_addr()?;
                Some(MetricsListener { listener, address })
            }
            None => None,
        };
        let public_url = settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{address}"));
        // With in-process workers, what their engines serve (a demo checkpoint that could not
        // be had serves nothing); an API node advertises what its configuration names, served
        // by `kiln worker`s elsewhere.
        let served_routes = match slots.as_slice() {
            [] => settings.served_routes(),
            slots => Slot::served_routes(slots),
        };
        let limits = &settings.limits;
        let api = ApiSettings {
            public_url,
            signing_key: signing_key.clone(),
            retention: settings.retention(),
            max_body_bytes: limits.max_body_bytes,
            max_prompt_chars: limits.max_prompt_chars,
            max_queued: limits.max_queued,
            max_queued_per_key: limits.max_queued_per_key,
            rate_limit_per_minute: limits.rate_limit_per_minute,
            rate_limit_burst: limits.rate_limit_burst,
            idempotency_window: Duration::from_secs(settings.idempotency_hours * 3600),
            key_cache_ttl: kiln_api::auth::KEY_CACHE_TTL,
            served_routes,
            connections: ConnectionLimits {
                max_connections: connection_cap(limits.max_connections),
                header_timeout: Duration::from_secs(limits.header_timeout_secs),
                body_timeout: Duration::from_secs(limits.body_timeout_secs),
                idle_timeout: Duration::from_secs(limits.idle_timeout_secs),
            },
            metrics_on_api_port: metrics.is_none(),
            metrics_token: settings.metrics.token.clone(),
            // The contract's 15 s; not configurable (proxies' idle timeouts are longer).
            stream_keep_alive: Duration::from_secs(15),
            max_prefer_wait: Duration::from_secs(limits.max_prefer_wait_secs),
        };
        let served_routes = api.served_routes.clone();
        let public_url = api.public_url.clone();
        let state = AppState::new(
            stores.jobs.clone(),
            stores.keys.clone(),
            stores.blobs.clone(),
            api,
        );
        Ok(Self {
            listener,
            address,
            metrics,
            public_url,
            served_routes,
            state,
            stores,
            slots,
            settings,
            signing_key,
        })
    }

    /// What an operator checks first: where kiln listens and answers from, where it keeps
    /// its records and files, and what serves each route.
    fn log_summary(&self) {
        let settings = &self.settings;
        for route in Route::ALL {
            // Each device's engine once (slots on one device share it).
            let mut engines: Vec<String> = Vec::new();
            for engine in self.slots.iter().filter_map(|s| s.engines.get(route)) {
                let described = engine.describe();
                if !engines.contains(&described) {
                    engines.push(described);
                }
            }
            let served_by = match (engines.is_empty(), self.slots.is_empty()) {
                (false, _) => engines.join("; "),
                (true, true) if self.served_routes.contains(&route) => {
                    "`kiln worker` processes".to_string()
                }
                (true, _) => "nothing: submits are refused (400001)".to_string(),
            };
            tracing::info!(route = %route, served_by = %served_by, "route");
        }
        let metrics_address = self.metrics.as_ref().map(|m| m.address.to_string());
        tracing::info!(
            address = %self.address,
            metrics_address = %metrics_address.as_deref().unwrap_or("the API port"),
            public_url = %self.public_url,
            store = %settings.store_location().map(|l| l.to_string()).unwrap_or_default(),
            blob_store = %settings.blob_location().map(|l| l.to_string()).unwrap_or_default(),
            worker_slots = settings.workers.slots,
            "kiln is listening"
        );
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Where `/metrics` is served when `metrics.bind` is set.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.address)
    }

    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Serves until `shutdown` fires, then drains: submits answer 503001, open HTTP requests
    /// finish, running jobs finish within the drain timeout or go back to the queue.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Stores { jobs, blobs, .. } = self.stores.clone();
        let sweeper = spawn_sweeper(&self.settings, &self.stores, &shutdown);
        let dispatcher = spawn_dispatcher(
            &self.settings,
            &self.state,
            jobs.clone(),
            self.signing_key.clone(),
            &shutdown,
        );
        let workers = (!self.slots.is_empty()).then(|| {
            tokio::spawn(run_pool(
                jobs,
                blobs,
                self.slots.clone(),
                worker_settings(&self.settings),
                shutdown.clone(),
            ))
        });
        self.log_summary();
        let metrics = self.metrics.map(|metrics| {
            tokio::spawn(crate::worker_metrics::serve_router(
                metrics.listener,
                kiln_api::metrics_router(self.state.clone()),
                shutdown.clone(),
            ))
        });
        let served = kiln_api::serve(
            self.listener,
            self.state,
            shutdown.clone().cancelled_owned(),
        )
        .await;
        shutdown.cancel();
        if let Some(workers) = workers {
            workers.await.context("worker pool")?;
        }
        sweeper.await.context("sweeper")?;
        dispatcher.await.context("webhook dispatcher")?;
        if let Some(metrics) = metrics {
            metrics.await?.context("metrics listener")?;
        }
        served.context("HTTP server")
    }
}
