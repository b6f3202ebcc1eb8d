//! The history read model: one document per event, newest first per wallet.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Batch, Doc, Projection};
use crate::store::{Position, RecordedEvent};

pub const NAME: &str = "history";
pub const KIND: &str = "item";

/// One event of a wallet's history, as served by `GET /wallet/{id}/history`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryItem {
    /// Event id.
    pub id: Uuid,
    pub wallet_id: String,
    pub transfer_id: Option<Uuid>,
    /// Event type, e.g. `FundsDeposited`.
    #[serde(rename = "type")]
    pub kind: String,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
    pub version: u64,
    pub position: Position,
    #[schema(example = "150.5000")]
    pub balance_after: String,
}

impl From<&RecordedEvent> for HistoryItem {
    fn from(e: &RecordedEvent) -> Self {
        HistoryItem {
            id: e.event_id,
            wallet_id: e.stream.to_string(),
            transfer_id: e.event.transfer_id(),
            kind: e.event.event_type().to_owned(),
            occurred_at: e.recorded_at,
            balance_after: e.event.balance_after().to_string(),
            payload: e.event.payload(),
            version: e.version,
            position: e.position,
        }
    }
}

pub struct History;

impl Projection for History {
    fn name(&self) -> &'static str {
        NAME
    }

    fn reads(&self, _: &RecordedEvent) -> Vec<String> {
        Vec::new()
    }

    fn apply(&self, e: &RecordedEvent, batch: &mut Batch) {
        let item = HistoryItem::from(e);
        batch.put(Doc {
            // Fixed-width version: keys sort like versions.
            key: format!("{}/{:020}", e.stream, e.version),
            kind: KIND.to_owned(),
            wallet_id: e.stream.to_string(),
            sort: e.version as i64,
            tag: None,
            body: serde_json::to_string(&item).expect("history items serialise"),
        });
    }
}
