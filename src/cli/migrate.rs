//! `wallet migrate`: applies the migrations and creates the read models'
//! tables, so that the read-only commands find them.

use anyhow::Context;

use crate::config;
use crate::projections::{FraudRules, Projections};

pub(super) async fn run(url: &str, rules: FraudRules) -> anyhow::Result<()> {
    let store = config::open_store(url).await.context("migrating")?;
    Projections::new(store, rules)
        .ensure()
        .await
        .context("creating read models")?;
    tracing::info!(database = %config::redact_url(url), "migrations applied");
    Ok(())
}
