//! The `wallet` binary: parses the command line and runs it.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // A missing .env file is normal.
    let _ = dotenvy::dotenv();
    let cli = wallet::cli::Cli::parse();
    let _log_file = wallet::config::init_logging();
    wallet::cli::run(cli).await
}
