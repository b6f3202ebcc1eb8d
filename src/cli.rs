//! The command line: one binary, one subcommand per job.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config;

#[derive(Parser, Debug)]
#[command(
    name = "wallet",
    version,
    about = "Event-sourced wallet service: balances you can prove"
)]
pub struct Cli {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct DatabaseArgs {
    /// postgres://... or sqlite://...; unset means an SQLite file in --data-dir.
    #[arg(long, env = "DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// Directory of the embedded SQLite database.
    #[arg(long, env = "WALLET_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the HTTP API (applies migrations first).
    Serve(ServeArgs),
    /// Apply database migrations and exit.
    Migrate,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "BIND_ADDR", default_value = "0.0.0.0:3000")]
    pub bind: SocketAddr,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let url = config::database_url(cli.database.database_url.as_deref(), &cli.database.data_dir)
        .context("creating the data directory")?;
    match cli.command {
        Command::Migrate => {
            config::open_store(&url).await.context("migrating")?;
            tracing::info!(database = %config::redact_url(&url), "migrations applied");
            Ok(())
        }
        Command::Serve(args) => {
            let store = config::open_store(&url)
                .await
                .context("opening the event store")?;
            let listener = TcpListener::bind(args.bind)
                .await
                .with_context(|| format!("binding {}", args.bind))?;
            tracing::info!(
                addr = %listener.local_addr()?,
                database = %config::redact_url(&url),
                backend = store.backend(),
                "serving; API docs at /docs"
            );
            api::serve(listener, AppState::new(store), shutdown_signal()).await?;
            tracing::info!("stopped");
            Ok(())
        }
    }
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
