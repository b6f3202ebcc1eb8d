//! The command line as an operator meets it, through the real binary: what
//! `--help` shows, which commands change nothing, and how they fail.

mod common;

use common::free_port;
use std::ops::{Deref, DerefMut};
use std::process::{Command, Output, Stdio};

/// The binary, run in a temp directory of its own that is removed when
/// this drops: keep it as long as a spawned process runs.
struct Wallet {
    command: Command,
    _dir: common::Cleanup,
}

impl Deref for Wallet {
    type Target = Command;
    fn deref(&self) -> &Command {
        &self.command
    }
}

impl DerefMut for Wallet {
    fn deref_mut(&mut self) -> &mut Command {
        &mut self.command
    }
}

/// The binary with a clean environment of its own (no `.env` values leak
/// in from the working directory): run in a fresh temp directory.
fn wallet(args: &[&str]) -> Wallet {
    let (dir, cleanup) = common::temp_dir("wallet-cli");
    let mut c = Command::new(env!("CARGO_BIN_EXE_wallet"));
    c.args(args)
        .current_dir(dir)
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .env_remove("API_KEYS")
        .env_remove("WALLET_API_KEY")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    Wallet {
        command: c,
        _dir: cleanup,
    }
}

fn run(c: &mut Command) -> Output {
    c.output().expect("the wallet binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_never_shows_secrets_from_the_environment() {
    for sub in ["serve", "worker", "relay", "dlq", "verify", "load"] {
        let out = run(wallet(&[sub, "--help"])
            .env("DATABASE_URL", "postgres://app:db-s3cret@db/wallet")
            .env("AMQP_URL", "amqp://app:mq-s3cret@mq/%2f")
            .env("API_KEYS", "ops:admin:key-s3cret")
            .env("WALLET_API_KEY", "wk_client-s3cret"));
        let help = text(&out);
        assert!(out.status.success(), "{sub} --help: {help}");
        assert!(help.contains("DATABASE_URL"), "{sub} --help names the variable: {help}");
        assert!(!help.contains("s3cret"), "{sub} --help shows a secret: {help}");
    }
}

/// The tables in a PostgreSQL database's public schema.
async fn tables(url: &str) -> Vec<String> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url)
        .await
        .expect("PostgreSQL is required for this test");
    sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
        .fetch_all(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn read_only_commands_create_nothing_on_an_empty_database() {
    let db = common::postgres_without_schema().await;
    let url = &db.url;
    for args in [
        &["replay", "--at", "1"][..],
        &["verify"],
        &["projections", "status"],
        &["tail"],
        &["prune", "--audit-older-than", "90d"],
    ] {
        let out = run(wallet(args).env("DATABASE_URL", &url));
        let said = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {said}");
        assert!(
            said.contains("holds no wallet schema") && said.contains("wallet migrate"),
            "{args:?}: {said}"
        );
        assert_eq!(
            said.trim().lines().count(),
            1,
            "{args:?}: one clear line, no backtrace: {said}"
        );
    }
    assert_eq!(
        tables(&url).await,
        Vec::<String>::new(),
        "read-only commands created tables"
    );
}

#[tokio::test]
async fn replay_and_verify_run_on_a_read_only_connection() {
    let db = common::postgres_without_schema().await;
    let url = &db.url;
    let out = run(wallet(&["migrate"]).env("DATABASE_URL", &url));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(wallet(&["seed", "--events", "300", "--wallets", "5"]).env("DATABASE_URL", &url));
    assert!(out.status.success(), "{}", text(&out));
    let store = wallet::config::open_existing(&url).await.unwrap();
    let projections = wallet::projections::Projections::new(store, Default::default());
    projections.catch_up().await.unwrap();
    let before = tables(&url).await;

    let read_only = format!("{url}?options=-c%20default_transaction_read_only%3Don");
    for args in [
        &["replay", "--at", "100"][..],
        &["replay", "--at", "100", "--json"],
        &["verify"],
        &["projections", "status", "--json"],
        &["tail", "--after", "290"],
    ] {
        let out = run(wallet(args).env("DATABASE_URL", &read_only));
        assert!(
            out.status.success(),
            "{args:?} on a read-only connection: {}",
            text(&out)
        );
    }
    let out = run(wallet(&["verify"]).env("DATABASE_URL", &read_only));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no discrepancies"),
        "{}",
        text(&out)
    );
    // The connection really is read-only: a writer fails on it.
    let out = run(wallet(&["seed", "--events", "10", "--wallets", "2"]).env("DATABASE_URL", &read_only));
    assert!(
        !out.status.success() && text(&out).contains("read-only"),
        "{}",
        text(&out)
    );
    assert_eq!(tables(&url).await, before, "nothing created");
}

#[test]
fn the_embedded_database_is_not_created_by_commands_that_read() {
    let mut c = wallet(&["replay", "--at", "1"]);
    let out = run(&mut c);
    let dir = c.get_current_dir().unwrap().to_owned();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("no database at data/wallet.db"), "{said}");
    for args in [&["keys", "--name", "ci"][..], &["verify"], &["tail"]] {
        let mut c = wallet(args);
        c.current_dir(&dir);
        run(&mut c);
    }
    assert!(!dir.join("data").exists(), "a stray data/ directory was created");
}

#[tokio::test]
async fn dlq_list_with_a_mistyped_exchange_declares_nothing() {
    let topology = common::broker::topology();
    let out = run(wallet(&["dlq", "list"])
        .env("AMQP_URL", common::broker::amqp_url())
        .env("AMQP_EXCHANGE", &topology.exchange));
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("queue \"{}\" does not exist", topology.dead_letter_queue)),
        "{said}"
    );
    // Still missing: a passive declare on a channel of our own fails.
    let connection = common::broker::connect(&common::broker::amqp_url()).await;
    let channel = connection.create_channel().await.unwrap();
    let missing = topology.require(&channel, &topology.dead_letter_queue).await;
    assert!(
        matches!(missing, Err(wallet::broker::BrokerError::MissingQueue(_))),
        "{missing:?}"
    );
}

#[test]
fn a_database_that_cannot_be_reached_is_named_with_its_cause_once() {
    let out = run(wallet(&["verify"]).env("DATABASE_URL", "postgres://someone:pw-s3cret@127.0.0.1:1/nowhere"));
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
    for part in ["127.0.0.1:1", "database nowhere", "user someone", "Connection refused"] {
        assert!(said.contains(part), "names {part:?}: {said}");
    }
    assert_eq!(said.matches("Connection refused").count(), 1, "the cause once: {said}");
    assert!(!said.contains("s3cret"), "{said}");
}

/// Waits for the process to end, at most `limit`; kills it otherwise.
fn wait_at_most(mut child: std::process::Child, limit: std::time::Duration) -> Option<Output> {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn misconfigured_brokers() -> Vec<(String, &'static str)> {
    let good = common::broker::amqp_url();
    vec![
        (good.replacen("guest:guest", "guest:wrong-s3cret", 1), "ACCESS_REFUSED"),
        (format!("{}/no-such-vhost", good.rsplit_once('/').unwrap().0), "vhost"),
        ("http://127.0.0.1:5672/".to_owned(), "scheme"),
    ]
}

#[test]
fn a_misconfigured_broker_ends_worker_relay_and_dlq_with_one_line() {
    for (url, expected) in misconfigured_brokers() {
        for args in [&["worker"][..], &["relay"], &["dlq", "list"]] {
            let mut command = wallet(args);
            let child = command
                .env("AMQP_URL", &url)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let out = wait_at_most(child, std::time::Duration::from_secs(30))
                .unwrap_or_else(|| panic!("{args:?} with {url} kept retrying"));
            let said = text(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?} with {url}: {said}");
            assert_eq!(said.trim().lines().count(), 1, "{args:?} with {url}: one line: {said}");
            assert!(said.contains(expected), "{args:?} with {url}: {said}");
            assert!(!said.contains("s3cret"), "{said}");
        }
    }
}

#[tokio::test]
async fn serve_with_a_misconfigured_broker_says_why_it_is_not_ready() {
    let port = free_port();
    let (url, expected) = misconfigured_brokers().remove(0);
    let mut command = wallet(&["serve", "--bind", &format!("127.0.0.1:{port}")]);
    let mut serve = command
        .env("AMQP_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut ready = None;
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            ready = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let _ = serve.kill();
    let _ = serve.wait();
    let ready = ready.expect("serve answers");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("refuses this configuration") && detail.contains(expected),
        "{body}"
    );
}

#[tokio::test]
async fn probes_stay_out_of_the_info_log_and_latency_is_a_number() {
    let port = free_port();
    let mut command = wallet(&["serve", "--bind", &format!("127.0.0.1:{port}")]);
    let dir = command.get_current_dir().unwrap().to_owned();
    let log = dir.join("serve.log");
    let mut serve = command
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..300 {
        if client.get(format!("{base}/health")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ready = client.get(format!("{base}/ready")).send().await.map(|r| r.status());
    let wallet = client.get(format!("{base}/wallet/x")).send().await.map(|r| r.status());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(up, "serve answers");
    assert_eq!(ready.unwrap(), 200);
    assert_eq!(wallet.unwrap(), 200);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|l: &serde_json::Value| l["message"] == "finished processing request")
        .collect();
    assert_eq!(lines.len(), 1, "only /wallet/x, no probe: {lines:?}");
    assert_eq!(lines[0]["span"]["path"], "/wallet/x", "{lines:?}");
    assert!(lines[0]["latency_ms"].is_f64(), "latency as a number: {lines:?}");
}

#[test]
fn a_closed_pipe_ends_a_printing_command_without_a_panic() {
    // `wallet keys | true`: the reader is gone before the first line.
    let mut command = wallet(&["keys", "--name", "ci"]);
    let mut child = command
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(!said.contains("panicked"), "{said}");
    assert_ne!(out.status.code(), Some(101), "{said}");
}

#[tokio::test]
async fn dlq_replay_of_unknown_ids_is_an_error_naming_them() {
    let topology = common::broker::topology();
    let connection = common::broker::connect(&common::broker::amqp_url()).await;
    let channel = connection.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();
    let out = run(wallet(&["dlq", "replay", "--id", "nope-1", "nope-2"])
        .env("AMQP_URL", common::broker::amqp_url())
        .env("AMQP_EXCHANGE", &topology.exchange));
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("replayed 0 dead letters"), "{said}");
    assert!(
        said.contains(r#"no dead letter with id "nope-1", "nope-2""#),
        "both ids parsed and named: {said}"
    );
}

#[tokio::test]
async fn a_dead_letter_that_can_never_apply_can_be_discarded_by_id() {
    use lapin::options::BasicPublishOptions;
    use lapin::BasicProperties;
    let topology = common::broker::topology();
    let connection = common::broker::connect(&common::broker::amqp_url()).await;
    let channel = connection.create_channel().await.unwrap();
    topology.declare(&channel).await.unwrap();
    for id in ["junk-1", "keep-1"] {
        channel
            .basic_publish(
                &topology.dead_letter_exchange,
                "",
                BasicPublishOptions::default(),
                b"not an event",
                BasicProperties::default().with_message_id(id.into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dlq = |args: &[&str]| {
        run(wallet(args)
            .env("AMQP_URL", common::broker::amqp_url())
            .env("AMQP_EXCHANGE", &topology.exchange))
    };
    assert!(
        !dlq(&["dlq", "discard"]).status.success(),
        "--id is required: never all"
    );
    let out = dlq(&["dlq", "discard", "--id", "junk-1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("discarded 1 dead letters"), "{}", text(&out));
    let out = dlq(&["dlq", "list", "--json"]);
    let left: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = left
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["keep-1"], "only the named one is gone");
    let out = dlq(&["dlq", "discard", "--id", "junk-1"]);
    assert_eq!(out.status.code(), Some(1), "already gone: {}", text(&out));
}

/// A migrated PostgreSQL database with `events` seeded events.
async fn seeded_database(events: &str) -> common::EmptyDb {
    let db = common::postgres_without_schema().await;
    let out = run(wallet(&["migrate"]).env("DATABASE_URL", &db.url));
    assert!(out.status.success(), "{}", text(&out));
    let out = run(wallet(&["seed", "--events", events, "--wallets", "5"]).env("DATABASE_URL", &db.url));
    assert!(out.status.success(), "{}", text(&out));
    db
}

/// A topology declared as the service declares it (no expiry), with an
/// observer that deletes it at the end.
async fn service_topology() -> (wallet::broker::Topology, common::broker::Observer) {
    let topology = wallet::broker::Topology::named(&format!("test.{}.events", uuid::Uuid::new_v4().simple()));
    let observer = common::broker::Observer::bind_plain(&topology).await;
    (topology, observer)
}

#[tokio::test]
async fn projections_status_is_one_json_document_with_the_broker_and_shows_parked() {
    let db = seeded_database("50").await;
    let (topology, observer) = service_topology().await;
    let status = |json: bool| {
        let mut args = vec!["projections", "status"];
        if json {
            args.push("--json");
        }
        run(wallet(&args)
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", common::broker::amqp_url())
            .env("AMQP_EXCHANGE", &topology.exchange))
    };
    let out = status(true);
    assert!(out.status.success(), "{}", text(&out));
    // One value: a second document after it would be "trailing characters".
    let doc: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("one JSON document: {e}: {}", text(&out)));
    let projections = doc["projections"].as_array().expect("projections array");
    assert_eq!(projections.len(), 4, "{doc}");
    assert!(projections.iter().all(|p| p["parked"] == 0), "{doc}");
    assert_eq!(doc["broker"]["deadLetterDepth"], 0, "{doc}");

    let out = status(false);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let header: Vec<&str> = said.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "projection",
            "checkpoint",
            "head",
            "lag",
            "events/s",
            "parked",
            "rebuild"
        ],
        "{said}"
    );
    assert!(said.contains("dead letters 0"), "{said}");
    observer.delete_topology(&topology).await;
}

/// A service command on `database` and `topology`, logging to a file (its
/// path third); keep the first value while the child runs.
fn service(
    args: &[&str],
    database: &str,
    topology: &wallet::broker::Topology,
) -> (Wallet, std::process::Child, std::path::PathBuf) {
    let mut command = wallet(args);
    let log = command.get_current_dir().unwrap().join("service.log");
    // lapin's own lines too: they are where a torn connection shows.
    let child = command
        .env("DATABASE_URL", database)
        .env("AMQP_URL", common::broker::amqp_url())
        .env("AMQP_EXCHANGE", &topology.exchange)
        .env("RUST_LOG", "info,lapin=info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    (command, child, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_by_sigint_exits_zero_without_errors() {
    let db = seeded_database("20").await;
    let (topology, observer) = service_topology().await;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let (_dir, child, log) = service(&["worker"], &db.url, &topology);
        let consuming = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("worker consuming"))
        });
        // SAFETY: a plain signal to the child we spawned.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = wait_at_most(child, std::time::Duration::from_secs(15)).expect("the worker stops");
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(consuming, "the worker consumed: {said}");
        assert_eq!(out.status.code(), Some(0), "{said}");
        assert!(
            !said.contains("\"level\":\"ERROR\""),
            "no ERROR on a clean stop: {said}"
        );
    }
    observer.delete_topology(&topology).await;
}

/// `wallet relay --metrics-bind`: ready once it publishes, then SIGINT or
/// SIGTERM closes its broker connection (no ERROR from lapin) and it exits
/// 0 with its checkpoint saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_by_sigint_exits_zero_without_errors_and_answers_probes() {
    let db = seeded_database("20").await;
    let (topology, observer) = service_topology().await;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .unwrap();
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let port = free_port();
        let bind = format!("127.0.0.1:{port}");
        let (_dir, child, log) = service(&["relay", "--metrics-bind", &bind], &db.url, &topology);
        let mut ready = None;
        for _ in 0..200 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/ready")).send().await {
                if r.status() == 200 {
                    ready = Some(r.text().await.unwrap_or_default());
                    break;
                }
            }
        }
        // SAFETY: a plain signal to the child we spawned.
        unsafe { libc::kill(child.id() as i32, signal) };
        let out = wait_at_most(child, std::time::Duration::from_secs(15)).expect("the relay stops");
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            ready.as_deref().is_some_and(|r| r.contains("publishing")),
            "/ready said publishing: {ready:?} {said}"
        );
        assert_eq!(out.status.code(), Some(0), "{said}");
        assert!(said.contains("relay stopped; broker connection closed"), "{said}");
        assert!(
            !said.contains("\"level\":\"ERROR\""),
            "no ERROR on a clean stop: {said}"
        );
    }
    let store = wallet::config::open_existing(&db.url).await.unwrap();
    let checkpoint = wallet::broker::relay::checkpoint(&store, &topology).await.unwrap();
    assert_eq!(
        checkpoint,
        store.head_position().await.unwrap(),
        "the checkpoint was saved"
    );
    observer.delete_topology(&topology).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_rebuild_of_one_projection_is_refused_while_the_first_runs() {
    let db = seeded_database("200").await;
    let store = wallet::config::open_existing(&db.url).await.unwrap();
    let projections = wallet::projections::Projections::new(store, Default::default());
    let (started, is_started) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let mut started = Some(started);
    // The first rebuild holds still at its first progress report.
    let first = tokio::spawn(async move {
        projections
            .rebuild("stats", false, move |_| {
                if let Some(started) = started.take() {
                    let _ = started.send(());
                    let _ = released.recv();
                }
            })
            .await
    });
    is_started
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the first rebuild started");
    let out = run(wallet(&["projections", "rebuild", "stats"]).env("DATABASE_URL", &db.url));
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert_eq!(said.trim().lines().count(), 1, "one line: {said}");
    assert!(
        said.contains("rebuild of stats is already running"),
        "names the projection: {said}"
    );
    // Another projection is not held up.
    let out = run(wallet(&["projections", "rebuild", "history"]).env("DATABASE_URL", &db.url));
    assert!(out.status.success(), "{}", text(&out));

    release.send(()).unwrap();
    let done = first.await.unwrap().expect("the first rebuild finishes");
    assert!(done.events >= 200, "{done:?}");
    let out = run(wallet(&["projections", "rebuild", "stats"]).env("DATABASE_URL", &db.url));
    assert!(out.status.success(), "the lock is released: {}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_sends_its_api_key() {
    let out = run(&mut wallet(&["keys", "--name", "bench", "--scopes", "read+write"]));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<&str> = printed.lines().map(str::trim).collect();
    let (key, entry) = (lines[1], lines[3]);
    let port = free_port();
    let mut command = wallet(&["serve", "--bind", &format!("127.0.0.1:{port}")]);
    let mut serve = command.env("API_KEYS", entry).stderr(Stdio::null()).spawn().unwrap();
    let base = format!("127.0.0.1:{port}");
    let up = (0..300).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::net::TcpStream::connect(&base).is_ok()
    });
    let load = |key: Option<&str>| {
        let mut c = wallet(&[
            "load",
            "--url",
            &base,
            "--seconds",
            "60",
            "--requests",
            "40",
            "--wallets",
            "2",
        ]);
        c.args(["--concurrency", "2"]);
        if let Some(key) = key {
            c.env("WALLET_API_KEY", key);
        }
        run(&mut c)
    };
    let refused = load(None);
    let sent = load(Some(key));
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(up, "serve listens");
    let said = text(&refused);
    assert_eq!(refused.status.code(), Some(1), "{said}");
    assert!(said.contains("401") && said.contains("--api-key"), "{said}");
    assert!(sent.status.success(), "with the key: {}", text(&sent));
    let said = String::from_utf8_lossy(&sent.stdout).into_owned();
    assert!(said.contains("statuses 201: 40"), "{said}");
}
