//! The `herald` binary as a separate process: what it logs (never a secret),
//! and how it holds up under hostile input (it stays up, with bounded memory,
//! and a well-behaved client keeps getting its events).
//!
//! (Over 500 lines: each test drives a whole process, and the abuse test,
//! seven kinds of attacker at once, is a third of the file.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::Header;
use rand::Rng;
use serde_json::json;

use crate::binary::Process;
use crate::client::Client;
use crate::helpers::*;

/// Fails when any 8-character window of a secret is in `text`. A JWT's
/// header is public (and shared by every token), so only its payload and
/// signature count.
pub fn assert_no_window_of(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        let parts: Vec<&str> =
            if secret.starts_with("eyJ") { secret.split('.').skip(1).collect() } else { vec![secret] };
        for part in parts {
            let chars: Vec<char> = part.chars().collect();
            for window in chars.windows(8.min(chars.len())) {
                let window: String = window.iter().collect();
                if let Some(line) = text.lines().find(|l| l.contains(&window)) {
                    panic!("8 characters of a secret are in the {what}: {}", line.replace(&window, "<SECRET>"));
                }
            }
        }
    }
}

/// No log line, at any level, holds a client token, the JWT secret or the
/// publish token, nor any 8 characters of them; nor an Engine.IO session id
/// (it grants the session), in the logs or the metrics; and no value from
/// outside can start a log line of its own.
#[tokio::test]
async fn no_secret_and_no_session_id_reaches_the_logs_and_no_line_can_be_forged() {
    let app = Process::start(&[("HERALD_LOG", "trace"), ("HERALD_JWT_LEEWAY", "0s")]).await;
    let alice = token("alice");
    let carol = token("carol");
    let in_query = token("bob");
    let forged =
        token_with(&Header::default(), json!({"sub": "alice", "exp": now() + 600}), b"another-secret-entirely");
    let expired = token_with(&Header::default(), json!({"sub": "alice", "exp": now() - 600}), JWT_SECRET.as_bytes());
    let garbage = "not-a-jwt-but-still-a-secret-0123456789";
    let wrong_publish = "wrong-publish-token-that-is-still-secret";
    const FORGED: &str = "zz\nFAKE-LOG-LINE ERROR herald: admin logged in";
    let forged_sub = token_with(&Header::default(), json!({"sub": FORGED, "exp": now() + 600}), JWT_SECRET.as_bytes());

    // Handshakes: accepted (auth and query), refused (forged, expired, garbage, a sub that is no user id).
    let mut c = Client::connect(app.addr, Some(json!({"token": alice})), "").await.expect("connects");
    assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(c.subscribe("campaign", "c2").await["success"], false);
    let q = Client::connect(app.addr, None, &format!("token={in_query}")).await.expect("connects with a query token");
    for bad in [&forged, &expired, &garbage.to_owned(), &forged_sub] {
        assert!(Client::connect(app.addr, Some(json!({"token": bad})), "").await.is_err());
        assert!(Client::connect(app.addr, None, &format!("token={bad}")).await.is_err());
    }
    // Long-polling handshake with the token in the URL, then its session.
    let polling = app.http.get(app.url(&format!("/socket.io/?EIO=4&transport=polling&token={alice}"))).send().await;
    let open = polling.unwrap().text().await.unwrap();
    let polling_sid = open.split("\"sid\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap().to_owned();
    let session = app.url(&format!("/socket.io/?EIO=4&transport=polling&sid={polling_sid}"));
    let connect = app.http.post(&session).body(format!("40{}", json!({"token": alice}))).send().await.unwrap();
    assert_eq!(connect.status(), 200);
    // In-band refresh: accepted, another user's, invalid.
    let fresh = token("alice");
    assert_eq!(c.emit_with_ack("refresh_token", json!({"token": fresh})).await["success"], true);
    assert_eq!(c.emit_with_ack("refresh_token", json!({"token": carol})).await["success"], false);
    assert_eq!(c.emit_with_ack("refresh_token", json!({"token": garbage})).await["success"], false);
    // Values from outside that try to start a line of their own.
    // (socketioxide itself drops a packet whose event name holds a newline.)
    let forged_event = FORGED.replace('\n', "\u{2028}");
    assert_eq!(c.emit_with_ack(&forged_event, json!({})).await["error"], "Unknown event");
    assert_eq!(app.publish_with(PUBLISH_TOKEN, &json!({"type": FORGED, "payload": {}})).await, 400);
    let forged_revoke = app.http.post(app.url("/v1/access/revoke")).bearer_auth(PUBLISH_TOKEN);
    assert_eq!(forged_revoke.json(&json!({"userId": FORGED})).send().await.unwrap().status(), 400);
    // Publishing and revoking, with the right token and a wrong one.
    assert_eq!(app.publish_with(PUBLISH_TOKEN, &bodies::state_invalidated("c1")).await, 202);
    assert_eq!(app.publish_with(wrong_publish, &bodies::state_invalidated("c1")).await, 401);
    assert_eq!(app.publish_with(PUBLISH_TOKEN, &json!({"type": "nope"})).await, 400);
    let revoke = app.http.post(app.url("/v1/access/revoke")).bearer_auth(PUBLISH_TOKEN);
    let revoke = revoke.json(&json!({"userId": "bob"})).send().await.unwrap();
    assert_eq!(revoke.status(), 202);
    q.closed_within(Duration::from_secs(5)).await;
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let sids = [c.sid.clone(), q.sid.clone(), polling_sid];
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let output = app.output.lock().unwrap().clone();
    assert!(output.lines().count() > 20, "trace logs were captured:\n{output}");
    let secrets =
        [JWT_SECRET, PUBLISH_TOKEN, &alice, &carol, &in_query, &forged, &expired, garbage, wrong_publish, &fresh];
    assert_no_window_of(&output, &secrets, "logs");
    for sid in &sids {
        assert!(!sid.is_empty());
        for (text, what) in [(&output, "logs"), (&metrics, "metrics")] {
            if let Some(line) = text.lines().find(|l| l.contains(sid.as_str())) {
                panic!("a session id is in the {what}: {line}");
            }
        }
    }
    assert!(output.contains("FAKE-LOG-LINE"), "the forged values were logged (escaped):\n{output}");
    for line in output.lines() {
        assert!(!line.starts_with("FAKE-LOG-LINE"), "a forged log line: {line}");
    }
}

/// Connections that send nothing, or half a request line, are closed once
/// the header timeout passes, so they cannot hold the process's file
/// descriptors: with more of them than its (lowered) limit allows, the
/// listener keeps going, and a real client connects once they are gone.
/// herald raises its soft limit to the hard one at start, and says so.
/// The in-memory replay log is bounded by bytes: 150 publishes of 1 MiB
/// events leave the process's memory within the default bound (32 MiB) plus
/// some slack, rather than growing by all of them.
#[tokio::test]
async fn a_flood_of_large_events_stays_within_the_replay_bytes() {
    let app = Process::start(&[("HERALD_LOG", "warn")]).await;
    let blob = "m".repeat(1_000_000);
    let rss_before = app.rss_kib();
    let mut rss_peak = rss_before;
    for seq in 0..150 {
        let mut event = bodies::entity_updated("c1", "campaign", "c1");
        event["payload"]["entityData"] = json!({"seq": seq, "blob": blob});
        assert_eq!(app.publish_with(PUBLISH_TOKEN, &event).await, 202);
        rss_peak = rss_peak.max(app.rss_kib());
    }
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let bytes = metric(&metrics, "herald_replay_log_bytes");
    println!(
        "replay log under 150 events of 1 MiB: {} events, {:.1} MiB kept; server RSS {} MiB before, {} MiB peak",
        metric(&metrics, "herald_replay_log_events"),
        bytes / 1048576.0,
        rss_before / 1024,
        rss_peak / 1024
    );
    assert!(bytes <= 32.0 * 1048576.0, "the log keeps {bytes} bytes");
    assert!(rss_peak < rss_before + 96 * 1024, "memory grew from {rss_before} KiB to {rss_peak} KiB");
}

/// Random and truncated frames, a huge frame, unexpected binary attachments,
/// a subscribe flood, a client that never reads and garbage polling bodies,
/// all at once, while a well-behaved client on the same instance receives a
/// steady stream of events: it gets every one, in order, and the process
/// stays up with bounded memory. Prints the server's memory and CPU.
#[tokio::test]
async fn hostile_clients_do_not_hurt_the_process_or_other_clients() {
    let mut app = Process::start(&[("HERALD_LOG", "warn"), ("HERALD_SOCKET_BUFFER", "64")]).await;
    let addr = app.addr;
    let mut good = Client::connect(addr, Some(json!({"token": token("alice")})), "").await.unwrap();
    assert_eq!(good.subscribe("campaign", "c1").await["success"], true);
    let rss_before = app.rss_kib();
    let cpu_before = app.cpu_seconds();

    let stop = Arc::new(AtomicBool::new(false));
    let frames_sent = Arc::new(AtomicUsize::new(0));
    let mut abusers = tokio::task::JoinSet::new();

    // Random and truncated Engine.IO / Socket.IO frames, text and binary,
    // from 8 connections that reconnect whenever the server drops them.
    for _ in 0..8 {
        let (stop, sent) = (stop.clone(), frames_sent.clone());
        abusers.spawn(async move {
            let templates = [
                "42[\"subscribe_campaign\",{\"campaignId\":",
                "42[\"subscribe_campaign\"",
                "4",
                "40",
                "41",
                "43",
                "44{}",
                "45",
                "46",
                "451-[\"subscribe_campaign\",{\"_placeholder\":true,\"num\":0}]",
                "461-/,0[{\"_placeholder\":true,\"num\":0}]",
                "42[]",
                "42[{}]",
                "42[1,2,3]",
                "420[\"subscribe_settlement\",null]",
                "421[\"unsubscribe_campaign\",[]]",
                "42[\"refresh_token\",{\"token\":7}]",
                "42999999999999999999999[\"subscribe_campaign\",{}]",
                "2",
                "3",
                "5",
                "6",
                "1",
                "0",
                "4\u{0}\u{ffff}",
                "42[\"__proto__\",{\"constructor\":{\"prototype\":{}}}]",
            ];
            while !stop.load(Ordering::Relaxed) {
                let Ok(c) = Client::connect(addr, Some(json!({"token": token("bob")})), "").await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                for _ in 0..200 {
                    let (frame, binary) = {
                        let mut rng = rand::rng();
                        let template = templates[rng.random_range(0..templates.len())];
                        let cut = rng.random_range(0..=template.len());
                        let frame = if rng.random_bool(0.5) && template.is_char_boundary(cut) {
                            template[..cut].to_owned()
                        } else {
                            template.to_owned()
                        };
                        let binary: Option<Vec<u8>> =
                            rng.random_bool(0.2).then(|| (0..rng.random_range(0..512)).map(|_| rng.random()).collect());
                        (frame, binary)
                    };
                    match binary {
                        Some(bytes) => c.send_binary(bytes),
                        None => c.send_raw(&frame),
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                    if c.is_closed() || stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }

    // Huge frames (far over the 64 KiB message limit), over and over.
    {
        let stop = stop.clone();
        abusers.spawn(async move {
            let huge = format!("42[\"subscribe_campaign\",{{\"campaignId\":\"{}\"}}]", "x".repeat(4 << 20));
            while !stop.load(Ordering::Relaxed) {
                if let Ok(c) = Client::connect(addr, Some(json!({"token": token("bob")})), "").await {
                    c.send_raw(&huge);
                    assert!(c.closed_within(Duration::from_secs(5)).await, "a huge frame closes the connection");
                }
            }
        });
    }

    // A subscribe flood from one socket: thousands of calls as fast as it can.
    {
        let stop = stop.clone();
        abusers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(c) = Client::connect(addr, Some(json!({"token": token("bob")})), "").await else { continue };
                for i in 0..5000u32 {
                    c.send_raw(&format!("42{i}[\"subscribe_campaign\",{{\"campaignId\":\"c1\"}}]"));
                    if i % 500 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                assert!(c.closed_within(Duration::from_secs(10)).await, "a flooding socket is disconnected");
            }
        });
    }

    // Garbage long-polling bodies, with a real session id and a made-up one.
    {
        let stop = stop.clone();
        let url = app.url("/socket.io/?EIO=4&transport=polling");
        abusers.spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let open = http.get(format!("{url}&token={}", token("bob"))).send().await;
                let sid = match open {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => continue,
                };
                let sid = sid.split("\"sid\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("x").to_owned();
                for target in [sid.as_str(), "made-up-session-id"] {
                    let body: Vec<u8> = {
                        let mut rng = rand::rng();
                        (0..rng.random_range(0..2048)).map(|_| rng.random()).collect()
                    };
                    let _ = http.post(format!("{url}&sid={target}")).body(body).send().await;
                    let _ =
                        http.post(format!("{url}&sid={target}")).body("40\u{1e}42[\"subscribe_campaign\"").send().await;
                }
            }
        });
    }

    // A client in the room that never reads.
    let (mut never_reads, stall) =
        Client::connect_stallable(addr, Some(json!({"token": token("bob")}))).await.expect("connects");
    assert_eq!(never_reads.subscribe("campaign", "c1").await["success"], true);
    stall.send(true).unwrap();

    // Meanwhile: events of 16 KiB, every 20 ms for 8 s, to the good client's
    // room (and the never-reading client's), then as fast as they go until
    // the never-reading client is caught (at most 30 s more: its kernel
    // buffers fill first, then its 64 packets). Memory is sampled throughout.
    let blob = "y".repeat(16 * 1024);
    let started = Instant::now();
    let mut published = 0usize;
    let mut rss_peak = rss_before;
    let mut offsets = Vec::new();
    let slow_consumers = || async {
        let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        metric(&metrics, r#"herald_limits_hit_total{limit="slow_consumer"}"#)
    };
    loop {
        let hostile_phase = started.elapsed() < Duration::from_secs(8);
        let done = !hostile_phase
            && published.is_multiple_of(10)
            && (started.elapsed() > Duration::from_secs(38) || slow_consumers().await >= 1.0);
        if done {
            break;
        }
        let mut event = bodies::entity_updated("c1", "campaign", "c1");
        event["payload"]["entityData"] = json!({"seq": published, "blob": blob});
        assert_eq!(app.publish_with(PUBLISH_TOKEN, &event).await, 202);
        published += 1;
        while let Some((_, event)) = good.try_next_event() {
            offsets.push(event["offset"].as_str().unwrap_or_default().to_owned());
        }
        rss_peak = rss_peak.max(app.rss_kib());
        if hostile_phase {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    while offsets.len() < published {
        let Some((_, event)) = good.next_event(Duration::from_secs(10)).await else { break };
        offsets.push(event["offset"].as_str().unwrap_or_default().to_owned());
    }
    let cpu = app.cpu_seconds() - cpu_before;
    // Every abuser's own checks (a huge frame closes its connection, a
    // flooding socket is disconnected) must have held.
    let joined = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(result) = abusers.join_next().await {
            if let Err(e) = result {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    })
    .await;
    assert!(joined.is_ok(), "the abusers did not stop");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = app.rss_kib();

    assert!(app.is_running(), "the process is up");
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(offsets.len(), published, "the good client got every event");
    let mut sorted = offsets.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, offsets, "in order, no duplicates");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let limit = |name: &str| metric(&metrics, &format!("herald_limits_hit_total{{limit=\"{name}\"}}"));
    println!(
        "abuse test: {published} events to the good client, all received in order; {} hostile frames; \
         server RSS {} MiB before, {} MiB peak, {} MiB after; server CPU {cpu:.2} s over {:.1} s; \
         limits hit: event_rate_disconnect {}, slow_consumer {}",
        frames_sent.load(Ordering::Relaxed),
        rss_before / 1024,
        rss_peak / 1024,
        rss_after / 1024,
        started.elapsed().as_secs_f64(),
        limit("event_rate_disconnect"),
        limit("slow_consumer"),
    );
    assert!(limit("slow_consumer") >= 1.0, "the client that never reads was caught");
    // Measured: a few MiB. The never-reading client's buffers (64 packets of
    // 16 KiB) and the replay log (below its 32 MiB) are most of what is allowed.
    assert!(rss_peak < rss_before + 48 * 1024, "memory stays bounded: {rss_before} KiB then {rss_peak} KiB");
}
