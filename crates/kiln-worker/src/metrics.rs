//! The worker's Prometheus series, registered once in the default registry (which `/metrics`
//! exports in the same process).

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter_vec, Histogram, HistogramVec,
    IntCounterVec,
};
use std::sync::LazyLock;

/// Outcomes: `succeeded`, `failed`, `cancelled` (a forced cancel honoured), `released`
/// (shutdown), `lease_lost`, and `*_failed` when the store refused the ending's write.
pub(crate) static JOBS_FINISHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "kiln_jobs_finished_total",
        "Jobs a worker ended, by model and outcome",
        &["model", "outcome"]
    )
    .expect("registered once")
});

pub(crate) static JOB_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "kiln_job_duration_seconds",
        "Time from claim to the end of a job, by model",
        &["model"],
        vec![0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0]
    )
    .expect("registered once")
});

pub(crate) static STEP_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "kiln_step_duration_seconds",
        "Time of one denoising step, by model",
        &["model"],
        vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]
    )
    .expect("registered once")
});

/// What previews cost the job's task, so an operator can see it stays small beside a step.
pub(crate) static PREVIEW_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "kiln_preview_store_seconds",
        "Time to scale, encode and store one preview of a running job",
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]
    )
    .expect("registered once")
});

/// Registers every series now, so that `/metrics` lists them (at zero) before the first job.
pub(crate) fn register() {
    LazyLock::force(&JOBS_FINISHED);
    LazyLock::force(&JOB_SECONDS);
    LazyLock::force(&STEP_SECONDS);
    LazyLock::force(&PREVIEW_SECONDS);
}
