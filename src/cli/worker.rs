//! `wallet worker`: consumes the fan-out queue into the read models until
//! SIGINT/SIGTERM, then closes its broker connection and exits 0. Migrates
//! the database and creates the read models first.

use std::sync::Arc;

use anyhow::Context;

use super::{shutdown_signal, BrokerArgs};
use crate::broker::worker::Worker;
use crate::config;
use crate::projections::{FraudRules, Projections};

pub(super) async fn run(url: &str, rules: FraudRules, broker: &BrokerArgs) -> anyhow::Result<()> {
    let amqp = broker.url()?;
    let store = config::open_store(url).await.context("opening the event store")?;
    let projections = Arc::new(Projections::new(store, rules));
    projections.ensure().await.context("creating read models")?;
    let worker = Worker::new(projections, &amqp, broker.topology());
    // On SIGINT/SIGTERM it closes its broker connection and returns.
    worker.run_until(shutdown_signal()).await.context("worker")
}
