//! The public shape of one committed event: what `GET /events`, the SSE
//! stream, `wallet tail --json` and the RabbitMQ message body all carry.
//! Defined once here; consumers deduplicate by `position` (or `id`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::{Position, RecordedEvent};

/// One event of the log, as consumers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogEvent {
    /// The event id (uuid); unique across the log.
    pub id: Uuid,
    /// `WalletCreated`, `FundsDeposited`, `FundsWithdrawn`, `TransferDebited`, `TransferCredited`,
    /// `HoldPlaced`, `HoldCaptured`, `HoldVoided`, `HoldExpired`, `WalletLimitsChanged`.
    #[serde(rename = "type")]
    #[schema(example = "FundsDeposited")]
    pub kind: String,
    /// When it was committed (the log's event time).
    pub occurred_at: DateTime<Utc>,
    /// The event's fields: `walletId`, and for money `amount` and `newBalance` (4-decimal strings).
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    /// Global log position: strictly increasing, the cursor and the deduplication key.
    pub position: Position,
    #[schema(example = "alice")]
    pub wallet_id: String,
    /// The event's version in its wallet's stream (1, 2, 3...).
    pub version: u64,
    #[serde(default = "first_schema")]
    pub schema_version: i32,
    /// Where it came from (absent in messages of relays older than this field).
    #[serde(default)]
    pub metadata: LogEventMetadata,
}

/// What a consumer needs of an event's metadata.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogEventMetadata {
    /// The request's id (its idempotency key when it had one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The `api_audit` row of the request that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_id: Option<String>,
    /// W3C trace context of the request that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

fn first_schema() -> i32 {
    1
}

impl LogEvent {
    pub fn of(e: &RecordedEvent) -> Self {
        let text = |k: &str| e.metadata.get(k).and_then(|v| v.as_str()).map(str::to_owned);
        Self {
            id: e.event_id,
            kind: e.event.event_type().to_owned(),
            occurred_at: e.recorded_at,
            payload: e.event.payload(),
            position: e.position,
            wallet_id: e.stream.to_string(),
            version: e.version,
            schema_version: e.schema_version,
            metadata: LogEventMetadata {
                request_id: text("requestId"),
                correlation_id: text("correlationId"),
                causation_id: text("causationId"),
                audit_id: text("auditId"),
                traceparent: text("traceparent"),
            },
        }
    }
}
