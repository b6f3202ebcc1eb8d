//! The gate: what is checked before a request's body is read or audited
//! in full, cheapest first.
//!
//! 1. Size: a URI over 8 KiB is a 414 `URI_TOO_LONG`, headers over 32 KiB
//!    in all a 431 `HEADERS_TOO_LARGE` (what hyper itself cannot parse is
//!    answered in `wire.rs`, with the same codes).
//! 2. Framing: two `Authorization` headers are a 400
//!    `DUPLICATE_AUTHORIZATION` (which one would count is ambiguous); a
//!    `Transfer-Encoding` other than one `chunked` is a 501
//!    `UNSUPPORTED_TRANSFER_ENCODING` (RFC 9112 §6.1), and the connection
//!    is closed after the answer.
//! 3. The client address's rate limit (not for `/health` and `/ready`).
//! 4. The API key and its scope (`access.rs`): 401 / 403.
//! 5. The key's rate limit.
//!
//! A mutating request refused here is audited without its body or
//! headers (method, path, status, client address, declared size), so a
//! flood of unauthenticated requests leaves rows of a few hundred bytes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;
use super::rate_limit::Exceeded;
use super::{access, audit, AppState};

pub async fn check(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    match admit(&app, &request) {
        Ok(()) => next.run(request).await,
        Err(mut response) => {
            if !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
                let record = audit::refused(&request, response.status(), started.elapsed());
                if let Ok(value) = HeaderValue::from_str(&record.audit_id.to_string()) {
                    response.headers_mut().insert("x-audit-id", value);
                }
                app.audit.try_record(record);
            }
            response
        }
    }
}

/// Longest request URI (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// Largest header section accepted (names, values and their separators).
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

fn admit(app: &AppState, request: &Request) -> Result<(), Response> {
    size(request)?;
    framing(request)?;
    let path = request.uri().path();
    if path != "/health" && path != "/ready" {
        if let Some(ConnectInfo(addr)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
            app.rate_limits.check_address(addr.ip()).map_err(rate_limited)?;
        }
    }
    if let Some(key) = access::authenticate(&app.keys, request)? {
        app.rate_limits.check_key(key).map_err(rate_limited)?;
    }
    Ok(())
}

/// Oversized URIs and header sections are refused before anything reads them.
fn size(request: &Request) -> Result<(), Response> {
    let uri = request.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if uri > MAX_URI_BYTES {
        let detail = format!("the request URI is {uri} bytes; at most {MAX_URI_BYTES} are accepted");
        return Err(Problem::new(StatusCode::URI_TOO_LONG, "URI_TOO_LONG", detail).into_response());
    }
    let headers: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers > MAX_HEADER_BYTES {
        let detail = format!("the request's headers are {headers} bytes; at most {MAX_HEADER_BYTES} are accepted");
        return Err(
            Problem::new(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "HEADERS_TOO_LARGE", detail).into_response(),
        );
    }
    Ok(())
}

/// Headers whose meaning is ambiguous are refused rather than guessed.
fn framing(request: &Request) -> Result<(), Response> {
    let headers = request.headers();
    if headers.get_all(header::AUTHORIZATION).iter().nth(1).is_some() {
        return Err(
            Problem::bad_request("DUPLICATE_AUTHORIZATION", "send one Authorization header, not several")
                .into_response(),
        );
    }
    let mut codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|c| c.trim_ascii());
    let only_chunked = match (codings.next(), codings.next()) {
        (None, _) => true,
        (Some(first), None) => first.eq_ignore_ascii_case(b"chunked"),
        _ => false,
    };
    if !only_chunked {
        let mut response = Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "UNSUPPORTED_TRANSFER_ENCODING",
            "the only transfer coding accepted is a single `chunked`",
        )
        .into_response();
        // The body's framing is unknown: nothing after it can be trusted.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(response);
    }
    Ok(())
}

/// 429 with `Retry-After`: whole seconds until a token is back (at least 1).
fn rate_limited(exceeded: Exceeded) -> Response {
    let (limit, wait, whose) = match exceeded {
        Exceeded::Key(wait) => ("key", wait, "this API key"),
        Exceeded::Address(wait) => ("address", wait, "this client address"),
    };
    metrics::counter!("rate_limited_total", "limit" => limit).increment(1);
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let seconds = seconds.max(1);
    let mut response = Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        "RATE_LIMITED",
        format!("too many requests from {whose}; retry after {seconds} s"),
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn with(headers: &[(&str, &str)]) -> Request {
        let mut request = Request::new(axum::body::Body::empty());
        for (name, value) in headers {
            request.headers_mut().append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        request
    }

    fn status(result: Result<(), Response>) -> Option<StatusCode> {
        result.err().map(|r| r.status())
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert_eq!(status(framing(&with(&[]))), None);
        assert_eq!(status(framing(&with(&[("transfer-encoding", "chunked")]))), None);
        assert_eq!(status(framing(&with(&[("transfer-encoding", " Chunked ")]))), None);
        assert_eq!(status(framing(&with(&[("authorization", "Bearer a")]))), None);
        let not_implemented = Some(StatusCode::NOT_IMPLEMENTED);
        for te in ["identity, chunked", "gzip, chunked", "chunked, chunked", "identity"] {
            assert_eq!(
                status(framing(&with(&[("transfer-encoding", te)]))),
                not_implemented,
                "{te}"
            );
        }
        let twice = with(&[("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")]);
        assert_eq!(status(framing(&twice)), not_implemented);
        let two = with(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(status(framing(&two)), Some(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn oversize_uris_and_header_sections_are_refused() {
        let mut request = with(&[("x-fill", &"a".repeat(MAX_HEADER_BYTES - 20))]);
        assert_eq!(status(size(&request)), None);
        request
            .headers_mut()
            .insert("x-more", HeaderValue::from_static("0123456789012345678901234567890"));
        assert_eq!(
            status(size(&request)),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let uri = |n: usize| {
            let mut r = with(&[]);
            *r.uri_mut() = format!("/flags?walletId={}", "w".repeat(n)).parse().unwrap();
            r
        };
        assert_eq!(status(size(&uri(MAX_URI_BYTES - 16))), None);
        assert_eq!(status(size(&uri(MAX_URI_BYTES - 15))), Some(StatusCode::URI_TOO_LONG));
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = rate_limited(Exceeded::Key(Duration::from_millis(1200)));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = rate_limited(Exceeded::Address(Duration::from_millis(1)));
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
