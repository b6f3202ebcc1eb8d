//! A reference model of the wallet rules, written from the brief (not from
//! `src/aggregate`): balances in a map of `rust_decimal`s, the money grammar,
//! and idempotency (same key + same operation + same payload replays the
//! remembered outcome, a different one under a known key is
//! `IDEMPOTENCY_KEY_REUSED`, keys are scoped to the wallet in the path, and
//! decided rejections are remembered too).
//!
//! Wallets are plain names here; the property tests map them to real ids.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;

/// Money carries at most this many decimal places.
pub const SCALE: u32 = 4;
/// An amount must be below 10^15 (this many integer digits at most).
pub const MAX_INT_DIGITS: usize = 15;

/// Why an amount's text is not money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadAmount {
    NotANumber,
    NotPositive,
    TooPrecise,
    TooLarge,
}

/// Reads money text by hand: `-?[0-9]+(\.[0-9]+)?`, value > 0, at most four
/// decimals once trailing zeros are ignored (`1.00000` is 1), below 10^15.
/// Precedence when several rules fail: not positive, then too precise, then
/// too large.
pub fn parse_amount(text: &str) -> Result<Decimal, BadAmount> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let is_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !is_digits(int) || (digits.contains('.') && !is_digits(frac)) {
        return Err(BadAmount::NotANumber);
    }
    let int = int.trim_start_matches('0');
    let frac = frac.trim_end_matches('0');
    if int.is_empty() && frac.is_empty() || negative {
        return Err(BadAmount::NotPositive);
    }
    if frac.len() > SCALE as usize {
        return Err(BadAmount::TooPrecise);
    }
    if int.len() > MAX_INT_DIGITS {
        return Err(BadAmount::TooLarge);
    }
    let mantissa: i128 = format!("{int}{frac}").parse().unwrap_or(0);
    Ok(Decimal::from_i128_with_scale(mantissa, frac.len() as u32))
}

/// Money as every response prints it: exactly four decimals.
pub fn money(value: Decimal) -> String {
    let mut v = value;
    v.rescale(SCALE);
    v.to_string()
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Cmd {
    Deposit { wallet: String, amount: Decimal },
    Withdraw { wallet: String, amount: Decimal },
    Transfer { from: String, to: String, amount: Decimal },
}

impl Cmd {
    /// The wallet in the path: the scope of the idempotency key.
    pub fn scope(&self) -> &str {
        match self {
            Cmd::Deposit { wallet, .. } | Cmd::Withdraw { wallet, .. } => wallet,
            Cmd::Transfer { from, .. } => from,
        }
    }

    pub fn amount(&self) -> Decimal {
        match self {
            Cmd::Deposit { amount, .. } | Cmd::Withdraw { amount, .. } | Cmd::Transfer { amount, .. } => *amount,
        }
    }

    /// Operation and payload, by value: `1` and `1.0000` are the same payload.
    fn fingerprint(&self) -> (u8, String, Decimal) {
        match self {
            Cmd::Deposit { amount, .. } => (0, String::new(), amount.normalize()),
            Cmd::Withdraw { amount, .. } => (1, String::new(), amount.normalize()),
            Cmd::Transfer { to, amount, .. } => (2, to.clone(), amount.normalize()),
        }
    }
}

/// A rejection decided by the rules (remembered under an idempotency key).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Rejection {
    InsufficientFunds {
        wallet: String,
        balance: Decimal,
        requested: Decimal,
    },
    WalletNotFound {
        wallet: String,
    },
    SameWallet,
}

/// What a command decided.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// A deposit or withdrawal: the balance right after it, and whether it
    /// opened the wallet.
    Wallet {
        balance: Decimal,
        created: bool,
    },
    /// A transfer: both balances right after it, and whether it opened the
    /// receiving wallet.
    Transfer {
        from_balance: Decimal,
        to_balance: Decimal,
        to_created: bool,
    },
    Rejected(Rejection),
}

impl Outcome {
    pub fn accepted(&self) -> bool {
        !matches!(self, Outcome::Rejected(_))
    }
}

/// What a client is answered.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Reply {
    /// Decided now (and remembered if the request had a key).
    Fresh(Outcome),
    /// The remembered outcome of an identical earlier request; nothing changed.
    Replayed(Outcome),
    /// The key is known on this wallet for a different operation or payload.
    KeyReused,
}

#[derive(Clone, Debug, Default)]
pub struct Model {
    /// Existing wallets and their balances (absent: never opened).
    pub balances: BTreeMap<String, Decimal>,
    /// (wallet in the path, key) -> (fingerprint, outcome).
    keys: HashMap<(String, String), ((u8, String, Decimal), Outcome)>,
    pub deposited: Decimal,
    pub withdrawn: Decimal,
}

impl Model {
    pub fn balance(&self, wallet: &str) -> Option<Decimal> {
        self.balances.get(wallet).copied()
    }

    pub fn total(&self) -> Decimal {
        self.balances.values().copied().sum()
    }

    /// Handles a request: idempotency first, then the rules.
    pub fn handle(&mut self, cmd: &Cmd, key: Option<&str>) -> Reply {
        let Some(key) = key else {
            return Reply::Fresh(self.decide(cmd));
        };
        let slot = (cmd.scope().to_owned(), key.to_owned());
        if let Some((fingerprint, outcome)) = self.keys.get(&slot) {
            return if *fingerprint == cmd.fingerprint() {
                Reply::Replayed(outcome.clone())
            } else {
                Reply::KeyReused
            };
        }
        let outcome = self.decide(cmd);
        self.keys.insert(slot, (cmd.fingerprint(), outcome.clone()));
        Reply::Fresh(outcome)
    }

    /// The rules, without idempotency; applies the effect if accepted.
    pub fn decide(&mut self, cmd: &Cmd) -> Outcome {
        match cmd {
            Cmd::Deposit { wallet, amount } => {
                let created = !self.balances.contains_key(wallet);
                let balance = self.balances.entry(wallet.clone()).or_default();
                *balance += *amount;
                self.deposited += *amount;
                Outcome::Wallet {
                    balance: *balance,
                    created,
                }
            }
            Cmd::Withdraw { wallet, amount } => match self.take(wallet, *amount) {
                Ok(balance) => {
                    self.withdrawn += *amount;
                    Outcome::Wallet {
                        balance,
                        created: false,
                    }
                }
                Err(r) => Outcome::Rejected(r),
            },
            Cmd::Transfer { from, to, amount } => {
                if from == to {
                    return Outcome::Rejected(Rejection::SameWallet);
                }
                match self.take(from, *amount) {
                    Ok(from_balance) => {
                        let to_created = !self.balances.contains_key(to);
                        let to_balance = self.balances.entry(to.clone()).or_default();
                        *to_balance += *amount;
                        Outcome::Transfer {
                            from_balance,
                            to_balance: *to_balance,
                            to_created,
                        }
                    }
                    Err(r) => Outcome::Rejected(r),
                }
            }
        }
    }

    fn take(&mut self, wallet: &str, amount: Decimal) -> Result<Decimal, Rejection> {
        let Some(balance) = self.balances.get_mut(wallet) else {
            return Err(Rejection::WalletNotFound {
                wallet: wallet.to_owned(),
            });
        };
        if *balance < amount {
            return Err(Rejection::InsufficientFunds {
                wallet: wallet.to_owned(),
                balance: *balance,
                requested: amount,
            });
        }
        *balance -= amount;
        Ok(*balance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn the_model_reads_money_like_the_brief() {
        assert_eq!(parse_amount("150.5"), Ok(d("150.5")));
        assert_eq!(parse_amount("1.00000"), Ok(d("1")));
        assert_eq!(parse_amount("0.00005"), Err(BadAmount::TooPrecise));
        assert_eq!(parse_amount("0.0000"), Err(BadAmount::NotPositive));
        assert_eq!(parse_amount("-1"), Err(BadAmount::NotPositive));
        assert_eq!(parse_amount("1000000000000000"), Err(BadAmount::TooLarge));
        assert_eq!(parse_amount("999999999999999.9999"), Ok(d("999999999999999.9999")));
        for bad in ["", "1e3", ".5", "1.", "+1", "NaN", " 1"] {
            assert_eq!(parse_amount(bad), Err(BadAmount::NotANumber), "{bad:?}");
        }
        assert_eq!(money(d("150.5")), "150.5000");
    }

    #[test]
    fn the_model_remembers_keys_per_wallet() {
        let mut m = Model::default();
        let dep = |w: &str, a: &str| Cmd::Deposit {
            wallet: w.into(),
            amount: d(a),
        };
        let wd = |w: &str, a: &str| Cmd::Withdraw {
            wallet: w.into(),
            amount: d(a),
        };
        assert!(matches!(
            m.handle(&wd("a", "1"), Some("k")),
            Reply::Fresh(Outcome::Rejected(_))
        ));
        m.handle(&dep("a", "5"), None);
        // The remembered rejection is replayed although the wallet now has funds.
        assert!(matches!(
            m.handle(&wd("a", "1"), Some("k")),
            Reply::Replayed(Outcome::Rejected(_))
        ));
        assert_eq!(m.handle(&dep("a", "1"), Some("k")), Reply::KeyReused);
        assert!(matches!(m.handle(&dep("b", "1"), Some("k")), Reply::Fresh(_)));
        assert!(matches!(m.handle(&dep("b", "1.000"), Some("k")), Reply::Replayed(_)));
        assert_eq!(m.total(), d("6"));
    }
}
