//! The worker: consumes `wallet.events.worker` into the read models, with
//! the same projection code as the in-process runner.
//!
//! Deliveries are taken in batches (up to the prefetch) and applied in one
//! database transaction together with the projections' checkpoints, so a
//! redelivered message is a duplicate that the checkpoint skips: exactly
//! once. A message that cannot be applied (undecodable, or failing
//! `MAX_ATTEMPTS` times) is parked with its reason, published to the
//! dead-letter exchange, and acknowledged; the worker moves on. Later
//! events of the same wallet are parked behind it (`projections/delivery.rs`)
//! until `dlq replay` brings them back in order. A database error that
//! recurs (a refusal, not an outage) is narrowed down to the wallets it
//! comes from, which are parked the same way with the database's reason,
//! so one wallet's bad row never stalls the others. Nothing is acknowledged
//! before its outcome is committed and its dead letter confirmed.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::publisher_confirm::{Confirmation, PublisherConfirm};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use uuid::Uuid;

use super::{close, connect, Backoff, BrokerError, EventMessage, Link, Stop, Topology, REASON_HEADER, SETUP_TIMEOUT};
use crate::aggregate::WalletId;
use crate::projections::{merge_in_order, Delivery, Incoming, ProjectionError, Projections};
use crate::store::{Position, RecordedEvent, StoreError};

/// Unacknowledged messages the broker sends ahead, and the largest batch:
/// each batch pays a synchronous commit, so bigger batches go faster
/// (BENCHMARKS.md); 8,192 small messages are a few MB.
pub const DEFAULT_PREFETCH: u16 = 8192;
/// Tries to apply one message before it is dead-lettered.
const MAX_ATTEMPTS: u32 = 5;
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// With no delivery for this long, the worker compares its checkpoints
/// with the relay's and reads what never came from the log.
const IDLE_CATCH_UP: Duration = Duration::from_secs(5);
/// Events applied from the log in one idle catch-up, at most.
const CATCH_UP_MAX: i64 = 10_000;
/// Events the broker lost, read from the log and applied per transaction
/// at most: a projection far behind (a new one at 0) is filled in steps.
const FILL_MAX: usize = 2_000;

/// Test hook: applying any event of these wallets fails until cleared, as
/// a projection bug triggered by one wallet's data would.
#[derive(Debug, Default)]
pub struct WorkerFault {
    failing: Mutex<HashSet<String>>,
}

impl WorkerFault {
    pub fn fail_wallet(&self, wallet: &str) {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(wallet.to_owned());
    }

    pub fn clear(&self) {
        self.failing.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn fails(&self, wallet: &str) -> bool {
        self.failing.lock().unwrap_or_else(|p| p.into_inner()).contains(wallet)
    }
}

/// Live figures of a worker, for its probe (`/ready`, `/metrics`).
#[derive(Debug, Default)]
pub struct WorkerGauges {
    /// The broker link of the current session.
    pub link: Link,
    /// Consumer sessions set up (1 + reconnects).
    pub sessions: AtomicU64,
    /// Events applied to the read models (redelivered duplicates not counted).
    pub applied: AtomicU64,
    /// Messages published to the dead-letter exchange.
    pub dead_lettered: AtomicU64,
}

pub struct Worker {
    projections: Arc<Projections>,
    url: String,
    topology: Topology,
    prefetch: u16,
    pub fault: Arc<WorkerFault>,
    pub gauges: Arc<WorkerGauges>,
}

/// What to do with one delivery once understood.
enum Prepared {
    Incoming(Incoming),
    /// Not even a valid stream and position: straight to the dead letters.
    Unaddressed(String),
}

impl Prepared {
    fn position(&self) -> Option<i64> {
        match self {
            Prepared::Incoming(Incoming::Event(e)) => Some(e.position),
            Prepared::Incoming(Incoming::Failed { position, .. }) => Some(*position),
            Prepared::Unaddressed(_) => None,
        }
    }
}

impl Worker {
    pub fn new(projections: Arc<Projections>, url: &str, topology: Topology) -> Self {
        Self {
            projections,
            url: url.to_owned(),
            topology,
            prefetch: DEFAULT_PREFETCH,
            fault: Arc::default(),
            gauges: Arc::default(),
        }
    }

    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        assert!(prefetch > 0, "prefetch of at least one message");
        self.prefetch = prefetch;
        self
    }

    /// Runs until the task is dropped, reconnecting with backoff.
    pub async fn run(self) {
        let never = Stop::never();
        let mut backoff = Backoff::broker();
        let mut logged: Option<std::time::Instant> = None;
        loop {
            match self.session(&mut backoff, &never).await {
                Err(e) if e.is_misconfiguration() => {
                    self.gauges.link.failed(&e);
                    // Not transient: say it once a minute, not per attempt.
                    if logged.is_none_or(|t| t.elapsed() >= super::MISCONFIGURED_LOG_EVERY) {
                        tracing::error!(error = %e, "the broker refuses this configuration; retrying");
                        logged = Some(std::time::Instant::now());
                    }
                }
                Err(e) => {
                    self.gauges.link.failed(&e);
                    tracing::warn!(error = %e, "worker session ended; reconnecting");
                }
                Ok(()) => {}
            }
            backoff.wait().await;
        }
    }

    /// `run` for the `worker` command, until `stop` resolves: then it
    /// closes its connection to the broker (the batch in hand stays
    /// unacknowledged and is delivered again) and returns `Ok`. Ends with
    /// the error when the broker refuses the configuration (login, vhost,
    /// URL), which no retry cures.
    pub async fn run_until(self, stop: impl Future<Output = ()> + Send + 'static) -> Result<(), BrokerError> {
        let stop = Stop::on(stop);
        let mut backoff = Backoff::broker();
        loop {
            match self.session(&mut backoff, &stop).await {
                _ if stop.is_set() => return Ok(()),
                Err(e) if e.is_misconfiguration() => return Err(e),
                Err(e) => {
                    self.gauges.link.failed(&e);
                    tracing::warn!(error = %e, "worker session ended; reconnecting");
                }
                Ok(()) => {}
            }
            tokio::select! {
                _ = backoff.wait() => {}
                _ = stop.wait() => return Ok(()),
            }
        }
    }

    /// One connection's life: set up the consumer, then take and handle
    /// batches until the broker cancels, an error, or `stop`.
    async fn session(&self, backoff: &mut Backoff, stop: &Stop) -> Result<(), BrokerError> {
        self.projections.ensure().await?;
        let connection = tokio::select! {
            c = connect(&self.url) => c?,
            _ = stop.wait() => return Ok(()),
        };
        // Every step has a deadline: a silent broker ends the session.
        let setup = async {
            let channel = connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            self.topology.declare(&channel).await?;
            channel.basic_qos(self.prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(
                    &self.topology.worker_queue,
                    &format!("wallet-worker-{}", Uuid::new_v4().simple()),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, BrokerError>((channel, consumer))
        };
        let setup = tokio::select! {
            s = tokio::time::timeout(SETUP_TIMEOUT, setup) => Some(s),
            _ = stop.wait() => None,
        };
        let Some(setup) = setup else {
            close(connection, "worker stopping").await;
            return Ok(());
        };
        let (channel, mut consumer) =
            setup.map_err(|_| BrokerError::Timeout(SETUP_TIMEOUT, "setting up the consumer"))??;
        backoff.reset();
        // Up while this channel is open: `/ready` reads lapin's own status.
        let _up = self.gauges.link.up(&channel);
        self.gauges.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::info!(queue = %self.topology.worker_queue, "worker consuming");
        loop {
            let step = async {
                let first = match tokio::time::timeout(IDLE_CATCH_UP, consumer.next()).await {
                    Err(_) => {
                        self.catch_up_from_log(&channel, backoff).await?;
                        return Ok(true);
                    }
                    Ok(None) => return Ok(false), // cancelled by the broker: reconnect
                    Ok(Some(first)) => first,
                };
                let mut batch = vec![first?];
                while batch.len() < usize::from(self.prefetch) {
                    match consumer.next().now_or_never() {
                        Some(Some(delivery)) => batch.push(delivery?),
                        Some(None) | None => break,
                    }
                }
                self.handle(&channel, batch, backoff).await?;
                Ok::<_, BrokerError>(true)
            };
            // Stopping mid-batch is safe: what is not acknowledged comes
            // again, and the checkpoints skip what was applied.
            let go_on = tokio::select! {
                r = step => r?,
                _ = stop.wait() => false,
            };
            if !go_on {
                if stop.is_set() {
                    drop(consumer);
                    close(connection, "worker stopping").await;
                }
                return Ok(());
            }
        }
    }

    /// With the queue idle: the events the broker confirmed to the relay
    /// (its checkpoint) that never came, read from the log and applied. A
    /// broker node lost with the tail of the log would otherwise leave it
    /// out of the read models until the next event arrives.
    async fn catch_up_from_log(&self, channel: &Channel, backoff: &mut Backoff) -> Result<(), BrokerError> {
        let store = self.projections.store();
        let confirmed = match super::relay::checkpoint(store, &self.topology).await {
            Ok(confirmed) => confirmed,
            Err(e) => {
                tracing::debug!(error = %e, "worker cannot read the relay's checkpoint");
                return Ok(());
            }
        };
        let low = match self.projections.lowest_checkpoint().await {
            Ok(low) => low,
            Err(e) => {
                tracing::debug!(error = %e, "worker cannot read its checkpoints");
                return Ok(());
            }
        };
        if low >= confirmed {
            return Ok(());
        }
        let high = confirmed.min(low.saturating_add(CATCH_UP_MAX));
        let (_, confirms) = self.apply_with_log(channel, Vec::new(), high, backoff).await?;
        await_confirms(confirms).await
    }

    /// Applies `incoming` together with the events up to `high` that the
    /// broker never delivered, read from the log, in log order: at most
    /// `FILL_MAX` filled events per transaction, each with the delivered
    /// messages up to it. A filled event goes through the same checks and
    /// parking as a delivered one; one that parks is dead-lettered here as
    /// the relay would have published it. Returns the outcomes of
    /// `incoming` and the dead letters' confirms, to await before acking.
    async fn apply_with_log(
        &self,
        channel: &Channel,
        mut rest: Vec<Incoming>,
        high: Position,
        backoff: &mut Backoff,
    ) -> Result<(Vec<Delivery>, Vec<PublisherConfirm>), BrokerError> {
        let mut outcomes = Vec::with_capacity(rest.len());
        let mut confirms = Vec::new();
        let mut after = 0;
        loop {
            let missing = loop {
                match self.projections.not_delivered(&rest, after, high, FILL_MAX).await {
                    Ok(missing) => break missing,
                    Err(e) => tracing::warn!(error = %e, "worker cannot read the log for lost events; retrying"),
                }
                backoff.wait().await;
            };
            let Some(upto) = missing.last().map(|e| e.position) else {
                outcomes.extend(self.apply(rest, backoff).await);
                return Ok((outcomes, confirms));
            };
            tracing::warn!(
                events = missing.len(),
                upto,
                "events the broker never delivered, read from the log"
            );
            metrics::counter!("wallet_worker_gap_events_total").increment(missing.len() as u64);
            // Every delivered message at or below `upto` goes in this step:
            // the next one starts above it.
            let cut = rest.iter().rposition(|m| m.position() <= upto).map_or(0, |i| i + 1);
            let later = rest.split_off(cut);
            let mut filled = Vec::with_capacity(missing.len());
            for event in &missing {
                filled.push(self.understand(event).await);
            }
            let (merged, is_filled) = merge_in_order(&rest, filled);
            let mut lost = missing.iter();
            let applied = self.apply(merged, backoff).await;
            for (outcome, was_filled) in applied.into_iter().zip(is_filled) {
                if !was_filled {
                    outcomes.push(outcome);
                    continue;
                }
                let event = lost.next().expect("one filled outcome per event read");
                if let Delivery::Parked { reason } = outcome {
                    tracing::warn!(reason = %reason, position = event.position, "dead-lettering an event read from the log");
                    let m = EventMessage::of(event);
                    confirms.push(self.dead_letter(channel, &m.body(), m.properties(), &reason).await?);
                }
            }
            rest = later;
            after = upto;
        }
    }

    /// Applies a batch (with what the broker lost before it), dead-letters
    /// what could not be applied, then acknowledges the whole batch.
    async fn handle(
        &self,
        channel: &Channel,
        batch: Vec<AmqpDelivery>,
        backoff: &mut Backoff,
    ) -> Result<(), BrokerError> {
        let prepared = self.prepare_batch(&batch, backoff).await;
        let incoming: Vec<Incoming> = prepared
            .iter()
            .filter_map(|p| match p {
                Prepared::Incoming(i) => Some(i.clone()),
                Prepared::Unaddressed(_) => None,
            })
            .collect();
        let high = incoming.iter().map(Incoming::position).max().unwrap_or(0);
        let (outcomes, mut confirms) = self.apply_with_log(channel, incoming, high, backoff).await?;
        backoff.reset();

        let mut outcomes = outcomes.into_iter();
        let mut applied = 0;
        for (delivery, prepared) in batch.iter().zip(&prepared) {
            let dead_reason = match prepared {
                Prepared::Unaddressed(reason) => Some(reason.clone()),
                Prepared::Incoming(_) => match outcomes.next().expect("one outcome per incoming message") {
                    Delivery::Applied => {
                        applied += 1;
                        None
                    }
                    Delivery::Duplicate => None,
                    Delivery::Parked { reason } => Some(reason),
                },
            };
            if let Some(reason) = dead_reason {
                tracing::warn!(reason = %reason, message_id = ?delivery.properties.message_id(), "dead-lettering a message");
                confirms.push(
                    self.dead_letter(channel, &delivery.data, delivery.properties.clone(), &reason)
                        .await?,
                );
            }
        }
        let dead = confirms.len();
        await_confirms(confirms).await?;
        let last = batch.last().expect("batches are not empty").delivery_tag;
        channel.basic_ack(last, BasicAckOptions { multiple: true }).await?;
        self.gauges.applied.fetch_add(applied, Ordering::Relaxed);
        self.gauges.dead_lettered.fetch_add(dead as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Each delivery understood. The relay publishes committed events
    /// only, so a position past the log's head is a forged message:
    /// applying it would move the checkpoints past events that have not
    /// happened yet.
    async fn prepare_batch(&self, batch: &[AmqpDelivery], backoff: &mut Backoff) -> Vec<Prepared> {
        let mut prepared = Vec::with_capacity(batch.len());
        for delivery in batch {
            prepared.push(self.prepare(&delivery.data).await);
        }
        let highest = prepared.iter().filter_map(Prepared::position).max().unwrap_or(0);
        if highest == 0 {
            return prepared;
        }
        let head = loop {
            match self.projections.store().head_position().await {
                Ok(head) => break head,
                Err(e) => {
                    tracing::warn!(error = %e, "worker cannot read the log head; retrying");
                    backoff.wait().await;
                }
            }
        };
        for p in &mut prepared {
            if p.position().is_some_and(|position| position > head) {
                *p = Prepared::Unaddressed(format!("position beyond the log head ({head})"));
            }
        }
        prepared
    }

    /// Applies the batch, retrying while the database is away (the batch
    /// stays unacknowledged). A refusal that recurs `MAX_ATTEMPTS` times is
    /// narrowed down to the wallets whose updates the database refuses on
    /// their own; their messages are parked (and dead-lettered) with the
    /// database's reason, and the others are applied.
    async fn apply(&self, mut incoming: Vec<Incoming>, backoff: &mut Backoff) -> Vec<Delivery> {
        let mut refusals = 0;
        loop {
            let e = match self.projections.apply_delivered(&incoming).await {
                Ok(outcomes) => return outcomes,
                Err(e) => e,
            };
            refusals = if refused(&e) { refusals + 1 } else { 0 };
            if refusals >= MAX_ATTEMPTS {
                let culprits = self.isolate(&incoming).await;
                if !culprits.is_empty() {
                    for message in &mut incoming {
                        if let Some(reason) = culprits.get(message.stream()) {
                            *message = Incoming::Failed {
                                stream: message.stream().to_owned(),
                                position: message.position(),
                                reason: reason.clone(),
                            };
                        }
                    }
                    refusals = 0;
                    continue;
                }
            }
            tracing::warn!(error = %e, attempt = refusals, "worker cannot write the read models; retrying");
            backoff.wait().await;
        }
    }

    /// The wallets whose messages the database refuses on their own, with
    /// its reason, found by halving the batch's wallets (each probe is
    /// rolled back). Empty when none fails alone or the database is away.
    async fn isolate(&self, incoming: &[Incoming]) -> HashMap<String, String> {
        let mut streams: Vec<&str> = incoming.iter().map(Incoming::stream).collect();
        streams.sort_unstable();
        streams.dedup();
        let mut culprits = HashMap::new();
        let mut groups = vec![streams];
        while let Some(group) = groups.pop() {
            let subset: Vec<Incoming> = incoming
                .iter()
                .filter(|m| group.binary_search(&m.stream()).is_ok())
                .cloned()
                .collect();
            match self.projections.probe_delivered(&subset).await {
                Ok(()) => {}
                Err(e) if !refused(&e) => return HashMap::new(),
                Err(e) if group.len() == 1 => {
                    let reason = format!("the database refused wallet {}'s read-model update: {e}", group[0]);
                    tracing::error!(wallet = group[0], reason = %reason, "parking a wallet the database refuses");
                    culprits.insert(group[0].to_owned(), reason);
                }
                Err(_) => {
                    let (a, b) = group.split_at(group.len() / 2);
                    groups.push(a.to_vec());
                    groups.push(b.to_vec());
                }
            }
        }
        culprits
    }

    /// An event read from the log, checked as a delivered one would be.
    async fn understand(&self, event: &RecordedEvent) -> Incoming {
        match self.apply_check(event).await {
            Ok(()) => Incoming::Event(event.clone()),
            Err(reason) => Incoming::Failed {
                stream: event.stream.as_str().to_owned(),
                position: event.position,
                reason,
            },
        }
    }

    async fn prepare(&self, body: &[u8]) -> Prepared {
        let reason = match EventMessage::decode(body) {
            Ok(event) if event.position <= 0 => format!("invalid position {}", event.position),
            Ok(event) => match self.apply_check(&event).await {
                Ok(()) if event.metadata.get("traceparent").is_some() => {
                    // The writer's trace, so the log line joins its trace.
                    let traceparent = event.metadata["traceparent"].as_str().unwrap_or_default();
                    tracing::debug!(
                        position = event.position,
                        traceparent,
                        "applying an event of a traced write"
                    );
                    return Prepared::Incoming(Incoming::Event(event));
                }
                Ok(()) => return Prepared::Incoming(Incoming::Event(event)),
                Err(reason) => reason,
            },
            Err(e) => e.to_string(),
        };
        // Only a well-formed address may park a stream (and reach the
        // database as a key); anything else goes straight to the DLQ.
        match EventMessage::address(body) {
            Some(a) if a.position > 0 && WalletId::parse(&a.wallet_id).is_ok() => {
                Prepared::Incoming(Incoming::Failed {
                    stream: a.wallet_id,
                    position: a.position,
                    reason,
                })
            }
            _ => Prepared::Unaddressed(reason),
        }
    }

    /// Whether the event can be applied, with bounded retries.
    async fn apply_check(&self, event: &RecordedEvent) -> Result<(), String> {
        for attempt in 1..=MAX_ATTEMPTS {
            if !self.fault.fails(event.stream.as_str()) {
                return Ok(());
            }
            if attempt < MAX_ATTEMPTS {
                tokio::time::sleep(RETRY_PAUSE * attempt).await;
            }
        }
        Err(format!("applying failed {MAX_ATTEMPTS} times: injected fault"))
    }

    /// Publishes a message to the dead-letter exchange with the reason
    /// it could not be applied (not yet confirmed).
    async fn dead_letter(
        &self,
        channel: &Channel,
        body: &[u8],
        properties: BasicProperties,
        reason: &str,
    ) -> Result<PublisherConfirm, BrokerError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(
            "x-wallet-failed-at".into(),
            AMQPValue::LongString(chrono::Utc::now().to_rfc3339().as_str().into()),
        );
        let properties = properties.with_headers(headers).with_delivery_mode(2);
        Ok(channel
            .basic_publish(
                &self.topology.dead_letter_exchange,
                "",
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?)
    }
}

/// Waits for the broker to confirm each dead letter; a refused one ends
/// the session before anything is acknowledged.
async fn await_confirms(confirms: Vec<PublisherConfirm>) -> Result<(), BrokerError> {
    for confirm in confirms {
        if let Confirmation::Nack(_) = confirm.await? {
            return Err(BrokerError::Nacked(-1));
        }
    }
    Ok(())
}

/// The database answered with an error that retrying will not cure (a
/// constraint, a trigger, a type error), as opposed to its being away or
/// busy: connection and resource errors, serialization failures and
/// deadlocks (SQLSTATE classes 08, 40, 53, 57) and SQLite's busy/locked.
fn refused(e: &ProjectionError) -> bool {
    let ProjectionError::Store(StoreError::Database(sqlx::Error::Database(db))) = e else {
        return false;
    };
    let code = db.code().unwrap_or_default();
    let transient = ["08", "40", "53", "57"].iter().any(|class| code.starts_with(class))
        || matches!(code.as_ref(), "5" | "6" | "261" | "262" | "517" | "518")
        || db.message().contains("database is locked");
    !transient
}
