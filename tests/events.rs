//! The log for consumers: `GET /events`, `GET /wallet/{id}/events` and the
//! SSE subscription `GET /events/stream`, against a real server on both
//! backends. What a consumer depends on: every committed event exactly
//! once, in position order, with no gap at the catch-up/live switch, a late
//! commit delivered in its place, and a resume that loses nothing.

mod common;

use std::time::Duration;

use common::sse::{Item, Sse};
use common::TestDb;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use wallet::aggregate::{decide, Amount, Command, Wallet, WalletId};
use wallet::store::{AppendRequest, EventStore, Head, NewEvent, StreamAppend};

fn id(s: &str) -> WalletId {
    WalletId::parse(s).unwrap()
}

async fn post(http: &Client, url: String, body: Value) -> StatusCode {
    http.post(url).json(&body).send().await.unwrap().status()
}

async fn log_positions(store: &EventStore) -> Vec<i64> {
    let mut all = Vec::new();
    loop {
        let batch = store.read_all(all.last().copied().unwrap_or(0), 1000).await.unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch.iter().map(|e| e.position));
    }
}

/// Opens the five wallets `spawn_writers` uses, 100 each.
async fn open_wallets(http: &Client, base: &str) {
    for w in 0..5 {
        let status = post(http, format!("{base}/wallet/w{w}/deposit"), json!({"amount": "100"})).await;
        assert_eq!(status, StatusCode::CREATED);
    }
}

/// Concurrent writers (deposits and transfers over five wallets).
fn spawn_writers(http: &Client, base: &str, tasks: usize, ops: usize) -> Vec<tokio::task::JoinHandle<()>> {
    (0..tasks)
        .map(|t| {
            let (http, base) = (http.clone(), base.to_owned());
            tokio::spawn(async move {
                for i in 0..ops {
                    let (from, to) = (format!("w{}", (t + i) % 5), format!("w{}", (t + i + 1) % 5));
                    let status = if i % 3 == 0 {
                        let body = json!({"toWalletId": to, "amount": "1"});
                        post(&http, format!("{base}/wallet/{from}/transfer"), body).await
                    } else {
                        post(&http, format!("{base}/wallet/{from}/deposit"), json!({"amount": "2"})).await
                    };
                    assert_eq!(status, StatusCode::CREATED);
                }
            })
        })
        .collect()
}

/// A consumer starting at position 0 while writers run receives every
/// event of the log exactly once, in order: no gap at the switch from
/// catch-up to live.
async fn a_follower_from_zero_gets_every_event_once_in_order(db: TestDb) {
    let base = common::serve(db.store.clone()).await;
    let http = Client::new();
    open_wallets(&http, &base).await;
    let writers = spawn_writers(&http, &base, 4, 40);
    let mut sse = Sse::open(&http, &format!("{base}/events/stream?after=0"), None).await;
    for w in writers {
        w.await.unwrap();
    }
    let log = log_positions(&db.store).await;
    let got = sse.until(*log.last().unwrap(), Duration::from_secs(20)).await;
    let ids: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, log, "every event once, in position order");
    for (id, data) in &got {
        assert_eq!(data["position"], *id, "id is the position");
        for field in [
            "id",
            "type",
            "walletId",
            "version",
            "occurredAt",
            "payload",
            "schemaVersion",
            "metadata",
        ] {
            assert!(!data[field].is_null(), "{field} in {data}");
        }
    }
    // And it stays live: a later write arrives too.
    assert_eq!(
        post(&http, format!("{base}/wallet/w0/deposit"), json!({"amount": "3"})).await,
        StatusCode::CREATED
    );
    match sse.next(Duration::from_secs(10)).await {
        Some(Item::Event { id, data }) => {
            assert!(id > *log.last().unwrap());
            assert_eq!(data["type"], "FundsDeposited");
        }
        other => panic!("the live write did not arrive: {other:?}"),
    }
}

/// The append a deposit into a new wallet makes.
fn opening_deposit(wallet: &str) -> AppendRequest {
    let state = Wallet::empty(id(wallet));
    let command = Command::Deposit {
        wallet: id(wallet),
        amount: Amount::parse("1").unwrap(),
    };
    let decided = decide(&command, &[&state]).unwrap().streams.remove(0);
    AppendRequest {
        streams: vec![StreamAppend {
            stream: decided.wallet,
            expected: Head::EMPTY,
            events: decided
                .events
                .into_iter()
                .map(|event| NewEvent {
                    event_id: uuid::Uuid::now_v7(),
                    event,
                    metadata: json!({}),
                })
                .collect(),
            on_batch: false,
        }],
        idempotency: Vec::new(),
    }
}

/// One append's transaction is held open while later ones wait behind it:
/// the live subscriber sees nothing past it meanwhile, then everything in
/// position order once it commits.
async fn a_late_commit_is_delivered_in_its_place(db: TestDb) {
    let base = common::serve(db.store.clone()).await;
    let http = Client::new();
    assert_eq!(
        post(&http, format!("{base}/wallet/first/deposit"), json!({"amount": "1"})).await,
        StatusCode::CREATED
    );
    let mut sse = Sse::open(&http, &format!("{base}/events/stream"), None).await;
    let before = sse
        .until(*log_positions(&db.store).await.last().unwrap(), Duration::from_secs(10))
        .await;

    let held = db.store.begin_append(opening_deposit("held")).await.unwrap();
    let later: Vec<_> = (0..4)
        .map(|i| {
            let store = db.store.clone();
            tokio::spawn(async move { store.append(opening_deposit(&format!("later{i}"))).await.unwrap() })
        })
        .collect();
    assert!(
        sse.next(Duration::from_millis(600)).await.is_none(),
        "nothing is delivered past an open append"
    );
    let held = held.commit().await.unwrap();
    for l in later {
        l.await.unwrap();
    }
    let log = log_positions(&db.store).await;
    let after = sse.until(*log.last().unwrap(), Duration::from_secs(10)).await;
    assert_eq!(after[0].0, held[0].position, "the held append's events come first");
    let ids: Vec<i64> = before.iter().chain(&after).map(|(id, _)| *id).collect();
    assert_eq!(ids, log, "every event once, in order");
}

/// A consumer that disconnects mid-stream and resumes with `Last-Event-ID`
/// misses nothing and gets nothing twice.
async fn resuming_with_last_event_id_loses_nothing(db: TestDb) {
    let base = common::serve(db.store.clone()).await;
    let http = Client::new();
    open_wallets(&http, &base).await;
    for w in spawn_writers(&http, &base, 2, 20) {
        w.await.unwrap();
    }
    let log = log_positions(&db.store).await;
    let cut = log[log.len() / 2];
    let mut first = Sse::open(&http, &format!("{base}/events/stream?after=0"), None).await;
    let part = first.until(cut, Duration::from_secs(10)).await;
    drop(first);
    let writers = spawn_writers(&http, &base, 2, 10);
    // `after` says 0, but Last-Event-ID (what a reconnecting EventSource sends) wins.
    let mut again = Sse::open(&http, &format!("{base}/events/stream?after=0"), Some(cut)).await;
    for w in writers {
        w.await.unwrap();
    }
    let log = log_positions(&db.store).await;
    let rest = again.until(*log.last().unwrap(), Duration::from_secs(10)).await;
    let ids: Vec<i64> = part.iter().chain(&rest).map(|(id, _)| *id).collect();
    assert_eq!(ids, log, "no loss, no duplicate across the reconnect");
}

/// Pages of the log, one wallet's stream, filters, and clean 400s.
async fn pages_filters_and_bad_input(db: TestDb) {
    let base = common::serve(db.store.clone()).await;
    let http = Client::new();
    post(&http, format!("{base}/wallet/a/deposit"), json!({"amount": "10"})).await;
    post(&http, format!("{base}/wallet/b/deposit"), json!({"amount": "10"})).await;
    let status = post(
        &http,
        format!("{base}/wallet/a/transfer"),
        json!({"toWalletId": "b", "amount": "4"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let log = log_positions(&db.store).await;
    assert_eq!(log.len(), 6);

    let get = |url: String| {
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.unwrap();
            let (status, headers) = (r.status(), r.headers().clone());
            (status, headers, r.json::<Value>().await.unwrap())
        }
    };
    let (status, headers, page) = get(format!("{base}/events?after=0&limit=4")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-log-head"], log[5].to_string().as_str());
    assert_eq!(headers["x-next-after"], log[3].to_string().as_str());
    let positions: Vec<i64> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, log[..4]);
    let (_, _, rest) = get(format!("{base}/events?after={}", log[3])).await;
    assert_eq!(rest.as_array().unwrap().len(), 2, "the next page from the cursor");

    let (_, _, only) = get(format!(
        "{base}/events?walletId=b&type=TransferCredited&type=FundsDeposited"
    ))
    .await;
    let kinds: Vec<&str> = only
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["FundsDeposited", "TransferCredited"]);

    let (status, _, stream) = get(format!("{base}/wallet/a/events?fromVersion=2&limit=10")).await;
    assert_eq!(status, StatusCode::OK);
    let versions: Vec<i64> = stream
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["version"].as_i64().unwrap())
        .collect();
    assert_eq!(versions, [2, 3], "ascending from fromVersion");

    for (url, code) in [
        ("/events?after=-1", "INVALID_CURSOR"),
        ("/events?limit=0", "INVALID_LIMIT"),
        ("/events?limit=1001", "INVALID_LIMIT"),
        ("/events?type=Nope", "INVALID_EVENT_TYPE"),
        ("/events?walletId=bad%20id", "INVALID_WALLET_ID"),
        ("/events/stream?after=x", "INVALID_CURSOR"),
        ("/wallet/a/events?fromVersion=0", "INVALID_CURSOR"),
    ] {
        let (status, _, body) = get(format!("{base}{url}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(body["code"], code, "{url}: {body}");
    }
}

/// A write's `traceparent` stays with its events for every consumer.
async fn a_writes_trace_context_is_kept_in_its_events(db: TestDb) {
    let base = common::serve(db.store.clone()).await;
    let http = Client::new();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = http
        .post(format!("{base}/wallet/traced/deposit"))
        .header("traceparent", traceparent)
        .json(&json!({"amount": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    http.post(format!("{base}/wallet/untraced/deposit"))
        .header("traceparent", "not-a-trace-context")
        .json(&json!({"amount": "1"}))
        .send()
        .await
        .unwrap();
    let page: Value = http
        .get(format!("{base}/events"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for e in page.as_array().unwrap() {
        let expected = if e["walletId"] == "traced" {
            json!(traceparent)
        } else {
            Value::Null
        };
        assert_eq!(e["metadata"]["traceparent"], expected, "{e}");
    }
}

on_both_backends!(
    a_follower_from_zero_gets_every_event_once_in_order,
    a_late_commit_is_delivered_in_its_place,
    resuming_with_last_event_id_loses_nothing,
    pages_filters_and_bad_input,
    a_writes_trace_context_is_kept_in_its_events,
);

/// A subscriber that stops reading while the log runs far ahead is cut off
/// with a `resume` event naming the position to reconnect after; what it
/// got before is gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_consumer_is_cut_off_with_where_to_resume() {
    let db = common::postgres().await;
    let base = common::serve(db.store.clone()).await;
    let http = Client::new();
    let mut sse = Sse::open(&http, &format!("{base}/events/stream"), None).await;
    // Far more than the tail keeps for laggards, while this one reads nothing.
    wallet::seed::seed(&db.store, 100, 60_000, |_| {}).await.unwrap();
    let mut got = Vec::new();
    let resume = loop {
        match sse.next(Duration::from_secs(20)).await {
            Some(Item::Event { id, .. }) => got.push(id),
            Some(Item::Resume(data)) => break data,
            None => panic!("the stream ended without a resume event after {} events", got.len()),
        }
    };
    assert!(got.windows(2).all(|w| w[1] > w[0]), "in order");
    let log = log_positions(&db.store).await;
    assert_eq!(got, log[..got.len()], "no gap before the cut");
    assert_eq!(resume["after"].as_i64(), got.last().copied().or(Some(0)), "{resume}");
    assert!(got.len() < log.len(), "it was cut before the end");
    assert!(
        sse.next(Duration::from_secs(2)).await.is_none(),
        "the server closed the stream"
    );
}

/// `wallet tail` prints the log (JSON lines: the public shape) from a
/// position, filtered, and is read-only: on a database without the schema
/// it fails with a clear error and creates nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_tail_prints_the_log_and_creates_nothing() {
    let db = common::postgres().await;
    wallet::seed::seed(&db.store, 10, 300, |_| {}).await.unwrap();
    let log = log_positions(&db.store).await;
    let tail = |args: &[&str], url: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wallet"))
            .arg("tail")
            .args(args)
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let after = log[99].to_string();
    let (ok, out, err) = tail(&["--json", "--after", &after], &db.url);
    assert!(ok, "{err}");
    let printed: Vec<i64> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["position"].as_i64().unwrap())
        .collect();
    assert_eq!(printed, log[100..], "every event after the position, in order");
    let (ok, out, _) = tail(&["--type", "WalletCreated"], &db.url);
    assert!(ok);
    assert_eq!(out.lines().count(), 10, "one WalletCreated per seeded wallet");

    // A database with no schema: an error, and still no tables after it.
    let empty = common::postgres_without_schema().await;
    let (ok, _, err) = tail(&[], &empty.url);
    assert!(!ok, "tail on a database without the log fails");
    assert!(
        err.contains("no wallet schema") && err.contains("wallet migrate"),
        "says what is missing: {err}"
    );
    let pool = sqlx::PgPool::connect(&empty.url).await.unwrap();
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tables, 0, "a read-only command created nothing");
}

/// An idle stream says it is alive: a `: heartbeat` comment after 15 s
/// without events, so proxies keep it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_sends_heartbeats() {
    let db = common::sqlite().await;
    let base = common::serve(db.store.clone()).await;
    let http = Client::new();
    let mut sse = Sse::open(&http, &format!("{base}/events/stream"), None).await;
    let started = std::time::Instant::now();
    let chunk = tokio::time::timeout(Duration::from_secs(20), sse.response.chunk())
        .await
        .expect("something within 20 s")
        .unwrap()
        .expect("the stream is still open");
    assert_eq!(&chunk[..], b": heartbeat\n\n");
    assert!(started.elapsed() >= Duration::from_secs(14), "not before the interval");
}
