//! The committed log for other teams' services: its public event shape
//! (`event.rs`, also the RabbitMQ message body), the process's live tail
//! (`tail.rs`), and `follow`, which takes one subscriber from any position
//! to the live end of the log with no gap and no duplicate at the switch.
//! The HTTP routes (`api/events.rs`) and `wallet tail` are its edges.

mod event;
mod tail;

use std::sync::Arc;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;

pub use event::{LogEvent, LogEventMetadata};
pub use tail::{Feed, FeedError, FeedItem, Subscription, DEFAULT_MAX_SUBSCRIBERS, PAGE};

use crate::store::standby::LogReader;
use crate::store::{LogFilter, Position};

/// Events handed out in one piece at most (one write to the client).
const RUN: usize = 256;
/// A follower with nothing to send says so this often (an SSE comment),
/// so proxies keep the connection open.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(15);

/// What a follower receives.
#[derive(Debug)]
pub enum Delivery {
    /// The next events, in position order.
    Events(Vec<Arc<FeedItem>>),
    /// Nothing for `HEARTBEAT`.
    Heartbeat,
    /// It fell too far behind the live tail: reconnect after this position.
    Resume(Position),
    /// The log could not be read; reconnect after this position.
    Failed(Position),
}

enum Phase {
    /// Reading the log itself, a page at a time, at the follower's pace.
    CatchUp,
    /// Following the tail; `just_switched` until the first item arrives.
    Live {
        just_switched: bool,
    },
    Done,
}

struct Follower {
    reader: LogReader,
    sub: Subscription,
    filter: LogFilter,
    last: Position,
    page: std::collections::VecDeque<Arc<FeedItem>>,
    phase: Phase,
}

/// The events after `after` that pass `filter`, then the live ones, in
/// position order, each once. `sub` must be taken before this is called
/// (it is: the subscription exists before the first catch-up read).
pub fn follow(
    reader: LogReader,
    sub: Subscription,
    after: Position,
    filter: LogFilter,
) -> impl Stream<Item = Delivery> {
    let follower = Follower {
        reader,
        sub,
        filter,
        last: after,
        page: Default::default(),
        phase: Phase::CatchUp,
    };
    futures_util::stream::unfold(follower, |mut f| async move {
        let delivery = f.next().await?;
        Some((delivery, f))
    })
}

impl Follower {
    /// Queues what the tail handed out (and whatever else is ready, up to a
    /// run). `Some` ends the stream with that delivery (or none).
    fn take_live(
        &mut self,
        mut received: Result<Arc<FeedItem>, RecvError>,
        just_switched: bool,
    ) -> Option<Option<Delivery>> {
        loop {
            match received {
                Ok(item) => {
                    self.phase = Phase::Live { just_switched: false };
                    let after = self.page.back().map_or(self.last, |i| i.position);
                    if item.position > after && item.matches(&self.filter) {
                        self.page.push_back(item);
                    }
                }
                // Behind already at the switch (a long catch-up): the log
                // has it all; read on from there.
                Err(RecvError::Lagged(_)) if just_switched => {
                    self.page.clear();
                    self.phase = Phase::CatchUp;
                    return None;
                }
                Err(RecvError::Lagged(_)) => {
                    self.phase = Phase::Done;
                    self.page.clear();
                    return Some(Some(Delivery::Resume(self.last)));
                }
                Err(RecvError::Closed) => {
                    self.phase = Phase::Done;
                    return None;
                }
            }
            if self.page.len() >= RUN {
                return None;
            }
            received = match self.sub.live.try_recv() {
                Ok(item) => Ok(item),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(n)) => Err(RecvError::Lagged(n)),
                Err(_) => return None,
            };
        }
    }

    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if !self.page.is_empty() {
                let run: Vec<Arc<FeedItem>> = self.page.drain(..self.page.len().min(RUN)).collect();
                self.last = run.last().map_or(self.last, |i| i.position);
                return Some(Delivery::Events(run));
            }
            match self.phase {
                Phase::Done => return None,
                Phase::CatchUp => {
                    let events = match self
                        .reader
                        .read_log(self.last, PAGE, &self.filter, self.sub.tail_at())
                        .await
                    {
                        Ok(events) => events,
                        Err(e) => {
                            tracing::warn!(error = %e, "a follower could not read the log");
                            self.phase = Phase::Done;
                            return Some(Delivery::Failed(self.last));
                        }
                    };
                    if events.len() < PAGE as usize {
                        self.phase = Phase::Live { just_switched: true };
                    }
                    self.page.extend(events.iter().map(|e| Arc::new(FeedItem::of(e))));
                }
                Phase::Live { just_switched } => {
                    let received = tokio::select! {
                        r = self.sub.live.recv() => r,
                        _ = tokio::time::sleep(HEARTBEAT) => return Some(Delivery::Heartbeat),
                    };
                    if let Some(end) = self.take_live(received, just_switched) {
                        return end;
                    }
                }
            }
        }
    }
}
