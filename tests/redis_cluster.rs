//! Many nodes, one Redis: every node serves every user, whatever node or
//! publish path a message took, and a client may resume on any node.
//!
//! Each test starts its own `redis-server` on a free port and real `herald`
//! nodes with `--redis-url`; apps publishing straight to Redis are played by
//! a plain RESP client running the shipped publish script.

mod common;

use std::collections::BTreeSet;

use common::resp::{pubsub_key, Resp};
use common::{
    assert_still_serves, get, metric, payloads, publish, publish_ok, publisher_token, token,
    wait_metric, wait_until, Event, Node, Redis, Sse, WAIT,
};
use hyper::StatusCode;
use serde_json::{json, Value};

/// A node on `redis` with `extra` flags, once `/readyz` says it is connected.
async fn redis_node(redis: &Redis, extra: &[&str]) -> Node {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str()];
    args.extend_from_slice(extra);
    let node = Node::start(&args);
    let ready = wait_until(WAIT, || async {
        get(&node.admin_url("/readyz")).await.status == StatusCode::OK
    })
    .await;
    assert!(
        ready,
        "node on {url} never became ready\nstderr:\n{}",
        node.stderr_tail()
    );
    node
}

/// `(event name, data)` of the application messages among `events`.
fn named(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e.is_message())
        .map(|e| (e.name().to_string(), e.data().to_string()))
        .collect()
}

/// Reads application messages until one whose data is `last` (inclusive).
async fn read_through(sse: &mut Sse, last: &str) -> Vec<Event> {
    let seen = sse
        .collect_until(WAIT, |e| e.is_message() && e.data() == last)
        .await;
    for event in &seen {
        assert!(
            !event.dispatches() || event.is_message(),
            "unexpected control event mid-stream: {event:?}"
        );
        if event.is_message() {
            assert!(
                event.id.as_deref().is_some_and(|id| id.starts_with("v1.")),
                "a published message carries a cursor id: {event:?}"
            );
        }
    }
    seen
}

/// How a test message gets into Redis.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// `POST /publish` on node N.
    Node(usize),
    /// EVALSHA of the publish script from a plain Redis client.
    Script,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_every_publish_path_to_every_node_and_keep_users_apart() {
    let redis = Redis::start();
    let nodes = [
        redis_node(&redis, &[]).await,
        redis_node(&redis, &[]).await,
        redis_node(&redis, &[]).await,
    ];
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;

    // alice is on nodes 0 and 2 at once; bob on 1; carol on 2. dave never
    // connects.
    let mut clients = [
        ("alice", Sse::open(&nodes[0], &token("alice")).await),
        ("alice", Sse::open(&nodes[2], &token("alice")).await),
        ("bob", Sse::open(&nodes[1], &token("bob")).await),
        ("carol", Sse::open(&nodes[2], &token("carol")).await),
    ];
    for ((_, sse), node) in clients.iter().zip([0, 2, 1, 2]) {
        assert_eq!(
            sse.ready().json()["node"],
            nodes[node].id(),
            "each client is served by the node it connected to"
        );
    }

    // (channel, event or "", data JSON, path). Every message's data names
    // itself so a misdelivery is obvious in the failure message.
    let plan: Vec<(&str, &str, Value, Via)> = vec![
        ("user:bob", "", json!("bob-1 via node0"), Via::Node(0)),
        (
            "user:alice",
            "notice",
            json!("alice-1 via node1"),
            Via::Node(1),
        ),
        ("user:carol", "", json!("carol-1 via node1"), Via::Node(1)),
        ("broadcast", "news", json!("all-1 via node2"), Via::Node(2)),
        ("user:dave", "", json!("dave-1 via node2"), Via::Node(2)),
        (
            "user:alice",
            "notice",
            json!("alice-2 via script"),
            Via::Script,
        ),
        (
            "user:bob",
            "",
            json!({"bob": 2, "via": "script"}),
            Via::Script,
        ),
        (
            "user:carol",
            "order.created:v2",
            json!("carol-2 via script"),
            Via::Script,
        ),
        ("broadcast", "", json!("all-2 via script"), Via::Script),
        ("user:dave", "", json!("dave-2 via script"), Via::Script),
        ("user:alice", "", json!("alice-3 via node2"), Via::Node(2)),
        ("user:bob", "", json!("bob-3 via node1"), Via::Node(1)),
        ("broadcast", "", json!("end"), Via::Script),
    ];
    for (channel, event, data, via) in &plan {
        match via {
            Via::Node(n) => {
                let mut body = json!({ "channel": channel, "data": data });
                if !event.is_empty() {
                    body["event"] = json!(event);
                }
                let (status, reply) = publish(&nodes[*n], &publisher_token(), &body).await;
                assert_eq!(status, StatusCode::OK, "publish {body} -> {reply}");
            }
            Via::Script => {
                let id = app
                    .script_publish(&sha, channel, event, &data.to_string())
                    .await;
                assert!(id.contains('-'), "the script returns a stream id: {id}");
            }
        }
    }

    for (user, sse) in &mut clients {
        let own = format!("user:{user}");
        let expected: Vec<(String, String)> = plan
            .iter()
            .filter(|(channel, ..)| *channel == own || *channel == "broadcast")
            .map(|(_, event, data, _)| {
                let name = if event.is_empty() { "message" } else { event };
                let text = data
                    .as_str()
                    .map_or_else(|| data.to_string(), str::to_string);
                (name.to_string(), text)
            })
            .collect();
        let seen = read_through(sse, "end").await;
        // One pub/sub connection per node and awaited publishes: each node
        // sees Redis' publish order, so the whole sequence is exact.
        assert_eq!(
            named(&seen),
            expected,
            "{user} must get exactly their own messages and every broadcast"
        );
    }

    // Nothing else is queued behind "end" for anyone.
    publish_ok(&nodes[1], "broadcast", json!("after")).await;
    for (user, sse) in &mut clients {
        let next = sse.next_data(WAIT).await;
        assert_eq!(
            next.as_ref().map(Event::data),
            Some("after"),
            "{user}: the next event after `end` is the next broadcast"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_a_user_channel_only_while_it_holds_that_user() {
    // A short heartbeat bounds how long a node takes to notice a closed
    // socket (the next write fails).
    let redis = Redis::start();
    let a = redis_node(&redis, &["--heartbeat", "300ms"]).await;
    let b = redis_node(&redis, &["--heartbeat", "300ms"]).await;
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;
    let alice_key = pubsub_key("user:alice");
    let broadcast_key = pubsub_key("broadcast");
    // The nodes' own control channel is always subscribed, like broadcast.
    let control_key = pubsub_key("herald.control");

    assert!(
        wait_until(WAIT, || async {
            app_numsub(redis.port(), &broadcast_key).await == 2
        })
        .await,
        "both nodes subscribe broadcast at start"
    );
    assert!(
        !app.pubsub_channels("herald:{*").await.contains(&alice_key),
        "nobody holds alice yet"
    );

    let a1 = Sse::open(&a, &token("alice")).await;
    let mut a2 = Sse::open(&a, &token("alice")).await;
    let b1 = Sse::open(&b, &token("alice")).await;
    // herald.ready means the subscription is live: no polling needed.
    let channels = app.pubsub_channels("herald:{*").await;
    assert_eq!(
        channels,
        BTreeSet::from([
            alice_key.clone(),
            broadcast_key.clone(),
            control_key.clone()
        ]),
        "PUBSUB CHANNELS while alice is connected"
    );
    assert_eq!(
        app.numsub(&alice_key).await,
        2,
        "one subscription per node, however many connections it holds"
    );

    // Close one of the two connections on node a: a still needs the channel.
    drop(a1);
    wait_metric(&a, "herald_connections", WAIT, |v| v == 1.0).await;
    app.script_publish(&sha, "user:alice", "", r#""still subscribed""#)
        .await;
    let next = a2.next_data(WAIT).await;
    assert_eq!(
        next.as_ref().map(Event::data),
        Some("still subscribed"),
        "the remaining connection on node a still receives"
    );
    assert_eq!(app.numsub(&alice_key).await, 2);

    // The last connection on node a: a unsubscribes, b keeps its own.
    drop(a2);
    assert!(
        wait_until(WAIT, || async {
            app_numsub(redis.port(), &alice_key).await == 1
        })
        .await,
        "node a unsubscribes user:alice after its last alice connection; numsub {}",
        app.numsub(&alice_key).await
    );

    // alice's last connection anywhere: the channel disappears from Redis.
    drop(b1);
    let gone = wait_until(WAIT, || async {
        let mut app = Resp::connect(redis.port()).await;
        !app.pubsub_channels("herald:{*").await.contains(&alice_key)
    })
    .await;
    assert!(
        gone,
        "PUBSUB CHANNELS still lists {alice_key} after alice left: {:?}",
        app.pubsub_channels("herald:{*").await
    );
    assert_eq!(
        app.pubsub_channels("herald:{*").await,
        BTreeSet::from([broadcast_key.clone(), control_key.clone()]),
        "broadcast stays subscribed with no connection at all"
    );
    assert_eq!(app.numsub(&broadcast_key).await, 2);

    // Coming back subscribes again.
    let mut again = Sse::open(&b, &token("alice")).await;
    assert_eq!(app.numsub(&alice_key).await, 1);
    app.script_publish(&sha, "user:alice", "", r#""welcome back""#)
        .await;
    let next = again.next_data(WAIT).await;
    assert_eq!(next.as_ref().map(Event::data), Some("welcome back"));
}

/// `PUBSUB NUMSUB` on a fresh connection (for use inside polling closures).
async fn app_numsub(port: u16, key: &str) -> i64 {
    Resp::connect(port).await.numsub(key).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_one_node_resumes_on_another_with_exactly_the_missed_messages() {
    let redis = Redis::start();
    let a = redis_node(&redis, &[]).await;
    let b = redis_node(&redis, &[]).await;
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;
    let alice = token("alice");

    let mut on_a = Sse::open(&a, &alice).await;
    publish_ok(&a, "user:alice", json!("m1")).await;
    publish_ok(&b, "broadcast", json!("m2")).await;
    app.script_publish(&sha, "user:alice", "", r#""m3""#).await;
    let first = on_a.collect(3, WAIT).await;
    assert_eq!(payloads(&first), ["m1", "m2", "m3"]);
    let cursor = on_a.last_id().expect("messages carry a cursor").to_string();
    drop(on_a);

    // Missed while away, through every path; plus traffic that is not
    // alice's and must not be replayed to her.
    publish_ok(&b, "user:alice", json!("m4")).await;
    publish_ok(&a, "user:bob", json!("bob's")).await;
    app.script_publish(&sha, "broadcast", "", r#""m5""#).await;
    app.script_publish(&sha, "user:alice", "notice", r#"{"n":6}"#)
        .await;
    app.script_publish(&sha, "user:carol", "", r#""carol's""#)
        .await;

    let (mut on_b, replayed) = Sse::resume(&b, "/events", &alice, &cursor).await;
    assert!(
        replayed.iter().all(|e| e.name() != "herald.reset"),
        "the cursor is within history: no reset; got {replayed:#?}"
    );
    // Order holds per channel. Across channels it is only as good as the
    // stream ids: two streams written in the same millisecond have their
    // own sequence numbers, so m5 (broadcast) may sort either side of m6.
    let got = named(&replayed);
    let m = |name: &str, data: &str| (name.to_string(), data.to_string());
    let user: Vec<_> = got.iter().filter(|(_, d)| d != "m5").cloned().collect();
    assert_eq!(
        user,
        [m("message", "m4"), m("notice", r#"{"n":6}"#)],
        "alice's missed messages, in order, before herald.ready; got {got:?}"
    );
    assert_eq!(
        got.iter().filter(|(_, d)| d == "m5").count(),
        1,
        "the missed broadcast, once; got {got:?}"
    );
    assert_eq!(got.len(), 3, "nothing else is replayed: {got:?}");
    assert_eq!(on_b.ready().json()["node"], b.id());
    assert_eq!(metric(&b, "herald_replayed_messages_total").await, 3.0);

    // Then live, with nothing replayed twice.
    publish_ok(&a, "user:alice", json!("m7")).await;
    let next = on_b.next_data(WAIT).await;
    assert_eq!(next.as_ref().map(Event::data), Some("m7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_published_on_a_herald_channel_is_counted_and_never_delivered() {
    let redis = Redis::start();
    let node = redis_node(&redis, &["--max-payload", "1KiB"]).await;
    let mut app = Resp::connect(redis.port()).await;
    let mut alice = Sse::open(&node, &token("alice")).await;
    let alice_key = pubsub_key("user:alice");
    let broadcast_key = pubsub_key("broadcast");

    let oversize = json!({ "data": "x".repeat(2048) }).to_string();
    let long_event = json!({ "data": 1, "event": "e".repeat(65) }).to_string();
    let bad: Vec<(&str, &[u8])> = vec![
        (&alice_key, b"garbage"),
        (&alice_key, b""),
        (&alice_key, b"\xff\xfe not utf-8"),
        (&alice_key, br#"{"event":"notice"}"#),
        (&broadcast_key, b"[1,2,3]"),
        (&alice_key, br#"{"data":1,"event":"two words"}"#),
        (&alice_key, long_event.as_bytes()),
        (&alice_key, br#"{"data":1,"event":"line\nbreak"}"#),
        (&alice_key, br#"{"id":"not-an-id","data":1}"#),
        (&alice_key, br#"{"data":}"#),
        (&alice_key, oversize.as_bytes()),
        (&broadcast_key, oversize.as_bytes()),
    ];
    for (key, payload) in &bad {
        let receivers = app.publish(key, payload).await;
        assert_eq!(receivers, 1, "the node is subscribed to {key}");
    }
    // A well-formed envelope without an id: delivered, live only.
    app.publish(&alice_key, br#"{"event":"notice","data":"fine"}"#)
        .await;

    let next = alice
        .next_data(WAIT)
        .await
        .expect("the valid message arrives");
    assert_eq!(
        (next.name(), next.data()),
        ("notice", "fine"),
        "the first event after the garbage is the valid message"
    );
    assert_eq!(next.id, None, "a message without a stream id has no cursor");
    wait_metric(&node, "herald_messages_invalid_total", WAIT, |v| {
        v >= bad.len() as f64
    })
    .await;
    assert_eq!(
        metric(&node, "herald_messages_invalid_total").await,
        bad.len() as f64,
        "every bad payload is counted once"
    );

    assert!(!alice.ended(), "garbage does not cut the client");
    let ready = get(&node.admin_url("/readyz")).await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "still ready: {}",
        ready.text()
    );
    assert_still_serves(&node).await;
    publish_ok(&node, "user:alice", json!("and then")).await;
    let next = alice.next_data(WAIT).await;
    assert_eq!(next.as_ref().map(Event::data), Some("and then"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_prefixes_keep_two_deployments_on_one_redis_apart() {
    let redis = Redis::start();
    let ours = redis_node(&redis, &[]).await;
    let theirs = redis_node(&redis, &["--channel-prefix", "other"]).await;
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;
    let mut on_ours = Sse::open(&ours, &token("alice")).await;
    let mut on_theirs = Sse::open(&theirs, &token("alice")).await;

    assert_eq!(
        app.pubsub_channels("*{user:alice}").await,
        BTreeSet::from([
            "herald:{user:alice}".to_string(),
            "other:{user:alice}".to_string()
        ]),
        "each deployment subscribes under its own prefix"
    );

    publish_ok(&ours, "user:alice", json!("ours via node")).await;
    publish_ok(&theirs, "user:alice", json!("theirs via node")).await;
    app.script_publish(&sha, "user:alice", "", r#""ours via script""#)
        .await;
    app.script_publish_with(
        &sha,
        "other",
        "1000",
        "user:alice",
        "",
        r#""theirs via script""#,
    )
    .await;
    publish_ok(&ours, "broadcast", json!("end")).await;
    publish_ok(&theirs, "broadcast", json!("end")).await;

    let seen = read_through(&mut on_ours, "end").await;
    assert_eq!(payloads(&seen), ["ours via node", "ours via script", "end"]);
    let seen = read_through(&mut on_theirs, "end").await;
    assert_eq!(
        payloads(&seen),
        ["theirs via node", "theirs via script", "end"]
    );
}
