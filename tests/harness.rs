//! Tests of the test harness itself (`tests/common`), so a failure elsewhere
//! points at the server, not at the SSE parser or the metrics reader.

mod common;

use std::collections::VecDeque;

use common::{metric_in, parse_listening, payloads, Event, Parser, Redis};

fn parse_chunks(chunks: &[&[u8]]) -> Vec<Event> {
    let mut parser = Parser::default();
    let mut out = VecDeque::new();
    for chunk in chunks {
        parser.feed(chunk, &mut out);
    }
    out.into_iter().collect()
}

#[test]
fn sse_parser_handles_the_wire_format() {
    let stream: &[u8] =
        b"retry: 2000\n\n:\n\nid: v1.a\nevent: notice\ndata: one\ndata:two\ndata\n\n\
                          data: crlf\r\n\r\ndata: cr\r\rbogus: x\nid\n\n";
    let expected = vec![
        Event {
            retry: Some(2000),
            ..Event::default()
        },
        Event {
            comment: Some(String::new()),
            ..Event::default()
        },
        Event {
            id: Some("v1.a".into()),
            event: Some("notice".into()),
            data: Some("one\ntwo\n".into()),
            ..Event::default()
        },
        Event {
            data: Some("crlf".into()),
            ..Event::default()
        },
        Event {
            data: Some("cr".into()),
            ..Event::default()
        },
        Event {
            id: Some(String::new()),
            ..Event::default()
        },
    ];
    assert_eq!(parse_chunks(&[stream]), expected);
    // Byte by byte: every split point, including CR|LF across chunks.
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(parse_chunks(&bytes), expected);
}

#[test]
fn sse_parser_strips_bom_and_drops_unterminated_frames() {
    let events = parse_chunks(&[b"\xEF\xBB", b"\xBFdata: x\n\ndata: half"]);
    assert_eq!(payloads(&events), vec!["x".to_string()]);
}

#[test]
fn sse_parser_keeps_long_lines_split_across_chunks() {
    let line = "y".repeat(100_000);
    let stream = format!("data: {line}\n\n");
    let chunks: Vec<&[u8]> = stream.as_bytes().chunks(1000).collect();
    assert_eq!(payloads(&parse_chunks(&chunks)), vec![line]);
}

#[test]
fn prometheus_series_match_by_name_and_label_set() {
    let text = "# TYPE herald_connections gauge\nherald_connections 3\n\
                herald_connections_closed_total{reason=\"slow\",x=\"y\"} 2 1700000000\n\
                herald_connections_closed_total{reason=\"client\"} 5\n";
    assert_eq!(metric_in(text, "herald_connections"), Some(3.0));
    assert_eq!(
        metric_in(
            text,
            "herald_connections_closed_total{x=\"y\", reason=\"slow\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric_in(text, "herald_connections_closed_total{reason=\"client\"}"),
        Some(5.0)
    );
    assert_eq!(
        metric_in(text, "herald_connections_closed_total{reason=\"expired\"}"),
        None
    );
}

#[test]
fn listening_line_parses() {
    let parsed = parse_listening(
        "herald listening public=http://127.0.0.1:1 admin=http://127.0.0.1:2 node=n-1",
    );
    assert_eq!(
        parsed,
        Some((
            "http://127.0.0.1:1".into(),
            "http://127.0.0.1:2".into(),
            "n-1".into()
        ))
    );
}

#[test]
fn redis_starts_answers_and_restarts_on_the_same_port() {
    let mut redis = Redis::start_persistent();
    let port = redis.port();
    assert!(redis.url().ends_with(&format!(":{port}")));
    redis.kill();
    redis.restart();
    assert_eq!(redis.port(), port);
}
