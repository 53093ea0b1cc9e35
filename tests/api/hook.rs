//! The authorization hook (`HERALD_ACCESS_URL`): herald asks a real HTTP
//! server (`hook_server`, in this process, checking each signature as an
//! application would) whether a user may join a room.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::binary::Process;
use crate::client::Client;
use crate::helpers::*;
use crate::hook_server::{HOOK_SECRET, HookServer, MAX_AGE_SECS, sign};
use crate::process::assert_no_window_of;

const UNAVAILABLE: &str = "Unavailable";

async fn revoke(app: &TestApp, body: Value) -> u16 {
    let res = app.http.post(app.url("/v1/access/revoke")).bearer_auth(PUBLISH_TOKEN).json(&body).send().await.unwrap();
    res.status().as_u16()
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let res = app.http.get(app.url("/readyz")).send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap())
}

fn hook(app: &TestApp) -> &crate::hook_server::HookServer {
    app.hook.as_ref().expect("a hooked app")
}

/// Waits until `/metrics` shows `series` at `value` (within 3 s).
async fn metric_becomes(app: &TestApp, series: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = app.metrics().await;
        if metric(&m, series) == value {
            return;
        }
        assert!(Instant::now() < deadline, "{series} is {} rather than {value}", metric(&m, series));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_hook_allows_members_with_the_campaign_of_each_room_and_denies_the_others() {
    let app = spawn_hooked_app(|_| {}).await;
    let mut alice = app.connect("alice").await;
    for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1")] {
        assert_eq!(alice.subscribe(kind, id).await, json!({"success": true}), "{kind} {id}");
    }
    let mut carol = app.connect("carol").await;
    for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1"), ("settlement", "nope")] {
        assert_eq!(carol.subscribe(kind, id).await, json!({"success": false, "error": "Unauthorized"}), "{kind} {id}");
    }
    assert_eq!(carol.subscribe("structure", "st2").await["success"], true);
    assert_eq!((hook(&app).calls(), hook(&app).refused()), (8, 0), "each check one signed call, none refused");

    app.publish(&bodies::structure_updated("c1", "s1", "st1")).await;
    assert_eq!(alice.expect_event().await.0, "structure_updated");
    // The campaign the hook named for s1 and st1 is what a revocation of c1 finds.
    assert_eq!(revoke(&app, json!({"userId": "alice", "campaignId": "c1"})).await, 202);
    assert_eq!(alice.expect_event().await, ("access_revoked".to_owned(), json!({"campaignId": "c1"})));
    app.publish(&bodies::structure_updated("c1", "s1", "st1")).await;
    alice.expect_silence(Duration::from_millis(300)).await;
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_access_hook_calls_total{outcome="allow"}"#), 4.0);
    assert_eq!(metric(&m, r#"herald_access_hook_calls_total{outcome="deny"}"#), 4.0);
    assert_eq!(metric(&m, "herald_access_hook_duration_seconds_count"), 8.0);
    assert_eq!(readyz(&app).await, (200, json!({"status": "ready", "accessHook": {"circuit": "closed"}})));
}

#[tokio::test]
async fn the_hook_refuses_a_tampered_an_old_or_a_forged_request() {
    let app = spawn_hooked_app(|_| {}).await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    let http = reqwest::Client::new();
    let body = br#"{"version":1,"userId":"carol","room":{"kind":"campaign","id":"c1"}}"#.to_vec();
    let send = |timestamp: u64, signature: String, body: Vec<u8>| {
        http.post(hook(&app).url())
            .header("x-herald-timestamp", timestamp.to_string())
            .header("x-herald-signature", signature)
            .body(body)
            .send()
    };
    let at = now();
    let good = sign(HOOK_SECRET, &at.to_string(), &body);
    assert_eq!(send(at, good.clone(), body.clone()).await.unwrap().status(), 200);
    let tampered = body.iter().map(|&b| if b == b'l' { b'L' } else { b }).collect::<Vec<u8>>();
    assert_eq!(send(at, good, tampered).await.unwrap().status(), 401, "tampered body");
    let old = at - MAX_AGE_SECS - 60;
    assert_eq!(send(old, sign(HOOK_SECRET, &old.to_string(), &body), body.clone()).await.unwrap().status(), 401);
    assert_eq!(send(at, sign("another-secret", &at.to_string(), &body), body.clone()).await.unwrap().status(), 401);
    assert_eq!((hook(&app).calls(), hook(&app).refused()), (2, 3), "herald's call passed, the three others did not");

    // A hook that refuses herald's signature (another secret) is an outage, never a denial.
    let wrong = spawn_hooked_app(|c| c.access.access_secret = Some("not-the-hooks-secret".into())).await;
    let mut alice = wrong.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await, json!({"success": false, "error": UNAVAILABLE}));
    let m = wrong.metrics().await;
    assert_eq!(metric(&m, r#"herald_access_hook_calls_total{outcome="bad_status"}"#), 1.0);
    assert_eq!(metric(&m, r#"herald_acks_total{event="subscribe_campaign",outcome="unavailable"}"#), 1.0);
}

#[tokio::test]
async fn a_slow_hook_is_unavailable_within_the_timeout_never_unauthorized() {
    let app = spawn_hooked_app(|c| c.access.access_timeout = Duration::from_millis(200)).await;
    hook(&app).set_delay(Duration::from_secs(2));
    let mut alice = app.connect("alice").await;
    let started = Instant::now();
    assert_eq!(alice.subscribe("campaign", "c1").await, json!({"success": false, "error": UNAVAILABLE}));
    assert!(started.elapsed() < Duration::from_secs(1), "answered after {:?}", started.elapsed());
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_access_hook_calls_total{outcome="timeout"}"#), 1.0);
    // Failures are not cached: once the hook is quick again, the same check passes.
    hook(&app).set_delay(Duration::ZERO);
    assert_eq!(alice.subscribe("campaign", "c1").await, json!({"success": true}));
    metric_becomes(&app, "herald_access_hook_in_flight", 0.0).await;
}

#[tokio::test]
async fn a_failing_hook_opens_the_circuit_without_a_call_storm_and_it_closes_once_the_hook_answers() {
    let backoff = Duration::from_millis(1500);
    let app = spawn_hooked_app(|c| {
        c.access.access_circuit_failures = 3;
        c.access.access_circuit_backoff = backoff;
        c.limits.client_event_burst = 1000.0;
    })
    .await;
    let mut alice = app.connect("alice").await;
    hook(&app).set_failing(true);
    for _ in 0..30 {
        assert_eq!(alice.subscribe("campaign", "c1").await["error"], UNAVAILABLE);
    }
    assert_eq!(hook(&app).failed(), 3, "three failures open the circuit; the 27 others are not sent");
    let m = app.metrics().await;
    assert_eq!(metric(&m, "herald_access_hook_circuit"), 2.0);
    assert_eq!(metric(&m, r#"herald_access_hook_calls_total{outcome="circuit_open"}"#), 27.0);
    // Readiness stays: the hook's circuit is named, the instance still ready.
    assert_eq!(readyz(&app).await, (200, json!({"status": "ready", "accessHook": {"circuit": "open"}})));

    // After the backoff one call probes; it fails, so the circuit opens again.
    tokio::time::sleep(backoff + Duration::from_millis(100)).await;
    for _ in 0..5 {
        assert_eq!(alice.subscribe("campaign", "c1").await["error"], UNAVAILABLE);
    }
    assert_eq!(hook(&app).failed(), 4, "one probe");

    hook(&app).set_failing(false);
    tokio::time::sleep(backoff + Duration::from_millis(100)).await;
    assert_eq!(alice.subscribe("campaign", "c1").await, json!({"success": true}));
    assert_eq!(metric(&app.metrics().await, "herald_access_hook_circuit"), 0.0);
    assert_eq!(readyz(&app).await.1["accessHook"], json!({"circuit": "closed"}));

    // Down (connections refused), then up again on its port.
    let mut app = app;
    let hook_server = app.hook.as_mut().unwrap();
    hook_server.stop().await;
    for _ in 0..10 {
        assert_eq!(alice.subscribe("settlement", "s1").await["error"], UNAVAILABLE);
    }
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_access_hook_calls_total{outcome="request_error"}"#), 3.0);
    assert_eq!(metric(&m, "herald_access_hook_circuit"), 2.0);
    let calls_before = hook(&app).calls();
    app.hook.as_mut().unwrap().restart().await;
    tokio::time::sleep(backoff + Duration::from_millis(100)).await;
    assert_eq!(alice.subscribe("settlement", "s1").await, json!({"success": true}));
    assert_eq!(hook(&app).calls(), calls_before + 1);
    assert_eq!(metric(&app.metrics().await, "herald_access_hook_circuit"), 0.0);
}

#[tokio::test]
async fn a_thousand_concurrent_subscribes_for_one_user_and_room_make_one_call() {
    // No cache: only the merging of identical checks can explain one call.
    let app = spawn_hooked_app(|c| {
        c.store.membership_cache_ttl = Duration::ZERO;
        c.limits.client_event_burst = 1000.0;
    })
    .await;
    hook(&app).set_delay(Duration::from_millis(800));
    let mut sockets = Vec::new();
    for _ in 0..50 {
        sockets.push(app.connect("alice").await);
    }
    let mut acks = Vec::new();
    for socket in &mut sockets {
        for _ in 0..20 {
            acks.push(socket.emit_in_flight(
                "subscribe_campaign",
                json!({"campaignId": "c1"}),
                Duration::from_secs(10),
            ));
        }
    }
    let acks = join_all(acks).await;
    assert_eq!(acks.len(), 1000);
    assert!(
        acks.iter().all(|ack| ack.as_ref() == Some(&json!({"success": true}))),
        "{:?}",
        acks.iter().find(|a| a.as_ref() != Some(&json!({"success": true})))
    );
    assert_eq!(hook(&app).calls(), 1);
    let m = app.metrics().await;
    assert_eq!(metric(&m, "herald_access_hook_checks"), 0.0);
    assert_eq!(metric(&m, "herald_access_hook_in_flight"), 0.0);
}

#[tokio::test]
async fn calls_in_flight_and_checks_waiting_are_bounded() {
    let app = spawn_hooked_app(|c| {
        c.access.access_max_in_flight = 1;
        c.access.access_timeout = Duration::from_millis(1800);
        c.access.access_circuit_failures = 1000;
    })
    .await;
    hook(&app).set_delay(Duration::from_secs(1));
    let mut alice = app.connect("alice").await;
    // 100 distinct checks at once: one slot, and 64 checks waiting per slot.
    let acks: Vec<_> = (0..100)
        .map(|i| {
            alice.emit_in_flight("subscribe_campaign", json!({"campaignId": format!("x{i}")}), Duration::from_secs(5))
        })
        .collect();
    let acks = join_all(acks).await;
    let unavailable =
        acks.iter().filter(|a| a.as_ref() == Some(&json!({"success": false, "error": UNAVAILABLE}))).count();
    let denied =
        acks.iter().filter(|a| a.as_ref() == Some(&json!({"success": false, "error": "Unauthorized"}))).count();
    assert_eq!((unavailable + denied, denied), (100, 1), "one call answered in time, every other check Unavailable");
    assert_eq!(hook(&app).most_at_once(), 1);
    let m = app.metrics().await;
    assert!(metric(&m, r#"herald_access_hook_calls_total{outcome="overloaded"}"#) >= 36.0, "{m}");
    metric_becomes(&app, "herald_access_hook_checks", 0.0).await;
    metric_becomes(&app, "herald_access_hook_in_flight", 0.0).await;
}

#[tokio::test]
async fn a_subscribe_that_goes_away_while_its_call_is_in_flight_leaves_nothing_behind() {
    let app = spawn_hooked_app(|c| c.store.membership_cache_ttl = Duration::ZERO).await;
    hook(&app).set_delay(Duration::from_millis(400));
    let mut leaving = app.connect("alice").await;
    let mut staying = app.connect("alice").await;
    let _gone = leaving.emit_in_flight("subscribe_campaign", json!({"campaignId": "c1"}), Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let waiting = staying.emit_in_flight("subscribe_campaign", json!({"campaignId": "c1"}), Duration::from_secs(5));
    metric_becomes(&app, "herald_access_hook_checks", 1.0).await;
    leaving.close();
    assert!(leaving.closed_within(Duration::from_secs(2)).await);
    // The other subscribe still gets the answer of the one call.
    assert_eq!(waiting.await, Some(json!({"success": true})));
    assert_eq!(hook(&app).calls(), 1);
    metric_becomes(&app, "herald_access_hook_checks", 0.0).await;

    // Every waiter gone: the call still ends, and its entry with it.
    let mut alone = app.connect("bob").await;
    let _gone = alone.emit_in_flight("subscribe_campaign", json!({"campaignId": "c1"}), Duration::from_secs(5));
    metric_becomes(&app, "herald_access_hook_checks", 1.0).await;
    alone.close();
    metric_becomes(&app, "herald_access_hook_checks", 0.0).await;
    metric_becomes(&app, "herald_access_hook_in_flight", 0.0).await;
    assert_eq!(hook(&app).calls(), 2);
}

#[tokio::test]
async fn answers_are_cached_yes_and_no_and_a_revocation_forgets_them() {
    let app = spawn_hooked_app(|c| c.store.membership_cache_ttl = Duration::from_secs(60)).await;
    let mut alice = app.connect("alice").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    alice.unsubscribe("campaign", "c1").await;
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    let mut mallory = app.connect("mallory").await;
    for _ in 0..3 {
        assert_eq!(mallory.subscribe("campaign", "c1").await["error"], "Unauthorized");
    }
    assert_eq!(hook(&app).calls(), 2, "one yes and one no, each asked once");
    assert_eq!(metric(&app.metrics().await, "herald_access_hook_cache_hits_total"), 3.0);

    let mut bob = app.connect("bob").await;
    assert_eq!(bob.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(hook(&app).calls(), 3);

    // The application removes her and tells herald: her cached yes is gone at once.
    run_sql(&app.database_url, "DELETE FROM campaign_members WHERE campaign_id = 'c1' AND user_id = 'alice';").await;
    assert_eq!(revoke(&app, json!({"userId": "alice", "campaignId": "c1"})).await, 202);
    assert_eq!(alice.expect_event().await.0, "access_revoked");
    assert_eq!(alice.subscribe("campaign", "c1").await["error"], "Unauthorized");
    assert_eq!(hook(&app).calls(), 4);
    // Bob's is not.
    bob.unsubscribe("campaign", "c1").await;
    assert_eq!(bob.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(hook(&app).calls(), 4);
    // Within the TTL a change the application did not report is not seen (as in SQL mode).
    run_sql(&app.database_url, "INSERT INTO campaign_members VALUES ('c1', 'mallory');").await;
    assert_eq!(mallory.subscribe("campaign", "c1").await["error"], "Unauthorized");
    assert_eq!(hook(&app).calls(), 4);
}

#[tokio::test]
async fn a_check_after_a_revocation_never_joins_a_call_that_started_before_it() {
    let app = spawn_hooked_app(|c| c.store.membership_cache_ttl = Duration::from_secs(60)).await;
    hook(&app).set_delay(Duration::from_millis(600));
    let mut before = app.connect("alice").await;
    let mut after = app.connect("alice").await;
    // The hook reads "member" at once, and answers 600 ms later.
    let early = before.emit_in_flight("subscribe_campaign", json!({"campaignId": "c1"}), Duration::from_secs(5));
    metric_becomes(&app, "herald_access_hook_checks", 1.0).await;
    run_sql(&app.database_url, "DELETE FROM campaign_members WHERE campaign_id = 'c1' AND user_id = 'alice';").await;
    assert_eq!(revoke(&app, json!({"userId": "alice", "campaignId": "c1"})).await, 202);
    // A subscribe after the revocation asks again, rather than taking the early call's "yes".
    assert_eq!(after.subscribe("campaign", "c1").await["error"], "Unauthorized");
    assert_eq!(early.await, Some(json!({"success": false, "error": "Unauthorized"})), "checked before the revocation");
    assert_eq!(hook(&app).calls(), 2);
    // Nor did the early call's "yes" reach the cache.
    assert_eq!(after.subscribe("campaign", "c1").await["error"], "Unauthorized");
    metric_becomes(&app, "herald_access_hook_checks", 0.0).await;
}

#[tokio::test]
async fn the_users_token_reaches_the_hook_only_when_forwarding_is_on() {
    let app = spawn_hooked_app(|_| {}).await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    assert_eq!(hook(&app).authorizations(), vec![None]);

    let forwarding = spawn_hooked_app(|c| c.access.access_forward_token = true).await;
    let token = token("alice");
    let mut alice = forwarding.try_connect(Some(json!({ "token": token })), "").await.unwrap();
    assert_eq!(alice.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(hook(&forwarding).authorizations(), vec![Some(format!("Bearer {token}"))]);
}

/// The binary at trace level, forwarding tokens, with a hook that answers,
/// then is slow, then is gone: neither the hook's secret nor a forwarded
/// token reaches the logs.
#[tokio::test]
async fn the_hook_secret_and_forwarded_tokens_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    herald::store::SqlStore::connect(&url, 1, true).await.expect("the store opens").close().await;
    run_sql(&url, FIXTURE).await;
    let mut hook = HookServer::start(&url).await;
    let hook_url = hook.url();
    let app = Process::start(&[
        ("HERALD_LOG", "trace"),
        ("HERALD_ACCESS_URL", &hook_url),
        ("HERALD_ACCESS_SECRET", HOOK_SECRET),
        ("HERALD_ACCESS_FORWARD_TOKEN", "true"),
        ("HERALD_ACCESS_TIMEOUT", "300ms"),
    ])
    .await;
    let alice = token("alice");
    let mut c = Client::connect(app.addr, Some(json!({"token": alice})), "").await.expect("connects");
    assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
    assert_eq!(c.subscribe("campaign", "c2").await["error"], "Unauthorized");
    hook.set_delay(Duration::from_secs(1));
    assert_eq!(c.subscribe("settlement", "s1").await["error"], UNAVAILABLE);
    hook.set_delay(Duration::ZERO);
    hook.stop().await;
    assert_eq!(c.subscribe("structure", "st1").await["error"], UNAVAILABLE);
    assert_eq!(hook.authorizations().first(), Some(&Some(format!("Bearer {alice}"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let output = app.logs();
    assert!(output.contains("authorization hook call failed"), "the failures were logged:\n{output}");
    assert_no_window_of(&output, &[HOOK_SECRET, &alice], "logs");
}
