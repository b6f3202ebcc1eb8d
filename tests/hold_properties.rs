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
use wallet::aggregate::{Amount, Balance, DomainError, WalletId};
use wallet::ledger::{Clock, CommandError, HoldRequest, Ledger, Operation};
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
        1 => (wallet(), 0u32..3000, proptest::option::of(0u32..20000)).prop_map(|(w, min, max)| MOp::Limits {
            w,
            min: Decimal::new(min.into(), 2),
            max: max.map(|m| Decimal::new(m.into(), 2)),
        }),
        1 => vec(simple(), 1..5).prop_map(MOp::Atomic),
    ]
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
    fn operation(&self, op: &MOp) -> Operation {
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
            _ => unreachable!("only simple operations are Operations"),
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
            MOp::Capture { h, amount: a } => self
                .ledger
                .capture_hold(wallet_of(*h), hold(*h), a.map(amount), None)
                .await
                .map(|_| ()),
            MOp::Void(h) => self.ledger.void_hold(wallet_of(*h), hold(*h), None).await.map(|_| ()),
            MOp::Expire(h) => self.ledger.expire_hold(wallet_of(*h), hold(*h)).await.map(|_| ()),
            MOp::Limits { w, min, max } => self
                .ledger
                .set_limits(self.ids[*w].clone(), balance(*min), max.map(balance), None)
                .await
                .map(|_| ()),
            MOp::Atomic(ops) => {
                let items = ops.iter().map(|o| (self.operation(o), None)).collect();
                let receipts = self.ledger.batch_atomic(items, None).await;
                if let Ok(answer) = &receipts {
                    self.record_holds(answer.receipt.iter());
                }
                receipts.map(|_| ())
            }
            simple => {
                let receipt = self.ledger.run(self.operation(simple), None).await;
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
        let Some(op) = bind(op, model.placed.len()) else {
            continue;
        };
        let want = model.apply(&op);
        let got = run.run(&op, &model.placed).await;
        if got != want {
            return Err(TestCaseError::fail(format!(
                "op {i} {op:?}: got {got:?}, model {want:?}"
            )));
        }
        if run.holds.len() != model.placed.len() {
            return Err(TestCaseError::fail(format!("op {i} {op:?}: hold ids out of step")));
        }
        run.compare(&model)
            .await
            .map_err(|e| TestCaseError::fail(format!("after op {i} {op:?}: {e}")))?;
    }
    Ok(())
}

fn holds_match_the_model(sqlite: bool, regressions: &'static str) {
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
    let now = Arc::new(AtomicI64::new(0));
    let epoch = Utc::now();
    let clock_now = now.clone();
    let clock = Clock::manual(move || epoch + TimeDelta::seconds(clock_now.load(Ordering::SeqCst)));
    // Snapshots every 4 events: loading a wallet with holds is snapshot + tail.
    let ledger = Ledger::new(db.store.clone()).with_snapshot_every(4).with_clock(clock);
    let mut config = Config::default();
    config.cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(regressions)));
    config.max_shrink_time = 120_000;
    let mut runner = TestRunner::new(config);
    let result = runner.run(&vec(op(), 1..40), |ops| {
        rt.block_on(run_sequence(&ledger, &now, epoch, &ops))
    });
    if let Err(e) = result {
        panic!("holds_match_the_model (sqlite: {sqlite}): {e}");
    }
    rt.block_on(async {
        let projections = Projections::new(db.store.clone(), FraudRules::default()).with_batch_events(16);
        projections.ensure().await.unwrap();
        projections.catch_up().await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let report = wallet::verify::verify(&db.store, &projections, |_, _| {})
            .await
            .unwrap();
        assert!(report.discrepancies.is_empty(), "verify: {:#?}", report.discrepancies);
    });
}

#[test]
fn holds_match_the_model_sqlite() {
    holds_match_the_model(true, "proptest-regressions/hold_properties/sqlite.txt");
}

#[test]
fn holds_match_the_model_postgres() {
    holds_match_the_model(false, "proptest-regressions/hold_properties/postgres.txt");
}
