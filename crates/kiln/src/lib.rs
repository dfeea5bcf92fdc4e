//! The `kiln` binary's library: configuration, wiring, and the commands.
//!
//! # Layout
//! - [`allocator`]: the allocator tuning `main` applies before anything else.
//! - [`config`]: [`config::Settings`], the one typed configuration (defaults, TOML, `KILN_…`, flags).
//! - [`app`]: [`app::Application`]: opens the stores, binds the listener, runs the HTTP API, the
//!   in-process worker pool and the maintenance sweeper until its shutdown token fires.
//! - [`store_url`]: the setting `store.url` (SQLite file or PostgreSQL), parsed.
//! - [`engines`]: loads the engines the configuration names, once per device the worker slots
//!   run on, into [`kiln_worker::Slot`]s with each device's memory budget.
//! - [`demo`]: the demo checkpoint embedded in the binary, written into the data directory.
//! - [`commands`]: `serve`, `worker`, `keys`, `generate`, `config`.
//! - [`telemetry`]: structured logs.
//! - [`worker_metrics`]: the optional `/metrics` listener of `kiln worker`.
//!
//! `main.rs` only parses the command line, hands in the shutdown signal, and calls a command.

pub mod allocator;
pub mod app;
pub mod commands;
pub mod config;
pub mod demo;
pub mod engines;
pub mod store_url;
pub mod telemetry;
pub mod worker_metrics;
