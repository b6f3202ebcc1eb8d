//! Projections on both backends: read models agree with the log, each event
//! takes effect exactly once across a crash, a rebuild equals the live model
//! row for row (also while writes and reads continue), and the read-model
//! routes answer with read-your-writes.

mod common;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::Duration;
use common::TestDb;
use reqwest::Client;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use wallet::aggregate::{Amount, WalletEvent, WalletId};
use wallet::ledger::Ledger;
use wallet::projections::{FraudRules, Projections};
use wallet::store::{EventStore, RecordedEvent};

fn id(s: &str) -> WalletId {
    WalletId::parse(s).unwrap()
}
fn amt(s: &str) -> Amount {
    Amount::parse(s).unwrap()
}

/// A mixed workload through the real command path (some calls are
/// rejected; that is part of the workload).
async fn workload(ledger: &Ledger, ops: usize, seed: u64) {
    let mut x = seed;
    let mut next = |n: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    for _ in 0..ops {
        let w = id(&format!("w{}", next(6)));
        let amount = amt(&format!("{}.{:02}", 1 + next(120), next(100)));
        match next(10) {
            0..=3 => drop(ledger.deposit(w, amount, None).await),
            4..=6 => drop(ledger.withdraw(w, amount, None).await),
            _ => {
                let to = id(&format!("w{}", next(6)));
                drop(ledger.transfer(w, to, amount, None).await);
            }
        }
    }
}

async fn whole_log(store: &EventStore) -> Vec<RecordedEvent> {
    store.read_all(0, 1_000_000).await.unwrap()
}

fn dec(v: &Value) -> Decimal {
    Decimal::from_str(v.as_str().unwrap()).unwrap()
}

/// Stats recomputed from the log by brute force, independently of the projection.
fn expected_stats(log: &[RecordedEvent], rules: &FraudRules) -> HashMap<String, Value> {
    let mut out: HashMap<String, Value> = HashMap::new();
    for (i, e) in log.iter().enumerate() {
        let w = e.stream.to_string();
        let s = out.entry(w.clone()).or_insert_with(|| {
            json!({"dep": Decimal::ZERO, "wd": Decimal::ZERO, "out": Decimal::ZERO, "in": Decimal::ZERO,
                   "nd": 0, "nw": 0, "no": 0, "ni": 0, "flagged": false})
        });
        let add = |s: &mut Value, k: &str, n: &str, a: Decimal| {
            s[k] = json!(serde_json::from_value::<Decimal>(s[k].clone()).unwrap() + a);
            s[n] = json!(s[n].as_u64().unwrap() + 1);
        };
        let outflow = match &e.event {
            WalletEvent::FundsDeposited(p) => {
                add(s, "dep", "nd", p.amount.value());
                None
            }
            WalletEvent::FundsWithdrawn(p) => {
                add(s, "wd", "nw", p.amount.value());
                Some(p.amount.value())
            }
            WalletEvent::TransferDebited(p) => {
                add(s, "out", "no", p.amount.value());
                Some(p.amount.value())
            }
            WalletEvent::TransferCredited(p) => {
                add(s, "in", "ni", p.amount.value());
                None
            }
            WalletEvent::HoldCaptured(p) => Some(p.amount.value()),
            _ => None,
        };
        if let Some(a) = outflow {
            let t = e.recorded_at;
            let recent = log[..=i]
                .iter()
                .filter(|o| o.stream == e.stream)
                .filter(|o| {
                    matches!(
                        o.event,
                        WalletEvent::FundsWithdrawn(_) | WalletEvent::TransferDebited(_) | WalletEvent::HoldCaptured(_)
                    )
                })
                .filter(|o| o.recorded_at >= t - rules.rapid_window && o.recorded_at <= t)
                .count();
            if recent as u32 >= rules.rapid_count || a >= rules.large_amount {
                s["flagged"] = json!(true);
            }
        }
        s["last"] = json!(e.recorded_at);
    }
    out
}

fn assert_stats_match(served: &Value, expected: &Value) {
    let w = &served["walletId"];
    assert_eq!(
        dec(&served["totalDeposited"]),
        serde_json::from_value::<Decimal>(expected["dep"].clone()).unwrap(),
        "{w}"
    );
    assert_eq!(
        dec(&served["totalWithdrawn"]),
        serde_json::from_value::<Decimal>(expected["wd"].clone()).unwrap(),
        "{w}"
    );
    assert_eq!(
        dec(&served["totalTransferredOut"]),
        serde_json::from_value::<Decimal>(expected["out"].clone()).unwrap(),
        "{w}"
    );
    assert_eq!(
        dec(&served["totalTransferredIn"]),
        serde_json::from_value::<Decimal>(expected["in"].clone()).unwrap(),
        "{w}"
    );
    assert_eq!(served["depositCount"], expected["nd"], "{w}");
    assert_eq!(served["withdrawalCount"], expected["nw"], "{w}");
    assert_eq!(served["transferOutCount"], expected["no"], "{w}");
    assert_eq!(served["transferInCount"], expected["ni"], "{w}");
    assert_eq!(served["suspicious"], expected["flagged"], "{w}");
    assert_eq!(
        served["lastActivityAt"]
            .as_str()
            .map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap()),
        expected["last"]
            .as_str()
            .map(|s| chrono::DateTime::parse_from_rfc3339(s).unwrap()),
        "{w}"
    );
}

async fn read_models_agree_with_the_log_under_concurrency(db: TestDb) {
    let store = db.store.clone();
    let base = common::serve(db.store).await;
    let http = Client::new();
    let answers = futures_util::future::join_all((0..120).map(|i| {
        let http = http.clone();
        let base = base.clone();
        async move {
            let w = i % 5;
            let (path, body) = match i % 4 {
                0 | 1 => (
                    format!("/wallet/p{w}/deposit"),
                    json!({"amount": format!("{}.25", 10 + i)}),
                ),
                2 => (format!("/wallet/p{w}/withdraw"), json!({"amount": "3"})),
                _ => (
                    format!("/wallet/p{w}/transfer"),
                    json!({"toWalletId": format!("p{}", (w + 1) % 5), "amount": "2.5"}),
                ),
            };
            let r = http.post(format!("{base}{path}")).json(&body).send().await.unwrap();
            assert!(r.status().as_u16() < 500);
            r.json::<Value>().await.unwrap()["position"].as_i64().unwrap_or(0)
        }
    }))
    .await;
    let head = store.head_position().await.unwrap();
    assert!(answers.iter().all(|p| *p <= head));
    let log = whole_log(&store).await;
    let rules = FraudRules::default();
    let expected = expected_stats(&log, &rules);
    assert!(
        expected.values().any(|s| s["flagged"] == true),
        "the workload trips the rapid rule"
    );

    for (wallet, exp) in &expected {
        let r = http
            .get(format!("{base}/wallet/{wallet}/stats?minPosition={head}"))
            .send()
            .await
            .unwrap();
        let at: i64 = r.headers()["x-projection-position"].to_str().unwrap().parse().unwrap();
        assert!(at >= head, "minPosition waited for the projection");
        assert_stats_match(&r.json().await.unwrap(), exp);

        let history: Value = http
            .get(format!("{base}/wallet/{wallet}/history?limit=200&minPosition={head}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let stream: Vec<&RecordedEvent> = log.iter().filter(|e| e.stream.as_str() == wallet).rev().collect();
        let items = history.as_array().unwrap();
        assert_eq!(items.len(), stream.len().min(200), "{wallet}: one item per event");
        for (item, e) in items.iter().zip(&stream) {
            assert_eq!(item["position"], e.position);
            assert_eq!(item["balanceAfter"], e.event.balance_after().to_string());
        }
    }
    // Flags: every outflow the brute force flags has a flag, and only those.
    let flags: Value = http
        .get(format!("{base}/flags?limit=200&minPosition={head}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for f in flags.as_array().unwrap() {
        assert!(expected[f["walletId"].as_str().unwrap()]["flagged"] == true, "{f}");
        assert!(f["eventIds"].as_array().unwrap().len() >= 3 || f["rule"] == "LARGE_OUTFLOW");
    }
    let flagged_wallets: std::collections::HashSet<&str> = flags
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["walletId"].as_str().unwrap())
        .collect();
    for (w, exp) in &expected {
        assert_eq!(exp["flagged"] == true, flagged_wallets.contains(w.as_str()), "{w}");
    }
}

async fn each_event_takes_effect_once_across_a_crash(db: TestDb) {
    let ledger = Ledger::new(db.store.clone());
    workload(&ledger, 60, 7).await;
    let projections = Projections::new(db.store.clone(), FraudRules::default()).with_batch_events(7);
    projections.ensure().await.unwrap();
    projections.step("stats").await.unwrap();
    let before = projections.checkpoint("stats").await.unwrap();
    // The next batch writes its documents, then "crashes" before its checkpoint.
    projections.fault.fail_next_batch();
    assert!(projections.step("stats").await.is_err());
    assert_eq!(
        projections.checkpoint("stats").await.unwrap(),
        before,
        "checkpoint did not move"
    );
    projections.catch_up().await.unwrap();

    let log = whole_log(&db.store).await;
    let expected = expected_stats(&log, &FraudRules::default());
    for (wallet, exp) in &expected {
        let body = projections.get("stats", &format!("s/{wallet}")).await.unwrap().unwrap();
        assert_stats_match(&serde_json::from_str(&body).unwrap(), exp);
    }
    assert_eq!(
        projections.checkpoint("stats").await.unwrap(),
        log.last().unwrap().position
    );
}

/// Holds placed, captured part-way into another wallet, and voided.
async fn hold_workload(ledger: &Ledger) {
    let w = WalletId::parse("holder").unwrap();
    ledger
        .deposit(w.clone(), Amount::parse("500").unwrap(), None)
        .await
        .unwrap();
    for i in 0..6 {
        let hold = wallet::ledger::HoldRequest {
            wallet: w.clone(),
            amount: Amount::parse("20").unwrap(),
            expires_in: std::time::Duration::from_secs(3600),
            expires_at: chrono::Utc::now() + Duration::hours(1),
            to: (i % 2 == 0).then(|| WalletId::parse("payee").unwrap()),
        };
        let placed = ledger.place_hold(hold, None).await.unwrap().receipt;
        match i % 3 {
            0 => drop(
                ledger
                    .capture_hold(w.clone(), placed.hold_id, Some(Amount::parse("5").unwrap()), None)
                    .await
                    .unwrap(),
            ),
            1 => drop(ledger.void_hold(w.clone(), placed.hold_id, None).await.unwrap()),
            _ => {}
        }
    }
}

async fn a_rebuild_equals_the_live_model_row_for_row(db: TestDb) {
    let ledger = Ledger::new(db.store.clone());
    workload(&ledger, 80, 11).await;
    hold_workload(&ledger).await;
    // Tight rules so flags exist.
    let rules = FraudRules {
        rapid_count: 2,
        rapid_window: Duration::seconds(60),
        large_amount: Decimal::from(100),
    };
    let projections = Projections::new(db.store.clone(), rules).with_batch_events(9);
    projections.ensure().await.unwrap();
    projections.catch_up().await.unwrap();
    for name in projections.names() {
        let live = projections.dump(name).await.unwrap();
        assert!(!live.is_empty(), "{name} has rows");
        let done = projections.rebuild(name, false, |_| {}).await.unwrap();
        assert_eq!(done.position, db.store.head_position().await.unwrap());
        assert_eq!(
            projections.dump(name).await.unwrap(),
            live,
            "{name}: rebuilt = live, row for row"
        );
        assert_eq!(projections.checkpoint(name).await.unwrap(), done.position);
    }
    let status = projections.status().await.unwrap();
    assert!(
        status.iter().all(|s| s.lag == 0 && s.rebuild_checkpoint.is_none()),
        "{status:?}"
    );
}

async fn an_interrupted_rebuild_resumes(db: TestDb) {
    let ledger = Ledger::new(db.store.clone());
    workload(&ledger, 50, 3).await;
    let projections = Projections::new(db.store.clone(), FraudRules::default()).with_batch_events(5);
    projections.ensure().await.unwrap();
    projections.catch_up().await.unwrap();
    let live = projections.dump("history").await.unwrap();

    let mut batches = 0;
    let result = projections
        .rebuild("history", false, |_| {
            batches += 1;
            if batches == 3 {
                projections.fault.fail_next_batch();
            }
        })
        .await;
    assert!(result.is_err(), "the injected fault interrupted the rebuild");
    let status = projections.status().await.unwrap();
    let history = status.iter().find(|s| s.name == "history").unwrap();
    let resumed_from = history
        .rebuild_checkpoint
        .expect("an unfinished rebuild is visible in status");
    assert!(resumed_from > 0);
    assert_eq!(
        projections.dump("history").await.unwrap(),
        live,
        "the live model was untouched"
    );

    let mut first = None;
    projections
        .rebuild("history", false, |p| {
            first.get_or_insert(p.position);
        })
        .await
        .unwrap();
    assert!(first.unwrap() > resumed_from, "resumed instead of starting over");
    assert_eq!(projections.dump("history").await.unwrap(), live);
    // --restart works too.
    projections.rebuild("history", true, |_| {}).await.unwrap();
    assert_eq!(projections.dump("history").await.unwrap(), live);
}

async fn rebuild_while_writes_and_reads_continue(db: TestDb) {
    let store = db.store.clone();
    let base = common::serve(db.store).await;
    let ledger = Ledger::new(store.clone());
    workload(&ledger, 40, 5).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, base) = (stop.clone(), base.clone());
        tokio::spawn(async move {
            let http = Client::new();
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) && n < 2000 {
                let r = http
                    .post(format!("{base}/wallet/w{}/deposit", n % 6))
                    .json(&json!({"amount": 1}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                n += 1;
            }
        })
    };
    let reader = {
        let (stop, base) = (stop.clone(), base.clone());
        tokio::spawn(async move {
            let http = Client::new();
            let mut reads = 0;
            while !stop.load(Ordering::SeqCst) && reads < 20_000 {
                for path in ["/wallet/w1/stats", "/wallet/w2/history?limit=5", "/flags?limit=5"] {
                    let r = http.get(format!("{base}{path}")).send().await.unwrap();
                    assert_eq!(r.status().as_u16(), 200, "{path} failed during a rebuild");
                    reads += 1;
                }
            }
            reads
        })
    };
    // The CLI's view: another Projections over the same database.
    let cli = Projections::new(store.clone(), FraudRules::default()).with_batch_events(25);
    for name in cli.names() {
        cli.rebuild(name, false, |_| {}).await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    assert!(reader.await.unwrap() > 0);

    // Once the live runner has caught up, the model equals a fresh rebuild.
    let head = store.head_position().await.unwrap();
    for name in cli.names() {
        let http = Client::new();
        let path = match name {
            "history" => "/wallet/w1/history",
            "stats" => "/wallet/w1/stats",
            _ => "/flags",
        };
        let r = http
            .get(format!("{base}{path}?minPosition={head}"))
            .send()
            .await
            .unwrap();
        assert!(
            r.headers()["x-projection-position"]
                .to_str()
                .unwrap()
                .parse::<i64>()
                .unwrap()
                >= head
        );
        let live = cli.dump(name).await.unwrap();
        cli.rebuild(name, false, |_| {}).await.unwrap();
        assert_eq!(cli.dump(name).await.unwrap(), live, "{name}");
    }
}

async fn flag_routes(db: TestDb) {
    let base = common::serve(db.store).await;
    let http = Client::new();
    let post = |path: String, body: Value| {
        let http = http.clone();
        async move {
            http.post(path)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    post(format!("{base}/wallet/f/deposit"), json!({"amount": 50000})).await;
    post(format!("{base}/wallet/f/withdraw"), json!({"amount": 1})).await;
    post(format!("{base}/wallet/f/withdraw"), json!({"amount": 2})).await;
    let third = post(
        format!("{base}/wallet/f/transfer"),
        json!({"toWalletId": "g", "amount": 10000}),
    )
    .await;
    let p = third["position"].as_i64().unwrap();

    let flags: Value = http
        .get(format!("{base}/wallet/f/flags?minPosition={p}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let flags = flags.as_array().unwrap();
    let rules: Vec<&str> = flags.iter().map(|f| f["rule"].as_str().unwrap()).collect();
    assert_eq!(rules.len(), 2, "{flags:?}");
    assert!(rules.contains(&"RAPID_OUTFLOWS") && rules.contains(&"LARGE_OUTFLOW"));
    let rapid = flags.iter().find(|f| f["rule"] == "RAPID_OUTFLOWS").unwrap();
    assert_eq!(rapid["eventIds"].as_array().unwrap().len(), 3);
    // The transfer's debit (before the credit that opened g) triggered it.
    assert_eq!(rapid["position"].as_i64().unwrap(), p - 2);
    assert!(rapid["flaggedAt"].is_string() && rapid["reason"].is_string());

    let large: Value = http
        .get(format!("{base}/flags?rule=LARGE_OUTFLOW&minPosition={p}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(large.as_array().unwrap().len(), 1);
    let none: Value = http
        .get(format!("{base}/flags?walletId=g&minPosition={p}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none, json!([]));

    let stats: Value = http
        .get(format!("{base}/wallet/f/stats?minPosition={p}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["suspicious"], true);
    assert!(
        stats["suspiciousReason"].as_str().unwrap().starts_with("LARGE_OUTFLOW")
            || stats["suspiciousReason"].as_str().unwrap().starts_with("RAPID")
    );
    assert_eq!(stats["withdrawalCount"], 2);
    assert_eq!(stats["transferOutCount"], 1);
    assert_eq!(stats["totalDeposited"], "50000.0000");
    let fresh: Value = http
        .get(format!("{base}/wallet/nobody/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fresh["suspicious"], false);
    assert_eq!(fresh["totalDeposited"], "0.0000");

    for bad in [
        "/flags?rule=NOPE",
        "/flags?walletId=a%20b",
        "/flags?limit=0",
        "/flags?before=x",
        "/wallet/f/stats?minPosition=-2",
    ] {
        let r = http.get(format!("{base}{bad}")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 400, "{bad}");
    }
}

on_both_backends!(
    read_models_agree_with_the_log_under_concurrency,
    each_event_takes_effect_once_across_a_crash,
    a_rebuild_equals_the_live_model_row_for_row,
    an_interrupted_rebuild_resumes,
    rebuild_while_writes_and_reads_continue,
    flag_routes,
);
