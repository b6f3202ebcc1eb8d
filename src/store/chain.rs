//! The per-stream hash chain that makes edits to the log evident.
//!
//! `hash(n) = SHA-256(hash(n-1) | canonical(event n))`, with an empty
//! previous hash for version 1. The canonical encoding covers every stored
//! column but `position` (assigned by the database) and `hash` itself; JSON
//! is written with sorted keys, so it survives PostgreSQL's JSONB
//! re-ordering. Changing one byte of an event changes its hash and breaks
//! the link of the next event.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// What is hashed of one event.
pub struct Canonical<'a> {
    pub stream: &'a str,
    pub version: u64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub schema_version: i32,
    pub payload: &'a Value,
    pub metadata: &'a Value,
    pub recorded_at: DateTime<Utc>,
}

/// Hex SHA-256 linking `event` to `previous` (the stream's last hash, "" at version 1).
pub fn link(previous: &str, event: &Canonical<'_>) -> String {
    let mut h = Sha256::new();
    h.update(field(previous));
    h.update(body(event));
    h.update(field(&time(event.recorded_at)));
    hex::encode(h.finalize())
}

/// The encoded fields between the previous hash and the time, which are
/// known before the append lock is taken: PostgreSQL's append function
/// (migration 0006) gets them as bytes and adds the two ends itself.
pub fn body(event: &Canonical<'_>) -> Vec<u8> {
    // serde_json's Map is ordered by key: this is canonical JSON.
    body_with_json(event, &event.payload.to_string(), &event.metadata.to_string())
}

/// `body`, with the payload and metadata already serialised (the append
/// writes the same texts to the row: each is made once).
pub fn body_with_json(event: &Canonical<'_>, payload: &str, metadata: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * 7 + 96 + payload.len() + metadata.len());
    for value in [
        event.stream,
        &event.version.to_string(),
        &event.event_id.to_string(),
        event.event_type,
        &event.schema_version.to_string(),
        payload,
        metadata,
    ] {
        push_field(&mut out, value);
    }
    out
}

/// The time as hashed (and as the append function formats it).
pub fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Length-prefixed, so no two different events encode the same.
fn field(value: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    push_field(&mut out, value);
    out
}

fn push_field(out: &mut Vec<u8>, value: &str) {
    out.extend_from_slice(&(value.len() as u64).to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_change_changes_the_link() {
        let payload = serde_json::json!({"walletId": "w", "amount": "1.0000", "newBalance": "1.0000"});
        let meta = serde_json::json!({});
        let at = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let e = |payload: &'_ Value| {
            link(
                "",
                &Canonical {
                    stream: "w",
                    version: 2,
                    event_id: Uuid::nil(),
                    event_type: "FundsDeposited",
                    schema_version: 1,
                    payload,
                    metadata: &meta,
                    recorded_at: at,
                },
            )
        };
        let base = e(&payload);
        assert_eq!(base.len(), 64);
        assert_eq!(base, e(&payload), "deterministic");
        let edited = serde_json::json!({"walletId": "w", "amount": "2.0000", "newBalance": "1.0000"});
        assert_ne!(base, e(&edited));
        // Key order in the source does not matter.
        let reordered: Value =
            serde_json::from_str(r#"{"newBalance":"1.0000","amount":"1.0000","walletId":"w"}"#).unwrap();
        assert_eq!(base, e(&reordered));
    }
}
