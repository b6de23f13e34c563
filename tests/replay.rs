//! Resuming with `Last-Event-ID`: replay of what a client missed, and
//! `herald.reset` when that is impossible.

mod common;

use common::{payloads, publish_ok, token, Claims, Event, Node, Sse, WAIT};
use serde_json::{json, Value};

fn resets(events: &[Event]) -> Vec<&Event> {
    events
        .iter()
        .filter(|e| e.name() == "herald.reset")
        .collect()
}

/// The channels a `herald.reset` names.
fn reset_channels(event: &Event) -> Vec<String> {
    event.json()["channels"]
        .as_array()
        .unwrap_or_else(|| panic!("herald.reset data should be {{\"channels\": [...]}}: {event:?}"))
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect()
}

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_replays_exactly_the_missed_messages_then_goes_live() {
    let node = Node::start(&[]);
    let alice = token("alice");

    let mut sse = Sse::open(&node, &alice).await;
    for data in numbered("before", 3) {
        publish_ok(&node, "user:alice", json!(data)).await;
    }
    let seen = sse.collect(3, WAIT).await;
    assert_eq!(payloads(&seen), numbered("before", 3));
    let cursor = sse.last_id().expect("messages carry ids").to_string();
    drop(sse);

    for data in numbered("missed", 20) {
        publish_ok(&node, "user:alice", json!(data)).await;
    }

    let (mut sse, before_ready) = Sse::resume(&node, "/events", &alice, &cursor).await;
    assert!(
        resets(&before_ready).is_empty(),
        "nothing was lost, yet: {before_ready:?}"
    );
    assert_eq!(
        payloads(&before_ready),
        numbered("missed", 20),
        "replay must be exactly the missed messages, in order, before herald.ready"
    );
    assert!(
        before_ready
            .iter()
            .filter(|e| e.is_message())
            .all(|e| e.id.as_deref().is_some_and(|id| id.starts_with("v1."))),
        "replayed messages carry cursors"
    );

    publish_ok(&node, "user:alice", json!("live")).await;
    assert_eq!(
        sse.next_data(WAIT).await.expect("live after replay").data(),
        "live"
    );

    // Resuming from the newest cursor replays nothing: no duplicates.
    let cursor = sse.last_id().expect("cursor").to_string();
    drop(sse);
    let (_sse, before_ready) = Sse::resume(&node, "/events", &alice, &cursor).await;
    assert!(
        payloads(&before_ready).is_empty() && resets(&before_ready).is_empty(),
        "caught-up cursor should replay nothing: {before_ready:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_id_is_a_cursor_too() {
    let node = Node::start(&[]);
    let alice = token("alice");
    let sse = Sse::open(&node, &alice).await;
    let cursor = sse
        .ready()
        .id
        .clone()
        .expect("herald.ready carries an id so a fresh client can resume");
    drop(sse);
    for data in numbered("missed", 5) {
        publish_ok(&node, "user:alice", json!(data)).await;
    }
    let (_sse, before_ready) = Sse::resume(&node, "/events", &alice, &cursor).await;
    assert!(resets(&before_ready).is_empty(), "{before_ready:?}");
    assert_eq!(payloads(&before_ready), numbered("missed", 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_covers_every_channel_of_the_connection() {
    let node = Node::start(&[]);
    let alice = Claims::new("alice").topics(&["news"]).sign();
    let path = "/events?topic=news";
    let sse = Sse::open_at(&node, path, &alice).await;
    let cursor = sse.ready().id.clone().expect("ready id");
    drop(sse);

    let mut expected = Vec::new();
    for i in 0..3 {
        for channel in ["user:alice", "broadcast", "topic:news"] {
            let data = format!("{channel}-{i}");
            publish_ok(&node, channel, json!(data)).await;
            expected.push(data);
        }
        publish_ok(&node, "user:bob", json!("not alice's")).await;
        publish_ok(&node, "topic:sports", json!("not subscribed")).await;
    }

    let (_sse, before_ready) = Sse::resume(&node, path, &alice, &cursor).await;
    assert!(resets(&before_ready).is_empty(), "{before_ready:?}");
    let mut got = payloads(&before_ready);
    // Within a channel the order is the publish order.
    for channel in ["user:alice", "broadcast", "topic:news"] {
        let per_channel: Vec<&String> = got.iter().filter(|d| d.starts_with(channel)).collect();
        let want: Vec<String> = (0..3).map(|i| format!("{channel}-{i}")).collect();
        assert_eq!(per_channel, want.iter().collect::<Vec<_>>(), "{channel}");
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "exactly this connection's channels");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_beyond_the_history_sends_reset_then_ready_then_live() {
    let node = Node::start(&["--history-size", "5"]);
    let alice = token("alice");
    let mut sse = Sse::open(&node, &alice).await;
    publish_ok(&node, "user:alice", json!("seen")).await;
    sse.collect(1, WAIT).await;
    let cursor = sse.last_id().expect("cursor").to_string();
    drop(sse);

    for data in numbered("missed", 20) {
        publish_ok(&node, "user:alice", json!(data)).await;
    }

    let (mut sse, before_ready) = Sse::resume(&node, "/events", &alice, &cursor).await;
    let resets = resets(&before_ready);
    assert_eq!(
        resets.len(),
        1,
        "one herald.reset before ready: {before_ready:?}"
    );
    let channels = reset_channels(resets[0]);
    assert!(
        channels.contains(&"user:alice".to_string()),
        "reset should name user:alice: {channels:?}"
    );
    assert!(
        !channels.contains(&"broadcast".to_string()),
        "broadcast lost nothing and must not be reset: {channels:?}"
    );

    publish_ok(&node, "user:alice", json!("live")).await;
    assert_eq!(sse.next_data(WAIT).await.expect("live").data(), "live");
    assert!(common::metric(&node, "herald_history_resets_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_cursor_sends_reset() {
    let node = Node::start(&[]);
    let alice = token("alice");
    for garbage in [
        "garbage",
        "v1.!!!not-base64!!!",
        "v1.",
        "v99.e30",
        "1732240000000-0",
    ] {
        let (mut sse, before_ready) = Sse::resume(&node, "/events", &alice, garbage).await;
        let resets = resets(&before_ready);
        assert_eq!(
            resets.len(),
            1,
            "Last-Event-ID {garbage:?} should give one herald.reset before ready: {before_ready:?}"
        );
        assert!(
            !reset_channels(resets[0]).is_empty(),
            "reset should name the channels: {:?}",
            resets[0]
        );
        assert!(payloads(&before_ready).is_empty());

        let live = format!("live after {garbage}");
        publish_ok(&node, "user:alice", json!(live)).await;
        assert_eq!(sse.next_data(WAIT).await.expect("live").data(), live);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursor_entries_for_channels_not_requested_any_more_are_ignored() {
    let node = Node::start(&[]);
    let with_news = Claims::new("alice").topics(&["news"]).sign();
    let sse = Sse::open_at(&node, "/events?topic=news", &with_news).await;
    let cursor = sse.ready().id.clone().expect("ready id");
    drop(sse);
    publish_ok(&node, "topic:news", json!("news while away")).await;
    publish_ok(&node, "user:alice", json!("mine while away")).await;

    // The app reconnects with a token that no longer grants the topic.
    let (_sse, before_ready) = Sse::resume(&node, "/events", &token("alice"), &cursor).await;
    assert!(resets(&before_ready).is_empty(), "{before_ready:?}");
    assert_eq!(payloads(&before_ready), ["mine while away"]);
}
