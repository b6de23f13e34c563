//! Who may open a stream: JWT validation, algorithm pinning, and where the
//! token may come from (bearer, cookie, query).

mod common;

use common::{bearer, fixture, metric, token, Claims, Node, Reply, Sse, WAIT};
use hyper::StatusCode;
use jsonwebtoken::Algorithm;
use serde_json::json;

/// `GET /events` with `headers`.
async fn events(node: &Node, path: &str, headers: &[(&str, &str)]) -> Result<Sse, Reply> {
    Sse::connect(&node.url(path), headers).await
}

/// `GET /events` with a bearer token.
async fn events_with(node: &Node, token: &str) -> Result<Sse, Reply> {
    let auth = bearer(token);
    events(node, "/events", &[("authorization", &auth)]).await
}

/// The token opens a stream; returns the user `herald.ready` names.
async fn assert_accepted(node: &Node, token: &str, why: &str) -> String {
    let mut sse = events_with(node, token)
        .await
        .unwrap_or_else(|r| panic!("{why}: refused with {} {}", r.status, r.text()));
    sse.wait_ready(WAIT).await;
    sse.ready().json()["user"]
        .as_str()
        .unwrap_or_else(|| panic!("{why}: herald.ready has no user: {:?}", sse.ready()))
        .to_string()
}

/// The token gets a 401 with a JSON error and no stream.
async fn assert_unauthorized(node: &Node, token: &str, why: &str) {
    let reply = events_with(node, token)
        .await
        .expect_err(&format!("{why}: must be refused, got a stream"));
    assert_eq!(
        reply.status,
        StatusCode::UNAUTHORIZED,
        "{why}: {}",
        reply.text()
    );
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
}

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("read key fixture")
}

fn key_flag(name: &str) -> String {
    fixture(name).to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_is_a_401_json_error_not_a_stream() {
    let node = Node::start(&[]);
    let reply = events(&node, "/events", &[])
        .await
        .expect_err("no token must not open a stream");
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
    assert_ne!(
        reply.header("content-type"),
        Some("text/event-stream"),
        "a refusal is not a stream"
    );
    assert!(metric(&node, "herald_connections_rejected_total{reason=\"auth\"}").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tokens_are_401() {
    let node = Node::start(&[]);
    let none_header = json!({"alg": "none", "typ": "JWT"});
    let cases = [
        ("garbage".to_string(), "not a JWT"),
        (
            Claims::new("alice").sign_hmac(Algorithm::HS256, b"some other secret"),
            "bad signature",
        ),
        (Claims::new("alice").exp_in(-3600).sign(), "expired"),
        (
            Claims::new("alice").nbf_in(3600).sign(),
            "nbf in the future",
        ),
        (Claims::new("alice").without("exp").sign(), "no exp"),
        (Claims::new("alice").without("sub").sign(), "no sub"),
        (Claims::new("").sign(), "empty sub"),
        (Claims::new(&"a".repeat(257)).sign(), "sub over 256 bytes"),
        (Claims::new("ali\u{7}ce").sign(), "control character in sub"),
        (Claims::new("alice").forge(&none_header, b""), "alg none"),
        (
            Claims::new("alice").forge(&json!({"alg": "HS256", "typ": "JWT"}), b""),
            "HS256 without a signature",
        ),
    ];
    for (token, why) in &cases {
        assert_unauthorized(&node, token, why).await;
    }
    // The same node takes a good token: the refusals above were about the tokens.
    assert_eq!(
        assert_accepted(&node, &token("alice"), "valid token").await,
        "alice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leeway_tolerates_small_clock_skew_only() {
    let lenient = Node::start(&[]); // default --jwt-leeway 30s
    let strict = Node::start(&["--jwt-leeway", "0s"]);
    let just_expired = Claims::new("alice").exp_in(-10).sign();
    let not_yet = Claims::new("alice").nbf_in(10).sign();
    events_with(&lenient, &just_expired)
        .await
        .expect("exp 10 s ago is within the default 30 s leeway");
    events_with(&lenient, &not_yet)
        .await
        .expect("nbf in 10 s is within the default 30 s leeway");
    assert_unauthorized(&strict, &just_expired, "expired with leeway 0s").await;
    assert_unauthorized(&strict, &not_yet, "nbf in the future with leeway 0s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_and_audience_are_enforced_when_configured() {
    let node = Node::start(&[
        "--jwt-issuer",
        "https://auth.example",
        "--jwt-audience",
        "herald",
    ]);
    let good = Claims::new("alice")
        .iss("https://auth.example")
        .aud("herald");
    assert_accepted(&node, &good.sign(), "right iss and aud").await;
    assert_accepted(
        &node,
        &good.clone().set("aud", json!(["other", "herald"])).sign(),
        "aud list containing herald",
    )
    .await;
    let bad = [
        (good.clone().without("iss"), "no iss"),
        (good.clone().iss("https://evil.example"), "wrong iss"),
        (good.clone().without("aud"), "no aud"),
        (good.clone().aud("someone-else"), "wrong aud"),
    ];
    for (claims, why) in &bad {
        assert_unauthorized(&node, &claims.sign(), why).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_key_accepts_rsa_tokens_and_rejects_hs_confusion() {
    let node = Node::start_without_secret(&["--jwt-public-key", &key_flag("rsa_public.pem")]);
    let alice = Claims::new("alice");
    for alg in [Algorithm::RS256, Algorithm::RS512, Algorithm::PS256] {
        let token = alice.sign_pem(alg, "rsa_private.pem");
        let user = assert_accepted(&node, &token, &format!("{alg:?} with the RSA key")).await;
        assert_eq!(user, "alice");
    }
    // The classic confusion attack: HMAC keyed with the public key the
    // attacker can read.
    let public_pem = pem("rsa_public.pem");
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let forged = alice.sign_hmac(alg, &public_pem);
        assert_unauthorized(
            &node,
            &forged,
            &format!("{alg:?} keyed with the RSA public key"),
        )
        .await;
    }
    assert_unauthorized(&node, &alice.sign(), "HS256 with the test secret").await;
    assert_unauthorized(
        &node,
        &alice.forge(&json!({"alg": "none", "typ": "JWT"}), b""),
        "alg none",
    )
    .await;
    assert_unauthorized(
        &node,
        &alice
            .clone()
            .exp_in(-3600)
            .sign_pem(Algorithm::RS256, "rsa_private.pem"),
        "expired RS256",
    )
    .await;
    assert_unauthorized(
        &node,
        &alice.sign_pem(Algorithm::ES256, "ec_private.pem"),
        "ES256 on an RSA node",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_and_ed25519_keys_are_pinned_to_their_algorithm() {
    let ec = Node::start_without_secret(&["--jwt-public-key", &key_flag("ec_public.pem")]);
    let ed = Node::start_without_secret(&["--jwt-public-key", &key_flag("ed25519_public.pem")]);
    let alice = Claims::new("alice");

    assert_accepted(
        &ec,
        &alice.sign_pem(Algorithm::ES256, "ec_private.pem"),
        "ES256",
    )
    .await;
    assert_unauthorized(
        &ec,
        &alice.sign_pem(Algorithm::RS256, "rsa_private.pem"),
        "RS256 on an EC node",
    )
    .await;
    assert_unauthorized(
        &ec,
        &alice.sign_hmac(Algorithm::HS256, &pem("ec_public.pem")),
        "HS256 keyed with the EC public key",
    )
    .await;

    assert_accepted(
        &ed,
        &alice.sign_pem(Algorithm::EdDSA, "ed25519_private.pem"),
        "EdDSA",
    )
    .await;
    assert_unauthorized(
        &ed,
        &alice.sign_pem(Algorithm::ES256, "ec_private.pem"),
        "ES256 on an Ed25519 node",
    )
    .await;
    assert_unauthorized(
        &ed,
        &alice.sign_hmac(Algorithm::HS256, &pem("ed25519_public.pem")),
        "HS256 keyed with the Ed25519 public key",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_bearer_cookie_or_opt_in_query() {
    let node = Node::start(&[]);
    let alice = token("alice");
    let bob = token("bob");

    let cookie = format!("theme=dark; herald_token={alice}; lang=en");
    let mut sse = events(&node, "/events", &[("cookie", &cookie)])
        .await
        .expect("the herald_token cookie authenticates");
    sse.wait_ready(WAIT).await;
    assert_eq!(sse.ready().json()["user"], "alice");

    // Bearer comes first when both are present.
    let auth = bearer(&alice);
    let bob_cookie = format!("herald_token={bob}");
    let mut sse = events(
        &node,
        "/events",
        &[("authorization", &auth), ("cookie", &bob_cookie)],
    )
    .await
    .expect("bearer plus cookie");
    sse.wait_ready(WAIT).await;
    assert_eq!(
        sse.ready().json()["user"],
        "alice",
        "bearer wins over cookie"
    );

    // Query tokens leak into logs: refused unless the operator opts in.
    let reply = events(&node, &format!("/events?access_token={alice}"), &[])
        .await
        .expect_err("?access_token= without --allow-query-token");
    reply.assert_json_error(StatusCode::UNAUTHORIZED);

    let opted_in = Node::start(&["--allow-query-token", "--cookie-name", "sess"]);
    let mut sse = events(&opted_in, &format!("/events?access_token={alice}"), &[])
        .await
        .expect("?access_token= with --allow-query-token");
    sse.wait_ready(WAIT).await;
    assert_eq!(sse.ready().json()["user"], "alice");

    let sess = format!("sess={alice}");
    events(&opted_in, "/events", &[("cookie", &sess)])
        .await
        .expect("--cookie-name sess reads the sess cookie");
    let default_cookie = format!("herald_token={alice}");
    let reply = events(&opted_in, "/events", &[("cookie", &default_cookie)])
        .await
        .expect_err("with --cookie-name sess, herald_token is just another cookie");
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_serve_prints_a_working_demo_token() {
    let node = Node::start_without_secret(&[]);
    let demo = node
        .banner()
        .iter()
        .find_map(|l| l.strip_prefix("demo token: "))
        .unwrap_or_else(|| panic!("no demo token line in {:?}", node.banner()))
        .trim()
        .to_string();
    let page = node
        .banner()
        .iter()
        .find_map(|l| l.strip_prefix("demo page: "))
        .unwrap_or_else(|| panic!("no demo page line in {:?}", node.banner()));
    assert!(
        page.starts_with(node.public()) && page.ends_with(&format!("#token={demo}")),
        "demo page {page:?} should be {}/#token=<demo token>",
        node.public()
    );

    let mut sse = Sse::open(&node, &demo).await;
    assert_eq!(sse.ready().json()["user"], "demo");
    let (status, reply) = common::publish(
        &node,
        &demo,
        &json!({"channel": "user:demo", "data": "hello demo"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let event = sse
        .next_data(WAIT)
        .await
        .expect("demo user gets its message");
    assert_eq!(event.data(), "hello demo");
    // And it never runs without auth: the demo secret is not guessable.
    let reply = events(&node, "/events", &[]).await.expect_err("no token");
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_secrets_accepts_old_and_new_until_the_old_one_is_removed() {
    let (old, new) = (
        "old-secret-for-rotation-0123456789",
        "new-secret-for-rotation-9876543210",
    );
    let alice = Claims::new("alice");
    let old_token = alice.sign_hmac(Algorithm::HS256, old.as_bytes());
    let new_token = alice.sign_hmac(Algorithm::HS512, new.as_bytes());

    // Rotation step 1: the new secret is added first, the old one kept.
    let both = Node::start_without_secret(&["--jwt-secret", new, "--jwt-secret", old]);
    assert_accepted(&both, &old_token, "old secret while both are configured").await;
    assert_accepted(&both, &new_token, "new secret while both are configured").await;
    assert_unauthorized(
        &both,
        &alice.sign_hmac(Algorithm::HS256, b"a third secret nobody configured"),
        "a secret that is not configured",
    )
    .await;
    drop(both);

    // Step 2: the old secret is removed (a restart with the new one only).
    let rotated = Node::start_without_secret(&["--jwt-secret", new]);
    assert_accepted(&rotated, &new_token, "new secret after rotation").await;
    assert_unauthorized(&rotated, &old_token, "old secret after rotation").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_public_keys_in_one_pem_file_and_beside_a_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = dir.path().join("keys.pem");
    let mut pems = pem("rsa_public.pem");
    pems.extend(pem("ec_public.pem"));
    std::fs::write(&bundle, pems).expect("write PEM bundle");
    let bundle = bundle.to_string_lossy().into_owned();
    let node = Node::start(&[
        "--jwt-public-key",
        &bundle,
        "--jwt-public-key",
        &key_flag("ed25519_public.pem"),
    ]);
    let alice = Claims::new("alice");
    for (alg, private) in [
        (Algorithm::RS256, "rsa_private.pem"),
        (Algorithm::ES256, "ec_private.pem"),
        (Algorithm::EdDSA, "ed25519_private.pem"),
    ] {
        assert_accepted(&node, &alice.sign_pem(alg, private), &format!("{alg:?}")).await;
    }
    assert_accepted(&node, &alice.sign(), "HS256 with the configured secret").await;
    // Each key stays pinned to its own family, even beside the others.
    for alg in [Algorithm::HS256, Algorithm::HS512] {
        for public in ["rsa_public.pem", "ec_public.pem"] {
            let forged = alice.sign_hmac(alg, &pem(public));
            assert_unauthorized(&node, &forged, &format!("{alg:?} keyed with {public}")).await;
        }
    }
}
