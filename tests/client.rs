//! What the browser client needs from a node: `GET /herald.js` (a cached,
//! revalidated ES module) and `?last_event_id=` on `/events` for a new
//! EventSource that cannot send `Last-Event-ID`. Also runs the client's own
//! unit tests (`node --test clients/js/test/`).

mod common;

use common::{bearer, get, payloads, publish_ok, request, token, Node, Sse, WAIT};
use hyper::{Method, StatusCode};
use serde_json::json;

fn numbered(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn source() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/js/herald.js"))
        .expect("read clients/js/herald.js")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_js_is_served_as_a_module_with_an_etag() {
    let node = Node::start(&[]);
    let reply = get(&node.url("/herald.js")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_eq!(reply.header("cache-control"), Some("no-cache"));
    assert_eq!(reply.text(), source(), "the committed file, byte for byte");
    assert!(reply.text().contains("export class Herald"));
    let etag = reply.header("etag").expect("an ETag").to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"') && etag.len() > 2,
        "a strong tag: {etag}"
    );

    // Another node of the same build agrees on the tag (nginx may pick any).
    let other = Node::start(&[]);
    let again = get(&other.url("/herald.js")).await;
    assert_eq!(again.header("etag"), Some(etag.as_str()));

    // Revalidation: unchanged → 304 without a body, still cacheable.
    for if_none_match in [
        etag.clone(),
        format!("W/{etag}"),
        format!("\"x\", {etag}"),
        "*".into(),
    ] {
        let reply = request(
            Method::GET,
            &node.url("/herald.js"),
            &[("if-none-match", &if_none_match)],
            "",
        )
        .await;
        assert_eq!(reply.status, StatusCode::NOT_MODIFIED, "{if_none_match}");
        assert!(reply.body.is_empty());
        assert_eq!(reply.header("etag"), Some(etag.as_str()));
        assert_eq!(reply.header("cache-control"), Some("no-cache"));
    }
    let stale = request(
        Method::GET,
        &node.url("/herald.js"),
        &[("if-none-match", "\"0000000000000000\"")],
        "",
    )
    .await;
    assert_eq!(
        stale.status,
        StatusCode::OK,
        "another tag gets the new file"
    );
    assert_eq!(stale.text(), source());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_js_gets_cors_headers_for_allowed_origins_only() {
    let node = Node::start(&["--cors-origin", "http://app.example"]);
    let allowed = request(
        Method::GET,
        &node.url("/herald.js"),
        &[("origin", "http://app.example")],
        "",
    )
    .await;
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("http://app.example")
    );
    let other = request(
        Method::GET,
        &node.url("/herald.js"),
        &[("origin", "http://evil.example")],
        "",
    )
    .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.header("access-control-allow-origin"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_in_the_query_resumes_a_new_event_source() {
    let node = Node::start(&[]);
    let alice = token("alice");
    let auth = bearer(&alice);
    let mut sse = Sse::open(&node, &alice).await;
    publish_ok(&node, "user:alice", json!("before")).await;
    sse.next_data(WAIT).await.expect("before");
    let cursor = sse.last_id().expect("a cursor").to_string();
    drop(sse);
    for data in numbered("missed", 5) {
        publish_ok(&node, "user:alice", json!(data)).await;
    }

    // A page reload: a new EventSource, no header, the cursor in the URL.
    let query: String = form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
    let mut resumed = Sse::connect(
        &node.url(&format!("/events?last_event_id={query}")),
        &[("authorization", &auth)],
    )
    .await
    .expect("stream");
    let replayed = resumed.wait_ready(WAIT).await;
    assert_eq!(payloads(&replayed), numbered("missed", 5));
    assert!(
        replayed.iter().all(|e| e.name() != "herald.reset"),
        "{replayed:?}"
    );
    let newest = resumed.last_id().expect("cursor").to_string();
    drop(resumed);

    // Both present: the header (EventSource's own reconnect, newer) wins
    // over the URL the page was opened with (older).
    publish_ok(&node, "user:alice", json!("after")).await;
    let mut both = Sse::connect(
        &node.url(&format!("/events?last_event_id={query}")),
        &[("authorization", &auth), ("last-event-id", &newest)],
    )
    .await
    .expect("stream");
    let replayed = both.wait_ready(WAIT).await;
    assert_eq!(payloads(&replayed), ["after"], "resumed from the header");

    // An empty parameter is no cursor at all: live only, no reset.
    let mut fresh = Sse::connect(
        &node.url("/events?last_event_id="),
        &[("authorization", &auth)],
    )
    .await
    .expect("stream");
    let replayed = fresh.wait_ready(WAIT).await;
    assert!(
        replayed
            .iter()
            .all(|e| !e.dispatches() || e.name() == "herald.ready"),
        "{replayed:?}"
    );

    // A malformed one is treated like a malformed header: reset, then live.
    let mut bad = Sse::connect(
        &node.url("/events?last_event_id=garbage"),
        &[("authorization", &auth)],
    )
    .await
    .expect("stream");
    let replayed = bad.wait_ready(WAIT).await;
    assert!(
        replayed.iter().any(|e| e.name() == "herald.reset"),
        "{replayed:?}"
    );
}

#[test]
fn the_browser_clients_unit_tests_pass_under_node() {
    let output = std::process::Command::new("node")
        .args(["--test", "clients/js/test/"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run node (tests/run installs Node.js)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "node --test clients/js/test/ failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("# fail 0"), "{stdout}");
    assert!(!stdout.contains("# pass 0"), "{stdout}");
}
