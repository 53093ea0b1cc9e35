//! The revoke API's body parser (`herald::revocation::RevokeRequest::parse`),
//! on any bytes: no panic; a refusal names a path; an accepted body is one
//! JSON object whose `userId` is a valid user id and whose `campaignId` is
//! there exactly when the object has one (never `null`).
#![no_main]

use herald::auth::UserId;
use herald::revocation::RevokeRequest;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    match RevokeRequest::parse(data) {
        Ok(request) => {
            let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(data) else {
                panic!("accepted a body that is not one JSON object");
            };
            assert_eq!(object.get("userId").and_then(Value::as_str), Some(request.user_id.as_str()));
            assert!(UserId::parse(request.user_id.as_str()).is_ok());
            assert_eq!(
                object.get("campaignId").map(|c| c.as_str().expect("a string id")),
                request.campaign_id.as_ref().map(|c| c.as_str())
            );
            assert!(object.keys().all(|k| k == "userId" || k == "campaignId"), "{object:?}");
        }
        Err(e) => assert!(!e.path.is_empty() && !e.message.is_empty(), "{e:?}"),
    }
});
