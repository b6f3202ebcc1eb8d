//! Property-based tests (issue 6): the real command path and store against a
//! reference model (`tests/model`), concurrent batches against a serial
//! replay, and codec / HTTP-input properties.
//!
//! Each database-backed property opens ONE database per test function and
//! gives every proptest case its own wallet-id prefix, so cases never see each
//! other's data.
//!
//! Case counts: every property has a default chosen so that
//! `cargo test --test properties` stays within a couple of minutes on two
//! cores; `PROPTEST_CASES=<n>` sets the count of every property in this file
//! for long runs. A failing case is shrunk and its seed saved under
//! `proptest-regressions/properties/` (committed on purpose: a found failure
//! stays a test forever).

mod common;
mod model;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};
use rust_decimal::Decimal;
use serde_json::Value;
use uuid::Uuid;
use wallet::aggregate::{
    Amount, AmountError, Balance, DomainError, TransferPayload, Wallet, WalletEvent, WalletId, EVENT_SCHEMA_VERSION,
};
use wallet::ledger::{Answer, CommandError, Ledger, TransferReceipt, WalletReceipt};
use wallet::projections::{FraudRules, Projections};
use wallet::store::{Cutoff, EventStore, Position, RecordedEvent};

use model::{money, parse_amount, BadAmount, Cmd, Model, Outcome, Rejection, Reply};

// ---------------------------------------------------------------------------
// Running properties: case counts, persistence, a runtime per test function.
// ---------------------------------------------------------------------------

/// `PROPTEST_CASES` if set, else this property's default.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default_cases: u32, regressions: &'static str) -> Config {
    let mut config = Config::default();
    config.cases = cases(default_cases);
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(regressions)));
    // Each shrink step re-runs a whole sequence against a database: bound
    // shrinking by time unless PROPTEST_MAX_SHRINK_TIME says otherwise.
    if config.max_shrink_time == 0 {
        config.max_shrink_time = 120_000;
    }
    // proptest's default is 4 x cases, too few to shrink a long sequence.
    if std::env::var_os("PROPTEST_MAX_SHRINK_ITERS").is_none() {
        config.max_shrink_iters = 4096;
    }
    config
}

/// Runs a property; a failure panics with the minimal input and the reason.
fn check<S>(name: &str, config: Config, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let cases = config.cases;
    let start = Instant::now();
    let mut runner = TestRunner::new(config);
    match runner.run(&strategy, test) {
        Ok(()) => eprintln!("{name}: {cases} cases passed in {:.1?}", start.elapsed()),
        Err(TestError::Fail(why, input)) => {
            panic!("{name}: property failed\nminimal failing input: {input:#?}\n{why}")
        }
        Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    async fn open(self) -> common::TestDb {
        match self {
            Backend::Sqlite => common::sqlite().await,
            Backend::Postgres => common::postgres().await,
        }
    }
}

/// Counts what the generators produced, printed once per property so a
/// reader can see the interesting cases are actually reached.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<String, usize>>);

impl Tally {
    fn add(&self, what: impl Into<String>) {
        *self.0.lock().unwrap().entry(what.into()).or_default() += 1;
    }
    fn print(&self, name: &str) {
        let t = self.0.lock().unwrap();
        let parts: Vec<String> = t.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!("{name}: {}", parts.join(" "));
    }
}

fn fail(msg: impl Into<String>) -> TestCaseError {
    TestCaseError::fail(msg.into())
}

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

// ---------------------------------------------------------------------------
// Generated operations. Debug is compact so shrunk counterexamples read like
// a script: `dep a 10 k1`, `wd b =bal`, `tr a>b 0.0001`, `again k1`.
// ---------------------------------------------------------------------------

const WALLETS: [&str; 4] = ["a", "b", "c", "d"];

/// An amount as the client writes it, or relative to the source wallet's
/// balance at the time (resolved against the model).
#[derive(Clone)]
enum Amt {
    Lit(String),
    Bal,
    BalPlus,
    BalMinus,
}

impl fmt::Debug for Amt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Amt::Lit(s) => f.write_str(s),
            Amt::Bal => f.write_str("=bal"),
            Amt::BalPlus => f.write_str("bal+0.0001"),
            Amt::BalMinus => f.write_str("bal-0.0001"),
        }
    }
}

/// How a reused key's payload differs from the original request.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// amount + 0.0001
    Amount,
    /// another operation (deposit <-> withdraw, transfer -> deposit)
    Kind,
    /// another receiving wallet (a deposit/withdrawal becomes a transfer)
    Target,
    /// the same value spelled differently ("5" -> "5.0"): still a replay
    Spelling,
}

#[derive(Clone)]
enum Op {
    Dep {
        w: u8,
        amt: Amt,
        key: Option<u8>,
    },
    Wd {
        w: u8,
        amt: Amt,
        key: Option<u8>,
    },
    Tr {
        from: u8,
        to: u8,
        amt: Amt,
        key: Option<u8>,
    },
    /// Send the last request made with key `k` again, unchanged. (Addressed
    /// by key, not by index, so shrinking keeps its meaning.)
    Again {
        key: u8,
    },
    /// That request's key and wallet with a changed payload.
    Reuse {
        key: u8,
        change: Change,
    },
}

fn key_text(key: &Option<u8>) -> String {
    key.map(|k| format!(" k{k}")).unwrap_or_default()
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = |i: &u8| WALLETS[*i as usize % WALLETS.len()];
        match self {
            Op::Dep { w: i, amt, key } => write!(f, "dep {} {amt:?}{}", w(i), key_text(key)),
            Op::Wd { w: i, amt, key } => write!(f, "wd {} {amt:?}{}", w(i), key_text(key)),
            Op::Tr { from, to, amt, key } => {
                write!(f, "tr {}>{} {amt:?}{}", w(from), w(to), key_text(key))
            }
            Op::Again { key } => write!(f, "again k{key}"),
            Op::Reuse { key, change } => write!(f, "reuse k{key} {change:?}"),
        }
    }
}

/// Amount text at the edges: 0.0001, 1-4 decimals, 5 decimals (invalid
/// unless the fifth is a trailing zero), just under / at / over 10^15, zero,
/// negative, respelled values.
fn amount_text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u32..=200).prop_map(|n| n.to_string()),
        3 => (0u32..200, 0u32..10_000).prop_map(|(i, f)| format!("{i}.{f:04}")),
        2 => (0u32..50, 1u32..100).prop_map(|(i, f)| format!("{i}.{f}")),
        1 => Just("0.0001".to_owned()),
        1 => (0u32..50, 0u32..100_000).prop_map(|(i, f)| format!("{i}.{f:05}")),
        1 => prop::sample::select(vec![
            "999999999999999.9999",
            "999999999999999",
            "1000000000000000",
            "1000000000000000.0001",
            "0",
            "0.0000",
            "-1",
            "-0.0001",
            "0.00005",
            "7.000000",
            "000012.5",
        ])
        .prop_map(str::to_owned),
    ]
}

fn amt() -> impl Strategy<Value = Amt> {
    prop_oneof![
        8 => amount_text().prop_map(Amt::Lit),
        1 => Just(Amt::Bal),
        1 => Just(Amt::BalPlus),
        1 => Just(Amt::BalMinus),
    ]
}

/// Keys per wallet: few, so keys collide across operations and wallets.
const KEYS: u8 = 6;

fn key() -> impl Strategy<Value = Option<u8>> {
    prop_oneof![1 => Just(None), 2 => (0u8..KEYS).prop_map(Some)]
}

fn op() -> impl Strategy<Value = Op> {
    let w = || 0u8..WALLETS.len() as u8;
    prop_oneof![
        6 => (w(), amt(), key()).prop_map(|(w, amt, key)| Op::Dep { w, amt, key }),
        4 => (w(), amt(), key()).prop_map(|(w, amt, key)| Op::Wd { w, amt, key }),
        5 => (w(), w(), amt(), key()).prop_map(|(from, to, amt, key)| Op::Tr { from, to, amt, key }),
        2 => (0u8..KEYS).prop_map(|key| Op::Again { key }),
        2 => (0u8..KEYS, prop::sample::select(vec![
            Change::Amount, Change::Kind, Change::Target, Change::Spelling,
        ])).prop_map(|(key, change)| Op::Reuse { key, change }),
    ]
}

// ---------------------------------------------------------------------------
// Requests, answers and their comparison with the model.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Deposit,
    Withdraw,
    Transfer,
}

/// A concrete request: wallets by index, the amount text as sent.
#[derive(Clone, Debug)]
struct Req {
    kind: Kind,
    w: usize,
    to: usize,
    amount: String,
    key: Option<String>,
}

impl fmt::Display for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.key.as_deref().map(|k| format!(" {k}")).unwrap_or_default();
        match self.kind {
            Kind::Deposit => write!(f, "dep {} {}{key}", WALLETS[self.w], self.amount),
            Kind::Withdraw => write!(f, "wd {} {}{key}", WALLETS[self.w], self.amount),
            Kind::Transfer => write!(f, "tr {}>{} {}{key}", WALLETS[self.w], WALLETS[self.to], self.amount),
        }
    }
}

impl Req {
    fn cmd(&self, amount: Decimal) -> Cmd {
        let w = WALLETS[self.w].to_owned();
        match self.kind {
            Kind::Deposit => Cmd::Deposit { wallet: w, amount },
            Kind::Withdraw => Cmd::Withdraw { wallet: w, amount },
            Kind::Transfer => Cmd::Transfer {
                from: w,
                to: WALLETS[self.to].to_owned(),
                amount,
            },
        }
    }
}

/// What the real ledger answered.
#[derive(Clone, Debug, PartialEq)]
enum Got {
    Wallet(WalletReceipt, bool),
    Transfer(TransferReceipt, bool),
    Rejected(DomainError, bool),
    KeyReused,
    Conflict,
    Failed(String),
}

impl Got {
    fn replayed(&self) -> bool {
        matches!(
            self,
            Got::Wallet(_, true) | Got::Transfer(_, true) | Got::Rejected(_, true)
        )
    }
    /// The same answer as first given (replayed flag cleared).
    fn as_original(&self) -> Got {
        match self.clone() {
            Got::Wallet(r, _) => Got::Wallet(r, false),
            Got::Transfer(r, _) => Got::Transfer(r, false),
            Got::Rejected(e, _) => Got::Rejected(e, false),
            other => other,
        }
    }
    fn position(&self) -> Option<Position> {
        match self {
            Got::Wallet(r, _) => Some(r.position),
            Got::Transfer(r, _) => Some(r.position),
            _ => None,
        }
    }
    fn request_id(&self) -> Option<&str> {
        match self {
            Got::Wallet(r, _) => Some(&r.request_id),
            Got::Transfer(r, _) => Some(&r.request_id),
            _ => None,
        }
    }
    fn summary(&self) -> String {
        let rp = |r: &bool| if *r { "replayed " } else { "" };
        match self {
            Got::Wallet(r, replayed) => format!(
                "{}ok balance={} created={} pos={}",
                rp(replayed),
                r.balance,
                r.created,
                r.position
            ),
            Got::Transfer(r, replayed) => format!(
                "{}ok from={} to={} pos={}",
                rp(replayed),
                r.from_balance,
                r.to_balance,
                r.position
            ),
            Got::Rejected(e, replayed) => format!("{}rejected {e:?}", rp(replayed)),
            other => format!("{other:?}"),
        }
    }
}

fn from_wallet(r: Result<Answer<WalletReceipt>, CommandError>) -> Got {
    match r {
        Ok(a) => Got::Wallet(a.receipt, a.replayed),
        Err(e) => from_error(e),
    }
}

fn from_transfer(r: Result<Answer<TransferReceipt>, CommandError>) -> Got {
    match r {
        Ok(a) => Got::Transfer(a.receipt, a.replayed),
        Err(e) => from_error(e),
    }
}

fn from_error(e: CommandError) -> Got {
    match e {
        CommandError::Rejected { error, replayed } => Got::Rejected(error, replayed),
        CommandError::KeyReused => Got::KeyReused,
        CommandError::Conflict => Got::Conflict,
        CommandError::Store(e) => Got::Failed(e.to_string()),
        CommandError::OutcomeUnknown(e) => Got::Failed(e),
    }
}

/// The case's wallets: `prefix` + a short name.
#[derive(Clone)]
struct Ids {
    prefix: String,
    ids: Vec<WalletId>,
}

impl Ids {
    fn fresh(count: usize) -> Self {
        let prefix = format!("{}-", &Uuid::new_v4().simple().to_string()[..12]);
        let ids = WALLETS[..count]
            .iter()
            .map(|n| WalletId::parse(&format!("{prefix}{n}")).unwrap())
            .collect();
        Self { prefix, ids }
    }
    fn name(&self, id: &WalletId) -> String {
        id.as_str().strip_prefix(&self.prefix).unwrap_or(id.as_str()).to_owned()
    }
}

async fn send(ledger: &Ledger, ids: &Ids, req: &Req, amount: Amount) -> Got {
    let key = req.key.clone();
    let w = ids.ids[req.w].clone();
    match req.kind {
        Kind::Deposit => from_wallet(ledger.deposit(w, amount, key).await),
        Kind::Withdraw => from_wallet(ledger.withdraw(w, amount, key).await),
        Kind::Transfer => from_transfer(ledger.transfer(w, ids.ids[req.to].clone(), amount, key).await),
    }
}

/// A real rejection in model terms (wallet names without the prefix).
fn rejection(ids: &Ids, e: &DomainError) -> Result<Rejection, String> {
    Ok(match e {
        DomainError::InsufficientFunds {
            wallet,
            balance,
            requested,
        } => Rejection::InsufficientFunds {
            wallet: ids.name(wallet),
            balance: balance.value(),
            requested: requested.value(),
        },
        DomainError::WalletNotFound { wallet } => Rejection::WalletNotFound {
            wallet: ids.name(wallet),
        },
        DomainError::SameWallet => Rejection::SameWallet,
        other => return Err(format!("unexpected rejection {other:?}")),
    })
}

fn bad_amount(e: &AmountError) -> BadAmount {
    match e {
        AmountError::NotANumber => BadAmount::NotANumber,
        AmountError::NotPositive => BadAmount::NotPositive,
        AmountError::TooPrecise => BadAmount::TooPrecise,
        AmountError::TooLarge => BadAmount::TooLarge,
    }
}

/// Does the answer match what the model decided (fresh, not replayed)?
fn matches_outcome(ids: &Ids, req: &Req, amount: Decimal, outcome: &Outcome, got: &Got) -> Result<(), String> {
    let request_id_ok = |rid: &str| match &req.key {
        Some(k) => rid == k,
        None => Uuid::parse_str(rid).is_ok(),
    };
    match (outcome, got) {
        (Outcome::Wallet { balance, created }, Got::Wallet(r, _)) => {
            ensure!(r.wallet_id == ids.ids[req.w], "receipt for wallet {}", r.wallet_id);
            ensure!(
                r.balance.to_string() == money(*balance),
                "balance {} but the model says {}",
                r.balance,
                money(*balance)
            );
            ensure!(
                r.created == *created,
                "created={} but the model says {created}",
                r.created
            );
            ensure!(request_id_ok(&r.request_id), "requestId {:?}", r.request_id);
        }
        (
            Outcome::Transfer {
                from_balance,
                to_balance,
                ..
            },
            Got::Transfer(r, _),
        ) => {
            ensure!(
                r.from_wallet_id == ids.ids[req.w] && r.to_wallet_id == ids.ids[req.to],
                "transfer receipt names {} -> {}",
                r.from_wallet_id,
                r.to_wallet_id
            );
            ensure!(r.amount.to_string() == money(amount), "receipt amount {}", r.amount);
            ensure!(r.status == "completed", "status {}", r.status);
            ensure!(
                r.from_balance.to_string() == money(*from_balance) && r.to_balance.to_string() == money(*to_balance),
                "balances {} / {} but the model says {} / {}",
                r.from_balance,
                r.to_balance,
                money(*from_balance),
                money(*to_balance)
            );
            ensure!(request_id_ok(&r.request_id), "requestId {:?}", r.request_id);
        }
        (Outcome::Rejected(expected), Got::Rejected(e, _)) => {
            let actual = rejection(ids, e)?;
            ensure!(
                actual == *expected,
                "rejected with {actual:?} but the model says {expected:?}"
            );
        }
        (expected, got) => return Err(format!("model says {expected:?}, ledger answered {}", got.summary())),
    }
    Ok(())
}

/// An event as the model predicts it: (wallet, type, amount, balance after).
type Expected = (String, &'static str, Option<Decimal>, Decimal);

fn expected_events(cmd: &Cmd, outcome: &Outcome) -> Vec<Expected> {
    let mut out = Vec::new();
    match (cmd, outcome) {
        (Cmd::Deposit { wallet, amount }, Outcome::Wallet { balance, created }) => {
            if *created {
                out.push((wallet.clone(), "WalletCreated", None, Decimal::ZERO));
            }
            out.push((wallet.clone(), "FundsDeposited", Some(*amount), *balance));
        }
        (Cmd::Withdraw { wallet, amount }, Outcome::Wallet { balance, .. }) => {
            out.push((wallet.clone(), "FundsWithdrawn", Some(*amount), *balance));
        }
        (
            Cmd::Transfer { from, to, amount },
            Outcome::Transfer {
                from_balance,
                to_balance,
                to_created,
            },
        ) => {
            out.push((from.clone(), "TransferDebited", Some(*amount), *from_balance));
            if *to_created {
                out.push((to.clone(), "WalletCreated", None, Decimal::ZERO));
            }
            out.push((to.clone(), "TransferCredited", Some(*amount), *to_balance));
        }
        _ => {}
    }
    out.sort();
    out
}

fn event_amount(e: &WalletEvent) -> Option<Decimal> {
    match e {
        WalletEvent::WalletCreated(_) => None,
        WalletEvent::FundsDeposited(p) | WalletEvent::FundsWithdrawn(p) => Some(p.amount.value()),
        WalletEvent::TransferDebited(p) | WalletEvent::TransferCredited(p) => Some(p.amount.value()),
        WalletEvent::HoldPlaced(p) => Some(p.amount.value()),
        WalletEvent::HoldCaptured(p) => Some(p.amount.value()),
        WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => Some(p.amount.value()),
        WalletEvent::WalletLimitsChanged(_) => None,
    }
}

fn actual_event(ids: &Ids, e: &RecordedEvent) -> Expected {
    (
        ids.name(&e.stream),
        e.event.event_type(),
        event_amount(&e.event),
        e.event.balance_after().value(),
    )
}

fn request_id_of(e: &RecordedEvent) -> Option<&str> {
    e.metadata.get("requestId").and_then(Value::as_str)
}

/// Per-stream invariants, checked against the real store: versions
/// contiguous from 1, `WalletCreated` first and only first, each event's
/// `newBalance` = previous balance +/- its amount and never negative, the
/// full fold equals `Ledger::wallet` (newest snapshot + tail). Returns it.
async fn check_stream(ledger: &Ledger, id: &WalletId) -> Result<Wallet, String> {
    let events = ledger
        .store()
        .read_stream(id, 0, None)
        .await
        .map_err(|e| format!("read_stream {id}: {e}"))?;
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    ensure!(
        versions == (1..=events.len() as u64).collect::<Vec<_>>(),
        "{id}: versions {versions:?} are not contiguous from 1"
    );
    let mut running = Decimal::ZERO;
    for (i, e) in events.iter().enumerate() {
        let created = matches!(e.event, WalletEvent::WalletCreated(_));
        ensure!(created == (i == 0), "{id}: WalletCreated at version {}", e.version);
        ensure!(
            e.event.wallet_id() == id,
            "{id}: event of {} in its stream",
            e.event.wallet_id()
        );
        match &e.event {
            WalletEvent::FundsDeposited(p) => running += p.amount.value(),
            WalletEvent::TransferCredited(p) => running += p.amount.value(),
            WalletEvent::FundsWithdrawn(p) => running -= p.amount.value(),
            WalletEvent::TransferDebited(p) => running -= p.amount.value(),
            WalletEvent::HoldCaptured(p) => running -= p.amount.value(),
            // Created, holds placed or released, limits: the balance stays.
            _ => {}
        }
        let after = e.event.balance_after().value();
        ensure!(
            after == running,
            "{id}: version {} records newBalance {after}, its amounts sum to {running}",
            e.version
        );
        ensure!(
            after >= Decimal::ZERO,
            "{id}: negative balance {after} at version {}",
            e.version
        );
    }
    let folded = Wallet::fold(id.clone(), events.iter().map(|e| &e.event));
    let served = ledger.wallet(id, None).await.map_err(|e| format!("wallet {id}: {e}"))?;
    ensure!(folded == served, "{id}: fresh fold {folded:?} != served {served:?}");
    Ok(served)
}

// ---------------------------------------------------------------------------
// Property 1: sequences of commands, real ledger vs model, both backends.
// ---------------------------------------------------------------------------

/// An accepted, freshly decided request: where its append ended and the
/// model's balances right after it.
struct Accepted {
    position: Position,
    request_id: String,
    events: Vec<Expected>,
    balances: BTreeMap<String, Decimal>,
}

struct SequenceRun<'a> {
    ledger: &'a Ledger,
    ids: Ids,
    model: Model,
    /// The last request with each key that reached the ledger, for
    /// `again` / `reuse`.
    keyed: HashMap<String, Req>,
    /// The first answer under each (wallet in the path, key).
    originals: HashMap<(usize, String), Got>,
    accepted: Vec<Accepted>,
    trace: Vec<String>,
    tally: &'a Tally,
}

impl SequenceRun<'_> {
    /// The source wallet's model balance, for `=bal` amounts.
    fn resolve(&self, amt: &Amt, w: usize) -> String {
        let bal = self.model.balance(WALLETS[w]).unwrap_or_default();
        let tick = Decimal::new(1, 4);
        match amt {
            Amt::Lit(s) => s.clone(),
            Amt::Bal => money(bal),
            Amt::BalPlus => money(bal + tick),
            Amt::BalMinus => money(bal - tick),
        }
    }

    fn request(&self, op: &Op) -> Option<Req> {
        let key = |k: &Option<u8>| k.map(|k| format!("k{k}"));
        let n = WALLETS.len();
        Some(match op {
            Op::Dep { w, amt, key: k } => Req {
                kind: Kind::Deposit,
                w: *w as usize % n,
                to: 0,
                amount: self.resolve(amt, *w as usize % n),
                key: key(k),
            },
            Op::Wd { w, amt, key: k } => Req {
                kind: Kind::Withdraw,
                w: *w as usize % n,
                to: 0,
                amount: self.resolve(amt, *w as usize % n),
                key: key(k),
            },
            Op::Tr { from, to, amt, key: k } => Req {
                kind: Kind::Transfer,
                w: *from as usize % n,
                to: *to as usize % n,
                amount: self.resolve(amt, *from as usize % n),
                key: key(k),
            },
            Op::Again { key: k } => self.keyed.get(&format!("k{k}"))?.clone(),
            Op::Reuse { key: k, change } => {
                let mut r = self.keyed.get(&format!("k{k}"))?.clone();
                match change {
                    Change::Amount => {
                        r.amount = match parse_amount(&r.amount) {
                            Ok(v) => money(v + Decimal::new(1, 4)),
                            Err(_) => "1".to_owned(),
                        }
                    }
                    Change::Kind => {
                        r.kind = match r.kind {
                            Kind::Deposit => Kind::Withdraw,
                            Kind::Withdraw | Kind::Transfer => Kind::Deposit,
                        }
                    }
                    Change::Target => {
                        let to = if r.kind == Kind::Transfer { r.to } else { r.w };
                        r.to = (to + 1) % n;
                        r.kind = Kind::Transfer;
                    }
                    Change::Spelling => {
                        if r.amount.contains('.') {
                            r.amount.push_str("00");
                        } else {
                            r.amount.push_str(".0");
                        }
                    }
                }
                r
            }
        })
    }

    async fn step(&mut self, op: &Op) -> Result<(), String> {
        let Some(req) = self.request(op) else {
            self.tally.add("again/reuse of an unused key");
            self.trace.push(format!("{op:?}: key not used yet, skipped"));
            return Ok(());
        };
        // Money is validated before the ledger: Amount::parse vs the model.
        let amount = match (Amount::parse(&req.amount), parse_amount(&req.amount)) {
            (Ok(a), Ok(v)) => {
                ensure!(
                    a.value() == v && a.to_string() == money(v),
                    "{req}: Amount::parse gave {a} ({:?}), the model reads {v}",
                    a.value()
                );
                a
            }
            (Err(e), Err(m)) => {
                ensure!(
                    bad_amount(&e) == m,
                    "{req}: Amount::parse says {e:?}, the model says {m:?}"
                );
                self.tally.add(format!("invalid_amount:{m:?}"));
                self.trace.push(format!("{req} -> invalid amount ({m:?})"));
                return Ok(());
            }
            (a, m) => return Err(format!("{req}: Amount::parse gave {a:?}, the model says {m:?}")),
        };
        let cmd = req.cmd(amount.value());
        let expected = self.model.handle(&cmd, req.key.as_deref());
        let got = send(self.ledger, &self.ids, &req, amount).await;
        self.trace.push(format!("{req} -> {}", got.summary()));
        self.tally.add(match &expected {
            Reply::Fresh(Outcome::Rejected(r)) => format!("fresh_rejected:{}", rejection_name(r)),
            Reply::Fresh(_) => "fresh_ok".to_owned(),
            Reply::Replayed(Outcome::Rejected(_)) => "replayed_rejection".to_owned(),
            Reply::Replayed(_) => "replayed_ok".to_owned(),
            Reply::KeyReused => "key_reused".to_owned(),
        });
        if let Some(k) = &req.key {
            self.keyed.insert(k.clone(), req.clone());
        }
        let slot = req.key.clone().map(|k| (req.w, k));

        match &expected {
            Reply::Fresh(outcome) => {
                ensure!(
                    !got.replayed(),
                    "{req}: answered as a replay, the model decides it fresh"
                );
                matches_outcome(&self.ids, &req, amount.value(), outcome, &got).map_err(|e| format!("{req}: {e}"))?;
                if let Some(slot) = slot {
                    self.originals.insert(slot, got.clone());
                }
                if let Some(position) = got.position() {
                    let last = self.accepted.last().map(|a| a.position).unwrap_or(0);
                    ensure!(position > last, "{req}: position {position} after {last}");
                    self.accepted.push(Accepted {
                        position,
                        request_id: got.request_id().unwrap_or_default().to_owned(),
                        events: expected_events(&cmd, outcome),
                        balances: self.model.balances.clone(),
                    });
                }
            }
            Reply::Replayed(outcome) => {
                ensure!(
                    got.replayed(),
                    "{req}: the model replays {outcome:?}, the ledger answered {}",
                    got.summary()
                );
                let original = slot
                    .as_ref()
                    .and_then(|s| self.originals.get(s))
                    .ok_or_else(|| format!("{req}: replay without an original"))?;
                ensure!(
                    got.as_original() == *original,
                    "{req}: replay {} differs from the original {}",
                    got.summary(),
                    original.summary()
                );
            }
            Reply::KeyReused => {
                ensure!(
                    got == Got::KeyReused,
                    "{req}: the model says IDEMPOTENCY_KEY_REUSED, the ledger answered {}",
                    got.summary()
                );
            }
        }
        // Every balance this request touched equals the model's.
        for w in [req.w, req.to] {
            let state = self
                .ledger
                .wallet(&self.ids.ids[w], None)
                .await
                .map_err(|e| e.to_string())?;
            let model = self.model.balance(WALLETS[w]);
            ensure!(
                state.exists() == model.is_some() && state.balance.value() == model.unwrap_or_default(),
                "after {req}: wallet {} is {:?} (exists={}), the model says {model:?}",
                WALLETS[w],
                state.balance.value(),
                state.exists()
            );
        }
        Ok(())
    }

    /// After the sequence: the log, replay at every position, per-stream
    /// invariants, conservation.
    async fn finish(&self, head_before: Position) -> Result<(), String> {
        let store = self.ledger.store();
        let log = store
            .read_all(head_before, 1_000_000)
            .await
            .map_err(|e| e.to_string())?;
        // The log holds exactly the accepted requests' events, each request's
        // append ending at the position its receipt gave.
        let mut from = head_before;
        for a in &self.accepted {
            let mine: Vec<&RecordedEvent> = log
                .iter()
                .filter(|e| e.position > from && e.position <= a.position)
                .collect();
            let mut actual: Vec<Expected> = mine.iter().map(|e| actual_event(&self.ids, e)).collect();
            actual.sort();
            ensure!(
                actual == a.events,
                "log between positions {from} and {}: {actual:?}, expected {:?}",
                a.position,
                a.events
            );
            ensure!(
                mine.iter().all(|e| request_id_of(e) == Some(&a.request_id)),
                "events up to position {} do not carry requestId {}",
                a.position,
                a.request_id
            );
            from = a.position;
        }
        ensure!(
            log.iter().all(|e| e.position <= from),
            "events after the last accepted request: {:?}",
            log.iter()
                .filter(|e| e.position > from)
                .map(|e| actual_event(&self.ids, e))
                .collect::<Vec<_>>()
        );
        // Time travel: the state at each accepted request's position is the
        // model's right after it (and nothing before the first), both as a
        // full fold of the stream up to there and as the ledger loads it
        // (newest snapshot within the cutoff + tail).
        let empty = BTreeMap::new();
        let points =
            std::iter::once((head_before, &empty)).chain(self.accepted.iter().map(|a| (a.position, &a.balances)));
        for (position, balances) in points {
            let cutoff = Some(Cutoff::Position(position));
            for (w, id) in self.ids.ids.iter().enumerate() {
                let events = store.read_stream(id, 0, cutoff).await.map_err(|e| e.to_string())?;
                let folded = Wallet::fold(id.clone(), events.iter().map(|e| &e.event));
                let loaded = self.ledger.wallet(id, cutoff).await.map_err(|e| e.to_string())?;
                ensure!(
                    folded == loaded,
                    "at position {position}: wallet {} folds to {folded:?}, snapshot + tail gives {loaded:?}",
                    WALLETS[w]
                );
                let model = balances.get(WALLETS[w]).copied();
                ensure!(
                    folded.exists() == model.is_some() && folded.balance.value() == model.unwrap_or_default(),
                    "at position {position}: wallet {} is {} (exists={}), the model says {model:?}",
                    WALLETS[w],
                    folded.balance,
                    folded.exists()
                );
            }
        }
        // Streams, final balances, conservation.
        let mut total = Decimal::ZERO;
        for (w, id) in self.ids.ids.iter().enumerate() {
            let state = check_stream(self.ledger, id).await?;
            let model = self.model.balance(WALLETS[w]);
            ensure!(
                state.exists() == model.is_some() && state.balance.value() == model.unwrap_or_default(),
                "final: wallet {} is {} (exists={}), the model says {model:?}",
                WALLETS[w],
                state.balance,
                state.exists()
            );
            total += state.balance.value();
        }
        ensure!(
            total == self.model.deposited - self.model.withdrawn && total == self.model.total(),
            "money not conserved: balances sum to {total}, deposits - withdrawals = {}",
            self.model.deposited - self.model.withdrawn
        );
        Ok(())
    }
}

fn rejection_name(r: &Rejection) -> &'static str {
    match r {
        Rejection::InsufficientFunds { .. } => "insufficient",
        Rejection::WalletNotFound { .. } => "not_found",
        Rejection::SameWallet => "same_wallet",
    }
}

async fn run_sequence(ledger: &Ledger, tally: &Tally, ops: &[Op]) -> Result<(), TestCaseError> {
    let head_before = ledger.store().head_position().await.map_err(|e| fail(e.to_string()))?;
    let mut run = SequenceRun {
        ledger,
        ids: Ids::fresh(WALLETS.len()),
        model: Model::default(),
        keyed: HashMap::new(),
        originals: HashMap::new(),
        accepted: Vec::new(),
        trace: Vec::new(),
        tally,
    };
    let mut result = Ok(());
    for op in ops {
        result = run.step(op).await;
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        result = run.finish(head_before).await;
    }
    result.map_err(|why| {
        fail(format!(
            "{why}\n--- what happened (request -> ledger's answer), wallets {}* ---\n{}",
            run.ids.prefix,
            run.trace.join("\n")
        ))
    })
}

fn sequences_match_the_model(backend: Backend, regressions: &'static str) {
    let rt = runtime(2);
    let db = rt.block_on(backend.open());
    // Snapshots every 3 events, so loading a wallet is snapshot + tail.
    let ledger = Ledger::new(db.store.clone()).with_snapshot_every(3);
    let projections = rt.block_on(read_models(&db.store));
    let tally = Tally::default();
    let name = format!("sequences_match_the_model[{backend:?}]");
    check(&name, config(128, regressions), vec(op(), 1..40), |ops| {
        rt.block_on(async {
            run_sequence(&ledger, &tally, &ops).await?;
            projections
                .catch_up()
                .await
                .map_err(|e| fail(format!("projections: {e}")))
        })
    });
    tally.print(&name);
    rt.block_on(audit(&name, &db.store, &projections));
}

/// Read models fed in small batches after every case, so their live state is
/// built incrementally across many batch boundaries.
async fn read_models(store: &EventStore) -> Projections {
    let projections = Projections::new(store.clone(), FraudRules::default()).with_batch_events(16);
    projections.ensure().await.expect("create read models");
    projections
}

/// After all cases of a property: `verify` finds nothing wrong in the whole
/// database (versions, hash chains, balances against amounts, transfer
/// pairs, every snapshot against the fold at its version, every read model
/// against its rebuild from position 0).
async fn audit(name: &str, store: &EventStore, projections: &Projections) {
    projections.catch_up().await.expect("projections catch up");
    // Snapshots are written in the background after appends: let them land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = wallet::verify::verify(store, projections, |_, _| {})
        .await
        .expect("verify runs");
    assert!(
        report.discrepancies.is_empty(),
        "{name}: verify found discrepancies: {:#?}",
        report.discrepancies
    );
    eprintln!(
        "{name}: verify: {} events, {} streams, {} snapshots, read models = rebuild, no discrepancy",
        report.events, report.streams, report.snapshots
    );
}

#[test]
fn sequences_match_the_model_sqlite() {
    sequences_match_the_model(Backend::Sqlite, "proptest-regressions/properties/sequences_sqlite.txt");
}

#[test]
fn sequences_match_the_model_postgres() {
    sequences_match_the_model(
        Backend::Postgres,
        "proptest-regressions/properties/sequences_postgres.txt",
    );
}

// ---------------------------------------------------------------------------
// Property 2: concurrent batches equal a serial replay of what was accepted.
// ---------------------------------------------------------------------------

const CONCURRENT_WALLETS: usize = 3;

/// One request of a concurrent batch. Keys carry their wallet's letter, so a
/// request id names one request in the log; two ledgers (`via`) stand for
/// two processes sharing the database.
#[derive(Clone)]
struct COp {
    kind: Kind,
    w: u8,
    to: u8,
    amount: String,
    key: Option<u8>,
    via: u8,
}

impl COp {
    fn req(&self) -> Req {
        Req {
            kind: self.kind,
            w: self.w as usize,
            to: self.to as usize,
            amount: self.amount.clone(),
            key: self.key.map(|k| format!("{}{k}", WALLETS[self.w as usize])),
        }
    }
}

impl fmt::Debug for COp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} @{}", self.req(), self.via)
    }
}

#[derive(Clone)]
struct Batch {
    seeds: Vec<(u8, u32)>,
    ops: Vec<COp>,
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seeds: Vec<String> = self
            .seeds
            .iter()
            .map(|(w, a)| format!("{} {a}", WALLETS[*w as usize]))
            .collect();
        f.debug_struct("Batch")
            .field("seeds", &seeds.join(", "))
            .field("concurrently", &self.ops)
            .finish()
    }
}

fn cop() -> impl Strategy<Value = COp> {
    let w = 0u8..CONCURRENT_WALLETS as u8;
    let kind = prop::sample::select(vec![Kind::Deposit, Kind::Withdraw, Kind::Transfer, Kind::Transfer]);
    // Seeds are whole numbers: "n.0001" is one tick over some balance.
    let amount = prop_oneof![
        4 => (1u32..60).prop_map(|n| n.to_string()),
        2 => (0u32..30, 1u32..100).prop_map(|(i, f)| format!("{i}.{f:02}")),
        1 => (0u32..60).prop_map(|n| format!("{n}.0001")),
    ];
    let key = prop_oneof![1 => Just(None), 2 => (0u8..4).prop_map(Some)];
    (kind, w.clone(), w, amount, key, 0u8..2).prop_map(|(kind, w, to, amount, key, via)| COp {
        kind,
        w,
        to,
        amount,
        key,
        via,
    })
}

fn batch() -> impl Strategy<Value = Batch> {
    let seeds = vec((0u8..CONCURRENT_WALLETS as u8, 1u32..200), 0..5);
    // Some requests are sent twice or more at once: concurrent duplicates.
    let dups = vec((any::<prop::sample::Index>(), 1usize..4), 0..3);
    (seeds, vec(cop(), 1..20), dups).prop_map(|(seeds, mut ops, dups)| {
        for (i, times) in dups {
            let j = i.index(ops.len());
            ops[j].key.get_or_insert(9);
            let op = ops[j].clone();
            for t in 0..times {
                ops.push(COp {
                    via: (op.via + 1 + t as u8) % 2,
                    ..op.clone()
                });
            }
        }
        Batch { seeds, ops }
    })
}

fn fingerprint(req: &Req) -> (Kind, usize, Decimal) {
    let to = if req.kind == Kind::Transfer { req.to } else { usize::MAX };
    (req.kind, to, parse_amount(&req.amount).unwrap().normalize())
}

async fn run_batch(ledgers: &[Arc<Ledger>; 2], tally: &Tally, batch: &Batch) -> Result<(), TestCaseError> {
    let ids = Ids::fresh(CONCURRENT_WALLETS);
    let mut trace = Vec::new();
    let result = batch_inner(ledgers, tally, batch, &ids, &mut trace).await;
    result.map_err(|why| {
        fail(format!(
            "{why}\n--- answers (request @ledger -> answer), wallets {}* ---\n{}",
            ids.prefix,
            trace.join("\n")
        ))
    })
}

async fn batch_inner(
    ledgers: &[Arc<Ledger>; 2],
    tally: &Tally,
    batch: &Batch,
    ids: &Ids,
    trace: &mut Vec<String>,
) -> Result<(), String> {
    let ledger = &ledgers[0];
    let store = ledger.store();
    // Seeds, one after another.
    let mut serial = Model::default();
    for (w, a) in &batch.seeds {
        let amount = Amount::parse(&a.to_string()).unwrap();
        let got = from_wallet(ledger.deposit(ids.ids[*w as usize].clone(), amount, None).await);
        ensure!(
            matches!(got, Got::Wallet(_, false)),
            "seed deposit answered {}",
            got.summary()
        );
        serial.decide(&Cmd::Deposit {
            wallet: WALLETS[*w as usize].to_owned(),
            amount: amount.value(),
        });
    }
    let existed: BTreeSet<String> = serial.balances.keys().cloned().collect();
    let head_before = store.head_position().await.map_err(|e| e.to_string())?;

    // The batch, all at once on a multi-threaded runtime.
    let tasks: Vec<_> = batch
        .ops
        .iter()
        .map(|op| {
            let ledger = ledgers[op.via as usize].clone();
            let ids = ids.clone();
            let req = op.req();
            tokio::spawn(async move {
                let amount = Amount::parse(&req.amount).unwrap();
                send(&ledger, &ids, &req, amount).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for (op, task) in batch.ops.iter().zip(tasks) {
        let got = task.await.map_err(|e| format!("task panicked: {e}"))?;
        trace.push(format!("{op:?} -> {}", got.summary()));
        tally.add(match &got {
            Got::Wallet(_, false) | Got::Transfer(_, false) => "accepted",
            Got::Wallet(_, true) | Got::Transfer(_, true) => "replayed_ok",
            Got::Rejected(_, false) => "rejected",
            Got::Rejected(_, true) => "replayed_rejection",
            Got::KeyReused => "key_reused",
            Got::Conflict => "conflict",
            Got::Failed(_) => "failed",
        });
        answers.push((op.req(), got));
    }
    for (req, got) in &answers {
        ensure!(!matches!(got, Got::Failed(_)), "{req}: {}", got.summary());
    }

    // Keyed requests: at most one decided per (wallet, key); the others
    // replay it (same payload) or are IDEMPOTENCY_KEY_REUSED (different).
    let mut groups: BTreeMap<(usize, String), Vec<&(Req, Got)>> = BTreeMap::new();
    for a in &answers {
        if let Some(k) = &a.0.key {
            groups.entry((a.0.w, k.clone())).or_default().push(a);
        }
    }
    for ((w, key), group) in &groups {
        let fresh: Vec<_> = group
            .iter()
            .filter(|(_, g)| {
                matches!(
                    g,
                    Got::Wallet(_, false) | Got::Transfer(_, false) | Got::Rejected(_, false)
                )
            })
            .collect();
        ensure!(
            fresh.len() <= 1,
            "key {key} on {}: decided {} times",
            WALLETS[*w],
            fresh.len()
        );
        for (req, got) in group {
            match got {
                Got::KeyReused | Got::Wallet(_, true) | Got::Transfer(_, true) | Got::Rejected(_, true) => {
                    let (first_req, first) = fresh
                        .first()
                        .ok_or_else(|| format!("{req}: {} without a decided original", got.summary()))?;
                    let same = fingerprint(req) == fingerprint(first_req);
                    if *got == Got::KeyReused {
                        ensure!(
                            !same,
                            "{req}: IDEMPOTENCY_KEY_REUSED for the same payload as {first_req}"
                        );
                    } else {
                        ensure!(same, "{req}: replayed the answer of a different payload {first_req}");
                        ensure!(
                            got.as_original() == *first,
                            "{req}: replay {} differs from the original {}",
                            got.summary(),
                            first.summary()
                        );
                    }
                }
                _ => {}
            }
        }
    }

    // The log after the batch: every event belongs to an accepted request,
    // each accepted request's events are there exactly once.
    let log = store
        .read_all(head_before, 1_000_000)
        .await
        .map_err(|e| e.to_string())?;
    let mut by_request: HashMap<&str, Vec<&RecordedEvent>> = HashMap::new();
    for e in &log {
        let rid = request_id_of(e).ok_or_else(|| format!("event at {} has no requestId", e.position))?;
        by_request.entry(rid).or_default().push(e);
    }
    let mut accepted: Vec<(&Req, &Got)> = answers
        .iter()
        .filter(|(_, g)| matches!(g, Got::Wallet(_, false) | Got::Transfer(_, false)))
        .map(|(r, g)| (r, g))
        .collect();
    accepted.sort_by_key(|(_, g)| g.position());
    let accepted_ids: BTreeSet<&str> = accepted.iter().filter_map(|(_, g)| g.request_id()).collect();
    ensure!(
        accepted_ids.len() == accepted.len(),
        "two accepted requests share a requestId"
    );
    for rid in by_request.keys() {
        ensure!(
            accepted_ids.contains(rid),
            "events of requestId {rid}, which was not accepted: {:?}",
            by_request[rid].iter().map(|e| actual_event(ids, e)).collect::<Vec<_>>()
        );
    }

    // Serial replay of the accepted requests in log order through the model.
    let mut history: HashMap<String, BTreeSet<Decimal>> = serial
        .balances
        .iter()
        .map(|(w, b)| (w.clone(), BTreeSet::from([Decimal::ZERO, *b])))
        .collect();
    for (req, got) in &accepted {
        let rid = got.request_id().unwrap();
        let amount = parse_amount(&req.amount).unwrap();
        let cmd = req.cmd(amount);
        let outcome = serial.decide(&cmd);
        ensure!(
            outcome.accepted(),
            "{req} was accepted, but in log order the model rejects it: {outcome:?}"
        );
        matches_outcome(ids, req, amount, &outcome, got).map_err(|e| format!("{req} (replayed in log order): {e}"))?;
        let mut events: Vec<Expected> = by_request
            .get(rid)
            .map(|v| v.iter().map(|e| actual_event(ids, e)).collect())
            .unwrap_or_default();
        events.sort();
        ensure!(
            events == expected_events(&cmd, &outcome),
            "{req}: its events in the log are {events:?}, expected {:?}",
            expected_events(&cmd, &outcome)
        );
        let last = by_request[rid].iter().map(|e| e.position).max();
        ensure!(
            last == got.position(),
            "{req}: receipt position {:?}, its events end at {last:?}",
            got.position()
        );
        for (w, b) in &serial.balances {
            history.entry(w.clone()).or_default().insert(*b);
        }
    }

    // Rejections must have been true at some point of that serial order.
    for (req, got) in &answers {
        if let Got::Rejected(e, false) = got {
            match rejection(ids, e)? {
                Rejection::InsufficientFunds {
                    wallet,
                    balance,
                    requested,
                } => {
                    ensure!(
                        balance < requested,
                        "{req}: insufficient funds with {balance} >= {requested}"
                    );
                    ensure!(
                        history.get(&wallet).is_some_and(|h| h.contains(&balance)),
                        "{req}: rejected at balance {balance}, which {wallet} never had in log order ({:?})",
                        history.get(&wallet)
                    );
                }
                Rejection::WalletNotFound { wallet } => {
                    ensure!(
                        !existed.contains(&wallet),
                        "{req}: {wallet} not found, but it existed before the batch"
                    );
                }
                Rejection::SameWallet => ensure!(req.w == req.to, "{req}: SAME_WALLET"),
            }
        }
    }

    // Final state: streams sound, balances = the serial replay, conservation.
    let mut total = Decimal::ZERO;
    for (w, id) in ids.ids.iter().enumerate() {
        let state = check_stream(ledger, id).await?;
        let model = serial.balance(WALLETS[w]);
        ensure!(
            state.exists() == model.is_some() && state.balance.value() == model.unwrap_or_default(),
            "final: wallet {} is {} (exists={}), the serial replay says {model:?}",
            WALLETS[w],
            state.balance,
            state.exists()
        );
        total += state.balance.value();
    }
    let mut expected_total = Decimal::ZERO;
    for (_, a) in &batch.seeds {
        expected_total += Decimal::from(*a);
    }
    for (req, _) in &accepted {
        match req.kind {
            Kind::Deposit => expected_total += parse_amount(&req.amount).unwrap(),
            Kind::Withdraw => expected_total -= parse_amount(&req.amount).unwrap(),
            Kind::Transfer => {}
        }
    }
    ensure!(
        total == expected_total,
        "money not conserved: balances sum to {total}, seeds + accepted deposits - withdrawals = {expected_total}"
    );
    Ok(())
}

fn concurrent_batches_equal_a_serial_order(backend: Backend, regressions: &'static str) {
    let rt = runtime(4);
    let db = rt.block_on(backend.open());
    // Two ledgers on one database: two processes, so cross-process conflicts
    // and duplicate-key races are exercised too.
    // Small snapshot intervals: snapshots are written while the batch runs.
    let ledgers = [
        Arc::new(Ledger::new(db.store.clone()).with_snapshot_every(2)),
        Arc::new(Ledger::new(db.store.clone()).with_snapshot_every(3)),
    ];
    let projections = rt.block_on(read_models(&db.store));
    let tally = Tally::default();
    let name = format!("concurrent_batches_equal_a_serial_order[{backend:?}]");
    check(&name, config(64, regressions), batch(), |b| {
        rt.block_on(async {
            run_batch(&ledgers, &tally, &b).await?;
            projections
                .catch_up()
                .await
                .map_err(|e| fail(format!("projections: {e}")))
        })
    });
    tally.print(&name);
    rt.block_on(audit(&name, &db.store, &projections));
}

#[test]
fn concurrent_batches_equal_a_serial_order_sqlite() {
    concurrent_batches_equal_a_serial_order(Backend::Sqlite, "proptest-regressions/properties/concurrent_sqlite.txt");
}

#[test]
fn concurrent_batches_equal_a_serial_order_postgres() {
    concurrent_batches_equal_a_serial_order(
        Backend::Postgres,
        "proptest-regressions/properties/concurrent_postgres.txt",
    );
}

// ---------------------------------------------------------------------------
// Property 3: codecs.
// ---------------------------------------------------------------------------

fn wallet_id() -> impl Strategy<Value = WalletId> {
    "[A-Za-z0-9._:-]{1,128}".prop_map(|s| WalletId::parse(&s).unwrap())
}

/// Any valid amount: 1-4 decimals (or none), from 0.0001 to 10^15 - 0.0001.
fn valid_amount() -> impl Strategy<Value = Decimal> {
    (0u32..=4).prop_flat_map(|scale| {
        let max = 10i128.pow(15 + scale);
        prop_oneof![Just(1i128), Just(max - 1), 1i128..100_000, 1i128..max,]
            .prop_map(move |m| Decimal::from_i128_with_scale(m, scale))
    })
}

fn balance() -> impl Strategy<Value = Balance> {
    (0i128..10i128.pow(24), 0u32..=4)
        .prop_map(|(m, s)| Balance::from_decimal(Decimal::from_i128_with_scale(m, s)).unwrap())
}

/// Any event. Funds and creation payloads are built from their JSON (their
/// structs are not re-exported), which also pins the stored shape.
fn event() -> impl Strategy<Value = WalletEvent> {
    let amount = || valid_amount().prop_map(|d| Amount::new(d).unwrap());
    let funds = |event_type: &'static str| {
        (wallet_id(), amount(), balance()).prop_map(move |(w, amount, new_balance)| {
            let json = serde_json::json!({
                "walletId": w.as_str(),
                "amount": amount.to_string(),
                "newBalance": new_balance.to_string(),
            });
            WalletEvent::decode(event_type, EVENT_SCHEMA_VERSION, json).unwrap()
        })
    };
    let transfer = || {
        (
            wallet_id(),
            any::<u128>(),
            wallet_id(),
            wallet_id(),
            amount(),
            balance(),
        )
            .prop_map(
                |(wallet_id, t, from_wallet_id, to_wallet_id, amount, new_balance)| TransferPayload {
                    wallet_id,
                    transfer_id: Uuid::from_u128(t),
                    from_wallet_id,
                    to_wallet_id,
                    amount,
                    new_balance,
                },
            )
    };
    prop_oneof![
        wallet_id().prop_map(|w| {
            let json = serde_json::json!({ "walletId": w.as_str() });
            WalletEvent::decode("WalletCreated", EVENT_SCHEMA_VERSION, json).unwrap()
        }),
        funds("FundsDeposited"),
        funds("FundsWithdrawn"),
        transfer().prop_map(WalletEvent::TransferDebited),
        transfer().prop_map(WalletEvent::TransferCredited),
    ]
}

fn is_money_text(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        !int.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.len() == 4
            && frac.bytes().all(|b| b.is_ascii_digit())
    })
}

#[test]
fn every_event_round_trips_through_its_stored_json() {
    check(
        "every_event_round_trips_through_its_stored_json",
        config(1024, "proptest-regressions/properties/events.txt"),
        (
            event(),
            prop_oneof![Just(0i32), Just(2), Just(-1), Just(i32::MAX), any::<i32>()],
        ),
        |(e, other_version)| {
            let payload = e.payload();
            // As a JSON value (PostgreSQL jsonb) and as text (SQLite).
            let back = WalletEvent::decode(e.event_type(), EVENT_SCHEMA_VERSION, payload.clone())
                .map_err(|err| fail(format!("decode: {err}")))?;
            prop_assert_eq!(&back, &e);
            let text = payload.to_string();
            let reread: Value = serde_json::from_str(&text).unwrap();
            let back = WalletEvent::decode(e.event_type(), EVENT_SCHEMA_VERSION, reread)
                .map_err(|err| fail(format!("decode from text: {err}")))?;
            prop_assert_eq!(&back, &e);
            // Money in payloads is text with exactly four decimals.
            for field in ["amount", "newBalance"] {
                if let Some(v) = payload.get(field) {
                    prop_assert!(is_money_text(v), "{} = {}", field, v);
                }
            }
            prop_assert_eq!(payload["walletId"].as_str(), Some(e.wallet_id().as_str()));
            // Unknown schema versions and types are errors, never panics.
            if other_version != EVENT_SCHEMA_VERSION {
                prop_assert!(WalletEvent::decode(e.event_type(), other_version, payload.clone()).is_err());
            }
            prop_assert!(WalletEvent::decode("NoSuchEvent", EVENT_SCHEMA_VERSION, payload).is_err());
            Ok(())
        },
    );
}

/// Ways to write a value: canonical, with trailing zeros, with leading zeros.
fn spellings(value: Decimal) -> Vec<String> {
    let plain = value.normalize().to_string();
    let padded = money(value);
    let mut out = vec![
        plain.clone(),
        padded.clone(),
        format!("{padded}0"),
        format!("00{plain}"),
    ];
    if !plain.contains('.') {
        out.push(format!("{plain}.0"));
    }
    out
}

#[derive(serde::Deserialize)]
struct Body {
    amount: Box<serde_json::value::RawValue>,
}

#[test]
fn amounts_round_trip_exactly_through_json_numbers_and_strings() {
    check(
        "amounts_round_trip_exactly_through_json_numbers_and_strings",
        config(2048, "proptest-regressions/properties/amounts.txt"),
        (valid_amount(), 1u32..10),
        |(value, fifth)| {
            for text in spellings(value) {
                // The model and Amount::parse agree on the value.
                prop_assert_eq!(parse_amount(&text), Ok(value.normalize()));
                let a = Amount::parse(&text).map_err(|e| fail(format!("{text}: {e}")))?;
                prop_assert_eq!(a.value(), value);
                prop_assert_eq!(a.to_string(), money(value));
                // A JSON number keeps its exact text (never through f64)...
                if !text.starts_with("00") {
                    let body: Body = serde_json::from_str(&format!("{{\"amount\": {text}}}")).unwrap();
                    prop_assert_eq!(body.amount.get(), text.as_str());
                    prop_assert_eq!(Amount::parse(body.amount.get()), Ok(a));
                }
                // ...and so does a JSON string.
                let body: Body = serde_json::from_str(&format!("{{\"amount\": \"{text}\"}}")).unwrap();
                let s: String = serde_json::from_str(body.amount.get()).unwrap();
                prop_assert_eq!(Amount::parse(&s), Ok(a));
            }
            // Amount and Balance serialise as 4-decimal strings and back.
            let a = Amount::new(value).unwrap();
            let json = serde_json::to_string(&a).unwrap();
            prop_assert_eq!(&json, &format!("\"{}\"", money(value)));
            prop_assert_eq!(serde_json::from_str::<Amount>(&json).unwrap(), a);
            let b = Balance::from_decimal(value).unwrap();
            prop_assert_eq!(
                serde_json::from_str::<Balance>(&serde_json::to_string(&b).unwrap()).unwrap(),
                b
            );
            // A fifth decimal that is not zero is refused, never rounded.
            let precise = format!("{}{fifth}", money(value));
            prop_assert_eq!(Amount::parse(&precise), Err(AmountError::TooPrecise));
            prop_assert_eq!(parse_amount(&precise), Err(BadAmount::TooPrecise));
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------
// Property 4: HTTP input on a real server. Any bytes: never a 5xx, errors are
// problem+json; valid amounts come back exact.
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Hostile {
    route: &'static str,
    wallet: String,
    content_type: Option<&'static str>,
    key_header: Option<Vec<u8>>,
    body: Vec<u8>,
}

impl fmt::Debug for Hostile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "POST /wallet/{}/{} content-type={:?} idempotency-key={:?} body={:?}",
            self.wallet,
            self.route,
            self.content_type,
            self.key_header
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
            String::from_utf8_lossy(&self.body)
        )
    }
}

fn json_token() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "1", "-1", "0", "-0", "1e3", "1E-2", "0.00005", "1.5", "0.0001", "\"1.5\"", "\"\"", "null",
            "true", "[]", "{}", "\"NaN\"", "\"Infinity\"", "99999999999999999999999999999999999999",
            "1.0000000000000000000000000001", "\"\\u0000\"", "\"é\"", "18446744073709551616",
            "999999999999999.9999", "1000000000000000", "\" 1\"", "\"1 \"", "\"0x10\"", "\"1_000\"",
            "{\"amount\": 1}", "[1]", "\"a/b\"", "\"a b\"", "\"-\"", "\"\\ud800\"",
        ])
        .prop_map(str::to_owned),
        1 => "\\PC{0,24}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        1 => any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap_or_else(|_| "0".into())),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => (0usize..4).prop_map(|n| match n {
            0 => format!("\"{}\"", "x".repeat(200)),
            1 => format!("{}1{}", "[".repeat(300), "]".repeat(300)),
            2 => "9".repeat(5000),
            _ => format!("\"{}\"", "a".repeat(20_000)),
        }),
    ]
}

fn json_body() -> impl Strategy<Value = Vec<u8>> {
    let field = (
        prop::sample::select(vec!["amount", "requestId", "toWalletId", "extra", "Amount", "amount"]),
        json_token(),
    );
    vec(field, 0..5).prop_map(|fields| {
        let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        format!("{{{}}}", inner.join(", ")).into_bytes()
    })
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let route = prop::sample::select(vec!["deposit", "transfer", "withdraw"]);
    let wallet = prop_oneof![
        3 => "[A-Za-z0-9._:-]{1,20}",
        1 => Just("x".repeat(128)),
        1 => Just("x".repeat(129)),
        1 => prop::sample::select(vec!["%00", "a%2Fb", "%C3%A9", "a%20b", "%FF", "..", "."]).prop_map(str::to_owned),
        1 => vec(any::<u8>(), 1..8).prop_map(|b| b.iter().map(|x| format!("%{x:02X}")).collect()),
    ];
    let content_type = prop::sample::select(vec![
        Some("application/json"),
        Some("application/json"),
        Some("application/json; charset=utf-8"),
        Some("application/merge-patch+json"),
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ]);
    let key_header = prop_oneof![
        3 => Just(None),
        1 => "[!-~]{0,140}".prop_map(|s| Some(s.into_bytes())),
        1 => vec(0x80u8..=0xFF, 1..10).prop_map(Some),
    ];
    let body = prop_oneof![
        3 => json_body(),
        1 => vec(any::<u8>(), 0..64),
        1 => (json_body(), any::<prop::sample::Index>()).prop_map(|(b, i)| {
            let cut = i.index(b.len() + 1);
            b[..cut].to_vec()
        }),
        1 => (json_body(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut b, i, x)| {
            if !b.is_empty() {
                let j = i.index(b.len());
                b[j] = x;
            }
            b
        }),
        1 => Just(vec![b'{'; 20_000]),
    ];
    (route, wallet, content_type, key_header, body).prop_map(|(route, wallet, content_type, key_header, body)| {
        Hostile {
            route,
            wallet,
            content_type,
            key_header,
            body,
        }
    })
}

async fn post_hostile(http: &reqwest::Client, base: &str, h: &Hostile, tally: &Tally) -> Result<(), TestCaseError> {
    let mut request = http
        .post(format!("{base}/wallet/{}/{}", h.wallet, h.route))
        .body(h.body.clone());
    if let Some(ct) = h.content_type {
        request = request.header("content-type", ct);
    }
    if let Some(k) = &h.key_header {
        if let Ok(v) = reqwest::header::HeaderValue::from_bytes(k) {
            request = request.header("idempotency-key", v);
        }
    }
    let response = request.send().await.map_err(|e| fail(format!("no response: {e}")))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.map_err(|e| fail(format!("body: {e}")))?;
    prop_assert!(status < 500, "answered {}: {}", status, text);
    if status < 400 {
        tally.add(status.to_string());
    }
    if status >= 400 {
        prop_assert_eq!(content_type.as_str(), "application/problem+json", "{} {}", status, text);
        let problem: Value = serde_json::from_str(&text).map_err(|e| fail(format!("problem body {text:?}: {e}")))?;
        prop_assert_eq!(problem["status"].as_u64(), Some(u64::from(status)), "{}", text);
        prop_assert!(problem["code"].as_str().is_some_and(|c| !c.is_empty()), "{}", text);
        tally.add(format!("{status}:{}", problem["code"].as_str().unwrap_or("")));
    }
    Ok(())
}

/// A valid amount written as a JSON number or string comes back exact;
/// with a fifth (non-zero) decimal it is a 400 INVALID_AMOUNT, never rounded.
async fn exact_over_http(
    http: &reqwest::Client,
    base: &str,
    value: Decimal,
    fifth: u32,
    as_number: bool,
) -> Result<(), TestCaseError> {
    let wallet = format!("exact-{}", Uuid::new_v4().simple());
    let quote = |t: String| if as_number { t } else { format!("\"{t}\"") };
    let text = value.normalize().to_string();
    let post = |route: &str, amount: String| {
        http.post(format!("{base}/wallet/{wallet}/{route}"))
            .header("content-type", "application/json")
            .body(format!("{{\"amount\": {amount}}}"))
            .send()
    };
    let r = post("deposit", quote(text.clone()))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = r.status().as_u16();
    let body: Value = r.json().await.map_err(|e| fail(e.to_string()))?;
    prop_assert_eq!(status, 201, "{}", body);
    let expected = money(value);
    prop_assert_eq!(body["balance"].as_str(), Some(expected.as_str()), "{}", body);
    prop_assert_eq!(body["created"].as_bool(), Some(true));
    let precise = format!("{}{fifth}", money(value));
    let r = post("withdraw", quote(precise))
        .await
        .map_err(|e| fail(e.to_string()))?;
    prop_assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.map_err(|e| fail(e.to_string()))?;
    prop_assert_eq!(body["code"].as_str(), Some("INVALID_AMOUNT"));
    let r = post("withdraw", quote(format!("{}0", money(value))))
        .await
        .map_err(|e| fail(e.to_string()))?;
    prop_assert_eq!(r.status().as_u16(), 201);
    let body: Value = r.json().await.map_err(|e| fail(e.to_string()))?;
    prop_assert_eq!(body["balance"].as_str(), Some("0.0000"), "{}", body);
    Ok(())
}

fn http_input(backend: Backend, regressions: &'static str, exact: &'static str) {
    let rt = runtime(2);
    // The database lives as long as the server that uses it.
    let db = rt.block_on(backend.open());
    let base = rt.block_on(common::serve(db.store.clone()));
    // A fresh connection per request: a server that closes a connection it
    // will not reuse (e.g. after a 413) must not look like a failure here,
    // while a request that gets no answer at all still fails the property.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let tally = Tally::default();
    let name = format!("any_bytes_posted_get_an_answer_below_500[{backend:?}]");
    check(&name, config(256, regressions), hostile(), |h| {
        rt.block_on(post_hostile(&http, &base, &h, &tally))
    });
    tally.print(&name);
    check(
        &format!("amounts_round_trip_exactly_over_http[{backend:?}]"),
        config(96, exact),
        (valid_amount(), 1u32..10, any::<bool>()),
        |(value, fifth, as_number)| rt.block_on(exact_over_http(&http, &base, value, fifth, as_number)),
    );
}

#[test]
fn http_input_sqlite() {
    http_input(
        Backend::Sqlite,
        "proptest-regressions/properties/http_any_bytes_sqlite.txt",
        "proptest-regressions/properties/http_exact_sqlite.txt",
    );
}

#[test]
fn http_input_postgres() {
    http_input(
        Backend::Postgres,
        "proptest-regressions/properties/http_any_bytes_postgres.txt",
        "proptest-regressions/properties/http_exact_postgres.txt",
    );
}
