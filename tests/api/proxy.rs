//! A small TCP proxy in front of a gateway (or of Redis), on loopback, so
//! that tests can cut every live connection at once (both sides reset, as
//! when a load balancer or a network path dies), switch the upstream (an
//! instance restarted on another port), and hold new connections back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Most connection pairs a proxy carries at once; beyond, it refuses (closes at once).
const MAX_PAIRS: usize = 8192;
/// Longest a proxy waits for the upstream to accept.
const UPSTREAM_CONNECT: Duration = Duration::from_secs(2);

struct Shared {
    upstream: Mutex<Option<SocketAddr>>,
    pairs: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
    cuts: AtomicU64,
    accepted: AtomicU64,
    /// Connections accepted past this many wait until it is raised.
    forward_first: tokio::sync::watch::Sender<u64>,
}

/// A running proxy. Dropping it stops it and closes every pair.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        assert!(upstream.ip().is_loopback(), "the proxy only forwards to loopback");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("the proxy binds");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(Some(upstream)),
            pairs: Mutex::default(),
            next_id: AtomicU64::new(0),
            cuts: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            forward_first: tokio::sync::watch::Sender::new(u64::MAX),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        Proxy { addr, shared, accept }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// New connections go to `upstream` from now on (live pairs are kept).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        assert!(upstream.ip().is_loopback(), "the proxy only forwards to loopback");
        *self.shared.upstream.lock().unwrap() = Some(upstream);
    }

    /// Resets both sides of every live pair; returns how many were cut.
    pub fn cut_all(&self) -> usize {
        let pairs: Vec<AbortHandle> = self.shared.pairs.lock().unwrap().drain().map(|(_, h)| h).collect();
        for pair in &pairs {
            pair.abort();
        }
        self.shared.cuts.fetch_add(pairs.len() as u64, Ordering::SeqCst);
        pairs.len()
    }

    /// From now on, only the first `n` connections ever accepted are
    /// forwarded; later ones wait (held open, unanswered) until
    /// [`Proxy::forward_all`].
    pub fn forward_only_first(&self, n: u64) {
        self.shared.forward_first.send_replace(n);
    }

    /// Forwards every connection, the held ones first.
    pub fn forward_all(&self) {
        self.shared.forward_first.send_replace(u64::MAX);
    }

    /// Pairs cut so far, over every `cut_all`.
    pub fn cuts(&self) -> u64 {
        self.shared.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        for (_, pair) in self.shared.pairs.lock().unwrap().drain() {
            pair.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let number = shared.accepted.fetch_add(1, Ordering::SeqCst) + 1;
        if shared.pairs.lock().unwrap().len() >= MAX_PAIRS {
            continue; // dropped: closed at once
        }
        let Some(upstream) = *shared.upstream.lock().unwrap() else { continue };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
        let shared_for_pair = shared.clone();
        // The pair is registered before it runs, so a cut never misses one
        // that is still connecting upstream.
        let (go, ready) = tokio::sync::oneshot::channel::<()>();
        let mut forward_first = shared.forward_first.subscribe();
        let task = tokio::spawn(async move {
            let _ = ready.await;
            let _ = forward_first.wait_for(|first| number <= *first).await;
            pipe(client, upstream).await;
            shared_for_pair.pairs.lock().unwrap().remove(&id);
        });
        shared.pairs.lock().unwrap().insert(id, task.abort_handle());
        let _ = go.send(());
    }
}

/// Forwards until either side closes. Both sockets have SO_LINGER 0, so that
/// dropping them (a cut aborts this future) resets the connection.
async fn pipe(mut client: TcpStream, upstream: SocketAddr) {
    let _ = client.set_zero_linger();
    let _ = client.set_nodelay(true);
    let Ok(Ok(mut server)) = tokio::time::timeout(UPSTREAM_CONNECT, TcpStream::connect(upstream)).await else {
        return;
    };
    let _ = server.set_zero_linger();
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}
