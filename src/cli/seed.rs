//! `wallet seed`: appends a synthetic history of new wallets. Writes events
//! but creates no table: it needs `wallet migrate` first.

use anyhow::Context;
use clap::Args;

use super::progress_bar;
use crate::config;

#[derive(Args, Debug)]
pub struct SeedArgs {
    /// Events to append (at least).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub events: u64,
    /// Wallets to spread them over.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(2..=10_000_000))]
    pub wallets: u64,
}

pub(super) async fn run(args: SeedArgs, url: &str) -> anyhow::Result<()> {
    let store = config::open_existing(url).await.context("opening the event store")?;
    let bar = progress_bar(args.events, "seed");
    let started = std::time::Instant::now();
    let done = crate::seed::seed(&store, args.wallets as usize, args.events, |n| bar.set_position(n)).await?;
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    // Through the bars: a line printed past them would be drawn over.
    config::progress_bars().suspend(|| {
        println!(
            "appended {done} events over {} wallets in {secs:.1} s ({:.0} events/s)",
            args.wallets,
            done as f64 / secs
        )
    });
    Ok(())
}
