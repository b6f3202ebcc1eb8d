//! The probe listener of `worker` and `relay` (`--metrics-bind`): `/health`,
//! `/ready` and `/metrics` on a small HTTP server of their own.
//!
//! `/ready` reads the live state of the path it guards, never a flag set
//! once at start: the broker link is the current session's channel as
//! lapin reports it (`broker::Link`), the database is asked. `/metrics`
//! copies the process's live figures into the same Prometheus recorder
//! `serve` uses, under names prefixed `wallet_`, each with a HELP text.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::api::{self, Problem, ServeOptions};
use crate::broker::relay::{self, RelayGauges};
use crate::broker::worker::WorkerGauges;
use crate::broker::Topology;
use crate::projections::Projections;
use crate::store::EventStore;

/// Longest `/ready` or `/metrics` waits for the database.
const DATABASE_CHECK: Duration = Duration::from_secs(2);

/// Probes come from one scraper and one orchestrator: a few connections,
/// short deadlines.
const OPTIONS: ServeOptions = ServeOptions {
    header_read_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(30),
    max_connections: 32,
};

/// The process a probe listener reports on.
#[derive(Clone)]
pub enum Probed {
    Worker {
        gauges: Arc<WorkerGauges>,
        projections: Arc<Projections>,
    },
    Relay {
        gauges: Arc<RelayGauges>,
        store: EventStore,
        topology: Topology,
    },
}

/// Binds `bind` and serves the probes until `shutdown` resolves; returns
/// the bound address (port 0 picks a free one) and the server's task.
pub async fn spawn(
    bind: SocketAddr,
    probed: Probed,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    describe();
    let router = Router::new()
        .route("/health", get(api::system::health))
        .route("/ready", get(ready))
        .route("/metrics", get(render))
        .fallback(api::system::not_found)
        .with_state(probed);
    tracing::info!(%addr, "probes at /health, /ready and /metrics");
    Ok((
        addr,
        tokio::spawn(api::server::run(listener, router, OPTIONS, shutdown)),
    ))
}

/// GET /ready: 200 with the process's state, or 503 problem+json saying why not.
async fn ready(State(probed): State<Probed>) -> Result<Json<Value>, Problem> {
    match probed {
        Probed::Worker { gauges, projections } => {
            gauges.link.check().map_err(Problem::unavailable)?;
            ping(projections.store()).await?;
            Ok(Json(json!({"status": "ready", "state": "consuming"})))
        }
        Probed::Relay { gauges, store, .. } if !gauges.active.load(Relaxed) => match gauges.standby.load(Relaxed) {
            // Waiting for the lock is this relay's job while another leads,
            // as long as it can reach the database it would lead on.
            true => {
                ping(&store).await?;
                Ok(Json(json!({"status": "ready", "state": "standby"})))
            }
            false => Err(Problem::unavailable(match gauges.link.check() {
                Err(why) if why.contains("database") => why,
                _ => "starting: not yet leading nor standing by".to_owned(),
            })),
        },
        Probed::Relay { gauges, store, .. } => {
            gauges.link.check().map_err(Problem::unavailable)?;
            if let Some(age) = gauges.stalled_for() {
                return Err(Problem::unavailable(format!(
                    "the relay has waited {} ms for the broker to confirm a message",
                    age.as_millis()
                )));
            }
            ping(&store).await?;
            Ok(Json(json!({"status": "ready", "state": "publishing"})))
        }
    }
}

async fn ping(store: &EventStore) -> Result<(), Problem> {
    match tokio::time::timeout(DATABASE_CHECK, store.ping()).await {
        Ok(answer) => Ok(answer?),
        Err(_) => Err(Problem::unavailable("the database did not answer in time")),
    }
}

/// The HELP texts, given once (the recorder keeps them).
fn describe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        api::metrics::handle();
        for (name, help) in COUNTERS {
            metrics::describe_counter!(*name, *help);
        }
        for (name, help) in GAUGES {
            metrics::describe_gauge!(*name, *help);
        }
    });
}

const COUNTERS: &[(&str, &str)] = &[
    (
        "wallet_worker_events_applied_total",
        "Events the worker applied to the read models (redeliveries not counted).",
    ),
    (
        "wallet_worker_dead_letters_total",
        "Messages the worker sent to the dead-letter queue.",
    ),
    (
        "wallet_worker_gap_events_total",
        "Events the broker never delivered (confirmed, then lost) that the worker read from the log instead.",
    ),
    (
        "wallet_worker_sessions_total",
        "Broker sessions the worker set up (1 + reconnects).",
    ),
    (
        "wallet_worker_reconnects_total",
        "Broker sessions the worker set up after its first.",
    ),
    (
        "wallet_relay_published_total",
        "Events the relay published (republished ones count again).",
    ),
    (
        "wallet_relay_sessions_total",
        "Broker sessions the relay set up as leader (1 + reconnects).",
    ),
    (
        "wallet_relay_reconnects_total",
        "Broker sessions the relay set up after its first.",
    ),
];

const GAUGES: &[(&str, &str)] = &[
    (
        "wallet_worker_consuming",
        "1 while the worker's broker channel is open and consuming.",
    ),
    (
        "wallet_projection_checkpoint",
        "Log position each read model has applied up to.",
    ),
    (
        "wallet_projection_lag_events",
        "Log head minus the read model's checkpoint.",
    ),
    (
        "wallet_projection_parked_events",
        "Events held back behind a dead letter of their wallet.",
    ),
    (
        "wallet_relay_active",
        "1 while this relay holds the lock and publishes (the leader).",
    ),
    (
        "wallet_relay_standby",
        "1 while another relay holds the lock and this one waits.",
    ),
    (
        "wallet_relay_connected",
        "1 while the leading relay's broker channel is open.",
    ),
    (
        "wallet_relay_confirmed_position",
        "Log position the broker has confirmed up to (stored checkpoint when standing by).",
    ),
    ("wallet_relay_in_flight", "Messages published and not yet confirmed."),
    ("wallet_relay_lag_events", "Log head minus the confirmed position."),
];

/// GET /metrics
async fn render(State(probed): State<Probed>) -> Response {
    match &probed {
        Probed::Worker { gauges, projections } => record_worker(gauges, projections).await,
        Probed::Relay {
            gauges,
            store,
            topology,
        } => record_relay(gauges, store, topology).await,
    }
    let mut response = api::metrics::handle().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

async fn record_worker(gauges: &WorkerGauges, projections: &Projections) {
    let sessions = gauges.sessions.load(Relaxed);
    metrics::counter!("wallet_worker_events_applied_total").absolute(gauges.applied.load(Relaxed));
    metrics::counter!("wallet_worker_dead_letters_total").absolute(gauges.dead_lettered.load(Relaxed));
    metrics::counter!("wallet_worker_sessions_total").absolute(sessions);
    metrics::counter!("wallet_worker_reconnects_total").absolute(sessions.saturating_sub(1));
    metrics::gauge!("wallet_worker_consuming").set(f64::from(u8::from(gauges.link.check().is_ok())));
    if let Ok(Ok(status)) = tokio::time::timeout(DATABASE_CHECK, projections.status()).await {
        for s in status {
            let labels = [("projection", s.name.clone())];
            metrics::gauge!("wallet_projection_checkpoint", &labels).set(s.checkpoint as f64);
            metrics::gauge!("wallet_projection_lag_events", &labels).set(s.lag as f64);
            metrics::gauge!("wallet_projection_parked_events", &labels).set(s.parked as f64);
        }
    }
}

async fn record_relay(gauges: &RelayGauges, store: &EventStore, topology: &Topology) {
    let active = gauges.active.load(Relaxed);
    let sessions = gauges.sessions.load(Relaxed);
    let flag = |b: bool| f64::from(u8::from(b));
    metrics::gauge!("wallet_relay_active").set(flag(active));
    metrics::gauge!("wallet_relay_standby").set(flag(!active && gauges.standby.load(Relaxed)));
    metrics::gauge!("wallet_relay_connected").set(flag(active && gauges.link.check().is_ok()));
    metrics::gauge!("wallet_relay_in_flight").set(gauges.in_flight.load(Relaxed) as f64);
    metrics::counter!("wallet_relay_published_total").absolute(gauges.published.load(Relaxed));
    metrics::counter!("wallet_relay_sessions_total").absolute(sessions);
    metrics::counter!("wallet_relay_reconnects_total").absolute(sessions.saturating_sub(1));
    let positions = async {
        // A standby has confirmed nothing itself: the leader's stored checkpoint.
        let confirmed = match active {
            true => gauges.confirmed_position.load(Relaxed),
            false => relay::checkpoint(store, topology).await?,
        };
        Ok::<_, crate::broker::BrokerError>((confirmed, store.head_position().await?))
    };
    if let Ok(Ok((confirmed, head))) = tokio::time::timeout(DATABASE_CHECK, positions).await {
        metrics::gauge!("wallet_relay_confirmed_position").set(confirmed as f64);
        metrics::gauge!("wallet_relay_lag_events").set((head - confirmed).max(0) as f64);
    }
}
