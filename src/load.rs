//! The load generator: drives any server exposing the wallet routes at a
//! base URL with a mixed write workload (or balance reads), bounded in time
//! and count, then checks conservation and that no balance is negative.
//!
//! Each worker keeps its own latency histogram and totals (no shared locks
//! on the hot path); they are merged once at the end.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
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
    /// Appended to each read's `/wallet/{id}` (e.g. `?minPosition=1`, which
    /// lets standbys answer, or `/history`).
    pub read_suffix: String,
    /// After each write answered 201, read its wallet (`/wallet/{id}` and
    /// `read_suffix`) with `minPosition` = the write's position: what a
    /// client that reads its own writes waits (booked as `readAfterWrite`).
    pub read_after_write: bool,
    /// Every write carries a unique `requestId` (an idempotency key).
    pub keyed: bool,
    /// Live subscribers (`GET /events/stream`) open during the run: each
    /// measures the time from a write's 201 to its event's arrival.
    pub subscribers: usize,
    /// Percent of operations on holds: a worker places a hold payable to
    /// another wallet, and its next hold operation captures (2 in 3) or
    /// voids it. Held money still counts as the wallet's.
    pub holds: u8,
    /// 0: one operation per request. N: every request is a `POST /batch`
    /// of N operations drawn from the mix.
    pub batch: usize,
    /// Batches are atomic (all or none) rather than independent.
    pub atomic: bool,
    /// Sent as `Authorization: Bearer <key>` on every request.
    pub api_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Deposit,
    Withdraw,
    Transfer,
    Read,
    #[serde(rename = "readAfterWrite")]
    ReadAfterWrite,
    Hold,
    Batch,
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
    /// Money operations sent (a batch request carries many).
    pub operations: u64,
    pub operations_per_sec: f64,
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

/// Latencies in microseconds, from 1 us to an hour at 3 significant digits:
/// percentiles in constant memory, without keeping and sorting every sample.
fn latencies() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant, valid bounds")
}

fn micros(took: Duration) -> u64 {
    took.as_micros().min(u128::from(u64::MAX)) as u64
}

/// A histogram's quantile in milliseconds.
fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// When each acknowledged write's last event was answered 201, by position.
type Answered = Arc<dashmap::DashMap<i64, Instant>>;

/// Opens `n` live subscriptions after the log's current head; each returns
/// its latencies once `until` passes.
async fn spawn_subscribers(
    http: &reqwest::Client,
    base: &str,
    n: usize,
    answered: &Answered,
    until: Instant,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<Histogram<u64>>>> {
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
            let (mut samples, mut pending) = (latencies(), Vec::<u8>::new());
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
                    samples.saturating_record(at.map_or(0, |t| micros(t.elapsed())));
                }
                pending.drain(..start);
            }
            samples
        }));
    }
    Ok(tasks)
}

async fn live_stats(tasks: Vec<tokio::task::JoinHandle<Histogram<u64>>>) -> anyhow::Result<LiveStats> {
    let subscribers = tasks.len();
    let mut all = latencies();
    for t in tasks {
        all.add(t.await?)?;
    }
    Ok(LiveStats {
        subscribers,
        samples: all.len(),
        p50_ms: quantile_ms(&all, 0.50),
        p99_ms: quantile_ms(&all, 0.99),
        max_ms: all.max() as f64 / 1000.0,
    })
}

#[derive(Default)]
struct Worker {
    samples: BTreeMap<Op, Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    operations: u64,
    deposited: Decimal,
    withdrawn: Decimal,
    /// The hold this worker placed and has not resolved yet: wallet index, id.
    open_hold: Option<(usize, String)>,
}

/// What one operation does to the money this run put in and took out.
#[derive(Clone, Copy)]
enum Effect {
    In(Decimal),
    Out(Decimal),
    /// Moves money between the run's wallets, or holds it: no change.
    Within,
}

/// One request to send: what it is, its path and body, and the effect of
/// each operation in it once answered 201.
struct Planned {
    op: Op,
    /// The wallet it is addressed to (index into the run's wallets).
    wallet: usize,
    path: String,
    body: Option<String>,
    effects: Vec<Effect>,
}

/// Draws the run's operations; the one place the workload is defined.
struct Draw<'a> {
    cfg: &'a LoadConfig,
    wallets: &'a [String],
    rng: u64,
    run: &'a str,
    worker: usize,
    sent: u64,
}

impl Draw<'_> {
    fn amount(&mut self) -> String {
        format!("{}.{:02}", 1 + pick(&mut self.rng, 100), pick(&mut self.rng, 100))
    }

    fn key(&mut self) -> String {
        self.sent += 1;
        match self.cfg.keyed {
            true => format!(",\"requestId\":\"{}-{}-{}\"", self.run, self.worker, self.sent),
            false => String::new(),
        }
    }

    fn other(&mut self, i: usize) -> usize {
        (i + 1 + pick(&mut self.rng, self.wallets.len() as u64 - 1) as usize) % self.wallets.len()
    }

    /// The next request of a worker.
    fn next(&mut self, open_hold: &Option<(usize, String)>) -> Planned {
        let i = pick(&mut self.rng, self.wallets.len() as u64) as usize;
        if self.cfg.reads {
            return Planned {
                wallet: i,
                op: Op::Read,
                path: format!("/wallet/{}{}", self.wallets[i], self.cfg.read_suffix),
                body: None,
                effects: Vec::new(),
            };
        }
        if self.cfg.batch > 0 {
            return self.batch();
        }
        if (pick(&mut self.rng, 100) as u8) < self.cfg.holds {
            return self.hold(i, open_hold);
        }
        let (kind, fields, effect) = self.money(i);
        let key = self.key();
        Planned {
            wallet: i,
            op: kind,
            path: format!("/wallet/{}/{}", self.wallets[i], op_name(kind)),
            body: Some(format!("{{{fields}{key}}}")),
            effects: vec![effect],
        }
    }

    /// A deposit, withdrawal or transfer from wallet `i`, by the mix: its
    /// JSON fields (no braces) and effect.
    fn money(&mut self, i: usize) -> (Op, String, Effect) {
        let amount = self.amount();
        let value = Decimal::from_str(&amount).unwrap_or_default();
        let roll = pick(&mut self.rng, 100) as u8;
        if roll < self.cfg.mix[0] {
            (Op::Deposit, format!("\"amount\":{amount}"), Effect::In(value))
        } else if roll < self.cfg.mix[0] + self.cfg.mix[1] {
            (Op::Withdraw, format!("\"amount\":{amount}"), Effect::Out(value))
        } else {
            let j = self.other(i);
            let fields = format!("\"toWalletId\":\"{}\",\"amount\":{amount}", self.wallets[j]);
            (Op::Transfer, fields, Effect::Within)
        }
    }

    fn hold(&mut self, i: usize, open_hold: &Option<(usize, String)>) -> Planned {
        let key = self.key();
        let (wallet, path, body) = match open_hold {
            None => {
                let (j, amount) = (self.other(i), self.amount());
                let body = format!(
                    "{{\"amount\":{amount},\"expiresInSeconds\":60,\"toWalletId\":\"{}\"{key}}}",
                    self.wallets[j]
                );
                (i, format!("/wallet/{}/holds", self.wallets[i]), body)
            }
            Some((w, id)) => {
                let how = if pick(&mut self.rng, 3) < 2 { "capture" } else { "void" };
                let body = format!("{{{}}}", key.trim_start_matches(','));
                (*w, format!("/wallet/{}/holds/{id}/{how}", self.wallets[*w]), body)
            }
        };
        Planned {
            wallet,
            op: Op::Hold,
            path,
            body: Some(body),
            effects: vec![Effect::Within],
        }
    }

    /// `POST /batch` of `cfg.batch` operations from the mix (a refused
    /// atomic batch books none of them: its answer has no results).
    fn batch(&mut self) -> Planned {
        let mut ops = Vec::with_capacity(self.cfg.batch);
        let mut effects = Vec::with_capacity(self.cfg.batch);
        for _ in 0..self.cfg.batch {
            let i = pick(&mut self.rng, self.wallets.len() as u64) as usize;
            let (kind, fields, effect) = self.money(i);
            let key = self.key();
            ops.push(format!(
                "{{\"op\":\"{}\",\"walletId\":\"{}\",{fields}{key}}}",
                op_name(kind),
                self.wallets[i]
            ));
            effects.push(effect);
        }
        Planned {
            wallet: 0,
            op: Op::Batch,
            path: "/batch".to_owned(),
            body: Some(format!(
                "{{\"atomic\":{},\"operations\":[{}]}}",
                self.cfg.atomic,
                ops.join(",")
            )),
            effects,
        }
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Deposit => "deposit",
        Op::Withdraw => "withdraw",
        Op::Transfer => "transfer",
        Op::Read => "read",
        Op::ReadAfterWrite => "readAfterWrite",
        Op::Hold => "hold",
        Op::Batch => "batch",
    }
}

impl Worker {
    /// Books an answer: its latency and status, and the money of every
    /// operation in it that was answered 201.
    fn book(&mut self, planned: &Planned, status: u16, body: &[u8], took: Duration) {
        self.samples
            .entry(planned.op)
            .or_insert_with(latencies)
            .saturating_record(micros(took));
        *self.statuses.entry(status).or_default() += 1;
        self.operations += planned.effects.len().max(1) as u64;
        let succeeded: Vec<bool> = match planned.op {
            Op::Batch => batch_statuses(body).into_iter().map(|s| s == 201).collect(),
            _ => vec![status == 201],
        };
        for (effect, ok) in planned.effects.iter().zip(succeeded) {
            match (effect, ok) {
                (Effect::In(a), true) => self.deposited += a,
                (Effect::Out(a), true) => self.withdrawn += a,
                _ => {}
            }
        }
        if planned.op == Op::Hold {
            self.open_hold = match (&self.open_hold, status) {
                (None, 201) => hold_of(body).map(|id| (planned.wallet, id)),
                _ => None,
            };
        }
    }
}

/// Each operation's status in a batch's answer.
fn batch_statuses(body: &[u8]) -> Vec<u16> {
    #[derive(serde::Deserialize)]
    struct Result {
        status: u16,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        results: Vec<Result>,
    }
    serde_json::from_slice::<Answer>(body)
        .map_or_else(|_| Vec::new(), |a| a.results.into_iter().map(|r| r.status).collect())
}

/// The id of the hold a 201 to `POST /wallet/{w}/holds` placed.
fn hold_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Placed {
        hold_id: String,
    }
    serde_json::from_slice::<Placed>(body).ok().map(|p| p.hold_id)
}

/// `path` with `minPosition=<p>` added to its query.
fn with_min_position(path: &str, p: i64) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}minPosition={p}")
}

/// A read of what the worker just wrote, timed and booked.
async fn read_own_write(http: &reqwest::Client, url: &str, w: &mut Worker) {
    let t = Instant::now();
    match http.get(url).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            w.samples
                .entry(Op::ReadAfterWrite)
                .or_insert_with(latencies)
                .saturating_record(micros(t.elapsed()));
            *w.statuses.entry(status).or_default() += 1;
        }
        Err(_) => w.errors += 1,
    }
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

/// The run's HTTP client: keep-alive connections for every worker, and the
/// API key (if any) on every request.
fn client(cfg: &LoadConfig) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = cfg.api_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| anyhow::anyhow!("the API key holds characters a header cannot carry"))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(cfg.concurrency)
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()?)
}

pub async fn run(cfg: LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(cfg.wallets >= 2, "at least 2 wallets");
    anyhow::ensure!(cfg.concurrency >= 1, "at least 1 worker");
    anyhow::ensure!(cfg.holds <= 100, "holds is a percentage");
    anyhow::ensure!(cfg.batch <= 1000, "a batch holds at most 1,000 operations");
    anyhow::ensure!(
        cfg.mix.iter().map(|m| u32::from(*m)).sum::<u32>() == 100,
        "the mix must sum to 100"
    );
    let base = cfg.base_url.trim_end_matches('/').to_owned();
    let http = client(&cfg)?;
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
            let status = a?.status();
            anyhow::ensure!(
                status.as_u16() == 201,
                "seeding a wallet failed: {status}{}",
                match status.as_u16() {
                    401 | 403 => " (send an API key with the write scope: --api-key or WALLET_API_KEY)",
                    _ => "",
                }
            );
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
            let mut draw = Draw {
                cfg: &cfg,
                wallets: &wallets,
                rng: 0x9E37_79B9_7F4A_7C15u64 ^ ((k as u64 + 1) * 0x1000_0001),
                run: &run_id[..8],
                worker: k,
                sent: 0,
            };
            let mut sent = 0u64;
            while sent < per_worker && Instant::now() < deadline {
                sent += 1;
                let planned = draw.next(&w.open_hold);
                let url = format!("{base}{}", planned.path);
                let request = match &planned.body {
                    Some(body) => http.post(url).body(body.clone()),
                    None => http.get(url),
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
                        w.book(&planned, status, &body, t.elapsed());
                        if let (true, 201, Some(p)) = (cfg.read_after_write, status, position_of(&body)) {
                            let path = with_min_position(
                                &format!("/wallet/{}{}", wallets[planned.wallet], cfg.read_suffix),
                                p,
                            );
                            read_own_write(&http, &format!("{base}{path}"), &mut w).await;
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
            all.samples.entry(op).or_insert_with(latencies).add(s)?;
        }
        for (status, n) in w.statuses {
            *all.statuses.entry(status).or_default() += n;
        }
        all.errors += w.errors;
        all.operations += w.operations;
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
        .map(|(op, h)| {
            let stats = OpStats {
                count: h.len(),
                p50_ms: quantile_ms(&h, 0.50),
                p90_ms: quantile_ms(&h, 0.90),
                p99_ms: quantile_ms(&h, 0.99),
                max_ms: h.max() as f64 / 1000.0,
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
        operations: all.operations,
        operations_per_sec: all.operations as f64 / seconds,
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
