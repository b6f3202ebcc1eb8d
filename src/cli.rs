//! The command line: one binary, one subcommand per job.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::broker::relay::Relay;
use crate::broker::worker::Worker;
use crate::broker::Topology;
use crate::config;
use crate::projections::{FraudRules, Projections};

#[derive(Parser, Debug)]
#[command(
    name = "wallet",
    version,
    about = "Event-sourced wallet service: balances you can prove"
)]
pub struct Cli {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub fraud: FraudArgs,
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct DatabaseArgs {
    /// postgres://... or sqlite://...; unset means an SQLite file in --data-dir.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true, global = true)]
    pub database_url: Option<String>,
    /// Directory of the embedded SQLite database.
    #[arg(long, env = "WALLET_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,
}

/// RabbitMQ. Unset `AMQP_URL` means no broker: `serve` runs the
/// projections in-process.
#[derive(Args, Debug)]
pub struct BrokerArgs {
    /// amqp://user:pass@host:5672/%2f
    #[arg(long, env = "AMQP_URL", hide_env_values = true, global = true)]
    pub amqp_url: Option<String>,
    /// Name of the fanout exchange; the queues are named after it
    /// (<exchange>.worker, <exchange>.dlx, <exchange>.dlq).
    #[arg(long, env = "AMQP_EXCHANGE", default_value = "wallet.events", global = true)]
    pub amqp_exchange: String,
    /// AMQP heartbeat in seconds (0: off): a broker link silent for twice
    /// this long is dropped and reconnected. A `heartbeat=` in the URL wins.
    #[arg(long, env = "AMQP_HEARTBEAT", default_value_t = crate::broker::DEFAULT_HEARTBEAT_SECS, global = true)]
    pub amqp_heartbeat: u16,
}

impl BrokerArgs {
    /// The broker URL with the heartbeat, if one is configured.
    fn configured(&self) -> Option<String> {
        self.amqp_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(|u| crate::broker::with_heartbeat(u, self.amqp_heartbeat))
    }

    fn url(&self) -> anyhow::Result<String> {
        self.configured()
            .ok_or_else(|| anyhow::anyhow!("AMQP_URL (or --amqp-url) is required for this command"))
    }

    fn topology(&self) -> Topology {
        Topology::named(&self.amqp_exchange)
    }
}

/// Fraud rule thresholds. Changing them changes what the stats and flags
/// projections compute: rebuild both after a change.
#[derive(Args, Debug)]
pub struct FraudArgs {
    /// Outflows inside the window that raise RAPID_OUTFLOWS.
    #[arg(long, env = "FRAUD_RAPID_COUNT", default_value_t = 3, global = true,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub fraud_rapid_count: u32,
    /// Length of the rapid-outflow window, in milliseconds of event time.
    #[arg(long, env = "FRAUD_RAPID_WINDOW_MS", default_value_t = 60_000, global = true,
          value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub fraud_rapid_window_ms: u64,
    /// A single outflow of at least this amount raises LARGE_OUTFLOW.
    #[arg(long, env = "FRAUD_LARGE_AMOUNT", default_value = "10000", global = true,
          value_parser = parse_positive_amount)]
    pub fraud_large_amount: Decimal,
}

/// A decimal greater than 0 (a threshold of 0 would flag every outflow).
fn parse_positive_amount(text: &str) -> Result<Decimal, String> {
    match text.trim().parse::<Decimal>() {
        Ok(d) if d > Decimal::ZERO => Ok(d),
        Ok(_) => Err("must be greater than 0".to_owned()),
        Err(_) => Err(format!("{text:?} is not a decimal number")),
    }
}

/// `--mix D,W,T`: three percentages (deposits, withdrawals, transfers)
/// adding up to 100.
fn parse_mix(text: &str) -> Result<[u8; 3], String> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let numbers: Vec<u8> = parts.iter().filter_map(|p| p.parse::<u8>().ok()).collect();
    match numbers[..] {
        [d, w, t] if parts.len() == 3 && u32::from(d) + u32::from(w) + u32::from(t) == 100 => Ok([d, w, t]),
        _ => Err(format!("{text:?}: three percentages adding up to 100, e.g. 40,30,30")),
    }
}

impl FraudArgs {
    pub fn rules(&self) -> FraudRules {
        FraudRules {
            rapid_count: self.fraud_rapid_count,
            rapid_window: chrono::Duration::milliseconds(self.fraud_rapid_window_ms as i64),
            large_amount: self.fraud_large_amount,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP API (applies migrations first). Without AMQP_URL it also
    /// runs the projections in-process; with it, it runs the relay and the
    /// read models are the worker's job.
    Serve(ServeArgs),
    /// Publish the committed log to RabbitMQ, in order, with publisher
    /// confirms. Only one relay is active at a time; others stand by.
    Relay {
        /// Messages published and not yet confirmed, at most.
        #[arg(long, env = "RELAY_WINDOW", default_value_t = crate::broker::relay::DEFAULT_WINDOW as u64,
              value_parser = clap::value_parser!(u64).range(1..=65_536))]
        window: u64,
    },
    /// Consume the fan-out queue into the read models; what cannot be
    /// applied goes to the dead-letter queue.
    Worker,
    /// Inspect or replay the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Delete old audit rows and, if asked, old idempotency keys (in
    /// batches, beside a running service). The event log is never pruned.
    #[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
        .args(["audit_older_than", "idempotency_older_than"])))]
    Prune {
        /// Delete api_audit rows recorded longer ago than this (e.g. 90d).
        #[arg(long, value_parser = config::parse_duration)]
        audit_older_than: Option<Duration>,
        /// Delete idempotency keys older than this (at least 7d). A retry
        /// carrying a pruned key takes effect again, so keep keys at least
        /// as long as clients may retry. Default: kept for ever.
        #[arg(long, value_parser = config::parse_duration)]
        idempotency_older_than: Option<Duration>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make an API key: prints the key (give it to the client) and the
    /// entry to add to API_KEYS (the service stores only its hash).
    Keys {
        /// Name of the client, shown in logs and 403 answers.
        #[arg(long)]
        name: String,
        /// Scopes joined by '+': read, write, admin.
        #[arg(long, default_value = "read+write")]
        scopes: String,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Inspect or rebuild the read models (history, stats, flags).
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Time travel: a wallet's state (or every wallet's balance and the
    /// total) as of a log position, an event time or a stream version.
    /// Read-only.
    Replay(ReplayArgs),
    /// Print the committed log in position order from a position, and with
    /// --follow keep printing new events as they commit. Reads the database
    /// directly; read-only (creates nothing).
    Tail(TailArgs),
    /// Re-fold every stream and check versions, the hash chain, balances,
    /// transfer pairs, snapshots and read models. Exits non-zero on any
    /// discrepancy.
    Verify {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Load generator: drives a running server (any implementation of these
    /// routes) with a mixed write workload or balance reads, then checks
    /// conservation and that no balance is negative (exit 1 if not).
    Load(LoadArgs),
    /// Append a synthetic mixed history (new wallets) for benchmarks and
    /// rebuild drills. Never touches existing wallets.
    Seed {
        /// Events to append (at least).
        #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
        events: u64,
        /// Wallets to spread them over.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=10_000_000))]
        wallets: u64,
    },
}

impl Command {
    /// The long-running services (they print nothing to stdout).
    pub fn is_service(&self) -> bool {
        matches!(self, Command::Serve(_) | Command::Relay { .. } | Command::Worker)
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0:3000")]
    pub bind: SocketAddr,
    /// Events between snapshots of a wallet (0 disables snapshots).
    #[arg(long, env = "SNAPSHOT_EVERY", default_value_t = crate::snapshots::DEFAULT_SNAPSHOT_EVERY)]
    pub snapshot_every: u64,
    /// Folded wallets kept in memory for deciding and balance reads
    /// (0 disables the cache). Bounds the memory at about 300 bytes each.
    #[arg(long, env = "CACHE_WALLETS", default_value_t = crate::cache::DEFAULT_CAPACITY,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=100_000_000))]
    pub cache_wallets: usize,
    /// API keys, `name:read+write+admin:<sha256 hex>` separated by commas
    /// (see `wallet keys`). None configured: the API is open.
    #[arg(long, env = "API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// A file of API key entries, one per line (added to --api-keys).
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Requests handled at once; beyond it 503 with Retry-After.
    #[arg(long, env = "MAX_IN_FLIGHT", default_value_t = api::DEFAULT_MAX_IN_FLIGHT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_in_flight: usize,
    /// Time a connection has to send a request's headers, from opening or
    /// from the first byte of its next request (e.g. 5s).
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "5s", value_parser = config::parse_duration)]
    pub header_read_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    #[arg(long, env = "IDLE_TIMEOUT", default_value = "60s", value_parser = config::parse_duration)]
    pub idle_timeout: Duration,
    /// Open connections at most. Default: the descriptor limit (raised to
    /// its hard limit at start) less a quarter (64-1024) kept for the
    /// database pools, the broker and files.
    #[arg(long, env = "MAX_CONNECTIONS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_connections: Option<usize>,
    /// Budget per API key: N/s, N/m or N/h, optionally :burst (e.g.
    /// 100/s:200), or off. Default with API keys: 1000/s:2000.
    #[arg(long, env = "RATE_LIMIT_KEY")]
    pub rate_limit_key: Option<String>,
    /// Budget per client address (as seen on the socket: behind a proxy
    /// every client shares one), same syntax. Default: off.
    #[arg(long, env = "RATE_LIMIT_ADDRESS")]
    pub rate_limit_address: Option<String>,
    /// With a broker: /ready answers 503 while a message the relay
    /// published has waited longer than this for the broker's confirm.
    #[arg(long, env = "RELAY_STALL_AFTER", default_value = "5s", value_parser = config::parse_duration)]
    pub relay_stall_after: Duration,
}

/// Per-key budget when API keys are configured and none is given.
const DEFAULT_KEY_RATE: &str = "1000/s:2000";

impl ServeArgs {
    fn rate_limits(&self, keyed: bool) -> anyhow::Result<api::RateLimits> {
        let key = match (&self.rate_limit_key, keyed) {
            (Some(spec), true) => api::RateSpec::parse(spec)?,
            (None, true) => api::RateSpec::parse(DEFAULT_KEY_RATE)?,
            (_, false) => None,
        };
        let address = self
            .rate_limit_address
            .as_deref()
            .map(api::RateSpec::parse)
            .transpose()?
            .flatten();
        tracing::info!(per_key = ?key, per_address = ?address, "rate limits");
        Ok(api::RateLimits::new(key, address))
    }

    /// Raises the descriptor limit and sizes the connection cap under it.
    fn serve_options(&self) -> api::ServeOptions {
        let soft = api::server::raise_descriptor_limit();
        let options = api::ServeOptions {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self
                .max_connections
                .unwrap_or_else(|| api::server::default_max_connections(soft)),
        };
        tracing::info!(descriptor_limit = soft, max_connections = options.max_connections,
            header_read_timeout = ?options.header_read_timeout, idle_timeout = ?options.idle_timeout, "connection limits");
        options
    }

    fn keys(&self) -> anyhow::Result<api::ApiKeys> {
        let mut spec = self.api_keys.clone().unwrap_or_default();
        if let Some(file) = &self.api_keys_file {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            spec.push('\n');
            spec.push_str(&text);
        }
        Ok(api::ApiKeys::parse(&spec)?)
    }
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("point").required(true).args(["at", "version"])))]
pub struct ReplayArgs {
    /// One wallet (default: every wallet and the system total).
    #[arg(long)]
    pub wallet: Option<String>,
    /// A log position (integer) or an RFC 3339 time.
    #[arg(long)]
    pub at: Option<String>,
    /// A version of the wallet's stream.
    #[arg(long, requires = "wallet")]
    pub version: Option<u64>,
    /// Also list each event with its running balance.
    #[arg(long, requires = "wallet")]
    pub trail: bool,
    /// Without --wallet: list at most this many wallets (0: all). The
    /// total always covers every wallet.
    #[arg(long, default_value_t = 1000)]
    pub limit: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TailArgs {
    /// Start after this log position (0: the beginning).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
    pub after: i64,
    /// Keep following the log (until Ctrl-C).
    #[arg(long)]
    pub follow: bool,
    /// Only this wallet's events.
    #[arg(long)]
    pub wallet: Option<String>,
    /// Only events of this type (repeatable), e.g. --type FundsDeposited.
    #[arg(long = "type")]
    pub types: Vec<String>,
    /// One JSON object per line (the public event shape, as GET /events).
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LoadArgs {
    /// Base URL of the server under load (`host:port` means http://).
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// Another server on the same database (repeatable): connections are
    /// spread over all of them, so they write the same wallets.
    #[arg(long = "also-url")]
    pub also_urls: Vec<String>,
    /// Wallets the workload spreads over (created by the run).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(2..=100_000))]
    pub wallets: u64,
    /// Requests in flight at once (keep-alive connections).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub concurrency: u64,
    /// How long to run, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub seconds: u64,
    /// Stop after this many requests (at most 10,000,000).
    #[arg(long, default_value_t = 1_000_000)]
    pub requests: u64,
    /// Percent deposits,withdrawals,transfers.
    #[arg(long, default_value = "40,30,30", value_parser = parse_mix)]
    pub mix: [u8; 3],
    /// Balance reads (GET /wallet/{id}) instead of writes.
    #[arg(long)]
    pub reads: bool,
    /// Every write carries a unique requestId (an idempotency key).
    #[arg(long)]
    pub keyed: bool,
    /// Live subscribers to GET /events/stream during the run: prints the
    /// time from a write's 201 to its event reaching them.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub subscribers: u64,
    /// Percent of operations on holds (place, then capture or void).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub holds: u8,
    /// Send every request as POST /batch of this many independent operations.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    pub batch: u64,
    /// With --batch: atomic batches (all or none) instead of independent ones.
    #[arg(long, requires = "batch")]
    pub atomic: bool,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Dead letters, oldest first, with the reason each was dead-lettered.
    /// Leaves the queue unchanged.
    List {
        /// At most this many (at most 10,000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back through the worker, oldest first (after the
    /// cause is fixed). A wallet's parked events apply in order.
    Replay {
        /// Only these message (event) ids (`--id A B` or `--id A --id B`);
        /// default: all. An id not in the queue is an error.
        #[arg(long = "id", num_args = 1..)]
        ids: Vec<String>,
        /// At most this many (at most 10,000).
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
    },
    /// Delete dead letters that can never apply, by message id (see `dlq
    /// list`). Their events stay in the log; a wallet parked behind one
    /// stays parked until `projections rebuild`.
    Discard {
        /// The message ids to delete (`--id A B`); required.
        #[arg(long = "id", num_args = 1.., required = true)]
        ids: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProjectionsCommand {
    /// Each projection's checkpoint, lag behind the log head and current rate.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild read models from position 0 beside the live ones, then swap
    /// them in atomically. The service keeps answering throughout. An
    /// interrupted rebuild resumes where it stopped unless --restart.
    Rebuild {
        /// Projections to rebuild (default: all).
        names: Vec<String>,
        /// Discard an unfinished rebuild and start from position 0.
        #[arg(long)]
        restart: bool,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = config::database_url(cli.database.database_url.as_deref(), &cli.database.data_dir);
    let rules = cli.fraud.rules();
    match cli.command {
        Command::Migrate => {
            let store = config::open_store(&url).await.context("migrating")?;
            // The read models' tables too, so read-only commands find them.
            Projections::new(store, rules)
                .ensure()
                .await
                .context("creating read models")?;
            tracing::info!(database = %config::redact_url(&url), "migrations applied");
            Ok(())
        }
        Command::Serve(args) => {
            let store = config::open_store(&url).await.context("opening the event store")?;
            let projections = Arc::new(Projections::new(store.clone(), rules));
            projections.ensure().await.context("creating read models")?;
            let ledger = crate::ledger::Ledger::new(store.clone())
                .with_snapshot_every(args.snapshot_every)
                .with_cache_capacity(args.cache_wallets);
            let mut state = AppState::with_ledger(ledger, store.clone(), projections);
            state.keys = Arc::new(args.keys().context("reading API keys")?);
            state.max_in_flight = args.max_in_flight;
            state.rate_limits = Arc::new(args.rate_limits(!state.keys.is_open()).context("rate limits")?);
            let options = args.serve_options();
            if state.keys.is_open() {
                tracing::warn!(
                    "NO API KEYS CONFIGURED: the API is open to anyone who can reach it; \
                     set API_KEYS (see `wallet keys --help`)"
                );
            } else {
                tracing::info!(keys = ?state.keys.names(), "API keys required");
            }
            let background = match cli.broker.configured() {
                // With a broker the worker owns the read models; this
                // process relays its log (or stands by for another relay).
                Some(amqp) => {
                    let relay = Relay::new(store.clone(), &amqp, cli.broker.topology())
                        .with_wake(state.ledger.appended())
                        .with_stall_after(args.relay_stall_after);
                    state.relay = Some(relay.gauges.clone());
                    state.broker = Some((amqp, cli.broker.topology()));
                    tracing::info!(exchange = %cli.broker.amqp_exchange, "broker mode: relay on, in-process projections off");
                    tokio::spawn(relay.run())
                }
                None => state.spawn_projection_runner(),
            };
            state.spawn_expiry_sweeper(crate::expiry::DEFAULT_SWEEP_EVERY);
            let listener = TcpListener::bind(args.bind)
                .await
                .with_context(|| format!("binding {}", args.bind))?;
            tracing::info!(
                addr = %listener.local_addr()?,
                database = %config::redact_url(&url),
                backend = store.backend(),
                "serving; API docs at /docs"
            );
            let audit = state.audit.clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let mut server = tokio::spawn(api::serve_with(listener, state, options, async {
                let _ = stopped.await;
            }));
            shutdown_signal().await;
            let _ = stop.send(());
            // Stop accepting, let in-flight requests finish, but not forever.
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(Ok(Ok(()))) => tracing::info!("in-flight requests finished"),
                Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error while stopping"),
                Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
                Err(_) => {
                    tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still running at the deadline; stopping anyway");
                    server.abort();
                }
            }
            if !audit.flush(Duration::from_secs(5)).await {
                tracing::warn!("audit records still queued at exit");
            }
            // Dropping mid-batch is safe: a batch is one transaction, and an
            // unconfirmed relay window is published again by the next relay.
            // Dropping the relay releases its leadership lock.
            background.abort();
            let _ = background.await;
            tracing::info!("stopped");
            Ok(())
        }
        Command::Relay { window } => {
            let amqp = cli.broker.url()?;
            let store = config::open_store(&url).await.context("opening the event store")?;
            let relay = Relay::new(store, &amqp, cli.broker.topology()).with_window(window as usize);
            tokio::select! {
                r = relay.run_checked() => r.context("relay")?,
                _ = shutdown_signal() => {}
            }
            Ok(())
        }
        Command::Worker => {
            let amqp = cli.broker.url()?;
            let store = config::open_store(&url).await.context("opening the event store")?;
            let projections = Arc::new(Projections::new(store, rules));
            projections.ensure().await.context("creating read models")?;
            let worker = Worker::new(projections, &amqp, cli.broker.topology());
            tokio::select! {
                r = worker.run_checked() => r.context("worker")?,
                _ = shutdown_signal() => {}
            }
            Ok(())
        }
        Command::Dlq(command) => dlq(&cli.broker.url()?, &cli.broker.topology(), command).await,
        Command::Prune {
            audit_older_than,
            idempotency_older_than,
            json,
        } => prune(&url, audit_older_than, idempotency_older_than, json).await,
        Command::Keys { name, scopes } => {
            let key = format!("wk_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
            let entry = api::ApiKeys::entry(&name, &scopes, &key);
            api::ApiKeys::parse(&entry)?;
            println!("key (give it to the client; it is not stored anywhere):\n  {key}");
            println!("entry (add to API_KEYS, comma-separated, or as a line of API_KEYS_FILE):\n  {entry}");
            Ok(())
        }
        // Read-only from here to Projections::Status: no migration, no
        // table, no file is created (`config::open_existing`).
        Command::Replay(args) => {
            let store = config::open_existing(&url).await.context("opening the event store")?;
            replay(&store, args).await
        }
        Command::Tail(args) => {
            let store = config::open_existing(&url).await.context("opening the event store")?;
            tail(&store, args).await
        }
        Command::Verify { json } => {
            let store = config::open_existing(&url).await.context("opening the event store")?;
            let projections = Projections::new(store.clone(), rules);
            verify(&store, &projections, json).await
        }
        Command::Load(args) => load(args).await,
        Command::Seed { events, wallets } => {
            let store = config::open_existing(&url).await.context("opening the event store")?;
            let bar = progress_bar(events, "seed");
            let started = std::time::Instant::now();
            let done = crate::seed::seed(&store, wallets as usize, events, |n| bar.set_position(n)).await?;
            bar.finish();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "appended {done} events over {wallets} wallets in {secs:.1} s ({:.0} events/s)",
                done as f64 / secs
            );
            Ok(())
        }
        Command::Projections(command) => {
            let store = config::open_existing(&url).await.context("opening the event store")?;
            let projections = Projections::new(store, rules);
            match command {
                ProjectionsCommand::Status { json } => {
                    status(&projections, json).await?;
                    if let Some(amqp) = cli.broker.configured() {
                        let b = crate::broker::status(&amqp, &cli.broker.topology(), projections.store())
                            .await
                            .context("reading the broker's state")?;
                        if json {
                            println!("{}", serde_json::to_string_pretty(&b)?);
                        } else {
                            println!(
                                "relay checkpoint {} (lag {}); worker queue {} ready; dead letters {}",
                                b.relay_checkpoint, b.relay_lag, b.worker_queue_depth, b.dead_letter_depth
                            );
                        }
                    }
                    Ok(())
                }
                ProjectionsCommand::Rebuild { names, restart } => {
                    projections.ensure().await.context("creating read models")?;
                    rebuild(&projections, names, restart).await
                }
            }
        }
    }
}

/// Idempotency keys are kept at least this long (the replay window README promises).
const MIN_IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(7 * 86_400);

async fn prune(
    url: &str,
    audit_older_than: Option<Duration>,
    idempotency_older_than: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(age) = idempotency_older_than {
        anyhow::ensure!(
            age >= MIN_IDEMPOTENCY_RETENTION,
            "--idempotency-older-than must be at least 7d: clients may retry a write with its key for that long"
        );
    }
    let store = config::open_existing(url).await.context("opening the event store")?;
    let pruned = crate::retention::prune(&store, audit_older_than, idempotency_older_than)
        .await
        .context("pruning")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&pruned)?);
    } else {
        println!(
            "deleted {} audit rows and {} idempotency keys",
            pruned.audit_rows, pruned.idempotency_keys
        );
    }
    Ok(())
}

async fn status(projections: &Projections, json: bool) -> anyhow::Result<()> {
    // Two samples a second apart give the current rate.
    let before = projections.status().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = projections.status().await?;
    if json {
        let rows: Vec<serde_json::Value> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| {
                let mut v = serde_json::to_value(a).expect("status serialises");
                v["ratePerSec"] = (a.checkpoint - b.checkpoint).into();
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<10} {:>12} {:>12} {:>10} {:>10}  rebuild",
        "projection", "checkpoint", "head", "lag", "events/s"
    );
    for (a, b) in after.iter().zip(&before) {
        let rebuild = a
            .rebuild_checkpoint
            .map_or("-".to_owned(), |p| format!("unfinished at {p}"));
        println!(
            "{:<10} {:>12} {:>12} {:>10} {:>10}  {}",
            a.name,
            a.checkpoint,
            a.head,
            a.lag,
            a.checkpoint - b.checkpoint,
            rebuild
        );
    }
    Ok(())
}

async fn dlq(amqp: &str, topology: &Topology, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { limit, json } => {
            let letters = crate::broker::dlq::list(amqp, topology, limit as usize).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
                return Ok(());
            }
            println!(
                "{:<36} {:>10} {:<20} {:<17}  reason",
                "message id", "position", "wallet", "type"
            );
            for l in &letters {
                println!(
                    "{:<36} {:>10} {:<20} {:<17}  {}",
                    l.message_id.as_deref().unwrap_or("-"),
                    l.position.map_or("-".to_owned(), |p| p.to_string()),
                    l.wallet_id.as_deref().unwrap_or("-"),
                    l.kind.as_deref().unwrap_or("-"),
                    l.reason.as_deref().unwrap_or("-")
                );
            }
            println!("{} dead letters shown (limit {limit})", letters.len());
            Ok(())
        }
        DlqCommand::Replay { ids, limit } => {
            let replayed = crate::broker::dlq::replay(amqp, topology, &ids, limit as usize).await?;
            println!("replayed {} dead letters to {}", replayed.len(), topology.worker_queue);
            ensure_all_found(&ids, &replayed, topology)
        }
        DlqCommand::Discard { ids } => {
            let discarded = crate::broker::dlq::discard(amqp, topology, &ids).await?;
            for l in &discarded {
                println!(
                    "discarded {} (position {}, wallet {})",
                    l.message_id.as_deref().unwrap_or("-"),
                    l.position.map_or("-".to_owned(), |p| p.to_string()),
                    l.wallet_id.as_deref().unwrap_or("-")
                );
            }
            println!("discarded {} dead letters", discarded.len());
            ensure_all_found(&ids, &discarded, topology)
        }
    }
}

/// An error naming the requested ids that were not in the dead-letter queue.
fn ensure_all_found(
    ids: &[String],
    found: &[crate::broker::dlq::DeadLetter],
    topology: &Topology,
) -> anyhow::Result<()> {
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| !found.iter().any(|l| l.message_id.as_ref() == Some(*id)))
        .map(|id| format!("{id:?}"))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "no dead letter with id {} in {} (see `wallet dlq list`)",
        missing.join(", "),
        topology.dead_letter_queue
    );
    Ok(())
}

async fn rebuild(projections: &Projections, names: Vec<String>, restart: bool) -> anyhow::Result<()> {
    let names: Vec<String> = if names.is_empty() {
        projections.names().into_iter().map(str::to_owned).collect()
    } else {
        names
    };
    let terminal = std::io::stderr().is_terminal();
    for name in names {
        let bar = if terminal {
            ProgressBar::new(0)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} events {per_sec} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(name.clone());
        let mut last_logged = 0u64;
        let done = projections
            .rebuild(&name, restart, |p| {
                bar.set_length(p.head.max(0) as u64);
                bar.set_position(p.position.max(0) as u64);
                // Off a terminal the bar is hidden: a log line every ~100k events instead.
                if !terminal && p.events >= last_logged + 100_000 {
                    last_logged = p.events;
                    tracing::info!(projection = %name, position = p.position, head = p.head, "rebuilding");
                }
            })
            .await
            .with_context(|| format!("rebuilding {name}"))?;
        bar.finish();
        println!(
            "{name}: rebuilt {} events, swapped in at position {}",
            done.events, done.position
        );
    }
    Ok(())
}

/// `wallet tail`: pages of the log, then (with --follow) a poll every
/// 200 ms. A closed pipe (`| head`) ends it quietly.
async fn tail(store: &crate::store::EventStore, args: TailArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let wallet = args
        .wallet
        .as_deref()
        .map(crate::aggregate::WalletId::parse)
        .transpose()
        .context("--wallet")?;
    let filter = crate::store::LogFilter {
        wallet,
        types: args.types,
    };
    let mut after = args.after;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let events = store.read_log(after, crate::feed::PAGE, &filter).await?;
        for e in &events {
            after = e.position;
            let line = if args.json {
                serde_json::to_string(&crate::feed::LogEvent::of(e))?
            } else {
                tail_line(e)
            };
            if writeln!(out, "{line}").is_err() {
                return Ok(());
            }
        }
        if events.len() < crate::feed::PAGE as usize {
            if !args.follow || out.flush().is_err() {
                let _ = out.flush();
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
}

fn tail_line(e: &crate::store::RecordedEvent) -> String {
    let money = match (e.event.amount(), &e.event) {
        (Some(amount), event) => format!("{amount:>20} -> {}", event.balance_after()),
        (None, _) => String::new(),
    };
    format!(
        "{:>10}  {}  {:<24} v{:<6} {:<16} {money}",
        e.position,
        e.recorded_at.format("%Y-%m-%dT%H:%M:%S%.6fZ"),
        e.stream.as_str(),
        e.version,
        e.event.event_type()
    )
}

async fn replay(store: &crate::store::EventStore, args: ReplayArgs) -> anyhow::Result<()> {
    use crate::store::Cutoff;
    let cutoff = match (&args.at, args.version) {
        (Some(at), _) => Cutoff::parse_point(at)
            .ok_or_else(|| anyhow::anyhow!("--at must be a log position (>= 0) or an RFC 3339 time"))?,
        (None, Some(v)) => Cutoff::Version(v),
        (None, None) => unreachable!("clap requires --at or --version"),
    };
    if let Some(wallet) = &args.wallet {
        let id = crate::aggregate::WalletId::parse(wallet)?;
        let r = crate::replay::wallet(store, &id, cutoff, args.trail).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!(
            "wallet {}  balance {}  version {}  exists {}",
            r.wallet_id, r.balance, r.version, r.exists
        );
        if let Some(trail) = &r.trail {
            println!(
                "{:>10} {:>8}  {:<17} {:>24} {:>24}  occurred at",
                "position", "version", "type", "amount", "balance after"
            );
            for t in trail {
                println!(
                    "{:>10} {:>8}  {:<17} {:>24} {:>24}  {}",
                    t.position,
                    t.version,
                    t.kind,
                    t.amount.as_deref().unwrap_or("-"),
                    t.balance_after,
                    t.occurred_at.to_rfc3339()
                );
            }
        }
        return Ok(());
    }
    let bar = progress_bar(store.head_position().await?.max(0) as u64, "replay");
    let r = crate::replay::all(store, cutoff, |p| bar.set_position(p.max(0) as u64)).await?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{:<40} {:>24}", "wallet", "balance");
    let shown = if args.limit == 0 {
        usize::MAX
    } else {
        args.limit as usize
    };
    for (w, b) in r.wallets.iter().take(shown) {
        println!("{:<40} {:>24}", w.as_str(), b.to_string());
    }
    if r.wallets.len() > shown {
        println!(
            "... {} more wallets not listed (--limit 0 lists all)",
            r.wallets.len() - shown
        );
    }
    println!(
        "{} wallets as of position {}; total {:.4}",
        r.wallets.len(),
        r.position,
        r.total
    );
    Ok(())
}

async fn verify(store: &crate::store::EventStore, projections: &Projections, json: bool) -> anyhow::Result<()> {
    let bar = progress_bar(store.head_position().await?.max(0) as u64, "verify");
    let report = crate::verify::verify(store, projections, |p, head| {
        bar.set_length(head.max(0) as u64);
        bar.set_position(p.max(0) as u64);
    })
    .await?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "checked {} events in {} streams, {} snapshots, {} read models",
            report.events,
            report.streams,
            report.snapshots,
            projections.names().len()
        );
        for d in &report.discrepancies {
            println!(
                "  {} @ {}: {}",
                d.stream.as_deref().unwrap_or("-"),
                d.position.map_or("-".to_owned(), |p| p.to_string()),
                d.problem
            );
        }
    }
    anyhow::ensure!(
        report.discrepancies.is_empty(),
        "{} discrepancies found ({} listed)",
        report.discrepancies_found,
        report.discrepancies.len()
    );
    if !json {
        println!("no discrepancies");
    }
    Ok(())
}

async fn load(args: LoadArgs) -> anyhow::Result<()> {
    let cfg = crate::load::LoadConfig {
        base_url: with_scheme(&args.url),
        other_urls: args.also_urls.iter().map(|u| with_scheme(u)).collect(),
        wallets: args.wallets as usize,
        concurrency: args.concurrency as usize,
        duration: Duration::from_secs(args.seconds),
        max_requests: args.requests,
        mix: args.mix,
        reads: args.reads,
        keyed: args.keyed,
        subscribers: args.subscribers as usize,
        holds: args.holds,
        batch: args.batch as usize,
        atomic: args.atomic,
    };
    let r = crate::load::run(cfg).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} requests in {:.1} s: {:.0} requests/s, {:.0} operations/s",
            r.requests, r.seconds, r.requests_per_sec, r.operations_per_sec
        );
        println!(
            "{:<9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "op", "count", "p50 ms", "p90 ms", "p99 ms", "max ms"
        );
        for (op, s) in &r.by_op {
            let op = serde_json::to_value(op)?.as_str().unwrap_or("?").to_owned();
            println!(
                "{:<9} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                op, s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms
            );
        }
        let statuses: Vec<String> = r.by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        println!(
            "statuses {}; transport errors {}",
            statuses.join(", "),
            r.transport_errors
        );
        println!(
            "conservation {} (expected {}, found {}); negative balances: {}",
            if r.conservation_ok { "ok" } else { "FAILED" },
            r.expected_total,
            r.actual_total,
            if r.no_negative_balance { "none" } else { "FOUND" }
        );
        if let Some(live) = &r.live {
            println!(
                "live: {} subscribers, {} deliveries, 201 -> event p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                live.subscribers, live.samples, live.p50_ms, live.p99_ms, live.max_ms
            );
        }
    }
    anyhow::ensure!(
        r.conservation_ok && r.no_negative_balance,
        "the server lost or invented money"
    );
    Ok(())
}

/// `host:port` as `http://host:port`: a URL without a scheme is plain HTTP
/// (not "relative URL without a base").
fn with_scheme(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// A bar with rate and ETA on a terminal; hidden otherwise.
fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

/// How long `serve` lets in-flight requests finish after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received, finishing in-flight requests");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_three_percentages_adding_up_to_100() {
        assert_eq!(parse_mix("40,30,30"), Ok([40, 30, 30]));
        assert_eq!(parse_mix("100, 0, 0"), Ok([100, 0, 0]));
        for bad in ["40,30", "40,30,20", "40,30,30,0", "a,b,c", "", "300,0,0"] {
            assert!(parse_mix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_load_url_without_a_scheme_is_http() {
        assert_eq!(with_scheme("127.0.0.1:3000"), "http://127.0.0.1:3000");
        assert_eq!(with_scheme("https://w.example/"), "https://w.example");
    }

    #[test]
    fn the_large_outflow_threshold_is_positive() {
        assert_eq!(parse_positive_amount("10000"), Ok(Decimal::from(10_000)));
        assert!(parse_positive_amount("0.0001").is_ok());
        for bad in ["0", "-5", "x", ""] {
            assert!(parse_positive_amount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn load_takes_the_mix_in_the_form_its_help_shows() {
        let cli = Cli::try_parse_from(["wallet", "load", "--mix", "40,30,30"]).unwrap();
        let Command::Load(args) = cli.command else {
            panic!("load")
        };
        assert_eq!(args.mix, [40, 30, 30]);
        assert!(Cli::try_parse_from(["wallet", "--fraud-large-amount", "0", "migrate"]).is_err());
    }
}
