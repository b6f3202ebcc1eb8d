//! Event-sourced wallet service.
//!
//! Layout, from the inside out:
//! - [`aggregate`]: the pure wallet domain (`decide`, `evolve`, money, ids).
//! - [`store`]: the append-only event log on PostgreSQL or SQLite.
//! - [`ledger`]: the command path (idempotency, load, decide, append, retry).
//! - [`projections`]: read models (history, stats, flags) built from the log.
//! - [`api`]: the HTTP API; [`cli`]: the binary's subcommands; [`seed`]:
//!   synthetic history for benchmarks.

pub mod aggregate;
pub mod api;
pub mod cli;
pub mod config;
pub mod ledger;
pub mod load;
pub mod projections;
pub mod replay;
pub mod seed;
pub mod snapshots;
pub mod store;
pub mod verify;
