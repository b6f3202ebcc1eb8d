//! Where a read is answered: a standby of `DATABASE_READ_URL` that has
//! what the request asks for (`store::standby`), or the primary. Read
//! models wait for the standby's own checkpoint (it replicates with them),
//! as the standbys' watcher sees it;
//! a standby that has not reached `minPosition` within the request's wait,
//! or fails (a replay conflict cancels a query), leaves the request to the
//! primary, so the answer is never older than asked and never a 500.

use std::future::Future;
use std::sync::Arc;

use super::{AppState, Problem};
use crate::projections::{FraudRules, ProjectionError, Projections};
use crate::store::standby::{Needs, Standbys};
use crate::store::{EventStore, Position};

/// The standbys and, for each, the read models as they replicate there.
pub struct Replicas {
    pub standbys: Arc<Standbys>,
    projections: Vec<Arc<Projections>>,
}

impl Replicas {
    pub fn new(standbys: Arc<Standbys>, rules: &FraudRules) -> Self {
        let projections = (0..standbys.len())
            .map(|i| Arc::new(Projections::new(standbys.store(i).clone(), rules.clone())))
            .collect();
        Self { standbys, projections }
    }
}

/// Runs `read` against the read models of a standby that has applied
/// `min` of `projection` (or the primary's), with the checkpoint it answers
/// at (`X-Projection-Position`).
pub(super) async fn read_model<T, F, Fut>(
    app: &AppState,
    projection: &str,
    min: Option<Position>,
    read: F,
) -> Result<(T, Position), Problem>
where
    F: Fn(Arc<Projections>) -> Fut,
    Fut: Future<Output = Result<T, ProjectionError>>,
{
    if let Some(replicas) = &app.replicas {
        let needs = Needs::Applied(projection, min.unwrap_or(0));
        if let Some(i) = replicas.standbys.pick_for(needs, app.read_wait).await {
            let projections = replicas.projections[i].clone();
            match on(&projections, projection, min, &read).await {
                Ok(Some(answer)) => {
                    metrics::counter!("wallet_standby_reads_total", "served_by" => "standby").increment(1);
                    return Ok(answer);
                }
                Ok(None) => {}
                Err(e) => replicas.standbys.failed(i, &e),
            }
        }
    }
    if app.replicas.is_some() {
        metrics::counter!("wallet_standby_reads_total", "served_by" => "primary").increment(1);
    }
    let position = at(&app.projections, projection, min, app).await?;
    Ok((read(app.projections.clone()).await?, position))
}

/// The answer of a standby's read models, which the watcher saw at `min`
/// (`None` if they are not, after all: a standby is never waited on here).
async fn on<T, F, Fut>(
    projections: &Arc<Projections>,
    projection: &str,
    min: Option<Position>,
    read: &F,
) -> Result<Option<(T, Position)>, ProjectionError>
where
    F: Fn(Arc<Projections>) -> Fut,
    Fut: Future<Output = Result<T, ProjectionError>>,
{
    let position = projections.checkpoint(projection).await?;
    if min.is_some_and(|m| position < m) {
        return Ok(None);
    }
    Ok(Some((read(projections.clone()).await?, position)))
}

/// The checkpoint, after waiting for `min` if given.
async fn at(
    projections: &Projections,
    projection: &str,
    min: Option<Position>,
    app: &AppState,
) -> Result<Position, ProjectionError> {
    match min {
        Some(min) => projections.wait_for(projection, min, app.read_wait).await,
        None => projections.checkpoint(projection).await,
    }
}

/// A log read on a standby that has replayed `after` if one is usable,
/// else (or if it fails) on the primary (`store::standby::LogReader`, the
/// live tail's reader too).
pub(super) async fn log_page<T, F, Fut>(app: &AppState, after: Position, read: F) -> Result<T, Problem>
where
    F: Fn(EventStore) -> Fut,
    Fut: Future<Output = Result<T, crate::store::StoreError>>,
{
    Ok(app.feed.reader().read(after, read).await?)
}

/// A wallet folded (snapshot and tail) on a standby that has replayed
/// `min` and, for a past state named by position, that position; else, or
/// if the standby fails, by the ledger on the primary.
pub(super) async fn balance(
    app: &AppState,
    wallet: &crate::aggregate::WalletId,
    cutoff: Option<crate::store::Cutoff>,
    min: Position,
) -> Result<crate::aggregate::Wallet, Problem> {
    let needed = match cutoff {
        Some(crate::store::Cutoff::Position(p)) => min.max(p),
        _ => min,
    };
    // As of a time: a lagging standby could lack events recorded before it.
    let by_time = matches!(cutoff, Some(crate::store::Cutoff::Time(_)));
    if let Some(replicas) = app.replicas.as_ref().filter(|_| !by_time) {
        if let Some(i) = replicas.standbys.pick(needed, app.read_wait).await {
            match crate::snapshots::load(replicas.standbys.store(i), wallet, cutoff).await {
                Ok(state) => {
                    metrics::counter!("wallet_standby_reads_total", "served_by" => "standby").increment(1);
                    return Ok(state);
                }
                Err(e) => replicas.standbys.failed(i, &e),
            }
        }
        metrics::counter!("wallet_standby_reads_total", "served_by" => "primary").increment(1);
    }
    Ok(app.ledger.wallet(wallet, cutoff).await?)
}
