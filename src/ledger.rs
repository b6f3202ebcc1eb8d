//! The command path: load, decide, append, retry; idempotency on the way.
//!
//! Every write goes through `Ledger::execute`:
//! 1. take the stripe locks of the wallets involved (same-wallet commands in
//!    this process are decided one after another; unrelated wallets almost
//!    never share a stripe),
//! 2. take each wallet's state: the one its in-flight command (enqueued, not
//!    yet committed) leads to, else the cached one (`cache.rs`), else a fold
//!    of the log,
//! 3. `decide` and enqueue the events with the idempotency record to the
//!    group committer, release the locks and wait for the commit. A command
//!    decided on an in-flight state expects that command's last event at the
//!    head of the stream, so it fails if its predecessor did,
//! 4. a key that is already recorded makes the append fail as a duplicate:
//!    the stored outcome is the answer (no lookup before the common case of
//!    a new key),
//! 5. on a conflict (another process appended first, or a predecessor
//!    failed) forget the wallets' cached and in-flight states, reload and
//!    re-decide, a bounded number of times. Rejections are decided on the
//!    log only, with nothing of the wallets in flight.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use futures_util::future::try_join_all;

use tokio::sync::{Mutex, MutexGuard, Notify};
use uuid::Uuid;

use crate::aggregate::{decide, Amount, Balance, Command, Decision, DomainError, Wallet, WalletId};
use crate::cache::{WalletCache, DEFAULT_CAPACITY};
use crate::freshness::VersionProbe;
use crate::snapshots;
use crate::store::{
    AppendError, AppendRequest, Cutoff, EventStore, IdempotencyRecord, NewEvent, Position, RecordedEvent, StoreError,
    StoredOutcome, StreamAppend,
};

/// Appends attempted per command before answering `CONCURRENCY_CONFLICT`.
const MAX_ATTEMPTS: u32 = 10;
/// Lock stripes: bounded memory, and two unrelated wallets share one with
/// probability 1/1024.
const STRIPES: usize = 1024;

/// Answer to a deposit or withdrawal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalletReceipt {
    #[schema(value_type = String, example = "alice")]
    pub wallet_id: WalletId,
    /// Balance right after this operation.
    #[schema(value_type = String, example = "150.5000")]
    pub balance: Balance,
    pub request_id: String,
    /// Whether this operation opened the wallet.
    pub created: bool,
    /// Log position of the last event written; use as `minPosition`.
    pub position: Position,
}

/// Answer to a transfer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TransferReceipt {
    pub transfer_id: Uuid,
    #[schema(value_type = String)]
    pub from_wallet_id: WalletId,
    #[schema(value_type = String)]
    pub to_wallet_id: WalletId,
    #[schema(value_type = String, example = "25.0000")]
    pub amount: Amount,
    /// Always "completed": a transfer is one atomic append.
    #[schema(example = "completed")]
    pub status: String,
    pub request_id: String,
    #[schema(value_type = String)]
    pub from_balance: Balance,
    #[schema(value_type = String)]
    pub to_balance: Balance,
    pub position: Position,
}

/// A receipt, and whether it was replayed from an earlier identical request.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<R> {
    pub receipt: R,
    pub replayed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("{error}")]
    Rejected { error: DomainError, replayed: bool },
    #[error("idempotency key was already used for a different request")]
    KeyReused,
    #[error("gave up after {MAX_ATTEMPTS} conflicting attempts")]
    Conflict,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an idempotency row remembers.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Outcome<R> {
    Receipt(R),
    Rejected(DomainError),
}

trait Receipt: Serialize + DeserializeOwned {
    fn set_position(&mut self, position: Position);
}
impl Receipt for WalletReceipt {
    fn set_position(&mut self, position: Position) {
        self.position = position;
    }
}
impl Receipt for TransferReceipt {
    fn set_position(&mut self, position: Position) {
        self.position = position;
    }
}

#[derive(Debug)]
pub struct Ledger {
    store: EventStore,
    stripes: Box<[Mutex<()>]>,
    appended: Arc<Notify>,
    snapshot_every: u64,
    cache: WalletCache,
    /// Started on first use: a ledger may be built outside the runtime.
    probe: std::sync::OnceLock<VersionProbe>,
    /// Wallets with enqueued, uncommitted commands: their state after the
    /// newest one. Entries live only as long as their command is in flight.
    in_flight: DashMap<WalletId, InFlight>,
    next_seq: AtomicU64,
    /// Notified whenever an in-flight entry goes.
    settled: Notify,
}

/// A wallet as it will be once its newest enqueued command commits.
#[derive(Debug)]
struct InFlight {
    state: Wallet,
    /// The command's last event in this wallet's stream: what a command
    /// stacked on it expects to find at the head.
    last_event: Uuid,
    /// Which command wrote the entry.
    seq: u64,
}

/// Removes a command's in-flight entries (unless a later command replaced
/// them) however its request ends, even if its task is dropped.
struct InFlightGuard<'a> {
    ledger: &'a Ledger,
    wallets: &'a [&'a WalletId],
    seq: u64,
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        for w in self.wallets {
            self.ledger.in_flight.remove_if(*w, |_, f| f.seq == self.seq);
        }
        self.ledger.settled.notify_waiters();
    }
}

impl Ledger {
    pub fn new(store: EventStore) -> Self {
        Self {
            probe: std::sync::OnceLock::new(),
            store,
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            appended: Arc::new(Notify::new()),
            snapshot_every: snapshots::DEFAULT_SNAPSHOT_EVERY,
            cache: WalletCache::new(DEFAULT_CAPACITY),
            in_flight: DashMap::new(),
            next_seq: AtomicU64::new(0),
            settled: Notify::new(),
        }
    }

    /// Folded wallets kept in memory (0 disables the cache).
    pub fn with_cache_capacity(mut self, wallets: usize) -> Self {
        self.cache = WalletCache::new(wallets);
        self
    }

    /// Events between snapshots of a stream (0 disables snapshots).
    pub fn with_snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = events;
        self
    }

    /// Notified after every successful append: wakes the in-process
    /// projection runner without polling.
    pub fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    pub async fn deposit(
        &self,
        wallet: WalletId,
        amount: Amount,
        key: Option<String>,
    ) -> Result<Answer<WalletReceipt>, CommandError> {
        let fingerprint = format!("deposit:{amount}");
        self.execute(Command::Deposit { wallet, amount }, key, fingerprint, wallet_receipt)
            .await
    }

    pub async fn withdraw(
        &self,
        wallet: WalletId,
        amount: Amount,
        key: Option<String>,
    ) -> Result<Answer<WalletReceipt>, CommandError> {
        let fingerprint = format!("withdraw:{amount}");
        self.execute(Command::Withdraw { wallet, amount }, key, fingerprint, wallet_receipt)
            .await
    }

    pub async fn transfer(
        &self,
        from: WalletId,
        to: WalletId,
        amount: Amount,
        key: Option<String>,
    ) -> Result<Answer<TransferReceipt>, CommandError> {
        let fingerprint = format!("transfer:{to}:{amount}");
        let command = Command::Transfer {
            from,
            to,
            amount,
            transfer_id: Uuid::now_v7(),
        };
        self.execute(command, key, fingerprint, transfer_receipt).await
    }

    /// A wallet's state: the fold of its stream (from its newest snapshot),
    /// up to `cutoff` if given.
    /// A wallet's state, up to `cutoff` if given. The current state is the
    /// cached one if the log's version of the wallet (asked together with
    /// other concurrent reads, `freshness.rs`) has not moved past it, else
    /// the cached one brought up to date with the events after it: fresh even
    /// when another process wrote the wallet.
    pub async fn wallet(&self, id: &WalletId, cutoff: Option<Cutoff>) -> Result<Wallet, StoreError> {
        if cutoff.is_some() {
            return snapshots::load(&self.store, id, cutoff).await;
        }
        let current = match self.cache.get(id) {
            Some(cached) => {
                let probe = self.probe.get_or_init(|| VersionProbe::spawn(self.store.clone()));
                if probe.version(id).await? <= cached.version {
                    return Ok(cached);
                }
                let tail = self.store.read_stream(id, cached.version, None).await?;
                tail.iter().fold(cached, |w, e| w.evolve(&e.event))
            }
            None => return self.load(id).await,
        };
        self.cache.remember(current.clone());
        Ok(current)
    }

    /// Folds a wallet from the log (snapshot + tail) and caches it.
    async fn load(&self, id: &WalletId) -> Result<Wallet, StoreError> {
        let loaded = snapshots::load(&self.store, id, None).await?;
        self.cache.remember(loaded.clone());
        Ok(loaded)
    }

    /// The state to decide against: the cached one without any query. A
    /// stale entry only costs a version conflict, which forgets it.
    async fn decidable(&self, id: &WalletId) -> Result<Wallet, StoreError> {
        match self.cache.get(id) {
            Some(cached) => Ok(cached),
            None => self.load(id).await,
        }
    }

    /// Writes snapshots of the streams this append moved past a multiple of
    /// `snapshot_every`, in the background: never on the request's path, and
    /// a failure only costs speed.
    fn snapshot_if_due(&self, before: &[Wallet], recorded: &[RecordedEvent]) {
        for state in before {
            let Some(last) = recorded.iter().rev().find(|e| e.stream == state.id) else {
                continue;
            };
            if !snapshots::due(self.snapshot_every, state.version, last.version) {
                continue;
            }
            let after = recorded
                .iter()
                .filter(|e| e.stream == state.id)
                .fold(state.clone(), |w, e| w.evolve(&e.event));
            let (store, position) = (self.store.clone(), last.position);
            tokio::spawn(async move {
                if let Err(e) = snapshots::save(&store, &after, position).await {
                    tracing::warn!(wallet = %after.id, error = %e, "snapshot not written");
                }
            });
        }
    }

    async fn execute<R: Receipt>(
        &self,
        command: Command,
        key: Option<String>,
        fingerprint: String,
        receipt: fn(&Command, &Decision, &str) -> R,
    ) -> Result<Answer<R>, CommandError> {
        let wallets = command.wallets();
        // Idempotency is scoped to the wallet in the path: the first one.
        let scope = wallets[0].clone();
        let request_id = key.clone().unwrap_or_else(|| Uuid::new_v4().to_string());
        let record = |outcome: serde_json::Value| {
            key.as_ref().map(|key| IdempotencyRecord {
                wallet: scope.clone(),
                key: key.clone(),
                fingerprint: fingerprint.clone(),
                outcome,
            })
        };

        // Attempts decided on a committed state count toward MAX_ATTEMPTS.
        // One stacked on an in-flight command that then failed (a client's
        // retry of a recorded key, say) is not this command's conflict: it
        // does not count, and the next attempt first lets the wallets settle
        // and decides on the log, so a failure never cascades further.
        let mut attempt = 0;
        let mut settle_first = false;
        for _ in 0..MAX_ATTEMPTS * 2 {
            if attempt >= MAX_ATTEMPTS {
                break;
            }
            let locks = self.lock(&wallets).await;
            if std::mem::take(&mut settle_first) {
                self.settle(&wallets).await;
            }
            // Decide on top of the wallet's commands still in flight, if
            // any, else on its committed state.
            let mut bases: Vec<(Wallet, Option<Uuid>)> = Vec::with_capacity(wallets.len());
            for id in &wallets {
                let in_flight = self.in_flight.get(*id).map(|f| (f.state.clone(), f.last_event));
                bases.push(match in_flight {
                    Some((state, last)) => (state, Some(last)),
                    None => (self.decidable(id).await?, None),
                });
            }
            let decision = match decide(&command, &bases.iter().map(|(w, _)| w).collect::<Vec<_>>()) {
                Ok(decision) => decision,
                Err(_) => {
                    // A rejection is remembered for good and no version check
                    // guards it: decide it again on the log's state, with
                    // nothing of these wallets in flight (the locks keep new
                    // commands from stacking meanwhile), not on a state that
                    // may not commit or that another process has moved on from.
                    self.settle(&wallets).await;
                    // Straight from the log: a late cache update of a
                    // command that already left the in-flight map must not
                    // count.
                    let fresh = try_join_all(wallets.iter().map(|id| self.load(id))).await?;
                    match decide(&command, &fresh.iter().collect::<Vec<_>>()) {
                        Ok(decision) => {
                            bases = fresh.into_iter().map(|w| (w, None)).collect();
                            decision
                        }
                        Err(error) => {
                            let outcome = serde_json::to_value(Outcome::<R>::Rejected(error.clone()))
                                .expect("outcomes serialise");
                            if let Some(rec) = record(outcome) {
                                match self.store.remember_rejection(rec).await {
                                    Ok(()) => {}
                                    Err(AppendError::DuplicateRequest) => {
                                        return self.replay_stored(&scope, &key, &fingerprint).await
                                    }
                                    Err(AppendError::Conflict { .. }) => {
                                        unreachable!("rejections append no events")
                                    }
                                    Err(AppendError::Store(e)) => return Err(e.into()),
                                }
                            }
                            return Err(CommandError::Rejected { error, replayed: false });
                        }
                    }
                }
            };
            let mut answer = receipt(&command, &decision, &request_id);
            let outcome = serde_json::to_value(Outcome::Receipt(&answer)).expect("receipts serialise");
            let base = |id: &WalletId| {
                bases
                    .iter()
                    .find(|(w, _)| &w.id == id)
                    .expect("a decision only touches the command's wallets")
            };
            let append = AppendRequest {
                streams: decision
                    .streams
                    .into_iter()
                    .map(|s| StreamAppend {
                        expected_last_event: base(&s.wallet).1,
                        stream: s.wallet,
                        expected_version: s.expected_version,
                        events: s
                            .events
                            .into_iter()
                            .map(|event| NewEvent {
                                event_id: Uuid::now_v7(),
                                event,
                                metadata: serde_json::json!({
                                    "requestId": request_id,
                                    "idempotencyKey": key,
                                    "correlationId": request_id,
                                    "auditId": crate::audit::current_audit_id(),
                                }),
                            })
                            .collect(),
                    })
                    .collect(),
                idempotency: record(outcome),
            };
            // What the wallets will be once this commits: the next command
            // on them decides on top of it without waiting for the commit.
            let afters: Vec<InFlight> = append
                .streams
                .iter()
                .map(|s| InFlight {
                    state: s
                        .events
                        .iter()
                        .fold(base(&s.stream).0.clone(), |w, e| w.evolve(&e.event)),
                    last_event: s.events.last().expect("an append carries events").event_id,
                    seq: 0,
                })
                .collect();
            // Enqueued under the locks: commands on a wallet reach the
            // committer in the order they were decided.
            let queued = match self.store.enqueue(append).await {
                Ok(queued) => queued,
                Err(e) => return Err(self.failed(&wallets, e)),
            };
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            for after in afters {
                self.in_flight.insert(after.state.id.clone(), InFlight { seq, ..after });
            }
            drop(locks);
            let in_flight = InFlightGuard {
                ledger: self,
                wallets: &wallets,
                seq,
            };

            match queued.committed().await {
                Ok(recorded) => {
                    self.appended.notify_one();
                    let states: Vec<Wallet> = bases.into_iter().map(|(w, _)| w).collect();
                    // The cache first, then the in-flight entry goes: the
                    // next command finds one or the other, never neither.
                    for state in &states {
                        let after = recorded
                            .iter()
                            .filter(|e| e.stream == state.id)
                            .fold(state.clone(), |w, e| w.evolve(&e.event));
                        self.cache.remember(after);
                    }
                    drop(in_flight);
                    self.snapshot_if_due(&states, &recorded);
                    let last = recorded.last().expect("an append records events").position;
                    answer.set_position(last);
                    return Ok(Answer {
                        receipt: answer,
                        replayed: false,
                    });
                }
                Err(AppendError::Conflict { stream, .. }) => {
                    tracing::debug!(%stream, attempt, "version conflict, re-deciding");
                    metrics::counter!("append_conflicts_total").increment(1);
                    // Another process wrote, or a command this one stacked on
                    // failed: what is cached or in flight is not the log.
                    self.abandon(&wallets);
                    drop(in_flight);
                    // The stream that conflicted decides whose conflict it was.
                    let stacked = bases.iter().any(|(w, last)| w.id == stream && last.is_some());
                    if stacked {
                        settle_first = true;
                    } else {
                        attempt += 1;
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
                Err(AppendError::DuplicateRequest) => {
                    self.abandon(&wallets);
                    drop(in_flight);
                    return self.replay_stored(&scope, &key, &fingerprint).await;
                }
                Err(e) => {
                    drop(in_flight);
                    return Err(self.failed(&wallets, e));
                }
            }
        }
        metrics::counter!("append_conflicts_exhausted_total").increment(1);
        Err(CommandError::Conflict)
    }

    /// An append whose outcome is unknown (the commit may have happened):
    /// forget what this process thought of the wallets.
    fn failed(&self, wallets: &[&WalletId], e: AppendError) -> CommandError {
        self.abandon(wallets);
        match e {
            AppendError::Store(e) => e.into(),
            AppendError::Conflict { .. } | AppendError::DuplicateRequest => CommandError::Conflict,
        }
    }

    /// Forgets the cached and in-flight states of `wallets`: commands
    /// stacked on a failed one fail too (their expected last event is not
    /// in the log) and re-decide on the log.
    fn abandon(&self, wallets: &[&WalletId]) {
        for w in wallets {
            self.cache.forget(w);
            self.in_flight.remove(*w);
        }
        self.settled.notify_waiters();
    }

    /// Waits until no command on `wallets` is in flight.
    async fn settle(&self, wallets: &[&WalletId]) {
        loop {
            let notified = self.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if wallets.iter().all(|w| !self.in_flight.contains_key(*w)) {
                return;
            }
            notified.await;
        }
    }

    /// A concurrent request with the same key committed first: answer from it.
    async fn replay_stored<R: Receipt>(
        &self,
        scope: &WalletId,
        key: &Option<String>,
        fingerprint: &str,
    ) -> Result<Answer<R>, CommandError> {
        let key = key.as_deref().expect("only keyed requests can be duplicates");
        match self.store.find_idempotency(scope, key).await? {
            Some(found) => replay(found, fingerprint),
            None => Err(CommandError::Conflict),
        }
    }

    async fn lock(&self, wallets: &[&WalletId]) -> Vec<MutexGuard<'_, ()>> {
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        let mut stripes: Vec<usize> = wallets.iter().map(|w| hasher.hash_one(w) as usize % STRIPES).collect();
        // A fixed order prevents deadlock between opposite transfers.
        stripes.sort_unstable();
        stripes.dedup();
        let mut guards = Vec::with_capacity(stripes.len());
        for i in stripes {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }
}

fn replay<R: Receipt>(found: StoredOutcome, fingerprint: &str) -> Result<Answer<R>, CommandError> {
    if found.fingerprint != fingerprint {
        return Err(CommandError::KeyReused);
    }
    let outcome: Outcome<R> = serde_json::from_value(found.outcome)
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(format!("stored idempotency outcome: {e}").into())))?;
    match outcome {
        Outcome::Receipt(mut receipt) => {
            receipt.set_position(found.position.unwrap_or(0));
            Ok(Answer {
                receipt,
                replayed: true,
            })
        }
        Outcome::Rejected(error) => Err(CommandError::Rejected { error, replayed: true }),
    }
}

/// Jittered, growing pause between conflicting attempts.
fn backoff(attempt: u32) -> Duration {
    let jitter = (Uuid::new_v4().as_u128() % 1000) as u64;
    Duration::from_micros(u64::from(attempt) * 500 + jitter * u64::from(attempt))
}

fn wallet_receipt(_: &Command, decision: &Decision, request_id: &str) -> WalletReceipt {
    let s = &decision.streams[0];
    WalletReceipt {
        wallet_id: s.wallet.clone(),
        balance: s.balance,
        request_id: request_id.to_owned(),
        created: s.created,
        position: 0,
    }
}

fn transfer_receipt(command: &Command, decision: &Decision, request_id: &str) -> TransferReceipt {
    let Command::Transfer {
        from,
        to,
        amount,
        transfer_id,
    } = command
    else {
        unreachable!("transfer receipts are only built for transfers")
    };
    TransferReceipt {
        transfer_id: *transfer_id,
        from_wallet_id: from.clone(),
        to_wallet_id: to.clone(),
        amount: *amount,
        status: "completed".to_owned(),
        request_id: request_id.to_owned(),
        from_balance: decision.streams[0].balance,
        to_balance: decision.streams[1].balance,
        position: 0,
    }
}
