//! `decide`: the wallet's rules, turning a command and the current states
//! into new events or a rejection.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::event::{
    CreatedPayload, FundsPayload, HoldCapturedPayload, HoldPlacedPayload, HoldReleasedPayload, LimitsPayload,
    TransferPayload, WalletEvent,
};
use super::money::{Amount, Balance};
use super::state::{Hold, Wallet, MAX_ACTIVE_HOLDS};
use super::wallet_id::WalletId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Deposit {
        wallet: WalletId,
        amount: Amount,
    },
    Withdraw {
        wallet: WalletId,
        amount: Amount,
    },
    /// `transfer_id` is chosen by the caller so a retried decision keeps it.
    Transfer {
        from: WalletId,
        to: WalletId,
        amount: Amount,
        transfer_id: Uuid,
    },
    /// Reserves `amount` of the available money until `expires_at`.
    PlaceHold {
        wallet: WalletId,
        hold_id: Uuid,
        amount: Amount,
        expires_at: DateTime<Utc>,
        to: Option<WalletId>,
    },
    /// Takes `amount` (all of the hold if `None`) and releases the rest.
    /// `to` is the hold's own payee, named so its state is at hand; `now`
    /// decides expiry.
    CaptureHold {
        wallet: WalletId,
        hold_id: Uuid,
        amount: Option<Amount>,
        to: Option<WalletId>,
        now: DateTime<Utc>,
    },
    VoidHold {
        wallet: WalletId,
        hold_id: Uuid,
        now: DateTime<Utc>,
    },
    /// Releases a hold whose time has passed (the service sends it).
    ExpireHold {
        wallet: WalletId,
        hold_id: Uuid,
        now: DateTime<Utc>,
    },
    SetLimits {
        wallet: WalletId,
        min_balance: Balance,
        max_balance: Option<Balance>,
    },
    /// All of `ops` or none: each decided on the states the earlier ones
    /// leave, appended together.
    Atomic {
        ops: Vec<Command>,
    },
}

/// Operations one atomic command may hold, at most.
pub const MAX_ATOMIC_OPS: usize = 1000;

impl Command {
    /// The wallets whose current state `decide` needs, in that order.
    pub fn wallets(&self) -> Vec<&WalletId> {
        match self {
            Command::Deposit { wallet, .. } | Command::Withdraw { wallet, .. } => vec![wallet],
            Command::Transfer { from, to, .. } => vec![from, to],
            Command::CaptureHold {
                wallet, to: Some(to), ..
            } => vec![wallet, to],
            Command::PlaceHold { wallet, .. }
            | Command::CaptureHold { wallet, .. }
            | Command::VoidHold { wallet, .. }
            | Command::ExpireHold { wallet, .. }
            | Command::SetLimits { wallet, .. } => vec![wallet],
            Command::Atomic { ops } => {
                let mut all: Vec<&WalletId> = Vec::new();
                for id in ops.iter().flat_map(Command::wallets) {
                    if !all.contains(&id) {
                        all.push(id);
                    }
                }
                all
            }
        }
    }

    /// The wallet the command is addressed to (its idempotency scope).
    pub fn wallet(&self) -> &WalletId {
        self.wallets()[0]
    }
}

/// A rejection the rules decided. These are remembered for idempotent replay,
/// hence serialisable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DomainError {
    /// `balance` is the money available (balance less holds).
    #[error("wallet {wallet} has {balance} available, cannot take {requested}")]
    InsufficientFunds {
        wallet: WalletId,
        balance: Balance,
        requested: Amount,
    },
    #[error("wallet {wallet} does not exist")]
    WalletNotFound { wallet: WalletId },
    #[error("cannot transfer from a wallet to itself")]
    SameWallet,
    #[error("wallet {wallet} would exceed the largest representable balance")]
    BalanceLimit { wallet: WalletId },
    #[error("wallet {wallet} would hold more than its maximum balance {max_balance}")]
    MaxBalanceExceeded { wallet: WalletId, max_balance: Balance },
    #[error("wallet {wallet} would have less than its minimum balance {min_balance} available")]
    MinBalanceBreached { wallet: WalletId, min_balance: Balance },
    #[error("wallet {wallet} has no hold {hold}")]
    HoldNotFound { wallet: WalletId, hold: Uuid },
    #[error("hold {hold} on wallet {wallet} is no longer active ({reason})")]
    HoldNotActive {
        wallet: WalletId,
        hold: Uuid,
        reason: String,
    },
    #[error("hold {hold} holds {held}, cannot capture {requested}")]
    CaptureExceedsHold {
        hold: Uuid,
        held: Amount,
        requested: Amount,
    },
    #[error("wallet {wallet} already has {MAX_ACTIVE_HOLDS} active holds")]
    TooManyHolds { wallet: WalletId },
    #[error("minBalance {min_balance} is above maxBalance {max_balance}")]
    InvalidLimits { min_balance: Balance, max_balance: Balance },
    /// An atomic batch wrote nothing: its operation `index` was refused.
    #[error("operations[{index}]: {error}")]
    OperationFailed { index: usize, error: Box<DomainError> },
}

/// New events for one stream, to be appended if the stream is still at
/// `expected_version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEvents {
    pub wallet: WalletId,
    pub expected_version: u64,
    pub events: Vec<WalletEvent>,
    /// The wallet's balance after these events.
    pub balance: Balance,
    /// Whether these events open the wallet.
    pub created: bool,
}

/// What a command decided: one entry per touched stream, appended atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub streams: Vec<StreamEvents>,
}

/// Applies the rules. `wallets` are the current states of `command.wallets()`,
/// in the same order.
pub fn decide(command: &Command, wallets: &[&Wallet]) -> Result<Decision, DomainError> {
    let one = |stream| Ok(Decision { streams: vec![stream] });
    match command {
        Command::Deposit { wallet, amount } => {
            let state = state_of(wallets, 0, wallet);
            one(credit(state, *amount, |wallet_id, new_balance| {
                WalletEvent::FundsDeposited(FundsPayload {
                    wallet_id,
                    amount: *amount,
                    new_balance,
                })
            })?)
        }
        Command::Withdraw { wallet, amount } => {
            let state = state_of(wallets, 0, wallet);
            one(debit(state, *amount, |wallet_id, new_balance| {
                WalletEvent::FundsWithdrawn(FundsPayload {
                    wallet_id,
                    amount: *amount,
                    new_balance,
                })
            })?)
        }
        Command::Transfer {
            from,
            to,
            amount,
            transfer_id,
        } => {
            if from == to {
                return Err(DomainError::SameWallet);
            }
            let (source, target) = (state_of(wallets, 0, from), state_of(wallets, 1, to));
            let half = |wallet_id, new_balance| TransferPayload {
                wallet_id,
                transfer_id: *transfer_id,
                from_wallet_id: from.clone(),
                to_wallet_id: to.clone(),
                amount: *amount,
                new_balance,
            };
            let debit = debit(source, *amount, |w, b| WalletEvent::TransferDebited(half(w, b)))?;
            let credit = credit(target, *amount, |w, b| WalletEvent::TransferCredited(half(w, b)))?;
            Ok(Decision {
                streams: vec![debit, credit],
            })
        }
        Command::PlaceHold {
            wallet,
            hold_id,
            amount,
            expires_at,
            to,
        } => one(holds::place(
            state_of(wallets, 0, wallet),
            *hold_id,
            *amount,
            *expires_at,
            to,
        )?),
        Command::CaptureHold {
            wallet,
            hold_id,
            amount,
            to,
            now,
        } => {
            let target = to.as_ref().map(|to| state_of(wallets, 1, to));
            holds::capture(state_of(wallets, 0, wallet), target, *hold_id, *amount, *now)
        }
        Command::VoidHold { wallet, hold_id, now } => one(holds::release(
            state_of(wallets, 0, wallet),
            *hold_id,
            *now,
            holds::Release::Void,
        )?),
        Command::ExpireHold { wallet, hold_id, now } => one(holds::release(
            state_of(wallets, 0, wallet),
            *hold_id,
            *now,
            holds::Release::Expire,
        )?),
        Command::SetLimits {
            wallet,
            min_balance,
            max_balance,
        } => one(set_limits(state_of(wallets, 0, wallet), *min_balance, *max_balance)?),
        Command::Atomic { ops } => Ok(merge(decide_each(ops, wallets)?.0)),
    }
}

/// Decides `ops` in order, each on the states the earlier ones left.
/// Returns each one's decision, and the states after all of them (in the
/// order of `wallets`). The first refusal ends it, naming its index.
pub fn decide_each(ops: &[Command], wallets: &[&Wallet]) -> Result<(Vec<Decision>, Vec<Wallet>), DomainError> {
    let mut states: Vec<Wallet> = wallets.iter().map(|w| (*w).clone()).collect();
    let mut decisions = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let failed = |error| DomainError::OperationFailed {
            index,
            error: Box::new(error),
        };
        let mine: Vec<&Wallet> = op
            .wallets()
            .into_iter()
            .map(|id| {
                states
                    .iter()
                    .find(|w| &w.id == id)
                    .expect("an atomic command holds its ops' wallets")
            })
            .collect();
        let decision = decide(op, &mine).map_err(failed)?;
        for stream in &decision.streams {
            let state = states
                .iter_mut()
                .find(|w| w.id == stream.wallet)
                .expect("decided on its own wallets");
            *state = stream.events.iter().fold(state.clone(), |w, e| w.evolve(e));
        }
        decisions.push(decision);
    }
    Ok((decisions, states))
}

/// One append per stream for many decisions: each stream's events in
/// order, expecting the head before the first.
fn merge(decisions: Vec<Decision>) -> Decision {
    let mut streams: Vec<StreamEvents> = Vec::new();
    for stream in decisions.into_iter().flat_map(|d| d.streams) {
        match streams.iter_mut().find(|s| s.wallet == stream.wallet) {
            Some(merged) => {
                merged.events.extend(stream.events);
                merged.balance = stream.balance;
                merged.created |= stream.created;
            }
            None => streams.push(stream),
        }
    }
    Decision { streams }
}

fn state_of<'a>(wallets: &[&'a Wallet], index: usize, id: &WalletId) -> &'a Wallet {
    let state = wallets[index];
    assert_eq!(&state.id, id, "decide was given the wrong wallet state");
    state
}

/// Money in: opens the wallet if new; the balance may not pass the maximum.
fn credit(
    state: &Wallet,
    amount: Amount,
    event: impl FnOnce(WalletId, Balance) -> WalletEvent,
) -> Result<StreamEvents, DomainError> {
    let balance = credited(state, amount)?;
    let created = !state.exists();
    let mut events = Vec::with_capacity(2);
    if created {
        events.push(WalletEvent::WalletCreated(CreatedPayload {
            wallet_id: state.id.clone(),
        }));
    }
    events.push(event(state.id.clone(), balance));
    Ok(StreamEvents {
        wallet: state.id.clone(),
        expected_version: state.version,
        events,
        balance,
        created,
    })
}

/// The balance after `amount` comes in, within the wallet's maximum.
fn credited(state: &Wallet, amount: Amount) -> Result<Balance, DomainError> {
    let balance = state
        .balance
        .checked_add(amount)
        .ok_or_else(|| DomainError::BalanceLimit {
            wallet: state.id.clone(),
        })?;
    match state.limits.max_balance {
        Some(max_balance) if balance > max_balance => Err(DomainError::MaxBalanceExceeded {
            wallet: state.id.clone(),
            max_balance,
        }),
        _ => Ok(balance),
    }
}

/// Money out of the available money: the wallet must exist, and what stays
/// available may not fall below its minimum.
fn debit(
    state: &Wallet,
    amount: Amount,
    event: impl FnOnce(WalletId, Balance) -> WalletEvent,
) -> Result<StreamEvents, DomainError> {
    take_available(state, amount)?;
    let balance = state
        .balance
        .checked_sub(amount)
        .expect("available money is part of the balance");
    Ok(StreamEvents {
        wallet: state.id.clone(),
        expected_version: state.version,
        events: vec![event(state.id.clone(), balance)],
        balance,
        created: false,
    })
}

/// Whether `amount` may leave the available money (by a debit or a hold).
fn take_available(state: &Wallet, amount: Amount) -> Result<(), DomainError> {
    if !state.exists() {
        return Err(DomainError::WalletNotFound {
            wallet: state.id.clone(),
        });
    }
    let available = state.available();
    let left = available
        .checked_sub(amount)
        .ok_or_else(|| DomainError::InsufficientFunds {
            wallet: state.id.clone(),
            balance: available,
            requested: amount,
        })?;
    if left < state.limits.min_balance {
        return Err(DomainError::MinBalanceBreached {
            wallet: state.id.clone(),
            min_balance: state.limits.min_balance,
        });
    }
    Ok(())
}

fn set_limits(state: &Wallet, min_balance: Balance, max_balance: Option<Balance>) -> Result<StreamEvents, DomainError> {
    if !state.exists() {
        return Err(DomainError::WalletNotFound {
            wallet: state.id.clone(),
        });
    }
    if let Some(max_balance) = max_balance.filter(|max| *max < min_balance) {
        return Err(DomainError::InvalidLimits {
            min_balance,
            max_balance,
        });
    }
    Ok(StreamEvents {
        wallet: state.id.clone(),
        expected_version: state.version,
        events: vec![WalletEvent::WalletLimitsChanged(LimitsPayload {
            wallet_id: state.id.clone(),
            min_balance,
            max_balance,
            new_balance: state.balance,
        })],
        balance: state.balance,
        created: false,
    })
}

/// The hold rules: place, capture, void and expire, each resolving an
/// active hold at most once.
mod holds {
    use super::*;

    pub(super) fn place(
        state: &Wallet,
        hold_id: Uuid,
        amount: Amount,
        expires_at: DateTime<Utc>,
        to: &Option<WalletId>,
    ) -> Result<StreamEvents, DomainError> {
        if to.as_ref() == Some(&state.id) {
            return Err(DomainError::SameWallet);
        }
        take_available(state, amount)?;
        if state.holds.len() >= MAX_ACTIVE_HOLDS {
            return Err(DomainError::TooManyHolds {
                wallet: state.id.clone(),
            });
        }
        Ok(StreamEvents {
            wallet: state.id.clone(),
            expected_version: state.version,
            events: vec![WalletEvent::HoldPlaced(HoldPlacedPayload {
                wallet_id: state.id.clone(),
                hold_id,
                amount,
                expires_at,
                to_wallet_id: to.clone(),
                new_balance: state.balance,
            })],
            balance: state.balance,
            created: false,
        })
    }

    /// The hold, if it is active and its time has not passed.
    fn active<'a>(state: &'a Wallet, hold_id: Uuid, now: DateTime<Utc>) -> Result<&'a Hold, DomainError> {
        let not_active = |reason: &str| DomainError::HoldNotActive {
            wallet: state.id.clone(),
            hold: hold_id,
            reason: reason.to_owned(),
        };
        let hold = state
            .holds
            .get(&hold_id)
            .ok_or_else(|| not_active("captured, voided or expired"))?;
        if now >= hold.expires_at {
            return Err(not_active("expired"));
        }
        Ok(hold)
    }

    pub(super) fn capture(
        state: &Wallet,
        target: Option<&Wallet>,
        hold_id: Uuid,
        amount: Option<Amount>,
        now: DateTime<Utc>,
    ) -> Result<Decision, DomainError> {
        let hold = active(state, hold_id, now)?;
        if hold.to.as_ref() != target.map(|t| &t.id) {
            // The command named another payee than the hold's own: it was
            // built from some other hold with this id, which there is not.
            return Err(DomainError::HoldNotFound {
                wallet: state.id.clone(),
                hold: hold_id,
            });
        }
        let captured = amount.unwrap_or(hold.amount);
        let released = hold
            .amount
            .as_balance()
            .checked_sub(captured)
            .ok_or(DomainError::CaptureExceedsHold {
                hold: hold_id,
                held: hold.amount,
                requested: captured,
            })?;
        let balance = state
            .balance
            .checked_sub(captured)
            .expect("held money is in the balance");
        let mut streams = vec![StreamEvents {
            wallet: state.id.clone(),
            expected_version: state.version,
            events: vec![WalletEvent::HoldCaptured(HoldCapturedPayload {
                wallet_id: state.id.clone(),
                hold_id,
                amount: captured,
                released,
                to_wallet_id: hold.to.clone(),
                new_balance: balance,
            })],
            balance,
            created: false,
        }];
        if let Some(target) = target {
            streams.push(credit(target, captured, |wallet_id, new_balance| {
                WalletEvent::TransferCredited(TransferPayload {
                    wallet_id,
                    transfer_id: hold_id,
                    from_wallet_id: state.id.clone(),
                    to_wallet_id: target.id.clone(),
                    amount: captured,
                    new_balance,
                })
            })?);
        }
        Ok(Decision { streams })
    }

    #[derive(Clone, Copy)]
    pub(super) enum Release {
        Void,
        Expire,
    }

    /// Gives a hold's money back to available: a void while it is active,
    /// an expiry once its time has passed.
    pub(super) fn release(
        state: &Wallet,
        hold_id: Uuid,
        now: DateTime<Utc>,
        how: Release,
    ) -> Result<StreamEvents, DomainError> {
        let hold = match how {
            Release::Void => active(state, hold_id, now)?,
            Release::Expire => match state.holds.get(&hold_id) {
                Some(hold) if now >= hold.expires_at => hold,
                _ => {
                    return Err(DomainError::HoldNotActive {
                        wallet: state.id.clone(),
                        hold: hold_id,
                        reason: "not expired, or already resolved".to_owned(),
                    })
                }
            },
        };
        let payload = HoldReleasedPayload {
            wallet_id: state.id.clone(),
            hold_id,
            amount: hold.amount,
            new_balance: state.balance,
        };
        let event = match how {
            Release::Void => WalletEvent::HoldVoided(payload),
            Release::Expire => WalletEvent::HoldExpired(payload),
        };
        Ok(StreamEvents {
            wallet: state.id.clone(),
            expected_version: state.version,
            events: vec![event],
            balance: state.balance,
            created: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> WalletId {
        WalletId::parse(s).unwrap()
    }
    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }
    fn apply(state: Wallet, d: &StreamEvents) -> Wallet {
        d.events.iter().fold(state, Wallet::evolve)
    }

    #[test]
    fn first_deposit_opens_the_wallet() {
        let w = Wallet::empty(id("a"));
        let d = decide(
            &Command::Deposit {
                wallet: id("a"),
                amount: amt("10"),
            },
            &[&w],
        )
        .unwrap();
        let s = &d.streams[0];
        assert!(s.created);
        assert_eq!(s.expected_version, 0);
        assert_eq!(s.events[0].event_type(), "WalletCreated");
        assert_eq!(s.events[1].event_type(), "FundsDeposited");
        let w = apply(w, s);
        assert_eq!((w.version, w.balance.to_string()), (2, "10.0000".into()));

        let d = decide(
            &Command::Deposit {
                wallet: id("a"),
                amount: amt("0.0001"),
            },
            &[&w],
        )
        .unwrap();
        assert!(!d.streams[0].created);
        assert_eq!(d.streams[0].events.len(), 1);
        assert_eq!(apply(w, &d.streams[0]).balance.to_string(), "10.0001");
    }

    #[test]
    fn withdraw_needs_an_existing_wallet_and_enough_funds() {
        let empty = Wallet::empty(id("a"));
        let cmd = |a| Command::Withdraw {
            wallet: id("a"),
            amount: amt(a),
        };
        assert!(matches!(
            decide(&cmd("1"), &[&empty]),
            Err(DomainError::WalletNotFound { .. })
        ));

        let d = decide(
            &Command::Deposit {
                wallet: id("a"),
                amount: amt("5"),
            },
            &[&empty],
        )
        .unwrap();
        let w = apply(empty, &d.streams[0]);
        assert!(matches!(
            decide(&cmd("5.0001"), &[&w]),
            Err(DomainError::InsufficientFunds { .. })
        ));
        let d = decide(&cmd("5"), &[&w]).unwrap();
        assert_eq!(apply(w, &d.streams[0]).balance, Balance::ZERO);
    }

    #[test]
    fn transfer_moves_money_between_two_streams_and_opens_the_target() {
        let a = Wallet::empty(id("a"));
        let d = decide(
            &Command::Deposit {
                wallet: id("a"),
                amount: amt("10"),
            },
            &[&a],
        )
        .unwrap();
        let a = apply(a, &d.streams[0]);
        let b = Wallet::empty(id("b"));
        let t = Command::Transfer {
            from: id("a"),
            to: id("b"),
            amount: amt("4"),
            transfer_id: Uuid::nil(),
        };
        let d = decide(&t, &[&a, &b]).unwrap();
        assert_eq!(d.streams.len(), 2);
        assert_eq!(d.streams[0].balance.to_string(), "6.0000");
        assert_eq!(d.streams[1].balance.to_string(), "4.0000");
        assert!(d.streams[1].created);
        assert_eq!(d.streams[0].events[0].transfer_id(), Some(Uuid::nil()));
        assert_eq!(d.streams[1].events[1].event_type(), "TransferCredited");
    }

    #[test]
    fn transfer_rules() {
        let a = Wallet::empty(id("a"));
        let b = Wallet::empty(id("b"));
        let same = Command::Transfer {
            from: id("a"),
            to: id("a"),
            amount: amt("1"),
            transfer_id: Uuid::nil(),
        };
        assert_eq!(decide(&same, &[&a, &a]), Err(DomainError::SameWallet));
        let t = Command::Transfer {
            from: id("a"),
            to: id("b"),
            amount: amt("1"),
            transfer_id: Uuid::nil(),
        };
        assert!(matches!(decide(&t, &[&a, &b]), Err(DomainError::WalletNotFound { .. })));
    }

    fn funded(name: &str, amount: &str) -> Wallet {
        let w = Wallet::empty(id(name));
        let d = decide(
            &Command::Deposit {
                wallet: id(name),
                amount: amt(amount),
            },
            &[&w],
        )
        .unwrap();
        apply(w, &d.streams[0])
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    fn place(w: &Wallet, hold: u128, amount: &str, to: Option<&str>) -> Result<Wallet, DomainError> {
        let d = decide(
            &Command::PlaceHold {
                wallet: w.id.clone(),
                hold_id: Uuid::from_u128(hold),
                amount: amt(amount),
                expires_at: at("2026-01-01T00:10:00Z"),
                to: to.map(id),
            },
            &[w],
        )?;
        Ok(apply(w.clone(), &d.streams[0]))
    }

    #[test]
    fn a_hold_reserves_available_money_and_keeps_the_balance() {
        let w = place(&funded("a", "100"), 1, "40", None).unwrap();
        assert_eq!(
            (w.balance.to_string(), w.available().to_string()),
            ("100.0000".into(), "60.0000".into())
        );
        let withdraw = |a| Command::Withdraw {
            wallet: id("a"),
            amount: amt(a),
        };
        assert!(matches!(
            decide(&withdraw("60.0001"), &[&w]),
            Err(DomainError::InsufficientFunds { .. })
        ));
        assert!(decide(&withdraw("60"), &[&w]).is_ok());
        assert!(matches!(
            place(&w, 2, "61", None),
            Err(DomainError::InsufficientFunds { .. })
        ));
        assert_eq!(place(&w, 2, "1", Some("a")), Err(DomainError::SameWallet));
    }

    #[test]
    fn a_capture_takes_part_and_releases_the_rest_once() {
        let w = place(&funded("a", "100"), 1, "40", Some("shop")).unwrap();
        let shop = Wallet::empty(id("shop"));
        let capture = |amount: Option<&str>, now| Command::CaptureHold {
            wallet: id("a"),
            hold_id: Uuid::from_u128(1),
            amount: amount.map(amt),
            to: Some(id("shop")),
            now: at(now),
        };
        assert!(matches!(
            decide(&capture(Some("40.0001"), "2026-01-01T00:00:00Z"), &[&w, &shop]),
            Err(DomainError::CaptureExceedsHold { .. })
        ));
        assert!(matches!(
            decide(&capture(None, "2026-01-01T00:10:00Z"), &[&w, &shop]),
            Err(DomainError::HoldNotActive { .. })
        ));
        let d = decide(&capture(Some("25"), "2026-01-01T00:00:00Z"), &[&w, &shop]).unwrap();
        let after = apply(w, &d.streams[0]);
        let shop = apply(shop, &d.streams[1]);
        assert_eq!(after.balance.to_string(), "75.0000");
        assert_eq!(after.available().to_string(), "75.0000", "the rest is released");
        assert_eq!(shop.balance.to_string(), "25.0000");
        assert_eq!(d.streams[1].events[1].transfer_id(), Some(Uuid::from_u128(1)));
        assert!(matches!(
            decide(&capture(None, "2026-01-01T00:00:00Z"), &[&after, &shop]),
            Err(DomainError::HoldNotActive { .. })
        ));
    }

    #[test]
    fn void_and_expiry_release_a_hold_and_exactly_one_resolution_wins() {
        let w = place(&funded("a", "10"), 7, "10", None).unwrap();
        let hold = Uuid::from_u128(7);
        let void = |now| Command::VoidHold {
            wallet: id("a"),
            hold_id: hold,
            now: at(now),
        };
        let expire = |now| Command::ExpireHold {
            wallet: id("a"),
            hold_id: hold,
            now: at(now),
        };
        assert!(decide(&expire("2026-01-01T00:09:59Z"), &[&w]).is_err(), "not due yet");
        assert!(
            decide(&void("2026-01-01T00:10:00Z"), &[&w]).is_err(),
            "expired holds are not voided"
        );
        let expired = apply(
            w.clone(),
            &decide(&expire("2026-01-01T00:10:00Z"), &[&w]).unwrap().streams[0],
        );
        assert_eq!(expired.available().to_string(), "10.0000");
        assert!(
            decide(&expire("2026-01-01T00:11:00Z"), &[&expired]).is_err(),
            "expires once"
        );
        let voided = apply(
            w.clone(),
            &decide(&void("2026-01-01T00:00:00Z"), &[&w]).unwrap().streams[0],
        );
        assert!(voided.holds.is_empty());
        assert!(
            decide(&expire("2026-01-01T00:11:00Z"), &[&voided]).is_err(),
            "a voided hold never expires"
        );
    }

    #[test]
    fn limits_bound_the_balance_and_the_available_money() {
        let w = funded("a", "100");
        let set = |min: &str, max: Option<&str>| Command::SetLimits {
            wallet: id("a"),
            min_balance: amt(min).as_balance(),
            max_balance: max.map(|m| amt(m).as_balance()),
        };
        assert!(matches!(
            decide(&set("10", Some("5")), &[&w]),
            Err(DomainError::InvalidLimits { .. })
        ));
        let w = apply(w.clone(), &decide(&set("10", Some("150")), &[&w]).unwrap().streams[0]);
        assert_eq!(w.balance.to_string(), "100.0000", "limits move no money");
        let deposit = |a| Command::Deposit {
            wallet: id("a"),
            amount: amt(a),
        };
        assert!(decide(&deposit("50"), &[&w]).is_ok());
        assert!(matches!(
            decide(&deposit("50.0001"), &[&w]),
            Err(DomainError::MaxBalanceExceeded { .. })
        ));
        let withdraw = Command::Withdraw {
            wallet: id("a"),
            amount: amt("90.0001"),
        };
        assert!(matches!(
            decide(&withdraw, &[&w]),
            Err(DomainError::MinBalanceBreached { .. })
        ));
        assert!(matches!(
            place(&w, 1, "90.0001", None),
            Err(DomainError::MinBalanceBreached { .. })
        ));
        assert!(place(&w, 1, "90", None).is_ok());
    }

    #[test]
    fn rejections_serialise_with_a_stable_code() {
        let e = DomainError::WalletNotFound { wallet: id("x") };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["code"], "WALLET_NOT_FOUND");
        assert_eq!(serde_json::from_value::<DomainError>(json).unwrap(), e);
    }
}
