//! `wallet projections`: the read models' status (read-only: opens the
//! database as it is) and their rebuild beside the live ones.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::{table, BrokerArgs};
use crate::broker::BrokerStatus;
use crate::config;
use crate::projections::{FraudRules, Projections};

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

pub(super) async fn run(
    command: ProjectionsCommand,
    url: &str,
    rules: FraudRules,
    broker: &BrokerArgs,
) -> anyhow::Result<()> {
    let store = config::open_existing(url).await.context("opening the event store")?;
    let projections = Projections::new(store, rules);
    match command {
        ProjectionsCommand::Status { json } => status(&projections, broker, json).await,
        ProjectionsCommand::Rebuild { names, restart } => {
            // A rebuild writes: it creates the read models it needs.
            projections.ensure().await.context("creating read models")?;
            rebuild(&projections, names, restart).await
        }
    }
}

/// The status as one JSON document: `{"projections": [...], "broker": ...}`
/// (`broker` null without one), so a script reads one value in both modes.
#[derive(serde::Serialize)]
struct StatusDocument {
    projections: Vec<serde_json::Value>,
    broker: Option<BrokerStatus>,
}

async fn status(projections: &Projections, broker: &BrokerArgs, json: bool) -> anyhow::Result<()> {
    // Two samples a second apart give the current rate.
    let before = projections.status().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = projections.status().await?;
    let queues = match broker.configured() {
        Some(amqp) => Some(
            crate::broker::status(&amqp, &broker.topology(), projections.store())
                .await
                .context("reading the broker's state")?,
        ),
        None => None,
    };
    if json {
        let rows = after
            .iter()
            .zip(&before)
            .map(|(a, b)| {
                let mut v = serde_json::to_value(a)?;
                v["ratePerSec"] = (a.checkpoint - b.checkpoint).into();
                Ok(v)
            })
            .collect::<Result<_, serde_json::Error>>()?;
        let document = StatusDocument {
            projections: rows,
            broker: queues,
        };
        println!("{}", serde_json::to_string_pretty(&document)?);
        return Ok(());
    }
    let rows = after.iter().zip(&before).map(|(a, b)| {
        let rebuild = a
            .rebuild_checkpoint
            .map_or("-".to_owned(), |p| format!("unfinished at {p}"));
        let rate = a.checkpoint - b.checkpoint;
        vec![
            a.name.clone(),
            a.checkpoint.to_string(),
            a.head.to_string(),
            a.lag.to_string(),
            rate.to_string(),
            a.parked.to_string(),
            rebuild,
        ]
    });
    let header = [
        "projection",
        "checkpoint",
        "head",
        "lag",
        "events/s",
        "parked",
        "rebuild",
    ];
    println!("{}", table(&header, &[1, 2, 3, 4, 5], rows));
    if let Some(b) = queues {
        println!(
            "relay checkpoint {} (lag {}); worker queue {} ready; dead letters {}",
            b.relay_checkpoint, b.relay_lag, b.worker_queue_depth, b.dead_letter_depth
        );
    }
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
            config::progress_bars().add(ProgressBar::new(0))
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
        // Through the bars: a line printed past them would be drawn over.
        config::progress_bars().suspend(|| {
            println!(
                "{name}: rebuilt {} events, swapped in at position {}",
                done.events, done.position
            )
        });
    }
    Ok(())
}
