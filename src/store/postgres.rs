//! The PostgreSQL backend.
//!
//! Appends take a transaction-scoped advisory lock before they write, so
//! appends commit one after another and positions become visible in order
//! (PostgreSQL releases the lock only after the commit is visible).

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row as _, Transaction};

use super::{
    append_error, check_expected_versions, now, recorded, rows, AppendError, AppendRequest, Cutoff, IdempotencyRecord,
    Position, RawEvent, RecordedEvent, SnapshotRecord, StoreError, StoreError as E, StoredOutcome, StreamHeads,
};
use crate::aggregate::WalletId;

/// Key of the advisory lock that serialises appends (per database).
const APPEND_LOCK: i64 = 0x7761_6c6c_6574; // "wallet"

const EVENT_COLUMNS: &str =
    "position, stream_id, version, event_id, event_type, schema_version, payload, metadata, recorded_at, hash";

#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
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
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await?;
        Ok(())
    }

    pub async fn begin_append(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        let mut tx = self.pool.begin().await.map_err(|e| AppendError::Store(e.into()))?;
        let store = |e: sqlx::Error| AppendError::Store(e.into());

        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(store)?;

        // Under the lock no other append can move these streams.
        let names: Vec<&str> = request.streams.iter().map(|s| s.stream.as_str()).collect();
        // One index probe per stream (newest version first), however long the stream.
        let heads: StreamHeads = sqlx::query(
            "SELECT s.stream_id, e.version, COALESCE(e.hash, '') FROM unnest($1::text[]) AS s(stream_id) \
             CROSS JOIN LATERAL (SELECT version, hash FROM events WHERE stream_id = s.stream_id \
             ORDER BY version DESC LIMIT 1) e",
        )
        .bind(&names)
        .fetch_all(&mut *tx)
        .await
        .map_err(store)?
        .into_iter()
        .map(|r| {
            (
                r.get::<String, _>(0),
                (r.get::<i64, _>(1) as u64, r.get::<String, _>(2)),
            )
        })
        .collect();
        check_expected_versions(&request, &heads)?;

        // Taken under the lock: event time never decreases along the log.
        let recorded_at = now();
        let rows = rows(&request, &heads, recorded_at);
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
        let mut positions: Vec<Position> = insert
            .build_query_scalar()
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| append_error(e, &request))?;
        // Identity values are drawn in VALUES order.
        positions.sort_unstable();
        let hashes: Vec<String> = rows.into_iter().map(|r| r.hash).collect();

        if let Some(record) = &request.idempotency {
            let last = positions.last().copied();
            let inserted = sqlx::query(
                "INSERT INTO idempotency (wallet_id, key, fingerprint, outcome, position) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(record.wallet.as_str())
            .bind(&record.key)
            .bind(&record.fingerprint)
            .bind(Json(&record.outcome))
            .bind(last)
            .execute(&mut *tx)
            .await
            .map_err(store)?;
            if inserted.rows_affected() == 0 {
                return Err(AppendError::DuplicateRequest);
            }
        }
        let events = recorded(request, &positions, hashes, recorded_at);
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

    pub async fn remember_rejection(&self, record: IdempotencyRecord) -> Result<(), AppendError> {
        let inserted = sqlx::query(
            "INSERT INTO idempotency (wallet_id, key, fingerprint, outcome, position) \
             VALUES ($1, $2, $3, $4, NULL) ON CONFLICT DO NOTHING",
        )
        .bind(record.wallet.as_str())
        .bind(&record.key)
        .bind(&record.fingerprint)
        .bind(Json(&record.outcome))
        .execute(&self.pool)
        .await
        .map_err(|e| AppendError::Store(e.into()))?;
        if inserted.rows_affected() == 0 {
            return Err(AppendError::DuplicateRequest);
        }
        Ok(())
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
        payload: r.try_get::<Json<serde_json::Value>, _>(6)?.0,
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
