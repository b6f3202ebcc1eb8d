//! Criterion benches: folds with and without a snapshot, decide, event
//! encode/decode (pure), and against PostgreSQL (when reachable at
//! TEST_DATABASE_URL): loading a 1,000-event wallet with and without a
//! snapshot, and appending 100 events in one transaction.
//!
//! `cargo bench --bench wallet` (add `-- --quick` for a short run).

use std::hint::black_box;
use std::time::{SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use sqlx::Connection;
use uuid::Uuid;
use wallet::aggregate::{decide, Amount, Command, Wallet, WalletEvent, WalletId, EVENT_SCHEMA_VERSION};
use wallet::snapshots;
use wallet::store::{AppendRequest, EventStore, NewEvent, SnapshotRecord, StreamAppend};

fn id(s: &str) -> WalletId {
    WalletId::parse(s).unwrap()
}

/// `n` events of one wallet: WalletCreated then deposits.
fn history(n: usize) -> Vec<WalletEvent> {
    let mut w = Wallet::empty(id("bench"));
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let cmd = Command::Deposit {
            wallet: w.id.clone(),
            amount: Amount::parse("1.25").unwrap(),
        };
        for e in decide(&cmd, &[&w]).unwrap().streams.remove(0).events {
            if out.len() < n {
                w = w.evolve(&e);
                out.push(e);
            }
        }
    }
    out
}

fn pure(c: &mut Criterion) {
    let mut g = c.benchmark_group("fold");
    for n in [10usize, 100, 1000] {
        let events = history(n);
        g.bench_with_input(BenchmarkId::new("full", n), &events, |b, events| {
            b.iter(|| Wallet::fold(id("bench"), black_box(events).iter()))
        });
        // What loading does with a snapshot taken every 100 events: decode
        // the newest snapshot, fold the tail after it.
        let snap_version = (n as u64 / 100) * 100;
        let at_snapshot = Wallet::fold(id("bench"), events[..snap_version as usize].iter());
        let record = SnapshotRecord {
            stream: id("bench"),
            version: snap_version,
            position: 0,
            schema_version: snapshots::SNAPSHOT_SCHEMA_VERSION,
            state: snapshots::encode(&at_snapshot),
        };
        let tail = &events[snap_version as usize..];
        g.bench_with_input(
            BenchmarkId::new("from_snapshot", n),
            &(record, tail),
            |b, (record, tail)| {
                b.iter(|| {
                    let base = snapshots::decode(&record.stream, black_box(record))
                        .unwrap_or_else(|| Wallet::empty(id("bench")));
                    tail.iter().fold(base, Wallet::evolve)
                })
            },
        );
    }
    g.finish();

    let w = Wallet::fold(id("a"), history(3).iter());
    let v = Wallet::fold(id("b"), history(3).iter());
    let amount = Amount::parse("1.5").unwrap();
    c.bench_function("decide/deposit", |b| {
        b.iter(|| {
            decide(
                &Command::Deposit {
                    wallet: id("a"),
                    amount,
                },
                black_box(&[&w]),
            )
        })
    });
    c.bench_function("decide/transfer", |b| {
        let cmd = Command::Transfer {
            from: id("a"),
            to: id("b"),
            amount,
            transfer_id: Uuid::nil(),
        };
        b.iter(|| decide(&cmd, black_box(&[&w, &v])))
    });
    let event = history(2).pop().unwrap();
    c.bench_function("event/encode", |b| b.iter(|| black_box(&event).payload().to_string()));
    let text = event.payload().to_string();
    c.bench_function("event/decode", |b| {
        b.iter(|| {
            let payload: serde_json::Value = serde_json::from_str(black_box(&text)).unwrap();
            WalletEvent::decode("FundsDeposited", EVENT_SCHEMA_VERSION, payload).unwrap()
        })
    });
}

/// A fresh PostgreSQL database, or `None` (with a note) if none is reachable.
async fn postgres() -> Option<EventStore> {
    let admin =
        std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await else {
        eprintln!("PostgreSQL not reachable at {admin}: skipping the database benches");
        return None;
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let name = format!("wallet_test_{now}_bench_{}", Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .ok()?;
    let url = format!("{}/{name}", admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b));
    wallet::config::open_store(&url).await.ok()
}

/// An append of `events` to a new stream.
fn appends(events: Vec<WalletEvent>, stream: &WalletId) -> AppendRequest {
    AppendRequest {
        streams: vec![StreamAppend {
            stream: stream.clone(),
            expected: wallet::store::Head::EMPTY,
            events: events
                .into_iter()
                .map(|event| NewEvent {
                    event_id: Uuid::now_v7(),
                    event,
                    metadata: serde_json::json!({}),
                })
                .collect(),
            on_batch: false,
        }],
        idempotency: Vec::new(),
    }
}

fn database(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(store) = rt.block_on(postgres()) else { return };
    // One wallet with 1,000 events, snapshotted at 1,000; another without snapshots.
    let events = history(1000);
    let (with, without) = (id("bench"), id("plain"));
    rt.block_on(async {
        for (w, snapshot) in [(&with, true), (&without, false)] {
            let evs: Vec<WalletEvent> = events.iter().map(|e| rename(e, w)).collect();
            let recorded = store.append(appends(evs.clone(), w)).await.unwrap();
            if snapshot {
                let state = Wallet::fold(w.clone(), evs.iter());
                snapshots::save(&store, &state, recorded.last().unwrap().position)
                    .await
                    .unwrap();
            }
        }
    });
    let mut g = c.benchmark_group("load_wallet_pg_1000_events");
    g.bench_function("with_snapshot", |b| {
        b.to_async(&rt)
            .iter(|| async { snapshots::load(&store, &with, None).await.unwrap() })
    });
    g.bench_function("without_snapshot", |b| {
        b.to_async(&rt)
            .iter(|| async { snapshots::load(&store, &without, None).await.unwrap() })
    });
    g.finish();

    c.bench_function("append_pg/100_events_one_transaction", |b| {
        b.to_async(&rt).iter(|| async {
            let w = id(&format!("a{}", Uuid::new_v4().simple()));
            let evs: Vec<WalletEvent> = history(100).iter().map(|e| rename(e, &w)).collect();
            store.append(appends(evs, &w)).await.unwrap()
        })
    });
}

/// The same event for another wallet.
fn rename(e: &WalletEvent, w: &WalletId) -> WalletEvent {
    let mut payload = e.payload();
    payload["walletId"] = serde_json::Value::String(w.to_string());
    WalletEvent::decode(e.event_type(), EVENT_SCHEMA_VERSION, payload).unwrap()
}

criterion_group!(benches, pure, database);
criterion_main!(benches);
