//! Keys from an identity provider's JWKS endpoint: chosen by `kid`,
//! refetched at once (rate-limited) for an unknown `kid`, kept when the
//! endpoint fails, and the node unready until the first fetch.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use common::app::{Answer, AppServer};
use common::{bearer, fixture, get, wait_metric, wait_until, Claims, Node, Sse, WAIT};
use hyper::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The DER bytes of a PEM fixture.
fn der(name: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(fixture(name)).expect("read fixture");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM base64")
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Key A: the Ed25519 fixture as an OKP JWK (the key is the last 32 bytes
/// of its SubjectPublicKeyInfo).
fn jwk_a() -> Value {
    let der = der("ed25519_public.pem");
    json!({"kty": "OKP", "crv": "Ed25519", "kid": "a", "x": b64url(&der[der.len() - 32..])})
}

/// Key B: the P-256 fixture as an EC JWK (the SPKI ends with 04 || x || y).
fn jwk_b() -> Value {
    let der = der("ec_public.pem");
    let point = &der[der.len() - 64..];
    json!({"kty": "EC", "crv": "P-256", "kid": "b",
           "x": b64url(&point[..32]), "y": b64url(&point[32..])})
}

/// A token for `sub` signed with a private key fixture, naming `kid`.
fn signed(sub: &str, alg: Algorithm, private: &str, kid: Option<&str>) -> String {
    let pem = std::fs::read(fixture(private)).expect("read fixture");
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_ec_pem(&pem),
    }
    .expect("private key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let claims = json!({"sub": sub, "exp": common::now() + 3600});
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

fn token_a() -> String {
    signed("alice", Algorithm::EdDSA, "ed25519_private.pem", Some("a"))
}

fn token_b() -> String {
    signed("bob", Algorithm::ES256, "ec_private.pem", Some("b"))
}

/// Whether `GET /events` with `token` opens a stream.
async fn accepted(node: &Node, token: &str) -> bool {
    let auth = bearer(token);
    match Sse::connect(&node.url("/events"), &[("authorization", &auth)]).await {
        Ok(mut sse) => {
            sse.wait_ready(WAIT).await;
            true
        }
        Err(reply) => {
            reply.assert_json_error(StatusCode::UNAUTHORIZED);
            false
        }
    }
}

/// A JWKS endpoint serving whatever `keys` holds (500 when `None`).
async fn jwks_server(keys: Arc<Mutex<Option<Vec<Value>>>>) -> AppServer {
    AppServer::start(move |_| match &*keys.lock().expect("keys") {
        Some(keys) => Answer::json(200, json!({ "keys": keys }).to_string()),
        None => Answer::json(500, "{}"),
    })
    .await
}

async fn ready(node: &Node) -> bool {
    get(&node.admin_url("/readyz")).await.status == StatusCode::OK
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_kid_refetches_the_jwks_at_once_but_at_most_every_ten_seconds() {
    let keys = Arc::new(Mutex::new(Some(vec![jwk_a()])));
    let server = jwks_server(keys.clone()).await;
    let node = Node::start_without_secret(&[
        "--jwt-jwks-url",
        &server.url("/.well-known/jwks.json"),
        "--jwt-jwks-refresh",
        "1h",
    ]);
    assert!(
        wait_until(WAIT, || ready(&node)).await,
        "ready once fetched"
    );
    assert!(accepted(&node, &token_a()).await, "kid a");
    assert!(
        !accepted(
            &node,
            &signed("alice", Algorithm::EdDSA, "ed25519_private.pem", None)
        )
        .await,
        "a JWKS key needs its kid"
    );
    assert!(
        !accepted(&node, &Claims::new("alice").sign()).await,
        "no HS secret here"
    );
    assert_eq!(server.hits(), 1, "fetched once at start");

    // The provider rotates to key B.
    *keys.lock().expect("keys") = Some(vec![jwk_b()]);
    // The start-up fetch was just now: B is refetched as soon as 10 s have
    // passed since it, and no request before that fetches again.
    let b = token_b();
    assert!(
        wait_until(Duration::from_secs(15), || accepted(&node, &b)).await,
        "kid b is fetched on demand"
    );
    assert_eq!(
        server.hits(),
        2,
        "one refetch, however many unknown-kid tokens came"
    );
    assert!(
        !accepted(&node, &token_a()).await,
        "key a is gone with the refresh"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_jwks_endpoint_keeps_the_last_keys_and_a_node_waits_for_the_first() {
    let keys = Arc::new(Mutex::new(None));
    let server = jwks_server(keys.clone()).await;
    let node = Node::start_without_secret(&[
        "--jwt-jwks-url",
        &server.url("/jwks"),
        "--jwt-jwks-refresh",
        "1s",
    ]);
    // The endpoint is failing: the node runs, but unready.
    wait_metric(
        &node,
        "herald_jwks_refreshes_total{result=\"error\"}",
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert!(!ready(&node).await, "unready before the first good fetch");

    *keys.lock().expect("keys") = Some(vec![jwk_a(), jwk_b()]);
    assert!(wait_until(WAIT, || ready(&node)).await, "ready after it");
    assert!(accepted(&node, &token_a()).await);

    // The endpoint fails again: the last good keys stay.
    *keys.lock().expect("keys") = None;
    let errors = node_errors(&node).await;
    wait_metric(
        &node,
        "herald_jwks_refreshes_total{result=\"error\"}",
        WAIT,
        |v| v > errors,
    )
    .await;
    assert!(accepted(&node, &token_b()).await, "kid b still verifies");
    assert!(ready(&node).await, "still ready");
}

async fn node_errors(node: &Node) -> f64 {
    common::metric(node, "herald_jwks_refreshes_total{result=\"error\"}").await
}
