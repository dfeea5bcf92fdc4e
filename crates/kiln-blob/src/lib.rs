//! kiln's blob stores: where result images are kept.
//!
//! # Layout
//! - [`local`]: [`LocalBlobStore`], files under a directory on one machine.
//! - [`s3`]: [`S3BlobStore`], objects in an S3-compatible bucket shared by many machines.
//! - [`location`]: [`BlobLocation`], the setting `blobs.url` parsed (`file:///DIR` or
//!   `s3://BUCKET[/PREFIX]`), and [`open`], the store it names.
//! - `content_type`: the content type a key's extension stands for, which both stores check
//!   on write and fall back to on read.
//!
//! The trait they implement, [`kiln_core::blob::BlobStore`], is defined in `kiln-core`, with
//! [`S3Settings`] (so test helpers can describe a bucket without depending on this crate).

mod content_type;
pub mod local;
pub mod location;
pub mod s3;

pub use kiln_core::blob::S3Settings;
pub use local::LocalBlobStore;
pub use location::{open, BlobLocation, InvalidBlobLocation};
pub use s3::S3BlobStore;
