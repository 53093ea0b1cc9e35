//! The drop tests' harness: the reconnecting client, the fleet of
//! instances behind proxies, and a run (the clients and the publisher).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;

use crate::client::Client;
use crate::fleet::Redis;
use crate::helpers::*;
use crate::proxy::Proxy;
use crate::recovery::{NOT_RECOVERED, RECOVERED, SUBSCRIBED, with_seq};

/// Clients in a drop test (`HERALD_DROP_CLIENTS` overrides, e.g. to bisect).
pub(super) fn clients_count() -> usize {
    std::env::var("HERALD_DROP_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000)
}
pub(super) const CAMPAIGNS: u64 = 10;
pub(super) const KINDS: [&str; 3] = ["campaign", "settlement", "structure"];
/// Events per second, over both instances.
pub(super) const RATE: u64 = 50;

/// Event `seq` of the drop tests, and the rooms it targets. Seqs
/// `0..CAMPAIGNS` (the warm-up) are structure updates, so they reach every room.
pub(super) fn drop_event(seq: u64) -> (Value, Vec<String>) {
    let k = seq % CAMPAIGNS;
    let (c, s, st) = (format!("rc{k}"), format!("rs{k}"), format!("rst{k}"));
    let (body, rooms) = match (seq / CAMPAIGNS + 2) % 3 {
        0 => (bodies::settlement_updated(&c, &s), vec![format!("campaign:{c}"), format!("settlement:{s}")]),
        1 => (bodies::state_invalidated(&c), vec![format!("campaign:{c}")]),
        _ => (
            bodies::structure_updated(&c, &s, &st),
            vec![format!("campaign:{c}"), format!("settlement:{s}"), format!("structure:{st}")],
        ),
    };
    (with_seq(body, seq), rooms)
}

pub(super) fn drop_membership_sql() -> String {
    let mut sql = String::new();
    for k in 0..CAMPAIGNS {
        sql.push_str(&format!(
            "INSERT INTO campaign_members (campaign_id, user_id) VALUES ('rc{k}', 'ru{k}');
             INSERT INTO settlements (id, campaign_id) VALUES ('rs{k}', 'rc{k}');
             INSERT INTO structures (id, settlement_id) VALUES ('rst{k}', 'rs{k}');"
        ));
    }
    sql
}

/// What the shared counters say, for the test's driver.
#[derive(Default)]
pub(super) struct Progress {
    /// Clients connected and subscribed right now.
    pub(super) settled: AtomicUsize,
    /// Clients whose first subscription succeeded.
    pub(super) started: AtomicUsize,
    /// Clients that hold an offset.
    pub(super) with_offset: AtomicUsize,
    /// Events received, over all clients.
    pub(super) delivered: AtomicU64,
}

/// How a (re)subscription was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// `{success: true}`, no since sent.
    Fresh,
    /// `{success: true, recovered: true}`.
    Recovered,
    /// `{success: true, recovered: false}`: the client must refetch.
    NotRecovered,
}

/// One successful (re)subscription.
pub(super) struct Subscribed {
    pub(super) since: Option<String>,
    pub(super) answer: Answer,
    /// When the ack arrived.
    pub(super) at: Instant,
    /// From the first connection attempt to the ack.
    pub(super) took: Duration,
}

/// One received event.
pub(super) struct Got {
    pub(super) seq: Option<u64>,
    pub(super) offset: Option<String>,
}

/// A client that, whenever its connection dies, comes back (on the next
/// route, so alternating proxies) and re-subscribes with `since` = the last
/// offset it received, retrying until it is subscribed. It records what it
/// receives and how each subscription was answered.
pub(super) struct Reconnecting {
    pub(super) user: String,
    pub(super) kind: &'static str,
    pub(super) id: String,
    pub(super) routes: Arc<Vec<SocketAddr>>,
    pub(super) next_route: usize,
    pub(super) last_offset: Option<String>,
    pub(super) got: Vec<Got>,
    pub(super) subscribed: Vec<Subscribed>,
    /// Attempts that did not end subscribed, by why.
    pub(super) failed: HashMap<String, usize>,
}

impl Reconnecting {
    pub(super) fn room(&self) -> String {
        format!("{}:{}", self.kind, self.id)
    }

    /// Runs until `stop`, then returns what it saw.
    pub(super) async fn run(mut self, progress: Arc<Progress>, mut stop: watch::Receiver<bool>) -> Self {
        let mut first = true;
        'sessions: loop {
            let Some(mut client) = self.session(&progress, &mut stop).await else { break };
            progress.settled.fetch_add(1, Ordering::SeqCst);
            if first {
                progress.started.fetch_add(1, Ordering::SeqCst);
                first = false;
            }
            loop {
                tokio::select! {
                    biased;
                    event = client.recv_event() => match event {
                        Some((_, event)) => self.record(&progress, &event),
                        None => break,
                    },
                    _ = stop.changed() => {
                        while let Some((_, event)) = client.try_next_event() {
                            self.record(&progress, &event);
                        }
                        progress.settled.fetch_sub(1, Ordering::SeqCst);
                        break 'sessions;
                    }
                }
            }
            progress.settled.fetch_sub(1, Ordering::SeqCst);
            // Cut: come back after a random delay, as socket.io clients do,
            // so that a thousand do not come back in the same millisecond.
            let jitter = Duration::from_millis(rand::random::<u64>() % 250);
            tokio::select! {
                () = tokio::time::sleep(jitter) => {}
                _ = stop.changed() => break,
            }
        }
        self
    }

    pub(super) fn record(&mut self, progress: &Progress, event: &Value) {
        let offset = event["offset"].as_str().map(str::to_owned);
        if self.last_offset.is_none() && offset.is_some() {
            progress.with_offset.fetch_add(1, Ordering::SeqCst);
        }
        if offset.is_some() {
            self.last_offset = offset.clone();
        }
        progress.delivered.fetch_add(1, Ordering::SeqCst);
        self.got.push(Got { seq: event["payload"]["seq"].as_u64(), offset });
    }

    /// Connects and subscribes, retrying (with backoff, alternating routes)
    /// until subscribed; `None` when stopped first.
    pub(super) async fn session(&mut self, progress: &Progress, stop: &mut watch::Receiver<bool>) -> Option<Client> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            if *stop.borrow() {
                return None;
            }
            let route = self.routes[self.next_route % self.routes.len()];
            self.next_route += 1;
            let since = self.last_offset.clone();
            match self.attempt(progress, route, since.as_deref()).await {
                Ok((client, answer)) => {
                    self.subscribed.push(Subscribed { since, answer, at: Instant::now(), took: started.elapsed() });
                    return Some(client);
                }
                Err(why) => {
                    *self.failed.entry(why).or_default() += 1;
                    let pause = backoff + Duration::from_millis(rand::random::<u64>() % 50);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = stop.changed() => return None,
                    }
                }
            }
        }
    }

    /// One connection and subscription. What arrives before the ack (a
    /// replay) stays in the client's queue, in order, for `run` to record;
    /// when the connection dies before the ack, what had arrived is recorded
    /// here (it came, in order: a real client would have handled it).
    pub(super) async fn attempt(
        &mut self,
        progress: &Progress,
        route: SocketAddr,
        since: Option<&str>,
    ) -> Result<(Client, Answer), String> {
        let mut client = Client::connect(route, Some(json!({ "token": token(&self.user) })), "")
            .await
            .map_err(|_| "connect failed".to_owned())?;
        let mut payload = json!({ format!("{}Id", self.kind): self.id });
        if let Some(since) = since {
            payload["since"] = json!(since);
        }
        let closed = client.on_close();
        let event = format!("subscribe_{}", self.kind);
        let ack = tokio::select! {
            // An ack that arrived counts even if the connection closed since.
            biased;
            // A reconnect storm of 1,000 clients on 2 cores (debug build) can
            // take seconds to ack: slow is not wrong; only no answer at all is.
            ack = client.try_emit_with_ack_within(&event, payload, Duration::from_secs(20)) => ack,
            () = closed => None,
        };
        let answer = match &ack {
            Some(a) if *a == SUBSCRIBED() && since.is_none() => Ok(Answer::Fresh),
            Some(a) if *a == RECOVERED() && since.is_some() => Ok(Answer::Recovered),
            Some(a) if *a == NOT_RECOVERED() && since.is_some() => Ok(Answer::NotRecovered),
            Some(a) if a["success"] == false => Err(format!("refused: {}", a["error"])),
            Some(a) => Err(format!("unexpected ack {a} (since {since:?})")),
            None if client.is_closed() => Err("cut while subscribing".to_owned()),
            None => Err("no ack within 20 s".to_owned()),
        };
        match answer {
            Ok(answer) => Ok((client, answer)),
            Err(why) => {
                // Whatever had arrived is real (a partial replay): record it.
                while let Some((_, event)) = client.try_next_event() {
                    self.record(progress, &event);
                }
                Err(why)
            }
        }
    }
}

/// An event the publisher sent.
pub(super) struct Published {
    pub(super) seq: u64,
    pub(super) rooms: Vec<String>,
    /// When the request started.
    pub(super) started: Instant,
    /// The HTTP status; 0 when the request itself failed (instance down).
    pub(super) status: u16,
}

/// Two (or more) instances over one Redis, each on its own SQLite file that
/// the test owns (so an instance can be restarted on it), each behind a proxy.
pub(super) struct DropFleet {
    pub(super) _dirs: Vec<tempfile::TempDir>,
    pub(super) databases: Vec<String>,
    pub(super) apps: Vec<Option<TestApp>>,
    pub(super) proxies: Vec<Proxy>,
    /// Where the publisher sends, instance by instance (direct, not proxied).
    pub(super) targets: Arc<Mutex<Vec<SocketAddr>>>,
    pub(super) redis_url: String,
}

pub(super) fn fleet_config(redis_url: String) -> impl FnOnce(&mut herald::Config) {
    move |c| {
        c.fleet.redis_url = Some(redis_url);
        c.fleet.redis_prefix = "herald-recovery".into();
        c.fleet.redis_timeout = Duration::from_secs(1);
        c.shutdown_grace = Duration::from_secs(5);
    }
}

impl DropFleet {
    pub(super) async fn start(redis: &Redis, n: usize) -> DropFleet {
        let sql = drop_membership_sql();
        let (mut dirs, mut databases, mut apps, mut proxies, mut targets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let dir = tempfile::tempdir().unwrap();
            let database = format!("sqlite://{}", dir.path().join("herald.db").display());
            let app = spawn_app_on(&database, fleet_config(redis.url())).await;
            run_sql(&database, &sql).await;
            proxies.push(Proxy::start(app.addr).await);
            targets.push(app.addr);
            apps.push(Some(app));
            databases.push(database);
            dirs.push(dir);
        }
        DropFleet {
            _dirs: dirs,
            databases,
            apps,
            proxies,
            targets: Arc::new(Mutex::new(targets)),
            redis_url: redis.url(),
        }
    }

    /// Stops instance `i` gracefully (its sockets are disconnected), starts a
    /// new one on the same database and Redis, and points its proxy at it.
    pub(super) async fn restart(&mut self, i: usize) -> Duration {
        let started = Instant::now();
        let old = self.apps[i].take().expect("running");
        old.stop().await;
        let app = spawn_app_on(&self.databases[i], fleet_config(self.redis_url.clone())).await;
        self.proxies[i].set_upstream(app.addr);
        self.targets.lock().unwrap()[i] = app.addr;
        self.apps[i] = Some(app);
        started.elapsed()
    }

    pub(super) fn cut(&self, which: &[usize]) -> usize {
        which.iter().map(|i| self.proxies[*i].cut_all()).sum()
    }

    pub(super) fn cuts(&self) -> u64 {
        self.proxies.iter().map(Proxy::cuts).sum()
    }
}

/// A running drop test: the clients and the publisher.
pub(super) struct DropRun {
    pub(super) started: Instant,
    pub(super) progress: Arc<Progress>,
    pub(super) stop: watch::Sender<bool>,
    pub(super) clients: Vec<tokio::task::JoinHandle<Reconnecting>>,
    pub(super) warmup: Vec<Published>,
    pub(super) publisher: tokio::task::JoinHandle<Vec<Published>>,
}

pub(super) async fn publish_one(http: &reqwest::Client, target: SocketAddr, seq: u64) -> Published {
    let (body, rooms) = drop_event(seq);
    let started = Instant::now();
    let status = match tokio::time::timeout(
        Duration::from_secs(5),
        http.post(format!("http://{target}/v1/events")).bearer_auth(PUBLISH_TOKEN).json(&body).send(),
    )
    .await
    {
        Ok(Ok(r)) => r.status().as_u16(),
        _ => 0,
    };
    Published { seq, rooms, started, status }
}

impl DropRun {
    /// Connects `clients_count()` clients (1,000) in batches over the proxies, waits until each
    /// is subscribed and holds an offset (a warm-up event per campaign), then
    /// starts publishing at `RATE` for `publish_for`.
    pub(super) async fn start(fleet: &DropFleet, publish_for: Duration) -> DropRun {
        let routes: Arc<Vec<SocketAddr>> = Arc::new(fleet.proxies.iter().map(Proxy::addr).collect());
        let progress = Arc::new(Progress::default());
        let (stop, stopped) = watch::channel(false);
        let mut clients = Vec::new();
        for batch in (0..clients_count()).collect::<Vec<_>>().chunks(100) {
            for &i in batch {
                let k = i as u64 % CAMPAIGNS;
                let kind = KINDS[(i / CAMPAIGNS as usize) % 3];
                let id = match kind {
                    "campaign" => format!("rc{k}"),
                    "settlement" => format!("rs{k}"),
                    _ => format!("rst{k}"),
                };
                let client = Reconnecting {
                    user: format!("ru{k}"),
                    kind,
                    id,
                    routes: routes.clone(),
                    next_route: i,
                    last_offset: None,
                    got: Vec::new(),
                    subscribed: Vec::new(),
                    failed: HashMap::new(),
                };
                clients.push(tokio::spawn(client.run(progress.clone(), stopped.clone())));
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while progress.started.load(Ordering::SeqCst) < clients.len() {
                assert!(Instant::now() < deadline, "clients did not all subscribe");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let http = reqwest::Client::new();
        let mut warmup = Vec::new();
        for seq in 0..CAMPAIGNS {
            let target = fleet.targets.lock().unwrap()[seq as usize % 2];
            let p = publish_one(&http, target, seq).await;
            assert_eq!(p.status, 202, "warm-up publish");
            warmup.push(p);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while progress.with_offset.load(Ordering::SeqCst) < clients.len() {
            assert!(Instant::now() < deadline, "the warm-up did not reach every client");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let targets = fleet.targets.clone();
        let publisher = tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let until = Instant::now() + publish_for;
            let mut seq = CAMPAIGNS;
            while Instant::now() < until {
                tick.tick().await;
                let target = {
                    let t = targets.lock().unwrap();
                    t[seq as usize % t.len()]
                };
                sent.push(publish_one(&http, target, seq).await);
                seq += 1;
            }
            sent
        });
        DropRun { started: Instant::now(), progress, stop, clients, warmup, publisher }
    }

    /// Sleeps until `at` after the publisher started.
    pub(super) async fn at(&self, at: Duration) {
        tokio::time::sleep_until((self.started + at).into()).await;
    }

    /// Waits for the publisher, then for quiet (every client subscribed, no
    /// event for 1 s), then stops the clients and returns what they saw.
    pub(super) async fn finish(self) -> (Vec<Reconnecting>, Vec<Published>, Duration) {
        let mut published = self.warmup;
        published.extend(self.publisher.await.expect("publisher"));
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut last, mut still) = (self.progress.delivered.load(Ordering::SeqCst), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = self.progress.delivered.load(Ordering::SeqCst);
            let settled = self.progress.settled.load(Ordering::SeqCst);
            if now != last || settled != self.clients.len() {
                (last, still) = (now, Instant::now());
            } else if still.elapsed() >= Duration::from_secs(1) {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("no quiet within 20 s: {settled}/{} clients subscribed", self.clients.len());
                break;
            }
        }
        let took = self.started.elapsed();
        let _ = self.stop.send(true);
        let mut clients = Vec::new();
        for c in self.clients {
            clients
                .push(tokio::time::timeout(Duration::from_secs(10), c).await.expect("client stops").expect("client"));
        }
        (clients, published, took)
    }
}
