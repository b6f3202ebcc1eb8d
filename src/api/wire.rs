//! hyper's own answers, rewritten as problem+json.
//!
//! hyper answers a request it cannot parse before any service sees it:
//! 400 (a malformed request line or header), 414 (a URI over 65,534
//! bytes, the most `http::Uri` holds) or 431 (a head larger than the read
//! buffer, `MAX_HEAD_BYTES`, or more than 100 headers), each with an
//! empty body and no hook to change it. So the socket wrapper
//! (`server.rs`) recognises that answer as hyper writes it and sends a
//! problem+json one in its place. Then it closes the way nginx's
//! lingering close does: FIN first, then it reads and discards what the
//! client is still sending for a moment, because closing a socket with
//! unread data resets the connection and the client may lose the answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use super::problem::Problem;

/// hyper's read buffer: no request head (request line and headers) may
/// exceed it. Set explicitly rather than hyper's default (~400 KiB): the
/// gate refuses heads far smaller (`gate::MAX_HEADER_BYTES`) anyway.
pub const MAX_HEAD_BYTES: usize = 128 * 1024;
/// How long a refused connection's remaining input is read and dropped.
const LINGER: Duration = Duration::from_secs(2);
/// ...and how much of it at most.
const LINGER_BYTES: usize = 4 << 20;

/// The problem that stands in for hyper's bare answer of `status`.
pub fn problem(status: u16) -> Option<Problem> {
    let (status, code, detail) = match status {
        400 => (
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "the request line or a header is not valid HTTP/1.1",
        ),
        414 => (
            StatusCode::URI_TOO_LONG,
            "URI_TOO_LONG",
            "the request URI is longer than the server accepts",
        ),
        431 => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "HEADERS_TOO_LARGE",
            "the request's headers are larger than the server accepts, or more than 100",
        ),
        _ => return None,
    };
    Some(Problem::new(status, code, detail))
}

/// If `data` is exactly hyper's automatic answer to an unparseable
/// request (status 400, 414 or 431, `content-length: 0`, no
/// `content-type`: every answer of ours has a body and a type), the
/// bytes to send instead.
fn rewrite(data: &[u8]) -> Option<Vec<u8>> {
    let head = data.strip_prefix(b"HTTP/1.1 ")?.strip_suffix(b"\r\n\r\n")?;
    let head = std::str::from_utf8(head).ok()?;
    if head.contains("\r\n\r\n") {
        return None;
    }
    let mut lines = head.split("\r\n");
    let status = lines.next()?.get(..3)?.parse::<u16>().ok()?;
    let problem = problem(status)?;
    let mut kept = Vec::new();
    let mut empty = false;
    for line in lines {
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("content-type:") {
            return None;
        } else if lower == "content-length: 0" {
            empty = true;
        } else if !lower.starts_with("connection:") {
            kept.push(line);
        }
    }
    if !empty {
        return None;
    }
    metrics::counter!("http_parse_errors_total", "status" => status.to_string()).increment(1);
    let body = serde_json::to_vec(&problem.body()).ok()?;
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n",
        problem.status.as_u16(),
        problem.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    for line in kept {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    Some(out)
}

/// The write side of a connection's socket: passes hyper's bytes through,
/// except its automatic answer (see the module).
#[derive(Default)]
pub struct Writer {
    /// The rewritten answer, and how much of it is sent.
    pending: Vec<u8>,
    sent: usize,
    rewritten: bool,
    shut: bool,
    linger: Option<Pin<Box<Sleep>>>,
    drained: usize,
}

impl Writer {
    pub fn poll_write(
        &mut self,
        stream: &mut TcpStream,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_pending(stream, cx))?;
        if !self.rewritten {
            if let Some(answer) = rewrite(data) {
                tracing::debug!(answer = %String::from_utf8_lossy(&answer[..12]), "rewrote hyper's answer to an unparseable request");
                self.pending = answer;
                self.sent = 0;
                self.rewritten = true;
                // hyper's bytes count as written: ours go out in their place.
                return Poll::Ready(Ok(data.len()));
            }
        }
        Pin::new(stream).poll_write(cx, data)
    }

    pub fn poll_flush(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(stream, cx))?;
        Pin::new(stream).poll_flush(cx)
    }

    pub fn poll_shutdown(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_pending(stream, cx))?;
        if !self.rewritten {
            return Pin::new(stream).poll_shutdown(cx);
        }
        if !self.shut {
            std::task::ready!(Pin::new(&mut *stream).poll_shutdown(cx))?;
            self.shut = true;
            self.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        self.poll_linger(stream, cx)
    }

    /// Sends what is left of the rewritten answer.
    fn poll_pending(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.pending.len() {
            let n = std::task::ready!(Pin::new(&mut *stream).poll_write(cx, &self.pending[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Reads and drops the client's input until it closes, `LINGER`
    /// passes or `LINGER_BYTES` have come.
    fn poll_linger(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    self.drained += buf.filled().len();
                    if self.drained >= LINGER_BYTES {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(_) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return match self.linger.as_mut().map(|s| s.as_mut().poll(cx)) {
                        Some(Poll::Pending) => Poll::Pending,
                        _ => Poll::Ready(Ok(())),
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_bare_answers_are_rewritten() {
        let bare = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Sun, 06 Dec 2026 18:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(rewrite(bare).expect("rewritten")).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{answer}"
        );
        assert!(answer.contains("content-type: application/problem+json\r\n"));
        assert!(answer.contains("date: Sun, 06 Dec 2026 18:00:00 GMT\r\n"));
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["code"], "HEADERS_TOO_LARGE");
        assert_eq!(json["status"], 431);

        let uri = rewrite(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n").unwrap();
        assert!(String::from_utf8(uri).unwrap().contains("\"code\":\"URI_TOO_LONG\""));
        // Our own answers (a type, a body) and other statuses pass through.
        for ours in [
            &b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/problem+json\r\ncontent-length: 0\r\n\r\n"[..],
            b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 10\r\n\r\n",
            b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n{}",
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            b"{\"HTTP/1.1 414\"}",
        ] {
            assert!(rewrite(ours).is_none(), "{}", String::from_utf8_lossy(ours));
        }
    }
}
