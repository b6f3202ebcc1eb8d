//! The hold and limit routes: place, capture and void a hold; set a
//! wallet's limits. Listing holds is a read model (`read_models.rs`); expiry
//! is the service's own (`expiry.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use axum::response::Response;
use chrono::{DurationRound, TimeDelta, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::doc::{AmountInput, KeyHeader, LimitInput, WalletIdParam};
use super::input::{
    idempotency_key, parse_amount, parse_balance, parse_wallet_id, JsonBody, OptionalJsonBody, WalletPath,
};
use super::problem::{Problem, ProblemBody};
use super::wallet::created;
use super::AppState;
use crate::aggregate::{Amount, WalletId};
use crate::ledger::{HoldReceipt, HoldRequest, LimitsReceipt};

/// A hold lasts this long unless `expiresInSeconds` says otherwise.
pub const DEFAULT_HOLD_SECONDS: u64 = 7 * 24 * 3600;
/// Longest a hold may last (30 days).
pub const MAX_HOLD_SECONDS: u64 = 30 * 24 * 3600;

/// Body of a hold.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"amount": "40", "expiresInSeconds": 900, "toWalletId": "driver"}))]
pub struct HoldBody {
    #[schema(value_type = AmountInput)]
    amount: Box<RawValue>,
    /// Idempotency key (or send the `Idempotency-Key` header).
    #[schema(min_length = 1, max_length = 128, pattern = r"^[!-~]{1,128}$")]
    request_id: Option<String>,
    /// Seconds until the hold expires (1 to 2592000; default 604800).
    #[schema(example = 900, minimum = 1, maximum = 2592000)]
    expires_in_seconds: Option<u64>,
    /// Pay captures into this wallet (else out of the system).
    #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    to_wallet_id: Option<String>,
}

/// Body of a capture: all of the hold unless `amount` is given.
#[derive(Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"amount": "25"}))]
pub struct CaptureBody {
    /// At most the held amount (absent: all of it).
    #[schema(value_type = Option<AmountInput>)]
    amount: Option<Box<RawValue>>,
    /// Idempotency key (or send the `Idempotency-Key` header).
    #[schema(min_length = 1, max_length = 128, pattern = r"^[!-~]{1,128}$")]
    request_id: Option<String>,
}

/// Body of a void.
#[derive(Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({}))]
pub struct VoidBody {
    /// Idempotency key (or send the `Idempotency-Key` header).
    #[schema(min_length = 1, max_length = 128, pattern = r"^[!-~]{1,128}$")]
    request_id: Option<String>,
}

/// Body of a change of limits.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"minBalance": "0", "maxBalance": "10000"}))]
pub struct LimitsBody {
    /// Available money may not fall below this (default 0): 0 or an amount.
    #[schema(value_type = Option<LimitInput>)]
    min_balance: Option<Box<RawValue>>,
    /// The balance may not rise above this (absent: no maximum): 0 or an amount.
    #[schema(value_type = Option<LimitInput>)]
    max_balance: Option<Box<RawValue>>,
    /// Idempotency key (or send the `Idempotency-Key` header).
    #[schema(min_length = 1, max_length = 128, pattern = r"^[!-~]{1,128}$")]
    request_id: Option<String>,
}

/// The `{id}` and `{holdId}` path segments.
pub struct HoldPath(pub WalletId, pub Uuid);

impl<S: Send + Sync> FromRequestParts<S> for HoldPath {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path((wallet, hold)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e: PathRejection| Problem::bad_request("INVALID_HOLD_ID", e.body_text()))?;
        let hold =
            Uuid::try_parse(&hold).map_err(|_| Problem::bad_request("INVALID_HOLD_ID", "holdId must be a UUID"))?;
        Ok(HoldPath(parse_wallet_id(&wallet)?, hold))
    }
}

/// Reserve money on a wallet until it is captured, voided or expires.
#[utoipa::path(post, path = "/wallet/{id}/holds", tag = "holds",
    params(WalletIdParam, KeyHeader),
    request_body = HoldBody,
    responses((status = 201, body = HoldReceipt, description = "held (or replayed: header Idempotent-Replayed)"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INSUFFICIENT_FUNDS, MIN_BALANCE_BREACHED, INVALID_AMOUNT, INVALID_EXPIRY, SAME_WALLET, ..."),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "WALLET_NOT_FOUND"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "TOO_MANY_HOLDS, CONCURRENCY_CONFLICT"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE, OUTCOME_UNKNOWN")))]
pub async fn place(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    headers: HeaderMap,
    JsonBody(body): JsonBody<HoldBody>,
) -> Result<Response, Problem> {
    let amount = parse_amount(&body.amount)?;
    let key = idempotency_key(body.request_id, &headers)?;
    let to = body.to_wallet_id.as_deref().map(parse_wallet_id).transpose()?;
    let hold = hold_request(wallet, amount, body.expires_in_seconds, to)?;
    Ok(created(app.ledger.place_hold(hold, key).await?))
}

/// A hold as asked: its expiry checked and fixed from now, in whole
/// milliseconds (the stored text reads back as the same instant).
pub(super) fn hold_request(
    wallet: WalletId,
    amount: Amount,
    expires_in_seconds: Option<u64>,
    to: Option<WalletId>,
) -> Result<HoldRequest, Problem> {
    let seconds = expires_in_seconds.unwrap_or(DEFAULT_HOLD_SECONDS);
    if !(1..=MAX_HOLD_SECONDS).contains(&seconds) {
        return Err(Problem::bad_request(
            "INVALID_EXPIRY",
            format!("expiresInSeconds must be from 1 to {MAX_HOLD_SECONDS}"),
        ));
    }
    let now = Utc::now()
        .duration_trunc(TimeDelta::milliseconds(1))
        .unwrap_or_else(|_| Utc::now());
    Ok(HoldRequest {
        wallet,
        amount,
        expires_in: Duration::from_secs(seconds),
        expires_at: now + TimeDelta::seconds(seconds as i64),
        to,
    })
}

/// Capture all of a hold, or part of it (the rest goes back to available).
#[utoipa::path(post, path = "/wallet/{id}/holds/{holdId}/capture", tag = "holds",
    params(WalletIdParam, ("holdId" = Uuid, Path, description = "hold id (`holdId` of the hold's receipt)"), KeyHeader),
    request_body = CaptureBody,
    responses((status = 201, body = HoldReceipt, description = "captured (or replayed: header Idempotent-Replayed)"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "CAPTURE_EXCEEDS_HOLD, MAX_BALANCE_EXCEEDED, INVALID_AMOUNT, INVALID_HOLD_ID"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "HOLD_NOT_FOUND"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "HOLD_NOT_ACTIVE (captured, voided or expired), CONCURRENCY_CONFLICT"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE, OUTCOME_UNKNOWN")))]
pub async fn capture(
    State(app): State<Arc<AppState>>,
    HoldPath(wallet, hold): HoldPath,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<CaptureBody>,
) -> Result<Response, Problem> {
    let amount = body.amount.as_deref().map(parse_amount).transpose()?;
    let key = idempotency_key(body.request_id, &headers)?;
    Ok(created(app.ledger.capture_hold(wallet, hold, amount, key).await?))
}

/// Release a hold before it expires.
#[utoipa::path(post, path = "/wallet/{id}/holds/{holdId}/void", tag = "holds",
    params(WalletIdParam, ("holdId" = Uuid, Path, description = "hold id (`holdId` of the hold's receipt)"), KeyHeader),
    request_body = VoidBody,
    responses((status = 201, body = HoldReceipt, description = "voided (or replayed: header Idempotent-Replayed)"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_HOLD_ID"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "HOLD_NOT_FOUND"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "HOLD_NOT_ACTIVE, CONCURRENCY_CONFLICT"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE, OUTCOME_UNKNOWN")))]
pub async fn void(
    State(app): State<Arc<AppState>>,
    HoldPath(wallet, hold): HoldPath,
    headers: HeaderMap,
    OptionalJsonBody(body): OptionalJsonBody<VoidBody>,
) -> Result<Response, Problem> {
    let key = idempotency_key(body.request_id, &headers)?;
    Ok(created(app.ledger.void_hold(wallet, hold, key).await?))
}

/// Set a wallet's minimum and maximum balance (scope `admin`).
#[utoipa::path(put, path = "/wallet/{id}/limits", tag = "holds",
    params(WalletIdParam, KeyHeader),
    request_body = LimitsBody,
    responses((status = 201, body = LimitsReceipt, description = "set (or replayed: header Idempotent-Replayed)"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_LIMITS, INVALID_AMOUNT"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "WALLET_NOT_FOUND"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "CONCURRENCY_CONFLICT"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE, OUTCOME_UNKNOWN")))]
pub async fn limits(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    headers: HeaderMap,
    JsonBody(body): JsonBody<LimitsBody>,
) -> Result<Response, Problem> {
    let min = body.min_balance.as_deref().map(parse_balance).transpose()?;
    let max = body.max_balance.as_deref().map(parse_balance).transpose()?;
    let key = idempotency_key(body.request_id, &headers)?;
    let min = min.unwrap_or(crate::aggregate::Balance::ZERO);
    Ok(created(app.ledger.set_limits(wallet, min, max, key).await?))
}
