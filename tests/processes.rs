//! The deployment shape, as separate processes of the real binary: `serve`
//! (API + relay), a standby `relay` and the `worker` on PostgreSQL and
//! RabbitMQ, under a mixed write load from `wallet load`. At the end the
//! worker's read models equal a rebuild from the log and an extra queue
//! bound to the exchange got every event, in order.

mod common;

use common::{free_port, Running};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::broker::{amqp_url, Observer};
use wallet::broker::Topology;
use wallet::projections::{FraudRules, Projections};

fn wallet(args: &[&str], db: &str, exchange: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_wallet"));
    c.args(args)
        .env("DATABASE_URL", db)
        .env("AMQP_URL", amqp_url())
        .env("AMQP_EXCHANGE", exchange)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

async fn wait_healthy(base: &str) {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("serve did not become healthy at {base}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_relay_and_worker_as_processes_under_load() {
    let db = common::postgres().await;
    // The processes declare the production topology (no queue expiry):
    // names of this test's own, deleted at the end.
    let topology = Topology::named(&format!("test.{}.events", uuid::Uuid::new_v4().simple()));
    let mut observer = Observer::bind_plain(&topology).await;

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let bind = format!("127.0.0.1:{port}");
    let _serve = Running(
        wallet(&["serve", "--bind", &bind], &db.url, &topology.exchange)
            .spawn()
            .unwrap(),
    );
    let _standby = Running(wallet(&["relay"], &db.url, &topology.exchange).spawn().unwrap());
    let _worker = Running(wallet(&["worker"], &db.url, &topology.exchange).spawn().unwrap());
    wait_healthy(&base).await;

    let load = wallet(
        &[
            "load",
            "--url",
            &base,
            "--seconds",
            "5",
            "--concurrency",
            "16",
            "--wallets",
            "20",
        ],
        &db.url,
        &topology.exchange,
    )
    .output()
    .unwrap();
    assert!(
        load.status.success(),
        "load failed (conservation or errors): {}\n{}",
        String::from_utf8_lossy(&load.stdout),
        String::from_utf8_lossy(&load.stderr)
    );

    let head = db.store.head_position().await.unwrap();
    assert!(head > 100, "the load wrote events ({head})");
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    let mut caught_up = false;
    for _ in 0..600 {
        if projections.status().await.unwrap().iter().all(|s| s.checkpoint >= head) {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        caught_up,
        "the worker reached {head}: {:?}",
        projections.status().await.unwrap()
    );
    for name in projections.names() {
        let differences = projections.verify(name, 20).await.unwrap();
        assert!(differences.is_empty(), "{name} differs from a rebuild: {differences:?}");
    }

    let got = observer
        .collect_until(Duration::from_secs(60), |m| {
            m.last().is_some_and(|l| l.position >= head)
        })
        .await;
    let mut expected = Vec::new();
    loop {
        let batch = db
            .store
            .read_all(expected.last().copied().unwrap_or(0), 1000)
            .await
            .unwrap();
        if batch.is_empty() {
            break;
        }
        expected.extend(batch.iter().map(|e| e.position));
    }
    let positions: Vec<i64> = got.iter().map(|m| m.position).collect();
    assert_eq!(
        positions, expected,
        "every event once, in log order, on an extra bound queue"
    );
    observer.delete_topology(&topology).await;
}

/// SIGTERM while requests are in flight: they finish, their audit records
/// are written, and the process exits 0 within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let (dir, _dir) = common::temp_dir("wallet-term");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_wallet"));
    serve
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env("WALLET_DATA_DIR", &dir)
        .env("LOG_DIR", dir.join("logs"))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let mut child = serve.spawn().unwrap();
    wait_healthy(&base).await;

    let client = reqwest::Client::new();
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, base) = (client.clone(), base.clone());
        writers.push(tokio::spawn(async move {
            let mut acknowledged = 0u32;
            for i in 0..1000 {
                let r = client
                    .post(format!("{base}/wallet/t{w}/deposit"))
                    .json(&serde_json::json!({"amount": 1, "requestId": format!("t{w}-{i}")}))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == reqwest::StatusCode::CREATED => acknowledged += 1,
                    Ok(r) => panic!("a request during shutdown got {}", r.status()),
                    Err(_) => break, // connection refused or closed: the server stopped accepting
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve did not exit within 30 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let mut acknowledged = 0;
    for w in writers {
        acknowledged += w.await.unwrap();
    }
    assert!(acknowledged > 0);

    // Every acknowledged deposit is in the log, and audited.
    let store = wallet::config::open_store(&format!("sqlite://{}", dir.join("wallet.db").display()))
        .await
        .unwrap();
    let deposits = store
        .read_all(0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event.event_type() == "FundsDeposited")
        .count();
    assert!(
        deposits >= acknowledged as usize,
        "{deposits} deposits in the log, {acknowledged} acknowledged"
    );
    let wallet::store::EventStore::Sqlite(s) = &store else {
        unreachable!()
    };
    let audited: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_audit WHERE status = 201")
        .fetch_one(s.reader())
        .await
        .unwrap();
    assert!(
        audited >= i64::from(acknowledged),
        "{audited} audited, {acknowledged} acknowledged"
    );

    // LOG_DIR: JSON lines in a daily file, flushed at exit.
    let logs: Vec<_> = std::fs::read_dir(dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    let text = std::fs::read_to_string(&logs[0]).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        lines.iter().any(|l| l.to_string().contains("request_id")),
        "request ids in the log"
    );
    assert!(lines.iter().any(|l| l.to_string().contains("shutdown signal received")));
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set, `serve` exports its spans over
/// OTLP/HTTP, and a write's spans continue the caller's `traceparent`: the
/// exported batch carries the caller's trace id. (A local listener stands
/// in for the collector.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_in_the_callers_trace() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let (dir, _dir) = common::temp_dir("wallet-otel");
    let port = free_port();
    let _serve = Running(
        Command::new(env!("CARGO_BIN_EXE_wallet"))
            .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
            .env("WALLET_DATA_DIR", &dir)
            .env("DATABASE_URL", "")
            .env("AMQP_URL", "")
            .env("RUST_LOG", "warn")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = reqwest::Client::new()
        .post(format!("{base}/wallet/traced/deposit"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"amount": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);

    // The batch exporter sends within its schedule (5 s by default).
    let (mut conn, _) = tokio::time::timeout(Duration::from_secs(20), collector.accept())
        .await
        .expect("spans exported within 20 s")
        .unwrap();
    let mut request = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let wanted = hex::decode(trace_id).unwrap();
    while !request.windows(wanted.len()).any(|w| w == wanted.as_slice()) {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the export request arrives")
            .unwrap();
        assert!(n > 0, "the export ended without the caller's trace id");
        request.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&request[..request.len().min(200)]).into_owned();
    assert!(head.starts_with("POST /v1/traces"), "{head}");
    let _ = conn
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-type: application/x-protobuf\r\n\r\n")
        .await;
}
