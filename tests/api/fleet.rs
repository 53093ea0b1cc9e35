//! Several instances behind one Redis: exactly once, and Redis outages
//! survived. Each test starts its own `redis-server` on a free port (never
//! the shared one) and kills or restarts it at will.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald::config::Config;
use serde_json::{Value, json};

use crate::client::Client;
use crate::helpers::*;

/// A private redis-server.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Starts redis-server on a free port, or returns `None` (loudly; fatal in CI) when it is not installed.
    pub async fn start() -> Option<Redis> {
        if Command::new("redis-server").arg("--version").stdout(Stdio::null()).status().is_err() {
            assert!(!in_ci(), "redis-server is not installed, and this is CI");
            eprintln!("SKIPPED: redis-server is not installed; the fleet tests did not run");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut redis = Redis { port, child: None };
        redis.restart().await;
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts it on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        for _ in 0..200 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let _ = s.write_all(b"PING\r\n").await;
                let mut buf = [0u8; 7];
                if s.read_exact(&mut buf).await.is_ok() && &buf == b"+PONG\r\n" {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Stops it answering (SIGSTOP), keeping everything, or lets it go on (SIGCONT).
    pub fn pause(&self, paused: bool) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let signal = if paused { "-STOP" } else { "-CONT" };
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// Runs a command with `redis-cli`; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn fleet(redis: &Redis, n: usize, prefix: &str) -> Vec<TestApp> {
    fleet_with(redis, n, prefix, |_| {}).await
}

/// `n` instances on `redis` under `prefix`, each with its own fixture
/// database, after `tweak` has changed their config.
pub async fn fleet_with(redis: &Redis, n: usize, prefix: &str, tweak: impl Fn(&mut Config)) -> Vec<TestApp> {
    let mut apps = Vec::new();
    for _ in 0..n {
        apps.push(
            spawn_app_with(Backend::Sqlite, |c| {
                in_fleet(c, &redis.url(), prefix);
                tweak(c);
            })
            .await,
        );
    }
    apps
}

/// Puts `config` in the fleet on `url` under `prefix`.
pub fn in_fleet(config: &mut Config, url: &str, prefix: &str) {
    config.fleet.redis_url = Some(url.to_owned());
    config.fleet.redis_prefix = prefix.to_owned();
    config.fleet.redis_timeout = Duration::from_secs(1);
}

fn numbered(seq: usize) -> Value {
    json!({"type": "state_invalidated", "payload": {"campaignId": "c1", "scope": "campaign", "seq": seq}})
}

/// Collects the `seq` of every event that arrives within `wait` of the last one.
async fn drain(client: &mut Client, wait: Duration) -> Vec<u64> {
    let mut seen = Vec::new();
    while let Some((_, event)) = client.next_event(wait).await {
        seen.push(event["payload"]["seq"].as_u64().expect("a numbered event"));
    }
    seen
}

#[tokio::test]
async fn every_client_gets_every_event_exactly_once_whichever_instance() {
    let Some(redis) = Redis::start().await else { return };
    let apps = fleet(&redis, 3, "herald-once").await;
    let mut clients = Vec::new();
    for i in 0..30 {
        let app = &apps[i % apps.len()];
        let mut c = app.connect(if i % 2 == 0 { "alice" } else { "bob" }).await;
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        if i % 3 == 0 {
            // In two target rooms: still one copy.
            assert_eq!(c.subscribe("settlement", "s1").await["success"], true);
        }
        clients.push(c);
    }
    let events = 30;
    for seq in 0..events {
        let body = if seq % 2 == 0 {
            numbered(seq)
        } else {
            json!({"type": "settlement_updated", "payload": {"campaignId": "c1", "settlementId": "s1", "operation": "update", "seq": seq}})
        };
        let (status, _) = apps[seq % apps.len()].publish(&body).await;
        assert_eq!(status, 202);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut seen = drain(c, Duration::from_millis(500)).await;
        seen.sort_unstable();
        assert_eq!(seen, (0..events as u64).collect::<Vec<_>>(), "client {i}");
    }
}

#[tokio::test]
async fn fleets_with_different_prefixes_share_a_redis_without_crosstalk() {
    let Some(redis) = Redis::start().await else { return };
    let blue = fleet(&redis, 1, "blue").await;
    let green = fleet(&redis, 2, "green").await;
    let mut on_blue = blue[0].connect("alice").await;
    on_blue.subscribe("campaign", "c1").await;
    let mut on_green = green[1].connect("alice").await;
    on_green.subscribe("campaign", "c1").await;
    assert_eq!(green[0].publish(&numbered(1)).await.0, 202);
    assert_eq!(drain(&mut on_green, Duration::from_millis(300)).await, vec![1]);
    assert_eq!(drain(&mut on_blue, Duration::from_millis(300)).await, Vec::<u64>::new());
}

#[tokio::test]
async fn a_redis_outage_is_refused_cleanly_and_delivery_resumes_exactly_once() {
    let Some(mut redis) = Redis::start().await else { return };
    let apps = fleet(&redis, 2, "herald-outage").await;
    let (a, b) = (&apps[0], &apps[1]);
    let mut on_a = a.connect("alice").await;
    on_a.subscribe("campaign", "c1").await;
    let mut on_b = b.connect("bob").await;
    on_b.subscribe("campaign", "c1").await;
    let mut seq = 0;
    assert_eq!(a.publish(&numbered(seq)).await.0, 202);
    assert_eq!(drain(&mut on_b, Duration::from_millis(300)).await, vec![0]);
    assert_eq!(drain(&mut on_a, Duration::from_millis(0)).await, vec![0]);

    for round in 0..2 {
        redis.kill();
        // Publishes are refused, fast, with a JSON error; nothing is delivered.
        // One sent on the connection Redis broke as it died may have run
        // (herald cannot tell): a 504, its outcome unknown.
        let mut refused = 0;
        for app in [a, b] {
            for _ in 0..3 {
                seq += 1;
                let started = Instant::now();
                let (status, body) = app.publish(&numbered(seq)).await;
                let took = started.elapsed();
                assert!(matches!(status, 503 | 504), "round {round}: {status} {body}");
                assert!(body["error"].is_string());
                assert!(body["accepted"].as_u64().is_some());
                assert_eq!(status == 504, body["unknown"].as_u64().is_some(), "{body}");
                assert!(took < Duration::from_millis(2500), "a refused publish took {took:?}");
                refused += 1;
            }
        }
        // /readyz says so (once the instance noticed), and counts it.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let status = a.http.get(a.url("/readyz")).send().await.unwrap().status().as_u16();
            if status == 503 {
                break;
            }
            assert!(Instant::now() < deadline, "readyz never said 503");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Known to be down: refused at once, nothing published.
        seq += 1;
        let (status, body) = a.publish(&numbered(seq)).await;
        assert_eq!((status, &body["accepted"]), (503, &json!(0)), "{body}");
        let m = a.metrics().await;
        assert!(metric(&m, "herald_log_errors_total") > 0.0);
        // The name before 0.2 is gone (0.3).
        assert!(!m.contains("herald_adapter_errors_total"), "a series of 0.1 is still served");
        // Clients stay connected, and new ones can connect and subscribe.
        assert!(!on_a.is_closed() && !on_b.is_closed());
        let mut newcomer = b.connect("bob").await;
        assert_eq!(newcomer.subscribe("campaign", "c1").await["success"], true);
        drop(newcomer);

        redis.restart().await;
        let back = Instant::now();
        // Redis came back empty: entries appended just before it died may
        // never have been read, so subscribed sockets are disconnected to
        // recover (their `since` is from the lost log: they refetch).
        for client in [&on_a, &on_b] {
            assert!(client.closed_within(Duration::from_secs(5)).await, "round {round}: a subscriber stayed connected");
        }
        on_a = a.connect("alice").await;
        on_a.subscribe("campaign", "c1").await;
        on_b = b.connect("bob").await;
        on_b.subscribe("campaign", "c1").await;
        // Publish on A until accepted; the first accepted one reaches B exactly once.
        seq += 1;
        let accepted_after = loop {
            let (status, _) = a.publish(&numbered(seq)).await;
            if status == 202 {
                break back.elapsed();
            }
            assert_eq!(status, 503);
            assert!(
                back.elapsed() < Duration::from_secs(5),
                "round {round}: publishes still refused 5 s after Redis came back"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        println!(
            "round {round}: {refused} publishes refused during the outage; accepted again {accepted_after:?} after Redis came back"
        );
        assert_eq!(drain(&mut on_b, Duration::from_millis(500)).await, vec![seq as u64], "round {round}: on B");
        assert_eq!(drain(&mut on_a, Duration::from_millis(0)).await, vec![seq as u64], "round {round}: on A");
        // And B to A.
        seq += 1;
        let started = Instant::now();
        loop {
            let (status, _) = b.publish(&numbered(seq)).await;
            if status == 202 {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(drain(&mut on_a, Duration::from_millis(500)).await, vec![seq as u64], "round {round}: on A");
        assert_eq!(drain(&mut on_b, Duration::from_millis(0)).await, vec![seq as u64], "round {round}: on B");
        let ready = a.http.get(a.url("/readyz")).send().await.unwrap().status().as_u16();
        assert_eq!(ready, 200);
    }
}

#[tokio::test]
async fn cross_instance_delivery_cost_is_measured() {
    let Some(redis) = Redis::start().await else { return };
    let apps = fleet(&redis, 2, "herald-latency").await;
    let mut near = apps[0].connect("alice").await;
    near.subscribe("campaign", "c1").await;
    let mut far = apps[1].connect("bob").await;
    far.subscribe("campaign", "c1").await;
    let (mut near_ms, mut far_ms) = (Vec::new(), Vec::new());
    for seq in 0..200 {
        let started = Instant::now();
        assert_eq!(apps[0].publish(&numbered(seq)).await.0, 202);
        // The publish returns after local delivery was queued; time both sides from the request.
        near.expect_event().await;
        near_ms.push(started.elapsed().as_secs_f64() * 1e3);
        far.expect_event().await;
        far_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    near_ms.sort_by(f64::total_cmp);
    far_ms.sort_by(f64::total_cmp);
    let p50 = |v: &[f64]| v[v.len() / 2];
    println!(
        "cross-instance: p50 same instance {:.2} ms, other instance {:.2} ms (adds {:.2} ms)",
        p50(&near_ms),
        p50(&far_ms),
        p50(&far_ms) - p50(&near_ms)
    );
}

/// A private three-master Redis Cluster.
pub struct Cluster {
    pub ports: Vec<u16>,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub async fn start() -> Option<Cluster> {
        let _probe = Redis::start().await?;
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<u16> =
            (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()).collect();
        let mut children = Vec::new();
        for port in &ports {
            let node_dir = dir.path().join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            children.push(
                Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                    .arg("--dir")
                    .arg(&node_dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server starts"),
            );
        }
        let cluster = Cluster { ports, children, _dir: dir };
        for port in &cluster.ports {
            for _ in 0..100 {
                if tokio::net::TcpStream::connect(("127.0.0.1", *port)).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let nodes: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "the cluster was created");
        // Wait until every node says the cluster is ok.
        for port in &cluster.ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out =
                    Command::new("redis-cli").args(["-p", &port.to_string(), "cluster", "info"]).output().unwrap();
                if String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "cluster never became ok");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Some(cluster)
    }
}

impl Cluster {
    fn cli(&self, node: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.ports[node].to_string()]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Moves the slot of `key` (which exists) to the next master, keys and all, as a resharding does.
    pub fn move_slot_of(&self, key: &str) {
        let slot = self.cli(0, &["CLUSTER", "KEYSLOT", key]);
        let ids: Vec<String> = (0..3).map(|n| self.cli(n, &["CLUSTER", "MYID"])).collect();
        let from =
            (0..3).find(|&n| self.cli(n, &["CLUSTER", "COUNTKEYSINSLOT", &slot]) != "0").expect("the key's node");
        let to = (from + 1) % 3;
        assert_eq!(self.cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &ids[from]]), "OK");
        assert_eq!(self.cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &ids[to]]), "OK");
        let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
        let port = self.ports[to].to_string();
        let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        migrate.extend(keys.lines());
        assert_eq!(self.cli(from, &migrate), "OK");
        for n in 0..3 {
            assert_eq!(self.cli(n, &["CLUSTER", "SETSLOT", &slot, "NODE", &ids[to]]), "OK");
        }
    }

    /// The seed list, as `HERALD_REDIS_URL`.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("{}{}", herald::redis_conn::CLUSTER_SCHEME, seeds.join(","))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn a_fleet_on_redis_cluster_delivers_exactly_once() {
    let Some(cluster) = Cluster::start().await else { return };
    let mut apps = Vec::new();
    // Each instance is given a different seed node.
    for i in 0..3 {
        let seeds: Vec<String> = (0..3).map(|j| format!("127.0.0.1:{}", cluster.ports[(i + j) % 3])).collect();
        let url = format!("{}{}", herald::redis_conn::CLUSTER_SCHEME, seeds.join(","));
        apps.push(spawn_app_with(Backend::Sqlite, move |c| c.fleet.redis_url = Some(url)).await);
    }
    let mut clients = Vec::new();
    for app in &apps {
        let mut c = app.connect("alice").await;
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        clients.push(c);
    }
    for seq in 0..12 {
        let (status, body) = apps[seq % 3].publish(&numbered(seq)).await;
        assert_eq!(status, 202, "{body}");
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let mut seen = drain(c, Duration::from_millis(500)).await;
        seen.sort_unstable();
        assert_eq!(seen, (0..12).collect::<Vec<u64>>(), "client on instance {i}");
    }
}
