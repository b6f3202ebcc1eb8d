//! Fault injection against the real PostgreSQL.
//!
//! The fault model is what a production deployment meets between the
//! service and its database, and in the service process itself:
//!
//! - **the database is unreachable** for a while (network partition, restart,
//!   failover): every connection is cut and new ones are refused;
//! - **connections are cut** at arbitrary moments, in the middle of a query
//!   or of a commit, so the service may not know whether its commit happened;
//! - **the service process is killed** (SIGKILL: OOM killer, node loss) in
//!   the middle of a write load, and started again.
//!
//! The first two are injected with a [`TcpProxy`] between the API's store and
//! the shared PostgreSQL server (the server itself is never touched; each test
//! has a database of its own). The third runs the real binary. What must hold
//! is what a client depends on: a failure is a clean `503 UNAVAILABLE` with
//! `Retry-After` (never a 500), the service recovers by itself, a write is
//! all-or-nothing, an acknowledged write is never lost, and a retry with the
//! same `requestId` takes effect exactly once whatever happened to the first
//! attempt.

mod common;

use common::{free_port, Running};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::broker::TcpProxy;
use common::TestDb;
use reqwest::{Client, StatusCode};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tokio::time::Instant;
use wallet::aggregate::{Wallet, WalletEvent, WalletId};
use wallet::store::{EventStore, RecordedEvent};

// ---------------------------------------------------------------------------
// Support
// ---------------------------------------------------------------------------

/// The API's store goes through a proxy to the test's own database; the
/// test keeps `db.store`, a direct connection, to look at the truth.
async fn store_through_proxy(db: &TestDb) -> (Arc<TcpProxy>, EventStore) {
    // `host:port` of the server in the test database URL.
    let after_scheme = db.url.split_once("://").expect("database url has a scheme").1;
    let authority = after_scheme.split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let target = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    let proxy = Arc::new(TcpProxy::start(&target).await);
    let proxied_url = db.url.replacen(host_port, &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(proxied_url, db.url, "the API's store must go through the proxy");
    let store = wallet::config::open_store(&proxied_url)
        .await
        .unwrap_or_else(|e| panic!("open the store through the proxy at {proxied_url}: {e}"));
    (proxy, store)
}

/// A request may wait up to the pool's 5 s acquire timeout before it fails;
/// 20 s leaves room on a loaded machine and still bounds every request.
fn client() -> Client {
    Client::builder().timeout(Duration::from_secs(20)).build().unwrap()
}

/// What a client sees of one answer.
#[derive(Debug, Clone)]
struct Answer {
    status: StatusCode,
    replayed: bool,
    retry_after: Option<String>,
    content_type: Option<String>,
    /// `X-Projection-Position` of a read-model answer.
    projection_position: Option<i64>,
    body: Value,
}

impl Answer {
    async fn read(r: reqwest::Response) -> Self {
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let replayed = header("idempotent-replayed").as_deref() == Some("true");
        let retry_after = header("retry-after");
        let content_type = header("content-type");
        let projection_position = header("x-projection-position").and_then(|p| p.parse().ok());
        let status = r.status();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Self {
            status,
            replayed,
            retry_after,
            content_type,
            projection_position,
            body,
        }
    }

    /// The contract of an outage: RFC 9457 problem+json `UNAVAILABLE` with
    /// `Retry-After`, so a client knows to retry and when.
    fn assert_unavailable(&self, what: &str) {
        assert_eq!(self.status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {self:?}");
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/problem+json"),
            "{what}: {self:?}"
        );
        assert_eq!(self.body["code"], "UNAVAILABLE", "{what}: {self:?}");
        assert_eq!(self.body["status"], 503, "{what}: {self:?}");
        for member in ["type", "title", "detail"] {
            assert!(
                self.body[member].is_string(),
                "{what}: problem lacks {member}: {self:?}"
            );
        }
        let secs: Option<u64> = self.retry_after.as_deref().and_then(|s| s.parse().ok());
        assert!(
            secs.is_some_and(|s| s >= 1),
            "{what}: Retry-After must be a number of seconds: {self:?}"
        );
    }

    /// The contract of a write whose outcome the service could not learn:
    /// 503 `OUTCOME_UNKNOWN`, and no `Retry-After` (retry only with the
    /// same requestId).
    fn assert_outcome_unknown(&self, what: &str) {
        assert_eq!(self.status, StatusCode::SERVICE_UNAVAILABLE, "{what}: {self:?}");
        assert_eq!(self.body["code"], "OUTCOME_UNKNOWN", "{what}: {self:?}");
        assert_eq!(self.retry_after, None, "{what}: never told to retry blindly: {self:?}");
    }

    /// A 503 under database faults: not applied (`UNAVAILABLE`), or of
    /// unknown outcome (`OUTCOME_UNKNOWN`), each with its own contract.
    fn assert_outage(&self, what: &str) {
        if self.body["code"] == "OUTCOME_UNKNOWN" {
            self.assert_outcome_unknown(what);
        } else {
            self.assert_unavailable(what);
        }
    }

    /// Only these answers are acceptable to a write under database faults:
    /// it happened (201), it did not (503 `UNAVAILABLE`), or the service
    /// could not find out (503 `OUTCOME_UNKNOWN`). A 500 or a 409 is a bug.
    fn assert_created_or_unavailable(&self, what: &str) {
        if self.status != StatusCode::CREATED {
            self.assert_outage(what);
        }
    }
}

async fn post(http: &Client, url: &str, body: &Value) -> Result<Answer, reqwest::Error> {
    Ok(Answer::read(http.post(url).json(body).send().await?).await)
}

async fn get(http: &Client, url: &str) -> Answer {
    Answer::read(http.get(url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))).await
}

/// Polls `attempt` every 100 ms until it gives a value or `timeout` passes.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts `body` until it is answered 201; every answer on the way must be a
/// 503 (the database is still recovering), never anything else.
async fn post_until_created(http: &Client, url: &str, body: &Value, what: &str) -> Answer {
    eventually(what, Duration::from_secs(30), || async {
        let answer = post(http, url, body)
            .await
            .unwrap_or_else(|e| panic!("{what}: POST {url}: {e}"));
        answer.assert_created_or_unavailable(what);
        (answer.status == StatusCode::CREATED).then_some(answer)
    })
    .await
}

/// The whole log, in position order.
async fn all_events(store: &EventStore) -> Vec<RecordedEvent> {
    let mut events: Vec<RecordedEvent> = Vec::new();
    loop {
        let after = events.last().map_or(0, |e| e.position);
        let batch = store.read_all(after, 1000).await.expect("read the log");
        if batch.is_empty() {
            return events;
        }
        events.extend(batch);
    }
}

fn request_id(event: &RecordedEvent) -> &str {
    event.metadata["requestId"]
        .as_str()
        .unwrap_or_else(|| panic!("event at {} has no requestId: {}", event.position, event.metadata))
}

fn money(text: &Value) -> Decimal {
    text.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a money string: {text}"))
}

/// A wallet's balance recomputed from its stream with our own arithmetic
/// (not the recorded `newBalance`), after checking that the product's fold
/// and the versions agree with it.
async fn folded_balance(store: &EventStore, wallet: &str) -> Decimal {
    let id = WalletId::parse(wallet).unwrap();
    let events = store.read_stream(&id, 0, None).await.expect("read a stream");
    let versions: Vec<u64> = events.iter().map(|e| e.version).collect();
    let contiguous: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(versions, contiguous, "{wallet}: versions run 1, 2, 3...");
    let mut balance = Decimal::ZERO;
    for e in &events {
        match &e.event {
            WalletEvent::WalletCreated(_) => {}
            WalletEvent::FundsDeposited(p) => balance += p.amount.value(),
            WalletEvent::TransferCredited(p) => balance += p.amount.value(),
            WalletEvent::FundsWithdrawn(p) => balance -= p.amount.value(),
            WalletEvent::TransferDebited(p) => balance -= p.amount.value(),
            WalletEvent::HoldCaptured(p) => balance -= p.amount.value(),
            // Holds placed or released and limits leave the balance.
            _ => {}
        }
    }
    let product = Wallet::fold(id, events.iter().map(|e| &e.event)).balance.value();
    assert_eq!(
        product, balance,
        "{wallet}: recorded newBalance disagrees with the arithmetic"
    );
    balance
}

// ---------------------------------------------------------------------------
// 1. The database is unreachable, then comes back
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_unreachable_gives_503_and_recovers() {
    let db = common::postgres().await;
    let (proxy, store) = store_through_proxy(&db).await;
    let base = common::serve(store).await;
    let http = client();
    let deposit_url = format!("{base}/wallet/alice/deposit");

    // Through the proxy, the service works: a wallet the cache knows.
    let first = post(&http, &deposit_url, &json!({"amount": "10.00", "requestId": "before"}))
        .await
        .unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert_eq!(get(&http, &format!("{base}/ready")).await.status, StatusCode::OK);
    let head_before = db.store.head_position().await.unwrap();
    assert!(head_before > 0);

    proxy.set_down(true);
    let outage_started = Instant::now();
    // A write, the balance and readiness, concurrently: each may wait out
    // the pool's acquire timeout before it fails.
    let during = json!({"amount": "5.00", "requestId": "during"});
    let (balance_url, ready_url) = (format!("{base}/wallet/alice"), format!("{base}/ready"));
    let (write, balance, ready) = tokio::join!(
        post(&http, &deposit_url, &during),
        get(&http, &balance_url),
        get(&http, &ready_url),
    );
    let write = write.expect("the API answers even when its database does not");
    // Its batch went out on a connection the outage had just cut: the
    // service cannot know whether it arrived, and says so.
    write.assert_outage("a deposit while the database is unreachable");
    // With no connection at all, a write certainly does not happen.
    let again = post(&http, &deposit_url, &during).await.unwrap();
    again.assert_unavailable("a deposit with no connection to the database");
    // The cached balance is not served as if it were current.
    balance.assert_unavailable("a balance while the database is unreachable");
    // Not ready: a load balancer stops sending traffic here.
    ready.assert_unavailable("/ready while the database is unreachable");
    assert!(
        outage_started.elapsed() < Duration::from_secs(15),
        "failures are answered promptly, not after a hang ({:?})",
        outage_started.elapsed()
    );
    assert_eq!(
        db.store.head_position().await.unwrap(),
        head_before,
        "nothing was written during the outage"
    );

    proxy.set_down(false);
    // The service recovers by itself: the same request, retried, succeeds.
    // It is a fresh write (the failed attempt left nothing to replay).
    let retried = post_until_created(&http, &deposit_url, &during, "deposit after the outage").await;
    assert!(!retried.replayed, "the failed attempt wrote nothing: {retried:?}");
    assert_eq!(retried.body["balance"], "15.0000", "{retried:?}");
    eventually("/ready after the outage", Duration::from_secs(30), || async {
        (get(&http, &format!("{base}/ready")).await.status == StatusCode::OK).then_some(())
    })
    .await;
    let balance = get(&http, &format!("{base}/wallet/alice")).await;
    assert_eq!(balance.status, StatusCode::OK, "{balance:?}");
    assert_eq!(balance.body["balance"], "15.0000");
    assert_eq!(folded_balance(&db.store, "alice").await, Decimal::new(15, 0));

    let events = all_events(&db.store).await;
    let during_events = events.iter().filter(|e| request_id(e) == "during").count();
    assert_eq!(during_events, 1, "the retried deposit took effect once");

    // The in-process projections recover too: history reaches the new write.
    let position = retried.body["position"].as_i64().unwrap();
    let history_url = format!("{base}/wallet/alice/history?minPosition={position}");
    let history = eventually("history after the outage", Duration::from_secs(30), || async {
        let answer = get(&http, &history_url).await;
        let caught_up = answer.status == StatusCode::OK && answer.projection_position >= Some(position);
        caught_up.then_some(answer)
    })
    .await;
    let items = history.body.as_array().unwrap();
    assert!(
        items.iter().any(|i| i["position"].as_i64() == Some(position)),
        "history shows the deposit made after the outage: {items:?}"
    );
}

// ---------------------------------------------------------------------------
// 2. Connections cut in the middle of transfers
// ---------------------------------------------------------------------------

/// Wallets of the transfer test: several pairs, so group commits carry
/// batches of unrelated transfers and a cut can hit many at once.
const TRANSFER_WALLETS: [&str; 4] = ["w0", "w1", "w2", "w3"];
/// Enough that no wallet can be overdrawn, even by `MAX_TRANSFERS / 4`
/// outflows of the largest amount: every transfer must succeed.
const SEED: i64 = 100_000;
/// Transfers keep coming until the cuts have visibly hit some of them
/// (at least this many transfers, cuts and failures), at most `MAX_TRANSFERS`.
const MIN_TRANSFERS: usize = 200;
const MIN_CUTS: usize = 5;
const MIN_FAILURES: usize = 5;
const MAX_TRANSFERS: usize = 5000;

/// Transfer `n`: source, destination and amount, all derived from `n`, so
/// the expected balances follow from the set of transfer ids alone.
fn transfer_plan(n: usize) -> (&'static str, &'static str, Decimal) {
    let from = n % 4;
    let to = (from + 1 + (n / 4) % 3) % 4;
    // 1.00 to 5.99, with varying cents so a lost or doubled transfer shows.
    let amount = Decimal::new(100 + (n % 5) as i64 * 100 + (n % 100) as i64, 2);
    (TRANSFER_WALLETS[from], TRANSFER_WALLETS[to], amount)
}

fn transfer_body(n: usize) -> (String, Value) {
    let (from, to, amount) = transfer_plan(n);
    (
        from.to_owned(),
        json!({"toWalletId": to, "amount": amount.to_string(), "requestId": format!("t-{n}")}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_during_transfers_is_all_or_nothing_and_retry_is_exact() {
    let db = common::postgres().await;
    let (proxy, store) = store_through_proxy(&db).await;
    let base = common::serve(store).await;
    let http = client();

    for wallet in TRANSFER_WALLETS {
        let body = json!({"amount": SEED.to_string(), "requestId": format!("seed-{wallet}")});
        let seeded = post(&http, &format!("{base}/wallet/{wallet}/deposit"), &body)
            .await
            .unwrap();
        assert_eq!(seeded.status, StatusCode::CREATED, "{seeded:?}");
    }

    // Concurrent keyed transfers while a cutter drops every database
    // connection every 50 ms: commits are cut mid-flight, and the service
    // cannot always know whether they happened.
    let next = Arc::new(AtomicUsize::new(0));
    let cuts = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicUsize::new(0));
    let first_answers: Arc<Mutex<BTreeMap<usize, Answer>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let cutter = {
        let (proxy, cuts, done) = (proxy.clone(), cuts.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                proxy.cut();
                cuts.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let senders: Vec<_> = (0..16)
        .map(|_| {
            let (http, base) = (http.clone(), base.clone());
            let (next, cuts, failures, first_answers) =
                (next.clone(), cuts.clone(), failures.clone(), first_answers.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    let enough = n >= MIN_TRANSFERS
                        && cuts.load(Ordering::SeqCst) >= MIN_CUTS
                        && failures.load(Ordering::SeqCst) >= MIN_FAILURES;
                    if enough || n >= MAX_TRANSFERS {
                        return;
                    }
                    let (from, body) = transfer_body(n);
                    let answer = post(&http, &format!("{base}/wallet/{from}/transfer"), &body)
                        .await
                        .unwrap_or_else(|e| panic!("transfer t-{n}: {e}"));
                    answer.assert_created_or_unavailable(&format!("transfer t-{n} under cuts"));
                    if answer.status != StatusCode::CREATED {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    first_answers.lock().unwrap().insert(n, answer);
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.expect("a sender panicked");
    }
    done.store(true, Ordering::SeqCst);
    cutter.await.unwrap();

    let first_answers = std::mem::take(&mut *first_answers.lock().unwrap());
    let ids: BTreeSet<usize> = first_answers.keys().copied().collect();
    let failed = first_answers
        .values()
        .filter(|a| a.status != StatusCode::CREATED)
        .count();
    assert!(
        failed >= 1,
        "the cuts must hit some transfers for this test to mean anything \
         ({} transfers, {} cuts, no failure)",
        ids.len(),
        cuts.load(Ordering::SeqCst)
    );

    // Retry every request with its requestId until it succeeds. A request
    // answered 201 is replayed exactly; a 503 one is either replayed (its
    // commit did happen) or takes effect now.
    let (mut committed_unseen, mut not_applied) = (0, 0);
    for (&n, first) in &first_answers {
        let (from, body) = transfer_body(n);
        let url = format!("{base}/wallet/{from}/transfer");
        let retried = post_until_created(&http, &url, &body, &format!("retry of t-{n}")).await;
        if first.status == StatusCode::CREATED {
            assert!(retried.replayed, "t-{n} was done: its retry is a replay: {retried:?}");
            assert_eq!(retried.body, first.body, "t-{n}: a replay is the original answer");
        } else if first.body["code"] == "UNAVAILABLE" {
            // No answer lies: UNAVAILABLE means it did not happen.
            assert!(
                !retried.replayed,
                "t-{n} was answered UNAVAILABLE yet had committed: {retried:?}"
            );
            not_applied += 1;
        } else if retried.replayed {
            committed_unseen += 1; // the cut lost the answer, not the commit
        }
        assert_eq!(retried.body["requestId"], format!("t-{n}"));
        assert_eq!(retried.body["status"], "completed", "{retried:?}");
    }
    eprintln!(
        "{} transfers, {} cuts, {failed} answered 503: {not_applied} UNAVAILABLE (none had committed), \
         the others OUTCOME_UNKNOWN ({committed_unseen} of which had committed)",
        ids.len(),
        cuts.load(Ordering::SeqCst)
    );

    // Each transfer id took effect exactly once, as two halves of one append.
    let events = all_events(&db.store).await;
    let mut debits: HashMap<usize, Vec<&RecordedEvent>> = HashMap::new();
    let mut credits: HashMap<usize, Vec<&RecordedEvent>> = HashMap::new();
    for e in &events {
        let halves = match e.event {
            WalletEvent::TransferDebited(_) => &mut debits,
            WalletEvent::TransferCredited(_) => &mut credits,
            _ => continue,
        };
        let n: usize = request_id(e)
            .strip_prefix("t-")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("a transfer with a foreign requestId: {}", e.metadata));
        halves.entry(n).or_default().push(e);
    }
    let debit_count: usize = debits.values().map(Vec::len).sum();
    let credit_count: usize = credits.values().map(Vec::len).sum();
    assert_eq!(
        (debit_count, credit_count),
        (ids.len(), ids.len()),
        "one TransferDebited and one TransferCredited per transfer id"
    );
    assert_eq!(debits.keys().copied().collect::<BTreeSet<_>>(), ids);
    assert_eq!(credits.keys().copied().collect::<BTreeSet<_>>(), ids);
    for &n in &ids {
        let (from, to, amount) = transfer_plan(n);
        let (WalletEvent::TransferDebited(debit), WalletEvent::TransferCredited(credit)) =
            (&debits[&n][0].event, &credits[&n][0].event)
        else {
            unreachable!()
        };
        assert_eq!(debit.transfer_id, credit.transfer_id, "t-{n}: halves of one transfer");
        assert_eq!(
            (
                debit.wallet_id.as_str(),
                credit.wallet_id.as_str(),
                debit.amount.value()
            ),
            (from, to, amount),
            "t-{n}"
        );
        assert_eq!(credit.amount.value(), amount, "t-{n}");
    }

    // Balances are exactly what the set of transfer ids implies, both as
    // served (through the cache that lived through the cuts) and as folded
    // afresh from the log.
    let mut expected: BTreeMap<&str, Decimal> = TRANSFER_WALLETS.iter().map(|w| (*w, Decimal::from(SEED))).collect();
    for &n in &ids {
        let (from, to, amount) = transfer_plan(n);
        *expected.get_mut(from).unwrap() -= amount;
        *expected.get_mut(to).unwrap() += amount;
    }
    for (wallet, want) in &expected {
        let served = get(&http, &format!("{base}/wallet/{wallet}")).await;
        assert_eq!(served.status, StatusCode::OK, "{served:?}");
        assert_eq!(money(&served.body["balance"]), *want, "{wallet} as served");
        assert_eq!(
            folded_balance(&db.store, wallet).await,
            *want,
            "{wallet} folded from the log"
        );
    }
    let total: Decimal = expected.values().sum();
    assert_eq!(total, Decimal::from(SEED * 4), "money is conserved");
}

// ---------------------------------------------------------------------------
// 2b. A commit whose answer is lost; a database that goes silent
// ---------------------------------------------------------------------------

/// PostgreSQL commits a batch, and its answer never reaches the service
/// (held by the proxy, then the connection is cut). The requests carry no
/// key: a client told "retry" would pay twice. The committer finds the
/// batch's events on a fresh connection and answers each request 201.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_whose_answer_is_lost_is_answered_with_the_truth() {
    let db = common::postgres().await;
    let (proxy, store) = store_through_proxy(&db).await;
    let base = common::serve(store).await;
    let http = client();
    let url = format!("{base}/wallet/lost/deposit");
    let opened = post(&http, &url, &json!({"amount": "100"})).await.unwrap();
    assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");
    let head_before = db.store.head_position().await.unwrap();

    proxy.set_hold_replies(true);
    let sends: Vec<_> = (0..8)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { post(&http, &url, &json!({"amount": "1"})).await.unwrap() })
        })
        .collect();
    // The batch reached PostgreSQL and committed; its answer is held.
    eventually("the held batch commits", Duration::from_secs(10), || async {
        (db.store.head_position().await.unwrap() > head_before).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(proxy.held_bytes() > 0, "the commit's answer was held back");
    proxy.cut();
    proxy.set_hold_replies(false);

    let mut answers = Vec::new();
    for send in sends {
        answers.push(send.await.unwrap());
    }
    for a in &answers {
        assert_eq!(
            a.status,
            StatusCode::CREATED,
            "a committed write is answered 201: {a:?}"
        );
    }
    // Exactly the answered deposits are in the log, each once, at the
    // position its answer names.
    let events = all_events(&db.store).await;
    let deposits: Vec<&RecordedEvent> = events
        .iter()
        .filter(|e| e.position > head_before && matches!(e.event, WalletEvent::FundsDeposited(_)))
        .collect();
    assert_eq!(deposits.len(), answers.len(), "one deposit per 201, no more");
    for a in &answers {
        let position = a.body["position"].as_i64().unwrap();
        let found = deposits
            .iter()
            .find(|e| e.position == position)
            .expect("the answer names its event");
        assert_eq!(request_id(found), a.body["requestId"].as_str().unwrap());
    }
    assert_eq!(folded_balance(&db.store, "lost").await, Decimal::new(108, 0));
}

/// The database goes silent without closing anything (the proxy holds every
/// byte). A write is answered within the committer's deadlines, never as
/// "retry"; `/ready` turns 503 while commands wait; when the database
/// speaks again the service recovers by itself, and the retried request
/// takes effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_database_fails_writes_in_time_and_turns_ready_off() {
    let db = common::postgres().await;
    let (proxy, store) = store_through_proxy(&db).await;
    let options = wallet::store::WriterOptions {
        batch_deadline: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        statement_timeout: Duration::from_millis(900),
        resolve_deadline: Duration::from_secs(1),
        stall_after: Duration::from_millis(300),
        ..Default::default()
    };
    let ledger = wallet::ledger::Ledger::new(store.clone()).with_writer_options(options);
    let base = common::serve_with_ledger(store, ledger).await;
    let http = client();
    let url = format!("{base}/wallet/quiet/deposit");
    let opened = post(&http, &url, &json!({"amount": "10", "requestId": "s0"}))
        .await
        .unwrap();
    assert_eq!(opened.status, StatusCode::CREATED, "{opened:?}");

    proxy.set_stalled(true);
    let started = Instant::now();
    let body = json!({"amount": "5", "requestId": "s1"});
    let write = {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tokio::spawn(async move { post(&http, &url, &body).await.unwrap() })
    };
    let ready_url = format!("{base}/ready");
    let not_ready = eventually(
        "/ready turns 503 while the committer waits",
        Duration::from_secs(5),
        || async {
            let r = get(&http, &ready_url).await;
            (r.status == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
        },
    )
    .await;
    not_ready.assert_unavailable("/ready during the stall");
    let write = write.await.unwrap();
    write.assert_outcome_unknown("a write sent to a silent database");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered within the deadlines, not hung ({:?})",
        started.elapsed()
    );

    proxy.set_stalled(false);
    let retried = post_until_created(&http, &url, &body, "the retry after the stall").await;
    assert_eq!(retried.body["balance"], "15.0000", "{retried:?}");
    eventually("/ready after the stall", Duration::from_secs(30), || async {
        (get(&http, &ready_url).await.status == StatusCode::OK).then_some(())
    })
    .await;
    let events = all_events(&db.store).await;
    let s1 = events.iter().filter(|e| request_id(e) == "s1").count();
    assert_eq!(s1, 1, "the stalled write took effect once, whichever attempt landed");
    assert_eq!(folded_balance(&db.store, "quiet").await, Decimal::new(15, 0));
}

// ---------------------------------------------------------------------------
// 3. SIGKILL of the service under write load
// ---------------------------------------------------------------------------

/// `wallet serve` on the database directly, without a broker (the
/// projections run in-process).
fn spawn_serve(database_url: &str, port: u16) -> Running {
    let child = Command::new(env!("CARGO_BIN_EXE_wallet"))
        .args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", database_url)
        .env_remove("AMQP_URL")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn wallet serve");
    Running(child)
}

async fn wait_healthy(server: &mut Running, base: &str) {
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!("serve exited before it was healthy: {status}");
        }
        let r = http.get(format!("{base}/health")).send().await;
        if r.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        assert!(Instant::now() < deadline, "serve did not answer /health at {base}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One keyed deposit of the load.
#[derive(Debug, Clone)]
struct Deposit {
    key: String,
    wallet: String,
    amount: Decimal,
    /// The 201 answer, if the client got one before the kill.
    acknowledged: Option<Answer>,
}

impl Deposit {
    fn body(&self) -> Value {
        json!({"amount": self.amount.to_string(), "requestId": self.key})
    }
}

const LOAD_TASKS: usize = 8;
const LOAD_WALLETS: usize = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_under_load_loses_no_acknowledged_write() {
    let db = common::postgres().await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = spawn_serve(&db.url, port);
    wait_healthy(&mut server, &base).await;
    let http = client();

    // Each task posts keyed deposits until the server stops answering. A
    // deposit counts as acknowledged only if its 201 reached the client.
    let attempts: Arc<Mutex<Vec<Deposit>>> = Arc::default();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..LOAD_TASKS)
        .map(|task| {
            let (http, base, attempts, acknowledged) =
                (http.clone(), base.clone(), attempts.clone(), acknowledged.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let mut deposit = Deposit {
                        key: format!("d-{task}-{n}"),
                        wallet: format!("k{}", (task + n) % LOAD_WALLETS),
                        amount: Decimal::new(100 + (n % 9) as i64 * 100 + ((n * 7 + task) % 100) as i64, 2),
                        acknowledged: None,
                    };
                    let url = format!("{base}/wallet/{}/deposit", deposit.wallet);
                    let answer = post(&http, &url, &deposit.body()).await;
                    let alive = answer.is_ok();
                    if let Ok(answer) = answer {
                        // A 503 (the service shedding load) is not an
                        // acknowledgement either: it is retried below.
                        answer.assert_created_or_unavailable(&deposit.key);
                        if answer.status == StatusCode::CREATED {
                            deposit.acknowledged = Some(answer);
                            acknowledged.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    attempts.lock().unwrap().push(deposit);
                    if !alive {
                        return; // the server is gone
                    }
                }
            })
        })
        .collect();

    // Let the load run for ~1.5 s (and at least until writes are flowing),
    // then kill the server without warning.
    let started = Instant::now();
    eventually("the load is running", Duration::from_secs(60), || async {
        (started.elapsed() >= Duration::from_millis(1500) && acknowledged.load(Ordering::SeqCst) >= 50).then_some(())
    })
    .await;
    server.0.kill().unwrap(); // SIGKILL on unix
    let status = server.0.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "serve died of SIGKILL: {status}");
    for task in tasks {
        task.await.expect("a load task panicked");
    }
    let attempts = std::mem::take(&mut *attempts.lock().unwrap());
    let acked = attempts.iter().filter(|d| d.acknowledged.is_some()).count();
    assert!(
        attempts.len() > acked,
        "requests were in flight at the kill ({} attempts)",
        attempts.len()
    );

    let mut server = spawn_serve(&db.url, port);
    wait_healthy(&mut server, &base).await;

    // The log after the restart: each key at most once, and every
    // acknowledged deposit present exactly as acknowledged.
    let logged = |events: &[RecordedEvent]| -> HashMap<String, Vec<RecordedEvent>> {
        let mut by_key: HashMap<String, Vec<RecordedEvent>> = HashMap::new();
        for e in events {
            if let WalletEvent::FundsDeposited(_) = e.event {
                by_key.entry(request_id(e).to_owned()).or_default().push(e.clone());
            }
        }
        by_key
    };
    let before_retry = logged(&all_events(&db.store).await);
    for (key, events) in &before_retry {
        assert_eq!(events.len(), 1, "{key} took effect more than once: {events:?}");
    }
    let mut lost = Vec::new();
    for d in &attempts {
        let Some(ack) = &d.acknowledged else { continue };
        let Some([event]) = before_retry.get(&d.key).map(Vec::as_slice) else {
            lost.push(d.key.clone());
            continue;
        };
        let WalletEvent::FundsDeposited(p) = &event.event else {
            unreachable!()
        };
        assert_eq!(
            (p.wallet_id.as_str(), p.amount.value(), event.position),
            (d.wallet.as_str(), d.amount, ack.body["position"].as_i64().unwrap()),
            "{}: the logged deposit is the acknowledged one",
            d.key
        );
        assert_eq!(p.new_balance.value(), money(&ack.body["balance"]), "{}", d.key);
    }
    assert!(lost.is_empty(), "acknowledged deposits lost by the kill: {lost:?}");
    let known: BTreeSet<&str> = attempts.iter().map(|d| d.key.as_str()).collect();
    for key in before_retry.keys() {
        assert!(known.contains(key.as_str()), "a deposit nobody sent: {key}");
    }

    // Retry every unacknowledged deposit: one that committed before the
    // kill is replayed with its original answer, one that did not takes
    // effect now, and none twice.
    let mut replayed = 0;
    for d in attempts.iter().filter(|d| d.acknowledged.is_none()) {
        let url = format!("{base}/wallet/{}/deposit", d.wallet);
        let answer = post_until_created(&http, &url, &d.body(), &format!("retry of {}", d.key)).await;
        match before_retry.get(&d.key).map(Vec::as_slice) {
            Some([event]) => {
                replayed += 1;
                let WalletEvent::FundsDeposited(p) = &event.event else {
                    unreachable!()
                };
                assert!(
                    answer.replayed,
                    "{} had committed: its retry is a replay: {answer:?}",
                    d.key
                );
                assert_eq!(
                    (answer.body["position"].as_i64(), money(&answer.body["balance"])),
                    (Some(event.position), p.new_balance.value()),
                    "{}: the replay is the answer the kill swallowed",
                    d.key
                );
            }
            _ => assert!(!answer.replayed, "{} had not committed: {answer:?}", d.key),
        }
    }
    let after_retry = logged(&all_events(&db.store).await);
    for d in &attempts {
        let count = after_retry.get(&d.key).map_or(0, Vec::len);
        assert_eq!(count, 1, "{} takes effect exactly once after its retry", d.key);
    }
    eprintln!(
        "{} deposits: {acked} acknowledged before the kill, {replayed} of the rest had committed",
        attempts.len()
    );

    // Conservation: balances are the sums of the deposits in the log, as
    // served by the restarted process and as folded afresh.
    let mut per_wallet: BTreeMap<String, Decimal> = BTreeMap::new();
    for d in &attempts {
        *per_wallet.entry(d.wallet.clone()).or_default() += d.amount;
    }
    let logged_total: Decimal = after_retry
        .values()
        .flatten()
        .map(|e| e.event.amount().unwrap().value())
        .sum();
    let mut served_total = Decimal::ZERO;
    for (wallet, want) in &per_wallet {
        let served = get(&http, &format!("{base}/wallet/{wallet}")).await;
        assert_eq!(served.status, StatusCode::OK, "{served:?}");
        assert_eq!(money(&served.body["balance"]), *want, "{wallet} as served");
        assert_eq!(folded_balance(&db.store, wallet).await, *want, "{wallet} folded");
        served_total += money(&served.body["balance"]);
    }
    assert_eq!(
        served_total, logged_total,
        "the balances hold exactly the logged deposits"
    );

    // The projections resume where the killed process left them, and apply
    // every event exactly once across the crash: stats equal the log.
    let head = db.store.head_position().await.unwrap();
    for (wallet, want) in &per_wallet {
        let history_url = format!("{base}/wallet/{wallet}/history?minPosition={head}");
        eventually(
            &format!("{wallet} history reaches {head}"),
            Duration::from_secs(60),
            || async {
                let answer = get(&http, &history_url).await;
                (answer.status == StatusCode::OK && answer.projection_position >= Some(head)).then_some(())
            },
        )
        .await;
        let stats = get(&http, &format!("{base}/wallet/{wallet}/stats?minPosition={head}")).await;
        assert_eq!(stats.status, StatusCode::OK, "{stats:?}");
        assert!(stats.projection_position >= Some(head), "{stats:?}");
        let deposits = attempts.iter().filter(|d| &d.wallet == wallet).count();
        assert_eq!(
            (
                money(&stats.body["totalDeposited"]),
                stats.body["depositCount"].as_u64()
            ),
            (*want, Some(deposits as u64)),
            "{wallet}: stats count every deposit once"
        );
    }
}
