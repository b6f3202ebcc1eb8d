//! The `api_audit` trail: one record per mutating request, written off the
//! request's path by a background task, in batches.
//!
//! An audit failure never changes a client's answer: records go through a
//! bounded queue (a request waits at most `ENQUEUE_WAIT` for room, then the
//! record is dropped, logged and counted in `audit_dropped_total`), and a
//! failed insert is logged and counted, never raised. The audit id of the
//! request being served travels as a task-local (`AUDIT_ID`), like a tracing
//! span, so the ledger can put it into the events' metadata without every
//! command carrying it.

use std::time::Duration;

use sqlx::QueryBuilder;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::store::EventStore;

/// Records waiting to be written, at most.
const QUEUE: usize = 4096;
/// Records per insert, at most.
const BATCH: usize = 1024;
/// Under load, inserts are at least this far apart: each insert is a commit
/// (a WAL flush) competing with the appends, so a busy service writes a few
/// large batches a second instead of one small batch per group commit. An
/// idle service writes a record at once.
const PACE: Duration = Duration::from_millis(50);
/// Longest a request waits for room in a full queue.
const ENQUEUE_WAIT: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The audit id of the request this task is serving.
    pub static AUDIT_ID: Uuid;
}

tokio::task_local! {
    /// The W3C `traceparent` of the write this task is serving, if valid.
    pub static TRACEPARENT: Option<String>;
}

/// The audit id of the request being served, if any.
pub fn current_audit_id() -> Option<Uuid> {
    AUDIT_ID.try_with(|id| *id).ok()
}

/// The trace context of the write being served, if it sent a valid one.
pub fn current_traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok().flatten()
}

/// `traceparent` if it is a W3C trace context (`00-<32 hex>-<16 hex>-<2
/// hex>`, ids not all zero), so nothing else is kept in the log.
pub fn valid_traceparent(value: &str) -> Option<String> {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let ok = parts.len() == 4
        && hex(parts[0], 2)
        && parts[0] != "ff"
        && hex(parts[1], 32)
        && parts[1].bytes().any(|b| b != b'0')
        && hex(parts[2], 16)
        && parts[2].bytes().any(|b| b != b'0')
        && hex(parts[3], 2);
    ok.then(|| value.to_owned())
}

/// One audited request; every field already bounded and redacted.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub audit_id: Uuid,
    pub recorded_at: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub wallet_id: Option<String>,
    pub request_id: Option<String>,
    pub client_ip: Option<String>,
    /// JSON object of header names to values.
    pub headers: String,
    pub body: String,
    pub duration_ms: i64,
}

/// What the writer task receives: records, and flush requests answered
/// once everything queued before them is written.
#[derive(Debug)]
enum Message {
    Record(Box<AuditRecord>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Where audit records go; cheap to clone.
#[derive(Debug, Clone)]
pub struct AuditLog {
    queue: mpsc::Sender<Message>,
}

impl AuditLog {
    /// Starts the writer task on `store`.
    pub fn spawn(store: EventStore) -> Self {
        let (queue, mut incoming) = mpsc::channel::<Message>(QUEUE);
        tokio::spawn(async move {
            let mut last_insert: Option<tokio::time::Instant> = None;
            while let Some(first) = incoming.recv().await {
                let mut batch = Vec::new();
                let mut flushes = Vec::new();
                let mut next = Some(first);
                let not_before = last_insert.map(|at| at + PACE);
                while let Some(message) = next.take() {
                    match message {
                        Message::Record(r) => batch.push(*r),
                        Message::Flush(done) => flushes.push(done),
                    }
                    if batch.len() >= BATCH {
                        break;
                    }
                    next = match incoming.try_recv() {
                        Ok(message) => Some(message),
                        // Nothing waiting: wait for more while the pace
                        // allows, unless someone waits on a flush.
                        Err(_) => match not_before {
                            Some(at) if flushes.is_empty() => {
                                tokio::time::timeout_at(at, incoming.recv()).await.ok().flatten()
                            }
                            _ => None,
                        },
                    };
                }
                if !batch.is_empty() {
                    last_insert = Some(tokio::time::Instant::now());
                    if let Err(e) = insert(&store, &batch).await {
                        metrics::counter!("audit_write_failures_total").increment(batch.len() as u64);
                        tracing::error!(error = %e, records = batch.len(), "audit records not written");
                    }
                }
                for done in flushes {
                    let _ = done.send(());
                }
            }
        });
        Self { queue }
    }

    /// Waits (at most `timeout`) until every record queued so far is written.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done, written) = tokio::sync::oneshot::channel();
        let flushed = async { self.queue.send(Message::Flush(done)).await.is_ok() && written.await.is_ok() };
        matches!(tokio::time::timeout(timeout, flushed).await, Ok(true))
    }

    /// Queues a record without waiting: a full queue drops it (counted and
    /// logged). For requests refused before they were read, so a flood of
    /// them cannot hold requests waiting on the audit.
    pub fn try_record(&self, record: AuditRecord) {
        let audit_id = record.audit_id;
        if self.queue.try_send(Message::Record(Box::new(record))).is_err() {
            metrics::counter!("audit_dropped_total").increment(1);
            tracing::warn!(%audit_id, "audit queue full: record of a refused request dropped");
        }
    }

    pub async fn record(&self, record: AuditRecord) {
        let audit_id = record.audit_id;
        if self
            .queue
            .send_timeout(Message::Record(Box::new(record)), ENQUEUE_WAIT)
            .await
            .is_err()
        {
            metrics::counter!("audit_dropped_total").increment(1);
            tracing::error!(%audit_id, "audit queue full or closed: record dropped");
        }
    }
}

macro_rules! insert_rows {
    ($db:ty, $pool:expr, $rows:expr) => {{
        let mut q = QueryBuilder::<$db>::new(
            "INSERT INTO api_audit (audit_id, recorded_at, method, path, status, wallet_id, request_id, \
             client_ip, headers, body, duration_ms) ",
        );
        q.push_values($rows, |mut b, r| {
            b.push_bind(r.audit_id.to_string())
                .push_bind(r.recorded_at.as_str())
                .push_bind(r.method.as_str())
                .push_bind(r.path.as_str())
                .push_bind(i32::from(r.status))
                .push_bind(r.wallet_id.as_deref())
                .push_bind(r.request_id.as_deref())
                .push_bind(r.client_ip.as_deref())
                .push_bind(r.headers.as_str())
                .push_bind(r.body.as_str())
                .push_bind(r.duration_ms);
        });
        q.push(" ON CONFLICT (audit_id) DO NOTHING");
        q.build().execute($pool).await.map(|_| ())
    }};
}

/// PostgreSQL takes the batch as arrays: one statement text for any batch
/// size, prepared once per connection.
async fn insert_pg(pool: &sqlx::PgPool, rows: &[AuditRecord]) -> Result<(), sqlx::Error> {
    let ids: Vec<String> = rows.iter().map(|r| r.audit_id.to_string()).collect();
    let column = |f: fn(&AuditRecord) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
    let optional = |f: fn(&AuditRecord) -> Option<&str>| rows.iter().map(f).collect::<Vec<Option<&str>>>();
    sqlx::query(
        "INSERT INTO api_audit (audit_id, recorded_at, method, path, status, wallet_id, request_id, \
         client_ip, headers, body, duration_ms) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], $7::text[], \
         $8::text[], $9::text[], $10::text[], $11::bigint[]) ON CONFLICT (audit_id) DO NOTHING",
    )
    .bind(&ids)
    .bind(column(|r| r.recorded_at.as_str()))
    .bind(column(|r| r.method.as_str()))
    .bind(column(|r| r.path.as_str()))
    .bind(rows.iter().map(|r| i32::from(r.status)).collect::<Vec<i32>>())
    .bind(optional(|r| r.wallet_id.as_deref()))
    .bind(optional(|r| r.request_id.as_deref()))
    .bind(optional(|r| r.client_ip.as_deref()))
    .bind(column(|r| r.headers.as_str()))
    .bind(column(|r| r.body.as_str()))
    .bind(rows.iter().map(|r| r.duration_ms).collect::<Vec<i64>>())
    .execute(pool)
    .await
    .map(|_| ())
}

async fn insert(store: &EventStore, rows: &[AuditRecord]) -> Result<(), sqlx::Error> {
    match store {
        EventStore::Postgres(s) => insert_pg(s.pool(), rows).await,
        EventStore::Sqlite(s) => insert_rows!(sqlx::Sqlite, s.writer(), rows),
    }
}
