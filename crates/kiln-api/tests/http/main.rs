//! The API through real HTTP: the router on a loopback port, a fresh SQLite store and blob
//! directory per test, and a reqwest client.

mod harness;

mod conformance;
mod files;
mod ops;
mod requests;
mod submit;
