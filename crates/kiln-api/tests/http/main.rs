//! The API through real HTTP: the router on a loopback port, a fresh SQLite store and blob
//! directory per test, and a reqwest client.

mod harness;

mod conformance;
mod connections;
mod files;
mod listing;
mod live;
mod metrics_exposure;
mod ops;
mod playground;
mod request_ids;
mod requests;
mod submit;
mod webhooks;
