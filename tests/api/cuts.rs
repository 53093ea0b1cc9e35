//! Cuts: how herald ends a socket, and that the gauges follow.
//!
//! A cut so that the client comes back (an expired token, a slow consumer, a
//! lost event log) closes the transport, never with a Socket.IO DISCONNECT
//! packet, which the stock client treats as final: over WebSocket a close
//! frame and the end of the connection; over long-polling the end of the
//! Engine.IO session, so that the next poll fails; in the middle of an
//! upgrade, both. A cut where coming back would be wrong (the user's access
//! revoked, the rate limit ignored) is a DISCONNECT. After every kind,
//! `herald_connections` and `herald_subscriptions` are back to 0.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::helpers::*;

/// A token for `sub` that expires `secs` from now.
fn short_token(sub: &str, secs: u64) -> String {
    token_with(&jsonwebtoken::Header::default(), json!({"sub": sub, "exp": now() + secs}), JWT_SECRET.as_bytes())
}

/// Waits until `/metrics` shows no connection and no subscription.
async fn gauges_back_to_zero(app: &TestApp, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let m = app.metrics().await;
        let subscriptions: f64 = ["campaign", "settlement", "structure"]
            .iter()
            .map(|k| metric(&m, &format!("herald_subscriptions{{kind=\"{k}\"}}")))
            .sum();
        if metric(&m, "herald_connections") == 0.0 && subscriptions == 0.0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "after {what}, the gauges are not back to 0:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn subscribed(app: &TestApp, token: String) -> Client {
    let mut c = app.try_connect(Some(json!({ "token": token })), "").await.expect("connects");
    assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(c.subscribe("settlement", "s1").await["success"], true);
    c
}

#[tokio::test]
async fn an_expired_token_closes_the_websocket_not_the_session() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth.jwt_leeway = Duration::ZERO).await;
    let c = subscribed(&app, short_token("alice", 1)).await;
    assert!(c.closed_within(Duration::from_secs(4)).await, "cut at exp");
    assert!(!c.got_disconnect_packet(), "a transport close, not a DISCONNECT packet");
    gauges_back_to_zero(&app, "a token expiry").await;
}

#[tokio::test]
async fn a_revoked_user_and_a_rate_limit_abuser_get_a_final_disconnect() {
    let app = spawn_rate_limited_app(3).await;
    let revoked = subscribed(&app, token("alice")).await;
    let response = app
        .http
        .post(app.url("/v1/access/revoke"))
        .bearer_auth(PUBLISH_TOKEN)
        .json(&json!({"userId": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(revoked.closed_within(Duration::from_secs(3)).await);
    assert!(revoked.got_disconnect_packet(), "a user revocation is final");

    let abuser = app.connect("bob").await;
    for _ in 0..10 {
        abuser.emit("subscribe_campaign", json!({"campaignId": "c1"}));
    }
    assert!(abuser.closed_within(Duration::from_secs(3)).await);
    assert!(abuser.got_disconnect_packet(), "ignoring the rate limit is final");
    gauges_back_to_zero(&app, "a revocation and a rate-limit disconnect").await;
}

/// A raw long-polling session (Engine.IO 4) on `app`.
struct Polling {
    http: reqwest::Client,
    url: String,
}

impl Polling {
    /// Opens a session and connects to the namespace with `token`.
    async fn connect(app: &TestApp, token: &str) -> (Polling, String) {
        let http = reqwest::Client::new();
        let open = http.get(app.url("/socket.io/?EIO=4&transport=polling")).send().await.unwrap().text().await.unwrap();
        let open: Value = serde_json::from_str(open.strip_prefix('0').expect("an open packet")).unwrap();
        let sid = open["sid"].as_str().unwrap().to_owned();
        let polling = Polling { http, url: app.url(&format!("/socket.io/?EIO=4&transport=polling&sid={sid}")) };
        assert_eq!(polling.post(&format!("40{}", json!({ "token": token }))).await, 200);
        assert!(polling.next_packet().await.starts_with("40"), "connected");
        (polling, sid)
    }

    /// The next packet that is not a ping (pings are answered).
    async fn next_packet(&self) -> String {
        loop {
            let (status, body) = self.poll().await;
            assert_eq!(status, 200, "{body}");
            for packet in body.split('\u{1e}') {
                match packet {
                    "2" => assert_eq!(self.post("3").await, 200),
                    "6" => {}
                    _ => return packet.to_owned(),
                }
            }
        }
    }

    async fn post(&self, body: &str) -> u16 {
        self.http.post(&self.url).body(body.to_owned()).send().await.unwrap().status().as_u16()
    }

    /// One poll: its status and body.
    async fn poll(&self) -> (u16, String) {
        let response = self.http.get(&self.url).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// Polls until the session is gone (400), answering pings; fails after 5 s.
    async fn until_gone(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (status, body) =
                tokio::time::timeout(Duration::from_secs(5), self.poll()).await.expect("a poll answers");
            if status == 400 {
                return;
            }
            assert!(!body.contains("41"), "a DISCONNECT packet: {body}");
            assert!(std::time::Instant::now() < deadline, "the session outlived its cut");
        }
    }
}

/// A polling session subscribed to campaign c1, in the middle of an upgrade:
/// its WebSocket opened and the probe answered, the `5` not yet sent.
async fn subscribed_mid_upgrade(
    app: &TestApp,
    token: &str,
) -> (Polling, tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>) {
    let (polling, sid) = Polling::connect(app, token).await;
    assert_eq!(polling.post(r#"420["subscribe_campaign",{"campaignId":"c1"}]"#).await, 200);
    assert_eq!(polling.next_packet().await, r#"430[{"success":true}]"#);
    let url = format!("ws://{}/socket.io/?EIO=4&transport=websocket&sid={sid}", app.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("the upgrade's WebSocket opens");
    ws.send(Message::text("2probe")).await.unwrap();
    let probe = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(probe, Message::text("3probe"));
    (polling, ws)
}

#[tokio::test]
async fn an_expired_token_ends_a_polling_session_so_that_the_next_poll_fails() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth.jwt_leeway = Duration::ZERO).await;
    let (polling, _) = Polling::connect(&app, &short_token("alice", 1)).await;
    assert_eq!(polling.post(r#"420["subscribe_campaign",{"campaignId":"c1"}]"#).await, 200);
    assert_eq!(polling.next_packet().await, r#"430[{"success":true}]"#);
    polling.until_gone().await;
    gauges_back_to_zero(&app, "a polling token expiry").await;
}

#[tokio::test]
async fn a_cut_in_the_middle_of_an_upgrade_ends_both_transports() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth.jwt_leeway = Duration::ZERO).await;
    // The upgrade starts (probe answered) and never finishes (no `5`): past
    // the cut's grace, both transports end.
    let (polling, mut ws) = subscribed_mid_upgrade(&app, &short_token("alice", 2)).await;

    polling.until_gone().await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = ws.next().await {
            assert!(!matches!(&message, Message::Text(t) if t.starts_with("41")), "a DISCONNECT packet");
        }
    })
    .await;
    assert!(closed.is_ok(), "the upgrade's WebSocket is closed too");
    gauges_back_to_zero(&app, "a cut mid-upgrade").await;
}

/// The stock client pauses its polling once the server answered its probe,
/// then sends `5`; if the probe's WebSocket died in between, it would sit
/// paused until its ping timeout. So a cut in the middle of an upgrade lets
/// the upgrade finish, then closes the WebSocket (a close frame, no
/// DISCONNECT).
#[tokio::test]
async fn a_cut_in_the_middle_of_an_upgrade_lets_it_finish_then_closes_the_websocket() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth.jwt_leeway = Duration::ZERO).await;
    // Two seconds: the cut (at the second `exp` begins) comes after the upgrade started.
    let exp = now() + 2;
    let token =
        token_with(&jsonwebtoken::Header::default(), json!({"sub": "alice", "exp": exp}), JWT_SECRET.as_bytes());
    let (_polling, mut ws) = subscribed_mid_upgrade(&app, &token).await;
    // The token expires (the cut), then the client finishes its upgrade.
    let at = std::time::UNIX_EPOCH + Duration::from_secs(exp) + Duration::from_millis(500);
    tokio::time::sleep(at.duration_since(std::time::SystemTime::now()).unwrap_or_default()).await;
    ws.send(Message::text("5")).await.unwrap();
    let ending = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Close(_) => return true,
                Message::Text(t) => assert!(!t.starts_with("41"), "a DISCONNECT packet"),
                _ => {}
            }
        }
        false
    })
    .await;
    assert_eq!(ending, Ok(true), "the upgraded WebSocket ends with a close frame");
    gauges_back_to_zero(&app, "a cut mid-upgrade, finished").await;
}

#[tokio::test]
async fn a_client_that_leaves_takes_its_subscriptions_with_it() {
    let app = spawn_app().await;
    let c = subscribed(&app, token("alice")).await;
    c.close();
    gauges_back_to_zero(&app, "a client closing").await;
}
