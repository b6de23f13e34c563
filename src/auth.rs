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

use crate::channel::{any_pattern_allows, Channel};
use crate::config::KeyConfig;

/// Longest accepted `sub`, in bytes.
pub(crate) const MAX_SUB_LEN: usize = 256;

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
    /// Issued at, seconds since the epoch: a revocation of the user refuses
    /// tokens issued before it (a token without `iat` counts as issued at 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// May use the server API (`/disconnect`, `/presence`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub control: bool,
}

impl Claims {
    /// Whether the token allows subscribing to topic `name`.
    pub(crate) fn allows_topic(&self, name: &str) -> bool {
        any_pattern_allows(&self.topics, name)
    }

    /// Whether the token allows publishing to the full channel name.
    pub(crate) fn allows_publish(&self, channel: &str) -> bool {
        any_pattern_allows(&self.publish, channel)
    }

    /// Whether a subscriber with this token may read `channel`: its own
    /// user channel, `broadcast`, or a topic it allows (the `/events` rule).
    pub(crate) fn allows_reading(&self, channel: &Channel) -> bool {
        let name = channel.as_str();
        if let Some(user) = name.strip_prefix("user:") {
            return user == self.sub;
        }
        match name.strip_prefix("topic:") {
            Some(topic) => self.allows_topic(topic),
            None => name == "broadcast",
        }
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
    /// The application refused the session cookie (`--auth-url` said 401).
    #[error("session not accepted")]
    Session,
    /// Names a `kid` no configured or fetched key has.
    #[error("invalid token: unknown key id")]
    UnknownKid,
    /// Issued before its user was logged out everywhere (`POST /disconnect`
    /// with `revoke`).
    #[error("token revoked")]
    Revoked,
}

/// Why the key configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KeyError {
    /// The PEM file could not be read.
    #[error("cannot read --jwt-public-key {path}")]
    Read {
        /// The configured path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Not RSA, EC (P-256/P-384) or Ed25519 public keys in PEM form.
    #[error("--jwt-public-key {0} is not an RSA, EC or Ed25519 public key in PEM form")]
    Pem(String),
    /// Neither was given where one is needed.
    #[error("no key configured: set --jwt-secret (or HERALD_JWT_SECRET)")]
    Missing,
    /// An empty secret.
    #[error("--jwt-secret must not be empty")]
    EmptySecret,
    /// An unusable `--jwt-jwks-url`.
    #[error("--jwt-jwks-url: {0}")]
    Jwks(String),
}

/// Most tokens remembered as verified.
const VERIFIED_CAPACITY: usize = 1024;
/// Longest token remembered (longer ones are verified every time).
const VERIFIED_MAX_TOKEN: usize = 4096;
/// Most keys one PEM file may hold.
const MAX_KEYS_PER_PEM: usize = 64;

/// One verification key, pinned to its algorithm family.
struct Key {
    /// The `kid` that selects it; static keys have none.
    kid: Option<String>,
    key: DecodingKey,
    /// The shared validation rules with `algorithms` narrowed to this key's
    /// family, so a token is only ever checked with an algorithm of the
    /// key's own kind (no HS/RS confusion).
    validation: Validation,
}

/// Verifies tokens with the configured keys.
///
/// Several keys may be configured (rotation): a token whose `kid` names a
/// key is checked with that key only; any other token is checked with each
/// key of its `alg`'s family in turn until one signature matches.
///
/// A token that verified is remembered by its exact text, so an app service
/// that publishes thousands of times with one token, or a browser that
/// reconnects, pays for the signature check once. Only the expiry depends
/// on the time, and it is checked again on every use; everything else a
/// verification looks at (signature, algorithm, `iss`, `aud`, `sub`, an
/// `nbf` already passed) is fixed by the text. Failures are never
/// remembered, so only validly signed tokens take room; when the cache is
/// full it starts over.
pub(crate) struct Verifier {
    keys: Vec<Key>,
    /// Keys from `--jwt-jwks-url`, when configured.
    jwks: Option<Jwks>,
    /// The rules every key shares, for keys that arrive later (JWKS).
    base: Validation,
    /// Clock skew allowed for `exp` (seconds), for remembered tokens.
    leeway: u64,
    verified: Mutex<HashMap<Box<str>, Arc<Claims>>>,
}

/// Most keys taken from one JWKS answer.
const MAX_JWKS_KEYS: usize = 64;
/// Largest JWKS answer read.
const MAX_JWKS_BODY: usize = 256 * 1024;
/// One JWKS fetch may take this long.
const JWKS_TIMEOUT: Duration = Duration::from_secs(5);
/// An unknown `kid` refetches the JWKS at most this often.
pub(crate) const JWKS_REFETCH_MIN: Duration = Duration::from_secs(10);
/// Until the first fetch succeeded, it is retried this often.
const JWKS_RETRY: Duration = Duration::from_secs(1);

/// The JWKS endpoint and the keys last fetched from it.
struct Jwks {
    fetcher: crate::fetch::Fetcher,
    /// `--jwt-jwks-refresh`.
    refresh: Duration,
    /// Replaced whole by each successful fetch; a failed one keeps them.
    keys: std::sync::RwLock<Arc<Vec<Key>>>,
    /// Whether a fetch ever succeeded (the node is unready until then).
    fetched: std::sync::atomic::AtomicBool,
    /// When the last fetch started; also serialises fetches.
    last_attempt: tokio::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// The validation rules every key shares (algorithms are set per key).
fn base_validation(keys: &KeyConfig) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
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
    validation
}

impl Verifier {
    /// Builds a verifier from every configured secret and PEM key; `secret`
    /// replaces the configured secrets (for the generated demo secret).
    /// Fails on unreadable or unrecognised keys, or when there is none.
    pub(crate) fn new(keys: &KeyConfig, secret: Option<&str>) -> Result<Verifier, KeyError> {
        Self::build(keys, secret, None)
    }

    /// Like [`Verifier::new`], also verifying with the keys of a JWKS
    /// endpoint (then static keys are optional). Run
    /// [`Verifier::keep_jwks_fresh`] to fetch them.
    pub(crate) fn with_jwks(
        keys: &KeyConfig,
        url: &str,
        refresh: Duration,
    ) -> Result<Verifier, KeyError> {
        let fetcher = crate::fetch::Fetcher::new(url).map_err(|e| KeyError::Jwks(e.to_string()))?;
        Self::build(
            keys,
            None,
            Some(Jwks {
                fetcher,
                refresh,
                keys: std::sync::RwLock::new(Arc::new(Vec::new())),
                fetched: std::sync::atomic::AtomicBool::new(false),
                last_attempt: tokio::sync::Mutex::new(None),
            }),
        )
    }

    fn build(
        keys: &KeyConfig,
        secret: Option<&str>,
        jwks: Option<Jwks>,
    ) -> Result<Verifier, KeyError> {
        let base = base_validation(keys);
        let pinned = |kid: Option<String>, key: DecodingKey, algorithms: Vec<Algorithm>| {
            let mut validation = base.clone();
            validation.algorithms = algorithms;
            Key {
                kid,
                key,
                validation,
            }
        };
        let secrets: Vec<&str> = match secret {
            Some(secret) => vec![secret],
            None => keys.jwt_secret.iter().map(String::as_str).collect(),
        };
        let mut all = Vec::new();
        for secret in secrets {
            if secret.is_empty() {
                return Err(KeyError::EmptySecret);
            }
            all.push(pinned(
                None,
                DecodingKey::from_secret(secret.as_bytes()),
                vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            ));
        }
        for path in &keys.jwt_public_key {
            for (key, algorithms) in load_public_keys(path)? {
                all.push(pinned(None, key, algorithms));
            }
        }
        if all.is_empty() && jwks.is_none() {
            return Err(KeyError::Missing);
        }
        Ok(Verifier {
            keys: all,
            jwks,
            leeway: base.leeway,
            base,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// False until the first JWKS fetch succeeded (always true without one).
    pub(crate) fn is_ready(&self) -> bool {
        self.jwks
            .as_ref()
            .is_none_or(|j| j.fetched.load(std::sync::atomic::Ordering::Acquire))
    }

    /// Fetches the JWKS now; on success its keys replace the previous ones
    /// (and tokens remembered as verified are forgotten, so a removed key's
    /// tokens stop at once). A failure keeps the last good keys.
    async fn fetch_jwks(&self, jwks: &Jwks) -> Result<usize, String> {
        let fetched = jwks
            .fetcher
            .get(&[], JWKS_TIMEOUT, MAX_JWKS_BODY)
            .await
            .map_err(|e| e.to_string())?;
        if !fetched.status.is_success() {
            return Err(format!("status {}", fetched.status));
        }
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_slice(&fetched.body).map_err(|e| format!("not a JWKS: {e}"))?;
        let keys: Vec<Key> = set
            .keys
            .iter()
            .take(MAX_JWKS_KEYS)
            .filter_map(|jwk| self.jwk_key(jwk))
            .collect();
        let count = keys.len();
        *crate::sync::write(&jwks.keys) = Arc::new(keys);
        jwks.fetched
            .store(true, std::sync::atomic::Ordering::Release);
        self.remembered().clear();
        Ok(count)
    }

    /// One JWK as a key pinned to its type's algorithms; `None` (skipped)
    /// without a `kid`, for a symmetric key, or if unusable.
    fn jwk_key(&self, jwk: &jsonwebtoken::jwk::Jwk) -> Option<Key> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
        use Algorithm::*;
        let kid = jwk.common.key_id.clone()?;
        let algorithms = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![ES256],
                EllipticCurve::P384 => vec![ES384],
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
            // A shared secret has no business in a public key set.
            AlgorithmParameters::OctetKey(_) => return None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        let mut validation = self.base.clone();
        validation.algorithms = algorithms;
        Some(Key {
            kid: Some(kid),
            key,
            validation,
        })
    }

    /// Fetches the JWKS until it first succeeds, then every
    /// `--jwt-jwks-refresh`, logging and counting every outcome. Returns
    /// at once without a JWKS; otherwise runs until the process ends.
    pub(crate) async fn keep_jwks_fresh(self: Arc<Self>) {
        let Some(jwks) = &self.jwks else {
            return;
        };
        loop {
            *jwks.last_attempt.lock().await = Some(std::time::Instant::now());
            let ok = self.refresh_logged(jwks).await;
            let wait = if ok || self.is_ready() {
                jwks.refresh
            } else {
                JWKS_RETRY
            };
            tokio::time::sleep(wait).await;
        }
    }

    async fn refresh_logged(&self, jwks: &Jwks) -> bool {
        let m = crate::metrics::get();
        match self.fetch_jwks(jwks).await {
            Ok(keys) => {
                m.jwks_refresh(true);
                tracing::debug!(keys, "JWKS fetched");
                true
            }
            Err(error) => {
                m.jwks_refresh(false);
                tracing::warn!(%error, "JWKS fetch failed; keeping the last good keys");
                false
            }
        }
    }

    /// For a token naming a `kid` no key has: refetches the JWKS unless a
    /// fetch started less than [`JWKS_REFETCH_MIN`] ago. Returns whether
    /// it fetched new keys (then verifying again is worth it).
    pub(crate) async fn refetch_for_unknown_kid(&self) -> bool {
        let Some(jwks) = &self.jwks else {
            return false;
        };
        let mut last = jwks.last_attempt.lock().await;
        if last.is_some_and(|at| at.elapsed() < JWKS_REFETCH_MIN) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        self.refresh_logged(jwks).await
    }

    /// Verifies a token and checks its `sub`.
    pub(crate) fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        self.verify_at(token, unix_now())
    }

    /// [`Verifier::verify`] with the time a remembered token's expiry is
    /// checked against (seconds since the epoch).
    fn verify_at(&self, token: &str, now: u64) -> Result<Arc<Claims>, AuthError> {
        let remembered = self.remembered().get(token).cloned();
        if let Some(claims) = remembered {
            // As jsonwebtoken does: expired once `exp` is over `leeway` ago.
            if claims.exp.saturating_add(self.leeway) < now {
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

    /// The full check: key choice, signature, algorithm, registered claims,
    /// `sub`.
    fn verify_signed(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName => {
                AuthError::Invalid("algorithm not allowed")
            }
            _ => AuthError::Invalid("malformed"),
        })?;
        let fetched: Arc<Vec<Key>> = match &self.jwks {
            Some(jwks) => crate::sync::read(&jwks.keys).clone(),
            None => Arc::new(Vec::new()),
        };
        let named: Vec<&Key> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .chain(fetched.iter())
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => Vec::new(),
        };
        // A JWKS key needs its `kid`; static keys are tried by family.
        let unknown_kid = header.kid.is_some() && named.is_empty() && self.jwks.is_some();
        let candidates: Vec<&Key> = if named.is_empty() {
            self.keys
                .iter()
                .filter(|k| k.validation.algorithms.contains(&header.alg))
                .collect()
        } else {
            named
        };
        let mut failure = AuthError::Invalid("algorithm not allowed");
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation) {
                Ok(data) => return check_sub(data.claims),
                // Another key of the family may have signed it.
                Err(e) if *e.kind() == jsonwebtoken::errors::ErrorKind::InvalidSignature => {
                    failure = AuthError::Invalid("bad signature");
                }
                Err(e) => return Err(decode_error(&e)),
            }
        }
        Err(if unknown_kid {
            AuthError::UnknownKid
        } else {
            failure
        })
    }
}

/// What a failed decode means to the client.
fn decode_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
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
    }
}

/// Checks the `sub` DESIGN requires: 1-256 bytes, no control characters.
fn check_sub(claims: Claims) -> Result<Claims, AuthError> {
    let sub = &claims.sub;
    if sub.is_empty() || sub.len() > MAX_SUB_LEN || sub.chars().any(char::is_control) {
        return Err(AuthError::Invalid(
            "sub must be 1-256 bytes without control characters",
        ));
    }
    Ok(claims)
}

/// Every public key in a PEM file (one or more `BEGIN` blocks), each with
/// the algorithms of its kind.
fn load_public_keys(path: &Path) -> Result<Vec<(DecodingKey, Vec<Algorithm>)>, KeyError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let mut keys = Vec::new();
    for block in text.split("-----BEGIN ").skip(1) {
        if keys.len() == MAX_KEYS_PER_PEM {
            return Err(KeyError::Pem(format!(
                "{shown} (over {MAX_KEYS_PER_PEM} keys)"
            )));
        }
        let pem = format!("-----BEGIN {block}");
        keys.push(parse_public_key(pem.as_bytes()).ok_or_else(|| KeyError::Pem(shown.clone()))?);
    }
    if keys.is_empty() {
        return Err(KeyError::Pem(shown));
    }
    Ok(keys)
}

/// One PEM public key and the algorithms of its kind.
fn parse_public_key(pem: &[u8]) -> Option<(DecodingKey, Vec<Algorithm>)> {
    use Algorithm::*;
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Some((key, vec![RS256, RS384, RS512, PS256, PS384, PS512]));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Some((key, vec![ES256, ES384]));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Some((key, vec![EdDSA]));
    }
    None
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
pub(crate) fn unix_now() -> u64 {
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
    let claims = Claims::issue(sub, ttl);
    sign(
        secret,
        &Claims {
            topics,
            publish,
            ..claims
        },
        None,
    )
}

impl Claims {
    /// Claims for `sub` issued now, expiring after `ttl` (at least 1 s),
    /// with no rights yet.
    pub fn issue(sub: &str, ttl: Duration) -> Claims {
        let now = unix_now();
        Claims {
            sub: sub.to_owned(),
            exp: now + ttl.as_secs().max(1),
            topics: Vec::new(),
            publish: Vec::new(),
            iat: Some(now),
            control: false,
        }
    }
}

/// Signs `claims` with an HS256 secret, naming `kid` in the header if given.
pub fn sign(
    secret: &str,
    claims: &Claims,
    kid: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn keys(secret: &str) -> KeyConfig {
        KeyConfig {
            jwt_secret: vec![secret.into()],
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
