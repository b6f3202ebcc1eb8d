//! The wallet's events and their stored JSON form.
//!
//! Each event is stored as (`event_type`, `schema_version`, `payload`). The
//! payload carries `walletId`, and for money movements `amount` and
//! `newBalance` as 4-decimal strings. Older schema versions are upcast here,
//! on read, so the rest of the code only ever sees the current shape.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::money::{Amount, Balance};
use super::wallet_id::WalletId;

/// Schema version written for every event type today.
pub const EVENT_SCHEMA_VERSION: i32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreatedPayload {
    pub wallet_id: WalletId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FundsPayload {
    pub wallet_id: WalletId,
    pub amount: Amount,
    pub new_balance: Balance,
}

/// Shared by both halves of a transfer; `wallet_id` is the stream it is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransferPayload {
    pub wallet_id: WalletId,
    pub transfer_id: Uuid,
    pub from_wallet_id: WalletId,
    pub to_wallet_id: WalletId,
    pub amount: Amount,
    pub new_balance: Balance,
}

/// A hold placed: `amount` moves from available to held; the balance stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HoldPlacedPayload {
    pub wallet_id: WalletId,
    pub hold_id: Uuid,
    pub amount: Amount,
    pub expires_at: DateTime<Utc>,
    /// Where a capture pays to; absent: out of the system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_wallet_id: Option<WalletId>,
    pub new_balance: Balance,
}

/// A hold captured: `amount` leaves the wallet (into `toWalletId` if the
/// hold named one, as that stream's `TransferCredited` with the hold's id as
/// its transfer id); `released` goes back to available.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HoldCapturedPayload {
    pub wallet_id: WalletId,
    pub hold_id: Uuid,
    pub amount: Amount,
    pub released: Balance,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_wallet_id: Option<WalletId>,
    pub new_balance: Balance,
}

/// A hold voided or expired: all of `amount` goes back to available.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HoldReleasedPayload {
    pub wallet_id: WalletId,
    pub hold_id: Uuid,
    pub amount: Amount,
    pub new_balance: Balance,
}

/// The wallet's limits from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsPayload {
    pub wallet_id: WalletId,
    pub min_balance: Balance,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_balance: Option<Balance>,
    pub new_balance: Balance,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalletEvent {
    /// The first credit of a new wallet opens it; balance starts at zero.
    WalletCreated(CreatedPayload),
    FundsDeposited(FundsPayload),
    FundsWithdrawn(FundsPayload),
    TransferDebited(TransferPayload),
    TransferCredited(TransferPayload),
    HoldPlaced(HoldPlacedPayload),
    HoldCaptured(HoldCapturedPayload),
    HoldVoided(HoldReleasedPayload),
    HoldExpired(HoldReleasedPayload),
    WalletLimitsChanged(LimitsPayload),
}

/// Every event type, as stored.
pub const EVENT_TYPES: [&str; 10] = [
    "WalletCreated",
    "FundsDeposited",
    "FundsWithdrawn",
    "TransferDebited",
    "TransferCredited",
    "HoldPlaced",
    "HoldCaptured",
    "HoldVoided",
    "HoldExpired",
    "WalletLimitsChanged",
];

#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("unsupported schema version {version} for {event_type}")]
    UnknownSchemaVersion { event_type: String, version: i32 },
    #[error("bad payload for {event_type}: {source}")]
    Payload {
        event_type: String,
        source: serde_json::Error,
    },
}

impl WalletEvent {
    pub fn event_type(&self) -> &'static str {
        match self {
            WalletEvent::WalletCreated(_) => "WalletCreated",
            WalletEvent::FundsDeposited(_) => "FundsDeposited",
            WalletEvent::FundsWithdrawn(_) => "FundsWithdrawn",
            WalletEvent::TransferDebited(_) => "TransferDebited",
            WalletEvent::TransferCredited(_) => "TransferCredited",
            WalletEvent::HoldPlaced(_) => "HoldPlaced",
            WalletEvent::HoldCaptured(_) => "HoldCaptured",
            WalletEvent::HoldVoided(_) => "HoldVoided",
            WalletEvent::HoldExpired(_) => "HoldExpired",
            WalletEvent::WalletLimitsChanged(_) => "WalletLimitsChanged",
        }
    }

    pub fn wallet_id(&self) -> &WalletId {
        match self {
            WalletEvent::WalletCreated(p) => &p.wallet_id,
            WalletEvent::FundsDeposited(p) | WalletEvent::FundsWithdrawn(p) => &p.wallet_id,
            WalletEvent::TransferDebited(p) | WalletEvent::TransferCredited(p) => &p.wallet_id,
            WalletEvent::HoldPlaced(p) => &p.wallet_id,
            WalletEvent::HoldCaptured(p) => &p.wallet_id,
            WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => &p.wallet_id,
            WalletEvent::WalletLimitsChanged(p) => &p.wallet_id,
        }
    }

    /// The wallet's balance right after this event.
    pub fn balance_after(&self) -> Balance {
        match self {
            WalletEvent::WalletCreated(_) => Balance::ZERO,
            WalletEvent::FundsDeposited(p) | WalletEvent::FundsWithdrawn(p) => p.new_balance,
            WalletEvent::TransferDebited(p) | WalletEvent::TransferCredited(p) => p.new_balance,
            WalletEvent::HoldPlaced(p) => p.new_balance,
            WalletEvent::HoldCaptured(p) => p.new_balance,
            WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => p.new_balance,
            WalletEvent::WalletLimitsChanged(p) => p.new_balance,
        }
    }

    /// The money this event names: moved, held or released (none for
    /// `WalletCreated` and `WalletLimitsChanged`).
    pub fn amount(&self) -> Option<Amount> {
        match self {
            WalletEvent::WalletCreated(_) | WalletEvent::WalletLimitsChanged(_) => None,
            WalletEvent::FundsDeposited(p) | WalletEvent::FundsWithdrawn(p) => Some(p.amount),
            WalletEvent::TransferDebited(p) | WalletEvent::TransferCredited(p) => Some(p.amount),
            WalletEvent::HoldPlaced(p) => Some(p.amount),
            WalletEvent::HoldCaptured(p) => Some(p.amount),
            WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => Some(p.amount),
        }
    }

    /// How this event changes the balance: `Some((amount, true))` takes
    /// money out, `Some((amount, false))` brings it in, `None` leaves the
    /// balance as it was (holds placed or released, limits, creation).
    pub fn balance_change(&self) -> Option<(Amount, bool)> {
        match self {
            WalletEvent::FundsDeposited(p) => Some((p.amount, false)),
            WalletEvent::TransferCredited(p) => Some((p.amount, false)),
            WalletEvent::FundsWithdrawn(p) => Some((p.amount, true)),
            WalletEvent::TransferDebited(p) => Some((p.amount, true)),
            WalletEvent::HoldCaptured(p) => Some((p.amount, true)),
            _ => None,
        }
    }

    /// Whether this event takes money out of its wallet (a capture does).
    pub fn is_debit(&self) -> bool {
        matches!(self.balance_change(), Some((_, true)))
    }

    /// The transfer this event is half of. A capture into another wallet is
    /// a transfer whose id is the hold's.
    pub fn transfer_id(&self) -> Option<Uuid> {
        match self {
            WalletEvent::TransferDebited(p) | WalletEvent::TransferCredited(p) => Some(p.transfer_id),
            WalletEvent::HoldCaptured(p) if p.to_wallet_id.is_some() => Some(p.hold_id),
            _ => None,
        }
    }

    /// The hold this event places or resolves.
    pub fn hold_id(&self) -> Option<Uuid> {
        match self {
            WalletEvent::HoldPlaced(p) => Some(p.hold_id),
            WalletEvent::HoldCaptured(p) => Some(p.hold_id),
            WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => Some(p.hold_id),
            _ => None,
        }
    }

    pub fn payload(&self) -> serde_json::Value {
        let value = match self {
            WalletEvent::WalletCreated(p) => serde_json::to_value(p),
            WalletEvent::FundsDeposited(p) | WalletEvent::FundsWithdrawn(p) => serde_json::to_value(p),
            WalletEvent::TransferDebited(p) | WalletEvent::TransferCredited(p) => serde_json::to_value(p),
            WalletEvent::HoldPlaced(p) => serde_json::to_value(p),
            WalletEvent::HoldCaptured(p) => serde_json::to_value(p),
            WalletEvent::HoldVoided(p) | WalletEvent::HoldExpired(p) => serde_json::to_value(p),
            WalletEvent::WalletLimitsChanged(p) => serde_json::to_value(p),
        };
        // Plain structs of strings: serialisation cannot fail.
        value.expect("event payloads always serialise")
    }

    /// Decodes a stored event from its JSON text straight into the typed
    /// payload (no intermediate `Value`: this is the hot path of every load).
    pub fn decode_text(event_type: &str, schema_version: i32, payload: &str) -> Result<Self, EventDecodeError> {
        if schema_version != EVENT_SCHEMA_VERSION {
            // Older versions take the general path, which upcasts.
            let value = serde_json::from_str(payload).map_err(|source| EventDecodeError::Payload {
                event_type: event_type.to_owned(),
                source,
            })?;
            return Self::decode(event_type, schema_version, value);
        }
        let bad = |source| EventDecodeError::Payload {
            event_type: event_type.to_owned(),
            source,
        };
        Ok(match event_type {
            "WalletCreated" => WalletEvent::WalletCreated(serde_json::from_str(payload).map_err(bad)?),
            "FundsDeposited" => WalletEvent::FundsDeposited(serde_json::from_str(payload).map_err(bad)?),
            "FundsWithdrawn" => WalletEvent::FundsWithdrawn(serde_json::from_str(payload).map_err(bad)?),
            "TransferDebited" => WalletEvent::TransferDebited(serde_json::from_str(payload).map_err(bad)?),
            "TransferCredited" => WalletEvent::TransferCredited(serde_json::from_str(payload).map_err(bad)?),
            "HoldPlaced" => WalletEvent::HoldPlaced(serde_json::from_str(payload).map_err(bad)?),
            "HoldCaptured" => WalletEvent::HoldCaptured(serde_json::from_str(payload).map_err(bad)?),
            "HoldVoided" => WalletEvent::HoldVoided(serde_json::from_str(payload).map_err(bad)?),
            "HoldExpired" => WalletEvent::HoldExpired(serde_json::from_str(payload).map_err(bad)?),
            "WalletLimitsChanged" => WalletEvent::WalletLimitsChanged(serde_json::from_str(payload).map_err(bad)?),
            other => return Err(EventDecodeError::UnknownType(other.to_owned())),
        })
    }

    /// Decodes a stored event, upcasting older schema versions.
    pub fn decode(event_type: &str, schema_version: i32, payload: serde_json::Value) -> Result<Self, EventDecodeError> {
        if schema_version != EVENT_SCHEMA_VERSION {
            // Version 1 is the only one so far; a future v2 adds an upcast
            // step here that rewrites `payload` from the old shape.
            return Err(EventDecodeError::UnknownSchemaVersion {
                event_type: event_type.to_owned(),
                version: schema_version,
            });
        }
        let bad = |source| EventDecodeError::Payload {
            event_type: event_type.to_owned(),
            source,
        };
        Ok(match event_type {
            "WalletCreated" => WalletEvent::WalletCreated(serde_json::from_value(payload).map_err(bad)?),
            "FundsDeposited" => WalletEvent::FundsDeposited(serde_json::from_value(payload).map_err(bad)?),
            "FundsWithdrawn" => WalletEvent::FundsWithdrawn(serde_json::from_value(payload).map_err(bad)?),
            "TransferDebited" => WalletEvent::TransferDebited(serde_json::from_value(payload).map_err(bad)?),
            "TransferCredited" => WalletEvent::TransferCredited(serde_json::from_value(payload).map_err(bad)?),
            "HoldPlaced" => WalletEvent::HoldPlaced(serde_json::from_value(payload).map_err(bad)?),
            "HoldCaptured" => WalletEvent::HoldCaptured(serde_json::from_value(payload).map_err(bad)?),
            "HoldVoided" => WalletEvent::HoldVoided(serde_json::from_value(payload).map_err(bad)?),
            "HoldExpired" => WalletEvent::HoldExpired(serde_json::from_value(payload).map_err(bad)?),
            "WalletLimitsChanged" => WalletEvent::WalletLimitsChanged(serde_json::from_value(payload).map_err(bad)?),
            other => return Err(EventDecodeError::UnknownType(other.to_owned())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_round_trips_through_its_stored_json() {
        let w = WalletId::parse("w1").unwrap();
        let v = WalletId::parse("w2").unwrap();
        let amount = Amount::parse("12.5").unwrap();
        let bal = Balance::ZERO.checked_add(amount).unwrap();
        let events = [
            WalletEvent::WalletCreated(CreatedPayload { wallet_id: w.clone() }),
            WalletEvent::FundsDeposited(FundsPayload {
                wallet_id: w.clone(),
                amount,
                new_balance: bal,
            }),
            WalletEvent::FundsWithdrawn(FundsPayload {
                wallet_id: w.clone(),
                amount,
                new_balance: Balance::ZERO,
            }),
            WalletEvent::TransferDebited(TransferPayload {
                wallet_id: w.clone(),
                transfer_id: Uuid::nil(),
                from_wallet_id: w.clone(),
                to_wallet_id: v.clone(),
                amount,
                new_balance: Balance::ZERO,
            }),
            WalletEvent::TransferCredited(TransferPayload {
                wallet_id: v.clone(),
                transfer_id: Uuid::nil(),
                from_wallet_id: w,
                to_wallet_id: v,
                amount,
                new_balance: bal,
            }),
        ];
        for e in events {
            let back = WalletEvent::decode(e.event_type(), EVENT_SCHEMA_VERSION, e.payload()).unwrap();
            assert_eq!(back, e);
            let text = e.payload().to_string();
            assert_eq!(
                WalletEvent::decode_text(e.event_type(), EVENT_SCHEMA_VERSION, &text).unwrap(),
                e
            );
        }
    }

    #[test]
    fn payload_carries_money_as_four_decimal_strings() {
        let e = WalletEvent::FundsDeposited(FundsPayload {
            wallet_id: WalletId::parse("w").unwrap(),
            amount: Amount::parse("150.5").unwrap(),
            new_balance: Balance::ZERO.checked_add(Amount::parse("150.5").unwrap()).unwrap(),
        });
        assert_eq!(
            e.payload(),
            serde_json::json!({"walletId": "w", "amount": "150.5000", "newBalance": "150.5000"})
        );
    }

    #[test]
    fn unknown_types_and_versions_are_errors_not_panics() {
        assert!(WalletEvent::decode("Nope", 1, serde_json::json!({})).is_err());
        assert!(WalletEvent::decode("WalletCreated", 99, serde_json::json!({"walletId": "w"})).is_err());
        assert!(WalletEvent::decode("FundsDeposited", 1, serde_json::json!({"walletId": "w"})).is_err());
    }
}
