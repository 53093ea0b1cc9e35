//! The development demo: a page at `/` built with herald-client, and the
//! development-only routes it uses. They exist only in development mode with
//! a generated JWT secret (zero setup), never in production and never when a
//! secret is configured: `/dev/bootstrap` hands out tokens to anyone who asks.
//!
//! - `GET /`, `GET /demo/app.js`: the page and its bundle (`assets/demo/`,
//!   built from `client/demo/` by `npm run build:demo`).
//! - `GET /dev/bootstrap`: a fresh token for the demo user and the demo ids.
//! - `POST /dev/publish-demo`: publishes one demo event of a kind (the body
//!   `{"type": "..."}` is optional; `entity_updated` by default).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::auth::Minter;
use crate::delivery::Delivery;
use crate::events::{self, EventKind, Timestamp};
use crate::publish::PublishError;
use crate::store::{DEMO_CAMPAIGN, DEMO_SETTLEMENT, DEMO_STRUCTURE, DEMO_USER};

const INDEX_HTML: &str = include_str!("../assets/demo/index.html");
const APP_JS: &str = include_str!("../assets/demo/app.js");

/// How long a bootstrap token lives; the page asks again on every reconnect.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// What the demo routes need.
pub struct DemoState {
    pub minter: Minter,
    pub delivery: Delivery,
    /// Numbers the demo events, so that each one differs.
    pub counter: AtomicU64,
}

/// The demo routes.
pub fn router(state: Arc<DemoState>) -> axum::Router {
    axum::Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML) }))
        .route("/demo/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/dev/bootstrap", get(bootstrap))
        .route("/dev/publish-demo", post(publish_demo))
        .with_state(state)
}

async fn bootstrap(State(state): State<Arc<DemoState>>) -> Response {
    match state.minter.mint(DEMO_USER, TOKEN_TTL) {
        Ok(token) => (
            [(header::CACHE_CONTROL, "no-store")],
            Json(json!({
                "token": token,
                "userId": DEMO_USER,
                "campaignId": DEMO_CAMPAIGN,
                "settlementId": DEMO_SETTLEMENT,
                "structureId": DEMO_STRUCTURE,
            })),
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot mint a demo token");
            (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": "cannot mint a token" }))).into_response()
        }
    }
}

/// A demo event of `kind`, numbered `n`.
fn demo_event(kind: EventKind, n: u64) -> Value {
    let payload = match kind {
        EventKind::EntityUpdated => json!({
            "entityType": "campaign", "entityId": DEMO_CAMPAIGN, "campaignId": DEMO_CAMPAIGN,
            "changedFields": ["name"], "entityData": { "name": format!("Demo campaign #{n}") },
        }),
        EventKind::StateInvalidated => json!({ "campaignId": DEMO_CAMPAIGN, "scope": "campaign", "reason": "demo" }),
        EventKind::WorldTimeChanged => json!({
            "campaignId": DEMO_CAMPAIGN, "previousTime": null, "newTime": Timestamp::now().as_str(), "elapsed": n,
        }),
        EventKind::SettlementUpdated => json!({
            "campaignId": DEMO_CAMPAIGN, "settlementId": DEMO_SETTLEMENT, "operation": "update",
            "changes": { "population": 100 + n },
        }),
        EventKind::StructureUpdated => json!({
            "campaignId": DEMO_CAMPAIGN, "settlementId": DEMO_SETTLEMENT, "structureId": DEMO_STRUCTURE,
            "operation": "update", "changes": { "level": n },
        }),
    };
    json!({ "type": kind, "payload": payload, "metadata": { "source": "herald-demo" } })
}

async fn publish_demo(State(state): State<Arc<DemoState>>, body: Bytes) -> Response {
    let kind = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(EventKind::EntityUpdated)
    } else {
        #[derive(serde::Deserialize)]
        struct Request {
            #[serde(rename = "type")]
            kind: EventKind,
        }
        serde_json::from_slice::<Request>(&body).map(|r| r.kind)
    };
    let kind = match kind {
        Ok(kind) => kind,
        Err(e) => {
            let error = format!("type: {e}");
            return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
        }
    };
    let n = state.counter.fetch_add(1, Ordering::Relaxed) + 1;
    let event = match events::parse_event(&demo_event(kind, n), "") {
        Ok(event) => event,
        Err(e) => {
            tracing::error!(error = %e, "the demo event is invalid");
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e.to_string() }))).into_response();
        }
    };
    match state.delivery.publish(std::slice::from_ref(&event)).await {
        Ok(published) => (StatusCode::ACCEPTED, Json(json!({ "accepted": published.accepted }))).into_response(),
        Err(e) => {
            let refused = PublishError::from(e);
            refused.log("demo publish refused");
            refused.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_demo_event_is_valid() {
        for kind in EventKind::ALL {
            let event = events::parse_event(&demo_event(kind, 7), "").expect("valid demo event");
            assert_eq!(event.kind(), kind);
            assert_eq!(event.payload.campaign_id().as_str(), DEMO_CAMPAIGN);
        }
    }
}
