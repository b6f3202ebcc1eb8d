//! `wallet serve`: the HTTP API, with the in-process projections (no
//! broker) or the relay (with one), until SIGINT/SIGTERM.
//!
//! Migrates the database and creates the read models first.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{shutdown_signal, BrokerArgs};
use crate::api::{self, AppState};
use crate::broker::relay::Relay;
use crate::config;
use crate::projections::{FraudRules, Projections};
use crate::store::EventStore;

/// `RESOLVE_DEADLINE` unless set: on one host, and on a host list (above
/// pg_auto_failover's failover here, 11-15 s, BENCHMARKS.md).
const SINGLE_RESOLVE_DEADLINE: Duration = Duration::from_secs(8);
const CLUSTER_RESOLVE_DEADLINE: Duration = Duration::from_secs(20);

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
    /// PostgreSQL: synchronous standbys every commit must wait for. A
    /// primary whose synchronous_standby_names asks for fewer, or with
    /// fewer connected, is not written (503) and /ready says why.
    #[arg(long, env = "REQUIRE_SYNC_STANDBYS", default_value_t = 0)]
    pub require_sync_standbys: u32,
    /// How long the committer tries to find out what a batch whose answer
    /// was lost did (reconnecting, finding the primary) before answering
    /// OUTCOME_UNKNOWN. Default: 8s on one host, 20s on a host list (above
    /// a pg_auto_failover failover, ~11-15 s).
    #[arg(long, env = "RESOLVE_DEADLINE", value_parser = config::parse_duration)]
    pub resolve_deadline: Option<Duration>,
    /// Resolve lost batches without the quorum fence (the old path, which
    /// can acknowledge a write a failover then loses). Only for the test
    /// that shows it.
    #[arg(long, env = "UNSAFE_RESOLVE_WITHOUT_FENCE", hide = true)]
    pub unsafe_resolve_without_fence: bool,
    /// PostgreSQL standbys (one host or a host list, as DATABASE_URL) for
    /// the read models and the log pages; the primary serves what they
    /// cannot (see README, "Running highly available").
    #[arg(long, env = "DATABASE_READ_URL", hide_env_values = true)]
    pub read_url: Option<String>,
    /// A standby that lags the primary by more events than this is left
    /// for the primary.
    #[arg(long, env = "DATABASE_READ_MAX_LAG", default_value_t = 1000)]
    pub read_max_lag: u64,
}

/// Per-key budget when API keys are configured and none is given.
const DEFAULT_KEY_RATE: &str = "1000/s:2000";

/// How long `serve` lets in-flight requests finish after SIGTERM/SIGINT.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

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

    /// The ledger, read models, keys and limits the API serves with.
    async fn state(&self, store: EventStore, rules: FraudRules) -> anyhow::Result<AppState> {
        let replicas = self.replicas(&store, &rules)?;
        let projections = Arc::new(Projections::new(store.clone(), rules));
        projections.ensure().await.context("creating read models")?;
        let ledger = crate::ledger::Ledger::new(store.clone())
            .with_snapshot_every(self.snapshot_every)
            .with_cache_capacity(self.cache_wallets)
            .with_writer_options(crate::store::WriterOptions {
                require_sync_standbys: self.require_sync_standbys,
                resolve_deadline: self.resolve_deadline(&store),
                fence: !self.unsafe_resolve_without_fence,
                ..Default::default()
            });
        let mut state = AppState::with_ledger(ledger, store, projections);
        state.keys = Arc::new(self.keys().context("reading API keys")?);
        state.max_in_flight = self.max_in_flight;
        state.rate_limits = Arc::new(self.rate_limits(!state.keys.is_open()).context("rate limits")?);
        if let Some(replicas) = replicas {
            state.read_from(replicas);
        }
        Ok(state)
    }

    /// As given, or by the database URL: a host list fails over, and a lost
    /// answer is worth waiting out a failover for.
    fn resolve_deadline(&self, store: &EventStore) -> Duration {
        self.resolve_deadline.unwrap_or(match store.is_host_list() {
            true => CLUSTER_RESOLVE_DEADLINE,
            false => SINGLE_RESOLVE_DEADLINE,
        })
    }

    /// The standbys of `--read-url`, if any (PostgreSQL only).
    fn replicas(&self, store: &EventStore, rules: &FraudRules) -> anyhow::Result<Option<Arc<api::replicas::Replicas>>> {
        let Some(url) = self.read_url.as_deref().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        anyhow::ensure!(
            matches!(store, EventStore::Postgres(_)),
            "DATABASE_READ_URL needs DATABASE_URL on PostgreSQL"
        );
        let standbys = crate::store::standby::Standbys::connect(url, store.clone(), self.read_max_lag)
            .context("DATABASE_READ_URL")?;
        tracing::info!(
            standbys = standbys.len(),
            max_lag = self.read_max_lag,
            "reads from standbys"
        );
        Ok(Some(Arc::new(api::replicas::Replicas::new(standbys, rules))))
    }
}

pub(super) async fn run(args: ServeArgs, url: &str, rules: FraudRules, broker: &BrokerArgs) -> anyhow::Result<()> {
    let store = config::open_store(url).await.context("opening the event store")?;
    let mut state = args.state(store.clone(), rules).await?;
    let options = args.serve_options();
    if state.keys.is_open() {
        tracing::warn!(
            "NO API KEYS CONFIGURED: the API is open to anyone who can reach it; \
             set API_KEYS (see `wallet keys --help`)"
        );
    } else {
        tracing::info!(keys = ?state.keys.names(), "API keys required");
    }
    let background = spawn_background(&mut state, &store, &args, broker);
    state.spawn_expiry_sweeper(crate::expiry::DEFAULT_SWEEP_EVERY);
    let listener = TcpListener::bind(args.bind)
        .await
        .with_context(|| format!("binding {}", args.bind))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        database = %config::redact_url(url),
        backend = store.backend(),
        "serving; API docs at /docs"
    );
    let audit = state.audit.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve_with(listener, state, options, async {
        let _ = stopped.await;
    }));
    shutdown_signal().await;
    let _ = stop.send(());
    finish(server, audit, background).await;
    Ok(())
}

/// With a broker the worker owns the read models and this process relays
/// its log (or stands by for another relay); without one it runs the
/// projections itself.
fn spawn_background(state: &mut AppState, store: &EventStore, args: &ServeArgs, broker: &BrokerArgs) -> JoinHandle<()> {
    match broker.configured() {
        Some(amqp) => {
            let relay = Relay::new(store.clone(), &amqp, broker.topology())
                .with_wake(state.ledger.appended())
                .with_stall_after(args.relay_stall_after);
            state.relay = Some(relay.gauges.clone());
            state.broker = Some((amqp, broker.topology()));
            tracing::info!(exchange = %broker.amqp_exchange, "broker mode: relay on, in-process projections off");
            tokio::spawn(relay.run())
        }
        None => state.spawn_projection_runner(),
    }
}

/// Lets in-flight requests finish (but not for ever), flushes the audit
/// trail and stops the background task.
async fn finish(
    mut server: JoinHandle<Result<(), std::io::Error>>,
    audit: crate::audit::AuditLog,
    background: JoinHandle<()>,
) {
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
}
