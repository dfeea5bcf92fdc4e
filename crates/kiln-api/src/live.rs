//! Live requests: one subscription to the store's events per API node, fanned out to whoever
//! watches a request (status streams, `Prefer: wait` submits).
//!
//! The events come through the store (PostgreSQL's `NOTIFY` reaches every node; SQLite's stay in
//! the process), so an API node learns of a worker's progress on another host without polling.
//! A watcher is woken, never told what changed: it re-reads its job (`JobStore::get`, which also
//! computes the queue position) and decides for itself. So events are hints, as the store
//! documents them, and a missed one costs nothing worse than a wake of everyone (`Resync`).
//!
//! Cost per watcher: a registry entry and a [`Notify`]; no task, no timer. An event wakes the
//! watchers of its own request; an event that can move queue positions (a claim, a release, a
//! queued job cancelled) also wakes the watchers that last saw their request queued, at most once
//! per [`QUEUE_WAKE_INTERVAL`]: a burst of claims costs each queued watcher one re-read.

use kiln_core::ids::RequestId;
use kiln_core::job::JobState;
use kiln_core::store::{JobEvent, JobEvents, JobNotice, JobStore};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The least time between two wakes of the queued watchers.
pub(crate) const QUEUE_WAKE_INTERVAL: Duration = Duration::from_millis(250);

/// Past this many requests believed running, the belief is dropped (see [`QueueMoves`]).
const MAX_TRACKED_RUNNING: usize = 65_536;

/// The node's hub. Its task starts on first use, inside whichever runtime that is, so that
/// building an [`crate::AppState`] needs no runtime.
pub(crate) struct LiveHub {
    jobs: Arc<dyn JobStore>,
    registry: Arc<Registry>,
    started: OnceLock<()>,
}

/// Who watches which request.
#[derive(Default)]
struct Registry {
    watchers: Mutex<HashMap<RequestId, Vec<Arc<Slot>>>>,
}

/// One watcher's wake-up: `Notify` keeps one permit, so a wake that comes while the watcher is
/// busy re-reading is not lost, and many wakes meanwhile are one.
#[derive(Default)]
struct Slot {
    wake: Notify,
    in_queue: AtomicBool,
}

/// A registration; dropping it unregisters.
pub(crate) struct Watch {
    registry: Arc<Registry>,
    id: RequestId,
    slot: Arc<Slot>,
}

impl LiveHub {
    pub(crate) fn new(jobs: Arc<dyn JobStore>) -> Self {
        Self {
            jobs,
            registry: Arc::default(),
            started: OnceLock::new(),
        }
    }

    /// Watches request `id` from now on. Register before reading the job: a change committed
    /// between the read and the registration would otherwise go unseen.
    pub(crate) fn watch(&self, id: RequestId) -> Watch {
        self.start();
        Registry::register(&self.registry, id)
    }

    /// Wakes every watcher (the node begins draining: streams end so that their clients
    /// reconnect elsewhere).
    pub(crate) fn wake_all(&self) {
        self.registry.wake_all();
    }

    /// Subscribes (synchronously, so that no event after the first `watch` is missed) and
    /// spawns the task that fans the events out. It holds the registry weakly and ends when
    /// the hub is gone or the store closes its events.
    fn start(&self) {
        self.started.get_or_init(|| {
            let events = self.jobs.subscribe();
            tokio::spawn(fan_out(events, Arc::downgrade(&self.registry)));
        });
    }
}

impl Watch {
    /// Returns once something may have changed for the watched request since the last wake.
    pub(crate) async fn changed(&self) {
        self.slot.wake.notified().await;
    }

    /// Records whether the request was queued when last read: only then do queue moves wake it.
    pub(crate) fn set_in_queue(&self, in_queue: bool) {
        self.slot.in_queue.store(in_queue, Ordering::Relaxed);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut watchers = self.registry.watchers.lock().expect("not poisoned");
        if let Some(slots) = watchers.get_mut(&self.id) {
            slots.retain(|slot| !Arc::ptr_eq(slot, &self.slot));
            if slots.is_empty() {
                watchers.remove(&self.id);
            }
        }
    }
}

impl Registry {
    fn register(registry: &Arc<Registry>, id: RequestId) -> Watch {
        let slot = Arc::new(Slot::default());
        let mut watchers = registry.watchers.lock().expect("not poisoned");
        watchers.entry(id).or_default().push(slot.clone());
        drop(watchers);
        Watch {
            registry: registry.clone(),
            id,
            slot,
        }
    }

    #[cfg(test)]
    fn watcher_count(&self) -> usize {
        let watchers = self.watchers.lock().expect("not poisoned");
        watchers.values().map(Vec::len).sum()
    }

    fn wake(&self, id: RequestId) {
        let watchers = self.watchers.lock().expect("not poisoned");
        for slot in watchers.get(&id).into_iter().flatten() {
            slot.wake.notify_one();
        }
    }

    fn wake_where(&self, pick: impl Fn(&Slot) -> bool) {
        let watchers = self.watchers.lock().expect("not poisoned");
        for slot in watchers.values().flatten().filter(|slot| pick(slot)) {
            slot.wake.notify_one();
        }
    }

    fn wake_queued(&self) {
        self.wake_where(|slot| slot.in_queue.load(Ordering::Relaxed));
    }

    fn wake_all(&self) {
        self.wake_where(|_| true);
    }
}

/// The hub's task: each event wakes its request's watchers; queue moves wake the queued
/// watchers, the first at once and the rest of a burst together one interval later.
async fn fan_out(mut events: JobEvents, registry: Weak<Registry>) {
    let mut moves = QueueMoves::default();
    let mut due: Option<Instant> = None;
    let mut last_queue_wake = Instant::now() - QUEUE_WAKE_INTERVAL;
    loop {
        // The sleep's deadline is evaluated even while the branch is off: hence the default.
        let deadline = due.unwrap_or_else(Instant::now);
        let notice = tokio::select! {
            notice = events.recv() => notice,
            () = tokio::time::sleep_until(deadline), if due.is_some() => {
                let Some(registry) = registry.upgrade() else { return };
                registry.wake_queued();
                last_queue_wake = Instant::now();
                due = None;
                continue;
            }
        };
        let (Some(notice), Some(registry)) = (notice, registry.upgrade()) else {
            return;
        };
        let moved = match notice {
            JobNotice::Resync => {
                registry.wake_all();
                false
            }
            JobNotice::Event(event) => {
                registry.wake(event.id);
                moves.moves_queue(&event)
            }
        };
        if moved && due.is_none() {
            due = Some((last_queue_wake + QUEUE_WAKE_INTERVAL).max(Instant::now()));
        }
    }
}

/// Which events change the queue positions of other requests. An event does not say what the
/// job was before, so the hub remembers which requests it saw start running: a `Running` event
/// of one already running is a heartbeat, a `Queued` one of it a release (back to the head of
/// the queue), a terminal one the end of a run; for one it did not see running, `Running` is a
/// claim and a terminal state a queued job's cancel. A `Queued` event of an unknown request is a
/// submit, which joins the tail and moves no one. Unknown terminal states err on the side of a
/// wake. The set holds the running requests only, as many as there are worker slots, and is
/// dropped whole if it ever grows large (events missed in a `Resync` could leave entries behind).
#[derive(Default)]
struct QueueMoves {
    running: HashSet<RequestId>,
}

impl QueueMoves {
    fn moves_queue(&mut self, event: &JobEvent) -> bool {
        match event.state {
            JobState::Queued => self.running.remove(&event.id),
            JobState::Running => {
                if self.running.len() >= MAX_TRACKED_RUNNING {
                    self.running.clear();
                }
                self.running.insert(event.id)
            }
            JobState::Succeeded | JobState::Failed | JobState::Cancelled => {
                !self.running.remove(&event.id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::catalog::Route;
    use kiln_core::ids::KeyId;

    fn event(id: RequestId, state: JobState) -> JobEvent {
        JobEvent {
            id,
            owner: KeyId::new(),
            route: Route::ALL[0],
            state,
            progress: None,
        }
    }

    #[test]
    fn only_claims_releases_and_queued_ends_move_the_queue() {
        let mut moves = QueueMoves::default();
        let (a, b) = (RequestId::new(), RequestId::new());
        assert!(!moves.moves_queue(&event(a, JobState::Queued)), "a submit");
        assert!(moves.moves_queue(&event(a, JobState::Running)), "a claim");
        assert!(
            !moves.moves_queue(&event(a, JobState::Running)),
            "a heartbeat"
        );
        assert!(moves.moves_queue(&event(a, JobState::Queued)), "a release");
        assert!(
            moves.moves_queue(&event(a, JobState::Running)),
            "claimed again"
        );
        assert!(
            !moves.moves_queue(&event(a, JobState::Succeeded)),
            "a run ends"
        );
        assert!(
            moves.moves_queue(&event(b, JobState::Cancelled)),
            "a queued cancel"
        );
    }

    #[test]
    fn a_dropped_watch_unregisters() {
        let registry = Arc::new(Registry::default());
        let id = RequestId::new();
        let first = Registry::register(&registry, id);
        let second = Registry::register(&registry, id);
        assert_eq!(registry.watcher_count(), 2);
        drop(first);
        assert_eq!(registry.watcher_count(), 1);
        drop(second);
        assert!(registry.watchers.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_wake_while_busy_is_kept() {
        let registry = Arc::new(Registry::default());
        let (id, other) = (RequestId::new(), RequestId::new());
        let watch = Registry::register(&registry, id);
        let queued = Registry::register(&registry, other);
        queued.set_in_queue(true);
        registry.wake(id);
        registry.wake_queued();
        let soon = Duration::from_millis(50);
        tokio::time::timeout(soon, watch.changed()).await.unwrap();
        tokio::time::timeout(soon, queued.changed()).await.unwrap();
        assert!(tokio::time::timeout(soon, watch.changed()).await.is_err());
    }
}
