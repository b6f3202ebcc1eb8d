//! Snapshots: a wallet's folded state stored every N events so loading a
//! wallet folds only the events after the newest snapshot.
//!
//! The state is encoded with postcard together with the stream version it
//! covers and a state schema version. A snapshot in another schema version,
//! or one that does not decode, is ignored: changing the state type can never
//! break loading, and snapshots only ever change speed, never results
//! (`verify` checks each one against the fold at its version).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Amount, Balance, Hold, Limits, Wallet, WalletId};
use crate::store::{Cutoff, EventStore, Position, SnapshotRecord, StoreError};

/// Bump when `StateV2` changes shape. Version 1 snapshots (before holds
/// and limits) are still read; unknown versions are ignored and rewritten
/// as wallets move.
pub const SNAPSHOT_SCHEMA_VERSION: i32 = 2;
/// Default distance, in events, between snapshots of a stream.
pub const DEFAULT_SNAPSHOT_EVERY: u64 = 100;

/// The encoded state, schema version 1: before holds and limits existed,
/// so a wallet of then had neither.
#[derive(Serialize, Deserialize)]
struct StateV1 {
    version: u64,
    balance: Balance,
}

/// The encoded state, schema version 2.
#[derive(Serialize, Deserialize)]
struct StateV2 {
    version: u64,
    balance: Balance,
    held: Balance,
    holds: Vec<HoldV2>,
    min_balance: Balance,
    max_balance: Option<Balance>,
}

#[derive(Serialize, Deserialize)]
struct HoldV2 {
    id: Uuid,
    amount: Amount,
    expires_at: DateTime<Utc>,
    to: Option<WalletId>,
}

pub fn encode(wallet: &Wallet) -> Vec<u8> {
    let state = StateV2 {
        version: wallet.version,
        balance: wallet.balance,
        held: wallet.held,
        holds: wallet
            .holds
            .iter()
            .map(|(id, h)| HoldV2 {
                id: *id,
                amount: h.amount,
                expires_at: h.expires_at,
                to: h.to.clone(),
            })
            .collect(),
        min_balance: wallet.limits.min_balance,
        max_balance: wallet.limits.max_balance,
    };
    postcard::to_allocvec(&state).expect("wallet states encode")
}

/// `None` when the bytes are not a valid state of a known schema version.
pub fn decode(id: &WalletId, record: &SnapshotRecord) -> Option<Wallet> {
    let wallet = match record.schema_version {
        1 => {
            let state: StateV1 = postcard::from_bytes(&record.state).ok()?;
            Wallet {
                balance: state.balance,
                version: state.version,
                ..Wallet::empty(id.clone())
            }
        }
        2 => {
            let state: StateV2 = postcard::from_bytes(&record.state).ok()?;
            Wallet {
                id: id.clone(),
                balance: state.balance,
                version: state.version,
                held: state.held,
                holds: state
                    .holds
                    .into_iter()
                    .map(|h| {
                        let hold = Hold {
                            amount: h.amount,
                            expires_at: h.expires_at,
                            to: h.to,
                        };
                        (h.id, hold)
                    })
                    .collect(),
                limits: Limits {
                    min_balance: state.min_balance,
                    max_balance: state.max_balance,
                },
            }
        }
        _ => return None,
    };
    (wallet.version == record.version).then_some(wallet)
}

/// Whether a stream that moved from `before` to `after` crossed a multiple of `every`.
pub fn due(every: u64, before: u64, after: u64) -> bool {
    every > 0 && before / every != after / every
}

/// A wallet as of `cutoff` (or now): the newest usable snapshot within the
/// cutoff (of any schema version this build reads), plus the events after it.
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

    #[test]
    fn states_round_trip_and_foreign_schemas_are_ignored() {
        let id = WalletId::parse("w").unwrap();
        let amount = Amount::parse("2.5").unwrap();
        let mut w = Wallet {
            balance: Balance::ZERO.checked_add(Amount::parse("12.3456").unwrap()).unwrap(),
            version: 7,
            held: amount.as_balance(),
            limits: Limits {
                min_balance: Balance::ZERO.checked_add(Amount::parse("1").unwrap()).unwrap(),
                max_balance: Some(Balance::ZERO.checked_add(Amount::parse("100").unwrap()).unwrap()),
            },
            ..Wallet::empty(id.clone())
        };
        let expires_at = DateTime::parse_from_rfc3339("2026-11-27T10:00:00.123Z")
            .unwrap()
            .to_utc();
        w.holds.insert(
            Uuid::now_v7(),
            Hold {
                amount,
                expires_at,
                to: Some(WalletId::parse("shop").unwrap()),
            },
        );
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
        assert_eq!(decode(&id, &record(0, encode(&w))), None, "unknown schema ignored");
        assert_eq!(
            decode(&id, &record(SNAPSHOT_SCHEMA_VERSION, vec![0xff, 1, 2])),
            None,
            "garbage ignored"
        );
    }

    #[test]
    fn version_1_snapshots_are_still_read() {
        let id = WalletId::parse("w").unwrap();
        let balance = Balance::ZERO.checked_add(Amount::parse("5").unwrap()).unwrap();
        let v1 = postcard::to_allocvec(&StateV1 { version: 3, balance }).unwrap();
        let record = SnapshotRecord {
            stream: id.clone(),
            version: 3,
            position: 3,
            schema_version: 1,
            state: v1,
        };
        let expected = Wallet {
            balance,
            version: 3,
            ..Wallet::empty(id.clone())
        };
        assert_eq!(decode(&id, &record), Some(expected));
    }

    #[test]
    fn snapshots_fall_due_every_n_events() {
        assert!(!due(100, 0, 99));
        assert!(due(100, 99, 100));
        assert!(due(100, 98, 101), "a transfer may jump over the multiple");
        assert!(!due(0, 0, 1_000), "0 disables snapshots");
    }
}
