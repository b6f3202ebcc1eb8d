//! Liveness, readiness and the catch-all answers.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

use super::problem::{Problem, ProblemBody};
use super::AppState;

/// The process is up.
#[utoipa::path(get, path = "/health", tag = "system", responses((status = 200, description = "alive"),
              (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "UNAVAILABLE (retry after Retry-After)")))]
pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Longest `/ready` waits for the broker.
const BROKER_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// The process can serve: the committer is making progress, the database
/// answers, the relay running here is getting its messages confirmed, and
/// the broker answers when one is configured.
#[utoipa::path(get, path = "/ready", tag = "system",
    responses((status = 200, description = "ready"), (status = 503, body = ProblemBody, content_type = "application/problem+json", description = "committer stalled, database or broker unreachable, or the relay's messages unconfirmed for longer than RELAY_STALL_AFTER")))]
pub async fn ready(State(app): State<Arc<AppState>>) -> Result<Json<Value>, Problem> {
    // The write path first: a committer stuck on a silent database is not
    // ready even when a fresh connection would answer.
    app.ledger.committer_status().map_err(Problem::unavailable)?;
    // Likewise the relay: a fresh broker connection can answer while the
    // relay's own connection is half-open and nothing gets published.
    if let Some(age) = app.relay.as_ref().and_then(|r| r.stalled_for()) {
        return Err(Problem::unavailable(format!(
            "the relay has waited {} ms for the broker to confirm a message",
            age.as_millis()
        )));
    }
    app.store.ping().await?;
    app.store
        .check_quorum(app.ledger.required_sync_standbys())
        .await
        .map_err(|e| Problem::unavailable(e.to_string()))?;
    if let Some((url, _)) = &app.broker {
        match tokio::time::timeout(BROKER_CHECK, crate::broker::any_node_answers(url, BROKER_CHECK)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if e.is_misconfiguration() => {
                return Err(Problem::unavailable(format!(
                    "the message broker refuses this configuration: {e}"
                )))
            }
            Ok(Err(e)) => return Err(Problem::unavailable(format!("the message broker is unreachable: {e}"))),
            Err(_) => return Err(Problem::unavailable("the message broker did not answer in time")),
        }
        return Ok(Json(
            json!({"status": "ready", "database": app.store.backend(), "broker": "ok"}),
        ));
    }
    Ok(Json(json!({"status": "ready", "database": app.store.backend()})))
}

pub async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "NOT_FOUND", "no such route")
}

pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "method not allowed on this route",
    )
}

/// Marks a probe's answer (`/health`, `/ready`): logged at DEBUG, not INFO.
#[derive(Debug, Clone, Copy)]
pub struct Probe;

pub async fn mark_probe(mut response: Response) -> Response {
    response.extensions_mut().insert(Probe);
    response
}
