//! The broker worker's side of the projections: applies events delivered by
//! RabbitMQ exactly once and, per wallet, in order.
//!
//! The relay publishes in log order, so the normal case is the runner's: an
//! event past a projection's checkpoint is applied and moves the checkpoint
//! in the same transaction; one at or before it is a duplicate and skipped.
//! The difference is failure. An event the worker cannot apply is *parked*
//! (and dead-lettered) instead of stopping every wallet, and each later event
//! of the same wallet is parked behind it: read models are per wallet and
//! order-sensitive (the fraud windows), so a wallet must never see its events
//! out of order. Replaying the dead letters in order applies the oldest
//! parked event of each stream; the others wait behind it until their turn.

use std::collections::{BTreeSet, HashMap};

use super::runner::{apply_events, table};
use super::storage::Tx;
use super::{ProjectionError, Projections};
use crate::store::{Position, RecordedEvent};

/// Events read from the log per query when looking for a gap.
const GAP_PAGE: u32 = 1000;

/// `incoming` with each of `missing` (sorted by position) placed before the
/// first message above it, and which of the result were filled in. Applied
/// in that order, a filled event lands where the broker should have put it.
pub fn merge_in_order(incoming: &[Incoming], missing: Vec<Incoming>) -> (Vec<Incoming>, Vec<bool>) {
    let mut merged = Vec::with_capacity(incoming.len() + missing.len());
    let mut filled = Vec::with_capacity(incoming.len() + missing.len());
    let mut missing = missing.into_iter().peekable();
    for message in incoming {
        while let Some(event) = missing.next_if(|e| e.position() < message.position()) {
            merged.push(event);
            filled.push(true);
        }
        merged.push(message.clone());
        filled.push(false);
    }
    for event in missing {
        merged.push(event);
        filled.push(true);
    }
    (merged, filled)
}

/// One message as the worker understood it.
#[derive(Debug, Clone)]
pub enum Incoming {
    Event(RecordedEvent),
    /// A message naming its stream and position that could not be applied.
    Failed {
        stream: String,
        position: Position,
        reason: String,
    },
}

impl Incoming {
    pub fn stream(&self) -> &str {
        match self {
            Incoming::Event(e) => e.stream.as_str(),
            Incoming::Failed { stream, .. } => stream,
        }
    }

    pub fn position(&self) -> Position {
        match self {
            Incoming::Event(e) => e.position,
            Incoming::Failed { position, .. } => *position,
        }
    }
}

/// What became of one incoming message, over all projections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Applied,
    /// Every projection had it already.
    Duplicate,
    /// Held back: the message belongs in the dead-letter queue.
    Parked {
        reason: String,
    },
}

/// What one projection does with one incoming event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Apply,
    /// Apply the oldest parked event of its stream and unpark it.
    ApplyParked,
    Skip,
    /// Park it now (it failed, or its stream has an older parked event).
    Park,
    /// It is parked already and must keep waiting.
    StayParked,
}

/// Pure: the step for an event at `position` given the projection's
/// `checkpoint` and the parked positions of the event's stream (updated).
fn step(checkpoint: Position, parked: &mut BTreeSet<Position>, position: Position, failed: bool) -> Step {
    if parked.contains(&position) {
        if !failed && parked.first() == Some(&position) {
            parked.remove(&position);
            return Step::ApplyParked;
        }
        return Step::StayParked;
    }
    if position <= checkpoint {
        return Step::Skip;
    }
    if failed || !parked.is_empty() {
        parked.insert(position);
        return Step::Park;
    }
    Step::Apply
}

impl Projections {
    /// Applies delivered messages (in delivery order) to every live read
    /// model in one transaction, with their checkpoints and parked rows.
    /// Returns one outcome per message; on error nothing was written.
    pub async fn apply_delivered(&self, incoming: &[Incoming]) -> Result<Vec<Delivery>, ProjectionError> {
        let mut tx = Tx::begin(&self.store).await?;
        let outcomes = self.deliver_in(&mut tx, incoming).await?;
        tx.commit().await?;
        Ok(outcomes)
    }

    /// The checkpoint of the read model furthest behind.
    pub async fn lowest_checkpoint(&self) -> Result<Position, ProjectionError> {
        let mut low = Position::MAX;
        for projection in &self.list {
            low = low.min(self.checkpoint(projection.name()).await?);
        }
        Ok(low)
    }

    /// Events the broker lost (it confirmed them to the relay, then lost
    /// them with a node): up to `limit` events of the log after `after` (or
    /// the lowest checkpoint, if higher) and up to `high` that `incoming`
    /// lacks, in log order. The log is read only when the delivered
    /// positions are not contiguous (positions have holes where a batch
    /// rolled back, so a hole alone proves nothing).
    pub async fn not_delivered(
        &self,
        incoming: &[Incoming],
        after: Position,
        high: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ProjectionError> {
        let low = self.lowest_checkpoint().await?.max(after);
        let delivered: BTreeSet<Position> = incoming
            .iter()
            .map(Incoming::position)
            .filter(|p| *p > low && *p <= high)
            .collect();
        if low >= high || delivered.len() as i64 == high - low {
            return Ok(Vec::new());
        }
        let mut missing = Vec::new();
        let mut after = low;
        while after < high && missing.len() < limit {
            let page = self.store.read_all(after, GAP_PAGE).await?;
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            missing.extend(
                page.into_iter()
                    .filter(|e| e.position <= high && !delivered.contains(&e.position)),
            );
            after = last;
        }
        missing.truncate(limit);
        Ok(missing)
    }

    /// Does all `apply_delivered` would, then rolls it back: whether these
    /// messages could be applied (the worker's search for the wallet whose
    /// update the database keeps refusing).
    pub async fn probe_delivered(&self, incoming: &[Incoming]) -> Result<(), ProjectionError> {
        let mut tx = Tx::begin(&self.store).await?;
        self.deliver_in(&mut tx, incoming).await?;
        drop(tx); // rolls back
        Ok(())
    }

    async fn deliver_in(&self, tx: &mut Tx, incoming: &[Incoming]) -> Result<Vec<Delivery>, ProjectionError> {
        // Checkpoints first (locked, in a fixed order), parked rows after:
        // a rebuild's swap that unparks rows takes the checkpoint lock too,
        // so what is read below cannot change before this commits.
        let mut checkpoints = Vec::with_capacity(self.list.len());
        for projection in &self.list {
            checkpoints.push(tx.checkpoint(projection.name()).await?.unwrap_or(0));
        }
        let streams: BTreeSet<&str> = incoming.iter().map(Incoming::stream).collect();
        let streams: Vec<&str> = streams.into_iter().collect();
        let mut parked: HashMap<(String, String), BTreeSet<Position>> = HashMap::new();
        for (projection, stream, position) in tx.parked(&streams).await? {
            parked.entry((projection, stream)).or_default().insert(position);
        }

        let mut outcomes = vec![Delivery::Duplicate; incoming.len()];
        for (projection, start) in self.list.iter().zip(checkpoints) {
            let name = projection.name();
            let mut checkpoint = start;
            let mut to_apply: Vec<&RecordedEvent> = Vec::new();
            for (i, message) in incoming.iter().enumerate() {
                let (stream, position) = (message.stream(), message.position());
                let set = parked.entry((name.to_owned(), stream.to_owned())).or_default();
                let failure = match message {
                    Incoming::Failed { reason, .. } => Some(reason.as_str()),
                    Incoming::Event(_) => None,
                };
                let oldest = set.first().copied();
                let parked_reason = || match (failure, oldest) {
                    (Some(reason), _) => reason.to_owned(),
                    (None, Some(behind)) => format!("{name}: wallet {stream} waits behind parked position {behind}"),
                    (None, None) => format!("{name}: parked"),
                };
                match step(checkpoint, set, position, failure.is_some()) {
                    step @ (Step::Apply | Step::ApplyParked) => {
                        let Incoming::Event(event) = message else {
                            unreachable!("a failed message is never applied")
                        };
                        to_apply.push(event);
                        if step == Step::Apply {
                            checkpoint = position;
                        } else {
                            tx.unpark(name, stream, position).await?;
                        }
                        if outcomes[i] == Delivery::Duplicate {
                            outcomes[i] = Delivery::Applied;
                        }
                    }
                    Step::Skip => {}
                    Step::Park => {
                        let reason = parked_reason();
                        tx.park(name, stream, position, &reason).await?;
                        checkpoint = checkpoint.max(position);
                        outcomes[i] = Delivery::Parked { reason };
                    }
                    Step::StayParked => {
                        outcomes[i] = Delivery::Parked {
                            reason: parked_reason(),
                        }
                    }
                }
            }
            if !to_apply.is_empty() {
                apply_events(tx, projection.as_ref(), &table(name), to_apply.into_iter()).await?;
            }
            if checkpoint != start {
                tx.set_checkpoint(name, checkpoint).await?;
            }
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_events_apply_and_repeats_are_skipped() {
        let mut parked = BTreeSet::new();
        assert_eq!(step(4, &mut parked, 5, false), Step::Apply);
        assert_eq!(step(5, &mut parked, 5, false), Step::Skip);
        assert_eq!(step(5, &mut parked, 3, false), Step::Skip);
        assert!(parked.is_empty());
    }

    #[test]
    fn a_failure_parks_its_stream_until_replayed_in_order() {
        let mut parked = BTreeSet::new();
        assert_eq!(step(4, &mut parked, 5, true), Step::Park);
        // Later events of the stream wait behind it, even once it is past the checkpoint.
        assert_eq!(step(5, &mut parked, 8, false), Step::Park);
        assert_eq!(parked, BTreeSet::from([5, 8]));
        // A redelivery of the still-failing event keeps it parked.
        assert_eq!(step(8, &mut parked, 5, true), Step::StayParked);
        // Replayed out of order: the younger one keeps waiting.
        assert_eq!(step(8, &mut parked, 8, false), Step::StayParked);
        assert_eq!(step(8, &mut parked, 5, false), Step::ApplyParked);
        assert_eq!(step(8, &mut parked, 8, false), Step::ApplyParked);
        assert!(parked.is_empty());
        // A second copy of a replayed event is a duplicate.
        assert_eq!(step(8, &mut parked, 5, false), Step::Skip);
    }

    fn at(position: Position) -> Incoming {
        Incoming::Failed {
            stream: "w".into(),
            position,
            reason: String::new(),
        }
    }

    #[test]
    fn filled_events_go_where_the_broker_should_have_put_them() {
        let positions = |v: &[Incoming]| v.iter().map(Incoming::position).collect::<Vec<_>>();
        // A redelivered 3 after 9 stays where it came; 7 goes before 9, 12 last.
        let (merged, filled) = merge_in_order(&[at(5), at(9), at(3)], vec![at(4), at(7), at(12)]);
        assert_eq!(positions(&merged), [4, 5, 7, 9, 3, 12]);
        assert_eq!(filled, [true, false, true, false, false, true]);
    }
}
