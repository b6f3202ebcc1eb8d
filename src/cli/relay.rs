//! `wallet relay`: publishes the committed log to RabbitMQ until
//! SIGINT/SIGTERM. Migrates the database first; one relay is active at a
//! time, the others stand by.

use anyhow::Context;
use clap::Args;

use super::{shutdown_signal, BrokerArgs};
use crate::broker::relay::Relay;
use crate::config;

#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Messages published and not yet confirmed, at most.
    #[arg(long, env = "RELAY_WINDOW", default_value_t = crate::broker::relay::DEFAULT_WINDOW as u64,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub window: u64,
}

pub(super) async fn run(args: RelayArgs, url: &str, broker: &BrokerArgs) -> anyhow::Result<()> {
    let amqp = broker.url()?;
    let store = config::open_store(url).await.context("opening the event store")?;
    let relay = Relay::new(store, &amqp, broker.topology()).with_window(args.window as usize);
    tokio::select! {
        r = relay.run_checked() => r.context("relay")?,
        _ = shutdown_signal() => {}
    }
    Ok(())
}
