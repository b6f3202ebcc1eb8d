//! Model-based property of holds, expiry, limits and atomic batches, on
//! both backends: random sequences of deposits, withdrawals, transfers,
//! holds (placed, captured in part or whole, voided, expired), limit
//! changes, atomic batches and clock moves, run against the real ledger
//! and store, and against a reference model written from the brief (not
//! from `src/aggregate`). After every operation each wallet's balance,
//! held money and limits must equal the model's, and each answer's code
//! must be the model's; after every case `verify` finds nothing wrong in
//! the whole log (holds resolved once, money adding up, read models equal
//! to a rebuild).
//!
//! The clock is the test's (`Clock::manual`), so expiry is exact: a hold
//! is capturable strictly before its `expiresAt` and expirable from it on.
//!
//! `concurrent_holds_equal_a_serial_order` races the same operations (and
//! duplicated keys, independent batches) through two ledgers on one
//! database while the clock moves past some holds' expiry, then replays
//! the log in position order through `decide`/`evolve`: it must decide
//! exactly the logged events of every accepted request, no hold may be
//! resolved twice, no stream may break its limits, and money adds up.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestRunner};
use rust_decimal::Decimal;
use uuid::Uuid;
use wallet::aggregate::{decide, Amount, Balance, Command, DomainError, WalletId};
use wallet::ledger::{Clock, CommandError, HoldRequest, Ledger, Operation, Receipt};
use wallet::projections::{FraudRules, Projections};

// ---------------------------------------------------------------------------
// The reference model.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct MWallet {
    balance: Decimal,
    /// Active holds by placement number: amount, expiry (s), payee.
    holds: BTreeMap<usize, (Decimal, i64, Option<usize>)>,
    min: Decimal,
    max: Option<Decimal>,
}

impl MWallet {
    fn held(&self) -> Decimal {
        self.holds.values().map(|h| h.0).sum()
    }
    fn available(&self) -> Decimal {
        self.balance - self.held()
    }
}

#[derive(Clone, Debug, Default)]
struct Model {
    wallets: BTreeMap<usize, MWallet>,
    /// Virtual seconds.
    now: i64,
    /// Holds placed so far: (wallet, placement number).
    placed: Vec<usize>,
}

type Verdict = Result<(), String>;

impl Model {
    fn credit(&mut self, w: usize, amount: Decimal) -> Verdict {
        let wallet = self.wallets.entry(w).or_default();
        if wallet.max.is_some_and(|m| wallet.balance + amount > m) {
            return Err("MAX_BALANCE_EXCEEDED".into());
        }
        wallet.balance += amount;
        Ok(())
    }

    /// Whether `amount` may leave `w`'s available money.
    fn can_take(&self, w: usize, amount: Decimal) -> Verdict {
        let Some(wallet) = self.wallets.get(&w) else {
            return Err("WALLET_NOT_FOUND".into());
        };
        if amount > wallet.available() {
            return Err("INSUFFICIENT_FUNDS".into());
        }
        if wallet.available() - amount < wallet.min {
            return Err("MIN_BALANCE_BREACHED".into());
        }
        Ok(())
    }

    fn apply(&mut self, op: &MOp) -> Verdict {
        match *op {
            MOp::Deposit(w, a) => self.credit(w, a),
            MOp::Withdraw(w, a) => {
                self.can_take(w, a)?;
                self.wallets.get_mut(&w).unwrap().balance -= a;
                Ok(())
            }
            MOp::Transfer(w, to, a) => {
                if w == to {
                    return Err("SAME_WALLET".into());
                }
                self.can_take(w, a)?;
                let before = self.clone();
                self.wallets.get_mut(&w).unwrap().balance -= a;
                self.credit(to, a).inspect_err(|_| *self = before)
            }
            MOp::Hold { w, amount, ttl, to } => {
                if to == Some(w) {
                    return Err("SAME_WALLET".into());
                }
                self.can_take(w, amount)?;
                let n = self.placed.len();
                self.placed.push(w);
                let expires = self.now + ttl;
                self.wallets.get_mut(&w).unwrap().holds.insert(n, (amount, expires, to));
                Ok(())
            }
            MOp::Capture { h, amount } => self.capture(h, amount),
            MOp::Void(h) => {
                let w = self.placed[h];
                self.active(w, h)?;
                self.wallets.get_mut(&w).unwrap().holds.remove(&h);
                Ok(())
            }
            MOp::Expire(h) => {
                let w = self.placed[h];
                match self.wallets[&w].holds.get(&h) {
                    Some(&(_, expires, _)) if self.now >= expires => {
                        self.wallets.get_mut(&w).unwrap().holds.remove(&h);
                        Ok(())
                    }
                    _ => Err("HOLD_NOT_ACTIVE".into()),
                }
            }
            MOp::Advance(s) => {
                self.now += s;
                Ok(())
            }
            MOp::Limits { w, min, max } => {
                let wallet = self.wallets.get_mut(&w).ok_or("WALLET_NOT_FOUND")?;
                if max.is_some_and(|m| m < min) {
                    return Err("INVALID_LIMITS".into());
                }
                (wallet.min, wallet.max) = (min, max);
                Ok(())
            }
            MOp::Atomic(ref ops) => {
                let mut trial = self.clone();
                for (i, op) in ops.iter().enumerate() {
                    trial.apply(op).map_err(|code| format!("{i}:{code}"))?;
                }
                *self = trial;
                Ok(())
            }
        }
    }

    /// The hold, if active and not yet expired.
    fn active(&self, w: usize, h: usize) -> Result<(Decimal, i64, Option<usize>), String> {
        match self.wallets[&w].holds.get(&h) {
            Some(&hold) if self.now < hold.1 => Ok(hold),
            _ => Err("HOLD_NOT_ACTIVE".into()),
        }
    }

    fn capture(&mut self, h: usize, amount: Option<Decimal>) -> Verdict {
        let w = self.placed[h];
        let (held, _, to) = self.active(w, h)?;
        let captured = amount.unwrap_or(held);
        if captured > held {
            return Err("CAPTURE_EXCEEDS_HOLD".into());
        }
        let before = self.clone();
        let wallet = self.wallets.get_mut(&w).unwrap();
        wallet.balance -= captured;
        wallet.holds.remove(&h);
        match to {
            Some(to) => self.credit(to, captured).inspect_err(|_| *self = before),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------
// Operations and their strategy.
// ---------------------------------------------------------------------------

const WALLETS: usize = 3;

#[derive(Clone)]
enum MOp {
    Deposit(usize, Decimal),
    Withdraw(usize, Decimal),
    Transfer(usize, usize, Decimal),
    Hold {
        w: usize,
        amount: Decimal,
        ttl: i64,
        to: Option<usize>,
    },
    /// `h` picks among the holds placed so far (modulo their count).
    Capture {
        h: usize,
        amount: Option<Decimal>,
    },
    Void(usize),
    Expire(usize),
    Advance(i64),
    Limits {
        w: usize,
        min: Decimal,
        max: Option<Decimal>,
    },
    Atomic(Vec<MOp>),
}

impl fmt::Debug for MOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MOp::Deposit(w, a) => write!(f, "deposit w{w} {a}"),
            MOp::Withdraw(w, a) => write!(f, "withdraw w{w} {a}"),
            MOp::Transfer(w, t, a) => write!(f, "transfer w{w}->w{t} {a}"),
            MOp::Hold { w, amount, ttl, to } => write!(f, "hold w{w} {amount} {ttl}s to {to:?}"),
            MOp::Capture { h, amount } => write!(f, "capture #{h} {amount:?}"),
            MOp::Void(h) => write!(f, "void #{h}"),
            MOp::Expire(h) => write!(f, "expire #{h}"),
            MOp::Advance(s) => write!(f, "advance {s}s"),
            MOp::Limits { w, min, max } => write!(f, "limits w{w} min {min} max {max:?}"),
            MOp::Atomic(ops) => write!(f, "atomic {ops:?}"),
        }
    }
}

fn money() -> impl Strategy<Value = Decimal> {
    (1u32..6000).prop_map(|cents| Decimal::new(cents.into(), 2))
}

fn wallet() -> impl Strategy<Value = usize> {
    0..WALLETS
}

/// Operations an atomic batch may hold.
fn simple() -> impl Strategy<Value = MOp> {
    prop_oneof![
        3 => (wallet(), money()).prop_map(|(w, a)| MOp::Deposit(w, a)),
        2 => (wallet(), money()).prop_map(|(w, a)| MOp::Withdraw(w, a)),
        2 => (wallet(), wallet(), money()).prop_map(|(w, t, a)| MOp::Transfer(w, t, a)),
        2 => (wallet(), money(), 1i64..4, proptest::option::of(wallet()))
            .prop_map(|(w, amount, ttl, to)| MOp::Hold { w, amount, ttl, to }),
    ]
}

fn op() -> impl Strategy<Value = MOp> {
    prop_oneof![
        6 => simple(),
        3 => (any::<usize>(), proptest::option::of(money())).prop_map(|(h, amount)| MOp::Capture { h, amount }),
        2 => any::<usize>().prop_map(MOp::Void),
        2 => any::<usize>().prop_map(MOp::Expire),
        3 => (0i64..3).prop_map(MOp::Advance),
        1 => limits(0u32..3000, 0u32..20000),
        1 => vec(simple(), 1..5).prop_map(MOp::Atomic),
    ]
}

/// A change of limits, in cents: a floor from `min`, a ceiling from `max` or none.
fn limits(min: std::ops::Range<u32>, max: std::ops::Range<u32>) -> impl Strategy<Value = MOp> {
    (wallet(), min, proptest::option::of(max)).prop_map(|(w, min, max)| MOp::Limits {
        w,
        min: Decimal::new(min.into(), 2),
        max: max.map(|m| Decimal::new(m.into(), 2)),
    })
}

// ---------------------------------------------------------------------------
// Running a sequence against the ledger.
// ---------------------------------------------------------------------------

struct Case<'a> {
    ledger: &'a Ledger,
    /// The manual clock, in virtual seconds after `epoch`.
    now: &'a AtomicI64,
    epoch: DateTime<Utc>,
    ids: Vec<WalletId>,
    /// Ids of the holds placed so far, in placement order.
    holds: Vec<Uuid>,
}

fn amount(a: Decimal) -> Amount {
    Amount::new(a).expect("generated amounts are money")
}

fn balance(a: Decimal) -> Balance {
    Balance::from_decimal(a).expect("generated limits are money")
}

/// A rejection's stable code (as the API answers it).
fn code(e: &CommandError) -> String {
    match e {
        CommandError::Rejected {
            error: DomainError::OperationFailed { index, error },
            ..
        } => format!("{index}:{}", code_of(error)),
        CommandError::Rejected { error, .. } => code_of(error),
        other => format!("ERROR {other}"),
    }
}

fn code_of(e: &DomainError) -> String {
    serde_json::to_value(e).unwrap()["code"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

impl Case<'_> {
    /// The ledger's operation for `op`; `placed` is each hold's wallet.
    fn operation(&self, op: &MOp, placed: &[usize]) -> Operation {
        let id = |w: usize| self.ids[w].clone();
        match *op {
            MOp::Deposit(w, a) => Operation::Deposit {
                wallet: id(w),
                amount: amount(a),
            },
            MOp::Withdraw(w, a) => Operation::Withdraw {
                wallet: id(w),
                amount: amount(a),
            },
            MOp::Transfer(w, t, a) => Operation::Transfer {
                from: id(w),
                to: id(t),
                amount: amount(a),
            },
            MOp::Hold { w, amount: a, ttl, to } => Operation::Hold(HoldRequest {
                wallet: id(w),
                amount: amount(a),
                expires_in: std::time::Duration::from_secs(ttl as u64),
                expires_at: self.epoch + TimeDelta::seconds(self.now.load(Ordering::SeqCst) + ttl),
                to: to.map(id),
            }),
            MOp::Capture { h, amount: a } => Operation::Capture {
                wallet: id(placed[h]),
                hold_id: self.holds[h],
                amount: a.map(amount),
            },
            MOp::Void(h) => Operation::Void {
                wallet: id(placed[h]),
                hold_id: self.holds[h],
            },
            _ => unreachable!("expiry, limits, clock moves and batches are not Operations"),
        }
    }

    /// Runs one operation; `Err` is its rejection's code.
    async fn run(&mut self, op: &MOp, placed_by_model: &[usize]) -> Verdict {
        let hold = |h: usize| self.holds[h];
        let wallet_of = |h: usize| self.ids[placed_by_model[h]].clone();
        let outcome = match op {
            MOp::Advance(s) => {
                self.now.fetch_add(*s, Ordering::SeqCst);
                return Ok(());
            }
            MOp::Expire(h) => self.ledger.expire_hold(wallet_of(*h), hold(*h)).await.map(|_| ()),
            MOp::Limits { w, min, max } => self
                .ledger
                .set_limits(self.ids[*w].clone(), balance(*min), max.map(balance), None)
                .await
                .map(|_| ()),
            MOp::Atomic(ops) => {
                let items = ops.iter().map(|o| (self.operation(o, placed_by_model), None)).collect();
                let receipts = self.ledger.batch_atomic(items, None).await;
                if let Ok(answer) = &receipts {
                    self.record_holds(answer.receipt.iter());
                }
                receipts.map(|_| ())
            }
            simple => {
                let receipt = self.ledger.run(self.operation(simple, placed_by_model), None).await;
                if let Ok(answer) = &receipt {
                    self.record_holds(std::iter::once(&answer.receipt));
                }
                receipt.map(|_| ())
            }
        };
        outcome.map_err(|e| code(&e))
    }

    fn record_holds<'r>(&mut self, receipts: impl Iterator<Item = &'r wallet::ledger::Receipt>) {
        for r in receipts {
            if let wallet::ledger::Receipt::Hold(h) = r {
                if h.status == "held" {
                    self.holds.push(h.hold_id);
                }
            }
        }
    }

    /// Every wallet as the ledger serves it equals the model's.
    async fn compare(&self, model: &Model) -> Result<(), String> {
        for (w, id) in self.ids.iter().enumerate() {
            let got = self.ledger.wallet(id, None).await.map_err(|e| e.to_string())?;
            let want = model.wallets.get(&w);
            let same = match want {
                None => !got.exists(),
                Some(m) => {
                    got.exists()
                        && got.balance.value() == m.balance
                        && got.held.value() == m.held()
                        && got.limits.min_balance.value() == m.min
                        && got.limits.max_balance.map(|b| b.value()) == m.max
                        && got.holds.len() == m.holds.len()
                }
            };
            if !same {
                return Err(format!("w{w}: served {got:?}, model {want:?}"));
            }
        }
        Ok(())
    }
}

/// Resolves each hold reference against the holds placed so far; drops
/// resolutions of holds never placed.
fn bind(op: &MOp, placed: usize) -> Option<MOp> {
    let pick = |h: usize| (placed > 0).then(|| h % placed);
    Some(match op {
        MOp::Capture { h, amount } => MOp::Capture {
            h: pick(*h)?,
            amount: *amount,
        },
        MOp::Void(h) => MOp::Void(pick(*h)?),
        MOp::Expire(h) => MOp::Expire(pick(*h)?),
        other => other.clone(),
    })
}

async fn run_sequence(
    ledger: &Ledger,
    now: &AtomicI64,
    epoch: DateTime<Utc>,
    ops: &[MOp],
) -> Result<(), TestCaseError> {
    let case = Uuid::new_v4().simple().to_string();
    let ids = (0..WALLETS)
        .map(|w| WalletId::parse(&format!("hp-{}-{w}", &case[..12])).unwrap())
        .collect();
    let mut run = Case {
        ledger,
        now,
        epoch,
        ids,
        holds: Vec::new(),
    };
    let mut model = Model::default();
    now.store(0, Ordering::SeqCst);
    for (i, op) in ops.iter().enumerate() {
        run.step(&mut model, i, op).await?;
    }
    Ok(())
}

impl Case<'_> {
    /// Runs op `i` against the ledger and the model: the same answer code,
    /// then the same wallets.
    async fn step(&mut self, model: &mut Model, i: usize, op: &MOp) -> Result<(), TestCaseError> {
        let Some(op) = bind(op, model.placed.len()) else {
            return Ok(());
        };
        let want = model.apply(&op);
        let got = self.run(&op, &model.placed).await;
        if got != want {
            return Err(TestCaseError::fail(format!(
                "op {i} {op:?}: got {got:?}, model {want:?}"
            )));
        }
        if self.holds.len() != model.placed.len() {
            return Err(TestCaseError::fail(format!("op {i} {op:?}: hold ids out of step")));
        }
        self.compare(model)
            .await
            .map_err(|e| TestCaseError::fail(format!("after op {i} {op:?}: {e}")))
    }
}

/// A runtime and a fresh database of the backend.
fn open(sqlite: bool) -> (tokio::runtime::Runtime, common::TestDb) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let db = rt.block_on(async {
        if sqlite {
            common::sqlite().await
        } else {
            common::postgres().await
        }
    });
    (rt, db)
}

/// A manual clock: `epoch` plus the virtual seconds in `now`.
fn manual_clock(now: &Arc<AtomicI64>, epoch: DateTime<Utc>) -> Clock {
    let now = now.clone();
    Clock::manual(move || epoch + TimeDelta::seconds(now.load(Ordering::SeqCst)))
}

/// `PROPTEST_CASES` if set, else `default`; failures saved to `regressions`.
fn config(default: u32, regressions: &'static str) -> Config {
    let mut config = Config::default();
    config.cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(regressions)));
    config.max_shrink_time = 120_000;
    config
}

/// After all cases: `verify` finds nothing wrong in the whole log (holds
/// resolved once, money adding up, read models equal to a rebuild).
async fn audit(store: &wallet::store::EventStore) {
    let projections = Projections::new(store.clone(), FraudRules::default()).with_batch_events(16);
    projections.ensure().await.unwrap();
    projections.catch_up().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let report = wallet::verify::verify(store, &projections, |_, _| {}).await.unwrap();
    assert!(report.discrepancies.is_empty(), "verify: {:#?}", report.discrepancies);
}

fn holds_match_the_model(sqlite: bool, regressions: &'static str) {
    let (rt, db) = open(sqlite);
    let now = Arc::new(AtomicI64::new(0));
    let epoch = Utc::now();
    // Snapshots every 4 events: loading a wallet with holds is snapshot + tail.
    let ledger = Ledger::new(db.store.clone())
        .with_snapshot_every(4)
        .with_clock(manual_clock(&now, epoch));
    let mut runner = TestRunner::new(config(48, regressions));
    let result = runner.run(&vec(op(), 1..40), |ops| {
        rt.block_on(run_sequence(&ledger, &now, epoch, &ops))
    });
    if let Err(e) = result {
        panic!("holds_match_the_model (sqlite: {sqlite}): {e}");
    }
    rt.block_on(audit(&db.store));
}

#[test]
fn holds_match_the_model_sqlite() {
    holds_match_the_model(true, "proptest-regressions/hold_properties/sqlite.txt");
}

#[test]
fn holds_match_the_model_postgres() {
    holds_match_the_model(false, "proptest-regressions/hold_properties/postgres.txt");
}

// ---------------------------------------------------------------------------
// Concurrent rounds: two processes (ledgers) on one database, one clock that
// moves while the requests race. The pure domain (`decide`, `evolve`)
// replaying the log in position order must reproduce every accepted answer.
// ---------------------------------------------------------------------------

/// One request of a concurrent round. Hold references pick among the holds
/// the setup placed, so resolutions of one hold race each other.
#[derive(Clone, Debug)]
enum ROp {
    /// A deposit, withdrawal, transfer, hold, capture, void or limits change.
    One(MOp),
    Expire(usize),
    Atomic(Vec<MOp>),
    Batch(Vec<MOp>),
}

#[derive(Clone, Debug)]
struct Round {
    /// Serial, first: a deposit to each wallet, then holds and limits.
    seeds: Vec<Decimal>,
    setup: Vec<MOp>,
    /// At once: (request, ledger 0 or 1, key number). Duplicates share a key.
    ops: Vec<(ROp, u8, usize)>,
    /// The clock moves `advance` seconds once `clock_at` requests are sent.
    clock_at: usize,
    advance: i64,
}

fn resolution() -> impl Strategy<Value = MOp> {
    prop_oneof![
        3 => (any::<usize>(), proptest::option::of(money())).prop_map(|(h, amount)| MOp::Capture { h, amount }),
        2 => any::<usize>().prop_map(MOp::Void),
    ]
}

fn round() -> impl Strategy<Value = Round> {
    let batched = || vec(prop_oneof![3 => simple(), 2 => resolution()], 1..4);
    let rop = prop_oneof![
        4 => simple().prop_map(ROp::One),
        4 => resolution().prop_map(ROp::One),
        3 => any::<usize>().prop_map(ROp::Expire),
        1 => limits(0u32..4000, 5000u32..40000).prop_map(ROp::One),
        1 => batched().prop_map(ROp::Atomic),
        1 => batched().prop_map(ROp::Batch),
    ];
    let hold =
        (wallet(), 100u32..4000, 1i64..3, proptest::option::of(wallet())).prop_map(|(w, c, ttl, to)| MOp::Hold {
            w,
            amount: Decimal::new(c.into(), 2),
            ttl,
            to,
        });
    let setup = vec(prop_oneof![3 => hold, 2 => limits(0u32..4000, 10000u32..40000)], 1..5);
    let seeds = vec((2000u32..10000).prop_map(|c| Decimal::new(c.into(), 2)), WALLETS);
    let dups = vec((any::<prop::sample::Index>(), 1usize..3), 0..3);
    let ops = vec((rop, 0u8..2), 1..16);
    // The clock moves first (expiry wins the holds past it) or among the requests (races).
    let clock_at = prop_oneof![1 => Just(None), 2 => any::<prop::sample::Index>().prop_map(Some)];
    (seeds, setup, ops, dups, clock_at, 0i64..5).prop_map(|(seeds, setup, ops, dups, at, advance)| {
        let mut ops: Vec<(ROp, u8, usize)> = ops.into_iter().enumerate().map(|(k, (op, via))| (op, via, k)).collect();
        for (i, times) in dups {
            let (op, via, key) = ops[i.index(ops.len())].clone();
            for t in 0..times {
                ops.push((op.clone(), (via + 1 + t as u8) % 2, key));
            }
        }
        let clock_at = at.map_or(0, |at| at.index(ops.len() + 1));
        Round {
            seeds,
            setup,
            ops,
            clock_at,
            advance,
        }
    })
}

/// A hold the setup placed.
#[derive(Clone, Debug)]
struct Placed {
    id: Uuid,
    wallet: usize,
    amount: Decimal,
    expires_at: DateTime<Utc>,
    to: Option<usize>,
}

/// A request as sent. A batch's operations are each a request of their own.
#[derive(Clone, Debug)]
enum Request {
    Run(Operation, String),
    Expire(WalletId, Uuid),
    Limits(WalletId, Balance, Option<Balance>, String),
    Atomic(Vec<(Operation, Option<String>)>, String),
    Batch(Vec<(Operation, Option<String>)>),
}

type Reply = Result<wallet::ledger::Answer<Receipt>, CommandError>;

impl Request {
    /// Its parts, each answered on its own (a batch's operations).
    fn parts(&self) -> Vec<Request> {
        match self {
            Request::Batch(items) => items
                .iter()
                .map(|(op, key)| Request::Run(op.clone(), key.clone().expect("batched operations are keyed")))
                .collect(),
            other => vec![other.clone()],
        }
    }

    fn key(&self) -> Option<&str> {
        match self {
            Request::Run(_, k) | Request::Limits(.., k) | Request::Atomic(_, k) => Some(k),
            Request::Expire(..) | Request::Batch(_) => None,
        }
    }

    async fn send(self, ledger: &Ledger) -> Vec<Reply> {
        fn wrap<R>(r: Result<wallet::ledger::Answer<R>, CommandError>, f: impl Fn(R) -> Receipt) -> Reply {
            r.map(|a| wallet::ledger::Answer {
                receipt: f(a.receipt),
                replayed: a.replayed,
            })
        }
        match self {
            Request::Run(op, key) => vec![ledger.run(op, Some(key)).await],
            Request::Expire(w, h) => vec![wrap(ledger.expire_hold(w, h).await, Receipt::Hold)],
            Request::Limits(w, min, max, key) => {
                vec![wrap(ledger.set_limits(w, min, max, Some(key)).await, Receipt::Limits)]
            }
            Request::Atomic(items, key) => vec![wrap(ledger.batch_atomic(items, Some(key)).await, Receipt::Batch)],
            Request::Batch(items) => ledger.batch(items).await,
        }
    }

    /// The command the committer decided for this accepted request, with
    /// the ids it chose (from the receipt) and a time the clock showed then:
    /// `t0` for captures and voids (accepted: before the hold's expiry),
    /// `t1` for expiries (accepted: at or after it).
    fn command(
        &self,
        receipt: &Receipt,
        holds: &[Placed],
        ids: &[WalletId],
        t: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<Command, String> {
        let payee = |hold: &Uuid| {
            holds
                .iter()
                .find(|p| p.id == *hold)
                .and_then(|p| p.to.map(|w| ids[w].clone()))
        };
        let one = |op: &Operation, receipt: &Receipt| -> Result<Command, String> {
            Ok(match (op, receipt) {
                (Operation::Deposit { wallet, amount }, _) => Command::Deposit {
                    wallet: wallet.clone(),
                    amount: *amount,
                },
                (Operation::Withdraw { wallet, amount }, _) => Command::Withdraw {
                    wallet: wallet.clone(),
                    amount: *amount,
                },
                (Operation::Transfer { from, to, amount }, Receipt::Transfer(r)) => Command::Transfer {
                    from: from.clone(),
                    to: to.clone(),
                    amount: *amount,
                    transfer_id: r.transfer_id,
                },
                (Operation::Hold(h), Receipt::Hold(r)) => Command::PlaceHold {
                    wallet: h.wallet.clone(),
                    hold_id: r.hold_id,
                    amount: h.amount,
                    expires_at: h.expires_at,
                    to: h.to.clone(),
                },
                (
                    Operation::Capture {
                        wallet,
                        hold_id,
                        amount,
                    },
                    _,
                ) => Command::CaptureHold {
                    wallet: wallet.clone(),
                    hold_id: *hold_id,
                    amount: *amount,
                    to: payee(hold_id),
                    now: t.0,
                },
                (Operation::Void { wallet, hold_id }, _) => Command::VoidHold {
                    wallet: wallet.clone(),
                    hold_id: *hold_id,
                    now: t.0,
                },
                (op, r) => return Err(format!("{op:?} answered {r:?}")),
            })
        };
        Ok(match (self, receipt) {
            (Request::Run(op, _), r) => one(op, r)?,
            (Request::Expire(wallet, hold_id), _) => Command::ExpireHold {
                wallet: wallet.clone(),
                hold_id: *hold_id,
                now: t.1,
            },
            (Request::Limits(wallet, min, max, _), _) => Command::SetLimits {
                wallet: wallet.clone(),
                min_balance: *min,
                max_balance: *max,
            },
            (Request::Atomic(items, _), Receipt::Batch(rs)) if rs.len() == items.len() => Command::Atomic {
                ops: items
                    .iter()
                    .zip(rs)
                    .map(|((op, _), r)| one(op, r))
                    .collect::<Result<_, _>>()?,
            },
            (req, r) => return Err(format!("{req:?} answered {r:?}")),
        })
    }
}

/// The receipt's requestId (an atomic batch's events carry its key) and position.
fn request_id(r: &Receipt) -> Option<(&str, wallet::store::Position)> {
    match r {
        Receipt::Wallet(r) => Some((&r.request_id, r.position)),
        Receipt::Transfer(r) => Some((&r.request_id, r.position)),
        Receipt::Hold(r) => Some((&r.request_id, r.position)),
        Receipt::Limits(r) => Some((&r.request_id, r.position)),
        Receipt::Batch(_) => None,
    }
}

/// The money a command takes out of the system (negative) or brings in.
fn inflow(command: &Command, holds: &[Placed]) -> Decimal {
    match command {
        Command::Deposit { amount, .. } => amount.value(),
        Command::Withdraw { amount, .. } => -amount.value(),
        Command::CaptureHold {
            hold_id,
            amount,
            to: None,
            ..
        } => -amount.map_or_else(
            || {
                holds
                    .iter()
                    .find(|p| p.id == *hold_id)
                    .map_or(Decimal::ZERO, |p| p.amount)
            },
            |a| a.value(),
        ),
        Command::Atomic { ops } => ops.iter().map(|o| inflow(o, holds)).sum(),
        _ => Decimal::ZERO,
    }
}

/// Along the stream, no event takes available money below the floor in
/// force or the balance above the ceiling (a limits change itself may set
/// limits the wallet is outside of; then money may only move back).
fn limits_respected(events: &[wallet::store::RecordedEvent]) -> Result<(), String> {
    let mut state: Option<wallet::aggregate::Wallet> = None;
    for e in events {
        let before = state
            .take()
            .unwrap_or_else(|| wallet::aggregate::Wallet::empty(e.stream.clone()));
        let after = before.clone().evolve(&e.event);
        if !matches!(e.event, wallet::aggregate::WalletEvent::WalletLimitsChanged(_)) {
            let limits = &after.limits;
            if after.available() < limits.min_balance && after.available() < before.available() {
                return Err(format!(
                    "{} v{}: {} leaves available {} under the floor {}",
                    e.stream,
                    e.version,
                    e.event.event_type(),
                    after.available(),
                    limits.min_balance
                ));
            }
            if limits
                .max_balance
                .is_some_and(|m| after.balance > m && after.balance > before.balance)
            {
                return Err(format!(
                    "{} v{}: {} takes the balance {} over {:?}",
                    e.stream,
                    e.version,
                    e.event.event_type(),
                    after.balance,
                    limits.max_balance
                ));
            }
        }
        state = Some(after);
    }
    Ok(())
}

fn resolutions(events: &[wallet::store::RecordedEvent], hold: Uuid) -> usize {
    events
        .iter()
        .filter(|e| e.event.hold_id() == Some(hold) && e.event.event_type() != "HoldPlaced")
        .count()
}

struct Concurrent {
    ledgers: [Arc<Ledger>; 2],
    now: Arc<AtomicI64>,
    epoch: DateTime<Utc>,
    tally: std::sync::Mutex<BTreeMap<String, usize>>,
}

impl Concurrent {
    fn count(&self, what: impl Into<String>) {
        *self.tally.lock().unwrap().entry(what.into()).or_default() += 1;
    }

    fn at(&self, seconds: i64) -> DateTime<Utc> {
        self.epoch + TimeDelta::seconds(seconds)
    }

    async fn streams(&self, ids: &[WalletId]) -> Result<Vec<Vec<wallet::store::RecordedEvent>>, String> {
        let mut out = Vec::new();
        for id in ids {
            out.push(
                self.ledgers[0]
                    .store()
                    .read_stream(id, 0, None)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(out)
    }

    async fn round(&self, round: &Round) -> Result<(), TestCaseError> {
        let case = Uuid::new_v4().simple().to_string();
        let ids: Vec<WalletId> = (0..WALLETS)
            .map(|w| WalletId::parse(&format!("hc-{}-{w}", &case[..12])).unwrap())
            .collect();
        self.now.store(0, Ordering::SeqCst);
        // The setup, serially, against the model.
        let mut run = Case {
            ledger: &self.ledgers[0],
            now: &self.now,
            epoch: self.epoch,
            ids: ids.clone(),
            holds: Vec::new(),
        };
        let mut model = Model::default();
        let seeds = round.seeds.iter().enumerate().map(|(w, a)| MOp::Deposit(w, *a));
        for (i, op) in seeds.chain(round.setup.iter().cloned()).enumerate() {
            run.step(&mut model, i, &op).await?;
        }
        let holds: Vec<Placed> = model
            .placed
            .iter()
            .enumerate()
            .map(|(n, &w)| {
                let (amount, expires, to) = model.wallets[&w].holds[&n];
                Placed {
                    id: run.holds[n],
                    wallet: w,
                    amount,
                    expires_at: self.at(expires),
                    to,
                }
            })
            .collect();
        let mut trace = Vec::new();
        let result = self.race(round, &run, &model, &holds, &mut trace).await;
        result.map_err(|why| {
            TestCaseError::fail(format!(
                "{why}\n--- holds {holds:#?}\n--- answers ---\n{}",
                trace.join("\n")
            ))
        })
    }

    /// A round's request, its hold references bound to the setup's holds
    /// (partial captures at most the hold); `None` when there are none.
    fn request(&self, run: &Case<'_>, model: &Model, holds: &[Placed], op: &ROp, key: usize) -> Option<Request> {
        let bound = |op: &MOp| {
            let op = bind(op, holds.len())?;
            Some(match op {
                MOp::Capture { h, amount: Some(a) } => MOp::Capture {
                    h,
                    amount: Some(a.min(holds[h].amount)),
                },
                other => other,
            })
        };
        let items = |ops: &[MOp]| -> Vec<(Operation, Option<String>)> {
            ops.iter()
                .filter_map(bound)
                .enumerate()
                .map(|(j, op)| (run.operation(&op, &model.placed), Some(format!("k{key}.{j}"))))
                .collect()
        };
        Some(match op {
            ROp::Expire(h) => {
                let h = &holds[bind(&MOp::Expire(*h), holds.len()).map(|op| match op {
                    MOp::Expire(h) => h,
                    _ => unreachable!(),
                })?];
                Request::Expire(run.ids[h.wallet].clone(), h.id)
            }
            ROp::One(MOp::Limits { w, min, max }) => {
                Request::Limits(run.ids[*w].clone(), balance(*min), max.map(balance), format!("k{key}"))
            }
            ROp::One(op) => Request::Run(run.operation(&bound(op)?, &model.placed), format!("k{key}")),
            ROp::Atomic(ops) => Some(items(ops))
                .filter(|i| !i.is_empty())
                .map(|i| Request::Atomic(i, format!("k{key}")))?,
            ROp::Batch(ops) => Some(items(ops)).filter(|i| !i.is_empty()).map(Request::Batch)?,
        })
    }

    /// The round, all at once through both ledgers; the clock moves
    /// somewhere in it. Each answer with its request (a batch's operations
    /// each with their own).
    async fn send_round(
        &self,
        round: &Round,
        run: &Case<'_>,
        model: &Model,
        holds: &[Placed],
        trace: &mut Vec<String>,
    ) -> Result<Vec<(Request, Reply)>, String> {
        let mut tasks = Vec::new();
        let mut clock = None;
        for (i, (op, via, key)) in round.ops.iter().enumerate() {
            if i == 0 && round.clock_at == 0 {
                self.now.fetch_add(round.advance, Ordering::SeqCst);
            } else if i == round.clock_at {
                let (now, advance) = (self.now.clone(), round.advance);
                clock = Some(tokio::spawn(async move {
                    tokio::task::yield_now().await;
                    now.fetch_add(advance, Ordering::SeqCst);
                }));
            }
            let Some(request) = self.request(run, model, holds, op, *key) else {
                continue;
            };
            let ledger = self.ledgers[*via as usize].clone();
            let sent = request.clone();
            tasks.push((request, *via, tokio::spawn(async move { sent.send(&ledger).await })));
        }
        if round.clock_at >= round.ops.len() {
            self.now.fetch_add(round.advance, Ordering::SeqCst);
        }
        let mut answers: Vec<(Request, Reply)> = Vec::new();
        for (request, via, task) in tasks {
            let replies = task.await.map_err(|e| format!("task panicked: {e}"))?;
            let parts = request.parts();
            if parts.len() != replies.len() {
                return Err(format!("{request:?}: {} answers", replies.len()));
            }
            for (part, reply) in parts.into_iter().zip(replies) {
                trace.push(format!("{part:?} @{via} -> {reply:?}"));
                answers.push((part, reply));
            }
        }
        if let Some(clock) = clock {
            clock.await.map_err(|e| e.to_string())?;
        }
        Ok(answers)
    }

    /// Nothing failed; per key, one decision, the rest replay it.
    fn check_keys(&self, answers: &[(Request, Reply)]) -> Result<(), String> {
        let mut fresh: BTreeMap<&str, &Reply> = BTreeMap::new();
        for (request, reply) in answers {
            let replayed = match reply {
                Ok(a) => a.replayed,
                Err(CommandError::Rejected { replayed, .. }) => *replayed,
                Err(CommandError::Conflict) => {
                    self.count("conflict");
                    continue;
                }
                Err(e) => return Err(format!("{request:?}: {e}")),
            };
            self.count(match (request, reply) {
                (_, Ok(_)) if replayed => "replayed".to_owned(),
                (_, Err(_)) if replayed => "replayed rejection".to_owned(),
                (Request::Atomic(..), Ok(_)) => "atomic committed".to_owned(),
                (Request::Atomic(..), Err(e)) => format!("atomic refused {}", code(e)),
                (Request::Run(op, _), Ok(_)) => format!("{} ok", op_name(op)),
                (Request::Run(op, _), Err(e)) => format!("{} {}", op_name(op), code(e)),
                (Request::Expire(..), r) => format!("expire {}", r.as_ref().map_or_else(code, |_| "ok".into())),
                (_, r) => format!("limits {}", r.as_ref().map_or_else(code, |_| "ok".into())),
            });
            let Some(key) = request.key().filter(|_| !replayed) else {
                continue;
            };
            if fresh.insert(key, reply).is_some() {
                return Err(format!("key {key} decided twice"));
            }
        }
        for (request, reply) in answers {
            let Some(key) = request.key() else { continue };
            let first = fresh.get(key);
            match reply {
                Ok(a) if a.replayed => match first {
                    Some(Ok(f)) if f.receipt == a.receipt => {}
                    other => return Err(format!("{request:?}: replayed {a:?}, decided {other:?}")),
                },
                Err(CommandError::Rejected { error, replayed: true }) => match first {
                    Some(Err(CommandError::Rejected { error: e, .. })) if e == error => {}
                    other => return Err(format!("{request:?}: replayed {error:?}, decided {other:?}")),
                },
                _ => {}
            }
        }
        Ok(())
    }

    /// Each hold resolved at most once; each refused resolution true for
    /// some time the clock showed in the round (`t`: its start and end).
    fn check_holds(
        &self,
        round: &Round,
        holds: &[Placed],
        answers: &[(Request, Reply)],
        after: &[Vec<wallet::store::RecordedEvent>],
        (t0, t1): (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<(), String> {
        for p in holds {
            let resolved = resolutions(&after[p.wallet], p.id);
            if resolved > 1 {
                return Err(format!("hold {} resolved {resolved} times", p.id));
            }
            // Shown in the tally: holds that expired mid-round while captures
            // or voids and an expiry raced for them, and who won.
            let tried = |expire: bool| {
                answers.iter().any(|(r, _)| match r {
                    Request::Expire(_, h) => expire && *h == p.id,
                    Request::Run(Operation::Capture { hold_id, .. } | Operation::Void { hold_id, .. }, _) => {
                        !expire && *hold_id == p.id
                    }
                    _ => false,
                })
            };
            if round.clock_at > 0 && p.expires_at <= t1 && tried(true) && tried(false) {
                let winner = after[p.wallet]
                    .iter()
                    .find(|e| e.event.hold_id() == Some(p.id) && e.event.event_type() != "HoldPlaced");
                self.count(format!(
                    "race won by {}",
                    winner.map_or("none", |e| e.event.event_type())
                ));
            }
            for (request, reply) in answers {
                let (expire, capture_to) = match request {
                    Request::Expire(_, h) if *h == p.id => (true, false),
                    Request::Run(Operation::Capture { hold_id, .. }, _) if *hold_id == p.id => (false, p.to.is_some()),
                    Request::Run(Operation::Void { hold_id, .. }, _) if *hold_id == p.id => (false, false),
                    _ => continue,
                };
                let why = match reply {
                    Err(CommandError::Rejected {
                        error: DomainError::HoldNotActive { .. },
                        ..
                    }) => {
                        let possible = resolved == 1 || if expire { p.expires_at > t0 } else { p.expires_at <= t1 };
                        if possible {
                            continue;
                        } else {
                            "HOLD_NOT_ACTIVE of an unresolved hold"
                        }
                    }
                    Err(CommandError::Rejected {
                        error: DomainError::MaxBalanceExceeded { .. },
                        ..
                    }) if capture_to => continue,
                    Err(CommandError::Rejected { .. }) => "refused",
                    Ok(a) if !a.replayed && expire && p.expires_at > t1 => "expired before its time",
                    _ => continue,
                };
                return Err(format!("{request:?}: {why}: {reply:?}"));
            }
        }
        Ok(())
    }

    async fn race(
        &self,
        round: &Round,
        run: &Case<'_>,
        model: &Model,
        holds: &[Placed],
        trace: &mut Vec<String>,
    ) -> Result<(), String> {
        let store = self.ledgers[0].store();
        let before = self.streams(&run.ids).await?;
        let head_before = store.head_position().await.map_err(|e| e.to_string())?;
        let (t0, t1) = (self.at(0), self.at(round.advance));

        let answers = self.send_round(round, run, model, holds, trace).await?;
        self.check_keys(&answers)?;

        // The log of the round: each event belongs to one accepted request.
        let log = store
            .read_all(head_before, 1_000_000)
            .await
            .map_err(|e| e.to_string())?;
        let mut by_request: BTreeMap<String, Vec<&wallet::store::RecordedEvent>> = BTreeMap::new();
        for e in &log {
            let rid = e.metadata.get("requestId").and_then(|v| v.as_str());
            let rid = rid.ok_or_else(|| format!("event at {} has no requestId", e.position))?;
            by_request.entry(rid.to_owned()).or_default().push(e);
        }
        let mut accepted = Vec::new();
        for (request, reply) in &answers {
            let Ok(a) = reply else { continue };
            if a.replayed {
                continue;
            }
            let rid = match (request, request_id(&a.receipt)) {
                (Request::Atomic(_, key), None) => key.clone(),
                (_, Some((rid, _))) => rid.to_owned(),
                _ => return Err(format!("{request:?}: receipt {:?}", a.receipt)),
            };
            let events = by_request
                .remove(&rid)
                .ok_or_else(|| format!("{request:?}: accepted, nothing in the log"))?;
            let position = events.iter().map(|e| e.position).max().unwrap();
            if let Some((_, p)) = request_id(&a.receipt) {
                if p != position {
                    return Err(format!(
                        "{request:?}: receipt position {p}, its events end at {position}"
                    ));
                }
            }
            let command = request.command(&a.receipt, holds, &run.ids, (t0, t1))?;
            accepted.push((position, request, command, &a.receipt, events));
        }
        if let Some((rid, events)) = by_request.iter().next() {
            return Err(format!("events of {rid}, not an accepted request: {events:?}"));
        }

        // Replayed serially in log order through the pure domain, the
        // accepted commands decide exactly the events the log holds.
        accepted.sort_by_key(|a| a.0);
        let mut states: BTreeMap<WalletId, wallet::aggregate::Wallet> = run
            .ids
            .iter()
            .zip(&before)
            .map(|(id, events)| {
                (
                    id.clone(),
                    wallet::aggregate::Wallet::fold(id.clone(), events.iter().map(|e| &e.event)),
                )
            })
            .collect();
        let mut expected_total: Decimal = states.values().map(|w| w.balance.value()).sum();
        // The money each wallet had available at some point of that order.
        let mut seen: BTreeMap<WalletId, Vec<Decimal>> = states
            .iter()
            .map(|(id, w)| (id.clone(), vec![w.available().value()]))
            .collect();
        for (_, request, command, receipt, events) in &accepted {
            let mine: Vec<wallet::aggregate::Wallet> =
                command.wallets().into_iter().map(|id| states[id].clone()).collect();
            let decision = decide(command, &mine.iter().collect::<Vec<_>>())
                .map_err(|e| format!("{request:?} was accepted; in log order the domain refuses it: {e:?}"))?;
            let mut want: Vec<_> = decision
                .streams
                .iter()
                .flat_map(|s| {
                    s.events
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (s.wallet.clone(), s.expected_version + 1 + i as u64, e.clone()))
                })
                .collect();
            let mut got: Vec<_> = events
                .iter()
                .map(|e| (e.stream.clone(), e.version, e.event.clone()))
                .collect();
            want.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            got.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            if want != got {
                return Err(format!(
                    "{request:?}: the log holds {got:#?}\nreplayed in log order it decides {want:#?}"
                ));
            }
            for e in events {
                let state = states.remove(&e.stream).unwrap();
                states.insert(e.stream.clone(), state.evolve(&e.event));
            }
            let served = match receipt {
                Receipt::Hold(r) => Some((&r.wallet_id, r.balance, Some(r.available))),
                Receipt::Wallet(r) => Some((&r.wallet_id, r.balance, None)),
                Receipt::Limits(r) => Some((&r.wallet_id, r.balance, Some(r.available))),
                Receipt::Transfer(r) => Some((&r.from_wallet_id, r.from_balance, None)),
                Receipt::Batch(_) => None,
            };
            if let Some((w, balance, available)) = served {
                let s = &states[w];
                if s.balance != balance || available.is_some_and(|a| a != s.available()) {
                    return Err(format!("{request:?}: receipt {receipt:?}, in log order {s:?}"));
                }
            }
            expected_total += inflow(command, holds);
            for id in command.wallets() {
                seen.get_mut(id).unwrap().push(states[id].available().value());
            }
        }
        // A refusal for want of money was true at some point of that order.
        for (request, reply) in &answers {
            if let Err(CommandError::Rejected {
                error:
                    DomainError::InsufficientFunds {
                        wallet,
                        balance,
                        requested,
                    },
                replayed: false,
            }) = reply
            {
                let had = seen.get(wallet).is_some_and(|s| s.contains(&balance.value()));
                if !had || balance.value() >= requested.value() {
                    return Err(format!(
                        "{request:?}: refused at available {balance}, which in log order {wallet} had: {:?}",
                        seen.get(wallet)
                    ));
                }
            }
        }

        let after = self.streams(&run.ids).await?;
        self.check_holds(round, holds, &answers, &after, (t0, t1))?;

        // Each stream respects the limits all along; money is conserved.
        let mut total = Decimal::ZERO;
        for (id, events) in run.ids.iter().zip(&after) {
            limits_respected(events)?;
            let folded = wallet::aggregate::Wallet::fold(id.clone(), events.iter().map(|e| &e.event));
            if folded != states[id] {
                return Err(format!("{id}: log {folded:?}, serial replay {:?}", states[id]));
            }
            for ledger in &self.ledgers {
                let served = ledger.wallet(id, None).await.map_err(|e| e.to_string())?;
                if served != folded {
                    return Err(format!("{id}: served {served:?}, log {folded:?}"));
                }
            }
            total += folded.balance.value();
        }
        if total != expected_total {
            return Err(format!("money not conserved: balances sum to {total}, deposits less withdrawals and captures out say {expected_total}"));
        }

        // Past every expiry, the other process expires what is left: then
        // every hold of the case is resolved exactly once.
        self.now.fetch_add(1000, Ordering::SeqCst);
        let mut placed: Vec<(usize, Uuid)> = holds.iter().map(|p| (p.wallet, p.id)).collect();
        for (_, _, command, _, _) in &accepted {
            let ops = match command {
                Command::Atomic { ops } => ops.iter().collect(),
                one => vec![one],
            };
            for op in ops {
                if let Command::PlaceHold { wallet, hold_id, .. } = op {
                    placed.push((run.ids.iter().position(|id| id == wallet).unwrap(), *hold_id));
                }
            }
        }
        for (w, hold) in &placed {
            match self.ledgers[1].expire_hold(run.ids[*w].clone(), *hold).await {
                Ok(_)
                | Err(CommandError::Rejected {
                    error: DomainError::HoldNotActive { .. },
                    ..
                }) => {}
                Err(e) => return Err(format!("sweeping hold {hold}: {e}")),
            }
        }
        let swept = self.streams(&run.ids).await?;
        for (w, hold) in &placed {
            let n = resolutions(&swept[*w], *hold);
            if n != 1 {
                return Err(format!("hold {hold}: {n} resolutions after the sweep"));
            }
        }
        Ok(())
    }
}

fn op_name(op: &Operation) -> &'static str {
    match op {
        Operation::Deposit { .. } => "deposit",
        Operation::Withdraw { .. } => "withdraw",
        Operation::Transfer { .. } => "transfer",
        Operation::Hold(h) if h.to.is_some() => "hold to",
        Operation::Hold(_) => "hold",
        Operation::Capture { amount: Some(_), .. } => "capture part",
        Operation::Capture { .. } => "capture",
        Operation::Void { .. } => "void",
    }
}

fn concurrent_holds_equal_a_serial_order(sqlite: bool, regressions: &'static str) {
    let (rt, db) = open(sqlite);
    let now = Arc::new(AtomicI64::new(0));
    let epoch = Utc::now();
    // Two processes on one database, one clock; small snapshot intervals.
    let ledger = |every| {
        Arc::new(
            Ledger::new(db.store.clone())
                .with_snapshot_every(every)
                .with_clock(manual_clock(&now, epoch)),
        )
    };
    let concurrent = Concurrent {
        ledgers: [ledger(2), ledger(3)],
        now: now.clone(),
        epoch,
        tally: Default::default(),
    };
    let mut runner = TestRunner::new(config(128, regressions));
    let start = std::time::Instant::now();
    let result = runner.run(&round(), |r| rt.block_on(concurrent.round(&r)));
    if let Err(e) = result {
        panic!("concurrent_holds_equal_a_serial_order (sqlite: {sqlite}): {e}");
    }
    let tally = concurrent.tally.lock().unwrap();
    let parts: Vec<String> = tally.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!(
        "concurrent_holds_equal_a_serial_order (sqlite: {sqlite}): {} cases in {:.1?}: {}",
        runner.config().cases,
        start.elapsed(),
        parts.join(" ")
    );
    rt.block_on(audit(&db.store));
}

#[test]
fn concurrent_holds_equal_a_serial_order_sqlite() {
    concurrent_holds_equal_a_serial_order(true, "proptest-regressions/hold_properties/concurrent_sqlite.txt");
}

#[test]
fn concurrent_holds_equal_a_serial_order_postgres() {
    concurrent_holds_equal_a_serial_order(false, "proptest-regressions/hold_properties/concurrent_postgres.txt");
}
