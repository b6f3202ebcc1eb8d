//! The command path: a request task validates and, for a wallet the
//! committer does not hold, loads it; the committer (`committer.rs`) decides
//! every command, appends, and answers. Nothing is decided outside it.
//!
//! `Ledger::execute` for every write:
//! 1. load the command's wallets that the committer's state (`cache.rs`,
//!    written by the committer alone) does not hold, from the log;
//! 2. hand the command to the committer and wait for its verdict, within a
//!    deadline derived from the committer's own;
//! 3. turn the verdict into the answer: a receipt (201), a rejection, the
//!    stored answer of a recorded key (a replay), or 503: `UNAVAILABLE` for
//!    what certainly did not commit, `OUTCOME_UNKNOWN` for what may have.
//!
//! Balance reads (`Ledger::wallet`) take the committer's state and ask the
//! log whether the wallet moved since (`freshness.rs`); they never write
//! the state.

mod committer;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify};
use tracing::Instrument;
use uuid::Uuid;

use crate::aggregate::{Amount, Balance, Command, DomainError, Wallet, WalletEvent, WalletId};
use crate::cache::{WalletCache, DEFAULT_CAPACITY};
use crate::freshness::VersionProbe;
use crate::snapshots;
use crate::store::{Cutoff, EventStore, Position, StoreError, StoredOutcome, WriterOptions};

pub use committer::CommitterStatus;
use committer::{Committer, Gather, Job, Reply, Verdict};

/// Conflicts (another process wrote first) a command may meet before it is
/// answered `CONCURRENCY_CONFLICT`.
const MAX_CONFLICTS: u32 = 10;
/// Longest a command waits in the committer's queue before it is answered,
/// not applied, with 503 `UNAVAILABLE`.
const QUEUE_DEADLINE: Duration = Duration::from_secs(10);
/// Longest the request task may take to load the wallets the committer does
/// not hold; past it the command is not handed over (503 `UNAVAILABLE`).
const LOAD_DEADLINE: Duration = Duration::from_secs(5);

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

/// Answer to a hold placed, captured, voided or expired.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldReceipt {
    pub hold_id: Uuid,
    #[schema(value_type = String, example = "alice")]
    pub wallet_id: WalletId,
    /// The amount the hold reserved.
    #[schema(value_type = String, example = "40.0000")]
    pub amount: Amount,
    /// "held", "captured", "voided" or "expired".
    #[schema(example = "held")]
    pub status: String,
    pub expires_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub to_wallet_id: Option<WalletId>,
    /// Captured: the money taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub captured: Option<Amount>,
    /// Resolved: the money given back to available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub released: Option<Balance>,
    /// The wallet's balance right after (held money included).
    #[schema(value_type = String, example = "150.5000")]
    pub balance: Balance,
    /// Balance less active holds, right after.
    #[schema(value_type = String, example = "110.5000")]
    pub available: Balance,
    /// A capture into `toWalletId`: that wallet's balance right after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub to_balance: Option<Balance>,
    pub request_id: String,
    pub position: Position,
}

/// Answer to a change of limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsReceipt {
    #[schema(value_type = String, example = "alice")]
    pub wallet_id: WalletId,
    #[schema(value_type = String, example = "0.0000")]
    pub min_balance: Balance,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "1000.0000")]
    pub max_balance: Option<Balance>,
    #[schema(value_type = String)]
    pub balance: Balance,
    #[schema(value_type = String)]
    pub available: Balance,
    pub request_id: String,
    pub position: Position,
}

/// Any receipt; stored under a key in this shape (untagged: the variants
/// with the most particular fields come first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Receipt {
    /// An atomic batch: each operation's receipt, in order.
    Batch(Vec<Receipt>),
    Transfer(TransferReceipt),
    Hold(HoldReceipt),
    Limits(LimitsReceipt),
    Wallet(WalletReceipt),
}

impl Receipt {
    fn set_position(&mut self, position: Position) {
        match self {
            Receipt::Transfer(r) => r.position = position,
            Receipt::Hold(r) => r.position = position,
            Receipt::Limits(r) => r.position = position,
            Receipt::Wallet(r) => r.position = position,
            Receipt::Batch(receipts) => receipts.iter_mut().for_each(|r| r.set_position(position)),
        }
    }
}

/// What an idempotency row remembers.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Outcome {
    Receipt(Receipt),
    Rejected(DomainError),
}

/// A command on its way to the committer, with what its answer needs.
struct Submission {
    command: Command,
    key: Option<String>,
    fingerprint: String,
    /// The key, or a fresh id: names the request in its events and receipt.
    request_id: String,
    /// What its events carry besides their payload.
    metadata: serde_json::Value,
    /// An atomic command: each operation's request id.
    request_ids: Vec<String>,
    /// An atomic command: each operation's key and fingerprint, if keyed.
    op_keys: Vec<Option<(String, String)>>,
}

impl Submission {
    /// Made in the request's task: the metadata names its audit record and trace.
    fn new(command: Command, key: Option<String>, fingerprint: String) -> Self {
        let request_id = key.clone().unwrap_or_else(|| Uuid::new_v4().to_string());
        let mut metadata = serde_json::json!({
            "requestId": request_id,
            "idempotencyKey": key,
            "correlationId": request_id,
            "auditId": crate::audit::current_audit_id(),
        });
        if let Some(traceparent) = crate::audit::current_traceparent() {
            metadata["traceparent"] = traceparent.into();
        }
        Self {
            command,
            key,
            fingerprint,
            request_id,
            metadata,
            request_ids: Vec::new(),
            op_keys: Vec::new(),
        }
    }
}

/// What a request task does after a verdict.
enum Next {
    /// The answer.
    Done(Result<Answer<Receipt>, CommandError>),
    /// Load the command's wallets again and resubmit it.
    Reload,
    /// Its key was recorded first: answer from the record.
    Replay { resolved: bool },
}

/// A hold to place.
#[derive(Debug, Clone)]
pub struct HoldRequest {
    pub wallet: WalletId,
    pub amount: Amount,
    /// How long the hold lasts, as asked (part of its fingerprint).
    pub expires_in: Duration,
    pub expires_at: DateTime<Utc>,
    pub to: Option<WalletId>,
}

/// One money operation, as a client asks for it (one route, or one entry of
/// a batch).
#[derive(Debug, Clone)]
pub enum Operation {
    Deposit {
        wallet: WalletId,
        amount: Amount,
    },
    Withdraw {
        wallet: WalletId,
        amount: Amount,
    },
    Transfer {
        from: WalletId,
        to: WalletId,
        amount: Amount,
    },
    Hold(HoldRequest),
    Capture {
        wallet: WalletId,
        hold_id: Uuid,
        amount: Option<Amount>,
    },
    Void {
        wallet: WalletId,
        hold_id: Uuid,
    },
}

impl Operation {
    fn name(&self) -> &'static str {
        match self {
            Operation::Deposit { .. } => "deposit",
            Operation::Withdraw { .. } => "withdraw",
            Operation::Transfer { .. } => "transfer",
            Operation::Hold(_) => "hold",
            Operation::Capture { .. } => "capture",
            Operation::Void { .. } => "void",
        }
    }
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
    #[error("the wallet kept changing: {MAX_CONFLICTS} conflicting attempts")]
    Conflict,
    /// Certainly not applied.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// May have been applied: only a retry with the same key is safe.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

#[derive(Debug)]
pub struct Ledger {
    store: EventStore,
    /// The committer's state of the wallets it wrote; it is the only writer.
    cache: Arc<WalletCache>,
    /// Started on first use: a ledger may be built outside the runtime.
    committer: OnceLock<Committer>,
    /// Started on first use, like the committer.
    probe: OnceLock<VersionProbe>,
    appended: Arc<Notify>,
    committed: Arc<watch::Sender<Position>>,
    snapshot_every: u64,
    writer: WriterOptions,
    /// What "now" is for hold commands (expiry): the system clock, or a
    /// test's.
    clock: Clock,
}

/// The time source of hold decisions.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Clock(Arc::new(Utc::now))
    }

    /// A clock the caller moves (property tests of expiry).
    pub fn manual(now: impl Fn() -> DateTime<Utc> + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl Ledger {
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            cache: Arc::new(WalletCache::new(DEFAULT_CAPACITY)),
            committer: OnceLock::new(),
            probe: OnceLock::new(),
            appended: Arc::new(Notify::new()),
            committed: Arc::new(watch::channel(0).0),
            snapshot_every: snapshots::DEFAULT_SNAPSHOT_EVERY,
            writer: WriterOptions::default(),
            clock: Clock::system(),
        }
    }

    /// Folded wallets the committer keeps (0: it loads each command's).
    pub fn with_cache_capacity(mut self, wallets: usize) -> Self {
        self.cache = Arc::new(WalletCache::new(wallets));
        self
    }

    /// Events between snapshots of a stream (0 disables snapshots).
    pub fn with_snapshot_every(mut self, events: u64) -> Self {
        self.snapshot_every = events;
        self
    }

    /// The clock hold commands are decided by.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The committer's deadlines and session limits.
    pub fn with_writer_options(mut self, options: WriterOptions) -> Self {
        self.writer = options;
        self
    }

    /// Notified after every batch that appended: wakes the in-process
    /// projection runner and the relay without polling.
    pub fn appended(&self) -> Arc<Notify> {
        self.appended.clone()
    }

    /// The highest position this process's committer has appended: every
    /// subscriber sees each move (the live tail waits on it).
    pub fn committed(&self) -> watch::Receiver<Position> {
        self.committed.subscribe()
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// Synchronous standbys the committer requires of the primary.
    pub fn required_sync_standbys(&self) -> u32 {
        self.writer.require_sync_standbys
    }

    /// Whether the committer is making progress (for `/ready`).
    pub fn committer_status(&self) -> Result<(), String> {
        match self.committer.get() {
            Some(c) => c.status().check(),
            None => Ok(()),
        }
    }

    pub async fn deposit(
        &self,
        wallet: WalletId,
        amount: Amount,
        key: Option<String>,
    ) -> Result<Answer<WalletReceipt>, CommandError> {
        wallet_answer(self.run(Operation::Deposit { wallet, amount }, key).await?)
    }

    pub async fn withdraw(
        &self,
        wallet: WalletId,
        amount: Amount,
        key: Option<String>,
    ) -> Result<Answer<WalletReceipt>, CommandError> {
        wallet_answer(self.run(Operation::Withdraw { wallet, amount }, key).await?)
    }

    pub async fn transfer(
        &self,
        from: WalletId,
        to: WalletId,
        amount: Amount,
        key: Option<String>,
    ) -> Result<Answer<TransferReceipt>, CommandError> {
        match self.run(Operation::Transfer { from, to, amount }, key).await? {
            Answer {
                receipt: Receipt::Transfer(receipt),
                replayed,
            } => Ok(Answer { receipt, replayed }),
            // A stored answer of another shape under a transfer's fingerprint.
            _ => Err(CommandError::KeyReused),
        }
    }

    /// Reserves `amount` of the wallet's available money until `expires_at`,
    /// for a capture out of the system or into `to`.
    pub async fn place_hold(
        &self,
        hold: HoldRequest,
        key: Option<String>,
    ) -> Result<Answer<HoldReceipt>, CommandError> {
        hold_answer(self.run(Operation::Hold(hold), key).await?)
    }

    /// Captures all of a hold, or `amount` of it (the rest is released).
    pub async fn capture_hold(
        &self,
        wallet: WalletId,
        hold_id: Uuid,
        amount: Option<Amount>,
        key: Option<String>,
    ) -> Result<Answer<HoldReceipt>, CommandError> {
        hold_answer(
            self.run(
                Operation::Capture {
                    wallet,
                    hold_id,
                    amount,
                },
                key,
            )
            .await?,
        )
    }

    /// Releases a hold before it expires.
    pub async fn void_hold(
        &self,
        wallet: WalletId,
        hold_id: Uuid,
        key: Option<String>,
    ) -> Result<Answer<HoldReceipt>, CommandError> {
        hold_answer(self.run(Operation::Void { wallet, hold_id }, key).await?)
    }

    /// One operation, decided and appended by the committer.
    pub async fn run(&self, op: Operation, key: Option<String>) -> Result<Answer<Receipt>, CommandError> {
        let span = tracing::info_span!("append", op = op.name());
        async {
            let (command, fingerprint) = self.command_of(op).await?;
            self.execute(Submission::new(command, key, fingerprint)).await
        }
        .instrument(span)
        .await
    }

    /// Independent operations in one trip through the committer: their
    /// wallets are loaded first, then every command is handed over as one
    /// submission (decided in request order, answered with one wake-up).
    /// A command that must go round again (a wallet to load afresh, a key
    /// already recorded) then goes on alone. Each gets its own answer, in
    /// request order.
    pub async fn batch(&self, items: Vec<(Operation, Option<String>)>) -> Vec<Result<Answer<Receipt>, CommandError>> {
        let span = tracing::info_span!("append", op = "batch", operations = items.len());
        async {
            // One clock for the whole batch, from its start: every operation,
            // a second round included, is answered before the request's own
            // deadline, so no 408 ever stands in for a commit.
            let give_up = tokio::time::Instant::now() + self.write_deadline();
            let count = items.len();
            let prepared = match tokio::time::timeout(LOAD_DEADLINE, self.prepare(items)).await {
                Ok(prepared) => prepared,
                Err(_) => {
                    let why = || StoreError::BatchFailed("reading the batch's holds took too long".to_owned());
                    return (0..count).map(|_| Err(CommandError::Store(why()))).collect();
                }
            };
            let verdicts = self.decide_together(&prepared, give_up).await;
            let mut results: Vec<Option<Result<Answer<Receipt>, CommandError>>> = Vec::with_capacity(prepared.len());
            let mut again = Vec::new();
            for (index, (submission, verdict)) in prepared.into_iter().zip(verdicts).enumerate() {
                let next = match (submission, verdict) {
                    (Err(e), _) => {
                        results.push(Some(Err(e)));
                        continue;
                    }
                    (Ok(s), Some(verdict)) => (s, self.next(verdict)),
                    (Ok(s), None) => (s, Next::Reload),
                };
                match next {
                    (_, Next::Done(result)) => results.push(Some(result)),
                    (submission, next) => {
                        results.push(None);
                        again.push((index, submission, next));
                    }
                }
            }
            let redone = join_all(again.into_iter().map(|(index, submission, next)| async move {
                let result = match next {
                    Next::Replay { resolved } => self.replay_duplicate(&submission, resolved).await,
                    _ => self.execute_until(submission, give_up).await,
                };
                (index, result)
            }))
            .await;
            for (index, result) in redone {
                results[index] = Some(result);
            }
            results
                .into_iter()
                .map(|r| r.unwrap_or(Err(CommandError::OutcomeUnknown("no verdict".to_owned()))))
                .collect()
        }
        .instrument(span)
        .await
    }

    /// The first verdict of each prepared command of an independent batch,
    /// from one submission to the committer (`None` for those not prepared).
    /// Each operation's command and fingerprint (a capture or void reads
    /// its hold's payee), in request order.
    async fn prepare(&self, items: Vec<(Operation, Option<String>)>) -> Vec<Result<Submission, CommandError>> {
        let mut prepared = Vec::with_capacity(items.len());
        for (op, key) in items {
            prepared.push(self.command_of(op).await.map(|(c, f)| Submission::new(c, key, f)));
        }
        prepared
    }

    async fn decide_together(
        &self,
        prepared: &[Result<Submission, CommandError>],
        give_up: tokio::time::Instant,
    ) -> Vec<Option<Verdict>> {
        let commands: Vec<&Command> = prepared
            .iter()
            .filter_map(|p| p.as_ref().ok())
            .map(|s| &s.command)
            .collect();
        let none = || prepared.iter().map(|_| None).collect();
        // Certainly not applied: every command gets the same 503, as one
        // request alone would (no second wait per command).
        let refused = |why: String| {
            let verdict = || Some(Verdict::NotCommitted(StoreError::BatchFailed(why.clone())));
            prepared.iter().map(|_| verdict()).collect()
        };
        let loaded = match tokio::time::timeout(LOAD_DEADLINE, self.cold_states_of(&commands)).await {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => return refused(e.to_string()),
            Err(_) => return refused("loading the wallets took too long".to_owned()),
        };
        let mut jobs = Vec::with_capacity(commands.len());
        let mut slots = Vec::with_capacity(commands.len());
        let deadline = (tokio::time::Instant::now() + QUEUE_DEADLINE).min(give_up - self.batch_budget());
        let (gather, all) = Gather::new(commands.len());
        for (index, submission) in prepared.iter().enumerate() {
            let Ok(submission) = submission else { continue };
            let states = submission
                .command
                .wallets()
                .into_iter()
                .filter_map(|id| loaded.get(id).cloned())
                .collect();
            let reply = Reply::Part {
                index: jobs.len(),
                gather: gather.clone(),
            };
            jobs.push(self.job(submission, states, deadline, reply));
            slots.push(index);
        }
        if jobs.is_empty() {
            return none();
        }
        if let Err(e) = self.committer().submit(jobs, deadline).await {
            return refused(e.to_string());
        }
        let mut verdicts = match tokio::time::timeout_at(give_up, all).await {
            Ok(Ok(verdicts)) => verdicts,
            // The verdicts in by then stand; the committer may still decide
            // the others.
            Ok(Err(_)) | Err(_) => gather.partial(),
        };
        // Handed over and not answered: its outcome is unknown (never
        // `None`, which would send it round again).
        verdicts.resize_with(slots.len(), || None);
        let mut mine = none();
        for (index, verdict) in slots.into_iter().zip(verdicts) {
            let unknown = || Verdict::Unknown(StoreError::BatchFailed("no verdict within the deadline".to_owned()));
            mine[index] = Some(verdict.unwrap_or_else(unknown));
        }
        mine
    }

    /// All of `items` or none, as one command: each decided on the states
    /// the earlier ones leave, appended together. The key (scoped to the
    /// first operation's wallet) covers the whole batch; each operation's
    /// own requestId only names it in its receipt.
    pub async fn batch_atomic(
        &self,
        items: Vec<(Operation, Option<String>)>,
        key: Option<String>,
    ) -> Result<Answer<Vec<Receipt>>, CommandError> {
        let span = tracing::info_span!("append", op = "atomic", operations = items.len());
        async {
            let mut ops = Vec::with_capacity(items.len());
            let mut request_ids = Vec::with_capacity(items.len());
            let mut op_keys = Vec::with_capacity(items.len());
            let mut fingerprint = Sha256::new();
            for (index, (op, op_key)) in items.into_iter().enumerate() {
                let (command, f) = self.command_of(op).await.map_err(|e| match e {
                    CommandError::Rejected { error, replayed } => CommandError::Rejected {
                        error: DomainError::OperationFailed {
                            index,
                            error: Box::new(error),
                        },
                        replayed,
                    },
                    other => other,
                })?;
                fingerprint.update(f.as_bytes());
                fingerprint.update([0x1f]);
                request_ids.push(op_key.clone().unwrap_or_else(|| Uuid::new_v4().to_string()));
                op_keys.push(op_key.map(|k| (k, f)));
                ops.push(command);
            }
            distinct_keys(&ops, &op_keys, key.as_deref())?;
            let fingerprint = format!("atomic:{}", hex::encode(fingerprint.finalize()));
            let mut submission = Submission::new(Command::Atomic { ops }, key, fingerprint);
            submission.request_ids = request_ids;
            submission.op_keys = op_keys;
            match self.execute(submission).await? {
                Answer {
                    receipt: Receipt::Batch(receipts),
                    replayed,
                } => Ok(Answer {
                    receipt: receipts,
                    replayed,
                }),
                _ => Err(CommandError::KeyReused),
            }
        }
        .instrument(span)
        .await
    }

    /// The command an operation is, and its fingerprint: what a key
    /// remembers of the request, so the same key with another payload is
    /// told apart.
    async fn command_of(&self, op: Operation) -> Result<(Command, String), CommandError> {
        Ok(match op {
            Operation::Deposit { wallet, amount } => (Command::Deposit { wallet, amount }, format!("deposit:{amount}")),
            Operation::Withdraw { wallet, amount } => {
                (Command::Withdraw { wallet, amount }, format!("withdraw:{amount}"))
            }
            Operation::Transfer { from, to, amount } => {
                let fingerprint = format!("transfer:{to}:{amount}");
                let transfer_id = Uuid::now_v7();
                let command = Command::Transfer {
                    from,
                    to,
                    amount,
                    transfer_id,
                };
                (command, fingerprint)
            }
            Operation::Hold(hold) => {
                let to = hold.to.as_ref().map_or("", |w| w.as_str());
                let fingerprint = format!("hold:{}:{}:{to}", hold.amount, hold.expires_in.as_millis());
                let command = Command::PlaceHold {
                    wallet: hold.wallet,
                    hold_id: Uuid::now_v7(),
                    amount: hold.amount,
                    expires_at: hold.expires_at,
                    to: hold.to,
                };
                (command, fingerprint)
            }
            Operation::Capture {
                wallet,
                hold_id,
                amount,
            } => {
                let fingerprint = format!(
                    "capture:{hold_id}:{}",
                    amount.map(|a| a.to_string()).unwrap_or_default()
                );
                let to = self.hold_payee(&wallet, hold_id).await?;
                let command = Command::CaptureHold {
                    wallet,
                    hold_id,
                    amount,
                    to,
                    now: self.clock.now(),
                };
                (command, fingerprint)
            }
            Operation::Void { wallet, hold_id } => {
                self.hold_payee(&wallet, hold_id).await?;
                let command = Command::VoidHold {
                    wallet,
                    hold_id,
                    now: self.clock.now(),
                };
                (command, format!("void:{hold_id}"))
            }
        })
    }

    /// Records the expiry of a hold whose time has passed (the expiry
    /// sweeper calls this). Without a key: of several processes' attempts,
    /// the first resolves it and the rest are answered `HOLD_NOT_ACTIVE`.
    pub async fn expire_hold(&self, wallet: WalletId, hold_id: Uuid) -> Result<Answer<HoldReceipt>, CommandError> {
        let command = Command::ExpireHold {
            wallet,
            hold_id,
            now: self.clock.now(),
        };
        let span = tracing::info_span!("append", op = "expire");
        hold_answer(
            self.execute(Submission::new(command, None, String::new()))
                .instrument(span)
                .await?,
        )
    }

    /// Sets the wallet's limits from now on.
    pub async fn set_limits(
        &self,
        wallet: WalletId,
        min_balance: Balance,
        max_balance: Option<Balance>,
        key: Option<String>,
    ) -> Result<Answer<LimitsReceipt>, CommandError> {
        let max = max_balance.map(|m| m.to_string()).unwrap_or_default();
        let fingerprint = format!("limits:{min_balance}:{max}");
        let command = Command::SetLimits {
            wallet,
            min_balance,
            max_balance,
        };
        let span = tracing::info_span!("append", op = "limits");
        match self
            .execute(Submission::new(command, key, fingerprint))
            .instrument(span)
            .await?
        {
            Answer {
                receipt: Receipt::Limits(receipt),
                replayed,
            } => Ok(Answer { receipt, replayed }),
            _ => Err(CommandError::KeyReused),
        }
    }

    /// Where a capture of `hold_id` pays to (the hold fixed it when it was
    /// placed): from the committer's state when it holds the hold, else
    /// from the event that placed it. A hold never placed is `HOLD_NOT_FOUND`.
    async fn hold_payee(&self, wallet: &WalletId, hold_id: Uuid) -> Result<Option<WalletId>, CommandError> {
        if let Some(hold) = self.cache.hold(wallet, hold_id) {
            return Ok(hold.to);
        }
        match self.store.find_hold_placed(wallet, hold_id).await? {
            Some(placed) => match placed.event {
                WalletEvent::HoldPlaced(p) => Ok(p.to_wallet_id),
                _ => Err(StoreError::BatchFailed("a HoldPlaced query returned another event".to_owned()).into()),
            },
            None => Err(CommandError::Rejected {
                error: DomainError::HoldNotFound {
                    wallet: wallet.clone(),
                    hold: hold_id,
                },
                replayed: false,
            }),
        }
    }

    /// A wallet's state, up to `cutoff` if given. The current state is the
    /// committer's if the log's version of the wallet (asked together with
    /// other concurrent reads, `freshness.rs`) has not moved past it, else
    /// that state brought up to date with the events after it: fresh even
    /// when another process wrote the wallet.
    pub async fn wallet(&self, id: &WalletId, cutoff: Option<Cutoff>) -> Result<Wallet, StoreError> {
        if cutoff.is_some() {
            return snapshots::load(&self.store, id, cutoff).await;
        }
        let Some(known) = self.cache.get(id) else {
            return snapshots::load(&self.store, id, None).await;
        };
        let probe = self.probe.get_or_init(|| VersionProbe::spawn(self.store.clone()));
        let version = probe.version(id).await?;
        if version == known.version {
            return Ok(known);
        }
        if version < known.version {
            // The log lost events the committer saw (a restore, a failover
            // to a standby that lagged): the log is the truth.
            return snapshots::load(&self.store, id, None).await;
        }
        let tail = self.store.read_stream(id, known.version, None).await?;
        Ok(tail.iter().fold(known, |w, e| w.evolve(&e.event)))
    }

    fn committer(&self) -> &Committer {
        self.committer.get_or_init(|| {
            Committer::start(
                self.store.batch_writer(self.writer),
                self.cache.clone(),
                self.appended.clone(),
                self.committed.clone(),
                self.snapshot_every,
                self.writer.stall_after,
            )
        })
    }

    /// Longest a write takes to be answered: loading its cold wallets, the
    /// queue, then at most one batch (connect, write, resolve). Past it the
    /// command may be in a batch whose answer never came.
    pub fn write_deadline(&self) -> Duration {
        LOAD_DEADLINE + QUEUE_DEADLINE + self.batch_budget()
    }

    /// The longest one batch may take, with a margin for the loop's turn.
    fn batch_budget(&self) -> Duration {
        let w = &self.writer;
        w.connect_timeout + w.batch_deadline + w.resolve_deadline + Duration::from_secs(2)
    }

    async fn execute(&self, submission: Submission) -> Result<Answer<Receipt>, CommandError> {
        self.execute_until(submission, tokio::time::Instant::now() + self.write_deadline())
            .await
    }

    /// `execute`, answered by `give_up` (a batch's operations share theirs).
    async fn execute_until(
        &self,
        submission: Submission,
        give_up: tokio::time::Instant,
    ) -> Result<Answer<Receipt>, CommandError> {
        // A cold wallet evicted from the committer's state between our look
        // and its decision, or moved by another writer, sends the command
        // back here to load it again.
        for _ in 0..MAX_CONFLICTS {
            let loaded = tokio::time::timeout(LOAD_DEADLINE, self.cold_states(&submission.command))
                .await
                .map_err(|_| StoreError::BatchFailed("loading the wallets took too long".to_owned()))??;
            // Decided by then, or not at all: its batch still fits before `give_up`.
            let deadline = (tokio::time::Instant::now() + QUEUE_DEADLINE).min(give_up - self.batch_budget());
            let (reply, verdict) = tokio::sync::oneshot::channel();
            let job = self.job(&submission, loaded, deadline, Reply::One(reply));
            self.committer().submit(vec![job], deadline).await?;
            let verdict = match tokio::time::timeout_at(give_up, verdict).await {
                Ok(Ok(verdict)) => verdict,
                Ok(Err(_)) => return Err(CommandError::OutcomeUnknown("the committer stopped".to_owned())),
                Err(_) => {
                    return Err(CommandError::OutcomeUnknown(
                        "no verdict within the deadline".to_owned(),
                    ))
                }
            };
            match self.next(verdict) {
                Next::Reload => continue,
                Next::Replay { resolved } => return self.replay_duplicate(&submission, resolved).await,
                Next::Done(result) => return result,
            }
        }
        Err(CommandError::Conflict)
    }

    /// The committer's job for `submission`, on the wallets `loaded`.
    fn job(&self, submission: &Submission, loaded: Vec<Wallet>, deadline: tokio::time::Instant, reply: Reply) -> Job {
        Job {
            loaded,
            command: submission.command.clone(),
            key: submission.key.clone(),
            fingerprint: submission.fingerprint.clone(),
            request_id: submission.request_id.clone(),
            request_ids: submission.request_ids.clone(),
            op_keys: submission.op_keys.clone(),
            metadata: submission.metadata.clone(),
            deadline,
            reply,
        }
    }

    /// What a verdict asks of the request task next.
    fn next(&self, verdict: Verdict) -> Next {
        match verdict {
            Verdict::NeedsState => Next::Reload,
            Verdict::Conflicted => {
                metrics::counter!("append_conflict_reloads_total").increment(1);
                Next::Reload
            }
            Verdict::Duplicate { resolved } => Next::Replay { resolved },
            other => Next::Done(self.answer(other)),
        }
    }

    /// One of the submission's keys was recorded first: the stored answer.
    async fn replay_duplicate(&self, submission: &Submission, resolved: bool) -> Result<Answer<Receipt>, CommandError> {
        let scope = submission.command.wallet();
        let replayed = match submission.op_keys.iter().any(Option::is_some) {
            false => {
                self.replay_stored(scope, submission.key.as_deref(), &submission.fingerprint)
                    .await
            }
            true => self.replay_atomic(submission).await,
        };
        match replayed {
            // After a lost answer the record may be this command's own:
            // failing to read it is not "not applied".
            Err(CommandError::Store(e)) if resolved => Err(CommandError::OutcomeUnknown(e.to_string())),
            other => other,
        }
    }

    fn answer(&self, verdict: Verdict) -> Result<Answer<Receipt>, CommandError> {
        match verdict {
            Verdict::Committed { receipt, snapshots } => {
                for (state, position) in snapshots {
                    let store = self.store.clone();
                    tokio::spawn(async move {
                        if let Err(e) = snapshots::save(&store, &state, position).await {
                            tracing::warn!(wallet = %state.id, error = %e, "snapshot not written");
                        }
                    });
                }
                Ok(Answer {
                    receipt,
                    replayed: false,
                })
            }
            Verdict::Rejected(error) => Err(CommandError::Rejected { error, replayed: false }),
            Verdict::Conflict => Err(CommandError::Conflict),
            Verdict::NotCommitted(e) => Err(CommandError::Store(e)),
            Verdict::Unknown(e) => Err(CommandError::OutcomeUnknown(e.to_string())),
            Verdict::NeedsState | Verdict::Conflicted | Verdict::Duplicate { .. } => {
                unreachable!("handled by `next`")
            }
        }
    }

    /// The command's wallets the committer does not hold, folded from the
    /// log (snapshot + tail) here, so the committer never waits on a read.
    async fn cold_states(&self, command: &Command) -> Result<Vec<Wallet>, StoreError> {
        let mut loaded = Vec::new();
        for id in command.wallets() {
            if !self.cache.contains(id) {
                loaded.push(snapshots::load(&self.store, id, None).await?);
            }
        }
        Ok(loaded)
    }

    /// The wallets of `commands` the committer does not hold, each loaded
    /// once, in order.
    async fn cold_states_of(&self, commands: &[&Command]) -> Result<HashMap<WalletId, Wallet>, StoreError> {
        let mut loaded: HashMap<WalletId, Wallet> = HashMap::new();
        for id in commands.iter().flat_map(|c| c.wallets()) {
            if !loaded.contains_key(id) && !self.cache.contains(id) {
                loaded.insert(id.clone(), snapshots::load(&self.store, id, None).await?);
            }
        }
        Ok(loaded)
    }

    /// An atomic batch with operation keys: by its own key if recorded, else
    /// by its operations' keys, every one of which must name that operation
    /// (a batch recorded with the same keys, or its operations one by one);
    /// otherwise a key of it names another request.
    async fn replay_atomic(&self, submission: &Submission) -> Result<Answer<Receipt>, CommandError> {
        let Command::Atomic { ops } = &submission.command else {
            return Err(CommandError::KeyReused);
        };
        if let Some(key) = &submission.key {
            if let Some(found) = self.store.find_idempotency(submission.command.wallet(), key).await? {
                return replay(found, &submission.fingerprint);
            }
        }
        let mut receipts = Vec::with_capacity(ops.len());
        for (op, op_key) in ops.iter().zip(&submission.op_keys) {
            let Some((key, fingerprint)) = op_key else {
                return Err(CommandError::KeyReused);
            };
            let found = self.store.find_idempotency(op.wallet(), key).await?;
            receipts.push(replay(found.ok_or(CommandError::KeyReused)?, fingerprint)?.receipt);
        }
        Ok(Answer {
            receipt: Receipt::Batch(receipts),
            replayed: true,
        })
    }

    /// A request with the same key committed first: answer from it.
    async fn replay_stored(
        &self,
        scope: &WalletId,
        key: Option<&str>,
        fingerprint: &str,
    ) -> Result<Answer<Receipt>, CommandError> {
        let key = key.ok_or_else(|| CommandError::OutcomeUnknown("a duplicate without a key".to_owned()))?;
        match self.store.find_idempotency(scope, key).await? {
            Some(found) => replay(found, fingerprint),
            None => Err(CommandError::Conflict),
        }
    }
}

/// An atomic batch's keys name one request each: the store records them
/// together, and one key on two operations could only be refused as a
/// whole by the database.
fn distinct_keys(ops: &[Command], op_keys: &[Option<(String, String)>], key: Option<&str>) -> Result<(), CommandError> {
    let mut seen = std::collections::HashSet::with_capacity(op_keys.len() + 1);
    if let (Some(key), Some(first)) = (key, ops.first()) {
        seen.insert((first.wallet(), key));
    }
    for (op, op_key) in ops.iter().zip(op_keys) {
        if let Some((k, _)) = op_key {
            if !seen.insert((op.wallet(), k.as_str())) {
                return Err(CommandError::KeyReused);
            }
        }
    }
    Ok(())
}

fn wallet_answer(answer: Answer<Receipt>) -> Result<Answer<WalletReceipt>, CommandError> {
    match answer.receipt {
        Receipt::Wallet(receipt) => Ok(Answer {
            receipt,
            replayed: answer.replayed,
        }),
        // A stored answer of another shape under this fingerprint.
        _ => Err(CommandError::KeyReused),
    }
}

fn hold_answer(answer: Answer<Receipt>) -> Result<Answer<HoldReceipt>, CommandError> {
    match answer.receipt {
        Receipt::Hold(receipt) => Ok(Answer {
            receipt,
            replayed: answer.replayed,
        }),
        _ => Err(CommandError::KeyReused),
    }
}

fn replay(found: StoredOutcome, fingerprint: &str) -> Result<Answer<Receipt>, CommandError> {
    if found.fingerprint != fingerprint {
        return Err(CommandError::KeyReused);
    }
    let outcome: Outcome = serde_json::from_value(found.outcome)
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
