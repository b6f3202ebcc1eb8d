//! One event as a RabbitMQ message: a persistent message whose
//! `message_id` is the event id and `type` the event type, whose body is
//! the log's public event shape (`feed::LogEvent`), and whose `traceparent`
//! header carries the writer's trace context. Consumers deduplicate by `id`
//! (or by position).

use lapin::BasicProperties;
use serde::Deserialize;

use crate::aggregate::{EventDecodeError, WalletEvent, WalletId};
use crate::store::{Position, RecordedEvent};

/// The AMQP header carrying the writer's W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The message body: the log's public event shape, defined once in `feed`.
pub use crate::feed::LogEvent as EventMessage;

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("body is not an event message: {0}")]
    Body(#[from] serde_json::Error),
    #[error("invalid wallet id {0:?}")]
    WalletId(String),
    #[error("undecodable {kind} payload: {source}")]
    Payload {
        kind: String,
        #[source]
        source: EventDecodeError,
    },
}

/// Where a message belongs even when its event cannot be decoded: enough
/// to park its stream.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageAddress {
    pub position: Position,
    pub wallet_id: String,
}

impl EventMessage {
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("event messages serialise")
    }

    pub fn properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(self.id.to_string().into())
            .with_type(self.kind.as_str().into())
            .with_content_type("application/json".into())
            .with_timestamp(self.occurred_at.timestamp().max(0) as u64)
            // 2 = persistent: the broker writes it to disk before confirming.
            .with_delivery_mode(2)
            .with_headers(self.headers())
    }

    /// The W3C trace context of the request that wrote the event, so a
    /// consumer's span continues its trace.
    fn headers(&self) -> lapin::types::FieldTable {
        let mut headers = lapin::types::FieldTable::default();
        if let Some(traceparent) = &self.metadata.traceparent {
            headers.insert(
                TRACEPARENT_HEADER.into(),
                lapin::types::AMQPValue::LongString(traceparent.as_str().into()),
            );
        }
        headers
    }

    /// Decodes a body into the event it carries (upcasting old schemas).
    pub fn decode(body: &[u8]) -> Result<RecordedEvent, MessageError> {
        let m: EventMessage = serde_json::from_slice(body)?;
        let stream = WalletId::parse(&m.wallet_id).map_err(|_| MessageError::WalletId(m.wallet_id.clone()))?;
        let event =
            WalletEvent::decode(&m.kind, m.schema_version, m.payload).map_err(|source| MessageError::Payload {
                kind: m.kind.clone(),
                source,
            })?;
        Ok(RecordedEvent {
            position: m.position,
            stream,
            version: m.version,
            event_id: m.id,
            schema_version: m.schema_version,
            event,
            metadata: serde_json::to_value(&m.metadata).unwrap_or_default(),
            recorded_at: m.occurred_at,
            hash: String::new(),
        })
    }

    /// The stream and position of a body, if it has them.
    pub fn address(body: &[u8]) -> Option<MessageAddress> {
        serde_json::from_slice(body).ok()
    }
}
