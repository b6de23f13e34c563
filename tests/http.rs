//! The HTTP surface around the stream: SSE response headers, CORS for
//! browsers on another origin, health endpoints, listener separation.

mod common;

use common::{bearer, get, request, token, Node, Sse, WAIT};
use hyper::{Method, StatusCode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_has_sse_headers_and_opens_with_retry() {
    let node = Node::start(&[]);
    let auth = bearer(&token("alice"));
    let mut sse = Sse::connect(&node.url("/events"), &[("authorization", &auth)])
        .await
        .expect("stream");
    assert!(
        sse.header("content-type")
            .is_some_and(|ct| ct.starts_with("text/event-stream")),
        "{:?}",
        sse.headers
    );
    assert!(
        sse.header("cache-control")
            .is_some_and(|cc| cc.contains("no-cache")),
        "{:?}",
        sse.headers
    );
    assert_eq!(sse.header("x-accel-buffering"), Some("no"));
    let first = sse.next_event(WAIT).await.expect("first frame");
    assert_eq!(first.retry, Some(2000), "default --retry 2s: {first:?}");

    let node = Node::start(&["--retry", "500ms"]);
    let mut sse = Sse::connect(&node.url("/events"), &[("authorization", &auth)])
        .await
        .expect("stream");
    let first = sse.next_event(WAIT).await.expect("first frame");
    assert_eq!(first.retry, Some(500), "--retry 500ms: {first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_headers_only_for_configured_origins() {
    let node = Node::start(&["--cors-origin", "http://app.example"]);
    let cookie = format!("herald_token={}", token("alice"));

    // A browser page on the allowed origin, EventSource withCredentials.
    let mut sse = Sse::connect(
        &node.url("/events"),
        &[("origin", "http://app.example"), ("cookie", &cookie)],
    )
    .await
    .expect("stream from the allowed origin");
    assert_eq!(
        sse.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    assert_eq!(sse.header("access-control-allow-credentials"), Some("true"));
    sse.wait_ready(WAIT).await;

    let other = Sse::connect(
        &node.url("/events"),
        &[("origin", "http://evil.example"), ("cookie", &cookie)],
    )
    .await;
    let headers = match &other {
        Ok(sse) => &sse.headers,
        Err(reply) => &reply.headers,
    };
    assert!(
        headers.get("access-control-allow-origin").is_none()
            && headers.get("access-control-allow-credentials").is_none(),
        "no CORS headers for another origin: {headers:?}"
    );

    // The preflight a browser sends before POST /publish with a bearer token.
    let preflight = request(
        Method::OPTIONS,
        &node.url("/publish"),
        &[
            ("origin", "http://app.example"),
            ("access-control-request-method", "POST"),
            (
                "access-control-request-headers",
                "authorization, content-type",
            ),
        ],
        "",
    )
    .await;
    assert!(
        preflight.status.is_success(),
        "preflight: {}",
        preflight.status
    );
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    assert_eq!(
        preflight.header("access-control-allow-credentials"),
        Some("true")
    );
    let evil_preflight = request(
        Method::OPTIONS,
        &node.url("/publish"),
        &[
            ("origin", "http://evil.example"),
            ("access-control-request-method", "POST"),
        ],
        "",
    )
    .await;
    assert!(
        evil_preflight
            .header("access-control-allow-origin")
            .is_none(),
        "{:?}",
        evil_preflight.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cors_origins_no_origin_is_allowed() {
    let node = Node::start(&[]);
    let auth = bearer(&token("alice"));
    let sse = Sse::connect(
        &node.url("/events"),
        &[("origin", "http://app.example"), ("authorization", &auth)],
    )
    .await
    .expect("stream");
    assert!(
        sse.header("access-control-allow-origin").is_none(),
        "{:?}",
        sse.headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_live_on_the_admin_listener_only() {
    let node = Node::start(&[]);
    assert_eq!(
        get(&node.admin_url("/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(get(&node.admin_url("/readyz")).await.status, StatusCode::OK);
    let metrics = get(&node.admin_url("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.text().contains("herald_connections"),
        "{}",
        metrics.text()
    );
    let public_metrics = get(&node.url("/metrics")).await;
    assert_ne!(
        public_metrics.status,
        StatusCode::OK,
        "/metrics must not be exposed on the public listener"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_is_served() {
    let node = Node::start(&[]);
    let page = get(&node.url("/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.header("content-type")
            .is_some_and(|ct| ct.starts_with("text/html")),
        "{:?}",
        page.headers
    );
    assert!(
        page.text()
            .contains(r#"import { Herald } from "/herald.js";"#),
        "the demo page uses herald.js"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_traffic_without_naming_users_or_channels() {
    let node = Node::start(&[]);
    let mut tabs = [
        Sse::open(&node, &token("alice")).await,
        Sse::open(&node, &token("alice")).await,
    ];
    common::publish_ok(&node, "user:alice", serde_json::json!("hello")).await;
    for tab in &mut tabs {
        tab.next_data(WAIT).await.expect("delivered");
    }
    common::wait_metric(&node, "herald_messages_delivered_total", WAIT, |v| v >= 2.0).await;
    assert_eq!(common::metric(&node, "herald_connections").await, 2.0);
    assert_eq!(
        common::metric(&node, "herald_connections_opened_total").await,
        2.0
    );
    assert!(common::metric(&node, "herald_messages_published_total").await >= 1.0);

    let text = get(&node.admin_url("/metrics")).await.text();
    for secret in ["alice", "user:", "broadcast"] {
        assert!(
            !text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .any(|l| l.contains(secret)),
            "metric labels must not carry {secret:?}:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_has_help_text_and_promtool_finds_nothing() {
    let node = Node::start(&[]);
    // Some traffic, so histograms and labelled series are all present.
    let mut sse = Sse::open(&node, &token("alice")).await;
    common::publish_ok(&node, "user:alice", serde_json::json!("hi")).await;
    sse.next_data(WAIT).await.expect("delivered");
    let text = get(&node.admin_url("/metrics")).await.text();
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).expect("metric name");
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no # HELP"
        );
    }
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (tests/run installs it)");
    use std::io::Write as _;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_carry_no_colour_codes() {
    let mut node = Node::start(&[]);
    // A drain logs a line at the default level.
    node.signal("TERM");
    node.wait_exit(WAIT).await;
    let log = node.stderr_tail();
    assert!(log.contains("draining"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escapes in piped logs: {log:?}");
}
