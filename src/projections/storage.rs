//! Read-model storage: one document table per projection, and checkpoints.
//!
//! Every read model has the same table shape (`key`, `kind`, `wallet_id`,
//! `sort`, `tag`, `body` as JSON text), so one set of queries serves all
//! projections on both backends. Bodies are stored as text: what the runner
//! wrote is byte for byte what a reader gets, and what a rebuild compares.

use chrono::Utc;
use sqlx::{Postgres, QueryBuilder, Row, Sqlite, Transaction};
use uuid::Uuid;

use crate::store::{EventStore, Position, StoreError};

/// Advisory lock key serialising read-model schema changes ("rmschema").
const SCHEMA_LOCK: i64 = 0x726d_7363_6865_6d61;

/// Rows per multi-row statement (6 binds each; well under both backends' limits).
const CHUNK: usize = 500;

/// One read-model document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    pub key: String,
    pub kind: String,
    pub wallet_id: String,
    /// Order within (kind, wallet): a stream version or a log position.
    pub sort: i64,
    pub tag: Option<String>,
    /// JSON text.
    pub body: String,
}

/// A page of documents of one kind, newest (highest `sort`) first.
#[derive(Debug, Clone)]
pub struct DocQuery<'a> {
    pub kind: &'a str,
    pub wallet_id: Option<&'a str>,
    pub tag: Option<&'a str>,
    pub before_sort: Option<i64>,
    /// With `before_sort`: also the documents of that very `sort` whose key
    /// is below this one (a cursor naming one document where several share
    /// a `sort`, as two flags of one event do).
    pub before_key: Option<&'a str>,
    pub limit: u32,
}

/// A write transaction on whichever backend the store uses.
pub enum Tx {
    Pg(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// Runs `$body` once per backend with `$conn` bound to the transaction and
/// `$db` to the backend's sqlx database type. `$lock` is the row-lock
/// suffix (SQLite's IMMEDIATE transaction already excludes other writers).
macro_rules! on_tx {
    ($tx:expr, $conn:ident, $db:ident, $lock:ident => $body:block) => {
        match $tx {
            Tx::Pg($conn) => {
                #[allow(dead_code)]
                type $db = sqlx::Postgres;
                #[allow(dead_code)]
                const $lock: &str = " FOR UPDATE";
                $body
            }
            Tx::Sqlite($conn) => {
                #[allow(dead_code)]
                type $db = sqlx::Sqlite;
                #[allow(dead_code)]
                const $lock: &str = "";
                $body
            }
        }
    };
}

/// Like `on_tx!` for reads outside a transaction, on the reading pool.
macro_rules! on_reader {
    ($store:expr, $pool:ident, $db:ident => $body:block) => {
        match $store {
            EventStore::Postgres(s) => {
                let $pool = s.pool();
                type $db = sqlx::Postgres;
                $body
            }
            EventStore::Sqlite(s) => {
                let $pool = s.reader();
                type $db = sqlx::Sqlite;
                $body
            }
        }
    };
}

fn check_table_name(table: &str) {
    assert!(
        !table.is_empty() && table.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "read-model table names are fixed identifiers, got {table:?}"
    );
}

fn now_text() -> String {
    Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn row_to_doc<R: Row>(r: R) -> Result<Doc, sqlx::Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(Doc {
        key: r.try_get("key")?,
        kind: r.try_get("kind")?,
        wallet_id: r.try_get("wallet_id")?,
        sort: r.try_get("sort")?,
        tag: r.try_get("tag")?,
        body: r.try_get("body")?,
    })
}

impl Tx {
    /// Begins a write transaction. On SQLite it is IMMEDIATE: it takes the
    /// write lock now, so two processes never deadlock upgrading a read.
    pub async fn begin(store: &EventStore) -> Result<Tx, StoreError> {
        Ok(match store {
            EventStore::Postgres(s) => Tx::Pg(s.pool().begin().await?),
            EventStore::Sqlite(s) => Tx::Sqlite(s.writer().begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// A write transaction whose commit does not wait for the disk
    /// (PostgreSQL `synchronous_commit = off`). Only for work that is
    /// re-derived from the log after a crash: the in-process runner and
    /// rebuilds, whose documents and checkpoint commit (or vanish) together.
    /// Never for the broker worker, which acknowledges messages after commit.
    pub async fn begin_relaxed(store: &EventStore) -> Result<Tx, StoreError> {
        let mut tx = Tx::begin(store).await?;
        if let Tx::Pg(conn) = &mut tx {
            sqlx::query("SET LOCAL synchronous_commit = off")
                .execute(&mut **conn)
                .await?;
        }
        Ok(tx)
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        match self {
            Tx::Pg(tx) => tx.commit().await?,
            Tx::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// A checkpoint, locked until this transaction ends.
    pub async fn checkpoint(&mut self, name: &str) -> Result<Option<Position>, StoreError> {
        on_tx!(self, conn, Db, FOR_UPDATE => {
            let mut q = QueryBuilder::<Db>::new("SELECT position FROM projection_checkpoints WHERE name = ");
            q.push_bind(name).push(FOR_UPDATE);
            Ok(q.build_query_scalar::<i64>().fetch_optional(&mut **conn).await?)
        })
    }

    pub async fn set_checkpoint(&mut self, name: &str, position: Position) -> Result<(), StoreError> {
        on_tx!(self, conn, Db, FOR_UPDATE => {
            let mut q = QueryBuilder::<Db>::new(
                "INSERT INTO projection_checkpoints (name, position, updated_at) VALUES (",
            );
            q.push_bind(name)
                .push(", ")
                .push_bind(position)
                .push(", ")
                .push_bind(now_text())
                .push(") ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at");
            q.build().execute(&mut **conn).await?;
            Ok(())
        })
    }

    /// Creates the checkpoint at 0 unless it exists.
    pub async fn ensure_checkpoint(&mut self, name: &str) -> Result<(), StoreError> {
        on_tx!(self, conn, Db, FOR_UPDATE => {
            let mut q = QueryBuilder::<Db>::new(
                "INSERT INTO projection_checkpoints (name, position, updated_at) VALUES (",
            );
            q.push_bind(name).push(", 0, ").push_bind(now_text()).push(") ON CONFLICT (name) DO NOTHING");
            q.build().execute(&mut **conn).await?;
            Ok(())
        })
    }

    pub async fn delete_checkpoint(&mut self, name: &str) -> Result<(), StoreError> {
        on_tx!(self, conn, Db, FOR_UPDATE => {
            let mut q = QueryBuilder::<Db>::new("DELETE FROM projection_checkpoints WHERE name = ");
            q.push_bind(name);
            q.build().execute(&mut **conn).await?;
            Ok(())
        })
    }

    /// Parked positions of `streams`, as (projection, stream, position).
    pub async fn parked(&mut self, streams: &[&str]) -> Result<Vec<(String, String, Position)>, StoreError> {
        let mut rows = Vec::new();
        for chunk in streams.chunks(CHUNK) {
            on_tx!(self, conn, Db, FOR_UPDATE => {
                let mut q = QueryBuilder::<Db>::new(
                    "SELECT projection, stream_id, position FROM worker_parked WHERE stream_id IN (",
                );
                let mut list = q.separated(", ");
                for s in chunk {
                    list.push_bind(*s);
                }
                q.push(")");
                rows.extend(q.build_query_as::<(String, String, i64)>().fetch_all(&mut **conn).await?);
            })
        }
        Ok(rows)
    }

    pub async fn park(
        &mut self,
        projection: &str,
        stream: &str,
        position: Position,
        reason: &str,
    ) -> Result<(), StoreError> {
        on_tx!(self, conn, Db, FOR_UPDATE => {
            let mut q = QueryBuilder::<Db>::new(
                "INSERT INTO worker_parked (projection, stream_id, position, reason, parked_at) VALUES (",
            );
            q.push_bind(projection)
                .push(", ")
                .push_bind(stream)
                .push(", ")
                .push_bind(position)
                .push(", ")
                .push_bind(reason)
                .push(", ")
                .push_bind(now_text())
                .push(") ON CONFLICT DO NOTHING");
            q.build().execute(&mut **conn).await?;
            Ok(())
        })
    }

    pub async fn unpark(&mut self, projection: &str, stream: &str, position: Position) -> Result<(), StoreError> {
        on_tx!(self, conn, Db, FOR_UPDATE => {
            let mut q = QueryBuilder::<Db>::new("DELETE FROM worker_parked WHERE projection = ");
            q.push_bind(projection)
                .push(" AND stream_id = ")
                .push_bind(stream)
                .push(" AND position = ")
                .push_bind(position);
            q.build().execute(&mut **conn).await?;
            Ok(())
        })
    }

    /// Forgets the parked events of `projection` up to `position`: a
    /// rebuild read them from the log.
    pub async fn unpark_through(&mut self, projection: &str, position: Position) -> Result<(), StoreError> {
        on_tx!(self, conn, Db, FOR_UPDATE => {
            let mut q = QueryBuilder::<Db>::new("DELETE FROM worker_parked WHERE projection = ");
            q.push_bind(projection).push(" AND position <= ").push_bind(position);
            q.build().execute(&mut **conn).await?;
            Ok(())
        })
    }

    pub async fn load(&mut self, table: &str, keys: &[String]) -> Result<Vec<Doc>, StoreError> {
        check_table_name(table);
        let mut docs = Vec::with_capacity(keys.len());
        if let Tx::Pg(conn) = self {
            // One statement text whatever the number of keys: prepared once
            // per connection, not once per batch size.
            let rows = sqlx::query(&format!(
                "SELECT key, kind, wallet_id, sort, tag, body FROM {table} WHERE key = ANY($1)"
            ))
            .bind(keys)
            .fetch_all(&mut **conn)
            .await?;
            for row in rows {
                docs.push(row_to_doc(row)?);
            }
            return Ok(docs);
        }
        for chunk in keys.chunks(CHUNK) {
            on_tx!(self, conn, Db, FOR_UPDATE => {
                let mut q = QueryBuilder::<Db>::new(format!(
                    "SELECT key, kind, wallet_id, sort, tag, body FROM {table} WHERE key IN ("
                ));
                let mut list = q.separated(", ");
                for k in chunk {
                    list.push_bind(k.as_str());
                }
                q.push(")");
                for row in q.build().fetch_all(&mut **conn).await? {
                    docs.push(row_to_doc(row)?);
                }
            })
        }
        Ok(docs)
    }

    pub async fn upsert(&mut self, table: &str, docs: &[Doc]) -> Result<(), StoreError> {
        check_table_name(table);
        if let Tx::Pg(conn) = self {
            if docs.is_empty() {
                return Ok(());
            }
            // Columns as arrays: one statement text for any batch (see `load`).
            let mut columns = (
                Vec::with_capacity(docs.len()),
                Vec::with_capacity(docs.len()),
                Vec::with_capacity(docs.len()),
                Vec::with_capacity(docs.len()),
                Vec::with_capacity(docs.len()),
                Vec::with_capacity(docs.len()),
            );
            for d in docs {
                columns.0.push(d.key.as_str());
                columns.1.push(d.kind.as_str());
                columns.2.push(d.wallet_id.as_str());
                columns.3.push(d.sort);
                columns.4.push(d.tag.as_deref());
                columns.5.push(d.body.as_str());
            }
            sqlx::query(&format!(
                "INSERT INTO {table} (key, kind, wallet_id, sort, tag, body) \
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[]) \
                 ON CONFLICT (key) DO UPDATE SET kind = excluded.kind, wallet_id = excluded.wallet_id, \
                 sort = excluded.sort, tag = excluded.tag, body = excluded.body"
            ))
            .bind(&columns.0)
            .bind(&columns.1)
            .bind(&columns.2)
            .bind(&columns.3)
            .bind(&columns.4)
            .bind(&columns.5)
            .execute(&mut **conn)
            .await?;
            return Ok(());
        }
        for chunk in docs.chunks(CHUNK) {
            on_tx!(self, conn, Db, FOR_UPDATE => {
                let mut q = QueryBuilder::<Db>::new(format!(
                    "INSERT INTO {table} (key, kind, wallet_id, sort, tag, body) "
                ));
                q.push_values(chunk, |mut b, d| {
                    b.push_bind(d.key.as_str())
                        .push_bind(d.kind.as_str())
                        .push_bind(d.wallet_id.as_str())
                        .push_bind(d.sort)
                        .push_bind(d.tag.as_deref())
                        .push_bind(d.body.as_str());
                });
                q.push(
                    " ON CONFLICT (key) DO UPDATE SET kind = excluded.kind, wallet_id = excluded.wallet_id, \
                     sort = excluded.sort, tag = excluded.tag, body = excluded.body",
                );
                q.build().execute(&mut **conn).await?;
            })
        }
        Ok(())
    }

    pub async fn table_exists(&mut self, table: &str) -> Result<bool, StoreError> {
        check_table_name(table);
        Ok(match self {
            Tx::Pg(conn) => {
                sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                    .bind(table)
                    .fetch_one(&mut **conn)
                    .await?
            }
            Tx::Sqlite(conn) => {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?")
                    .bind(table)
                    .fetch_one(&mut **conn)
                    .await?
                    > 0
            }
        })
    }

    /// Creates a read-model table unless it exists. Index names carry a
    /// random suffix: a renamed table keeps its index names, and the next
    /// rebuild table must not collide with them.
    pub async fn create_table(&mut self, table: &str) -> Result<(), StoreError> {
        if self.table_exists(table).await? {
            return Ok(());
        }
        let g = Uuid::new_v4().simple().to_string()[..12].to_owned();
        self.execute(&format!(
            "CREATE TABLE {table} (key TEXT NOT NULL, kind TEXT NOT NULL, wallet_id TEXT NOT NULL, \
             sort BIGINT NOT NULL, tag TEXT, body TEXT NOT NULL, CONSTRAINT {table}_pk_{g} PRIMARY KEY (key))"
        ))
        .await?;
        self.execute(&format!(
            "CREATE INDEX {table}_by_wallet_{g} ON {table} (kind, wallet_id, sort)"
        ))
        .await?;
        self.execute(&format!("CREATE INDEX {table}_by_sort_{g} ON {table} (kind, sort)"))
            .await
    }

    pub async fn drop_table(&mut self, table: &str) -> Result<(), StoreError> {
        check_table_name(table);
        self.execute(&format!("DROP TABLE IF EXISTS {table}")).await
    }

    pub async fn rename_table(&mut self, from: &str, to: &str) -> Result<(), StoreError> {
        check_table_name(from);
        check_table_name(to);
        self.execute(&format!("ALTER TABLE {from} RENAME TO {to}")).await
    }

    /// Serialises schema changes between processes until this transaction
    /// ends: concurrent `CREATE TABLE`s of one name fail in PostgreSQL even
    /// with `IF NOT EXISTS`. (SQLite's IMMEDIATE transaction already does.)
    pub async fn lock_schema(&mut self) -> Result<(), StoreError> {
        if let Tx::Pg(conn) = self {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(SCHEMA_LOCK)
                .execute(&mut **conn)
                .await?;
        }
        Ok(())
    }

    async fn execute(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Tx::Pg(conn) => {
                sqlx::query(sql).execute(&mut **conn).await?;
            }
            Tx::Sqlite(conn) => {
                sqlx::query(sql).execute(&mut **conn).await?;
            }
        }
        Ok(())
    }
}

/// A checkpoint as it is now (no lock).
pub async fn checkpoint(store: &EventStore, name: &str) -> Result<Option<Position>, StoreError> {
    on_reader!(store, pool, Db => {
        let mut q = QueryBuilder::<Db>::new("SELECT position FROM projection_checkpoints WHERE name = ");
        q.push_bind(name);
        Ok(q.build_query_scalar::<i64>().fetch_optional(pool).await?)
    })
}

/// Every checkpoint: (name, position, updated_at).
pub async fn checkpoints(store: &EventStore) -> Result<Vec<(String, Position, String)>, StoreError> {
    on_reader!(store, pool, Db => {
        let rows = QueryBuilder::<Db>::new("SELECT name, position, updated_at FROM projection_checkpoints ORDER BY name")
            .build()
            .fetch_all(pool)
            .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    })
}

pub async fn get(store: &EventStore, table: &str, key: &str) -> Result<Option<String>, StoreError> {
    check_table_name(table);
    on_reader!(store, pool, Db => {
        let mut q = QueryBuilder::<Db>::new(format!("SELECT body FROM {table} WHERE key = "));
        q.push_bind(key);
        Ok(q.build_query_scalar::<String>().fetch_optional(pool).await?)
    })
}

/// Bodies of a page of documents, highest `sort` first.
pub async fn query(store: &EventStore, table: &str, query: &DocQuery<'_>) -> Result<Vec<(i64, String)>, StoreError> {
    check_table_name(table);
    on_reader!(store, pool, Db => {
        let mut q = QueryBuilder::<Db>::new(format!("SELECT sort, body FROM {table} WHERE kind = "));
        q.push_bind(query.kind);
        if let Some(w) = query.wallet_id {
            q.push(" AND wallet_id = ").push_bind(w);
        }
        if let Some(t) = query.tag {
            q.push(" AND tag = ").push_bind(t);
        }
        match (query.before_sort, query.before_key) {
            (Some(b), Some(k)) => {
                q.push(" AND (sort < ").push_bind(b);
                q.push(" OR (sort = ").push_bind(b).push(" AND key < ").push_bind(k).push("))");
            }
            (Some(b), None) => {
                q.push(" AND sort < ").push_bind(b);
            }
            (None, _) => {}
        }
        q.push(" ORDER BY sort DESC, key DESC LIMIT ").push_bind(i64::from(query.limit));
        let rows = q.build().fetch_all(pool).await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    })
}

/// A read model and its checkpoint as of one moment, read in one read-only
/// snapshot (no lock, nothing written); `None` if the table does not exist.
pub async fn read_consistent(
    store: &EventStore,
    name: &str,
    table: &str,
) -> Result<Option<(Position, Vec<Doc>)>, StoreError> {
    check_table_name(table);
    let dump = format!("SELECT key, kind, wallet_id, sort, tag, body FROM {table} ORDER BY key");
    let (at, rows) = match store {
        EventStore::Postgres(s) => {
            let mut tx = s.pool().begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                .execute(&mut *tx)
                .await?;
            let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
                .bind(table)
                .fetch_one(&mut *tx)
                .await?;
            if !exists {
                return Ok(None);
            }
            let at: Option<i64> = sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            let rows = sqlx::query(&dump).fetch_all(&mut *tx).await?;
            (at, rows.into_iter().map(row_to_doc).collect::<Result<Vec<_>, _>>()?)
        }
        EventStore::Sqlite(s) => {
            // A deferred transaction in WAL mode reads one snapshot.
            let mut tx = s.reader().begin().await?;
            let exists: i64 =
                sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?")
                    .bind(table)
                    .fetch_one(&mut *tx)
                    .await?;
            if exists == 0 {
                return Ok(None);
            }
            let at: Option<i64> = sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
            let rows = sqlx::query(&dump).fetch_all(&mut *tx).await?;
            (at, rows.into_iter().map(row_to_doc).collect::<Result<Vec<_>, _>>()?)
        }
    };
    Ok(Some((at.unwrap_or(0), rows)))
}

/// Every document of a table in key order: for comparing read models.
pub async fn dump(store: &EventStore, table: &str) -> Result<Vec<Doc>, StoreError> {
    check_table_name(table);
    on_reader!(store, pool, Db => {
        let rows = QueryBuilder::<Db>::new(format!(
            "SELECT key, kind, wallet_id, sort, tag, body FROM {table} ORDER BY key"
        ))
        .build()
        .fetch_all(pool)
        .await?;
        rows.into_iter().map(row_to_doc).collect::<Result<_, _>>().map_err(Into::into)
    })
}

/// How many events are parked, per projection.
pub async fn parked_counts(store: &EventStore) -> Result<Vec<(String, i64)>, StoreError> {
    on_reader!(store, pool, Db => {
        Ok(sqlx::query_as::<Db, (String, i64)>(
            "SELECT projection, COUNT(*) FROM worker_parked GROUP BY projection ORDER BY projection",
        )
        .fetch_all(pool)
        .await?)
    })
}
