//! Wiring: builds the whole gateway from a [`Config`], binds the listener and
//! serves until a shutdown future resolves.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use std::convert::Infallible;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use axum::response::IntoResponse;
use rand::Rng;
use secrecy::SecretString;
use socketioxide::SocketIo;
use socketioxide::layer::SocketIoLayer;
use tokio::net::TcpListener;
use tower::steer::Steer;
use tower::util::BoxCloneService;
use tower::{BoxError, Layer, ServiceBuilder, ServiceExt};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::access::{Access, StoreMembership};
use crate::auth::{KeyError, Minter, Verifier};
use crate::config::{Config, ConfigError, JwtAlgorithm, Mode};
use crate::delivery::{Delivery, DeliveryLog};
use crate::demo::{self, DemoState};
use crate::gateway::Gateway;
use crate::health::{self, OpsState, Probe};
use crate::listener::{self, ListenerSettings};
use crate::log::{EventLog, LogError, MemoryLog, StreamLog};
use crate::pending::PendingSessions;
use crate::publish::{self, PublishState};
use crate::redis::{Redis, RedisError};
use crate::revocation;
use crate::store::{DEMO_USER, SqlStore, StoreError};
use crate::telemetry::Metrics;
use crate::transport::{self, SOCKET_IO_PATH, Transports};

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
    #[error("{0}; give this deployment its own HERALD_REDIS_PREFIX (see the README's upgrade notes)")]
    LogClaimed(String),
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

/// What [`assemble`] needs besides the adapter.
struct Parts<'a> {
    config: &'a Config,
    metrics: Arc<Metrics>,
    publish_token: SecretString,
    probes: Vec<(&'static str, Probe)>,
    /// Signs demo tokens: set only in development mode with a generated JWT
    /// secret, where the demo page and its routes are served.
    demo: Option<Minter>,
    transports: Arc<Transports>,
}

/// Builds the HTTP side over `io`.
fn assemble(
    io: SocketIo,
    layer: SocketIoLayer,
    delivery: Delivery,
    parts: Parts<'_>,
    redis: Option<Redis>,
) -> Result<(HttpService, Closer), BuildError> {
    let Parts { config, metrics, publish_token, mut probes, demo, transports } = parts;
    let demo = demo.map(|minter| {
        demo::router(Arc::new(DemoState { minter, delivery: delivery.clone(), counter: AtomicU64::new(0) }))
    });
    if let Some(redis) = &redis {
        let (redis, delivery) = (redis.clone(), delivery.clone());
        probes.push((
            "redis",
            Arc::new(move || {
                let answer = match (redis.is_healthy(), delivery.claim_problem()) {
                    (false, _) => Err("redis is unreachable".to_owned()),
                    // Another layout writes the same keys: the fleet is split.
                    (true, Some(why)) => Err(why),
                    (true, None) => Ok(()),
                };
                Box::pin(async move { answer })
            }),
        ));
    }
    let publish_state = Arc::new(PublishState {
        token: publish_token,
        max_body_bytes: config.publish.max_body_bytes,
        delivery,
        metrics: metrics.clone(),
    });
    let ops = OpsState { metrics, probes };
    let mut router =
        publish::router(publish_state.clone()).merge(revocation::router(publish_state)).merge(health::router(ops));
    if let Some(demo) = demo {
        router = router.merge(demo);
    }
    // One Engine.IO engine serves every Socket.IO request, and ends polling
    // sessions for the transports (a `layer` call makes a new engine).
    let not_found =
        tower::service_fn(|_: Request<Body>| async { Ok::<_, Infallible>(StatusCode::NOT_FOUND.into_response()) });
    let engine = layer.layer(not_found);
    {
        let engine = engine.clone();
        transports.set_engine(move |request| {
            let engine = engine.clone();
            Box::pin(async move {
                let _ = engine.oneshot(request).await;
            })
        });
    }
    let socket_io = tower::service_fn(move |request: Request<Body>| {
        let (transports, engine) = (transports.clone(), engine.clone());
        async move {
            match transports.prepare(request) {
                Ok(request) => engine.oneshot(request).await.map(|response| response.map(Body::new)),
                Err(refused) => Ok(transport::refused_handshake(refused)),
            }
        }
    });
    let http = Steer::new(
        [BoxCloneService::new(socket_io), BoxCloneService::new(router)],
        |request: &Request<Body>, _: &[_]| usize::from(!request.uri().path().starts_with(SOCKET_IO_PATH)),
    );
    // Outside the Socket.IO service, so that preflights never reach it.
    let http = ServiceBuilder::new().option_layer(cors_layer(config)?).service(http);
    let closer: Closer = Arc::new(move || {
        let io = io.clone();
        let redis = redis.clone();
        Box::pin(async move {
            io.close().await;
            if let Some(redis) = redis {
                redis.shutdown();
            }
        })
    });
    Ok((BoxCloneService::new(http.map_err(BoxError::from)), closer))
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
        let demo = config.mode == Mode::Development && config.no_secrets_configured();
        let mut dev = None;
        let mut demo_minter = None;
        if config.mode == Mode::Development {
            let mut creds = DevCredentials { client_token: None, publish_token: None, demo_seeded: false };
            if config.auth.jwt_algorithm == JwtAlgorithm::Hs256
                && config.auth.jwt_secret.is_none()
                && config.auth.jwt_jwks_url.is_none()
            {
                let secret = random_secret();
                let minter = Minter::hs256(&secret, &config);
                creds.client_token = Some(minter.mint(DEMO_USER, Duration::from_secs(24 * 3600))?);
                demo_minter = Some(minter);
                config.auth.jwt_secret = Some(secret);
            }
            if config.publish.publish_token.is_none() {
                let token = random_secret();
                creds.publish_token = Some(token.clone());
                config.publish.publish_token = Some(token);
            }
            if creds.client_token.is_some() || creds.publish_token.is_some() {
                dev = Some(creds);
            }
        }
        let publish_token =
            config.publish.publish_token.clone().ok_or(ConfigError::MissingInProduction("HERALD_PUBLISH_TOKEN"))?;
        let verifier = Verifier::from_config(&config)?;

        let store = SqlStore::connect(
            &config.store.database_url,
            config.store.database_max_connections,
            config.store.database_migrate,
        )
        .await?;
        if demo {
            let seeded = store.seed_demo_if_empty().await?;
            if let Some(creds) = dev.as_mut() {
                creds.demo_seeded = seeded;
            }
        }

        let metrics = Metrics::new();
        let listener_metrics = metrics.clone();
        let builder = SocketIo::builder()
            .max_payload(config.connections.max_message_bytes)
            .ws_max_message_size(config.connections.max_message_bytes as usize)
            .ws_max_frame_size(config.connections.max_message_bytes as usize)
            .max_buffer_size(config.connections.socket_buffer.max(2))
            // Clients send little: a small read buffer per WebSocket saves 3 KiB per connection.
            .ws_read_buffer_size(1024)
            .req_path(SOCKET_IO_PATH)
            .ping_interval(config.connections.ping_interval)
            .ping_timeout(config.connections.ping_timeout)
            .connect_timeout(config.connections.connect_timeout);
        let access = Access::new(
            Arc::new(StoreMembership::new(store.clone(), config.store.membership_cache_ttl)),
            store.clone(),
            config.store.membership_cache_ttl,
            config.store.revocation_ttl,
        );
        let jwks_probe = verifier.probe();
        let transports = Transports::new(PendingSessions::new(
            config.connections.max_pending_sessions,
            config.connections.max_pending_per_address,
            metrics.clone(),
        ));
        let gateway =
            Gateway::new(verifier, access, metrics.clone(), transports.clone(), config.limits, config.auth.jwt_leeway);
        let store_probe: Probe = {
            let store = store.clone();
            Arc::new(move || {
                let store = store.clone();
                Box::pin(async move { store.ping().await.map_err(|e| crate::telemetry::error_chain(&e)) })
            })
        };
        let mut probes = vec![("store", store_probe)];
        probes.extend(jwks_probe.map(|probe| ("jwks", probe)));
        let parts = Parts {
            config: &config,
            metrics,
            publish_token,
            probes,
            demo: demo_minter,
            transports: transports.clone(),
        };
        let retention = config.retention();

        // One instance keeps its log in memory; a fleet shares Redis Streams.
        let (log, redis): (Arc<dyn EventLog>, Option<Redis>) = match config.redis() {
            None => (Arc::new(MemoryLog::new(retention)), None),
            Some(settings) => {
                let redis = Redis::connect(settings, parts.metrics.clone()).await?;
                (Arc::new(StreamLog::new(redis.clone(), retention, config.fleet.log_shards)), Some(redis))
            }
        };
        // Another layout on the same keys would split the fleet in silence.
        // (Unreachable: the control follower claims once it reaches Redis.)
        if let Err(LogError::Claimed(why)) = log.claim().await {
            return Err(BuildError::LogClaimed(why));
        }
        let local = redis.is_none();
        let (layer, io) = builder.build_layer();
        let delivery_log = DeliveryLog {
            log,
            local,
            apply_wait: config.fleet.redis_timeout.max(Duration::from_secs(5)),
            linger: config.fleet.shard_linger,
        };
        let delivery = Delivery::new(io.clone(), parts.metrics.clone(), transports, retention, delivery_log);
        delivery.on_revoke(gateway.revocations(io.clone()));
        gateway.attach(&io, delivery.clone());
        let (service, closer) = assemble(io, layer, delivery, parts, redis)?;

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
                metrics: listener_metrics,
            },
            closer,
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
