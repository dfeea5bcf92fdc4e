//! The store conformance suite: every behaviour of [`JobStore`] and [`KeyStore`] written once,
//! generic over the backend ([`harness::Backend`]), and run against each backend.
//!
//! # Layout
//! - `harness`: the backends (a fresh store per test, more handles on one database) and builders.
//! - `queue`: submit, get, cancel, queue positions, queue limits, state counts.
//! - `leases`: claims (order, routes), heartbeats, complete, fail, release, fencing of a stale
//!   lease holder, the attempt limit and `fail_abandoned`.
//! - `listing`: one owner's jobs newest first, paged by cursor (`list_jobs`).
//! - `retention`: expiry from the end of a job, purge and the files it reports, `blob_is_live`.
//! - `idempotency`: replay, conflict, scope and window of idempotency keys.
//! - `live`: previews recorded by heartbeats (and which preview is live), forced cancels of
//!   running jobs (`end_cancelled`, a worker that died with one pending).
//! - `webhooks`: the webhook outbox: one delivery per ended job with a webhook, claims, attempts,
//!   the record a result shows, purge.
//! - `keys`: the API key store.
//! - `events`: what `subscribe` hands out as a job changes.
//! - `races`: many workers and submitters at once, each with its own handle on the database.
//!
//! `conformance!` expands each case into one `#[tokio::test]` per backend, in a module named
//! after the backend: `sqlite::<case>`, `postgres::<case>` (filter with `sqlite::` or
//! `postgres::`). A backend that is not available skips its tests with a `SKIPPED:` line,
//! except under CI (see `kiln_testkit::postgres`).
//!
//! SQLite-only behaviour (durability across reopening the file, group commit's batches) is in
//! `tests/sqlite_only.rs`.
//!
//! [`JobStore`]: kiln_core::store::JobStore
//! [`KeyStore`]: kiln_core::store::KeyStore

mod events;
mod harness;
mod idempotency;
mod keys;
mod leases;
mod listing;
mod live;
mod queue;
mod races;
mod retention;
mod webhooks;

/// One module of tests per backend: `backend_tests!(module, BackendType, [case module::case, …])`.
macro_rules! backend_tests {
    ($name:ident, $backend:ty, [$($module:ident :: $case:ident),* $(,)?]) => {
        mod $name {
            $(
                // Several threads: the races need them, and the others lose nothing.
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    if let Some(backend) =
                        <$backend as crate::harness::Backend>::open().await
                    {
                        crate::$module::$case(backend).await;
                    }
                }
            )*
        }
    };
}

/// Every case, for every backend.
macro_rules! conformance {
    ($($module:ident :: $case:ident),* $(,)?) => {
        backend_tests!(sqlite, crate::harness::Sqlite, [$($module::$case),*]);
        backend_tests!(postgres, crate::harness::Postgres, [$($module::$case),*]);
    };
}

conformance! {
    events::every_change_of_a_job_is_an_event_in_order,
    events::a_released_or_failed_job_is_announced,
    queue::a_submitted_job_reads_back_as_submitted,
    queue::a_job_stored_before_route_options_reads_back,
    queue::queue_positions_follow_submission_order,
    queue::another_owner_sees_nothing,
    queue::the_queue_limit_counts_waiting_jobs,
    queue::one_key_may_not_fill_the_shared_queue,
    queue::cancel_in_each_state,
    queue::state_counts_count_every_state,
    leases::claims_take_the_oldest_job_of_the_routes_asked_for,
    leases::a_heartbeat_extends_the_lease_and_records_progress,
    leases::complete_ends_the_job_with_its_output_once,
    leases::fail_ends_the_job_with_its_error_once,
    leases::release_puts_the_job_back_first_in_line_without_spending_an_attempt,
    leases::a_stale_lease_holder_is_fenced_off,
    leases::a_job_that_keeps_killing_workers_is_failed,
    retention::purge_removes_expired_records_and_reports_their_files,
    listing::jobs_are_listed_newest_first_and_pages_reach_each_once,
    listing::a_listed_job_reads_as_get_reads_it,
    listing::another_owners_jobs_are_never_listed,
    listing::later_submits_never_shift_older_pages,
    listing::expired_jobs_are_not_listed,
    live::a_heartbeat_records_the_latest_preview_and_only_it_stays_live,
    live::a_new_claim_keeps_the_last_attempts_preview_until_replaced,
    live::a_forced_cancel_stops_a_running_job,
    live::a_stale_lease_cannot_end_a_job_cancelled,
    live::a_forced_cancel_whose_worker_died_is_cancelled_not_taken_again,
    live::previews_and_forced_cancels_are_events,
    live::a_released_job_with_a_forced_cancel_pending_ends_cancelled,
    webhooks::every_end_of_a_job_with_a_webhook_writes_one_delivery,
    webhooks::a_due_delivery_goes_to_one_claimer_at_a_time,
    webhooks::attempts_are_recorded_in_order_and_decide_what_follows,
    webhooks::purge_removes_the_deliveries_of_purged_jobs,
    idempotency::a_repeated_key_replays_the_original_and_another_body_conflicts,
    idempotency::a_key_past_its_window_is_forgotten,
    keys::keys_are_created_listed_found_by_hash_and_revoked,
    races::eight_workers_complete_every_job_exactly_once,
    races::concurrent_submits_never_pass_the_queue_limit,
    races::the_per_key_limit_is_exact_under_concurrent_submits,
    races::concurrent_submits_each_get_their_own_place_in_line,
    races::one_idempotency_key_submitted_concurrently_makes_one_job,
}
