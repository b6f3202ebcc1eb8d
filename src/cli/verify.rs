//! `wallet verify`: re-folds the whole log and compares it with snapshots
//! and read models. Read-only: opens the database as it is.

use anyhow::Context;
use clap::Args;

use super::progress_bar;
use crate::config;
use crate::projections::{FraudRules, Projections};

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn run(args: VerifyArgs, url: &str, rules: FraudRules) -> anyhow::Result<()> {
    let store = config::open_existing(url).await.context("opening the event store")?;
    let projections = Projections::new(store.clone(), rules);
    let bar = progress_bar(store.head_position().await?.max(0) as u64, "verify");
    let report = crate::verify::verify(&store, &projections, |p, head| {
        bar.set_length(head.max(0) as u64);
        bar.set_position(p.max(0) as u64);
    })
    .await?;
    bar.finish_and_clear();
    if args.json {
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
    if !args.json {
        println!("no discrepancies");
    }
    Ok(())
}
