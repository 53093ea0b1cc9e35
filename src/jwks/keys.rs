//! The keys of a JWKS document: which ones herald can use, and the one
//! algorithm each of them verifies.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind};
use serde::Deserialize;

/// Smallest and largest RSA modulus accepted, in bits.
const RSA_BITS: (usize, usize) = (2048, 4096);

/// A usable key and the one algorithm it verifies.
pub struct Key {
    pub key: DecodingKey,
    pub algorithm: Algorithm,
}

/// The usable keys of a document, by `kid`.
pub type KeySet = HashMap<String, Arc<Key>>;

/// A document herald cannot use at all.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("the document is not a JWKS")]
    NotJwks(#[source] serde_json::Error),
    #[error("the document has no usable key")]
    NoUsableKey,
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

/// The usable keys of a document; the others are skipped with a warning.
/// Every key of a `kid` that names more than one key is skipped, usable or
/// not: a token naming it could mean either.
pub fn parse_document(body: &[u8]) -> Result<KeySet, DocumentError> {
    let document: Document = serde_json::from_slice(body).map_err(DocumentError::NotJwks)?;
    let mut kids: HashMap<String, usize> = HashMap::new();
    let mut entries = Vec::with_capacity(document.keys.len());
    for value in document.keys {
        let Some(kid) = value.get("kid").and_then(|k| k.as_str()).map(str::to_owned) else {
            tracing::warn!("JWKS key skipped: it has no kid");
            continue;
        };
        *kids.entry(kid.clone()).or_default() += 1;
        entries.push((kid, value));
    }
    let mut keys = KeySet::new();
    for (kid, value) in entries {
        let parsed = if kids[&kid] > 1 { Err("another key has the same kid") } else { parse_key(value) };
        match parsed {
            Ok(key) => {
                keys.insert(kid, Arc::new(key));
            }
            // A kid is public, but the document may hold anything: logged shortened.
            Err(why) => tracing::warn!(kid = %kid.chars().take(64).collect::<String>(), "JWKS key skipped: {why}"),
        }
    }
    if keys.is_empty() { Err(DocumentError::NoUsableKey) } else { Ok(keys) }
}

fn parse_key(value: serde_json::Value) -> Result<Key, &'static str> {
    let jwk: Jwk = serde_json::from_value(value).map_err(|_| "it is not a valid JWK")?;
    if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
        return Err("its use is not sig");
    }
    if jwk.common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
        return Err("its key_ops do not include verify");
    }
    let algorithm = allowed_algorithm(&jwk)?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "its key material is not valid base64url")?;
    check_material(&key, algorithm)?;
    Ok(Key { key, algorithm })
}

/// The one algorithm a JWK verifies.
///
/// Its `alg` when it has one and it fits the key: RS256/384/512 or
/// PS256/384/512 for RSA, ES256 for P-256, ES384 for P-384, EdDSA for
/// Ed25519. Without `alg`: RS256 for RSA (the common default; a provider that
/// signs otherwise must say so in `alg`), and the curve's algorithm for the
/// others. Symmetric (`oct`) keys and HS algorithms are never accepted.
pub fn allowed_algorithm(jwk: &Jwk) -> Result<Algorithm, &'static str> {
    let implied = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => return Err("symmetric keys are never accepted"),
        _ => return Err("its key type or curve is not supported"),
    };
    let Some(alg) = jwk.common.key_algorithm else { return Ok(implied) };
    let rsa = matches!(jwk.algorithm, AlgorithmParameters::RSA(_));
    let fits = match alg {
        KeyAlgorithm::RS256
        | KeyAlgorithm::RS384
        | KeyAlgorithm::RS512
        | KeyAlgorithm::PS256
        | KeyAlgorithm::PS384
        | KeyAlgorithm::PS512 => rsa,
        KeyAlgorithm::ES256 | KeyAlgorithm::ES384 | KeyAlgorithm::EdDSA => {
            Algorithm::try_from(alg).ok() == Some(implied)
        }
        _ => false,
    };
    if !fits {
        return Err("its alg does not fit its key type, or is not a supported signature algorithm");
    }
    Algorithm::try_from(alg).map_err(|_| "its alg is not supported")
}

/// Checks the sizes that verification would trip on later (and that
/// jsonwebtoken's EdDSA verifier slices without checking).
fn check_material(key: &DecodingKey, algorithm: Algorithm) -> Result<(), &'static str> {
    match (key.kind(), algorithm) {
        (DecodingKeyKind::RsaModulusExponent { n, e }, _) => {
            let n = strip_zeros(n);
            let bits = n.first().map_or(0, |first| n.len() * 8 - first.leading_zeros() as usize);
            if !(RSA_BITS.0..=RSA_BITS.1).contains(&bits) {
                return Err("its RSA modulus is not 2048 to 4096 bits long");
            }
            let e = strip_zeros(e);
            let exponent = (e.len() <= 8).then(|| e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)));
            if !exponent.is_some_and(|e| (3..(1 << 33)).contains(&e)) {
                return Err("its RSA exponent is out of range");
            }
            Ok(())
        }
        (DecodingKeyKind::SecretOrDer(point), Algorithm::ES256) if point.len() == 65 => Ok(()),
        (DecodingKeyKind::SecretOrDer(point), Algorithm::ES384) if point.len() == 97 => Ok(()),
        (DecodingKeyKind::SecretOrDer(x), Algorithm::EdDSA) if x.len() == 32 => Ok(()),
        _ => Err("its coordinates have the wrong length for its curve"),
    }
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    &bytes[zeros..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwk(value: serde_json::Value) -> Jwk {
        serde_json::from_value(value).unwrap()
    }

    /// An Ed25519 public key (RFC 8037, appendix A).
    const ED_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn each_key_type_allows_one_algorithm() {
        // Only the key type matters to the rule, not the material.
        let rsa = |alg: Option<&str>| {
            let mut v = json!({"kty": "RSA", "n": "AA", "e": "AQAB"});
            if let Some(alg) = alg {
                v["alg"] = json!(alg);
            }
            allowed_algorithm(&jwk(v))
        };
        assert_eq!(rsa(None), Ok(Algorithm::RS256));
        for (alg, expected) in [("RS384", Algorithm::RS384), ("RS512", Algorithm::RS512), ("PS256", Algorithm::PS256)] {
            assert_eq!(rsa(Some(alg)), Ok(expected));
        }
        for alg in ["HS256", "ES256", "EdDSA", "RSA-OAEP", "none", "XYZ"] {
            assert!(rsa(Some(alg)).is_err(), "{alg}");
        }
        let ec = |crv: &str, alg: Option<&str>| {
            let mut v = json!({"kty": "EC", "crv": crv, "x": "AA", "y": "AA"});
            if let Some(alg) = alg {
                v["alg"] = json!(alg);
            }
            allowed_algorithm(&jwk(v))
        };
        assert_eq!(ec("P-256", None), Ok(Algorithm::ES256));
        assert_eq!(ec("P-384", None), Ok(Algorithm::ES384));
        assert_eq!(ec("P-384", Some("ES384")), Ok(Algorithm::ES384));
        assert!(ec("P-256", Some("ES384")).is_err());
        assert!(ec("P-256", Some("RS256")).is_err());
        assert!(ec("P-521", None).is_err());
        assert!(ec("Ed25519", None).is_err());
        let okp = jwk(json!({"kty": "OKP", "crv": "Ed25519", "x": "AA"}));
        assert_eq!(allowed_algorithm(&okp), Ok(Algorithm::EdDSA));
        let oct = jwk(json!({"kty": "oct", "k": "c2VjcmV0", "alg": "HS256"}));
        assert!(allowed_algorithm(&oct).is_err());
    }

    #[test]
    fn unusable_keys_are_skipped_and_a_document_without_any_fails() {
        let doc = json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "kid": "short", "x": "AAAA"},
            {"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "crv": "P-256", "kid": "no-y", "x": "AA"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "x": ED_X},
            {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": ED_X},
            {"kty": "OKP", "crv": "Ed25519", "kid": "sign-only", "key_ops": ["sign"], "x": ED_X},
            "not an object",
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed", "x": ED_X},
            {"kty": "OKP", "crv": "Ed25519", "kid": "twice", "x": ED_X},
            {"kty": "RSA", "kid": "twice", "n": "AA", "e": "AQAB"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "both-good", "x": ED_X},
            {"kty": "OKP", "crv": "Ed25519", "kid": "both-good", "x": ED_X},
        ]});
        let keys = parse_document(doc.to_string().as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["ed"]);
        assert_eq!(keys["ed"].algorithm, Algorithm::EdDSA);
        let only_bad = json!({"keys": [{"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}]});
        assert!(matches!(parse_document(only_bad.to_string().as_bytes()), Err(DocumentError::NoUsableKey)));
        assert!(matches!(parse_document(b"<html>"), Err(DocumentError::NotJwks(_))));
        assert!(matches!(parse_document(b"{\"keys\": 5}"), Err(DocumentError::NotJwks(_))));
    }
}
