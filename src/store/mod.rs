//! The event store: append to streams with optimistic version checks, read
//! them back by stream or by global position.
//!
//! One `events` table, two backends with the same behaviour: PostgreSQL
//! (`postgres.rs`) and the embedded SQLite default (`sqlite.rs`). The
//! idempotency table lives here too because an idempotency record must commit
//! in the same transaction as the events it answers for.
//!
//! Ordering guarantee: appends are serialised at commit (an advisory lock in
//! PostgreSQL, the single writer in SQLite), so positions become visible in
//! order and a reader of `read_all` never skips an event that commits late
//! with a lower position. See DESIGN.md, "The late-commit problem".

pub mod chain;
pub mod cluster;
mod leader;
mod postgres;
mod sqlite;
pub mod standby;
mod writer;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::aggregate::{Balance, EventDecodeError, Wallet, WalletEvent, WalletId};

pub use leader::LeaderLock;
pub use postgres::PgEventStore;
pub use sqlite::SqliteEventStore;
pub use writer::{BatchWriter, Resolution, WriteFailure, WriterOptions};

/// A log position: the global order of committed events, starting at 1.
pub type Position = i64;

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event: WalletEvent,
    pub metadata: Value,
}

/// A stream's head as its newest event records it: what an append states
/// it expects, and what a conflict answers with. It guards the decision
/// (a state made stale by another writer has another head) but is not the
/// whole state (holds and limits are not in it): after a conflict the
/// wallet is loaded again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub version: u64,
    pub balance: Balance,
}

impl Head {
    /// An empty stream: the wallet does not exist yet.
    pub const EMPTY: Head = Head {
        version: 0,
        balance: Balance::ZERO,
    };

    pub fn of(wallet: &Wallet) -> Head {
        Head {
            version: wallet.version,
            balance: wallet.balance,
        }
    }
}

/// New events for one stream and the head the stream must be at. With no
/// events it only asserts the head (a remembered rejection does).
#[derive(Debug, Clone)]
pub struct StreamAppend {
    pub stream: WalletId,
    pub expected: Head,
    pub events: Vec<NewEvent>,
    /// Decided on the state an earlier request of the same batch left: then
    /// the stream must have been moved by this batch, or that state never
    /// came to be (the head alone cannot always tell).
    pub on_batch: bool,
}

/// An idempotency record committed with (or instead of) an append.
#[derive(Debug, Clone)]
pub struct IdempotencyRecord {
    pub wallet: WalletId,
    pub key: String,
    /// Operation and payload, canonicalised: a different one is a reused key.
    pub fingerprint: String,
    pub outcome: Value,
}

/// One atomic append across any number of streams.
#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    pub streams: Vec<StreamAppend>,
    /// The keys it records: its own, then (an atomic batch) its
    /// operations'. If any is recorded already, the request is a duplicate
    /// and appends nothing. Distinct within the request.
    pub idempotency: Vec<IdempotencyRecord>,
}

/// A remembered outcome, as found by `find_idempotency`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredOutcome {
    pub fingerprint: String,
    pub outcome: Value,
    pub position: Option<Position>,
}

/// An event as committed to the log.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub position: Position,
    pub stream: WalletId,
    pub version: u64,
    pub event_id: Uuid,
    pub schema_version: i32,
    pub event: WalletEvent,
    pub metadata: Value,
    pub recorded_at: DateTime<Utc>,
    /// Link in the stream's hash chain (`chain.rs`); empty for rows written
    /// before the chain existed.
    pub hash: String,
}

/// Which events a reader of the log wants (empty: all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogFilter {
    pub wallet: Option<WalletId>,
    /// Event types; any of them.
    pub types: Vec<String>,
}

/// Where a time-travel read stops (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cutoff {
    Position(Position),
    Time(DateTime<Utc>),
    /// A version of the stream being read.
    Version(u64),
}

impl Cutoff {
    /// Reads a point of the log given as a position (an integer >= 0) or an
    /// RFC 3339 time.
    pub fn parse_point(text: &str) -> Option<Cutoff> {
        match text.parse::<Position>() {
            Ok(p) if p >= 0 => Some(Cutoff::Position(p)),
            Ok(_) => None,
            Err(_) => DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|t| Cutoff::Time(t.with_timezone(&Utc))),
        }
    }
}

/// A stored snapshot: a wallet's encoded state at `version` (log `position`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub stream: WalletId,
    pub version: u64,
    pub position: Position,
    pub schema_version: i32,
    pub state: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The cause is in the message and not also a `source`: an error chain
    // (`{:#}`, anyhow) would print it twice.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("undecodable event at position {position}: {source}")]
    Corrupt {
        position: Position,
        #[source]
        source: EventDecodeError,
    },
    #[error("invalid database url: {0}")]
    BadUrl(String),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The batch this append was part of failed as a whole.
    #[error("append batch failed: {0}")]
    BatchFailed(String),
    /// The database is set up in a way the service cannot be correct on.
    #[error("{0}")]
    Misconfigured(String),
    /// None of a cluster's hosts is a primary (each host's state).
    #[error("no primary among the database hosts: {0}")]
    NoPrimary(String),
    /// The primary commits without the synchronous standbys required: a
    /// commit could be acknowledged and then lost with it.
    #[error("the primary runs without its quorum: {0}")]
    QuorumMissing(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => StoreError::Unavailable(e),
            other => StoreError::Database(other),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// A stream was not at its expected head: someone else appended first.
    #[error("stream {stream} is at {actual:?}, expected {expected:?}")]
    Conflict {
        stream: WalletId,
        expected: Head,
        actual: Head,
    },
    /// The idempotency key was taken by a request that committed first.
    #[error("idempotency key already recorded")]
    DuplicateRequest,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an append of a batch came to, for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum AppendOutcome {
    Appended(Vec<RecordedEvent>),
    /// A stream was not at its expected head; the actual heads of all the
    /// request's streams, as the batch's earlier requests left them.
    Conflict(Vec<(WalletId, Head)>),
    /// Its idempotency key was already recorded (this wins over a conflict).
    Duplicate,
}

/// The store, on whichever backend the database URL selected.
#[derive(Debug, Clone)]
pub enum EventStore {
    Postgres(PgEventStore),
    Sqlite(SqliteEventStore),
}

/// An append whose transaction is still open. Committing makes it visible;
/// dropping it rolls back. Tests use it to hold a transaction open.
pub enum PendingAppend {
    Postgres(postgres::PendingAppend),
    Sqlite(sqlite::PendingAppend),
}

impl PendingAppend {
    pub async fn commit(self) -> Result<Vec<RecordedEvent>, AppendError> {
        match self {
            PendingAppend::Postgres(p) => p.commit().await,
            PendingAppend::Sqlite(p) => p.commit().await,
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $call:expr) => {
        match $self {
            EventStore::Postgres($s) => $call,
            EventStore::Sqlite($s) => $call,
        }
    };
}

impl EventStore {
    /// Connects to `postgres://...` or `sqlite://...` (created if missing).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(EventStore::Postgres(PgEventStore::connect(url).await?))
        } else if url.starts_with("sqlite:") {
            Ok(EventStore::Sqlite(SqliteEventStore::connect(url).await?))
        } else {
            Err(StoreError::BadUrl("expected postgres://... or sqlite://...".to_owned()))
        }
    }

    /// A PostgreSQL host list: the primary can move (fail over).
    pub fn is_host_list(&self) -> bool {
        match self {
            EventStore::Postgres(pg) => !pg.cluster().is_single(),
            EventStore::Sqlite(_) => false,
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            EventStore::Postgres(_) => "postgres",
            EventStore::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the embedded migrations of this backend.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.migrate().await)
    }

    /// Appends one request atomically: every stream must be at its
    /// expected head, the idempotency key (if any) must be new, or nothing
    /// is written. Its own transaction; the ledger's committer writes
    /// batches through a `BatchWriter` instead.
    pub async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, AppendError> {
        let requests = vec![request];
        let written = match self {
            EventStore::Postgres(s) => s.append_batch(&requests).await?,
            EventStore::Sqlite(s) => s.append_batch(&requests).await?,
        };
        written.single(requests)
    }

    /// Appends several requests in one transaction, each checked on its own
    /// (against the heads the earlier ones leave), in order.
    pub async fn append_batch(&self, requests: Vec<AppendRequest>) -> Result<Vec<AppendOutcome>, StoreError> {
        let written = match self {
            EventStore::Postgres(s) => s.append_batch(&requests).await?,
            EventStore::Sqlite(s) => s.append_batch(&requests).await?,
        };
        Ok(written.finish(requests))
    }

    /// The one writer of the ledger's committer: its own connection with
    /// deadlines (see `writer.rs`).
    pub fn batch_writer(&self, options: WriterOptions) -> BatchWriter {
        match self {
            EventStore::Postgres(s) => BatchWriter::Postgres(Box::new(s.batch_writer(options))),
            EventStore::Sqlite(s) => BatchWriter::Sqlite(s.batch_writer(options)),
        }
    }

    /// Does all of an append but the commit.
    pub async fn begin_append(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        match self {
            EventStore::Postgres(s) => s.begin_append(request).await.map(PendingAppend::Postgres),
            EventStore::Sqlite(s) => s.begin_append(request).await.map(PendingAppend::Sqlite),
        }
    }

    /// Events of one stream with version > `after_version`, oldest first,
    /// up to `cutoff` if given.
    pub async fn read_stream(
        &self,
        stream: &WalletId,
        after_version: u64,
        cutoff: Option<Cutoff>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        dispatch!(self, s => s.read_stream(stream, after_version, cutoff).await)
    }

    /// The event that placed `hold` on `stream`, if it was ever placed (one
    /// scan of the stream: only asked about holds a wallet no longer holds).
    pub async fn find_hold_placed(&self, stream: &WalletId, hold: Uuid) -> Result<Option<RecordedEvent>, StoreError> {
        dispatch!(self, s => s.find_hold_placed(stream, hold).await)
    }

    /// Newest first: up to `limit` events with version < `before_version`.
    pub async fn read_stream_backwards(
        &self,
        stream: &WalletId,
        before_version: Option<u64>,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        dispatch!(self, s => s.read_stream_backwards(stream, before_version, limit).await)
    }

    /// The current version of each of `streams` that has events (streams
    /// without events are left out), in one statement.
    pub async fn stream_versions(&self, streams: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        if streams.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self, s => s.stream_versions(streams).await)
    }

    /// The log in position order: up to `limit` events after `after`.
    pub async fn read_all(&self, after: Position, limit: u32) -> Result<Vec<RecordedEvent>, StoreError> {
        dispatch!(self, s => s.read_all(after, limit).await)
    }

    /// The log in position order, only what passes `filter`: up to `limit`
    /// events after `after`. A wallet's filter reads its stream's index.
    pub async fn read_log(
        &self,
        after: Position,
        limit: u32,
        filter: &LogFilter,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        if filter == &LogFilter::default() {
            return self.read_all(after, limit).await;
        }
        dispatch!(self, s => s.read_log(after, limit, filter).await)
    }

    /// One stream in version order: up to `limit` events with version > `after_version`.
    pub async fn read_stream_page(
        &self,
        stream: &WalletId,
        after_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        dispatch!(self, s => s.read_stream_page(stream, after_version, limit).await)
    }

    /// The highest committed position, 0 for an empty log.
    pub async fn head_position(&self) -> Result<Position, StoreError> {
        dispatch!(self, s => s.head_position().await)
    }

    pub async fn find_idempotency(&self, wallet: &WalletId, key: &str) -> Result<Option<StoredOutcome>, StoreError> {
        dispatch!(self, s => s.find_idempotency(wallet, key).await)
    }

    pub async fn save_snapshot(&self, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.save_snapshot(snapshot).await)
    }

    /// The newest snapshot of `stream` in `schema_version` or older that lies within `cutoff`.
    pub async fn latest_snapshot(
        &self,
        stream: &WalletId,
        schema_version: i32,
        cutoff: Option<Cutoff>,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        dispatch!(self, s => s.latest_snapshot(stream, schema_version, cutoff).await)
    }

    /// Every snapshot (for `verify`), in (stream, version) order.
    pub async fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        dispatch!(self, s => s.all_snapshots().await)
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping().await)
    }

    /// Whether writes are durable on the quorum required (PostgreSQL with
    /// `required` > 0; SQLite has no standbys to wait for).
    pub async fn check_quorum(&self, required: u32) -> Result<(), StoreError> {
        match self {
            EventStore::Postgres(s) if required > 0 => s.check_quorum(required).await,
            _ => Ok(()),
        }
    }
}

/// The first stream whose actual head differs from the expected one.
fn first_difference(expected: &[(WalletId, Head)], actual: &[(WalletId, Head)]) -> AppendError {
    let (stream, expected, actual) = expected
        .iter()
        .zip(actual)
        .map(|((stream, e), (_, a))| (stream.clone(), *e, *a))
        .find(|(_, e, a)| e != a)
        .or_else(|| {
            let ((stream, e), (_, a)) = expected.iter().zip(actual).next()?;
            Some((stream.clone(), *e, *a))
        })
        .unwrap_or((WalletId::parse("-").expect("a valid id"), Head::EMPTY, Head::EMPTY));
    AppendError::Conflict {
        stream,
        expected,
        actual,
    }
}

/// What a batch decided for one of its requests.
#[derive(Debug)]
enum Plan {
    Duplicate,
    Conflict(Vec<(WalletId, Head)>),
    /// Its rows are `rows[first..first + count]`.
    Accepted {
        first: usize,
        count: usize,
    },
}

/// A batch written (and, from a `BatchWriter`, committed): what each
/// request came to, with the positions and links of the rows it inserted.
#[derive(Debug)]
pub struct WrittenBatch {
    plans: Vec<Plan>,
    positions: Vec<Position>,
    hashes: Vec<String>,
    recorded_at: DateTime<Utc>,
}

impl WrittenBatch {
    /// The outcome of a batch of one request, as `append` answers it.
    pub(crate) fn single(self, requests: Vec<AppendRequest>) -> Result<Vec<RecordedEvent>, AppendError> {
        let expected: Vec<(WalletId, Head)> = requests
            .iter()
            .flat_map(|r| r.streams.iter().map(|s| (s.stream.clone(), s.expected)))
            .collect();
        match self.finish(requests).pop() {
            Some(AppendOutcome::Appended(events)) => Ok(events),
            Some(AppendOutcome::Duplicate) => Err(AppendError::DuplicateRequest),
            Some(AppendOutcome::Conflict(actual)) => Err(first_difference(&expected, &actual)),
            None => Err(StoreError::BatchFailed("the append answered nothing".to_owned()).into()),
        }
    }

    /// Each request's outcome, in order (call after the commit succeeded).
    pub fn finish(self, requests: Vec<AppendRequest>) -> Vec<AppendOutcome> {
        let mut hashes = self.hashes.into_iter();
        requests
            .into_iter()
            .zip(self.plans)
            .map(|(request, plan)| match plan {
                Plan::Duplicate => AppendOutcome::Duplicate,
                Plan::Conflict(heads) => AppendOutcome::Conflict(heads),
                Plan::Accepted { first, count } => {
                    let mine: Vec<String> = hashes.by_ref().take(count).collect();
                    AppendOutcome::Appended(recorded(
                        request,
                        &self.positions[first..first + count],
                        mine,
                        self.recorded_at,
                    ))
                }
            })
            .collect()
    }
}

/// Guards, in order, which requests of a batch can be written: a request
/// whose key is already recorded is a duplicate (the recorded answer wins);
/// one whose streams are not at their expected heads (after the batch's
/// earlier requests) is a conflict. No business rule is checked here: the
/// committer decided; the store only refuses a state it did not expect.
fn plan_batch<'a>(
    requests: &'a [AppendRequest],
    mut tips: StreamTips,
    mut taken: HashSet<(String, String)>,
    recorded_at: DateTime<Utc>,
) -> (Vec<Row<'a>>, Vec<Plan>) {
    let mut all = Vec::new();
    let mut plans = Vec::with_capacity(requests.len());
    // Streams this batch has appended to so far.
    let mut moved: HashSet<String> = HashSet::new();
    for request in requests {
        let key = |rec: &IdempotencyRecord| (rec.wallet.to_string(), rec.key.clone());
        if request.idempotency.iter().any(|rec| taken.contains(&key(rec))) {
            plans.push(Plan::Duplicate);
            continue;
        }
        if let Some(actual) = heads_if_moved(request, &tips, &moved) {
            plans.push(Plan::Conflict(actual));
            continue;
        }
        taken.extend(request.idempotency.iter().map(key));
        let rows = rows(request, &tips, recorded_at);
        for row in &rows {
            moved.insert(row.stream.to_string());
            tips.insert(
                row.stream.to_string(),
                Tip {
                    head: Head {
                        version: row.version,
                        balance: row.event.event.balance_after(),
                    },
                    hash: row.hash.clone(),
                },
            );
        }
        plans.push(Plan::Accepted {
            first: all.len(),
            count: rows.len(),
        });
        all.extend(rows);
    }
    (all, plans)
}

/// The idempotency rows of the accepted requests: (record, last position).
fn idempotency_rows<'a>(
    requests: &'a [AppendRequest],
    plans: &[Plan],
    positions: &[Position],
) -> Vec<(&'a IdempotencyRecord, Option<Position>)> {
    requests
        .iter()
        .zip(plans)
        .filter_map(|(r, plan)| match plan {
            Plan::Accepted { first, count } => Some((r, (*count > 0).then(|| positions[first + count - 1]))),
            _ => None,
        })
        .flat_map(|(r, position)| r.idempotency.iter().map(move |rec| (rec, position)))
        .collect()
}

/// A stream's newest event, as found under the append lock: its head and
/// its link in the hash chain.
pub(crate) struct Tip {
    pub head: Head,
    pub hash: String,
}

/// Each stream's tip, by stream id (absent: an empty stream).
pub(crate) type StreamTips = HashMap<String, Tip>;

/// `None` when every stream of `request` is at its expected head, else the
/// actual heads of all its streams.
fn heads_if_moved(
    request: &AppendRequest,
    tips: &StreamTips,
    moved: &HashSet<String>,
) -> Option<Vec<(WalletId, Head)>> {
    let actual = |s: &StreamAppend| tips.get(s.stream.as_str()).map_or(Head::EMPTY, |t| t.head);
    let holds = |s: &StreamAppend| actual(s) == s.expected && (!s.on_batch || moved.contains(s.stream.as_str()));
    if request.streams.iter().all(holds) {
        return None;
    }
    Some(request.streams.iter().map(|s| (s.stream.clone(), actual(s))).collect())
}

/// Rows to insert, in order, with their stream versions and chain links.
struct Row<'a> {
    stream: &'a WalletId,
    version: u64,
    event: &'a NewEvent,
    payload: Value,
    hash: String,
}

fn rows<'a>(request: &'a AppendRequest, tips: &StreamTips, recorded_at: DateTime<Utc>) -> Vec<Row<'a>> {
    let mut out = Vec::with_capacity(request.streams.iter().map(|s| s.events.len()).sum());
    for s in &request.streams {
        let mut previous = tips.get(s.stream.as_str()).map(|t| t.hash.clone()).unwrap_or_default();
        for (i, event) in s.events.iter().enumerate() {
            let version = s.expected.version + 1 + i as u64;
            let payload = event.event.payload();
            let hash = chain::link(
                &previous,
                &chain::Canonical {
                    stream: s.stream.as_str(),
                    version,
                    event_id: event.event_id,
                    event_type: event.event.event_type(),
                    schema_version: crate::aggregate::EVENT_SCHEMA_VERSION,
                    payload: &payload,
                    metadata: &event.metadata,
                    recorded_at,
                },
            );
            previous.clone_from(&hash);
            out.push(Row {
                stream: &s.stream,
                version,
                event,
                payload,
                hash,
            });
        }
    }
    out
}

/// Builds what the log now holds from what was inserted.
fn recorded(
    request: AppendRequest,
    positions: &[Position],
    hashes: Vec<String>,
    recorded_at: DateTime<Utc>,
) -> Vec<RecordedEvent> {
    let mut out = Vec::with_capacity(positions.len());
    let mut positions = positions.iter();
    let mut hashes = hashes.into_iter();
    for s in request.streams {
        for (i, e) in s.events.into_iter().enumerate() {
            let position = *positions.next().expect("one position per inserted row");
            let hash = hashes.next().expect("one hash per inserted row");
            out.push(RecordedEvent {
                position,
                stream: s.stream.clone(),
                version: s.expected.version + 1 + i as u64,
                event_id: e.event_id,
                schema_version: crate::aggregate::EVENT_SCHEMA_VERSION,
                event: e.event,
                metadata: e.metadata,
                recorded_at,
                hash,
            });
        }
    }
    out
}

/// Stored timestamps have microsecond precision on both backends.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A stored row, decoded the same way for both backends.
struct RawEvent {
    position: Position,
    stream_id: String,
    version: i64,
    event_id: Uuid,
    event_type: String,
    schema_version: i32,
    /// JSON text.
    payload: String,
    metadata: Value,
    recorded_at: DateTime<Utc>,
    hash: Option<String>,
}

impl RawEvent {
    fn decode(self) -> Result<RecordedEvent, StoreError> {
        let corrupt = |source| StoreError::Corrupt {
            position: self.position,
            source,
        };
        let event = WalletEvent::decode_text(&self.event_type, self.schema_version, &self.payload).map_err(corrupt)?;
        // The stream id column must agree with the payload it carries.
        let stream = event.wallet_id().clone();
        if stream.as_str() != self.stream_id || self.version < 1 {
            return Err(StoreError::Corrupt {
                position: self.position,
                source: EventDecodeError::UnknownType(format!(
                    "row stream {} does not match payload wallet {}",
                    self.stream_id, stream
                )),
            });
        }
        Ok(RecordedEvent {
            position: self.position,
            stream,
            version: self.version as u64,
            event_id: self.event_id,
            schema_version: self.schema_version,
            event,
            metadata: self.metadata,
            recorded_at: self.recorded_at,
            hash: self.hash.unwrap_or_default(),
        })
    }
}
