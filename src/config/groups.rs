//! The settings, grouped by what they configure: client tokens, the publish
//! API, the store, the fleet, recovery, limits, connections. Each is a flag
//! and a `HERALD_*` variable, with its documentation as its `--help` line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use secrecy::SecretString;

use super::JwtAlgorithm;

/// How client tokens are verified.
#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// File holding the HS256 JWT secret (instead of HERALD_JWT_SECRET).
    #[arg(long, env = "HERALD_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Signature algorithm of client tokens: HS256 (shared secret), RS256 or ES256 (public key).
    #[arg(long, env = "HERALD_JWT_ALGORITHM", value_enum, default_value = "HS256")]
    pub jwt_algorithm: JwtAlgorithm,

    /// PEM public key for RS256 / ES256.
    #[arg(long, env = "HERALD_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Required `iss` claim, checked when set.
    #[arg(long, env = "HERALD_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, checked when set.
    #[arg(long, env = "HERALD_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock leeway for `exp` and `nbf`, and how far in the future `iat` may be.
    #[arg(long, env = "HERALD_JWT_LEEWAY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub jwt_leeway: Duration,

    /// URL (http or https) of the identity provider's JWKS. Each token is verified with the key its
    /// `kid` names, with the one algorithm that key allows (RS*, PS*, ES256, ES384, EdDSA; never HS*).
    /// Excludes the JWT secret, HERALD_JWT_ALGORITHM and HERALD_JWT_PUBLIC_KEY_FILE.
    #[arg(long, env = "HERALD_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,

    /// Shortest time between two periodic JWKS fetches: a shorter `Cache-Control: max-age` is
    /// raised to it, and a document served without max-age is refetched this often.
    #[arg(long, env = "HERALD_JWT_JWKS_MIN_REFRESH", default_value = "1m", value_parser = humantime::parse_duration)]
    pub jwt_jwks_min_refresh: Duration,

    /// Longest time between two periodic JWKS fetches: a longer max-age is cut to it.
    #[arg(long, env = "HERALD_JWT_JWKS_MAX_REFRESH", default_value = "24h", value_parser = humantime::parse_duration)]
    pub jwt_jwks_max_refresh: Duration,

    /// The JWT secret, from HERALD_JWT_SECRET or the secret file.
    #[arg(skip)]
    pub jwt_secret: Option<SecretString>,
}

/// The publish API (and the revoke API, with the same token).
#[derive(Debug, Clone, Args)]
pub struct PublishSettings {
    /// File holding the publish API token (instead of HERALD_PUBLISH_TOKEN).
    #[arg(long, help_heading = "Publish API", env = "HERALD_PUBLISH_TOKEN_FILE")]
    pub publish_token_file: Option<PathBuf>,

    /// Largest publish API body, in bytes.
    #[arg(long, help_heading = "Publish API", env = "HERALD_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How long an event's idempotency key is remembered: an event published again with the
    /// same key (and campaign) within it is stored and delivered once.
    #[arg(long, help_heading = "Publish API", env = "HERALD_IDEMPOTENCY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idempotency_window: Duration,

    /// The publish token, from HERALD_PUBLISH_TOKEN or the token file.
    #[arg(skip)]
    pub publish_token: Option<SecretString>,
}

/// The membership store, and how long its answers are kept.
#[derive(Debug, Clone, Args)]
pub struct StoreSettings {
    /// Membership store: `sqlite://FILE` (created if missing) or `postgres://...`.
    #[arg(long, env = "HERALD_DATABASE_URL", default_value = "sqlite://herald.db")]
    pub database_url: String,

    /// Create the tables in PostgreSQL on start (SQLite always does). Leave off when the
    /// relations are views over the application's tables.
    #[arg(long, env = "HERALD_DATABASE_MIGRATE", default_value_t = false)]
    pub database_migrate: bool,

    /// Most connections in the membership store's pool.
    #[arg(long, env = "HERALD_DATABASE_MAX_CONNECTIONS", default_value_t = 8)]
    pub database_max_connections: u32,

    /// How long a membership or hierarchy lookup is cached.
    #[arg(long, env = "HERALD_MEMBERSHIP_CACHE_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub membership_cache_ttl: Duration,

    /// How long a user-level revocation is remembered (in the membership store): tokens of that
    /// user issued before it are refused for that long. Set it to your tokens' longest lifetime.
    #[arg(long, env = "HERALD_REVOCATION_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub revocation_ttl: Duration,
}

/// The authorization hook: membership answered by the application over HTTP
/// instead of the store's relations.
#[derive(Debug, Clone, Args)]
pub struct AccessHookSettings {
    /// URL (http or https) herald POSTs each membership check to, instead of reading the store's
    /// relations (see the README's authorization hook). Unset: the SQL store answers.
    #[arg(long, help_heading = "Authorization hook", env = "HERALD_ACCESS_URL")]
    pub access_url: Option<String>,

    /// File holding the hook's signing secret (instead of HERALD_ACCESS_SECRET).
    #[arg(long, help_heading = "Authorization hook", env = "HERALD_ACCESS_SECRET_FILE")]
    pub access_secret_file: Option<PathBuf>,

    /// Longest a hook call may take (waiting for a free slot included); past it the subscribe is
    /// answered "Unavailable".
    #[arg(long, help_heading = "Authorization hook", env = "HERALD_ACCESS_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub access_timeout: Duration,

    /// Most hook calls one instance has in flight; a check that finds none free within the
    /// timeout is answered "Unavailable".
    #[arg(long, help_heading = "Authorization hook", env = "HERALD_ACCESS_MAX_IN_FLIGHT", default_value_t = 64)]
    pub access_max_in_flight: usize,

    /// Consecutive failed hook calls after which herald stops calling (the circuit opens).
    #[arg(long, help_heading = "Authorization hook", env = "HERALD_ACCESS_CIRCUIT_FAILURES", default_value_t = 5)]
    pub access_circuit_failures: u32,

    /// How long the circuit stays open before one call probes the hook again.
    #[arg(long, help_heading = "Authorization hook", env = "HERALD_ACCESS_CIRCUIT_BACKOFF", default_value = "5s", value_parser = humantime::parse_duration)]
    pub access_circuit_backoff: Duration,

    /// Send the user's JWT to the hook as `Authorization: Bearer` (for applications that need
    /// its other claims). Off: the hook gets the user id only.
    #[arg(long, help_heading = "Authorization hook", env = "HERALD_ACCESS_FORWARD_TOKEN", default_value_t = false)]
    pub access_forward_token: bool,

    /// The hook's signing secret, from HERALD_ACCESS_SECRET or the secret file.
    #[arg(skip)]
    pub access_secret: Option<SecretString>,
}

/// A fleet of instances over one Redis.
#[derive(Debug, Clone, Args)]
pub struct FleetSettings {
    /// Redis URL for running several instances (`redis://…`, or `redis-cluster://host:port,…`).
    /// Unset: one instance, with its event log in memory.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Prefix of herald's Redis keys (its streams and their epochs), so several deployments can share one Redis.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_REDIS_PREFIX", default_value = "herald")]
    pub redis_prefix: String,

    /// Longest a Redis operation (a publish) may block before it fails.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_REDIS_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Shards of the fleet's event log: each campaign's events go to one shard, and an instance
    /// reads only the shards of the campaigns its sockets subscribe to. Every instance on a
    /// prefix must have the same count; changing it needs a new HERALD_REDIS_PREFIX.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_LOG_SHARDS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub log_shards: u32,

    /// How long an instance keeps reading a shard once none of its sockets is in a room of it.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_LOG_SHARD_LINGER", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shard_linger: Duration,

    /// How often presence makes a round: writes this instance's members (to Redis, in a fleet),
    /// reads the others' and tells presence sockets who joined and left.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_PRESENCE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub presence_interval: Duration,

    /// How long an instance may go without a presence round before its members are dropped from
    /// the fleet's presence (it is taken for dead). At least twice HERALD_PRESENCE_INTERVAL.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_PRESENCE_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub presence_timeout: Duration,

    /// Above this many members (users), a room's presence listeners are told counts only
    /// (`presence_count`, at most one a second) instead of each join and leave.
    #[arg(long, help_heading = "Fleet (Redis)", env = "HERALD_PRESENCE_MAX_MEMBERS", default_value_t = 100)]
    pub presence_max_members: usize,
}

/// What the event log keeps for recovery.
#[derive(Debug, Clone, Args)]
pub struct ReplaySettings {
    /// How long delivered events are kept for recovery (`since`).
    #[arg(long = "replay-window", env = "HERALD_REPLAY_WINDOW", default_value = "5m", value_parser = humantime::parse_duration)]
    pub window: Duration,

    /// How many delivered events are kept for recovery, at most.
    #[arg(long = "replay-max-events", env = "HERALD_REPLAY_MAX_EVENTS", default_value_t = 100_000)]
    pub max_events: usize,

    /// How many bytes of event objects one instance keeps in memory for recovery, at most
    /// (the oldest go first). A fleet keeps its log in Redis instead.
    #[arg(long = "replay-max-bytes", env = "HERALD_REPLAY_MAX_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_bytes: usize,
}

/// Connections and sockets: their buffers, heartbeats and time bounds.
#[derive(Debug, Clone, Args)]
pub struct ConnectionSettings {
    /// Packets one socket may have waiting to be written (memory is taken only while they wait).
    /// A socket whose buffer is full when an event arrives is disconnected (it reconnects and
    /// recovers with `since`) instead of missing it.
    #[arg(long, env = "HERALD_SOCKET_BUFFER", default_value_t = 512)]
    pub socket_buffer: usize,

    /// How often the server pings each client. A client whose buffer stays full is closed at the
    /// next ping, since the ping does not fit either.
    #[arg(long, env = "HERALD_PING_INTERVAL", default_value = "25s", value_parser = humantime::parse_duration)]
    pub ping_interval: Duration,

    /// How long the server waits for a client's pong before closing its connection.
    #[arg(long, env = "HERALD_PING_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub ping_timeout: Duration,

    /// Longest a connection may take to send a complete request head; also how long a kept-alive
    /// connection may sit idle between two requests. Past it, the connection is closed.
    #[arg(long, env = "HERALD_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// Longest a client may take, once its Engine.IO session is open (polling or WebSocket), to
    /// send its Socket.IO CONNECT (with its token). Past it, the session is closed.
    #[arg(long, env = "HERALD_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Largest inbound Socket.IO message (WebSocket message or polling body), in bytes.
    #[arg(long, env = "HERALD_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: u64,

    /// Longest a request body (a long-polling POST, a publish) may take to arrive, from the end
    /// of its head. Past it, the request fails and its connection is closed.
    #[arg(long, env = "HERALD_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// Most Engine.IO sessions that have not sent their Socket.IO CONNECT yet, in all; past it,
    /// new handshakes are answered 503.
    #[arg(long, env = "HERALD_MAX_PENDING_SESSIONS", default_value_t = 2_000)]
    pub max_pending_sessions: usize,

    /// Most such sessions opened from one address (behind a proxy: the proxy's); past it, new
    /// handshakes from that address are answered 429.
    #[arg(long, env = "HERALD_MAX_PENDING_PER_ADDRESS", default_value_t = 256)]
    pub max_pending_per_address: usize,

    /// Bytes of replies to a peer's WebSocket control frames (pongs) that may wait for the peer to
    /// read them; past it, the connection is reset.
    #[arg(long, env = "HERALD_MAX_CONTROL_BACKLOG", default_value_t = 64 * 1024)]
    pub max_control_backlog: u64,
}

/// The limits in force (settings: `HERALD_MAX_CONNECTIONS`, …).
#[derive(Debug, Clone, Copy, Args)]
pub struct Limits {
    /// Most connections per instance; past it, new handshakes are refused.
    #[arg(long, env = "HERALD_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,

    /// Most rooms one socket may be subscribed to.
    #[arg(long, env = "HERALD_MAX_SUBSCRIPTIONS", default_value_t = 128)]
    pub max_subscriptions: usize,

    /// Client events per second one socket may send, on average (a token bucket).
    #[arg(long, env = "HERALD_CLIENT_EVENT_RATE", default_value_t = 20.0)]
    pub client_event_rate: f64,

    /// Client events one socket may send at once (the bucket's size).
    #[arg(long, env = "HERALD_CLIENT_EVENT_BURST", default_value_t = 200.0)]
    pub client_event_burst: f64,

    /// Strikes after which the socket is disconnected: each rate-limited event
    /// adds one, each admitted event takes one away.
    #[arg(long, env = "HERALD_RATE_LIMIT_STRIKES", default_value_t = 100)]
    pub rate_limit_strikes: u32,
}
