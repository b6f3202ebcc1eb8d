//! The committer's writer: one connection that writes whole batches under a
//! deadline, and that finds out what became of a batch whose answer was lost.
//!
//! A write ends in one of three ways:
//! - the database answered: each request's outcome (`WrittenBatch`);
//! - it certainly did not commit (`WriteFailure::NotCommitted`): the database
//!   refused the statement, or the batch never left (no connection);
//! - it may have committed (`WriteFailure::Unknown`): the connection broke or
//!   stalled after the batch was sent. The connection is dropped, and
//!   `resolve` looks for the batch's events and keys on a fresh one, after
//!   making sure the old session can no longer commit anything.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::postgres::PgWriter;
use super::sqlite::SqliteWriter;
use super::{AppendRequest, Position, RecordedEvent, StoreError, WrittenBatch};

/// Limits of the writer, passed explicitly (no library defaults).
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    /// A batch not answered within this is abandoned and resolved.
    pub batch_deadline: Duration,
    /// Opening a connection.
    pub connect_timeout: Duration,
    /// Server-side limits of the writer's session (PostgreSQL): below the
    /// batch deadline, so the server usually gives up first and says so.
    pub statement_timeout: Duration,
    pub lock_timeout: Duration,
    /// Finding out a lost batch's outcome, from connecting to the answer.
    pub resolve_deadline: Duration,
    /// First and longest pause between failed connection attempts.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Commands waiting with no answer from the database for this long
    /// make `/ready` answer 503.
    pub stall_after: Duration,
    /// Synchronous standbys a commit must wait for (PostgreSQL): a primary
    /// configured or connected with fewer is not written (0: no check).
    pub require_sync_standbys: u32,
    /// Resolution commits a fence the quorum must acknowledge before a lost
    /// batch counts as committed. Off only to show what goes wrong without
    /// it (tests/failover.rs).
    pub fence: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        Self {
            batch_deadline: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            statement_timeout: Duration::from_secs(4),
            lock_timeout: Duration::from_secs(3),
            // Connect, end the lost session (up to 2 s), wait for the lock.
            resolve_deadline: Duration::from_secs(8),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            // Above one slow batch that still succeeds (statement timeout).
            stall_after: Duration::from_secs(5),
            require_sync_standbys: 0,
            fence: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteFailure {
    /// Nothing of the batch was committed.
    #[error("batch not committed: {0}")]
    NotCommitted(StoreError),
    /// The batch was sent and its answer lost: it may have committed.
    #[error("batch outcome unknown: {0}")]
    Unknown(StoreError),
}

/// What a lost batch turned out to have done, for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution {
    /// Its events are in the log (as recorded there).
    Committed(Vec<RecordedEvent>),
    /// Its idempotency key is recorded: the stored answer is the truth.
    Duplicate,
    /// Nothing of it is in the log.
    NotCommitted,
}

/// The writer of one backend.
pub enum BatchWriter {
    Postgres(Box<PgWriter>),
    Sqlite(SqliteWriter),
}

/// A row found while resolving: position, chain link, time.
pub(crate) type FoundEvent = (Position, String, DateTime<Utc>);

/// What the log holds of a lost batch.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub events: HashMap<Uuid, FoundEvent>,
    pub keys: HashSet<(String, String)>,
}

impl BatchWriter {
    /// Writes and commits `requests` in one transaction, each checked on its
    /// own, in order.
    pub async fn write(&mut self, requests: &[AppendRequest]) -> Result<WrittenBatch, WriteFailure> {
        match self {
            BatchWriter::Postgres(w) => w.write(requests).await,
            BatchWriter::Sqlite(w) => w.write(requests).await,
        }
    }

    /// After `WriteFailure::Unknown`: what each request of that batch did.
    /// An error means the outcome is still unknown.
    pub async fn resolve(&mut self, requests: Vec<AppendRequest>) -> Result<Vec<Resolution>, StoreError> {
        let ids: Vec<Uuid> = requests
            .iter()
            .flat_map(|r| r.streams.iter().flat_map(|s| s.events.iter().map(|e| e.event_id)))
            .collect();
        let keys: Vec<(String, String)> = requests
            .iter()
            .flat_map(|r| &r.idempotency)
            .map(|k| (k.wallet.to_string(), k.key.clone()))
            .collect();
        let found = match self {
            BatchWriter::Postgres(w) => w.find(&ids, &keys).await?,
            BatchWriter::Sqlite(w) => w.find(&ids, &keys).await?,
        };
        Ok(requests.into_iter().map(|r| resolution(r, &found)).collect())
    }
}

/// One request's fate from what the log holds. A batch is one transaction,
/// so a request's events are all there or none is.
fn resolution(request: AppendRequest, found: &Found) -> Resolution {
    let rows: Option<Vec<&FoundEvent>> = request
        .streams
        .iter()
        .flat_map(|s| &s.events)
        .map(|e| found.events.get(&e.event_id))
        .collect();
    if let Some(rows) = rows.filter(|r| !r.is_empty()) {
        let positions: Vec<Position> = rows.iter().map(|r| r.0).collect();
        let hashes: Vec<String> = rows.iter().map(|r| r.1.clone()).collect();
        let at = rows[0].2;
        return Resolution::Committed(super::recorded(request, &positions, hashes, at));
    }
    // A request whose key is recorded did not append (its keys and events
    // commit together): one of its keys was another request's.
    let recorded = |k: &super::IdempotencyRecord| found.keys.contains(&(k.wallet.to_string(), k.key.clone()));
    match request.idempotency.iter().any(recorded) {
        true => Resolution::Duplicate,
        false => Resolution::NotCommitted,
    }
}

/// Growing, jittered pauses between failed connection attempts.
#[derive(Debug)]
pub(crate) struct Reconnect {
    pauses: crate::backoff::Backoff,
    not_before: Option<tokio::time::Instant>,
}

impl Reconnect {
    pub fn new(options: &WriterOptions) -> Self {
        Self {
            pauses: crate::backoff::Backoff::between(options.reconnect_min, options.reconnect_max),
            not_before: None,
        }
    }

    /// Whether an attempt may be made now.
    pub fn due(&self) -> bool {
        self.not_before.is_none_or(|t| tokio::time::Instant::now() >= t)
    }

    pub fn failed(&mut self) {
        self.not_before = Some(tokio::time::Instant::now() + self.pauses.next_pause());
    }

    pub fn succeeded(&mut self) {
        self.pauses.reset();
        self.not_before = None;
    }
}
