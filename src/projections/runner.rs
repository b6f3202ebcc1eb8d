//! Feeds events to projections in log order, exactly once, and rebuilds them.
//!
//! Exactly once: a batch of events, the documents it changed and the
//! projection's new checkpoint commit in one transaction, with the checkpoint
//! row locked for the duration. A crash anywhere before the commit leaves the
//! old checkpoint and the old documents; the batch is simply applied again.
//!
//! Rebuild: a fresh table `rm_<name>__rebuild` is filled from position 0 with
//! its own checkpoint `<name>#rebuild` (so an interrupted rebuild resumes),
//! then one transaction locks the live checkpoint, applies the last events,
//! drops the live table and renames the rebuilt one in its place. Readers
//! see the old model until that commit and the new one after it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::flags::{Flags, FraudRules};
use super::history::History;
use super::holds::Holds;
use super::stats::Stats;
use super::storage::{self, Doc, DocQuery, Tx};
use super::{Batch, Projection};
use crate::store::{EventStore, Position, RecordedEvent, StoreError};

/// Events per transaction.
const BATCH_EVENTS: u32 = 5000;
/// How often the live runner looks for events written by other processes.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Least time between two partial batches of the live runner.
const PACE: Duration = Duration::from_millis(100);
/// How often `wait_for` re-reads a checkpoint.
const WAIT_POLL: Duration = Duration::from_millis(5);

/// Test hook: make the next batch fail after writing its documents and
/// before moving its checkpoint, as a crash there would.
#[derive(Debug, Default)]
pub struct StepFault {
    fail_before_checkpoint: AtomicBool,
}

impl StepFault {
    pub fn fail_next_batch(&self) {
        self.fail_before_checkpoint.store(true, Ordering::SeqCst);
    }
}

/// One projection's progress.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectionStatus {
    pub name: String,
    pub checkpoint: Position,
    pub head: Position,
    pub lag: i64,
    pub updated_at: Option<String>,
    /// Checkpoint of an unfinished rebuild, if one exists.
    pub rebuild_checkpoint: Option<Position>,
    /// Events the broker worker dead-lettered and holds back (see `delivery.rs`).
    pub parked: i64,
}

/// Reported while a rebuild runs.
#[derive(Debug, Clone, Copy)]
pub struct RebuildProgress {
    pub position: Position,
    pub head: Position,
    pub events: u64,
}

pub struct Projections {
    pub(super) store: EventStore,
    pub(super) list: Vec<Box<dyn Projection>>,
    batch_events: u32,
    pub fault: StepFault,
}

pub(super) fn table(name: &str) -> String {
    format!("rm_{name}")
}

fn rebuild_table(name: &str) -> String {
    format!("rm_{name}__rebuild")
}

fn rebuild_checkpoint(name: &str) -> String {
    format!("{name}#rebuild")
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("unknown projection {0:?} (known: history, stats, flags)")]
    Unknown(String),
    #[error("a rebuild of {0} is already running (another `wallet projections rebuild`); wait for it to finish")]
    RebuildRunning(String),
    #[error("injected fault before checkpoint")]
    Injected,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Projections {
    pub fn new(store: EventStore, rules: FraudRules) -> Self {
        Self {
            store,
            list: vec![
                Box::new(History),
                Box::new(Stats { rules: rules.clone() }),
                Box::new(Flags { rules }),
                Box::new(Holds),
            ],
            batch_events: BATCH_EVENTS,
            fault: StepFault::default(),
        }
    }

    /// Events per transaction (default 5,000); small batches make tests
    /// exercise many batches on small logs.
    pub fn with_batch_events(mut self, events: u32) -> Self {
        assert!(events > 0, "a batch holds at least one event");
        self.batch_events = events;
        self
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.list.iter().map(|p| p.name()).collect()
    }

    fn find(&self, name: &str) -> Result<&dyn Projection, ProjectionError> {
        self.list
            .iter()
            .find(|p| p.name() == name)
            .map(|p| p.as_ref())
            .ok_or_else(|| ProjectionError::Unknown(name.to_owned()))
    }

    /// Creates the live tables and checkpoints that do not exist yet.
    pub async fn ensure(&self) -> Result<(), ProjectionError> {
        let mut tx = Tx::begin(&self.store).await?;
        tx.lock_schema().await?;
        for p in &self.list {
            tx.create_table(&table(p.name())).await?;
            tx.ensure_checkpoint(p.name()).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Applies the events after `from` (one batch) to `table`, moving
    /// checkpoint `checkpoint_name`, inside `tx`. Returns (events, new position).
    async fn apply_batch(
        &self,
        tx: &mut Tx,
        projection: &dyn Projection,
        table: &str,
        checkpoint_name: &str,
        from: Position,
        until: Option<Position>,
    ) -> Result<(usize, Position), ProjectionError> {
        let mut events = self.store.read_all(from, self.batch_events).await?;
        if let Some(until) = until {
            events.retain(|e| e.position <= until);
        }
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok((0, from));
        };
        apply_events(tx, projection, table, events.iter()).await?;
        if self.fault.fail_before_checkpoint.swap(false, Ordering::SeqCst) {
            return Err(ProjectionError::Injected);
        }
        tx.set_checkpoint(checkpoint_name, last).await?;
        Ok((events.len(), last))
    }

    /// One batch of the live read model `name`; returns how many events it applied.
    pub async fn step(&self, name: &str) -> Result<usize, ProjectionError> {
        let projection = self.find(name)?;
        // Cheap check first, so an idle runner never takes the write lock.
        let at = storage::checkpoint(&self.store, name).await?.unwrap_or(0);
        if at >= self.store.head_position().await? {
            return Ok(0);
        }
        // Relaxed: a batch lost in a crash is read from the log again.
        let mut tx = Tx::begin_relaxed(&self.store).await?;
        let from = tx.checkpoint(name).await?.unwrap_or(0);
        let (applied, _) = self
            .apply_batch(&mut tx, projection, &table(name), name, from, None)
            .await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// One batch of every live read model, in one transaction: the events
    /// are read once for all of them (from the lowest checkpoint) and each
    /// applies those past its own checkpoint. Returns the events read.
    pub async fn step_all(&self) -> Result<usize, ProjectionError> {
        // Cheap check first, so an idle runner never takes the write locks.
        let head = self.store.head_position().await?;
        let mut behind = false;
        for p in &self.list {
            behind |= storage::checkpoint(&self.store, p.name()).await?.unwrap_or(0) < head;
        }
        if !behind {
            return Ok(0);
        }
        // Relaxed: a batch lost in a crash is read from the log again.
        let mut tx = Tx::begin_relaxed(&self.store).await?;
        // Locked in list order, the order every other writer of checkpoints uses.
        let mut froms = Vec::with_capacity(self.list.len());
        for p in &self.list {
            froms.push(tx.checkpoint(p.name()).await?.unwrap_or(0));
        }
        let from = froms.iter().copied().min().unwrap_or(0);
        let events = self.store.read_all(from, self.batch_events).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok(0);
        };
        for (p, at) in self.list.iter().zip(froms) {
            if at >= last {
                continue;
            }
            let mine = events.iter().filter(move |e| e.position > at);
            apply_events(&mut tx, p.as_ref(), &table(p.name()), mine).await?;
            if self.fault.fail_before_checkpoint.swap(false, Ordering::SeqCst) {
                return Err(ProjectionError::Injected);
            }
            tx.set_checkpoint(p.name(), last).await?;
        }
        tx.commit().await?;
        Ok(events.len())
    }

    /// Brings every live read model up to the log head.
    pub async fn catch_up(&self) -> Result<(), ProjectionError> {
        while self.step_all().await? > 0 {}
        Ok(())
    }

    /// The in-process runner of `serve`: follows the log until the task is
    /// dropped. `wake` is notified after each local append; events from other
    /// processes are found by polling.
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>) {
        loop {
            match self.step_all().await {
                // Caught up: sleep until the next local append (or a poll).
                Ok(0) => {
                    tokio::select! {
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(IDLE_POLL) => {}
                    }
                }
                // A full batch: more is waiting.
                Ok(n) if n >= self.batch_events as usize => {}
                // A partial batch: let the next one grow for a moment. Under
                // load this turns a transaction per append into one per
                // `PACE`, at the cost of up to `PACE` more lag.
                Ok(_) => tokio::time::sleep(PACE).await,
                Err(e) => {
                    tracing::error!(error = %e, "projection batch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    pub async fn checkpoint(&self, name: &str) -> Result<Position, ProjectionError> {
        self.find(name)?;
        Ok(storage::checkpoint(&self.store, name).await?.unwrap_or(0))
    }

    /// Waits (at most `timeout`) until projection `name` has applied
    /// `position`; returns its checkpoint either way.
    pub async fn wait_for(
        &self,
        name: &str,
        position: Position,
        timeout: Duration,
    ) -> Result<Position, ProjectionError> {
        let deadline = Instant::now() + timeout;
        loop {
            let at = self.checkpoint(name).await?;
            if at >= position || Instant::now() >= deadline {
                return Ok(at);
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    pub async fn get(&self, name: &str, key: &str) -> Result<Option<String>, ProjectionError> {
        self.find(name)?;
        Ok(storage::get(&self.store, &table(name), key).await?)
    }

    pub async fn query(&self, name: &str, query: &DocQuery<'_>) -> Result<Vec<(i64, String)>, ProjectionError> {
        self.find(name)?;
        Ok(storage::query(&self.store, &table(name), query).await?)
    }

    /// The whole live read model, in key order.
    pub async fn dump(&self, name: &str) -> Result<Vec<Doc>, ProjectionError> {
        self.find(name)?;
        Ok(storage::dump(&self.store, &table(name)).await?)
    }

    pub async fn status(&self) -> Result<Vec<ProjectionStatus>, ProjectionError> {
        let head = self.store.head_position().await?;
        let all = storage::checkpoints(&self.store).await?;
        let parked = storage::parked_counts(&self.store).await?;
        let find = |n: &str| all.iter().find(|(name, _, _)| name == n);
        Ok(self
            .names()
            .into_iter()
            .map(|name| {
                let live = find(name);
                let checkpoint = live.map_or(0, |(_, p, _)| *p);
                ProjectionStatus {
                    name: name.to_owned(),
                    checkpoint,
                    head,
                    lag: head - checkpoint,
                    updated_at: live.map(|(_, _, u)| u.clone()),
                    rebuild_checkpoint: find(&rebuild_checkpoint(name)).map(|(_, p, _)| *p),
                    parked: parked.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c),
                }
            })
            .collect())
    }

    /// Folds the log in memory up to the live checkpoint and compares the
    /// result with the live model, row for row. The live model and its
    /// checkpoint are read in one read-only snapshot, so a runner moving
    /// meanwhile does not matter. Writes nothing and takes no lock: runs on
    /// a read-only connection. Returns one line per difference (at most
    /// `max_reports`).
    pub async fn verify(&self, name: &str, max_reports: usize) -> Result<Vec<String>, ProjectionError> {
        let projection = self.find(name)?;
        let Some((live_at, live)) = storage::read_consistent(&self.store, name, &table(name)).await? else {
            return Ok(vec![format!(
                "read model {name}: not built (no table {}); `serve`, `worker` or `migrate` creates it",
                table(name)
            )]);
        };
        let mut rebuilt = Batch::default();
        let mut from = 0;
        'log: loop {
            let events = self.store.read_all(from, self.batch_events).await?;
            for e in &events {
                if e.position > live_at {
                    break 'log;
                }
                projection.apply(e, &mut rebuilt);
                from = e.position;
            }
            if events.len() < self.batch_events as usize {
                break;
            }
        }
        Ok(compare_docs(name, &live, &rebuilt.into_changes(), max_reports))
    }

    /// Rebuilds `name` from position 0 beside the live model and swaps it in.
    /// Resumes an interrupted rebuild unless `restart`. A second rebuild of the
    /// same projection while one runs is refused (`RebuildRunning`).
    pub async fn rebuild(
        &self,
        name: &str,
        restart: bool,
        mut progress: impl FnMut(RebuildProgress),
    ) -> Result<RebuildProgress, ProjectionError> {
        let projection = self.find(name)?;
        // One rebuild of a projection at a time: a second would build into
        // the same scratch table and swap it in twice. Held to the end (a
        // session lock on a connection of its own, or a file lock on SQLite),
        // and released if this process dies.
        let _only_one = self
            .store
            .try_lead(&format!("rebuild-{name}"))
            .await?
            .ok_or_else(|| ProjectionError::RebuildRunning(name.to_owned()))?;
        let (scratch, scratch_checkpoint) = (rebuild_table(name), rebuild_checkpoint(name));

        let mut tx = Tx::begin(&self.store).await?;
        tx.lock_schema().await?;
        if restart || tx.checkpoint(&scratch_checkpoint).await?.is_none() {
            tx.drop_table(&scratch).await?;
            tx.create_table(&scratch).await?;
            tx.set_checkpoint(&scratch_checkpoint, 0).await?;
        }
        tx.commit().await?;

        // Build beside the live model, one committed batch at a time.
        let mut events = 0u64;
        loop {
            let mut tx = Tx::begin_relaxed(&self.store).await?;
            let from = tx.checkpoint(&scratch_checkpoint).await?.unwrap_or(0);
            let (n, position) = self
                .apply_batch(&mut tx, projection, &scratch, &scratch_checkpoint, from, None)
                .await?;
            tx.commit().await?;
            events += n as u64;
            let head = self.store.head_position().await?;
            progress(RebuildProgress { position, head, events });
            if n == 0 || head - position < i64::from(self.batch_events) {
                break;
            }
        }

        // Swap: with the live checkpoint locked, no live batch can run.
        let mut tx = Tx::begin(&self.store).await?;
        tx.checkpoint(name).await?;
        let mut position = tx.checkpoint(&scratch_checkpoint).await?.unwrap_or(0);
        loop {
            let (n, at) = self
                .apply_batch(&mut tx, projection, &scratch, &scratch_checkpoint, position, None)
                .await?;
            events += n as u64;
            position = at;
            if n == 0 {
                break;
            }
        }
        let live = table(name);
        tx.drop_table(&live).await?;
        tx.rename_table(&scratch, &live).await?;
        tx.set_checkpoint(name, position).await?;
        tx.delete_checkpoint(&scratch_checkpoint).await?;
        // Events the broker worker parked are in the rebuilt model now.
        tx.unpark_through(name, position).await?;
        tx.commit().await?;
        let done = RebuildProgress {
            position,
            head: position.max(self.store.head_position().await?),
            events,
        };
        progress(done);
        tracing::info!(projection = name, position, events, "rebuilt and swapped in");
        Ok(done)
    }
}

/// Applies `events`, in order, to the documents of `table` inside `tx`: one
/// read of the documents they need, one write of those they changed.
pub(super) async fn apply_events<'e>(
    tx: &mut Tx,
    projection: &dyn Projection,
    table: &str,
    events: impl Iterator<Item = &'e RecordedEvent> + Clone,
) -> Result<(), ProjectionError> {
    let keys: BTreeSet<String> = events.clone().flat_map(|e| projection.reads(e)).collect();
    let keys: Vec<String> = keys.into_iter().collect();
    let mut batch = Batch::new(tx.load(table, &keys).await?);
    for e in events {
        projection.apply(e, &mut batch);
    }
    let changes: Vec<Doc> = batch.into_changes();
    tx.upsert(table, &changes).await?;
    Ok(())
}

/// Differences between the live and the rebuilt documents. Compared by key
/// in maps: the database's collation need not match byte order.
fn compare_docs(name: &str, live: &[Doc], rebuilt: &[Doc], max_reports: usize) -> Vec<String> {
    use std::collections::BTreeMap;
    let live: BTreeMap<&str, &Doc> = live.iter().map(|d| (d.key.as_str(), d)).collect();
    let rebuilt: BTreeMap<&str, &Doc> = rebuilt.iter().map(|d| (d.key.as_str(), d)).collect();
    let mut out = Vec::new();
    for (key, doc) in &live {
        match rebuilt.get(key) {
            Some(r) if r == doc => {}
            Some(_) => out.push(format!("read model {name}: row {key} differs from a rebuild")),
            None => out.push(format!("read model {name}: row {key} should not exist")),
        }
    }
    for key in rebuilt.keys().filter(|k| !live.contains_key(*k)) {
        out.push(format!("read model {name}: row {key} is missing"));
    }
    out.truncate(max_reports);
    out
}
