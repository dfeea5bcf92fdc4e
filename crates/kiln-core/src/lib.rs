//! kiln's domain: the values every other layer speaks, and the traits they are written against.
//!
//! # Layout
//! - [`ids`]: identifiers (request ids, key ids, worker ids, blob keys).
//! - [`catalog`]: the routes kiln serves (the hosted API's model ids) and what each takes.
//! - [`params`]: validated generation parameters, the only form in which a request reaches a worker.
//! - [`job`]: a job's record and life cycle (queued, running, succeeded, failed, cancelled).
//! - [`image_file`]: encoding an [`engine::RgbImage`] as JPEG or PNG.
//! - [`engine`]: the [`engine::Engine`] trait the FLUX engines implement and the worker drives.
//! - [`store`]: the [`store::JobStore`] and [`store::KeyStore`] traits (SQLite, PostgreSQL).
//! - [`report`]: [`report::Chain`], an error with its causes, for log lines.
//! - [`blob`]: the [`blob::BlobStore`] trait (local directory, S3-compatible).
//! - [`webhook`]: webhook URLs, deliveries (the outbox) and the per-key signing secret.
//!
//! Nothing here knows HTTP, SQL or tensors: the wire types live in `kiln-api`, the SQL in
//! `kiln-store`, the tensors in `kiln-engine`.

pub mod blob;
pub mod catalog;
pub mod engine;
pub mod ids;
pub mod image_file;
pub mod job;
pub mod params;
pub mod report;
pub mod store;
pub mod webhook;

pub use time::OffsetDateTime;
