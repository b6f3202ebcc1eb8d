//! A wallet's state and `evolve`: how one event changes it.

use super::event::WalletEvent;
use super::money::Balance;
use super::wallet_id::WalletId;

/// A wallet as of some version of its stream. Version 0 means the stream is
/// empty: the wallet does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wallet {
    pub id: WalletId,
    pub balance: Balance,
    pub version: u64,
}

impl Wallet {
    /// The state before any event: unknown wallet, balance zero.
    pub fn empty(id: WalletId) -> Self {
        Self {
            id,
            balance: Balance::ZERO,
            version: 0,
        }
    }

    pub fn exists(&self) -> bool {
        self.version > 0
    }

    /// Applies one event. The balance comes from the event's recorded
    /// `newBalance`: `decide` computed it from this same state, and `verify`
    /// re-checks it against the arithmetic.
    pub fn evolve(mut self, event: &WalletEvent) -> Self {
        self.balance = event.balance_after();
        self.version += 1;
        self
    }

    pub fn fold<'a>(id: WalletId, events: impl IntoIterator<Item = &'a WalletEvent>) -> Self {
        events.into_iter().fold(Self::empty(id), Self::evolve)
    }
}
