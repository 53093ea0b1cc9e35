//! The JWKS document parser (`herald::jwks::keys::parse_document`), on any
//! bytes: no panic; a document is refused or has usable keys, none of them
//! symmetric; and verifying a token with each key never panics (the key
//! checks exist because verification trips on some malformed keys).
#![no_main]

use jsonwebtoken::{Algorithm, AlgorithmFamily, Validation};
use libfuzzer_sys::fuzz_target;

/// A token with a well-formed header and claims and a junk signature.
const TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2lnbmF0dXJl";

fuzz_target!(|data: &[u8]| {
    let Ok(keys) = herald::jwks::keys::parse_document(data) else { return };
    assert!(!keys.is_empty());
    for key in keys.values() {
        assert_ne!(key.algorithm.family(), AlgorithmFamily::Hmac);
        let mut header = jsonwebtoken::Header::new(key.algorithm);
        header.kid = Some("k".into());
        let mut validation = Validation::new(key.algorithm);
        validation.validate_exp = false;
        let _ = jsonwebtoken::decode::<serde_json::Value>(TOKEN, &key.key, &validation);
        // The same claims under the key's own algorithm: the verifier for it runs.
        let signed_input = format!(
            "{}.{}",
            b64(&serde_json::to_vec(&header).expect("a header")),
            TOKEN.split('.').nth(1).expect("claims")
        );
        for signature in ["", "AAAA", "c2lnbmF0dXJl"] {
            let token = format!("{signed_input}.{signature}");
            let _ = jsonwebtoken::decode::<serde_json::Value>(&token, &key.key, &validation);
        }
        assert_ne!(key.algorithm, Algorithm::HS256);
    }
});

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
