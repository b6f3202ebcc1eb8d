//! `verify`: re-folds every stream from its first event and checks what must
//! always hold. Read-only; every discrepancy names its stream and position.
//!
//! Checked: versions contiguous from 1; the hash chain (first broken link per
//! stream); `newBalance` equals the previous balance plus or minus the amount
//! and is never negative; a wallet opens with `WalletCreated` and only then;
//! each transfer has exactly one debit and one matching credit (a capture
//! into another wallet is a transfer with the hold's id); each hold is placed
//! within the available money and resolved at most once, for its amount;
//! hold and limit events leave the balance as it was; every
//! snapshot equals the fold at its version; every read model equals a rebuild.

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::aggregate::{Wallet, WalletEvent};
use crate::projections::{ProjectionError, Projections};
use crate::snapshots;
use crate::store::{chain, EventStore, Position, RecordedEvent};

/// Events read per query.
const SCAN_BATCH: u32 = 10_000;
/// Differences reported per read model.
const MAX_READ_MODEL_REPORTS: usize = 20;
/// Discrepancies kept in a report; the rest are only counted.
pub const MAX_DISCREPANCIES: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Discrepancy {
    pub stream: Option<String>,
    pub position: Option<Position>,
    pub problem: String,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub events: u64,
    pub streams: u64,
    pub snapshots: u64,
    /// The first `MAX_DISCREPANCIES` found.
    pub discrepancies: Vec<Discrepancy>,
    /// How many were found in all (also those not listed).
    pub discrepancies_found: u64,
}

/// What the scan remembers per stream.
struct StreamState {
    wallet: Wallet,
    hash: String,
    chain_broken: bool,
}

/// The two halves of a transfer, as seen.
#[derive(Default)]
struct TransferHalves {
    debit: Option<(Position, String, String, Decimal)>,
    credit: Option<(Position, String, String, Decimal)>,
    extra: Vec<Position>,
}

/// Runs every check. `progress(position, head)` is called as the scan moves.
pub async fn verify(
    store: &EventStore,
    projections: &Projections,
    mut progress: impl FnMut(Position, Position),
) -> Result<Report, ProjectionError> {
    let head = store.head_position().await?;
    let mut report = Report::default();
    let mut found_total = 0u64;
    let mut found = |stream: Option<&str>, position: Option<Position>, problem: String| {
        found_total += 1;
        report_push(&mut report.discrepancies, stream, position, problem)
    };

    let snapshots_by_key: HashMap<(String, u64), crate::store::SnapshotRecord> = store
        .all_snapshots()
        .await?
        .into_iter()
        .filter(|s| s.schema_version <= snapshots::SNAPSHOT_SCHEMA_VERSION)
        .map(|s| ((s.stream.to_string(), s.version), s))
        .collect();
    let snapshot_count = snapshots_by_key.len() as u64;

    let mut streams: HashMap<String, StreamState> = HashMap::new();
    let mut transfers: HashMap<Uuid, TransferHalves> = HashMap::new();
    let mut events = 0u64;
    let mut last = 0;
    loop {
        let batch = store.read_all(last, SCAN_BATCH).await?;
        if batch.is_empty() {
            break;
        }
        for e in &batch {
            events += 1;
            check_event(e, &mut streams, &mut transfers, &snapshots_by_key, &mut found);
            last = e.position;
        }
        progress(last, head);
    }

    for (id, t) in &transfers {
        match (&t.debit, &t.credit) {
            (Some(d), Some(c)) => {
                if d.1 != c.1 || d.2 != c.2 || d.3 != c.3 {
                    found(
                        Some(&d.1),
                        Some(d.0),
                        format!("transfer {id}: debit and credit disagree"),
                    );
                }
            }
            (Some(d), None) => found(Some(&d.1), Some(d.0), format!("transfer {id}: credit is missing")),
            (None, Some(c)) => found(Some(&c.2), Some(c.0), format!("transfer {id}: debit is missing")),
            (None, None) => {}
        }
        for p in &t.extra {
            found(None, Some(*p), format!("transfer {id}: more than one debit or credit"));
        }
    }
    for ((stream, version), _) in &snapshots_by_key {
        let at = streams.get(stream).map_or(0, |s| s.wallet.version);
        if *version > at {
            found(
                Some(stream),
                None,
                format!("snapshot at version {version} is beyond the stream's end ({at})"),
            );
        }
    }

    for name in projections.names() {
        for problem in projections.verify(name, MAX_READ_MODEL_REPORTS).await? {
            found(None, None, problem);
        }
    }
    report.discrepancies_found = found_total.max(report.discrepancies.len() as u64);
    report.events = events;
    report.streams = streams.len() as u64;
    report.snapshots = snapshot_count;
    Ok(report)
}

fn report_push(list: &mut Vec<Discrepancy>, stream: Option<&str>, position: Option<Position>, problem: String) {
    if list.len() >= MAX_DISCREPANCIES {
        return;
    }
    list.push(Discrepancy {
        stream: stream.map(str::to_owned),
        position,
        problem,
    });
}

/// What is wrong with a hold event on `state`, if anything: a hold is
/// placed once, within the available money, and resolved at most once, for
/// exactly its amount (captured plus released), paying its own payee.
fn hold_problem(state: &Wallet, event: &WalletEvent) -> Option<String> {
    let active = |id: &Uuid| state.holds.get(id);
    match event {
        WalletEvent::HoldPlaced(p) => {
            if active(&p.hold_id).is_some() {
                return Some(format!("hold {} placed twice", p.hold_id));
            }
            (p.amount.as_balance() > state.available()).then(|| {
                format!(
                    "hold {} of {} exceeds the available {}",
                    p.hold_id,
                    p.amount,
                    state.available()
                )
            })
        }
        WalletEvent::HoldCaptured(p) => {
            let Some(hold) = active(&p.hold_id) else {
                return Some(format!("hold {} captured but not active", p.hold_id));
            };
            let total = p.amount.value() + p.released.value();
            if total != hold.amount.value() || p.to_wallet_id != hold.to {
                return Some(format!(
                    "hold {} captured for other money or payee than it held",
                    p.hold_id
                ));
            }
            None
        }
        WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => match active(&p.hold_id) {
            None => Some(format!("hold {} released but not active", p.hold_id)),
            Some(hold) if hold.amount != p.amount => Some(format!("hold {} released for another amount", p.hold_id)),
            Some(_) => None,
        },
        _ => None,
    }
}

fn check_event(
    e: &RecordedEvent,
    streams: &mut HashMap<String, StreamState>,
    transfers: &mut HashMap<Uuid, TransferHalves>,
    snapshots_by_key: &HashMap<(String, u64), crate::store::SnapshotRecord>,
    found: &mut impl FnMut(Option<&str>, Option<Position>, String),
) {
    let name = e.stream.as_str();
    let s = streams.entry(name.to_owned()).or_insert_with(|| StreamState {
        wallet: Wallet::empty(e.stream.clone()),
        hash: String::new(),
        chain_broken: false,
    });
    let at = Some(e.position);
    let expected_version = s.wallet.version + 1;
    if e.version != expected_version {
        found(
            Some(name),
            at,
            format!("version {} where {expected_version} was expected", e.version),
        );
    }

    let link = chain::link(
        &s.hash,
        &chain::Canonical {
            stream: name,
            version: e.version,
            event_id: e.event_id,
            event_type: e.event.event_type(),
            schema_version: e.schema_version,
            payload: &e.event.payload(),
            metadata: &e.metadata,
            recorded_at: e.recorded_at,
        },
    );
    if link != e.hash && !s.chain_broken {
        s.chain_broken = true;
        found(Some(name), at, format!("hash chain broken at version {}", e.version));
    }

    let before = s.wallet.balance.value();
    let expected = match (&e.event, e.event.balance_change()) {
        (WalletEvent::WalletCreated(_), _) => {
            if s.wallet.version != 0 {
                found(Some(name), at, "WalletCreated on an existing wallet".to_owned());
            }
            Some(Decimal::ZERO)
        }
        (_, Some((amount, true))) => Some(before - amount.value()),
        (_, Some((amount, false))) => Some(before + amount.value()),
        // Holds and limits leave the balance as it was.
        (_, None) => Some(before),
    };
    if let Some(problem) = hold_problem(&s.wallet, &e.event) {
        found(Some(name), at, problem);
    }
    if s.wallet.version == 0 && !matches!(e.event, WalletEvent::WalletCreated(_)) {
        found(Some(name), at, "the first event is not WalletCreated".to_owned());
    }
    let recorded = e.event.balance_after().value();
    if let Some(expected) = expected {
        if expected < Decimal::ZERO {
            found(Some(name), at, format!("balance goes negative ({expected})"));
        } else if expected != recorded {
            found(
                Some(name),
                at,
                format!("newBalance {recorded} but the amounts give {expected}"),
            );
        }
    }

    if let Some(transfer) = e.event.transfer_id() {
        let half = match &e.event {
            WalletEvent::TransferDebited(p) | WalletEvent::TransferCredited(p) => (
                e.position,
                p.from_wallet_id.to_string(),
                p.to_wallet_id.to_string(),
                p.amount.value(),
            ),
            // A capture into another wallet: the debit half.
            WalletEvent::HoldCaptured(p) => (
                e.position,
                p.wallet_id.to_string(),
                p.to_wallet_id.as_ref().map_or_else(String::new, |w| w.to_string()),
                p.amount.value(),
            ),
            _ => unreachable!("only transfers and captures carry a transfer id"),
        };
        let t = transfers.entry(transfer).or_default();
        let slot = if e.event.is_debit() {
            &mut t.debit
        } else {
            &mut t.credit
        };
        if slot.is_some() {
            t.extra.push(e.position);
        } else {
            *slot = Some(half);
        }
    }

    s.wallet = s.wallet.clone().evolve(&e.event);
    s.hash.clone_from(&e.hash);
    if let Some(snapshot) = snapshots_by_key.get(&(name.to_owned(), e.version)) {
        if snapshots::decode(&e.stream, snapshot).as_ref() != Some(&s.wallet) {
            found(
                Some(name),
                at,
                format!("snapshot at version {} differs from the fold", e.version),
            );
        }
    }
}
