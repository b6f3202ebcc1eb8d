//! `decide`: the wallet's rules, turning a command and the current states
//! into new events or a rejection.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::event::{CreatedPayload, FundsPayload, TransferPayload, WalletEvent};
use super::money::{Amount, Balance};
use super::state::Wallet;
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
}

impl Command {
    /// The wallets whose current state `decide` needs, in that order.
    pub fn wallets(&self) -> Vec<&WalletId> {
        match self {
            Command::Deposit { wallet, .. } | Command::Withdraw { wallet, .. } => vec![wallet],
            Command::Transfer { from, to, .. } => vec![from, to],
        }
    }
}

/// A rejection the rules decided. These are remembered for idempotent replay,
/// hence serialisable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DomainError {
    #[error("wallet {wallet} has balance {balance}, cannot take {requested}")]
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
    match command {
        Command::Deposit { wallet, amount } => {
            let state = state_of(wallets, 0, wallet);
            let credit = credit(state, *amount, |wallet_id, new_balance| {
                WalletEvent::FundsDeposited(FundsPayload {
                    wallet_id,
                    amount: *amount,
                    new_balance,
                })
            })?;
            Ok(Decision { streams: vec![credit] })
        }
        Command::Withdraw { wallet, amount } => {
            let state = state_of(wallets, 0, wallet);
            let debit = debit(state, *amount, |wallet_id, new_balance| {
                WalletEvent::FundsWithdrawn(FundsPayload {
                    wallet_id,
                    amount: *amount,
                    new_balance,
                })
            })?;
            Ok(Decision { streams: vec![debit] })
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
    }
}

fn state_of<'a>(wallets: &[&'a Wallet], index: usize, id: &WalletId) -> &'a Wallet {
    let state = wallets[index];
    assert_eq!(&state.id, id, "decide was given the wrong wallet state");
    state
}

fn credit(
    state: &Wallet,
    amount: Amount,
    event: impl FnOnce(WalletId, Balance) -> WalletEvent,
) -> Result<StreamEvents, DomainError> {
    let balance = state
        .balance
        .checked_add(amount)
        .ok_or_else(|| DomainError::BalanceLimit {
            wallet: state.id.clone(),
        })?;
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

fn debit(
    state: &Wallet,
    amount: Amount,
    event: impl FnOnce(WalletId, Balance) -> WalletEvent,
) -> Result<StreamEvents, DomainError> {
    if !state.exists() {
        return Err(DomainError::WalletNotFound {
            wallet: state.id.clone(),
        });
    }
    let balance = state
        .balance
        .checked_sub(amount)
        .ok_or_else(|| DomainError::InsufficientFunds {
            wallet: state.id.clone(),
            balance: state.balance,
            requested: amount,
        })?;
    Ok(StreamEvents {
        wallet: state.id.clone(),
        expected_version: state.version,
        events: vec![event(state.id.clone(), balance)],
        balance,
        created: false,
    })
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

    #[test]
    fn rejections_serialise_with_a_stable_code() {
        let e = DomainError::WalletNotFound { wallet: id("x") };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["code"], "WALLET_NOT_FOUND");
        assert_eq!(serde_json::from_value::<DomainError>(json).unwrap(), e);
    }
}
