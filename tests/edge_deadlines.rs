//! The edge's deadlines and caps, against a real node over raw TCP: a head,
//! a body, an idle keep-alive connection each closed within the time the
//! README states (30 s, checked to the second), connections that are not
//! event streams capped by `--max-http-connections`, and a `Content-Length`
//! read by RFC 9110's rule only. Throughout, a normal client is served.
//!
//! The 30 s cases run in parallel, so this binary takes about 31 s.

mod common;

use std::time::{Duration, Instant};

use common::wire::{host, Conn};
use common::{
    assert_still_serves, metric, payloads, publish_ok, publisher_token, token, Node, Sse, WAIT,
};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The head, body and keep-alive deadline the README states.
const DEADLINE: Duration = Duration::from_secs(30);
/// How far past the deadline a close may come.
const SLACK: Duration = Duration::from_secs(1);

/// Waits until the node closes `stream`, reading and discarding whatever it
/// sends; returns when, or panics after the deadline plus slack from `since`.
async fn closed_at(stream: &mut (impl AsyncRead + Unpin), since: Instant) -> Duration {
    let give_up = since + DEADLINE + SLACK;
    let mut sink = [0u8; 4096];
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return since.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("still open {:?} after it started", since.elapsed()),
        }
    }
}

/// Asserts a close came at the deadline: not before it, at most `SLACK` after.
fn assert_at_deadline(what: &str, elapsed: Duration) {
    assert!(
        elapsed + SLACK >= DEADLINE && elapsed <= DEADLINE + SLACK,
        "{what}: closed after {elapsed:?}, expected {DEADLINE:?} (±{SLACK:?})"
    );
}

/// Keeps checking, until `until`, that a fresh client is served.
async fn serve_throughout(node: &Node, until: Instant) {
    while Instant::now() < until {
        assert_still_serves(node).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}

fn publish_head(node: &Node, token: &str, framing: &str) -> String {
    format!(
        "POST /publish HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\n{framing}\r\n",
        host(node)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_with_unicode_spaces_is_400_and_publishes_nothing() {
    let node = Node::start(&[]);
    let mut sse = Sse::open(&node, &token("alice")).await;
    let body = json!({ "channel": "user:alice", "data": "smuggled" }).to_string();
    for length in [
        format!("{}\u{a0}", body.len()),
        format!("\u{2003}{}", body.len()),
    ] {
        let mut conn = Conn::open(&node).await;
        let head = publish_head(
            &node,
            &publisher_token(),
            &format!("Content-Length: {length}\r\n"),
        );
        conn.send(format!("{head}{body}").as_bytes()).await;
        let response = conn.response().await;
        assert_eq!(response.status, 400, "{length:?}: {response:?}");
        assert!(response.json()["error"].is_string());
        assert!(conn.closes().await, "a refused request ends the connection");
    }
    publish_ok(&node, "user:alice", json!("after")).await;
    let events = sse.collect(1, WAIT).await;
    assert_eq!(payloads(&events), ["after"], "nothing else was published");
    assert_eq!(metric(&node, "herald_messages_published_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_completes_is_closed_at_the_body_deadline() {
    let node = Node::start(&[]);
    // A browser's token (no `publish` claim) is enough to get this far.
    let browser = token("mallory");
    let cases = [
        ("chunked", "Transfer-Encoding: chunked\r\n", "10\r\n{\"chan"),
        ("HTTP/1.1 length", "Content-Length: 100\r\n", "{\"channel\""),
    ];
    let mut waits = Vec::new();
    for (name, framing, partial) in cases {
        let mut stream = TcpStream::connect(host(&node)).await.expect("connect");
        let head = publish_head(&node, &browser, framing);
        stream
            .write_all(format!("{head}{partial}").as_bytes())
            .await
            .expect("send");
        waits.push((name, stream, Instant::now()));
    }
    // HTTP/1.0 too.
    let mut stream = TcpStream::connect(host(&node)).await.expect("connect");
    let head = format!(
        "POST /publish HTTP/1.0\r\nAuthorization: Bearer {browser}\r\nContent-Length: 50\r\n\r\n{{"
    );
    stream.write_all(head.as_bytes()).await.expect("send");
    waits.push(("HTTP/1.0 length", stream, Instant::now()));

    let normal = serve_throughout(&node, Instant::now() + DEADLINE - Duration::from_secs(5));
    let closes = futures_util::future::join_all(waits.into_iter().map(
        |(name, mut stream, since)| async move { (name, closed_at(&mut stream, since).await) },
    ));
    let ((), closes) = tokio::join!(normal, closes);
    for (name, elapsed) in closes {
        assert_at_deadline(name, elapsed);
    }
    assert_still_serves(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_deadline() {
    let node = Node::start(&[]);
    let mut conn = Conn::open(&node).await;
    let body = json!({ "channel": "broadcast", "data": "hi" }).to_string();
    let head = publish_head(
        &node,
        &publisher_token(),
        &format!("Content-Length: {}\r\n", body.len()),
    );
    conn.send(format!("{head}{body}").as_bytes()).await;
    assert_eq!(conn.response().await.status, 200);
    let since = Instant::now();
    let normal = serve_throughout(&node, since + DEADLINE - Duration::from_secs(5));
    let ((), elapsed) = tokio::join!(normal, closed_at(&mut conn.stream, since));
    assert_at_deadline("idle keep-alive", elapsed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_deadline_bounds_the_whole_head_however_it_trickles() {
    let node = Node::start(&[]);
    // One byte every 250 ms: never complete, never too large.
    let mut slow = TcpStream::connect(host(&node)).await.expect("connect");
    let slow_since = Instant::now();
    let (mut slow_read, mut slow_write) = slow.split();
    let trickle = async {
        let mut head = b"GET /events HTTP/1.1\r\nX-Slow: ".to_vec();
        head.resize(head.len() + 10_000, b'a');
        for byte in head {
            if slow_write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    // 700 bytes a second: passes the 16 KiB head limit at about 23 s.
    let mut big = TcpStream::connect(host(&node)).await.expect("connect");
    let big_since = Instant::now();
    let (mut big_read, mut big_write) = big.split();
    let flood = async {
        if big_write
            .write_all(b"GET / HTTP/1.1\r\nX-Big: ")
            .await
            .is_err()
        {
            return;
        }
        for _ in 0..40 {
            if big_write.write_all(&[b'b'; 700]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    let slow = async {
        tokio::select! {
            elapsed = closed_at(&mut slow_read, slow_since) => elapsed,
            () = trickle => panic!("the trickle ran out before the deadline"),
        }
    };
    let big = async {
        tokio::select! {
            elapsed = closed_at(&mut big_read, big_since) => elapsed,
            () = flood => panic!("the flood ran out before a close"),
        }
    };
    let closes = async { tokio::join!(slow, big) };
    let normal = serve_throughout(&node, Instant::now() + DEADLINE - Duration::from_secs(5));
    let ((), (slow, big)) = tokio::join!(normal, closes);
    assert_at_deadline("a head trickled byte by byte", slow);
    // Refused (431) as it passes 16 KiB, well before the deadline.
    assert!(
        big < DEADLINE - Duration::from_secs(3),
        "a head over 16 KiB at ~23 s: closed after {big:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_are_not_streams_are_capped() {
    let node = Node::start(&["--max-http-connections", "20"]);
    // Event streams do not count: 30 of them on a cap of 20.
    let mut streams = Vec::new();
    for i in 0..30 {
        streams.push(Sse::open(&node, &token(&format!("u{i}"))).await);
    }
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut conn = Conn::open(&node).await;
        conn.send(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host(&node)).as_bytes())
            .await;
        assert_eq!(conn.response().await.status, 200);
        idle.push(conn); // now idle in keep-alive
    }
    let mut over = Conn::open(&node).await;
    let refused = over.response().await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(
        refused.json()["error"],
        "node is at its connection limit",
        "{refused:?}"
    );
    assert!(over.closes().await);
    drop(idle);
    // Closed connections give their places back.
    let served = common::wait_until(WAIT, || async {
        let mut conn = Conn::open(&node).await;
        conn.send(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", host(&node)).as_bytes())
            .await;
        conn.response().await.status == 200
    })
    .await;
    assert!(
        served,
        "a new connection is served once the idle ones closed"
    );
    drop(streams);
    assert_still_serves(&node).await;
}
