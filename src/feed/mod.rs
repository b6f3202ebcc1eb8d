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

use crate::store::{EventStore, LogFilter, Position};

/// What a follower receives.
#[derive(Debug)]
pub enum Delivery {
    Event(Arc<FeedItem>),
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
    store: EventStore,
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
    store: EventStore,
    sub: Subscription,
    after: Position,
    filter: LogFilter,
) -> impl Stream<Item = Delivery> {
    let follower = Follower {
        store,
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
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if let Some(item) = self.page.pop_front() {
                self.last = item.position;
                return Some(Delivery::Event(item));
            }
            match self.phase {
                Phase::Done => return None,
                Phase::CatchUp => {
                    let events = match self.store.read_log(self.last, PAGE, &self.filter).await {
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
                Phase::Live { just_switched } => match self.sub.live.recv().await {
                    Ok(item) => {
                        self.phase = Phase::Live { just_switched: false };
                        if item.position > self.last && item.matches(&self.filter) {
                            self.page.push_back(item);
                        }
                    }
                    // Behind already at the switch (a long catch-up): the
                    // log has it all; read on from there.
                    Err(RecvError::Lagged(_)) if just_switched => self.phase = Phase::CatchUp,
                    Err(RecvError::Lagged(_)) => {
                        self.phase = Phase::Done;
                        return Some(Delivery::Resume(self.last));
                    }
                    Err(RecvError::Closed) => self.phase = Phase::Done,
                },
            }
        }
    }
}
