//! The committer's state of the wallets it wrote: folded wallets at known
//! versions, in memory. The committer decides against them with no query,
//! and a balance read only asks the log for the events after the held
//! version (usually none) instead of folding from a snapshot.
//!
//! One writer: only the committer (`ledger/committer.rs`) changes it, and
//! only with states the database confirmed (an append or a head assertion
//! that committed, or the heads a conflict answered with). Request tasks
//! read it. Correctness never depends on it: every append states the head
//! it was decided on, so a stale entry (another process wrote the wallet)
//! costs one conflict, whose answer carries the actual head. Entries only
//! move forward: a state replaces a held one only if its version is higher.
//!
//! Bounded: at `capacity` wallets, an insert evicts by `quick_cache`'s
//! S3-FIFO policy (wallets read or written again recently stay; a scan of
//! one-off wallets does not push them out). Eviction only costs a reload.
//! Entries are shared (`Arc`): a look at one hold (`hold`) copies no
//! wallet; `get` hands out a copy the caller may fold further.

use std::sync::Arc;

use uuid::Uuid;

use crate::aggregate::{Hold, Wallet, WalletId};

/// Wallets kept by default: ~100-300 bytes each (the id dominates).
pub const DEFAULT_CAPACITY: usize = 100_000;

pub struct WalletCache {
    /// `None`: caching disabled (capacity 0).
    map: Option<quick_cache::sync::Cache<WalletId, Arc<Wallet>>>,
}

impl std::fmt::Debug for WalletCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalletCache").field("wallets", &self.len()).finish()
    }
}

impl WalletCache {
    /// `capacity` 0 disables the cache.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: (capacity > 0).then(|| quick_cache::sync::Cache::new(capacity)),
        }
    }

    pub fn contains(&self, id: &WalletId) -> bool {
        self.map.as_ref().is_some_and(|m| m.peek(id).is_some())
    }

    pub fn get(&self, id: &WalletId) -> Option<Wallet> {
        self.map.as_ref()?.get(id).map(|w| Wallet::clone(&w))
    }

    /// One active hold of a held wallet, without copying the wallet.
    pub fn hold(&self, id: &WalletId, hold: Uuid) -> Option<Hold> {
        self.map.as_ref()?.get(id)?.holds.get(&hold).cloned()
    }

    /// Keeps `wallet` unless a state at the same or a later version is kept.
    /// Only the committer writes, so the look and the insert cannot be
    /// overtaken by another writer.
    pub fn remember(&self, wallet: Wallet) {
        let Some(map) = &self.map else { return };
        if !wallet.exists() {
            return;
        }
        if map.peek(&wallet.id).is_some_and(|kept| kept.version >= wallet.version) {
            return;
        }
        map.insert(wallet.id.clone(), Arc::new(wallet));
    }

    /// Keeps `wallet` whatever is held: the log's own head, as a conflict
    /// answered it, is the truth even when it is behind what was held (a
    /// database restored or failed over to a standby that lost commits).
    pub fn replace(&self, wallet: Wallet) {
        self.forget(&wallet.id);
        self.remember(wallet);
    }

    /// Drops what is known of `id` (after an unknown outcome).
    pub fn forget(&self, id: &WalletId) {
        if let Some(map) = &self.map {
            map.remove(id);
        }
    }

    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wallet(id: &str, version: u64) -> Wallet {
        Wallet {
            version,
            ..Wallet::empty(WalletId::parse(id).unwrap())
        }
    }

    #[test]
    fn a_state_never_goes_back_to_an_older_version() {
        let cache = WalletCache::new(10);
        cache.remember(wallet("a", 5));
        cache.remember(wallet("a", 3));
        assert_eq!(cache.get(&wallet("a", 0).id).unwrap().version, 5);
        cache.remember(wallet("a", 6));
        assert_eq!(cache.get(&wallet("a", 0).id).unwrap().version, 6);
    }

    #[test]
    fn a_wallet_in_use_survives_a_scan_of_one_off_wallets() {
        let cache = WalletCache::new(1_000);
        let hot = wallet("hot", 1);
        cache.remember(hot.clone());
        for i in 0..20_000 {
            cache.remember(wallet(&format!("w{i}"), 1));
            if i % 10 == 0 {
                assert!(cache.get(&hot.id).is_some(), "evicted after {i} one-off wallets");
            }
        }
        assert!(cache.len() <= 1_000, "{} wallets held", cache.len());
    }

    #[test]
    fn it_never_holds_more_than_its_capacity_nor_unknown_wallets() {
        let cache = WalletCache::new(100);
        for i in 0..1000 {
            cache.remember(wallet(&format!("w{i}"), 1));
            assert!(cache.len() <= 100);
        }
        cache.remember(wallet("never-written", 0));
        assert!(cache.get(&wallet("never-written", 0).id).is_none());
        let off = WalletCache::new(0);
        off.remember(wallet("a", 1));
        assert!(off.is_empty());
    }
}
