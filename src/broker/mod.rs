//! The RabbitMQ fan-out: the relay publishes the committed log, the worker
//! consumes it into the read models, the dead-letter queue keeps what the
//! worker could not apply.
//!
//! - `message.rs`: the message of one event (body, properties) both ways.
//! - `relay.rs`: log -> `wallet.events`, in order, with publisher confirms
//!   and a checkpoint that moves only over confirmed messages.
//! - `worker.rs`: `wallet.events.worker` -> projections, exactly once.
//! - `dlq.rs`: list and replay `wallet.events.dlq`.
//!
//! Every name derives from one prefix (`wallet.events` by default) so tests
//! run side by side on one broker with names of their own.

pub mod dlq;
mod message;
pub mod relay;
pub mod worker;

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

pub use message::{EventMessage, MessageError};

/// Header carrying why a message was dead-lettered.
pub const REASON_HEADER: &str = "x-wallet-reason";
/// Header marking a message put back by `dlq replay`.
pub const REPLAY_HEADER: &str = "x-wallet-replay";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("broker refused message at position {0} (nack)")]
    Nacked(i64),
    #[error("no queue is bound to the exchange: message at position {0} came back")]
    Unroutable(i64),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Projection(#[from] crate::projections::ProjectionError),
    #[error("lost leadership of the relay")]
    LostLeadership,
}

/// The exchanges and queues of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Durable fanout exchange the relay publishes to (`wallet.events`).
    pub exchange: String,
    /// The worker's queue (`<exchange>.worker`).
    pub worker_queue: String,
    /// Dead-letter exchange (`<exchange>.dlx`) and queue (`<exchange>.dlq`).
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    /// Tests only: the broker deletes the queues after this long unused.
    pub queue_expiry: Option<Duration>,
}

impl Default for Topology {
    fn default() -> Self {
        Self::named("wallet.events")
    }
}

impl Topology {
    pub fn named(exchange: &str) -> Self {
        Self {
            exchange: exchange.to_owned(),
            worker_queue: format!("{exchange}.worker"),
            dead_letter_exchange: format!("{exchange}.dlx"),
            dead_letter_queue: format!("{exchange}.dlq"),
            queue_expiry: None,
        }
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if let Some(expiry) = self.queue_expiry {
            args.insert("x-expires".into(), AMQPValue::LongUInt(expiry.as_millis() as u32));
        }
        args
    }

    /// Declares everything (idempotent). The relay declares it too, so the
    /// worker's queue exists, and keeps events, before a worker first runs.
    pub async fn declare(&self, channel: &Channel) -> Result<(), BrokerError> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let durable_queue = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        channel
            .exchange_declare(&self.exchange, ExchangeKind::Fanout, durable, FieldTable::default())
            .await?;
        channel
            .exchange_declare(
                &self.dead_letter_exchange,
                ExchangeKind::Fanout,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_declare(&self.dead_letter_queue, durable_queue, self.queue_arguments())
            .await?;
        channel
            .queue_bind(
                &self.dead_letter_queue,
                &self.dead_letter_exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // No message TTL: an event waits for the worker however long it takes.
        let mut args = self.queue_arguments();
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(self.dead_letter_exchange.as_str().into()),
        );
        channel.queue_declare(&self.worker_queue, durable_queue, args).await?;
        channel
            .queue_bind(
                &self.worker_queue,
                &self.exchange,
                "",
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Messages ready in a queue (declared passively: never creates it).
    pub async fn depth(&self, channel: &Channel, queue: &str) -> Result<u32, BrokerError> {
        let q = channel
            .queue_declare(
                queue,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(q.message_count())
    }
}

/// Connects with tokio as lapin's executor and reactor.
pub async fn connect(url: &str) -> Result<Connection, BrokerError> {
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    Ok(Connection::connect(url, properties).await?)
}

/// Exponential backoff between reconnects: 100 ms doubling to 5 s.
#[derive(Debug)]
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
}

/// Broker state for `projections status`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BrokerStatus {
    pub relay_checkpoint: i64,
    pub relay_lag: i64,
    pub worker_queue_depth: u32,
    pub dead_letter_depth: u32,
}

/// Relay lag and queue depths.
pub async fn status(
    url: &str,
    topology: &Topology,
    store: &crate::store::EventStore,
) -> Result<BrokerStatus, BrokerError> {
    let checkpoint = relay::checkpoint(store, topology).await?;
    let head = store.head_position().await?;
    let connection = connect(url).await?;
    let channel = connection.create_channel().await?;
    let status = BrokerStatus {
        relay_checkpoint: checkpoint,
        relay_lag: head - checkpoint,
        worker_queue_depth: topology.depth(&channel, &topology.worker_queue).await?,
        dead_letter_depth: topology.depth(&channel, &topology.dead_letter_queue).await?,
    };
    let _ = connection.close(200, "status read").await;
    Ok(status)
}
