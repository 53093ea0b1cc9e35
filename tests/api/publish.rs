//! The publish API and delivery: status codes in the contract's order, each
//! kind to exactly its rooms, one copy per socket, nothing on a bad batch.

use std::time::Duration;

use serde_json::{Value, json};

use crate::client::Client;
use crate::helpers::*;

const QUIET: Duration = Duration::from_millis(300);

/// One client per room of c1's tree, plus a member of another campaign.
struct Audience {
    campaign: Client,
    settlement: Client,
    structure: Client,
    entity_settlement: Client,
    other_campaign: Client,
}

async fn audience(app: &TestApp) -> Audience {
    let mut campaign = app.connect("alice").await;
    assert_eq!(campaign.subscribe("campaign", "c1").await["success"], true);
    let mut settlement = app.connect("alice").await;
    assert_eq!(settlement.subscribe("settlement", "s1").await["success"], true);
    let mut structure = app.connect("bob").await;
    assert_eq!(structure.subscribe("structure", "st1").await["success"], true);
    let mut entity_settlement = app.connect("bob").await;
    // Settlement s1's room also receives entity_updated for entityId s1.
    assert_eq!(entity_settlement.subscribe("settlement", "s1").await["success"], true);
    let mut other_campaign = app.connect("carol").await;
    assert_eq!(other_campaign.subscribe("campaign", "c2").await["success"], true);
    Audience { campaign, settlement, structure, entity_settlement, other_campaign }
}

async fn receives(client: &mut Client, kind: &str) -> Value {
    let (name, event) = client.expect_event().await;
    assert_eq!(name, kind);
    assert_eq!(event["type"], kind);
    event
}

#[tokio::test]
async fn each_kind_reaches_exactly_its_rooms() {
    let app = spawn_app().await;
    let mut a = audience(&app).await;

    // campaign-only kinds
    for body in
        [bodies::state_invalidated("c1"), bodies::world_time_changed("c1"), bodies::entity_updated("c1", "npc", "n1")]
    {
        let kind = body["type"].as_str().unwrap().to_owned();
        assert_eq!(app.publish(&body).await, (202, json!({"accepted": 1})));
        receives(&mut a.campaign, &kind).await;
        a.settlement.expect_silence(QUIET).await;
        a.structure.expect_silence(Duration::ZERO).await;
        a.other_campaign.expect_silence(Duration::ZERO).await;
    }

    // settlement_updated: campaign + settlement
    app.publish(&bodies::settlement_updated("c1", "s1")).await;
    receives(&mut a.campaign, "settlement_updated").await;
    receives(&mut a.settlement, "settlement_updated").await;
    receives(&mut a.entity_settlement, "settlement_updated").await;
    a.structure.expect_silence(QUIET).await;
    a.other_campaign.expect_silence(Duration::ZERO).await;

    // structure_updated: campaign + settlement + structure
    app.publish(&bodies::structure_updated("c1", "s1", "st1")).await;
    receives(&mut a.campaign, "structure_updated").await;
    receives(&mut a.settlement, "structure_updated").await;
    receives(&mut a.structure, "structure_updated").await;
    receives(&mut a.entity_settlement, "structure_updated").await;
    a.other_campaign.expect_silence(QUIET).await;

    // entity_updated for a settlement / a structure adds that entity's room
    app.publish(&bodies::entity_updated("c1", "settlement", "s1")).await;
    receives(&mut a.campaign, "entity_updated").await;
    receives(&mut a.settlement, "entity_updated").await;
    receives(&mut a.entity_settlement, "entity_updated").await;
    a.structure.expect_silence(QUIET).await;
    app.publish(&bodies::entity_updated("c1", "structure", "st1")).await;
    receives(&mut a.campaign, "entity_updated").await;
    receives(&mut a.structure, "entity_updated").await;
    a.settlement.expect_silence(QUIET).await;

    // Nothing ever reached the other campaign, and nothing is left over.
    a.other_campaign.expect_silence(QUIET).await;
    a.campaign.expect_silence(Duration::ZERO).await;
}

#[tokio::test]
async fn a_socket_in_several_target_rooms_gets_one_copy() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    for (kind, id) in [("campaign", "c1"), ("settlement", "s1"), ("structure", "st1")] {
        assert_eq!(alice.subscribe(kind, id).await["success"], true);
    }
    app.publish(&bodies::structure_updated("c1", "s1", "st1")).await;
    receives(&mut alice, "structure_updated").await;
    alice.expect_silence(QUIET).await;
}

#[tokio::test]
async fn the_event_object_is_delivered_as_published() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    let body = json!({
        "type": "settlement_updated",
        "timestamp": "2026-11-25T17:00:00.123456+01:00",
        "payload": {"campaignId": "c1", "settlementId": "s1", "operation": "delete", "futureField": {"x": [1, 2]}},
        "metadata": {"userId": "u1", "source": "api", "correlationId": "c-42"}
    });
    assert_eq!(app.publish(&body).await.0, 202);
    let mut event = receives(&mut alice, "settlement_updated").await;
    let offset = event.as_object_mut().unwrap().remove("offset").expect("an offset");
    assert!(herald::event_log::Offset::parse(offset.as_str().unwrap()).is_some(), "{offset}");
    assert_eq!(event, body, "unchanged, character for character, plus its offset");

    // Left out: timestamp is stamped, optional fields and metadata stay absent.
    let body = json!({"type": "settlement_updated", "payload": {"campaignId": "c1", "settlementId": "s1", "operation": "create"}});
    app.publish(&body).await;
    let event = receives(&mut alice, "settlement_updated").await;
    let stamped = event["timestamp"].as_str().unwrap();
    assert!(time::OffsetDateTime::parse(stamped, &time::format_description::well_known::Rfc3339).is_ok(), "{stamped}");
    assert!(event.get("metadata").is_none());
    assert!(event["payload"].get("changes").is_none());
    assert_eq!(event.as_object().unwrap().len(), 4, "type, timestamp, payload, offset");
}

#[tokio::test]
async fn a_batch_is_published_whole_in_order() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    let batch = json!([
        bodies::state_invalidated("c1"),
        bodies::world_time_changed("c1"),
        bodies::settlement_updated("c1", "s1")
    ]);
    assert_eq!(app.publish(&batch).await, (202, json!({"accepted": 3})));
    receives(&mut alice, "state_invalidated").await;
    receives(&mut alice, "world_time_changed").await;
    receives(&mut alice, "settlement_updated").await;
}

async fn post(app: &TestApp, token: Option<&str>, content_type: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = app.http.post(app.url("/v1/events")).body(body);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_publishes_get_the_contract_status_and_deliver_nothing() {
    let app = spawn_app().await;
    let mut alice = app.connect("alice").await;
    alice.subscribe("campaign", "c1").await;
    let good = serde_json::to_vec(&bodies::state_invalidated("c1")).unwrap();
    let json_ct = Some("application/json");

    // 401: missing or wrong token, whatever else is wrong.
    assert_eq!(post(&app, None, json_ct, good.clone()).await.0, 401);
    assert_eq!(post(&app, Some("wrong"), json_ct, good.clone()).await.0, 401);
    assert_eq!(post(&app, Some("wrong"), Some("text/plain"), vec![b'x'; 2 << 20]).await.0, 401);
    let res = app
        .http
        .post(app.url("/v1/events"))
        .header("authorization", PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(good.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 401, "the Bearer scheme is required");

    // 415 before 413 and 400.
    assert_eq!(post(&app, Some(PUBLISH_TOKEN), Some("text/plain"), good.clone()).await.0, 415);
    assert_eq!(post(&app, Some(PUBLISH_TOKEN), None, good.clone()).await.0, 415);
    assert_eq!(post(&app, Some(PUBLISH_TOKEN), Some("text/plain"), vec![b'x'; 2 << 20]).await.0, 415);
    assert_eq!(post(&app, Some(PUBLISH_TOKEN), Some("application/json; charset=utf-8"), good.clone()).await.0, 202);
    receives(&mut alice, "state_invalidated").await;

    // 413 before 400: over the 1 MiB default, even when it is not JSON.
    assert_eq!(post(&app, Some(PUBLISH_TOKEN), json_ct, vec![b'x'; (1 << 20) + 1]).await.0, 413);

    // 400s name the failing field.
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "body"),
        (b"42".to_vec(), "body"),
        (serde_json::to_vec(&json!({"type": "party_started", "payload": {"campaignId": "c1"}})).unwrap(), "type"),
        (serde_json::to_vec(&json!({"type": "state_invalidated", "payload": {"scope": "campaign"}})).unwrap(), "payload.campaignId"),
        (serde_json::to_vec(&json!({"type": "state_invalidated", "payload": {"campaignId": "c1", "scope": "campaign"}, "extra": true})).unwrap(), "extra"),
        (serde_json::to_vec(&json!({"type": "settlement_updated", "payload": {"campaignId": "c1", "settlementId": "s1", "operation": "upsert"}})).unwrap(), "payload.operation"),
        (serde_json::to_vec(&json!({"type": "state_invalidated", "payload": {"campaignId": "c:1", "scope": "campaign"}})).unwrap(), "payload.campaignId"),
        (serde_json::to_vec(&json!({"type": "state_invalidated", "payload": []})).unwrap(), "payload"),
        (serde_json::to_vec(&json!({"type": "state_invalidated", "timestamp": "yesterday", "payload": {"campaignId": "c1", "scope": "campaign"}})).unwrap(), "timestamp"),
        (serde_json::to_vec(&json!([bodies::state_invalidated("c1"), {"type": "settlement_updated", "payload": {"campaignId": "c1", "settlementId": "s1", "operation": "upsert"}}])).unwrap(), "events[1].payload.operation"),
        (serde_json::to_vec(&json!([bodies::state_invalidated("c1"), {"type": "state_invalidated", "payload": {"scope": "campaign"}}])).unwrap(), "events[1].payload.campaignId"),
    ];
    for (body, path) in cases {
        let (status, answer) = post(&app, Some(PUBLISH_TOKEN), json_ct, body.clone()).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(&format!("{path}: ")), "{error:?} should name {path}");
    }
    // Nothing of any refused request, including the good first event of a bad batch, was delivered.
    alice.expect_silence(Duration::from_millis(500)).await;
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_events_published_total{type="state_invalidated"}"#), 1.0);
}

#[tokio::test]
async fn the_body_limit_is_a_setting() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.publish.max_body_bytes = 64).await;
    let body = serde_json::to_vec(&bodies::structure_updated("c1", "s1", "st1")).unwrap();
    assert!(body.len() > 64);
    assert_eq!(post(&app, Some(PUBLISH_TOKEN), Some("application/json"), body).await.0, 413);
    // Chunked (no Content-Length) is limited too.
    let stream = futures_util::stream::iter(vec![Ok::<_, std::io::Error>(vec![b' '; 50]), Ok(vec![b' '; 50])]);
    let res = app
        .http
        .post(app.url("/v1/events"))
        .bearer_auth(PUBLISH_TOKEN)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 413);
}
