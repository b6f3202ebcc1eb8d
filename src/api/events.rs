//! The log for consumers over HTTP: pages of the global log
//! (`GET /events`), one wallet's stream (`GET /wallet/{id}/events`), and a
//! catch-up-then-live subscription as Server-Sent Events
//! (`GET /events/stream`). Every item is a `LogEvent`; `position` is the
//! cursor and the deduplication key.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::input::WalletPath;
use super::problem::{Problem, ProblemBody};
use super::replicas::log_page;
use super::AppState;
use crate::aggregate::WalletId;
use crate::feed::{self, Delivery, FeedError, LogEvent};
use crate::store::{LogFilter, Position, RecordedEvent};

/// Page size when `limit` is not given, and the largest allowed.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// Query of `GET /events` and `GET /events/stream` (for the docs; parsed
/// by hand, since `type` repeats).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct LogQuery {
    /// Start after this log position (default 0: the beginning).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// Page size, 1-1000 (default 100); `GET /events` only.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only this wallet's events.
    #[param(pattern = r"^[A-Za-z0-9._:-]{1,128}$", min_length = 1, max_length = 128)]
    wallet_id: Option<String>,
    /// Only events of this type (repeatable: any of them).
    #[param(rename = "type", value_type = Option<Vec<EventTypeParam>>, inline)]
    kind: Option<Vec<String>>,
}

/// An event type (documentation of `type`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub enum EventTypeParam {
    WalletCreated,
    FundsDeposited,
    FundsWithdrawn,
    TransferDebited,
    TransferCredited,
    HoldPlaced,
    HoldCaptured,
    HoldVoided,
    HoldExpired,
    WalletLimitsChanged,
}

/// Query of `GET /wallet/{id}/events`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub struct StreamQuery {
    /// First version to return (default 1).
    #[param(minimum = 1)]
    from_version: Option<i64>,
    /// Page size, 1-1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

type Pairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The global log in ascending position order. `X-Log-Head` is the
/// newest position; `X-Next-After` the cursor for the next page.
#[utoipa::path(get, path = "/events", tag = "log", params(LogQuery),
    responses(
        (status = 200, body = [LogEvent], description = "events after `after`, oldest first",
         headers(("X-Log-Head" = i64, description = "the newest committed position"),
                 ("X-Next-After" = i64, description = "pass as `after` for the next page"))),
        (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_CURSOR, INVALID_LIMIT, INVALID_WALLET_ID, INVALID_EVENT_TYPE, INVALID_QUERY"),
        (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE")))]
pub async fn log(State(app): State<Arc<AppState>>, query: Pairs) -> Result<Response, Problem> {
    let pairs = query.map_err(bad_query)?.0;
    let (after, filter) = log_query(&pairs, None)?;
    let limit = limit(&pairs)?;
    let filter = &filter;
    let (head, events) = log_page(&app, after, |store| async move {
        let head = store.head_position().await?;
        Ok((head, store.read_log(after, limit, filter).await?))
    })
    .await?;
    Ok(page(&events, head, after))
}

/// One wallet's stream, oldest first.
#[utoipa::path(get, path = "/wallet/{id}/events", tag = "log",
    params(super::doc::WalletIdParam, StreamQuery),
    responses(
        (status = 200, body = [LogEvent], description = "the wallet's events from `fromVersion`",
         headers(("X-Log-Head" = i64, description = "the newest committed position"))),
        (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_WALLET_ID, INVALID_CURSOR, INVALID_LIMIT, INVALID_QUERY"),
        (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE")))]
pub async fn wallet_events(
    State(app): State<Arc<AppState>>,
    WalletPath(wallet): WalletPath,
    query: Pairs,
) -> Result<Response, Problem> {
    let pairs = query.map_err(bad_query)?.0;
    let from = match value(&pairs, "fromVersion") {
        None => 1,
        // Versions are stored as BIGINT: above i64::MAX is no version.
        Some(t) => t
            .parse::<i64>()
            .ok()
            .filter(|v| *v >= 1)
            .ok_or_else(|| Problem::bad_request("INVALID_CURSOR", "fromVersion must be a stream version (>= 1)"))?
            as u64,
    };
    let limit = limit(&pairs)?;
    let wallet = &wallet;
    let (head, events) = log_page(&app, 0, |store| async move {
        let head = store.head_position().await?;
        Ok((head, store.read_stream_page(wallet, from - 1, limit).await?))
    })
    .await?;
    Ok(page(&events, head, 0))
}

/// Server-Sent Events: every event after `after` (or `Last-Event-ID`),
/// then the live ones as they commit. `id:` is the position. A consumer
/// too slow for the live tail gets a final `resume` event naming the
/// position to reconnect after. A comment every 15 s keeps it open.
#[utoipa::path(get, path = "/events/stream", tag = "log", params(LogQuery,
        ("Last-Event-ID" = Option<i64>, Header, nullable = false, minimum = 0, description = "resume after this position (wins over `after`)")),
    responses(
        (status = 200, content_type = "text/event-stream", body = String,
         description = "`id: <position>` and `data: <LogEvent JSON>` per event; `event: resume` with `{\"after\": P}` before the server closes a stream it cut"),
        (status = 400, body = ProblemBody, content_type = "application/problem+json", description = "INVALID_CURSOR, INVALID_WALLET_ID, INVALID_EVENT_TYPE, INVALID_QUERY"),
        (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE: too many subscribers")))]
pub async fn stream(State(app): State<Arc<AppState>>, headers: HeaderMap, query: Pairs) -> Result<Response, Problem> {
    let pairs = query.map_err(bad_query)?.0;
    let last_event_id = headers.get("last-event-id").map(|v| v.to_str().unwrap_or("x"));
    let (after, filter) = log_query(&pairs, last_event_id)?;
    let subscription = app.feed.subscribe().await.map_err(|e| match e {
        FeedError::Full => Problem::unavailable("too many subscribers to the log, retry shortly"),
        FeedError::Store(e) => e.into(),
    })?;
    let deliveries = feed::follow(app.feed.reader().clone(), subscription, after, filter);
    // The frames are made once per event for all subscribers: a run of them
    // goes out as one chunk, with no per-subscriber formatting.
    let body = Body::from_stream(deliveries.map(|d| Ok::<Bytes, Infallible>(sse_chunk(d))));
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            // Tell buffering proxies (nginx) to pass each chunk on at once.
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        body,
    )
        .into_response())
}

fn sse_chunk(delivery: Delivery) -> Bytes {
    match delivery {
        Delivery::Events(run) if run.len() == 1 => run[0].frame.clone(),
        Delivery::Events(run) => {
            let mut chunk = BytesMut::with_capacity(run.iter().map(|i| i.frame.len()).sum());
            for item in &run {
                chunk.extend_from_slice(&item.frame);
            }
            chunk.freeze()
        }
        Delivery::Heartbeat => Bytes::from_static(b": heartbeat\n\n"),
        Delivery::Resume(after) => resume(after, "too slow for the live tail"),
        Delivery::Failed(after) => resume(after, "the log could not be read"),
    }
}

fn resume(after: Position, reason: &str) -> Bytes {
    let data = serde_json::json!({"after": after, "reason": reason});
    format!("event: resume\ndata: {data}\n\n").into()
}

/// `after` (or the `Last-Event-ID` header, which wins) and the filters.
fn log_query(pairs: &[(String, String)], last_event_id: Option<&str>) -> Result<(Position, LogFilter), Problem> {
    let bad_after = || {
        Problem::bad_request(
            "INVALID_CURSOR",
            "after (and Last-Event-ID) must be a log position (>= 0)",
        )
    };
    let after = match last_event_id.or(value(pairs, "after")) {
        None => 0,
        Some(t) => t.parse::<Position>().ok().filter(|p| *p >= 0).ok_or_else(bad_after)?,
    };
    let wallet = value(pairs, "walletId")
        .map(|w| WalletId::parse(w).map_err(|e| Problem::bad_request("INVALID_WALLET_ID", format!("walletId: {e}"))))
        .transpose()?;
    let mut types = Vec::new();
    for (_, t) in pairs.iter().filter(|(k, _)| k == "type") {
        if !crate::aggregate::EVENT_TYPES.contains(&t.as_str()) {
            return Err(Problem::bad_request(
                "INVALID_EVENT_TYPE",
                format!("type must be one of {}", crate::aggregate::EVENT_TYPES.join(", ")),
            ));
        }
        types.push(t.clone());
    }
    Ok((after, LogFilter { wallet, types }))
}

fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn limit(pairs: &[(String, String)]) -> Result<u32, Problem> {
    match value(pairs, "limit") {
        None => Ok(DEFAULT_LIMIT),
        Some(t) => t
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| Problem::bad_request("INVALID_LIMIT", "limit must be an integer from 1 to 1000")),
    }
}

fn bad_query(e: QueryRejection) -> Problem {
    Problem::bad_request("INVALID_QUERY", e.body_text())
}

/// A JSON array of events with the log's head and the next cursor.
fn page(events: &[RecordedEvent], head: Position, after: Position) -> Response {
    let items: Vec<LogEvent> = events.iter().map(LogEvent::of).collect();
    let body = serde_json::to_string(&items).expect("log events serialise");
    let next = events.last().map_or(after, |e| e.position);
    let mut response = (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response();
    response.headers_mut().insert("x-log-head", HeaderValue::from(head));
    response.headers_mut().insert("x-next-after", HeaderValue::from(next));
    response
}
