//! Leadership: at most one process at a time does a job (the relay).
//!
//! PostgreSQL: a session advisory lock held on a connection of its own, so
//! it is released the moment that process or its connection dies and a
//! standby's next `try_lead` wins. SQLite: an exclusive lock on a file next
//! to the database, released by the OS when the process dies.

use std::collections::HashSet;
use std::sync::Mutex;

use sqlx::postgres::PgConnection;
use sqlx::Connection as _;

use super::{EventStore, StoreError};

/// First key of the two-key advisory lock space used for leadership; the
/// second is `hashtext(job)`. The append lock uses the one-key space.
const LEADER_LOCK_CLASS: i32 = 0x5741; // "WA"

/// A lock connection that does not answer within this is taken as lost.
const PING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Jobs led inside this process on an in-memory SQLite database.
static IN_MEMORY: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Proof of leadership for one job; dropping it gives leadership up.
pub enum LeaderLock {
    Postgres(PgConnection),
    File(std::fs::File),
    InMemory(String),
}

impl EventStore {
    /// Becomes the leader of `job` if no other process is; never waits.
    pub async fn try_lead(&self, job: &str) -> Result<Option<LeaderLock>, StoreError> {
        match self {
            EventStore::Postgres(s) => {
                // A connection of its own: the pool must not hand a session
                // holding the lock to anyone else, nor close it under us.
                let mut conn = s.pool().acquire().await?.detach();
                // The server keeps a session lock as long as it thinks the
                // connection lives: make it notice a dead holder in ~30 s,
                // not at the default TCP keepalive of two hours.
                sqlx::query(
                    "SELECT set_config('tcp_keepalives_idle', '10', false), \
                     set_config('tcp_keepalives_interval', '5', false), \
                     set_config('tcp_keepalives_count', '3', false), \
                     set_config('tcp_user_timeout', '30000', false)",
                )
                .execute(&mut conn)
                .await?;
                let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
                    .bind(LEADER_LOCK_CLASS)
                    .bind(job)
                    .fetch_one(&mut conn)
                    .await?;
                Ok(won.then_some(LeaderLock::Postgres(conn)))
            }
            EventStore::Sqlite(s) => match s.file() {
                Some(db) => {
                    let path = db.with_extension(format!("{job}.lock"));
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .map_err(|e| StoreError::Io(path.display().to_string(), e))?;
                    match file.try_lock() {
                        Ok(()) => Ok(Some(LeaderLock::File(file))),
                        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
                        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Io(path.display().to_string(), e)),
                    }
                }
                None => {
                    let mut held = IN_MEMORY.lock().unwrap_or_else(|p| p.into_inner());
                    let won = held.get_or_insert_with(HashSet::new).insert(job.to_owned());
                    Ok(won.then(|| LeaderLock::InMemory(job.to_owned())))
                }
            },
        }
    }
}

impl LeaderLock {
    /// False once the lock is lost (its PostgreSQL connection died): the
    /// holder must stop working at once, another process may lead now.
    pub async fn still_held(&mut self) -> bool {
        match self {
            LeaderLock::Postgres(conn) => {
                matches!(tokio::time::timeout(PING_TIMEOUT, conn.ping()).await, Ok(Ok(())))
            }
            LeaderLock::File(_) | LeaderLock::InMemory(_) => true,
        }
    }
}

impl Drop for LeaderLock {
    fn drop(&mut self) {
        // The PostgreSQL connection closes (and unlocks) as it drops, the
        // file unlocks as it closes.
        if let LeaderLock::InMemory(job) = self {
            if let Some(held) = IN_MEMORY.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                held.remove(job);
            }
        }
    }
}
