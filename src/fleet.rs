//! Running several instances behind one Redis: a socketioxide-redis
//! [`Driver`] that survives Redis restarts, and keeps "exactly once".
//!
//! - Publishes go through a [`ConnectionManager`] (it reconnects by itself),
//!   or a cluster connection, each bounded by a timeout, so no emit blocks
//!   for long.
//! - Redis Cluster (`redis-cluster://host:port,host:port`): classic pub/sub
//!   messages reach every node, so every instance subscribes on the node that
//!   owns the heartbeat key's slot, where the guard script runs too; the
//!   guard's subscriber count is then the whole fleet's.
//! - Subscriptions live on a dedicated pub/sub connection owned by one task.
//!   When that connection drops, the task reconnects with backoff and
//!   re-subscribes **every** channel before it calls itself healthy again.
//! - No silent loss: every healthy instance keeps a heartbeat in a Redis
//!   sorted set. A broadcast is published by a small Lua script that first
//!   checks that the request channel has at least as many subscribers as
//!   there are live instances; when one is missing (it has not re-subscribed
//!   yet), the publish is refused, and the publish API answers 503 so the
//!   backend retries, rather than reaching some instances and not others.
//! - While this instance's own pub/sub connection is down, publishes are
//!   refused at once (`accepted: 0`): Redis is known to be down.
//! - A Redis restart loses the heartbeats. So after a *re*connection an
//!   instance refuses its own publishes for a short settling period, long
//!   enough for every other instance to reconnect (they retry every
//!   [`MAX_BACKOFF`]) and heartbeat again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use socketioxide_redis::drivers::{ChanItem, Driver, MessageStream};
use tokio::sync::{mpsc, watch};

use crate::telemetry::Metrics;

/// A Redis operation failed or Redis is unreachable.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis is unreachable")]
    Down,
    #[error("{subscribed} of {live} instances are subscribed; refusing a partial broadcast")]
    PartialFleet { subscribed: i64, live: i64 },
}

/// Settings of the fleet driver.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Redis URL.
    pub url: String,
    /// Prefix of every channel and key.
    pub prefix: String,
    /// Longest a publish may take.
    pub op_timeout: Duration,
    /// This instance's unique id (heartbeat member).
    pub instance_id: String,
}

/// How often a healthy instance refreshes its heartbeat, and pings its
/// pub/sub connection.
const HEARTBEAT: Duration = Duration::from_millis(500);
/// How long a heartbeat counts.
const HEARTBEAT_TTL_MS: u64 = 2_000;

/// Publishes `ARGV[2]` on channel `ARGV[1]` only when at least as many
/// clients are subscribed to it as there are live instances in the sorted set
/// `KEYS[1]`. Returns the receiver count, or `-1 - subscribed` when refused;
/// the second element is the live count. (The channel is an argument, not a
/// key, so that a cluster routes the script by the heartbeat key alone.)
const GUARDED_PUBLISH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local live = redis.call('ZCARD', KEYS[1])
local subscribed = redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
if subscribed < live then return {-1 - subscribed, live} end
return {redis.call('PUBLISH', ARGV[1], ARGV[2]), live}
";

/// The subscriber count of channel `ARGV[1]` on the node owning `KEYS[1]`.
const NUMSUB_SCRIPT: &str = r"
return redis.call('PUBSUB', 'NUMSUB', ARGV[1])[2]
";

/// A connection: one Redis (reconnecting, or plain), or a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Plain(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where to open the pub/sub connection.
#[derive(Clone)]
enum Target {
    Single(redis::Client),
    /// Resolved on every (re)connection: the owner of the heartbeat key.
    Cluster,
}

/// The scheme that makes `HERALD_REDIS_URL` a cluster's seed list.
pub const CLUSTER_SCHEME: &str = "redis-cluster://";

/// Finds the `host:port` of the master owning `key`'s slot.
async fn slot_owner(conn: &mut Conn, key: &str) -> redis::RedisResult<String> {
    let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(conn).await?;
    let slots: redis::Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
    let invalid = || redis::RedisError::from((redis::ErrorKind::Parse, "unexpected CLUSTER SLOTS reply"));
    let redis::Value::Array(ranges) = slots else { return Err(invalid()) };
    for range in ranges {
        let redis::Value::Array(items) = range else { continue };
        let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end)), Some(redis::Value::Array(master))) =
            (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        if (*start..=*end).contains(&slot) {
            let host = match master.first() {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(redis::Value::SimpleString(s)) => s.clone(),
                _ => return Err(invalid()),
            };
            let Some(redis::Value::Int(port)) = master.get(1) else { return Err(invalid()) };
            return Ok(format!("{host}:{port}"));
        }
    }
    Err(invalid())
}

/// Adds or refreshes `ARGV[1]` in `KEYS[1]`, valid for `ARGV[2]` ms (server clock).
const HEARTBEAT_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return 1
";

enum Command {
    /// Subscribe, and say when it is done.
    Subscribe(String, tokio::sync::oneshot::Sender<()>),
    Unsubscribe(String),
}

/// Longest wait between two reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How long after a reconnection publishes stay refused.
const SETTLE: Duration = Duration::from_millis(1_500);

struct Inner {
    config: FleetConfig,
    conn: Conn,
    target: Target,
    numsub: redis::Script,
    channels: Mutex<HashMap<String, mpsc::Sender<ChanItem>>>,
    commands: mpsc::UnboundedSender<Command>,
    healthy: AtomicBool,
    /// When the current connection became healthy after a reconnection.
    settling_since: Mutex<Option<tokio::time::Instant>>,
    metrics: Arc<Metrics>,
    guarded: redis::Script,
    stop: watch::Sender<bool>,
}

/// The socketioxide-redis driver herald uses. Clones share one state.
#[derive(Clone)]
pub struct FleetDriver(Arc<Inner>);

impl std::fmt::Debug for FleetDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetDriver").field("prefix", &self.0.config.prefix).finish()
    }
}

impl FleetDriver {
    /// Connects (waiting at most `op_timeout` for the first connection) and
    /// starts the pub/sub and heartbeat tasks.
    pub async fn connect(config: FleetConfig, metrics: Arc<Metrics>) -> Result<Self, FleetError> {
        let first = config.op_timeout * 2;
        let (conn, target) = if let Some(nodes) = config.url.strip_prefix(CLUSTER_SCHEME) {
            let seeds: Vec<String> = nodes.split(',').map(|n| format!("redis://{}", n.trim())).collect();
            let client = redis::cluster::ClusterClient::builder(seeds)
                .connection_timeout(config.op_timeout)
                .response_timeout(config.op_timeout)
                .retries(1)
                .build()?;
            let conn = tokio::time::timeout(first, client.get_async_connection())
                .await
                .map_err(|_| FleetError::Timeout(first))??;
            (Conn::Cluster(conn), Target::Cluster)
        } else {
            let client = redis::Client::open(config.url.as_str())?;
            let manager_config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.op_timeout))
                .set_response_timeout(Some(config.op_timeout))
                .set_number_of_retries(1)
                .set_max_delay(MAX_BACKOFF);
            let conn = tokio::time::timeout(first, ConnectionManager::new_with_config(client.clone(), manager_config))
                .await
                .map_err(|_| FleetError::Timeout(first))??;
            (Conn::Single(conn), Target::Single(client))
        };
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(false);
        let inner = Arc::new(Inner {
            config,
            conn,
            target: target.clone(),
            numsub: redis::Script::new(NUMSUB_SCRIPT),
            channels: Mutex::default(),
            commands,
            healthy: AtomicBool::new(false),
            settling_since: Mutex::new(None),
            metrics,
            guarded: redis::Script::new(GUARDED_PUBLISH),
            stop,
        });
        tokio::spawn(pubsub_task(Arc::downgrade(&inner), target, command_rx, stopped));
        // Wait (bounded) for the first subscription connection.
        let deadline = tokio::time::Instant::now() + inner.config.op_timeout * 2;
        while !inner.healthy.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !inner.healthy.load(Ordering::SeqCst) {
            return Err(FleetError::Down);
        }
        Ok(FleetDriver(inner))
    }

    /// Whether this instance is connected to Redis and subscribed.
    pub fn is_healthy(&self) -> bool {
        self.0.healthy.load(Ordering::SeqCst)
    }

    /// Whether publishes may go out: healthy, and settled after a reconnection.
    fn may_publish(&self) -> bool {
        if !self.is_healthy() {
            return false;
        }
        let mut settling = self.0.settling_since.lock().expect("settling");
        match *settling {
            Some(since) if since.elapsed() < SETTLE => false,
            Some(_) => {
                *settling = None;
                true
            }
            None => true,
        }
    }

    /// The shared, reconnecting connection.
    pub(crate) fn conn(&self) -> Conn {
        self.0.conn.clone()
    }

    /// The prefix of herald's keys and channels.
    pub(crate) fn prefix(&self) -> &str {
        &self.0.config.prefix
    }

    /// The bound of one Redis operation.
    pub(crate) fn op_timeout(&self) -> Duration {
        self.0.config.op_timeout
    }

    /// A new connection of its own, for blocking reads, whose replies may
    /// take up to `block` more than the operation timeout.
    pub(crate) async fn dedicated(&self, block: Duration) -> redis::RedisResult<Conn> {
        let timeout = self.0.config.op_timeout + block;
        match &self.0.target {
            Target::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.0.config.op_timeout))
                    .set_response_timeout(Some(timeout));
                Ok(Conn::Plain(client.get_multiplexed_async_connection_with_config(&config).await?))
            }
            Target::Cluster => {
                let seeds: Vec<String> = self
                    .0
                    .config
                    .url
                    .strip_prefix(CLUSTER_SCHEME)
                    .unwrap_or_default()
                    .split(',')
                    .map(|n| format!("redis://{}", n.trim()))
                    .collect();
                let client = redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(self.0.config.op_timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    /// Stops the background tasks (and so leaves the fleet).
    pub fn shutdown(&self) {
        let _ = self.0.stop.send(true);
    }

    fn heartbeat_key(&self) -> String {
        format!("{}:instances", self.0.config.prefix)
    }

    fn failed(&self, e: FleetError) -> FleetError {
        tracing::debug!(error = %e, "redis operation failed");
        self.0.metrics.adapter_errors.inc();
        e
    }

    async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, FleetError> {
        match tokio::time::timeout(self.0.config.op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.failed(FleetError::Redis(e))),
            Err(_) => Err(self.failed(FleetError::Timeout(self.0.config.op_timeout))),
        }
    }
}

impl Driver for FleetDriver {
    type Error = FleetError;

    async fn publish(&self, chan: String, val: Vec<u8>) -> Result<(), FleetError> {
        if !self.may_publish() {
            return Err(self.failed(FleetError::Down));
        }
        let mut conn = self.0.conn.clone();
        // Broadcast requests go to every instance: guard them. Requests and
        // responses addressed to one instance (their channel names carry its
        // uid) are published plainly.
        if chan.ends_with("-request#/#") {
            let key = self.heartbeat_key();
            let mut invocation = self.0.guarded.key(&key);
            invocation.arg(&chan).arg(val);
            let (received, live): (i64, i64) = self.bounded(invocation.invoke_async(&mut conn)).await?;
            if received < 0 {
                return Err(self.failed(FleetError::PartialFleet { subscribed: -1 - received, live }));
            }
            Ok(())
        } else {
            let _: i64 = self.bounded(redis::cmd("PUBLISH").arg(&chan).arg(val).query_async(&mut conn)).await?;
            Ok(())
        }
    }

    async fn subscribe(&self, chan: String, size: usize) -> Result<MessageStream<ChanItem>, FleetError> {
        let (tx, rx) = mpsc::channel(size.max(1));
        self.0.channels.lock().expect("channel map").insert(chan.clone(), tx);
        let (done, confirmed) = tokio::sync::oneshot::channel();
        let _ = self.0.commands.send(Command::Subscribe(chan, done));
        // Wait for the subscription (bounded); when Redis is down, the next
        // connection subscribes it anyway.
        let _ = tokio::time::timeout(self.0.config.op_timeout, confirmed).await;
        Ok(MessageStream::new(rx))
    }

    async fn unsubscribe(&self, chan: String) -> Result<(), FleetError> {
        self.0.channels.lock().expect("channel map").remove(&chan);
        let _ = self.0.commands.send(Command::Unsubscribe(chan));
        Ok(())
    }

    async fn num_serv(&self, chan: &str) -> Result<u16, FleetError> {
        let mut conn = self.0.conn.clone();
        let key = self.heartbeat_key();
        let mut invocation = self.0.numsub.key(&key);
        invocation.arg(chan);
        let count: u16 = self.bounded(invocation.invoke_async(&mut conn)).await?;
        Ok(count)
    }
}

/// Owns the pub/sub connection: connects, subscribes every known channel,
/// forwards messages, pings, and starts over when the connection drops.
async fn pubsub_task(
    inner: std::sync::Weak<Inner>,
    target: Target,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut first = true;
    loop {
        if *stopped.borrow() {
            return;
        }
        let Some(strong) = inner.upgrade() else { return };
        let timeout = strong.config.op_timeout;
        let heartbeat = redis::Script::new(HEARTBEAT_SCRIPT);
        let heartbeat_key = format!("{}:instances", strong.config.prefix);
        let instance = strong.config.instance_id.clone();
        let mut conn = strong.conn.clone();
        drop(strong);

        let mut owner = None;
        let connected = tokio::time::timeout(timeout, async {
            let client = match &target {
                Target::Single(client) => client.clone(),
                Target::Cluster => {
                    let node = slot_owner(&mut conn, &heartbeat_key).await?;
                    let client = redis::Client::open(format!("redis://{node}"))?;
                    owner = Some(node);
                    client
                }
            };
            client.get_async_pubsub().await
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            _ => {
                if let Some(i) = inner.upgrade() {
                    i.healthy.store(false, Ordering::SeqCst);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        // Commands queued while down are covered by the full re-subscription
        // below (the channel map already holds them); confirm them after it.
        let mut pending = Vec::new();
        while let Ok(cmd) = commands.try_recv() {
            if let Command::Subscribe(_, done) = cmd {
                pending.push(done);
            }
        }
        // Re-subscribe every channel the adapter holds.
        let channels: Vec<String> = match inner.upgrade() {
            Some(i) => i.channels.lock().expect("channel map").keys().cloned().collect(),
            None => return,
        };
        let mut ok = true;
        for chan in &channels {
            if !matches!(tokio::time::timeout(timeout, sink.subscribe(chan)).await, Ok(Ok(()))) {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        for done in pending {
            let _ = done.send(());
        }
        // Only an instance that receives broadcasts counts as live.
        let mut receives_broadcasts = channels.iter().any(|c| c.ends_with("-request#/#"));
        let beat = |conn: &mut Conn| {
            let mut invocation = heartbeat.key(&heartbeat_key);
            invocation.arg(&instance).arg(HEARTBEAT_TTL_MS);
            let mut conn = conn.clone();
            async move {
                let r: redis::RedisResult<i64> = invocation.invoke_async(&mut conn).await;
                r.is_ok()
            }
        };
        if receives_broadcasts {
            let _ = tokio::time::timeout(timeout, beat(&mut conn)).await;
        }
        match inner.upgrade() {
            Some(i) => {
                if !first {
                    *i.settling_since.lock().expect("settling") = Some(tokio::time::Instant::now());
                }
                i.healthy.store(true, Ordering::SeqCst);
            }
            None => return,
        }
        first = false;
        tracing::info!(channels = channels.len(), "redis: subscribed");
        backoff = Duration::from_millis(50);

        let mut ticker = tokio::time::interval(HEARTBEAT);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let reason = loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break "connection closed" };
                    let Some(i) = inner.upgrade() else { return };
                    let chan = msg.get_channel_name().to_owned();
                    let tx = i.channels.lock().expect("channel map").get(&chan).cloned();
                    if let Some(tx) = tx
                        && tx.try_send((chan, msg.get_payload_bytes().to_vec())).is_err()
                    {
                        i.metrics.adapter_errors.inc();
                        tracing::warn!("redis: a message was dropped (adapter queue full)");
                    }
                }
                cmd = commands.recv() => {
                    let result = match cmd {
                        Some(Command::Subscribe(chan, done)) => {
                            let result = tokio::time::timeout(timeout, sink.subscribe(&chan)).await;
                            if matches!(result, Ok(Ok(()))) {
                                let _ = done.send(());
                                if chan.ends_with("-request#/#") && !receives_broadcasts {
                                    receives_broadcasts = true;
                                    let _ = tokio::time::timeout(timeout, beat(&mut conn)).await;
                                }
                            }
                            result
                        }
                        Some(Command::Unsubscribe(chan)) => tokio::time::timeout(timeout, sink.unsubscribe(&chan)).await,
                        None => return,
                    };
                    if !matches!(result, Ok(Ok(()))) {
                        break "subscribe failed";
                    }
                }
                _ = ticker.tick() => {
                    let ping: Result<redis::RedisResult<redis::Value>, _> = tokio::time::timeout(timeout, sink.ping()).await;
                    if !matches!(ping, Ok(Ok(_))) {
                        break "ping failed";
                    }
                    if receives_broadcasts {
                        let _ = tokio::time::timeout(timeout, beat(&mut conn)).await;
                    }
                    // In a cluster, follow the heartbeat key's slot when it moves.
                    if let Some(node) = &owner {
                        let now = tokio::time::timeout(timeout, slot_owner(&mut conn, &heartbeat_key)).await;
                        if matches!(&now, Ok(Ok(current)) if current != node) {
                            break "the heartbeat slot moved to another node";
                        }
                    }
                }
                _ = stopped.changed() => return,
            }
        };
        if let Some(i) = inner.upgrade() {
            i.healthy.store(false, Ordering::SeqCst);
            i.metrics.adapter_errors.inc();
        }
        tracing::warn!(reason, "redis: pub/sub connection lost; reconnecting");
    }
}
