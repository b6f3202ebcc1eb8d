//! Reads from standbys (`DATABASE_READ_URL`, one host or a host list): the
//! read models and the log pages are served by a standby that has replayed
//! what the request asks for, so reads grow past one primary without a
//! client ever reading older state than it has written.
//!
//! Read models and their checkpoints commit in the same transactions, and
//! physical replication replays whole transactions in commit order, so a
//! standby's checkpoint means on the standby what it means on the primary,
//! and (appends commit in position order under the append lock) a standby's
//! log never shows a later position before an earlier one. What a standby
//! adds is delay: a watcher reads each standby's replayed head and the
//! primary's ten times a second, and a request is sent to a standby only if
//! it lags the primary by at most `max_lag` events and has replayed the
//! position the request names (waiting for it up to the request's patience).
//! Anything else, a standby that stops answering or cancels a query for a
//! replay conflict included, is served by the primary.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use tokio::sync::Notify;

use super::cluster::{self, Cluster};
use super::{EventStore, LogFilter, PgEventStore, Position, RecordedEvent, StoreError};

/// How often the watcher reads the heads.
const WATCH_EVERY: Duration = Duration::from_millis(100);
/// One head read, at most.
const HEAD_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the watcher reads the standbys' heads while a request waits
/// for one to replay a position (one query per standby for all waiters).
const WATCH_WAITING: Duration = Duration::from_millis(2);
/// A replayed head that says "not usable now".
const UNKNOWN: i64 = -1;

/// The standbys of one `DATABASE_READ_URL`.
#[derive(Debug)]
pub struct Standbys {
    nodes: Vec<Standby>,
    /// Events a standby may lag the primary by and still serve.
    max_lag: i64,
    /// Round robin over the usable ones.
    next: AtomicUsize,
    /// Requests waiting for a standby to replay a position: the watcher
    /// looks every `WATCH_WAITING` while there are any.
    waiting: AtomicUsize,
    /// A waiter arrived (the watcher looks at once).
    arrived: Arc<Notify>,
    /// The watcher has read the heads again.
    looked: Notify,
}

/// One standby: its own pool, and what the watcher last saw of it.
#[derive(Debug)]
struct Standby {
    address: String,
    store: EventStore,
    /// The highest position it has replayed, or `UNKNOWN`.
    replayed: AtomicI64,
    /// The primary's head minus `replayed` at the last look.
    lag: AtomicI64,
    /// Each read model's checkpoint there at the last look, by name.
    applied: std::sync::RwLock<Vec<(String, Position)>>,
}

/// What a standby must have for a read.
#[derive(Debug, Clone, Copy)]
pub enum Needs<'a> {
    /// The log replayed up to this position.
    Log(Position),
    /// This read model's checkpoint at or past this position.
    Applied(&'a str, Position),
}

impl Standby {
    fn has(&self, needs: Needs<'_>, replayed: Position) -> bool {
        match needs {
            Needs::Log(min) => replayed >= min,
            Needs::Applied(name, min) => self
                .applied
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(n, at)| n == name && *at >= min),
        }
    }

    /// What the watcher saw: the replayed head (or `UNKNOWN`) and the
    /// read models' checkpoints, kept in place (the names do not change).
    fn saw(&self, replayed: Position, applied: Vec<(String, Position)>) {
        let mut kept = self.applied.write().unwrap_or_else(|p| p.into_inner());
        if *kept != applied {
            *kept = applied;
        }
        drop(kept);
        self.replayed.store(replayed, Ordering::Release);
    }
}

impl Standbys {
    /// Pools on each host of `url` (connected lazily: a standby that is
    /// down at start joins when it answers) and the watcher.
    pub fn connect(url: &str, primary: EventStore, max_lag: u64) -> Result<Arc<Self>, StoreError> {
        let cluster = Cluster::parse(url)?;
        let nodes = cluster
            .hosts()
            .iter()
            .map(|host| {
                let options = host.clone().application_name("wallet-reader").options([
                    // A reader never writes, even if it reaches a primary.
                    ("default_transaction_read_only", "on"),
                    ("statement_timeout", "10000"),
                ]);
                let pool = PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(2))
                    .connect_lazy_with(options);
                Standby {
                    address: cluster::address(host),
                    store: EventStore::Postgres(PgEventStore::from_pool(pool)),
                    replayed: AtomicI64::new(UNKNOWN),
                    lag: AtomicI64::new(i64::MAX),
                    applied: Default::default(),
                }
            })
            .collect();
        let standbys = Arc::new(Self {
            nodes,
            max_lag: i64::try_from(max_lag).unwrap_or(i64::MAX),
            next: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            arrived: Arc::new(Notify::new()),
            looked: Notify::new(),
        });
        tokio::spawn(watch(Arc::downgrade(&standbys), standbys.arrived.clone(), primary));
        Ok(standbys)
    }

    /// How many standbys (their indexes are `0..len`).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Standby `i`'s store.
    pub fn store(&self, i: usize) -> &EventStore {
        &self.nodes[i].store
    }

    /// A standby within the lag bound that has replayed `min` (waiting up
    /// to `wait` for one to), or `None`: serve it from the primary.
    pub async fn pick(&self, min: Position, wait: Duration) -> Option<usize> {
        self.pick_for(Needs::Log(min), wait).await
    }

    /// A standby within the lag bound that has what `needs` says, waiting
    /// up to `wait` for one to. The watcher does the looking (every 2 ms
    /// while anyone waits), so waiting requests cost no queries of their
    /// own however many there are.
    pub async fn pick_for(&self, needs: Needs<'_>, wait: Duration) -> Option<usize> {
        if let Some(standby) = self.usable(needs) {
            return Some(standby);
        }
        // Waiting only makes sense on a standby that is close enough.
        let close = || self.nodes.iter().any(|s| s.lag.load(Ordering::Acquire) <= self.max_lag);
        if wait.is_zero() || !close() {
            return None;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let _waiting = Waiting::on(&self.waiting);
        self.arrived.notify_one();
        loop {
            let looked = self.looked.notified();
            tokio::pin!(looked);
            looked.as_mut().enable();
            if let Some(standby) = self.usable(needs) {
                return Some(standby);
            }
            if !close() || tokio::time::timeout_at(deadline, looked).await.is_err() {
                return None;
            }
        }
    }

    fn usable(&self, needs: Needs<'_>) -> Option<usize> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..self.nodes.len())
            .map(|i| (start + i) % self.nodes.len())
            .find(|&i| {
                let s = &self.nodes[i];
                let replayed = s.replayed.load(Ordering::Acquire);
                replayed != UNKNOWN && s.lag.load(Ordering::Acquire) <= self.max_lag && s.has(needs, replayed)
            })
    }

    /// A query on this standby failed (a replay conflict, a lost host):
    /// it serves nothing until the watcher sees it answer again.
    pub fn failed(&self, i: usize, error: &dyn std::fmt::Display) {
        let standby = &self.nodes[i];
        tracing::warn!(standby = %standby.address, error = %error, "standby read failed; reading from the primary");
        standby.replayed.store(UNKNOWN, Ordering::Release);
    }

    /// Each standby's replayed head and lag, for `/metrics`.
    pub fn heads(&self) -> Vec<(&str, i64, i64)> {
        self.nodes
            .iter()
            .map(|s| {
                (
                    s.address.as_str(),
                    s.replayed.load(Ordering::Acquire),
                    s.lag.load(Ordering::Acquire),
                )
            })
            .collect()
    }
}

/// Where reads of the log go: a standby within the lag bound that has
/// replayed the position the read starts after, else (or when that standby
/// fails) the primary. A standby shows a prefix of the log (appends commit
/// in position order, replay keeps commit order), so a read after `p` from
/// any node never skips an event; a lagging one only has fewer.
#[derive(Debug, Clone)]
pub struct LogReader {
    primary: EventStore,
    standbys: Option<Arc<Standbys>>,
}

impl LogReader {
    /// Every read on `primary`.
    pub fn primary(primary: EventStore) -> Self {
        Self {
            primary,
            standbys: None,
        }
    }

    pub fn with_standbys(primary: EventStore, standbys: Arc<Standbys>) -> Self {
        Self {
            primary,
            standbys: Some(standbys),
        }
    }

    /// `read` on a standby that has replayed `min` (no waiting), else on
    /// the primary.
    pub async fn read<T, F, Fut>(&self, min: Position, read: F) -> Result<T, StoreError>
    where
        F: Fn(EventStore) -> Fut,
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        let Some(standbys) = &self.standbys else {
            return read(self.primary.clone()).await;
        };
        if let Some(i) = standbys.pick(min, Duration::ZERO).await {
            match read(standbys.store(i).clone()).await {
                Ok(answer) => {
                    metrics::counter!("wallet_standby_reads_total", "served_by" => "standby").increment(1);
                    return Ok(answer);
                }
                Err(e) => standbys.failed(i, &e),
            }
        }
        metrics::counter!("wallet_standby_reads_total", "served_by" => "primary").increment(1);
        read(self.primary.clone()).await
    }

    pub async fn read_all(&self, after: Position, limit: u32) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read(after, |store| async move { store.read_all(after, limit).await })
            .await
    }

    /// Events after `after` that pass `filter`, on a node that has
    /// replayed `reaching` too (a subscriber's catch-up must reach the
    /// live tail's position).
    pub async fn read_log(
        &self,
        after: Position,
        limit: u32,
        filter: &LogFilter,
        reaching: Position,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.read(after.max(reaching), |store| async move {
            store.read_log(after, limit, filter).await
        })
        .await
    }

    /// The primary's head: where a new subscriber starts.
    pub async fn head_position(&self) -> Result<Position, StoreError> {
        self.primary.head_position().await
    }
}

/// One request counted as waiting while this lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn on(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads the heads until the standbys are dropped: every `WATCH_EVERY`,
/// or every `WATCH_WAITING` while a request waits for a standby to replay
/// (the primary's head still every `WATCH_EVERY`). Waiters are woken after
/// each look.
async fn watch(standbys: std::sync::Weak<Standbys>, arrived: Arc<Notify>, primary: EventStore) {
    let primary_head = |store: EventStore| async move {
        match tokio::time::timeout(HEAD_TIMEOUT, store.head_position()).await {
            Ok(Ok(head)) => head,
            _ => UNKNOWN,
        }
    };
    // The primary's last head read: a slow read must not make every
    // standby look current.
    let mut last_primary = UNKNOWN;
    let mut primary_read: Option<tokio::time::Instant> = None;
    loop {
        let pause = match standbys.upgrade() {
            None => return,
            Some(s) if s.waiting.load(Ordering::Acquire) > 0 => WATCH_WAITING,
            Some(_) => WATCH_EVERY,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = arrived.notified() => {}
        }
        let Some(standbys) = standbys.upgrade() else { return };
        if primary_read.is_none_or(|at| at.elapsed() >= WATCH_EVERY) {
            primary_read = Some(tokio::time::Instant::now());
            let read = primary_head(primary.clone()).await;
            if read != UNKNOWN {
                last_primary = read;
            }
        }
        let seen = futures_util::future::join_all(standbys.nodes.iter().map(|s| look_at(&s.store))).await;
        for (s, (replayed, applied)) in standbys.nodes.iter().zip(seen) {
            s.saw(replayed, applied);
            let lag = match (replayed, last_primary) {
                (UNKNOWN, _) => i64::MAX,
                // No head of the primary seen yet: a standby's state is what there is.
                (_, UNKNOWN) => 0,
                (r, p) => (p - r).max(0),
            };
            s.lag.store(lag, Ordering::Release);
        }
        standbys.looked.notify_waiters();
    }
}

/// A standby's replayed head and its read models' checkpoints, or
/// `UNKNOWN` (and none) if it does not answer or is not in recovery: a node
/// out of recovery is the primary (served by the primary path) or an old
/// primary not yet demoted, whose log may hold commits no standby has.
async fn look_at(store: &EventStore) -> (i64, Vec<(String, Position)>) {
    let EventStore::Postgres(pg) = store else {
        return (UNKNOWN, Vec::new());
    };
    let read = sqlx::query_as::<_, (bool, i64, Vec<String>, Vec<i64>)>(
        "SELECT pg_is_in_recovery(), (SELECT COALESCE(MAX(position), 0) FROM events), \
         ARRAY(SELECT name FROM projection_checkpoints ORDER BY name), \
         ARRAY(SELECT position FROM projection_checkpoints ORDER BY name)",
    )
    .fetch_one(pg.pool());
    match tokio::time::timeout(HEAD_TIMEOUT, read).await {
        Ok(Ok((true, head, names, positions))) => (head, names.into_iter().zip(positions).collect()),
        _ => (UNKNOWN, Vec::new()),
    }
}
