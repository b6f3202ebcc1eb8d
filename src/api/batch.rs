//! `POST /batch`: up to 1,000 operations in one request and one trip
//! through the committer. `"atomic": true` commits all or none (the first
//! refused operation is named by `operationIndex`); otherwise each
//! operation stands alone and gets its own result, in request order.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use super::holds::{hold_request, MAX_HOLD_SECONDS};
use super::input::{idempotency_key, parse_amount, parse_wallet_id, JsonBody, MAX_REQUEST_ID_LEN};
use super::problem::{Problem, ProblemBody};
use super::AppState;
use crate::aggregate::MAX_ATOMIC_OPS;
use crate::ledger::{Operation, Receipt};

/// Body of a batch.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schema(example = json!({"atomic": true, "operations": [
    {"op": "deposit", "walletId": "a", "amount": "10"},
    {"op": "transfer", "walletId": "a", "toWalletId": "b", "amount": "5"}]}))]
pub struct BatchBody {
    /// All or none (default false: each operation on its own).
    #[serde(default)]
    atomic: bool,
    /// 1 to 1,000 operations, decided in this order.
    operations: Vec<OperationBody>,
    /// An atomic batch's idempotency key (or send `Idempotency-Key`).
    request_id: Option<String>,
}

/// One operation of a batch.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OperationBody {
    /// `deposit`, `withdraw`, `transfer`, `hold`, `capture` or `void`.
    #[schema(example = "deposit", pattern = "^(deposit|withdraw|transfer|hold|capture|void)$")]
    op: String,
    #[schema(example = "alice")]
    wallet_id: String,
    #[schema(value_type = Option<String>, example = "10")]
    amount: Option<Box<RawValue>>,
    /// transfer: the receiver; hold: where a capture pays to.
    to_wallet_id: Option<String>,
    /// capture, void: the hold.
    hold_id: Option<String>,
    /// hold: seconds until it expires (1 to 2592000; default 604800).
    #[schema(minimum = 1, maximum = 2592000)]
    expires_in_seconds: Option<u64>,
    /// This operation's idempotency key. In an atomic batch it is recorded
    /// with the batch: a retry replays the batch, and the key replays this
    /// operation's receipt on its own route.
    request_id: Option<String>,
}

/// One operation's outcome.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationResult {
    index: usize,
    /// The status the operation would have got on its own route.
    status: u16,
    /// Its receipt (201): the shape of its own route's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    receipt: Option<Receipt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<ProblemBody>,
    /// Replayed from an earlier identical request with the same key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

/// The answer to a batch: one result per operation, in request order.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchAnswer {
    atomic: bool,
    results: Vec<OperationResult>,
}

/// Many operations in one request: all or none, or each on its own.
#[utoipa::path(post, path = "/batch", tag = "holds",
    params(("Idempotency-Key" = Option<String>, Header, nullable = false, min_length = 1, max_length = 128, pattern = r"^[!-~]{1,128}$",
            description = "an atomic batch's idempotency key, instead of `requestId` in the body")),
    request_body = BatchBody,
    responses((status = 201, body = BatchAnswer, description = "atomic: every operation committed"),
              (status = 200, body = BatchAnswer, description = "independent: one result per operation"),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_BATCH, or (atomic) the first refused operation's problem with operationIndex"),
              (status = 404, body = ProblemBody, content_type = "application/problem+json", description = "atomic: WALLET_NOT_FOUND, HOLD_NOT_FOUND with operationIndex"),
              (status = 409, body = ProblemBody, content_type = "application/problem+json", description = "atomic: HOLD_NOT_ACTIVE with operationIndex, CONCURRENCY_CONFLICT"),
              (status = 413, body = ProblemBody, content_type = "application/problem+json", description = "PAYLOAD_TOO_LARGE"),
              (status = 415, body = ProblemBody, content_type = "application/problem+json", description = "UNSUPPORTED_MEDIA_TYPE"),
              (status = 422, body = ProblemBody, content_type = "application/problem+json", description = "IDEMPOTENCY_KEY_REUSED"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE, OUTCOME_UNKNOWN")))]
pub async fn batch(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<BatchBody>,
) -> Result<Response, Problem> {
    if body.operations.is_empty() || body.operations.len() > MAX_ATOMIC_OPS {
        return Err(Problem::bad_request(
            "INVALID_BATCH",
            format!("operations must hold 1 to {MAX_ATOMIC_OPS} operations"),
        ));
    }
    for (index, op) in body.operations.iter().enumerate() {
        shape(op).map_err(|p| Problem {
            operation_index: Some(index),
            ..p
        })?;
    }
    let parsed: Vec<Result<(Operation, Option<String>), Problem>> =
        body.operations.into_iter().map(operation).collect();
    if body.atomic {
        let key = idempotency_key(body.request_id, &headers)?;
        let mut ops = Vec::with_capacity(parsed.len());
        for (index, op) in parsed.into_iter().enumerate() {
            ops.push(op.map_err(|p| Problem {
                operation_index: Some(index),
                ..p
            })?);
        }
        let answer = app.ledger.batch_atomic(ops, key).await?;
        let results = answer
            .receipt
            .into_iter()
            .enumerate()
            .map(|(index, receipt)| OperationResult {
                index,
                status: 201,
                receipt: Some(receipt),
                problem: None,
                replayed: answer.replayed,
            })
            .collect();
        let mut response = (StatusCode::CREATED, Json(BatchAnswer { atomic: true, results })).into_response();
        if answer.replayed {
            response
                .headers_mut()
                .insert("idempotent-replayed", axum::http::HeaderValue::from_static("true"));
        }
        return Ok(response);
    }
    if body.request_id.is_some() {
        return Err(Problem::bad_request(
            "INVALID_BATCH",
            "an independent batch has no key of its own: give each operation its requestId",
        ));
    }
    let (valid, mut results) = split(parsed);
    let outcomes = app.ledger.batch(valid.iter().map(|(_, op)| op.clone()).collect()).await;
    for ((index, _), outcome) in valid.into_iter().zip(outcomes) {
        results[index] = Some(match outcome {
            Ok(answer) => OperationResult {
                index,
                status: 201,
                receipt: Some(answer.receipt),
                problem: None,
                replayed: answer.replayed,
            },
            Err(e) => failed(index, Problem::from(e)),
        });
    }
    let results = results.into_iter().flatten().collect();
    Ok((StatusCode::OK, Json(BatchAnswer { atomic: false, results })).into_response())
}

/// The valid operations with their indexes, and a result slot per
/// operation (filled already for the invalid ones).
#[allow(clippy::type_complexity)]
fn split(
    parsed: Vec<Result<(Operation, Option<String>), Problem>>,
) -> (Vec<(usize, (Operation, Option<String>))>, Vec<Option<OperationResult>>) {
    let mut valid = Vec::with_capacity(parsed.len());
    let mut results: Vec<Option<OperationResult>> = Vec::with_capacity(parsed.len());
    for (index, op) in parsed.into_iter().enumerate() {
        match op {
            Ok(op) => {
                valid.push((index, op));
                results.push(None);
            }
            Err(problem) => results.push(Some(failed(index, problem))),
        }
    }
    (valid, results)
}

fn failed(index: usize, problem: Problem) -> OperationResult {
    OperationResult {
        index,
        status: problem.status.as_u16(),
        receipt: None,
        replayed: problem.replayed,
        problem: Some(problem.body()),
    }
}

/// What the schema says of an operation: a known `op`, only the fields it
/// uses, an expiry in range. A batch with an operation of the wrong shape
/// is refused whole (it is not a batch the client meant), naming it.
fn shape(body: &OperationBody) -> Result<(), Problem> {
    const OPS: [&str; 6] = ["deposit", "withdraw", "transfer", "hold", "capture", "void"];
    if !OPS.contains(&body.op.as_str()) {
        return Err(Problem::bad_request(
            "INVALID_OPERATION",
            "op must be one of deposit, withdraw, transfer, hold, capture, void",
        ));
    }
    let unused = |field: &str, given: bool, used_by: &[&str]| {
        (given && !used_by.contains(&body.op.as_str())).then(|| {
            Problem::bad_request(
                "INVALID_REQUEST",
                format!("{field} has no meaning for a {} operation", body.op),
            )
        })
    };
    let stray = [
        unused(
            "amount",
            body.amount.is_some(),
            &["deposit", "withdraw", "transfer", "hold", "capture"],
        ),
        unused("toWalletId", body.to_wallet_id.is_some(), &["transfer", "hold"]),
        unused("holdId", body.hold_id.is_some(), &["capture", "void"]),
        unused("expiresInSeconds", body.expires_in_seconds.is_some(), &["hold"]),
    ];
    if let Some(problem) = stray.into_iter().flatten().next() {
        return Err(problem);
    }
    match body.expires_in_seconds {
        Some(s) if !(1..=MAX_HOLD_SECONDS).contains(&s) => Err(Problem::bad_request(
            "INVALID_EXPIRY",
            format!("expiresInSeconds must be from 1 to {MAX_HOLD_SECONDS}"),
        )),
        _ => Ok(()),
    }
}

/// Validates one operation's values as its own route would.
fn operation(body: OperationBody) -> Result<(Operation, Option<String>), Problem> {
    let wallet = parse_wallet_id(&body.wallet_id)?;
    let key = match body.request_id {
        Some(k) if !(1..=MAX_REQUEST_ID_LEN).contains(&k.len()) || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(Problem::bad_request(
                "INVALID_REQUEST_ID",
                "requestId must be 1-128 visible ASCII characters",
            ))
        }
        other => other,
    };
    let amount = body.amount.as_deref().map(parse_amount).transpose()?;
    let needs_amount =
        || amount.ok_or_else(|| Problem::bad_request("INVALID_AMOUNT", "this operation needs an amount"));
    let to = body.to_wallet_id.as_deref().map(parse_wallet_id).transpose()?;
    let hold = || {
        let text = body
            .hold_id
            .as_deref()
            .ok_or_else(|| Problem::bad_request("INVALID_HOLD_ID", "this operation needs a holdId"))?;
        Uuid::try_parse(text).map_err(|_| Problem::bad_request("INVALID_HOLD_ID", "holdId must be a UUID"))
    };
    let op = match body.op.as_str() {
        "deposit" => Operation::Deposit {
            wallet,
            amount: needs_amount()?,
        },
        "withdraw" => Operation::Withdraw {
            wallet,
            amount: needs_amount()?,
        },
        "transfer" => Operation::Transfer {
            from: wallet,
            to: to.ok_or_else(|| Problem::bad_request("INVALID_WALLET_ID", "a transfer needs a toWalletId"))?,
            amount: needs_amount()?,
        },
        "hold" => Operation::Hold(hold_request(wallet, needs_amount()?, body.expires_in_seconds, to)?),
        "capture" => Operation::Capture {
            wallet,
            hold_id: hold()?,
            amount,
        },
        "void" => Operation::Void {
            wallet,
            hold_id: hold()?,
        },
        _ => {
            return Err(Problem::bad_request(
                "INVALID_OPERATION",
                "op must be one of deposit, withdraw, transfer, hold, capture, void",
            ))
        }
    };
    Ok((op, key))
}
