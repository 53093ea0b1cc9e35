//! Wiring: builds the whole gateway from a [`Config`], binds the listener and
//! serves until a shutdown future resolves.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use rand::Rng;
use secrecy::SecretString;
use socketioxide::{SocketIo, SocketIoBuilder};
use tokio::net::TcpListener;
use tower::steer::Steer;
use tower::util::{BoxCloneService, BoxCloneSyncService};
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::access::{Access, HookMembership, HookSettings, Membership, StoreMembership};
use crate::auth::{KeyError, Minter, Verifier};
use crate::config::{Config, ConfigError, JwtAlgorithm, Mode};
use crate::delivery::{Delivery, DeliveryLog};
use crate::demo::{self, DemoState};
use crate::event_log::{EventLog, LogError, MemoryLog, Offset, Stream, StreamLog, mark};
use crate::gateway::Gateway;
use crate::health::{self, HookReporter, OpsState, Probe};
use crate::listener::{self, ListenerSettings};
use crate::openapi;
use crate::pending::PendingSessions;
use crate::presence::{self, Presence, api::PresenceApi};
use crate::publish::{self, PublishState};
use crate::redis_conn::{Redis, RedisError};
use crate::revocation;
use crate::session::Session;
use crate::store::{DEMO_USER, SqlStore, StoreError};
use crate::telemetry::Metrics;
use crate::transport::{Engine, SOCKET_IO_PATH, Transports};

/// The gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("JWT key")]
    Key(#[from] KeyError),
    #[error("membership store")]
    Store(#[from] StoreError),
    #[error("redis")]
    Redis(#[from] RedisError),
    #[error("the event log")]
    Log(#[source] LogError),
    #[error("{0}; give this deployment its own HERALD_REDIS_PREFIX (see the README's upgrade notes)")]
    LogClaimed(String),
    #[error("the authorization hook's HTTP client")]
    AccessHook(#[source] reqwest::Error),
    #[error("invalid CORS origin {0:?}")]
    CorsOrigin(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// What development mode generated, for the start-up banner.
pub struct DevCredentials {
    /// A client token for `demo-user`, when the JWT secret was generated.
    pub client_token: Option<String>,
    /// The publish token, when it was generated.
    pub publish_token: Option<SecretString>,
    /// Whether the demo campaign was added to an empty store.
    pub demo_seeded: bool,
}

/// A built gateway, bound to its listener.
pub struct Application {
    listener: TcpListener,
    service: HttpService,
    listener_settings: ListenerSettings,
    closer: Closer,
    store: SqlStore,
    grace: Duration,
    dev: Option<DevCredentials>,
}

/// Disconnects every socket and leaves the fleet.
type Closer = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// What herald serves on every connection.
type HttpService = BoxCloneService<Request<Body>, Response<Body>, BoxError>;

/// The secrets in force, once development mode generated the missing ones.
struct Credentials {
    publish_token: SecretString,
    /// Signs demo tokens: set only in development mode with a generated JWT
    /// secret, where the demo page and its routes are served.
    demo: Option<Minter>,
    /// What development mode generated, for the banner.
    dev: Option<DevCredentials>,
}

/// Step 1: in development mode, generates the secrets that are missing (into
/// `config`); in production they must all be there.
fn credentials(config: &mut Config) -> Result<Credentials, BuildError> {
    let mut credentials = Credentials { publish_token: SecretString::from(""), demo: None, dev: None };
    if config.mode == Mode::Development {
        let mut dev = DevCredentials { client_token: None, publish_token: None, demo_seeded: false };
        if config.auth.jwt_algorithm == JwtAlgorithm::Hs256
            && config.auth.jwt_secret.is_none()
            && config.auth.jwt_jwks_url.is_none()
        {
            let secret = random_secret();
            let minter = Minter::hs256(&secret, config);
            dev.client_token = Some(minter.mint(DEMO_USER, Duration::from_secs(24 * 3600))?);
            credentials.demo = Some(minter);
            config.auth.jwt_secret = Some(secret);
        }
        if config.publish.publish_token.is_none() {
            let token = random_secret();
            dev.publish_token = Some(token.clone());
            config.publish.publish_token = Some(token);
        }
        if dev.client_token.is_some() || dev.publish_token.is_some() {
            credentials.dev = Some(dev);
        }
    }
    credentials.publish_token =
        config.publish.publish_token.clone().ok_or(ConfigError::MissingInProduction("HERALD_PUBLISH_TOKEN"))?;
    Ok(credentials)
}

/// Step 2: the store, with the demo campaign in an empty one when the demo
/// is served.
async fn open_store(config: &Config, credentials: &mut Credentials) -> Result<SqlStore, BuildError> {
    let store = SqlStore::connect(
        &config.store.database_url,
        config.store.database_max_connections,
        config.store.database_migrate,
    )
    .await?;
    if credentials.demo.is_some() {
        let seeded = store.seed_demo_if_empty().await?;
        if let Some(dev) = credentials.dev.as_mut() {
            dev.demo_seeded = seeded;
        }
    }
    Ok(store)
}

/// The event log, opened.
struct OpenedLog {
    log: Arc<dyn EventLog>,
    /// A fleet's Redis (`None`: the log is in memory).
    redis: Option<Redis>,
    /// Where a fleet's control stream stood at start: this instance applies
    /// every revocation logged from there on, however late it first reads it.
    control_from: Option<Offset>,
}

/// Step 3: the event log: in memory for one instance; Redis Streams a fleet
/// shares, refused when another layout of the log holds the prefix (that
/// would split the fleet in silence).
async fn open_log(config: &Config, metrics: &Arc<Metrics>) -> Result<OpenedLog, BuildError> {
    let retention = config.retention();
    let Some(settings) = config.redis() else {
        return Ok(OpenedLog { log: Arc::new(MemoryLog::new(retention)), redis: None, control_from: None });
    };
    let redis = Redis::connect(settings, metrics.clone()).await?;
    let log: Arc<dyn EventLog> = Arc::new(StreamLog::new(redis.clone(), retention, config.fleet.log_shards));
    // (Unreachable: the control follower claims once it reaches Redis.)
    if let Err(LogError::Claimed(why)) = log.claim().await {
        return Err(BuildError::LogClaimed(why));
    }
    let control = log.head(Stream::Control).await.map_err(BuildError::Log)?;
    Ok(OpenedLog { log, redis: Some(redis), control_from: Some(mark(control.epoch, control.last)) })
}

/// The Socket.IO side, wired.
struct SocketIoSide {
    io: SocketIo,
    transports: Arc<Transports>,
    delivery: Delivery,
    presence: Presence,
    /// The authorization hook's circuit, when membership comes from one.
    access_hook: Option<HookReporter>,
}

/// Where membership answers come from: the authorization hook when
/// `HERALD_ACCESS_URL` is set, the store's relations otherwise.
fn membership(
    config: &Config,
    store: &SqlStore,
    metrics: &Arc<Metrics>,
) -> Result<(Arc<dyn Membership>, Option<HookReporter>), BuildError> {
    let ttl = config.store.membership_cache_ttl;
    let hook = &config.access;
    let (Some(url), Some(secret)) = (&hook.access_url, &hook.access_secret) else {
        return Ok((Arc::new(StoreMembership::new(store.clone(), ttl)), None));
    };
    let url = reqwest::Url::parse(url).map_err(|_| ConfigError::AccessUrl)?;
    let host = url.host_str().map(str::to_owned);
    let settings = HookSettings {
        url,
        secret: secret.clone(),
        timeout: hook.access_timeout,
        max_in_flight: hook.access_max_in_flight,
        forward_token: hook.access_forward_token,
        circuit_failures: hook.access_circuit_failures,
        circuit_backoff: hook.access_circuit_backoff,
        cache_ttl: ttl,
    };
    let membership = HookMembership::new(settings, metrics.clone()).map_err(BuildError::AccessHook)?;
    let reporter = membership.circuit_reporter();
    // The host alone: the URL's path, query or user part may hold credentials.
    tracing::info!(
        host = host.as_deref().unwrap_or("?"),
        forward_token = hook.access_forward_token,
        "membership from the authorization hook"
    );
    Ok((Arc::new(membership), Some(reporter)))
}

/// socketioxide's settings: the message size, buffer, heartbeat and connect
/// timeout limits.
fn socketioxide_settings(config: &Config) -> SocketIoBuilder {
    SocketIo::builder()
        .max_payload(config.connections.max_message_bytes)
        .ws_max_message_size(config.connections.max_message_bytes as usize)
        .ws_max_frame_size(config.connections.max_message_bytes as usize)
        .max_buffer_size(config.connections.socket_buffer.max(2))
        // Clients send little: a small read buffer per WebSocket saves 3 KiB per connection.
        .ws_read_buffer_size(1024)
        .req_path(SOCKET_IO_PATH)
        .ping_interval(config.connections.ping_interval)
        .ping_timeout(config.connections.ping_timeout)
        .connect_timeout(config.connections.connect_timeout)
}

/// Step 4: the Socket.IO layer: socketioxide's engine, the transports in
/// front of it, the gateway's handlers, and delivery from the log (its
/// control stream applying revocations from its first entry on).
fn socket_io_side(
    config: &Config,
    verifier: Verifier,
    store: &SqlStore,
    metrics: &Arc<Metrics>,
    opened: &OpenedLog,
) -> Result<SocketIoSide, BuildError> {
    let (layer, io) = socketioxide_settings(config).build_layer();
    let not_found =
        tower::service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(StatusCode::NOT_FOUND.into_response()) });
    let engine: Engine = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_response(|response: Response<_>| response.map(Body::new))
            .service(layer.layer(not_found)),
    );
    let pending = PendingSessions::new(
        config.connections.max_pending_sessions,
        config.connections.max_pending_per_address,
        metrics.clone(),
    );
    let transports = Transports::new(engine, pending);
    let (membership, access_hook) = membership(config, store, metrics)?;
    let access = Access::new(membership, store.clone(), config.store.membership_cache_ttl, config.store.revocation_ttl);
    let cutter = transports.clone();
    let cut: presence::Cut = Box::new(move |socket| {
        if let Some(session) = Session::of(socket) {
            session.cut(socket, &cutter);
        }
    });
    let presence = Presence::start(io.clone(), cut, metrics.clone(), opened.redis.clone(), config.presence());
    let gateway = Gateway::new(
        verifier,
        access,
        metrics.clone(),
        transports.clone(),
        config.limits,
        config.auth.jwt_leeway,
        presence.clone(),
    );
    let delivery_log = DeliveryLog {
        log: opened.log.clone(),
        local: opened.redis.is_none(),
        control_from: opened.control_from,
        apply_wait: config.fleet.redis_timeout.max(Duration::from_secs(5)),
        linger: config.fleet.shard_linger,
    };
    let revocations = gateway.revocations(io.clone());
    let delivery =
        Delivery::new(io.clone(), metrics.clone(), transports.clone(), config.retention(), delivery_log, revocations);
    gateway.attach(&io, delivery.clone());
    Ok(SocketIoSide { io, transports, delivery, access_hook, presence })
}

/// Step 5: what herald serves over HTTP: the Socket.IO endpoint, the
/// publish, revoke and operations routes, the demo in development mode, and
/// CORS in front of all but the preflights' absence.
fn http_service(
    config: &Config,
    side: &SocketIoSide,
    credentials: Credentials,
    metrics: Arc<Metrics>,
    probes: Vec<(&'static str, Probe)>,
) -> Result<HttpService, BuildError> {
    let presence_api =
        Arc::new(PresenceApi { token: credentials.publish_token.clone(), presence: side.presence.clone() });
    let publish_state = Arc::new(PublishState {
        token: credentials.publish_token,
        max_body_bytes: config.publish.max_body_bytes,
        delivery: side.delivery.clone(),
        metrics: metrics.clone(),
    });
    let mut router = publish::router(publish_state.clone())
        .merge(revocation::router(publish_state))
        .merge(presence::api::router(presence_api))
        .merge(health::router(OpsState { metrics, probes, access_hook: side.access_hook.clone() }))
        .merge(openapi::router());
    if let Some(minter) = credentials.demo {
        let demo = DemoState { minter, delivery: side.delivery.clone(), counter: AtomicU64::new(0) };
        router = router.merge(demo::router(Arc::new(demo)));
    }
    let transports = side.transports.clone();
    let socket_io = tower::service_fn(move |request: Request<Body>| transports.clone().serve(request));
    let http = Steer::new(
        [BoxCloneService::new(socket_io), BoxCloneService::new(router)],
        |request: &Request<Body>, _: &[_]| usize::from(!request.uri().path().starts_with(SOCKET_IO_PATH)),
    );
    // Outside the Socket.IO service, so that preflights never reach it.
    let http = ServiceBuilder::new().option_layer(cors_layer(config)?).service(http);
    Ok(BoxCloneService::new(http.map_err(BoxError::from)))
}

/// Disconnects every socket, takes this instance's members out of the
/// fleet's presence, then lets go of Redis.
fn closer(io: SocketIo, presence: Presence, redis: Option<Redis>) -> Closer {
    Arc::new(move || {
        let io = io.clone();
        let presence = presence.clone();
        let redis = redis.clone();
        Box::pin(async move {
            io.close().await;
            presence.goodbye().await;
            if let Some(redis) = redis {
                redis.shutdown();
            }
        })
    })
}

fn random_secret() -> SecretString {
    let bytes: [u8; 32] = rand::rng().random();
    SecretString::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn cors_layer(config: &Config) -> Result<Option<CorsLayer>, BuildError> {
    let origin = if !config.cors_origins.is_empty() {
        let origins = config
            .cors_origins
            .iter()
            .map(|o| HeaderValue::from_str(o.trim()).map_err(|_| BuildError::CorsOrigin(o.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(origins)
    } else if config.mode == Mode::Development {
        AllowOrigin::mirror_request()
    } else {
        return Ok(None);
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(origin)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(AllowHeaders::list([header::AUTHORIZATION, header::CONTENT_TYPE]))
            .allow_credentials(true)
            .max_age(Duration::from_secs(600)),
    ))
}

impl Application {
    /// Builds the gateway and binds its listener. Secrets must already be
    /// resolved into `config` ([`Config::load_secrets`]); in development mode
    /// the missing ones are generated.
    pub async fn build(mut config: Config) -> Result<Self, BuildError> {
        config.validate()?;
        let mut credentials = credentials(&mut config)?;
        let verifier = Verifier::from_config(&config)?;
        let store = open_store(&config, &mut credentials).await?;
        let metrics = Metrics::new();
        let opened = open_log(&config, &metrics).await?;
        let mut probes = vec![("store", store.probe())];
        probes.extend(verifier.probe().map(|probe| ("jwks", probe)));
        let side = socket_io_side(&config, verifier, &store, &metrics, &opened)?;
        probes.extend(opened.redis.as_ref().map(|redis| ("redis", side.delivery.probe(redis.clone()))));
        let dev = credentials.dev.take();
        let service = http_service(&config, &side, credentials, metrics.clone(), probes)?;
        let listener = TcpListener::bind(&config.listen)
            .await
            .map_err(|source| BuildError::Bind { addr: config.listen.clone(), source })?;
        Ok(Application {
            listener,
            service,
            listener_settings: ListenerSettings {
                header_timeout: config.connections.header_timeout,
                body_timeout: config.connections.body_timeout,
                max_control_backlog: config.connections.max_control_backlog,
                metrics,
            },
            closer: closer(side.io, side.presence, opened.redis),
            store,
            grace: config.shutdown_grace,
            dev,
        })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether the demo page and its development-only routes are served.
    pub fn serves_demo(&self) -> bool {
        self.dev.as_ref().is_some_and(|d| d.client_token.is_some())
    }

    /// What development mode generated, if anything.
    pub fn development_credentials(&self) -> Option<&DevCredentials> {
        self.dev.as_ref()
    }

    /// Serves until `shutdown` resolves, then stops accepting, disconnects
    /// every socket and returns, within the grace period.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let Application { listener, service, listener_settings, closer, store, grace, .. } = self;
        let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
        let serving = listener::serve(listener, service, listener_settings, async move {
            shutdown.await;
            let _ = stopping_tx.send(true);
        });
        let closing = {
            let mut stopping = stopping_rx.clone();
            async move {
                if stopping.wait_for(|stopping| *stopping).await.is_ok() {
                    tracing::info!("shutting down: disconnecting every socket");
                    closer().await;
                }
            }
        };
        let deadline = async move {
            let mut stopping = stopping_rx;
            let stopped = stopping.wait_for(|stopping| *stopping).await.is_ok();
            if stopped {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = async { tokio::join!(serving, closing) } => {}
            () = deadline => tracing::warn!(?grace, "grace period over; exiting with connections still open"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), store.close()).await;
        tracing::info!("stopped");
        Ok(())
    }
}
