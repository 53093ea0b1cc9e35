//! The Redis connection of a fleet: one shared, reconnecting connection (to
//! a single node, or to a Redis Cluster given as
//! `redis-cluster://host:port,host:port`), dedicated connections for the
//! event log's blocking reads (on a cluster, to the one node that serves the
//! stream), and whether Redis answers.
//!
//! Health is a `PING` every half second on the shared connection: `/readyz`
//! reports it, and while Redis does not answer a publish is refused at once
//! (`503`, nothing handed over) instead of waiting for its timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;

use crate::telemetry::Metrics;

/// The scheme that makes `HERALD_REDIS_URL` a cluster's seed list.
pub const CLUSTER_SCHEME: &str = "redis-cluster://";

/// How often Redis is pinged.
const PING_EVERY: Duration = Duration::from_millis(500);
/// Longest wait between two reconnection attempts of the shared connection.
const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Redis failed or is unreachable.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no Redis Cluster node serves slot {0}")]
    NoNodeForSlot(u16),
    #[error("redis did not answer its latest ping")]
    Unreachable,
    #[error("redis answered {0} herald cannot read")]
    Unreadable(&'static str),
}

/// Where the fleet's Redis is, and how long one operation may take.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://…`, or `redis-cluster://host:port,…`.
    pub url: String,
    /// Prefix of every key, so that several deployments share one Redis.
    pub prefix: String,
    /// Longest one operation may take.
    pub op_timeout: Duration,
}

/// A connection to a single node, or to a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    /// The shared, reconnecting connection to a single node.
    Single(ConnectionManager),
    /// A dedicated connection to a single node.
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

struct Inner {
    settings: RedisSettings,
    conn: Conn,
    /// The single node's client, for dedicated connections (`None`: a cluster).
    client: Option<redis::Client>,
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
}

/// The fleet's Redis. Clones share one connection.
#[derive(Clone)]
pub struct Redis(Arc<Inner>);

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("prefix", &self.0.settings.prefix).finish()
    }
}

fn cluster_client(
    nodes: &str,
    timeout: Duration,
    response_timeout: Duration,
) -> redis::RedisResult<redis::cluster::ClusterClient> {
    let seeds: Vec<String> = nodes.split(',').map(|n| format!("redis://{}", n.trim())).collect();
    redis::cluster::ClusterClient::builder(seeds)
        .connection_timeout(timeout)
        .response_timeout(response_timeout)
        .retries(1)
        .build()
}

impl Redis {
    /// Connects (the first connection may take twice the operation timeout)
    /// and starts pinging.
    pub async fn connect(settings: RedisSettings, metrics: Arc<Metrics>) -> Result<Redis, RedisError> {
        let first = settings.op_timeout * 2;
        let timeout = settings.op_timeout;
        let (conn, client) = if let Some(nodes) = settings.url.strip_prefix(CLUSTER_SCHEME) {
            let client = cluster_client(nodes, timeout, timeout)?;
            let conn = tokio::time::timeout(first, client.get_async_connection())
                .await
                .map_err(|_| RedisError::Timeout(first))??;
            (Conn::Cluster(conn), None)
        } else {
            let client = redis::Client::open(settings.url.as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(MAX_BACKOFF);
            let conn = tokio::time::timeout(first, ConnectionManager::new_with_config(client.clone(), config))
                .await
                .map_err(|_| RedisError::Timeout(first))??;
            (Conn::Single(conn), Some(client))
        };
        let (stop, stopped) = watch::channel(false);
        let inner = Arc::new(Inner { settings, conn, client, healthy: AtomicBool::new(false), metrics, stop });
        let redis = Redis(inner);
        redis.ping().await;
        tokio::spawn(watch_health(Arc::downgrade(&redis.0), stopped));
        Ok(redis)
    }

    /// Whether Redis answered its latest ping.
    pub fn is_healthy(&self) -> bool {
        self.0.healthy.load(Ordering::SeqCst)
    }

    /// Pings once and records whether Redis answered.
    async fn ping(&self) -> bool {
        let mut conn = self.conn();
        let answer: Result<redis::RedisResult<String>, _> =
            tokio::time::timeout(self.op_timeout(), redis::cmd("PING").query_async(&mut conn)).await;
        let healthy = matches!(answer, Ok(Ok(_)));
        let was = self.0.healthy.swap(healthy, Ordering::SeqCst);
        if was && !healthy {
            self.0.metrics.log_errors.inc();
            tracing::warn!("redis does not answer");
        } else if !was && healthy {
            tracing::info!("redis answers");
        }
        healthy
    }

    /// Counts a failed Redis operation.
    pub(crate) fn failed(&self) {
        self.0.metrics.log_errors.inc();
    }

    /// The shared, reconnecting connection.
    pub(crate) fn conn(&self) -> Conn {
        self.0.conn.clone()
    }

    /// Whether it is a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.0.client.is_none()
    }

    /// The prefix of herald's keys.
    pub(crate) fn prefix(&self) -> &str {
        &self.0.settings.prefix
    }

    /// The bound of one Redis operation.
    pub(crate) fn op_timeout(&self) -> Duration {
        self.0.settings.op_timeout
    }

    /// A new connection of its own for blocking reads of `key`, whose
    /// replies may take up to `block` more than the operation timeout. On a
    /// cluster it goes to the node that serves `key`'s slot now, and to no
    /// other: when the slot moves, reads there fail (`MOVED`) and the reader
    /// asks for a new connection.
    pub(crate) async fn dedicated(&self, key: &str, block: Duration) -> Result<Conn, RedisError> {
        let timeout = self.op_timeout();
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout + block));
        let client = match &self.0.client {
            Some(client) => client.clone(),
            None => {
                let mut conn = self.conn();
                let slots: Vec<redis::Value> =
                    self.bounded(redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn)).await?;
                match owner(&slots, slot_of(key))? {
                    Some(node) => redis::Client::open(format!("redis://{node}"))?,
                    // The node does not say where it is: a cluster connection finds it.
                    None => {
                        let nodes = self.0.settings.url.strip_prefix(CLUSTER_SCHEME).unwrap_or_default();
                        let client = cluster_client(nodes, timeout, timeout + block)?;
                        return Ok(Conn::Cluster(client.get_async_connection().await?));
                    }
                }
            }
        };
        Ok(Conn::Plain(client.get_multiplexed_async_connection_with_config(&config).await?))
    }

    /// `fut`, failing after the operation timeout.
    pub(crate) async fn bounded<T>(&self, fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, RedisError> {
        let timeout = self.op_timeout();
        Ok(tokio::time::timeout(timeout, fut).await.map_err(|_| RedisError::Timeout(timeout))??)
    }

    /// Stops pinging.
    pub fn shutdown(&self) {
        let _ = self.0.stop.send(true);
    }
}

/// The address (`host:port`) of the master that serves `slot`, from a
/// `CLUSTER SLOTS` reply; `None` when that master does not know its own
/// endpoint (`""` or `"?"`).
fn owner(slots: &[redis::Value], slot: u16) -> Result<Option<String>, RedisError> {
    use redis::Value::{Array, BulkString, Int};
    for range in slots {
        let Array(fields) = range else { continue };
        let (Some(Int(first)), Some(Int(last)), Some(Array(master))) = (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        if !(*first..=*last).contains(&i64::from(slot)) {
            continue;
        }
        let (Some(BulkString(host)), Some(Int(port))) = (master.first(), master.get(1)) else { continue };
        let host = String::from_utf8_lossy(host);
        return Ok(match host.as_ref() {
            "" | "?" => None,
            h if h.contains(':') => Some(format!("[{h}]:{port}")),
            h => Some(format!("{h}:{port}")),
        });
    }
    Err(RedisError::NoNodeForSlot(slot))
}

/// A key's Redis Cluster slot: CRC-16/XMODEM of its hash tag (the part
/// between the first `{` and the next `}`, when not empty), else of the key.
fn slot_of(key: &str) -> u16 {
    let tagged = key
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty());
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(key).as_bytes()) % 16384
}

/// Pings Redis every [`PING_EVERY`] until stopped.
async fn watch_health(inner: std::sync::Weak<Inner>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.changed() => return,
        }
        let Some(inner) = inner.upgrade() else { return };
        Redis(inner).ping().await;
    }
}

#[cfg(test)]
mod tests {
    use redis::Value::{Array, BulkString, Int};

    use super::{owner, slot_of};

    #[test]
    fn a_slot_s_owner_is_read_from_cluster_slots() {
        let range = |first: i64, last: i64, host: &str, port: i64| {
            Array(vec![
                Int(first),
                Int(last),
                Array(vec![BulkString(host.into()), Int(port), BulkString(b"id".into())]),
            ])
        };
        let slots =
            [range(0, 5460, "10.0.0.1", 7000), range(5461, 10922, "fe80::1", 7001), range(10923, 16383, "?", 7002)];
        assert_eq!(owner(&slots, 0).unwrap().as_deref(), Some("10.0.0.1:7000"));
        assert_eq!(owner(&slots, 6470).unwrap().as_deref(), Some("[fe80::1]:7001"));
        assert_eq!(owner(&slots, 16383).unwrap(), None, "an unknown endpoint");
        assert!(owner(&slots[..1], 9000).is_err(), "no master serves it");
    }

    #[test]
    fn a_key_s_slot_is_the_one_redis_computes() {
        // Each as `CLUSTER KEYSLOT` answers on Redis 7.
        for (key, slot) in [
            ("foo", 12182),
            ("{user1000}.following", 3443),
            ("{herald:17}:log", 6470),
            ("{herald:control}:epoch", 12023),
            ("{}foo", 9500),
            ("a{}{b}", 15033),
        ] {
            assert_eq!(slot_of(key), slot, "{key}");
        }
    }
}
