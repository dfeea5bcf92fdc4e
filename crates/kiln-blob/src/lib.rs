//! kiln's blob stores: where result images are kept.
//!
//! # Layout
//! - [`local`]: [`LocalBlobStore`], files under a directory on one machine.
//!
//! The trait they implement, [`kiln_core::blob::BlobStore`], is defined in `kiln-core`.

pub mod local;

pub use local::LocalBlobStore;
