//! Synthetic history for benchmarks and rebuild drills: appends a mixed
//! workload straight through the domain (`decide`) and the store, many
//! commands per append, so a million-event log takes seconds, not hours.
//! It never touches existing wallets: every run uses fresh wallet ids.

use std::collections::BTreeMap;

use uuid::Uuid;

use crate::aggregate::{decide, Amount, Command, Wallet, WalletId};
use crate::snapshots;
use crate::store::{AppendRequest, EventStore, Head, NewEvent, StoreError, StreamAppend};

/// Commands decided per append.
const COMMANDS_PER_APPEND: usize = 200;

/// Appends at least `events` events over `wallets` new wallets; calls
/// `progress(appended)` after each append. Returns the number appended.
pub async fn seed(
    store: &EventStore,
    wallets: usize,
    events: u64,
    mut progress: impl FnMut(u64),
) -> Result<u64, StoreError> {
    assert!(wallets >= 2, "transfers need two wallets");
    let run = Uuid::new_v4().simple().to_string();
    let mut states: Vec<Wallet> = (0..wallets)
        .map(|i| Wallet::empty(WalletId::parse(&format!("seed-{}-{i}", &run[..8])).expect("valid id")))
        .collect();
    let mut rng = run
        .bytes()
        .fold(0x9E37_79B9_7F4A_7C15u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let metadata = serde_json::json!({"requestId": format!("seed-{run}")});
    let mut appended = 0u64;
    while appended < events {
        // Per stream: the version at the start of this append and its new events.
        let mut batch: BTreeMap<usize, StreamAppend> = BTreeMap::new();
        for _ in 0..COMMANDS_PER_APPEND {
            let i = next(wallets as u64) as usize;
            let amount = Amount::parse(&format!("{}.{:02}", 1 + next(500), next(100))).expect("valid amount");
            let (command, touched) = match (states[i].exists(), next(10)) {
                (false, _) | (true, 0..=3) => (
                    Command::Deposit {
                        wallet: states[i].id.clone(),
                        amount,
                    },
                    vec![i],
                ),
                (true, 4..=6) => (
                    Command::Withdraw {
                        wallet: states[i].id.clone(),
                        amount,
                    },
                    vec![i],
                ),
                _ => {
                    let j = (i + 1 + next(wallets as u64 - 1) as usize) % wallets;
                    let command = Command::Transfer {
                        from: states[i].id.clone(),
                        to: states[j].id.clone(),
                        amount,
                        transfer_id: Uuid::now_v7(),
                    };
                    (command, vec![i, j])
                }
            };
            let refs: Vec<&Wallet> = touched.iter().map(|&k| &states[k]).collect();
            let Ok(decision) = decide(&command, &refs) else {
                continue; // insufficient funds: simply not part of the history
            };
            for (stream, &k) in decision.streams.into_iter().zip(&touched) {
                let entry = batch.entry(k).or_insert_with(|| StreamAppend {
                    stream: stream.wallet.clone(),
                    expected: Head::of(&states[k]),
                    events: Vec::new(),
                    on_batch: false,
                });
                for event in stream.events {
                    states[k] = states[k].clone().evolve(&event);
                    entry.events.push(NewEvent {
                        event_id: Uuid::now_v7(),
                        event,
                        metadata: metadata.clone(),
                    });
                }
            }
        }
        let count: u64 = batch.values().map(|s| s.events.len() as u64).sum();
        // Streams that crossed a snapshot boundary in this append, as the ledger would snapshot them.
        let due: Vec<usize> = batch
            .iter()
            .filter(|(k, s)| {
                snapshots::due(
                    snapshots::DEFAULT_SNAPSHOT_EVERY,
                    s.expected.version,
                    states[**k].version,
                )
            })
            .map(|(k, _)| *k)
            .collect();
        let request = AppendRequest {
            streams: batch.into_values().collect(),
            idempotency: Vec::new(),
        };
        let recorded = store.append(request).await.map_err(|e| match e {
            crate::store::AppendError::Store(e) => e,
            other => StoreError::Database(sqlx::Error::Protocol(format!("seed append rejected: {other}"))),
        })?;
        for k in due {
            let position = recorded
                .iter()
                .rev()
                .find(|e| e.stream == states[k].id)
                .map_or(0, |e| e.position);
            snapshots::save(store, &states[k], position).await?;
        }
        appended += count;
        progress(appended);
    }
    Ok(appended)
}
