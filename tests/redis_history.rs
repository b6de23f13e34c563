//! When Redis no longer holds what a client missed (the history stream was
//! trimmed to `--history-size`), the client must be told (`herald.reset`)
//! so the app refetches its state, instead of silently skipping messages.
//!
//! Redis trims `MAXLEN ~ N` in whole stream nodes (100 entries by default),
//! which decides how many messages each test publishes.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::resp::Resp;
use common::{
    bearer, get, payloads, publish, publish_ok, publisher_token, token, wait_until, Event, Node,
    Redis, Sse, WAIT,
};
use hyper::StatusCode;
use serde_json::json;

/// Messages published while the client is away: far more than the history
/// keeps.
const MISSED: usize = 300;

/// XLEN of a history stream.
async fn xlen(app: &mut Resp, channel: &str) -> i64 {
    let key = format!("herald:{{{channel}}}:h");
    app.call_ok(&["XLEN", key.as_str()]).await.int()
}

/// Asserts Redis trimmed `channel` below what was published into it.
async fn assert_trimmed(app: &mut Resp, channel: &str, published: usize) {
    let len = xlen(app, channel).await;
    assert!(
        (len as usize) < published,
        "the test needs a trimmed stream: {len} of {published} entries kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_the_kept_history_gets_a_reset() {
    // With `MAXLEN ~ 100`, 200 entries trim to exactly the newest 100: the
    // kept history fits the replay limit, but the 99 messages right after
    // the client's cursor are gone.
    let redis = Redis::start();
    let url = redis.url();
    let node = Node::start(&["--redis-url", &url, "--history-size", "100"]);
    let mut app = Resp::connect(redis.port()).await;

    let mut alice = Sse::open(&node, &token("alice")).await;
    publish_ok(&node, "user:alice", json!("seen")).await;
    assert_eq!(
        alice.next_data(WAIT).await.as_ref().map(Event::data),
        Some("seen")
    );
    let cursor = alice.last_id().expect("a cursor").to_string();
    drop(alice);

    for batch in [0..100, 100..199] {
        let messages: Vec<_> = batch
            .map(|i| json!({"channel": "user:alice", "data": format!("missed {i}")}))
            .collect();
        let (status, reply) =
            publish(&node, &publisher_token(), &json!({ "messages": messages })).await;
        assert_eq!(status, StatusCode::OK, "batch publish -> {reply}");
    }
    let kept = xlen(&mut app, "user:alice").await;
    assert!(
        kept <= 100,
        "the test needs the stream trimmed to at most the replay limit; {kept} kept"
    );

    let (_back, opening) = Sse::resume(&node, "/events", &token("alice"), &cursor).await;
    let reset = opening.iter().find(|e| e.name() == "herald.reset");
    let replayed = payloads(&opening);
    assert!(
        reset.is_some_and(|r| r.json()["channels"] == json!(["user:alice"])),
        "messages right after the cursor were trimmed, so the client must get \
         herald.reset for user:alice; instead it got {} replayed messages \
         (first {:?}) and no reset",
        replayed.len(),
        replayed.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_connected_through_an_outage_that_outlived_the_history_is_told() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port()).await;
    let url = proxy.url();
    let node = Node::start(&[
        "--redis-url",
        &url,
        "--redis-probe-interval",
        "500ms",
        "--history-size",
        "10",
    ]);
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;
    let mut alice = Sse::open(&node, &token("alice")).await;
    app.script_publish_with(&sha, "herald", "10", "user:alice", "", r#""seen""#)
        .await;
    assert_eq!(
        alice.next_data(WAIT).await.as_ref().map(Event::data),
        Some("seen")
    );

    // The node's pub/sub goes silent while an app keeps publishing.
    proxy.blackhole_existing();
    for i in 0..MISSED {
        let data = format!("\"missed {i}\"");
        app.script_publish_with(&sha, "herald", "10", "user:alice", "", &data)
            .await;
    }
    assert_trimmed(&mut app, "user:alice", MISSED + 1).await;
    let readyz = || async { get(&node.admin_url("/readyz")).await.status };
    assert!(
        wait_until(WAIT, || async { readyz().await != StatusCode::OK }).await,
        "the silent pub/sub is noticed"
    );
    assert!(
        wait_until(WAIT, || async { readyz().await == StatusCode::OK }).await,
        "the node recovers"
    );
    app.script_publish_with(&sha, "herald", "10", "user:alice", "", r#""after""#)
        .await;

    // The client must learn that it missed messages it can no longer get:
    // a herald.reset on its stream, or the stream ends so it resumes by
    // cursor (and gets the reset then).
    let mut seen = Vec::new();
    let mut told = false;
    while let Some(event) = alice.next_event(WAIT).await {
        if event.name() == "herald.reset" {
            told = true;
            break;
        }
        let last = event.data() == "after";
        seen.push(event);
        if last {
            break;
        }
    }
    if !told && alice.ended() {
        let cursor = alice.last_id().expect("a cursor").to_string();
        let auth = bearer(&token("alice"));
        let mut back = Sse::connect(
            &node.url("/events"),
            &[("authorization", &auth), ("last-event-id", &cursor)],
        )
        .await
        .unwrap_or_else(|r| panic!("resume refused: {} {}", r.status, r.text()));
        let opening = back.wait_ready(Duration::from_secs(10)).await;
        told = opening.iter().any(|e| e.name() == "herald.reset");
    }
    let got = payloads(&seen);
    assert!(
        told,
        "history lost messages during the outage, yet the client was not told: \
         it got {} messages (first {:?}, last {:?}) and no herald.reset",
        got.len(),
        got.first(),
        got.last()
    );
}
