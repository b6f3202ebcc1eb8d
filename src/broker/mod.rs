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

use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The innermost cause only: lapin's own errors repeat their source.
    #[error("broker: {}", innermost(.0))]
    Amqp(lapin::Error),
    #[error("broker refused message at position {0} (nack)")]
    Nacked(i64),
    #[error("no queue is bound to the exchange: message at position {0} came back")]
    Unroutable(i64),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Projection(#[from] crate::projections::ProjectionError),
    /// Noticed between publishes: an idle relay would otherwise sit on a
    /// dead connection until the next event.
    #[error("the broker closed the channel (state: {0})")]
    ChannelDown(String),
    #[error("lost leadership of the relay")]
    LostLeadership,
    #[error("broker URL: {0}")]
    Url(String),
    #[error("the broker did not answer within {0:?} ({1})")]
    Timeout(Duration, &'static str),
    /// A command that only reads found its queue missing (it never declares).
    #[error(
        "queue {0:?} does not exist on the broker: is AMQP_EXCHANGE right? (`relay`, `worker` and `serve` declare it)"
    )]
    MissingQueue(String),
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError::Amqp(e)
    }
}

fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(inner) = e.source() {
        e = inner;
    }
    e.to_string()
}

/// How often `serve` repeats a broker misconfiguration in its log.
pub const MISCONFIGURED_LOG_EVERY: Duration = Duration::from_secs(60);

impl BrokerError {
    /// Retrying cannot cure it: a URL that is not amqp://, a refused login
    /// (ACCESS_REFUSED) or an unknown or forbidden vhost (NOT_ALLOWED).
    pub fn is_misconfiguration(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
        match self {
            BrokerError::Url(_) => true,
            BrokerError::Amqp(e) => matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                    | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED))),
            _ => false,
        }
    }

    /// The broker's answer was 404 NOT_FOUND (a passive declare of a queue
    /// that does not exist).
    pub fn is_not_found(&self) -> bool {
        use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
        matches!(self, BrokerError::Amqp(e) if matches!(e.kind(),
            lapin::ErrorKind::ProtocolError(p) if p.kind() == &AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
    }
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
    /// Quorum queues (replicated by Raft on a cluster's nodes; see
    /// `quorum`) instead of classic ones.
    pub quorum: bool,
}

/// The kind of queue the worker and the dead letters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QueueType {
    /// A queue on one node: lost with that node's disk.
    Classic,
    /// Replicated to a majority of a cluster's nodes before the broker
    /// confirms a message; survives the loss of a minority.
    Quorum,
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
            quorum: false,
        }
    }

    /// The topology with queues of `kind`. A queue cannot change its type,
    /// so quorum queues have names of their own (`<exchange>.worker.quorum`,
    /// `<exchange>.dlq.quorum`) beside any classic ones (README: moving to
    /// quorum queues).
    pub fn with_queue_type(mut self, kind: QueueType) -> Self {
        if kind == QueueType::Quorum && !self.quorum {
            self.worker_queue.push_str(".quorum");
            self.dead_letter_queue.push_str(".quorum");
            self.quorum = true;
        }
        self
    }

    fn queue_arguments(&self) -> FieldTable {
        let mut args = FieldTable::default();
        if self.quorum {
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        }
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

    /// Messages ready in `queue`, or `MissingQueue` if it does not exist
    /// (a passive declare: never creates it; on failure the broker closes
    /// the channel, so use a channel of its own).
    pub async fn require(&self, channel: &Channel, queue: &str) -> Result<u32, BrokerError> {
        self.depth(channel, queue).await.map_err(|e| match e.is_not_found() {
            true => BrokerError::MissingQueue(queue.to_owned()),
            false => e,
        })
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

/// AMQP heartbeat asked for when the URL names none (seconds). With it,
/// lapin closes a connection that has heard nothing for twice this long,
/// so a half-open link is noticed in about 20 s instead of the broker's
/// default of minutes.
pub const DEFAULT_HEARTBEAT_SECS: u16 = 10;
/// Longest a connection (TCP, handshake, tuning) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest opening a channel and declaring the topology may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Each node of a cluster gets at least this long to connect.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the next connection tries first: each connection of the process
/// starts one node further, so a reconnect goes to the next node.
static NEXT_NODE: AtomicUsize = AtomicUsize::new(0);

/// The node URLs of an `AMQP_URL`: one, or a cluster's, comma-separated.
pub fn nodes(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

/// `url` (each node's) with `heartbeat=<secs>` added, unless it names one already.
pub fn with_heartbeat(url: &str, secs: u16) -> String {
    let one = |url: &str| {
        if url.contains("heartbeat=") {
            return url.to_owned();
        }
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}heartbeat={secs}")
    };
    nodes(url).into_iter().map(one).collect::<Vec<_>>().join(",")
}

/// Connects with tokio as lapin's executor and reactor, asking for
/// `DEFAULT_HEARTBEAT_SECS` unless the URL sets `heartbeat=`. Of several
/// nodes, each is tried in turn from the next one round (a share of
/// `CONNECT_TIMEOUT` each, at least `NODE_CONNECT_TIMEOUT`) and the first
/// that answers is kept; a refused login or vhost ends the search.
pub async fn connect(url: &str) -> Result<Connection, BrokerError> {
    let uris = node_uris(url)?;
    let per_node = match uris.len() {
        1 => CONNECT_TIMEOUT,
        n => (CONNECT_TIMEOUT / n as u32).max(NODE_CONNECT_TIMEOUT),
    };
    let start = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
    let mut last = None;
    for i in 0..uris.len() {
        let uri = uris[(start + i) % uris.len()].clone();
        let node = format!("{}:{}", uri.authority.host, uri.authority.port);
        match connect_node(uri, per_node).await {
            Ok(connection) => return Ok(connection),
            Err(e) if e.is_misconfiguration() => return Err(e),
            Err(e) => {
                if uris.len() > 1 {
                    tracing::info!(node = %node, error = %e, "broker node unreachable; trying the next");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| BrokerError::Url("no broker URL".to_owned())))
}

/// Whether some node of `url` accepts a connection within `limit`: every
/// node is asked at once (a silent one does not use up the others' time),
/// and the first to answer ends the check. A refused login or vhost is
/// reported as such.
pub async fn any_node_answers(url: &str, limit: Duration) -> Result<(), BrokerError> {
    use futures_util::StreamExt as _;
    let mut pending: futures_util::stream::FuturesUnordered<_> = node_uris(url)?
        .into_iter()
        .map(|uri| connect_node(uri, limit))
        .collect();
    let mut last = None;
    while let Some(answer) = pending.next().await {
        match answer {
            Ok(connection) => {
                let _ = within(limit, "closing", connection.close(200, "ready check")).await;
                return Ok(());
            }
            Err(e) if e.is_misconfiguration() => return Err(e),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| BrokerError::Url("no broker URL".to_owned())))
}

fn node_uris(url: &str) -> Result<Vec<lapin::uri::AMQPUri>, BrokerError> {
    let uris = nodes(url)
        .into_iter()
        .map(|u| u.parse::<lapin::uri::AMQPUri>().map_err(BrokerError::Url))
        .collect::<Result<Vec<_>, _>>()?;
    if uris.is_empty() {
        return Err(BrokerError::Url("no broker URL".to_owned()));
    }
    Ok(uris)
}

async fn connect_node(mut uri: lapin::uri::AMQPUri, limit: Duration) -> Result<Connection, BrokerError> {
    uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECS);
    let properties = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio::current());
    within(limit, "connecting", Connection::connect_uri(uri, properties)).await
}

/// Runs a broker operation with a deadline: a silent broker is an error,
/// not a wait without end.
pub async fn within<T>(
    limit: Duration,
    what: &'static str,
    operation: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(BrokerError::Timeout(limit, what)),
    }
}

/// Asks a running worker or relay to stop: resolved once the future given
/// to `run_until` resolves; shared by every session of that run.
pub(crate) struct Stop(futures_util::future::Shared<futures_util::future::BoxFuture<'static, ()>>);

impl Stop {
    pub(crate) fn on(stop: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        use futures_util::FutureExt;
        Self(stop.boxed().shared())
    }

    pub(crate) fn never() -> Self {
        Self::on(std::future::pending())
    }

    pub(crate) fn is_set(&self) -> bool {
        self.0.peek().is_some()
    }

    pub(crate) async fn wait(&self) {
        self.0.clone().await
    }
}

/// Closes the connection with a goodbye to the broker, so no I/O is left
/// for the runtime's shutdown to break (lapin logs that as errors).
pub(crate) async fn close(connection: Connection, why: &str) {
    let closing = connection.close(200, why);
    match tokio::time::timeout(SETUP_TIMEOUT, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return tracing::debug!(error = %e, "closing the broker connection"),
        Err(_) => return tracing::debug!("the broker did not answer the close in time"),
    }
    // Closed: lapin's I/O thread now ends on its own. Wait for it (bounded),
    // or a process exiting next tears the runtime down under it, and lapin
    // logs the torn socket as an ERROR.
    let io_loop = tokio::task::spawn_blocking(move || connection.run());
    if tokio::time::timeout(SETUP_TIMEOUT, io_loop).await.is_err() {
        tracing::debug!("the broker connection's I/O loop outlived its close");
    }
}

/// A process's link to the broker as `/ready` sees it: the channel of the
/// current session, read through lapin's own status (so a channel or
/// connection the broker or the heartbeat closed reads as down at once),
/// and why the last session ended.
#[derive(Debug, Default)]
pub struct Link(std::sync::Mutex<LinkState>);

#[derive(Debug, Default)]
struct LinkState {
    channel: Option<lapin::ChannelStatus>,
    last_error: Option<String>,
}

/// Marks the link down when the session that raised it ends, however it ends.
pub(crate) struct LinkUp<'a>(&'a Link);

impl Drop for LinkUp<'_> {
    fn drop(&mut self) {
        self.0.state().channel = None;
    }
}

impl Link {
    fn state(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session's channel is set up: the link is up while it lives.
    pub(crate) fn up(&self, channel: &Channel) -> LinkUp<'_> {
        let mut state = self.state();
        state.channel = Some(channel.status().clone());
        state.last_error = None;
        LinkUp(self)
    }

    /// Why the last session ended (or could not start).
    pub(crate) fn failed(&self, error: &dyn std::fmt::Display) {
        self.state().last_error = Some(error.to_string());
    }

    /// `Ok` while the current session's channel is open; otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        let state = self.state();
        match (&state.channel, &state.last_error) {
            (Some(channel), _) if channel.connected() => Ok(()),
            (_, Some(error)) => Err(format!("not connected to the broker: {error}")),
            (Some(channel), None) => Err(format!("the broker channel is {:?}; reconnecting", channel.state())),
            (None, None) => Err("not connected to the broker yet".to_owned()),
        }
    }
}

/// Pauses between reconnects to the broker (and between retries of a
/// batch the database refused): 100 ms doubling to 5 s, jittered.
pub(crate) use crate::backoff::Backoff;

impl Backoff {
    pub(crate) fn broker() -> Self {
        Backoff::between(Duration::from_millis(100), Duration::from_secs(5))
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
    let channel = within(SETUP_TIMEOUT, "opening a channel", connection.create_channel()).await?;
    let status = BrokerStatus {
        relay_checkpoint: checkpoint,
        relay_lag: head - checkpoint,
        worker_queue_depth: topology.require(&channel, &topology.worker_queue).await?,
        dead_letter_depth: topology.require(&channel, &topology.dead_letter_queue).await?,
    };
    let _ = connection.close(200, "status read").await;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_is_added_unless_the_url_names_one() {
        assert_eq!(with_heartbeat("amqp://h/%2f", 10), "amqp://h/%2f?heartbeat=10");
        assert_eq!(
            with_heartbeat("amqp://h/%2f?frame_max=8192", 3),
            "amqp://h/%2f?frame_max=8192&heartbeat=3"
        );
        assert_eq!(
            with_heartbeat("amqp://h/%2f?heartbeat=30", 3),
            "amqp://h/%2f?heartbeat=30"
        );
        let uri: lapin::uri::AMQPUri = with_heartbeat("amqp://guest:guest@h:5672/%2f", 7).parse().unwrap();
        assert_eq!(uri.query.heartbeat, Some(7));
        assert_eq!(
            with_heartbeat("amqp://a:1/%2f, amqp://b:2/%2f?heartbeat=3", 7),
            "amqp://a:1/%2f?heartbeat=7,amqp://b:2/%2f?heartbeat=3"
        );
    }

    #[test]
    fn quorum_queues_have_names_of_their_own() {
        let t = Topology::named("wallet.events").with_queue_type(QueueType::Quorum);
        assert_eq!(t.worker_queue, "wallet.events.worker.quorum");
        assert_eq!(t.dead_letter_queue, "wallet.events.dlq.quorum");
        assert_eq!(t.exchange, "wallet.events");
        let classic = Topology::named("wallet.events").with_queue_type(QueueType::Classic);
        assert_eq!(classic, Topology::named("wallet.events"));
    }
}
