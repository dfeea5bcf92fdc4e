//! kiln's queue and record store.
//!
//! # Layout
//! - [`sqlite`]: [`SqliteStore`], the embedded store of a one-machine install (WAL, one file).
//! - `group_commit`: concurrent submits committed in one transaction (one sync for the group).
//! - `reader`: read-only connections used inline for the hot read (a status poll's job view).
//! - `record`: the row form of a job shared by the SQL backends, and its conversion to the domain.
//!
//! Both traits it implements ([`kiln_core::store::JobStore`], [`kiln_core::store::KeyStore`]) are
//! defined in `kiln-core`; callers hold them as trait objects and never see SQL.

mod group_commit;
mod reader;
mod record;
pub mod sqlite;

pub use sqlite::SqliteStore;
