//! The RabbitMQ fan-out against the real broker and databases: the relay's
//! order, completeness and crash safety, one active relay, and the worker's
//! exactly-once application with dead letters and replay.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::broker::{amqp_url, topology, via_proxy, Observer, TcpProxy};
use common::TestDb;
use wallet::aggregate::{Amount, WalletId};
use wallet::broker::relay::{self, Relay};
use wallet::broker::worker::Worker;
use wallet::broker::{dlq, EventMessage, Topology};
use wallet::ledger::Ledger;
use wallet::probe::Probed;
use wallet::projections::{FraudRules, Projections};
use wallet::store::{EventStore, Position};

const WAIT: Duration = Duration::from_secs(60);

fn id(s: &str) -> WalletId {
    WalletId::parse(s).unwrap()
}

fn amount(s: &str) -> Amount {
    Amount::parse(s).unwrap()
}

async fn all_positions(store: &EventStore) -> Vec<Position> {
    let mut out = Vec::new();
    loop {
        let batch = store.read_all(out.last().copied().unwrap_or(0), 1000).await.unwrap();
        if batch.is_empty() {
            return out;
        }
        out.extend(batch.iter().map(|e| e.position));
    }
}

fn positions(messages: &[EventMessage]) -> Vec<Position> {
    messages.iter().map(|m| m.position).collect()
}

fn distinct(messages: &[EventMessage]) -> BTreeSet<Position> {
    messages.iter().map(|m| m.position).collect()
}

/// Concurrent writers over a few wallets (deposits, withdrawals, transfers).
async fn write_load(store: &EventStore, writers: usize, per_writer: usize) {
    let ledger = Arc::new(Ledger::new(store.clone()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let ledger = ledger.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let me = id(&format!("w{}", w % 4));
                let other = id(&format!("w{}", (w + 1) % 4));
                match i % 3 {
                    0 => drop(ledger.deposit(me, amount("10.50"), None).await),
                    1 => drop(ledger.withdraw(me, amount("1.25"), None).await),
                    _ => drop(ledger.transfer(me, other, amount("2"), None).await),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Every committed event reaches a bound queue exactly once, in position
/// order, including one whose append was held open while others waited.
async fn relay_delivers_every_event_once_in_order(db: TestDb) {
    let topology = topology();
    let mut observer = Observer::bind(&topology).await;
    let relay = tokio::spawn(Relay::new(db.store.clone(), &amqp_url(), topology.clone()).run());

    let ledger = Ledger::new(db.store.clone());
    ledger.deposit(id("held"), amount("1"), None).await.unwrap();
    // A held-open append: the writers behind it wait, the relay must not
    // publish past it.
    let held = common::begin_deposit(&db.store, "held", "2").await;
    let writers = {
        let store = db.store.clone();
        tokio::spawn(async move { write_load(&store, 8, 30).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.commit().await.unwrap();
    writers.await.unwrap();

    let expected = all_positions(&db.store).await;
    let got = observer.collect_until(WAIT, |m| m.len() >= expected.len()).await;
    assert_eq!(positions(&got), expected, "each event once, in log order");
    // Nothing more arrives: no duplicates after the fact.
    let extra = observer
        .collect_until(Duration::from_millis(500), |m| !m.is_empty())
        .await;
    assert!(
        extra.is_empty(),
        "duplicates after a clean run: {:?}",
        positions(&extra)
    );
    // Once everything is confirmed and the relay is idle, its checkpoint
    // reaches the head: a restart would publish nothing again.
    let head = *expected.last().unwrap();
    let mut saved = 0;
    for _ in 0..100 {
        saved = relay::checkpoint(&db.store, &topology).await.unwrap();
        if saved >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        saved, head,
        "the checkpoint covers every confirmed event and nothing more"
    );
    relay.abort();
}

/// Two relays on one log: exactly one publishes; when it dies the other
/// takes over from the checkpoint.
async fn one_relay_is_active_and_a_standby_takes_over(db: TestDb) {
    let topology = topology();
    let mut observer = Observer::bind(&topology).await;
    let a = Relay::new(db.store.clone(), &amqp_url(), topology.clone());
    let b = Relay::new(db.store.clone(), &amqp_url(), topology.clone());
    let (ga, gb) = (a.gauges.clone(), b.gauges.clone());
    let ta = tokio::spawn(a.run());
    let tb = tokio::spawn(b.run());

    write_load(&db.store, 4, 30).await;
    let expected = all_positions(&db.store).await;
    let got = observer.collect_until(WAIT, |m| m.len() >= expected.len()).await;
    assert_eq!(positions(&got), expected, "two relays, still each event once");
    let active_a = ga.active.load(std::sync::atomic::Ordering::SeqCst);
    let active_b = gb.active.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        active_a != active_b,
        "exactly one relay is active (a: {active_a}, b: {active_b})"
    );
    let (leader, standby_gauges, standby) = if active_a { (ta, gb, tb) } else { (tb, ga, ta) };
    assert_eq!(standby_gauges.published.load(std::sync::atomic::Ordering::SeqCst), 0);

    // Wait for the leader to save its checkpoint, then kill it.
    let head = *expected.last().unwrap();
    for _ in 0..100 {
        if relay::checkpoint(&db.store, &topology).await.unwrap() >= head {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    leader.abort();
    let _ = leader.await;
    write_load(&db.store, 2, 10).await;
    let all = all_positions(&db.store).await;
    let more = observer
        .collect_until(WAIT, |m| distinct(m).len() >= all.len() - expected.len())
        .await;
    standby.abort();
    assert!(
        standby_gauges.active.load(std::sync::atomic::Ordering::SeqCst),
        "the standby took over"
    );
    let fresh: BTreeSet<Position> = all.iter().copied().filter(|p| *p > head).collect();
    assert!(
        fresh.is_subset(&distinct(&more)),
        "the standby published what came after"
    );
    assert!(more.windows(2).all(|w| w[0].position < w[1].position), "in order");
}

/// A write's `traceparent` reaches its events' messages: in the body's
/// metadata and as the AMQP header a consumer continues its trace from.
async fn a_writes_trace_context_travels_with_its_messages(db: TestDb) {
    let topology = topology();
    let mut observer = Observer::bind(&topology).await;
    let relay = tokio::spawn(Relay::new(db.store.clone(), &amqp_url(), topology.clone()).run());
    let base = common::serve(db.store.clone()).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = reqwest::Client::new()
        .post(format!("{base}/wallet/traced/deposit"))
        .header("traceparent", traceparent)
        .json(&serde_json::json!({"amount": "5"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let got = observer.collect_until(WAIT, |m| m.len() >= 2).await;
    assert_eq!(got.len(), 2, "WalletCreated and FundsDeposited");
    for (message, header) in got.iter().zip(&observer.traceparents) {
        assert_eq!(
            message.metadata.traceparent.as_deref(),
            Some(traceparent),
            "{message:?}"
        );
        assert_eq!(header.as_deref(), Some(traceparent), "the AMQP header");
    }
    relay.abort();
}

on_both_backends!(
    a_writes_trace_context_travels_with_its_messages,
    relay_delivers_every_event_once_in_order,
    one_relay_is_active_and_a_standby_takes_over
);

/// Abort the relay mid-stream and start another: nothing is missing, and
/// the only duplicates are past the checkpoint it had stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_killed_mid_stream_resumes_from_its_checkpoint() {
    let db = common::postgres().await;
    wallet::seed::seed(&db.store, 50, 5000, |_| {}).await.unwrap();
    let expected = all_positions(&db.store).await;
    let topology = topology();
    let mut observer = Observer::bind(&topology).await;

    let first = tokio::spawn(
        Relay::new(db.store.clone(), &amqp_url(), topology.clone())
            .with_window(64)
            .run(),
    );
    let mut got = observer.collect_until(WAIT, |m| m.len() >= 1500).await;
    first.abort();
    let _ = first.await;
    let checkpoint = relay::checkpoint(&db.store, &topology).await.unwrap();
    assert!(checkpoint < *expected.last().unwrap(), "stopped mid-stream");

    let second = tokio::spawn(Relay::new(db.store.clone(), &amqp_url(), topology.clone()).run());
    let all: BTreeSet<Position> = expected.iter().copied().collect();
    let rest = observer
        .collect_until(WAIT, |m| {
            let mut seen = distinct(&got);
            seen.extend(m.iter().map(|x| x.position));
            seen.len() >= all.len()
        })
        .await;
    second.abort();
    got.extend(rest);
    assert_eq!(distinct(&got), all, "no event missing");
    let mut counts: HashMap<Position, usize> = HashMap::new();
    for m in &got {
        *counts.entry(m.position).or_default() += 1;
    }
    for (position, n) in counts {
        assert!(
            n == 1 || position > checkpoint,
            "position {position} delivered {n} times although the checkpoint {checkpoint} covered it"
        );
    }
}

/// Under a steady write load the broker connection is cut, then the broker
/// is unreachable for a while, then cut again: writes keep succeeding, the
/// relay reconnects each time and catches up, and every event arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_survives_broker_cuts_and_outages_under_write_load() {
    let db = common::postgres().await;
    let topology = topology();
    let mut observer = Observer::bind(&topology).await;
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let relay = Relay::new(db.store.clone(), &via_proxy(&proxy), topology.clone()).with_window(32);
    let gauges = relay.gauges.clone();
    let relay = tokio::spawn(relay.run());

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (ledger, stop, writes) = (Ledger::new(db.store.clone()), stop.clone(), writes.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                ledger
                    .deposit(id("steady"), amount("1"), None)
                    .await
                    .expect("writes never need the broker");
                writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let count = || writes.load(std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.set_down(true);
    let before_outage = count();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(count() > before_outage, "writes went on while the broker was away");
    proxy.set_down(false);
    tokio::time::sleep(Duration::from_millis(700)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.unwrap();

    let expected: BTreeSet<Position> = all_positions(&db.store).await.into_iter().collect();
    let got = observer
        .collect_until(WAIT, |m| distinct(m).len() >= expected.len())
        .await;
    relay.abort();
    assert_eq!(distinct(&got), expected, "every event arrived despite the cuts");
    let sessions = gauges.sessions.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sessions >= 3,
        "the relay reconnected after each cut ({sessions} sessions)"
    );
}

/// Waits until every projection's checkpoint reaches `head`.
async fn wait_for_worker(projections: &Projections, head: Position) {
    for _ in 0..600 {
        let status = projections.status().await.unwrap();
        if status.iter().all(|s| s.checkpoint >= head) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("worker did not reach {head}: {:?}", projections.status().await.unwrap());
}

async fn wait_for_unparked(projections: &Projections) {
    for _ in 0..600 {
        if projections.status().await.unwrap().iter().all(|s| s.parked == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("still parked: {:?}", projections.status().await.unwrap());
}

async fn assert_equal_to_rebuild(projections: &Projections) {
    for name in projections.names() {
        let differences = projections.verify(name, 20).await.unwrap();
        assert!(differences.is_empty(), "{name} differs from a rebuild: {differences:?}");
    }
}

/// Relay and worker under concurrent writes: the worker's read models equal
/// a rebuild from the log, and an extra queue saw every event in order.
async fn the_worker_builds_the_read_models_a_rebuild_would(db: TestDb) {
    let topology = topology();
    let mut observer = Observer::bind(&topology).await;
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let relay = tokio::spawn(Relay::new(db.store.clone(), &amqp_url(), topology.clone()).run());
    let worker = tokio::spawn(
        Worker::new(projections.clone(), &amqp_url(), topology.clone())
            .with_prefetch(32)
            .run(),
    );

    write_load(&db.store, 8, 40).await;
    let expected = all_positions(&db.store).await;
    wait_for_worker(&projections, *expected.last().unwrap()).await;
    assert_equal_to_rebuild(&projections).await;
    let got = observer.collect_until(WAIT, |m| m.len() >= expected.len()).await;
    assert_eq!(positions(&got), expected);
    assert!(dlq::list(&amqp_url(), &topology, 10).await.unwrap().is_empty());
    relay.abort();
    worker.abort();
}

on_both_backends!(the_worker_builds_the_read_models_a_rebuild_would);

/// A message the worker cannot apply goes to the DLQ with its reason; the
/// wallet's later events wait behind it, other wallets go on; after the
/// fix, `dlq replay` applies them in order and the read models equal a
/// rebuild. A body that is not an event at all is dead-lettered too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_message_is_dead_lettered_and_replayed_after_the_fix() {
    let db = common::postgres().await;
    let topology = topology();
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let relay = tokio::spawn(Relay::new(db.store.clone(), &amqp_url(), topology.clone()).run());
    let worker = Worker::new(projections.clone(), &amqp_url(), topology.clone());
    let fault = worker.fault.clone();
    let worker = tokio::spawn(worker.run());

    let ledger = Ledger::new(db.store.clone());
    ledger.deposit(id("sick"), amount("100"), None).await.unwrap();
    ledger.deposit(id("well"), amount("100"), None).await.unwrap();
    wait_for_worker(&projections, db.store.head_position().await.unwrap()).await;

    // From now on the worker cannot apply "sick"'s events.
    fault.fail_wallet("sick");
    let poison = ledger
        .withdraw(id("sick"), amount("10"), None)
        .await
        .unwrap()
        .receipt
        .position;
    ledger.deposit(id("well"), amount("1"), None).await.unwrap();
    ledger.withdraw(id("sick"), amount("5"), None).await.unwrap();
    ledger
        .transfer(id("sick"), id("well"), amount("2"), None)
        .await
        .unwrap();
    ledger.deposit(id("well"), amount("3"), None).await.unwrap();
    let head = db.store.head_position().await.unwrap();
    wait_for_worker(&projections, head).await;

    let letters = dlq::list(&amqp_url(), &topology, 100).await.unwrap();
    assert_eq!(letters.len(), 3, "the three events of sick, nothing else: {letters:?}");
    assert_eq!(letters[0].position, Some(poison));
    assert!(letters.iter().all(|l| l.wallet_id.as_deref() == Some("sick")));
    assert!(
        letters[0].reason.as_deref().unwrap_or("").contains("injected fault"),
        "the reason is kept: {letters:?}"
    );
    // The healthy wallet is complete, the sick one stopped before the poison.
    let well: serde_json::Value =
        serde_json::from_str(&projections.get("stats", "s/well").await.unwrap().unwrap()).unwrap();
    assert_eq!(well["totalDeposited"], "104.0000");
    assert_eq!(well["totalTransferredIn"], "2.0000");
    let sick: serde_json::Value =
        serde_json::from_str(&projections.get("stats", "s/sick").await.unwrap().unwrap()).unwrap();
    assert_eq!(sick["withdrawalCount"], 0);
    assert!(!projections.verify("stats", 5).await.unwrap().is_empty());

    // Replaying before the fix parks them again, in order.
    let replayed = dlq::replay(&amqp_url(), &topology, &[], 100).await.unwrap();
    assert_eq!(replayed.len(), 3);
    for _ in 0..100 {
        if dlq::list(&amqp_url(), &topology, 100).await.unwrap().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = dlq::list(&amqp_url(), &topology, 100).await.unwrap();
    assert_eq!(
        again.iter().map(|l| l.position).collect::<Vec<_>>(),
        letters.iter().map(|l| l.position).collect::<Vec<_>>()
    );

    // The fix, then the replay: every read model equals a rebuild.
    fault.clear();
    let replayed = dlq::replay(&amqp_url(), &topology, &[], 100).await.unwrap();
    assert_eq!(replayed.len(), 3);
    wait_for_unparked(&projections).await;
    assert_equal_to_rebuild(&projections).await;
    assert!(dlq::list(&amqp_url(), &topology, 100).await.unwrap().is_empty());
    let sick: serde_json::Value =
        serde_json::from_str(&projections.get("stats", "s/sick").await.unwrap().unwrap()).unwrap();
    assert_eq!(sick["withdrawalCount"], 2);
    relay.abort();
    worker.abort();
}

/// A trigger that refuses every stats row of wallet "bad" (as a database
/// constraint would, for ever); the test's pool, to drop it with.
async fn refuse_stats_of_bad(db: &TestDb) -> sqlx::PgPool {
    let pool = match &db.store {
        EventStore::Postgres(s) => s.pool().clone(),
        EventStore::Sqlite(_) => unreachable!("a PostgreSQL test"),
    };
    for statement in [
        "CREATE FUNCTION refuse_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.wallet_id = 'bad' THEN RAISE EXCEPTION 'stats of bad refused by trigger'; END IF; \
         RETURN NEW; END $$",
        "CREATE TRIGGER refuse_bad BEFORE INSERT OR UPDATE ON rm_stats FOR EACH ROW EXECUTE FUNCTION refuse_bad()",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    pool
}

/// A database error that always recurs for one wallet (a trigger refusing
/// its stats row) must not stall the others: after a few attempts the
/// worker parks that wallet and dead-letters its messages with the
/// database's reason; after the fix a replay applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wallet_the_database_keeps_refusing_is_parked_and_the_others_go_on() {
    let db = common::postgres().await;
    let topology = topology();
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let pool = refuse_stats_of_bad(&db).await;
    let relay = tokio::spawn(Relay::new(db.store.clone(), &amqp_url(), topology.clone()).run());
    let worker = tokio::spawn(Worker::new(projections.clone(), &amqp_url(), topology.clone()).run());

    let ledger = Ledger::new(db.store.clone());
    for wallet in ["good1", "bad", "good2"] {
        ledger.deposit(id(wallet), amount("100"), None).await.unwrap();
    }
    ledger.withdraw(id("bad"), amount("1"), None).await.unwrap();
    ledger.deposit(id("good1"), amount("5"), None).await.unwrap();
    let head = db.store.head_position().await.unwrap();
    wait_for_worker(&projections, head).await;

    let good: serde_json::Value =
        serde_json::from_str(&projections.get("stats", "s/good1").await.unwrap().unwrap()).unwrap();
    assert_eq!(good["totalDeposited"], "105.0000", "other wallets move on");
    let letters = dlq::list(&amqp_url(), &topology, 100).await.unwrap();
    assert_eq!(letters.len(), 3, "bad's three events, nothing else: {letters:?}");
    assert!(
        letters.iter().all(|l| l.wallet_id.as_deref() == Some("bad")),
        "{letters:?}"
    );
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("stats of bad refused by trigger"),
        "the database's reason is kept: {letters:?}"
    );

    // The fix, then the replay: every read model equals a rebuild.
    sqlx::query("DROP TRIGGER refuse_bad ON rm_stats")
        .execute(&pool)
        .await
        .unwrap();
    let replayed = dlq::replay(&amqp_url(), &topology, &[], 100).await.unwrap();
    assert_eq!(replayed.len(), 3);
    wait_for_unparked(&projections).await;
    assert_equal_to_rebuild(&projections).await;
    relay.abort();
    worker.abort();
}

/// A body that is not an event message is dead-lettered with its reason,
/// and the worker goes on with the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_garbage_message_is_dead_lettered_and_the_worker_goes_on() {
    let db = common::postgres().await;
    let topology = topology();
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    // Publish garbage and a forged event far past the log's head first,
    // then start relay and worker.
    publish_raw(&topology, b"not json at all").await;
    let forged = serde_json::json!({
        "id": uuid::Uuid::new_v4(), "type": "FundsDeposited", "occurredAt": "2026-01-01T00:00:00Z",
        "payload": {"walletId": "w0", "amount": "1.0000", "newBalance": "1.0000"},
        "position": 1_000_000_000i64, "walletId": "w0", "version": 1
    });
    publish_raw(&topology, forged.to_string().as_bytes()).await;
    let relay = tokio::spawn(Relay::new(db.store.clone(), &amqp_url(), topology.clone()).run());
    let worker = tokio::spawn(Worker::new(projections.clone(), &amqp_url(), topology.clone()).run());
    write_load(&db.store, 2, 9).await;
    let head = db.store.head_position().await.unwrap();
    wait_for_worker(&projections, head).await;
    let letters = dlq::list(&amqp_url(), &topology, 10).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(
        letters[1]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("beyond the log head"),
        "{letters:?}"
    );
    // The forged position moved no checkpoint past the real log.
    for s in projections.status().await.unwrap() {
        assert!(s.checkpoint <= head, "{s:?}");
    }
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("not an event message"),
        "{letters:?}"
    );
    // Listing changed nothing.
    assert_eq!(dlq::list(&amqp_url(), &topology, 10).await.unwrap(), letters);
    assert_equal_to_rebuild(&projections).await;
    relay.abort();
    worker.abort();
}

async fn publish_raw(topology: &Topology, body: &[u8]) {
    let connection = common::broker::connect(&amqp_url()).await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology.declare(&channel).await.unwrap();
    channel
        .basic_publish(
            &topology.exchange,
            "",
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A half-open broker link (the relay's connection goes silent without
/// closing; new connections still work): `/ready` turns 503 within seconds
/// although a fresh broker connection would answer, the AMQP heartbeat
/// drops the dead link, the relay reconnects by itself and every event
/// arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_half_open_broker_link_turns_ready_off_and_publishing_resumes() {
    use reqwest::StatusCode;
    let db = common::postgres().await;
    let topology = topology();
    let mut observer = Observer::bind(&topology).await;
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let mut state = wallet::api::AppState::new(db.store.clone(), projections);
    // Heartbeat 3 s: lapin drops a link silent for 6 s.
    let url = wallet::broker::with_heartbeat(&via_proxy(&proxy), 3);
    let relay = Relay::new(db.store.clone(), &url, topology.clone())
        .with_wake(state.ledger.appended())
        .with_stall_after(Duration::from_secs(1));
    let gauges = relay.gauges.clone();
    state.relay = Some(gauges.clone());
    // /ready's own broker check goes straight to the broker: only the
    // relay's progress can turn it off here.
    state.broker = Some((amqp_url(), topology.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(wallet::api::serve(listener, state, std::future::pending()));
    let relay = tokio::spawn(relay.run());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let deposit = |n: usize| {
        let (http, url) = (http.clone(), format!("{base}/wallet/half-open/deposit"));
        async move {
            let r = http
                .post(url)
                .json(&serde_json::json!({"amount": "1", "requestId": format!("h{n}")}));
            assert_eq!(
                r.send().await.unwrap().status(),
                StatusCode::CREATED,
                "writes never need the broker"
            );
        }
    };
    let ready = || {
        let (http, url) = (http.clone(), format!("{base}/ready"));
        async move { http.get(url).send().await.unwrap() }
    };
    for n in 0..5 {
        deposit(n).await;
    }
    let head = db.store.head_position().await.unwrap() as usize;
    let before = observer.collect_until(WAIT, |m| distinct(m).len() >= head).await;
    assert_eq!(distinct(&before).len(), head, "delivered before the fault");
    assert_eq!(ready().await.status(), StatusCode::OK);

    proxy.stall_open_connections();
    let stalled_at = tokio::time::Instant::now();
    for n in 5..10 {
        deposit(n).await;
    }
    let refused = loop {
        let r = ready().await;
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            break r;
        }
        assert!(
            stalled_at.elapsed() < Duration::from_secs(15),
            "/ready still 200 with the relay stuck"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let turned_off = stalled_at.elapsed();
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("relay"), "{body}");
    println!("/ready turned 503 {turned_off:?} after the link went silent");

    // Nobody touches the proxy again: the heartbeat ends the dead session.
    loop {
        if ready().await.status() == StatusCode::OK {
            break;
        }
        assert!(stalled_at.elapsed() < Duration::from_secs(60), "/ready never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "/ready back to 200 {:?} after the link went silent",
        stalled_at.elapsed()
    );
    let expected: BTreeSet<Position> = all_positions(&db.store).await.into_iter().collect();
    let after = observer
        .collect_until(WAIT, |m| distinct(m).len() + before.len() >= expected.len())
        .await;
    relay.abort();
    let got: BTreeSet<Position> = distinct(&before).union(&distinct(&after)).copied().collect();
    assert_eq!(got, expected, "every event arrived");
    assert!(
        gauges.sessions.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the relay reconnected"
    );
}

/// GET `path` on a probe listener: its status and body.
async fn probe(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the probe listener answers {path}: {e}"));
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Polls `path` until it answers `status`; its body then.
async fn probe_until(addr: std::net::SocketAddr, path: &str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (got, body) = probe(addr, path).await;
        if got == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr}{path} never answered {status}; last {got} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn probes(probed: Probed) -> std::net::SocketAddr {
    let bind = "127.0.0.1:0".parse().unwrap();
    let (addr, _) = wallet::probe::spawn(bind, probed, std::future::pending())
        .await
        .unwrap();
    addr
}

fn relay_probed(relay: &Relay, db: &TestDb, topology: &Topology) -> Probed {
    Probed::Relay {
        gauges: relay.gauges.clone(),
        store: db.store.clone(),
        topology: topology.clone(),
    }
}

/// The value of an unlabelled sample in Prometheus text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A worker and two relays with probe listeners: each is alive, ready once
/// it does its job (consuming, publishing, standing by), and scraped under
/// `wallet_` names with HELP texts; when the broker goes away the worker
/// and the leader say 503, and 200 again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_and_relays_answer_probes_from_their_live_state() {
    let db = common::postgres().await;
    let topology = topology();
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let leader = Relay::new(db.store.clone(), &via_proxy(&proxy), topology.clone());
    let leader_at = probes(relay_probed(&leader, &db, &topology)).await;
    let leader = tokio::spawn(leader.run());
    assert!(probe_until(leader_at, "/ready", 200).await.contains("publishing"));
    let standby = Relay::new(db.store.clone(), &amqp_url(), topology.clone());
    let standby_at = probes(relay_probed(&standby, &db, &topology)).await;
    let standby = tokio::spawn(standby.run());
    assert!(probe_until(standby_at, "/ready", 200).await.contains("standby"));

    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    let worker = Worker::new(projections.clone(), &via_proxy(&proxy), topology.clone());
    let worker_at = probes(Probed::Worker {
        gauges: worker.gauges.clone(),
        projections,
    })
    .await;
    let worker = tokio::spawn(worker.run());
    for at in [leader_at, standby_at, worker_at] {
        assert_eq!(probe(at, "/health").await.0, 200);
    }
    assert!(probe_until(worker_at, "/ready", 200).await.contains("consuming"));

    let ledger = Ledger::new(db.store.clone());
    for _ in 0..3 {
        ledger.deposit(id("probed"), amount("5"), None).await.unwrap();
    }
    // WalletCreated and three deposits, applied once each.
    let deadline = tokio::time::Instant::now() + WAIT;
    let worker_text = loop {
        let (status, text) = probe(worker_at, "/metrics").await;
        assert_eq!(status, 200);
        if sample(&text, "wallet_worker_events_applied_total") == Some(4.0) {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "applied never reached 4: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for name in [
        "wallet_worker_events_applied_total",
        "wallet_worker_dead_letters_total",
        "wallet_worker_reconnects_total",
        "wallet_projection_lag_events",
    ] {
        assert!(
            worker_text.contains(&format!("# HELP {name} ")),
            "{name}: {worker_text}"
        );
    }
    assert!(
        worker_text.contains("wallet_projection_lag_events{projection=\"history\"} 0"),
        "{worker_text}"
    );
    let (_, text) = probe(leader_at, "/metrics").await;
    for name in [
        "wallet_relay_published_total",
        "wallet_relay_lag_events",
        "wallet_relay_reconnects_total",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
    }
    assert_eq!(sample(&text, "wallet_relay_active"), Some(1.0), "{text}");
    assert!(sample(&text, "wallet_relay_published_total") >= Some(4.0), "{text}");
    let (_, text) = probe(standby_at, "/metrics").await;
    assert_eq!(sample(&text, "wallet_relay_standby"), Some(1.0), "{text}");

    // The broker goes away: the processes behind the proxy are not ready.
    proxy.set_down(true);
    for at in [worker_at, leader_at] {
        let body = probe_until(at, "/ready", 503).await;
        assert!(body.contains("broker"), "{body}");
    }
    assert_eq!(probe(worker_at, "/health").await.0, 200, "alive all the same");
    proxy.set_down(false);
    for at in [worker_at, leader_at] {
        probe_until(at, "/ready", 200).await;
    }
    let (_, text) = probe(worker_at, "/metrics").await;
    assert!(sample(&text, "wallet_worker_reconnects_total") >= Some(1.0), "{text}");
    for task in [leader, standby, worker] {
        task.abort();
    }
}

/// Before its first connection succeeds a worker is alive but not ready,
/// and says why.
#[tokio::test]
async fn a_worker_that_cannot_reach_the_broker_is_not_ready() {
    let db = common::postgres().await;
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    // Nothing listens on port 1.
    let worker = Worker::new(projections.clone(), "amqp://guest:guest@127.0.0.1:1/%2f", topology());
    let at = probes(Probed::Worker {
        gauges: worker.gauges.clone(),
        projections,
    })
    .await;
    let worker = tokio::spawn(worker.run());
    assert_eq!(probe(at, "/health").await.0, 200);
    let body = probe_until(at, "/ready", 503).await;
    let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        problem["detail"].as_str().unwrap_or_default().contains("broker"),
        "{problem}"
    );
    // Still not ready once it has tried and failed.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, body) = probe(at, "/ready").await;
    assert_eq!(status, 503, "{body}");
    worker.abort();
}

/// A message the broker confirmed and then lost (a node gone with it) costs
/// the read models time, never an event: the worker reads a gap inside what
/// it receives from the log, and, with its queue idle, catches up from the
/// log to the relay's confirmed checkpoint (the lost tail).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_the_broker_lost_are_read_from_the_log() {
    let db = common::postgres().await;
    let topology = topology();
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let ledger = Ledger::new(db.store.clone());
    for i in 0..12 {
        ledger
            .deposit(id(&format!("gap{}", i % 3)), amount("5"), None)
            .await
            .unwrap();
    }
    let events = db.store.read_all(0, 1000).await.unwrap();
    let head = events.last().unwrap().position;
    // What the broker kept: all but two events in the middle and the tail.
    let lost = [events[4].position, events[5].position];
    let kept: Vec<_> = events[..events.len() - 3]
        .iter()
        .filter(|e| !lost.contains(&e.position))
        .collect();
    publish_as_the_relay(&topology, kept).await;
    let worker = tokio::spawn(Worker::new(projections.clone(), &amqp_url(), topology.clone()).run());
    wait_for_worker(&projections, events[events.len() - 4].position).await;
    // The relay had the tail confirmed too; the broker lost it.
    wallet::projections::advance_checkpoint(&db.store, &format!("relay:{}", topology.exchange), head)
        .await
        .unwrap();
    wait_for_worker(&projections, head).await;
    assert_equal_to_rebuild(&projections).await;
    worker.abort();
}

/// Publishes `events` as the relay does, each confirmed.
async fn publish_as_the_relay<'a>(
    topology: &Topology,
    events: impl IntoIterator<Item = &'a wallet::store::RecordedEvent>,
) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let connection = common::broker::connect(&amqp_url()).await;
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    topology.declare(&channel).await.unwrap();
    for e in events {
        let m = EventMessage::of(e);
        let confirm = channel
            .basic_publish(
                &topology.exchange,
                "",
                BasicPublishOptions::default(),
                &m.body(),
                m.properties(),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack());
    }
}

/// An event the broker lost is read from the log and goes through the
/// worker's checks like a delivered one: of a wallet the database refuses,
/// it is parked and dead-lettered (its wallet's later events wait behind
/// it), the other wallets go on, and after the fix a replay applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_event_the_database_refuses_is_dead_lettered_like_a_delivered_one() {
    let db = common::postgres().await;
    let topology = topology();
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let pool = refuse_stats_of_bad(&db).await;
    let ledger = Ledger::new(db.store.clone());
    ledger.deposit(id("good"), amount("10"), None).await.unwrap();
    ledger.deposit(id("bad"), amount("100"), None).await.unwrap();
    ledger.withdraw(id("bad"), amount("1"), None).await.unwrap();
    ledger.deposit(id("good"), amount("5"), None).await.unwrap();
    ledger.deposit(id("good"), amount("5"), None).await.unwrap();
    let events = db.store.read_all(0, 1000).await.unwrap();
    let head = events.last().unwrap().position;
    let bad: Vec<Position> = events
        .iter()
        .filter(|e| e.stream.as_str() == "bad")
        .map(|e| e.position)
        .collect();
    let lost = bad[0];
    publish_as_the_relay(&topology, events.iter().filter(|e| e.position != lost)).await;

    let worker = tokio::spawn(Worker::new(projections.clone(), &amqp_url(), topology.clone()).run());
    wait_for_worker(&projections, head).await;
    let letters = dlq::list(&amqp_url(), &topology, 100).await.unwrap();
    assert_eq!(
        letters.iter().map(|l| l.position).collect::<Vec<_>>(),
        bad.iter().copied().map(Some).collect::<Vec<_>>(),
        "the lost event first, then bad's others: {letters:?}"
    );
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("refused by trigger"),
        "the database's reason is kept: {letters:?}"
    );
    let good: serde_json::Value =
        serde_json::from_str(&projections.get("stats", "s/good").await.unwrap().unwrap()).unwrap();
    assert_eq!(good["totalDeposited"], "20.0000", "other wallets move on");

    sqlx::query("DROP TRIGGER refuse_bad ON rm_stats")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        dlq::replay(&amqp_url(), &topology, &[], 100).await.unwrap().len(),
        bad.len()
    );
    wait_for_unparked(&projections).await;
    assert_equal_to_rebuild(&projections).await;
    worker.abort();
}

/// `/ready` with a cluster's node list: a node that accepts connections
/// and never answers (a frozen host) must not use up the check while
/// another node answers; with every node silent it says so in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_asks_every_broker_node_at_once() {
    use reqwest::StatusCode;
    let db = common::postgres().await;
    let silent = TcpProxy::start("127.0.0.1:5672").await;
    silent.set_stalled(true);
    let projections = Arc::new(Projections::new(db.store.clone(), FraudRules::default()));
    projections.ensure().await.unwrap();
    let mut state = wallet::api::AppState::new(db.store.clone(), projections);
    state.broker = Some((format!("{},{}", via_proxy(&silent), amqp_url()), topology()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(wallet::api::serve(listener, state, std::future::pending()));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // Several times: a node list is tried from a different node each time.
    for _ in 0..4 {
        let r = http.get(format!("{base}/ready")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    }

    let mut state = wallet::api::AppState::new(
        db.store.clone(),
        Arc::new(Projections::new(db.store.clone(), FraudRules::default())),
    );
    state.broker = Some((format!("{0},{0}", via_proxy(&silent)), topology()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(wallet::api::serve(listener, state, std::future::pending()));
    let asked = tokio::time::Instant::now();
    let r = http.get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "answered in {:?}",
        asked.elapsed()
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().contains("broker"), "{body}");
}
