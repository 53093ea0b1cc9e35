//! The publish API's body parser (`herald::events::parse_body`), on any
//! bytes: no panic; a refusal names a path; an accepted event's envelope,
//! what clients receive, is itself a valid event for the same rooms.
#![no_main]

use herald::events::parse_body;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_body(data) {
        Ok(events) => {
            let envelopes: Vec<_> = events.iter().map(|e| &e.envelope).collect();
            let again = parse_body(&serde_json::to_vec(&envelopes).expect("an envelope serializes"))
                .expect("an accepted event's envelope is a valid event");
            assert_eq!(again.len(), events.len());
            for (event, again) in events.iter().zip(&again) {
                assert!(event.rooms[0].to_string().starts_with("campaign:"));
                assert_eq!(event.rooms, again.rooms);
            }
        }
        Err(e) => assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}"),
    }
});
