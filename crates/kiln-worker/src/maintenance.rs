//! The periodic sweep every kiln process with store access may run: fail the jobs whose workers
//! kept dying, and purge expired records with their files. Running it in several processes at
//! once is harmless: each statement is atomic and deleting a missing file is not an error.

use kiln_core::blob::BlobStore;
use kiln_core::report::Chain;
use kiln_core::store::JobStore;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub abandoned_failed: u64,
    pub records_purged_files: u64,
}

/// One sweep. Errors are logged, not returned: the next sweep tries again.
pub async fn sweep(jobs: &dyn JobStore, blobs: &dyn BlobStore, max_attempts: u32) -> SweepReport {
    let mut report = SweepReport::default();
    match jobs.fail_abandoned(max_attempts).await {
        Ok(n) => report.abandoned_failed = n,
        Err(e) => tracing::warn!(error = %Chain(&e), "failing abandoned jobs"),
    }
    match jobs.purge_expired(OffsetDateTime::now_utc()).await {
        Ok(keys) => {
            for key in &keys {
                if let Err(e) = blobs.delete(key).await {
                    tracing::warn!(error = %Chain(&e), blob = %key, "deleting an expired file");
                }
            }
            report.records_purged_files = keys.len() as u64;
        }
        Err(e) => tracing::warn!(error = %Chain(&e), "purging expired records"),
    }
    if report != SweepReport::default() {
        tracing::info!(?report, "maintenance sweep");
    }
    report
}

/// Sweeps every `interval` until `shutdown`.
pub async fn run_sweeper(
    jobs: Arc<dyn JobStore>,
    blobs: Arc<dyn BlobStore>,
    max_attempts: u32,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => { sweep(jobs.as_ref(), blobs.as_ref(), max_attempts).await; }
            () = shutdown.cancelled() => return,
        }
    }
}
