//! The PostgreSQL backend.
//!
//! Appends take a transaction-scoped advisory lock before they write, so
//! appends commit one after another and positions become visible in order
//! (PostgreSQL releases the lock only after the commit is visible).

use std::time::Duration;

use tokio::sync::mpsc;

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row as _, Transaction};

use super::{
    batch_failed, chain, committer, AppendError, AppendRequest, AppendResult, Cutoff, Job, Plan, Position, RawEvent,
    RecordedEvent, SnapshotRecord, StoreError, StoreError as E, StoredOutcome, WrittenBatch,
};
use crate::aggregate::WalletId;

/// Key of the advisory lock that serialises appends (per database).
const APPEND_LOCK: i64 = 0x7761_6c6c_6574; // "wallet"

const EVENT_COLUMNS: &str =
    "position, stream_id, version, event_id, event_type, schema_version, payload::text, metadata, recorded_at, hash";

#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
    committer: mpsc::Sender<Job>,
}

pub struct PendingAppend {
    tx: Transaction<'static, Postgres>,
    events: Vec<RecordedEvent>,
}

impl PendingAppend {
    pub async fn commit(self) -> Result<Vec<RecordedEvent>, AppendError> {
        self.tx.commit().await.map_err(|e| AppendError::Store(e.into()))?;
        Ok(self.events)
    }
}

impl PgEventStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        let committer = spawn_committer_thread(url).await?;
        Ok(Self { pool, committer })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    pub(crate) fn committer(&self) -> &mpsc::Sender<Job> {
        &self.committer
    }

    /// A single append with its transaction left open (tests hold it open).
    pub async fn begin_append(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        let requests = vec![request];
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let written = write_batch(&mut *tx, &requests).await?;
        let events = written.finish(requests).pop().expect("one result per request")?;
        Ok(PendingAppend { tx, events })
    }

    pub async fn read_stream(
        &self,
        stream: &WalletId,
        after_version: u64,
        cutoff: Option<Cutoff>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = "));
        q.push_bind(stream.as_str())
            .push(" AND version > ")
            .push_bind(after_version as i64);
        match cutoff {
            Some(Cutoff::Position(p)) => {
                q.push(" AND position <= ").push_bind(p);
            }
            Some(Cutoff::Time(t)) => {
                q.push(" AND recorded_at <= ").push_bind(t);
            }
            Some(Cutoff::Version(v)) => {
                q.push(" AND version <= ").push_bind(v as i64);
            }
            None => {}
        }
        q.push(" ORDER BY version");
        decode_all(q.build().fetch_all(&self.pool).await?)
    }

    pub async fn stream_versions(&self, streams: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        // One backward index probe per stream, however long it is (a
        // GROUP BY over `IN (...)` scanned every version of every stream),
        // and one statement text for any number of streams.
        Ok(sqlx::query_as(
            "SELECT s.id, e.version FROM unnest($1::text[]) AS s(id) \
             CROSS JOIN LATERAL (SELECT version FROM events WHERE stream_id = s.id \
             ORDER BY version DESC LIMIT 1) e",
        )
        .bind(streams)
        .fetch_all(&self.pool)
        .await?)
    }

    pub async fn read_stream_backwards(
        &self,
        stream: &WalletId,
        before_version: Option<u64>,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let before = before_version.map_or(i64::MAX, |v| v as i64);
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version < $2 \
             ORDER BY version DESC LIMIT $3"
        ))
        .bind(stream.as_str())
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(rows)
    }

    pub async fn read_all(&self, after: Position, limit: u32) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        decode_all(rows)
    }

    pub async fn head_position(&self) -> Result<Position, StoreError> {
        Ok(sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn find_idempotency(&self, wallet: &WalletId, key: &str) -> Result<Option<StoredOutcome>, StoreError> {
        let row =
            sqlx::query("SELECT fingerprint, outcome, position FROM idempotency WHERE wallet_id = $1 AND key = $2")
                .bind(wallet.as_str())
                .bind(key)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| StoredOutcome {
            fingerprint: r.get(0),
            outcome: r.get::<Json<serde_json::Value>, _>(1).0,
            position: r.get(2),
        }))
    }

    pub async fn save_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (stream_id, version, position, schema_version, state, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (stream_id, version) DO UPDATE \
             SET position = excluded.position, schema_version = excluded.schema_version, \
                 state = excluded.state, created_at = excluded.created_at",
        )
        .bind(s.stream.as_str())
        .bind(s.version as i64)
        .bind(s.position)
        .bind(s.schema_version)
        .bind(&s.state)
        .bind(chrono::Utc::now().to_rfc3339())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn latest_snapshot(
        &self,
        stream: &WalletId,
        schema_version: i32,
        cutoff: Option<Cutoff>,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(
            "SELECT stream_id, version, position, schema_version, state FROM snapshots WHERE stream_id = ",
        );
        q.push_bind(stream.as_str())
            .push(" AND schema_version = ")
            .push_bind(schema_version);
        match cutoff {
            Some(Cutoff::Position(p)) => {
                q.push(" AND position <= ").push_bind(p);
            }
            Some(Cutoff::Version(v)) => {
                q.push(" AND version <= ").push_bind(v as i64);
            }
            // Snapshots do not record event time: time travel folds from the start.
            Some(Cutoff::Time(_)) => return Ok(None),
            None => {}
        }
        q.push(" ORDER BY version DESC LIMIT 1");
        q.build()
            .fetch_optional(&self.pool)
            .await?
            .map(snapshot_row)
            .transpose()
    }

    pub async fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        sqlx::query(
            "SELECT stream_id, version, position, schema_version, state FROM snapshots ORDER BY stream_id, version",
        )
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(snapshot_row)
        .collect()
    }

    /// Readiness: the database answers and the committer is running.
    pub async fn ping(&self) -> Result<(), StoreError> {
        if self.committer.is_closed() {
            return Err(StoreError::BatchFailed("the committer has stopped".to_owned()));
        }
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Starts the group committer on a thread of its own, with its own runtime
/// and connection. Every append waits for the committer, one batch after
/// another, so its turnaround is the write path's ceiling; on the shared
/// runtime each answer from PostgreSQL waited for a worker busy with HTTP
/// before the next batch could go (measured: BENCHMARKS.md).
async fn spawn_committer_thread(url: &str) -> Result<mpsc::Sender<Job>, StoreError> {
    let (ready, started) = tokio::sync::oneshot::channel::<Result<mpsc::Sender<Job>, StoreError>>();
    let url = url.to_owned();
    let thread = std::thread::Builder::new()
        .name("wallet-committer".to_owned())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready.send(Err(StoreError::Io("committer runtime".to_owned(), e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let pool = match PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(5))
                    // No ping before each batch: that was a second round trip
                    // per commit. A dead connection fails one batch, whose
                    // appends the ledger already treats as of unknown outcome.
                    .test_before_acquire(false)
                    .connect(&url)
                    .await
                {
                    Ok(pool) => pool,
                    Err(e) => {
                        let _ = ready.send(Err(e.into()));
                        return;
                    }
                };
                let writer = pool.clone();
                let (queue, run) = committer(move |requests| {
                    let pool = writer.clone();
                    async move { commit_batch(&pool, requests).await }
                });
                if ready.send(Ok(queue)).is_ok() {
                    // Ends when the last handle to the store is dropped.
                    run.await;
                }
                pool.close().await;
            });
        })
        .map_err(|e| StoreError::Io("committer thread".to_owned(), e))?;
    let queue = started
        .await
        .map_err(|_| StoreError::BatchFailed("the committer thread did not start".to_owned()))?;
    drop(thread);
    queue
}

/// Writes and commits one group of appends: one statement, so one round
/// trip and an implicit transaction.
async fn commit_batch(pool: &PgPool, requests: Vec<AppendRequest>) -> Vec<AppendResult> {
    match write_batch(pool, &requests).await {
        Ok(written) => written.finish(requests),
        Err(e) => batch_failed(requests.len(), &e),
    }
}

/// Everything of a group commit but the commit, in one statement: the
/// `wallet_append` function (migration 0006) takes the append lock, reads
/// the stream heads and idempotency keys of the whole batch, decides each
/// request in order, links the hash chains and inserts. One round trip
/// keeps the time the lock is held (which serialises all appends) short.
async fn write_batch<'c, E>(executor: E, requests: &[AppendRequest]) -> Result<WrittenBatch, StoreError>
where
    E: sqlx::PgExecutor<'c>,
{
    let mut key_wallets: Vec<Option<&str>> = Vec::with_capacity(requests.len());
    let mut keys: Vec<Option<&str>> = Vec::with_capacity(requests.len());
    let mut fingerprints: Vec<Option<&str>> = Vec::with_capacity(requests.len());
    let mut outcomes: Vec<Option<String>> = Vec::with_capacity(requests.len());
    let (mut s_request, mut s_stream, mut s_expected, mut s_last) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut e_segment, mut e_id, mut e_type, mut e_payload, mut e_metadata, mut e_body) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, request) in requests.iter().enumerate() {
        let rec = request.idempotency.as_ref();
        key_wallets.push(rec.map(|rec| rec.wallet.as_str()));
        keys.push(rec.map(|rec| rec.key.as_str()));
        fingerprints.push(rec.map(|rec| rec.fingerprint.as_str()));
        outcomes.push(rec.map(|rec| rec.outcome.to_string()));
        for s in &request.streams {
            s_request.push(r as i32 + 1);
            s_stream.push(s.stream.as_str());
            s_expected.push(s.expected_version as i64);
            s_last.push(s.expected_last_event);
            for (i, event) in s.events.iter().enumerate() {
                let payload = event.event.payload();
                e_body.push(chain::body(&chain::Canonical {
                    stream: s.stream.as_str(),
                    version: s.expected_version + 1 + i as u64,
                    event_id: event.event_id,
                    event_type: event.event.event_type(),
                    schema_version: crate::aggregate::EVENT_SCHEMA_VERSION,
                    payload: &payload,
                    metadata: &event.metadata,
                    // Not part of the body: the function adds the time it takes under the lock.
                    recorded_at: chrono::DateTime::UNIX_EPOCH,
                }));
                e_segment.push(s_stream.len() as i32);
                e_id.push(event.event_id);
                e_type.push(event.event.event_type());
                e_payload.push(payload.to_string());
                e_metadata.push(event.metadata.to_string());
            }
        }
    }
    let rows = sqlx::query(
        // The rows pair with the requests by position: ordered explicitly,
        // not by the function scan's habit.
        "SELECT o_status, o_stream, o_actual, o_positions, o_hashes, o_recorded_at FROM wallet_append(\
         $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) WITH ORDINALITY AS r \
         ORDER BY r.ordinality",
    )
    .bind(APPEND_LOCK)
    .bind(crate::aggregate::EVENT_SCHEMA_VERSION)
    .bind(&key_wallets)
    .bind(&keys)
    .bind(&fingerprints)
    .bind(&outcomes)
    .bind(&s_request)
    .bind(&s_stream)
    .bind(&s_expected)
    .bind(&s_last)
    .bind(&e_segment)
    .bind(&e_id)
    .bind(&e_type)
    .bind(&e_payload)
    .bind(&e_metadata)
    .bind(&e_body)
    .fetch_all(executor)
    .await?;
    if rows.len() != requests.len() {
        return Err(StoreError::BatchFailed(format!(
            "wallet_append answered {} rows for {} requests",
            rows.len(),
            requests.len()
        )));
    }

    let mut plans = Vec::with_capacity(requests.len());
    let mut positions: Vec<Position> = Vec::new();
    let mut hashes: Vec<String> = Vec::new();
    let mut recorded_at = None;
    for (request, row) in requests.iter().zip(rows) {
        recorded_at = Some(row.try_get::<chrono::DateTime<chrono::Utc>, _>(5)?);
        let status: String = row.try_get(0)?;
        let plan = match status.as_str() {
            "ok" => {
                let mine: Vec<Position> = row.try_get::<Option<Vec<Position>>, _>(3)?.unwrap_or_default();
                let links: Vec<String> = row.try_get::<Option<Vec<String>>, _>(4)?.unwrap_or_default();
                let plan = Plan::Accepted {
                    first: positions.len(),
                    count: mine.len(),
                };
                positions.extend(mine);
                hashes.extend(links);
                plan
            }
            "duplicate" => Plan::Rejected(AppendError::DuplicateRequest),
            _ => {
                let stream: String = row.try_get(1)?;
                let actual: i64 = row.try_get(2)?;
                let s = request
                    .streams
                    .iter()
                    .find(|s| s.stream.as_str() == stream)
                    .ok_or_else(|| StoreError::BatchFailed(format!("wallet_append named a foreign stream {stream}")))?;
                Plan::Rejected(AppendError::Conflict {
                    stream: s.stream.clone(),
                    expected: s.expected_version,
                    actual: actual as u64,
                })
            }
        };
        plans.push(plan);
    }
    if positions.len() != hashes.len() {
        return Err(StoreError::BatchFailed(
            "wallet_append: positions and hashes differ".to_owned(),
        ));
    }
    Ok(WrittenBatch {
        plans,
        positions,
        hashes,
        recorded_at: recorded_at.unwrap_or_else(chrono::Utc::now),
    })
}

fn decode_all(rows: Vec<PgRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.into_iter().map(decode_row).collect()
}

fn decode_row(r: PgRow) -> Result<RecordedEvent, StoreError> {
    RawEvent {
        position: r.try_get(0)?,
        stream_id: r.try_get(1)?,
        version: r.try_get(2)?,
        event_id: r.try_get(3)?,
        event_type: r.try_get(4)?,
        schema_version: r.try_get(5)?,
        payload: r.try_get(6)?,
        metadata: r.try_get::<Json<serde_json::Value>, _>(7)?.0,
        recorded_at: r.try_get(8)?,
        hash: r.try_get(9)?,
    }
    .decode()
}

fn snapshot_row(r: PgRow) -> Result<SnapshotRecord, StoreError> {
    let stream: String = r.try_get(0)?;
    Ok(SnapshotRecord {
        stream: WalletId::parse(&stream).map_err(|e| E::Database(sqlx::Error::Decode(Box::new(e))))?,
        version: r.try_get::<i64, _>(1)? as u64,
        position: r.try_get(2)?,
        schema_version: r.try_get(3)?,
        state: r.try_get(4)?,
    })
}
