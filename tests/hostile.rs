//! Hostile connections against real servers on real sockets (issue 18):
//! silent, trickling (slowloris) and idle connections against the header
//! and idle deadlines and a low connection cap or descriptor limit while
//! other clients keep being served; ambiguous framing (two
//! `Authorization` headers, `Transfer-Encoding: identity, chunked`);
//! unauthenticated floods and their audit rows; rate limits; retention.

mod common;

use common::Running;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use wallet::api::{self, ApiKeys, AppState, RateLimits, RateSpec, ServeOptions};
use wallet::audit::AuditLog;
use wallet::projections::{FraudRules, Projections};
use wallet::store::EventStore;

/// Deadlines here are generous: the machine may be loaded.
const CLOSE_WITHIN: Duration = Duration::from_secs(15);

fn options(header: Duration, idle: Duration, max_connections: usize) -> ServeOptions {
    ServeOptions {
        header_read_timeout: header,
        idle_timeout: idle,
        max_connections,
    }
}

/// Serves `store` with `configure`d state and `options`; returns the base
/// URL and the audit log (to flush).
async fn serve(store: EventStore, options: ServeOptions, configure: impl FnOnce(&mut AppState)) -> (String, AuditLog) {
    let projections = Arc::new(Projections::new(store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let mut state = AppState::new(store, projections);
    state.read_wait = Duration::from_secs(3);
    configure(&mut state);
    state.spawn_projection_runner();
    let audit = state.audit.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve_with(listener, state, options, std::future::pending()));
    (format!("http://{addr}"), audit)
}

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// A client that opens a new connection for every request.
fn fresh_connections() -> Client {
    Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Waits until the server closes `conn` (EOF or reset); how long it took.
async fn closed_after(conn: &mut TcpStream, started: Instant) -> Duration {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(started + CLOSE_WITHIN, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the connection was still open after {CLOSE_WITHIN:?}"),
        }
    }
}

/// Sends raw bytes on a new connection; returns the status line and the
/// rest of the answer (read until the server closes, or 10 s).
async fn raw(base: &str, request: &[u8]) -> (String, String) {
    let mut conn = TcpStream::connect(addr(base)).await.unwrap();
    let _ = conn.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    (status, text)
}

fn problem_code(answer: &str) -> String {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let json: Value = serde_json::from_str(body.trim()).unwrap_or_else(|_| panic!("not JSON: {answer}"));
    json["code"].as_str().unwrap_or("").to_owned()
}

/// A connection that sends nothing, and one that trickles header lines
/// for ever, are both closed at the header deadline; a prompt request on
/// another connection is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_and_trickling_connections_are_closed_at_the_header_deadline() {
    let db = common::postgres().await;
    let (base, _) = serve(
        db.store,
        options(Duration::from_secs(1), Duration::from_secs(60), 64),
        |_| {},
    )
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr(&base)).await.unwrap();
    let trickler = TcpStream::connect(addr(&base)).await.unwrap();
    let (mut trickle_read, mut trickle_write) = trickler.into_split();
    let trickling = tokio::spawn(async move {
        let _ = trickle_write.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await;
        for i in 0..100 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if trickle_write
                .write_all(format!("X-Slow-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let r = fresh_connections().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "other clients are served");

    let silent_for = closed_after(&mut silent, started).await;
    assert!(
        silent_for >= Duration::from_millis(900),
        "not before the deadline: {silent_for:?}"
    );
    let mut buf = [0u8; 1024];
    let trickled_for = loop {
        match tokio::time::timeout_at(started + CLOSE_WITHIN, trickle_read.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => panic!("answered a request whose headers never ended: {:?}", &buf[..n]),
            Err(_) => panic!("the trickling connection was still open after {CLOSE_WITHIN:?}"),
        }
    };
    assert!(
        trickled_for < Duration::from_secs(10),
        "trickling bytes do not extend the deadline: {trickled_for:?}"
    );
    trickling.abort();
}

/// An idle keep-alive connection is closed after the idle timeout; a
/// request that runs longer than it (waiting for `minPosition`) is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_keep_alive_connections_are_closed_but_slow_requests_are_not() {
    let db = common::postgres().await;
    let (base, _) = serve(
        db.store,
        options(Duration::from_secs(5), Duration::from_secs(1), 64),
        |_| {},
    )
    .await;
    let mut conn = TcpStream::connect(addr(&base)).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("\"ok\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    let idle_since = Instant::now();
    let idle_for = closed_after(&mut conn, idle_since).await;
    assert!(
        idle_for >= Duration::from_millis(900),
        "kept for the idle timeout: {idle_for:?}"
    );

    // Waits 3 s (the read wait) for a position that never comes: longer
    // than the idle timeout, and still answered.
    let started = Instant::now();
    let r = fresh_connections()
        .get(format!("{base}/wallet/slow/history?minPosition=1000000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
}

/// Opens `n` connections; half say nothing, half trickle an unfinished
/// request. Returns how many the server has closed so far, live.
async fn hold_hostile_connections(
    base: &str,
    n: usize,
) -> (Arc<std::sync::atomic::AtomicUsize>, Vec<tokio::task::JoinHandle<()>>) {
    let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..n {
        let conn = TcpStream::connect(addr(base)).await.unwrap();
        let closed = closed.clone();
        tasks.push(tokio::spawn(async move {
            let (mut read, mut write) = conn.into_split();
            let trickle = async move {
                if i % 2 == 1 {
                    let _ = write.write_all(b"POST /wallet/x/deposit HTTP/1.1\r\nHost: x\r\n").await;
                    loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if write.write_all(b"X-Slow: y\r\n").await.is_err() {
                            break;
                        }
                    }
                }
                std::future::pending::<()>().await;
            };
            let mut buf = [0u8; 256];
            tokio::select! {
                _ = trickle => {}
                _ = read.read(&mut buf) => {}
            }
            closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    (closed, tasks)
}

/// 99th percentile (the largest of fewer than 100 samples).
fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

/// With the cap (16) held by idle and slowloris connections, and deadlines
/// too long to help, new clients are still served at once: each new
/// connection takes the place of the one that has done nothing longest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_the_connection_cap_idle_and_slow_connections_make_room_for_clients() {
    let db = common::postgres().await;
    let (base, _) = serve(
        db.store,
        options(Duration::from_secs(60), Duration::from_secs(60), 16),
        |_| {},
    )
    .await;
    let (closed, hostile) = hold_hostile_connections(&base, 60).await;
    let http = fresh_connections();
    let mut latencies = Vec::new();
    for i in 0..40 {
        let started = Instant::now();
        let status = if i % 2 == 0 {
            let url = format!("{base}/wallet/capped/deposit");
            http.post(url)
                .json(&json!({"amount": "1"}))
                .send()
                .await
                .unwrap()
                .status()
        } else {
            http.get(format!("{base}/wallet/capped")).send().await.unwrap().status()
        };
        latencies.push(started.elapsed());
        assert!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "request {i}: {status}"
        );
    }
    let p99 = p99(latencies.clone());
    let max = latencies.iter().max().copied().unwrap();
    println!("at the cap: p99 {p99:?}, max {max:?} over {} requests", latencies.len());
    assert!(p99 < Duration::from_secs(3), "p99 {p99:?}");
    let closed = closed.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        closed >= 60 - 16,
        "hostile connections beyond the cap were closed ({closed})"
    );
    for t in hostile {
        t.abort();
    }
}

/// The issue's reproduction: `wallet serve` under a 256-descriptor limit
/// (soft and hard), 400 connections that never speak. Other clients keep
/// being served, including writes that need the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_low_descriptor_limit_and_400_idle_connections_do_not_starve_the_service() {
    let db = common::postgres().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let script = format!("ulimit -n 256 && exec \"$0\" serve --bind 127.0.0.1:{port}");
    let mut server = Running(
        Command::new("sh")
            .args(["-c", &script, env!("CARGO_BIN_EXE_wallet")])
            .env("DATABASE_URL", &db.url)
            .env_remove("AMQP_URL")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn wallet serve"),
    );
    let http = fresh_connections();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited: {status}");
        }
        if http
            .get(format!("{base}/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        assert!(Instant::now() < deadline, "serve did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(addr(&base)).await.unwrap());
    }
    let mut latencies = Vec::new();
    for i in 0..30 {
        let started = Instant::now();
        let r = if i % 3 == 0 {
            http.post(format!("{base}/wallet/fd/deposit"))
                .json(&json!({"amount": "1"}))
                .send()
                .await
        } else {
            http.get(format!("{base}/wallet/fd")).send().await
        };
        let r = r.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        assert!(r.status().is_success(), "request {i}: {}", r.status());
        latencies.push(started.elapsed());
    }
    let r = http.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "the database is still reachable");
    let p99 = p99(latencies);
    println!("256 descriptors, 400 idle connections: p99 {p99:?}");
    assert!(p99 < Duration::from_secs(3), "p99 {p99:?}");
    assert!(server.0.try_wait().unwrap().is_none(), "serve is still running");
    drop(idle);
}

async fn keyed(store: EventStore, limits: RateLimits) -> (String, AuditLog) {
    let spec = format!(
        "{},{}",
        ApiKeys::entry("alpha", "read+write", "key-a"),
        ApiKeys::entry("beta", "read+write", "key-b")
    );
    let keys = Arc::new(ApiKeys::parse(&spec).unwrap());
    serve(store, ServeOptions::default(), |s| {
        s.keys = keys;
        s.rate_limits = Arc::new(limits);
    })
    .await
}

/// Two `Authorization` headers are ambiguous: 400, even if both are valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_authorization_headers_are_a_400() {
    let db = common::postgres().await;
    let (base, _) = keyed(db.store.clone(), RateLimits::default()).await;
    let body = r#"{"amount": 1}"#;
    let request = format!(
        "POST /wallet/two/deposit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n\
         Authorization: Bearer key-b\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, answer) = raw(&base, request.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{answer}");
    assert_eq!(problem_code(&answer), "DUPLICATE_AUTHORIZATION");
    let one = request.replace("Authorization: Bearer key-b\r\n", "");
    let (status, answer) = raw(&base, one.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 201"), "one header is fine: {answer}");
    assert_eq!(
        db.store.head_position().await.unwrap(),
        2,
        "only the second deposit landed"
    );
}

/// `Transfer-Encoding: identity, chunked` is refused with 501 (RFC 9112),
/// and nothing is written; a lone `chunked` works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_encodings_other_than_chunked_are_a_501() {
    let db = common::postgres().await;
    let (base, _) = serve(db.store.clone(), ServeOptions::default(), |_| {}).await;
    let request = |te: &str| {
        let body = r#"{"amount": 1}"#;
        format!(
            "POST /wallet/te/deposit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: {te}\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
    };
    for te in ["identity, chunked", "gzip, chunked"] {
        let (status, answer) = raw(&base, request(te).as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 501"), "{te}: {answer}");
        assert_eq!(problem_code(&answer), "UNSUPPORTED_TRANSFER_ENCODING", "{te}");
    }
    assert_eq!(db.store.head_position().await.unwrap(), 0, "nothing written");
    let (status, answer) = raw(&base, request("chunked").as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 201"), "{answer}");
}

/// `(status, body, headers)` of every audit row, oldest first.
async fn audit_rows(store: &EventStore) -> Vec<(i32, String, String)> {
    let sql = "SELECT status, body, headers FROM api_audit ORDER BY audit_id";
    match store {
        EventStore::Postgres(s) => sqlx::query_as(sql).fetch_all(s.pool()).await.unwrap(),
        EventStore::Sqlite(s) => sqlx::query_as(sql).fetch_all(s.reader()).await.unwrap(),
    }
}

/// 300 unauthenticated 8 KB writes are refused (401) and leave audit rows
/// of a few hundred bytes without body or headers; an authenticated write
/// is still recorded in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unauthenticated_flood_leaves_small_audit_rows() {
    let db = common::postgres().await;
    let (base, audit) = keyed(db.store.clone(), RateLimits::default()).await;
    let http = Client::new();
    let padding = "p".repeat(8 * 1024);
    let flood = json!({"amount": "1", "note": padding});
    for _ in 0..300 {
        let r = http
            .post(format!("{base}/wallet/flood/deposit"))
            .header("cookie", "c".repeat(2000))
            .json(&flood)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().contains_key("x-audit-id"));
    }
    let r = http
        .post(format!("{base}/wallet/flood/deposit"))
        .bearer_auth("key-a")
        .json(&json!({"amount": "1.25"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(audit.flush(Duration::from_secs(20)).await, "audit flushed");
    let rows = audit_rows(&db.store).await;
    assert_eq!(rows.len(), 301);
    let refused: Vec<_> = rows.iter().filter(|r| r.0 == 401).collect();
    assert_eq!(refused.len(), 300);
    for (_, body, headers) in &refused {
        assert_eq!(body, "", "no body kept");
        assert!(headers.len() < 100, "only the declared sizes: {headers}");
        assert!(headers.contains("content-length"), "{headers}");
    }
    let accepted = rows.iter().find(|r| r.0 == 201).unwrap();
    assert!(accepted.1.contains("1.25"), "an accepted write keeps its body");
    if let EventStore::Postgres(s) = &db.store {
        let bytes: i64 =
            sqlx::query_scalar("SELECT sum(pg_column_size(a.*))::bigint FROM api_audit a WHERE status = 401")
                .fetch_one(s.pool())
                .await
                .unwrap();
        println!(
            "300 refused writes: {bytes} bytes of audit rows ({} per row)",
            bytes / 300
        );
        assert!(bytes / 300 < 400, "{bytes} bytes");
    }
}

/// A key over its budget gets 429 `RATE_LIMITED` with `Retry-After`; the
/// other key is unaffected; the refusals are counted in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_over_its_budget_gets_429_and_other_keys_do_not() {
    let db = common::postgres().await;
    let limits = RateLimits::new(RateSpec::parse("3/m").unwrap(), None);
    let (base, _) = keyed(db.store, limits).await;
    let http = Client::new();
    let get = |key: &'static str| {
        let (http, url) = (http.clone(), format!("{base}/wallet/rl"));
        async move { http.get(url).bearer_auth(key).send().await.unwrap() }
    };
    for _ in 0..3 {
        assert_eq!(get("key-a").await.status(), StatusCode::OK);
    }
    let limited = get("key-a").await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (1..=20).contains(&retry_after),
        "a token is back within 20 s: {retry_after}"
    );
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMITED");
    for _ in 0..2 {
        assert_eq!(
            get("key-b").await.status(),
            StatusCode::OK,
            "the other key is unaffected"
        );
    }
    let metrics = http
        .get(format!("{base}/metrics"))
        .bearer_auth("key-b")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rate_limited_total{limit=\"key\"}")),
        "{metrics}"
    );
}

/// A client address over its budget gets 429 before authentication (in
/// open mode here), its refused writes are audited small, and `/health`
/// stays exempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_address_over_its_budget_gets_429() {
    let db = common::postgres().await;
    let limits = RateLimits::new(None, RateSpec::parse("2/m").unwrap());
    let (base, audit) = serve(db.store.clone(), ServeOptions::default(), |s| {
        s.rate_limits = Arc::new(limits)
    })
    .await;
    let http = Client::new();
    let deposit = || {
        http.post(format!("{base}/wallet/ra/deposit"))
            .json(&json!({"amount": "1"}))
            .send()
    };
    assert_eq!(deposit().await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(deposit().await.unwrap().status(), StatusCode::CREATED);
    let r = deposit().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));
    for _ in 0..5 {
        let health = http.get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(health.status(), StatusCode::OK, "probes are never limited");
    }
    assert!(audit.flush(Duration::from_secs(20)).await);
    let rows = audit_rows(&db.store).await;
    let refused: Vec<_> = rows.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(refused.len(), 1, "{rows:?}");
    assert_eq!(refused[0].1, "");
}

/// `wallet prune`: audit rows and idempotency keys older than the cutoff
/// go, newer ones stay; a pruned key is forgotten (a retry takes effect
/// again, which is why keys must outlive the retry window).
async fn prune_removes_only_what_is_older(db: TestDb) {
    use wallet::aggregate::{Amount, WalletId};
    use wallet::audit::AuditRecord;
    let old = chrono::Utc::now() - chrono::Duration::days(100);
    let log = AuditLog::spawn(db.store.clone());
    for (i, at) in [old, old, chrono::Utc::now()].into_iter().enumerate() {
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, at.timestamp() as u64, at.timestamp_subsec_nanos());
        log.record(AuditRecord {
            audit_id: uuid::Uuid::new_v7(ts),
            recorded_at: at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            method: "POST".into(),
            path: format!("/wallet/p{i}/deposit"),
            status: 201,
            wallet_id: None,
            request_id: None,
            client_ip: None,
            headers: "{}".into(),
            body: "{}".into(),
            duration_ms: 1,
        })
        .await;
    }
    assert!(log.flush(Duration::from_secs(10)).await);
    let ledger = wallet::ledger::Ledger::new(db.store.clone());
    let w = WalletId::parse("pruned").unwrap();
    let one = || Amount::parse("1").unwrap();
    for key in ["k-old", "k-new"] {
        ledger.deposit(w.clone(), one(), Some(key.into())).await.unwrap();
    }
    let age = match &db.store {
        EventStore::Postgres(s) => {
            sqlx::query("UPDATE idempotency SET created_at = now() - interval '100 days' WHERE key = 'k-old'")
                .execute(s.pool())
                .await
                .map(|r| r.rows_affected())
        }
        EventStore::Sqlite(s) => sqlx::query(
            "UPDATE idempotency SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-100 days') WHERE key = 'k-old'",
        )
        .execute(s.writer())
        .await
        .map(|r| r.rows_affected()),
    };
    assert_eq!(age.unwrap(), 1);

    let ninety_days = Some(Duration::from_secs(90 * 86_400));
    let pruned = wallet::retention::prune(&db.store, ninety_days, ninety_days)
        .await
        .unwrap();
    assert_eq!((pruned.audit_rows, pruned.idempotency_keys), (2, 1));
    assert_eq!(audit_rows(&db.store).await.len(), 1, "the recent audit row stays");
    let again = wallet::retention::prune(&db.store, ninety_days, ninety_days)
        .await
        .unwrap();
    assert_eq!((again.audit_rows, again.idempotency_keys), (0, 0));

    let fresh_ledger = wallet::ledger::Ledger::new(db.store.clone());
    let kept = fresh_ledger
        .deposit(w.clone(), one(), Some("k-new".into()))
        .await
        .unwrap();
    assert!(kept.replayed, "a kept key still replays");
    let forgotten = fresh_ledger
        .deposit(w.clone(), one(), Some("k-old".into()))
        .await
        .unwrap();
    assert!(!forgotten.replayed, "a pruned key is forgotten");
    assert_eq!(forgotten.receipt.balance.to_string(), "3.0000");
}

on_both_backends!(prune_removes_only_what_is_older);

/// The head of `raw`'s answer: its status line must be `status`, its body
/// problem+json of exactly the declared length; returns the code.
fn whole_problem(answer: &str, status: &str) -> String {
    assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer:.300}");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    assert!(head.contains(&format!("content-length: {}\r\n", body.len())), "{head}");
    problem_code(answer)
}

/// Oversized URIs and header sections get problem+json with a stable code,
/// whether the gate refuses them (over its limits) or hyper's parser does
/// (a URI no `http::Uri` holds, a head over the read buffer, 101 headers,
/// a malformed header); the answer arrives whole even when the client is
/// still sending a megabyte, and the service goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parser_and_size_refusals_are_problem_json() {
    let db = common::sqlite().await;
    let (base, _) = serve(db.store.clone(), ServeOptions::default(), |_| {}).await;
    let get =
        |uri: String, headers: String| format!("GET {uri} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n");
    let cases = [
        // (what, request, status, code)
        (
            "a 10 KB URI (gate)",
            get(format!("/flags?walletId={}", "w".repeat(10_000)), String::new()),
            "414",
            "URI_TOO_LONG",
        ),
        (
            "a 100 KB URI (hyper)",
            get(format!("/flags?walletId={}", "w".repeat(100_000)), String::new()),
            "414",
            "URI_TOO_LONG",
        ),
        (
            "40 KB of headers (gate)",
            get("/health".into(), format!("X-Fill: {}\r\n", "h".repeat(40_000))),
            "431",
            "HEADERS_TOO_LARGE",
        ),
        (
            "1 MB of headers (hyper)",
            get("/health".into(), format!("X-Fill: {}\r\n", "h".repeat(1 << 20))),
            "431",
            "HEADERS_TOO_LARGE",
        ),
        (
            "101 headers (hyper)",
            get("/health".into(), (0..101).map(|i| format!("X-H{i}: v\r\n")).collect()),
            "431",
            "HEADERS_TOO_LARGE",
        ),
        (
            "a header without a colon (hyper)",
            get("/health".into(), "Not a header\r\n".into()),
            "400",
            "MALFORMED_REQUEST",
        ),
    ];
    for (what, request, status, code) in cases {
        let (_, answer) = raw(&base, request.as_bytes()).await;
        assert_eq!(whole_problem(&answer, status), code, "{what}");
    }
    let r = fresh_connections().get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "still serving");
}

/// A write whose body stops arriving is answered 408 `REQUEST_TIMEOUT`
/// (problem+json) once the 30 s body deadline passes, and nothing is
/// written; the connection deadlines never cut a request in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_body_that_stops_arriving_is_a_408() {
    let db = common::sqlite().await;
    let (base, _) = serve(
        db.store.clone(),
        options(Duration::from_secs(1), Duration::from_secs(1), 64),
        |_| {},
    )
    .await;
    let started = Instant::now();
    let request = "POST /wallet/slow/deposit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                   Content-Length: 40\r\n\r\n{\"amount\":";
    let mut conn = TcpStream::connect(addr(&base)).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the whole problem body is in (it ends the answer).
    while !String::from_utf8_lossy(&answer).trim_end().ends_with('}') {
        match tokio::time::timeout(Duration::from_secs(45), conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!("no answer after {:?}: {other:?}", started.elapsed()),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(problem_code(&answer), "REQUEST_TIMEOUT");
    assert!(started.elapsed() >= Duration::from_secs(29), "{:?}", started.elapsed());
    assert_eq!(db.store.head_position().await.unwrap(), 0, "nothing written");
}
