//! A wallet's state and `evolve`: how one event changes it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::event::WalletEvent;
use super::money::{Amount, Balance};
use super::wallet_id::WalletId;

/// Active holds one wallet may carry at once: bounds the state every
/// decision clones and every snapshot stores.
pub const MAX_ACTIVE_HOLDS: usize = 1000;

/// Money reserved on a wallet until it is captured, voided or expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub amount: Amount,
    pub expires_at: DateTime<Utc>,
    /// Where a capture pays to; `None` pays out of the system.
    pub to: Option<WalletId>,
}

/// A wallet's limits: every operation that moves its balance (or its
/// available money) must respect them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    /// Available money may not fall below this (0: no floor beyond zero).
    pub min_balance: Balance,
    /// The balance may not rise above this.
    pub max_balance: Option<Balance>,
}

/// A wallet as of some version of its stream. Version 0 means the stream is
/// empty: the wallet does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wallet {
    pub id: WalletId,
    /// All money in the wallet, held money included.
    pub balance: Balance,
    pub version: u64,
    /// The sum of the active holds: part of `balance`, not `available`.
    pub held: Balance,
    /// The active holds by id; resolved ones leave.
    pub holds: BTreeMap<Uuid, Hold>,
    pub limits: Limits,
}

impl Wallet {
    /// The state before any event: unknown wallet, balance zero.
    pub fn empty(id: WalletId) -> Self {
        Self {
            id,
            balance: Balance::ZERO,
            version: 0,
            held: Balance::ZERO,
            holds: BTreeMap::new(),
            limits: Limits::default(),
        }
    }

    pub fn exists(&self) -> bool {
        self.version > 0
    }

    /// What may still be withdrawn, transferred or held: balance less holds.
    pub fn available(&self) -> Balance {
        self.balance.saturating_sub(self.held)
    }

    /// Applies one event. The balance comes from the event's recorded
    /// `newBalance`: `decide` computed it from this same state, and `verify`
    /// re-checks it against the arithmetic. Holds and limits follow their
    /// events.
    pub fn evolve(mut self, event: &WalletEvent) -> Self {
        self.balance = event.balance_after();
        self.version += 1;
        match event {
            WalletEvent::HoldPlaced(p) => {
                self.held = self.held.saturating_add(p.amount);
                self.holds.insert(
                    p.hold_id,
                    Hold {
                        amount: p.amount,
                        expires_at: p.expires_at,
                        to: p.to_wallet_id.clone(),
                    },
                );
            }
            WalletEvent::HoldCaptured(p) => self.release(p.hold_id),
            WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => self.release(p.hold_id),
            WalletEvent::WalletLimitsChanged(p) => {
                self.limits = Limits {
                    min_balance: p.min_balance,
                    max_balance: p.max_balance,
                };
            }
            _ => {}
        }
        self
    }

    fn release(&mut self, hold: Uuid) {
        if let Some(h) = self.holds.remove(&hold) {
            self.held = self.held.saturating_sub_amount(h.amount);
        }
    }

    pub fn fold<'a>(id: WalletId, events: impl IntoIterator<Item = &'a WalletEvent>) -> Self {
        events.into_iter().fold(Self::empty(id), Self::evolve)
    }
}
