//! The load generator: drives any server exposing the wallet routes at a
//! base URL with a mixed write workload (or balance reads), bounded in time
//! and count, then checks conservation and that no balance is negative.
//!
//! Each worker keeps its own latency samples and totals (no shared locks on
//! the hot path); they are merged once at the end.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

/// Balance each wallet is seeded with, so most withdrawals succeed.
const SEED_AMOUNT: &str = "1000000.00";
/// Hard cap on requests per run, whatever the flags say.
pub const MAX_REQUESTS: u64 = 10_000_000;

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub base_url: String,
    /// Other servers on the same database: workers are spread over all.
    pub other_urls: Vec<String>,
    pub wallets: usize,
    pub concurrency: usize,
    pub duration: Duration,
    pub max_requests: u64,
    /// Percentages of deposits, withdrawals, transfers (sum 100).
    pub mix: [u8; 3],
    /// Balance reads (`GET /wallet/{id}`) instead of writes.
    pub reads: bool,
    /// Every write carries a unique `requestId` (an idempotency key).
    pub keyed: bool,
    /// Live subscribers (`GET /events/stream`) open during the run: each
    /// measures the time from a write's 201 to its event's arrival.
    pub subscribers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Deposit,
    Withdraw,
    Transfer,
    Read,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OpStats {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadReport {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_sec: f64,
    pub by_op: BTreeMap<Op, OpStats>,
    pub by_status: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub conservation_ok: bool,
    pub no_negative_balance: bool,
    pub expected_total: String,
    pub actual_total: String,
    /// With subscribers: from a write's 201 to its last event reaching a subscriber.
    pub live: Option<LiveStats>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LiveStats {
    pub subscribers: usize,
    /// Latency samples taken (every write's last event, at every subscriber).
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// When each acknowledged write's last event was answered 201, by position.
type Answered = Arc<dashmap::DashMap<i64, Instant>>;

/// Opens `n` live subscriptions after the log's current head; each returns
/// its latency samples (microseconds) once `until` passes.
async fn spawn_subscribers(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    answered: &Answered,
    until: Instant,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Vec<u32>>>> {
    let head = http.get(format!("{base}/events?limit=1")).send().await?;
    let head = head
        .headers()
        .get("x-log-head")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .ok_or_else(|| anyhow::anyhow!("the server sent no X-Log-Head"))?;
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let mut stream = http.get(format!("{base}/events/stream?after={head}")).send().await?;
        anyhow::ensure!(
            stream.status().is_success(),
            "a subscription was refused: {}",
            stream.status()
        );
        let answered = answered.clone();
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut pending) = (Vec::new(), Vec::<u8>::new());
            while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(until.into(), stream.chunk()).await {
                pending.extend_from_slice(&chunk);
                let mut start = 0;
                while let Some(n) = pending[start..].iter().position(|b| *b == b'\n') {
                    let line = &pending[start..start + n];
                    start += n + 1;
                    let Some(position) = line
                        .strip_prefix(b"id: ")
                        .and_then(|p| std::str::from_utf8(p).ok())
                        .and_then(|p| p.parse::<i64>().ok())
                    else {
                        continue;
                    };
                    // Arrived before its 201 was read: no later than the answer.
                    let at = answered.get(&position).map(|t| *t);
                    samples.push(at.map_or(0, |t| t.elapsed().as_micros().min(u32::MAX as u128) as u32));
                }
                pending.drain(..start);
            }
            samples
        }));
    }
    Ok(tasks)
}

async fn live_stats(tasks: Vec<tokio::task::JoinHandle<Vec<u32>>>) -> anyhow::Result<LiveStats> {
    let subscribers = tasks.len();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    all.sort_unstable();
    let q = |p: f64| {
        all.get(((all.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(0.0, |v| *v as f64 / 1000.0)
    };
    Ok(LiveStats {
        subscribers,
        samples: all.len() as u64,
        p50_ms: q(0.50),
        p99_ms: q(0.99),
        max_ms: q(1.0),
    })
}

#[derive(Default)]
struct Worker {
    samples: BTreeMap<Op, Vec<u32>>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    deposited: Decimal,
    withdrawn: Decimal,
}

/// The `position` of a write's answer.
fn position_of(body: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Receipt {
        position: i64,
    }
    serde_json::from_slice::<Receipt>(body).ok().map(|r| r.position)
}

fn pick(rng: &mut u64, n: u64) -> u64 {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    *rng % n
}

pub async fn run(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(cfg.wallets >= 2, "at least 2 wallets");
    anyhow::ensure!(cfg.concurrency >= 1, "at least 1 worker");
    anyhow::ensure!(
        cfg.mix.iter().map(|m| u32::from(*m)).sum::<u32>() == 100,
        "the mix must sum to 100"
    );
    let base = cfg.base_url.trim_end_matches('/').to_owned();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let run_id = Uuid::new_v4().simple().to_string();
    let wallets: Vec<String> = (0..cfg.wallets).map(|i| format!("load-{}-{i}", &run_id[..8])).collect();

    // Seed every wallet (a few at a time).
    let mut seeded = Decimal::ZERO;
    for chunk in wallets.chunks(cfg.concurrency.max(1)) {
        let answers = futures_util::future::join_all(chunk.iter().map(|w| {
            http.post(format!("{base}/wallet/{w}/deposit"))
                .header("content-type", "application/json")
                .body(format!("{{\"amount\":{SEED_AMOUNT}}}"))
                .send()
        }))
        .await;
        for a in answers {
            anyhow::ensure!(a?.status().as_u16() == 201, "seeding a wallet failed");
            seeded += Decimal::from_str(SEED_AMOUNT)?;
        }
    }

    let answered: Answered = Arc::default();
    let live = if cfg.subscribers > 0 {
        let until = Instant::now() + cfg.duration + Duration::from_secs(3);
        Some(spawn_subscribers(&http, &base, cfg.subscribers, &answered, until).await?)
    } else {
        None
    };
    let started = Instant::now();
    let deadline = started + cfg.duration;
    let budget = cfg.max_requests.min(MAX_REQUESTS);
    let per_worker = budget.div_ceil(cfg.concurrency as u64);
    let mut tasks = Vec::with_capacity(cfg.concurrency);
    let servers: Vec<String> = std::iter::once(base.clone())
        .chain(cfg.other_urls.iter().map(|u| u.trim_end_matches('/').to_owned()))
        .collect();
    for k in 0..cfg.concurrency {
        let base = servers[k % servers.len()].clone();
        let (http, wallets, cfg, run_id) = (http.clone(), wallets.clone(), cfg.clone(), run_id.clone());
        let answered = (cfg.subscribers > 0).then(|| answered.clone());
        tasks.push(tokio::spawn(async move {
            let mut w = Worker::default();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((k as u64 + 1) * 0x1000_0001);
            let mut sent = 0u64;
            while sent < per_worker && Instant::now() < deadline {
                sent += 1;
                let i = pick(&mut rng, wallets.len() as u64) as usize;
                let amount = format!("{}.{:02}", 1 + pick(&mut rng, 100), pick(&mut rng, 100));
                let key = if cfg.keyed {
                    format!(",\"requestId\":\"{}-{k}-{sent}\"", &run_id[..8])
                } else {
                    String::new()
                };
                let roll = pick(&mut rng, 100) as u8;
                let (op, request) = if cfg.reads {
                    (Op::Read, http.get(format!("{base}/wallet/{}", wallets[i])))
                } else if roll < cfg.mix[0] {
                    let body = format!("{{\"amount\":{amount}{key}}}");
                    (
                        Op::Deposit,
                        http.post(format!("{base}/wallet/{}/deposit", wallets[i])).body(body),
                    )
                } else if roll < cfg.mix[0] + cfg.mix[1] {
                    let body = format!("{{\"amount\":{amount}{key}}}");
                    (
                        Op::Withdraw,
                        http.post(format!("{base}/wallet/{}/withdraw", wallets[i])).body(body),
                    )
                } else {
                    let j = (i + 1 + pick(&mut rng, wallets.len() as u64 - 1) as usize) % wallets.len();
                    let body = format!("{{\"toWalletId\":\"{}\",\"amount\":{amount}{key}}}", wallets[j]);
                    (
                        Op::Transfer,
                        http.post(format!("{base}/wallet/{}/transfer", wallets[i])).body(body),
                    )
                };
                let t = Instant::now();
                match request.header("content-type", "application/json").send().await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        // Drain the body so the connection is reused.
                        let body = r.bytes().await.unwrap_or_default();
                        if let (Some(answered), 201) = (&answered, status) {
                            if let Some(p) = position_of(&body) {
                                answered.insert(p, Instant::now());
                            }
                        }
                        w.samples
                            .entry(op)
                            .or_default()
                            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        *w.statuses.entry(status).or_default() += 1;
                        if status == 201 {
                            let a = Decimal::from_str(&amount).unwrap_or_default();
                            match op {
                                Op::Deposit => w.deposited += a,
                                Op::Withdraw => w.withdrawn += a,
                                _ => {}
                            }
                        }
                    }
                    Err(_) => w.errors += 1,
                }
            }
            w
        }));
    }
    let mut all = Worker::default();
    for t in tasks {
        let w = t.await?;
        for (op, s) in w.samples {
            all.samples.entry(op).or_default().extend(s);
        }
        for (status, n) in w.statuses {
            *all.statuses.entry(status).or_default() += n;
        }
        all.errors += w.errors;
        all.deposited += w.deposited;
        all.withdrawn += w.withdrawn;
    }
    let seconds = started.elapsed().as_secs_f64();

    // Conservation: what the server holds vs what this run put in and took out.
    let mut actual = Decimal::ZERO;
    let mut no_negative = true;
    for w in &wallets {
        let view: serde_json::Value = http.get(format!("{base}/wallet/{w}")).send().await?.json().await?;
        let balance = Decimal::from_str(view["balance"].as_str().unwrap_or("x"))?;
        no_negative &= balance >= Decimal::ZERO;
        actual += balance;
    }
    let expected = seeded + all.deposited - all.withdrawn;
    let requests: u64 = all.statuses.values().sum::<u64>() + all.errors;
    let by_op = all
        .samples
        .into_iter()
        .map(|(op, mut s)| {
            s.sort_unstable();
            let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0;
            let stats = OpStats {
                count: s.len() as u64,
                p50_ms: q(0.50),
                p90_ms: q(0.90),
                p99_ms: q(0.99),
                max_ms: q(1.0),
            };
            (op, stats)
        })
        .collect();
    let live = match live {
        Some(tasks) => Some(live_stats(tasks).await?),
        None => None,
    };
    Ok(LoadReport {
        live,
        requests,
        seconds,
        requests_per_sec: requests as f64 / seconds,
        by_op,
        by_status: all.statuses,
        transport_errors: all.errors,
        // Reads move no money; writes must add up exactly.
        conservation_ok: actual == expected,
        no_negative_balance: no_negative,
        expected_total: expected.to_string(),
        actual_total: actual.to_string(),
    })
}
