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
//! Bounded: at `capacity` wallets, inserting a new one first evicts another
//! (an arbitrary one; eviction only costs a reload).

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

use crate::aggregate::{Wallet, WalletId};

/// Wallets kept by default: ~100-300 bytes each (the id dominates).
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Debug)]
pub struct WalletCache {
    map: DashMap<WalletId, Wallet>,
    capacity: usize,
}

impl WalletCache {
    /// `capacity` 0 disables the cache.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: DashMap::with_capacity(capacity.min(1 << 16)),
            capacity,
        }
    }

    pub fn contains(&self, id: &WalletId) -> bool {
        self.map.contains_key(id)
    }

    pub fn get(&self, id: &WalletId) -> Option<Wallet> {
        self.map.get(id).map(|w| w.clone())
    }

    /// Keeps `wallet` unless a state at the same or a later version is kept.
    pub fn remember(&self, wallet: Wallet) {
        if self.capacity == 0 || !wallet.exists() {
            return;
        }
        if self.map.len() >= self.capacity && !self.map.contains_key(&wallet.id) {
            self.evict_one(&wallet.id);
        }
        match self.map.entry(wallet.id.clone()) {
            Entry::Occupied(mut kept) => {
                if kept.get().version < wallet.version {
                    kept.insert(wallet);
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(wallet);
            }
        }
    }

    /// Keeps `wallet` whatever is held: the log's own head, as a conflict
    /// answered it, is the truth even when it is behind what was held (a
    /// database restored or failed over to a standby that lost commits).
    pub fn replace(&self, wallet: Wallet) {
        if !wallet.exists() {
            self.forget(&wallet.id);
            return;
        }
        self.forget(&wallet.id);
        self.remember(wallet);
    }

    /// Drops what is known of `id` (after an unknown outcome).
    pub fn forget(&self, id: &WalletId) {
        self.map.remove(id);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn evict_one(&self, keep: &WalletId) {
        // The iterator's shard lock must be released before `remove`.
        let victim = self.map.iter().map(|e| e.key().clone()).find(|k| k != keep);
        if let Some(victim) = victim {
            self.map.remove(&victim);
        }
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
