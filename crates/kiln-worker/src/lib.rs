//! kiln's workers: the loop that turns queued jobs into stored images.
//!
//! # Layout
//! - [`pool`]: [`run_pool`], worker slots claiming jobs until the shutdown token fires, each
//!   with its own placement ([`Slot`]: the engines on its device, that device's budget).
//! - [`memory`]: a device's [`MemoryBudget`], from which each job reserves what its engine says
//!   it needs before it runs, so that slots sharing a device never overcommit it.
//! - `run`: one job from lease to terminal state (stored inline images read back, references
//!   fetched, the job's memory reserved on its device, engine on a blocking thread within the
//!   job's time limit, heartbeats, panics caught, image encoded and stored, job finished under
//!   its fencing token, stored images deleted; a forced cancel honoured at the engine's next
//!   step).
//! - `preview`: a running job's latest preview, scaled, encoded as JPEG and stored at each
//!   heartbeat; the replaced one deleted once the store has acknowledged the new one.
//! - [`address`]: which IP addresses are not public and why (IANA's special-purpose
//!   registries as tables), for everything the worker connects to on a user's behalf.
//! - [`allow`]: the operator's allow list of address blocks and host names laid over
//!   [`address`]'s verdict (link-local and cloud metadata addresses only by explicit block).
//! - [`references`]: an edit's reference images, fetched concurrently (guarded against internal
//!   addresses, bounded in redirects, time and size) or read from data URIs, and decoded off
//!   the async runtime within pixel limits, then scaled to the model's working size.
//! - `guard`: the guarded HTTP client both fetch references and deliver webhooks through
//!   (non-public addresses refused unless allowed, checked where names resolve; no proxy).
//! - [`webhooks`]: [`run_dispatcher`], which delivers the store's webhook outbox: signed POSTs,
//!   retried with backoff, claimed so that any node may run one.
//! - [`maintenance`]: the periodic sweep (jobs abandoned by dead workers, expired records and files).
//! - `metrics`: Prometheus series the worker records (in the default registry).
//!
//! The worker knows the engine only as [`kiln_core::engine::Engine`], the store only as
//! [`kiln_core::store::JobStore`] and the files only as [`kiln_core::blob::BlobStore`].

pub mod address;
pub mod allow;
mod guard;
pub mod maintenance;
pub mod memory;
mod metrics;
pub mod pool;
mod preview;
pub mod references;
mod run;
pub mod webhooks;

pub use allow::{AllowList, AllowListError};
pub use memory::MemoryBudget;
pub use pool::{run_pool, EngineSet, Slot, WorkerSettings};
pub use preview::encode_preview;
pub use references::{FetchError, FetchPolicy, Reason, ReferenceFetcher};
pub use webhooks::{run_dispatcher, WebhookSettings};
