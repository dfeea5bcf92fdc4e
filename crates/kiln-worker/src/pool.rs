//! Worker slots: each claims a job, runs it to its end, and claims the next, until shutdown.
//! Each slot has its own placement ([`Slot`]): the engines loaded on its device and that
//! device's memory budget, which the slots on one device share.

use crate::memory::MemoryBudget;
use crate::references::{FetchPolicy, ReferenceFetcher};
use crate::run::run_job;
use kiln_core::blob::BlobStore;
use kiln_core::catalog::Route;
use kiln_core::engine::Engine;
use kiln_core::ids::WorkerId;
use kiln_core::job::JobState;
use kiln_core::report::Chain;
use kiln_core::store::{ClaimPolicy, JobEvents, JobNotice, JobStore};
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

/// Where one slot runs its jobs: the engines loaded on its device, and the memory budget of
/// that device (shared by every slot on it; `None`: jobs run without reservations).
#[derive(Clone, Default)]
pub struct Slot {
    pub engines: EngineSet,
    pub memory: Option<Arc<MemoryBudget>>,
}

impl Slot {
    pub fn new(engines: EngineSet) -> Self {
        Self {
            engines,
            memory: None,
        }
    }

    pub fn with_memory(mut self, budget: Arc<MemoryBudget>) -> Self {
        self.memory = Some(budget);
        self
    }

    /// `count` slots alike (one machine's cores, or one device).
    pub fn repeat(self, count: usize) -> Vec<Slot> {
        vec![self; count]
    }

    /// The routes some slot of `slots` has an engine for (empty: the slots take no job).
    pub fn served_routes(slots: &[Slot]) -> Vec<Route> {
        Route::ALL
            .into_iter()
            .filter(|route| slots.iter().any(|s| s.engines.get(*route).is_some()))
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Prefix of the slots' worker ids (`{name}-{slot}`), e.g. the host name.
    pub name: String,
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
    pub settings: WorkerSettings,
    pub fetcher: ReferenceFetcher,
    pub shutdown: CancellationToken,
}

/// Runs one worker slot per entry of `slots` until `shutdown` is cancelled and every slot has
/// finished or released its job.
pub async fn run_pool(
    jobs: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    slots: Vec<Slot>,
    settings: WorkerSettings,
    shutdown: CancellationToken,
) {
    crate::metrics::register();
    if Slot::served_routes(&slots).is_empty() {
        tracing::warn!("no engine is loaded: this worker pool takes no jobs");
    }
    let context = Arc::new(WorkerContext {
        jobs,
        blobs,
        fetcher: ReferenceFetcher::new(settings.fetch.clone()),
        settings,
        shutdown,
    });
    let mut running = tokio::task::JoinSet::new();
    for (n, slot) in slots.into_iter().enumerate() {
        let context = context.clone();
        let id = WorkerId::new(format!("{}-{n}", context.settings.name));
        running.spawn(async move { run_slot(&context, &id, &slot).await });
    }
    while running.join_next().await.is_some() {}
}

async fn run_slot(context: &WorkerContext, id: &WorkerId, slot: &Slot) {
    let routes = &slot.engines.routes();
    let memory = slot.memory.as_ref().map(|m| m.device());
    tracing::info!(worker = %id, ?routes, ?memory, "worker slot started");
    // Subscribed for the slot's life, so that a submit made while it runs a job or claims is
    // still heard when it next idles.
    let mut events = context.jobs.subscribe();
    while !context.shutdown.is_cancelled() {
        match context
            .jobs
            .claim(id, routes, context.settings.claim_policy())
            .await
        {
            Ok(Some(lease)) => run_job(context, slot, lease).await,
            Ok(None) => idle(context, &mut events, routes).await,
            Err(e) => {
                tracing::error!(worker = %id, error = %Chain(&e), "claiming a job failed; retrying");
                // A failing store is not asked again before the poll interval, events or not.
                pause(context).await;
            }
        }
    }
    tracing::info!(worker = %id, "worker slot stopped");
}

/// Waits until a job of `routes` may be claimable: one was queued (submitted or released), the
/// store says events were missed, the poll interval passed (polling remains the fallback for
/// changes no event reports, such as a lease running out, or another process's writes on
/// SQLite), or shutdown.
async fn idle(context: &WorkerContext, events: &mut JobEvents, routes: &[Route]) {
    // Notices that arrived while the slot was busy: any one that may matter is worth one claim
    // (for all of them), not one claim each.
    let mut heard = false;
    while let Some(notice) = events.try_recv() {
        heard |= wakes(&notice, routes);
    }
    if heard {
        return;
    }
    let queued = async {
        loop {
            match events.recv().await {
                Some(notice) if wakes(&notice, routes) => return,
                Some(_) => {}
                // The store hands out no more events: only the poll interval is left.
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        () = queued => {}
        () = pause(context) => {}
    }
}

/// Whether `notice` may mean a claimable job of `routes`.
fn wakes(notice: &JobNotice, routes: &[Route]) -> bool {
    match notice {
        JobNotice::Event(event) => event.state == JobState::Queued && routes.contains(&event.route),
        JobNotice::Resync => true,
    }
}

/// The poll interval, or less on shutdown.
async fn pause(context: &WorkerContext) {
    tokio::select! {
        () = tokio::time::sleep(context.settings.poll_interval) => {}
        () = context.shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::references::FetchPolicy;
    use kiln_core::ids::KeyId;
    use kiln_core::job::NewJob;
    use kiln_core::store::QueueLimits;

    const ROUTE: Route = Route::Flux2FlexTextToImage;

    fn job(route: Route) -> NewJob {
        kiln_testkit::jobs::new_job_on(route, KeyId::new(), "p")
    }

    /// An idle slot with a poll interval far longer than the test wakes for a submit of one of
    /// its routes, and only for that.
    #[tokio::test]
    async fn an_idle_slot_wakes_on_a_submit_for_its_routes() {
        let dir = tempfile::tempdir().unwrap();
        let store = kiln_store::SqliteStore::open(&dir.path().join("kiln.db"))
            .await
            .unwrap();
        let blobs = kiln_blob::LocalBlobStore::new(dir.path().join("blobs")).unwrap();
        let settings = WorkerSettings {
            name: "test".into(),
            lease: Duration::from_secs(60),
            max_attempts: 3,
            poll_interval: Duration::from_secs(600),
            drain_timeout: Duration::ZERO,
            job_timeout: Duration::from_secs(60),
            fetch: FetchPolicy::default(),
        };
        let context = Arc::new(WorkerContext {
            jobs: Arc::new(store.clone()),
            blobs: Arc::new(blobs),
            fetcher: ReferenceFetcher::new(settings.fetch.clone()),
            settings,
            shutdown: CancellationToken::new(),
        });
        let mut events = context.jobs.subscribe();
        let idling = {
            let context = context.clone();
            tokio::spawn(async move { idle(&context, &mut events, &[ROUTE]).await })
        };
        let limits = QueueLimits::total(10);
        store
            .enqueue(job(Route::Flux11ProTextToImage), None, limits)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!idling.is_finished(), "woken by another route's job");
        store.enqueue(job(ROUTE), None, limits).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), idling)
            .await
            .expect("not woken by a job of its route")
            .unwrap();
    }
}
