//! Domain events: the five kinds backends publish, their validation, and the
//! rooms each one is delivered to.
//!
//! Validation is typed (one struct per kind) and reports the failing field as
//! a path (`events[1].payload.operation`). What is delivered is the event as
//! it was published: fields of `payload` and `metadata` that herald does not
//! know pass through unchanged, and optional fields left out stay absent.
//!
//! (About 600 lines: the last hundred are its unit tests.)

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use ts_rs::TS;

use crate::audience::{Audience, IncomingAudience};
use crate::idempotency::IdempotencyKey;
use crate::rooms::{CampaignId, EntityId, Room, SettlementId, StructureId};

/// The kinds of domain event, named as on the wire (`type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    EntityUpdated,
    StateInvalidated,
    WorldTimeChanged,
    SettlementUpdated,
    StructureUpdated,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 5] = [
        EventKind::EntityUpdated,
        EventKind::StateInvalidated,
        EventKind::WorldTimeChanged,
        EventKind::SettlementUpdated,
        EventKind::StructureUpdated,
    ];

    /// The wire name, which is also the Socket.IO event name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::EntityUpdated => "entity_updated",
            EventKind::StateInvalidated => "state_invalidated",
            EventKind::WorldTimeChanged => "world_time_changed",
            EventKind::SettlementUpdated => "settlement_updated",
            EventKind::StructureUpdated => "structure_updated",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An RFC 3339 timestamp, kept exactly as it was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[serde(transparent)]
pub struct Timestamp(#[ts(type = "string")] String);

impl Timestamp {
    /// Validates `s` as RFC 3339.
    pub fn parse(s: &str) -> Result<Self, time::error::Parse> {
        OffsetDateTime::parse(s, &Rfc3339)?;
        Ok(Timestamp(s.to_owned()))
    }

    /// Now, in UTC with milliseconds: `2026-11-25T17:00:00.000Z`.
    pub fn now() -> Self {
        let t = OffsetDateTime::now_utc();
        Timestamp(format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ))
    }

    /// The timestamp as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&s).map_err(|_| serde::de::Error::custom("expected an RFC 3339 timestamp"))
    }
}

/// A string that is not empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, TS)]
#[serde(transparent)]
pub struct NonEmpty(String);

impl NonEmpty {
    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.is_empty() {
            return Err(serde::de::Error::custom("expected a non-empty string"));
        }
        Ok(NonEmpty(s))
    }
}

/// An optional field: absent is `None`, `null` is an error like any other
/// wrong type.
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// A required field that may be `null`.
fn nullable<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d)
}

/// `create`, `update` or `delete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Create,
    Update,
    Delete,
}

/// What a `state_invalidated` event invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, TS)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Campaign,
    Entity,
}

/// Payload of `entity_updated`.
#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "EntityUpdatedPayload")]
pub struct EntityUpdated {
    /// `campaign`, `settlement`, `structure`, or any other entity kind.
    pub entity_type: NonEmpty,
    pub entity_id: EntityId,
    pub campaign_id: CampaignId,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub changed_fields: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional, type = "Record<string, unknown>")]
    pub entity_data: Option<Map<String, Value>>,
}

/// Payload of `state_invalidated`.
#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "StateInvalidatedPayload")]
pub struct StateInvalidated {
    pub campaign_id: CampaignId,
    pub scope: Scope,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub entity_ids: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub reason: Option<String>,
}

/// Payload of `world_time_changed`.
#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "WorldTimeChangedPayload")]
pub struct WorldTimeChanged {
    pub campaign_id: CampaignId,
    /// Required, and `null` for the first time set.
    #[serde(deserialize_with = "nullable")]
    pub previous_time: Option<Timestamp>,
    pub new_time: Timestamp,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub elapsed: Option<f64>,
}

/// Declares the payload of an `…_updated` event: its ids, then what was done
/// (`operation`) and, when the publisher says, what changed (`changes`).
macro_rules! updated_payload {
    ($(#[doc = $doc:literal])* $name:ident as $ts:literal { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Serialize, Deserialize, TS)]
        #[serde(rename_all = "camelCase")]
        #[ts(rename = $ts)]
        pub struct $name {
            $(pub $field: $ty,)*
            pub operation: Operation,
            #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
            #[ts(optional, type = "Record<string, unknown>")]
            pub changes: Option<Map<String, Value>>,
        }
    };
}

updated_payload!(
    /// Payload of `settlement_updated`.
    SettlementUpdated as "SettlementUpdatedPayload" { campaign_id: CampaignId, settlement_id: SettlementId }
);

updated_payload!(
    /// Payload of `structure_updated`.
    StructureUpdated as "StructureUpdatedPayload" { campaign_id: CampaignId, settlement_id: SettlementId, structure_id: StructureId }
);

/// Optional event metadata.
#[derive(Debug, Clone, Serialize, Deserialize, TS)]
#[serde(rename_all = "camelCase")]
#[ts(rename = "EventMetadata")]
pub struct Metadata {
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub user_id: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub source: Option<String>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    #[ts(optional)]
    pub correlation_id: Option<String>,
}

/// A validated payload, one variant per kind.
#[derive(Debug, Clone)]
pub enum Payload {
    EntityUpdated(EntityUpdated),
    StateInvalidated(StateInvalidated),
    WorldTimeChanged(WorldTimeChanged),
    SettlementUpdated(SettlementUpdated),
    StructureUpdated(StructureUpdated),
}

impl Payload {
    /// The rooms an event with this payload is delivered to (the contract's
    /// targeting table). A socket in several of them gets one copy.
    pub fn rooms(&self) -> Vec<Room> {
        match self {
            Payload::EntityUpdated(p) => {
                let mut rooms = vec![Room::Campaign(p.campaign_id.clone())];
                let id = p.entity_id.as_str();
                match p.entity_type.as_str() {
                    // Both parse: an EntityId has the same syntax.
                    "settlement" => rooms.extend(SettlementId::parse(id).ok().map(Room::Settlement)),
                    "structure" => rooms.extend(StructureId::parse(id).ok().map(Room::Structure)),
                    _ => {}
                }
                rooms
            }
            Payload::StateInvalidated(p) => vec![Room::Campaign(p.campaign_id.clone())],
            Payload::WorldTimeChanged(p) => vec![Room::Campaign(p.campaign_id.clone())],
            Payload::SettlementUpdated(p) => {
                vec![Room::Campaign(p.campaign_id.clone()), Room::Settlement(p.settlement_id.clone())]
            }
            Payload::StructureUpdated(p) => vec![
                Room::Campaign(p.campaign_id.clone()),
                Room::Settlement(p.settlement_id.clone()),
                Room::Structure(p.structure_id.clone()),
            ],
        }
    }

    /// The campaign the event belongs to.
    pub fn campaign_id(&self) -> &CampaignId {
        match self {
            Payload::EntityUpdated(p) => &p.campaign_id,
            Payload::StateInvalidated(p) => &p.campaign_id,
            Payload::WorldTimeChanged(p) => &p.campaign_id,
            Payload::SettlementUpdated(p) => &p.campaign_id,
            Payload::StructureUpdated(p) => &p.campaign_id,
        }
    }
}

/// The event object clients receive, exactly as published (plus a timestamp
/// when the publisher left it out, and without its idempotency key).
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    #[serde(rename = "type")]
    pub kind: EventKind,
    pub timestamp: Timestamp,
    pub payload: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

/// A validated event, ready for delivery.
#[derive(Debug, Clone)]
pub struct Event {
    /// What clients receive.
    pub envelope: Envelope,
    /// The typed view of the payload.
    pub payload: Payload,
    /// Where it goes.
    pub rooms: Vec<Room>,
    /// Its idempotency key (never delivered to clients).
    pub key: Option<IdempotencyKey>,
    /// The users it is for (`None`: everyone in its rooms); never delivered.
    pub audience: Option<Audience>,
}

impl Event {
    /// The event's kind.
    pub fn kind(&self) -> EventKind {
        self.envelope.kind
    }
}

/// Why a published body or event was refused: the failing field as a path,
/// and what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct InvalidEvent {
    /// `events[1].payload.operation`, `payload.campaignId`, `body`...
    pub path: String,
    /// What was expected.
    pub message: String,
}

/// The top level of a published event.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Incoming {
    #[serde(rename = "type")]
    kind: EventKind,
    #[serde(default, deserialize_with = "present")]
    timestamp: Option<Timestamp>,
    payload: Value,
    #[serde(default, deserialize_with = "present")]
    metadata: Option<Value>,
    #[serde(default, rename = "idempotencyKey", deserialize_with = "present")]
    idempotency_key: Option<IdempotencyKey>,
    #[serde(default, deserialize_with = "present")]
    audience: Option<Value>,
}

/// Joins a path prefix and a field.
fn join(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// Deserializes `value` as `T`, naming the failing field under `prefix`.
fn typed<'a, T: Deserialize<'a>>(value: &'a Value, prefix: &str) -> Result<T, InvalidEvent> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut path = String::new();
        for segment in e.path().iter() {
            use serde_path_to_error::Segment;
            match segment {
                Segment::Seq { index } => path.push_str(&format!("[{index}]")),
                Segment::Map { key } | Segment::Enum { variant: key } => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
                Segment::Unknown => {}
            }
        }
        let mut message = e.into_inner().to_string();
        // serde names a missing field in the message; make it part of the path.
        if let Some(field) = message.strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`')) {
            path = join(&path, field);
            message = "required field is missing".to_owned();
        }
        let path = join(prefix, &path);
        // Only a value at the top names no field: it is the body.
        let path = if path.is_empty() { "body".to_owned() } else { path };
        InvalidEvent { path, message }
    })
}

/// Reads a body as JSON: exactly one value (no trailing bytes).
fn json_body(body: &[u8]) -> Result<Value, InvalidEvent> {
    serde_json::from_slice(body)
        .map_err(|e| InvalidEvent { path: "body".into(), message: format!("invalid JSON ({e})") })
}

/// Validates a body that must be one JSON object as `T`, with the publish
/// API's rules and error paths: a body that is not JSON (trailing bytes
/// included) or not an object is a `body` error, a field is named by its path.
pub(crate) fn parse_object_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, InvalidEvent> {
    let value = json_body(body)?;
    if !value.is_object() {
        return Err(InvalidEvent { path: "body".into(), message: "expected an object".into() });
    }
    typed(&value, "")
}

/// Validates one published event. `at` is its path (`events[1]`, or empty
/// for a single event).
pub fn parse_event(value: &Value, at: &str) -> Result<Event, InvalidEvent> {
    if !value.is_object() {
        return Err(InvalidEvent {
            path: if at.is_empty() { "event".into() } else { at.into() },
            message: "expected an event object".into(),
        });
    }
    let incoming: Incoming = typed(value, at)?;
    let payload_at = join(at, "payload");
    let Value::Object(payload_map) = incoming.payload else {
        return Err(InvalidEvent { path: payload_at, message: "expected an object".into() });
    };
    let metadata = match incoming.metadata {
        None => None,
        Some(Value::Object(map)) => {
            let meta = Value::Object(map);
            typed::<Metadata>(&meta, &join(at, "metadata"))?;
            let Value::Object(map) = meta else { unreachable!("checked above") };
            Some(map)
        }
        Some(_) => {
            return Err(InvalidEvent { path: join(at, "metadata"), message: "expected an object".into() });
        }
    };
    let payload_value = Value::Object(payload_map);
    let payload = match incoming.kind {
        EventKind::EntityUpdated => Payload::EntityUpdated(typed(&payload_value, &payload_at)?),
        EventKind::StateInvalidated => Payload::StateInvalidated(typed(&payload_value, &payload_at)?),
        EventKind::WorldTimeChanged => Payload::WorldTimeChanged(typed(&payload_value, &payload_at)?),
        EventKind::SettlementUpdated => Payload::SettlementUpdated(typed(&payload_value, &payload_at)?),
        EventKind::StructureUpdated => Payload::StructureUpdated(typed(&payload_value, &payload_at)?),
    };
    let Value::Object(payload_map) = payload_value else { unreachable!("built as an object") };
    let audience = match incoming.audience {
        None => None,
        Some(audience @ Value::Object(_)) => {
            let IncomingAudience { users } = typed(&audience, &join(at, "audience"))?;
            Some(audience_of(users, at)?)
        }
        Some(_) => return Err(InvalidEvent { path: join(at, "audience"), message: "expected an object".into() }),
    };
    let rooms = payload.rooms();
    Ok(Event {
        envelope: Envelope {
            kind: incoming.kind,
            timestamp: incoming.timestamp.unwrap_or_else(Timestamp::now),
            payload: payload_map,
            metadata,
        },
        payload,
        rooms,
        key: incoming.idempotency_key,
        audience,
    })
}

/// The audience of `users`, refused at its path under `at`.
fn audience_of(users: Vec<crate::users::UserId>, at: &str) -> Result<Audience, InvalidEvent> {
    Audience::new(users).map_err(|e| {
        let users = join(at, "audience.users");
        let path = match e.at {
            Some(i) => format!("{users}[{i}]"),
            None => users,
        };
        InvalidEvent { path, message: e.message.into() }
    })
}

/// Validates a publish body: one event object, or an array of them (called
/// `events` in error paths). Any invalid event fails the whole body.
pub fn parse_body(body: &[u8]) -> Result<Vec<Event>, InvalidEvent> {
    let value = json_body(body)?;
    match &value {
        Value::Array(items) => {
            items.iter().enumerate().map(|(i, item)| parse_event(item, &format!("events[{i}]"))).collect()
        }
        Value::Object(_) => Ok(vec![parse_event(&value, "")?]),
        _ => {
            Err(InvalidEvent { path: "body".into(), message: "expected an event object or an array of events".into() })
        }
    }
}

/// Where the TypeScript declarations of the wire types are committed.
pub const TYPESCRIPT_PATH: &str = "client/src/generated/events.ts";

/// The TypeScript declarations of the event payloads and their parts,
/// generated from the types above (herald-client imports them; a test fails
/// when the committed copy differs).
pub fn typescript() -> String {
    let cfg = ts_rs::Config::new();
    let decls = [
        EventKind::decl(&cfg),
        Operation::decl(&cfg),
        Scope::decl(&cfg),
        Timestamp::decl(&cfg),
        NonEmpty::decl(&cfg),
        CampaignId::decl(&cfg),
        SettlementId::decl(&cfg),
        StructureId::decl(&cfg),
        EntityId::decl(&cfg),
        EntityUpdated::decl(&cfg),
        StateInvalidated::decl(&cfg),
        WorldTimeChanged::decl(&cfg),
        SettlementUpdated::decl(&cfg),
        StructureUpdated::decl(&cfg),
        Metadata::decl(&cfg),
    ];
    typescript_file("herald's Rust event types (src/events.rs, src/rooms.rs)", decls)
}

/// A generated TypeScript file: what it was generated `from` and how, then
/// each declaration, exported.
pub(crate) fn typescript_file(from: &str, decls: impl IntoIterator<Item = String>) -> String {
    let mut out = format!(
        "// Generated from {from} by\n\
         // `HERALD_WRITE_TYPES=1 cargo test --lib typescript`. Do not edit: a test\n\
         // fails when this file differs from what the Rust types generate.\n",
    );
    for decl in decls {
        out.push_str("\nexport ");
        out.push_str(&decl);
        out.push('\n');
    }
    out
}

/// Fails when the committed TypeScript file at `path` (from the repository's
/// root) differs from `generated`; with `HERALD_WRITE_TYPES` set, writes it first.
#[cfg(test)]
pub(crate) fn assert_typescript_current(path: &str, generated: &str) {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if std::env::var_os("HERALD_WRITE_TYPES").is_some() {
        std::fs::create_dir_all(file.parent().expect("a parent")).expect("create the directory");
        std::fs::write(&file, generated).expect("write the declarations");
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        committed == generated,
        "{path} differs from what the Rust types generate; \
         run `HERALD_WRITE_TYPES=1 cargo test --lib typescript` and commit it"
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn typescript_declarations_are_current() {
        assert_typescript_current(TYPESCRIPT_PATH, &typescript());
    }

    use super::*;
    use serde_json::json;

    fn err(body: Value) -> String {
        parse_body(body.to_string().as_bytes()).unwrap_err().to_string()
    }

    /// The targeting table (tests/fixtures/targeting.json) is also what
    /// herald-client's `targetRooms` is tested against
    /// (client/test/targeting.test.js): either side drifting fails its test.
    #[test]
    fn targeting_follows_the_shared_table() {
        #[derive(Deserialize)]
        struct Table {
            cases: Vec<Case>,
        }
        #[derive(Deserialize)]
        struct Case {
            event: Value,
            rooms: Vec<String>,
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/targeting.json");
        let text = std::fs::read_to_string(path).expect("read tests/fixtures/targeting.json");
        let table: Table = serde_json::from_str(&text).expect("tests/fixtures/targeting.json is a table");
        let mut kinds = std::collections::HashSet::new();
        let mut entity_types = std::collections::HashSet::new();
        for case in table.cases {
            let event = parse_event(&case.event, "").unwrap_or_else(|e| panic!("{e}: {}", case.event));
            let rooms: Vec<String> = event.rooms.iter().map(Room::to_string).collect();
            assert_eq!(rooms, case.rooms, "{}", case.event);
            kinds.insert(event.kind());
            if let Payload::EntityUpdated(p) = &event.payload {
                let special = ["campaign", "settlement", "structure"].contains(&p.entity_type.as_str());
                entity_types.insert(if special { p.entity_type.as_str() } else { "another kind" }.to_owned());
            }
        }
        assert_eq!(kinds.len(), EventKind::ALL.len(), "the table covers every kind of event");
        assert_eq!(entity_types.len(), 4, "the table covers entity_updated for each special entityType and another");
    }

    #[test]
    fn errors_name_the_failing_field() {
        let bad_op = json!({"type": "settlement_updated", "payload": {
            "campaignId": "c1", "settlementId": "s1", "operation": "upsert"}});
        assert!(err(bad_op.clone()).starts_with("payload.operation: "), "{}", err(bad_op.clone()));
        let good = json!({"type": "state_invalidated", "payload": {"campaignId": "c1", "scope": "campaign"}});
        let batch = json!([good, bad_op]);
        assert!(err(batch).starts_with("events[1].payload.operation: "));
        let missing = json!({"type": "state_invalidated", "payload": {"scope": "campaign"}});
        assert!(err(missing).starts_with("payload.campaignId: "));
        let unknown_type = json!({"type": "party_started", "payload": {}});
        assert!(err(unknown_type).starts_with("type: "));
        let unknown_top =
            json!({"type": "state_invalidated", "payload": {"campaignId": "c1", "scope": "entity"}, "extra": 1});
        assert!(err(unknown_top).starts_with("extra: unknown field"));
        let null_optional =
            json!({"type": "state_invalidated", "payload": {"campaignId": "c1", "scope": "entity", "reason": null}});
        assert!(err(null_optional).starts_with("payload.reason: "));
        let meta = json!({"type": "state_invalidated", "payload": {"campaignId": "c1", "scope": "entity"}, "metadata": {"userId": 5}});
        assert!(err(meta).starts_with("metadata.userId: "));
        assert!(err(json!(3)).starts_with("body: "));
        assert!(parse_body(b"{").unwrap_err().to_string().starts_with("body: invalid JSON"));
    }

    #[test]
    fn world_time_previous_time_is_required_but_nullable() {
        let ok = json!({"type": "world_time_changed", "payload": {
            "campaignId": "c1", "previousTime": null, "newTime": "2026-11-25T17:00:00Z"}});
        assert!(parse_body(ok.to_string().as_bytes()).is_ok());
        let missing = json!({"type": "world_time_changed", "payload": {
            "campaignId": "c1", "newTime": "2026-11-25T17:00:00Z"}});
        assert!(err(missing).starts_with("payload.previousTime: "));
        let bad_time = json!({"type": "world_time_changed", "payload": {
            "campaignId": "c1", "previousTime": null, "newTime": "yesterday"}});
        assert!(err(bad_time).starts_with("payload.newTime: "));
    }

    #[test]
    fn payload_and_timestamp_pass_through_unchanged() {
        let body = json!({"type": "settlement_updated", "timestamp": "2026-11-25T17:00:00.1+01:00",
            "payload": {"zeta": 1, "campaignId": "c1", "settlementId": "s1", "operation": "update", "alpha": [null]}});
        let event = parse_body(body.to_string().as_bytes()).unwrap().remove(0);
        let out = serde_json::to_value(&event.envelope).unwrap();
        assert_eq!(out["timestamp"], "2026-11-25T17:00:00.1+01:00");
        assert_eq!(out["payload"], body["payload"]);
        assert_eq!(serde_json::to_string(&out["payload"]).unwrap(), serde_json::to_string(&body["payload"]).unwrap());
        assert!(out.get("metadata").is_none());
    }

    #[test]
    fn stamped_timestamps_are_rfc3339_with_millis() {
        let t = Timestamp::now();
        assert!(Timestamp::parse(t.as_str()).is_ok());
        assert_eq!(t.as_str().len(), "2026-11-25T17:00:00.000Z".len());
    }
}
