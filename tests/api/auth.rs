//! The handshake: who gets in, and how a refusal looks.

use std::time::Duration;

use jsonwebtoken::{Algorithm, Header};
use serde_json::json;

use crate::client::ConnectError;
use crate::helpers::*;

fn refused() -> Result<(), ConnectError> {
    Err(ConnectError::Refused("Unauthorized".into()))
}

#[tokio::test]
async fn a_token_in_auth_connects() {
    let app = spawn_app().await;
    let mut c = app.connect("alice").await;
    assert_eq!(c.subscribe("campaign", "c1").await, json!({"success": true}));
}

#[tokio::test]
async fn a_token_in_the_query_connects_and_bearer_is_stripped() {
    let app = spawn_app().await;
    let query = format!("token=Bearer%20{}", token("alice"));
    let mut c = app.try_connect(None, &query).await.expect("query token connects");
    assert_eq!(c.subscribe("campaign", "c1").await, json!({"success": true}));
    let mut c = app.try_connect(Some(json!({"token": format!("Bearer {}", token("bob"))})), "").await.unwrap();
    assert_eq!(c.subscribe("campaign", "c1").await, json!({"success": true}));
}

#[tokio::test]
async fn bad_tokens_are_refused_with_unauthorized_and_others_keep_working() {
    let app = spawn_app().await;
    let mut good = app.connect("alice").await;
    assert_eq!(good.subscribe("campaign", "c1").await["success"], true);

    let exp = now() + 3600;
    let none_alg = {
        // alg "none": header and claims, empty signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(json!({"sub": "alice", "exp": exp}).to_string())
        )
    };
    let cases = [
        ("missing", None, String::new()),
        ("empty", Some(json!({"token": ""})), String::new()),
        ("not a string", Some(json!({"token": 42})), String::new()),
        ("garbage", Some(json!({"token": "not-a-jwt"})), String::new()),
        (
            "expired",
            Some(
                json!({"token": token_with(&Header::default(), json!({"sub": "alice", "exp": now() - 3600}), JWT_SECRET.as_bytes())}),
            ),
            String::new(),
        ),
        (
            "no exp",
            Some(json!({"token": token_with(&Header::default(), json!({"sub": "alice"}), JWT_SECRET.as_bytes())})),
            String::new(),
        ),
        (
            "empty sub",
            Some(
                json!({"token": token_with(&Header::default(), json!({"sub": "", "exp": exp}), JWT_SECRET.as_bytes())}),
            ),
            String::new(),
        ),
        (
            "wrong signature",
            Some(
                json!({"token": token_with(&Header::default(), json!({"sub": "alice", "exp": exp}), b"another-secret")}),
            ),
            String::new(),
        ),
        ("alg none", Some(json!({"token": none_alg})), String::new()),
        (
            "wrong algorithm",
            Some(
                json!({"token": token_with(&Header::new(Algorithm::HS512), json!({"sub": "alice", "exp": exp}), JWT_SECRET.as_bytes())}),
            ),
            String::new(),
        ),
        ("garbage query", None, "token=abc".to_owned()),
    ];
    for (name, auth, query) in cases {
        let result = app.try_connect(auth, &query).await.map(|_| ());
        assert_eq!(result, refused(), "{name}");
    }

    app.publish(&bodies::state_invalidated("c1")).await;
    let (event, _) = good.expect_event().await;
    assert_eq!(event, "state_invalidated");
    let metrics = app.metrics().await;
    assert_eq!(metric(&metrics, r#"herald_auth_failures_total{reason="missing"}"#), 3.0);
    assert_eq!(metric(&metrics, r#"herald_auth_failures_total{reason="invalid"}"#), 8.0);
}

#[tokio::test]
async fn issuer_and_audience_are_checked_when_configured() {
    let app = spawn_app_with(Backend::Sqlite, |c| {
        c.auth.jwt_issuer = Some("campaign-api".into());
        c.auth.jwt_audience = Some("herald".into());
    })
    .await;
    let exp = now() + 60;
    let sign = |claims| json!({"token": token_with(&Header::default(), claims, JWT_SECRET.as_bytes())});
    for aud in [json!("herald"), json!(["campaign-api", "herald"])] {
        let ok = sign(json!({"sub": "alice", "exp": exp, "iss": "campaign-api", "aud": aud}));
        assert!(app.try_connect(Some(ok), "").await.is_ok(), "{aud}");
    }
    for claims in [
        json!({"sub": "alice", "exp": exp}),
        json!({"sub": "alice", "exp": exp, "iss": "other", "aud": "herald"}),
        json!({"sub": "alice", "exp": exp, "iss": "campaign-api", "aud": "other"}),
        json!({"sub": "alice", "exp": exp, "iss": "campaign-api", "aud": ["other", "campaign-api"]}),
        json!({"sub": "alice", "exp": exp, "iss": "campaign-api", "aud": []}),
    ] {
        assert_eq!(app.try_connect(Some(sign(claims.clone())), "").await.map(|_| ()), refused(), "{claims}");
    }
}

#[tokio::test]
async fn expiry_has_a_small_leeway() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth.jwt_leeway = Duration::from_secs(30)).await;
    let just_expired =
        token_with(&Header::default(), json!({"sub": "alice", "exp": now() - 10}), JWT_SECRET.as_bytes());
    assert!(app.try_connect(Some(json!({"token": just_expired})), "").await.is_ok());
    let long_expired =
        token_with(&Header::default(), json!({"sub": "alice", "exp": now() - 60}), JWT_SECRET.as_bytes());
    assert_eq!(app.try_connect(Some(json!({"token": long_expired})), "").await.map(|_| ()), refused());
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[tokio::test]
async fn rs256_and_es256_verify_with_a_public_key_and_refuse_hs256_confusion() {
    use herald::config::JwtAlgorithm;
    use jsonwebtoken::EncodingKey;
    for (alg, jwt_alg, name) in
        [(Algorithm::RS256, JwtAlgorithm::Rs256, "rs256"), (Algorithm::ES256, JwtAlgorithm::Es256, "es256")]
    {
        let public = fixture(&format!("{name}-public.pem"));
        let app = spawn_app_with(Backend::Sqlite, |c| {
            c.auth.jwt_algorithm = jwt_alg;
            c.auth.jwt_public_key_file = Some(public.clone());
        })
        .await;
        let private = std::fs::read(fixture(&format!("{name}-private.pem"))).unwrap();
        let key = if alg == Algorithm::RS256 {
            EncodingKey::from_rsa_pem(&private)
        } else {
            EncodingKey::from_ec_pem(&private)
        }
        .unwrap();
        let claims = json!({"sub": "alice", "exp": now() + 60});
        let good = jsonwebtoken::encode(&Header::new(alg), &claims, &key).unwrap();
        let mut c = app.try_connect(Some(json!({"token": good})), "").await.expect("signed with the private key");
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
        // Algorithm confusion: HS256 with the public key's text as the secret.
        let public_pem = std::fs::read(&public).unwrap();
        let confused = token_with(&Header::default(), claims.clone(), &public_pem);
        assert_eq!(app.try_connect(Some(json!({"token": confused})), "").await.map(|_| ()), refused(), "{name}");
        // And a plain HS256 token signed with the shared test secret.
        assert_eq!(app.try_connect(Some(json!({"token": token("alice")})), "").await.map(|_| ()), refused(), "{name}");
        for (what, header) in critical_headers(alg) {
            let critical = jsonwebtoken::encode(&header, &claims, &key).unwrap();
            assert_eq!(
                app.try_connect(Some(json!({"token": critical})), "").await.map(|_| ()),
                refused(),
                "{name}: {what}"
            );
        }
    }
}

/// Headers that mark a JWS extension as critical (RFC 7515 section 4.1.11):
/// herald understands none, so it must refuse them all, whatever the key.
pub fn critical_headers(alg: Algorithm) -> Vec<(&'static str, Header)> {
    let with = |crit: &[&str], extra: Option<(&str, serde_json::Value)>| {
        let mut header = Header::new(alg);
        header.crit = Some(crit.iter().map(|c| c.to_string()).collect());
        if let Some((name, value)) = extra {
            header.extras.insert(name, value);
        }
        header
    };
    vec![
        ("crit exp", with(&["exp"], None)),
        ("b64 false", with(&["b64"], Some(("b64", json!(false))))),
        ("b64 true", with(&["b64"], Some(("b64", json!(true))))),
        ("a private extension", with(&["x-herald"], Some(("x-herald", json!(1))))),
        ("an empty crit", with(&[], None)),
    ]
}

#[tokio::test]
async fn a_critical_header_extension_is_refused() {
    let app = spawn_app().await;
    let claims = json!({"sub": "alice", "exp": now() + 60});
    for (name, header) in critical_headers(Algorithm::HS256) {
        let token = token_with(&header, claims.clone(), JWT_SECRET.as_bytes());
        assert_eq!(app.try_connect(Some(json!({"token": token})), "").await.map(|_| ()), refused(), "{name}");
    }
    // The same header without `crit` connects.
    let token = token_with(&Header::new(Algorithm::HS256), claims, JWT_SECRET.as_bytes());
    assert!(app.try_connect(Some(json!({"token": token})), "").await.is_ok());
}

/// `iat` more than the leeway in the future is refused (it would outlive
/// every user revocation); NumericDates may be fractions; out-of-range
/// values are refused, never a panic.
#[tokio::test]
async fn token_time_claims_are_numeric_dates_and_iat_is_not_in_the_future() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.auth.jwt_leeway = Duration::from_secs(5)).await;
    let t = now();
    let sign =
        |claims: serde_json::Value| json!({"token": token_with(&Header::default(), claims, JWT_SECRET.as_bytes())});
    let exp = t + 3600;
    let accepted = [
        ("iat now", json!({"sub": "alice", "exp": exp, "iat": t})),
        ("iat within the leeway", json!({"sub": "alice", "exp": exp, "iat": t + 2})),
        ("fractional iat", json!({"sub": "alice", "exp": exp, "iat": t as f64 - 0.5})),
        ("fractional exp", json!({"sub": "alice", "exp": exp as f64 + 0.5})),
        ("fractional nbf", json!({"sub": "alice", "exp": exp, "nbf": t as f64 - 10.5})),
        (
            "all three fractional",
            json!({"sub": "alice", "exp": exp as f64 + 0.25, "nbf": t as f64 - 1.75, "iat": t as f64 + 0.5}),
        ),
        ("exp as large as it gets", json!({"sub": "alice", "exp": u64::MAX})),
    ];
    for (name, claims) in accepted {
        let mut c = app.try_connect(Some(sign(claims)), "").await.unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(c.subscribe("campaign", "c1").await["success"], true, "{name}");
    }
    let refused_claims = [
        ("iat past the leeway", json!({"sub": "alice", "exp": exp, "iat": t + 60})),
        ("iat T+1e8", json!({"sub": "alice", "exp": exp, "iat": t + 100_000_000})),
        ("iat u64::MAX", json!({"sub": "alice", "exp": exp, "iat": u64::MAX})),
        ("iat 1e300", json!({"sub": "alice", "exp": exp, "iat": 1e300})),
        ("iat a fraction past the leeway", json!({"sub": "alice", "exp": exp, "iat": (t + 60) as f64 + 0.5})),
        ("negative iat", json!({"sub": "alice", "exp": exp, "iat": -1})),
        ("iat as a string", json!({"sub": "alice", "exp": exp, "iat": t.to_string()})),
        ("iat null", json!({"sub": "alice", "exp": exp, "iat": null})),
        ("exp 1e300", json!({"sub": "alice", "exp": 1e300})),
        ("exp past, fractional", json!({"sub": "alice", "exp": t as f64 - 60.5})),
        ("negative exp", json!({"sub": "alice", "exp": -1})),
        ("nbf in the future, fractional", json!({"sub": "alice", "exp": exp, "nbf": (t + 60) as f64 + 0.5})),
        ("nbf 1e300", json!({"sub": "alice", "exp": exp, "nbf": 1e300})),
        ("nbf u64::MAX", json!({"sub": "alice", "exp": exp, "nbf": u64::MAX})),
    ];
    for (name, claims) in refused_claims {
        assert_eq!(app.try_connect(Some(sign(claims)), "").await.map(|_| ()), refused(), "{name}");
    }
    // refresh_token checks the same.
    let mut c = app.connect("alice").await;
    let future =
        token_with(&Header::default(), json!({"sub": "alice", "exp": exp, "iat": u64::MAX}), JWT_SECRET.as_bytes());
    assert_eq!(c.emit_with_ack("refresh_token", json!({"token": future})).await["error"], "Unauthorized");
    let fractional = token_with(
        &Header::default(),
        json!({"sub": "alice", "exp": exp as f64 + 0.5, "iat": t as f64 + 0.5}),
        JWT_SECRET.as_bytes(),
    );
    assert_eq!(c.emit_with_ack("refresh_token", json!({"token": fractional})).await, json!({"success": true}));
    let m = app.metrics().await;
    assert_eq!(metric(&m, r#"herald_auth_failures_total{reason="invalid"}"#), 14.0, "{m}");
}

/// A token signed over exactly these header and claims bytes.
fn raw_token(header: &[u8], claims: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let input = format!("{}.{}", b64.encode(header), b64.encode(claims));
    let key = jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{input}.{signature}")
}

/// Found by the `token` fuzz target: claims that are not UTF-8 (here in a
/// claim herald does not read) passed, as serde skips unread fields without
/// looking at their bytes. Claims must be a JSON text (RFC 7519, RFC 8259),
/// and a claim herald reads may not be given twice.
#[tokio::test]
async fn claims_that_are_not_utf8_json_or_repeat_a_claim_are_refused() {
    let app = spawn_app().await;
    let header = br#"{"alg":"HS256","typ":"JWT"}"#;
    let exp = now() + 3600;
    let claims = |rest: &str| format!(r#"{{"sub":"alice","exp":{exp}{rest}}}"#).into_bytes();
    let mut not_utf8 = claims(r#","x":"?i""#);
    let at = not_utf8.iter().position(|&b| b == b'?').unwrap();
    not_utf8[at] = 0xd1;
    let cases = [
        ("not UTF-8", not_utf8),
        ("iat twice", claims(&format!(r#","iat":{},"iat":{}"#, now(), now() + 100_000_000))),
        ("exp twice", claims(&format!(r#","exp":{exp}"#))),
        ("sub twice", claims(r#","sub":"bob""#)),
    ];
    for (name, claims) in cases {
        let token = raw_token(header, &claims);
        assert_eq!(app.try_connect(Some(json!({"token": token})), "").await.map(|_| ()), refused(), "{name}");
    }
    let fine = raw_token(header, &claims(r#","x":"é ☃""#));
    assert!(app.try_connect(Some(json!({"token": fine})), "").await.is_ok(), "UTF-8 claims connect");
}
