//! `wallet replay`: time travel, a wallet's state or every wallet's balance
//! as of a position, a time or a version. Read-only: opens the database as
//! it is.

use anyhow::Context;
use clap::Args;

use super::{progress_bar, table};
use crate::config;
use crate::store::{Cutoff, EventStore};

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

pub(super) async fn run(args: ReplayArgs, url: &str) -> anyhow::Result<()> {
    let store = config::open_existing(url).await.context("opening the event store")?;
    let cutoff = match (&args.at, args.version) {
        (Some(at), _) => Cutoff::parse_point(at)
            .ok_or_else(|| anyhow::anyhow!("--at must be a log position (>= 0) or an RFC 3339 time"))?,
        (None, Some(v)) => Cutoff::Version(v),
        (None, None) => unreachable!("clap requires --at or --version"),
    };
    match &args.wallet {
        Some(wallet) => one_wallet(&store, wallet, cutoff, &args).await,
        None => every_wallet(&store, cutoff, &args).await,
    }
}

async fn one_wallet(store: &EventStore, wallet: &str, cutoff: Cutoff, args: &ReplayArgs) -> anyhow::Result<()> {
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
        let rows = trail.iter().map(|t| {
            vec![
                t.position.to_string(),
                t.version.to_string(),
                t.kind.to_string(),
                t.amount.as_deref().unwrap_or("-").to_owned(),
                t.balance_after.to_string(),
                t.occurred_at.to_rfc3339(),
            ]
        });
        let header = ["position", "version", "type", "amount", "balance after", "occurred at"];
        println!("{}", table(&header, &[0, 1, 3, 4], rows));
    }
    Ok(())
}

async fn every_wallet(store: &EventStore, cutoff: Cutoff, args: &ReplayArgs) -> anyhow::Result<()> {
    let bar = progress_bar(store.head_position().await?.max(0) as u64, "replay");
    let r = crate::replay::all(store, cutoff, |p| bar.set_position(p.max(0) as u64)).await?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let shown = if args.limit == 0 {
        usize::MAX
    } else {
        args.limit as usize
    };
    let rows = r.wallets.iter().take(shown);
    let rows = rows.map(|(w, b)| vec![w.as_str().to_owned(), b.to_string()]);
    println!("{}", table(&["wallet", "balance"], &[1], rows));
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
