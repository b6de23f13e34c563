//! Tokens: where they are found, how they are verified, what they allow.
//!
//! Verification pins the accepted algorithms to the configured key's family
//! (a shared secret accepts only HS*, an RSA key only RS*/PS*, and so on), so
//! `alg: none` and HS/RS confusion are rejected before any signature check.
//! Tokens are never logged.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::channel::any_pattern_allows;
use crate::config::KeyConfig;

/// Longest accepted `sub`, in bytes.
pub const MAX_SUB_LEN: usize = 256;

/// The claims Herald reads. Unknown claims are ignored; `nbf`, `iss` and
/// `aud` (a string or a list, per RFC 7519) are checked by jsonwebtoken's
/// validation from the raw token, so they need no field here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id; connections are grouped under `user:<sub>`.
    pub sub: String,
    /// Expiry, seconds since the epoch (required).
    pub exp: u64,
    /// Topic patterns the bearer may subscribe to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topics: Vec<String>,
    /// Channel patterns the bearer may publish to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
}

impl Claims {
    /// Whether the token allows subscribing to topic `name`.
    pub fn allows_topic(&self, name: &str) -> bool {
        any_pattern_allows(&self.topics, name)
    }

    /// Whether the token allows publishing to the full channel name.
    pub fn allows_publish(&self, channel: &str) -> bool {
        any_pattern_allows(&self.publish, channel)
    }
}

/// Why a request was not authenticated (always a 401).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in any accepted place.
    #[error("missing token")]
    Missing,
    /// Expired (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// Bad signature, wrong algorithm, wrong iss/aud, not yet valid, or malformed.
    #[error("invalid token: {0}")]
    Invalid(&'static str),
}

/// Why the key configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The PEM file could not be read.
    #[error("cannot read --jwt-public-key {path}")]
    Read {
        /// The configured path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not an RSA, EC (P-256/P-384) or Ed25519 public key in PEM form.
    #[error("--jwt-public-key {0} is not an RSA, EC or Ed25519 public key in PEM form")]
    Pem(String),
    /// Both a secret and a public key were given.
    #[error("give either --jwt-secret or --jwt-public-key, not both")]
    Both,
    /// Neither was given where one is needed.
    #[error("no key configured: set --jwt-secret (or HERALD_JWT_SECRET)")]
    Missing,
    /// An empty secret.
    #[error("--jwt-secret must not be empty")]
    EmptySecret,
}

/// Most tokens remembered as verified.
const VERIFIED_CAPACITY: usize = 1024;
/// Longest token remembered (longer ones are verified every time).
const VERIFIED_MAX_TOKEN: usize = 4096;

/// Verifies tokens with the configured key.
///
/// A token that verified is remembered by its exact text, so an app service
/// that publishes thousands of times with one token, or a browser that
/// reconnects, pays for the signature check once. Only the expiry depends
/// on the time, and it is checked again on every use; everything else a
/// verification looks at (signature, algorithm, `iss`, `aud`, `sub`, an
/// `nbf` already passed) is fixed by the text. Failures are never
/// remembered, so only validly signed tokens take room; when the cache is
/// full it starts over.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    verified: Mutex<HashMap<Box<str>, Arc<Claims>>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier; `secret` overrides the config (for the generated
    /// demo secret). Fails on unreadable or unrecognised keys.
    pub fn new(keys: &KeyConfig, secret: Option<&str>) -> Result<Verifier, KeyError> {
        let secret = secret.or(keys.jwt_secret.as_deref());
        let (key, algorithms) = match (secret, &keys.jwt_public_key) {
            (Some(_), Some(_)) => return Err(KeyError::Both),
            (None, None) => return Err(KeyError::Missing),
            (Some(""), None) => return Err(KeyError::EmptySecret),
            (Some(secret), None) => (
                DecodingKey::from_secret(secret.as_bytes()),
                vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            ),
            (None, Some(path)) => load_public_key(path)?,
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = keys.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &keys.jwt_issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &keys.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        // A configured iss/aud must be present, not merely right when present.
        validation.set_required_spec_claims(&required);
        Ok(Verifier {
            key,
            validation,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Verifies a token and checks its `sub`.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// [`Verifier::verify`] with the time a remembered token's expiry is
    /// checked against (seconds since the epoch).
    fn verify_at(&self, token: &str, now: u64) -> Result<Arc<Claims>, AuthError> {
        let remembered = self.remembered().get(token).cloned();
        if let Some(claims) = remembered {
            // As jsonwebtoken does: expired once `exp` is over `leeway` ago.
            if claims.exp.saturating_add(self.validation.leeway) < now {
                return Err(AuthError::Expired);
            }
            return Ok(claims);
        }
        let claims = Arc::new(self.verify_signed(token)?);
        if token.len() <= VERIFIED_MAX_TOKEN {
            let mut verified = self.remembered();
            if verified.len() >= VERIFIED_CAPACITY {
                verified.clear();
            }
            verified.insert(token.into(), claims.clone());
        }
        Ok(claims)
    }

    fn remembered(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<Claims>>> {
        crate::sync::lock(&self.verified)
    }

    /// The full check: signature, algorithm, registered claims, `sub`.
    fn verify_signed(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::Invalid("not valid yet (nbf)"),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature"),
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    AuthError::Invalid("algorithm not allowed")
                }
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer"),
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience"),
                ErrorKind::MissingRequiredClaim(_) => AuthError::Invalid("missing claim"),
                _ => AuthError::Invalid("malformed"),
            },
        )?;
        let sub = &data.claims.sub;
        if sub.is_empty() || sub.len() > MAX_SUB_LEN || sub.chars().any(char::is_control) {
            return Err(AuthError::Invalid(
                "sub must be 1-256 bytes without control characters",
            ));
        }
        Ok(data.claims)
    }
}

fn load_public_key(path: &Path) -> Result<(DecodingKey, Vec<Algorithm>), KeyError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        use Algorithm::*;
        return Ok((key, vec![RS256, RS384, RS512, PS256, PS384, PS512]));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, vec![Algorithm::ES256, Algorithm::ES384]));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, vec![Algorithm::EdDSA]));
    }
    Err(KeyError::Pem(shown))
}

/// Where a request's token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer`.
    Bearer,
    /// The auth cookie.
    Cookie,
    /// `?access_token=`.
    Query,
}

/// Finds the token: `Authorization: Bearer`, then the cookie, then (only if
/// `query_token` is given, i.e. allowed) the query parameter.
pub fn find_token<'a>(
    headers: &'a HeaderMap,
    cookie_name: &str,
    query_token: Option<&'a str>,
) -> Option<(&'a str, TokenSource)> {
    if let Some(token) = bearer_token(headers) {
        return Some((token, TokenSource::Bearer));
    }
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == cookie_name)
        .map(|(_, value)| value.trim().trim_matches('"'))
        .filter(|t| !t.is_empty());
    if let Some(token) = cookie {
        return Some((token, TokenSource::Cookie));
    }
    query_token
        .filter(|t| !t.is_empty())
        .map(|t| (t, TokenSource::Query))
}

/// The token of an `Authorization: Bearer` header.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .filter(|t| !t.is_empty())
}

/// Seconds since the epoch (0 for a clock before it).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Mints an HS256 token (for `herald token`, the demo token and tests).
pub fn mint(
    secret: &str,
    sub: &str,
    topics: Vec<String>,
    publish: Vec<String>,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = unix_now();
    let claims = Claims {
        sub: sub.to_owned(),
        exp: now + ttl.as_secs().max(1),
        topics,
        publish,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn keys(secret: &str) -> KeyConfig {
        KeyConfig {
            jwt_secret: Some(secret.into()),
            jwt_leeway: Duration::from_secs(0),
            ..KeyConfig::default()
        }
    }

    #[test]
    fn minted_tokens_verify_and_carry_claims() {
        let verifier = Verifier::new(&keys("s3cret"), None).expect("key");
        let token = mint(
            "s3cret",
            "alice",
            vec!["orders.*".into()],
            vec![],
            Duration::from_secs(60),
        )
        .expect("mint");
        let claims = verifier.verify(&token).expect("valid");
        assert_eq!(claims.sub, "alice");
        assert!(claims.allows_topic("orders.7"));
        assert!(!claims.allows_topic("news"));
        assert!(!claims.allows_publish("user:alice"));
    }

    #[test]
    fn wrong_secret_and_garbage_are_rejected() {
        let verifier = Verifier::new(&keys("right"), None).expect("key");
        let token = mint("wrong", "alice", vec![], vec![], Duration::from_secs(60)).expect("mint");
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::Invalid("bad signature"))
        );
        assert!(verifier.verify("not.a.token").is_err());
        assert!(verifier.verify("").is_err());
    }

    #[test]
    fn remembered_tokens_still_expire_and_others_still_fail() {
        let verifier = Verifier::new(&keys("s3cret"), None).expect("key");
        let token = mint("s3cret", "alice", vec![], vec![], Duration::from_secs(60)).expect("mint");
        let first = verifier.verify(&token).expect("valid");
        let again = verifier.verify(&token).expect("remembered");
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second check is served from memory"
        );
        // The remembered token's expiry is checked against the clock.
        assert_eq!(
            verifier.verify_at(&token, first.exp + 1),
            Err(AuthError::Expired)
        );
        // A token differing in its signature alone is checked in full.
        let (body, signature) = token.rsplit_once('.').expect("three parts");
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        let forged = format!("{body}.{flipped}{}", &signature[1..]);
        assert_eq!(
            verifier.verify(&forged),
            Err(AuthError::Invalid("bad signature"))
        );
    }

    #[test]
    fn the_memory_of_verified_tokens_is_bounded() {
        let verifier = Verifier::new(&keys("s3cret"), None).expect("key");
        for i in 0..VERIFIED_CAPACITY + 10 {
            let token = mint(
                "s3cret",
                &format!("u{i}"),
                vec![],
                vec![],
                Duration::from_secs(60),
            )
            .expect("mint");
            verifier.verify(&token).expect("valid");
        }
        assert!(verifier.remembered().len() <= VERIFIED_CAPACITY);
        let long = mint(
            "s3cret",
            &"x".repeat(MAX_SUB_LEN),
            vec!["t".repeat(4096)],
            vec![],
            Duration::from_secs(60),
        )
        .expect("mint");
        verifier.remembered().clear();
        verifier.verify(&long).expect("valid");
        assert!(
            verifier.remembered().is_empty(),
            "tokens over {VERIFIED_MAX_TOKEN} bytes are not kept"
        );
    }

    #[test]
    fn token_sources_in_order() {
        let mut headers = HeaderMap::new();
        assert_eq!(find_token(&headers, "herald_token", None), None);
        assert_eq!(
            find_token(&headers, "herald_token", Some("q")),
            Some(("q", TokenSource::Query))
        );
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; herald_token=c"),
        );
        assert_eq!(
            find_token(&headers, "herald_token", Some("q")),
            Some(("c", TokenSource::Cookie))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        assert_eq!(
            find_token(&headers, "herald_token", None),
            Some(("t", TokenSource::Bearer))
        );
    }
}
