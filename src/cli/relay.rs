//! `wallet relay`: publishes the committed log to RabbitMQ until
//! SIGINT/SIGTERM, then saves its checkpoint, closes its broker connection
//! and exits 0. Migrates the database first; one relay is active at a
//! time, the others stand by. With `--metrics-bind` it answers probes
//! (`crate::probe`).

use anyhow::Context;
use clap::Args;

use super::{shutdown_signal, BrokerArgs, ProbeArgs};
use crate::broker::relay::Relay;
use crate::config;
use crate::probe::Probed;

#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Messages published and not yet confirmed, at most.
    #[arg(long, env = "RELAY_WINDOW", default_value_t = crate::broker::relay::DEFAULT_WINDOW as u64,
          value_parser = clap::value_parser!(u64).range(1..=65_536))]
    pub window: u64,
    #[command(flatten)]
    pub probe: ProbeArgs,
}

pub(super) async fn run(args: RelayArgs, url: &str, broker: &BrokerArgs) -> anyhow::Result<()> {
    let amqp = broker.url()?;
    let store = config::open_store(url).await.context("opening the event store")?;
    let relay = Relay::new(store.clone(), &amqp, broker.topology()).with_window(args.window as usize);
    let probed = Probed::Relay {
        gauges: relay.gauges.clone(),
        store,
        topology: broker.topology(),
    };
    // On SIGINT/SIGTERM it saves its checkpoint and closes its connection.
    let service = async { relay.run_until(shutdown_signal()).await.context("relay") };
    args.probe.beside(probed, service).await
}
