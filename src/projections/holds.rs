//! The holds read model: one document per hold with its current status
//! (`GET /wallet/{id}/holds`), and an expiry index of the active ones that
//! the expiry sweeper reads (`due`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Batch, Doc, Projection};
use crate::aggregate::{Amount, Balance, WalletEvent};
use crate::store::{Position, RecordedEvent};

pub const NAME: &str = "holds";
/// One document per hold, ordered by the position that placed it.
pub const KIND: &str = "hold";
/// One document per hold, ordered by its expiry time (ms), tagged `held`
/// while active.
pub const EXPIRY_KIND: &str = "expiry";

/// A hold as served by `GET /wallet/{id}/holds`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldView {
    pub hold_id: Uuid,
    pub wallet_id: String,
    #[schema(value_type = String, example = "40.0000")]
    pub amount: Amount,
    /// "held", "captured", "voided" or "expired".
    pub status: String,
    pub expires_at: DateTime<Utc>,
    pub to_wallet_id: Option<String>,
    #[schema(value_type = Option<String>)]
    pub captured: Option<Amount>,
    #[schema(value_type = Option<String>)]
    pub released: Option<Balance>,
    pub placed_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// Log position of the event that placed it (the paging cursor).
    pub position: Position,
}

pub fn hold_key(wallet: &str, hold: Uuid) -> String {
    format!("h/{wallet}/{hold}")
}

fn expiry_key(wallet: &str, hold: Uuid) -> String {
    format!("x/{wallet}/{hold}")
}

pub struct Holds;

impl Projection for Holds {
    fn name(&self) -> &'static str {
        NAME
    }

    fn reads(&self, e: &RecordedEvent) -> Vec<String> {
        match &e.event {
            WalletEvent::HoldCaptured(_) | WalletEvent::HoldVoided(_) | WalletEvent::HoldExpired(_) => {
                let hold = e.event.hold_id().expect("hold events name their hold");
                vec![hold_key(e.stream.as_str(), hold)]
            }
            _ => Vec::new(),
        }
    }

    fn apply(&self, e: &RecordedEvent, batch: &mut Batch) {
        let wallet = e.stream.as_str();
        let view = match &e.event {
            WalletEvent::HoldPlaced(p) => HoldView {
                hold_id: p.hold_id,
                wallet_id: wallet.to_owned(),
                amount: p.amount,
                status: "held".to_owned(),
                expires_at: p.expires_at,
                to_wallet_id: p.to_wallet_id.as_ref().map(|w| w.to_string()),
                captured: None,
                released: None,
                placed_at: e.recorded_at,
                resolved_at: None,
                position: e.position,
            },
            WalletEvent::HoldCaptured(p) => match placed(batch, wallet, p.hold_id) {
                Some(view) => resolved(view, "captured", Some(p.amount), p.released, e.recorded_at),
                None => return,
            },
            WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => match placed(batch, wallet, p.hold_id) {
                Some(view) => {
                    let status = if e.event.event_type() == "HoldVoided" {
                        "voided"
                    } else {
                        "expired"
                    };
                    resolved(view, status, None, p.amount.as_balance(), e.recorded_at)
                }
                None => return,
            },
            _ => return,
        };
        put(batch, &view);
    }
}

/// The hold as placed, from this batch or the stored read model (`None`
/// only if the log resolves a hold it never placed, which `verify` reports).
fn placed(batch: &Batch, wallet: &str, hold: Uuid) -> Option<HoldView> {
    batch
        .get(&hold_key(wallet, hold))
        .and_then(|d| serde_json::from_str(&d.body).ok())
}

fn resolved(
    mut view: HoldView,
    status: &str,
    captured: Option<Amount>,
    released: Balance,
    at: DateTime<Utc>,
) -> HoldView {
    view.status = status.to_owned();
    view.captured = captured;
    view.released = Some(released);
    view.resolved_at = Some(at);
    view
}

/// Writes the hold's document and its expiry index entry (tagged `held`
/// only while active, so the sweeper's query skips resolved holds).
fn put(batch: &mut Batch, view: &HoldView) {
    let body = serde_json::to_string(view).expect("hold views serialise");
    batch.put(Doc {
        key: expiry_key(&view.wallet_id, view.hold_id),
        kind: EXPIRY_KIND.to_owned(),
        wallet_id: view.wallet_id.clone(),
        sort: view.expires_at.timestamp_millis(),
        tag: Some(view.status.clone()),
        body: body.clone(),
    });
    batch.put(Doc {
        key: hold_key(&view.wallet_id, view.hold_id),
        kind: KIND.to_owned(),
        wallet_id: view.wallet_id.clone(),
        sort: view.position,
        tag: Some(view.status.clone()),
        body,
    });
}
