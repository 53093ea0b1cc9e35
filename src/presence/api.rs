//! `GET /v1/presence/{kind}/{id}` (the publish token): a room's members and
//! their connection counts, fleet-wide, for backends.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use secrecy::SecretString;
use serde_json::json;

use crate::rooms::Room;

use super::Presence;

/// What the query needs.
pub struct PresenceApi {
    pub token: SecretString,
    pub presence: Presence,
}

/// The query's route.
pub fn router(state: Arc<PresenceApi>) -> axum::Router {
    axum::Router::new().route("/v1/presence/{kind}/{id}", get(query)).with_state(state)
}

async fn query(
    State(state): State<Arc<PresenceApi>>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
) -> Response {
    if !crate::auth::bearer_matches(&headers, &state.token) {
        let mut response = (StatusCode::UNAUTHORIZED, Json(json!({ "error": "Unauthorized" }))).into_response();
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    }
    let Some(room) = Room::parse(&format!("{kind}:{id}")) else {
        let error = "path: expected /v1/presence/<campaign|settlement|structure>/<id>";
        return (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response();
    };
    match state.presence.members(&room).await {
        Ok(members) => {
            let count = members.len();
            (StatusCode::OK, Json(json!({ "room": room.to_string(), "members": members, "count": count })))
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %crate::telemetry::error_chain(&e), "presence query failed");
            let error = "presence is unavailable (redis)";
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error }))).into_response()
        }
    }
}
