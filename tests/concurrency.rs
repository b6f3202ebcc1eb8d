//! Concurrent requests through a real server on a real database: every
//! request is answered (never 5xx), money is conserved, no balance goes
//! negative, each duplicate takes effect once, and every served balance
//! equals a fresh fold of its stream.

mod common;

use std::collections::HashSet;
use std::str::FromStr;

use common::TestDb;
use futures_util::future::join_all;
use reqwest::Client;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use wallet::aggregate::{Wallet, WalletId};
use wallet::store::EventStore;

const WALLETS: usize = 10;
const SEED: i64 = 1000;

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().expect("money is a string")).unwrap()
}

/// Served balance of `wallet` and the balance a fresh fold of its stream gives.
async fn served_and_folded(http: &Client, base: &str, store: &EventStore, wallet: &str) -> (Decimal, Decimal) {
    let view: Value = http
        .get(format!("{base}/wallet/{wallet}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = WalletId::parse(wallet).unwrap();
    let events = store.read_stream(&id, 0, None).await.unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    assert_eq!(
        versions,
        (1..=events.len() as u64).collect::<Vec<_>>(),
        "versions contiguous from 1"
    );
    let folded = Wallet::fold(id, events.iter().map(|e| &e.event));
    (dec(&view["balance"]), folded.balance.value())
}

/// A small deterministic generator, so a failure replays the same workload.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

async fn mixed_writes_conserve_money(db: TestDb) {
    let store = db.store.clone();
    let base = common::serve(db.store).await;
    let http = Client::new();
    for w in 0..WALLETS {
        let r = http
            .post(format!("{base}/wallet/w{w}/deposit"))
            .json(&json!({"amount": SEED}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let mut rng = Lcg(42);
    let requests: Vec<(String, Value)> = (0..200)
        .map(|_| {
            let w = rng.next(WALLETS as u64);
            let amount = format!("{}.{:02}", rng.next(300), rng.next(100));
            match rng.next(10) {
                0..=3 => (format!("/wallet/w{w}/deposit"), json!({"amount": amount})),
                4..=6 => (format!("/wallet/w{w}/withdraw"), json!({"amount": amount})),
                _ => {
                    let to = (w + 1 + rng.next(WALLETS as u64 - 1)) % WALLETS as u64;
                    (
                        format!("/wallet/w{w}/transfer"),
                        json!({"toWalletId": format!("w{to}"), "amount": amount}),
                    )
                }
            }
        })
        .collect();
    let answers = join_all(requests.iter().map(|(path, body)| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http.post(url).json(body).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    }))
    .await;

    let mut expected_total = Decimal::from(SEED * WALLETS as i64);
    for ((path, body), (status, answer)) in requests.iter().zip(&answers) {
        assert!(*status < 500, "{path} {body} answered {status}: {answer}");
        assert!(
            matches!(status, 201 | 400 | 409),
            "{path} {body} answered {status}: {answer}"
        );
        if *status == 201 {
            let amount = Decimal::from_str(body["amount"].as_str().unwrap()).unwrap();
            if path.ends_with("/deposit") {
                expected_total += amount;
            } else if path.ends_with("/withdraw") {
                expected_total -= amount;
            }
        } else {
            assert_ne!(
                answer["code"], "CONCURRENCY_CONFLICT",
                "one process never gives up on its own wallets"
            );
        }
    }
    let mut total = Decimal::ZERO;
    for w in 0..WALLETS {
        let (served, folded) = served_and_folded(&http, &base, &store, &format!("w{w}")).await;
        assert!(served >= Decimal::ZERO, "w{w} went negative: {served}");
        assert_eq!(served, folded, "w{w}: served balance equals a fresh fold");
        total += served;
    }
    assert_eq!(
        total, expected_total,
        "sum of balances = seeds + deposits - withdrawals"
    );
    assert!(
        answers.iter().filter(|(s, _)| *s == 201).count() > 100,
        "most requests succeed"
    );
}

async fn concurrent_first_deposits_open_the_wallet_once(db: TestDb) {
    let store = db.store.clone();
    let base = common::serve(db.store).await;
    let http = Client::new();
    let answers = join_all((0..20).map(|_| {
        let http = http.clone();
        let url = format!("{base}/wallet/fresh/deposit");
        async move {
            let r = http.post(url).json(&json!({"amount": "2.5"})).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    }))
    .await;
    assert!(answers.iter().all(|(s, _)| *s == 201), "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(_, b)| b["created"] == true).count(),
        1,
        "exactly one opened it"
    );
    let balances: HashSet<String> = answers
        .iter()
        .map(|(_, b)| b["balance"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(balances.len(), 20, "each deposit saw its own balance");
    let (served, folded) = served_and_folded(&http, &base, &store, "fresh").await;
    assert_eq!(served, Decimal::from(50));
    assert_eq!(folded, served);
    assert_eq!(
        store
            .read_stream(&WalletId::parse("fresh").unwrap(), 0, None)
            .await
            .unwrap()
            .len(),
        21
    );
}

async fn concurrent_duplicates_take_effect_once(db: TestDb) {
    let store = db.store.clone();
    let base = common::serve(db.store).await;
    let http = Client::new();
    http.post(format!("{base}/wallet/src/deposit"))
        .json(&json!({"amount": 100}))
        .send()
        .await
        .unwrap();
    let answers = join_all((0..20).map(|_| {
        let http = http.clone();
        let url = format!("{base}/wallet/src/transfer");
        async move {
            let r = http
                .post(url)
                .json(&json!({"toWalletId": "dst", "amount": 7, "requestId": "dup-1"}))
                .send()
                .await
                .unwrap();
            let replayed = r.headers().get("idempotent-replayed").is_some();
            (r.status().as_u16(), replayed, r.json::<Value>().await.unwrap())
        }
    }))
    .await;
    assert!(answers.iter().all(|(s, _, _)| *s == 201), "{answers:?}");
    assert_eq!(
        answers.iter().filter(|(_, replayed, _)| !replayed).count(),
        1,
        "exactly one took effect"
    );
    assert!(
        answers.iter().all(|(_, _, b)| *b == answers[0].2),
        "all got the original answer"
    );
    let (src, _) = served_and_folded(&http, &base, &store, "src").await;
    let (dst, _) = served_and_folded(&http, &base, &store, "dst").await;
    assert_eq!((src, dst), (Decimal::from(93), Decimal::from(7)));
}

/// Two processes (ledgers) on one log: one holds a wallet in its
/// committer's state, the other deposits into it. A withdrawal the stale
/// balance could not cover must still succeed: a rejection asserts the head
/// it was decided on, the log refuses the stale one, and the committer
/// decides again on the head the conflict answered with.
async fn a_rejection_is_never_decided_on_a_stale_cache(db: TestDb) {
    use wallet::aggregate::Amount;
    use wallet::ledger::Ledger;
    let (a, b) = (Ledger::new(db.store.clone()), Ledger::new(db.store.clone()));
    let w = WalletId::parse("shared").unwrap();
    b.deposit(w.clone(), Amount::parse("10").unwrap(), None).await.unwrap();
    a.deposit(w.clone(), Amount::parse("100").unwrap(), None).await.unwrap();
    let answer = b
        .withdraw(w.clone(), Amount::parse("50").unwrap(), Some("k-stale".to_owned()))
        .await
        .expect("110 covers 50: the cached 10 must not decide");
    assert_eq!(answer.receipt.balance.to_string(), "60.0000");
    // And a real rejection is still a rejection.
    let err = b.withdraw(w, Amount::parse("61").unwrap(), None).await.unwrap_err();
    assert!(matches!(err, wallet::ledger::CommandError::Rejected { .. }), "{err:?}");
}

/// Commands on one wallet are decided on each other's results within a
/// batch; a client retrying a key that is already recorded is decided too,
/// found a duplicate by the log, and whatever was decided after it in the
/// batch conflicts. Those commands must be decided again and land, not run
/// out of attempts: every deposit lands once and every retry replays the
/// recorded receipt.
async fn retries_of_a_recorded_key_do_not_fail_their_neighbours(db: TestDb) {
    use std::sync::Arc;
    use wallet::aggregate::Amount;
    use wallet::ledger::Ledger;
    let ledger = Arc::new(Ledger::new(db.store.clone()));
    let w = WalletId::parse("hot").unwrap();
    let first = ledger
        .deposit(w.clone(), Amount::parse("5").unwrap(), Some("recorded".to_owned()))
        .await
        .unwrap();
    let tasks = (0..200).map(|i| {
        let (ledger, w) = (ledger.clone(), w.clone());
        tokio::spawn(async move {
            if i % 2 == 0 {
                let again = ledger
                    .deposit(w, Amount::parse("5").unwrap(), Some("recorded".to_owned()))
                    .await
                    .expect("a retry replays");
                assert!(again.replayed);
                None
            } else {
                let fresh = ledger.deposit(w, Amount::parse("1").unwrap(), None).await;
                Some(fresh.expect("a neighbour of a retry still lands"))
            }
        })
    });
    let landed = join_all(tasks).await.into_iter().filter_map(|r| r.unwrap()).count();
    assert_eq!(landed, 100);
    let balance = ledger.wallet(&w, None).await.unwrap().balance;
    assert_eq!(balance.to_string(), "105.0000", "5 once, then 100 x 1");
    assert_eq!(first.receipt.balance.to_string(), "5.0000");
}

/// Three processes (ledgers) on one log race the same keyed transfer, round
/// after round, while unkeyed deposits move the same wallets from every
/// process: the recorded key wins over any head conflict, so each round
/// takes effect once and every racer gets the one receipt, never a 409.
async fn three_processes_racing_one_key_never_answer_conflict(db: TestDb) {
    use std::sync::Arc;
    use wallet::aggregate::Amount;
    use wallet::ledger::{CommandError, Ledger};
    let ledgers: Vec<Arc<Ledger>> = (0..3).map(|_| Arc::new(Ledger::new(db.store.clone()))).collect();
    let (from, to) = (WalletId::parse("race-a").unwrap(), WalletId::parse("race-b").unwrap());
    ledgers[0]
        .deposit(from.clone(), Amount::parse("1000").unwrap(), None)
        .await
        .unwrap();
    const ROUNDS: usize = 40;
    for round in 0..ROUNDS {
        let key = format!("race-{round}");
        let mut tasks = Vec::new();
        for ledger in &ledgers {
            let (ledger, from, to, key) = (ledger.clone(), from.clone(), to.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let amount = Amount::parse("1").unwrap();
                let noise = ledger.deposit(from.clone(), Amount::parse("2").unwrap(), None);
                let (raced, noise) = tokio::join!(ledger.transfer(from, to, amount, Some(key)), noise);
                noise.expect("an unkeyed deposit beside the race lands");
                raced
            }));
        }
        let answers: Vec<_> = join_all(tasks).await.into_iter().map(|r| r.unwrap()).collect();
        for a in &answers {
            assert!(
                !matches!(a, Err(CommandError::Conflict)),
                "round {round}: a racer of a recorded key got 409: {answers:?}"
            );
        }
        let receipts: Vec<_> = answers
            .into_iter()
            .map(|a| a.expect("every racer gets the receipt"))
            .collect();
        assert_eq!(
            receipts.iter().filter(|a| !a.replayed).count(),
            1,
            "round {round}: one took effect"
        );
        assert!(
            receipts.iter().all(|a| a.receipt == receipts[0].receipt),
            "round {round}: one receipt"
        );
    }
    let balance = |w: WalletId| {
        let ledger = ledgers[1].clone();
        async move { ledger.wallet(&w, None).await.unwrap().balance.value() }
    };
    let rounds = Decimal::from(ROUNDS as i64);
    assert_eq!(balance(to).await, rounds, "each round moved 1 once");
    assert_eq!(
        balance(from).await,
        Decimal::from(1000) + rounds * Decimal::from(6) - rounds
    );
}

on_both_backends!(
    three_processes_racing_one_key_never_answer_conflict,
    retries_of_a_recorded_key_do_not_fail_their_neighbours,
    a_rejection_is_never_decided_on_a_stale_cache,
    mixed_writes_conserve_money,
    concurrent_first_deposits_open_the_wallet_once,
    concurrent_duplicates_take_effect_once,
);
