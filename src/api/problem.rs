//! Every error the API returns, as RFC 9457 `application/problem+json`.
//!
//! This is the one place errors become HTTP: each has a stable `code`, and
//! the NestJS-era members `statusCode`, `message` and `error` so old clients
//! keep working. Nothing a client sends maps to a 500.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::aggregate::DomainError;
use crate::ledger::CommandError;
use crate::store::StoreError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: u32 = 1;

#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    /// Set when this answer replays a remembered rejection.
    pub replayed: bool,
    /// An atomic batch's first refused operation.
    pub operation_index: Option<usize>,
}

/// The wire form (also documented in the OpenAPI spec).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProblemBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable machine-readable code, e.g. `INSUFFICIENT_FUNDS`.
    pub code: String,
    pub status_code: u16,
    pub message: String,
    pub error: String,
    /// An atomic batch: the index of the first operation refused (nothing was written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operation_index: Option<usize>,
}

impl Problem {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: detail.into(),
            replayed: false,
            operation_index: None,
        }
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", detail)
    }

    pub(super) fn body(&self) -> ProblemBody {
        let title = self.status.canonical_reason().unwrap_or("Error").to_owned();
        ProblemBody {
            kind: format!(
                "urn:wallet:problem:{}",
                self.code.to_ascii_lowercase().replace('_', "-")
            ),
            title: title.clone(),
            status: self.status.as_u16(),
            detail: self.detail.clone(),
            code: self.code.to_owned(),
            status_code: self.status.as_u16(),
            message: self.detail.clone(),
            error: title,
            operation_index: self.operation_index,
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.body()).expect("problem bodies serialise");
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        // A write that may have committed is never told to retry blindly.
        if self.status == StatusCode::SERVICE_UNAVAILABLE && self.code != "OUTCOME_UNKNOWN" {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.replayed {
            headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }
}

impl From<DomainError> for Problem {
    fn from(e: DomainError) -> Self {
        if let DomainError::OperationFailed { index, error } = &e {
            return Problem {
                operation_index: Some(*index),
                detail: e.to_string(),
                ..Problem::from((**error).clone())
            };
        }
        let (status, code) = match &e {
            DomainError::InsufficientFunds { .. } => (StatusCode::BAD_REQUEST, "INSUFFICIENT_FUNDS"),
            DomainError::WalletNotFound { .. } => (StatusCode::NOT_FOUND, "WALLET_NOT_FOUND"),
            DomainError::SameWallet => (StatusCode::BAD_REQUEST, "SAME_WALLET"),
            DomainError::BalanceLimit { .. } => (StatusCode::BAD_REQUEST, "BALANCE_LIMIT"),
            DomainError::MaxBalanceExceeded { .. } => (StatusCode::BAD_REQUEST, "MAX_BALANCE_EXCEEDED"),
            DomainError::MinBalanceBreached { .. } => (StatusCode::BAD_REQUEST, "MIN_BALANCE_BREACHED"),
            DomainError::HoldNotFound { .. } => (StatusCode::NOT_FOUND, "HOLD_NOT_FOUND"),
            DomainError::HoldNotActive { .. } => (StatusCode::CONFLICT, "HOLD_NOT_ACTIVE"),
            DomainError::CaptureExceedsHold { .. } => (StatusCode::BAD_REQUEST, "CAPTURE_EXCEEDS_HOLD"),
            DomainError::TooManyHolds { .. } => (StatusCode::CONFLICT, "TOO_MANY_HOLDS"),
            DomainError::InvalidLimits { .. } => (StatusCode::BAD_REQUEST, "INVALID_LIMITS"),
            DomainError::OperationFailed { .. } => unreachable!("mapped above"),
        };
        Problem::new(status, code, e.to_string())
    }
}

impl From<StoreError> for Problem {
    fn from(e: StoreError) -> Self {
        // The client did nothing wrong; the detail stays generic so no
        // internals leak, the log has the cause.
        tracing::error!(error = %e, "store failure");
        Problem::unavailable("the event store is unavailable, retry shortly")
    }
}

impl From<CommandError> for Problem {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Rejected { error, replayed } => Problem {
                replayed,
                ..Problem::from(error)
            },
            CommandError::KeyReused => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "IDEMPOTENCY_KEY_REUSED",
                "this requestId was already used for a different operation or payload on this wallet",
            ),
            CommandError::Conflict => Problem::new(
                StatusCode::CONFLICT,
                "CONCURRENCY_CONFLICT",
                "the wallet kept changing under this request; retry it",
            ),
            CommandError::Store(e) => e.into(),
            CommandError::OutcomeUnknown(cause) => {
                tracing::error!(error = %cause, "write outcome unknown");
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "OUTCOME_UNKNOWN",
                    "the write may or may not have been applied; retry only with the same requestId",
                )
            }
        }
    }
}
