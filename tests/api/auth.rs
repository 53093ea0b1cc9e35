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
    }
}
