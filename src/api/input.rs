//! Turning what a client sent into validated domain values, with a helpful
//! 400 for everything else: malformed JSON, unknown fields, wrong types, bad
//! ids, money that is not exact.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::problem::Problem;
use crate::aggregate::{Amount, AmountError, Balance, WalletId};

/// Longest accepted `requestId` / `Idempotency-Key`.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A JSON request body, parsed strictly (`deny_unknown_fields` on the types).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or("").trim();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UNSUPPORTED_MEDIA_TYPE",
                    "send the body with Content-Type: application/json",
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(body_rejection)?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| Problem::bad_request("INVALID_REQUEST", format!("invalid JSON body: {e}")))
    }
}

/// A JSON body that may be left out entirely (then `T::default()`).
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let empty = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
            || (req.headers().get(header::CONTENT_LENGTH).is_none()
                && req.headers().get(header::TRANSFER_ENCODING).is_none());
        if empty {
            return Ok(OptionalJsonBody(T::default()));
        }
        JsonBody::<T>::from_request(req, state)
            .await
            .map(|JsonBody(body)| OptionalJsonBody(body))
    }
}

fn body_rejection(e: BytesRejection) -> Problem {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            "request body is too large",
        )
    } else {
        Problem::bad_request("INVALID_REQUEST", format!("could not read the request body: {e}"))
    }
}

/// The `{id}` path segment, validated as a wallet id.
pub struct WalletPath(pub WalletId);

impl<S: Send + Sync> FromRequestParts<S> for WalletPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e: PathRejection| Problem::bad_request("INVALID_WALLET_ID", e.body_text()))?;
        parse_wallet_id(&raw).map(WalletPath)
    }
}

pub fn parse_wallet_id(raw: &str) -> Result<WalletId, Problem> {
    WalletId::parse(raw).map_err(|e| Problem::bad_request("INVALID_WALLET_ID", e.to_string()))
}

/// An amount exactly as written: a JSON number's own text or a string.
/// Never passes through f64.
pub fn parse_amount(raw: &RawValue) -> Result<Amount, Problem> {
    let text = raw.get();
    let parsed = if text.starts_with('"') {
        match serde_json::from_str::<String>(text) {
            Ok(s) => Amount::parse(&s),
            Err(_) => Err(AmountError::NotANumber),
        }
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Amount::parse(text)
    } else {
        Err(AmountError::NotANumber)
    };
    parsed.map_err(|e| Problem::bad_request("INVALID_AMOUNT", e.to_string()))
}

/// A limit: zero or a positive amount, written like an amount.
pub fn parse_balance(raw: &RawValue) -> Result<Balance, Problem> {
    let text = raw.get().trim_matches('"');
    let (int, frac) = text.split_once('.').unwrap_or((text, "0"));
    let zero = |s: &str| !s.is_empty() && s.bytes().all(|b| b == b'0');
    if zero(int) && zero(frac) && frac.len() <= 4 {
        return Ok(Balance::ZERO);
    }
    parse_amount(raw).map(Amount::as_balance)
}

/// The idempotency key: `requestId` in the body or the `Idempotency-Key`
/// header (they must agree if both are sent).
pub fn idempotency_key(body: Option<String>, headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let header = match headers.get("idempotency-key") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| bad_key("Idempotency-Key must be visible ASCII"))?
                .to_owned(),
        ),
        None => None,
    };
    let key = match (body, header) {
        (Some(b), Some(h)) if b != h => {
            return Err(bad_key("requestId and the Idempotency-Key header differ"));
        }
        (Some(k), _) | (None, Some(k)) => Some(k),
        (None, None) => None,
    };
    if let Some(k) = &key {
        let ok = (1..=MAX_REQUEST_ID_LEN).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(bad_key("requestId must be 1-128 visible ASCII characters"));
        }
    }
    Ok(key)
}

fn bad_key(detail: &str) -> Problem {
    Problem::bad_request("INVALID_REQUEST_ID", detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
    }

    #[test]
    fn amounts_are_read_from_their_exact_text() {
        assert_eq!(parse_amount(&raw("0.0001")).unwrap().to_string(), "0.0001");
        assert_eq!(parse_amount(&raw("\"150.5\"")).unwrap().to_string(), "150.5000");
        assert_eq!(parse_amount(&raw("0.00005")).unwrap_err().code, "INVALID_AMOUNT");
        for bad in ["1e3", "true", "null", "{}", "[]", "\"NaN\"", "-0", "\"\""] {
            assert_eq!(parse_amount(&raw(bad)).unwrap_err().code, "INVALID_AMOUNT", "{bad}");
        }
    }

    #[test]
    fn keys_from_body_or_header_must_agree() {
        let mut h = HeaderMap::new();
        assert_eq!(idempotency_key(None, &h).unwrap(), None);
        h.insert("idempotency-key", "k1".parse().unwrap());
        assert_eq!(idempotency_key(None, &h).unwrap().as_deref(), Some("k1"));
        assert_eq!(idempotency_key(Some("k1".into()), &h).unwrap().as_deref(), Some("k1"));
        assert!(idempotency_key(Some("k2".into()), &h).is_err());
        assert!(idempotency_key(Some("x".repeat(129)), &HeaderMap::new()).is_err());
        assert!(idempotency_key(Some(String::new()), &HeaderMap::new()).is_err());
    }
}
