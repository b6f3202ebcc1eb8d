//! Token-bucket rate limits per API key and per client address (`governor`).
//!
//! A limit is written `N/s`, `N/m` or `N/h` with an optional burst,
//! `N/unit:burst` (default burst: N). A request over its budget is answered
//! 429 `RATE_LIMITED` with `Retry-After` (whole seconds until a token is
//! back, at least 1) and counted in `rate_limited_total{limit}`. The
//! per-address table forgets idle addresses as it goes, so a scan of many
//! source addresses cannot grow it without bound.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Checks between sweeps of the per-address table.
const SWEEP_EVERY: u64 = 4096;

/// A parsed `N/unit[:burst]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    pub per_period: NonZeroU32,
    pub period: Duration,
    pub burst: NonZeroU32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rate limit {0:?}: expected N/s, N/m or N/h with an optional :burst (e.g. 100/s:200), or off")]
pub struct RateSpecError(String);

impl RateSpec {
    /// `None` for `off` or `0`.
    pub fn parse(text: &str) -> Result<Option<RateSpec>, RateSpecError> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") || text == "0" {
            return Ok(None);
        }
        let err = || RateSpecError(text.to_owned());
        let (rate, burst) = match text.split_once(':') {
            Some((rate, burst)) => (rate, Some(burst)),
            None => (text, None),
        };
        let (count, unit) = rate.split_once('/').ok_or_else(err)?;
        let per_period: NonZeroU32 = count.trim().parse().map_err(|_| err())?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(err()),
        };
        let burst = match burst {
            Some(b) => b.trim().parse().map_err(|_| err())?,
            None => per_period,
        };
        Ok(Some(RateSpec {
            per_period,
            period,
            burst,
        }))
    }

    fn quota(&self) -> Quota {
        let replenish = self.period / self.per_period.get();
        Quota::with_period(replenish.max(Duration::from_nanos(1)))
            .expect("a positive period")
            .allow_burst(self.burst)
    }
}

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// One keyed bucket set.
struct Limiter<K: Hash + Eq + Clone> {
    buckets: Keyed<K>,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(spec: RateSpec) -> Self {
        Self {
            buckets: RateLimiter::keyed(spec.quota()),
            checks: AtomicU64::new(0),
        }
    }

    /// `Err(wait)` when `key` is over its budget.
    fn check(&self, key: &K) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.buckets.retain_recent();
            self.buckets.shrink_to_fit();
        }
        self.buckets
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(self.buckets.clock().now()))
    }
}

/// The configured limits; both off by default.
#[derive(Default)]
pub struct RateLimits {
    per_key: Option<Limiter<String>>,
    per_address: Option<Limiter<IpAddr>>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("per_key", &self.per_key.is_some())
            .field("per_address", &self.per_address.is_some())
            .finish()
    }
}

/// Which budget a request ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    Key(Duration),
    Address(Duration),
}

impl RateLimits {
    pub fn new(per_key: Option<RateSpec>, per_address: Option<RateSpec>) -> Self {
        Self {
            per_key: per_key.map(Limiter::new),
            per_address: per_address.map(Limiter::new),
        }
    }

    pub fn check_address(&self, address: IpAddr) -> Result<(), Exceeded> {
        match &self.per_address {
            Some(limiter) => limiter.check(&address).map_err(Exceeded::Address),
            None => Ok(()),
        }
    }

    pub fn check_key(&self, key_name: &str) -> Result<(), Exceeded> {
        match &self.per_key {
            Some(limiter) => limiter.check(&key_name.to_owned()).map_err(Exceeded::Key),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        let spec = RateSpec::parse("100/s:250").unwrap().unwrap();
        assert_eq!(
            (spec.per_period.get(), spec.period, spec.burst.get()),
            (100, Duration::from_secs(1), 250)
        );
        assert_eq!(RateSpec::parse("6/m").unwrap().unwrap().burst.get(), 6);
        assert_eq!(RateSpec::parse("off").unwrap(), None);
        assert_eq!(RateSpec::parse("0").unwrap(), None);
        for bad in ["", "10", "10/d", "0/s", "x/s", "10/s:0", "10/s:x"] {
            assert!(RateSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_over_its_budget_waits_and_others_do_not() {
        let limits = RateLimits::new(RateSpec::parse("2/m").unwrap(), None);
        assert!(limits.check_key("a").is_ok());
        assert!(limits.check_key("a").is_ok());
        match limits.check_key("a") {
            Err(Exceeded::Key(wait)) => assert!(wait > Duration::from_secs(20), "{wait:?}"),
            other => panic!("{other:?}"),
        }
        assert!(limits.check_key("b").is_ok());
        assert!(limits.check_address("127.0.0.1".parse().unwrap()).is_ok(), "off");
    }
}
