//! The command line: one binary, one subcommand per job.
//!
//! Each subcommand has a file of its own under `src/cli/`, holding its
//! arguments beside the code that uses them; [`run`] only dispatches. This
//! file holds what several commands share: where the database is, the
//! broker and its topology, the fraud rules, a progress bar and the
//! shutdown signal.
//!
//! Only `serve`, `migrate`, `worker` and `relay` migrate the database
//! (`config::open_store`) or declare broker topology. Every other command
//! opens what exists (`config::open_existing`, passive declares) and says
//! so when it is missing.

mod dlq;
mod keys;
mod load;
mod migrate;
mod projections;
mod prune;
mod relay;
mod replay;
mod seed;
mod serve;
mod tail;
mod verify;
mod worker;

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;

use crate::broker::Topology;
use crate::config;
use crate::projections::FraudRules;

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
    /// amqp://user:pass@host:5672/%2f, or a cluster's nodes separated by
    /// commas (each connection tries them in turn, starting one further).
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
    /// classic, or quorum on a RabbitMQ cluster: replicated queues named
    /// <exchange>.worker.quorum and <exchange>.dlq.quorum.
    #[arg(long, env = "AMQP_QUEUE_TYPE", value_enum, default_value = "classic", global = true)]
    pub amqp_queue_type: crate::broker::QueueType,
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
        Topology::named(&self.amqp_exchange).with_queue_type(self.amqp_queue_type)
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
    Serve(serve::ServeArgs),
    /// Publish the committed log to RabbitMQ, in order, with publisher
    /// confirms. Only one relay is active at a time; others stand by.
    Relay(relay::RelayArgs),
    /// Consume the fan-out queue into the read models; what cannot be
    /// applied goes to the dead-letter queue.
    Worker(worker::WorkerArgs),
    /// Inspect or replay the dead-letter queue.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Delete old audit rows and, if asked, old idempotency keys (in
    /// batches, beside a running service). The event log is never pruned.
    Prune(prune::PruneArgs),
    /// Make an API key: prints the key (give it to the client) and the
    /// entry to add to API_KEYS (the service stores only its hash).
    Keys(keys::KeysArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Inspect or rebuild the read models (history, stats, flags).
    #[command(subcommand)]
    Projections(projections::ProjectionsCommand),
    /// Time travel: a wallet's state (or every wallet's balance and the
    /// total) as of a log position, an event time or a stream version.
    /// Read-only.
    Replay(replay::ReplayArgs),
    /// Print the committed log in position order from a position, and with
    /// --follow keep printing new events as they commit. Reads the database
    /// directly; read-only (creates nothing).
    Tail(tail::TailArgs),
    /// Re-fold every stream and check versions, the hash chain, balances,
    /// transfer pairs, snapshots and read models. Exits non-zero on any
    /// discrepancy.
    Verify(verify::VerifyArgs),
    /// Load generator: drives a running server (any implementation of these
    /// routes) with a mixed write workload or balance reads, then checks
    /// conservation and that no balance is negative (exit 1 if not).
    Load(load::LoadArgs),
    /// Append a synthetic mixed history (new wallets) for benchmarks and
    /// rebuild drills. Never touches existing wallets.
    Seed(seed::SeedArgs),
}

impl Command {
    /// The long-running services (they print nothing to stdout).
    pub fn is_service(&self) -> bool {
        matches!(self, Command::Serve(_) | Command::Relay(_) | Command::Worker(_))
    }
}

/// Runs the command: each subcommand's file does the work.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = config::database_url(cli.database.database_url.as_deref(), &cli.database.data_dir);
    let rules = cli.fraud.rules();
    let broker = &cli.broker;
    match cli.command {
        // These may migrate the database and declare the broker's topology.
        Command::Migrate => migrate::run(&url, rules).await,
        Command::Serve(args) => serve::run(args, &url, rules, broker).await,
        Command::Relay(args) => relay::run(args, &url, broker).await,
        Command::Worker(args) => worker::run(args, &url, rules, broker).await,
        // These open only what exists.
        Command::Dlq(command) => dlq::run(command, broker).await,
        Command::Prune(args) => prune::run(args, &url).await,
        Command::Keys(args) => keys::run(args),
        Command::Replay(args) => replay::run(args, &url).await,
        Command::Tail(args) => tail::run(args, &url).await,
        Command::Verify(args) => verify::run(args, &url, rules).await,
        Command::Load(args) => load::run(args).await,
        Command::Seed(args) => seed::run(args, &url).await,
        Command::Projections(command) => projections::run(command, &url, rules, broker).await,
    }
}

/// A plain text table: each column as wide as its widest cell, two spaces
/// between columns, no borders, no trailing spaces; the columns numbered in
/// `right` (numbers) are aligned right.
fn table(header: &[&str], right: &[usize], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    use comfy_table::{presets, CellAlignment, Table};
    let mut t = Table::new();
    t.load_style(presets::NOTHING).set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    let last = header.len().saturating_sub(1);
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, if i == last { 0 } else { 2 }));
        if right.contains(&i) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    t.trim_fmt()
}

/// A bar with rate and ETA on a terminal (log lines print above it); hidden
/// otherwise.
fn progress_bar(len: u64, prefix: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = config::progress_bars().add(ProgressBar::new(len));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar
}

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

/// Address of the probe listener (`/health`, `/ready`, `/metrics`) of a
/// `worker` or `relay`; off unless given.
#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// Serve /health, /ready and /metrics on this address (e.g.
    /// 0.0.0.0:9100). Off by default.
    #[arg(long, env = "METRICS_BIND")]
    pub metrics_bind: Option<std::net::SocketAddr>,
}

impl ProbeArgs {
    /// Runs `service` with the probe listener beside it, if one is asked
    /// for, and stops the listener when the service ends.
    async fn beside<T>(
        &self,
        probed: crate::probe::Probed,
        service: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let Some(bind) = self.metrics_bind else {
            return service.await;
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (_, mut probes) = crate::probe::spawn(bind, probed, async {
            let _ = stopped.await;
        })
        .await
        .with_context(|| format!("binding the probe listener to {bind}"))?;
        let result = service.await;
        let _ = stop.send(());
        // A scraper's open connection gets a moment to finish, not more.
        if tokio::time::timeout(std::time::Duration::from_secs(5), &mut probes)
            .await
            .is_err()
        {
            probes.abort();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_fit_their_widest_cell() {
        let rows = vec![
            vec!["1".to_owned(), "WalletLimitsChanged".to_owned(), "-".to_owned()],
            vec!["12345".to_owned(), "FundsDeposited".to_owned(), "10.0000".to_owned()],
        ];
        let text = table(&["position", "type", "amount"], &[0, 2], rows);
        assert_eq!(
            text,
            "position  type                  amount\n\
             \x20      1  WalletLimitsChanged        -\n\
             \x20  12345  FundsDeposited       10.0000"
        );
    }

    #[test]
    fn the_large_outflow_threshold_is_positive() {
        assert_eq!(parse_positive_amount("10000"), Ok(Decimal::from(10_000)));
        assert!(parse_positive_amount("0.0001").is_ok());
        for bad in ["0", "-5", "x", ""] {
            assert!(parse_positive_amount(bad).is_err(), "{bad}");
        }
    }
}
