//! Retention of the tables that only grow besides the log: `api_audit` and
//! `idempotency` (`wallet prune`). The event log itself is never pruned.
//!
//! Rows are deleted in batches of `BATCH`, each its own short transaction,
//! so a large prune never holds a long lock beside the writers. Audit ids
//! are uuid v7 (time-ordered), so the audit prune walks the primary key and
//! checks `recorded_at` as well; idempotency rows go by `created_at`.
//!
//! An idempotency key that is pruned is forgotten: a retry carrying it
//! afterwards takes effect again. Keep keys at least as long as clients may
//! retry (the replay window the README documents); the default keeps them
//! for ever.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::EventStore;

/// Rows deleted per statement.
const BATCH: i64 = 5000;

/// What a prune removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pruned {
    pub audit_rows: u64,
    pub idempotency_keys: u64,
}

/// `now - age`, or an error when `age` reaches before the epoch.
pub fn cutoff(age: Duration) -> Result<DateTime<Utc>, sqlx::Error> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| Utc::now().checked_sub_signed(age))
        .ok_or_else(|| sqlx::Error::Protocol(format!("age {age:?} is too large")))
}

/// The smallest uuid v7 of the millisecond `at`, as text: every audit id
/// made before `at` sorts below it.
fn first_uuid_v7_of(at: DateTime<Utc>) -> String {
    let ms = at.timestamp_millis().max(0) as u64;
    format!("{:08x}-{:04x}-7000-8000-000000000000", ms >> 16, ms & 0xffff)
}

/// Deletes audit rows recorded before `before`.
pub async fn prune_audit(store: &EventStore, before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let id_bound = first_uuid_v7_of(before);
    let time_bound = before.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    in_batches(|| async {
        Ok(match store {
            EventStore::Postgres(s) => sqlx::query(
                "DELETE FROM api_audit WHERE audit_id IN (SELECT audit_id FROM api_audit \
                 WHERE audit_id < $1 AND recorded_at < $2 ORDER BY audit_id LIMIT $3)",
            )
            .bind(&id_bound)
            .bind(&time_bound)
            .bind(BATCH)
            .execute(s.pool())
            .await?
            .rows_affected(),
            EventStore::Sqlite(s) => sqlx::query(
                "DELETE FROM api_audit WHERE audit_id IN (SELECT audit_id FROM api_audit \
                 WHERE audit_id < ? AND recorded_at < ? ORDER BY audit_id LIMIT ?)",
            )
            .bind(&id_bound)
            .bind(&time_bound)
            .bind(BATCH)
            .execute(s.writer())
            .await?
            .rows_affected(),
        })
    })
    .await
}

/// Deletes idempotency records created before `before`.
pub async fn prune_idempotency(store: &EventStore, before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    // The column's own format on SQLite: strftime('%Y-%m-%dT%H:%M:%fZ').
    let sqlite_bound = before.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    in_batches(|| async {
        Ok(match store {
            EventStore::Postgres(s) => sqlx::query(
                "DELETE FROM idempotency WHERE ctid IN (SELECT ctid FROM idempotency \
                 WHERE created_at < $1 LIMIT $2)",
            )
            .bind(before)
            .bind(BATCH)
            .execute(s.pool())
            .await?
            .rows_affected(),
            EventStore::Sqlite(s) => sqlx::query(
                "DELETE FROM idempotency WHERE rowid IN (SELECT rowid FROM idempotency \
                 WHERE created_at < ? LIMIT ?)",
            )
            .bind(&sqlite_bound)
            .bind(BATCH)
            .execute(s.writer())
            .await?
            .rows_affected(),
        })
    })
    .await
}

/// Runs `delete_batch` (one `DELETE` of at most `BATCH` rows) until a batch
/// comes back short, so no transaction holds many rows' locks at once.
async fn in_batches<F, Fut>(mut delete_batch: F) -> Result<u64, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, sqlx::Error>>,
{
    let mut total = 0;
    loop {
        let deleted = delete_batch().await?;
        total += deleted;
        if deleted < BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Both prunes, each only when its age is given.
pub async fn prune(
    store: &EventStore,
    audit_older_than: Option<Duration>,
    idempotency_older_than: Option<Duration>,
) -> Result<Pruned, sqlx::Error> {
    let mut pruned = Pruned::default();
    if let Some(age) = audit_older_than {
        pruned.audit_rows = prune_audit(store, cutoff(age)?).await?;
    }
    if let Some(age) = idempotency_older_than {
        pruned.idempotency_keys = prune_idempotency(store, cutoff(age)?).await?;
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uuid_bound_sorts_between_the_ids_of_its_millisecond_and_the_one_before() {
        let at = Utc::now();
        let bound = first_uuid_v7_of(at);
        let later = uuid::Uuid::now_v7().to_string();
        assert!(later >= bound, "{later} made after {bound}");
        let earlier = first_uuid_v7_of(at - chrono::Duration::milliseconds(1));
        assert!(earlier < bound);
        let parsed = uuid::Uuid::parse_str(&bound).unwrap();
        let (secs, nanos) = parsed.get_timestamp().unwrap().to_unix();
        assert_eq!(secs as i64 * 1000 + i64::from(nanos / 1_000_000), at.timestamp_millis());
    }
}
