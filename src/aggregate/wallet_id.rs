//! Wallet ids: 1-128 characters of `A-Z a-z 0-9 . _ : -`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

pub const MAX_WALLET_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("wallet id must be 1-128 characters of A-Z a-z 0-9 . _ : -")]
pub struct WalletIdError;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct WalletId(String);

impl WalletId {
    pub fn parse(text: &str) -> Result<Self, WalletIdError> {
        let ok = (1..=MAX_WALLET_ID_LEN).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(WalletIdError)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for WalletId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WalletId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        WalletId::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet_and_length() {
        assert!(WalletId::parse("alice").is_ok());
        assert!(WalletId::parse("A-z.0_9:x").is_ok());
        assert!(WalletId::parse(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn rejects_everything_else() {
        for bad in ["", "a b", "a/b", "é", "a\0", "a%20"] {
            assert!(WalletId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(WalletId::parse(&"a".repeat(129)).is_err());
    }
}
