//! Session cookies through the application (`--auth-url`): a local HTTP
//! server in the test plays the app that knows which cookie is whose.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::app::{Answer, AppServer, Seen};
use common::{metric, now, request, Node, Reply, Sse, WAIT};
use hyper::{Method, StatusCode};
use serde_json::json;

/// The app: `sid=alice` is user 42 with topic `news`; `sid=banned` is a
/// 403; `sid=broken` a 500; `sid=short` expires in 2 s; anything else 401
/// (with a body that must never reach the client).
fn app(seen: &Seen) -> Answer {
    match seen.header("cookie") {
        Some("sid=alice") => Answer::json(200, r#"{"sub":"42","topics":["news"]}"#),
        Some("sid=banned") => Answer::json(403, r#"{"internal":"banned by rule 7"}"#),
        Some("sid=broken") => Answer::json(500, r#"{"internal":"stack trace"}"#),
        Some("sid=short") => Answer::json(200, json!({"sub": "7", "exp": now() + 2}).to_string()),
        Some(cookie) if cookie.starts_with("sid=user-") => {
            let sub = cookie.trim_start_matches("sid=");
            Answer::json(200, json!({ "sub": sub }).to_string()).after(Duration::from_millis(100))
        }
        _ => Answer::json(401, r#"{"internal":"no such session"}"#),
    }
}

fn node_for(server: &AppServer, extra: &[&str]) -> Node {
    let url = server.url("/herald-auth");
    let mut args = vec!["--auth-url", url.as_str()];
    args.extend_from_slice(extra);
    Node::start(&args)
}

async fn events_with_cookie(node: &Node, path: &str, cookie: &str) -> Result<Sse, Reply> {
    Sse::connect(
        &node.url(path),
        &[("cookie", cookie), ("origin", "https://app.example")],
    )
    .await
}

async fn history_with_cookie(node: &Node, cookie: &str) -> Reply {
    request(
        Method::GET,
        &node.url("/history?channel=user:42"),
        &[("cookie", cookie)],
        Bytes::new(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_decides_who_a_session_cookie_is_and_its_refusals_pass_on() {
    let server = AppServer::start(app).await;
    let node = node_for(&server, &[]);

    let mut sse = events_with_cookie(&node, "/events?topic=news", "sid=alice")
        .await
        .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()));
    sse.wait_ready(WAIT).await;
    let ready = sse.ready().json();
    assert_eq!(ready["user"], "42");
    assert_eq!(
        ready["channels"],
        json!(["user:42", "broadcast", "topic:news"])
    );
    let reply = history_with_cookie(&node, "sid=alice").await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "/history too: {}",
        reply.text()
    );

    for (cookie, status) in [
        ("sid=nobody", StatusCode::UNAUTHORIZED),
        ("sid=banned", StatusCode::FORBIDDEN),
        ("sid=broken", StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let reply = events_with_cookie(&node, "/events", cookie)
            .await
            .err()
            .unwrap_or_else(|| panic!("{cookie} opened a stream"));
        reply.assert_json_error(status);
        assert!(
            !reply.text().contains("internal"),
            "the app's body is never shown: {}",
            reply.text()
        );
    }
    let forbidden_topic = events_with_cookie(&node, "/events?topic=sports", "sid=alice").await;
    forbidden_topic
        .expect_err("topic the app did not grant")
        .assert_json_error(StatusCode::FORBIDDEN);
    // No cookie at all: nothing to ask the app about.
    let before = server.hits();
    Sse::connect(&node.url("/events"), &[])
        .await
        .expect_err("no credentials")
        .assert_json_error(StatusCode::UNAUTHORIZED);
    assert_eq!(server.hits(), before);
    assert_eq!(
        metric(&node, "herald_auth_requests_total{result=\"ok\"}").await,
        1.0
    );
    assert_eq!(
        metric(&node, "herald_auth_requests_total{result=\"denied\"}").await,
        2.0
    );
    assert_eq!(
        metric(&node, "herald_auth_requests_total{result=\"error\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_app_is_a_503_within_the_auth_timeout() {
    let server =
        AppServer::start(|_| Answer::json(200, r#"{"sub":"42"}"#).after(Duration::from_secs(3)))
            .await;
    let node = node_for(&server, &["--auth-timeout", "500ms"]);
    let started = Instant::now();
    let reply = events_with_cookie(&node, "/events", "sid=alice")
        .await
        .expect_err("no stream without an answer");
    reply.assert_json_error(StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered before the app did: {:?}",
        started.elapsed()
    );
    assert_eq!(
        metric(&node, "herald_auth_requests_total{result=\"error\"}").await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cookie_is_asked_about_once_and_many_never_exceed_the_call_limit() {
    let server = AppServer::start(app).await;
    let node = node_for(&server, &[]);

    // 1,000 requests with one cookie, 100 at a time: the cache and the
    // shared in-flight call answer nearly all of them.
    for _ in 0..10 {
        let wave: Vec<_> = (0..100)
            .map(|_| history_with_cookie(&node, "sid=user-same"))
            .collect();
        for reply in futures_util::future::join_all(wave).await {
            reply.assert_json_error(StatusCode::FORBIDDEN); // user-same may not read user:42
        }
    }
    assert!(
        server.hits() <= 3,
        "{} auth calls for one cookie",
        server.hits()
    );

    // 1,000 different cookies, 250 at a time: never more than 32 calls at once.
    for wave in 0..4 {
        let replies: Vec<_> = (0..250)
            .map(|i| {
                let cookie = format!("sid=user-{wave}-{i}");
                let node = &node;
                async move { history_with_cookie(node, &cookie).await }
            })
            .collect();
        for reply in futures_util::future::join_all(replies).await {
            assert!(
                reply.status == StatusCode::FORBIDDEN
                    || reply.status == StatusCode::SERVICE_UNAVAILABLE,
                "{} {}",
                reply.status,
                reply.text()
            );
        }
    }
    assert!(
        server.peak() <= 32,
        "{} auth calls in flight at once",
        server.peak()
    );
    assert!(server.peak() > 1, "the calls did run concurrently");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_the_browsers_headers_and_its_exp_ends_the_stream() {
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = asked.clone();
    let server = AppServer::start(move |seen| {
        record.lock().expect("lock").push(seen.clone());
        app(seen)
    })
    .await;
    let node = node_for(&server, &["--jwt-leeway", "0s"]);
    let mut sse = Sse::connect(
        &node.url("/events"),
        &[
            ("cookie", "sid=short"),
            ("origin", "https://app.example"),
            ("x-forwarded-for", "203.0.113.7"),
            ("authorization-extra", "not forwarded"),
        ],
    )
    .await
    .unwrap_or_else(|r| panic!("refused: {} {}", r.status, r.text()));
    {
        let asked = asked.lock().expect("lock");
        let seen = asked.first().expect("the app was asked");
        assert_eq!(seen.path, "/herald-auth");
        assert_eq!(seen.header("cookie"), Some("sid=short"));
        assert_eq!(seen.header("origin"), Some("https://app.example"));
        assert_eq!(seen.header("x-forwarded-for"), Some("203.0.113.7"));
        assert_eq!(
            seen.header("authorization-extra"),
            None,
            "only the three headers"
        );
    }
    sse.wait_ready(WAIT).await;
    let events = sse.read_to_end(WAIT).await.expect("the stream ends at exp");
    assert!(
        events.iter().any(|e| e.name() == "herald.expired"),
        "{events:?}"
    );
}
