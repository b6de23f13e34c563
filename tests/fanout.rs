//! Who receives what: user channels, broadcast, topics, and what a message
//! looks like on the wire.

mod common;

use std::collections::BTreeSet;

use common::{
    bearer, payloads, publish, publish_ok, publish_raw, publisher_token, token, Claims, Node, Sse,
    WAIT,
};
use futures_util::future::join_all;
use hyper::StatusCode;
use serde_json::{json, Value};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_gets_its_own_users_messages_and_every_broadcast() {
    let node = Node::start(&[]);
    let users: Vec<String> = (0..50).map(|u| format!("u{u}")).collect();

    // 2 or 3 connections per user, all opened concurrently.
    let node_ref = &node;
    let opening = users.iter().enumerate().flat_map(|(i, user)| {
        (0..2 + i % 2)
            .map(move |_| async move { (user.clone(), Sse::open(node_ref, &token(user)).await) })
    });
    let mut conns: Vec<(String, Sse)> = join_all(opening).await;
    assert_eq!(conns.len(), 125);
    for (user, sse) in &conns {
        let ready = sse.ready().json();
        assert_eq!(ready["user"], user.as_str());
        let channels: BTreeSet<&str> = ready["channels"]
            .as_array()
            .expect("herald.ready lists channels")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            channels,
            BTreeSet::from([format!("user:{user}").as_str(), "broadcast"])
        );
    }

    let broadcasts = ["b-first", "b-middle", "b-last"];
    publish_ok(&node, "broadcast", json!(broadcasts[0])).await;
    for (i, user) in users.iter().enumerate() {
        publish_ok(&node, &format!("user:{user}"), json!(format!("for-{user}"))).await;
        if i == users.len() / 2 {
            publish_ok(&node, "broadcast", json!(broadcasts[1])).await;
        }
    }
    publish_ok(&node, "broadcast", json!(broadcasts[2])).await;
    publish_ok(&node, "broadcast", json!("end")).await;

    let reading = conns.iter_mut().map(|(user, sse)| async move {
        let mut expected: BTreeSet<String> = broadcasts.iter().map(|b| b.to_string()).collect();
        expected.insert(format!("for-{user}"));
        expected.insert("end".to_string());
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        while !expected.iter().all(|e| got.contains(e)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match sse.next_data(left).await {
                Some(event) => got.push(event.data().to_string()),
                None => break,
            }
        }
        (user.clone(), expected, got)
    });
    for (user, expected, got) in join_all(reading).await {
        let got_set: BTreeSet<String> = got.iter().cloned().collect();
        assert_eq!(got_set, expected, "{user} received {got:?}");
        assert_eq!(got.len(), expected.len(), "{user} got duplicates: {got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_need_a_matching_claim() {
    let node = Node::start(&[]);
    let alice = Claims::new("alice").topics(&["news", "orders.*"]).sign();

    let sse = Sse::open_at(&node, "/events?topic=news", &alice).await;
    assert!(
        sse.ready().json()["channels"]
            .as_array()
            .is_some_and(|c| c.contains(&json!("topic:news"))),
        "herald.ready should list topic:news: {:?}",
        sse.ready()
    );
    Sse::open_at(&node, "/events?topic=orders.1", &alice).await;
    Sse::open_at(&node, "/events?topic=news&topic=orders.eu.7", &alice).await;

    let forbidden = [
        (alice.as_str(), "/events?topic=sports"),
        (alice.as_str(), "/events?topic=orders"),
        (alice.as_str(), "/events?topic=news&topic=sports"),
        (alice.as_str(), "/events?topic=new"),
    ];
    let no_topics = token("bob");
    for (token, path) in forbidden
        .into_iter()
        .chain([(no_topics.as_str(), "/events?topic=news")])
    {
        let auth = bearer(token);
        let reply = Sse::connect(&node.url(path), &[("authorization", &auth)])
            .await
            .expect_err(&format!("{path} must be refused"));
        assert_eq!(
            reply.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            reply.text()
        );
        reply.assert_json_error(StatusCode::FORBIDDEN);
    }
    assert!(
        common::metric(
            &node,
            "herald_connections_rejected_total{reason=\"forbidden\"}"
        )
        .await
            >= 5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_message_reaches_only_its_subscribers() {
    let node = Node::start(&[]);
    let reader = |sub: &str| Claims::new(sub).topics(&["news", "orders.*"]).sign();
    let mut news = Sse::open_at(&node, "/events?topic=news", &reader("alice")).await;
    let mut plain = Sse::open(&node, &reader("alice")).await;
    let mut other = Sse::open(&node, &reader("bob")).await;
    let mut orders = Sse::open_at(&node, "/events?topic=orders.1", &reader("carol")).await;
    let mut both = Sse::open_at(&node, "/events?topic=news&topic=orders.2", &reader("dave")).await;

    publish_ok(&node, "topic:news", json!("n1")).await;
    publish_ok(&node, "topic:orders.1", json!("o1")).await;
    publish_ok(&node, "topic:orders.2", json!("o2")).await;
    publish_ok(&node, "topic:sports", json!("s1")).await;
    publish_ok(&node, "broadcast", json!("end")).await;

    for (name, sse, expected) in [
        ("news", &mut news, vec!["n1", "end"]),
        ("plain", &mut plain, vec!["end"]),
        ("other", &mut other, vec!["end"]),
        ("orders", &mut orders, vec!["o1", "end"]),
        ("both", &mut both, vec!["n1", "o2", "end"]),
    ] {
        let seen = sse.collect_until(WAIT, |e| e.data() == "end").await;
        assert_eq!(payloads(&seen), expected, "{name} stream");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_on_the_wire_look_like_the_readme() {
    let node = Node::start(&[]);
    let mut sse = Sse::open(&node, &token("alice")).await;
    let publisher = publisher_token();

    // A JSON string is sent as-is, one data: line per line.
    let (status, reply) = publish(
        &node,
        &publisher,
        &json!({"channel": "user:alice", "event": "notice", "data": "line one\nline two"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let event = sse.next_data(WAIT).await.expect("the notice");
    assert_eq!(event.name(), "notice");
    assert_eq!(event.data(), "line one\nline two");
    let id = event.id.clone().expect("every message carries an id");
    assert!(id.starts_with("v1."), "cursor id {id:?} should be v1.<...>");

    // Anything else is compact JSON, whatever the publisher's spacing.
    let reply = publish_raw(
        &node,
        &publisher,
        r#"{ "channel" : "user:alice", "data" : { "a" : 1, "b" : [ 1, 2 ], "c" : "x y" } }"#,
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let event = sse.next_data(WAIT).await.expect("the object");
    assert_eq!(event.name(), "message", "no event name means `message`");
    assert_eq!(event.data(), r#"{"a":1,"b":[1,2],"c":"x y"}"#);

    publish_ok(&node, "user:alice", json!(42)).await;
    assert_eq!(sse.next_data(WAIT).await.expect("the number").data(), "42");

    // The connection's cursor moves with every message.
    assert_ne!(sse.last_id(), Some(id.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carriage_returns_in_data_cannot_forge_sse_fields() {
    let node = Node::start(&[]);
    let mut sse = Sse::open(&node, &token("alice")).await;
    // CR alone ends a line in SSE: sent raw, this would start an `event:` line.
    publish_ok(
        &node,
        "user:alice",
        json!("safe\revent: herald.expired\r\ndata: evil"),
    )
    .await;
    let event = sse.next_data(WAIT).await.expect("the message");
    assert_eq!(event.name(), "message", "injected event name: {event:?}");
    assert_eq!(event.data(), "safe\nevent: herald.expired\ndata: evil");
    publish_ok(&node, "user:alice", json!("after")).await;
    assert_eq!(
        sse.next_data(WAIT).await.expect("still open").data(),
        "after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_publish_returns_ids_and_delivers_in_order() {
    let node = Node::start(&[]);
    let mut sse = Sse::open(&node, &token("alice")).await;
    let (status, reply) = publish(
        &node,
        &publisher_token(),
        &json!({"messages": [
            {"channel": "user:alice", "data": "first"},
            {"channel": "broadcast", "event": "news", "data": "second"},
            {"channel": "user:alice", "data": {"n": 3}},
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    let ids = reply["ids"].as_array().expect("{\"ids\": [...]}");
    assert_eq!(ids.len(), 3, "{reply}");
    for id in ids {
        let id = id.as_str().expect("ids are strings");
        let (ms, seq) = id.split_once('-').expect("<ms>-<seq>");
        assert!(
            ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok(),
            "id {id:?} should be <ms>-<seq>"
        );
    }
    let got = sse.collect(3, WAIT).await;
    assert_eq!(payloads(&got), ["first", "second", r#"{"n":3}"#]);
    assert_eq!(got[1].name(), "news");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_connections_of_a_user_share_one_identity() {
    let node = Node::start(&[]);
    let auth = bearer(&token("alice"));
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut sse = Sse::connect(&node.url("/events"), &[("authorization", &auth)])
            .await
            .expect("tab opens");
        sse.wait_ready(WAIT).await;
        tabs.push(sse);
    }
    publish_ok(&node, "user:alice", json!("to every tab")).await;
    for tab in &mut tabs {
        assert_eq!(
            tab.next_data(WAIT).await.expect("each tab").data(),
            "to every tab"
        );
    }
}
