//! herald: a real-time Socket.IO gateway for campaign world-building
//! applications.
//!
//! Unmodified `socket.io-client` frontends connect with a JWT, subscribe to
//! campaign, settlement and structure rooms, and receive the domain events
//! that backends publish over HTTP.
//!
//! The map of the house:
//!
//! - [`config`]: every setting, from flags and `HERALD_*` variables (each
//!   group in `config/groups.rs`); secrets from the environment or files.
//! - [`users`]: the user id rule (tokens, the revoke API, audiences).
//! - [`auth`]: JWT verification (the handshake, `refresh_token`), token
//!   minting, and the clock of token times.
//! - [`jwks`]: an identity provider's keys (JWKS), fetched and kept fresh.
//! - [`rooms`]: room names and the ids in them, validated at the edge.
//! - [`store`]: the SQL store (SQLite or PostgreSQL): the membership and
//!   hierarchy relations herald reads, the user revocations it writes.
//! - [`access`]: who may join which room (the [`access::Membership`] seam:
//!   the store's relations by default, or the application's authorization
//!   hook over HTTP, `HERALD_ACCESS_URL`, in `access/hook.rs` with its
//!   circuit breaker in `access/circuit.rs`) and whether a token outlived a
//!   user revocation, each answer cached a short while.
//! - [`events`]: the five domain event kinds, their validation and targeting.
//! - [`audience`]: addressed events: the users an event is for, checked at
//!   the edge and kept in the log with it.
//! - [`idempotency`]: idempotency keys, and the keys an in-memory log has seen.
//! - [`event_log`]: the event log (in memory, or Redis Streams a fleet shares,
//!   one per shard of campaigns, and a control stream for revocations):
//!   offsets, retention, idempotent appends, what recovery replays from.
//! - [`delivery`]: the one path every outgoing event takes, from the log to
//!   the sockets in its rooms: the followers of the shards an instance needs,
//!   fan-out, joins and replays, slow consumers.
//! - [`redis_conn`]: a fleet's Redis connections (one shared; one per followed
//!   stream, on a cluster to the node that serves it) and their health.
//! - [`gateway`]: the Socket.IO handlers (the handshake, a socket's life,
//!   `subscribe_*`, `unsubscribe_*`, `refresh_token`, the rate limit) and,
//!   in `gateway/wire.rs`, what goes over the wire.
//! - [`session`]: a socket's own state, and the one place its rooms change.
//! - [`presence`]: who has a room open, per user, fleet-wide (a round every
//!   interval: this instance's members to Redis, the others' back, the
//!   differences to presence sockets), and `GET /v1/presence/{kind}/{id}`.
//! - [`transport`]: a socket's transport below Socket.IO: the requests
//!   socketioxide gets, and closing a transport (not the Socket.IO session)
//!   so that the client comes back.
//! - [`listener`]: the accept loop: `TCP_NODELAY`, bounded request heads and
//!   bodies, bounded control-frame replies, connections herald can close.
//! - [`pending`]: Engine.IO sessions that have not sent CONNECT yet, bounded
//!   per address and in all.
//! - [`publish`]: the HTTP publish API for backends, and its errors and
//!   their statuses (the revoke API shares them).
//! - [`openapi`]: the OpenAPI document of the HTTP API, served at `/v1/openapi.json`.
//! - [`revocation`]: revoking a user's access (the HTTP route, the log entry,
//!   applying it on every instance, remembering user revocations).
//! - [`demo`]: the development demo page and its development-only routes.
//! - [`rate`]: the token bucket behind each socket's event rate limit.
//! - [`expiry`]: cuts each socket when its token expires, on one shared timer.
//! - [`health`]: `/healthz`, `/readyz` (which names the hook's circuit
//!   without failing on it), `/metrics`.
//! - [`telemetry`]: logs (one line each, whatever they quote) and metrics.
//! - [`shutdown`]: the SIGTERM / ctrl-c signal.
//! - [`app`]: builds it all from a config and serves it.

pub mod access;
pub mod app;
pub mod audience;
pub mod auth;
pub mod config;
pub mod delivery;
pub mod demo;
pub mod event_log;
pub mod events;
pub mod expiry;
pub mod gateway;
pub mod health;
pub mod idempotency;
pub mod jwks;
pub mod listener;
pub mod openapi;
pub mod pending;
pub mod presence;
pub mod publish;
pub mod rate;
pub mod redis_conn;
pub mod revocation;
pub mod rooms;
pub mod session;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod users;

pub use app::{Application, BuildError};
pub use config::Config;
