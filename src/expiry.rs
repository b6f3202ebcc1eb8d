//! The expiry sweeper: records `HoldExpired` for every hold whose time has
//! passed, on its own, within a few seconds.
//!
//! It reads the due holds from the holds read model (an index by expiry
//! time of the active ones) and hands each to the ledger as an `ExpireHold`
//! command, so the committer decides it like any other: a capture or void
//! that got there first wins and the expiry is answered `HOLD_NOT_ACTIVE`;
//! several processes sweeping at once resolve each hold once (the store's
//! head check refuses the others). The read model only says where to look;
//! the wallet's own state decides.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;

use crate::aggregate::{DomainError, WalletId};
use crate::ledger::{CommandError, Ledger};
use crate::projections::holds::{HoldView, EXPIRY_KIND, NAME};
use crate::projections::{DocQuery, ProjectionError, Projections};

/// How often the sweeper looks for due holds.
pub const DEFAULT_SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Holds expired per sweep at most (the next sweep takes the rest).
const SWEEP_BATCH: u32 = 256;

/// Sweeps every `every` until the process ends. Errors are logged and the
/// next sweep tries again.
pub async fn run(ledger: Arc<Ledger>, projections: Arc<Projections>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sweep(&ledger, &projections, Utc::now()).await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "holds expired"),
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed; retrying"),
        }
    }
}

/// One sweep: expires the holds due at `now` that the read model still
/// shows active. Returns how many this process expired.
pub async fn sweep(ledger: &Ledger, projections: &Projections, now: DateTime<Utc>) -> Result<usize, ProjectionError> {
    let query = DocQuery {
        kind: EXPIRY_KIND,
        wallet_id: None,
        tag: Some("held"),
        before_sort: Some(now.timestamp_millis() + 1),
        before_key: None,
        limit: SWEEP_BATCH,
    };
    let due: Vec<(WalletId, uuid::Uuid)> = projections
        .query(NAME, &query)
        .await?
        .into_iter()
        .filter_map(|(_, body)| serde_json::from_str::<HoldView>(&body).ok())
        .filter_map(|h| Some((WalletId::parse(&h.wallet_id).ok()?, h.hold_id)))
        .collect();
    // Handed over together: the committer decides them in one batch.
    let outcomes = join_all(due.into_iter().map(|(wallet, hold)| ledger.expire_hold(wallet, hold))).await;
    let mut expired = 0;
    for outcome in outcomes {
        match outcome {
            Ok(_) => expired += 1,
            // Captured, voided or expired by someone else first.
            Err(CommandError::Rejected {
                error: DomainError::HoldNotActive { .. },
                ..
            }) => {}
            Err(e) => tracing::warn!(error = %e, "a due hold was not expired; the next sweep retries"),
        }
    }
    metrics::counter!("holds_expired_total").increment(expired as u64);
    Ok(expired)
}
