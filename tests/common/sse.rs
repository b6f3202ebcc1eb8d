//! A minimal Server-Sent Events client for the tests of `GET /events/stream`.

use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::Value;

/// One item of an SSE stream.
#[derive(Debug)]
pub enum Item {
    Event { id: i64, data: Value },
    Resume(Value),
}

/// A minimal Server-Sent Events reader over a streaming response.
pub struct Sse {
    pub response: reqwest::Response,
    buffer: String,
}

impl Sse {
    pub async fn open(http: &Client, url: &str, last_event_id: Option<i64>) -> Self {
        let mut request = http.get(url);
        if let Some(last) = last_event_id {
            request = request.header("last-event-id", last.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{url}");
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/event-stream"), "{content_type}");
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event (heartbeat comments skipped), `None` at the end or
    /// after `wait` without one.
    pub async fn next(&mut self, wait: Duration) -> Option<Item> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                if let Some(item) = parse(&block) {
                    return Some(item);
                }
                continue;
            }
            match tokio::time::timeout(wait, self.response.chunk()).await {
                Ok(Ok(Some(bytes))) => self.buffer.push_str(std::str::from_utf8(&bytes).unwrap()),
                _ => return None,
            }
        }
    }

    /// Events until one at `head` arrives (or `wait` passes between two).
    pub async fn until(&mut self, head: i64, wait: Duration) -> Vec<(i64, Value)> {
        let mut got = Vec::new();
        while got.last().is_none_or(|(id, _)| *id < head) {
            match self.next(wait).await {
                Some(Item::Event { id, data }) => got.push((id, data)),
                other => panic!("stream ended before position {head}: {other:?} after {:?}", got.last()),
            }
        }
        got
    }
}

pub fn parse(block: &str) -> Option<Item> {
    let (mut id, mut event, mut data) = (None, None, String::new());
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().parse::<i64>().expect("id is a position"));
        } else if let Some(v) = line.strip_prefix("event:") {
            event = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    if data.is_empty() {
        return None; // a comment: the heartbeat
    }
    let data: Value = serde_json::from_str(&data).expect("data is JSON");
    match event.as_deref() {
        Some("resume") => Some(Item::Resume(data)),
        None => Some(Item::Event {
            id: id.expect("an event carries its position as id"),
            data,
        }),
        Some(other) => panic!("unexpected event name {other}"),
    }
}
