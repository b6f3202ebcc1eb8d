//! `wallet worker`: consumes the fan-out queue into the read models until
//! SIGINT/SIGTERM, then closes its broker connection and exits 0. Migrates
//! the database and creates the read models first. With `--metrics-bind`
//! it answers probes (`crate::probe`).

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use super::{shutdown_signal, BrokerArgs, ProbeArgs};
use crate::broker::worker::Worker;
use crate::config;
use crate::probe::Probed;
use crate::projections::{FraudRules, Projections};

#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
}

pub(super) async fn run(args: WorkerArgs, url: &str, rules: FraudRules, broker: &BrokerArgs) -> anyhow::Result<()> {
    let amqp = broker.url()?;
    let store = config::open_store(url).await.context("opening the event store")?;
    let projections = Arc::new(Projections::new(store, rules));
    projections.ensure().await.context("creating read models")?;
    let worker = Worker::new(projections.clone(), &amqp, broker.topology());
    let probed = Probed::Worker {
        gauges: worker.gauges.clone(),
        projections,
    };
    // On SIGINT/SIGTERM it closes its broker connection and returns.
    let service = async { worker.run_until(shutdown_signal()).await.context("worker") };
    args.probe.beside(probed, service).await
}
