//! kiln's queue and record store.
//!
//! # Layout
//! - [`sqlite`]: [`SqliteStore`], the embedded store of a one-machine install (WAL, one file).
//!   Its events are those of this process's writes.
//! - `group_commit`: concurrent SQLite submits committed in one transaction (one sync for the
//!   group).
//! - `reader`: read-only SQLite connections used inline for the hot read (a status poll's job
//!   view).
//! - [`postgres`]: [`PgStore`], the shared store of a many-machine install: the server's clock
//!   for leases, an advisory lock serialising submits, `FOR UPDATE SKIP LOCKED` claims, job
//!   events by `LISTEN`/`NOTIFY` from every node. `postgres/enqueue.rs` is a submit,
//!   `postgres/events.rs` the listening connection, `postgres/keys.rs` the API keys.
//! - `record`: the row forms of jobs and API keys shared by the SQL backends (one schema shape),
//!   and their conversion to the domain.
//! - `common`: what both backends say alike: statement fragments, the `worker_lost` error,
//!   counts per state, the events' broadcast channel.
//!
//! Live requests: a running job carries its latest preview and a forced cancel's request (a
//! released or abandoned job with one pending ends `cancelled`, never runs again). Every terminal
//! transition of a job that named a webhook writes its row of the webhook outbox
//! (`webhook_deliveries`) in the same transaction; dispatchers claim due rows with a claim token
//! that fences their attempts, as leases fence workers.
//!
//! Migrations: `migrations/sqlite` and `migrations/postgres`, embedded in the binary and run on
//! open/connect.
//!
//! Both traits it implements ([`kiln_core::store::JobStore`], [`kiln_core::store::KeyStore`]) are
//! defined in `kiln-core`; callers hold them as trait objects and never see SQL.

mod common;
mod group_commit;
pub mod postgres;
mod reader;
mod record;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
