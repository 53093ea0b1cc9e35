//! Token verification (`herald::auth::Verifier::verify`, HS256 with a known
//! secret) on any header and claims, signed, so that the fuzzer reaches the
//! header and claims handling behind the signature; or on any raw token.
//! No panic; a token accepted has no `crit`, an `exp` not past and an `iat`
//! not in the future (beyond the leeway), and its user is its `sub`.
#![no_main]

use std::sync::LazyLock;

use base64::Engine;
use herald::auth::Verifier;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use serde_json::value::RawValue;

const SECRET: &str = "fuzzing-secret-fuzzing-secret-fuzzing";

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let mut config = herald::Config::defaults();
    config.auth.jwt_secret = Some(SECRET.into());
    Verifier::from_config(&config).expect("an HS256 verifier")
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime"));

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// `header` and `claims` as a token signed with the secret.
fn signed(header: &[u8], claims: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).expect("HS256 signs");
    format!("{input}.{signature}")
}

/// A claim as a number of seconds.
fn seconds(claims: &Value, name: &str) -> Option<f64> {
    claims.get(name).and_then(Value::as_f64)
}

/// A claim as whole seconds (RFC 7519 allows fractions; herald reads them down).
fn whole_seconds(claims: &Value, name: &str) -> Option<u64> {
    let claim = claims.get(name)?;
    claim.as_u64().or_else(|| claim.as_f64().filter(|s| *s >= 0.0).map(|s| s.floor() as u64))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let (token, parts) = if mode % 2 == 0 {
        (String::from_utf8_lossy(rest).into_owned(), None)
    } else {
        let at = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (header, claims) = (&rest[..at], rest.get(at + 1..).unwrap_or_default());
        (signed(header, claims), Some((header, claims)))
    };
    let verified = RUNTIME.block_on(VERIFIER.verify(&token));
    let (Ok(user), Some((header, claims))) = (verified, parts) else { return };
    let header: Value = serde_json::from_slice(header).expect("an accepted header is JSON");
    // JSON text in UTF-8 (RFC 7519, RFC 8259), whatever serde_json's Value
    // can hold: a number past f64's range or an escaped lone surrogate is
    // valid JSON, which Value refuses; such claims are checked no further.
    serde_json::from_slice::<&RawValue>(claims).expect("accepted claims are JSON");
    let Ok(claims) = serde_json::from_slice::<Value>(claims) else { return };
    assert!(header.get("crit").is_none_or(Value::is_null), "accepted crit: {header}");
    assert_eq!(header["alg"], "HS256");
    assert_eq!(claims["sub"].as_str(), Some(&*user.id));
    let now = jsonwebtoken::get_current_timestamp() as f64;
    let leeway = herald::Config::defaults().auth.jwt_leeway.as_secs_f64();
    let exp = seconds(&claims, "exp").expect("an accepted token has exp");
    assert!(exp + leeway + 1.0 >= now, "accepted exp {exp} at {now}");
    assert_eq!(Some(user.expires_at), whole_seconds(&claims, "exp"), "{claims}");
    match seconds(&claims, "iat") {
        Some(iat) => {
            assert!(iat <= now + leeway + 1.0, "accepted iat {iat} at {now}");
            assert_eq!(user.issued_at, whole_seconds(&claims, "iat"), "{claims}");
        }
        None => assert!(claims.get("iat").is_none() && user.issued_at.is_none(), "{claims}"),
    }
    if let Some(nbf) = seconds(&claims, "nbf") {
        assert!(nbf <= now + leeway + 1.0, "accepted nbf {nbf} at {now}");
    }
});
