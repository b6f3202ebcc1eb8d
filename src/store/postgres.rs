//! The PostgreSQL backend.
//!
//! Appends take a transaction-scoped advisory lock before they write, so
//! appends commit one after another and positions become visible in order
//! (PostgreSQL releases the lock only after the commit is visible).

use std::collections::HashSet;
use std::time::Duration;

use tokio::sync::mpsc;

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row as _, Transaction};

use super::{
    batch_failed, idempotency_rows, now, plan_batch, spawn_committer, AppendError, AppendRequest, AppendResult, Cutoff,
    Job, Position, RawEvent, RecordedEvent, SnapshotRecord, StoreError, StoreError as E, StoredOutcome, StreamHeads,
    WrittenBatch,
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
        let committer = {
            let pool = pool.clone();
            spawn_committer(move |requests| {
                let pool = pool.clone();
                async move { commit_batch(&pool, requests).await }
            })
        };
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
        let (tx, written) = write_batch(&self.pool, &requests).await?;
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
        let mut q = QueryBuilder::<Postgres>::new("SELECT stream_id, MAX(version) FROM events WHERE stream_id IN (");
        let mut list = q.separated(", ");
        for s in streams {
            list.push_bind(*s);
        }
        q.push(") GROUP BY stream_id");
        Ok(q.build_query_as().fetch_all(&self.pool).await?)
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

    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Writes and commits one group of appends.
async fn commit_batch(pool: &PgPool, requests: Vec<AppendRequest>) -> Vec<AppendResult> {
    let written = match write_batch(pool, &requests).await {
        Ok((tx, written)) => tx.commit().await.map(|_| written).map_err(StoreError::from),
        Err(e) => Err(e),
    };
    match written {
        Ok(written) => written.finish(requests),
        Err(e) => batch_failed(requests.len(), &e),
    }
}

/// Everything of a group commit but the commit: under the append lock, reads
/// the stream heads and the idempotency keys of the whole batch, decides
/// each request in order, and inserts the accepted events and idempotency
/// rows in one statement each.
async fn write_batch(
    pool: &PgPool,
    requests: &[AppendRequest],
) -> Result<(Transaction<'static, Postgres>, WrittenBatch), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *tx)
        .await?;

    // Under the lock no other append can move these streams or take these keys.
    let names: Vec<&str> = requests
        .iter()
        .flat_map(|r| r.streams.iter().map(|s| s.stream.as_str()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    // One index probe per stream (newest version first), however long the stream.
    let heads: StreamHeads = sqlx::query(
        "SELECT s.stream_id, e.version, COALESCE(e.hash, '') FROM unnest($1::text[]) AS s(stream_id) \
         CROSS JOIN LATERAL (SELECT version, hash FROM events WHERE stream_id = s.stream_id \
         ORDER BY version DESC LIMIT 1) e",
    )
    .bind(&names)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| {
        (
            r.get::<String, _>(0),
            (r.get::<i64, _>(1) as u64, r.get::<String, _>(2)),
        )
    })
    .collect();
    let (key_wallets, keys): (Vec<&str>, Vec<&str>) = requests
        .iter()
        .filter_map(|r| r.idempotency.as_ref())
        .map(|rec| (rec.wallet.as_str(), rec.key.as_str()))
        .unzip();
    let taken: HashSet<(String, String)> = if keys.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_as::<_, (String, String)>(
            "SELECT wallet_id, key FROM idempotency WHERE (wallet_id, key) IN \
             (SELECT * FROM unnest($1::text[], $2::text[]))",
        )
        .bind(&key_wallets)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect()
    };

    // Taken under the lock: event time never decreases along the log.
    let recorded_at = now();
    let (rows, plans) = plan_batch(requests, heads, taken, recorded_at);
    let mut positions: Vec<Position> = Vec::with_capacity(rows.len());
    if !rows.is_empty() {
        let mut insert = QueryBuilder::<Postgres>::new(
            "INSERT INTO events (stream_id, version, event_id, event_type, schema_version, payload, metadata, recorded_at, hash) ",
        );
        insert.push_values(&rows, |mut b, row| {
            b.push_bind(row.stream.as_str())
                .push_bind(row.version as i64)
                .push_bind(row.event.event_id)
                .push_bind(row.event.event.event_type())
                .push_bind(crate::aggregate::EVENT_SCHEMA_VERSION)
                .push_bind(Json(&row.payload))
                .push_bind(Json(&row.event.metadata))
                .push_bind(recorded_at)
                .push_bind(row.hash.as_str());
        });
        insert.push(" RETURNING position");
        positions = insert.build_query_scalar().fetch_all(&mut *tx).await?;
        // Identity values are drawn in VALUES order.
        positions.sort_unstable();
    }
    let hashes: Vec<String> = rows.into_iter().map(|r| r.hash).collect();

    let records = idempotency_rows(requests, &plans, &positions);
    if !records.is_empty() {
        let mut insert =
            QueryBuilder::<Postgres>::new("INSERT INTO idempotency (wallet_id, key, fingerprint, outcome, position) ");
        insert.push_values(&records, |mut b, (rec, position)| {
            b.push_bind(rec.wallet.as_str())
                .push_bind(rec.key.as_str())
                .push_bind(rec.fingerprint.as_str())
                .push_bind(Json(&rec.outcome))
                .push_bind(*position);
        });
        insert.build().execute(&mut *tx).await?;
    }
    Ok((
        tx,
        WrittenBatch {
            plans,
            positions,
            hashes,
            recorded_at,
        },
    ))
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
