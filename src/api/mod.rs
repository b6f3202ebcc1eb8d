//! The HTTP API (axum): routes, middleware, OpenAPI and Swagger UI.
//!
//! `router` builds the whole application; `serve` runs it until shutdown.
//! Handlers are thin: validate input (`input`), call the ledger or the store,
//! map errors in one place (`problem`).

pub mod access;
mod audit;
mod batch;
mod doc;
mod events;
mod gate;
mod holds;
mod input;
pub mod metrics;
mod problem;
pub mod rate_limit;
mod read_models;
pub mod replicas;
pub mod server;
pub(crate) mod system;
mod wallet;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use axum::error_handling::HandleErrorLayer;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post, put};
use axum::Router;
use tokio::net::TcpListener;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

pub use access::ApiKeys;
use doc::Contract;
pub use problem::{Problem, ProblemBody};
pub use rate_limit::{RateLimits, RateSpec};
pub use server::ServeOptions;

use crate::audit::AuditLog;
use crate::broker::relay::RelayGauges;
use crate::broker::Topology;
use crate::feed::Feed;
use crate::ledger::Ledger;
use crate::projections::Projections;
use crate::store::EventStore;

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest `POST /batch` body: 1,000 operations of about 250 bytes each.
pub const MAX_BATCH_BODY_BYTES: usize = 512 * 1024;
/// Default longest wait of a read-model request for its `minPosition`.
pub const DEFAULT_READ_WAIT: Duration = Duration::from_secs(2);
/// A request taking longer than this is answered 408.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests handled at once by default; beyond it the API answers 503 with
/// `Retry-After` at once instead of queueing without bound.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub ledger: Arc<Ledger>,
    pub store: EventStore,
    pub projections: Arc<Projections>,
    /// Longest a read-model request waits for `minPosition`.
    pub read_wait: Duration,
    /// Who may call what; open when empty.
    pub keys: Arc<ApiKeys>,
    pub max_in_flight: usize,
    /// The relay running in this process, if any (for /metrics).
    pub relay: Option<Arc<RelayGauges>>,
    /// The broker, if configured (for the DLQ depth in /metrics).
    pub broker: Option<(String, Topology)>,
    pub audit: AuditLog,
    /// The log for consumers: pages and the live tail.
    pub feed: Arc<Feed>,
    /// Per-key and per-address budgets (off unless configured).
    pub rate_limits: Arc<RateLimits>,
    /// Standbys for reads (`DATABASE_READ_URL`), if configured.
    pub replicas: Option<Arc<replicas::Replicas>>,
}

impl AppState {
    pub fn new(store: EventStore, projections: Arc<Projections>) -> Self {
        Self::with_ledger(Ledger::new(store.clone()), store, projections)
    }

    /// With a ledger configured by the caller (e.g. its snapshot interval).
    pub fn with_ledger(ledger: Ledger, store: EventStore, projections: Arc<Projections>) -> Self {
        let feed = Feed::new(
            crate::store::standby::LogReader::primary(store.clone()),
            ledger.committed(),
            crate::feed::DEFAULT_MAX_SUBSCRIBERS,
        );
        Self {
            feed: Arc::new(feed),
            ledger: Arc::new(ledger),
            audit: AuditLog::spawn(store.clone()),
            store,
            projections,
            read_wait: DEFAULT_READ_WAIT,
            keys: Arc::new(ApiKeys::open()),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            relay: None,
            broker: None,
            rate_limits: Arc::default(),
            replicas: None,
        }
    }

    /// Reads from these standbys: read models, balances with a position,
    /// log pages and the live tail (`DATABASE_READ_URL`).
    pub fn read_from(&mut self, replicas: Arc<replicas::Replicas>) {
        let reader = crate::store::standby::LogReader::with_standbys(self.store.clone(), replicas.standbys.clone());
        self.feed = Arc::new(Feed::new(
            reader,
            self.ledger.committed(),
            crate::feed::DEFAULT_MAX_SUBSCRIBERS,
        ));
        self.replicas = Some(replicas);
    }

    /// Starts the in-process projection runner (the embedded default), woken
    /// by this state's ledger after each append.
    pub fn spawn_projection_runner(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.projections.clone().run(self.ledger.appended()))
    }

    /// Starts the hold expiry sweeper (`expiry.rs`), looking every `every`.
    pub fn spawn_expiry_sweeper(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(crate::expiry::run(self.ledger.clone(), self.projections.clone(), every))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Wallet service", description = "Event-sourced wallets: every balance is a fold over an append-only log.\n\n\
Any route may also answer, before the request is read: 400 `DUPLICATE_AUTHORIZATION` (more than one \
`Authorization` header), 501 `UNSUPPORTED_TRANSFER_ENCODING` (a `Transfer-Encoding` other than one \
`chunked`; the connection is closed), 429 `RATE_LIMITED` with `Retry-After` (the API key's or the \
client address's budget is spent), 414 `URI_TOO_LONG` (a URI over 8 KiB), 431 `HEADERS_TOO_LARGE` (headers \
over 32 KiB, or more than 100), 400 `MALFORMED_REQUEST` (not parseable as HTTP/1.1), and with API keys \
configured 401 `UNAUTHORIZED` / 403 `FORBIDDEN`. All are `application/problem+json` (`ProblemBody`)."),
    paths(wallet::deposit, wallet::withdraw, wallet::transfer, wallet::balance,
          holds::place, holds::capture, holds::void, holds::limits, read_models::wallet_holds, batch::batch,
          read_models::history, read_models::stats, read_models::wallet_flags, read_models::flags,
          events::log, events::stream, events::wallet_events,
          system::health, system::ready),
    components(schemas(ProblemBody, crate::feed::LogEvent, crate::feed::LogEventMetadata, doc::AmountInput, doc::LimitInput)),
    modifiers(&Contract),
    tags((name = "wallet", description = "Money movements and reads"),
         (name = "holds", description = "Reserve money (authorise), capture or void it; holds expire on their own. Wallet limits."),
         (name = "log", description = "The committed log for consumers: pages, one wallet's stream, a live subscription (SSE). Deduplicate by `position`."),
         (name = "system", description = "Health"))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    // Shared, not copied: axum hands every extractor and middleware its own clone.
    let state = Arc::new(state);
    let x_request_id = axum::http::HeaderName::from_static("x-request-id");
    Router::new()
        .route("/wallet/{id}", get(wallet::balance))
        .route("/wallet/{id}/deposit", post(wallet::deposit))
        .route("/wallet/{id}/withdraw", post(wallet::withdraw))
        .route("/wallet/{id}/transfer", post(wallet::transfer))
        .route("/wallet/{id}/holds", post(holds::place).get(read_models::wallet_holds))
        .route("/wallet/{id}/holds/{holdId}/capture", post(holds::capture))
        .route("/wallet/{id}/holds/{holdId}/void", post(holds::void))
        .route("/wallet/{id}/limits", put(holds::limits))
        .route(
            "/batch",
            post(batch::batch).layer(DefaultBodyLimit::max(MAX_BATCH_BODY_BYTES)),
        )
        .route("/wallet/{id}/history", get(read_models::history))
        .route("/wallet/{id}/stats", get(read_models::stats))
        .route("/wallet/{id}/flags", get(read_models::wallet_flags))
        .route("/flags", get(read_models::flags))
        .route("/events", get(events::log))
        .route("/events/stream", get(events::stream))
        .route("/wallet/{id}/events", get(events::wallet_events))
        .route("/health", get(system::health).layer(axum::middleware::map_response(system::mark_probe)))
        .route("/ready", get(system::ready).layer(axum::middleware::map_response(system::mark_probe)))
        .route("/metrics", get(metrics::render))
        // validatorUrl "none": the page never sends the spec's URL to an
        // outside validator (swagger.io's, the UI's default).
        .merge(
            SwaggerUi::new("/docs")
                .url("/openapi.json", ApiDoc::openapi())
                .config(utoipa_swagger_ui::Config::default().validator_url("none")),
        )
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        // A write is answered truthfully before this limit: the ledger's own
        // deadline is shorter, so the 408 never stands in for a commit.
        .layer(axum::middleware::from_fn_with_state(
            REQUEST_TIMEOUT.max(state.ledger.write_deadline() + Duration::from_secs(1)),
            time_limit,
        ))
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    Problem::unavailable("the service is at capacity, retry shortly")
                }))
                .layer(LoadShedLayer::new())
                // Global: `Router::layer` makes one instance per route, and the cap is for the whole API.
                .layer(GlobalConcurrencyLimitLayer::new(state.max_in_flight)),
        )
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit::record))
        // Outside the audit: what it refuses is never read or recorded in full.
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate::check))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(PropagateRequestIdLayer::new(x_request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    let span = tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id);
                    // The caller's trace continues here (and, through the
                    // events' metadata, in the relay and the worker).
                    let traceparent = req
                        .headers()
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .and_then(crate::audit::valid_traceparent);
                    crate::config::continue_trace(&span, traceparent.as_deref());
                    span
                })
                // Latency as a number (milliseconds, fractional); probes
                // (/health, /ready, every few seconds) only at DEBUG.
                .on_response(|res: &axum::response::Response, latency: Duration, _span: &tracing::Span| {
                    let status = res.status().as_u16();
                    let latency_ms = latency.as_secs_f64() * 1e3;
                    if res.extensions().get::<system::Probe>().is_some() {
                        tracing::debug!(status, latency_ms, "finished processing request");
                    } else {
                        tracing::info!(status, latency_ms, "finished processing request");
                    }
                }),
        )
        .layer(SetRequestIdLayer::new(x_request_id, MakeRequestUuid))
        .with_state(state)
}

/// Answers 408 (problem+json) to a request still running after `limit`.
/// A write never reaches it: the ledger answers every command it handed to
/// the committer (201, 503 `UNAVAILABLE` or 503 `OUTCOME_UNKNOWN`) within
/// its own, shorter deadline.
async fn time_limit(
    axum::extract::State(limit): axum::extract::State<Duration>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "REQUEST_TIMEOUT",
            "the request took too long",
        )
        .into_response(),
    }
}

/// Serves until `shutdown` resolves, then finishes in-flight requests,
/// with the default connection limits (`ServeOptions::default`).
/// Clients' addresses reach the handlers (and the audit) as `ConnectInfo`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, ServeOptions::default(), shutdown).await
}

/// `serve` with explicit header and idle deadlines and connection cap
/// (see `server.rs`).
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    metrics::handle();
    server::run(listener, router(state), options, shutdown).await
}
