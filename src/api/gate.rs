//! The gate: what is checked before a request's body is read or audited
//! in full, cheapest first.
//!
//! 1. Framing: two `Authorization` headers are a 400
//!    `DUPLICATE_AUTHORIZATION` (which one would count is ambiguous); a
//!    `Transfer-Encoding` other than one `chunked` is a 501
//!    `UNSUPPORTED_TRANSFER_ENCODING` (RFC 9112 §6.1), and the connection
//!    is closed after the answer.
//! 2. The client address's rate limit (not for `/health` and `/ready`).
//! 3. The API key and its scope (`access.rs`): 401 / 403.
//! 4. The key's rate limit.
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

fn admit(app: &AppState, request: &Request) -> Result<(), Response> {
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
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = rate_limited(Exceeded::Key(Duration::from_millis(1200)));
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = rate_limited(Exceeded::Address(Duration::from_millis(1)));
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
