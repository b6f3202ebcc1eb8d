//! `/metrics` in Prometheus text format, and the middleware that counts
//! requests.
//!
//! Everything is recorded through the `metrics` facade (the store records
//! append batch sizes, the ledger conflicts); this module installs the
//! Prometheus recorder once per process and, at each scrape, reads the
//! values that live elsewhere: projection checkpoints and lag, parked
//! events, the relay's gauges and the dead-letter queue's depth.

use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::AppState;

/// Latency buckets, in seconds.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Longest a scrape waits for the broker's queue depths.
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(BUCKETS)
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed: then ours is unused.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Counts every request by method, route template and status, and times it.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // A client chooses the method: unknown ones share one label, so the
    // number of series stays bounded.
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS") => m,
        _ => "OTHER",
    }
    .to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("method", method), ("route", route), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels).record(started.elapsed().as_secs_f64());
    response
}

/// GET /metrics
pub async fn render(State(app): State<Arc<AppState>>) -> Response {
    if let Ok(status) = app.projections.status().await {
        for s in status {
            let labels = [("projection", s.name.clone())];
            metrics::gauge!("projection_checkpoint", &labels).set(s.checkpoint as f64);
            metrics::gauge!("projection_lag_events", &labels).set(s.lag as f64);
            metrics::gauge!("projection_parked_events", &labels).set(s.parked as f64);
        }
    }
    if let Some(relay) = &app.relay {
        use std::sync::atomic::Ordering::Relaxed;
        let confirmed = relay.confirmed_position.load(Relaxed);
        metrics::gauge!("relay_active").set(f64::from(u8::from(relay.active.load(Relaxed))));
        metrics::gauge!("relay_confirmed_position").set(confirmed as f64);
        metrics::gauge!("relay_in_flight").set(relay.in_flight.load(Relaxed) as f64);
        metrics::counter!("relay_published_total").absolute(relay.published.load(Relaxed));
        metrics::counter!("relay_sessions_total").absolute(relay.sessions.load(Relaxed));
        if let Ok(head) = app.store.head_position().await {
            metrics::gauge!("relay_lag_events").set((head - confirmed).max(0) as f64);
        }
    }
    if let Some((url, topology)) = &app.broker {
        let status = crate::broker::status(url, topology, &app.store);
        if let Ok(Ok(b)) = tokio::time::timeout(BROKER_TIMEOUT, status).await {
            metrics::gauge!("broker_worker_queue_depth").set(f64::from(b.worker_queue_depth));
            metrics::gauge!("broker_dead_letter_depth").set(f64::from(b.dead_letter_depth));
        }
    }
    if let Some(replicas) = &app.replicas {
        for (standby, replayed, lag) in replicas.standbys.heads() {
            let labels = [("standby", standby.to_owned())];
            metrics::gauge!("wallet_standby_replayed_position", &labels).set(replayed as f64);
            metrics::gauge!("wallet_standby_lag_events", &labels).set(if lag == i64::MAX { -1.0 } else { lag as f64 });
        }
    }
    let mut response = handle().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
