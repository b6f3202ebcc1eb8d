//! The relay: publishes the committed log, in position order, to the fanout
//! exchange, and remembers how far the broker has confirmed.
//!
//! - Order: it reads the log by position, which never skips a late commit
//!   (appends become visible in position order, see the store), and
//!   publishes on one channel, which the broker keeps in order.
//! - Pipelining: up to `window` messages are in flight; confirms are taken
//!   in publish order, so the confirmed position is always one whose every
//!   predecessor is confirmed too. Only that position is stored as the
//!   checkpoint (`relay:<exchange>`), at most every 100 ms and when idle.
//! - Crashes: a new session (after any error: broker, database, nack)
//!   starts again from the stored checkpoint, so what was unconfirmed is
//!   published again. At least once, in order; consumers deduplicate.
//! - One active relay: a relay publishes only while it holds the `relay`
//!   leadership lock (`store::LeaderLock`); the others wait on standby and
//!   take over when the holder's process or connection dies.
//! - Progress: the gauges keep when the oldest message not yet confirmed
//!   was published (across a lost session too, until its copy is
//!   confirmed), so `/ready` can tell a relay stuck on a silent broker
//!   (`RelayGauges::stalled_for`). The AMQP heartbeat ends such a session.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::publisher_confirm::Confirmation;
use tokio::sync::Notify;

use super::{close, connect, within, Backoff, BrokerError, EventMessage, Stop, Topology, SETUP_TIMEOUT};
use crate::projections::{advance_checkpoint, load_checkpoint};
use crate::store::{EventStore, LeaderLock, Position, StoreError};

/// Messages in flight (published, not yet confirmed) at most, by default.
pub const DEFAULT_WINDOW: usize = 8192;
/// Events read from the log per query, at most.
const READ_BATCH: usize = 500;
/// How often a standby tries to take over, and an idle relay polls the log.
const STANDBY_POLL: Duration = Duration::from_millis(500);
const IDLE_POLL: Duration = Duration::from_millis(50);
/// Longest one attempt at the leadership lock may take.
const LEAD_DEADLINE: Duration = Duration::from_secs(5);
const SAVE_EVERY: Duration = Duration::from_millis(100);
const LEASE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Default age of the oldest unconfirmed message past which the relay
/// counts as stalled (`/ready` answers 503).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(5);

/// Live figures of a relay, for status and metrics.
#[derive(Debug, Default)]
pub struct RelayGauges {
    pub active: AtomicBool,
    /// Another relay holds the lock and this one waits for it (its last
    /// attempt to take the lock was answered: the database is reachable).
    pub standby: AtomicBool,
    /// The broker link of the current session.
    pub link: super::Link,
    /// Broker connections opened (1 + reconnects).
    pub sessions: AtomicU64,
    pub published: AtomicU64,
    pub confirmed_position: AtomicI64,
    pub in_flight: AtomicU64,
    /// Unix milliseconds when the oldest message not yet confirmed was
    /// published; 0 when every published message is confirmed.
    pub oldest_unconfirmed_ms: AtomicI64,
    /// Age past which an unconfirmed message means stalled (ms; 0: the
    /// default, `DEFAULT_STALL_AFTER`).
    pub stall_after_ms: AtomicU64,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl RelayGauges {
    /// How long the oldest unconfirmed message has waited, if any (and the
    /// relay is the active one).
    pub fn unconfirmed_for(&self) -> Option<Duration> {
        let since = self.oldest_unconfirmed_ms.load(Ordering::Relaxed);
        if since == 0 || !self.active.load(Ordering::Relaxed) {
            return None;
        }
        Some(Duration::from_millis((unix_ms() - since).max(0) as u64))
    }

    /// Age past which an unconfirmed message means the relay is stalled.
    pub fn stall_after(&self) -> Duration {
        match self.stall_after_ms.load(Ordering::Relaxed) {
            0 => DEFAULT_STALL_AFTER,
            ms => Duration::from_millis(ms),
        }
    }

    /// `Some(age)` when a message has waited longer than `stall_after` for
    /// the broker's confirm.
    pub fn stalled_for(&self) -> Option<Duration> {
        self.unconfirmed_for().filter(|age| *age > self.stall_after())
    }

    fn published_now(&self) {
        let _ = self
            .oldest_unconfirmed_ms
            .compare_exchange(0, unix_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }
}

pub struct Relay {
    store: EventStore,
    url: String,
    topology: Topology,
    window: usize,
    wake: Arc<Notify>,
    pub gauges: Arc<RelayGauges>,
}

/// Name of the relay's checkpoint for an exchange.
fn checkpoint_name(topology: &Topology) -> String {
    format!("relay:{}", topology.exchange)
}

/// How far the broker has confirmed the log.
pub async fn checkpoint(store: &EventStore, topology: &Topology) -> Result<Position, BrokerError> {
    Ok(load_checkpoint(store, &checkpoint_name(topology)).await?)
}

impl Relay {
    pub fn new(store: EventStore, url: &str, topology: Topology) -> Self {
        Self {
            store,
            url: url.to_owned(),
            topology,
            window: DEFAULT_WINDOW,
            wake: Arc::new(Notify::new()),
            gauges: Arc::default(),
        }
    }

    pub fn with_window(mut self, window: usize) -> Self {
        assert!(window > 0, "at least one message in flight");
        self.window = window;
        self
    }

    /// Unconfirmed messages older than this make the relay stalled
    /// (`/ready` 503).
    pub fn with_stall_after(self, limit: Duration) -> Self {
        let ms = (limit.as_millis() as u64).max(1);
        self.gauges.stall_after_ms.store(ms, Ordering::Relaxed);
        self
    }

    /// Woken after local appends (inside `serve`); otherwise it polls.
    pub fn with_wake(mut self, wake: Arc<Notify>) -> Self {
        self.wake = wake;
        self
    }

    /// Runs until the task is dropped: standby until it leads, then
    /// publishes, reconnecting with backoff after any failure.
    pub async fn run(self) {
        let _ = self.run_inner(false, Stop::never()).await;
    }

    /// `run` for the `relay` command, until `stop` resolves: then it saves
    /// its checkpoint, closes its connection to the broker (what is
    /// unconfirmed is published again by the next relay) and returns `Ok`.
    /// Ends with the error when the broker refuses the configuration
    /// (login, vhost, URL), which no retry cures.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), BrokerError> {
        let gauges = self.gauges.clone();
        self.run_inner(true, Stop::on(stop)).await?;
        let confirmed = gauges.confirmed_position.load(Ordering::SeqCst);
        tracing::info!(confirmed, "relay stopped; broker connection closed");
        Ok(())
    }

    async fn run_inner(self, strict: bool, stop: Stop) -> Result<(), BrokerError> {
        let mut logged: Option<std::time::Instant> = None;
        let mut backoff = Backoff::broker();
        loop {
            let Some(mut lock) = self.lead(&mut backoff, &stop).await else {
                return Ok(());
            };
            tracing::info!(exchange = %self.topology.exchange, "relay is the active one");
            self.gauges.active.store(true, Ordering::SeqCst);
            loop {
                let ended = self.session(&mut lock, &mut backoff, &stop).await;
                if stop.is_set() {
                    // Dropping the lock releases the leadership.
                    return Ok(());
                }
                if let Err(e) = &ended {
                    self.gauges.link.failed(e);
                }
                match ended {
                    Err(BrokerError::LostLeadership) => break,
                    Err(e) if e.is_misconfiguration() && strict => return Err(e),
                    Err(e) if e.is_misconfiguration() => {
                        // Not transient: said once a minute, not per attempt.
                        if logged.is_none_or(|t| t.elapsed() >= super::MISCONFIGURED_LOG_EVERY) {
                            tracing::error!(error = %e, "the broker refuses this configuration; retrying");
                            logged = Some(std::time::Instant::now());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "relay session ended; reconnecting"),
                    Ok(()) => {}
                }
                tokio::select! {
                    _ = backoff.wait() => {}
                    _ = stop.wait() => return Ok(()),
                }
                if !lock.still_held().await {
                    break;
                }
            }
            self.gauges.active.store(false, Ordering::SeqCst);
            self.gauges.in_flight.store(0, Ordering::SeqCst);
            self.gauges.oldest_unconfirmed_ms.store(0, Ordering::SeqCst);
            tracing::warn!("relay lost its leadership; standing by");
            drop(lock);
        }
    }

    /// Waits until this relay holds the leadership lock (`None`: stopped
    /// first). A standby says so once, naming the lock it waits for.
    async fn lead(&self, backoff: &mut Backoff, stop: &Stop) -> Option<LeaderLock> {
        let job = checkpoint_name(&self.topology);
        loop {
            // A database that stops answering must not leave the relay
            // waiting (and reported standing by) for ever.
            let attempt = tokio::select! {
                a = tokio::time::timeout(LEAD_DEADLINE, self.store.try_lead(&job)) => a
                    .unwrap_or_else(|_| Err(StoreError::BatchFailed("taking the relay lock timed out".to_owned()))),
                _ = stop.wait() => return None,
            };
            let pause = match attempt {
                Ok(Some(lock)) => {
                    self.gauges.standby.store(false, Ordering::SeqCst);
                    return Some(lock);
                }
                Ok(None) => {
                    if !self.gauges.standby.swap(true, Ordering::SeqCst) {
                        tracing::info!(lock = %job, "relay standing by: another relay holds the lock; taking over when it is released");
                    }
                    STANDBY_POLL
                }
                Err(e) => {
                    self.gauges.standby.store(false, Ordering::SeqCst);
                    self.gauges.link.failed(&format_args!("cannot reach the database: {e}"));
                    tracing::warn!(error = %e, "relay cannot reach the database; retrying");
                    backoff.next_pause()
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait() => return None,
            }
        }
    }

    /// One broker connection: publish until something fails. Saves the
    /// confirmed position on the way out when the database lets it.
    async fn session(&self, lock: &mut LeaderLock, backoff: &mut Backoff, stop: &Stop) -> Result<(), BrokerError> {
        let name = checkpoint_name(&self.topology);
        let mut confirmed = load_checkpoint(&self.store, &name).await?;
        let result = self.pump(lock, backoff, stop, &mut confirmed).await;
        if let Err(e) = advance_checkpoint(&self.store, &name, confirmed).await {
            tracing::warn!(error = %e, confirmed, "could not save the relay checkpoint; its messages will be sent again");
        }
        result
    }

    /// Connects and publishes until something fails or `stop`; on `stop`
    /// it closes the connection cleanly.
    async fn pump(
        &self,
        lock: &mut LeaderLock,
        backoff: &mut Backoff,
        stop: &Stop,
        confirmed: &mut Position,
    ) -> Result<(), BrokerError> {
        let connection = tokio::select! {
            c = connect(&self.url) => c?,
            _ = stop.wait() => return Ok(()),
        };
        let channel = within(SETUP_TIMEOUT, "opening a channel", connection.create_channel()).await?;
        within(
            SETUP_TIMEOUT,
            "selecting confirms",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        match tokio::time::timeout(SETUP_TIMEOUT, self.topology.declare(&channel)).await {
            Ok(declared) => declared?,
            Err(_) => return Err(BrokerError::Timeout(SETUP_TIMEOUT, "declaring the topology")),
        }
        backoff.reset();
        self.gauges.sessions.fetch_add(1, Ordering::Relaxed);
        // Up while this channel is open: `/ready` reads lapin's own status.
        let _up = self.gauges.link.up(&channel);
        tracing::info!(from = *confirmed, "relay connected; publishing");
        // Stopping mid-window is safe: what is unconfirmed is sent again.
        let result = tokio::select! {
            r = self.publish(&channel, lock, &mut *confirmed) => r,
            _ = stop.wait() => Ok(()),
        };
        if stop.is_set() {
            close(connection, "relay stopping").await;
        }
        result
    }

    /// Publishes the log from `confirmed` on, taking confirms in order,
    /// until something fails.
    async fn publish(
        &self,
        channel: &lapin::Channel,
        lock: &mut LeaderLock,
        confirmed: &mut Position,
    ) -> Result<(), BrokerError> {
        let name = checkpoint_name(&self.topology);
        let mut saved = *confirmed;
        let mut last_save = Instant::now();
        let mut last_lease_check = Instant::now();
        let mut published = *confirmed;
        let mut in_flight = FuturesOrdered::new();
        // Unix ms each in-flight message was published at, oldest first.
        let mut sent_at: VecDeque<i64> = VecDeque::new();
        loop {
            // Fill the window from the log.
            let room = self.window - in_flight.len();
            let mut more_waiting = false;
            if room > 0 {
                let want = room.min(READ_BATCH);
                let events = self.store.read_all(published, want as u32).await?;
                more_waiting = events.len() == want;
                for e in &events {
                    let confirm = self.send(channel, e).await?;
                    in_flight.push_back(confirmation(e.position, confirm));
                    sent_at.push_back(unix_ms());
                    self.gauges.published_now();
                    published = e.position;
                }
                self.gauges.published.fetch_add(events.len() as u64, Ordering::Relaxed);
            }

            // Take confirms: block on the oldest only when there is nothing
            // else to do (window full, or the log read dry).
            let first = if in_flight.is_empty() {
                None
            } else if room == 0 || !more_waiting {
                in_flight.next().await
            } else {
                in_flight.next().now_or_never().flatten()
            };
            if let Some(first) = first {
                *confirmed = first?;
                sent_at.pop_front();
                while let Some(Some(next)) = in_flight.next().now_or_never() {
                    *confirmed = next?;
                    sent_at.pop_front();
                }
                let oldest = sent_at.front().copied().unwrap_or(0);
                self.gauges.oldest_unconfirmed_ms.store(oldest, Ordering::Relaxed);
            }
            self.gauges.in_flight.store(in_flight.len() as u64, Ordering::Relaxed);
            self.gauges.confirmed_position.store(*confirmed, Ordering::Relaxed);

            let idle = in_flight.is_empty() && !more_waiting;
            if *confirmed > saved && (idle || last_save.elapsed() >= SAVE_EVERY) {
                advance_checkpoint(&self.store, &name, *confirmed).await?;
                saved = *confirmed;
                last_save = Instant::now();
            }
            if last_lease_check.elapsed() >= LEASE_CHECK_EVERY {
                if !lock.still_held().await {
                    return Err(BrokerError::LostLeadership);
                }
                last_lease_check = Instant::now();
            }
            if idle {
                let status = channel.status();
                if !status.connected() {
                    return Err(BrokerError::ChannelDown(format!("{:?}", status.state()).to_lowercase()));
                }
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                }
            }
        }
    }

    /// Publishes one event; its confirm comes later.
    async fn send(
        &self,
        channel: &lapin::Channel,
        e: &crate::store::RecordedEvent,
    ) -> Result<lapin::publisher_confirm::PublisherConfirm, BrokerError> {
        let message = EventMessage::of(e);
        let body = message.body();
        let publish = channel.basic_publish(
            &self.topology.exchange,
            "",
            // Mandatory: if no queue is bound, the broker returns the
            // message instead of dropping it, and it does not count
            // as confirmed.
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &body,
            message.properties(),
        );
        // A traced write's publish joins its trace (the message
        // carries the context on to the worker).
        match message.metadata.traceparent.as_deref() {
            Some(traceparent) => {
                let span = tracing::info_span!("publish", position = e.position);
                crate::config::continue_trace(&span, Some(traceparent));
                Ok(tracing::Instrument::instrument(publish, span).await?)
            }
            None => Ok(publish.await?),
        }
    }
}

/// The confirm of the message at `position`: its position once acked.
async fn confirmation(
    position: Position,
    confirm: lapin::publisher_confirm::PublisherConfirm,
) -> Result<Position, BrokerError> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(position),
        Confirmation::Ack(Some(_)) => Err(BrokerError::Unroutable(position)),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(BrokerError::Nacked(position)),
    }
}
