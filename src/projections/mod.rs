//! Projections: read models built from the ordered log, rebuildable at any time.
//!
//! A projection is a pure description of how one event changes its read
//! model ([`Projection::apply`]); it never does I/O. Every read model is a set
//! of documents in one table of its own (`rm_<name>`, see `storage.rs`), so
//! the runner, the checkpointing and the rebuild/swap are written once:
//! - `runner.rs` feeds events in log order and stores each projection's
//!   checkpoint in the same transaction as its documents (exactly once),
//!   and rebuilds a projection beside the live one, then swaps atomically.
//! - `delivery.rs` applies events delivered by the broker worker, parking a
//!   wallet's events behind one that failed.
//! - `history.rs`, `stats.rs`, `flags.rs`, `holds.rs` are the read models.

mod delivery;
pub mod flags;
pub mod history;
pub mod holds;
mod runner;
pub mod stats;
mod storage;

use std::collections::{BTreeSet, HashMap};

use crate::store::{Position, RecordedEvent, StoreError};

pub use delivery::{merge_in_order, Delivery, Incoming};
pub use flags::FraudRules;
pub use runner::{ProjectionError, ProjectionStatus, Projections, RebuildProgress, StepFault};
pub use storage::{Doc, DocQuery};

/// What one projection does with one event.
pub trait Projection: Send + Sync {
    /// Stable name: checkpoint name, table suffix, CLI argument.
    fn name(&self) -> &'static str;
    /// Keys of the documents `apply` needs to see for this event.
    fn reads(&self, event: &RecordedEvent) -> Vec<String>;
    /// Pure: applies `event` to the documents in `batch`.
    fn apply(&self, event: &RecordedEvent, batch: &mut Batch);
}

/// The documents a batch of events reads and writes, in memory.
#[derive(Debug, Default)]
pub struct Batch {
    docs: HashMap<String, Doc>,
    dirty: BTreeSet<String>,
}

impl Batch {
    pub fn new(loaded: Vec<Doc>) -> Self {
        Self {
            docs: loaded.into_iter().map(|d| (d.key.clone(), d)).collect(),
            dirty: BTreeSet::new(),
        }
    }

    pub fn get(&self, key: &str) -> Option<&Doc> {
        self.docs.get(key)
    }

    pub fn put(&mut self, doc: Doc) {
        self.dirty.insert(doc.key.clone());
        self.docs.insert(doc.key.clone(), doc);
    }

    /// The documents changed by this batch, in key order.
    pub fn into_changes(mut self) -> Vec<Doc> {
        let dirty = std::mem::take(&mut self.dirty);
        dirty.into_iter().filter_map(|k| self.docs.remove(&k)).collect()
    }
}

/// The checkpoint of a log reader that is not a projection (the relay).
pub async fn load_checkpoint(store: &crate::store::EventStore, name: &str) -> Result<Position, StoreError> {
    Ok(storage::checkpoint(store, name).await?.unwrap_or(0))
}

/// Moves such a checkpoint forward (never back: a relay that lost its
/// leadership may still save a stale position).
pub async fn advance_checkpoint(
    store: &crate::store::EventStore,
    name: &str,
    position: Position,
) -> Result<(), StoreError> {
    let mut tx = storage::Tx::begin(store).await?;
    let at = tx.checkpoint(name).await?.unwrap_or(0);
    if position > at {
        tx.set_checkpoint(name, position).await?;
    }
    tx.commit().await
}
