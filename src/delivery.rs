//! The one path every outgoing domain event takes: from a validated
//! [`Event`] to the sockets in its rooms, through the adapter (local on one
//! instance; Redis across a fleet).
//!
//! A socket in several of an event's rooms gets one copy: the event is
//! emitted once to the union of its rooms.

use std::sync::Arc;

use socketioxide::BroadcastError;
use socketioxide::SocketIo;
use socketioxide::adapter::Adapter;

use crate::events::Event;
use crate::telemetry::Metrics;

/// An event could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The adapter (Redis) is unavailable. `accepted` events of the batch were
    /// handed over before it failed.
    #[error("the adapter is unavailable")]
    AdapterUnavailable { accepted: usize, reason: String },
    /// The event could not be serialized (a bug, never the publisher's fault).
    #[error("the event could not be encoded: {0}")]
    Encode(String),
}

/// Delivers domain events to rooms.
pub struct Delivery<A: Adapter> {
    io: SocketIo<A>,
    metrics: Arc<Metrics>,
}

impl<A: Adapter> Clone for Delivery<A> {
    fn clone(&self) -> Self {
        Delivery { io: self.io.clone(), metrics: self.metrics.clone() }
    }
}

impl<A: Adapter> Delivery<A> {
    /// A delivery path over `io`.
    pub fn new(io: SocketIo<A>, metrics: Arc<Metrics>) -> Self {
        Delivery { io, metrics }
    }

    /// Hands every event to the adapter, in order. Returns how many were
    /// handed over; on an adapter failure, stops and says how many were.
    pub async fn publish(&self, events: &[Event]) -> Result<usize, DeliveryError> {
        for (accepted, event) in events.iter().enumerate() {
            let rooms: Vec<String> = event.rooms.iter().map(ToString::to_string).collect();
            let kind = event.kind();
            match self.io.to(rooms).emit(kind.as_str(), &event.envelope).await {
                Ok(()) => {}
                // Some local sockets could not take it (closed, or buffer full);
                // the others got it. Not the publisher's problem.
                Err(BroadcastError::Socket(errors)) => {
                    tracing::debug!(failed = errors.len(), event = kind.as_str(), "some sockets missed an event");
                }
                Err(BroadcastError::Serialize(e)) => {
                    return Err(DeliveryError::Encode(e.to_string()));
                }
                Err(BroadcastError::Adapter(e)) => {
                    return Err(DeliveryError::AdapterUnavailable { accepted, reason: e.to_string() });
                }
            }
            self.metrics.events_published.get_or_create(&[("type", kind.as_str())]).inc();
        }
        Ok(events.len())
    }
}
