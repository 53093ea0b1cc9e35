//! JWKS: tokens verified with an identity provider's keys, chosen by `kid`.
//! The provider is a real HTTP server on port 0 that serves a document the
//! test changes at runtime and counts its fetches; the keys are generated
//! here.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::IntoResponse;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::client::ConnectError;
use crate::helpers::*;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A private key, its algorithm and its public JWK.
struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

impl TestKey {
    /// A 2048-bit RSA key; its JWK has `alg` only when given.
    fn rsa(kid: &str, jwk_alg: Option<&str>) -> TestKey {
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::traits::PublicKeyParts;
        let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048).expect("an RSA key");
        let mut jwk = json!({"kty": "RSA", "kid": kid, "use": "sig",
            "n": B64.encode(key.n().to_bytes_be()), "e": B64.encode(key.e().to_bytes_be())});
        if let Some(alg) = jwk_alg {
            jwk["alg"] = json!(alg);
        }
        let encoding = EncodingKey::from_rsa_der(key.to_pkcs1_der().unwrap().as_bytes());
        TestKey { kid: kid.into(), alg: Algorithm::RS256, encoding, jwk }
    }

    fn p256(kid: &str) -> TestKey {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::EncodePrivateKey;
        let key = p256::SecretKey::random(&mut rand_core::OsRng);
        let point = key.public_key().to_encoded_point(false);
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": kid,
            "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap())});
        let encoding = EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes());
        TestKey { kid: kid.into(), alg: Algorithm::ES256, encoding, jwk }
    }

    fn p384(kid: &str) -> TestKey {
        use p384::elliptic_curve::sec1::ToEncodedPoint;
        use p384::pkcs8::EncodePrivateKey;
        let key = p384::SecretKey::random(&mut rand_core::OsRng);
        let point = key.public_key().to_encoded_point(false);
        let jwk = json!({"kty": "EC", "crv": "P-384", "kid": kid, "alg": "ES384",
            "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap())});
        let encoding = EncodingKey::from_ec_der(key.to_pkcs8_der().unwrap().as_bytes());
        TestKey { kid: kid.into(), alg: Algorithm::ES384, encoding, jwk }
    }

    fn ed25519(kid: &str) -> TestKey {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let key = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
            "x": B64.encode(key.verifying_key().to_bytes())});
        let encoding = EncodingKey::from_ed_der(key.to_pkcs8_der().unwrap().as_bytes());
        TestKey { kid: kid.into(), alg: Algorithm::EdDSA, encoding, jwk }
    }

    /// A token for `sub`, valid for an hour, with this key's kid and algorithm.
    fn token(&self, sub: &str) -> String {
        self.token_with(self.alg, json!({"sub": sub, "exp": now() + 3600}))
    }

    /// A token signed with this key under `alg` (which must fit the key's type).
    fn token_with(&self, alg: Algorithm, claims: Value) -> String {
        let mut header = Header::new(alg);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.encoding).expect("the token is signed")
    }
}

/// RSA keys are slow to generate in a debug build: two, shared by the tests.
fn rsa_keys() -> &'static [TestKey; 2] {
    static KEYS: OnceLock<[TestKey; 2]> = OnceLock::new();
    KEYS.get_or_init(|| [TestKey::rsa("k1", Some("RS256")), TestKey::rsa("k2", None)])
}

/// What the provider serves.
#[derive(Default)]
struct Served {
    keys: Mutex<Vec<Value>>,
    /// Served instead of the document, when set.
    raw: Mutex<Option<String>>,
    cache_control: Mutex<Option<String>>,
    fetches: AtomicUsize,
}

/// The identity provider: serves `/jwks.json` until stopped.
struct Provider {
    addr: SocketAddr,
    served: Arc<Served>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

async fn serve_jwks(State(served): State<Arc<Served>>) -> impl IntoResponse {
    served.fetches.fetch_add(1, Ordering::SeqCst);
    let raw = served.raw.lock().unwrap().clone();
    let body = raw.unwrap_or_else(|| json!({ "keys": *served.keys.lock().unwrap() }).to_string());
    let cache_control = served.cache_control.lock().unwrap().clone().unwrap_or_else(|| "public".into());
    ([(CONTENT_TYPE, "application/json".to_owned()), (CACHE_CONTROL, cache_control)], body)
}

impl Provider {
    async fn start(keys: &[&TestKey]) -> Provider {
        Self::start_at("127.0.0.1:0".parse().unwrap(), keys).await
    }

    async fn start_at(addr: SocketAddr, keys: &[&TestKey]) -> Provider {
        let served = Arc::new(Served::default());
        let listener = tokio::net::TcpListener::bind(addr).await.expect("the provider listens");
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/jwks.json", axum::routing::get(serve_jwks)).with_state(served.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            axum::serve(listener, router).with_graceful_shutdown(shutdown).await.expect("the provider serves");
        });
        let provider = Provider { addr, served, stop: Some(stop), task: Some(task) };
        provider.set_keys(keys);
        provider
    }

    fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    fn set_keys(&self, keys: &[&TestKey]) {
        *self.served.keys.lock().unwrap() = keys.iter().map(|k| k.jwk.clone()).collect();
    }

    fn fetches(&self) -> usize {
        self.served.fetches.load(Ordering::SeqCst)
    }

    /// Waits until `n` more fetches have been served.
    async fn wait_for_fetches(&self, n: usize) {
        let target = self.fetches() + n;
        let give_up = Instant::now() + Duration::from_secs(20);
        while self.fetches() < target {
            assert!(Instant::now() < give_up, "herald did not fetch the JWKS again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops serving and closes the port.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the provider stops");
        }
    }
}

/// Herald on SQLite verifying tokens with `provider`'s keys.
async fn spawn_with_jwks(url: String, tweak: impl FnOnce(&mut herald::Config)) -> TestApp {
    spawn_app_with(Backend::Sqlite, |c| {
        c.auth.jwt_secret = None;
        c.auth.jwt_jwks_url = Some(url);
        tweak(c);
    })
    .await
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let response = app.http.get(app.url("/readyz")).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Waits until `/readyz` answers 200 (herald has its first keys).
async fn wait_ready(app: &TestApp) -> Duration {
    let started = Instant::now();
    while readyz(app).await.0 != 200 {
        assert!(started.elapsed() < Duration::from_secs(40), "herald never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

async fn connect(app: &TestApp, token: &str) -> Result<(), ConnectError> {
    app.try_connect(Some(json!({ "token": token })), "").await.map(|_| ())
}

fn refused() -> Result<(), ConnectError> {
    Err(ConnectError::Refused("Unauthorized".into()))
}

#[tokio::test]
async fn a_token_connects_with_the_key_its_kid_names_and_a_rotated_in_key_works_at_once() {
    let [k1, k2] = rsa_keys();
    let provider = Provider::start(&[k1]).await;
    let app = spawn_with_jwks(provider.url(), |_| {}).await;
    wait_ready(&app).await;
    let mut c = app.try_connect(Some(json!({"token": k1.token("alice")})), "").await.expect("k1 connects");
    assert_eq!(c.subscribe("campaign", "c1").await, json!({"success": true}));
    // Signed by k2 but naming k1; no kid at all; HS256 with the old test secret.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("k1".into());
    let claims = json!({"sub": "alice", "exp": now() + 60});
    let misnamed = jsonwebtoken::encode(&header, &claims, &k2.encoding).unwrap();
    let no_kid = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &k1.encoding).unwrap();
    for (name, token) in [("misnamed", misnamed), ("no kid", no_kid), ("hs256", token("alice"))] {
        assert_eq!(connect(&app, &token).await, refused(), "{name}");
    }
    assert_eq!(provider.fetches(), 1, "a known kid, or no usable kid, fetches nothing");

    // Rotation: k2 appears in the document; its first token brings it in.
    let k2_token = k2.token("bob");
    provider.set_keys(&[k1, k2]);
    let rotated = Instant::now();
    connect(&app, &k2_token).await.expect("k2 connects without a restart");
    let took = rotated.elapsed();
    println!("rotation to the first accepted k2 connection: {took:?} ({} fetches in all)", provider.fetches());
    assert_eq!(provider.fetches(), 2, "one refetch for the unknown kid");
    connect(&app, &k1.token("alice")).await.expect("k1 still connects");
}

#[tokio::test]
async fn a_removed_key_is_refused_after_the_next_refresh() {
    let [k1, k2] = rsa_keys();
    let provider = Provider::start(&[k1, k2]).await;
    *provider.served.cache_control.lock().unwrap() = Some("max-age=1".into());
    let app = spawn_with_jwks(provider.url(), |c| {
        c.auth.jwt_jwks_min_refresh = Duration::from_secs(1);
        c.auth.jwt_jwks_max_refresh = Duration::from_secs(3600);
    })
    .await;
    wait_ready(&app).await;
    let mut connected = app.try_connect(Some(json!({"token": k1.token("alice")})), "").await.expect("k1 connects");

    provider.set_keys(&[k2]);
    let removed = Instant::now();
    // The second fetch after the removal starts after the first one was taken in.
    provider.wait_for_fetches(2).await;
    assert_eq!(connect(&app, &k1.token("alice")).await, refused());
    println!("k1 removed: refused {:?} later (max-age=1)", removed.elapsed());
    connect(&app, &k2.token("bob")).await.expect("k2 still connects");
    // A socket that connected with the removed key stays until its token expires.
    assert_eq!(connected.subscribe("campaign", "c1").await["success"], true);
}

#[tokio::test]
async fn a_token_whose_alg_is_not_the_one_its_key_allows_is_refused() {
    let [k1, k2] = rsa_keys();
    let provider = Provider::start(&[k1, k2]).await;
    let app = spawn_with_jwks(provider.url(), |_| {}).await;
    wait_ready(&app).await;
    let claims = json!({"sub": "alice", "exp": now() + 60});
    let mut cases = vec![];
    // k1's JWK says RS256; k2's has no alg, which allows RS256 only.
    for key in [k1, k2] {
        for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
            cases.push((format!("{} {alg:?}", key.kid), key.token_with(alg, claims.clone())));
        }
        // Algorithm confusion: HS256 keyed with the JWK's public material.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid.clone());
        for secret in [key.jwk["n"].as_str().unwrap().to_owned(), key.jwk.to_string()] {
            let confused =
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap();
            cases.push((format!("{} HS256", key.kid), confused));
        }
    }
    let none =
        format!("{}.{}.", B64.encode(json!({"alg": "none", "kid": "k1"}).to_string()), B64.encode(claims.to_string()));
    cases.push(("alg none".into(), none));
    for (name, token) in cases {
        assert_eq!(connect(&app, &token).await, refused(), "{name}");
    }
    connect(&app, &k1.token("alice")).await.expect("RS256 with k1 connects");
    connect(&app, &k2.token("alice")).await.expect("RS256 with k2 connects");
    assert_eq!(provider.fetches(), 1, "known kids and HS tokens never refetch");
}

#[tokio::test]
async fn a_thousand_forged_kids_cause_a_handful_of_fetches() {
    let [k1, _] = rsa_keys();
    let provider = Provider::start(&[k1]).await;
    let app = spawn_with_jwks(provider.url(), |_| {}).await;
    wait_ready(&app).await;
    let genuine = k1.token("alice");
    let (_, rest) = genuine.split_once('.').unwrap();
    let forged: Vec<String> = (0..1000)
        .map(|_| {
            let kid = format!("{:016x}", rand::random::<u64>());
            let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
            format!("{}.{rest}", B64.encode(header.to_string()))
        })
        .collect();
    let before = provider.fetches();
    let started = Instant::now();
    for batch in forged.chunks(50) {
        let results = futures_util::future::join_all(batch.iter().map(|t| connect(&app, t))).await;
        assert!(
            results.iter().all(|r| *r == refused()),
            "a forged kid was not refused: {:?}",
            results.iter().find(|r| **r != refused())
        );
    }
    let fetches = provider.fetches() - before;
    println!("1,000 forged kids in {:?}: {fetches} JWKS fetch(es)", started.elapsed());
    assert!((1..=3).contains(&fetches), "{fetches} fetches");
    connect(&app, &genuine).await.expect("k1 still connects");
}

#[tokio::test]
async fn the_last_good_keys_survive_a_broken_document_and_a_provider_that_is_gone() {
    let [k1, _] = rsa_keys();
    let mut provider = Provider::start(&[k1]).await;
    let app = spawn_with_jwks(provider.url(), |c| c.auth.jwt_jwks_min_refresh = Duration::from_secs(1)).await;
    wait_ready(&app).await;
    let ed = TestKey::ed25519("ed");
    let broken_ed = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": "AAAA"});
    let documents = [
        // Not a JWKS: a failed fetch.
        "<html>not json</html>".to_owned(),
        // k1 and keys herald cannot use: those are skipped, k1 is kept.
        json!({"keys": [k1.jwk, broken_ed, {"kid": "odd"}, {"kty": "oct", "kid": "hs", "k": "c2VjcmV0"}, 7]})
            .to_string(),
        // No usable key: a failed fetch (it comes after a good one, so the retries are quick).
        json!({"keys": [broken_ed]}).to_string(),
    ];
    for document in documents {
        *provider.served.raw.lock().unwrap() = Some(document.clone());
        provider.wait_for_fetches(2).await;
        connect(&app, &k1.token("alice")).await.unwrap_or_else(|e| panic!("k1 after {document}: {e:?}"));
        assert_eq!(connect(&app, &ed.token("alice")).await, refused(), "{document}");
        assert_eq!(readyz(&app).await.0, 200, "{document}");
    }

    provider.stop().await;
    // Periodic refreshes (every second) and an unknown kid's refetch fail.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(connect(&app, &ed.token("alice")).await, refused());
    connect(&app, &k1.token("alice")).await.expect("k1 works with the provider gone");
    assert_eq!(readyz(&app).await, (200, json!({"status": "ready"})));
}

#[tokio::test]
async fn herald_starts_without_keys_refuses_everyone_and_is_ready_once_the_provider_answers() {
    let [k1, _] = rsa_keys();
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let app = spawn_with_jwks(format!("http://{addr}/jwks.json"), |_| {}).await;
    let started = Instant::now();
    assert_eq!(connect(&app, &k1.token("alice")).await, refused(), "it listens and refuses");
    assert_eq!(readyz(&app).await, (503, json!({"status": "not ready", "failing": {"jwks": "unavailable"}})));
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);

    let provider = Provider::start_at(addr, &[k1]).await;
    let waited = wait_ready(&app).await;
    println!("ready {waited:?} after the provider came up ({:?} after start)", started.elapsed());
    assert!(provider.fetches() >= 1);
    let mut c = app.try_connect(Some(json!({"token": k1.token("alice")})), "").await.expect("k1 connects");
    assert_eq!(c.subscribe("campaign", "c1").await["success"], true);
}

#[tokio::test]
async fn ec_and_ed25519_keys_verify_with_their_algorithm_and_aud_may_be_an_array() {
    let (es256, es384, eddsa) = (TestKey::p256("p256"), TestKey::p384("p384"), TestKey::ed25519("ed"));
    let provider = Provider::start(&[&es256, &es384, &eddsa]).await;
    let app = spawn_with_jwks(provider.url(), |c| {
        c.auth.jwt_issuer = Some("idp".into());
        c.auth.jwt_audience = Some("herald".into());
    })
    .await;
    wait_ready(&app).await;
    let claims = |aud: Value| json!({"sub": "alice", "exp": now() + 60, "iss": "idp", "aud": aud});
    for key in [&es256, &es384, &eddsa] {
        for aud in [json!("herald"), json!(["campaign-api", "herald"])] {
            let token = key.token_with(key.alg, claims(aud.clone()));
            connect(&app, &token).await.unwrap_or_else(|e| panic!("{} with aud {aud}: {e:?}", key.kid));
        }
        for aud in [json!(["campaign-api"]), json!([]), json!("other")] {
            let token = key.token_with(key.alg, claims(aud.clone()));
            assert_eq!(connect(&app, &token).await, refused(), "{} with aud {aud}", key.kid);
        }
    }
    // The P-384 key signing as ES384 under the P-256 key's kid.
    let mut header = Header::new(Algorithm::ES384);
    header.kid = Some("p256".into());
    let crossed = jsonwebtoken::encode(&header, &claims(json!("herald")), &es384.encoding).unwrap();
    assert_eq!(connect(&app, &crossed).await, refused());
}

#[tokio::test]
async fn with_a_jwks_development_mode_has_no_jwt_secret_no_demo_and_no_minting() {
    let provider = Provider::start(&[&TestKey::ed25519("ed")]).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = herald::Config::defaults();
    config.listen = "127.0.0.1:0".into();
    config.store.database_url = format!("sqlite://{}", dir.path().join("herald.db").display());
    config.auth.jwt_jwks_url = Some(provider.url());
    assert!(!config.no_secrets_configured());
    let app = herald::Application::build(config.clone()).await.expect("builds in development mode");
    assert!(!app.serves_demo());
    let dev = app.development_credentials().expect("a generated publish token");
    assert!(dev.client_token.is_none() && dev.publish_token.is_some() && !dev.demo_seeded);

    let token = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "--sub", "alice"])
        .env_clear()
        .env("HERALD_JWT_JWKS_URL", provider.url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&token.stderr);
    assert!(!token.status.success() && stderr.contains("cannot mint tokens for a JWKS"), "{stderr}");

    config.auth.jwt_public_key_file = Some("public.pem".into());
    let error = herald::Application::build(config).await.err().expect("a conflicting configuration");
    assert!(error.to_string().contains("HERALD_JWT_PUBLIC_KEY_FILE does not apply"), "{error}");
}

/// Two keys under one `kid`: a token naming it could mean either, so both
/// are skipped (usable or not), and the document's other keys still work.
#[tokio::test]
async fn keys_that_share_a_kid_are_all_skipped() {
    let [k1, _] = rsa_keys();
    let (ec, ed) = (TestKey::p256("shared"), TestKey::ed25519("shared"));
    let (twin_a, twin_b) = (TestKey::ed25519("twin"), TestKey::ed25519("twin"));
    let provider = Provider::start(&[k1, &ec, &ed, &twin_a]).await;
    provider.served.keys.lock().unwrap().push(twin_a.jwk.clone());
    let app = spawn_with_jwks(provider.url(), |_| {}).await;
    wait_ready(&app).await;
    for (name, token) in [
        ("P-256 under shared", ec.token("alice")),
        ("Ed25519 under shared", ed.token("alice")),
        ("twin", twin_a.token("alice")),
    ] {
        assert_eq!(connect(&app, &token).await, refused(), "{name}");
    }
    // A twin whose other copy is another key is refused the same way.
    assert_eq!(connect(&app, &twin_b.token("alice")).await, refused(), "the twin's sibling");
    connect(&app, &k1.token("alice")).await.expect("k1 still connects");
}

/// `crit` (RFC 7515 section 4.1.11) is refused with a JWKS too, before the
/// key lookup: no refetch either.
#[tokio::test]
async fn a_critical_header_extension_is_refused_with_a_jwks() {
    let [k1, _] = rsa_keys();
    let ec = TestKey::p256("ec");
    let provider = Provider::start(&[k1, &ec]).await;
    let app = spawn_with_jwks(provider.url(), |_| {}).await;
    wait_ready(&app).await;
    let claims = json!({"sub": "alice", "exp": now() + 60});
    for key in [k1, &ec] {
        for (name, mut header) in crate::auth::critical_headers(key.alg) {
            header.kid = Some(key.kid.clone());
            let token = jsonwebtoken::encode(&header, &claims, &key.encoding).unwrap();
            assert_eq!(connect(&app, &token).await, refused(), "{} {name}", key.kid);
        }
        connect(&app, &key.token("alice")).await.expect("without crit it connects");
    }
    assert_eq!(provider.fetches(), 1, "a refused header never asks for a refetch");
}
