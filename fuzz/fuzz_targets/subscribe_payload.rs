//! The subscribe payload and `since` parsers (`herald::gateway::wire`), on
//! any JSON: no panic; a room is valid and of the asked kind; a `since` is
//! the offset the payload gave, character for character; anything else is
//! `Invalid payload`.
#![no_main]

use herald::gateway::wire::{Refusal, parse_room_request, parse_since};
use herald::rooms::RoomKind;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(payload) = serde_json::from_slice::<Value>(data) else { return };
    let payload = Ok(payload);
    for kind in RoomKind::ALL {
        match parse_room_request(kind, &payload) {
            Ok(room) => {
                assert_eq!(room.kind(), kind);
                let id = room.id();
                assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
                assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{id:?}");
            }
            Err(refusal) => assert_eq!(refusal, Refusal::InvalidPayload),
        }
    }
    let given = payload.as_ref().ok().and_then(|p| p.get("since"));
    match parse_since(&payload) {
        Ok(None) => assert!(given.is_none()),
        Ok(Some(offset)) => assert_eq!(Some(offset.to_string().as_str()), given.and_then(Value::as_str)),
        Err(refusal) => assert_eq!(refusal, Refusal::InvalidPayload),
    }
});
