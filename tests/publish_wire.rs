//! `POST /publish` on the wire, as app services' HTTP clients use it:
//! keep-alive and pipelined requests, the other framings clients use
//! (chunked bodies, `Expect: 100-continue`, HTTP/1.0), other routes on a
//! publish connection, errors, and drains. Raw TCP, so the bytes
//! the node writes are what is checked.

mod common;

use std::time::Duration;

use common::wire::{host, Conn};
use common::{payloads, publisher_token, token, Node, Sse, WAIT};
use serde_json::json;

fn publish_request(node: &Node, token: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        host(node),
        body.len()
    )
    .into_bytes()
}

fn message(channel: &str, data: &str) -> String {
    json!({ "channel": channel, "data": data }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_and_pipelined_publishes_are_answered_in_order() {
    let node = Node::start(&[]);
    let mut sse = Sse::open(&node, &token("alice")).await;
    let publisher = publisher_token();
    let mut conn = Conn::open(&node).await;

    // Three requests in one write, the last body split from its head.
    let mut batch = Vec::new();
    for data in ["p1", "p2", "p3"] {
        batch.extend(publish_request(
            &node,
            &publisher,
            &message("user:alice", data),
            "",
        ));
    }
    let split = batch.len() - 10;
    conn.send(&batch[..split]).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    conn.send(&batch[split..]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let response = conn.response().await;
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        assert!(response.header("date").is_some(), "{}", response.head);
        assert_eq!(response.header("connection"), None, "stays open");
        ids.push(response.json()["id"].as_str().expect("id").to_owned());
    }
    let mut sorted = ids.clone();
    sorted.sort_by_key(|id| {
        let (ms, seq) = id.split_once('-').expect("stream id");
        (
            ms.parse::<u64>().expect("ms"),
            seq.parse::<u64>().expect("seq"),
        )
    });
    assert_eq!(ids, sorted, "answers come in request order");

    // Later, on the same connection: another publish, then another route.
    conn.send(&publish_request(
        &node,
        &publisher,
        &message("user:alice", "p4"),
        "",
    ))
    .await;
    assert_eq!(conn.response().await.status, 200);
    conn.send(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host(&node)).as_bytes())
        .await;
    let page = conn.response().await;
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("</html>"));

    let events = sse.collect(4, WAIT).await;
    assert_eq!(payloads(&events), ["p1", "p2", "p3", "p4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_expect_http10_and_close_requests_still_publish() {
    let node = Node::start(&[]);
    let mut sse = Sse::open(&node, &token("bob")).await;
    let publisher = publisher_token();
    let host = host(&node);

    // A chunked body.
    let body = message("user:bob", "chunked");
    let mut conn = Conn::open(&node).await;
    conn.send(
        format!(
            "POST /publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {publisher}\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let response = conn.response().await;
    assert_eq!(response.status, 200, "{response:?}");

    // Expect: 100-continue: the body follows the interim response.
    let body = message("user:bob", "expected");
    let mut conn = Conn::open(&node).await;
    conn.send(
        format!(
            "POST /publish HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {publisher}\r\n\
             Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(conn.response().await.status, 100);
    conn.send(body.as_bytes()).await;
    assert_eq!(conn.response().await.status, 200);

    // HTTP/1.0: answered, then closed.
    let body = message("user:bob", "old");
    let mut conn = Conn::open(&node).await;
    conn.send(
        format!(
            "POST /publish HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {publisher}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(conn.response().await.status, 200);
    assert!(conn.closes().await, "HTTP/1.0 connections close");

    // HTTP/1.0 asking for keep-alive: told so in the answer, and kept.
    let mut conn = Conn::open(&node).await;
    for data in ["old-1", "old-2"] {
        let body = message("user:bob", data);
        conn.send(
            format!(
                "POST /publish HTTP/1.0\r\nConnection: keep-alive\r\n\
                 Authorization: Bearer {publisher}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
        let response = conn.response().await;
        assert_eq!(response.status, 200);
        assert_eq!(response.header("connection"), Some("keep-alive"));
    }

    // Connection: close on HTTP/1.1: answered with it, then closed.
    let mut conn = Conn::open(&node).await;
    conn.send(&publish_request(
        &node,
        &publisher,
        &message("user:bob", "last"),
        "Connection: close\r\n",
    ))
    .await;
    let response = conn.response().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("connection"), Some("close"));
    assert!(conn.closes().await);

    let events = sse.collect(6, WAIT).await;
    assert_eq!(
        payloads(&events),
        ["chunked", "expected", "old", "old-1", "old-2", "last"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_get_json_errors_without_the_body_being_read() {
    let node = Node::start(&["--max-payload", "1KiB"]);
    let publisher = publisher_token();

    // Over the body limit (16 payloads, at least 64 KiB): refused on the
    // head alone, before any of the body is sent.
    let mut conn = Conn::open(&node).await;
    conn.send(
        format!(
            "POST /publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {publisher}\r\n\
             Content-Length: 1000000\r\n\r\n",
            host(&node)
        )
        .as_bytes(),
    )
    .await;
    let response = conn.response().await;
    assert_eq!(response.status, 413, "{response:?}");
    assert!(response.json()["error"].as_str().is_some());
    assert!(conn.closes().await);

    // No token: 401 with a Bearer challenge, CORS untouched.
    let mut conn = Conn::open(&node).await;
    let body = message("user:x", "no");
    conn.send(
        format!(
            "POST /publish HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n{body}",
            host(&node),
            body.len()
        )
        .as_bytes(),
    )
    .await;
    let response = conn.response().await;
    assert_eq!(response.status, 401);
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));
    assert_eq!(response.header("access-control-allow-origin"), None);

    // A browser's token may not publish.
    let mut conn = Conn::open(&node).await;
    conn.send(&publish_request(&node, &token("eve"), &body, ""))
        .await;
    assert_eq!(conn.response().await.status, 403);

    // A malformed Content-Length is refused.
    let mut conn = Conn::open(&node).await;
    conn.send(
        format!(
            "POST /publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {publisher}\r\n\
             Content-Length: 12x\r\n\r\n{body}",
            host(&node)
        )
        .as_bytes(),
    )
    .await;
    let mut head = String::new();
    while !head.contains("\r\n") {
        assert!(conn.fill().await > 0, "answered before closing");
        head = String::from_utf8_lossy(&conn.read).into_owned();
    }
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    common::assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_idle_publish_connections() {
    let mut node = Node::start(&["--drain-timeout", "3s"]);
    let mut conn = Conn::open(&node).await;
    conn.send(&publish_request(
        &node,
        &publisher_token(),
        &message("broadcast", "before"),
        "",
    ))
    .await;
    assert_eq!(conn.response().await.status, 200);
    node.signal("TERM");
    assert!(
        conn.closes().await,
        "an idle keep-alive connection is closed by the drain"
    );
    let status = node.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}");
}
