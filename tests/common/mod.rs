//! Shared test support: a fresh database per test on each backend (dropped,
//! or its directory removed, when the test ends), and a real HTTP server
//! listening on a random local port.
#![allow(dead_code)]

pub mod broker;
pub mod ha;
pub mod sse;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::Connection;
use wallet::api::{self, AppState};
use wallet::projections::{FraudRules, Projections};
use wallet::store::EventStore;

/// Where the tests find PostgreSQL (a maintenance database to create test
/// databases from).
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A migrated store on a fresh database of its own, gone when this drops.
pub struct TestDb {
    pub store: EventStore,
    pub url: String,
    /// Keep it as long as the test uses the database (a struct that takes
    /// `store` out of a `TestDb` keeps this too).
    pub cleanup: Cleanup,
}

/// A fresh, empty PostgreSQL database of its own, dropped when this drops.
pub struct EmptyDb {
    pub url: String,
    pub cleanup: Cleanup,
}

/// Drops a test's PostgreSQL database, or removes its directory, when the
/// test ends. A failed test's database is kept for a look (and dropped by
/// a later run, an hour on; see `drop_stale`).
pub struct Cleanup(Option<Leftover>);

enum Leftover {
    Database(String),
    Directory(std::path::PathBuf),
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(Leftover::Database(name)) = &self.0 {
                eprintln!("test failed: database {name} kept");
            }
            return;
        }
        match self.0.take() {
            Some(Leftover::Database(name)) => drop_database(name),
            Some(Leftover::Directory(dir)) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            None => {}
        }
    }
}

/// A fresh directory of its own under the system's temp directory,
/// removed when the returned `Cleanup` drops.
pub fn temp_dir(prefix: &str) -> (std::path::PathBuf, Cleanup) {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create a temp directory");
    (dir.clone(), Cleanup(Some(Leftover::Directory(dir))))
}

/// `DROP DATABASE ... WITH (FORCE)` (ending the test's own connections) on
/// a connection of its own. Drop cannot await and the test's runtime may
/// have a single thread, so it runs on a thread with a runtime of its own.
fn drop_database(name: String) {
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async {
            let mut admin = sqlx::PgConnection::connect(&admin_url()).await?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut admin)
                .await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    })
    .join();
    if let Ok(Err(e)) = dropped {
        eprintln!("could not drop a test database: {e}");
    }
}

/// Drops test databases left behind by earlier runs (older than an hour).
async fn drop_stale(admin: &mut sqlx::PgConnection, now: u64) {
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'wallet_test_%'")
        .fetch_all(&mut *admin)
        .await
        .unwrap_or_default();
    for name in names {
        let created = name.split('_').nth(2).and_then(|s| s.parse::<u64>().ok());
        if created.is_some_and(|t| t + 3600 < now) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}

pub async fn postgres() -> TestDb {
    let EmptyDb { url, cleanup } = postgres_without_schema().await;
    let store = wallet::config::open_store(&url).await.expect("migrate test database");
    TestDb { store, url, cleanup }
}

/// A fresh, empty database of its own (nothing migrated).
pub async fn postgres_without_schema() -> EmptyDb {
    let admin_url = admin_url();
    let mut admin = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is required for this test and is not reachable at {admin_url}: {e}\n\
             start it (see README) or set TEST_DATABASE_URL"
        )
    });
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    drop_stale(&mut admin, now).await;
    let name = format!("wallet_test_{now}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create test database");
    let base = admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin_url);
    EmptyDb {
        url: format!("{base}/{name}"),
        cleanup: Cleanup(Some(Leftover::Database(name))),
    }
}

pub async fn sqlite() -> TestDb {
    let (dir, cleanup) = temp_dir("wallet-test");
    let url = format!("sqlite://{}", dir.join("wallet.db").display());
    let store = wallet::config::open_store(&url).await.expect("migrate test database");
    TestDb { store, url, cleanup }
}

/// Runs the API and its in-process projection runner on 127.0.0.1 with a
/// random port; returns its base URL.
pub async fn serve(store: EventStore) -> String {
    serve_with_ledger(store.clone(), wallet::ledger::Ledger::new(store)).await
}

/// `serve` with a ledger configured by the test (its deadlines, say).
pub async fn serve_with_ledger(store: EventStore, ledger: wallet::ledger::Ledger) -> String {
    let projections = Arc::new(Projections::new(store.clone(), FraudRules::default()));
    projections.ensure().await.expect("create read models");
    let mut state = AppState::with_ledger(ledger, store, projections);
    // A loaded CI machine may need longer than the product's 2 s for a
    // projection to catch up; tests assert the position, not the timing.
    state.read_wait = std::time::Duration::from_secs(20);
    state.spawn_projection_runner();
    // Holds of a second expire within a test's patience.
    state.spawn_expiry_sweeper(std::time::Duration::from_millis(100));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(listener, state, std::future::pending()));
    format!("http://{addr}")
}

/// Generates `#[tokio::test]`s named `sqlite` and `postgres` in a module
/// named after the test body, each on a fresh database.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),+ $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    super::$case(crate::common::sqlite().await).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    super::$case(crate::common::postgres().await).await;
                }
            }
        )+
    };
}

/// A child process of the test, killed (and reaped) when dropped, so a
/// failing test leaves nothing running.
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A local port nothing listens on (for a process the test starts).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free local port");
    listener.local_addr().expect("its address").port()
}

/// A deposit to `wallet` (which must exist) appended and left uncommitted:
/// it holds the append lock, so every append behind it waits, and its
/// position commits after any read that starts meanwhile (a late commit).
pub async fn begin_deposit(store: &EventStore, wallet: &str, amount: &str) -> wallet::store::PendingAppend {
    use wallet::aggregate::{Amount, Command, WalletId};
    let id = WalletId::parse(wallet).expect("a wallet id");
    let current = wallet::ledger::Ledger::new(store.clone())
        .wallet(&id, None)
        .await
        .expect("the wallet to hold a deposit of");
    let command = Command::Deposit {
        wallet: id,
        amount: Amount::parse(amount).expect("an amount"),
    };
    let decided = wallet::aggregate::decide(&command, &[&current])
        .expect("a deposit is accepted")
        .streams
        .remove(0);
    let stream = wallet::store::StreamAppend {
        stream: decided.wallet,
        expected: wallet::store::Head::of(&current),
        events: decided
            .events
            .into_iter()
            .map(|event| wallet::store::NewEvent {
                event_id: uuid::Uuid::now_v7(),
                event,
                metadata: serde_json::json!({}),
            })
            .collect(),
        on_batch: false,
    };
    store
        .begin_append(wallet::store::AppendRequest {
            streams: vec![stream],
            idempotency: Vec::new(),
        })
        .await
        .expect("an append held open")
}
