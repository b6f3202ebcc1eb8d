//! The committer: the one owner of the wallets' decision state.
//!
//! One loop per process takes the commands waiting, decides each in arrival
//! order against the running state (a wallet's later command in the batch
//! sees the earlier one's result), appends the whole batch in one
//! transaction through its own writer, and answers each command. It is the
//! only writer of the state (`cache.rs`); request tasks only read it.
//!
//! The database guards every decision: each stream's append states the head
//! (version and balance) it was decided on, a rejection asserts the heads it
//! was decided on, and the store refuses anything else. A conflict whose
//! heads are the committer's own state (an earlier command of the batch did
//! not go through) is decided again in the next batch; one caused by
//! another process sends the command back to be loaded afresh (a head is
//! not the whole state: holds, limits).
//!
//! After a batch whose answer was lost, the writer finds out what it did
//! (`BatchWriter::resolve`), and each command is answered with the truth.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use uuid::Uuid;

use super::{HoldReceipt, LimitsReceipt, Outcome, Receipt, TransferReceipt, WalletReceipt, MAX_CONFLICTS};
use crate::aggregate::{decide, Command, Decision, DomainError, Wallet, WalletEvent, WalletId};
use crate::cache::WalletCache;
use crate::snapshots;
use crate::store::{
    AppendOutcome, AppendRequest, BatchWriter, Head, IdempotencyRecord, NewEvent, Position, RecordedEvent, Resolution,
    StoreError, StreamAppend, WriteFailure,
};

/// Commands per batch, and events per batch, at most.
const MAX_BATCH_COMMANDS: usize = 512;
const MAX_BATCH_EVENTS: usize = 2048;
/// Submissions waiting for the committer, at most (senders wait beyond
/// it). A submission is one command, or an independent batch's commands.
const QUEUE: usize = 4 * MAX_BATCH_COMMANDS;

/// A command handed to the committer.
pub(crate) struct Job {
    pub command: Command,
    pub key: Option<String>,
    pub fingerprint: String,
    pub request_id: String,
    /// An atomic command: each operation's request id, in order.
    pub request_ids: Vec<String>,
    /// An atomic command: each operation's key and fingerprint, if it has a
    /// key (recorded with the batch, each answering with its own receipt).
    pub op_keys: Vec<Option<(String, String)>>,
    pub metadata: serde_json::Value,
    /// Wallets the request task loaded because the committer did not hold them.
    pub loaded: Vec<Wallet>,
    /// Not decided after this: answered as not applied.
    pub deadline: tokio::time::Instant,
    pub reply: Reply,
}

/// Where a command's verdict goes.
pub(crate) enum Reply {
    /// A command on its own: its requester waits for this one verdict.
    One(oneshot::Sender<Verdict>),
    /// One command of an independent batch: its slot in the batch's
    /// answer, sent once every command of the batch has its verdict (one
    /// wake-up per batch, not one per operation).
    Part { index: usize, gather: Arc<Gather> },
}

/// The verdicts of an independent batch, collected in request order.
pub(crate) struct Gather {
    verdicts: std::sync::Mutex<Vec<Option<Verdict>>>,
    left: AtomicUsize,
    done: std::sync::Mutex<Option<oneshot::Sender<Vec<Option<Verdict>>>>>,
}

impl Gather {
    /// A collector of `count` verdicts, and where they arrive together.
    pub fn new(count: usize) -> (Arc<Self>, oneshot::Receiver<Vec<Option<Verdict>>>) {
        let (done, all) = oneshot::channel();
        let gather = Self {
            verdicts: std::sync::Mutex::new((0..count).map(|_| None).collect()),
            left: AtomicUsize::new(count),
            done: std::sync::Mutex::new(Some(done)),
        };
        (Arc::new(gather), all)
    }

    /// The verdicts in so far (the rest `None`), for a requester that
    /// stops waiting; the last verdicts then go nowhere.
    pub fn partial(&self) -> Vec<Option<Verdict>> {
        std::mem::take(&mut *self.verdicts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn put(&self, index: usize, verdict: Verdict) {
        // Only the committer puts, so the locks are never contended; a
        // poisoned lock still holds the verdicts written before.
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = verdicts.get_mut(index) {
            *slot = Some(verdict);
        }
        drop(verdicts);
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let verdicts = std::mem::take(&mut *self.verdicts.lock().unwrap_or_else(|p| p.into_inner()));
            if let Some(done) = self.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                // The requester may have gone away; the outcomes stand.
                let _ = done.send(verdicts);
            }
        }
    }
}

/// The committer's answer to one command.
#[derive(Debug)]
pub(crate) enum Verdict {
    Committed {
        receipt: Receipt,
        /// Snapshots due: the state after this command, and its position.
        snapshots: Vec<(Wallet, Position)>,
    },
    Rejected(DomainError),
    /// Its key is recorded: the stored answer is the answer. `resolved`:
    /// found after a lost answer, so the record may be this command's own.
    Duplicate {
        resolved: bool,
    },
    /// A wallet it needs is neither held nor loaded: load it and resubmit.
    NeedsState,
    /// Another writer moved a wallet it needs: load it again and resubmit.
    Conflicted,
    /// Its wallets kept changing under it within this process's batches.
    Conflict,
    NotCommitted(StoreError),
    Unknown(StoreError),
}

/// How the committer is doing, for `/ready`.
#[derive(Debug)]
pub struct CommitterStatus {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last progress: a batch the
    /// database answered, or work arriving at an idle committer.
    progress: AtomicU64,
    /// Commands handed over and not answered yet.
    waiting: AtomicUsize,
    /// With work waiting and no progress for this long: not ready.
    stall_after: Duration,
}

impl CommitterStatus {
    /// `Err` while commands wait and no batch has got an answer from the
    /// database for longer than the stall limit.
    pub fn check(&self) -> Result<(), String> {
        let waiting = self.waiting.load(Ordering::Acquire);
        if waiting == 0 {
            return Ok(());
        }
        let since = self.now().saturating_sub(self.progress.load(Ordering::Acquire));
        let stalled = Duration::from_millis(since);
        if stalled > self.stall_after {
            return Err(format!(
                "the committer has had no answer from the database for {stalled:?} ({waiting} commands waiting)"
            ));
        }
        Ok(())
    }

    fn progressed(&self) {
        self.progress.store(self.now(), Ordering::Release);
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// The handle request tasks submit to.
#[derive(Debug)]
pub(crate) struct Committer {
    queue: mpsc::Sender<Vec<Job>>,
    status: Arc<CommitterStatus>,
}

impl Committer {
    /// Starts the loop: on PostgreSQL on a thread of its own (its turnaround
    /// is the write path's ceiling, and on the shared runtime every answer
    /// waited for a worker busy with HTTP), on SQLite on the shared runtime
    /// (the writer connection already has sqlx's thread).
    pub fn start(
        writer: BatchWriter,
        cache: Arc<WalletCache>,
        appended: Arc<Notify>,
        committed: Arc<watch::Sender<Position>>,
        snapshot_every: u64,
        stall_after: Duration,
    ) -> Self {
        let (queue, jobs) = mpsc::channel(QUEUE);
        let status = Arc::new(CommitterStatus {
            epoch: Instant::now(),
            progress: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            stall_after,
        });
        let owner = Owner {
            writer,
            cache,
            appended,
            committed,
            snapshot_every,
            status: status.clone(),
            deferred: Vec::new(),
            retry: VecDeque::new(),
        };
        match matches!(owner.writer, BatchWriter::Postgres(_)) {
            true => {
                let spawned = std::thread::Builder::new()
                    .name("wallet-committer".to_owned())
                    .spawn(
                        move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                            Ok(runtime) => runtime.block_on(owner.run(jobs)),
                            Err(e) => tracing::error!(error = %e, "the committer's runtime did not start"),
                        },
                    );
                if let Err(e) = spawned {
                    // The queue's receiver is gone: every submit answers 503.
                    tracing::error!(error = %e, "the committer's thread did not start");
                }
            }
            false => {
                tokio::spawn(owner.run(jobs));
            }
        }
        Self { queue, status }
    }

    pub fn status(&self) -> &CommitterStatus {
        &self.status
    }

    /// Hands `jobs` over (one command, or an independent batch's commands,
    /// decided in this order), waiting for room in the queue until `deadline`.
    pub async fn submit(&self, jobs: Vec<Job>, deadline: tokio::time::Instant) -> Result<(), StoreError> {
        let count = jobs.len();
        if self.status.waiting.fetch_add(count, Ordering::AcqRel) == 0 {
            // Idle until now: the stall clock starts with this work.
            self.status.progressed();
        }
        // Counted as waiting only once handed over, even if this future is
        // dropped while the queue is full.
        let uncount = Uncount(&self.status.waiting, count);
        let refused = match tokio::time::timeout_at(deadline, self.queue.send(jobs)).await {
            Ok(Ok(())) => {
                std::mem::forget(uncount);
                return Ok(());
            }
            Ok(Err(_)) => "the committer has stopped",
            Err(_) => "the committer's queue stayed full",
        };
        Err(StoreError::BatchFailed(refused.to_owned()))
    }
}

/// Takes commands back off the waiting count unless forgotten.
struct Uncount<'a>(&'a AtomicUsize, usize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

/// A command in the committer's hands, and the conflicts it has met.
struct Pending {
    job: Job,
    conflicts: u32,
}

/// What the committer decided for one command of a batch.
enum Decided {
    /// Events to append; the receipt; the states before and after.
    Accepted {
        receipt: Receipt,
        before: Vec<Wallet>,
        after: Vec<Wallet>,
    },
    /// A rejection, asserting the heads it was decided on.
    Rejected { error: DomainError, on: Vec<Wallet> },
}

/// The loop's own state: nobody else touches it.
struct Owner {
    writer: BatchWriter,
    cache: Arc<WalletCache>,
    appended: Arc<Notify>,
    /// The highest position this committer appended, for the live tail.
    committed: Arc<watch::Sender<Position>>,
    snapshot_every: u64,
    status: Arc<CommitterStatus>,
    /// Commands held back a batch (their key was already in the batch).
    deferred: Vec<Pending>,
    /// Commands that conflicted on this batch's own doing, decided again
    /// first, in arrival order.
    retry: VecDeque<Pending>,
}

impl Owner {
    async fn run(mut self, mut jobs: mpsc::Receiver<Vec<Job>>) {
        while let Some(batch) = self.take(&mut jobs).await {
            self.commit(batch).await;
        }
    }

    /// The next batch: conflicted commands first, then those held back,
    /// then whatever waits (at least one submission: this waits for it).
    /// A submission is never split, so a batch may pass the limits by one
    /// submission (an independent batch holds at most 1,000 commands).
    /// `None` once every sender is gone.
    async fn take(&mut self, jobs: &mut mpsc::Receiver<Vec<Job>>) -> Option<Vec<Pending>> {
        let mut batch: Vec<Pending> = self.retry.drain(..).collect();
        batch.append(&mut self.deferred);
        if batch.is_empty() {
            let first = jobs.recv().await?;
            batch.extend(first.into_iter().map(|job| Pending { job, conflicts: 0 }));
        }
        let mut events: usize = batch.len() * 2;
        while batch.len() < MAX_BATCH_COMMANDS && events < MAX_BATCH_EVENTS {
            match jobs.try_recv() {
                Ok(submission) => {
                    for job in submission {
                        events += 2 * job.command.wallets().len();
                        batch.push(Pending { job, conflicts: 0 });
                    }
                }
                Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Decides the batch, appends it, answers every command of it.
    async fn commit(&mut self, batch: Vec<Pending>) {
        let (planned, requests) = self.decide_all(batch);
        if planned.is_empty() {
            return;
        }
        record_batch_size(&requests);
        let started = Instant::now();
        let written = self.writer.write(&requests).await;
        metrics::histogram!("append_batch_commit_seconds").record(started.elapsed().as_secs_f64());
        match written {
            Ok(written) => {
                self.status.progressed();
                self.settle(planned, written.finish(requests));
            }
            Err(WriteFailure::NotCommitted(e)) => {
                tracing::error!(error = %e, commands = planned.len(), "append batch not committed");
                for (pending, _) in planned {
                    self.answer(pending, Verdict::NotCommitted(StoreError::BatchFailed(e.to_string())));
                }
            }
            Err(WriteFailure::Unknown(e)) => self.resolve(planned, requests, e).await,
        }
    }

    /// Decides each command in arrival order, each on the states the
    /// batch's earlier ones leave (the overlay).
    fn decide_all(&mut self, batch: Vec<Pending>) -> (Vec<(Pending, Decided)>, Vec<AppendRequest>) {
        let mut overlay: HashMap<WalletId, Wallet> = HashMap::new();
        let mut keys: HashSet<(WalletId, String)> = HashSet::new();
        let mut planned: Vec<(Pending, Decided)> = Vec::with_capacity(batch.len());
        let mut requests: Vec<AppendRequest> = Vec::with_capacity(batch.len());
        for pending in batch {
            if tokio::time::Instant::now() > pending.job.deadline {
                let e = StoreError::BatchFailed("the command waited too long for the committer".to_owned());
                self.answer(pending, Verdict::NotCommitted(e));
                continue;
            }
            // The same key twice in one batch: the second can only be a
            // duplicate (or go round with the first), and deciding it would
            // move its wallet's state for the batch's later commands, which
            // would then conflict. It waits a batch. An atomic batch's
            // operation keys count too.
            let taken = job_keys(&pending.job);
            if taken.iter().any(|k| keys.contains(k)) {
                self.deferred.push(pending);
                continue;
            }
            keys.extend(taken);
            let Some(states) = self.states_of(&pending.job, &overlay) else {
                self.answer(pending, Verdict::NeedsState);
                continue;
            };
            let (mut request, decided) = plan(&pending.job, states);
            for stream in &mut request.streams {
                stream.on_batch = overlay.contains_key(&stream.stream);
            }
            if let Decided::Accepted { after, .. } = &decided {
                for state in after {
                    overlay.insert(state.id.clone(), state.clone());
                }
            }
            requests.push(request);
            planned.push((pending, decided));
        }
        (planned, requests)
    }

    /// Each wallet the command needs: as this batch left it, else as the
    /// committer holds it, else as the request task loaded it.
    fn states_of(&self, job: &Job, overlay: &HashMap<WalletId, Wallet>) -> Option<Vec<Wallet>> {
        job.command
            .wallets()
            .into_iter()
            .map(|id| {
                overlay
                    .get(id)
                    .cloned()
                    .or_else(|| self.cache.get(id))
                    .or_else(|| job.loaded.iter().find(|w| &w.id == id).cloned())
            })
            .collect()
    }

    /// The database answered: every command gets its outcome. Conflicts
    /// take the actual heads as the state and go round again.
    fn settle(&mut self, planned: Vec<(Pending, Decided)>, outcomes: Vec<AppendOutcome>) {
        let mut head: Position = 0;
        for ((pending, decided), outcome) in planned.into_iter().zip(outcomes) {
            match outcome {
                AppendOutcome::Appended(recorded) => {
                    head = head.max(recorded.last().map_or(0, |e| e.position));
                    let verdict = self.accepted(decided, &recorded);
                    self.answer(pending, verdict);
                }
                AppendOutcome::Duplicate => self.answer(pending, Verdict::Duplicate { resolved: false }),
                AppendOutcome::Conflict(heads) => self.conflicted(pending, heads),
            }
        }
        self.announce(head);
    }

    /// Wakes this process's readers of the log after an append reached `head`.
    fn announce(&self, head: Position) {
        if head == 0 {
            return;
        }
        self.appended.notify_one();
        self.committed.send_if_modified(|known| {
            let moved = head > *known;
            *known = (*known).max(head);
            moved
        });
    }

    /// A command whose append (or asserted heads) committed.
    fn accepted(&self, decided: Decided, recorded: &[RecordedEvent]) -> Verdict {
        match decided {
            Decided::Rejected { error, on } => {
                for state in on {
                    self.cache.remember(state);
                }
                Verdict::Rejected(error)
            }
            Decided::Accepted {
                mut receipt,
                before,
                after,
            } => {
                let snapshots = self.snapshots_due(&before, &after, recorded);
                for state in after {
                    self.cache.remember(state);
                }
                receipt.set_position(recorded.last().map_or(0, |e| e.position));
                Verdict::Committed { receipt, snapshots }
            }
        }
    }

    /// A stream was not at the head the command expected. If every head
    /// is the one the committer holds (its state, which `settle` has moved
    /// past this batch's earlier appends), the command was decided on a
    /// state of this batch that did not come to be (an earlier command
    /// turned out a duplicate or conflicted): decide it again next batch on
    /// the committer's state. Otherwise another writer moved the wallet; a
    /// head is not the whole state (holds, limits), so the committer forgets
    /// it and the request task loads it again (the committer never waits on
    /// a read).
    fn conflicted(&mut self, mut pending: Pending, heads: Vec<(WalletId, Head)>) {
        metrics::counter!("append_conflicts_total").increment(1);
        pending.conflicts += 1;
        let held: Option<Vec<Wallet>> = heads
            .iter()
            .map(|(id, head)| self.cache.get(id).filter(|w| Head::of(w) == *head))
            .collect();
        match held {
            Some(_) if pending.conflicts >= MAX_CONFLICTS => {
                metrics::counter!("append_conflicts_exhausted_total").increment(1);
                self.answer(pending, Verdict::Conflict);
            }
            Some(states) => {
                pending.job.loaded = states;
                self.retry.push_back(pending);
            }
            None => {
                for (id, _) in heads {
                    self.cache.forget(&id);
                }
                pending.job.loaded.clear();
                self.answer(pending, Verdict::Conflicted);
            }
        }
    }

    /// The batch's answer was lost: find out what it did, answer the truth.
    async fn resolve(&mut self, planned: Vec<(Pending, Decided)>, requests: Vec<AppendRequest>, lost: StoreError) {
        tracing::warn!(error = %lost, commands = planned.len(), "append batch answer lost; resolving");
        // Whatever happened, what the committer held of these wallets may
        // not be the log: they are loaded again, and the heads guard them.
        for request in &requests {
            for s in &request.streams {
                self.cache.forget(&s.stream);
            }
        }
        match self.writer.resolve(requests).await {
            Ok(resolutions) => {
                self.status.progressed();
                let mut head: Position = 0;
                for ((pending, decided), resolution) in planned.into_iter().zip(resolutions) {
                    let verdict = match resolution {
                        Resolution::Committed(recorded) => {
                            head = head.max(recorded.last().map_or(0, |e| e.position));
                            self.accepted(decided, &recorded)
                        }
                        Resolution::Duplicate => Verdict::Duplicate { resolved: true },
                        Resolution::NotCommitted => Verdict::NotCommitted(StoreError::BatchFailed(lost.to_string())),
                    };
                    self.answer(pending, verdict);
                }
                self.announce(head);
            }
            Err(e) => {
                tracing::error!(error = %e, "the lost batch's outcome could not be read");
                for (pending, _) in planned {
                    self.answer(pending, Verdict::Unknown(StoreError::BatchFailed(lost.to_string())));
                }
            }
        }
    }

    fn snapshots_due(
        &self,
        before: &[Wallet],
        after: &[Wallet],
        recorded: &[RecordedEvent],
    ) -> Vec<(Wallet, Position)> {
        let mut due = Vec::new();
        for (b, a) in before.iter().zip(after) {
            if snapshots::due(self.snapshot_every, b.version, a.version) {
                let position = recorded
                    .iter()
                    .rev()
                    .find(|e| e.stream == a.id)
                    .map_or(0, |e| e.position);
                due.push((a.clone(), position));
            }
        }
        due
    }

    fn answer(&self, pending: Pending, verdict: Verdict) {
        self.status.waiting.fetch_sub(1, Ordering::Relaxed);
        match pending.job.reply {
            // The requester may have gone away; the outcome stands either way.
            Reply::One(reply) => {
                let _ = reply.send(verdict);
            }
            Reply::Part { index, gather } => gather.put(index, verdict),
        }
    }
}

/// Decides one command on `states` (its wallets, in order) and builds the
/// append that states what it was decided on.
fn plan(job: &Job, states: Vec<Wallet>) -> (AppendRequest, Decided) {
    let refs: Vec<&Wallet> = states.iter().collect();
    match decide(&job.command, &refs) {
        Ok(decision) => plan_accepted(job, decision, states),
        Err(error) => plan_rejected(job, error, states),
    }
}

/// The events, each stream expecting the head it was decided on, and the
/// receipt remembered under the key.
fn plan_accepted(job: &Job, decision: Decision, states: Vec<Wallet>) -> (AppendRequest, Decided) {
    let mut after = Vec::with_capacity(decision.streams.len());
    for s in &decision.streams {
        let before = states
            .iter()
            .find(|w| w.id == s.wallet)
            .expect("decided on its own wallets");
        after.push(s.events.iter().fold(before.clone(), |w, e| w.evolve(e)));
    }
    let receipt = match &job.command {
        Command::Atomic { ops } => Receipt::Batch(batch_receipts(ops, &states, &job.request_ids)),
        command => receipt(command, &decision, &states, &after, &job.request_id),
    };
    let mut records: Vec<IdempotencyRecord> = record(job, Outcome::Receipt(receipt.clone())).into_iter().collect();
    if let (Command::Atomic { ops }, Receipt::Batch(receipts)) = (&job.command, &receipt) {
        let outcomes = receipts.iter().map(|r| Outcome::Receipt(r.clone()));
        records.extend(operation_records(ops, outcomes, &job.op_keys));
    }
    let mut streams = Vec::with_capacity(decision.streams.len());
    for s in decision.streams {
        let before = states
            .iter()
            .find(|w| w.id == s.wallet)
            .expect("decided on its own wallets");
        streams.push(StreamAppend {
            expected: Head::of(before),
            stream: s.wallet,
            events: s
                .events
                .into_iter()
                .map(|event| new_event(event, &job.metadata))
                .collect(),
            on_batch: false,
        });
    }
    let request = AppendRequest {
        streams,
        idempotency: records,
    };
    let decided = Decided::Accepted {
        receipt,
        before: states,
        after,
    };
    (request, decided)
}

/// A rejection: remembered under the key, and guarded like an append (the
/// heads it was decided on must still be the log's).
fn plan_rejected(job: &Job, error: DomainError, states: Vec<Wallet>) -> (AppendRequest, Decided) {
    let on: Vec<Wallet> = if error == DomainError::SameWallet {
        Vec::new()
    } else {
        states
    };
    let request = AppendRequest {
        streams: on
            .iter()
            .map(|w| StreamAppend {
                stream: w.id.clone(),
                expected: Head::of(w),
                events: Vec::new(),
                on_batch: false,
            })
            .collect(),
        idempotency: rejection_records(job, &error),
    };
    (request, Decided::Rejected { error, on })
}

fn new_event(event: crate::aggregate::WalletEvent, metadata: &serde_json::Value) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event,
        metadata: metadata.clone(),
    }
}

fn record(job: &Job, outcome: Outcome) -> Option<IdempotencyRecord> {
    let key = job.key.as_ref()?;
    Some(IdempotencyRecord {
        wallet: job.command.wallet().clone(),
        key: key.clone(),
        fingerprint: job.fingerprint.clone(),
        outcome: serde_json::to_value(outcome).expect("outcomes serialise"),
    })
}

/// A rejection's records: its key, and an atomic batch's operation keys,
/// each remembering the batch's refusal (a key once used answers the same,
/// as a single operation's does).
fn rejection_records(job: &Job, error: &DomainError) -> Vec<IdempotencyRecord> {
    let mut records: Vec<IdempotencyRecord> = record(job, Outcome::Rejected(error.clone())).into_iter().collect();
    if let Command::Atomic { ops } = &job.command {
        let outcomes = ops.iter().map(|_| Outcome::Rejected(error.clone()));
        records.extend(operation_records(ops, outcomes, &job.op_keys));
    }
    records
}

/// Every key a job records: its own (scoped to its first wallet) and an
/// atomic batch's operation keys (each scoped to its operation's wallet).
fn job_keys(job: &Job) -> Vec<(WalletId, String)> {
    let mut keys = Vec::new();
    if let Some(key) = &job.key {
        keys.push((job.command.wallet().clone(), key.clone()));
    }
    if let Command::Atomic { ops } = &job.command {
        for (op, key) in ops.iter().zip(&job.op_keys) {
            if let Some((key, _)) = key {
                keys.push((op.wallet().clone(), key.clone()));
            }
        }
    }
    keys
}

/// The records of an atomic batch's operation keys, each with its
/// operation's own outcome, so the key answers on its own route too.
fn operation_records(
    ops: &[Command],
    outcomes: impl Iterator<Item = Outcome>,
    keys: &[Option<(String, String)>],
) -> Vec<IdempotencyRecord> {
    ops.iter()
        .zip(outcomes)
        .zip(keys)
        .filter_map(|((op, outcome), key)| {
            let (key, fingerprint) = key.as_ref()?;
            Some(IdempotencyRecord {
                wallet: op.wallet().clone(),
                key: key.clone(),
                fingerprint: fingerprint.clone(),
                outcome: serde_json::to_value(outcome).expect("outcomes serialise"),
            })
        })
        .collect()
}

fn record_batch_size(requests: &[AppendRequest]) {
    let events: usize = requests.iter().flat_map(|r| &r.streams).map(|s| s.events.len()).sum();
    metrics::histogram!("append_batch_requests").record(requests.len() as f64);
    metrics::histogram!("append_batch_events").record(events as f64);
}

fn receipt(command: &Command, decision: &Decision, before: &[Wallet], after: &[Wallet], request_id: &str) -> Receipt {
    match command {
        Command::Transfer {
            from,
            to,
            amount,
            transfer_id,
        } => Receipt::Transfer(TransferReceipt {
            transfer_id: *transfer_id,
            from_wallet_id: from.clone(),
            to_wallet_id: to.clone(),
            amount: *amount,
            status: "completed".to_owned(),
            request_id: request_id.to_owned(),
            from_balance: decision.streams[0].balance,
            to_balance: decision.streams[1].balance,
            position: 0,
        }),
        Command::Deposit { .. } | Command::Withdraw { .. } => {
            let s = &decision.streams[0];
            Receipt::Wallet(WalletReceipt {
                wallet_id: s.wallet.clone(),
                balance: s.balance,
                request_id: request_id.to_owned(),
                created: s.created,
                position: 0,
            })
        }
        Command::SetLimits { wallet, .. } => Receipt::Limits(LimitsReceipt {
            wallet_id: wallet.clone(),
            min_balance: after[0].limits.min_balance,
            max_balance: after[0].limits.max_balance,
            balance: after[0].balance,
            available: after[0].available(),
            request_id: request_id.to_owned(),
            position: 0,
        }),
        Command::PlaceHold { .. }
        | Command::CaptureHold { .. }
        | Command::VoidHold { .. }
        | Command::ExpireHold { .. } => Receipt::Hold(hold_receipt(decision, before, after, request_id)),
        Command::Atomic { ops } => Receipt::Batch(batch_receipts(ops, before, &[])),
    }
}

/// Each operation's receipt in an atomic command, deciding them again one
/// by one on the states the earlier ones leave (pure, and already decided
/// together, so each succeeds).
fn batch_receipts(ops: &[Command], before: &[Wallet], request_ids: &[String]) -> Vec<Receipt> {
    let mut states = before.to_vec();
    let mut receipts = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let mine: Vec<Wallet> = op
            .wallets()
            .into_iter()
            .map(|id| {
                states
                    .iter()
                    .find(|w| &w.id == id)
                    .cloned()
                    .expect("an atomic command holds its ops' wallets")
            })
            .collect();
        let decision = decide(op, &mine.iter().collect::<Vec<_>>()).expect("decided together already");
        let after: Vec<Wallet> = decision
            .streams
            .iter()
            .zip(&mine)
            .map(|(s, w)| s.events.iter().fold(w.clone(), |w, e| w.evolve(e)))
            .collect();
        for state in &after {
            if let Some(slot) = states.iter_mut().find(|w| w.id == state.id) {
                *slot = state.clone();
            }
        }
        let request_id = request_ids.get(i).map_or("", String::as_str);
        receipts.push(receipt(op, &decision, &mine, &after, request_id));
    }
    receipts
}

/// A hold's receipt, from the event its command wrote on the wallet's stream.
fn hold_receipt(decision: &Decision, before: &[Wallet], after: &[Wallet], request_id: &str) -> HoldReceipt {
    let event = &decision.streams[0].events[0];
    let hold_id = event.hold_id().expect("hold commands write hold events");
    let hold = before[0]
        .holds
        .get(&hold_id)
        .or_else(|| after[0].holds.get(&hold_id))
        .expect("a hold event names a hold of its wallet");
    let (status, captured, released) = match event {
        WalletEvent::HoldPlaced(_) => ("held", None, None),
        WalletEvent::HoldCaptured(p) => ("captured", Some(p.amount), Some(p.released)),
        WalletEvent::HoldVoided(p) => ("voided", None, Some(p.amount.as_balance())),
        _ => ("expired", None, Some(hold.amount.as_balance())),
    };
    HoldReceipt {
        hold_id,
        wallet_id: after[0].id.clone(),
        amount: hold.amount,
        status: status.to_owned(),
        expires_at: hold.expires_at,
        to_wallet_id: hold.to.clone(),
        captured,
        released,
        balance: after[0].balance,
        available: after[0].available(),
        to_balance: after.get(1).map(|w| w.balance),
        request_id: request_id.to_owned(),
        position: 0,
    }
}
