//! Live previews of a running job.
//!
//! The engine draws a cheap preview of its latents every `preview_interval` steps (one pixel
//! per latent pixel, so about an eighth of the output's side). On the engine's thread the
//! observer only keeps the latest one ([`LatestPreview`]: a copy, nothing more, so a step is
//! not slowed by scaling or encoding). At each heartbeat the job's task takes it, scales it to
//! at most [`MAX_SIDE`] pixels on the long side and encodes it as JPEG on a blocking thread,
//! stores it under a fresh key and reports it with the heartbeat ([`Previews`]).
//!
//! A preview's key names one image for ever, so a URL handed out never changes content. The
//! previous key is deleted only once the store has acknowledged the new one: a URL keeps
//! working until the next preview replaces it. Previews are best effort: a failure is logged
//! and skipped, and never fails the job.

use crate::metrics::PREVIEW_SECONDS;
use kiln_core::blob::{Blob, BlobStore};
use kiln_core::engine::RgbImage;
use kiln_core::ids::BlobKey;
use kiln_core::image_file::{encode_image, resize_lanczos};
use kiln_core::job::{JobStatus, Preview};
use kiln_core::params::OutputFormat;
use kiln_core::report::Chain;
use kiln_core::store::JobStore;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The long side of a stored preview, at most: enough to see the composition take shape, small
/// enough (a few kilobytes) to store once a second.
pub(crate) const MAX_SIDE: u32 = 256;

/// The engine's latest preview, waiting for the next heartbeat. The engine's thread replaces
/// it; the job's task takes it. Older ones are simply overwritten: only the newest is shown.
#[derive(Default)]
pub(crate) struct LatestPreview(Mutex<Option<(u32, RgbImage)>>);

impl LatestPreview {
    /// Keeps `image`, drawn at `step`, in place of any preview not yet taken.
    pub(crate) fn offer(&self, step: u32, image: &RgbImage) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.as_mut() {
            // Reuses the buffer of a preview never taken (the heartbeat is slower than steps).
            Some((kept_step, kept)) => {
                *kept_step = step;
                kept.clone_from(image);
            }
            None => *slot = Some((step, image.clone())),
        }
    }

    fn take(&self) -> Option<(u32, RgbImage)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// `image` scaled down so that its long side is at most [`MAX_SIDE`], aspect ratio kept (no
/// side below one pixel); unchanged when already within.
pub(crate) fn fit_preview(image: RgbImage) -> RgbImage {
    let long = image.width.max(image.height);
    if long <= MAX_SIDE {
        return image;
    }
    let long = u64::from(long);
    // Rounded to the nearest pixel: the long side comes out at exactly MAX_SIDE.
    let side = |s: u32| ((u64::from(s) * u64::from(MAX_SIDE) + long / 2) / long) as u32;
    let size = (side(image.width).max(1), side(image.height).max(1));
    let Some(buffer) = image::RgbImage::from_raw(image.width, image.height, image.pixels) else {
        unreachable!("an RgbImage holds width x height x 3 bytes");
    };
    resize_lanczos(&buffer, size)
}

/// The preview as the JPEG file that is stored: scaled, then encoded. Public for kiln-bench's
/// `previews`, which measures what this costs beside a generation.
pub fn encode_preview(image: RgbImage) -> Result<Vec<u8>, kiln_core::image_file::EncodeError> {
    encode_image(&fit_preview(image), OutputFormat::Jpeg)
}

/// The previews one run has stored, and which of them the store holds as the job's current one.
#[derive(Default)]
pub(crate) struct Previews {
    /// Acknowledged by the store as the job's preview: its URL may be out with clients.
    current: Option<Preview>,
    /// Stored since and not acknowledged yet; the last is the one reported. More than one only
    /// after heartbeats that failed without an answer (the store may or may not have recorded
    /// them, so none is deleted before the store has acknowledged a later one).
    unacknowledged: Vec<Preview>,
}

impl Previews {
    /// A run's previews, starting from the one an earlier attempt left on the job (`status` as
    /// claimed): the first preview this run has acknowledged replaces and deletes it.
    pub(crate) fn inherited(status: &JobStatus) -> Self {
        let current = match status {
            JobStatus::Running { preview, .. } => preview.clone(),
            _ => None,
        };
        Self {
            current,
            unacknowledged: Vec::new(),
        }
    }

    /// Stores the engine's latest preview, if it drew one since the last call. `budget` bounds
    /// the write: a slow blob store must not hold back the heartbeat that keeps the lease.
    pub(crate) async fn store_latest(
        &mut self,
        blobs: &Arc<dyn BlobStore>,
        latest: &LatestPreview,
        budget: Duration,
    ) {
        let Some((step, image)) = latest.take() else {
            return;
        };
        let started = Instant::now();
        // Scaling and encoding take a few milliseconds of CPU: not on the async runtime.
        let bytes = match tokio::task::spawn_blocking(move || encode_preview(image)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => {
                return tracing::warn!(error = %Chain(&e), "could not encode a preview; skipped")
            }
            Err(e) => return tracing::warn!(error = %e, "encoding a preview panicked; skipped"),
        };
        let key = BlobKey::random(OutputFormat::Jpeg.extension());
        let blob = Blob {
            bytes,
            content_type: OutputFormat::Jpeg.content_type().to_string(),
        };
        match tokio::time::timeout(budget, blobs.put(&key, blob)).await {
            Ok(Ok(())) => self.unacknowledged.push(Preview { key, step }),
            Ok(Err(e)) => tracing::warn!(error = %Chain(&e), "could not store a preview; skipped"),
            Err(_) => {
                tracing::warn!(
                    budget_ms = budget.as_millis() as u64,
                    "storing a preview took too long; skipped"
                );
                // The write may still land after it was given up: delete it, in the background
                // so the heartbeat is not held back again.
                let blobs = blobs.clone();
                tokio::spawn(async move { delete(blobs.as_ref(), &key).await });
            }
        }
        PREVIEW_SECONDS.observe(started.elapsed().as_secs_f64());
    }

    /// The preview to report with the next heartbeat: the newest stored.
    pub(crate) fn report(&self) -> Option<Preview> {
        self.unacknowledged
            .last()
            .or(self.current.as_ref())
            .cloned()
    }

    /// The store acknowledged a heartbeat that reported [`Self::report`]: that preview is the
    /// job's now, and every older one is referenced by nothing (its URL stops working).
    pub(crate) async fn acknowledged(&mut self, blobs: &dyn BlobStore) {
        let Some(newest) = self.unacknowledged.pop() else {
            return;
        };
        let replaced = self.current.replace(newest);
        for old in replaced.into_iter().chain(self.unacknowledged.drain(..)) {
            delete(blobs, &old.key).await;
        }
    }

    /// At the run's end, whatever the end: deletes each stored preview the job's record does not
    /// reference. A job that ended keeps its last preview (its record's purge returns the key);
    /// a release, or another worker's claim after a lost lease, cleared it from the record; a
    /// preview whose heartbeat was refused (lease lost) or unanswered was perhaps never recorded.
    pub(crate) async fn settle(self, jobs: &dyn JobStore, blobs: &dyn BlobStore) {
        for preview in self.current.into_iter().chain(self.unacknowledged) {
            match jobs.blob_is_live(&preview.key).await {
                Ok(true) => {}
                Ok(false) => delete(blobs, &preview.key).await,
                Err(e) => {
                    tracing::warn!(error = %Chain(&e), blob = %preview.key, "could not tell whether a preview is still referenced; left in place")
                }
            }
        }
    }
}

async fn delete(blobs: &dyn BlobStore, key: &BlobKey) {
    if let Err(e) = blobs.delete(key).await {
        tracing::warn!(error = %Chain(&e), blob = %key, "could not delete a replaced preview");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(width: u32, height: u32) -> RgbImage {
        RgbImage {
            width,
            height,
            pixels: [10, 200, 30].repeat((width * height) as usize),
        }
    }

    #[test]
    fn a_large_preview_is_scaled_to_the_long_side_keeping_its_aspect() {
        for ((w, h), want) in [
            ((320, 240), (256, 192)),
            ((240, 320), (192, 256)),
            ((1024, 8), (256, 2)),
            ((4000, 1), (256, 1)),
        ] {
            let out = fit_preview(solid(w, h));
            assert_eq!((out.width, out.height), want, "{w}x{h}");
            assert_eq!(out.pixels.len(), (want.0 * want.1 * 3) as usize);
        }
    }

    #[test]
    fn a_small_preview_is_left_as_it_is() {
        let small = solid(128, 96);
        assert_eq!(fit_preview(small.clone()), small);
    }

    #[test]
    fn the_latest_offer_wins() {
        let latest = LatestPreview::default();
        latest.offer(1, &solid(4, 4));
        latest.offer(2, &solid(8, 2));
        let (step, image) = latest.take().unwrap();
        assert_eq!((step, image.width, image.height), (2, 8, 2));
        assert!(latest.take().is_none(), "taken once");
    }
}
