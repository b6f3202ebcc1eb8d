//! The live tail: one reader of the log per process, fanned out in memory
//! to every subscriber, so live delivery costs no query per subscriber.
//!
//! The tail reads the log by position (which never skips a late commit:
//! appends become visible in order), woken by this process's committer and
//! polling for other processes' appends. A subscriber catches up from the
//! log itself, then follows the tail; it subscribes before its last catch-up
//! read, so nothing falls between the two, and it skips what it already
//! sent (by position), so nothing comes twice.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};

use super::LogEvent;
use crate::store::{EventStore, LogFilter, Position, StoreError};

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

/// The process's tail and its subscribers' limit.
#[derive(Debug)]
pub struct Feed {
    store: EventStore,
    committed: watch::Receiver<Position>,
    sender: broadcast::Sender<Arc<FeedItem>>,
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
    _permit: OwnedSemaphorePermit,
}

impl Feed {
    /// `committed` moves when this process's committer appends.
    pub fn new(store: EventStore, committed: watch::Receiver<Position>, max_subscribers: usize) -> Self {
        let (sender, _) = broadcast::channel(BUFFER);
        Self {
            store,
            committed,
            sender,
            started: OnceLock::new(),
            permits: Arc::new(Semaphore::new(max_subscribers)),
        }
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// A new subscriber's receiver (the tail starts with the first one).
    pub async fn subscribe(&self) -> Result<Subscription, FeedError> {
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| FeedError::Full)?;
        if self.started.get().is_none() {
            let head = self.store.head_position().await?;
            self.started.get_or_init(|| {
                tokio::spawn(tail(
                    self.store.clone(),
                    self.sender.clone(),
                    self.committed.clone(),
                    head,
                ));
            });
        }
        Ok(Subscription {
            live: self.sender.subscribe(),
            _permit: permit,
        })
    }
}

/// Reads the log after `after` for ever, handing every event to the
/// subscribers, in order.
async fn tail(
    store: EventStore,
    sender: broadcast::Sender<Arc<FeedItem>>,
    mut committed: watch::Receiver<Position>,
    mut after: Position,
) {
    loop {
        match store.read_all(after, PAGE).await {
            Ok(events) => {
                let full = events.len() == PAGE as usize;
                for e in &events {
                    after = e.position;
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
