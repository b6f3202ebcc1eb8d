//! Event-sourced wallet service.
//!
//! Layout, from the inside out:
//! - [`aggregate`]: the pure wallet domain (`decide`, `evolve`, money, ids).
//! - [`store`]: the append-only event log on PostgreSQL or SQLite.
//! - [`ledger`]: the command path: request tasks hand commands to the one
//!   committer, which decides them in order against [`cache`] (its state),
//!   appends each batch and answers with the truth.
//! - [`feed`]: the log for consumers: the public event shape, the live tail.
//! - [`broker`]: the RabbitMQ relay, worker and dead-letter queue.
//! - [`snapshots`]: folded states stored every N events; loading = snapshot + tail.
//! - [`projections`]: read models (history, stats, flags, holds) built from the log.
//! - [`expiry`]: the sweeper that expires holds whose time has passed.
//! - [`replay`] and [`verify`]: time travel and whole-log checks (read-only).
//! - [`retention`]: pruning the audit trail and old idempotency keys.
//! - [`api`]: the HTTP API; [`cli`]: the binary's subcommands; [`load`] and
//!   [`seed`]: the load generator and synthetic history for benchmarks.

pub mod aggregate;
pub mod api;
pub mod audit;
mod backoff;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod expiry;
pub mod feed;
pub mod freshness;
pub mod ledger;
pub mod load;
pub mod probe;
pub mod projections;
pub mod replay;
pub mod retention;
pub mod seed;
pub mod snapshots;
pub mod store;
pub mod verify;
