//! The publish API: `POST /v1/events`, how backends hand events to the gateway.
//!
//! Checks run in the contract's order: the token (401), the content type
//! (415), the size (413), then the events and the `Idempotency-Key` header
//! (400). A batch is validated whole before anything of it is delivered.
//!
//! What a failure says a backend may do: `503` (the log is unavailable)
//! names the events handed over before it (`accepted`), and none after them
//! was; `504` (the log did not answer in time) adds `unknown`, the events
//! after those that may or may not have been handed over: only an
//! idempotency key makes their retry safe.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use secrecy::SecretString;
use serde_json::json;

use crate::auth::bearer_matches;
use crate::delivery::{Delivery, DeliveryError, Published, RevocationError};
use crate::event_log::LogError;
use crate::events::{self, Event, InvalidEvent};
use crate::idempotency::{self, IdempotencyKey};
use crate::telemetry::Metrics;

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Unauthorized")]
    Unauthorized,
    #[error("expected Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("body over {0} bytes")]
    TooLarge(usize),
    #[error("cannot read the body")]
    BadBody,
    #[error(transparent)]
    Invalid(#[from] InvalidEvent),
    #[error("the event log is unavailable; nothing more was published")]
    Unavailable {
        accepted: usize,
        #[source]
        source: LogError,
    },
    #[error("the event log did not answer in time; the unknown events may still be published")]
    Unknown {
        accepted: usize,
        unknown: usize,
        #[source]
        source: LogError,
    },
    #[error("the membership store is unavailable; nothing was revoked")]
    StoreUnavailable(#[source] RevocationError),
    #[error("internal error")]
    Internal(#[source] serde_json::Error),
}

impl PublishError {
    /// Logs the refusal where it is answered: the client's mistakes at
    /// `info`, herald's dependencies failing at `warn`, with their causes.
    pub(crate) fn log(&self, what: &'static str) {
        let (status, error) = (self.status().as_u16(), crate::telemetry::error_chain(self));
        if self.status().is_server_error() {
            tracing::warn!(status, %error, "{what}");
        } else {
            tracing::info!(status, %error, "{what}");
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            PublishError::Unauthorized => StatusCode::UNAUTHORIZED,
            PublishError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            PublishError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            PublishError::BadBody | PublishError::Invalid(_) => StatusCode::BAD_REQUEST,
            PublishError::Unavailable { .. } | PublishError::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            PublishError::Unknown { .. } => StatusCode::GATEWAY_TIMEOUT,
            PublishError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The one mapping of a delivery failure to the HTTP answer: the log
/// unavailable is a 503 that says how much was handed over, the log silent a
/// 504 that also says how much may have been; an event herald could not
/// encode is its own bug, a 500. The cause is kept, for the handler's log line.
impl From<DeliveryError> for PublishError {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::LogUnavailable { accepted, source } => PublishError::Unavailable { accepted, source },
            DeliveryError::Unknown { accepted, unknown, source } => PublishError::Unknown { accepted, unknown, source },
            DeliveryError::Store(source) => PublishError::StoreUnavailable(source),
            DeliveryError::Encode(source) => PublishError::Internal(source),
        }
    }
}

impl IntoResponse for PublishError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            PublishError::Unavailable { accepted, .. } => {
                json!({ "error": self.to_string(), "accepted": accepted })
            }
            PublishError::Unknown { accepted, unknown, .. } => {
                json!({ "error": self.to_string(), "accepted": accepted, "unknown": unknown })
            }
            _ => json!({ "error": self.to_string() }),
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// What the publish API needs.
pub struct PublishState {
    pub token: SecretString,
    pub max_body_bytes: usize,
    pub delivery: Delivery,
    pub metrics: Arc<Metrics>,
}

/// The publish API's routes.
pub fn router(state: Arc<PublishState>) -> axum::Router {
    axum::Router::new().route("/v1/events", post(publish)).with_state(state)
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

async fn publish(State(state): State<Arc<PublishState>>, headers: HeaderMap, body: Body) -> Response {
    let result = handle(&state, &headers, body).await;
    let status = match &result {
        Ok(_) => StatusCode::ACCEPTED,
        Err(e) => e.status(),
    };
    state.metrics.publish_requests.get_or_create(&[("status", status_label(status))]).inc();
    match result {
        Ok(Published { accepted, duplicates: 0 }) => {
            (StatusCode::ACCEPTED, Json(json!({ "accepted": accepted }))).into_response()
        }
        Ok(Published { accepted, duplicates }) => {
            (StatusCode::ACCEPTED, Json(json!({ "accepted": accepted, "duplicates": duplicates }))).into_response()
        }
        Err(e) => {
            e.log("publish refused");
            e.into_response()
        }
    }
}

fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        202 => "202",
        400 => "400",
        401 => "401",
        413 => "413",
        415 => "415",
        503 => "503",
        504 => "504",
        _ => "500",
    }
}

/// How long a refused body is read (and thrown away) before answering, so
/// that the client, still sending, reads the answer instead of a reset.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// How much of a refused body is read and thrown away at most.
fn drain_cap(limit: usize) -> u64 {
    (limit as u64).saturating_mul(4).max(4 << 20)
}

/// Reads the body, keeping at most `limit` bytes. Past the limit it goes on
/// reading, and discarding, up to `drain_cap` bytes and `DRAIN_TIME`.
async fn read_body(mut body: Body, limit: usize, keep: bool) -> Result<Bytes, PublishError> {
    let mut kept = BytesMut::new();
    let mut seen: u64 = 0;
    let cap = drain_cap(limit);
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return Err(PublishError::BadBody) };
            if let Ok(data) = frame.into_data() {
                seen += data.len() as u64;
                if keep && seen <= limit as u64 {
                    kept.extend_from_slice(&data);
                }
                if seen > cap {
                    break;
                }
            }
        }
        Ok(())
    };
    match tokio::time::timeout(DRAIN_TIME, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        // Too slow: answer anyway.
        Err(_) if seen > limit as u64 || !keep => {}
        Err(_) => return Err(PublishError::BadBody),
    }
    if seen > limit as u64 {
        return Err(PublishError::TooLarge(limit));
    }
    Ok(kept.freeze())
}

fn check_headers(state_token: &SecretString, limit: usize, headers: &HeaderMap) -> Result<(), PublishError> {
    if !bearer_matches(headers, state_token) {
        return Err(PublishError::Unauthorized);
    }
    if !is_json(headers) {
        return Err(PublishError::UnsupportedMediaType);
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(PublishError::TooLarge(limit));
    }
    Ok(())
}

/// The checks every endpoint of this API makes, in the contract's order
/// (401, 415, 413), then the body.
pub(crate) async fn read_checked_body(
    state: &PublishState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, PublishError> {
    let limit = state.max_body_bytes;
    if let Err(refused) = check_headers(&state.token, limit, headers) {
        // Read (and drop) what the client is still sending, bounded, so it sees the answer.
        let _ = read_body(body, limit, false).await;
        return Err(refused);
    }
    read_body(body, limit, true).await
}

/// Gives a body that is one event object the key of the `Idempotency-Key`
/// header, if any: a batch takes a key per event instead (a retry may
/// resend only part of it), and the header may not contradict the event.
fn key_from_header(headers: &HeaderMap, body: &[u8], events: &mut [Event]) -> Result<(), InvalidEvent> {
    let mut values = headers.get_all(idempotency::HEADER).iter();
    let Some(value) = values.next() else { return Ok(()) };
    let refused = |message: String| InvalidEvent { path: "Idempotency-Key".into(), message };
    if values.next().is_some() {
        return Err(refused("given more than once".into()));
    }
    let key = IdempotencyKey::from_header(value.as_bytes()).map_err(|e| refused(e.to_string()))?;
    let one_object = body.trim_ascii_start().first() == Some(&b'{');
    match events {
        [event] if one_object => match &event.key {
            Some(own) if *own != key => Err(refused("differs from the event's idempotencyKey".into())),
            _ => {
                event.key = Some(key);
                Ok(())
            }
        },
        _ => Err(refused("only for a body that is one event: give each event of a batch its idempotencyKey".into())),
    }
}

async fn handle(state: &PublishState, headers: &HeaderMap, body: Body) -> Result<Published, PublishError> {
    let bytes = read_checked_body(state, headers, body).await?;
    let mut events = events::parse_body(&bytes)?;
    key_from_header(headers, &bytes, &mut events)?;
    let published = state.delivery.publish(&events).await?;
    let mut rooms: Vec<String> = events.iter().flat_map(|e| e.rooms.iter().map(ToString::to_string)).collect();
    rooms.dedup();
    tracing::info!(
        events = published.accepted,
        duplicates = published.duplicates,
        types = ?events.iter().map(|e| e.kind().as_str()).collect::<Vec<_>>(),
        rooms = ?rooms,
        "published"
    );
    Ok(published)
}
