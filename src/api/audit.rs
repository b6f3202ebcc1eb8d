//! The audit middleware: records every mutating request in `api_audit` with
//! the status actually returned, and gives the request an audit id that its
//! events carry (`auditId` in their metadata) and the client sees
//! (`X-Audit-Id`).
//!
//! Bounded: the body is kept up to `MAX_AUDIT_BODY` bytes (lossy UTF-8),
//! at most `MAX_HEADERS` headers of at most `MAX_FIELD` characters, the
//! path and ids truncated. `Authorization`, cookies and API-key headers are
//! stored as `[redacted]`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use uuid::Uuid;

use super::problem::Problem;
use super::{AppState, MAX_BATCH_BODY_BYTES, MAX_BODY_BYTES};
use crate::audit::{AuditRecord, AUDIT_ID, TRACEPARENT};

const MAX_AUDIT_BODY: usize = 4096;
/// Longest the body of a mutating request may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// An oversize body is read (and dropped) up to this many bytes before the 413.
const DRAIN_BYTES: usize = 1 << 20;
const MAX_HEADERS: usize = 50;
const MAX_FIELD: usize = 256;
const MAX_PATH: usize = 512;
const REDACTED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
];

/// `text` cut to `max` characters (plus "…"); borrowed when it fits.
fn truncate(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &text[..cut])),
        None => Cow::Borrowed(text),
    }
}

/// The headers as a JSON object, written straight into the string: the
/// audit is on every write's path, so no intermediate map. A header sent
/// several times is one entry, its values joined by ", " (as HTTP reads it).
fn headers_json(headers: &HeaderMap) -> String {
    struct Bounded<'a>(&'a HeaderMap);
    impl serde::Serialize for Bounded<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut map = s.serialize_map(None)?;
            for name in self.0.keys().take(MAX_HEADERS) {
                if REDACTED.contains(&name.as_str()) {
                    map.serialize_entry(name.as_str(), "[redacted]")?;
                    continue;
                }
                let mut values = self
                    .0
                    .get_all(name)
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()));
                let first = values.next().unwrap_or_default();
                let joined: Cow<str> = values.fold(first, |all, v| format!("{all}, {v}").into());
                map.serialize_entry(name.as_str(), &truncate(&joined, MAX_FIELD))?;
            }
            map.end()
        }
    }
    serde_json::to_string(&Bounded(headers)).unwrap_or_else(|_| "{}".to_owned())
}

/// `{id}` of `/wallet/{id}/...`, bounded.
fn wallet_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/wallet/")?;
    let id = rest.split('/').next().filter(|s| !s.is_empty())?;
    Some(truncate(id, 128).into_owned())
}

/// The body, at most `limit` bytes (`MAX_BODY_BYTES`; a batch's larger). A longer one is read on (and
/// discarded) up to `DRAIN_BYTES` before the 413, so a client still sending
/// gets the answer instead of a reset connection.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Problem> {
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut seen = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Problem::bad_request("INVALID_REQUEST", format!("could not read the body: {e}")))?;
        seen += chunk.len();
        if seen <= limit {
            kept.extend_from_slice(&chunk);
        } else if seen > DRAIN_BYTES {
            break;
        }
    }
    if seen > limit {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("request body is larger than {limit} bytes"),
        ));
    }
    Ok(Bytes::from(kept))
}

/// The record of a mutating request refused before its body was read
/// (by the gate: framing, rate limit, API key): no body and no headers,
/// only what identifies it and the sizes it declared, so a flood of them
/// stays small.
pub(super) fn refused(request: &Request, status: StatusCode, took: std::time::Duration) -> AuditRecord {
    let headers = request.headers();
    let declared = |name: axum::http::HeaderName| {
        headers
            .get(&name)
            .map(|v| (name, truncate(&String::from_utf8_lossy(v.as_bytes()), 64).into_owned()))
    };
    let sizes: serde_json::Map<String, serde_json::Value> = [
        declared(axum::http::header::CONTENT_LENGTH),
        declared(axum::http::header::TRANSFER_ENCODING),
    ]
    .into_iter()
    .flatten()
    .map(|(name, value)| (name.as_str().to_owned(), value.into()))
    .collect();
    let path = truncate(request.uri().path(), MAX_PATH).into_owned();
    AuditRecord {
        audit_id: Uuid::now_v7(),
        recorded_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        method: truncate(request.method().as_str(), 16).into_owned(),
        wallet_id: wallet_of(&path),
        path,
        status: status.as_u16(),
        request_id: headers
            .get("x-request-id")
            .map(|v| truncate(&String::from_utf8_lossy(v.as_bytes()), 128).into_owned()),
        client_ip: request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string()),
        headers: serde_json::Value::Object(sizes).to_string(),
        body: String::new(),
        duration_ms: took.as_millis() as i64,
    }
}

pub async fn record(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let started = Instant::now();
    let audit_id = Uuid::now_v7();
    let (parts, body) = request.into_parts();
    let client_ip = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string());
    let path = truncate(parts.uri.path(), MAX_PATH).into_owned();
    let request_id = parts
        .headers
        .get("x-request-id")
        .map(|v| truncate(&String::from_utf8_lossy(v.as_bytes()), 128).into_owned());
    let headers = headers_json(&parts.headers);
    let method = parts.method.as_str().to_owned();
    let traceparent = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::audit::valid_traceparent);

    // The handler and the audit record run in a task of their own: a
    // client that disconnects mid-request cancels this future, but the
    // events its request committed still get their audit row.
    let work = async move {
        // Buffer the body (bounded, and within the request timeout, which
        // only starts inside) to record it, then hand it on unchanged.
        let limit = if path == "/batch" {
            MAX_BATCH_BODY_BYTES
        } else {
            MAX_BODY_BYTES
        };
        let (bytes, response) = match tokio::time::timeout(BODY_TIMEOUT, read_body(body, limit)).await {
            Ok(Ok(bytes)) => {
                let request = Request::from_parts(parts, Body::from(bytes.clone()));
                let handled = TRACEPARENT.scope(traceparent, next.run(request));
                (bytes, AUDIT_ID.scope(audit_id, handled).await)
            }
            Ok(Err(problem)) => (Bytes::new(), problem.into_response()),
            Err(_) => (
                Bytes::new(),
                Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "REQUEST_TIMEOUT",
                    "the request body was too slow to arrive",
                )
                .into_response(),
            ),
        };
        let shown = &bytes[..bytes.len().min(MAX_AUDIT_BODY)];
        app.audit
            .record(AuditRecord {
                audit_id,
                recorded_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                method,
                wallet_id: wallet_of(&path),
                path,
                status: response.status().as_u16(),
                request_id,
                client_ip,
                headers,
                body: String::from_utf8_lossy(shown).into_owned(),
                duration_ms: started.elapsed().as_millis() as i64,
            })
            .await;
        response
    };
    // The task keeps the request's span, so the handler's spans join its trace.
    let mut response = match tokio::spawn(tracing::Instrument::in_current_span(work)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, %audit_id, "request task failed");
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "the request failed").into_response()
        }
    };
    if let Ok(value) = HeaderValue::from_str(&audit_id.to_string()) {
        response.headers_mut().insert("x-audit-id", value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_sizes_bounded() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer secret"));
        h.insert("cookie", HeaderValue::from_static("s=1"));
        h.insert("x-long", HeaderValue::from_str(&"a".repeat(10_000)).unwrap());
        let json: serde_json::Value = serde_json::from_str(&headers_json(&h)).unwrap();
        assert_eq!(json["authorization"], "[redacted]");
        assert_eq!(json["cookie"], "[redacted]");
        h.append("accept", HeaderValue::from_static("a/b"));
        h.append("accept", HeaderValue::from_static("c/d"));
        let json: serde_json::Value = serde_json::from_str(&headers_json(&h)).unwrap();
        assert_eq!(json["accept"], "a/b, c/d");
        assert!(json["x-long"].as_str().unwrap().chars().count() <= MAX_FIELD + 1);
        assert_eq!(wallet_of("/wallet/alice/deposit").as_deref(), Some("alice"));
        assert_eq!(wallet_of("/flags"), None);
        assert_eq!(
            wallet_of(&format!("/wallet/{}/x", "b".repeat(1000)))
                .unwrap()
                .chars()
                .count(),
            129
        );
    }
}
