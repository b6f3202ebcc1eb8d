//! Growing pauses between reconnects, with jitter: backon's exponential
//! policy (already in the tree through lapin, so it costs no dependency).
//!
//! Without jitter, every process that one broker or database restart cut
//! off comes back at the same instants (100 ms, 200 ms, 400 ms...) and
//! they all knock at once. Each pause here is a random point in the upper
//! half of its step: the steps double from `min` to `max`, so no pause is
//! longer than `max` and the first is at most `min`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    steps: ExponentialBackoff,
}

impl Backoff {
    pub(crate) fn between(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            steps: steps(min, max),
        }
    }

    /// After a success: the next pause is short again.
    pub(crate) fn reset(&mut self) {
        self.steps = steps(self.min, self.max);
    }

    /// The next pause (longer each time, up to `max`).
    pub(crate) fn next_pause(&mut self) -> Duration {
        self.steps.next().unwrap_or(self.max).min(self.max)
    }

    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }
}

/// backon's jitter adds up to the step again (a pause in [d, 2d)): halved
/// steps make each pause fall in [d/2, d).
fn steps(min: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(min / 2)
        .with_max_delay(max / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_the_ceiling_with_jitter_and_reset() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::between(min, max);
        let pauses: Vec<Duration> = (0..12).map(|_| b.next_pause()).collect();
        assert!(pauses[0] >= min / 2 && pauses[0] < min, "{pauses:?}");
        assert!(pauses.iter().all(|p| *p <= max), "never above the ceiling: {pauses:?}");
        assert!(pauses[11] >= max / 2, "reaches the ceiling's half: {pauses:?}");
        // Two processes cut off together do not come back in step.
        let mut other = Backoff::between(min, max);
        let theirs: Vec<Duration> = (0..12).map(|_| other.next_pause()).collect();
        assert_ne!(pauses, theirs, "jittered");
        b.reset();
        assert!(b.next_pause() < min, "short again after a success");
    }
}
