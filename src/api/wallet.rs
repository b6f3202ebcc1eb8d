//! The wallet routes: the three writes, the balance and the history.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::sync::Arc;

use super::doc::{AmountInput, KeyHeader, PointInput, WalletIdParam};
use super::input::{idempotency_key, parse_amount, parse_wallet_id, JsonBody, WalletPath};
use super::problem::{Problem, ProblemBody};
use super::AppState;
use crate::ledger::{Answer, TransferReceipt, WalletReceipt};
use crate::store::Cutoff;

/// Body of a deposit or withdrawal.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"amount": "150.50"}))]
pub struct MoneyBody {
    #[schema(value_type = AmountInput)]
    amount: Box<RawValue>,
    /// Idempotency key, 1-128 visible ASCII characters (or send the
    /// `Idempotency-Key` header). Without one the request is not idempotent.
    #[schema(min_length = 1, max_length = 128, pattern = r"^[!-~]{1,128}$")]
    request_id: Option<String>,
}

/// Body of a transfer.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"toWalletId": "bob", "amount": "25"}))]
pub struct TransferBody {
    /// The receiver; opened by the transfer if it is new.
    #[schema(min_length = 1, max_length = 128, pattern = r"^[A-Za-z0-9._:-]{1,128}$")]
    to_wallet_id: String,
    #[schema(value_type = AmountInput)]
    amount: Box<RawValue>,
    /// Idempotency key (see the deposit).
    #[schema(min_length = 1, max_length = 128, pattern = r"^[!-~]{1,128}$")]
    request_id: Option<String>,
}

pub(super) fn created<R: Serialize>(answer: Answer<R>) -> Response {
    let mut response = (StatusCode::CREATED, Json(answer.receipt)).into_response();
    if answer.replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    response
}

/// Deposit money; the first deposit opens the wallet.
#[utoipa::path(post, path = "/wallet/{id}/deposit", tag = "wallet",
    params(WalletIdParam, KeyHeader),
    request_body = MoneyBody,
    responses((status = 201, body = WalletReceipt, description = "deposited (or replayed: header Idempotent-Replayed)"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_AMOUNT, INVALID_WALLET_ID, INVALID_REQUEST"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "CONCURRENCY_CONFLICT")))]
pub async fn deposit(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    headers: HeaderMap,
    JsonBody(body): JsonBody<MoneyBody>,
) -> Result<Response, Problem> {
    let amount = parse_amount(&body.amount)?;
    let key = idempotency_key(body.request_id, &headers)?;
    Ok(created(app.ledger.deposit(wallet, amount, key).await?))
}

/// Withdraw money from an existing wallet.
#[utoipa::path(post, path = "/wallet/{id}/withdraw", tag = "wallet",
    params(WalletIdParam, KeyHeader),
    request_body = MoneyBody,
    responses((status = 201, body = WalletReceipt),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INSUFFICIENT_FUNDS, INVALID_AMOUNT, ..."),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "WALLET_NOT_FOUND"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "CONCURRENCY_CONFLICT"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn withdraw(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    headers: HeaderMap,
    JsonBody(body): JsonBody<MoneyBody>,
) -> Result<Response, Problem> {
    let amount = parse_amount(&body.amount)?;
    let key = idempotency_key(body.request_id, &headers)?;
    Ok(created(app.ledger.withdraw(wallet, amount, key).await?))
}

/// Move money to another wallet in one atomic append to both streams.
#[utoipa::path(post, path = "/wallet/{id}/transfer", tag = "wallet",
    params(WalletIdParam, KeyHeader),
    request_body = TransferBody,
    responses((status = 201, body = TransferReceipt),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "SAME_WALLET, INSUFFICIENT_FUNDS, ..."),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "WALLET_NOT_FOUND (sender)"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "CONCURRENCY_CONFLICT"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn transfer(
    State(app): State<Arc<AppState>>,
    WalletPath(from): WalletPath,
    headers: HeaderMap,
    JsonBody(body): JsonBody<TransferBody>,
) -> Result<Response, Problem> {
    let to = parse_wallet_id(&body.to_wallet_id)?;
    let amount = parse_amount(&body.amount)?;
    let key = idempotency_key(body.request_id, &headers)?;
    Ok(created(app.ledger.transfer(from, to, amount, key).await?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct BalanceQuery {
    /// A log position (integer >= 0) or an RFC 3339 time: the balance as of then.
    #[param(value_type = Option<PointInput>, inline)]
    at: Option<String>,
    /// With standbys for reads (`DATABASE_READ_URL`): the balance is folded
    /// on a standby that has replayed this log position (a write's
    /// `position`), else on the primary. Without standbys: no effect (the
    /// primary has every committed write).
    #[param(value_type = Option<i64>, minimum = 0)]
    min_position: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BalanceView {
    wallet_id: String,
    /// All money in the wallet, held money included.
    #[schema(example = "150.5000")]
    balance: String,
    /// Balance less active holds: what may be withdrawn, sent or held.
    #[schema(example = "110.5000")]
    available: String,
    /// Money reserved by active holds.
    #[schema(example = "40.0000")]
    held: String,
    /// Available money may not fall below this.
    #[schema(example = "0.0000")]
    min_balance: String,
    /// The balance may not rise above this (absent: no maximum).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "10000.0000")]
    max_balance: Option<String>,
    exists: bool,
    /// Stream version the balance is folded up to (0: no events).
    version: u64,
}

/// A wallet's balance, folded from its events (optionally as of a past point).
#[utoipa::path(get, path = "/wallet/{id}", tag = "wallet",
    params(WalletIdParam, BalanceQuery),
    responses((status = 200, body = BalanceView, description = "unknown wallets answer exists: false"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_WALLET_ID, INVALID_AT, INVALID_MIN_POSITION"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn balance(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    query: Result<Query<BalanceQuery>, QueryRejection>,
) -> Result<Json<BalanceView>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request("INVALID_QUERY", e.body_text()))?;
    let cutoff = query.at.as_deref().map(parse_at).transpose()?;
    let min = super::read_models::min_position(query.min_position.as_deref())?;
    let state = match (min, cutoff) {
        // Asked for a freshness bound, or a past state: a standby can answer.
        (Some(_), _) | (_, Some(_)) if app.replicas.is_some() => {
            super::replicas::balance(&app, &wallet, cutoff, min.unwrap_or(0)).await?
        }
        _ => app.ledger.wallet(&wallet, cutoff).await?,
    };
    Ok(Json(BalanceView {
        exists: state.exists(),
        balance: state.balance.to_string(),
        available: state.available().to_string(),
        held: state.held.to_string(),
        min_balance: state.limits.min_balance.to_string(),
        max_balance: state.limits.max_balance.map(|m| m.to_string()),
        version: state.version,
        wallet_id: wallet.to_string(),
    }))
}

fn parse_at(text: &str) -> Result<Cutoff, Problem> {
    Cutoff::parse_point(text)
        .ok_or_else(|| Problem::bad_request("INVALID_AT", "at must be a log position (>= 0) or an RFC 3339 time"))
}
