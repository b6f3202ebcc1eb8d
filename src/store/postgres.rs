//! The PostgreSQL backend.
//!
//! Appends take a transaction-scoped advisory lock before they write, so
//! appends commit one after another and positions become visible in order
//! (PostgreSQL releases the lock only after the commit is visible).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Row as _, Transaction};

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection as _;
use uuid::Uuid;

use super::cluster::{self, Cluster};
use super::writer::{Found, Reconnect, WriteFailure, WriterOptions};
use super::{
    chain, AppendError, AppendRequest, Cutoff, Head, LogFilter, Plan, Position, RawEvent, RecordedEvent,
    SnapshotRecord, StoreError, StoreError as E, StoredOutcome, WrittenBatch,
};
use crate::aggregate::{Balance, WalletId};

/// Asking every host of a cluster which one is the primary.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(3);

/// Key of the advisory lock that serialises appends (per database).
const APPEND_LOCK: i64 = 0x7761_6c6c_6574; // "wallet"

const EVENT_COLUMNS: &str =
    "position, stream_id, version, event_id, event_type, schema_version, payload::text, metadata, recorded_at, hash";

#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
    cluster: Arc<Cluster>,
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
    /// Connects to the one host of `url`, or to the primary of its host
    /// list, and follows the primary from then on (`cluster::follow`).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let cluster = Arc::new(Cluster::parse(url)?);
        let primary = cluster.primary(DISCOVERY_TIMEOUT).await?;
        let options = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5));
        let pool = match cluster.is_single() {
            true => options.connect_with(primary).await?,
            false => cluster::following_pool(options, primary, cluster.clone()).await?,
        };
        Ok(Self { pool, cluster })
    }

    /// A store on a pool made elsewhere (a standby's, for reads).
    pub(crate) fn from_pool(pool: PgPool) -> Self {
        let cluster = Arc::new(Cluster::of((*pool.connect_options()).clone()));
        Self { pool, cluster }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The hosts this store was given.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Applies the migrations, then checks what correctness depends on.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres").run(&self.pool).await?;
        // Readers by position rely on positions becoming visible in order:
        // a sequence cache above 1 hands each session its own block of
        // positions, so a later commit could carry a lower position.
        let cache: Option<i64> = sqlx::query_scalar(
            "SELECT s.seqcache FROM pg_sequence s \
             WHERE s.seqrelid = pg_get_serial_sequence('events', 'position')::regclass",
        )
        .fetch_optional(&self.pool)
        .await?;
        match cache {
            Some(1) => Ok(()),
            other => Err(StoreError::Misconfigured(format!(
                "the identity sequence of events.position has cache {other:?}; it must be 1, or readers \
                 of the log could skip events (ALTER TABLE events ALTER COLUMN position SET CACHE 1)"
            ))),
        }
    }

    /// Several appends in one transaction on a pooled connection.
    pub(crate) async fn append_batch(&self, requests: &[AppendRequest]) -> Result<WrittenBatch, StoreError> {
        write_batch(&self.pool, requests).await
    }

    /// The committer's writer: a connection of its own with explicit limits.
    pub(crate) fn batch_writer(&self, options: WriterOptions) -> PgWriter {
        PgWriter::new(self.cluster.clone(), options)
    }

    /// A single append with its transaction left open (tests hold it open).
    pub async fn begin_append(&self, request: AppendRequest) -> Result<PendingAppend, AppendError> {
        let requests = vec![request];
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let events = write_batch(&mut *tx, &requests).await?.single(requests)?;
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

    pub async fn find_hold_placed(&self, stream: &WalletId, hold: Uuid) -> Result<Option<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND event_type = 'HoldPlaced' \
             AND payload ->> 'holdId' = $2 LIMIT 1"
        ))
        .bind(stream.as_str())
        .bind(hold.to_string())
        .fetch_all(&self.pool)
        .await?;
        Ok(decode_all(rows)?.pop())
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

    pub async fn read_log(&self, after: Position, limit: u32, f: &LogFilter) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > "));
        q.push_bind(after);
        if let Some(w) = &f.wallet {
            q.push(" AND stream_id = ").push_bind(w.as_str());
        }
        if !f.types.is_empty() {
            q.push(" AND event_type = ANY(").push_bind(&f.types).push(")");
        }
        // Within a stream, version order is position order: its index serves.
        q.push(if f.wallet.is_some() {
            " ORDER BY version"
        } else {
            " ORDER BY position"
        });
        q.push(" LIMIT ").push_bind(i64::from(limit));
        decode_all(q.build().fetch_all(&self.pool).await?)
    }

    pub async fn read_stream_page(
        &self,
        stream: &WalletId,
        after_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version LIMIT $3"
        ))
        .bind(stream.as_str())
        .bind(after_version as i64)
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

    /// Readiness: the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Readiness of writes: the primary commits to `required` synchronous
    /// standbys, as configured and as connected.
    pub async fn check_quorum(&self, required: u32) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        let address = cluster::address(&self.pool.connect_options());
        check_quorum(&mut conn, required, &address).await
    }
}

/// Everything of a group commit, in one statement: the `wallet_append`
/// function (migrations 0007-0009) takes the append lock, reads the stream heads
/// and idempotency keys of the whole batch, guards each request in order
/// (key, then expected heads), links the hash chains and inserts. One round
/// trip keeps the time the lock is held (which serialises all appends)
/// short.
async fn write_batch<'c, E>(executor: E, requests: &[AppendRequest]) -> Result<WrittenBatch, StoreError>
where
    E: sqlx::PgExecutor<'c>,
{
    let args = BatchArgs::of(requests);
    let rows = sqlx::query(
        // The rows pair with the requests by position: ordered explicitly,
        // not by the function scan's habit.
        "SELECT o_status, o_positions, o_hashes, o_versions, o_balances, o_recorded_at FROM wallet_append(\
         $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
         WITH ORDINALITY AS r ORDER BY r.ordinality",
    )
    .bind(APPEND_LOCK)
    .bind(crate::aggregate::EVENT_SCHEMA_VERSION)
    .bind(requests.len() as i32)
    .bind(&args.key_requests)
    .bind(&args.key_wallets)
    .bind(&args.keys)
    .bind(&args.fingerprints)
    .bind(&args.outcomes)
    .bind(&args.s_request)
    .bind(&args.s_stream)
    .bind(&args.s_version)
    .bind(&args.s_balance)
    .bind(&args.s_on_batch)
    .bind(&args.e_segment)
    .bind(&args.e_id)
    .bind(&args.e_type)
    .bind(&args.e_payload)
    .bind(&args.e_metadata)
    .bind(&args.e_body)
    .fetch_all(executor)
    .await?;
    written_batch(requests, rows)
}

/// A batch as the parallel arrays `wallet_append` takes.
#[derive(Default)]
struct BatchArgs<'a> {
    key_requests: Vec<i32>,
    key_wallets: Vec<&'a str>,
    keys: Vec<&'a str>,
    fingerprints: Vec<&'a str>,
    outcomes: Vec<String>,
    s_request: Vec<i32>,
    s_stream: Vec<&'a str>,
    s_version: Vec<i64>,
    s_balance: Vec<String>,
    s_on_batch: Vec<bool>,
    e_segment: Vec<i32>,
    e_id: Vec<Uuid>,
    e_type: Vec<&'static str>,
    e_payload: Vec<String>,
    e_metadata: Vec<String>,
    e_body: Vec<Vec<u8>>,
}

impl<'a> BatchArgs<'a> {
    fn of(requests: &'a [AppendRequest]) -> Self {
        let mut a = BatchArgs::default();
        for (r, request) in requests.iter().enumerate() {
            for rec in &request.idempotency {
                a.key_requests.push(r as i32 + 1);
                a.key_wallets.push(rec.wallet.as_str());
                a.keys.push(rec.key.as_str());
                a.fingerprints.push(rec.fingerprint.as_str());
                a.outcomes.push(rec.outcome.to_string());
            }
            for s in &request.streams {
                a.s_request.push(r as i32 + 1);
                a.s_stream.push(s.stream.as_str());
                a.s_version.push(s.expected.version as i64);
                a.s_balance.push(s.expected.balance.to_string());
                a.s_on_batch.push(s.on_batch);
                for (i, event) in s.events.iter().enumerate() {
                    let payload = event.event.payload();
                    let payload_json = payload.to_string();
                    let metadata_json = event.metadata.to_string();
                    let canonical = chain::Canonical {
                        stream: s.stream.as_str(),
                        version: s.expected.version + 1 + i as u64,
                        event_id: event.event_id,
                        event_type: event.event.event_type(),
                        schema_version: crate::aggregate::EVENT_SCHEMA_VERSION,
                        payload: &payload,
                        metadata: &event.metadata,
                        // Not part of the body: the function adds the time it takes under the lock.
                        recorded_at: chrono::DateTime::UNIX_EPOCH,
                    };
                    a.e_body
                        .push(chain::body_with_json(&canonical, &payload_json, &metadata_json));
                    a.e_segment.push(a.s_stream.len() as i32);
                    a.e_id.push(event.event_id);
                    a.e_type.push(event.event.event_type());
                    a.e_payload.push(payload_json);
                    a.e_metadata.push(metadata_json);
                }
            }
        }
        a
    }
}

/// Reads `wallet_append`'s rows, one per request, into each request's plan.
fn written_batch(requests: &[AppendRequest], rows: Vec<PgRow>) -> Result<WrittenBatch, StoreError> {
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
        recorded_at = Some(row.try_get::<DateTime<Utc>, _>(5)?);
        let status: String = row.try_get(0)?;
        let plan = match status.as_str() {
            "ok" => {
                let mine: Vec<Position> = row.try_get::<Option<Vec<Position>>, _>(1)?.unwrap_or_default();
                let links: Vec<String> = row.try_get::<Option<Vec<String>>, _>(2)?.unwrap_or_default();
                let events: usize = request.streams.iter().map(|s| s.events.len()).sum();
                if mine.len() != events || links.len() != events {
                    return Err(StoreError::BatchFailed(format!(
                        "wallet_append answered {} positions for {events} events",
                        mine.len()
                    )));
                }
                let plan = Plan::Accepted {
                    first: positions.len(),
                    count: mine.len(),
                };
                positions.extend(mine);
                hashes.extend(links);
                plan
            }
            "duplicate" => Plan::Duplicate,
            _ => Plan::Conflict(conflict_heads(request, &row)?),
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
        recorded_at: recorded_at.unwrap_or_else(Utc::now),
    })
}

/// The actual heads a conflicting request's row carries, one per stream.
fn conflict_heads(request: &AppendRequest, row: &PgRow) -> Result<Vec<(WalletId, Head)>, StoreError> {
    let versions: Vec<i64> = row.try_get::<Option<Vec<i64>>, _>(3)?.unwrap_or_default();
    let balances: Vec<String> = row.try_get::<Option<Vec<String>>, _>(4)?.unwrap_or_default();
    if versions.len() != request.streams.len() || balances.len() != request.streams.len() {
        return Err(StoreError::BatchFailed(
            "wallet_append: a conflict without its heads".to_owned(),
        ));
    }
    request
        .streams
        .iter()
        .zip(versions.into_iter().zip(balances))
        .map(|(s, (version, balance))| {
            let balance = balance
                .parse()
                .ok()
                .and_then(Balance::from_decimal)
                .ok_or_else(|| StoreError::BatchFailed(format!("wallet_append: head balance {balance:?}")))?;
            Ok((
                s.stream.clone(),
                Head {
                    version: version as u64,
                    balance,
                },
            ))
        })
        .collect()
}

/// Whether PostgreSQL answered the statement with an ERROR (so it rolled
/// back), as opposed to a broken connection or a FATAL/PANIC.
fn refused(e: &StoreError) -> bool {
    let StoreError::Database(sqlx::Error::Database(db)) = e else {
        return false;
    };
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some_and(|pg| pg.severity() == sqlx::postgres::PgSeverity::Error)
}

/// The committer's connection to PostgreSQL: its own session with explicit
/// settings, on the primary found anew at every connect, a deadline per
/// batch, and reconnection with backoff.
pub struct PgWriter {
    cluster: Arc<Cluster>,
    options: WriterOptions,
    session: Option<Session>,
    /// The session of a batch whose answer was lost: ended before the
    /// batch's outcome is read, so it cannot commit after we looked.
    suspect: Option<(i32, DateTime<Utc>)>,
    reconnect: Reconnect,
}

struct Session {
    conn: PgConnection,
    pid: i32,
    started: DateTime<Utc>,
}

/// The committer's session settings: what correctness depends on, pinned
/// rather than inherited.
fn session_options(host: PgConnectOptions, options: &WriterOptions) -> PgConnectOptions {
    let ms = |d: Duration| d.as_millis().to_string();
    host.application_name("wallet-committer").options([
        ("synchronous_commit", "on".to_owned()),
        // Spaces in a startup option are escaped.
        ("default_transaction_isolation", "read\\ committed".to_owned()),
        ("statement_timeout", ms(options.statement_timeout)),
        ("lock_timeout", ms(options.lock_timeout)),
        ("idle_in_transaction_session_timeout", ms(options.batch_deadline)),
        // The server notices a dead committer in ~25 s, not two hours;
        // the committer notices a dead server by its batch deadline.
        ("tcp_keepalives_idle", "10".to_owned()),
        ("tcp_keepalives_interval", "5".to_owned()),
        ("tcp_keepalives_count", "3".to_owned()),
        ("tcp_user_timeout", "25000".to_owned()),
    ])
}

impl PgWriter {
    fn new(cluster: Arc<Cluster>, options: WriterOptions) -> Self {
        Self {
            reconnect: Reconnect::new(&options),
            cluster,
            options,
            session: None,
            suspect: None,
        }
    }

    pub(crate) async fn write(&mut self, requests: &[AppendRequest]) -> Result<WrittenBatch, WriteFailure> {
        let deadline = self.options.batch_deadline;
        let required = self.options.require_sync_standbys;
        let session = self.session().await.map_err(WriteFailure::NotCommitted)?;
        match tokio::time::timeout(deadline, write_batch(&mut session.conn, requests)).await {
            Ok(Ok(written)) if required == 0 => Ok(written),
            Ok(Ok(written)) => match quorum_held(&mut session.conn, required, deadline).await {
                Ok(()) => Ok(written),
                // The commit may have been released without a standby:
                // not acknowledged, resolved (and the fence says unknown).
                Err(e) => Err(self.lost(e)),
            },
            // The server refused the statement with an ERROR: its implicit
            // transaction rolled back, and the session is still good. A
            // FATAL or PANIC ends the session at a moment we cannot place.
            Ok(Err(e)) if refused(&e) => Err(WriteFailure::NotCommitted(e)),
            Ok(Err(e)) => Err(self.lost(e)),
            Err(_) => Err(self.lost(StoreError::BatchFailed(format!(
                "no answer from PostgreSQL within {deadline:?}"
            )))),
        }
    }

    /// The batch was sent and its answer lost: drop the session, remember it.
    fn lost(&mut self, e: StoreError) -> WriteFailure {
        if let Some(s) = self.session.take() {
            self.suspect = Some((s.pid, s.started));
        }
        WriteFailure::Unknown(e)
    }

    async fn session(&mut self) -> Result<&mut Session, StoreError> {
        if self.session.is_none() {
            if !self.reconnect.due() {
                return Err(StoreError::BatchFailed(
                    "the committer is reconnecting to PostgreSQL".to_owned(),
                ));
            }
            match self.open().await {
                Ok(session) => {
                    self.reconnect.succeeded();
                    self.session = Some(session);
                }
                Err(e) => {
                    self.reconnect.failed();
                    return Err(e);
                }
            }
        }
        Ok(self.session.as_mut().expect("just opened"))
    }

    /// A new session on the primary (found anew: it may have moved), and who
    /// it is on the server, within the connect timeout. Refused when the
    /// primary runs without the synchronous standbys required.
    async fn open(&self) -> Result<Session, StoreError> {
        let timeout = self.options.connect_timeout;
        // Finding the primary has a deadline of its own: a frozen host
        // must not eat the connect's.
        let host = self.cluster.primary(DISCOVERY_TIMEOUT).await?;
        let open = async {
            let address = cluster::address(&host);
            let mut conn = PgConnection::connect_with(&session_options(host, &self.options)).await?;
            let (pid, started, standby): (i32, DateTime<Utc>, bool) = sqlx::query_as(
                "SELECT pid, backend_start, pg_is_in_recovery() FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            )
            .fetch_one(&mut conn)
            .await?;
            if standby {
                return Err(StoreError::NoPrimary(format!("{address} turned standby")));
            }
            check_quorum(&mut conn, self.options.require_sync_standbys, &address).await?;
            Ok::<_, StoreError>(Session { conn, pid, started })
        };
        tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| StoreError::BatchFailed(format!("could not connect to PostgreSQL within {timeout:?}")))?
    }

    /// What became of a lost batch, tried again (a new connection to the
    /// primary found anew, after a pause) until the resolve deadline: a
    /// database that is back, or a standby promoted in time, answers.
    pub(crate) async fn find(&mut self, ids: &[Uuid], keys: &[(String, String)]) -> Result<Found, StoreError> {
        let deadline = tokio::time::Instant::now() + self.options.resolve_deadline;
        let suspect = self.suspect.take();
        let mut pauses = crate::backoff::Backoff::between(self.options.reconnect_min, self.options.reconnect_max);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match tokio::time::timeout_at(deadline, self.find_once(suspect, ids, keys)).await {
                Ok(Ok(found)) => return Ok(found),
                Ok(Err(e)) => e,
                Err(_) => StoreError::BatchFailed(format!(
                    "could not read the lost batch's outcome within {:?}",
                    self.options.resolve_deadline
                )),
            };
            let pause = pauses.next_pause();
            if tokio::time::Instant::now() + pause >= deadline {
                // Still unknown: the next resolve must end that session too.
                self.suspect = self.suspect.or(suspect);
                tracing::warn!(attempts, error = %last, "the lost batch's outcome stays unknown");
                return Err(last);
            }
            tracing::info!(attempt = attempts, error = %last, ?pause, "resolving the lost batch again");
            tokio::time::sleep(pause).await;
        }
    }

    /// On a fresh connection to the primary: end the lost batch's session
    /// (if it still runs there; a session waiting for its standbys holds the
    /// append lock), wait for the append lock (so nothing of it is in
    /// progress), read which of its events and keys are in the log, and
    /// commit the quorum fence: only a fence the quorum acknowledged proves
    /// that what was read is on a standby too.
    async fn find_once(
        &self,
        suspect: Option<(i32, DateTime<Utc>)>,
        ids: &[Uuid],
        keys: &[(String, String)],
    ) -> Result<Found, StoreError> {
        let mut conn = self.open().await?.conn;
        if let Some((pid, started)) = suspect {
            end_session(&mut conn, pid, started).await?;
        }
        let mut tx = conn.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(APPEND_LOCK)
            .execute(&mut *tx)
            .await?;
        let found = read_found(&mut tx, ids, keys).await?;
        if self.options.fence {
            let quorum: String = sqlx::query_scalar(
                "UPDATE quorum_fence SET fenced_at = now() WHERE id = 1 \
                 RETURNING current_setting('synchronous_standby_names')",
            )
            .fetch_one(&mut *tx)
            .await?;
            let required = self.options.require_sync_standbys;
            if cluster::sync_standbys_required(&quorum) < required {
                return Err(StoreError::QuorumMissing(format!(
                    "synchronous_standby_names is {quorum:?} ({required} standbys required)"
                )));
            }
        }
        // With the fence, this commit returns once the quorum has it, or
        // once a failover manager drops the quorum: hence the check after.
        tx.commit().await?;
        if self.options.fence && self.options.require_sync_standbys > 0 {
            quorum_held(
                &mut conn,
                self.options.require_sync_standbys,
                self.options.resolve_deadline,
            )
            .await?;
        }
        Ok(found)
    }
}

/// After a commit: whether the quorum still stood when it returned. A
/// failover manager that drops synchronous replication (pg_auto_failover,
/// once no standby is left) releases the commits waiting for a standby, and
/// the setting that did it reaches this session before its next statement
/// (a backend reloads its configuration between statements).
async fn quorum_held(conn: &mut PgConnection, required: u32, deadline: Duration) -> Result<(), StoreError> {
    let names: String = tokio::time::timeout(
        deadline,
        sqlx::query_scalar("SELECT current_setting('synchronous_standby_names')").fetch_one(&mut *conn),
    )
    .await
    .map_err(|_| StoreError::BatchFailed("no answer to the quorum check".to_owned()))??;
    match cluster::sync_standbys_required(&names) >= required {
        true => Ok(()),
        false => Err(StoreError::QuorumMissing(format!(
            "synchronous_standby_names became {names:?} ({required} standbys required)"
        ))),
    }
}

/// Ends the session `pid` (started at `started`) if it still runs. No row:
/// that session is gone. `false`: it outlived the wait and could still
/// commit after we look.
async fn end_session(conn: &mut PgConnection, pid: i32, started: DateTime<Utc>) -> Result<(), StoreError> {
    let ended: Option<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 2000) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2",
    )
    .bind(pid)
    .bind(started)
    .fetch_optional(conn)
    .await?;
    match ended {
        Some(false) => Err(StoreError::BatchFailed(format!(
            "the lost batch's session {pid} did not end"
        ))),
        _ => Ok(()),
    }
}

/// Which of `ids` and `keys` the log holds.
async fn read_found(
    tx: &mut Transaction<'_, Postgres>,
    ids: &[Uuid],
    keys: &[(String, String)],
) -> Result<Found, StoreError> {
    let events: Vec<(Uuid, Position, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT event_id, position, coalesce(hash, ''), recorded_at FROM events WHERE event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    let (wallets, names): (Vec<&str>, Vec<&str>) = keys.iter().map(|(w, k)| (w.as_str(), k.as_str())).unzip();
    let taken: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.wallet_id, i.key FROM unnest($1::text[], $2::text[]) AS q(w, k) \
         JOIN idempotency i ON i.wallet_id = q.w AND i.key = q.k",
    )
    .bind(&wallets)
    .bind(&names)
    .fetch_all(&mut **tx)
    .await?;
    Ok(Found {
        events: events.into_iter().map(|(id, p, h, t)| (id, (p, h, t))).collect(),
        keys: taken.into_iter().collect(),
    })
}

/// Refuses a primary whose commits would not wait for `required`
/// standbys: as configured (`synchronous_standby_names`) and as connected
/// (`pg_stat_replication`), so a write is refused at once instead of
/// waiting for a quorum that is not there.
async fn check_quorum(conn: &mut PgConnection, required: u32, address: &str) -> Result<(), StoreError> {
    if required == 0 {
        return Ok(());
    }
    let (names, streaming, hidden): (String, i64, i64) = sqlx::query_as(
        "SELECT current_setting('synchronous_standby_names'), \
         (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state IN ('sync', 'quorum')), \
         (SELECT count(*) FROM pg_stat_replication WHERE state IS NULL)",
    )
    .fetch_one(&mut *conn)
    .await?;
    // A role without pg_read_all_stats sees the standbys' rows empty.
    if hidden > 0 {
        return Err(StoreError::Misconfigured(format!(
            "{address}: this role cannot read pg_stat_replication, so the quorum cannot be checked \
             (GRANT pg_monitor TO <the service's role>)"
        )));
    }
    let configured = cluster::sync_standbys_required(&names);
    if configured < required {
        return Err(StoreError::QuorumMissing(format!(
            "{address}: synchronous_standby_names is {names:?}, commits wait for {configured} standbys, {required} required"
        )));
    }
    if streaming < i64::from(required) {
        return Err(StoreError::QuorumMissing(format!(
            "{address}: {streaming} synchronous standbys streaming, {required} required"
        )));
    }
    Ok(())
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
