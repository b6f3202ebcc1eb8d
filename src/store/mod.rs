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
mod leader;
mod postgres;
mod sqlite;

use std::collections::{HashMap, HashSet};
use std::future::Future;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::aggregate::{EventDecodeError, WalletEvent, WalletId};

pub use leader::LeaderLock;
pub use postgres::PgEventStore;
pub use sqlite::SqliteEventStore;

/// A log position: the global order of committed events, starting at 1.
pub type Position = i64;

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: Uuid,
    pub event: WalletEvent,
    pub metadata: Value,
}

/// New events for one stream and the version the stream must be at.
#[derive(Debug, Clone)]
pub struct StreamAppend {
    pub stream: WalletId,
    pub expected_version: u64,
    /// When set, the stream's newest event must also be this one. A command
    /// decided on top of another that is not committed yet carries it: if
    /// that one fails and another process writes one event in its place,
    /// the version alone would still match.
    pub expected_last_event: Option<Uuid>,
    pub events: Vec<NewEvent>,
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
    pub idempotency: Option<IdempotencyRecord>,
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
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
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
    /// The group commit this append was part of failed as a whole.
    #[error("append batch failed: {0}")]
    BatchFailed(String),
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
    /// A stream was not at its expected version (or, when one was expected,
    /// its newest event was another): someone else appended first.
    #[error("stream {stream} is at version {actual}, expected {expected} and the expected newest event")]
    Conflict {
        stream: WalletId,
        expected: u64,
        actual: u64,
    },
    /// The idempotency key was taken by a concurrent request that committed first.
    #[error("idempotency key already recorded")]
    DuplicateRequest,
    #[error(transparent)]
    Store(#[from] StoreError),
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

    /// Appends atomically: every stream must be at its expected version, the
    /// idempotency key (if any) must be new, or nothing is written. Goes
    /// through the group committer; answers only after the commit.
    pub async fn append(&self, request: AppendRequest) -> Result<Vec<RecordedEvent>, AppendError> {
        self.enqueue(request).await?.committed().await
    }

    /// Hands an append to the group committer and returns at once (after
    /// waiting for room in its queue). Appends enqueued one after another
    /// are decided in that order, in the same batch or in successive ones.
    pub async fn enqueue(&self, request: AppendRequest) -> Result<Queued, AppendError> {
        assert!(
            request.streams.iter().all(|s| !s.events.is_empty()),
            "an append carries at least one event per stream"
        );
        match self {
            EventStore::Postgres(s) => enqueue(s.committer(), request).await,
            EventStore::Sqlite(s) => enqueue(s.committer(), request).await,
        }
    }

    /// Does all of an append but the commit.
    pub async fn begin_append(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        assert!(
            request.streams.iter().all(|s| !s.events.is_empty()),
            "an append carries at least one event per stream"
        );
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

    /// The highest committed position, 0 for an empty log.
    pub async fn head_position(&self) -> Result<Position, StoreError> {
        dispatch!(self, s => s.head_position().await)
    }

    pub async fn find_idempotency(&self, wallet: &WalletId, key: &str) -> Result<Option<StoredOutcome>, StoreError> {
        dispatch!(self, s => s.find_idempotency(wallet, key).await)
    }

    /// Remembers a decided rejection (an append of no events with an
    /// idempotency record). `DuplicateRequest` if the key is taken.
    pub async fn remember_rejection(&self, record: IdempotencyRecord) -> Result<(), AppendError> {
        let request = AppendRequest {
            streams: Vec::new(),
            idempotency: Some(record),
        };
        match self {
            EventStore::Postgres(s) => submit(s.committer(), request).await.map(drop),
            EventStore::Sqlite(s) => submit(s.committer(), request).await.map(drop),
        }
    }

    pub async fn save_snapshot(&self, snapshot: &SnapshotRecord) -> Result<(), StoreError> {
        dispatch!(self, s => s.save_snapshot(snapshot).await)
    }

    /// The newest snapshot of `stream` in `schema_version` that lies within `cutoff`.
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
}

/// The result of one append.
pub type AppendResult = Result<Vec<RecordedEvent>, AppendError>;

/// Appends waiting for the next group commit, per transaction at most this
/// many requests and this many events.
const MAX_BATCH_REQUESTS: usize = 512;
const MAX_BATCH_EVENTS: usize = 2048;

/// One append handed to the committer, and where its answer goes.
pub(crate) struct Job {
    request: AppendRequest,
    reply: tokio::sync::oneshot::Sender<AppendResult>,
}

/// Group commit: one task per store takes every append that is waiting,
/// writes them in one transaction (each still checked against its own
/// expected versions and idempotency key), and answers each only after the
/// commit. Requests that arrive while a commit is in flight form the next
/// batch, so batching costs no added latency when the store is idle.
pub(crate) fn spawn_committer<F, Fut>(commit: F) -> tokio::sync::mpsc::Sender<Job>
where
    F: Fn(Vec<AppendRequest>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<AppendResult>> + Send + 'static,
{
    let (tx, run) = committer(commit);
    tokio::spawn(run);
    tx
}

/// The committer's queue and its loop, for the caller to run where it likes.
pub(crate) fn committer<F, Fut>(commit: F) -> (tokio::sync::mpsc::Sender<Job>, impl Future<Output = ()> + Send)
where
    F: Fn(Vec<AppendRequest>) -> Fut + Send + 'static,
    Fut: Future<Output = Vec<AppendResult>> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Job>(4 * MAX_BATCH_REQUESTS);
    let run = async move {
        while let Some(first) = rx.recv().await {
            let mut events = first.request.streams.iter().map(|s| s.events.len()).sum::<usize>();
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH_REQUESTS && events < MAX_BATCH_EVENTS {
                match rx.try_recv() {
                    Ok(job) => {
                        events += job.request.streams.iter().map(|s| s.events.len()).sum::<usize>();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            metrics::histogram!("append_batch_requests").record(jobs.len() as f64);
            metrics::histogram!("append_batch_events").record(events as f64);
            let (requests, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.request, j.reply)).unzip();
            let started = std::time::Instant::now();
            let mut results = commit(requests).await;
            metrics::histogram!("append_batch_commit_seconds").record(started.elapsed().as_secs_f64());
            if results.len() != replies.len() {
                // Never silently drop a reply: whatever committed is of
                // unknown outcome to its client, like any failed batch.
                let e = StoreError::BatchFailed(format!(
                    "the batch answered {} results for {} requests",
                    results.len(),
                    replies.len()
                ));
                results = batch_failed(replies.len(), &e);
            }
            for (reply, result) in replies.into_iter().zip(results) {
                // The requester may have gone away (client disconnected); the
                // append stands either way.
                let _ = reply.send(result);
            }
        }
    };
    (tx, run)
}

/// Sends `request` to the committer and waits for its commit.
pub(crate) async fn submit(committer: &tokio::sync::mpsc::Sender<Job>, request: AppendRequest) -> AppendResult {
    enqueue(committer, request).await?.committed().await
}

/// An append handed to the committer, not yet answered.
pub struct Queued(tokio::sync::oneshot::Receiver<AppendResult>);

impl Queued {
    /// Waits for the commit (or the reason there was none).
    pub async fn committed(self) -> AppendResult {
        self.0.await.map_err(|_| committer_stopped())?
    }
}

fn committer_stopped() -> AppendError {
    AppendError::Store(StoreError::BatchFailed("the committer has stopped".to_owned()))
}

async fn enqueue(committer: &tokio::sync::mpsc::Sender<Job>, request: AppendRequest) -> Result<Queued, AppendError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    committer
        .send(Job { request, reply })
        .await
        .map_err(|_| committer_stopped())?;
    Ok(Queued(answer))
}

/// What a batch decided for one of its requests.
enum Plan {
    Rejected(AppendError),
    /// Its rows are `rows[first..first + count]`.
    Accepted {
        first: usize,
        count: usize,
    },
}

/// A batch written but not yet committed.
pub(crate) struct WrittenBatch {
    plans: Vec<Plan>,
    positions: Vec<Position>,
    hashes: Vec<String>,
    recorded_at: DateTime<Utc>,
}

impl WrittenBatch {
    /// Each request's result, in order (call after the commit succeeded).
    fn finish(self, requests: Vec<AppendRequest>) -> Vec<AppendResult> {
        let mut hashes = self.hashes.into_iter();
        requests
            .into_iter()
            .zip(self.plans)
            .map(|(request, plan)| match plan {
                Plan::Rejected(e) => Err(e),
                Plan::Accepted { first, count } => {
                    let mine: Vec<String> = hashes.by_ref().take(count).collect();
                    Ok(recorded(
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

/// Decides, in order, which requests of a batch can be written: each must
/// find its streams at their expected versions (after the batch's earlier
/// requests) and its idempotency key unused.
fn plan_batch<'a>(
    requests: &'a [AppendRequest],
    mut heads: StreamHeads,
    mut taken: HashSet<(String, String)>,
    recorded_at: DateTime<Utc>,
) -> (Vec<Row<'a>>, Vec<Plan>) {
    let mut all = Vec::new();
    let mut plans = Vec::with_capacity(requests.len());
    for request in requests {
        if let Err(e) = check_expected_versions(request, &heads) {
            plans.push(Plan::Rejected(e));
            continue;
        }
        if let Some(rec) = &request.idempotency {
            if !taken.insert((rec.wallet.to_string(), rec.key.clone())) {
                plans.push(Plan::Rejected(AppendError::DuplicateRequest));
                continue;
            }
        }
        let rows = rows(request, &heads, recorded_at);
        for row in &rows {
            heads.insert(
                row.stream.to_string(),
                Head {
                    version: row.version,
                    hash: row.hash.clone(),
                    event_id: row.event.event_id,
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
        .filter_map(|(r, plan)| match (plan, &r.idempotency) {
            (Plan::Accepted { first, count }, Some(rec)) => {
                Some((rec, (*count > 0).then(|| positions[first + count - 1])))
            }
            _ => None,
        })
        .collect()
}

/// Fans a whole-batch failure out to every request of the batch.
fn batch_failed(n: usize, e: &StoreError) -> Vec<AppendResult> {
    tracing::error!(error = %e, requests = n, "append batch failed");
    (0..n)
        .map(|_| Err(AppendError::Store(StoreError::BatchFailed(e.to_string()))))
        .collect()
}

/// A stream's newest event, as found under the append lock.
pub(crate) struct Head {
    pub version: u64,
    pub hash: String,
    pub event_id: Uuid,
}

/// Each stream's head, by stream id.
pub(crate) type StreamHeads = HashMap<String, Head>;

/// Checks every stream of `request` against the heads found in the store
/// (streams absent from `current` are at version 0).
fn check_expected_versions(request: &AppendRequest, current: &StreamHeads) -> Result<(), AppendError> {
    for s in &request.streams {
        let head = current.get(s.stream.as_str());
        let actual = head.map_or(0, |h| h.version);
        let last_matches = s.expected_last_event.is_none() || head.map(|h| h.event_id) == s.expected_last_event;
        if actual != s.expected_version || !last_matches {
            return Err(AppendError::Conflict {
                stream: s.stream.clone(),
                expected: s.expected_version,
                actual,
            });
        }
    }
    Ok(())
}

/// Rows to insert, in order, with their stream versions and chain links.
struct Row<'a> {
    stream: &'a WalletId,
    version: u64,
    event: &'a NewEvent,
    payload: Value,
    hash: String,
}

fn rows<'a>(request: &'a AppendRequest, heads: &StreamHeads, recorded_at: DateTime<Utc>) -> Vec<Row<'a>> {
    let mut out = Vec::with_capacity(request.streams.iter().map(|s| s.events.len()).sum());
    for s in &request.streams {
        let mut previous = heads.get(s.stream.as_str()).map(|h| h.hash.clone()).unwrap_or_default();
        for (i, event) in s.events.iter().enumerate() {
            let version = s.expected_version + 1 + i as u64;
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
                version: s.expected_version + 1 + i as u64,
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
