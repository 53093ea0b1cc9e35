//! Revocations: a user taken out of a campaign's rooms, or out of herald,
//! on every instance, in log order with the events.
//!
//! - `POST /v1/access/revoke` (the publish token) with `{ "userId": "…",
//!   "campaignId": "…" }`: the user's sockets leave the campaign's rooms and
//!   are told `access_revoked`; with `{ "userId": "…" }` alone they are
//!   disconnected (a final DISCONNECT: coming back would be wrong), and every
//!   token of that user issued at or before the revocation (`iat`; a token
//!   without `iat` counts as issued before) is refused from then on, at the
//!   handshake and at `refresh_token`.
//! - A revocation is appended to the event log's control stream, which
//!   every instance follows and applies whole (it forgets the cached
//!   membership, refuses subscribes checked before, takes the user's sockets
//!   out of the rooms, or disconnects them): one entry, whatever the shard
//!   count. An event is delivered only once the instance has applied the
//!   control stream up to where it stood when the event was appended (see
//!   [`crate::event_log`]), so no event published after the revocation's 202
//!   reaches the user in those rooms. The 202 comes once this instance has
//!   applied it.
//! - A user revocation is kept in the membership store
//!   (`herald_user_revocations`) for `HERALD_REVOCATION_TTL`, so it survives
//!   restarts: the instance that receives it writes it there before logging
//!   it (one row per user; expired rows go as new ones come, by an index),
//!   and every instance keeps it in its cache when it applies it.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::{Deserialize, Serialize};
use serde_json::json;
use socketioxide::SocketIo;

use crate::auth::{User, UserId, unix_now};
use crate::delivery::{RevocationError, RevocationFuture, Revocations};
use crate::events::{InvalidEvent, parse_object_body};
use crate::gateway::Gateway;
use crate::publish::{PublishError, PublishState, read_checked_body};
use crate::rooms::{CampaignId, user_room};
use crate::session::Session;

/// The body of `POST /v1/access/revoke`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RevokeRequest {
    pub user_id: UserId,
    /// Absent: the whole user. An explicit `null` is refused.
    #[serde(default, deserialize_with = "crate::events::present")]
    pub campaign_id: Option<CampaignId>,
}

impl RevokeRequest {
    /// Validates a revoke body with the publish API's rules: one JSON object
    /// and nothing after it, no unknown field, `campaignId` a valid id or
    /// absent; the error names the failing field (`userId`, `campaignId`,
    /// `body`).
    pub fn parse(body: &[u8]) -> Result<RevokeRequest, InvalidEvent> {
        parse_object_body(body)
    }
}

/// A revocation, as the event log carries it to every instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Revocation {
    pub user_id: UserId,
    /// Without a campaign: the whole user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign_id: Option<CampaignId>,
    /// When it was made (seconds since the epoch): tokens issued at or before
    /// it are refused.
    #[serde(default)]
    pub revoked_at: u64,
}

/// The revoke API's route.
pub fn router(state: Arc<PublishState>) -> axum::Router {
    axum::Router::new().route("/v1/access/revoke", post(revoke)).with_state(state)
}

async fn revoke(State(state): State<Arc<PublishState>>, headers: HeaderMap, body: Body) -> Response {
    let result = async {
        let bytes = read_checked_body(&state, &headers, body).await?;
        let request = RevokeRequest::parse(&bytes)?;
        let revocation =
            Revocation { user_id: request.user_id, campaign_id: request.campaign_id, revoked_at: unix_now() };
        let json = serde_json::to_string(&revocation).map_err(PublishError::Internal)?;
        state.delivery.revoke(json).await?;
        tracing::info!(user = revocation.user_id.as_str(), campaign = ?revocation.campaign_id, "access revoked");
        Ok::<(), PublishError>(())
    }
    .await;
    match result {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({ "revoked": true }))).into_response(),
        Err(e) => {
            e.log("revocation refused");
            e.into_response()
        }
    }
}

/// What every instance does with revocations: the gateway's, over its sockets.
struct Handler {
    gateway: Arc<Gateway>,
    io: SocketIo,
}

impl Revocations for Handler {
    /// A user's revocation is stored before it is logged.
    fn remember<'a>(&'a self, json: &'a str) -> RevocationFuture<'a, Result<(), RevocationError>> {
        Box::pin(async move {
            let revocation: Revocation = serde_json::from_str(json)?;
            if revocation.campaign_id.is_some() {
                return Ok(());
            }
            let user: Arc<str> = Arc::from(revocation.user_id.as_str());
            self.gateway
                .access
                .remember_user_revocation(&user, revocation.revoked_at)
                .await
                .map_err(|e| Box::new(e) as RevocationError)
        })
    }

    fn apply(&self, json: String) -> RevocationFuture<'_, ()> {
        Box::pin(async move {
            match serde_json::from_str::<Revocation>(&json) {
                Ok(revocation) => self.gateway.apply(&self.io, revocation).await,
                Err(e) => tracing::warn!(error = %e, "event log: a revocation herald cannot read; skipped"),
            }
        })
    }
}

impl Gateway {
    /// What this instance does with revocations (see [`Revocations`]): a
    /// user's is stored before it is logged; every instance applies each
    /// one when it reads it from the control stream.
    pub fn revocations(self: &Arc<Self>, io: SocketIo) -> Arc<dyn Revocations> {
        Arc::new(Handler { gateway: self.clone(), io })
    }

    /// A campaign's revocation: the membership is forgotten, the user's
    /// sockets refuse subscribes checked before, leave the campaign's rooms
    /// and are told `access_revoked`. A user's: this instance's cache
    /// refuses the user's older tokens, and the user's sockets are
    /// disconnected.
    async fn apply(&self, io: &SocketIo, revocation: Revocation) {
        let user: Arc<str> = Arc::from(revocation.user_id.as_str());
        // Its absence from presence is told at once, wherever it was.
        self.presence.revoked(&user);
        let Some(campaign) = revocation.campaign_id else {
            self.access.note_user_revocation(&user, revocation.revoked_at).await;
            // After shutdown the namespace is gone, and so are the sockets.
            let Some(ns) = io.of("/") else { return };
            for s in ns.local().to(user_room(&user)).sockets() {
                // A token issued after the revocation is not revoked (as at the handshake).
                let issued_at = s.extensions.get::<User>().and_then(|u| u.issued_at);
                if issued_at.is_some_and(|iat| iat > revocation.revoked_at) {
                    continue;
                }
                // Final (a DISCONNECT packet): coming back would be wrong.
                let Some(session) = Session::of(&s) else {
                    let _ = s.disconnect();
                    continue;
                };
                if session.end(&s, &self.transports) {
                    tracing::info!(user = &*user, socket = session.number, "access revoked: disconnecting");
                }
            }
            return;
        };
        self.access.forget_membership(&campaign, &user).await;
        let Some(ns) = io.of("/") else { return };
        for s in ns.local().to(user_room(&user)).sockets() {
            let Some(session) = Session::of(&s) else { continue };
            // From here on, a subscribe checked before is refused at its join.
            session.note_revocation(&campaign);
            let left = session.leave_campaign(&s, &campaign);
            let _ = s.emit("access_revoked", &json!({ "campaignId": campaign }));
            tracing::info!(user = &*user, socket = session.number, campaign = %campaign, rooms = left, "access revoked");
        }
    }
}
