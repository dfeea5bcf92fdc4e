//! A device's memory budget, shared by the worker slots that run jobs on it.
//!
//! Before a slot runs a job it reserves what the engine says the job may hold at its peak
//! ([`kiln_core::engine::Engine::job_memory`]), and gives it back when the job ends: jobs on one
//! device together never reserve more than its budget, so two slots on one GPU take turns
//! with large images instead of running it out of memory. A job that needs more than the whole
//! budget could never run here, and fails at once with a message that says so.

use std::fmt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are counted in MiB: a semaphore's permits are a `u32` per acquisition.
const MIB: u64 = 1 << 20;

/// The memory jobs on one device may hold together, beyond the loaded weights.
pub struct MemoryBudget {
    device: String,
    total_mib: u32,
    free: std::sync::Arc<Semaphore>,
}

/// A job's reservation; the memory returns to the budget when it is dropped.
#[derive(Debug)]
pub struct Reservation {
    _permit: Option<OwnedSemaphorePermit>,
}

/// A job larger than the whole budget.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this image needs about {need} of memory on the worker's device, and jobs there may use \
     {budget} (workers.memory_budget_gib): a smaller image size fits"
)]
pub struct TooLarge {
    pub need: Gib,
    pub budget: Gib,
}

/// Bytes, shown in GiB with one decimal (in MiB under a GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gib(pub u64);

impl fmt::Display for Gib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 1 << 30 {
            write!(f, "{} MiB", self.0.div_ceil(MIB))
        } else {
            write!(f, "{:.1} GiB", self.0 as f64 / (1u64 << 30) as f64)
        }
    }
}

impl MemoryBudget {
    /// `bytes` for the jobs on `device` (named in logs), at most 4 PiB.
    pub fn new(device: impl Into<String>, bytes: u64) -> Self {
        let total_mib = (bytes / MIB).min(u32::MAX as u64) as u32;
        Self {
            device: device.into(),
            total_mib,
            free: std::sync::Arc::new(Semaphore::new(total_mib as usize)),
        }
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_mib as u64 * MIB
    }

    /// Whether a job of `bytes` could ever run within this budget.
    pub fn admits(&self, bytes: u64) -> Result<(), TooLarge> {
        if bytes.div_ceil(MIB) > self.total_mib as u64 {
            return Err(TooLarge {
                need: Gib(bytes),
                budget: Gib(self.total_bytes()),
            });
        }
        Ok(())
    }

    /// Waits until `bytes` are free, and holds them until the reservation is dropped;
    /// first come, first served (a large job is not passed by smaller ones for ever).
    pub async fn reserve(&self, bytes: u64) -> Result<Reservation, TooLarge> {
        self.admits(bytes)?;
        let mib = bytes.div_ceil(MIB) as u32;
        if mib == 0 {
            return Ok(Reservation { _permit: None });
        }
        let permit = self
            .free
            .clone()
            .acquire_many_owned(mib)
            .await
            .expect("the budget's semaphore is never closed");
        Ok(Reservation {
            _permit: Some(permit),
        })
    }

    /// Bytes not reserved now (for logs and tests).
    pub fn available_bytes(&self) -> u64 {
        self.free.available_permits() as u64 * MIB
    }
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBudget")
            .field("device", &self.device)
            .field("total", &Gib(self.total_bytes()))
            .field("available", &Gib(self.available_bytes()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const GIB: u64 = 1 << 30;

    #[tokio::test]
    async fn reservations_wait_for_memory_and_return_it_when_dropped() {
        let budget = MemoryBudget::new("cuda:0", 10 * GIB);
        let first = budget.reserve(6 * GIB).await.unwrap();
        assert_eq!(budget.available_bytes(), 4 * GIB);
        // 6 more do not fit beside the first job: the second waits.
        let second = budget.reserve(6 * GIB);
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut second)
                .await
                .is_err(),
            "a reservation past the budget did not wait"
        );
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("not granted when the first job's memory came back")
            .unwrap();
        assert_eq!(budget.available_bytes(), 4 * GIB);
        drop(second);
        assert_eq!(budget.available_bytes(), 10 * GIB);
    }

    #[tokio::test]
    async fn a_job_larger_than_the_whole_budget_is_refused_at_once() {
        let budget = MemoryBudget::new("cuda:1", 8 * GIB);
        let err = budget.reserve(9 * GIB).await.unwrap_err();
        assert_eq!(
            err,
            TooLarge {
                need: Gib(9 * GIB),
                budget: Gib(8 * GIB)
            }
        );
        assert!(
            err.to_string().contains("about 9.0 GiB")
                && err.to_string().contains("may use 8.0 GiB"),
            "{err}"
        );
        // Exactly the budget fits, and partial MiB round up.
        assert!(budget.admits(8 * GIB).is_ok());
        assert!(budget.admits(8 * GIB + 1).is_err());
        assert_eq!(
            budget.available_bytes(),
            8 * GIB,
            "a refusal reserves nothing"
        );
    }
}
