//! The publish API's body parser (`herald::events::parse_body`), on any
//! bytes: no panic; a refusal names a path; an accepted event's envelope,
//! what clients receive, is itself a valid event for the same rooms, and
//! never carries the audience, which the log keeps as it was given.
#![no_main]

use herald::audience::Audience;
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
                assert!(again.audience.is_none(), "the envelope carries no audience");
                if let Some(audience) = &event.audience {
                    assert_eq!(Audience::decode(&audience.encode()).as_ref(), Some(audience));
                }
            }
        }
        Err(e) => assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}"),
    }
});
