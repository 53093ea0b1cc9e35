//! No way to exhaust an instance, with or without a token: connections cut
//! at every point of the handshake leave no count and no room behind, and
//! what a peer can make herald hold (idle connections, slow bodies, sessions
//! that never connect, queued control frames) is bounded in time and memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::binary::Process;
use crate::client::Client;
use crate::helpers::*;

/// Where a storm connection stops.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// Right after the TCP handshake.
    Tcp,
    /// After half a request line.
    HalfRequest,
    /// After the WebSocket upgrade request, before its answer.
    UpgradeSent,
    /// After the upgrade's answer.
    Upgraded,
    /// At once after sending CONNECT with a valid token (the counter's race).
    ConnectSent,
    /// After CONNECT and its answer.
    Connected,
    /// At once after a subscribe.
    SubscribeSent,
    /// After a subscribe's ack.
    Subscribed,
    /// After a subscribe's ack, a Socket.IO DISCONNECT, and at once the
    /// connection's end (the socket closes twice).
    DisconnectSent,
    /// Long-polling: after the Engine.IO handshake.
    PollingOpened,
    /// Long-polling: at once after posting CONNECT.
    PollingConnectSent,
    /// Long-polling: after posting a subscribe.
    PollingSubscribeSent,
}

const CUTS: [Cut; 12] = [
    Cut::Tcp,
    Cut::HalfRequest,
    Cut::UpgradeSent,
    Cut::Upgraded,
    Cut::ConnectSent,
    Cut::Connected,
    Cut::SubscribeSent,
    Cut::Subscribed,
    Cut::DisconnectSent,
    Cut::PollingOpened,
    Cut::PollingConnectSent,
    Cut::PollingSubscribeSent,
];

/// One connection of the storm, stopped at `cut`; with `reset`, closed with
/// an RST instead of a FIN.
async fn storm_once(addr: std::net::SocketAddr, token: &str, cut: Cut, reset: bool) -> Option<()> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    tcp.set_nodelay(true).ok()?;
    if reset {
        tcp.set_zero_linger().ok()?;
    }
    let connect = format!("40{}", json!({"token": token}));
    let subscribe = r#"420["subscribe_campaign",{"campaignId":"c1"}]"#;
    match cut {
        Cut::Tcp => return Some(()),
        Cut::HalfRequest => {
            let mut tcp = tcp;
            tcp.write_all(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n").await.ok()?;
            return Some(());
        }
        Cut::UpgradeSent => {
            let mut tcp = tcp;
            let request = format!(
                "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
                 Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            );
            tcp.write_all(request.as_bytes()).await.ok()?;
            return Some(());
        }
        Cut::PollingOpened | Cut::PollingConnectSent | Cut::PollingSubscribeSent => {
            return polling_once(tcp, addr, &connect, subscribe, cut).await;
        }
        _ => {}
    }
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.ok()?;
    // The Engine.IO open packet.
    ws.next().await?.ok()?;
    if matches!(cut, Cut::Upgraded) {
        return Some(());
    }
    ws.send(Message::text(connect)).await.ok()?;
    if matches!(cut, Cut::ConnectSent) {
        return Some(());
    }
    ws.next().await?.ok()?;
    match cut {
        Cut::Connected => {}
        Cut::SubscribeSent => ws.send(Message::text(subscribe)).await.ok()?,
        _ => {
            ws.send(Message::text(subscribe)).await.ok()?;
            ws.next().await?.ok()?;
            if matches!(cut, Cut::DisconnectSent) {
                ws.send(Message::text("41")).await.ok()?;
            }
        }
    }
    Some(())
}

/// A long-polling storm connection (HTTP/1.1, kept alive, by hand).
async fn polling_once(
    mut tcp: TcpStream,
    addr: std::net::SocketAddr,
    connect: &str,
    subscribe: &str,
    cut: Cut,
) -> Option<()> {
    let base = "/socket.io/?EIO=4&transport=polling";
    let open = http_exchange(&mut tcp, &format!("GET {base} HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await?;
    if matches!(cut, Cut::PollingOpened) {
        return Some(());
    }
    let sid = open.split("\"sid\":\"").nth(1)?.split('"').next()?.to_owned();
    let post = |body: &str| {
        format!(
            "POST {base}&sid={sid} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: text/plain;charset=UTF-8\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    if matches!(cut, Cut::PollingConnectSent) {
        tcp.write_all(post(connect).as_bytes()).await.ok()?;
        return Some(());
    }
    http_exchange(&mut tcp, &post(connect)).await?;
    // The CONNECT's answer, then the subscribe, and gone.
    http_exchange(&mut tcp, &format!("GET {base}&sid={sid} HTTP/1.1\r\nHost: {addr}\r\n\r\n")).await?;
    tcp.write_all(post(subscribe).as_bytes()).await.ok()?;
    Some(())
}

/// Writes a request and reads one response (head and a body of its
/// Content-Length), as text.
async fn http_exchange(tcp: &mut TcpStream, request: &str) -> Option<String> {
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tcp.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return Some(text.into_owned());
            }
        }
    }
}

/// Reads the gauges until both are 0, or `wait` passed; returns the last reading.
async fn settled_gauges(app: &Process, wait: Duration) -> (f64, f64) {
    let deadline = Instant::now() + wait;
    loop {
        let m = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        let connections = metric(&m, "herald_connections");
        let subscriptions: f64 = ["campaign", "settlement", "structure"]
            .iter()
            .map(|k| metric(&m, &format!(r#"herald_subscriptions{{kind="{k}"}}"#)))
            .sum();
        if (connections == 0.0 && subscriptions == 0.0) || Instant::now() > deadline {
            return (connections, subscriptions);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Idle and half-sent connections are closed after the header timeout, and
/// twice the open-file limit of them does not lock a real client out.
#[tokio::test]
async fn idle_connections_cannot_lock_clients_out() {
    let app = Process::start_with_file_limit(&[("HERALD_HEADER_TIMEOUT", "1s")], 32, 96).await;
    assert!(
        app.output.lock().unwrap().contains("open file limit raised before=32 after=96"),
        "{}",
        app.output.lock().unwrap()
    );
    // One idle connection: how long it lives.
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let opened = Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read(&mut idle, &mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed by the server: {read:?}");
    let lived = opened.elapsed();
    assert!(lived < Duration::from_secs(3), "an idle connection lived {lived:?}");

    // Twice the limit, half of them with half a request line.
    let mut hoard = Vec::new();
    for i in 0..192 {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(app.addr)).await
        else {
            continue;
        };
        if i % 2 == 0 {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"GET /socket.io/?EIO=4&transp").await;
        }
        hoard.push(s);
    }
    let started = Instant::now();
    let mut c = loop {
        match Client::connect(app.addr, Some(json!({"token": token("alice")})), "").await {
            Ok(c) => break c,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(15), "a real client is locked out: {e:?}"),
        }
    };
    println!(
        "idle connections: one lived {lived:?} (HERALD_HEADER_TIMEOUT=1s); with {} held against a limit of 96, \
         a real client connected after {:?}",
        hoard.len(),
        started.elapsed()
    );
    assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let accept_failures = app.output.lock().unwrap().matches("accept failed").count();
    let took = started.elapsed().as_secs() + 2;
    assert!(
        accept_failures as u64 <= took,
        "{accept_failures} accept failure lines in {took} s: logged at most once a second"
    );
    drop(hoard);
}

/// Thousands of handshakes, each closed (with a FIN or an RST) at one point
/// of the handshake, from many tasks at once: afterwards both gauges are
/// exactly 0, and an instance capped at 20 connections admits 20 real clients.
/// (A long-polling session has no connection to close: it ends when its
/// client misses a heartbeat, so the heartbeat is short here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_handshakes_cut_anywhere_leaves_nothing_behind() {
    let app = Process::start(&[
        ("HERALD_MAX_CONNECTIONS", "20"),
        ("HERALD_CONNECT_TIMEOUT", "2s"),
        ("HERALD_PING_INTERVAL", "1s"),
        ("HERALD_PING_TIMEOUT", "1s"),
    ])
    .await;
    let token = Arc::new(token("alice"));
    let done = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(6);
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (token, done) = (token.clone(), done.clone());
            let addr = app.addr;
            tokio::spawn(async move {
                let mut i = w;
                while Instant::now() < until {
                    let cut = CUTS[i % CUTS.len()];
                    let reset = rand::rng().random_bool(0.5);
                    let _ = tokio::time::timeout(Duration::from_secs(5), storm_once(addr, &token, cut, reset)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let (connections, subscriptions) = settled_gauges(&app, Duration::from_secs(10)).await;
    let storm = done.load(Ordering::Relaxed);
    println!("storm: {storm} handshakes cut; afterwards connections {connections}, subscriptions {subscriptions}");
    assert!(storm >= 1_000, "only {storm} handshakes");
    assert_eq!((connections, subscriptions), (0.0, 0.0), "the gauges are back to exactly 0");

    // Every place below the cap is free: 20 real clients connect and subscribe.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(app.addr, Some(json!({"token": token.as_str()})), "").await.expect("admitted");
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        clients.push(c);
    }
    for c in &clients {
        c.close();
    }
    assert_eq!(settled_gauges(&app, Duration::from_secs(10)).await, (0.0, 0.0));
}

/// A WebSocket upgrade (no Socket.IO CONNECT, no token) on a socket with a
/// small receive buffer that it never reads.
async fn unread_websocket(addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let request = format!(
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 512];
    let n = tcp.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101"), "upgraded");
    tcp
}

/// Four peers that upgrade to WebSocket without a token and send 125-byte
/// pings without reading a byte: each pong herald owes waits for the peer,
/// so each connection is reset once 64 KiB of them wait (and the kernel's
/// send buffer is full), and the process's memory stays flat (before the
/// bound, one such peer took a release build from 36 to 400 MB in 6.6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_reads_nothing_is_reset_and_holds_no_memory() {
    let app = Process::start(&[]).await;
    let before = app.rss_kib();
    let mut ping = vec![0x89, 0x80 | 125, 0, 0, 0, 0];
    ping.extend_from_slice(&[b'x'; 125]);
    let batch = ping.repeat(1_000);
    let floods: Vec<_> = (0..4)
        .map(|_| {
            let batch = batch.clone();
            let addr = app.addr;
            tokio::spawn(async move {
                let mut tcp = unread_websocket(addr).await;
                let (started, mut sent) = (Instant::now(), 0u64);
                while started.elapsed() < Duration::from_secs(20) {
                    match tokio::time::timeout(Duration::from_secs(5), tcp.write_all(&batch)).await {
                        Ok(Ok(())) => sent += 1_000,
                        Ok(Err(_)) => return (sent, Some(started.elapsed())),
                        // herald stopped reading, yet holds the connection.
                        Err(_) => break,
                    }
                }
                (sent, None)
            })
        })
        .collect();
    let mut peak = before;
    let mut outcomes = Vec::new();
    for flood in floods {
        while !flood.is_finished() {
            peak = peak.max(app.rss_kib());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        outcomes.push(flood.await.unwrap());
    }
    println!("ping floods (pings sent, reset after): {outcomes:?}; RSS {before} KiB before, {peak} KiB at peak");
    for (sent, reset) in &outcomes {
        assert!(reset.is_some(), "a flood of {sent} pings was never reset");
    }
    assert!(peak < before + 32 * 1024, "RSS grew from {before} to {peak} KiB");
    let m = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric(&m, r#"herald_limits_hit_total{limit="control_backlog"}"#), 4.0);
    // Other clients never noticed.
    let mut c = Client::connect(app.addr, Some(json!({"token": token("alice")})), "").await.expect("connects");
    assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
}

/// Opens an Engine.IO long-polling session (no token needed); its id.
async fn polling_session(app: &Process) -> Option<String> {
    let open = app
        .http
        .get(app.url("/socket.io/?EIO=4&transport=polling"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if open.status() != 200 {
        return None;
    }
    let text = open.text().await.ok()?;
    Some(text.split("\"sid\":\"").nth(1)?.split('"').next()?.to_owned())
}

/// Without a token: long-polling POSTs whose bodies never end (a byte a
/// second of 60,000 announced), more of them than the process may open
/// files, and a flood of sessions that never send CONNECT. A slow body
/// lives as long as the body timeout; sessions past the bound per address
/// are refused with 429; and meanwhile a real client connects and
/// `/healthz` answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_and_a_session_flood_cannot_lock_clients_out() {
    let app = Process::start_with_file_limit(
        &[("HERALD_BODY_TIMEOUT", "1s"), ("HERALD_MAX_PENDING_PER_ADDRESS", "50"), ("HERALD_CONNECT_TIMEOUT", "2s")],
        64,
        64,
    )
    .await;
    // One slow body: how long it lives.
    let sid = polling_session(&app).await.expect("a session");
    let mut slow = TcpStream::connect(app.addr).await.unwrap();
    let head = format!(
        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n\
         Content-Length: 60000\r\n\r\n4"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let opened = Instant::now();
    let mut lived = None;
    while opened.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(10), slow.read(&mut probe)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                lived = Some(opened.elapsed());
                break;
            }
            // The answer to the failed request, then the end.
            Ok(Ok(_)) | Err(_) => {}
        }
        if slow.write_all(b"x").await.is_err() {
            lived = Some(opened.elapsed());
            break;
        }
    }
    let lived = lived.expect("the slow body was cut");
    assert!(lived < Duration::from_secs(3), "a slow body lived {lived:?} (HERALD_BODY_TIMEOUT=1s)");

    // Twice the open-file limit of slow bodies, and a session flood, all at once.
    let attack_until = Instant::now() + Duration::from_secs(4);
    let slow_bodies = {
        let addr = app.addr;
        let sids: Vec<String> = {
            let mut sids = Vec::new();
            for _ in 0..40 {
                sids.extend(polling_session(&app).await);
            }
            sids
        };
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut opened = 0;
            while Instant::now() < attack_until {
                if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await
                {
                    let sid = &sids[opened % sids.len()];
                    let head = format!(
                        "POST /socket.io/?EIO=4&transport=polling&sid={sid} HTTP/1.1\r\nHost: x\r\n\
                         Content-Type: text/plain\r\nContent-Length: 60000\r\n\r\n4"
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    held.push(s);
                    opened += 1;
                }
                // A byte a round on each; the ones herald closed are let go.
                held.retain(|s| match s.try_write(b"x") {
                    Ok(_) => true,
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                });
            }
            opened
        })
    };
    let mut statuses = std::collections::BTreeMap::new();
    while Instant::now() < attack_until {
        let handshake = app.http.get(app.url("/socket.io/?EIO=4&transport=polling")).timeout(Duration::from_secs(1));
        let status = match handshake.send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        *statuses.entry(status).or_insert(0) += 1;
    }
    let started = Instant::now();
    let mut c = loop {
        match Client::connect(app.addr, Some(json!({"token": token("alice")})), "").await {
            Ok(c) => break c,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(15), "a real client is locked out: {e:?}"),
        }
    };
    assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
    let health = app.http.get(app.url("/healthz")).timeout(Duration::from_secs(5)).send().await;
    assert_eq!(health.map(|h| h.status().as_u16()).ok(), Some(200));
    let opened = slow_bodies.await.unwrap();
    println!(
        "slow bodies: one lived {lived:?} (HERALD_BODY_TIMEOUT=1s); session flood answers {statuses:?}; \
         {opened} slow bodies opened against 64 open files; a real client connected {:?} after the attack",
        started.elapsed()
    );
    assert!(opened > 64, "more slow bodies than open files: {opened}");
    assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "the flood hit the bound per address: {statuses:?}");
    let m = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metric(&m, r#"herald_limits_hit_total{limit="body_timeout"}"#) >= 1.0);
    // Once the sessions that never connected time out, none is pending.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        if metric(&m, "herald_pending_sessions") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "sessions still pending: {}", metric(&m, "herald_pending_sessions"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
