//! `wallet dlq`: lists, replays or discards dead letters. Declares nothing:
//! a queue that does not exist is an error (passive declares).

use clap::Subcommand;

use super::{table, BrokerArgs};
use crate::broker::dlq::DeadLetter;
use crate::broker::Topology;

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

pub(super) async fn run(command: DlqCommand, broker: &BrokerArgs) -> anyhow::Result<()> {
    let amqp = broker.url()?;
    let topology = broker.topology();
    match command {
        DlqCommand::List { limit, json } => {
            let letters = crate::broker::dlq::list(&amqp, &topology, limit as usize).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else {
                print_list(&letters, limit);
            }
            Ok(())
        }
        DlqCommand::Replay { ids, limit } => {
            let replayed = crate::broker::dlq::replay(&amqp, &topology, &ids, limit as usize).await?;
            println!("replayed {} dead letters to {}", replayed.len(), topology.worker_queue);
            ensure_all_found(&ids, &replayed, &topology)
        }
        DlqCommand::Discard { ids } => {
            let discarded = crate::broker::dlq::discard(&amqp, &topology, &ids).await?;
            for l in &discarded {
                println!(
                    "discarded {} (position {}, wallet {})",
                    l.message_id.as_deref().unwrap_or("-"),
                    l.position.map_or("-".to_owned(), |p| p.to_string()),
                    l.wallet_id.as_deref().unwrap_or("-")
                );
            }
            println!("discarded {} dead letters", discarded.len());
            ensure_all_found(&ids, &discarded, &topology)
        }
    }
}

fn print_list(letters: &[DeadLetter], limit: u64) {
    let dash = |v: Option<&str>| v.unwrap_or("-").to_owned();
    let rows = letters.iter().map(|l| {
        vec![
            dash(l.message_id.as_deref()),
            l.position.map_or("-".to_owned(), |p| p.to_string()),
            dash(l.wallet_id.as_deref()),
            dash(l.kind.as_deref()),
            dash(l.reason.as_deref()),
        ]
    });
    let header = ["message id", "position", "wallet", "type", "reason"];
    println!("{}", table(&header, &[1], rows));
    println!("{} dead letters shown (limit {limit})", letters.len());
}

/// An error naming the requested ids that were not in the dead-letter queue.
fn ensure_all_found(ids: &[String], found: &[DeadLetter], topology: &Topology) -> anyhow::Result<()> {
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
