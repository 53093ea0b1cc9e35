//! Operations endpoints: `/healthz` (the process answers), `/readyz` (the
//! store, the event log's Redis and the JWKS answer) and `/metrics`.
//!
//! The authorization hook is not a readiness probe: one slow application
//! would take every instance of a fleet out of its load balancer at once,
//! and the clients, whose subscribes are answered `Unavailable` meanwhile,
//! could not even connect. `/readyz` names its circuit's state
//! (`accessHook`) without changing its status.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::telemetry::Metrics;

/// A readiness probe of one dependency: `Ok` when it answers.
pub type Probe = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What the operations endpoints need.
#[derive(Clone)]
pub struct OpsState {
    pub metrics: Arc<Metrics>,
    /// Named probes; `/readyz` is 200 when all of them answer.
    pub probes: Vec<(&'static str, Probe)>,
    /// The authorization hook's circuit state, when herald has a hook:
    /// reported, never failing readiness.
    pub access_hook: Option<HookReporter>,
}

/// Tells the authorization hook's circuit state (`closed`, `half-open`, `open`).
pub type HookReporter = Arc<dyn Fn() -> &'static str + Send + Sync>;

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The operations routes.
pub fn router(state: OpsState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    let mut failing = serde_json::Map::new();
    for (name, probe) in &state.probes {
        let result = tokio::time::timeout(PROBE_TIMEOUT, probe()).await;
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(dependency = name, error = %error, "not ready");
        failing.insert((*name).to_owned(), json!("unavailable"));
    }
    let (status, mut body) = if failing.is_empty() {
        (StatusCode::OK, json!({ "status": "ready" }))
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, json!({ "status": "not ready", "failing": failing }))
    };
    if let Some(report) = &state.access_hook {
        body["accessHook"] = json!({ "circuit": report() });
    }
    (status, Json(body))
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
}
