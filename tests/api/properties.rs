//! Property tests: arbitrary JSON (and bytes) into the publish body parser,
//! the subscribe payload parser and the `since` parser. No panic, ever, and a
//! rejection is always the contract's error.

use proptest::prelude::*;
use serde_json::{Map, Value, json};

use herald::events::parse_body;
use herald::gateway::wire::{Refusal, parse_room_request, parse_since};
use herald::rooms::RoomKind;

/// Arbitrary JSON, biased towards the shapes herald reads.
fn any_json() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("type".to_owned()),
        Just("payload".to_owned()),
        Just("campaignId".to_owned()),
        Just("settlementId".to_owned()),
        Just("structureId".to_owned()),
        Just("operation".to_owned()),
        Just("since".to_owned()),
        Just("metadata".to_owned()),
        Just("timestamp".to_owned()),
        "[a-zA-Z]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
        prop_oneof![
            Just("settlement_updated".to_owned()),
            Just("structure_updated".to_owned()),
            Just("update".to_owned()),
            Just("c1".to_owned()),
            Just("1795636036000-0000000000001-0000000000".to_owned()),
            Just("2026-11-25T17:00:00Z".to_owned()),
            ".{0,20}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn publish_bodies_never_panic_and_refusals_name_a_path(body in any_json()) {
        let bytes = serde_json::to_vec(&body).unwrap();
        match parse_body(&bytes) {
            Ok(events) => {
                for event in events {
                    prop_assert!(!event.rooms.is_empty());
                    prop_assert!(event.rooms[0].to_string().starts_with("campaign:"));
                }
            }
            Err(e) => {
                prop_assert!(!e.path.is_empty());
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_are_a_body_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = parse_body(&bytes) {
            prop_assert!(!e.path.is_empty());
        }
    }

    #[test]
    fn subscribe_payloads_are_a_valid_room_or_invalid_payload(payload in any_json()) {
        for kind in RoomKind::ALL {
            match parse_room_request(kind, &Ok(payload.clone())) {
                Ok(room) => {
                    prop_assert_eq!(room.kind(), kind);
                    let id = room.id();
                    prop_assert!(!id.is_empty() && id.len() <= 128);
                    prop_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
                }
                Err(refusal) => prop_assert_eq!(refusal, Refusal::InvalidPayload),
            }
        }
    }

    #[test]
    fn since_is_absent_an_offset_or_invalid_payload(payload in any_json()) {
        match parse_since(&Ok(payload.clone())) {
            Ok(None) => prop_assert!(payload.get("since").is_none()),
            Ok(Some(offset)) => {
                let text = offset.to_string();
                prop_assert_eq!(Some(text.as_str()), payload["since"].as_str());
            }
            Err(refusal) => prop_assert_eq!(refusal, Refusal::InvalidPayload),
        }
    }
}
