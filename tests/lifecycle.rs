//! How connections end: slow clients, dead clients, token expiry, graceful
//! shutdown, and the heartbeat that keeps idle ones alive.

mod common;

use std::time::Duration;

use common::{
    bearer, get, metric, publish, publish_ok, publisher_token, token, wait_metric, Claims, Node,
    Sse, WAIT,
};
use hyper::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_without_delaying_the_others() {
    let node = Node::start(&["--queue-capacity", "8"]);
    let auth = bearer(&token("slowpoke"));
    let mut slow = Sse::connect_slow(&node.url("/events"), &[("authorization", &auth)])
        .await
        .expect("slow client connects");
    slow.wait_ready(WAIT).await;
    let mut fast = Sse::open(&node, &token("speedy")).await;

    // From here on the slow client reads nothing; its socket fills up.
    let big = "x".repeat(60_000);
    let publisher = publisher_token();
    for i in 0..200 {
        let data = format!("{i:03}:{big}");
        let (status, reply) = publish(
            &node,
            &publisher,
            &json!({"channel": "broadcast", "data": data}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "publish {i}: {reply}");
        let event = fast
            .next_data(WAIT)
            .await
            .unwrap_or_else(|| panic!("the normal client stalled at message {i}"));
        assert!(
            event.data() == data,
            "normal client: message {i} wrong (starts {:?})",
            &event.data()[..event.data().len().min(10)]
        );
    }

    wait_metric(
        &node,
        "herald_connections_closed_total{reason=\"slow\"}",
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    // Once it reads again, the slow client finds its stream closed, short of
    // the 200 messages.
    let rest = slow
        .read_to_end(WAIT)
        .await
        .expect("the slow client's stream should be closed by the server");
    let received = rest.iter().filter(|e| e.is_message()).count();
    assert!(received < 200, "slow client got all {received} messages");

    publish_ok(&node, "broadcast", json!("after")).await;
    assert_eq!(
        fast.next_data(WAIT)
            .await
            .expect("normal client unaffected")
            .data(),
        "after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_clients_are_removed_and_unsubscribed() {
    // A short heartbeat bounds how long a write to a dead socket can wait.
    let node = Node::start(&["--heartbeat", "1s"]);
    let baseline = metric(&node, "herald_subscribed_channels").await;

    let mut conns = Vec::new();
    for user in 0..10 {
        for _ in 0..2 {
            conns.push(Sse::open(&node, &token(&format!("dead-{user}"))).await);
        }
    }
    wait_metric(&node, "herald_connections", WAIT, |v| v == 20.0).await;
    let subscribed = metric(&node, "herald_subscribed_channels").await;
    assert!(
        subscribed >= baseline + 10.0,
        "10 users should add 10 subscriptions: {baseline} -> {subscribed}"
    );

    drop(conns);
    wait_metric(&node, "herald_connections", WAIT, |v| v == 0.0).await;
    // `broadcast` may stay subscribed; no user channel may.
    let allowed = baseline.max(1.0);
    wait_metric(&node, "herald_subscribed_channels", WAIT, |v| v <= allowed).await;
    wait_metric(
        &node,
        "herald_connections_closed_total{reason=\"client\"}",
        WAIT,
        |v| v == 20.0,
    )
    .await;
    common::assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_gets_herald_expired_and_the_stream_ends() {
    let node = Node::start(&["--jwt-leeway", "0s"]);
    let mut sse = Sse::open(&node, &Claims::new("alice").exp_in(2).sign()).await;
    publish_ok(&node, "user:alice", json!("while valid")).await;
    assert_eq!(
        sse.next_data(WAIT).await.expect("message").data(),
        "while valid"
    );

    let rest = sse
        .read_to_end(Duration::from_secs(8))
        .await
        .expect("the stream should end once the token expires");
    let last = rest
        .iter()
        .rev()
        .find(|e| e.dispatches())
        .unwrap_or_else(|| panic!("no event before the end: {rest:?}"));
    assert_eq!(last.name(), "herald.expired", "{rest:?}");
    wait_metric(
        &node,
        "herald_connections_closed_total{reason=\"expired\"}",
        WAIT,
        |v| v == 1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_retry_to_every_stream_and_exits_zero() {
    let mut node = Node::start(&["--drain-timeout", "5s"]);
    assert_eq!(get(&node.admin_url("/readyz")).await.status, StatusCode::OK);
    assert_eq!(
        get(&node.admin_url("/healthz")).await.status,
        StatusCode::OK
    );
    let mut streams = Vec::new();
    for user in ["a", "b", "c"] {
        streams.push(Sse::open(&node, &token(user)).await);
    }

    node.signal("TERM");
    for (i, sse) in streams.iter_mut().enumerate() {
        let rest = sse
            .read_to_end(Duration::from_secs(6))
            .await
            .unwrap_or_else(|| panic!("stream {i} still open after SIGTERM"));
        if !rest.iter().any(|e| e.retry.is_some_and(|ms| ms > 0)) {
            let exited = node.exit_status().map(|s| s.to_string());
            panic!(
                "stream {i} should get a retry: hint before closing: {rest:?} \
                 (process exit so far: {exited:?})"
            );
        }
    }
    let status = node.wait_exit(Duration::from_secs(6)).await;
    assert_eq!(status.code(), Some(0), "herald exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_too() {
    let mut node = Node::start(&[]);
    let mut sse = Sse::open(&node, &token("alice")).await;
    node.signal("INT");
    sse.read_to_end(Duration::from_secs(10))
        .await
        .expect("stream closed on SIGINT");
    let status = node.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "herald exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_gets_heartbeat_comments() {
    let node = Node::start(&["--heartbeat", "200ms"]);
    let mut sse = Sse::open(&node, &token("alice")).await;
    for n in 0..2 {
        let frame = sse
            .next_event(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("no heartbeat {n} on an idle stream"));
        assert!(
            frame.comment.is_some() && !frame.dispatches(),
            "heartbeat should be a comment, got {frame:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_connection_is_retired_with_a_jittered_retry_and_resumes_by_cursor() {
    let node = Node::start(&["--max-connection-age", "2s", "--retry", "1s"]);
    let alice = token("alice");
    let opened = std::time::Instant::now();
    let mut sse = Sse::open(&node, &alice).await;
    publish_ok(&node, "user:alice", json!("before")).await;
    assert_eq!(sse.next_data(WAIT).await.expect("live").data(), "before");

    let rest = sse
        .read_to_end(Duration::from_secs(5))
        .await
        .expect("the stream should end at its maximum age");
    let age = opened.elapsed();
    assert!(
        age >= Duration::from_millis(1_800),
        "retired at {age:?}, before 2 s − 10 %"
    );
    let retry = rest.iter().rev().find_map(|e| e.retry);
    assert!(
        retry.is_some_and(|ms| (500..=2_000).contains(&ms)),
        "the last frame should be a jittered retry: around 1 s: {rest:?}"
    );
    wait_metric(
        &node,
        "herald_connections_closed_total{reason=\"max_age\"}",
        WAIT,
        |v| v == 1.0,
    )
    .await;

    // What is published while it is away comes back on resume, once.
    publish_ok(&node, "user:alice", json!("while away")).await;
    let cursor = sse.last_id().expect("messages carry ids").to_string();
    let (_again, replayed) = Sse::resume(&node, "/events", &alice, &cursor).await;
    let data: Vec<_> = replayed
        .iter()
        .filter(|e| e.is_message())
        .map(|e| e.data().to_owned())
        .collect();
    assert_eq!(data, ["while away"]);
}
