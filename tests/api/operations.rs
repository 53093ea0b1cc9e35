//! Operations: health, readiness, metrics, CORS, shutdown, logs.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

#[tokio::test]
async fn healthz_and_readyz_answer() {
    let app = spawn_app().await;
    let res = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let res = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
}

#[tokio::test]
async fn readyz_follows_the_store() {
    let app = spawn_app().await;
    // Take the store away (the tables), then give it back.
    run_sql(&app.database_url, "ALTER TABLE campaign_members RENAME TO campaign_members_away;").await;
    let res = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["failing"]["store"], "unavailable");
    run_sql(&app.database_url, "ALTER TABLE campaign_members_away RENAME TO campaign_members;").await;
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap().status().as_u16();
    assert_eq!(ready, 200, "ready again by itself");
}

#[tokio::test]
async fn metrics_are_prometheus_text_named_herald() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    app.publish(&bodies::state_invalidated("c1")).await;
    let res = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let text = res.text().await.unwrap();
    for series in [
        "herald_connections 1",
        r#"herald_subscriptions{kind="campaign"} 1"#,
        r#"herald_events_published_total{type="state_invalidated"} 1"#,
        r#"herald_acks_total{event="subscribe_campaign",outcome="success"} 1"#,
        r#"herald_publish_requests_total{status="202"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == series), "missing {series} in\n{text}");
    }
    assert!(text.contains("# TYPE herald_auth_failures counter"));
}

#[tokio::test]
async fn cors_preflight_is_answered_for_allowed_origins_only() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.cors_origins = vec!["https://app.example".into()]).await;
    let preflight = |origin: &'static str| {
        app.http
            .request(reqwest::Method::OPTIONS, app.url("/socket.io/?EIO=4&transport=polling"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(allowed.headers().get("access-control-allow-origin").unwrap(), "https://app.example");
    let denied = preflight("https://evil.example").await.unwrap();
    assert!(denied.headers().get("access-control-allow-origin").is_none());
    // A polling handshake from the allowed origin carries the header.
    let res = app
        .http
        .get(app.url("/socket.io/?EIO=4&transport=polling"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.headers().get("access-control-allow-origin").unwrap(), "https://app.example");
}

#[tokio::test]
async fn development_mode_allows_any_origin_and_production_none_by_default() {
    let dev = spawn_app().await;
    let res = dev.http.get(dev.url("/healthz")).header("origin", "http://localhost:5173").send().await.unwrap();
    assert_eq!(res.headers().get("access-control-allow-origin").unwrap(), "http://localhost:5173");
    let prod = spawn_app_with(Backend::Sqlite, |c| c.mode = herald::config::Mode::Production).await;
    let res = prod.http.get(prod.url("/healthz")).header("origin", "http://localhost:5173").send().await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn shutdown_disconnects_sockets_and_returns_within_the_grace_period() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.shutdown_grace = Duration::from_secs(3)).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = app.connect("alice").await;
        c.subscribe("campaign", "c1").await;
        clients.push(c);
    }
    let addr = app.addr;
    let took = app.stop().await;
    assert!(took < Duration::from_secs(3), "took {took:?}");
    for c in &clients {
        assert!(c.closed_within(Duration::from_secs(1)).await, "socket closed by the server");
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn production_refuses_to_start_without_secrets() {
    let mut config = herald::Config::defaults();
    config.mode = herald::config::Mode::Production;
    config.listen = "127.0.0.1:0".into();
    let err = herald::Application::build(config).await.err().expect("refused");
    assert!(err.to_string().contains("HERALD_JWT_SECRET"), "{err}");
}

#[tokio::test]
async fn development_mode_without_secrets_generates_them_and_seeds_demo_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = herald::Config::defaults();
    config.listen = "127.0.0.1:0".into();
    config.store.database_url = format!("sqlite://{}", dir.path().join("demo.db").display());
    let app = herald::Application::build(config).await.expect("starts with no setup");
    let creds = app.development_credentials().expect("development credentials");
    let token = creds.client_token.clone().expect("a demo client token");
    assert!(creds.publish_token.is_some());
    assert!(creds.demo_seeded);
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let mut c =
        crate::client::Client::connect(addr, Some(json!({"token": token})), "").await.expect("demo token connects");
    for (kind, id) in
        [("campaign", "demo-campaign"), ("settlement", "demo-settlement"), ("structure", "demo-structure")]
    {
        assert_eq!(c.subscribe(kind, id).await, json!({"success": true}));
    }

    // The demo page and its development-only routes.
    let http = reqwest::Client::new();
    let page = http.get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("/demo/app.js"), "the page loads its bundle");
    let bundle = http.get(format!("http://{addr}/demo/app.js")).send().await.unwrap();
    assert_eq!(bundle.status(), 200);
    assert!(bundle.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    let boot = http.get(format!("http://{addr}/dev/bootstrap")).send().await.unwrap();
    assert_eq!(boot.status(), 200);
    assert_eq!(boot.headers()["cache-control"], "no-store");
    let boot: Value = boot.json().await.unwrap();
    assert_eq!(boot["userId"], "demo-user");
    assert_eq!(boot["campaignId"], "demo-campaign");
    let mut d = crate::client::Client::connect(addr, Some(json!({"token": boot["token"]})), "")
        .await
        .expect("a bootstrap token connects");
    assert_eq!(d.subscribe("campaign", "demo-campaign").await, json!({"success": true}));
    for kind in ["entity_updated", "state_invalidated", "world_time_changed", "settlement_updated", "structure_updated"]
    {
        let r = http.post(format!("http://{addr}/dev/publish-demo")).json(&json!({"type": kind})).send().await.unwrap();
        assert_eq!(r.status(), 202, "{kind}");
        let (name, event) = d.expect_event().await;
        assert_eq!(name, kind);
        assert_eq!(event["payload"]["campaignId"], "demo-campaign");
        assert_eq!(event["metadata"]["source"], "herald-demo");
    }
    let r = http.post(format!("http://{addr}/dev/publish-demo")).send().await.unwrap();
    assert_eq!(r.status(), 202, "no body: entity_updated");
    assert_eq!(d.expect_event().await.0, "entity_updated");
    let r = http.post(format!("http://{addr}/dev/publish-demo")).body(r#"{"type":"nope"}"#).send().await.unwrap();
    assert_eq!(r.status(), 400);
    d.expect_silence(Duration::from_millis(200)).await;

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn the_demo_routes_do_not_exist_with_configured_secrets_or_in_production() {
    let production = spawn_app_with(Backend::Sqlite, |c| c.mode = herald::config::Mode::Production).await;
    let development = spawn_app().await;
    let http = reqwest::Client::new();
    for app in [&production, &development] {
        for path in ["/", "/demo/app.js", "/dev/bootstrap"] {
            assert_eq!(http.get(app.url(path)).send().await.unwrap().status(), 404, "GET {path}");
        }
        assert_eq!(http.post(app.url("/dev/publish-demo")).send().await.unwrap().status(), 404);
    }
}
