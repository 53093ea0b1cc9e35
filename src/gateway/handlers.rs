//! The client events: one handler dispatches every event a socket sends
//! (`subscribe_*`, `unsubscribe_*`, `refresh_token`), after the rate limit,
//! and acks it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::Value;
use socketioxide::ParserError;
use socketioxide::extract::{AckSender, Event, SocketRef, TryData};

use crate::access::{AccessError, Credential, Decision};
use crate::auth::User;
use crate::delivery::{Delivery, Joined};
use crate::rate::Admission;
use crate::rooms::RoomKind;
use crate::session::{JoinRefused, Session};

use super::Gateway;
use super::wire::{Action, ClientEvent, Refusal, Reply, parse_presence, parse_room_request, parse_since, truncate};

impl Gateway {
    /// Takes a token from the socket's bucket; disconnects a socket that
    /// keeps going past the limit.
    fn admit(&self, s: &SocketRef) -> Result<(), Refusal> {
        let Some(session) = Session::of(s) else { return Ok(()) };
        let admission = session.bucket.lock().admit();
        match admission {
            Admission::Allowed => Ok(()),
            Admission::Refused(strikes) => {
                self.limit_hit("event_rate");
                // Final (a DISCONNECT packet): coming back would be wrong.
                if strikes >= self.limits.rate_limit_strikes && session.end(s, &self.transports) {
                    self.limit_hit("event_rate_disconnect");
                    tracing::info!(
                        socket = session.number,
                        strikes,
                        "disconnecting a socket that ignores the rate limit"
                    );
                }
                Err(Refusal::RateLimited)
            }
        }
    }

    /// One handler answers every client event (a socket keeps one handler
    /// rather than one per event name: less memory per connection).
    pub(super) fn register_handlers(self: &Arc<Self>, s: &SocketRef, delivery: Delivery) {
        let gw = self.clone();
        s.on_fallback(move |s: SocketRef, Event(event): Event, TryData(data): TryData<Value>, ack: AckSender| {
            let gw = gw.clone();
            let delivery = delivery.clone();
            async move {
                if !gw.ready(&s).await {
                    tracing::debug!("an event for a socket whose connect never completed; dropped");
                    return;
                }
                let client_event = ClientEvent::parse(&event);
                let mut ack = Some(ack);
                let reply = match (gw.admit(&s), client_event) {
                    (Err(refused), _) => Err(refused),
                    (Ok(()), Some(ClientEvent::Room(Action::Subscribe, kind))) => {
                        gw.subscribe(&s, kind, &data, &delivery, &mut ack).await
                    }
                    (Ok(()), Some(ClientEvent::Room(Action::Unsubscribe, kind))) => {
                        gw.unsubscribe(&s, kind, &data).map(|()| None)
                    }
                    (Ok(()), Some(ClientEvent::RefreshToken)) => gw.refresh(&s, &data).await.map(|()| None),
                    (Ok(()), None) => {
                        tracing::debug!(event = truncate(&event, 64), "unknown client event");
                        Err(Refusal::UnknownEvent)
                    }
                };
                gw.count_ack(client_event.map_or("unknown", ClientEvent::name), reply.map(drop));
                // A subscription is acked as soon as the socket is in the room
                // (see `Joined`). Without an ack id this sends nothing; a
                // failure means the socket is gone.
                if let Some(ack) = ack {
                    let _ = ack.send(&reply.map_or_else(Reply::refused, Reply::ok));
                }
            }
        });
    }

    /// `refresh_token`: a valid token for the same user moves the socket's deadline.
    async fn refresh(&self, s: &SocketRef, data: &Result<Value, ParserError>) -> Result<(), Refusal> {
        let token = match data {
            Ok(Value::Object(map)) => match map.get("token") {
                Some(Value::String(t)) => t.clone(),
                _ => return Err(Refusal::InvalidPayload),
            },
            _ => return Err(Refusal::InvalidPayload),
        };
        let (Some(current), Some(session)) = (s.extensions.get::<User>(), Session::of(s)) else {
            return Err(Refusal::Unauthorized);
        };
        let fresh = self.verifier.verify(&token).await.map_err(|_| Refusal::Unauthorized)?;
        if fresh.id != current.id {
            tracing::info!(user = &*current.id, "token refresh refused: another user's token");
            return Err(Refusal::Unauthorized);
        }
        if let Err(why) = self.admits(&fresh).await {
            tracing::info!(user = &*current.id, reason = why.reason(), "token refresh refused");
            return Err(Refusal::Unauthorized);
        }
        session.deadline.store(fresh.expires_at.saturating_add(self.token_leeway.as_secs()), Ordering::SeqCst);
        if self.access.wants_token() {
            let token = token.strip_prefix("Bearer ").unwrap_or(&token).to_owned();
            s.extensions.insert(Credential(Arc::new(token.into())));
        }
        s.extensions.insert(fresh);
        tracing::info!(user = &*current.id, "token refreshed");
        Ok(())
    }

    pub(super) fn count_ack(&self, event: &'static str, reply: Result<(), Refusal>) {
        let outcome = match reply {
            Ok(()) => "success",
            Err(why) => why.outcome(),
        };
        self.metrics.acks.get_or_create(&[("event", event), ("outcome", outcome)]).inc();
    }

    async fn subscribe(
        &self,
        s: &SocketRef,
        kind: RoomKind,
        data: &Result<Value, ParserError>,
        delivery: &Delivery,
        ack: &mut Option<AckSender>,
    ) -> Result<Option<bool>, Refusal> {
        let room = parse_room_request(kind, data)?;
        let since = parse_since(data)?;
        let presence = parse_presence(data)?;
        let user = s.extensions.get::<User>().ok_or(Refusal::Unauthorized)?;
        let session = Session::of(s).ok_or(Refusal::Unauthorized)?;
        let revocations = session.revocations();
        let token = s.extensions.get::<Credential>();
        let campaign = match self.access.check(&user.id, &room, token.as_ref()).await {
            Ok(Decision::Allowed(campaign)) => campaign,
            Ok(Decision::Denied) => {
                tracing::info!(user = &*user.id, room = %room, "subscription refused");
                return Err(Refusal::Unauthorized);
            }
            Err(AccessError::Unavailable(failure)) => {
                tracing::info!(user = &*user.id, room = %room, %failure, "subscription unavailable: the authorization hook did not answer");
                return Err(Refusal::Unavailable);
            }
            Err(e) => {
                tracing::error!(
                    user = &*user.id,
                    room = %room,
                    error = %crate::telemetry::error_chain(&e),
                    "membership lookup failed"
                );
                return Err(Refusal::Internal);
            }
        };
        // Checked again at the join (concurrent subscribes); this spares the store a lookup.
        let (already, subscriptions) = session.subscribed(&room);
        if !already && subscriptions >= self.limits.max_subscriptions {
            self.limit_hit("subscriptions");
            return Err(Refusal::TooManySubscriptions);
        }
        if presence {
            self.presence.prime(&room).await;
        }
        // The ack goes out from inside the join, before any later event (and,
        // with presence, before any later presence event).
        let sender = ack.take();
        let (socket, joining, in_session) = (s.clone(), room.clone(), session.clone());
        let joined = Joined::new(move |result| {
            let Some(sender) = sender else { return };
            match result {
                Ok(recovered) if presence => {
                    let entered = in_session.enter_presence(&socket, &joining, |members| {
                        let _ = sender.send(&Reply::with_presence(recovered, members));
                    });
                    // Gone from the room meanwhile (its socket cut): the client comes back.
                    if !entered {
                        tracing::debug!(room = %joining, "left its room before it entered its presence");
                    }
                }
                Ok(recovered) => {
                    let _ = sender.send(&Reply::ok(recovered));
                }
                Err(why) => {
                    let _ = sender.send(&Reply::refused(join_refusal(why)));
                }
            }
        });
        let ticket = session.ticket(campaign, revocations);
        let recovered = delivery.join(s, &room, since, &ticket, &joined).await.map_err(|why| {
            if why == JoinRefused::TooManyRooms {
                self.limit_hit("subscriptions");
            }
            join_refusal(why)
        })?;
        tracing::info!(user = &*user.id, room = %room, subscriptions = session.subscribed(&room).1, ?recovered, "subscribed");
        Ok(recovered)
    }

    fn unsubscribe(&self, s: &SocketRef, kind: RoomKind, data: &Result<Value, ParserError>) -> Result<(), Refusal> {
        let room = parse_room_request(kind, data)?;
        if Session::of(s).is_some_and(|session| session.leave(s, &room)) {
            let user = s.extensions.get::<User>().map(|u| u.id);
            tracing::info!(user = user.as_deref().unwrap_or("?"), room = %room, "unsubscribed");
        }
        Ok(())
    }
}

/// The refusal a subscribe answers when its join did not happen.
fn join_refusal(why: JoinRefused) -> Refusal {
    match why {
        // Gone while the store answered, or cut meanwhile.
        JoinRefused::Closed => Refusal::Internal,
        JoinRefused::Revoked => Refusal::Unauthorized,
        JoinRefused::TooManyRooms => Refusal::TooManySubscriptions,
    }
}
