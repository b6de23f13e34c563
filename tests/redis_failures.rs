//! Redis misbehaving under a running node: subscriber connections killed
//! mid-traffic, Redis SIGKILLed and restarted, Redis absent at start, and a
//! pub/sub connection that stays "up" but silently delivers nothing. In
//! every case a connected user keeps their stream and loses no message.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::resp::Resp;
use common::{
    free_port, get, metric, payloads, publish, publish_ok, publisher_token, token, wait_until,
    Event, Node, Redis, Sse, WAIT,
};
use hyper::StatusCode;
use serde_json::json;
use tokio::time::{Instant, MissedTickBehavior};

async fn readyz(node: &Node) -> StatusCode {
    get(&node.admin_url("/readyz")).await.status
}

/// Keeps reading `sse` (so the test sees every frame as it comes) until
/// `/readyz` answers `want`; returns the frames read meanwhile. Panics if
/// the stream ends or `timeout` passes first.
async fn read_until_readiness(
    sse: &mut Sse,
    node: &Node,
    want: StatusCode,
    timeout: Duration,
) -> Vec<Event> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        if readyz(node).await == want {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never answered {want} within {timeout:?}; frames meanwhile {seen:#?}\nstderr:\n{}",
            node.stderr_tail()
        );
        match sse.next_event(Duration::from_millis(50)).await {
            Some(event) => seen.push(event),
            None => assert!(
                !sse.ended(),
                "the SSE stream was dropped ({:?}); frames before {seen:#?}",
                sse.end_error()
            ),
        }
    }
}

/// Data of an event, panicking with context when there is none.
fn data_of(event: Option<Event>, what: &str) -> String {
    event
        .unwrap_or_else(|| panic!("{what}: no event"))
        .data()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_subscriber_connection_mid_traffic_loses_and_repeats_nothing() {
    const TOTAL: usize = 1000;
    const KILL_AT: [usize; 4] = [150, 400, 650, 850];
    let redis = Redis::start();
    let url = redis.url();
    let node = Node::start(&["--redis-url", &url]);
    let mut alice = Sse::open(&node, &token("alice")).await;
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;

    // An app publishing steadily through the script, one message every
    // 2 ms alternating alice's channel and broadcast, while an operator (or
    // a Redis failover) cuts every pub/sub connection a few times.
    let publisher = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut killed = 0;
        for i in 0..TOTAL {
            tick.tick().await;
            let channel = if i.is_multiple_of(2) {
                "user:alice"
            } else {
                "broadcast"
            };
            app.script_publish(&sha, channel, "", &format!("\"{i}\""))
                .await;
            if KILL_AT.contains(&i) {
                killed += app.kill_pubsub_clients().await;
            }
        }
        killed
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut user, mut broadcast) = (Vec::new(), Vec::new());
    while user.len() + broadcast.len() < TOTAL {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = alice.next_data(left).await else {
            panic!(
                "stream {} after {} user and {} broadcast messages\nstderr:\n{}",
                if alice.ended() {
                    "ended"
                } else {
                    "went silent"
                },
                user.len(),
                broadcast.len(),
                node.stderr_tail()
            );
        };
        assert!(event.is_message(), "unexpected control event: {event:?}");
        let n: usize = event
            .data()
            .parse()
            .unwrap_or_else(|_| panic!("unexpected data {event:?}"));
        if n.is_multiple_of(2) {
            user.push(n);
        } else {
            broadcast.push(n);
        }
    }
    let killed = publisher.await.expect("publisher task");
    assert!(killed > 0, "CLIENT KILL cut no pub/sub connection");

    let want_user: Vec<usize> = (0..TOTAL).step_by(2).collect();
    let want_broadcast: Vec<usize> = (1..TOTAL).step_by(2).collect();
    assert_eq!(user, want_user, "alice's channel: all, once, in order");
    assert_eq!(broadcast, want_broadcast, "broadcast: all, once, in order");
    assert_eq!(
        metric(&node, "herald_connections_opened_total").await,
        1.0,
        "the client never had to reconnect"
    );

    // Nothing is left over either; and once this arrives, the node is back
    // on Redis, so every cut connection has been replaced.
    publish_ok(&node, "user:alice", json!("done")).await;
    assert_eq!(
        data_of(alice.next_data(WAIT).await, "after the run"),
        "done"
    );
    let reconnects = metric(&node, "herald_redis_reconnects_total").await;
    assert!(
        reconnects >= killed as f64,
        "herald_redis_reconnects_total {reconnects} after {killed} cut connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigkill_and_restart_keeps_streams_open_and_resumes_delivery() {
    let mut redis = Redis::start_durable();
    let url = redis.url();
    let node = Node::start(&["--redis-url", &url, "--heartbeat", "500ms"]);
    let mut alice = Sse::open(&node, &token("alice")).await;
    let start_cursor = alice
        .ready()
        .id
        .clone()
        .expect("herald.ready carries a cursor");
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;
    app.script_publish(&sha, "user:alice", "", r#""before""#)
        .await;
    assert_eq!(
        data_of(alice.next_data(WAIT).await, "before the crash"),
        "before"
    );
    assert_eq!(readyz(&node).await, StatusCode::OK);

    redis.kill();
    let during =
        read_until_readiness(&mut alice, &node, StatusCode::SERVICE_UNAVAILABLE, WAIT).await;
    assert_eq!(metric(&node, "herald_redis_connected").await, 0.0);
    // While Redis is gone the stream stays open and keeps beating.
    let mut beats = during.iter().filter(|e| e.comment.is_some()).count();
    let deadline = Instant::now() + WAIT;
    while beats == 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = alice.next_event(left).await.unwrap_or_else(|| {
            panic!(
                "no heartbeat while Redis is down (ended: {})",
                alice.ended()
            )
        });
        assert!(!event.dispatches(), "only heartbeats while down: {event:?}");
        beats += usize::from(event.comment.is_some());
    }
    assert!(
        during.iter().all(|e| !e.dispatches()),
        "only heartbeats while down: {during:#?}"
    );
    assert_eq!(readyz(&node).await, StatusCode::SERVICE_UNAVAILABLE);

    redis.restart();
    let recovering = read_until_readiness(&mut alice, &node, StatusCode::OK, WAIT).await;
    assert!(
        recovering.iter().all(|e| !e.dispatches()),
        "nothing but heartbeats while recovering: {recovering:#?}"
    );
    assert_eq!(metric(&node, "herald_redis_connected").await, 1.0);
    assert!(metric(&node, "herald_redis_reconnects_total").await >= 1.0);

    // The same stream gets what is published after recovery: straight to
    // Redis (the script cache did not survive the restart) and via the node.
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;
    app.script_publish(&sha, "user:alice", "", r#""after""#)
        .await;
    publish_ok(&node, "broadcast", json!("after-broadcast")).await;
    let got = alice.collect(2, WAIT).await;
    // Two channels: order holds within each, not across (the refill after
    // the reconnect may still be reading history when these arrive).
    let mut got_payloads = payloads(&got);
    got_payloads.sort();
    assert_eq!(got_payloads, ["after", "after-broadcast"]);
    assert!(!alice.ended());
    assert_eq!(
        metric(&node, "herald_connections_opened_total").await,
        1.0,
        "the client never reconnected"
    );

    // The history written before the crash survived it (AOF, fsync always):
    // resuming from the very first cursor replays everything.
    let (_resumed, replayed) = Sse::resume(&node, "/events", &token("alice"), &start_cursor).await;
    // alice's channel in order; the broadcast may sort either side of
    // "after" (stream ids only order messages within one channel).
    let mut got = payloads(&replayed);
    assert_eq!(got.len(), 3, "replay across the restart: {replayed:#?}");
    got.retain(|p| p != "after-broadcast");
    assert_eq!(got, ["before", "after"], "replay: {replayed:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_becomes_ready_when_redis_appears() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let node = Node::start(&["--redis-url", &url]);

    // Up (it answers) but not ready, and it says why to publishers.
    let health = get(&node.admin_url("/healthz")).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(readyz(&node).await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(metric(&node, "herald_redis_connected").await, 0.0);
    let body = json!({"channel": "user:alice", "data": "too early"});
    let (status, reply) = publish(&node, &publisher_token(), &body).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "publish with Redis down -> {reply}"
    );
    assert!(reply["error"].is_string(), "JSON error body: {reply}");

    let _redis = Redis::start_on(port, &[]);
    let ready = wait_until(WAIT, || async { readyz(&node).await == StatusCode::OK }).await;
    assert!(
        ready,
        "node never became ready after Redis appeared\nstderr:\n{}",
        node.stderr_tail()
    );
    assert_eq!(metric(&node, "herald_redis_connected").await, 1.0);

    let mut alice = Sse::open(&node, &token("alice")).await;
    publish_ok(&node, "user:alice", json!("served")).await;
    assert_eq!(data_of(alice.next_data(WAIT).await, "once ready"), "served");
}

/// A node whose Redis traffic goes through a [`Proxy`] (probed every
/// 500 ms), alice's stream on it, and an app publishing straight into Redis.
struct Proxied {
    _redis: Redis,
    proxy: Proxy,
    node: Node,
    alice: Sse,
    app: Resp,
    sha: String,
}

impl Proxied {
    async fn start() -> Proxied {
        let redis = Redis::start();
        let proxy = Proxy::start(redis.port()).await;
        let url = proxy.url();
        let node = Node::start(&["--redis-url", &url, "--redis-probe-interval", "500ms"]);
        let alice = Sse::open(&node, &token("alice")).await;
        let mut app = Resp::connect(redis.port()).await;
        let sha = app.load_publish_script().await;
        Proxied {
            _redis: redis,
            proxy,
            node,
            alice,
            app,
            sha,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_pubsub_connection_is_detected_and_its_gap_refilled() {
    let Proxied {
        _redis,
        proxy,
        node,
        mut alice,
        mut app,
        sha,
    } = Proxied::start().await;
    app.script_publish(&sha, "user:alice", "", r#""m1""#).await;
    assert_eq!(
        data_of(alice.next_data(WAIT).await, "through the proxy"),
        "m1"
    );
    assert_eq!(readyz(&node).await, StatusCode::OK);

    // Redis → node goes quiet on every open connection; sockets stay up.
    let accepted = proxy.accepted();
    proxy.blackhole_existing();
    let blackholed_at = Instant::now();
    app.script_publish(&sha, "user:alice", "", r#""m2 during the blackhole""#)
        .await;

    // The probe misses: unready within a few probe intervals.
    let unready = read_until_readiness(
        &mut alice,
        &node,
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(3),
    )
    .await;
    let detected_after = blackholed_at.elapsed();
    assert!(
        unready.iter().all(|e| !e.dispatches()),
        "nothing delivered before detection: {unready:#?}"
    );

    // It reconnects through the proxy (new connections work) and is ready.
    let recovered = read_until_readiness(&mut alice, &node, StatusCode::OK, WAIT).await;
    assert!(
        proxy.accepted() > accepted,
        "the node opened no new connection to Redis"
    );
    assert!(metric(&node, "herald_redis_reconnects_total").await >= 1.0);

    // The message published into the silence arrives (refill), once.
    let mut messages: Vec<Event> = recovered.into_iter().filter(Event::dispatches).collect();
    if messages.is_empty() {
        messages.extend(alice.next_data(WAIT).await);
    }
    assert_eq!(
        payloads(&messages),
        ["m2 during the blackhole"],
        "detected after {detected_after:?}"
    );
    app.script_publish(&sha, "user:alice", "", r#""m3""#).await;
    assert_eq!(
        data_of(alice.next_data(WAIT).await, "after recovery"),
        "m3",
        "m2 is not delivered twice"
    );
    assert!(!alice.ended());
}

/// The refill reads many channels' history in batches, each read answered
/// out of one shared connection: every user must get what was published
/// to them during the silence, once, and nothing of anyone else's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_silence_each_of_many_users_is_refilled_with_their_own_gap() {
    // More users than one refill batch (512 channels).
    const USERS: usize = 700;
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port()).await;
    let url = proxy.url();
    let node = Node::start(&["--redis-url", &url, "--redis-probe-interval", "500ms"]);
    let mut streams = Vec::with_capacity(USERS);
    for i in 0..USERS {
        streams.push(Sse::open(&node, &token(&format!("u{i}"))).await);
    }
    let mut app = Resp::connect(redis.port()).await;
    let sha = app.load_publish_script().await;

    proxy.blackhole_existing();
    for i in 0..USERS {
        let data = format!(r#""gap for u{i}""#);
        app.script_publish(&sha, &format!("user:u{i}"), "", &data)
            .await;
    }
    let ready = wait_until(Duration::from_secs(20), || async {
        readyz(&node).await == StatusCode::OK
            && metric(&node, "herald_redis_reconnects_total").await >= 1.0
    })
    .await;
    assert!(ready, "no reconnect\nstderr:\n{}", node.stderr_tail());
    for i in 0..USERS {
        let data = format!(r#""after for u{i}""#);
        app.script_publish(&sha, &format!("user:u{i}"), "", &data)
            .await;
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let got = stream.collect(2, WAIT).await;
        assert_eq!(
            payloads(&got),
            [format!("gap for u{i}"), format!("after for u{i}")],
            "user u{i}\nstderr:\n{}",
            node.stderr_tail()
        );
        assert!(!stream.ended(), "u{i}'s stream was cut");
    }
    // Nothing more (no copy of either) came meanwhile.
    publish_ok(&node, "broadcast", json!("last")).await;
    for (i, stream) in streams.iter_mut().enumerate() {
        let event = stream.next_data(WAIT).await;
        assert_eq!(data_of(event, "the broadcast"), "last", "user u{i}");
    }
    assert!(
        node.stderr_tail()
            .contains("refilled channels after broker reconnect"),
        "the gap came by refill\nstderr:\n{}",
        node.stderr_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_connection_that_is_late_but_delivering_is_kept() {
    let Proxied {
        _redis,
        proxy,
        node,
        mut alice,
        mut app,
        sha,
    } = Proxied::start().await;

    // Every Redis → node byte now arrives 800 ms late, more than the
    // probe's half-interval: like a node working through a backlog. The
    // messages keep coming, so the connection is slow, not dead.
    proxy.lag_existing(Duration::from_millis(800));
    let sent: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    for m in &sent {
        app.script_publish(&sha, "user:alice", "", &format!("\"{m}\""))
            .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut got = Vec::new();
    while got.len() < sent.len() {
        let event = alice.next_data(WAIT).await;
        got.push(data_of(event, "late, but delivered"));
    }
    assert_eq!(got, sent, "all of them, once, in order");
    assert_eq!(
        metric(&node, "herald_redis_reconnects_total").await,
        0.0,
        "a late connection is not given up: {}",
        node.stderr_tail()
    );
    assert!(!alice.ended());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_answered_late_runs_once() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port()).await;
    let url = proxy.url();
    let node = Node::start(&["--redis-url", &url]);
    let mut alice = Sse::open(&node, &token("alice")).await;
    publish_ok(&node, "user:alice", json!("m1")).await;
    assert_eq!(data_of(alice.next_data(WAIT).await, "m1"), "m1");

    // Redis answers the node's open connections 800 ms late: a loaded
    // machine. The publish must wait for its answer, not time out and run
    // the script again on a fresh connection.
    proxy.lag_existing(Duration::from_millis(800));
    publish_ok(&node, "user:alice", json!("m2")).await;
    let mut app = Resp::connect(redis.port()).await;
    let entries = app.call(&["XLEN", "herald:{user:alice}:h"]).await.int();
    assert_eq!(entries, 2, "m2 was published once");
    assert_eq!(data_of(alice.next_data(WAIT).await, "m2"), "m2");
    publish_ok(&node, "user:alice", json!("m3")).await;
    assert_eq!(
        data_of(alice.next_data(WAIT).await, "m3"),
        "m3",
        "m2 came once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_flushed_from_redis_are_loaded_again_by_the_next_publish_and_replay() {
    let redis = Redis::start();
    let node = Node::start(&["--redis-url", &redis.url()]);
    let mut alice = Sse::open(&node, &token("alice")).await;
    let start_cursor = alice
        .ready()
        .id
        .clone()
        .expect("herald.ready carries a cursor");
    let mut admin = Resp::connect(redis.port()).await;
    publish_ok(&node, "user:alice", json!("first")).await;
    assert_eq!(data_of(alice.next_data(WAIT).await, "first"), "first");

    // An operator's SCRIPT FLUSH (or a failover to a replica that never
    // saw the scripts): the node's next EVALSHA gets NOSCRIPT.
    admin.call_ok(&["SCRIPT", "FLUSH"]).await;
    publish_ok(&node, "user:alice", json!("second")).await;
    assert_eq!(data_of(alice.next_data(WAIT).await, "second"), "second");

    admin.call_ok(&["SCRIPT", "FLUSH"]).await;
    let (_resumed, replayed) = Sse::resume(&node, "/events", &token("alice"), &start_cursor).await;
    assert_eq!(payloads(&replayed), ["first", "second"], "{replayed:#?}");
}
