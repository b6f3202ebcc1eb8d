//! Snapshots, time travel and `verify`, on both backends: snapshots change
//! speed, never results; replay at every position equals what the wallet
//! was then; verify passes on a clean log and catches each planted fault.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::TestDb;
use rust_decimal::Decimal;
use wallet::aggregate::{Amount, Balance, Wallet, WalletId};
use wallet::ledger::Ledger;
use wallet::projections::{FraudRules, Projections};
use wallet::snapshots;
use wallet::store::{Cutoff, EventStore, Position, SnapshotRecord};

fn id(s: &str) -> WalletId {
    WalletId::parse(s).unwrap()
}

/// Random mixed commands; returns, for each accepted one, the log position
/// it reached and every touched wallet's balance right after it.
async fn history(ledger: &Ledger, ops: usize, seed: u64) -> Vec<(Position, Vec<(WalletId, Balance)>)> {
    let mut x = seed;
    let mut next = |n: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let mut out = Vec::new();
    for _ in 0..ops {
        let w = id(&format!("r{}", next(4)));
        let amount = Amount::parse(&format!("{}.{:04}", 1 + next(50), next(10_000))).unwrap();
        match next(3) {
            0 => {
                if let Ok(a) = ledger.deposit(w, amount, None).await {
                    out.push((a.receipt.position, vec![(a.receipt.wallet_id, a.receipt.balance)]));
                }
            }
            1 => {
                if let Ok(a) = ledger.withdraw(w, amount, None).await {
                    out.push((a.receipt.position, vec![(a.receipt.wallet_id, a.receipt.balance)]));
                }
            }
            _ => {
                let to = id(&format!("r{}", next(4)));
                if let Ok(a) = ledger.transfer(w, to, amount, None).await {
                    let r = a.receipt;
                    out.push((
                        r.position,
                        vec![(r.from_wallet_id, r.from_balance), (r.to_wallet_id, r.to_balance)],
                    ));
                }
            }
        }
    }
    out
}

async fn full_fold(store: &EventStore, w: &WalletId, cutoff: Option<Cutoff>) -> Wallet {
    let events = store.read_stream(w, 0, cutoff).await.unwrap();
    Wallet::fold(w.clone(), events.iter().map(|e| &e.event))
}

/// Waits for the background snapshot writes of the ledger.
async fn snapshots_settle(store: &EventStore, expected_at_least: usize) {
    for _ in 0..200 {
        if store.all_snapshots().await.unwrap().len() >= expected_at_least {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("snapshots were not written");
}

async fn snapshot_plus_tail_equals_the_full_fold(db: TestDb) {
    let ledger = Ledger::new(db.store.clone()).with_snapshot_every(3);
    history(&ledger, 60, 1).await;
    snapshots_settle(&db.store, 4).await;
    for w in ["r0", "r1", "r2", "r3"] {
        let w = id(w);
        assert_eq!(
            ledger.wallet(&w, None).await.unwrap(),
            full_fold(&db.store, &w, None).await,
            "{w}"
        );
    }
    // A snapshot of an older state schema, and garbage in the current one,
    // placed as the newest: both are ignored and loading still works.
    let w = id("r0");
    let truth = full_fold(&db.store, &w, None).await;
    for (schema_version, state) in [(0, vec![1, 2, 3]), (snapshots::SNAPSHOT_SCHEMA_VERSION, vec![0xff; 5])] {
        db.store
            .save_snapshot(&SnapshotRecord {
                stream: w.clone(),
                version: truth.version,
                position: 1,
                schema_version,
                state,
            })
            .await
            .unwrap();
        assert_eq!(ledger.wallet(&w, None).await.unwrap(), truth);
    }
}

async fn replay_at_every_position_equals_the_past(db: TestDb) {
    let ledger = Ledger::new(db.store.clone()).with_snapshot_every(4);
    let steps = history(&ledger, 50, 2).await;
    assert!(steps.len() > 20);
    snapshots_settle(&db.store, 2).await;
    let mut known: HashMap<WalletId, Balance> = HashMap::new();
    for (position, touched) in &steps {
        for (w, b) in touched {
            known.insert(w.clone(), *b);
        }
        for (w, expected) in &known {
            let r = wallet::replay::wallet(&db.store, w, Cutoff::Position(*position), false)
                .await
                .unwrap();
            assert_eq!(r.balance, *expected, "{w} at {position}");
            let with_trail = wallet::replay::wallet(&db.store, w, Cutoff::Position(*position), true)
                .await
                .unwrap();
            assert_eq!(with_trail.balance, *expected);
            let trail = with_trail.trail.unwrap();
            assert_eq!(trail.last().map(|t| t.balance_after), Some(*expected));
            assert!(trail.iter().all(|t| t.position <= *position));
        }
        let all = wallet::replay::all(&db.store, Cutoff::Position(*position), |_| {})
            .await
            .unwrap();
        assert_eq!(all.wallets.len(), known.len());
        assert_eq!(all.total, known.values().map(|b| b.value()).sum::<Decimal>());
    }
    // By version, and by time (now = everything).
    let w = id("r1");
    let full = full_fold(&db.store, &w, None).await;
    let v = wallet::replay::wallet(&db.store, &w, Cutoff::Version(2), false)
        .await
        .unwrap();
    assert_eq!(
        (v.version, v.balance),
        (2, full_fold(&db.store, &w, Some(Cutoff::Version(2))).await.balance)
    );
    let now = wallet::replay::wallet(&db.store, &w, Cutoff::Time(chrono::Utc::now()), false)
        .await
        .unwrap();
    assert_eq!(now.balance, full.balance);
}

async fn setup_for_verify(db: &TestDb) -> (Ledger, Projections) {
    let ledger = Ledger::new(db.store.clone()).with_snapshot_every(2);
    history(&ledger, 40, 3).await;
    snapshots_settle(&db.store, 3).await;
    let projections = Projections::new(db.store.clone(), FraudRules::default());
    projections.ensure().await.unwrap();
    projections.catch_up().await.unwrap();
    (ledger, projections)
}

async fn problems(db: &TestDb, projections: &Projections) -> Vec<String> {
    let report = wallet::verify::verify(&db.store, projections, |_, _| {}).await.unwrap();
    report
        .discrepancies
        .into_iter()
        .map(|d| format!("{:?} {:?} {}", d.stream, d.position, d.problem))
        .collect()
}

/// Runs raw SQL against the test database, bypassing the append-only triggers.
async fn tamper(db: &TestDb, statements: &[&str]) {
    if db.url.starts_with("postgres") {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("SET LOCAL session_replication_role = replica")
            .execute(&mut *tx)
            .await
            .unwrap();
        for s in statements {
            sqlx::query(s).execute(&mut *tx).await.unwrap();
        }
        tx.commit().await.unwrap();
    } else {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        sqlx::query("DROP TRIGGER IF EXISTS events_no_update")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("DROP TRIGGER IF EXISTS events_no_delete")
            .execute(&pool)
            .await
            .unwrap();
        for s in statements {
            sqlx::query(s).execute(&pool).await.unwrap();
        }
    }
}

async fn verify_passes_on_a_clean_log(db: TestDb) {
    let (_, projections) = setup_for_verify(&db).await;
    assert_eq!(problems(&db, &projections).await, Vec::<String>::new());
}

async fn verify_catches_an_edited_amount(db: TestDb) {
    let (_, projections) = setup_for_verify(&db).await;
    let (amount_field, cast) = if db.url.starts_with("postgres") {
        ("jsonb_set(payload, '{amount}', '\"999.0000\"')", "")
    } else {
        ("json_set(payload, '$.amount', '999.0000')", "")
    };
    let sql = format!(
        "UPDATE events SET payload = {amount_field}{cast} WHERE position = \
         (SELECT MIN(position) FROM events WHERE event_type = 'FundsDeposited')"
    );
    tamper(&db, &[&sql]).await;
    let found = problems(&db, &projections).await;
    assert!(found.iter().any(|p| p.contains("hash chain broken")), "{found:#?}");
    assert!(found.iter().any(|p| p.contains("newBalance")), "{found:#?}");
}

async fn verify_catches_a_deleted_event(db: TestDb) {
    let (_, projections) = setup_for_verify(&db).await;
    tamper(
        &db,
        &["DELETE FROM events WHERE position = (SELECT MIN(position) FROM events WHERE event_type = 'TransferDebited')"],
    )
    .await;
    let found = problems(&db, &projections).await;
    assert!(found.iter().any(|p| p.contains("debit is missing")), "{found:#?}");
    assert!(found.iter().any(|p| p.contains("read model history")), "{found:#?}");
}

async fn verify_catches_a_forged_snapshot(db: TestDb) {
    let (_, projections) = setup_for_verify(&db).await;
    let real = db.store.all_snapshots().await.unwrap().remove(0);
    let mut wallet = snapshots::decode(&real.stream, &real).unwrap();
    wallet.balance = wallet.balance.checked_add(Amount::parse("1000000").unwrap()).unwrap();
    db.store
        .save_snapshot(&SnapshotRecord {
            state: snapshots::encode(&wallet),
            ..real.clone()
        })
        .await
        .unwrap();
    let found = problems(&db, &projections).await;
    assert!(found.iter().any(|p| p.contains("snapshot at version")), "{found:#?}");
}

async fn verify_catches_a_corrupted_read_model_row(db: TestDb) {
    let (_, projections) = setup_for_verify(&db).await;
    tamper(
        &db,
        &["UPDATE rm_stats SET body = replace(body, '\"depositCount\":', '\"depositCount\":1') WHERE kind = 'stats'"],
    )
    .await;
    let found = problems(&db, &projections).await;
    assert!(found.iter().any(|p| p.contains("read model stats")), "{found:#?}");
    // The live model is untouched by verify, and no scratch table is left.
    assert!(!found.iter().any(|p| p.contains("read model history")));
}

on_both_backends!(
    snapshot_plus_tail_equals_the_full_fold,
    replay_at_every_position_equals_the_past,
    verify_passes_on_a_clean_log,
    verify_catches_an_edited_amount,
    verify_catches_a_deleted_event,
    verify_catches_a_forged_snapshot,
    verify_catches_a_corrupted_read_model_row,
);
