//! Worker slots: each claims a job, runs it to its end, and claims the next, until shutdown.

use crate::references::{FetchPolicy, ReferenceFetcher};
use crate::run::run_job;
use kiln_core::blob::BlobStore;
use kiln_core::catalog::Route;
use kiln_core::engine::Engine;
use kiln_core::ids::WorkerId;
use kiln_core::report::Chain;
use kiln_core::store::{ClaimPolicy, JobStore};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The loaded engines, by the route each serves. A worker claims only these routes.
#[derive(Clone, Default)]
pub struct EngineSet {
    engines: BTreeMap<Route, Arc<dyn Engine>>,
}

impl EngineSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, route: Route, engine: Arc<dyn Engine>) -> Self {
        self.engines.insert(route, engine);
        self
    }

    pub fn get(&self, route: Route) -> Option<&Arc<dyn Engine>> {
        self.engines.get(&route)
    }

    pub fn routes(&self) -> Vec<Route> {
        self.engines.keys().copied().collect()
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Prefix of the slots' worker ids (`{name}-{slot}`), e.g. the host name.
    pub name: String,
    /// Jobs run at once in this process. One engine saturates a machine's cores, so 1 is usual.
    pub slots: usize,
    /// How long a claim holds without a heartbeat; a dead worker's job is retaken after this.
    pub lease: Duration,
    /// A job whose workers died this many times is failed instead of retried.
    pub max_attempts: u32,
    /// How long an idle slot waits before asking the queue again.
    pub poll_interval: Duration,
    /// On shutdown, how long a running job may go on before it is interrupted and released.
    pub drain_timeout: Duration,
    /// The longest one job may run (fetching its images included) before it is stopped and
    /// failed (`timed_out`): a job that hangs or crawls must not hold a slot for ever.
    pub job_timeout: Duration,
    /// How an edit's reference images are fetched.
    pub fetch: FetchPolicy,
}

impl WorkerSettings {
    pub(crate) fn claim_policy(&self) -> ClaimPolicy {
        ClaimPolicy {
            lease: self.lease,
            max_attempts: self.max_attempts,
        }
    }

    /// Heartbeats come at least three times a lease, so one late beat never loses the job, and
    /// at least once a second, because they also carry the progress clients poll for.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.lease / 3).min(Duration::from_secs(1))
    }
}

/// Everything one slot needs, shared by all slots.
pub(crate) struct WorkerContext {
    pub jobs: Arc<dyn JobStore>,
    pub blobs: Arc<dyn BlobStore>,
    pub engines: EngineSet,
    pub settings: WorkerSettings,
    pub fetcher: ReferenceFetcher,
    pub shutdown: CancellationToken,
}

/// Runs `settings.slots` worker slots until `shutdown` is cancelled and every slot has finished
/// or released its job.
pub async fn run_pool(
    jobs: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    engines: EngineSet,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) {
    crate::metrics::register();
    let routes = engines.routes();
    if routes.is_empty() {
        tracing::warn!("no engine is loaded: this worker pool takes no jobs");
    }
    let context = Arc::new(WorkerContext {
        jobs,
        blobs,
        engines,
        fetcher: ReferenceFetcher::new(settings.fetch.clone()),
        settings,
        shutdown,
    });
    let mut slots = tokio::task::JoinSet::new();
    for slot in 0..context.settings.slots {
        let context = context.clone();
        let routes = routes.clone();
        let id = WorkerId::new(format!("{}-{slot}", context.settings.name));
        slots.spawn(async move { run_slot(&context, &id, &routes).await });
    }
    while slots.join_next().await.is_some() {}
}

async fn run_slot(context: &WorkerContext, id: &WorkerId, routes: &[Route]) {
    tracing::info!(worker = %id, ?routes, "worker slot started");
    while !context.shutdown.is_cancelled() {
        match context
            .jobs
            .claim(id, routes, context.settings.claim_policy())
            .await
        {
            Ok(Some(lease)) => run_job(context, lease).await,
            Ok(None) => idle(context).await,
            Err(e) => {
                tracing::error!(worker = %id, error = %Chain(&e), "claiming a job failed; retrying");
                idle(context).await;
            }
        }
    }
    tracing::info!(worker = %id, "worker slot stopped");
}

async fn idle(context: &WorkerContext) {
    tokio::select! {
        () = tokio::time::sleep(context.settings.poll_interval) => {}
        () = context.shutdown.cancelled() => {}
    }
}
