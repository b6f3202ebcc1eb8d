//! Read-model routes: history, stats and fraud flags, served from the
//! projections. `?minPosition=` waits briefly for the projection to reach a
//! position the client wrote (read-your-writes); every answer carries the
//! projection's position in `X-Projection-Position`.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

use super::doc::WalletIdParam;
use super::input::{parse_wallet_id, WalletPath};
use super::problem::{Problem, ProblemBody};
use super::replicas::read_model;
use super::AppState;
use crate::projections::flags::{Flag, FLAG_KIND, LARGE_OUTFLOW, RAPID_OUTFLOWS};
use crate::projections::history::HistoryItem;
use crate::projections::holds::HoldView;
use crate::projections::stats::{stats_key, WalletStats};
use crate::projections::{flags, history, holds, stats, DocQuery, ProjectionError};
use crate::store::Position;

/// Page size when `limit` is not given, and the largest allowed.
const DEFAULT_LIMIT: u32 = 50;
const MAX_LIMIT: u32 = 200;

impl From<ProjectionError> for Problem {
    fn from(e: ProjectionError) -> Self {
        match e {
            ProjectionError::Store(e) => e.into(),
            other => {
                tracing::error!(error = %other, "projection read failed");
                Problem::unavailable("read models are unavailable, retry shortly")
            }
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct PageQuery {
    /// Page size, 1-200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// Cursor from `X-Next-Before`: the last item's `version`.
    #[param(value_type = Option<i64>, minimum = 1)]
    before: Option<String>,
    /// Wait (up to 2 s) until the read model has applied this log position.
    #[param(value_type = Option<i64>, minimum = 0)]
    min_position: Option<String>,
}

/// The query of one wallet's flags: as `PageQuery`, but the cursor names a flag.
#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct WalletFlagsQuery {
    /// Page size, 1-200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// Cursor from `X-Next-Before`: `<position>:<rule>` of the last flag of
    /// the previous page (a bare position lists the flags below it).
    #[param(pattern = r"^[0-9]+(:(RAPID_OUTFLOWS|LARGE_OUTFLOW))?$", example = "9:LARGE_OUTFLOW")]
    before: Option<String>,
    /// Wait (up to 2 s) until the read model has applied this log position.
    #[param(value_type = Option<i64>, minimum = 0)]
    min_position: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct FlagsQuery {
    /// Only this wallet's flags.
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    wallet_id: Option<String>,
    /// Only this rule.
    #[param(value_type = Option<RuleParam>, inline)]
    rule: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// Cursor from `X-Next-Before`: `<position>:<rule>` of the last flag of
    /// the previous page (a bare position lists the flags below it).
    #[param(pattern = r"^[0-9]+(:(RAPID_OUTFLOWS|LARGE_OUTFLOW))?$", example = "9:LARGE_OUTFLOW")]
    before: Option<String>,
    /// Wait (up to 2 s) until the read model has applied this log position.
    #[param(value_type = Option<i64>, minimum = 0)]
    min_position: Option<String>,
}

/// A fraud rule (documentation of `rule`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code, clippy::upper_case_acronyms)]
pub enum RuleParam {
    #[schema(rename = "RAPID_OUTFLOWS")]
    RapidOutflows,
    #[schema(rename = "LARGE_OUTFLOW")]
    LargeOutflow,
}

/// A hold's status (documentation of `status`).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum HoldStatusParam {
    Held,
    Captured,
    Voided,
    Expired,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct WaitQuery {
    /// Wait (up to 2 s) until the read model has applied this log position.
    #[param(value_type = Option<i64>, minimum = 0)]
    min_position: Option<String>,
}

fn bad_query(e: QueryRejection) -> Problem {
    Problem::bad_request("INVALID_QUERY", e.body_text())
}

fn parse_limit(text: Option<&str>) -> Result<u32, Problem> {
    match text {
        None => Ok(DEFAULT_LIMIT),
        Some(t) => t
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| Problem::bad_request("INVALID_LIMIT", "limit must be an integer from 1 to 200")),
    }
}

/// A flags cursor: `<position>:<rule>` (the last flag of the previous page,
/// as `X-Next-Before` gives it) or a bare `<position>` (every flag below it).
/// Returns the position and the flag's key.
fn parse_flag_cursor(text: Option<&str>) -> Result<Option<(i64, Option<String>)>, Problem> {
    let Some(text) = text else { return Ok(None) };
    let bad = || {
        Problem::bad_request(
            "INVALID_CURSOR",
            "before must be a flag cursor: <position>:<rule> (from X-Next-Before) or a positive position",
        )
    };
    let (position, rule) = match text.split_once(':') {
        Some((p, rule)) if rule == RAPID_OUTFLOWS || rule == LARGE_OUTFLOW => (p, Some(rule)),
        Some(_) => return Err(bad()),
        None => (text, None),
    };
    let position = position.parse::<i64>().ok().filter(|v| *v >= 1).ok_or_else(bad)?;
    Ok(Some((position, rule.map(|r| flags::flag_key(position, r)))))
}

fn parse_cursor(text: Option<&str>) -> Result<Option<i64>, Problem> {
    text.map(|t| {
        t.parse::<i64>()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| Problem::bad_request("INVALID_CURSOR", "before must be a positive integer cursor"))
    })
    .transpose()
}

/// `minPosition`: the read model waits until it has applied it.
pub(super) fn min_position(text: Option<&str>) -> Result<Option<Position>, Problem> {
    text.map(|t| {
        t.parse::<Position>()
            .ok()
            .filter(|p| *p >= 0)
            .ok_or_else(|| Problem::bad_request("INVALID_MIN_POSITION", "minPosition must be a log position (>= 0)"))
    })
    .transpose()
}

/// A JSON response made of stored JSON bodies, without re-parsing them.
fn json_response(body: String, position: Position, next_before: Option<String>) -> Response {
    let mut response = (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response();
    let headers = response.headers_mut();
    headers.insert("x-projection-position", HeaderValue::from(position));
    if let Some(next) = next_before.and_then(|n| HeaderValue::from_str(&n).ok()) {
        headers.insert("x-next-before", next);
    }
    response
}

/// A page as a JSON array, and the cursor of the next page if it may exist.
fn page(rows: Vec<(i64, String)>, limit: u32, position: Position) -> Response {
    let next = (rows.len() == limit as usize)
        .then(|| rows.last().map(|(sort, _)| *sort))
        .flatten();
    let next = next.filter(|n| *n > 1).map(|n| n.to_string());
    json_response(array_body(&rows), position, next)
}

/// A page of flags. Two flags can share a position (both rules fire on one
/// event), so the next page's cursor names the last flag itself:
/// `<position>:<rule>`.
fn flag_page(rows: Vec<(i64, String)>, limit: u32, position: Position) -> Response {
    let next = (rows.len() == limit as usize)
        .then(|| rows.last())
        .flatten()
        .and_then(|(_, body)| serde_json::from_str::<Flag>(body).ok())
        .map(|f| format!("{}:{}", f.position, f.rule));
    json_response(array_body(&rows), position, next)
}

/// Stored JSON bodies as one JSON array, without re-parsing them.
fn array_body(rows: &[(i64, String)]) -> String {
    let mut body = String::with_capacity(rows.iter().map(|(_, b)| b.len() + 1).sum::<usize>() + 2);
    body.push('[');
    for (i, (_, b)) in rows.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(b);
    }
    body.push(']');
    body
}

/// A wallet's events, newest first. Next page: `before` = the last item's
/// version (also sent as `X-Next-Before`).
#[utoipa::path(get, path = "/wallet/{id}/history", tag = "read models",
    params(WalletIdParam, PageQuery),
    responses((status = 200, body = [HistoryItem], headers(("X-Projection-Position" = i64, description = "the log position the read model had applied when it answered"),
                       ("X-Next-Before" = i64, description = "a full page: pass as `before` for the next one"))),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_LIMIT, INVALID_CURSOR, INVALID_MIN_POSITION"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn history(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(bad_query)?;
    let limit = parse_limit(q.limit.as_deref())?;
    let before = parse_cursor(q.before.as_deref())?;
    let min = min_position(q.min_position.as_deref())?;
    let query = &DocQuery {
        kind: history::KIND,
        wallet_id: Some(wallet.as_str()),
        tag: None,
        before_sort: before,
        before_key: None,
        limit,
    };
    let (rows, position) = read_model(&app, history::NAME, min, |p| async move {
        p.query(history::NAME, query).await
    })
    .await?;
    Ok(page(rows, limit, position))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct HoldsQuery {
    /// Only holds in this status.
    #[param(value_type = Option<HoldStatusParam>, inline)]
    status: Option<String>,
    /// Page size, 1-200 (default 50).
    #[param(value_type = Option<u32>, minimum = 1, maximum = 200)]
    limit: Option<String>,
    /// Cursor from `X-Next-Before`: the last item's `position`.
    #[param(value_type = Option<i64>, minimum = 1)]
    before: Option<String>,
    /// Wait (up to 2 s) until the read model has applied this log position.
    #[param(value_type = Option<i64>, minimum = 0)]
    min_position: Option<String>,
}

/// A wallet's holds, newest first, with their status.
#[utoipa::path(get, path = "/wallet/{id}/holds", tag = "read models",
    params(WalletIdParam, HoldsQuery),
    responses((status = 200, body = [HoldView], headers(("X-Projection-Position" = i64, description = "the log position the read model had applied when it answered"),
                       ("X-Next-Before" = i64, description = "a full page: pass as `before` for the next one"))),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_STATUS, INVALID_LIMIT, INVALID_CURSOR, INVALID_MIN_POSITION"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn wallet_holds(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    query: Result<Query<HoldsQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(bad_query)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s @ ("held" | "captured" | "voided" | "expired")) => Some(s),
        Some(_) => {
            return Err(Problem::bad_request(
                "INVALID_STATUS",
                "status must be one of held, captured, voided, expired",
            ))
        }
    };
    let limit = parse_limit(q.limit.as_deref())?;
    let before = parse_cursor(q.before.as_deref())?;
    let min = min_position(q.min_position.as_deref())?;
    let query = &DocQuery {
        kind: holds::KIND,
        wallet_id: Some(wallet.as_str()),
        tag: status,
        before_sort: before,
        before_key: None,
        limit,
    };
    let (rows, position) = read_model(
        &app,
        holds::NAME,
        min,
        |p| async move { p.query(holds::NAME, query).await },
    )
    .await?;
    Ok(page(rows, limit, position))
}

/// A wallet's totals, counts, last activity and fraud status.
#[utoipa::path(get, path = "/wallet/{id}/stats", tag = "read models",
    params(WalletIdParam, WaitQuery),
    responses((status = 200, body = WalletStats, description = "all zero for a wallet with no events",
               headers(("X-Projection-Position" = i64, description = "the log position the read model had applied when it answered"))),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_WALLET_ID, INVALID_MIN_POSITION"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn stats(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(bad_query)?;
    let min = min_position(q.min_position.as_deref())?;
    let key = &stats_key(wallet.as_str());
    let (found, position) =
        read_model(&app, stats::NAME, min, |p| async move { p.get(stats::NAME, key).await }).await?;
    let body = match found {
        Some(body) => body,
        None => serde_json::to_string(&WalletStats::empty(wallet.as_str())).expect("stats serialise"),
    };
    Ok(json_response(body, position, None))
}

async fn list_flags(
    app: &AppState,
    wallet: Option<&str>,
    rule: Option<&str>,
    limit: Option<&str>,
    before: Option<&str>,
    min_position: Option<&str>,
) -> Result<Response, Problem> {
    if let Some(rule) = rule {
        if rule != RAPID_OUTFLOWS && rule != LARGE_OUTFLOW {
            return Err(Problem::bad_request(
                "INVALID_RULE",
                "rule must be RAPID_OUTFLOWS or LARGE_OUTFLOW",
            ));
        }
    }
    let limit = parse_limit(limit)?;
    let before = parse_flag_cursor(before)?;
    let min = self::min_position(min_position)?;
    let query = &DocQuery {
        kind: FLAG_KIND,
        wallet_id: wallet,
        tag: rule,
        before_sort: before.as_ref().map(|(p, _)| *p),
        before_key: before.as_ref().and_then(|(_, k)| k.as_deref()),
        limit,
    };
    let (rows, position) = read_model(
        app,
        flags::NAME,
        min,
        |p| async move { p.query(flags::NAME, query).await },
    )
    .await?;
    Ok(flag_page(rows, limit, position))
}

/// A wallet's fraud flags, newest first. Next page: `before` = the
/// `X-Next-Before` of a full page (`<position>:<rule>` of its last flag).
#[utoipa::path(get, path = "/wallet/{id}/flags", tag = "read models",
    params(WalletIdParam, WalletFlagsQuery),
    responses((status = 200, body = [Flag], headers(("X-Projection-Position" = i64, description = "the log position the read model had applied when it answered"),
                       ("X-Next-Before" = String, description = "a full page: the next page's cursor, `<position>:<rule>`"))),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_WALLET_ID, INVALID_LIMIT, INVALID_CURSOR, INVALID_MIN_POSITION"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn wallet_flags(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    query: Result<Query<WalletFlagsQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(bad_query)?;
    list_flags(
        &app,
        Some(wallet.as_str()),
        None,
        q.limit.as_deref(),
        q.before.as_deref(),
        q.min_position.as_deref(),
    )
    .await
}

/// All fraud flags, newest first, optionally for one wallet or one rule.
#[utoipa::path(get, path = "/flags", tag = "read models",
    params(FlagsQuery),
    responses((status = 200, body = [Flag], headers(("X-Projection-Position" = i64, description = "the log position the read model had applied when it answered"),
                       ("X-Next-Before" = String, description = "a full page: the next page's cursor, `<position>:<rule>`"))),
              (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_RULE, INVALID_WALLET_ID, INVALID_LIMIT, INVALID_CURSOR"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn flags(
    State(app): State<Arc<AppState>>,
    query: Result<Query<FlagsQuery>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = query.map_err(bad_query)?;
    let wallet = q.wallet_id.as_deref().map(parse_wallet_id).transpose()?;
    list_flags(
        &app,
        wallet.as_ref().map(|w| w.as_str()),
        q.rule.as_deref(),
        q.limit.as_deref(),
        q.before.as_deref(),
        q.min_position.as_deref(),
    )
    .await
}
