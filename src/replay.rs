//! Time travel: a wallet's state, or every wallet's balance, as of a point
//! in the log (a position, an event time or a stream version). Read-only.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::aggregate::{Balance, Wallet, WalletId};
use crate::snapshots;
use crate::store::{Cutoff, EventStore, Position, StoreError};

/// Events read per query when scanning the whole log.
const SCAN_BATCH: u32 = 10_000;

/// One event of a wallet's trail with the balance it left.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrailRow {
    pub position: Position,
    pub version: u64,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub amount: Option<String>,
    pub balance_after: Balance,
    pub occurred_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WalletReplay {
    pub wallet_id: WalletId,
    pub exists: bool,
    pub balance: Balance,
    pub version: u64,
    /// Present when asked for: every event up to the point, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trail: Option<Vec<TrailRow>>,
}

/// A wallet as of `cutoff`. Without a trail it starts from the newest
/// snapshot within the cutoff; with one it folds every event.
pub async fn wallet(
    store: &EventStore,
    id: &WalletId,
    cutoff: Cutoff,
    trail: bool,
) -> Result<WalletReplay, StoreError> {
    let (state, trail) = if trail {
        let events = store.read_stream(id, 0, Some(cutoff)).await?;
        let mut state = Wallet::empty(id.clone());
        let mut rows = Vec::with_capacity(events.len());
        for e in &events {
            state = state.evolve(&e.event);
            rows.push(TrailRow {
                position: e.position,
                version: e.version,
                kind: e.event.event_type(),
                amount: e.event.amount().map(|a| a.to_string()),
                balance_after: state.balance,
                occurred_at: e.recorded_at,
            });
        }
        (state, Some(rows))
    } else {
        (snapshots::load(store, id, Some(cutoff)).await?, None)
    };
    Ok(WalletReplay {
        wallet_id: id.clone(),
        exists: state.exists(),
        balance: state.balance,
        version: state.version,
        trail,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SystemReplay {
    /// The last log position included.
    pub position: Position,
    pub wallets: BTreeMap<WalletId, Balance>,
    pub total: Decimal,
}

/// Every wallet's balance as of a position or a time: one pass over the log
/// up to that point. `progress(position)` is called after each batch.
pub async fn all(
    store: &EventStore,
    cutoff: Cutoff,
    mut progress: impl FnMut(Position),
) -> Result<SystemReplay, StoreError> {
    let within = |position: Position, at: DateTime<Utc>| match cutoff {
        Cutoff::Position(p) => position <= p,
        // Event time does not decrease along the log (it is taken under the append lock).
        Cutoff::Time(t) => at <= t,
        Cutoff::Version(_) => panic!("a stream version is not a point of the whole log"),
    };
    let mut wallets = BTreeMap::new();
    let mut last = 0;
    'scan: loop {
        let batch = store.read_all(last, SCAN_BATCH).await?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            if !within(e.position, e.recorded_at) {
                break 'scan;
            }
            wallets.insert(e.stream.clone(), e.event.balance_after());
            last = e.position;
        }
        progress(last);
    }
    let total = wallets.values().map(|b| b.value()).sum();
    Ok(SystemReplay {
        position: last,
        wallets,
        total,
    })
}
