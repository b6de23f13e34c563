//! The server API across nodes: `POST /disconnect` (with and without
//! `revoke`) and `GET /presence`, on an embedded node and on three nodes
//! sharing one Redis.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    bearer, metric, now, publish_ok, request, token, wait_metric, wait_until, Claims, Node, Redis,
    Reply, Sse, WAIT,
};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

/// A token for the server API.
fn control_token() -> String {
    Claims::new("ops").set("control", json!(true)).sign()
}

/// `POST /disconnect` with `body` as `token`.
async fn disconnect_raw(node: &Node, token: &str, body: &str) -> Reply {
    let auth = bearer(token);
    request(
        Method::POST,
        &node.url("/disconnect"),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Bytes::from(body.to_owned()),
    )
    .await
}

/// `POST /disconnect` that must succeed; returns the reply's count.
async fn disconnect(node: &Node, body: Value) -> u64 {
    let reply = disconnect_raw(node, &control_token(), &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::OK, "{body}: {}", reply.text());
    reply.json()["connections"]
        .as_u64()
        .unwrap_or_else(|| panic!("no connections count: {}", reply.text()))
}

/// The stream gets `herald.disconnected` with `reason`, then ends.
async fn assert_disconnected(sse: &mut Sse, reason: &str, which: &str) {
    let events = sse
        .read_to_end(WAIT)
        .await
        .unwrap_or_else(|| panic!("{which}: the stream stayed open"));
    let last = events
        .iter()
        .rev()
        .find(|e| e.dispatches())
        .unwrap_or_else(|| panic!("{which}: no event before the end: {events:?}"));
    assert_eq!(last.name(), "herald.disconnected", "{which}: {events:?}");
    assert_eq!(last.json(), json!({ "reason": reason }), "{which}");
}

/// `GET /events` with `token` is refused with a 401.
async fn assert_refused(node: &Node, token: &str, which: &str) {
    let auth = bearer(token);
    let reply = Sse::connect(&node.url("/events"), &[("authorization", &auth)])
        .await
        .err()
        .unwrap_or_else(|| panic!("{which}: a revoked token opened a stream"));
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
}

/// A token for `sub` issued `secs` seconds ago.
fn issued_ago(sub: &str, secs: i64) -> String {
    Claims::new(sub).set("iat", json!(now() - secs)).sign()
}

fn cluster(redis: &Redis) -> Vec<Node> {
    (0..3)
        .map(|_| Node::start(&["--redis-url", &redis.url()]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_users_connections_on_every_node_and_no_one_elses() {
    let redis = Redis::start();
    let nodes = cluster(&redis);
    let mut alice = Vec::new();
    for node in &nodes {
        alice.push(Sse::open(node, &token("alice")).await);
    }
    let mut bob = Sse::open(&nodes[0], &token("bob")).await;

    let closed = disconnect(
        &nodes[1],
        json!({"user": "alice", "reason": "account closed"}),
    )
    .await;
    assert_eq!(
        closed, 1,
        "one of alice's connections was on the node asked"
    );
    for (i, sse) in alice.iter_mut().enumerate() {
        assert_disconnected(sse, "account closed", &format!("alice on node {i}")).await;
    }
    for node in &nodes {
        wait_metric(
            node,
            "herald_connections_closed_total{reason=\"disconnected\"}",
            WAIT,
            |v| v == 1.0,
        )
        .await;
    }
    assert_eq!(metric(&nodes[1], "herald_disconnects_total").await, 1.0);

    // Bob never noticed, and alice may come back: it was no revocation.
    publish_ok(&nodes[2], "user:bob", json!("still here")).await;
    let event = bob.next_data(WAIT).await.expect("bob still streams");
    assert_eq!(event.data(), "still here");
    let mut again = Sse::open(&nodes[2], &token("alice")).await;
    publish_ok(&nodes[0], "user:alice", json!("welcome back")).await;
    assert_eq!(
        again.next_data(WAIT).await.map(|e| e.data().to_owned()),
        Some("welcome back".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_refuses_old_tokens_on_every_node_also_one_started_later() {
    let redis = Redis::start();
    let nodes = cluster(&redis);
    let old = issued_ago("alice", 10);
    let mut streams = Vec::new();
    for node in &nodes {
        streams.push(Sse::open(node, &old).await);
    }
    // Each node has read (and remembers) that alice is not revoked.
    let closed = disconnect(&nodes[0], json!({"user": "alice", "revoke": true})).await;
    assert_eq!(closed, 1);
    for (i, sse) in streams.iter_mut().enumerate() {
        assert_disconnected(sse, "revoked", &format!("alice on node {i}")).await;
    }
    for (i, node) in nodes.iter().enumerate() {
        assert_refused(node, &old, &format!("the old token on node {i}")).await;
    }
    let later = Node::start(&["--redis-url", &redis.url()]);
    assert_refused(&later, &old, "the old token on a node started afterwards").await;
    let history = request(
        Method::GET,
        &later.url("/history?channel=user:alice"),
        &[("authorization", &bearer(&old))],
        Bytes::new(),
    )
    .await;
    history.assert_json_error(StatusCode::UNAUTHORIZED);

    // A token issued from now on works everywhere; one without `iat` (its
    // issue time unknown) does not.
    let fresh = issued_ago("alice", 0);
    for node in nodes.iter().chain([&later]) {
        Sse::open(node, &fresh).await;
    }
    // Other users are not affected.
    Sse::open(&later, &issued_ago("bob", 10)).await;
    assert_refused(&nodes[1], &token("alice"), "a token without iat").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_revoke_work_on_the_embedded_broker() {
    let node = Node::start(&[]);
    let old = issued_ago("alice", 10);
    let mut first = Sse::open(&node, &old).await;
    let mut second = Sse::open(&node, &old).await;
    let closed = disconnect(&node, json!({"user": "alice", "revoke": true})).await;
    assert_eq!(closed, 2);
    assert_disconnected(&mut first, "revoked", "first").await;
    assert_disconnected(&mut second, "revoked", "second").await;
    assert_refused(&node, &old, "the old token").await;
    Sse::open(&node, &issued_ago("alice", 0)).await;
    assert_eq!(
        disconnect(&node, json!({"user": "nobody-connected"})).await,
        0,
        "a user with no connection is no error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_disconnect_requests_are_clear_json_errors() {
    let node = Node::start(&[]);
    let control = control_token();
    for (body, why) in [
        ("{not json", "malformed JSON"),
        ("{}", "no user"),
        (r#"{"usr":"42"}"#, "unknown field"),
        (r#"{"user":""}"#, "empty user"),
        (r#"{"user":42}"#, "user not a string"),
        (r#"{"user":"a\nb"}"#, "control character"),
        (r#"{"user":"42","revoke":"yes"}"#, "revoke not a bool"),
    ] {
        let reply = disconnect_raw(&node, &control, body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{why}: {}",
            reply.text()
        );
        reply.assert_json_error(StatusCode::BAD_REQUEST);
    }
    let long_reason = json!({"user": "42", "reason": "x".repeat(300)}).to_string();
    disconnect_raw(&node, &control, &long_reason)
        .await
        .assert_json_error(StatusCode::BAD_REQUEST);
    let huge = json!({"user": "x".repeat(10_000)}).to_string();
    disconnect_raw(&node, &control, &huge)
        .await
        .assert_json_error(StatusCode::PAYLOAD_TOO_LARGE);

    let body = r#"{"user":"42"}"#;
    let publisher = Claims::new("svc").publish(&["user:*"]).sign();
    disconnect_raw(&node, &publisher, body)
        .await
        .assert_json_error(StatusCode::FORBIDDEN);
    disconnect_raw(&node, "garbage", body)
        .await
        .assert_json_error(StatusCode::UNAUTHORIZED);
    // The cookie is not accepted for the server API.
    let cookie = format!("herald_token={control}");
    let reply = request(
        Method::POST,
        &node.url("/disconnect"),
        &[("cookie", &cookie)],
        Bytes::from_static(br#"{"user":"42"}"#),
    )
    .await;
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
}

/// `GET /presence?channel=…` as the control token; the reply's counts.
async fn presence(node: &Node, channel: &str) -> (u64, u64) {
    let auth = bearer(&control_token());
    let reply = request(
        Method::GET,
        &node.url(&format!("/presence?channel={channel}")),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{channel}: {}", reply.text());
    let body = reply.json();
    (
        body["connections"].as_u64().expect("connections"),
        body["nodes"].as_u64().expect("nodes"),
    )
}

/// Polls `/presence` on `node` until it reads `expected`.
async fn wait_presence(node: &Node, channel: &str, expected: (u64, u64), within: Duration) {
    let last = std::sync::Mutex::new((0, 0));
    let reached = wait_until(within, || async {
        let seen = presence(node, channel).await;
        *last.lock().expect("lock") = seen;
        seen == expected
    })
    .await;
    let last = *last.lock().expect("lock");
    assert!(
        reached,
        "{channel}: presence {last:?}, expected {expected:?} within {within:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_connections_and_nodes_across_the_cluster() {
    let redis = Redis::start();
    // A short heartbeat: a node notices a closed socket at its next write.
    let nodes: Vec<Node> = (0..3)
        .map(|_| Node::start(&["--redis-url", &redis.url(), "--heartbeat", "300ms"]))
        .collect();
    let reader = Claims::new("alice").topics(&["news"]).sign();
    let a1 = Sse::open_at(&nodes[0], "/events?topic=news", &reader).await;
    let _a2 = Sse::open(&nodes[0], &token("alice")).await;
    let _a3 = Sse::open_at(&nodes[1], "/events?topic=news", &reader).await;
    let _b1 = Sse::open(&nodes[2], &token("bob")).await;

    // "At most a few seconds stale": asked of any node, within 5 s.
    let fresh = Duration::from_secs(5);
    wait_presence(&nodes[2], "user:alice", (3, 2), fresh).await;
    wait_presence(&nodes[1], "topic:news", (2, 2), fresh).await;
    wait_presence(&nodes[0], "broadcast", (4, 3), fresh).await;
    wait_presence(&nodes[0], "user:nobody", (0, 0), fresh).await;

    drop(a1);
    wait_presence(&nodes[2], "user:alice", (2, 2), fresh).await;
    wait_presence(&nodes[2], "topic:news", (1, 1), fresh).await;

    // A node that dies without a goodbye drops out within the expiry (10 s).
    nodes[1].signal("KILL");
    let expiry = Duration::from_secs(10) + fresh;
    wait_presence(&nodes[0], "user:alice", (1, 1), expiry).await;
    wait_presence(&nodes[0], "topic:news", (0, 0), fresh).await;
    wait_presence(&nodes[0], "broadcast", (2, 2), fresh).await;

    // One table per node, none per channel: a node's cost does not grow
    // with the channels it holds.
    let keys = redis_cli(&redis, &["KEYS", "*presence*"]);
    assert!(
        keys.lines().all(|k| k.starts_with("herald:{presence")),
        "presence keys: {keys}"
    );
    assert!(keys.lines().count() <= 4, "presence keys: {keys}");

    // Redis loses everything: each node notices its table lapsed at its
    // next refresh and writes it again in full.
    redis_cli(&redis, &["FLUSHALL"]);
    wait_presence(&nodes[0], "user:alice", (1, 1), Duration::from_secs(10)).await;
    wait_presence(&nodes[2], "user:bob", (1, 1), fresh).await;
}

/// Runs `redis-cli` against `redis`; its output.
fn redis_cli(redis: &Redis, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-p")
        .arg(redis.port().to_string())
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_the_embedded_broker_and_bad_presence_requests() {
    let node = Node::start(&[]);
    let _alice = Sse::open(&node, &token("alice")).await;
    wait_presence(&node, "user:alice", (1, 1), Duration::from_secs(5)).await;

    let auth = bearer(&control_token());
    for (path, status) in [
        ("/presence", StatusCode::BAD_REQUEST),
        ("/presence?channel=room:1", StatusCode::BAD_REQUEST),
        ("/presence?channel=", StatusCode::BAD_REQUEST),
    ] {
        let reply = request(
            Method::GET,
            &node.url(path),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await;
        reply.assert_json_error(status);
    }
    let user = bearer(&token("alice"));
    request(
        Method::GET,
        &node.url("/presence?channel=user:alice"),
        &[("authorization", &user)],
        Bytes::new(),
    )
    .await
    .assert_json_error(StatusCode::FORBIDDEN);
    request(
        Method::GET,
        &node.url("/presence?channel=user:alice"),
        &[],
        Bytes::new(),
    )
    .await
    .assert_json_error(StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_service_disconnects_and_reads_presence_and_history_through_the_library() {
    let redis = Redis::start();
    let node = Node::start(&["--redis-url", &redis.url()]);
    let app = herald::Publisher::redis(
        herald::broker::redis::RedisConfig {
            url: redis.url(),
            prefix: "herald".into(),
            history_size: 1000,
            history_ttl: Duration::from_secs(3600),
            probe_interval: Duration::from_secs(5),
        },
        65_536,
    )
    .expect("publisher");
    let old = issued_ago("alice", 10);
    let mut sse = Sse::open(&node, &old).await;

    let seen = wait_until(Duration::from_secs(5), || async {
        app.presence("user:alice")
            .await
            .expect("presence")
            .connections
            == 1
    })
    .await;
    assert!(seen, "presence through the library");

    app.publish(herald::Message::new(
        "user:alice",
        Some("notice"),
        &json!("hi"),
    ))
    .await
    .expect("publish");
    sse.next_data(WAIT).await.expect("the message");
    let page = app.history("user:alice", None, 10).await.expect("history");
    assert_eq!((page.entries.len(), page.more), (1, false));

    app.disconnect("alice", "bye", Some(Duration::from_secs(60)))
        .await
        .expect("disconnect");
    assert_disconnected(&mut sse, "bye", "alice").await;
    assert_refused(&node, &old, "the old token after the app's revoke").await;
    assert!(
        app.disconnect("a\nb", "bye", None).await.is_err(),
        "an invalid user is refused"
    );
}
