//! Client authentication: JWT verification and token minting.
//!
//! A token is verified with the configured HS256 secret or PEM public key, or
//! with the key its `kid` names in a JWKS ([`crate::jwks`]). Nothing here
//! logs or returns anything about a token: errors say only that a token was
//! refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch: the clock of a token's times (`iat`, `exp`),
/// of its socket's deadline and of user revocations.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::{Config, JwtAlgorithm};
use crate::health::Probe;
use crate::jwks::{Jwks, JwksError, JwksSettings};

/// The authenticated user of a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// The `sub` claim (a valid [`UserId`]).
    pub id: Arc<str>,
    /// When the token expires (`exp`, seconds since the epoch).
    pub expires_at: u64,
    /// When the token was issued (`iat`), if it says.
    pub issued_at: Option<u64>,
}

pub use crate::users::{InvalidUserId, MAX_USER_ID_LEN, UserId};

/// The claims herald reads.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// What herald reads from a token it verified (`iss`, `aud` and `nbf` are
/// checked by the validation; `aud` may be a string or an array).
#[derive(Deserialize)]
struct Verified {
    sub: String,
    exp: NumericDate,
    /// Absent is `None`; `null` is refused like any other non-date.
    #[serde(default, deserialize_with = "crate::events::present")]
    iat: Option<NumericDate>,
}

/// The claims of a token, as the JSON text they are: read whole as a raw
/// value, which checks that all of it is UTF-8 (serde skips the claims a
/// struct does not name without looking at their bytes), then as [`Verified`].
type Claimed = Box<serde_json::value::RawValue>;

/// A NumericDate (RFC 7519 section 2): seconds since the epoch, a
/// non-negative integer or fraction (`1700000000.5`), read down to the whole
/// second; one past `u64::MAX` reads as `u64::MAX`. Anything else (a string,
/// a negative number, `null`) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NumericDate(u64);

impl<'de> Deserialize<'de> for NumericDate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seconds;
        impl serde::de::Visitor<'_> for Seconds {
            type Value = NumericDate;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a non-negative number of seconds")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<NumericDate, E> {
                Ok(NumericDate(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<NumericDate, E> {
                u64::try_from(v).map(NumericDate).map_err(|_| E::custom("a negative NumericDate"))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<NumericDate, E> {
                // `as` saturates: 1e300 is u64::MAX.
                if v.is_finite() && v >= 0.0 {
                    Ok(NumericDate(v.floor() as u64))
                } else {
                    Err(E::custom("not a NumericDate"))
                }
            }
        }
        d.deserialize_any(Seconds)
    }
}

/// A token was refused. Deliberately says nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("Unauthorized")]
pub struct Unauthorized;

/// The verification key could not be built.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no JWT secret configured")]
    NoSecret,
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} is not a valid {alg} PEM key")]
    BadPem { path: std::path::PathBuf, alg: &'static str },
    #[error("cannot sign a token: {0}")]
    Sign(String),
    #[error("JWKS")]
    Jwks(#[from] JwksError),
}

fn algorithm(alg: JwtAlgorithm) -> Algorithm {
    match alg {
        JwtAlgorithm::Hs256 => Algorithm::HS256,
        JwtAlgorithm::Rs256 => Algorithm::RS256,
        JwtAlgorithm::Es256 => Algorithm::ES256,
    }
}

fn alg_name(alg: JwtAlgorithm) -> &'static str {
    match alg {
        JwtAlgorithm::Hs256 => "HS256",
        JwtAlgorithm::Rs256 => "RS256",
        JwtAlgorithm::Es256 => "ES256",
    }
}

/// The configured HS256 secret or PEM public key.
fn fixed_key(config: &Config) -> Result<DecodingKey, KeyError> {
    Ok(match config.auth.jwt_algorithm {
        JwtAlgorithm::Hs256 => {
            let secret = config.auth.jwt_secret.as_ref().ok_or(KeyError::NoSecret)?;
            DecodingKey::from_secret(secret.expose_secret().as_bytes())
        }
        alg @ (JwtAlgorithm::Rs256 | JwtAlgorithm::Es256) => {
            let path = config.auth.jwt_public_key_file.clone().ok_or(KeyError::NoSecret)?;
            let pem = std::fs::read(&path).map_err(|source| KeyError::Read { path: path.clone(), source })?;
            let key = if alg == JwtAlgorithm::Rs256 {
                DecodingKey::from_rsa_pem(&pem)
            } else {
                DecodingKey::from_ec_pem(&pem)
            };
            key.map_err(|_| KeyError::BadPem { path, alg: alg_name(alg) })?
        }
    })
}

/// Where the verification key comes from.
#[derive(Clone)]
enum Keys {
    /// The configured secret or public key, for the configured algorithm.
    Fixed(Arc<DecodingKey>),
    /// The key the token's `kid` names, for the algorithm that key allows.
    Jwks(Jwks),
}

/// Verifies client tokens.
#[derive(Clone)]
pub struct Verifier {
    keys: Keys,
    validation: Arc<Validation>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.keys {
            Keys::Fixed(_) => f.debug_struct("Verifier").field("algorithms", &self.validation.algorithms).finish(),
            Keys::Jwks(_) => f.debug_struct("Verifier").field("keys", &"JWKS").finish(),
        }
    }
}

impl Verifier {
    /// Builds the verifier from the configuration (the secret must be
    /// resolved). With a JWKS URL it starts fetching the keys, so it runs
    /// inside a Tokio runtime.
    pub fn from_config(config: &Config) -> Result<Self, KeyError> {
        let keys = match &config.auth.jwt_jwks_url {
            Some(url) => Keys::Jwks(Jwks::start(&JwksSettings {
                url: url.clone(),
                min_refresh: config.auth.jwt_jwks_min_refresh,
                max_refresh: config.auth.jwt_jwks_max_refresh,
            })?),
            None => Keys::Fixed(Arc::new(fixed_key(config)?)),
        };
        // With a JWKS the algorithm is the key's, set for each token.
        let mut validation = Validation::new(algorithm(config.auth.jwt_algorithm));
        validation.leeway = config.auth.jwt_leeway.as_secs();
        let mut required = vec!["exp", "sub"];
        if config.auth.jwt_issuer.is_some() {
            required.push("iss");
        }
        if config.auth.jwt_audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        if let Some(iss) = &config.auth.jwt_issuer {
            validation.set_issuer(&[iss]);
        }
        match &config.auth.jwt_audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(Verifier { keys, validation: Arc::new(validation) })
    }

    /// The readiness probe of the keys: a JWKS fails it until its first fetch.
    pub fn probe(&self) -> Option<Probe> {
        match &self.keys {
            Keys::Fixed(_) => None,
            Keys::Jwks(jwks) => Some(jwks.probe()),
        }
    }

    /// Verifies a token (a leading `Bearer ` is stripped) and returns its
    /// user. With a JWKS, a token whose `kid` is unknown may wait for a
    /// refetch (see [`crate::jwks`]).
    ///
    /// Besides the signature, `exp`, `nbf`, `iss` and `aud` (with the
    /// leeway): a header with `crit` is refused (herald understands no JWS
    /// extension, and RFC 7515 section 4.1.11 says to refuse what a verifier does
    /// not understand), and so is an `iat` more than the leeway in the future
    /// (it would outlive every user revocation).
    pub async fn verify(&self, token: &str) -> Result<User, Unauthorized> {
        let token = token.strip_prefix("Bearer ").unwrap_or(token);
        let header = jsonwebtoken::decode_header(token).map_err(|_| Unauthorized)?;
        if header.crit.is_some() {
            return Err(Unauthorized);
        }
        let data = match &self.keys {
            Keys::Fixed(key) => jsonwebtoken::decode::<Claimed>(token, key, &self.validation),
            Keys::Jwks(jwks) => {
                // Only asymmetric algorithms can name a JWKS key: others need no lookup.
                if matches!(header.alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                    return Err(Unauthorized);
                }
                let kid = header.kid.ok_or(Unauthorized)?;
                let key = jwks.key(&kid).await.ok_or(Unauthorized)?;
                if header.alg != key.algorithm {
                    return Err(Unauthorized);
                }
                let mut validation = Validation::clone(&self.validation);
                validation.algorithms = vec![key.algorithm];
                jsonwebtoken::decode::<Claimed>(token, &key.key, &validation)
            }
        }
        .map_err(|_| Unauthorized)?;
        let Verified { sub, exp, iat } = serde_json::from_str(data.claims.get()).map_err(|_| Unauthorized)?;
        // The clock jsonwebtoken checks `exp` and `nbf` with.
        let latest_iat = jsonwebtoken::get_current_timestamp().saturating_add(self.validation.leeway);
        if iat.is_some_and(|iat| iat.0 > latest_iat) {
            return Err(Unauthorized);
        }
        let id = UserId::parse(&sub).map_err(|_| Unauthorized)?;
        Ok(User { id: id.into_shared(), expires_at: exp.0, issued_at: iat.map(|iat| iat.0) })
    }
}

/// Signs client tokens, for `herald token` and the development banner.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Minter {
    /// A minter for HS256 with the configured secret.
    pub fn hs256(secret: &SecretString, config: &Config) -> Self {
        Minter {
            key: EncodingKey::from_secret(secret.expose_secret().as_bytes()),
            header: Header::new(Algorithm::HS256),
            issuer: config.auth.jwt_issuer.clone(),
            audience: config.auth.jwt_audience.clone(),
        }
    }

    /// A minter for RS256 / ES256 from a PEM private key.
    pub fn from_private_key(path: &std::path::Path, config: &Config) -> Result<Self, KeyError> {
        let alg = config.auth.jwt_algorithm;
        let pem = std::fs::read(path).map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        let key = match alg {
            JwtAlgorithm::Rs256 => EncodingKey::from_rsa_pem(&pem),
            JwtAlgorithm::Es256 => EncodingKey::from_ec_pem(&pem),
            JwtAlgorithm::Hs256 => {
                return Err(KeyError::Sign("HS256 signs with the JWT secret, not a key file".into()));
            }
        }
        .map_err(|_| KeyError::BadPem { path: path.to_owned(), alg: alg_name(alg) })?;
        Ok(Minter {
            key,
            header: Header::new(algorithm(alg)),
            issuer: config.auth.jwt_issuer.clone(),
            audience: config.auth.jwt_audience.clone(),
        })
    }

    /// Mints a token for `sub`, valid for `ttl`.
    pub fn mint(&self, sub: &str, ttl: Duration) -> Result<String, KeyError> {
        let now = unix_now();
        let claims = Claims {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).map_err(|e| KeyError::Sign(e.to_string()))
    }
}

/// Finds the client's token: `auth.token` first, then the `token` query parameter.
pub fn find_token(auth: Option<&serde_json::Value>, query: Option<&str>) -> Option<String> {
    if let Some(token) = auth.and_then(|a| a.get("token")).and_then(|t| t.as_str()).filter(|t| !t.is_empty()) {
        return Some(token.to_owned());
    }
    let query = query?;
    form_urlencoded::parse(query.as_bytes()).find(|(k, v)| k == "token" && !v.is_empty()).map(|(_, v)| v.into_owned())
}

/// Whether a request carries `Authorization: Bearer <token>` with this token
/// (compared in constant time): the publish token of the backends' APIs.
pub(crate) fn bearer_matches(headers: &axum::http::HeaderMap, token: &SecretString) -> bool {
    let Some(value) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    constant_time_eq::constant_time_eq(given.as_bytes(), token.expose_secret().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(secret: &str) -> Config {
        let mut c = Config::defaults();
        c.auth.jwt_secret = Some(secret.into());
        c
    }

    #[tokio::test]
    async fn a_minted_token_verifies_and_bearer_is_stripped() {
        let c = config("s");
        let token = Minter::hs256(c.auth.jwt_secret.as_ref().unwrap(), &c).mint("u1", Duration::from_secs(60)).unwrap();
        let v = Verifier::from_config(&c).unwrap();
        assert_eq!(&*v.verify(&token).await.unwrap().id, "u1");
        assert_eq!(&*v.verify(&format!("Bearer {token}")).await.unwrap().id, "u1");
        assert_eq!(Verifier::from_config(&config("other")).unwrap().verify(&token).await, Err(Unauthorized));
    }

    #[test]
    fn the_auth_token_wins_over_the_query() {
        assert_eq!(find_token(Some(&json!({"token": "a"})), Some("token=b")), Some("a".into()));
        assert_eq!(find_token(Some(&json!({})), Some("EIO=4&token=b%20c")), Some("b c".into()));
        assert_eq!(find_token(None, Some("EIO=4")), None);
        assert_eq!(find_token(Some(&json!({"token": 5})), None), None);
    }
}
