//! Snapshots: a wallet's folded state stored every N events so loading a
//! wallet folds only the events after the newest snapshot.
//!
//! The state is encoded with postcard together with the stream version it
//! covers and a state schema version. A snapshot in another schema version,
//! or one that does not decode, is ignored: changing the state type can never
//! break loading, and snapshots only ever change speed, never results
//! (`verify` checks each one against the fold at its version).

use serde::{Deserialize, Serialize};

use crate::aggregate::{Balance, Wallet, WalletId};
use crate::store::{Cutoff, EventStore, Position, SnapshotRecord, StoreError};

/// Bump when `StateV1` changes shape; older snapshots are then ignored and
/// rewritten as wallets move.
pub const SNAPSHOT_SCHEMA_VERSION: i32 = 1;
/// Default distance, in events, between snapshots of a stream.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100;

/// The encoded state, schema version 1.
#[derive(Serialize, Deserialize)]
struct StateV1 {
    version: u64,
    balance: Balance,
}

pub fn encode(wallet: &Wallet) -> Vec<u8> {
    let state = StateV1 {
        version: wallet.version,
        balance: wallet.balance,
    };
    postcard::to_allocvec(&state).expect("wallet states encode")
}

/// `None` when the bytes are not a valid state of this schema version.
pub fn decode(id: &WalletId, record: &SnapshotRecord) -> Option<Wallet> {
    if record.schema_version != SNAPSHOT_SCHEMA_VERSION {
        return None;
    }
    let state: StateV1 = postcard::from_bytes(&record.state).ok()?;
    (state.version == record.version).then(|| Wallet {
        id: id.clone(),
        balance: state.balance,
        version: state.version,
    })
}

/// Whether a stream that moved from `before` to `after` crossed a multiple of `every`.
pub fn due(every: u64, before: u64, after: u64) -> bool {
    every > 0 && before / every != after / every
}

/// A wallet as of `cutoff` (or now): the newest usable snapshot within the
/// cutoff, plus the events after it.
pub async fn load(store: &EventStore, id: &WalletId, cutoff: Option<Cutoff>) -> Result<Wallet, StoreError> {
    let base = match store.latest_snapshot(id, SNAPSHOT_SCHEMA_VERSION, cutoff).await? {
        Some(record) => decode(id, &record).unwrap_or_else(|| {
            tracing::warn!(wallet = %id, version = record.version, "ignoring undecodable snapshot");
            Wallet::empty(id.clone())
        }),
        None => Wallet::empty(id.clone()),
    };
    let tail = store.read_stream(id, base.version, cutoff).await?;
    Ok(tail.iter().fold(base, |w, e| w.evolve(&e.event)))
}

/// Stores `wallet` as the snapshot at its version (log `position`).
pub async fn save(store: &EventStore, wallet: &Wallet, position: Position) -> Result<(), StoreError> {
    store
        .save_snapshot(&SnapshotRecord {
            stream: wallet.id.clone(),
            version: wallet.version,
            position,
            schema_version: SNAPSHOT_SCHEMA_VERSION,
            state: encode(wallet),
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Amount;

    #[test]
    fn states_round_trip_and_foreign_schemas_are_ignored() {
        let id = WalletId::parse("w").unwrap();
        let w = Wallet {
            id: id.clone(),
            balance: Balance::ZERO.checked_add(Amount::parse("12.3456").unwrap()).unwrap(),
            version: 7,
        };
        let record = |schema_version, state| SnapshotRecord {
            stream: id.clone(),
            version: 7,
            position: 9,
            schema_version,
            state,
        };
        assert_eq!(
            decode(&id, &record(SNAPSHOT_SCHEMA_VERSION, encode(&w))),
            Some(w.clone())
        );
        assert_eq!(decode(&id, &record(0, encode(&w))), None, "older schema ignored");
        assert_eq!(
            decode(&id, &record(SNAPSHOT_SCHEMA_VERSION, vec![0xff, 1, 2])),
            None,
            "garbage ignored"
        );
    }

    #[test]
    fn snapshots_fall_due_every_n_events() {
        assert!(!due(100, 0, 99));
        assert!(due(100, 99, 100));
        assert!(due(100, 98, 101), "a transfer may jump over the multiple");
        assert!(!due(0, 0, 1_000), "0 disables snapshots");
    }
}
