//! Losing a machine: two `serve` processes (relaying to RabbitMQ) and a
//! `worker` on a three-node PostgreSQL cluster under pg_auto_failover (one
//! primary, two standbys, a commit waits for ANY 1 of them), under keyed
//! and unkeyed deposits, withdrawals and transfers over 1,000 wallets,
//! every answer logged, while the test kills, freezes and starves the
//! primary and kills the broker node (of three, quorum queues) leading the
//! worker's queue. Afterwards the surviving log is held to every answer: each 201
//! is in it at its position, nothing answered 503 UNAVAILABLE is, each
//! OUTCOME_UNKNOWN retried with its key takes effect exactly once, `wallet
//! verify` is clean, money is conserved, and every position reached the
//! worker, whose read models equal a rebuild. Other tests: reads from
//! standbys, what the quorum fence guards against, a broker node's loss.
//!
//! Each test starts its own cluster (`deploy/ha/pg-cluster.sh`, ports of
//! its own) and runs alone: a cluster is heavy for two cores.

mod common;

use common::{free_port, Running};
use std::collections::{HashMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ha::PgCluster;
use serde_json::{json, Value};

/// One cluster at a time in this binary.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WALLETS: usize = 1000;
const CLIENTS: usize = 8;
/// Longer than any answer the service can take (its own limit is 34 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);

/// `wallet serve` on the cluster, with `env` on top of the HA settings.
fn serve(url: &str, env: &[(&str, &str)]) -> (Running, String) {
    let port = free_port();
    let mut c = Command::new(env!("CARGO_BIN_EXE_wallet"));
    c.args(["serve", "--bind", &format!("127.0.0.1:{port}")])
        .env("DATABASE_URL", url)
        .env_remove("AMQP_URL")
        .env("REQUIRE_SYNC_STANDBYS", "1")
        .env("RESOLVE_DEADLINE", "20s")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    (
        Running(c.spawn().expect("start wallet serve")),
        format!("http://127.0.0.1:{port}"),
    )
}

async fn wait_ready(base: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{base}/ready")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("serve at {base} did not become ready");
}

#[derive(Debug, Clone)]
enum Op {
    Deposit { wallet: String, amount: u32 },
    Withdraw { wallet: String, amount: u32 },
    Transfer { from: String, to: String, amount: u32 },
}

impl Op {
    fn request(&self, key: Option<&str>) -> (String, Value) {
        let with_key = |mut body: Value| {
            if let Some(k) = key {
                body["requestId"] = json!(k);
            }
            body
        };
        match self {
            Op::Deposit { wallet, amount } => (
                format!("/wallet/{wallet}/deposit"),
                with_key(json!({"amount": amount.to_string()})),
            ),
            Op::Withdraw { wallet, amount } => (
                format!("/wallet/{wallet}/withdraw"),
                with_key(json!({"amount": amount.to_string()})),
            ),
            Op::Transfer { from, to, amount } => (
                format!("/wallet/{from}/transfer"),
                with_key(json!({"toWalletId": to, "amount": amount.to_string()})),
            ),
        }
    }

    /// Events a committed operation writes (the wallets exist already).
    fn events(&self) -> usize {
        match self {
            Op::Transfer { .. } => 2,
            _ => 1,
        }
    }
}

/// One request and what the service answered.
#[derive(Debug, Clone)]
struct Answer {
    op: Op,
    key: Option<String>,
    sent: Instant,
    done: Instant,
    /// 0: no HTTP answer (the connection failed or timed out).
    status: u16,
    code: Option<String>,
    body: Value,
}

impl Answer {
    /// May have been applied: only a retry with the same key is safe.
    fn unknown(&self) -> bool {
        self.status == 0 || self.code.as_deref() == Some("OUTCOME_UNKNOWN")
    }

    fn unavailable(&self) -> bool {
        self.code.as_deref() == Some("UNAVAILABLE")
    }
}

async fn send(client: &reqwest::Client, base: &str, op: &Op, key: Option<&str>) -> Answer {
    let (path, body) = op.request(key);
    let sent = Instant::now();
    let (status, body) = match client.post(format!("{base}{path}")).json(&body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
        Err(_) => (0, Value::Null),
    };
    Answer {
        op: op.clone(),
        key: key.map(str::to_owned),
        sent,
        done: Instant::now(),
        status,
        code: body.get("code").and_then(Value::as_str).map(str::to_owned),
        body,
    }
}

fn wallet(i: usize) -> String {
    format!("w{i:04}")
}

/// A random number below `n` (uuid's random bits: no rand crate needed).
fn below(n: usize) -> usize {
    (uuid::Uuid::new_v4().as_u128() % n as u128) as usize
}

fn random_op() -> Op {
    let amount = 1 + below(20) as u32;
    let (a, b) = (below(WALLETS), below(WALLETS));
    match below(10) {
        0..=3 => Op::Deposit {
            wallet: wallet(a),
            amount,
        },
        4..=6 => Op::Withdraw {
            wallet: wallet(a),
            amount,
        },
        _ => Op::Transfer {
            from: wallet(a),
            to: wallet(if a == b { (b + 1) % WALLETS } else { b }),
            amount,
        },
    }
}

/// A client sending random operations to the servers in turn until `stop`.
async fn client_loop(bases: Vec<String>, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Answer>>>) {
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");
    let mut turn = below(bases.len());
    while !stop.load(Ordering::Relaxed) {
        let op = random_op();
        let key = (below(2) == 0).then(|| uuid::Uuid::new_v4().to_string());
        turn = (turn + 1) % bases.len();
        let answer = send(&client, &bases[turn], &op, key.as_deref()).await;
        let pause = answer.status != 201;
        log.lock().expect("answer log").push(answer);
        if pause {
            // A refused client backs off a little, as a real one would.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Opens every wallet with 1,000 (keyed, retried until it lands).
async fn seed(base: &str) {
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");
    let chunks: Vec<Vec<usize>> = (0..WALLETS)
        .collect::<Vec<_>>()
        .chunks(WALLETS / 8)
        .map(<[usize]>::to_vec)
        .collect();
    let tasks = chunks.into_iter().map(|chunk| {
        let (client, base) = (client.clone(), base.to_owned());
        tokio::spawn(async move {
            for i in chunk {
                let op = Op::Deposit {
                    wallet: wallet(i),
                    amount: 1000,
                };
                let key = format!("seed-{i}");
                for _ in 0..100 {
                    if send(&client, &base, &op, Some(&key)).await.status == 201 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    });
    for t in tasks {
        t.await.expect("seed task");
    }
}

/// What the surviving log holds of one request.
#[derive(Debug, Default)]
struct Logged {
    positions: Vec<i64>,
    streams: HashSet<String>,
}

/// The surviving log, by request id, read on the primary.
async fn read_log(url: &str) -> HashMap<String, Logged> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect to the primary");
    let rows: Vec<(i64, String, Option<String>)> =
        sqlx::query_as("SELECT position, stream_id, metadata->>'requestId' FROM events ORDER BY position")
            .fetch_all(&mut conn)
            .await
            .expect("read the log");
    let mut by_request: HashMap<String, Logged> = HashMap::new();
    for (position, stream, request) in rows {
        let entry = by_request.entry(request.unwrap_or_default()).or_default();
        entry.positions.push(position);
        entry.streams.insert(stream);
    }
    by_request
}

/// Money in = money in the wallets: the deposits less the withdrawals of
/// the log equal the sum of each wallet's last recorded balance.
async fn conserved(url: &str) -> (String, String) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect to the primary");
    sqlx::query_as(
        "SELECT (SELECT COALESCE(SUM(CASE event_type WHEN 'FundsDeposited' THEN (payload->>'amount')::numeric \
                 WHEN 'FundsWithdrawn' THEN -(payload->>'amount')::numeric ELSE 0 END), 0) FROM events)::text, \
                (SELECT COALESCE(SUM(b), 0) FROM (SELECT DISTINCT ON (stream_id) (payload->>'newBalance')::numeric b \
                 FROM events WHERE payload ? 'newBalance' ORDER BY stream_id, version DESC) heads)::text",
    )
    .fetch_one(&mut conn)
    .await
    .expect("sum the log")
}

/// Retries each keyed unknown answer with its key until it is decided.
async fn retry_unknowns(base: &str, answers: &[Answer]) -> Vec<Answer> {
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");
    let mut decided = Vec::new();
    for a in answers.iter().filter(|a| a.unknown() && a.key.is_some()) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let again = send(&client, base, &a.op, a.key.as_deref()).await;
            if !again.unknown() && !again.unavailable() {
                decided.push(again);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a retry of {:?} stayed undecided: {again:?}",
                a.key
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    decided
}

/// What one fault cost: from the fault to the next 201 of a request sent
/// after it, and the OUTCOME_UNKNOWN answers in between.
struct FaultCost {
    name: &'static str,
    unavailable_ms: Option<u128>,
    unknown: usize,
}

fn cost(name: &'static str, at: Instant, answers: &[Answer]) -> FaultCost {
    let next = answers
        .iter()
        .filter(|a| a.status == 201 && a.sent >= at)
        .map(|a| a.done)
        .min();
    let unknown = answers
        .iter()
        .filter(|a| a.unknown() && a.done >= at && next.is_none_or(|n| a.done <= n))
        .count();
    FaultCost {
        name,
        unavailable_ms: next.map(|n| n.duration_since(at).as_millis()),
        unknown,
    }
}

/// Holds the surviving log to every answer given.
fn check_answers(answers: &[Answer], retried: &[Answer], log: &HashMap<String, Logged>) {
    let retried_by_key: HashMap<&str, &Answer> = retried
        .iter()
        .filter_map(|a| a.key.as_deref().map(|k| (k, a)))
        .collect();
    let mut committed = 0;
    for a in answers {
        let request = a
            .key
            .clone()
            .or_else(|| a.body.get("requestId").and_then(Value::as_str).map(str::to_owned));
        let logged = request.as_deref().and_then(|r| log.get(r));
        if a.status == 201 {
            committed += 1;
            let logged = logged.unwrap_or_else(|| panic!("an acknowledged write is not in the log: {a:?}"));
            let position = a.body["position"].as_i64().expect("a 201 names its position");
            assert!(
                logged.positions.contains(&position),
                "{a:?} is not at its position: {logged:?}"
            );
            assert_eq!(
                logged.positions.len(),
                a.op.events(),
                "{a:?} appears more than once: {logged:?}"
            );
        }
        if a.unavailable() {
            if let Some(key) = &a.key {
                // Refused keyed requests are never retried by the clients,
                // so their key in the log would mean the 503 lied.
                assert!(log.get(key).is_none(), "answered 503 UNAVAILABLE yet committed: {a:?}");
            }
        }
        if a.unknown() {
            if let Some(key) = &a.key {
                let again = retried_by_key[key.as_str()];
                let in_log = log.get(key).map_or(0, |l| l.positions.len());
                match again.status {
                    201 => assert_eq!(
                        in_log,
                        a.op.events(),
                        "a retried unknown took effect {in_log} times: {a:?}"
                    ),
                    _ => assert_eq!(in_log, 0, "a retry refused ({again:?}) yet the log has it: {a:?}"),
                }
            }
        }
    }
    assert!(committed > 0, "no write was acknowledged at all");
}

fn verify(url: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_wallet"))
        .arg("verify")
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run wallet verify");
    assert!(
        out.status.success(),
        "wallet verify found discrepancies:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every position of the surviving log reached the worker (through the
/// relay and the broker, across the failovers), and its read models equal
/// a rebuild from the log.
async fn worker_caught_up(url: &str) {
    use wallet::projections::{FraudRules, Projections};
    let store = wallet::config::open_existing(url).await.expect("open the cluster");
    let head = store.head_position().await.expect("the log head");
    let projections = Projections::new(store, FraudRules::default());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !projections
        .status()
        .await
        .expect("status")
        .iter()
        .all(|s| s.checkpoint >= head)
    {
        assert!(
            Instant::now() < deadline,
            "the worker did not reach {head}: {:?}",
            projections.status().await.expect("status")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for name in projections.names() {
        let differences = projections.verify(name, 20).await.expect("verify a read model");
        assert!(differences.is_empty(), "{name} differs from a rebuild: {differences:?}");
    }
}

/// Waits until writes succeed again through `base` (after a fault).
async fn wait_writable(base: &str, limit: Duration) {
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");
    let deadline = Instant::now() + limit;
    let op = Op::Deposit {
        wallet: wallet(0),
        amount: 1,
    };
    loop {
        let key = uuid::Uuid::new_v4().to_string();
        if send(&client, base, &op, Some(&key)).await.status == 201 {
            return;
        }
        assert!(Instant::now() < deadline, "writes did not come back within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_under_load_loses_no_acknowledged_write() {
    let _alone = ALONE.lock().await;
    // A three-node broker with quorum queues (removed at the end): both
    // servers relay (one leads), a worker builds the read models.
    let rabbit = common::ha::RabbitCluster::start();
    let cluster = PgCluster::start();
    let url = cluster.url();
    let amqp = rabbit.urls();
    let exchange = format!("test.{}.events", uuid::Uuid::new_v4().simple());
    let queue = format!("{exchange}.worker.quorum");
    let broker = [
        ("AMQP_URL", amqp.as_str()),
        ("AMQP_EXCHANGE", exchange.as_str()),
        ("AMQP_QUEUE_TYPE", "quorum"),
    ];
    let (_a, a) = serve(&url, &broker);
    let (_b, b) = serve(&url, &broker);
    let mut worker = Command::new(env!("CARGO_BIN_EXE_wallet"));
    worker
        .arg("worker")
        .env("DATABASE_URL", &url)
        .envs(broker)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    let _worker = Running(worker.spawn().expect("start wallet worker"));
    wait_ready(&a).await;
    wait_ready(&b).await;
    seed(&a).await;

    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(client_loop(vec![a.clone(), b.clone()], stop.clone(), log.clone())))
        .collect();
    let settle = || tokio::time::sleep(Duration::from_secs(3));
    settle().await;
    let mut faults: Vec<(&'static str, Instant)> = Vec::new();

    // The primary's machine is lost, twice (each time another node leads).
    for _ in 0..2 {
        let primary = cluster.primary().expect("a primary");
        cluster.kill_node(primary);
        faults.push(("primary machine killed", Instant::now()));
        wait_writable(&a, Duration::from_secs(90)).await;
        settle().await;
        cluster.restart_node(primary);
        cluster.wait_healthy(Duration::from_secs(180));
        settle().await;
    }

    // The broker node leading the worker's queue is lost, twice: it costs
    // the relay and the worker a reconnect, never an event.
    for _ in 0..2 {
        let leader = rabbit.leader_of(&queue).expect("the worker queue has a leader");
        rabbit.kill(leader);
        faults.push(("broker node killed", Instant::now()));
        tokio::time::sleep(Duration::from_secs(8)).await;
        rabbit.restart(leader);
        settle().await;
    }

    // The primary hangs past the failover timeout, then resumes: it must
    // not take writes as a primary again. Twice.
    for _ in 0..2 {
        let primary = cluster.primary().expect("a primary");
        let frozen = cluster.freeze(primary);
        faults.push(("primary frozen past failover", Instant::now()));
        wait_writable(&a, Duration::from_secs(90)).await;
        settle().await;
        cluster.thaw(&frozen);
        cluster.wait_healthy(Duration::from_secs(180));
        settle().await;
    }

    // Both standbys hang and the primary crashes: no quorum, so nothing may
    // be acknowledged until a standby is back.
    let primary = cluster.primary().expect("a primary");
    let standbys: Vec<u8> = (1..=3).filter(|n| *n != primary).collect();
    let frozen: Vec<i32> = standbys.iter().flat_map(|n| cluster.freeze(*n)).collect();
    // From here on no standby can confirm anything (finding the processes
    // to freeze takes a while on a loaded machine: the window starts now).
    let quorum_lost = Instant::now();
    faults.push(("quorum lost, primary crashed", quorum_lost));
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.kill_postmaster(primary);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let quorum_back = Instant::now();
    cluster.thaw(&frozen);
    wait_writable(&a, Duration::from_secs(120)).await;
    cluster.wait_healthy(Duration::from_secs(180));
    settle().await;

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }
    let answers = std::mem::take(&mut *log.lock().expect("answer log"));

    let acknowledged_without_quorum: Vec<&Answer> = answers
        .iter()
        .filter(|x| x.status == 201 && x.sent >= quorum_lost && x.done <= quorum_back)
        .collect();
    assert!(
        acknowledged_without_quorum.is_empty(),
        "{} writes acknowledged while no standby could have them, the first: {:?}",
        acknowledged_without_quorum.len(),
        acknowledged_without_quorum.first()
    );

    let retried = retry_unknowns(&a, &answers).await;
    let primary = cluster.primary().expect("a primary at the end");
    let primary_url = cluster.node_url(primary);
    let surviving = read_log(&primary_url).await;
    check_answers(&answers, &retried, &surviving);
    verify(&url);
    let (moved, held) = conserved(&primary_url).await;
    assert_eq!(
        moved, held,
        "deposits less withdrawals differ from the wallets' balances"
    );
    worker_caught_up(&url).await;

    let costs: Vec<FaultCost> = faults.iter().map(|(name, at)| cost(name, *at, &answers)).collect();
    let count = |f: fn(&Answer) -> bool| answers.iter().filter(|x| f(x)).count();
    for c in &costs {
        eprintln!(
            "failover fault: {}: next 201 after {:?} ms, {} OUTCOME_UNKNOWN before it",
            c.name, c.unavailable_ms, c.unknown
        );
    }
    eprintln!(
        "failover: {} answers: {} x 201, {} x 503 UNAVAILABLE, {} unknown ({} keyed, retried)",
        answers.len(),
        count(|x| x.status == 201),
        count(Answer::unavailable),
        count(Answer::unknown),
        retried.len(),
    );
}

/// Reads from standbys keep read-your-writes: `serve` with
/// `DATABASE_READ_URL` on the cluster answers history, stats and balances with
/// `minPosition` of a write just acknowledged, and never with older state;
/// a consumer paging `/events` there sees exactly the primary's log, no
/// late commit skipped; and the standbys did serve reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standby_reads_never_return_older_state() {
    let _alone = ALONE.lock().await;
    let cluster = PgCluster::start();
    let url = cluster.url();
    let (_serve, base) = serve(&url, &[("DATABASE_READ_URL", url.as_str())]);
    wait_ready(&base).await;
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");
    let get = |path: String| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let r = client.get(format!("{base}{path}")).send().await.expect("a read");
            assert_eq!(r.status(), 200, "GET {path}");
            let at: i64 = r
                .headers()
                .get("x-projection-position")
                .map_or(-1, |v| v.to_str().ok().and_then(|t| t.parse().ok()).unwrap_or(-1));
            (at, r.json::<Value>().await.expect("a JSON body"))
        }
    };
    // A live subscriber from the start: its tail and catch-up read the standbys.
    let mut sse = common::sse::Sse::open(&client, &format!("{base}/events/stream?after=0"), None).await;
    for i in 1..=150 {
        let op = Op::Deposit {
            wallet: "reader".into(),
            amount: 1,
        };
        let wrote = send(&client, &base, &op, None).await;
        assert_eq!(wrote.status, 201, "{wrote:?}");
        let p = wrote.body["position"].as_i64().expect("position");
        let (at, history) = get(format!("/wallet/reader/history?limit=1&minPosition={p}")).await;
        assert!(at >= p, "history answered at {at}, below minPosition {p}");
        assert_eq!(
            history[0]["position"], p,
            "the newest history item is the write just made"
        );
        let (at, stats) = get(format!("/wallet/reader/stats?minPosition={p}")).await;
        assert!(at >= p, "stats answered at {at}, below minPosition {p}");
        assert_eq!(stats["depositCount"], i, "stats after {i} deposits: {stats}");
        let (_, balance) = get(format!("/wallet/reader?minPosition={p}")).await;
        assert_eq!(
            balance["version"],
            i + 1,
            "the balance folded after {i} deposits: {balance}"
        );
        assert_eq!(balance["balance"], format!("{i}.0000"), "{balance}");
    }

    // A late commit: an append held open on the primary while concurrent
    // writes queue behind it; it commits first, at the lower position.
    let primary = cluster.primary().expect("a primary");
    let direct = wallet::store::EventStore::connect(&cluster.node_url(primary))
        .await
        .expect("the primary");
    let held = common::begin_deposit(&direct, "reader", "1").await;
    let behind: Vec<_> = (0..20)
        .map(|n| {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let op = Op::Deposit {
                    wallet: format!("behind{}", n % 4),
                    amount: 1,
                };
                send(&client, &base, &op, None).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    held.commit().await.expect("the held append commits");
    for write in behind {
        let wrote = write.await.expect("a writer");
        assert_eq!(wrote.status, 201, "{wrote:?}");
    }

    let mut expected: Vec<i64> = read_log(&cluster.node_url(primary))
        .await
        .into_values()
        .flat_map(|l| l.positions)
        .collect();
    expected.sort_unstable();
    // Standbys replay within milliseconds; page once they have the head.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = Vec::new();
    loop {
        let after = seen.last().copied().unwrap_or(0);
        let (_, page) = get(format!("/events?after={after}&limit=50")).await;
        let page = page.as_array().expect("a page").clone();
        if page.is_empty() {
            break;
        }
        seen.extend(page.iter().map(|e| e["position"].as_i64().expect("position")));
    }
    assert_eq!(
        seen, expected,
        "the log read through the standbys differs from the primary's"
    );
    let head = *expected.last().expect("a log");
    let live: Vec<i64> = sse
        .until(head, Duration::from_secs(20))
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        live, expected,
        "the live tail through the standbys: each event once, in log order"
    );

    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let served = metrics
        .lines()
        .find(|l| l.starts_with("wallet_standby_reads_total{served_by=\"standby\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(served > 0.0, "no read was served by a standby:\n{metrics}");
}

/// The bug the quorum fence guards against, shown, and the fence holding.
/// Replication stops at the primary; a deposit's commit waits for a
/// standby, its batch deadline passes and the batch is resolved. Without the fence (the old
/// resolve path, kept behind `UNSAFE_RESOLVE_WITHOUT_FENCE`) the resolution
/// ends the waiting session, finds the deposit committed on the primary
/// alone and answers 201; the primary's machine is then lost, a standby
/// takes over without the deposit, and the acknowledgement is gone. The
/// fenced path, at the same moment, answers OUTCOME_UNKNOWN, and a retry
/// with its key takes effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_fence_a_quorum_loss_loses_an_acknowledged_write() {
    let _alone = ALONE.lock().await;
    let cluster = PgCluster::start();
    let url = cluster.url();
    let (_old, old) = serve(
        &url,
        &[
            ("UNSAFE_RESOLVE_WITHOUT_FENCE", "true"),
            ("REQUIRE_SYNC_STANDBYS", "0"),
            ("RESOLVE_DEADLINE", "8s"),
        ],
    );
    let (_new, new) = serve(&url, &[]);
    wait_ready(&old).await;
    wait_ready(&new).await;
    let client = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .build()
        .expect("client");
    for (base, w) in [(&old, "fence-old"), (&new, "fence-new")] {
        let open = send(
            &client,
            base,
            &Op::Deposit {
                wallet: w.into(),
                amount: 100,
            },
            None,
        )
        .await;
        assert_eq!(open.status, 201, "opening {w}: {open:?}");
    }

    // Replication stops at the primary: its WAL senders freeze. (Freezing
    // the standbys instead would not do here: WAL already sent waits in
    // their sockets' buffers and reaches them when they resume.)
    let primary = cluster.primary().expect("a primary");
    cluster.freeze_walsenders(primary);
    let old_op = Op::Deposit {
        wallet: "fence-old".into(),
        amount: 7,
    };
    let new_op = Op::Deposit {
        wallet: "fence-new".into(),
        amount: 7,
    };
    // One after the other: a commit waiting for its standbys holds the
    // append lock, so a concurrent one would only time out on the lock.
    let acked = send(&client, &old, &old_op, Some("fence-old-1")).await;
    let unknown = send(&client, &new, &new_op, Some("fence-new-1")).await;
    assert_eq!(
        acked.status, 201,
        "the unfenced path acknowledges the local commit: {acked:?}"
    );
    assert_eq!(
        unknown.code.as_deref(),
        Some("OUTCOME_UNKNOWN"),
        "the fenced path cannot know: {unknown:?}"
    );

    // The primary's machine is lost; a standby takes over.
    cluster.kill_node(primary);
    let deadline = Instant::now() + Duration::from_secs(120);
    let promoted = loop {
        match cluster.primary() {
            Some(p) if p != primary => break p,
            _ => {
                assert!(Instant::now() < deadline, "no standby was promoted");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let log = read_log(&cluster.node_url(promoted)).await;
    assert!(
        log.get("fence-old-1").is_none(),
        "the unfenced 201 survived this time; the test did not reproduce the lost acknowledgement"
    );

    wait_writable(&new, Duration::from_secs(120)).await;
    let retried = retry_unknowns(&new, std::slice::from_ref(&unknown)).await;
    assert_eq!(retried[0].status, 201, "the retry: {:?}", retried[0]);
    let log = read_log(&cluster.node_url(promoted)).await;
    assert_eq!(
        log.get("fence-new-1").map(|l| l.positions.len()),
        Some(1),
        "exactly once"
    );
}

/// A broker that loses a node: `serve` (with the relay) and the `worker`
/// on a three-node RabbitMQ cluster with quorum queues, under write load,
/// while the node leading the worker's queue is killed twice (each time
/// restarted after). Every position reaches the worker, and its read
/// models equal a rebuild from the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_node_loss_costs_time_never_an_event() {
    let _alone = ALONE.lock().await;
    let db = common::postgres().await;
    let rabbit = common::ha::RabbitCluster::start();
    let exchange = format!("test.{}.events", uuid::Uuid::new_v4().simple());
    let queue = format!("{exchange}.worker.quorum");
    let broker_env = |c: &mut Command| {
        c.env("DATABASE_URL", &db.url)
            .env("AMQP_URL", rabbit.urls())
            .env("AMQP_EXCHANGE", &exchange)
            .env("AMQP_QUEUE_TYPE", "quorum")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
    };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut serve = Command::new(env!("CARGO_BIN_EXE_wallet"));
    serve.args(["serve", "--bind", &format!("127.0.0.1:{port}")]);
    broker_env(&mut serve);
    let _serve = Running(serve.spawn().expect("start serve"));
    let mut worker = Command::new(env!("CARGO_BIN_EXE_wallet"));
    worker.arg("worker");
    broker_env(&mut worker);
    let _worker = Running(worker.spawn().expect("start worker"));
    wait_ready(&base).await;

    let mut load = Command::new(env!("CARGO_BIN_EXE_wallet"));
    load.args([
        "load",
        "--url",
        &base,
        "--seconds",
        "40",
        "--concurrency",
        "8",
        "--wallets",
        "200",
    ]);
    broker_env(&mut load);
    let load = load
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start load");
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        let leader = rabbit.leader_of(&queue).expect("the worker queue has a leader");
        rabbit.kill(leader);
        tokio::time::sleep(Duration::from_secs(8)).await;
        rabbit.restart(leader);
    }
    let load = tokio::task::spawn_blocking(move || load.wait_with_output())
        .await
        .expect("load task")
        .expect("load output");
    assert!(
        load.status.success(),
        "load failed (conservation or errors):\n{}{}",
        String::from_utf8_lossy(&load.stdout),
        String::from_utf8_lossy(&load.stderr)
    );

    let head = db.store.head_position().await.expect("head");
    assert!(head > 100, "the load wrote events ({head})");
    worker_caught_up(&db.url).await;
}
