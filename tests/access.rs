//! Access, limits, metrics and audit against a real server on both
//! backends: API keys and scopes, load shedding with 503 + Retry-After,
//! Prometheus metrics, and the `api_audit` trail linked from the events.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::TestDb;
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};
use wallet::api::{self, ApiKeys, AppState};
use wallet::projections::{FraudRules, Projections};
use wallet::store::EventStore;

/// Serves `store` with the state changed by `configure`; returns the base URL.
async fn serve_with(store: EventStore, configure: impl FnOnce(&mut AppState)) -> String {
    let projections = Arc::new(Projections::new(store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let mut state = AppState::new(store, projections);
    state.read_wait = Duration::from_secs(3);
    configure(&mut state);
    state.spawn_projection_runner();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(listener, state, std::future::pending()));
    format!("http://{addr}")
}

async fn problem_code(r: reqwest::Response) -> String {
    assert_eq!(
        r.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: Value = r.json().await.unwrap();
    body["code"].as_str().unwrap_or("").to_owned()
}

async fn keys_and_scopes(db: TestDb) {
    let spec = format!(
        "{},{}",
        ApiKeys::entry("reader", "read", "key-r"),
        ApiKeys::entry("writer", "read+write", "key-w")
    );
    let keys = Arc::new(ApiKeys::parse(&spec).unwrap());
    let base = serve_with(db.store, |s| s.keys = keys).await;
    let http = Client::new();
    let deposit = format!("{base}/wallet/k1/deposit");
    let body = json!({"amount": "5.00"});

    let r = http.post(&deposit).json(&body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers().get("www-authenticate").unwrap(), "Bearer");
    assert_eq!(problem_code(r).await, "UNAUTHORIZED");

    let r = http
        .post(&deposit)
        .bearer_auth("key-x")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "an unknown key");

    let r = http
        .post(&deposit)
        .bearer_auth("key-r")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(problem_code(r).await, "FORBIDDEN");

    let r = http
        .post(&deposit)
        .bearer_auth("key-w")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let r = http
        .get(format!("{base}/wallet/k1"))
        .bearer_auth("key-r")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = http.get(format!("{base}/wallet/k1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "reads need a key too");

    for open in ["/health", "/ready", "/openapi.json", "/docs/"] {
        let r = http.get(format!("{base}{open}")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{open} stays open");
    }
}

/// Beyond the in-flight cap the API answers 503 with Retry-After at once.
async fn overload_is_shed_with_503(db: TestDb) {
    let base = serve_with(db.store, |s| s.max_in_flight = 1).await;
    let http = Client::new();
    // Occupies the only slot: waits (3 s) for a position that never comes.
    let slow = {
        let (http, url) = (http.clone(), format!("{base}/wallet/w/history?minPosition=1000000"));
        tokio::spawn(async move { http.get(url).send().await.unwrap().status() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let r = http
        .post(format!("{base}/wallet/w/deposit"))
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(2), "shed at once, not queued");
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(problem_code(r).await, "UNAVAILABLE");
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    // Capacity is back.
    let r = http
        .post(format!("{base}/wallet/w/deposit"))
        .json(&json!({"amount": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

async fn metrics_are_exposed(db: TestDb) {
    let base = serve_with(db.store, |_| {}).await;
    let http = Client::new();
    for _ in 0..3 {
        let r = http
            .post(format!("{base}/wallet/m/deposit"))
            .json(&json!({"amount": "2.50"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = r.text().await.unwrap();
    let requests = text
        .lines()
        .find(|l| {
            l.starts_with("http_requests_total{")
                && l.contains(r#"route="/wallet/{id}/deposit""#)
                && l.contains(r#"status="201""#)
        })
        .unwrap_or_else(|| panic!("no deposit counter in:\n{text}"));
    let count: f64 = requests.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 3.0, "{requests}");
    for name in [
        "http_request_duration_seconds_bucket",
        "append_batch_requests",
        "projection_lag_events{projection=\"history\"}",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
}

/// (audit id, status, wallet id, headers JSON, body) of every audit row.
async fn audit_rows(store: &EventStore) -> Vec<(String, i32, Option<String>, String, String)> {
    let sql = "SELECT audit_id, status, wallet_id, headers, body FROM api_audit ORDER BY recorded_at";
    match store {
        EventStore::Postgres(s) => sqlx::query_as(sql).fetch_all(s.pool()).await.unwrap(),
        EventStore::Sqlite(s) => sqlx::query_as(sql).fetch_all(s.reader()).await.unwrap(),
    }
}

/// The audit writer paces its inserts under load; that must neither lose a
/// record nor hold back a flush (shutdown waits on one).
async fn a_burst_of_audit_records_is_written_whole_and_flushes_promptly(db: TestDb) {
    use wallet::audit::{AuditLog, AuditRecord};
    let log = AuditLog::spawn(db.store.clone());
    let record = |i: usize| AuditRecord {
        audit_id: uuid::Uuid::now_v7(),
        recorded_at: chrono::Utc::now().to_rfc3339(),
        method: "POST".to_owned(),
        path: format!("/wallet/w{i}/deposit"),
        status: 201,
        wallet_id: Some(format!("w{i}")),
        request_id: None,
        client_ip: None,
        headers: "{}".to_owned(),
        body: "{}".to_owned(),
        duration_ms: 1,
    };
    // More than one insert's worth, so later inserts wait on the pace.
    for i in 0..2_500 {
        log.record(record(i)).await;
    }
    assert!(log.flush(Duration::from_secs(10)).await, "flush timed out");
    assert_eq!(audit_rows(&db.store).await.len(), 2_500, "every record written once");
    // Right after an insert (inside the pace), a flush still writes at once.
    log.record(record(2_500)).await;
    assert!(log.flush(Duration::from_secs(10)).await, "flush timed out");
    assert_eq!(audit_rows(&db.store).await.len(), 2_501);
}

async fn every_mutating_request_is_audited(db: TestDb) {
    let base = serve_with(db.store.clone(), |_| {}).await;
    let http = Client::new();
    let ok = http
        .post(format!("{base}/wallet/audited/deposit"))
        .header("authorization", "Bearer super-secret")
        .header("cookie", "session=abc")
        .json(&json!({"amount": "7.25", "requestId": "audit-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::CREATED);
    let audit_id = ok.headers()["x-audit-id"].to_str().unwrap().to_owned();
    let bad = http
        .post(format!("{base}/wallet/audited/withdraw"))
        .json(&json!({"amount": "1e3"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let huge = format!("{base}/wallet/{}/deposit", "x".repeat(5000));
    let r = http.post(huge).json(&json!({"amount": 1})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Reads are not audited.
    http.get(format!("{base}/wallet/audited")).send().await.unwrap();

    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = audit_rows(&db.store).await;
        if rows.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rows.len(), 3, "{rows:?}");
    let (id, status, wallet, headers, body) = &rows[0];
    assert_eq!(
        (id.as_str(), *status, wallet.as_deref()),
        (audit_id.as_str(), 201, Some("audited"))
    );
    assert!(headers.contains(r#""authorization":"[redacted]""#), "{headers}");
    assert!(headers.contains(r#""cookie":"[redacted]""#), "{headers}");
    assert!(!headers.contains("super-secret") && !headers.contains("session=abc"));
    assert!(body.contains("7.25"), "{body}");
    assert_eq!(rows[1].1, 400, "the status actually returned");
    assert_eq!(rows[2].1, 400);
    assert!(
        rows[2].2.as_deref().unwrap().chars().count() <= 129,
        "bounded wallet id"
    );

    // The events of the audited request point back to its audit record.
    let events = db.store.read_all(0, 10).await.unwrap();
    assert!(!events.is_empty());
    for e in events {
        assert_eq!(e.metadata["auditId"], audit_id.as_str(), "{:?}", e.metadata);
    }
}

/// Sends a POST to `path` over a plain TCP connection; returns the status
/// line (empty if the server closed without answering).
async fn raw_status_line(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let body = "{\"amount\": 1}";
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The server may answer and close before reading it all.
    let _ = conn.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or("").chars().take(80).collect()
}

/// Hostile input of every kind gets a clean 4xx problem, never a 5xx, and
/// the server keeps serving.
async fn hostile_input_gets_clean_4xx(db: TestDb) {
    let base = serve_with(db.store.clone(), |_| {}).await;
    let http = Client::new();
    let post = |path: String, body: Vec<u8>| {
        let http = http.clone();
        async move {
            http.post(path)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap()
        }
    };
    let deposit = format!("{base}/wallet/h/deposit");
    // 7,000 levels: inside the body limit, far beyond any parser's nesting limit.
    let deep = format!("{{\"amount\": {}1{}}}", "[".repeat(7_000), "]".repeat(7_000));
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        (
            "oversize body",
            deposit.clone(),
            format!("{{\"amount\": 1, \"pad\": \"{}\"}}", "x".repeat(512 << 10)).into_bytes(),
        ),
        ("deep JSON", deposit.clone(), deep.into_bytes()),
        (
            "invalid UTF-8",
            deposit.clone(),
            b"{\"amount\": \"1\xff\xfe\"}".to_vec(),
        ),
        ("negative zero", deposit.clone(), b"{\"amount\": -0}".to_vec()),
        ("exponent", deposit.clone(), b"{\"amount\": 1e3}".to_vec()),
        ("NaN string", deposit.clone(), b"{\"amount\": \"NaN\"}".to_vec()),
    ];
    for (name, url, body) in cases {
        let r = post(url, body).await;
        assert!(r.status().is_client_error(), "{name}: {}", r.status());
    }
    // A 10 MB wallet id: no HTTP client builds such a URL, so raw TCP.
    let status = raw_status_line(&base, &format!("/wallet/{}/deposit", "a".repeat(10 << 20))).await;
    assert!(status.starts_with("HTTP/1.1 4"), "10 MB id: {status}");
    let r = post(deposit, b"{\"amount\": \"1.50\"}".to_vec()).await;
    assert_eq!(r.status(), StatusCode::CREATED, "still serving");
    assert_eq!(
        db.store.head_position().await.unwrap(),
        2,
        "only the valid deposit was written"
    );
}

/// With a broker configured, /ready also answers for it.
async fn ready_reflects_the_broker(db: TestDb) {
    let topology = wallet::broker::Topology::named("test.ready.events");
    let up = serve_with(db.store.clone(), |s| {
        s.broker = Some((common::broker::amqp_url(), topology.clone()))
    })
    .await;
    let down = serve_with(db.store, |s| {
        s.broker = Some(("amqp://guest:guest@127.0.0.1:1/%2f".to_owned(), topology.clone()))
    })
    .await;
    let http = Client::new();
    let r = http.get(format!("{up}/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["broker"], "ok");
    let r = http.get(format!("{down}/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(problem_code(r).await, "UNAVAILABLE");
}

on_both_backends!(
    ready_reflects_the_broker,
    hostile_input_gets_clean_4xx,
    keys_and_scopes,
    overload_is_shed_with_503,
    metrics_are_exposed,
    every_mutating_request_is_audited,
    a_burst_of_audit_records_is_written_whole_and_flushes_promptly
);
