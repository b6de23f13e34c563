//! Bounds and bad input: every refusal is a JSON error with the right
//! status, and the node keeps serving afterwards.

mod common;

use common::{
    assert_still_serves, bearer, metric, publish, publish_raw, publisher_token, request, token,
    wait_metric, Claims, Node, Reply, Sse, WAIT,
};
use hyper::{Method, StatusCode};
use serde_json::json;

async fn connect(node: &Node, user: &str) -> Result<Sse, Reply> {
    let auth = bearer(&token(user));
    let mut sse = Sse::connect(&node.url("/events"), &[("authorization", &auth)]).await?;
    sse.wait_ready(WAIT).await;
    Ok(sse)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_max_payload_is_413() {
    let node = Node::start(&["--max-payload", "1KiB"]);
    let publisher = publisher_token();
    let big = "x".repeat(2000);
    let (status, reply) = publish(
        &node,
        &publisher,
        &json!({"channel": "broadcast", "data": big}),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reply}");
    assert!(reply["error"].is_string(), "{reply}");

    let batch = json!({"messages": [
        {"channel": "broadcast", "data": "small"},
        {"channel": "broadcast", "data": big},
    ]});
    let (status, reply) = publish(&node, &publisher, &batch).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "batch: {reply}");

    let (status, reply) = publish(
        &node,
        &publisher,
        &json!({"channel": "broadcast", "data": "x".repeat(500)}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "500 bytes fit in 1KiB: {reply}");
    assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_third_connection_is_429() {
    let node = Node::start(&["--max-connections-per-user", "2", "--heartbeat", "1s"]);
    let first = connect(&node, "alice").await.expect("first");
    let _second = connect(&node, "alice").await.expect("second");
    let reply = connect(&node, "alice")
        .await
        .expect_err("third must be refused");
    reply.assert_json_error(StatusCode::TOO_MANY_REQUESTS);
    assert!(metric(&node, "herald_connections_rejected_total{reason=\"limit\"}").await >= 1.0);

    let _bob = connect(&node, "bob")
        .await
        .expect("other users are not limited by alice");

    // Closing a tab frees its slot.
    drop(first);
    wait_metric(&node, "herald_connections", WAIT, |v| v == 2.0).await;
    connect(&node, "alice")
        .await
        .expect("a slot freed by a closed connection");
    assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_is_503() {
    let node = Node::start(&["--max-connections", "2", "--heartbeat", "1s"]);
    let alice = connect(&node, "alice").await.expect("alice");
    let _bob = connect(&node, "bob").await.expect("bob");
    let reply = connect(&node, "carol").await.expect_err("node is full");
    reply.assert_json_error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(metric(&node, "herald_connections_rejected_total{reason=\"limit\"}").await >= 1.0);

    drop(alice);
    wait_metric(&node, "herald_connections", WAIT, |v| v == 1.0).await;
    assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_publish_input_is_400() {
    let node = Node::start(&[]);
    let publisher = publisher_token();
    let raw_bodies = [
        ("{not json", "malformed JSON"),
        ("", "empty body"),
        (r#"{"data": "no channel"}"#, "missing channel"),
        (r#"["broadcast", "x"]"#, "not an object"),
    ];
    for (body, why) in raw_bodies {
        let reply = publish_raw(&node, &publisher, body).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{why}: {}",
            reply.text()
        );
        reply.assert_json_error(StatusCode::BAD_REQUEST);
    }

    let long_event = "e".repeat(65);
    for event in ["bad name", "new\nline", "caf\u{e9}", long_event.as_str()] {
        let body = json!({"channel": "broadcast", "event": event, "data": 1});
        let (status, reply) = publish(&node, &publisher, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "event {event:?}: {reply}");
        assert!(reply["error"].is_string(), "{reply}");
    }
    let (status, reply) = publish(
        &node,
        &publisher,
        &json!({"channel": "broadcast", "event": "a-Z_0.9:x", "data": 1}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "every allowed event character: {reply}"
    );

    let long_channel = format!("user:{}", "u".repeat(260));
    for channel in ["", "user:a\u{1}b", "topic:x\ny", long_channel.as_str()] {
        let body = json!({"channel": channel, "data": 1});
        let (status, reply) = publish(&node, &publisher, &body).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "channel {channel:?}: {reply}"
        );
        assert!(reply["error"].is_string(), "{reply}");
    }
    assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_needs_a_covering_publish_claim() {
    let node = Node::start(&[]);
    let body = |channel: &str| json!({"channel": channel, "data": "hi"});

    let reply = request(
        Method::POST,
        &node.url("/publish"),
        &[("content-type", "application/json")],
        body("broadcast").to_string(),
    )
    .await;
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
    let reply = publish_raw(&node, "not-a-jwt", body("broadcast").to_string()).await;
    reply.assert_json_error(StatusCode::UNAUTHORIZED);

    let reader = token("alice");
    let (status, reply) = publish(&node, &reader, &body("user:alice")).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "no publish claim: {reply}");

    let scoped = Claims::new("svc")
        .publish(&["user:alice", "topic:orders.*"])
        .sign();
    for (channel, allowed) in [
        ("user:alice", true),
        ("user:alicia", false),
        ("user:bob", false),
        ("broadcast", false),
        ("topic:orders.7", true),
        ("topic:orders", false),
        ("topic:news", false),
    ] {
        let (status, reply) = publish(&node, &scoped, &body(channel)).await;
        let want = if allowed {
            StatusCode::OK
        } else {
            StatusCode::FORBIDDEN
        };
        assert_eq!(status, want, "publish to {channel}: {reply}");
    }

    // One forbidden message refuses the whole batch.
    let batch = json!({"messages": [body("user:alice"), body("user:bob")]});
    let (status, reply) = publish(&node, &scoped, &batch).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "batch: {reply}");
    assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_out_of_descriptors_pauses_accepting_and_keeps_serving() {
    // 512 descriptors: 256 sockets for the public listener, the rest the
    // node's own (Redis, the admin listener, logs).
    let node = Node::start_with_open_files(512, &["--heartbeat", "1s"]);
    let mut alice = connect(&node, "alice").await.expect("alice");
    // More idle connections than the node has descriptors: without a cap it
    // would accept until `accept` fails with EMFILE, and then its admin
    // listener could not accept either.
    let addr = node.public().trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(
            tokio::net::TcpStream::connect(&addr)
                .await
                .expect("the kernel's backlog takes the connection"),
        );
    }
    let paused = "accepting paused until a connection closes";
    let deadline = tokio::time::Instant::now() + WAIT;
    while !node.stderr_tail().contains(paused) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pause logged: {}",
            node.stderr_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let health = common::get(&node.admin_url("/healthz")).await;
    assert_eq!(
        health.status,
        StatusCode::OK,
        "the admin listener still answers"
    );
    assert!(
        !node.stderr_tail().contains("accept failed"),
        "no accept may fail: {}",
        node.stderr_tail()
    );
    // Once the idle ones go, new connections are accepted again, and the
    // stream that was open throughout still delivers.
    drop(idle);
    let (status, reply) = publish(
        &node,
        &publisher_token(),
        &json!({"channel": "user:alice", "data": "still delivered"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let event = alice
        .next_data(WAIT)
        .await
        .expect("the open stream still delivers");
    assert_eq!(event.data(), "still delivered");
    assert_still_serves(&node).await;
}
