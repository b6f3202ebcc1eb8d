//! The embedded SQLite backend, the default when no `DATABASE_URL` is set.
//!
//! SQLite has one writer at a time; we make that explicit with a writer pool
//! of one connection (WAL mode lets the reader pool carry on meanwhile). One
//! writer means appends commit in position order, so `read_all` never skips.

use std::collections::HashSet;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row as _, Sqlite, Transaction};
use uuid::Uuid;

use super::writer::{Found, WriteFailure, WriterOptions};
use super::{
    idempotency_rows, now, plan_batch, AppendError, AppendRequest, Cutoff, Head, LogFilter, Position, RawEvent,
    RecordedEvent, SnapshotRecord, StoreError, StoredOutcome, StreamTips, Tip, WrittenBatch,
};
use crate::aggregate::{Balance, WalletId};

const EVENT_COLUMNS: &str =
    "position, stream_id, version, event_id, event_type, schema_version, payload, metadata, recorded_at, hash";

#[derive(Debug, Clone)]
pub struct SqliteEventStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// The database file, `None` for an in-memory database.
    file: Option<std::path::PathBuf>,
}

pub struct PendingAppend {
    tx: Transaction<'static, Sqlite>,
    events: Vec<RecordedEvent>,
}

impl PendingAppend {
    pub async fn commit(self) -> Result<Vec<RecordedEvent>, AppendError> {
        self.tx.commit().await.map_err(|e| AppendError::Store(e.into()))?;
        Ok(self.events)
    }
}

/// Timestamps are stored as fixed-width RFC 3339 text, so text order is time order.
fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

impl SqliteEventStore {
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a write is acknowledged only once it is durable.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await?;
        let reader = if url.contains(":memory:") {
            // Every connection to :memory: is its own database: share the writer.
            writer.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_with(options)
                .await?
        };
        Ok(Self {
            writer,
            reader,
            file: database_file(url),
        })
    }

    /// The single writing connection's pool.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    pub fn file(&self) -> Option<&std::path::Path> {
        self.file.as_deref()
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/sqlite").run(&self.writer).await?;
        Ok(())
    }

    /// Several appends in one transaction on the writer connection.
    pub(crate) async fn append_batch(&self, requests: &[AppendRequest]) -> Result<WrittenBatch, StoreError> {
        let (tx, written) = write_batch(&self.writer, requests).await?;
        tx.commit().await?;
        Ok(written)
    }

    /// The committer's writer: the single writer connection, with a deadline.
    pub(crate) fn batch_writer(&self, options: WriterOptions) -> SqliteWriter {
        SqliteWriter {
            pool: self.writer.clone(),
            options,
        }
    }

    /// A single append with its transaction left open (tests hold it open).
    pub async fn begin_append(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        let requests = vec![request];
        let (tx, written) = write_batch(&self.writer, &requests).await?;
        let events = written.single(requests)?;
        Ok(PendingAppend { tx, events })
    }

    pub async fn read_stream(
        &self,
        stream: &WalletId,
        after_version: u64,
        cutoff: Option<Cutoff>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = "));
        q.push_bind(stream.as_str())
            .push(" AND version > ")
            .push_bind(after_version as i64);
        match cutoff {
            Some(Cutoff::Position(p)) => {
                q.push(" AND position <= ").push_bind(p);
            }
            Some(Cutoff::Time(t)) => {
                q.push(" AND recorded_at <= ").push_bind(time_text(t));
            }
            Some(Cutoff::Version(v)) => {
                q.push(" AND version <= ").push_bind(v as i64);
            }
            None => {}
        }
        q.push(" ORDER BY version");
        decode_all(q.build().fetch_all(&self.reader).await?)
    }

    pub async fn stream_versions(&self, streams: &[&str]) -> Result<Vec<(String, i64)>, StoreError> {
        // A MAX per stream is one index probe; the streams travel as one
        // JSON array, so the statement text never changes.
        let list = serde_json::to_string(streams).expect("strings serialise");
        Ok(sqlx::query_as(
            "SELECT id, v FROM (SELECT j.value AS id, \
             (SELECT MAX(version) FROM events WHERE stream_id = j.value) AS v FROM json_each(?) j) \
             WHERE v IS NOT NULL",
        )
        .bind(list)
        .fetch_all(&self.reader)
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
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? AND version < ? \
             ORDER BY version DESC LIMIT ?"
        ))
        .bind(stream.as_str())
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        decode_all(rows)
    }

    pub async fn find_hold_placed(&self, stream: &WalletId, hold: Uuid) -> Result<Option<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? AND event_type = 'HoldPlaced' \
             AND json_extract(payload, '$.holdId') = ? LIMIT 1"
        ))
        .bind(stream.as_str())
        .bind(hold.to_string())
        .fetch_all(&self.reader)
        .await?;
        Ok(decode_all(rows)?.pop())
    }

    pub async fn read_all(&self, after: Position, limit: u32) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        decode_all(rows)
    }

    pub async fn read_log(&self, after: Position, limit: u32, f: &LogFilter) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > "));
        q.push_bind(after);
        if let Some(w) = &f.wallet {
            q.push(" AND stream_id = ").push_bind(w.as_str());
        }
        if !f.types.is_empty() {
            let types = serde_json::to_string(&f.types).expect("strings serialise");
            q.push(" AND event_type IN (SELECT value FROM json_each(")
                .push_bind(types)
                .push("))");
        }
        // Within a stream, version order is position order: its index serves.
        q.push(if f.wallet.is_some() {
            " ORDER BY version"
        } else {
            " ORDER BY position"
        });
        q.push(" LIMIT ").push_bind(i64::from(limit));
        decode_all(q.build().fetch_all(&self.reader).await?)
    }

    pub async fn read_stream_page(
        &self,
        stream: &WalletId,
        after_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ? AND version > ? ORDER BY version LIMIT ?"
        ))
        .bind(stream.as_str())
        .bind(after_version as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        decode_all(rows)
    }

    pub async fn head_position(&self) -> Result<Position, StoreError> {
        Ok(sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM events")
            .fetch_one(&self.reader)
            .await?)
    }

    pub async fn find_idempotency(&self, wallet: &WalletId, key: &str) -> Result<Option<StoredOutcome>, StoreError> {
        let row = sqlx::query("SELECT fingerprint, outcome, position FROM idempotency WHERE wallet_id = ? AND key = ?")
            .bind(wallet.as_str())
            .bind(key)
            .fetch_optional(&self.reader)
            .await?;
        row.map(|r| {
            let outcome: String = r.try_get(1)?;
            Ok(StoredOutcome {
                fingerprint: r.try_get(0)?,
                outcome: serde_json::from_str(&outcome).map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
                position: r.try_get(2)?,
            })
        })
        .transpose()
    }

    pub async fn save_snapshot(&self, s: &SnapshotRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO snapshots (stream_id, version, position, schema_version, state, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (stream_id, version) DO UPDATE \
             SET position = excluded.position, schema_version = excluded.schema_version, \
                 state = excluded.state, created_at = excluded.created_at",
        )
        .bind(s.stream.as_str())
        .bind(s.version as i64)
        .bind(s.position)
        .bind(s.schema_version)
        .bind(&s.state)
        .bind(time_text(Utc::now()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn latest_snapshot(
        &self,
        stream: &WalletId,
        schema_version: i32,
        cutoff: Option<Cutoff>,
    ) -> Result<Option<SnapshotRecord>, StoreError> {
        let mut q = QueryBuilder::<Sqlite>::new(
            "SELECT stream_id, version, position, schema_version, state FROM snapshots WHERE stream_id = ",
        );
        q.push_bind(stream.as_str())
            .push(" AND schema_version <= ")
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
            .fetch_optional(&self.reader)
            .await?
            .map(snapshot_row)
            .transpose()
    }

    pub async fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        sqlx::query(
            "SELECT stream_id, version, position, schema_version, state FROM snapshots ORDER BY stream_id, version",
        )
        .fetch_all(&self.reader)
        .await?
        .into_iter()
        .map(snapshot_row)
        .collect()
    }

    /// Readiness: the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }
}

/// The committer's writer on SQLite: the one writer connection, each batch
/// under a deadline. The connection runs on sqlx's own thread, so a batch
/// that overran its deadline may still finish; `find` waits for the
/// connection, which is free only once that batch has ended.
pub struct SqliteWriter {
    pool: SqlitePool,
    options: WriterOptions,
}

impl SqliteWriter {
    pub(crate) async fn write(&mut self, requests: &[AppendRequest]) -> Result<WrittenBatch, WriteFailure> {
        let deadline = self.options.batch_deadline;
        // Waiting for the connection sends nothing: a timeout there is a
        // batch that certainly did not happen.
        let mut conn = match tokio::time::timeout(deadline, self.pool.acquire()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(WriteFailure::NotCommitted(e.into())),
            Err(_) => {
                return Err(WriteFailure::NotCommitted(StoreError::BatchFailed(format!(
                    "the SQLite writer was busy for {deadline:?}"
                ))))
            }
        };
        let write = async {
            let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await?;
            let written = write_in(&mut tx, requests).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(written)
        };
        match tokio::time::timeout(deadline, write).await {
            Ok(Ok(written)) => Ok(written),
            // In process, an error means the transaction rolled back.
            Ok(Err(e)) => Err(WriteFailure::NotCommitted(e)),
            Err(_) => Err(WriteFailure::Unknown(StoreError::BatchFailed(format!(
                "the SQLite writer did not finish within {deadline:?}"
            )))),
        }
    }

    pub(crate) async fn find(&mut self, ids: &[Uuid], keys: &[(String, String)]) -> Result<Found, StoreError> {
        let deadline = self.options.resolve_deadline;
        let find = async {
            let mut conn = self.pool.acquire().await?;
            let ids: Vec<String> = ids.iter().map(Uuid::to_string).collect();
            let events: Vec<(String, Position, String, String)> = sqlx::query_as(
                "SELECT event_id, position, COALESCE(hash, ''), recorded_at FROM events \
                 WHERE event_id IN (SELECT value FROM json_each(?))",
            )
            .bind(serde_json::to_string(&ids).expect("strings serialise"))
            .fetch_all(&mut *conn)
            .await?;
            let pairs: Vec<[&str; 2]> = keys.iter().map(|(w, k)| [w.as_str(), k.as_str()]).collect();
            let taken: Vec<(String, String)> = sqlx::query_as(
                "SELECT i.wallet_id, i.key FROM json_each(?) q \
                 JOIN idempotency i ON i.wallet_id = json_extract(q.value, '$[0]') \
                 AND i.key = json_extract(q.value, '$[1]')",
            )
            .bind(serde_json::to_string(&pairs).expect("strings serialise"))
            .fetch_all(&mut *conn)
            .await?;
            let mut found = Found::default();
            for (id, position, hash, at) in events {
                let bad = |e: &dyn std::fmt::Display| StoreError::Database(sqlx::Error::Decode(format!("{e}").into()));
                let id = Uuid::parse_str(&id).map_err(|e| bad(&e))?;
                let at = DateTime::parse_from_rfc3339(&at)
                    .map_err(|e| bad(&e))?
                    .with_timezone(&Utc);
                found.events.insert(id, (position, hash, at));
            }
            found.keys = taken.into_iter().collect();
            Ok::<_, StoreError>(found)
        };
        tokio::time::timeout(deadline, find).await.map_err(|_| {
            StoreError::BatchFailed(format!("could not read the lost batch's outcome within {deadline:?}"))
        })?
    }
}

/// Everything of a group commit but the commit, on the single writer
/// connection (an IMMEDIATE transaction: another process, such as the CLI,
/// cannot slip in between the checks and the inserts).
async fn write_batch(
    writer: &SqlitePool,
    requests: &[AppendRequest],
) -> Result<(Transaction<'static, Sqlite>, WrittenBatch), StoreError> {
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    let written = write_in(&mut tx, requests).await?;
    Ok((tx, written))
}

/// The checks and inserts of a batch, inside an IMMEDIATE transaction.
async fn write_in(tx: &mut Transaction<'_, Sqlite>, requests: &[AppendRequest]) -> Result<WrittenBatch, StoreError> {
    // One index probe per stream (newest version first), however long the
    // stream; chunked to stay under SQLite's compound-select limit.
    let names: Vec<&str> = requests
        .iter()
        .flat_map(|r| r.streams.iter().map(|s| s.stream.as_str()))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut tips = StreamTips::new();
    for chunk in names.chunks(100) {
        let mut select = QueryBuilder::<Sqlite>::new("");
        for (i, name) in chunk.iter().enumerate() {
            if i > 0 {
                select.push(" UNION ALL ");
            }
            select
                .push(
                    "SELECT * FROM (SELECT stream_id, version, COALESCE(hash, ''), \
                     COALESCE(json_extract(payload, '$.newBalance'), '0') FROM events WHERE stream_id = ",
                )
                .push_bind(*name)
                .push(" ORDER BY version DESC LIMIT 1)");
        }
        for r in select.build().fetch_all(&mut **tx).await? {
            let balance: String = r.try_get(3)?;
            let balance =
                balance.parse().ok().and_then(Balance::from_decimal).ok_or_else(|| {
                    StoreError::Database(sqlx::Error::Decode(format!("head balance {balance:?}").into()))
                })?;
            tips.insert(
                r.try_get::<String, _>(0)?,
                Tip {
                    head: Head {
                        version: r.try_get::<i64, _>(1)? as u64,
                        balance,
                    },
                    hash: r.try_get(2)?,
                },
            );
        }
    }
    let keys: Vec<(&str, &str)> = requests
        .iter()
        .flat_map(|r| &r.idempotency)
        .map(|rec| (rec.wallet.as_str(), rec.key.as_str()))
        .collect();
    let mut taken: HashSet<(String, String)> = HashSet::new();
    for chunk in keys.chunks(200) {
        let mut q =
            QueryBuilder::<Sqlite>::new("SELECT wallet_id, key FROM idempotency WHERE (wallet_id, key) IN (VALUES ");
        let mut list = q.separated(", ");
        for (w, k) in chunk {
            list.push("(")
                .push_bind_unseparated(*w)
                .push_unseparated(", ")
                .push_bind_unseparated(*k)
                .push_unseparated(")");
        }
        q.push(")");
        for r in q.build().fetch_all(&mut **tx).await? {
            taken.insert((r.get::<String, _>(0), r.get::<String, _>(1)));
        }
    }

    let recorded_at = now();
    let at_text = time_text(recorded_at);
    let (rows, plans) = plan_batch(requests, tips, taken, recorded_at);
    let mut positions: Vec<Position> = Vec::with_capacity(rows.len());
    // SQLite takes at most 32,766 bound values a statement: 9 per row.
    for chunk in rows.chunks(INSERT_ROWS) {
        let mut insert = QueryBuilder::<Sqlite>::new(
            "INSERT INTO events (stream_id, version, event_id, event_type, schema_version, payload, metadata, recorded_at, hash) ",
        );
        insert.push_values(chunk, |mut b, row| {
            b.push_bind(row.stream.as_str())
                .push_bind(row.version as i64)
                .push_bind(row.event.event_id.to_string())
                .push_bind(row.event.event.event_type())
                .push_bind(crate::aggregate::EVENT_SCHEMA_VERSION)
                .push_bind(row.payload.to_string())
                .push_bind(row.event.metadata.to_string())
                .push_bind(at_text.clone())
                .push_bind(row.hash.as_str());
        });
        insert.push(" RETURNING position");
        let mut mine: Vec<Position> = insert.build_query_scalar().fetch_all(&mut **tx).await?;
        // RETURNING order is unspecified in SQLite; rowids follow VALUES order.
        mine.sort_unstable();
        positions.extend(mine);
    }
    let hashes: Vec<String> = rows.into_iter().map(|r| r.hash).collect();

    let records = idempotency_rows(requests, &plans, &positions);
    for chunk in records.chunks(INSERT_ROWS) {
        let mut insert =
            QueryBuilder::<Sqlite>::new("INSERT INTO idempotency (wallet_id, key, fingerprint, outcome, position) ");
        insert.push_values(chunk, |mut b, (rec, position)| {
            b.push_bind(rec.wallet.as_str())
                .push_bind(rec.key.as_str())
                .push_bind(rec.fingerprint.as_str())
                .push_bind(rec.outcome.to_string())
                .push_bind(*position);
        });
        insert.build().execute(&mut **tx).await?;
    }
    Ok(WrittenBatch {
        plans,
        positions,
        hashes,
        recorded_at,
    })
}

/// Rows a multi-row `INSERT` takes at most: 9 values each stays under
/// SQLite's 32,766 bound values a statement.
const INSERT_ROWS: usize = 3_000;

fn decode_all(rows: Vec<SqliteRow>) -> Result<Vec<RecordedEvent>, StoreError> {
    rows.into_iter().map(decode_row).collect()
}

fn decode_row(r: SqliteRow) -> Result<RecordedEvent, StoreError> {
    let position: Position = r.try_get(0)?;
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Database(sqlx::Error::Decode(
            format!("{what} at position {position}: {e}").into(),
        ))
    };
    let event_id: String = r.try_get(3)?;
    let payload: String = r.try_get(6)?;
    let metadata: String = r.try_get(7)?;
    let recorded_at: String = r.try_get(8)?;
    let hash: Option<String> = r.try_get(9)?;
    RawEvent {
        position,
        stream_id: r.try_get(1)?,
        version: r.try_get(2)?,
        event_id: Uuid::parse_str(&event_id).map_err(|e| bad("event_id", &e))?,
        event_type: r.try_get(4)?,
        schema_version: r.try_get(5)?,
        payload,
        metadata: serde_json::from_str(&metadata).map_err(|e| bad("metadata", &e))?,
        recorded_at: DateTime::parse_from_rfc3339(&recorded_at)
            .map_err(|e| bad("recorded_at", &e))?
            .with_timezone(&Utc),
        hash,
    }
    .decode()
}

fn snapshot_row(r: SqliteRow) -> Result<SnapshotRecord, StoreError> {
    let stream: String = r.try_get(0)?;
    Ok(SnapshotRecord {
        stream: WalletId::parse(&stream).map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))?,
        version: r.try_get::<i64, _>(1)? as u64,
        position: r.try_get(2)?,
        schema_version: r.try_get(3)?,
        state: r.try_get(4)?,
    })
}

/// The file behind an `sqlite:` URL, `None` for `:memory:`.
fn database_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.contains(":memory:")).then(|| std::path::PathBuf::from(path))
}
