//! `wallet prune`: deletes old audit rows and idempotency keys in batches.
//! Deletes rows but creates nothing: it needs `wallet migrate` first.

use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::config;

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true)
    .args(["audit_older_than", "idempotency_older_than"])))]
pub struct PruneArgs {
    /// Delete api_audit rows recorded longer ago than this (e.g. 90d).
    #[arg(long, value_parser = config::parse_duration)]
    pub audit_older_than: Option<Duration>,
    /// Delete idempotency keys older than this (at least 7d). A retry
    /// carrying a pruned key takes effect again, so keep keys at least
    /// as long as clients may retry. Default: kept for ever.
    #[arg(long, value_parser = config::parse_duration)]
    pub idempotency_older_than: Option<Duration>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Idempotency keys are kept at least this long (the replay window README promises).
const MIN_IDEMPOTENCY_RETENTION: Duration = Duration::from_secs(7 * 86_400);

pub(super) async fn run(args: PruneArgs, url: &str) -> anyhow::Result<()> {
    if let Some(age) = args.idempotency_older_than {
        anyhow::ensure!(
            age >= MIN_IDEMPOTENCY_RETENTION,
            "--idempotency-older-than must be at least 7d: clients may retry a write with its key for that long"
        );
    }
    let store = config::open_existing(url).await.context("opening the event store")?;
    let pruned = crate::retention::prune(&store, args.audit_older_than, args.idempotency_older_than)
        .await
        .context("pruning")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pruned)?);
    } else {
        println!(
            "deleted {} audit rows and {} idempotency keys",
            pruned.audit_rows, pruned.idempotency_keys
        );
    }
    Ok(())
}
