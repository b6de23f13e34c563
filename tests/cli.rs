//! The `herald token` and `herald publish` subcommands, as a user runs them
//! next to a node: minted tokens open streams, and `herald publish` delivers
//! over HTTP and straight into Redis with the publish script.

mod common;

use std::process::Command;

use common::{Node, Redis, Sse, SECRET, WAIT};

fn herald(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env_clear()
        .output()
        .expect("run herald");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minted_token_opens_a_stream_and_herald_publish_reaches_it() {
    let node = Node::start(&[]);
    let (ok, token, err) = herald(&[
        "token",
        "--jwt-secret",
        SECRET,
        "--sub",
        "carol",
        "--topics",
        "news",
    ]);
    assert!(ok, "herald token failed: {err}");
    let mut sse = Sse::open_at(&node, "/events?topic=news", &token).await;

    let url = node.public().to_owned();
    let (ok, reply, err) = herald(&[
        "publish",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--channel",
        "user:carol",
        "--event",
        "notice",
        "line one\nline two",
    ]);
    assert!(ok, "herald publish failed: {err}");
    assert!(reply.contains("\"id\""), "reply names the id: {reply}");
    let event = sse.next_data(WAIT).await.expect("the published message");
    assert_eq!(event.name(), "notice");
    assert_eq!(event.data(), "line one\nline two");

    let (ok, _, err) = herald(&[
        "publish",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--channel",
        "topic:news",
        "{\"a\": [1, 2]}",
    ]);
    assert!(ok, "{err}");
    let event = sse.next_data(WAIT).await.expect("the topic message");
    assert_eq!(
        event.data(),
        r#"{"a":[1,2]}"#,
        "JSON data is sent as compact JSON"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_publish_reports_refusals() {
    let node = Node::start(&[]);
    let url = node.public().to_owned();
    let (ok, _, err) = herald(&[
        "publish",
        "--url",
        &url,
        "--jwt-secret",
        "wrong",
        "--channel",
        "user:x",
        "hi",
    ]);
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
    let (ok, _, err) = herald(&[
        "publish",
        "--url",
        &url,
        "--jwt-secret",
        SECRET,
        "--channel",
        "room:1",
        "hi",
    ]);
    assert!(!ok);
    assert!(err.contains("400"), "{err}");
    let (ok, _, err) = herald(&["token", "--sub", "x"]);
    assert!(!ok);
    assert!(err.contains("--jwt-secret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_publish_with_redis_url_uses_the_script_and_reaches_every_node() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Node::start(&["--redis-url", &url]);
    let b = Node::start(&["--redis-url", &url]);
    let (_, token, _) = herald(&["token", "--jwt-secret", SECRET, "--sub", "dave"]);
    let mut on_a = Sse::open(&a, &token).await;
    let mut on_b = Sse::open(&b, &token).await;

    let (ok, reply, err) = herald(&[
        "publish",
        "--redis-url",
        &url,
        "--channel",
        "user:dave",
        "from a cron job",
    ]);
    assert!(ok, "{err}");
    assert!(reply.contains("\"id\""), "{reply}");
    for sse in [&mut on_a, &mut on_b] {
        let event = sse.next_data(WAIT).await.expect("delivered through Redis");
        assert_eq!(event.data(), "from a cron job");
    }
    // It went through the script: it is in the history, so a fresh client
    // resuming from before it gets it replayed.
    let cursor = on_a.ready().id.clone().expect("ready carries a cursor");
    let replayed = Sse::connect(
        &b.url("/events"),
        &[
            ("authorization", &common::bearer(&token)),
            ("last-event-id", &cursor),
        ],
    )
    .await
    .map_err(|r| r.text())
    .expect("resume")
    .wait_ready(WAIT)
    .await;
    assert_eq!(common::payloads(&replayed), ["from a cron job"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_token_control_opens_the_server_api_and_signs_with_the_first_secret() {
    // Rotation: the node knows the new and the old secret; the CLI is given
    // them in the same order and signs with the first (the new) one.
    let (new, old) = ("the-new-secret-0123456789abcdef", SECRET);
    let node = Node::start_without_secret(&["--jwt-secret", new, "--jwt-secret", old]);
    let (ok, token, err) = herald(&[
        "token",
        "--jwt-secret",
        &format!("{new},{old}"),
        "--sub",
        "ops",
        "--control",
        "--kid",
        "2026-12",
    ]);
    assert!(ok, "herald token failed: {err}");
    let header = jsonwebtoken::decode_header(&token).expect("a JWT");
    assert_eq!(header.kid.as_deref(), Some("2026-12"));
    let claims: serde_json::Value = jsonwebtoken::decode(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(new.as_bytes()),
        &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .expect("signed with the first secret")
    .claims;
    assert_eq!(claims["control"], true);
    assert!(claims["iat"].as_u64().is_some(), "iat is set: {claims}");

    let auth = common::bearer(&token);
    let reply = common::request(
        hyper::Method::POST,
        &node.url("/disconnect"),
        &[("authorization", &auth)],
        bytes::Bytes::from_static(br#"{"user":"nobody"}"#),
    )
    .await;
    assert_eq!(reply.status, hyper::StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json(), serde_json::json!({"connections": 0}));
}
