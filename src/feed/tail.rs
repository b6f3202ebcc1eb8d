//! The live tail: one reader of the log per process, fanned out in memory
//! to every subscriber, so live delivery costs no query per subscriber.
//!
//! The tail reads the log by position (which never skips a late commit:
//! appends become visible in order), woken by this process's committer and
//! polling for other processes' appends. A subscriber catches up from the
//! log itself, then follows the tail; it subscribes before its last catch-up
//! read, so nothing falls between the two, and it skips what it already
//! sent (by position), so nothing comes twice.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};

use super::LogEvent;
use crate::store::standby::LogReader;
use crate::store::{LogFilter, Position, StoreError};

/// Events the tail keeps for subscribers that are behind; one further
/// behind than this is cut off (with where to resume).
const BUFFER: usize = 8192;
/// Events per read, catching up or tailing.
pub const PAGE: u32 = 2000;
/// How often the tail looks for other processes' appends.
const POLL: Duration = Duration::from_millis(100);
/// Subscribers at once, by default.
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 256;

/// One event as the tail hands it out: framed once for every subscriber
/// (`id: <position>` and `data: <LogEvent JSON>`, an SSE event).
#[derive(Debug)]
pub struct FeedItem {
    pub position: Position,
    pub kind: &'static str,
    pub wallet_id: String,
    pub frame: bytes::Bytes,
}

impl FeedItem {
    pub fn of(e: &crate::store::RecordedEvent) -> Self {
        let json = serde_json::to_string(&LogEvent::of(e)).expect("log events serialise");
        // JSON from serde has no raw newline, so one `data:` line holds it.
        let frame = format!("id: {}\ndata: {json}\n\n", e.position);
        Self {
            position: e.position,
            kind: e.event.event_type(),
            wallet_id: e.stream.to_string(),
            frame: frame.into(),
        }
    }

    pub fn matches(&self, filter: &LogFilter) -> bool {
        filter.wallet.as_ref().is_none_or(|w| w.as_str() == self.wallet_id)
            && (filter.types.is_empty() || filter.types.iter().any(|t| t == self.kind))
    }
}

impl Subscription {
    /// How far the tail has handed out now: a catch-up read after this
    /// call must reach it, because what the tail sent before the receiver
    /// could get it (before subscribing, or lost to lagging) is only in
    /// the log. With standbys the tail's node may be ahead of the one a
    /// catch-up reads. (The tail moves this before each send, so the
    /// receiver gets everything above what this returns.)
    pub fn tail_at(&self) -> Position {
        self.sent.load(Ordering::SeqCst)
    }
}

/// The process's tail and its subscribers' limit.
#[derive(Debug)]
pub struct Feed {
    reader: LogReader,
    committed: watch::Receiver<Position>,
    sender: broadcast::Sender<Arc<FeedItem>>,
    /// The highest position the tail has handed out (or is about to).
    sent: Arc<AtomicI64>,
    started: OnceLock<()>,
    permits: Arc<Semaphore>,
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("too many subscribers")]
    Full,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A subscriber's place: its receiver and its permit.
pub struct Subscription {
    pub live: broadcast::Receiver<Arc<FeedItem>>,
    sent: Arc<AtomicI64>,
    _permit: OwnedSemaphorePermit,
}

impl Feed {
    /// `committed` moves when this process's committer appends; the log
    /// is read through `reader` (standbys, if it has them).
    pub fn new(reader: LogReader, committed: watch::Receiver<Position>, max_subscribers: usize) -> Self {
        let (sender, _) = broadcast::channel(BUFFER);
        Self {
            reader,
            committed,
            sender,
            sent: Arc::new(AtomicI64::new(0)),
            started: OnceLock::new(),
            permits: Arc::new(Semaphore::new(max_subscribers)),
        }
    }

    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// A new subscriber's receiver (the tail starts with the first one).
    pub async fn subscribe(&self) -> Result<Subscription, FeedError> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| FeedError::Full)?;
        if self.started.get().is_none() {
            let head = self.reader.head_position().await?;
            self.started.get_or_init(|| {
                self.sent.store(head, Ordering::SeqCst);
                tokio::spawn(tail(
                    self.reader.clone(),
                    self.sender.clone(),
                    self.sent.clone(),
                    self.committed.clone(),
                ));
            });
        }
        Ok(Subscription {
            live: self.sender.subscribe(),
            sent: self.sent.clone(),
            _permit: permit,
        })
    }
}

/// Reads the log after `sent` for ever, handing every event to the
/// subscribers, in order. `sent` moves before each send, so a subscriber
/// that reads it after subscribing receives everything above it.
async fn tail(
    reader: LogReader,
    sender: broadcast::Sender<Arc<FeedItem>>,
    sent: Arc<AtomicI64>,
    mut committed: watch::Receiver<Position>,
) {
    let mut after = sent.load(Ordering::SeqCst);
    loop {
        match reader.read_all(after, PAGE).await {
            Ok(events) => {
                let full = events.len() == PAGE as usize;
                for e in &events {
                    after = e.position;
                    sent.store(after, Ordering::SeqCst);
                    // No subscriber at the moment is fine.
                    let _ = sender.send(Arc::new(FeedItem::of(e)));
                }
                if full {
                    continue;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the live tail could not read the log; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        tokio::select! {
            changed = committed.changed() => {
                if changed.is_err() {
                    // The ledger is gone; other processes may still write.
                    tokio::time::sleep(POLL).await;
                }
            }
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}
