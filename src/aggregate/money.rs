//! Money: exact decimals with at most four places, never floats.
//!
//! `Amount` is what a client asks to move (validated: > 0, <= 4 decimals,
//! < 10^15). `Balance` is what a wallet holds (>= 0). Both print with exactly
//! four decimals ("150.5000"), the wire format of every response and event.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Decimal places money carries everywhere.
pub const MONEY_SCALE: u32 = 4;
/// Amounts must be strictly below this (10^15).
pub const MAX_AMOUNT_EXCLUSIVE: i64 = 1_000_000_000_000_000;
/// Longest amount text we even try to parse; longer is rejected up front so a
/// hostile 10 MB number costs nothing.
const MAX_AMOUNT_TEXT: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a decimal number such as 10 or \"10.25\"")]
    NotANumber,
    #[error("amount must be greater than 0")]
    NotPositive,
    #[error("amount has more than 4 decimal places")]
    TooPrecise,
    #[error("amount must be less than 1000000000000000")]
    TooLarge,
}

/// A validated, positive amount of money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Amount(Decimal);

impl Amount {
    /// The same money as a balance.
    pub fn as_balance(self) -> Balance {
        Balance(self.0)
    }

    /// Parses decimal text exactly: digits with an optional fraction, an
    /// optional leading sign. No exponents, no NaN/Infinity, no rounding.
    pub fn parse(text: &str) -> Result<Self, AmountError> {
        let value = parse_plain_decimal(text)?;
        Self::new(value)
    }

    pub fn new(value: Decimal) -> Result<Self, AmountError> {
        let value = value.normalize();
        if value <= Decimal::ZERO {
            return Err(AmountError::NotPositive);
        }
        if value.scale() > MONEY_SCALE {
            return Err(AmountError::TooPrecise);
        }
        if value >= Decimal::from(MAX_AMOUNT_EXCLUSIVE) {
            return Err(AmountError::TooLarge);
        }
        Ok(Self(with_money_scale(value)))
    }

    pub fn value(self) -> Decimal {
        self.0
    }
}

/// Strict grammar: `-?[0-9]+(\.[0-9]+)?`. rust_decimal alone would accept
/// things like "1_000" or "1e3" in some paths; money input must be plain.
fn parse_plain_decimal(text: &str) -> Result<Decimal, AmountError> {
    if text.is_empty() || text.len() > MAX_AMOUNT_TEXT {
        return Err(AmountError::NotANumber);
    }
    let digits = text.strip_prefix('-').unwrap_or(text);
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(AmountError::NotANumber);
    }
    // Too many significant digits for a Decimal means far too large or too
    // precise for money either way.
    let value = Decimal::from_str_exact(text).map_err(|_| {
        if int.trim_start_matches('0').len() > 15 {
            AmountError::TooLarge
        } else {
            AmountError::TooPrecise
        }
    })?;
    Ok(value)
}

fn with_money_scale(mut value: Decimal) -> Decimal {
    value.rescale(MONEY_SCALE);
    value
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.4}", self.0)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Amount::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What a wallet holds. Never negative once decided; kept as a plain decimal
/// at money scale so folds are exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Balance(Decimal);

impl Balance {
    pub const ZERO: Balance = Balance(Decimal::ZERO);

    pub fn value(self) -> Decimal {
        self.0
    }

    pub fn checked_add(self, amount: Amount) -> Option<Balance> {
        self.0.checked_add(amount.0).map(|v| Balance(with_money_scale(v)))
    }

    /// `None` when the result would be negative.
    pub fn checked_sub(self, amount: Amount) -> Option<Balance> {
        let v = self.0.checked_sub(amount.0)?;
        (v >= Decimal::ZERO).then(|| Balance(with_money_scale(v)))
    }

    /// `self - other`, or zero if `other` is larger.
    pub fn saturating_sub(self, other: Balance) -> Balance {
        Balance(with_money_scale((self.0 - other.0).max(Decimal::ZERO)))
    }

    /// `self - amount`, or zero if `amount` is larger (a fold never fails;
    /// `verify` reports what does not add up).
    pub fn saturating_sub_amount(self, amount: Amount) -> Balance {
        Balance(with_money_scale((self.0 - amount.0).max(Decimal::ZERO)))
    }

    /// `self + amount`, capped at the largest decimal (a fold never fails).
    pub fn saturating_add(self, amount: Amount) -> Balance {
        Balance(with_money_scale(self.0.saturating_add(amount.0)))
    }

    /// This balance as an amount, `None` when zero.
    pub fn as_amount(self) -> Option<Amount> {
        Amount::new(self.0).ok()
    }

    pub fn from_decimal(value: Decimal) -> Option<Balance> {
        (value >= Decimal::ZERO && value.normalize().scale() <= MONEY_SCALE).then(|| Balance(with_money_scale(value)))
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.4}", self.0)
    }
}

impl Serialize for Balance {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let value = Decimal::from_str(&text).map_err(serde::de::Error::custom)?;
        Balance::from_decimal(value)
            .ok_or_else(|| serde::de::Error::custom("balance must be >= 0 with at most 4 decimals"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly_and_prints_four_decimals() {
        assert_eq!(Amount::parse("150.5").unwrap().to_string(), "150.5000");
        assert_eq!(Amount::parse("0.0001").unwrap().to_string(), "0.0001");
        assert_eq!(Amount::parse("1.00000").unwrap().to_string(), "1.0000");
        assert_eq!(
            Amount::parse("999999999999999.9999").unwrap().to_string(),
            "999999999999999.9999"
        );
    }

    #[test]
    fn rejects_what_is_not_money() {
        assert_eq!(Amount::parse("0.00005"), Err(AmountError::TooPrecise));
        assert_eq!(Amount::parse("0"), Err(AmountError::NotPositive));
        assert_eq!(Amount::parse("-0"), Err(AmountError::NotPositive));
        assert_eq!(Amount::parse("-5"), Err(AmountError::NotPositive));
        assert_eq!(Amount::parse("1000000000000000"), Err(AmountError::TooLarge));
        assert_eq!(
            Amount::parse("99999999999999999999999999999999"),
            Err(AmountError::TooLarge)
        );
        for bad in [
            "", "1e3", "NaN", "Infinity", "1.", ".5", "1_000", "+1", " 1", "0x10", "1.2.3",
        ] {
            assert_eq!(Amount::parse(bad), Err(AmountError::NotANumber), "{bad:?}");
        }
        assert_eq!(Amount::parse(&"9".repeat(10_000)), Err(AmountError::NotANumber));
    }

    #[test]
    fn balance_never_goes_negative() {
        let b = Balance::ZERO.checked_add(Amount::parse("10").unwrap()).unwrap();
        assert_eq!(b.checked_sub(Amount::parse("10.0001").unwrap()), None);
        assert_eq!(b.checked_sub(Amount::parse("10").unwrap()).unwrap(), Balance::ZERO);
    }
}
