//! `GET /history`: a channel's messages newest first, paged with `before`,
//! readable by the channel's own subscribers or a publisher token.

mod common;

use bytes::Bytes;
use common::{bearer, publish, publisher_token, request, token, Claims, Node, Redis, Reply};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};

/// `GET <path>` on the node with `token` as a bearer.
async fn get_as(node: &Node, path: &str, token: &str) -> Reply {
    let auth = bearer(token);
    request(
        Method::GET,
        &node.url(path),
        &[("authorization", &auth)],
        Bytes::new(),
    )
    .await
}

/// Publishes `n` numbered messages to `channel` in one batch.
async fn publish_numbered(node: &Node, channel: &str, n: usize) {
    let messages: Vec<Value> = (0..n)
        .map(|i| json!({"channel": channel, "event": "notice", "data": {"n": i}}))
        .collect();
    let (status, reply) = publish(node, &publisher_token(), &json!({ "messages": messages })).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
}

/// Reads every page of `channel` as `token`; returns the page sizes and
/// every message's `n`, in the order received.
async fn read_all_pages(node: &Node, channel: &str, token: &str) -> (Vec<usize>, Vec<u64>) {
    let mut sizes = Vec::new();
    let mut numbers = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let path = match &before {
            Some(id) => format!("/history?channel={channel}&limit=50&before={id}"),
            None => format!("/history?channel={channel}&limit=50"),
        };
        let reply = get_as(node, &path, token).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        let body = reply.json();
        let messages = body["messages"].as_array().expect("messages").clone();
        sizes.push(messages.len());
        for m in &messages {
            assert_eq!(m["event"], "notice", "{m}");
            assert!(m["ts"].as_u64().is_some(), "ts in {m}");
            numbers.push(m["data"]["n"].as_u64().expect("data.n"));
        }
        before = messages
            .last()
            .and_then(|m| m["id"].as_str())
            .map(str::to_owned);
        if !body["more"].as_bool().expect("more") {
            return (sizes, numbers);
        }
        assert!(sizes.len() < 10, "paging never ends: {sizes:?}");
    }
}

async fn pages_newest_first(node: &Node) {
    publish_numbered(node, "user:alice", 120).await;
    let (sizes, numbers) = read_all_pages(node, "user:alice", &token("alice")).await;
    assert_eq!(sizes, [50, 50, 20]);
    let expected: Vec<u64> = (0..120).rev().collect();
    assert_eq!(numbers, expected, "newest first, no duplicate, no gap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_and_twenty_messages_come_in_pages_of_50_50_20_newest_first() {
    let node = Node::start(&[]);
    pages_newest_first(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_come_from_the_redis_streams_too() {
    let redis = Redis::start();
    let node = Node::start(&["--redis-url", &redis.url()]);
    pages_newest_first(&node).await;
    // Another node on the same Redis reads the same inbox.
    let other = Node::start(&["--redis-url", &redis.url()]);
    let reply = get_as(
        &other,
        "/history?channel=user:alice&limit=1",
        &token("alice"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["messages"][0]["data"], json!({"n": 119}));
    assert_eq!(reply.json()["more"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_read_their_own_broadcast_and_topics_and_publishers_their_channels() {
    let node = Node::start(&[]);
    publish_numbered(&node, "user:bob", 1).await;
    publish_numbered(&node, "broadcast", 1).await;
    publish_numbered(&node, "topic:news", 1).await;
    let alice = Claims::new("alice").topics(&["news"]).sign();

    let own = get_as(&node, "/history?channel=user:alice", &alice).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.text());
    assert_eq!(own.json(), json!({"messages": [], "more": false}));
    for readable in ["broadcast", "topic:news"] {
        let reply = get_as(&node, &format!("/history?channel={readable}"), &alice).await;
        assert_eq!(reply.status, StatusCode::OK, "{readable}: {}", reply.text());
        assert_eq!(reply.json()["messages"].as_array().map(Vec::len), Some(1));
    }
    for forbidden in ["user:bob", "topic:sports"] {
        let reply = get_as(&node, &format!("/history?channel={forbidden}"), &alice).await;
        reply.assert_json_error(StatusCode::FORBIDDEN);
    }

    let billing = Claims::new("billing").publish(&["user:*"]).sign();
    let reply = get_as(&node, "/history?channel=user:bob", &billing).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["messages"][0]["data"], json!({"n": 0}));
    let reply = get_as(&node, "/history?channel=topic:news", &billing).await;
    reply.assert_json_error(StatusCode::FORBIDDEN);

    // The browser's cookie works as for /events.
    let cookie = format!("herald_token={}", token("bob"));
    let reply = request(
        Method::GET,
        &node.url("/history?channel=user:bob"),
        &[("cookie", &cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.header("cache-control"), Some("no-store"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_history_requests_are_clear_json_errors() {
    let node = Node::start(&[]);
    let alice = token("alice");
    for (path, why) in [
        ("/history", "no channel"),
        ("/history?channel=room:1", "unknown channel kind"),
        ("/history?channel=user:alice&limit=0", "limit 0"),
        (
            "/history?channel=user:alice&limit=100000",
            "limit too large",
        ),
        (
            "/history?channel=user:alice&limit=ten",
            "limit not a number",
        ),
        (
            "/history?channel=user:alice&before=yesterday",
            "before not an id",
        ),
    ] {
        let reply = get_as(&node, path, &alice).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{why}: {}",
            reply.text()
        );
        reply.assert_json_error(StatusCode::BAD_REQUEST);
    }
    let reply = request(
        Method::GET,
        &node.url("/history?channel=user:alice"),
        &[],
        Bytes::new(),
    )
    .await;
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
    let reply = get_as(&node, "/history?channel=user:alice", "not-a-token").await;
    reply.assert_json_error(StatusCode::UNAUTHORIZED);
}
